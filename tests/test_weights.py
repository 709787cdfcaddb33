"""The one pretrained-weights format: round trips, errors naming the tensor, every stage's
loader (decoder init_from, SDE tokenizer from a run), and sharded loading's memory."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import ROOT, load_config, tiny_sde_config
from muse_jax import config_lib, weights
from muse_jax.convert import __main__ as cli
from muse_jax.convert import checkpoint, hf, tensor_io
from muse_jax.models import qwen2
from muse_jax.parallel import sharding
from muse_jax.train import checkpoint as checkpoint_lib
from muse_jax.train import llm_trainer, sde_trainer

HERE = os.path.dirname(__file__)


def write_hf_qwen2(folder, config: qwen2.Qwen2Config, seed=0):
  """A random HF-layout Qwen2 (config.json + safetensors), written one tensor at a time
  with numpy: large models without torch."""
  rng = np.random.default_rng(seed)
  specs = []
  for path, (shape, _) in checkpoint.param_shapes(checkpoint.abstract_model(config)).items():
    name, layout = hf.qwen2_tensor_name(path)
    theirs = layout.their_shape(shape)
    specs.append(tensor_io.TensorSpec(
        name, theirs, np.dtype(np.float32),
        lambda theirs=theirs: rng.normal(0, 0.05, theirs).astype(np.float32)))
  os.makedirs(folder, exist_ok=True)
  tensor_io.write_safetensors(folder, specs, max_shard_bytes=64 * 2**20)
  hf_config = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": config.vocab_size,
               "hidden_size": config.hidden_size, "intermediate_size": config.mlp_dim,
               "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
               "num_key_value_heads": config.num_kv_heads, "rope_theta": config.rope_theta,
               "rms_norm_eps": config.rms_norm_eps,
               "tie_word_embeddings": config.tie_word_embeddings,
               "max_position_embeddings": config.max_position_embeddings}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f)


def _tree():
  rng = np.random.default_rng(0)
  return {"big": rng.normal(size=(40, 24)).astype(np.float32),
          "half": rng.normal(size=(5, 3)).astype(ml_dtypes.bfloat16),
          "nested": {"ids": np.arange(7, dtype=np.int32), "scale": np.float32(2.5)}}


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tree)


def test_round_trip_in_chunks_with_metadata(tmp_path, monkeypatch):
  monkeypatch.setattr(weights, "CHUNK_BYTES", 1024)       # 40x24 float32 -> 2x2 chunks
  tree = _tree()
  weights.save(tmp_path / "w", tree, {"kind": "test", "n": 3})
  index = weights.read_index(tmp_path / "w")
  assert index.metadata == {"kind": "test", "n": 3}
  assert index.tensors["nested/ids"] == weights.TensorInfo((7,), np.dtype(np.int32))
  assert index.tensors["half"].dtype.name == "bfloat16"
  zarr = json.loads((tmp_path / "w" / "tensors" / "big" / "zarr.json").read_text())
  codec = zarr["codecs"][0]
  assert codec["name"] == "sharding_indexed"           # one file, chunks found by its index
  assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes"]   # uncompressed
  assert codec["configuration"]["chunk_shape"] == [20, 12] == weights.chunk_shape((40, 24), 4)
  loaded = weights.load_pretrained(tmp_path / "w", _abstract(tree))
  for (name, a), (_, b) in zip(weights.named_leaves(tree), weights.named_leaves(loaded)):
    assert isinstance(b, jax.Array) and b.dtype == np.asarray(a).dtype, name
    np.testing.assert_array_equal(np.asarray(b), a, err_msg=name)
  np.testing.assert_array_equal(weights.read(tmp_path / "w", "big"), tree["big"])
  with pytest.raises(FileExistsError, match="already holds weights"):
    weights.save(tmp_path / "w", tree)
  # an interrupted write has no index and is never read
  with pytest.raises(RuntimeError):
    with weights.Writer(tmp_path / "partial") as writer:
      writer.write("a", np.zeros(3))
      raise RuntimeError("killed")
  with pytest.raises(FileNotFoundError, match="did not finish"):
    weights.read_index(tmp_path / "partial")


def test_mismatches_name_the_tensor(tmp_path):
  tree = _tree()
  weights.save(tmp_path / "w", tree)
  abstract = _abstract(tree)

  missing = dict(abstract, extra_bias=jax.ShapeDtypeStruct((4,), np.float32))
  with pytest.raises(weights.WeightsMismatchError, match=r"lacks tensor extra_bias \(shape \(4,\)\)"):
    weights.load_pretrained(tmp_path / "w", missing)
  fewer = {k: v for k, v in abstract.items() if k != "half"}
  with pytest.raises(weights.WeightsMismatchError, match="holds tensor half"):
    weights.load_pretrained(tmp_path / "w", fewer)
  wrong = dict(abstract, big=jax.ShapeDtypeStruct((40, 25), np.float32))
  with pytest.raises(weights.WeightsMismatchError, match=r"tensor big has shape \(40, 24\).*"
                                                         r"expects \(40, 25\)"):
    weights.load_pretrained(tmp_path / "w", wrong)
  as_f32 = dict(abstract, half=jax.ShapeDtypeStruct((5, 3), np.float32))
  with pytest.raises(weights.WeightsMismatchError, match="tensor half is bfloat16.*--dtype=float32"):
    weights.load_pretrained(tmp_path / "w", as_f32)
  cast = weights.load_pretrained(tmp_path / "w", as_f32, cast=True)
  np.testing.assert_array_equal(np.asarray(cast["half"]), tree["half"].astype(np.float32))


def test_weights_in_a_gcs_bucket(gcs_emulator, tmp_path):
  """Conversion writes to gs://, export and the sharded loader read from it."""
  config = qwen2.Qwen2Config(vocab_size=96, hidden_size=32, num_layers=1, num_heads=4,
                             num_kv_heads=2, mlp_dim=48)
  write_hf_qwen2(tmp_path / "hf", config)
  url = "gs://muse-test/converted/tiny"
  hf.hf_to_checkpoint(str(tmp_path / "hf"), url)
  assert checkpoint.read_config(url).vocab_size == 96
  ours = checkpoint.load(url)
  reference = hf.load_qwen2(str(tmp_path / "hf"))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 5)), jnp.int32)
  np.testing.assert_array_equal(ours(ids), reference(ids))
  hf.checkpoint_to_hf(url, str(tmp_path / "export"))
  assert not os.path.exists("gs:") and not os.path.exists(tmp_path / "gs:")
  reader = tensor_io.open_tensors(str(tmp_path / "export"))
  np.testing.assert_array_equal(reader.read("model.embed_tokens.weight"),
                                tensor_io.open_tensors(str(tmp_path / "hf")).read(
                                    "model.embed_tokens.weight"))


