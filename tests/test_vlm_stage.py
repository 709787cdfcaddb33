"""The VLM stages end to end on tiny models: a random SDE tokenizer saved as a run,
captions of the bundled photographs, a 1-layer decoder. Exact resume, per-task
TensorBoard scalars, and initialisation from converted weights or a previous run."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import load_config, tiny_sde_config
from tensorboard.backend.event_processing import event_accumulator
from test_weights import write_hf_qwen2

from muse_jax import config_lib, weights
from muse_jax.convert import __main__ as convert_cli
from muse_jax.data import image_codes
from muse_jax.models import qwen2
from muse_jax.parallel import sharding
from muse_jax.train import checkpoint as checkpoint_lib
from muse_jax.train import llm_trainer, sde_trainer


def assert_same_leaves(a, b):
  """Two trees agree bit for bit, leaf by leaf (conftest.assert_same_state expects the
  SDE state's 50+ leaves; the tiny decoder's state has fewer)."""
  a = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(a)))
  b = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(b)))
  assert a.keys() == b.keys() and len(a) > 10
  for path, x in a.items():
    np.testing.assert_array_equal(x, b[path], err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def sde_run(tmp_path_factory):
  """A randomly initialised tiny SDE tokenizer (32 px, 4x4 codes of 64) saved as a run."""
  c = tiny_sde_config(batch_size=2, total_steps=1, disc_start=1)
  run = sde_trainer.setup(c, sharding.make_mesh(c.mesh))
  state, _ = run.init()
  workdir = tmp_path_factory.mktemp("sde")
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"))
  ckpt.save(1, state, {})
  ckpt.close()
  checkpoint_lib.save_config(c, str(workdir))
  return str(workdir)


def tiny_vlm_config(sde_dir, name="vlm_pretrain"):
  c = load_config(name, "demo")
  c.model.update(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
  c.vocab.num_visual = 64
  c.sde_workdir = sde_dir
  if "sde_config" in c:   # the demo's SDE run to train first when sde_workdir is empty
    # the programs of test_sde_trainer's 2-step runs: compiled once per test session
    c.sde_config = tiny_sde_config(batch_size=2, total_steps=2, disc_start=10)
    c.sde_config.update(eval_every=100, checkpoint_every=100)
  c.tokenizer_dir = ""
  c.init_from = ""
  c.data.update(views=2, num_eval_images=2)
  c.sequences.tasks.update(pretrain=0.5, understanding=0.25, generation=0.25)
  c.sequences.pack_buffer = 8
  c.update(batch_size=2, seq_len=128, loss_chunk=64, total_steps=4, log_every=1, eval_every=2,
           checkpoint_every=2)
  return c


@pytest.fixture(scope="module")
def runs(sde_run, tmp_path_factory):
  config = tiny_vlm_config(sde_run)
  straight_dir = str(tmp_path_factory.mktemp("straight"))
  resumed_dir = str(tmp_path_factory.mktemp("resumed"))
  straight = llm_trainer.train(config, straight_dir)
  first = llm_trainer.train(config, resumed_dir, stop_after=2)    # "killed" after step 2
  resumed = llm_trainer.train(config, resumed_dir)
  return config, straight_dir, straight, first, resumed


def test_resume_is_an_exact_continuation(runs):
  _, _, straight, first, resumed = runs
  assert (first["step"], resumed["step"], straight["step"]) == (2, 4, 4)
  assert_same_leaves(straight["state"], resumed["state"])
  for key in ("loss/lm", "loss/text", "loss/visual", "data/rows", "data/padding_tokens"):
    assert straight["metrics"][key] == resumed["metrics"][key], key


def test_per_task_scalars_in_tensorboard(runs):
  _, straight_dir, straight, _, _ = runs
  acc = event_accumulator.EventAccumulator(os.path.join(straight_dir, "tensorboard"),
                                           size_guidance={"scalars": 0})
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  for tag in ("loss/lm", "loss/text", "loss/visual", "accuracy", "accuracy/visual",
              "tokens_per_second", "data/padding_fraction", "data/sequences",
              "data/dropped_too_long", "eval/loss", "eval/loss/text", "eval/loss/visual"):
    assert tag in tags, tag
  assert [e.step for e in acc.Scalars("eval/loss")] == [0, 2, 4]
  m = straight["metrics"]
  assert m["loss/text"] > 0 and m["loss/visual"] > 0 and 0 < m["data/padding_fraction"] < 1
  assert m["tokens_per_second"] > 0 and m["data/sequences"] >= 2 * 4
  assert m["data/dropped_too_long"] == 0 and not any("skipped" in k for k in m)
  history = [json.loads(line) for line in open(os.path.join(straight_dir, "eval_history.jsonl"))]
  assert [h["step"] for h in history] == [0, 2, 4]
  config = json.load(open(os.path.join(straight_dir, "config.json")))
  assert config["tokenizer_dir"] == os.path.join(straight_dir, "tokenizer")


def test_examples_are_encoded_views_of_the_annotated_photos(sde_run):
  entries = image_codes.load_annotations()
  assert len(entries) == 17 and all(len(e["qa"]) == 2 for e in entries)
  from muse_jax.data import sources
  from muse_jax.inference import sde_tokenizer
  tokenizer, _, _ = sde_tokenizer.load_tokenizer(sde_run)
  encode = sde_tokenizer.batched_encoder(tokenizer, 3)
  examples, skipped = image_codes.code_examples(entries[:2] + [{"file": "nope.png",
                                                                "caption": "x"}],
                                                sources.bundled_dir(), encode, image_size=32,
                                                views=2, min_scale=0.5)
  assert skipped == {"data/skipped_unreadable": 1}
  assert [e["key"] for e in examples] == ["astronaut.png#0", "astronaut.png#1", "brick.png#0",
                                          "brick.png#1"]
  assert examples[0]["codes"].shape == (4, 4) and examples[0]["codes"].max() < 64
  assert examples[0]["conversations"][1] == {"from": "gpt", "value": entries[0]["qa"][0][1]}


def test_init_from_converted_weights_or_a_run_keeps_the_loaded_rows(runs, sde_run, tmp_path):
  config, straight_dir, straight, _, _ = runs
  c = tiny_vlm_config(sde_run)
  write_hf_qwen2(tmp_path / "hf", qwen2.Qwen2Config(**dict(c.model.to_dict())))
  convert_cli.main(["llm-from-hf", "--hf_dir", str(tmp_path / "hf"), "--out",
                    str(tmp_path / "vl"), "--muse_vl", "--num_visual", "64"])
  c.init_from = str(tmp_path / "vl")
  c.tokenizer_dir = os.path.join(straight_dir, "tokenizer")
  out = llm_trainer.train(c, str(tmp_path / "from_hf"), stop_after=0)
  assert out["step"] == 0
  params = out["state"]["params"]
  embedding = np.asarray(params["model"]["embed_tokens"]["embedding"].get_value())
  np.testing.assert_array_equal(embedding, weights.read(c.init_from, llm_trainer.EMBEDDING))
  np.testing.assert_array_equal(
      np.asarray(params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()),
      weights.read(c.init_from, "model/layers/0/mlp/up_proj/kernel"))

  # instruction tuning starts where pre-training ended: init_from a run directory
  # (its SDE run and text tokenizer come from the run's config.json)
  sft = tiny_vlm_config("", "vlm_sft")
  sft.init_from = straight_dir
  out = llm_trainer.train(sft, str(tmp_path / "sft"), stop_after=0)
  assert_same_leaves(out["state"]["params"], straight["state"]["params"])
  used = json.load(open(tmp_path / "sft" / "config.json"))
  assert (used["sde_workdir"], used["tokenizer_dir"]) == (sde_run, c.tokenizer_dir)
  # a run's checkpoint keeps its layout: the other one is refused with the field to set
  sft.model.scan_layers = True
  with pytest.raises(config_lib.ConfigError, match=r"^config.model.scan_layers: True, but the "
                     r"run .* stores its layers unrolled .* set --config.model.scan_layers=False"):
    llm_trainer.train(sft, str(tmp_path / "sft_scanned"), stop_after=0)
  resumed = config.copy_and_resolve_references()
  resumed.model.scan_layers = True
  with pytest.raises(config_lib.ConfigError, match=r"^config.model.scan_layers: True, but the "
                     r"run in .* stores its layers unrolled .* set --config.model.scan_layers="):
    llm_trainer.train(resumed, straight_dir)


def test_a_config_without_sde_run_trains_its_sde_config_first(tmp_path):
  c = tiny_vlm_config("")
  workdir = tmp_path / "pt"
  assert llm_trainer.sde_run_dir(c, str(workdir)) == str(workdir / "sde_tokenizer")
  sde_dir = workdir / "sde_tokenizer"
  assert json.load(open(sde_dir / "config.json"))["total_steps"] == 2
  assert checkpoint_lib.Checkpointer(sde_dir / "checkpoints").latest_step() == 2
  evals = (sde_dir / "eval_history.jsonl").read_text()
  # a second start (a resumed VLM run) finds the tokenizer complete and trains nothing
  assert llm_trainer.sde_run_dir(c, str(workdir)) == str(sde_dir)
  assert (sde_dir / "eval_history.jsonl").read_text() == evals
  assert checkpoint_lib.Checkpointer(sde_dir / "checkpoints").latest_step() == 2


def test_stage_config_errors_name_the_field(sde_run, tmp_path):
  c = tiny_vlm_config(sde_run)
  c.vocab.num_visual = 128
  with pytest.raises(config_lib.ConfigError, match=r"^config.vocab.num_visual: .* has 64 codes"):
    llm_trainer.train(c, str(tmp_path))
  c = tiny_vlm_config("")
  del c["sde_config"]
  with pytest.raises(config_lib.ConfigError, match=r"^config.sde_workdir: is empty"):
    llm_trainer.train(c, str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r"^config.trainer: .*vlm_pretrain.py"):
    llm_trainer.train(load_config("muse_vl", "demo"), str(tmp_path))
