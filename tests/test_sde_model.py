"""SDE tokenizer: full-size shapes by abstract evaluation, public API, ablation modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muse_jax import config_lib
from muse_jax.models import sde


_ABSTRACT = {}


def _abstract(config):
  """Shape-only model (nothing allocated), built once per config name."""
  cfg = config_lib.sde_model_config(config)
  if cfg not in _ABSTRACT:
    _ABSTRACT[cfg] = nnx.eval_shape(lambda: sde.SDETokenizer(cfg, rngs=nnx.Rngs(0)))
  return cfg, _ABSTRACT[cfg]


def _count(module, filt=nnx.Param):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, filt)))


@pytest.mark.parametrize("name, image, grid, width, depth, mlp", [
    ("sde_256", 256, 16, 1024, 24, 4096),
    ("sde_384", 384, 27, 1152, 27, 4304),
])
def test_full_size_shapes(config_loader, name, image, grid, width, depth, mlp):
  config = config_loader(name)
  config_lib.validate_sde(config)
  cfg, model = _abstract(config)
  assert cfg.grid == grid and cfg.decoder_grid == image // 16
  tower = model.semantic_encoder
  assert cfg.encoder.scan_layers   # the full configs stack their layers under lax.scan
  assert tower.encoder.layers.mlp.fc1.kernel.shape == (depth, width, mlp)
  assert tower.embeddings.position_embedding.embedding.shape == (grid * grid, width)
  assert model.quantizer.codebook.shape == (32768, 8)
  assert model.quant_proj.kernel.shape == (width, 8)
  assert model.semantic_decoder.encoder.layers.mlp.fc1.kernel.shape[0] == 3
  assert model.semantic_decoder.out_proj.kernel.shape[1] == width

  images = jax.ShapeDtypeStruct((2, image, image, 3), jnp.float32)

  def forward(model, images):
    out = model(images)
    return out["reconstruction"], out["semantic_prediction"], out["quantized"].codes

  graphdef, state = nnx.split(model)
  recon, sem, codes = jax.eval_shape(
      lambda s, x: forward(nnx.merge(graphdef, s), x), state, images)
  assert recon.shape == (2, image, image, 3)
  assert sem.shape == (2, grid * grid, width)
  assert codes.shape == (2, grid * grid) and codes.dtype == jnp.int32
  enc = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, images)
  assert enc.shape == (2, grid, grid) and enc.dtype == jnp.int32
  dec = jax.eval_shape(lambda s, c: nnx.merge(graphdef, s).decode(c), state, enc)
  assert dec.shape == (2, image, image, 3)


def test_full_size_parameter_counts(config_loader):
  """SigLIP-L/16-256 and SO400M/14-384 vision towers without their pooling heads
  (HF's 316M / 428M include the ~13M / ~15M attention-pooling head)."""
  for name, tower_millions in (("sde_256", 303), ("sde_384", 413)):
    _, model = _abstract(config_loader(name))
    assert _count(model.semantic_encoder) / 1e6 == pytest.approx(tower_millions, rel=0.01)
    frozen = _count(model) - _count(model, sde.TRAINABLE)
    assert frozen == _count(model.semantic_encoder)


def _tiny(mode="both", image=32, patch=8):
  config = config_lib.sde_defaults()
  config.model = config_lib.sde_model(image_size=image, patch_size=patch, width=32, depth=1,
                                      num_heads=2, mlp_dim=64)
  config_lib.shrink_for_demo(config, image_size=image, patch_size=patch)
  config.model.update(mode=mode, codebook_size=64, dtype="float32")
  config.model.encoder.update(width=32, mlp_dim=64, depth=1)
  config.model.semantic_decoder.update(width=32, mlp_dim=64)
  config.model.decoder.update(ch_mult=(1, 2, 2), ch=16, z_channels=16)
  config_lib.validate_sde(config)
  return sde.SDETokenizer(config_lib.sde_model_config(config), rngs=nnx.Rngs(0))


def test_encode_decode_roundtrip_api():
  model = _tiny(image=16, patch=4)
  images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
  codes = model.encode(images)
  assert codes.shape == (3, 4, 4) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < 64
  np.testing.assert_array_equal(np.asarray(codes).reshape(3, -1),
                                np.asarray(model(images)["quantized"].codes))
  recon = model.decode(codes)
  assert recon.shape == (3, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(recon), np.asarray(model(images)["reconstruction"]),
                             atol=1e-5)


def test_ablation_modes_build_only_their_branch():
  image_only = _tiny("image", image=16, patch=4)
  assert image_only.semantic_encoder is None and image_only.semantic_decoder is None
  out = image_only(jnp.zeros((1, 16, 16, 3)))
  assert "reconstruction" in out and "semantic_prediction" not in out

  semantic_only = _tiny("semantic", image=16, patch=4)
  assert semantic_only.image_encoder is None and semantic_only.pixel_decoder is None
  out = semantic_only(jnp.zeros((1, 16, 16, 3)))
  assert "semantic_prediction" in out and "reconstruction" not in out
  with pytest.raises(ValueError, match="mode='semantic'"):
    semantic_only.decode(jnp.zeros((1, 4, 4), jnp.int32))


def test_fusion_is_sum_of_encoders():
  model = _tiny("both", image=16, patch=4)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  fused = model.semantic_encoder(x) + model.image_encoder(x)
  f = model.quant_proj(fused)
  f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(model.features(x)[0]), np.asarray(f), atol=1e-5)


def test_semantic_encoder_receives_no_gradient():
  model = _tiny("both", image=16, patch=4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)

  def loss(params):
    out = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(out["reconstruction"]) + jnp.sum(out["semantic_prediction"])

  grads = jax.grad(loss)(params)
  sem = jax.tree.leaves(grads["semantic_encoder"])
  img = jax.tree.leaves(grads["image_encoder"])
  assert all(float(jnp.abs(g).sum()) == 0 for g in sem)
  assert any(float(jnp.abs(g).sum()) > 0 for g in img)
