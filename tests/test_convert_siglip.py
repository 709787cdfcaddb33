"""Hugging Face SigLIP vision towers -> SiglipVisionTower: last_hidden_state parity."""

import json
import shutil

import pytest
import references

torch = references.require("torch")
transformers = references.require("transformers")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from muse_jax.convert import __main__ as cli  # noqa: E402
from muse_jax.convert import hf, siglip as siglip_convert  # noqa: E402
from muse_jax.models import siglip  # noqa: E402
from muse_jax import config_lib  # noqa: E402
from muse_jax.parallel import sharding  # noqa: E402
from muse_jax.train import sde_trainer  # noqa: E402
from conftest import tiny_sde_config  # noqa: E402

TOWERS = {
    "patch16": dict(image_size=32, patch_size=16, hidden_size=48, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4),
    "patch14": dict(image_size=42, patch_size=14, hidden_size=40, intermediate_size=72,
                    num_hidden_layers=2, num_attention_heads=5),
}


def _randomise(model, seed):
  """Non-trivial LayerNorm / bias values so that every tensor's mapping matters."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.2 * torch.randn_like(p))


def _vision_model(kind, folder, seed=0):
  config = transformers.SiglipVisionConfig(**TOWERS[kind])
  torch.manual_seed(seed)
  model = transformers.SiglipVisionModel(config).eval()
  _randomise(model, seed)
  model.save_pretrained(folder)
  return model


def _pixels(size, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)


def _reference(model, pixels):
  with torch.no_grad():
    out = model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
  return out.last_hidden_state.numpy()


def _assert_close_to_scale(ours, ref):
  scale = float(np.abs(ref).max())
  assert float(np.abs(np.asarray(ours) - ref).max()) <= 1e-4 * scale


forward = nnx.jit(lambda tower, x: tower(x))


@pytest.mark.parametrize("kind", list(TOWERS))
def test_vision_tower_matches_transformers(tmp_path, kind):
  model = _vision_model(kind, str(tmp_path / "hf"))
  tower = hf.load_siglip_vision(str(tmp_path / "hf"), dtype=jnp.float32)
  cfg = tower.config
  assert (cfg.patch_size, cfg.width, cfg.grid) == (
      TOWERS[kind]["patch_size"], TOWERS[kind]["hidden_size"],
      TOWERS[kind]["image_size"] // TOWERS[kind]["patch_size"])
  pixels = _pixels(TOWERS[kind]["image_size"])
  out = forward(tower, jnp.asarray(pixels))
  assert out.shape == (2, cfg.num_patches, cfg.width)
  _assert_close_to_scale(out, _reference(model, pixels))


def test_full_siglip_model_uses_its_vision_half_and_feeds_the_sde_trainer(tmp_path):
  vision = TOWERS["patch16"]
  config = transformers.SiglipConfig(
      vision_config=vision,
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=64, max_position_embeddings=16,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0))
  torch.manual_seed(1)
  model = transformers.SiglipModel(config).eval()
  _randomise(model, 1)
  model.save_pretrained(str(tmp_path / "full"))
  pixels = _pixels(vision["image_size"], seed=1)
  with torch.no_grad():
    ref = model.vision_model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
  ref = ref.last_hidden_state.numpy()

  # written scanned (stacked per layer); the SDE trainer reads it into both unscanned
  # encoders, each layer's slice straight into its shardings
  cli.main(["siglip", "--hf_dir", str(tmp_path / "full"), "--out", str(tmp_path / "ckpt"),
            "--scan_layers"])
  c = tiny_sde_config(batch_size=2, total_steps=1, disc_start=1)
  c.model.encoder.update(image_size=32, patch_size=16, width=48, depth=2, num_heads=4,
                         mlp_dim=96)
  c.model.semantic_decoder.update(width=48, num_heads=4)
  c.model.decoder.ch_mult = (1, 1, 1, 2, 2)          # 16x: the 2x2 token grid
  c.siglip_checkpoint = str(tmp_path / "ckpt")
  run = sde_trainer.setup(c, sharding.make_mesh(c.mesh))
  state, lpips_params = run.init()
  sde_trainer.load_pretrained(run, state, lpips_params)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: siglip.SiglipVisionTower(
      config_lib.sde_model_config(c).encoder, rngs=nnx.Rngs(0))))
  for weights in (state["params"]["image_encoder"], state["frozen"]["semantic_encoder"]):
    tower = nnx.merge(graphdef, weights)
    _assert_close_to_scale(forward(tower, jnp.asarray(pixels)), ref)


def test_unsupported_or_mis_shaped_towers_fail_clearly(tmp_path):
  _vision_model("patch16", str(tmp_path / "hf"))
  broken = tmp_path / "broken"
  shutil.copytree(tmp_path / "hf", broken)
  config = json.loads((broken / "config.json").read_text())
  (broken / "config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
  with pytest.raises(ValueError, match=r"encoder\.layers\.0\.mlp\.fc1\.bias.*\(96,\).*\(80,\)"):
    siglip_convert.load_siglip_vision(str(broken))
  (broken / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
  with pytest.raises(ValueError, match="SiglipVisionModel, SiglipModel"):
    siglip_convert.load_siglip_vision(str(broken))