def test_sharded_decoder_load_on_one_device_mesh_matches_hf_parity_path(tmp_path):
  config = qwen2.Qwen2Config(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, mlp_dim=48, tie_word_embeddings=False)
  write_hf_qwen2(tmp_path / "hf", config)
  hf.hf_to_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ours"))
  mesh = sharding.make_mesh(sharding.mesh_config(data=1), jax.devices()[:1])
  ours = checkpoint.load(str(tmp_path / "ours"), mesh=mesh)
  reference = hf.load_qwen2(str(tmp_path / "hf"))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)), jnp.int32)
  np.testing.assert_array_equal(ours(ids), reference(ids))
  assert ours.lm_head.kernel.get_value().sharding.mesh.shape == mesh.shape
  # a bfloat16 view of the float32 weights, cast shard by shard
  half = checkpoint.load(str(tmp_path / "ours"), dtype="bfloat16")
  assert half.model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16


def test_decoder_stage_starts_from_converted_weights(tmp_path):
  c = load_config("muse_vl", "demo")
  base = config_lib.llm_model_config(c)
  text_only = qwen2.Qwen2Config(**dict(c.model.to_dict()))
  write_hf_qwen2(tmp_path / "hf", text_only)
  cli.main(["llm-from-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "vl"),
            "--muse_vl", "--num_visual", str(c.vocab.num_visual)])
  mesh = sharding.make_mesh(sharding.mesh_config(data=1), jax.devices()[:1])
  run = llm_trainer.setup(c, mesh)
  state = run.init()
  assert llm_trainer.load_pretrained(run, state, c) is state      # init_from = "": unchanged

  c.init_from = str(tmp_path / "vl")
  state = llm_trainer.load_pretrained(run, state, c)
  embedding = np.asarray(state["params"]["model"]["embed_tokens"]["embedding"].get_value())
  assert embedding.shape[0] == base.vocab_size
  np.testing.assert_array_equal(embedding, weights.read(c.init_from,
                                                        llm_trainer.EMBEDDING))
  kernel = state["params"]["model"]["layers"][1]["mlp"]["up_proj"]["kernel"].get_value()
  assert kernel.sharding == run.abstract_state["params"]["model"]["layers"][1]["mlp"][
      "up_proj"]["kernel"].get_value().sharding
  np.testing.assert_array_equal(np.asarray(kernel), weights.read(
      c.init_from, "model/layers/1/mlp/up_proj/kernel"))
  assert int(state["step"]) == 0 and "opt_state" in state

  cli.main(["llm-from-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "text")])
  c.init_from = str(tmp_path / "text")
  with pytest.raises(config_lib.ConfigError,
                     match=r"init_from: tensor model/embed_tokens/embedding .* has 1000 rows .* "
                           r"2048.*--muse_vl --num_visual=1024"):
    llm_trainer.load_pretrained(run, run.init(), c)


def test_reconstruct_reads_only_the_tokenizer_of_a_run(tmp_path):
  c = tiny_sde_config(batch_size=2, total_steps=1, disc_start=1)
  run = sde_trainer.setup(c, sharding.make_mesh(c.mesh))
  state, _ = run.init()
  workdir = tmp_path / "run"
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"))
  ckpt.save(7, state, {"epoch": 0})
  ckpt.close()
  checkpoint_lib.save_config(c, str(workdir))

  from muse_jax.inference import sde_tokenizer
  tokenizer, _, step = sde_tokenizer.load_tokenizer(str(workdir))
  assert step == 7
  expected = run.models.tokenizer(state["params"], state["frozen"])
  for (name, a), (_, b) in zip(weights.named_leaves(nnx.state(tokenizer)),
                               weights.named_leaves(nnx.state(expected))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                  err_msg=name)

  # a config that builds another tokenizer: the error names the tensor, before reading
  changed = json.loads((workdir / "config.json").read_text())
  changed["model"]["codebook_size"] = 128
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "config.json").write_text(json.dumps(changed))
  (tmp_path / "other" / "checkpoints").symlink_to(workdir / "checkpoints")
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"params\.quantizer\.\S+ has shape \(64, 8\) .* expects \(128, 8\)"):
    sde_tokenizer.load_tokenizer(str(tmp_path / "other"))

  # the CLI: an unreadable file is skipped and every PSNR is printed under its own name;
  # no optimiser module is imported on the way
  Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(tmp_path / "grey.png")
  script = ("import sys; from absl import app; from muse_jax.inference import reconstruct as r; "
            "sys.argv = ['r'] + sys.argv[1:]; "
            "app.run(lambda argv: (r.main(argv), print('optimizers imported:', "
            "'muse_jax.train.optimizers' in sys.modules))[-1])")
  out = subprocess.run(
      [sys.executable, "-c", script, f"--workdir={workdir}",
       f"--images={ROOT / 'README.md'},{tmp_path / 'grey.png'}", f"--out={tmp_path / 'g.png'}"],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
  lines = out.stdout.splitlines()
  assert any(line.startswith(f"skipped {ROOT / 'README.md'}") for line in lines), out.stdout
  assert not any(line.startswith(f"{ROOT / 'README.md'}: PSNR") for line in lines), out.stdout
  assert any(line.startswith(f"{tmp_path / 'grey.png'}: PSNR") for line in lines), out.stdout
  assert "optimizers imported: False" in lines, out.stdout
  assert (tmp_path / "g.png").exists()


def test_fsdp8_load_holds_one_shard_per_device_and_little_beyond(tmp_path):
  """A ~250 MB converted decoder onto an fsdp=8 mesh of CPU devices (a subprocess)."""
  config = qwen2.Qwen2Config(vocab_size=8192, hidden_size=1024, num_layers=4, num_heads=8,
                             num_kv_heads=2, mlp_dim=2816, tie_word_embeddings=False)
  write_hf_qwen2(tmp_path / "hf", config)
  subprocess.run([sys.executable, "-m", "muse_jax.convert", "llm-from-hf", "--hf_dir",
                  str(tmp_path / "hf"), "--out", str(tmp_path / "ours")], check=True,
                 capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  # MALLOC_ARENA_MAX: RSS then counts live buffers, not freed ones kept in per-thread
  # arenas (see the script's docstring)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), MALLOC_ARENA_MAX="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  subprocess.run([sys.executable, os.path.join(HERE, "multidevice", "load_pretrained.py"),
                  f"--weights={tmp_path / 'ours'}", f"--out={tmp_path / 'r.json'}"],
                 check=True, env=env)
  r = json.loads((tmp_path / "r.json").read_text())
  shutil.rmtree(tmp_path / "hf")             # ~500 MB that pytest would keep for a while
  shutil.rmtree(tmp_path / "ours")
  total, largest, mb = r["total_bytes"], r["largest_tensor_bytes"], 2**20
  assert r["devices"] == 8 and not r["mismatched"]
  # every device holds an equal 1/8 (norm weights, a few KB, are replicated)
  assert max(r["device_bytes"]) == min(r["device_bytes"])
  assert total / 8 <= r["device_bytes"][0] < total / 8 + 0.01 * total
  beyond_shards = r["peak_rss"] - r["rss_before"] - sum(r["device_bytes"])
  print(f"total {total / mb:.0f} MB, largest tensor {largest / mb:.0f} MB, per device "
        f"{r['device_bytes'][0] / mb:.1f} MB, host beyond the shards {beyond_shards / mb:.1f} MB")
  assert beyond_shards < largest + total / 8 + 32 * mb
