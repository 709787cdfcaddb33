"""SDE training stage end to end on a tiny config: exact resume, checkpoints, logs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_state, tiny_sde_config
from tensorboard.backend.event_processing import event_accumulator

from muse_jax.parallel import sharding as sharding_lib
from muse_jax.train import checkpoint as checkpoint_lib
from muse_jax.train import sde_trainer


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
  # the discriminator joins at step 5, after the restart point
  config = tiny_sde_config(batch_size=2, total_steps=6, disc_start=4)
  config.update(eval_every=3, checkpoint_every=3)
  config.codebook.restart_after = 2    # 64 entries, 32 tokens a step: restarts every step
  straight_dir = str(tmp_path_factory.mktemp("straight"))
  resumed_dir = str(tmp_path_factory.mktemp("resumed"))
  straight = sde_trainer.train(config, straight_dir)
  first = sde_trainer.train(config, resumed_dir, stop_after=3)     # "killed" after step 3
  resumed = sde_trainer.train(config, resumed_dir)                 # picks up at step 3
  return config, straight_dir, resumed_dir, straight, first, resumed


def test_resume_is_bit_exact(straight_and_resumed):
  _, _, _, straight, first, resumed = straight_and_resumed
  assert first["step"] == 3 and resumed["step"] == 6 and straight["step"] == 6
  a, b = jax.device_get(straight["state"]), jax.device_get(resumed["state"])
  assert_same_state(a, b)
  assert "disc_params" in a  # the GAN part of the state was exercised and compared
  assert straight["metrics"]["loss/total"] == resumed["metrics"]["loss/total"]


def test_restarts_keep_every_entry_recently_used(straight_and_resumed):
  config, straight_dir, _, straight, _, _ = straight_and_resumed
  last_used = np.asarray(jax.device_get(straight["state"]["codebook"]["last_used"]))
  assert np.all(6 - last_used < config.codebook.restart_after)
  acc = event_accumulator.EventAccumulator(os.path.join(straight_dir, "tensorboard"),
                                           size_guidance={"scalars": 0})
  acc.Reload()
  assert sum(e.value for e in acc.Scalars("codebook/restarted")) > 0


def test_codebook_seeded_by_kmeans_plus_plus_from_first_batch():
  from muse_jax import data as data_lib
  config = tiny_sde_config(batch_size=2, total_steps=2, disc_start=10)
  config.codebook.update(init="kmeans++")
  config.model.codebook_size = 16
  run = sde_trainer.setup(config, sharding_lib.make_mesh(config.mesh))
  state, _ = run.init()

  def pipeline():
    return data_lib.build_train_pipeline(config.data, global_batch_size=2, seed=config.seed)

  state = sde_trainer.seed_codebook_from_data(run, state, pipeline(), config)
  book = np.asarray(jax.device_get(state["params"]["quantizer"]["codebook"][...]))
  tokenizer = run.models.tokenizer(state["params"], state["frozen"])
  features = np.asarray(tokenizer.features(next(pipeline())["image"])[0]).reshape(-1, 8)
  # every entry is one of the first batch's 32 features, 16 distinct ones
  distance = np.abs(book[:, None] - features[None]).max(-1)
  assert np.all(distance.min(1) < 1e-5)
  assert len(set(distance.argmin(1).tolist())) == 16


def test_kmeans_plus_plus_seeding_runs_once_and_resumes_exactly(tmp_path):
  """The loop seeds a fresh run (the seeding batch's position goes into every
  checkpoint) and never reseeds a resumed one: a run killed after step 1 ends
  where the straight run does."""
  config = tiny_sde_config(batch_size=2, total_steps=2, disc_start=10)
  config.update(eval_every=100, checkpoint_every=100)
  config.codebook.init = "kmeans++"
  straight = sde_trainer.train(config, str(tmp_path / "straight"))
  sde_trainer.train(config, str(tmp_path / "resumed"), stop_after=1)
  resumed = sde_trainer.train(config, str(tmp_path / "resumed"))
  assert_same_state(jax.device_get(straight["state"]), jax.device_get(resumed["state"]))


def test_checkpoints_and_tensorboard(straight_and_resumed):
  _, straight_dir, _, _, _, _ = straight_and_resumed
  assert sorted(os.listdir(os.path.join(straight_dir, "checkpoints"))) == ["3", "6"]
  assert os.path.exists(os.path.join(straight_dir, "reconstructions", "step_00000006.png"))
  logdir = os.path.join(straight_dir, "tensorboard")
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  tags = acc.Tags()
  for tag in ("loss/total", "loss/l2", "loss/lpips", "loss/semantic", "loss/codebook",
              "loss/commitment", "grad_norm/generator", "lr", "codebook/usage",
              "codebook/perplexity", "steps_per_second", "eval/psnr", "eval/ssim",
              "loss/discriminator", "loss/generator_adv", "data/skipped_corrupt",
              "codebook/window_perplexity", "codebook/restarted", "eval/codebook_usage",
              "eval/codebook_perplexity", "eval/dead_codes"):
    assert tag in tags["scalars"], tag
  assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]
  assert [e.step for e in acc.Scalars("eval/psnr")] == [0, 3, 6]
  assert [e.step for e in acc.Scalars("loss/discriminator")] == [5, 6]
  usage = [e.value for e in acc.Scalars("codebook/usage")]
  assert all(0 < u <= 1 for u in usage)
  assert "eval/inputs_vs_reconstructions" in tags["images"]
  assert [e.step for e in acc.Images("eval/code_frequencies")] == [0, 3, 6]
  # eval usage counts the codes of both held-out images (2 x 16 tokens)
  dead = acc.Scalars("eval/dead_codes")[-1].value
  usage = acc.Scalars("eval/codebook_usage")[-1].value
  assert 64 - 32 <= dead < 64 and usage == pytest.approx(1 - dead / 64)
  img = acc.Images("eval/inputs_vs_reconstructions")[-1]
  assert (img.height, img.width) == (2 * 32, 2 * 32)


def test_incomplete_save_is_ignored_on_resume(straight_and_resumed, tmp_path):
  """A run killed mid-save leaves a tmp directory; resume uses the last complete step."""
  config, _, resumed_dir, _, _, _ = straight_and_resumed
  os.makedirs(os.path.join(resumed_dir, "checkpoints", "9.orbax-checkpoint-tmp", "state"))
  assert checkpoint_lib.Checkpointer(os.path.join(resumed_dir, "checkpoints")).latest_step() == 6


def test_mismatched_checkpoint_names_tensor(straight_and_resumed):
  config, straight_dir, _, _, _, _ = straight_and_resumed
  changed = config.copy_and_resolve_references()
  changed.model.code_dim = 4
  changed.total_steps = 7
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"tensors differ.*params\.post_quant\.kernel\S* has shape \(8, 16\) "
                           r"in the checkpoint but the model expects \(4, 16\)"):
    sde_trainer.train(changed, straight_dir)
  with open(os.path.join(straight_dir, "config.json")) as f:   # the run's record is intact
    assert json.load(f)["model"]["code_dim"] == 8


def test_trained_tokenizer_loads_for_inference(straight_and_resumed):
  from muse_jax.inference import sde_tokenizer
  _, straight_dir, _, straight, _, _ = straight_and_resumed
  tokenizer, config, step = sde_tokenizer.load_tokenizer(straight_dir)
  assert step == 6
  trained = jax.device_get(straight["state"]["params"]["quantizer"]["codebook"][...])
  np.testing.assert_array_equal(np.asarray(tokenizer.quantizer.codebook[...]), trained)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  codes = tokenizer.encode(images)
  assert codes.shape == (2, 4, 4)
  assert tokenizer.decode(codes).shape == (2, 32, 32, 3)


@pytest.mark.parametrize("variant", ["ema", "simvq"])
def test_codebook_variants_train(variant, tmp_path):
  """EMA updates own the codebook (its entries are the moving averages), SimVQ
  trains only the map (its basis stays as drawn)."""
  config = tiny_sde_config(batch_size=2, total_steps=2, disc_start=10)
  config.update(eval_every=100, checkpoint_every=100)
  if variant == "ema":
    config.codebook.update_rule = "ema"
  else:
    config.model.simvq = True
    config.codebook.restart_after = 0    # the demo's restarts write entries SimVQ derives
  run = sde_trainer.setup(config, sharding_lib.make_mesh(config.mesh))
  initial = jax.device_get(run.init()[0])
  state = jax.device_get(sde_trainer.train(config, str(tmp_path))["state"])
  if variant == "ema":
    book = np.asarray(state["params"]["quantizer"]["codebook"][...])
    count = np.asarray(state["codebook"]["ema_count"])
    smoothed = (count + 1e-5) / (count.sum() + 64e-5) * count.sum()
    np.testing.assert_allclose(book, np.asarray(state["codebook"]["ema_sum"]) / smoothed[:, None],
                               rtol=1e-5)
    assert np.abs(book - np.asarray(initial["params"]["quantizer"]["codebook"][...])).sum() > 0
  else:
    quantizer, before = state["params"]["quantizer"], initial["params"]["quantizer"]
    assert "codebook" not in quantizer
    np.testing.assert_array_equal(np.asarray(state["frozen"]["quantizer"]["basis"][...]),
                                  np.asarray(initial["frozen"]["quantizer"]["basis"][...]))
    assert np.abs(np.asarray(quantizer["codebook_map"][...])
                  - np.asarray(before["codebook_map"][...])).sum() > 0


def test_usage_window_warns_below_floor_and_eval_counts(caplog):
  usage = sde_trainer.CodebookUsage(codebook_size=4, window=2)
  usage.add(np.array([3, 0, 0, 0]))
  assert usage.scalars(0.5, step=1)["codebook/usage"] == 0.25
  assert not caplog.records                       # a partial window does not warn
  usage.add(np.array([1, 0, 0, 0]))
  with caplog.at_level("WARNING"):
    scalars = usage.scalars(0.5, step=2)
  assert scalars == {"codebook/usage": 0.25, "codebook/window_perplexity": 1.0}
  assert "usage 25.0%" in caplog.text and "usage_floor 50.0%" in caplog.text
  usage.add(np.array([0, 2, 2, 0]))               # the first step leaves the window
  caplog.clear()
  assert usage.scalars(0.5, step=3)["codebook/usage"] == 0.75 and not caplog.records
  ev = sde_trainer.codebook_eval_scalars(np.array([2, 2, 0, 0]))
  assert ev == {"eval/codebook_usage": 0.5, "eval/codebook_perplexity": pytest.approx(2.0),
                "eval/dead_codes": 2.0}
  chart = sde_trainer.code_histogram(np.array([0, 5, 1, 0]), width=4, height=10)
  assert chart.shape == (10, 4, 3) and chart.dtype == np.uint8
  # ranked: the most used entry fills its column, dead entries stay blank
  assert np.all(chart[:, 0] == 40) and np.all(chart[:, 2:] == 255)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lpips_computes_in_the_model_dtype(dtype):
  # LlamaGen runs LPIPS under its bf16 autocast; in f32 its VGG activations were the
  # largest buffers of the full-size step
  config = tiny_sde_config(batch_size=2, total_steps=1, disc_start=0)
  config.model.dtype = dtype
  _, _, lpips = sde_trainer.Models(config)._modules()
  images = np.zeros((1, 32, 32, 3), np.float32)
  assert lpips.features[0](images).dtype == jnp.dtype(dtype)
