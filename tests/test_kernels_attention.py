"""kernels/attention.py: splash (interpret mode) against the XLA reference, outputs and
gradients; TPU compiles inside shard_map; the cuDNN lowering; the decoder step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tpu_topology import tpu_mesh

from muse_jax import config_lib
from muse_jax.kernels import attention
from muse_jax.models import qwen2
from muse_jax.train import lm_loss

SMALL_TILES = dict(block_q=128, block_kv=128)


def _inputs(b, t, hq, hkv, d, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, hq, d), dtype), jax.random.normal(kk, (b, t, hkv, d), dtype),
          jax.random.normal(kv, (b, t, hkv, d), dtype))


def _packed(b, t, padding):
  """Two segments per row, then ``padding`` padding tokens (segment 0)."""
  half = (t - padding) // 2
  row = np.concatenate([np.full(half, 1), np.full(t - padding - half, 2), np.zeros(padding)])
  return jnp.asarray(np.tile(row, (b, 1)), jnp.int32)


CASES = {
    # name: (batch, length, q heads, kv heads, head dim, causal, packed)
    "causal_gqa_d64": (1, 200, 4, 2, 64, True, False),
    "bidirectional_mqa_d72": (1, 160, 3, 1, 72, False, False),
    "packed_causal_mha_d128": (2, 256, 2, 2, 128, True, True),
    "siglip_729_d72": (1, 729, 2, 2, 72, False, False),
}


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_xla_outputs_and_gradients(case):
  b, t, hq, hkv, d, causal, packed = CASES[case]
  q, k, v = _inputs(b, t, hq, hkv, d)
  mask = attention.SelfMask(causal, _packed(b, t, 7) if packed else None) if (
      causal or packed) else None
  weights = jax.random.normal(jax.random.key(9), q.shape)

  def loss(impl):
    options = attention.Options(impl, **SMALL_TILES)
    def fn(q, k, v):
      out = attention.dot_product_attention(q, k, v, mask=mask, options=options)
      return jnp.sum(out * weights), out
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))

  (_, want), want_grads = loss("xla")(q, k, v)
  (_, got), got_grads = loss("splash")(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")
  if packed:  # padding rows are zero, as in the reference
    assert not np.any(np.asarray(got)[:, -7:])


def test_xla_layouts_agree():
  # the grouped-rows layout is the CPU one; TPU / GPU use the [B, Hkv, groups, T, S] einsum
  q, k, v = _inputs(2, 12, 6, 2, 16)
  mask = attention.SelfMask(True, _packed(2, 12, 3)).dense(12, 2)
  grouped = attention._xla(q, k, v, mask, 0.25, grouped_rows=True)
  np.testing.assert_allclose(attention._xla(q, k, v, mask, 0.25, grouped_rows=False), grouped,
                             rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(grouped)[:, -3:])


def test_dense_masks_and_cache_steps_take_the_xla_path():
  q, k, v = _inputs(1, 4, 2, 1, 16)
  kk, vv = jnp.concatenate([k, k], 1), jnp.concatenate([v, v], 1)  # T=4 queries, S=8 keys
  dense = jnp.ones((1, 1, 4, 8), bool)
  options = attention.Options("splash")
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask=dense, options=options))(q, kk, vv))
  assert "pallas_call" not in jaxpr


def test_bad_options_are_named():
  q, k, v = _inputs(1, 8, 2, 1, 16)
  with pytest.raises(ValueError, match="'flash'.*splash"):
    attention.dot_product_attention(q, k, v, options=attention.Options("flash"))
  with pytest.raises(ValueError, match="block_q=100"):
    attention.dot_product_attention(q, k, v, options=attention.Options("splash", 100, 128))
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    attention.dot_product_attention(q, k, v, options=attention.Options("cudnn"))


@pytest.mark.parametrize("d", [64, 72, 128])
def test_splash_compiles_for_tpu_inside_shard_map(d):
  mesh = tpu_mesh((2, 1, 2))
  P = jax.sharding.PartitionSpec
  heads = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None))
  q = jax.ShapeDtypeStruct((2, 729, 4, d), jnp.bfloat16, sharding=heads)
  kv = jax.ShapeDtypeStruct((2, 729, 2, d), jnp.bfloat16, sharding=heads)
  segments = jax.ShapeDtypeStruct((2, 729), jnp.int32, sharding=rows)

  def loss(q, k, v, segment_ids):
    out = attention.dot_product_attention(
        q, k, v, mask=attention.SelfMask(True, segment_ids),
        options=attention.Options("auto", 256, 256), sharding=heads)
    return jnp.sum(out.astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segments).compile()
  assert "tpu_custom_call" in compiled.as_text()
  # per device: one batch row, 2 of the 4 query heads; no [T, S] logits anywhere
  assert compiled.memory_analysis().temp_size_in_bytes < 8 << 20


def _export_for_cuda(options, mask):
  q, k, v = (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in _inputs(2, 256, 4, 2, 64))
  segments = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  fn = lambda q, k, v, s: attention.dot_product_attention(q, k, v, mask=mask(s), options=options)
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(q, k, v, segments).mlir_module()


def test_auto_exports_for_cuda():
  # packed rows on GPU take the XLA path under auto: plain HLO, no custom call
  text = _export_for_cuda(attention.Options("auto"), lambda s: attention.SelfMask(True, s))
  assert "custom_call" not in text


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_lowers_for_cuda(packed):
  mask = lambda s: attention.SelfMask(True, s if packed else None)
  try:
    text = _export_for_cuda(attention.Options("cudnn"), mask)
  except RuntimeError as error:
    if "cuDNN is not detected" not in str(error):
      raise
    pytest.skip("jax checks the local cuDNN before lowering cuDNN attention; this machine "
                "has no jax CUDA plugin")
  assert "__cudnn$fmha" in text


def test_decoder_step_loss_is_the_same_for_xla_and_splash():
  config = qwen2.Qwen2Config(vocab_size=97, hidden_size=128, num_layers=2, num_heads=2,
                             num_kv_heads=1, mlp_dim=64, attention_block_q=128,
                             attention_block_kv=128)
  ids = jax.random.randint(jax.random.key(1), (2, 150), 0, 97)
  segment_ids = _packed(2, 150, 10)
  targets = jnp.roll(ids, -1, axis=1)
  weights = (segment_ids != 0).astype(jnp.float32)
  results = {}
  for impl in ("xla", "splash"):
    model = qwen2.Qwen2ForCausalLM(dataclasses.replace(config, attention_impl=impl),
                                   rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss_fn(params):
      m = nnx.merge(graphdef, params)
      hidden = m.hidden_states(ids, segment_ids=segment_ids)
      return lm_loss.chunked_cross_entropy(hidden, m.lm_head_kernel(), targets, weights,
                                           chunk=64)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    results[impl] = (float(loss), jax.tree.leaves(grads))
  np.testing.assert_allclose(results["splash"][0], results["xla"][0], rtol=1e-6)
  for got, want in zip(results["splash"][1], results["xla"][1]):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config_name, override, field", [
    ("sde_256", lambda m: m.update(vq_impl="triton"), "config.model.vq_impl"),
    ("sde_256", lambda m: m.update(attention_impl="flash"), "config.model.attention_impl"),
    ("sde_256", lambda m: m.update(attention_block_q=100), "config.model.attention_block_q"),
    ("muse_vl", lambda m: m.update(attention_impl="flash"), "config.model.attention_impl"),
    ("muse_vl", lambda m: m.update(attention_block_kv=0), "config.model.attention_block_kv"),
])
def test_kernel_config_fields_are_validated(config_loader, config_name, override, field):
  config = config_loader(config_name)
  validate = config_lib.validate_sde if config_name == "sde_256" else config_lib.validate_llm
  validate(config)
  override(config.model)
  with pytest.raises(config_lib.ConfigError) as err:
    validate(config)
  assert str(err.value).startswith(field) and ";" in str(err.value)
