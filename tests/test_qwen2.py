"""Qwen2 decoder on its own: presets, packing, KV cache, generation, remat, chunked loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muse_jax.models import layers, qwen2
from muse_jax.train import lm_loss

TINY = qwen2.Qwen2Config(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, mlp_dim=48, rope_theta=1e4,
                         tie_word_embeddings=False)


def _model(config=TINY, seed=0):
  return qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))


@nnx.jit
def _forward(model, ids, positions=None, segment_ids=None):
  return model(ids, positions, segment_ids)


@nnx.jit
def _prefill(model, ids, cache, valid=None):
  return model.prefill(ids, cache, valid)


@nnx.jit
def _decode_step(model, token, cache):
  return model.decode_step(token, cache)


def _ids(shape, seed=0, vocab=TINY.vocab_size):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("name, params_billion", [
    ("qwen2.5-0.5b", 0.494), ("qwen2.5-1.5b", 1.54), ("qwen2.5-3b", 3.09),
    ("qwen2.5-7b", 7.62), ("qwen2.5-32b", 32.8), ("yi-1.5-9b", 8.83), ("yi-1.5-34b", 34.4)])
def test_presets_match_published_parameter_counts(name, params_billion):
  config = qwen2.Qwen2Config.preset(name)
  assert config.num_params() / 1e9 == pytest.approx(params_billion, rel=0.01)
  assert config.tie_word_embeddings == (name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b"))
  assert config.attention_bias == name.startswith("qwen")


def test_preset_rejects_unknown_names_and_applies_overrides():
  assert qwen2.Qwen2Config.preset("qwen2.5-7b", dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ValueError, match="qwen2.5-0.5b"):
    qwen2.Qwen2Config.preset("qwen3-8b")


def test_every_parameter_has_logical_axis_names():
  state = nnx.state(_model(), nnx.Param)
  names = {}
  for path, var in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var[...].ndim, path
    names[jax.tree_util.keystr(path)] = axes
  assert names["['model']['embed_tokens']['embedding']"] == ("vocab", "embed")
  assert names["['model']['layers'][0]['self_attn']['k_proj']['kernel']"] == ("embed", "kv_heads")
  assert names["['model']['layers'][0]['mlp']['down_proj']['kernel']"] == ("mlp", "embed")
  assert names["['lm_head']['kernel']"] == ("embed", "vocab")
  assert len(names) == 2 + TINY.num_layers * 12 + 1


def test_parameter_count_matches_config():
  for config in (TINY, dataclasses.replace(TINY, tie_word_embeddings=True, attention_bias=False)):
    leaves = jax.tree.leaves(nnx.state(_model(config), nnx.Param))
    assert sum(x.size for x in leaves) == config.num_params()


def test_segment_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
  np.testing.assert_array_equal(qwen2.segment_positions(seg),
                                [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]])


def test_packed_row_gives_each_segment_its_own_logits():
  model = _model()
  a, b = _ids((1, 7), seed=1), _ids((1, 5), seed=2)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])))
  # row 0: a and b packed; row 1: a alone, right-padded (same shape: one compile)
  ids = jnp.concatenate([pad(jnp.concatenate([a, b], 1), 15), pad(a, 15)])
  seg = jnp.array([[1] * 7 + [2] * 5 + [0] * 3, [1] * 7 + [0] * 8])
  out = _forward(model, ids, segment_ids=seg)
  np.testing.assert_allclose(out[0, :7], out[1, :7], atol=1e-5)
  alone_b = _forward(model, jnp.concatenate([pad(b, 15), pad(b, 15)]),
                     segment_ids=jnp.array([[1] * 5 + [0] * 10] * 2))
  np.testing.assert_allclose(out[0, 7:12], alone_b[0, :5], atol=1e-5)
  # padding positions attend nowhere and stay finite
  assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_reproduces_full_forward(scan_layers):
  model = _model(dataclasses.replace(TINY, scan_layers=scan_layers))
  ids = _ids((3, 12), seed=3)
  full = _forward(model, ids)
  cache = model.init_cache(3, 16)
  logits, cache = _prefill(model, ids[:, :5], cache)
  np.testing.assert_allclose(logits, full[:, 4], atol=1e-5)
  for t in range(5, 12):
    logits, cache = _decode_step(model, ids[:, t], cache)
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(cache.next_positions, [12, 12, 12])


def test_left_padded_prompts_decode_like_unpadded_ones():
  model = _model()
  short, long = _ids((1, 4), seed=4), _ids((1, 7), seed=5)
  batch = jnp.concatenate([jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], 1), long])
  valid = jnp.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
  cache = model.init_cache(2, 9)
  logits, cache = _prefill(model, batch, cache, valid)
  nxt = jnp.array([11, 12], jnp.int32)
  step_logits, _ = _decode_step(model, nxt, cache)
  # unpadded references, right-padded into one batch (causal: the tail is ignored)
  reference = jnp.concatenate([
      jnp.concatenate([short, nxt[:1, None], jnp.zeros((1, 3), jnp.int32)], 1),
      jnp.concatenate([long, nxt[1:, None]], 1)])
  full = _forward(model, reference)
  np.testing.assert_allclose(logits[0], full[0, 3], atol=1e-5)
  np.testing.assert_allclose(logits[1], full[1, 6], atol=1e-5)
  np.testing.assert_allclose(step_logits[0], full[0, 4], atol=1e-5)
  np.testing.assert_allclose(step_logits[1], full[1, 7], atol=1e-5)


def _greedy_reference(model, prompt, steps):
  """Greedy decoding by full forwards over a fixed buffer (causal: the tail is ignored)."""
  p = prompt.shape[1]
  ids = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], steps), jnp.int32)], 1)
  for t in range(p, p + steps):
    ids = ids.at[:, t].set(jnp.argmax(_forward(model, ids)[:, t - 1], -1).astype(jnp.int32))
  return ids[:, p:]


def test_generate_greedy_sampling_and_eos():
  model = _model()
  prompt = _ids((3, 4), seed=6)
  greedy = qwen2.generate(model, prompt, 8)
  np.testing.assert_array_equal(greedy, _greedy_reference(model, prompt, 8))
  sampled = qwen2.generate(model, prompt, 8, temperature=1.0, top_p=0.9, rng=jax.random.key(1))
  again = qwen2.generate(model, prompt, 8, temperature=1.0, top_p=0.9, rng=jax.random.key(1))
  np.testing.assert_array_equal(sampled, again)
  assert int(sampled.min()) >= 0 and int(sampled.max()) < TINY.vocab_size
  assert not np.array_equal(sampled, greedy)
  greedy = np.asarray(greedy)
  eos = int(greedy[0, 1])
  stopped = np.asarray(qwen2.generate(model, prompt, 8, eos_id=eos))
  np.testing.assert_array_equal(stopped[0, :2], greedy[0, :2])
  assert (stopped[0, 2:] == eos).all()


@pytest.mark.parametrize("tied", [False, True])
def test_out_in_kernels_keep_logits_generation_and_axis_names(tied):
  model = _model(dataclasses.replace(TINY, tie_word_embeddings=tied))
  ids = _ids((2, 7), seed=8)
  logits, greedy = _forward(model, ids), qwen2.generate(model, ids, 6)
  gate = model.model.layers[0].mlp.gate_proj
  in_out = np.asarray(gate.kernel[...])
  layers.use_out_in_kernels(model)
  assert gate.kernel_out_in and gate.kernel.shape == (TINY.mlp_dim, TINY.hidden_size)
  assert gate.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
  np.testing.assert_array_equal(gate.in_out_kernel(), in_out)
  assert model.lm_head_kernel().shape == (TINY.hidden_size, TINY.vocab_size)
  np.testing.assert_allclose(_forward(model, ids), logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(qwen2.generate(model, ids, 6), greedy)
  layers.use_out_in_kernels(model)           # already [out, in]: unchanged
  assert gate.kernel.shape == (TINY.mlp_dim, TINY.hidden_size)


def test_sample_logits_respects_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.key(0)
  top2 = np.asarray(qwen2.sample_logits(logits, keys, 1.0, 2, 1.0))
  assert set(top2) == {0, 1}
  nucleus = np.asarray(qwen2.sample_logits(logits, keys, 1.0, 0, 0.75))
  assert set(nucleus) == {0, 1}          # 0.5 < 0.75 <= 0.8: two tokens
  everything = np.asarray(qwen2.sample_logits(logits, keys, 1.0, 0, 1.0))
  assert set(everything) == {0, 1, 2, 3}


def test_remat_and_bfloat16_keep_the_function():
  ids = _ids((3, 12), seed=8)
  grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(ids) ** 2)))
  plain = grad(_model())
  remat = grad(_model(dataclasses.replace(TINY, remat_policy="full")))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  graphdef, state = nnx.split(_model(dataclasses.replace(TINY, remat_policy="full")))
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state)
  assert str(jaxpr).count("remat") == TINY.num_layers   # one rematerialised block per layer
  bf16 = _model(dataclasses.replace(TINY, dtype="bfloat16"))
  ref = _forward(_model(), ids)
  out = _forward(bf16, ids)
  assert out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("chunk", [5, 64])
def test_chunked_cross_entropy_matches_naive(chunk):
  model = _model(dataclasses.replace(TINY, tie_word_embeddings=True))
  ids = _ids((3, 12), seed=9)
  weights = jnp.asarray(np.random.default_rng(1).integers(0, 2, (3, 11)), jnp.float32)

  def naive(hidden, kernel):
    logp = jax.nn.log_softmax(jnp.dot(hidden[:, :-1], kernel), -1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)

  def chunked(hidden, kernel):
    return lm_loss.chunked_cross_entropy(hidden[:, :-1], kernel, ids[:, 1:], weights, chunk)

  hidden = nnx.jit(lambda m, x: m.hidden_states(x))(model, ids)
  kernel = model.lm_head_kernel()
  np.testing.assert_allclose(jax.jit(chunked)(hidden, kernel), jax.jit(naive)(hidden, kernel),
                             rtol=1e-6)
  grads_chunked = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
  grads_naive = jax.jit(jax.grad(naive, argnums=(0, 1)))(hidden, kernel)
  for a, b in zip(grads_chunked, grads_naive):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(nnx.jit(lambda m, h: m.logits(h))(model, hidden),
                             _forward(model, ids), atol=1e-6)


def test_chunked_cross_entropy_never_builds_full_logits():
  hidden = jnp.zeros((4, 256, 32))
  kernel = jnp.zeros((32, 5000))
  targets = jnp.zeros((4, 256), jnp.int32)
  f = lambda h, k: lm_loss.chunked_cross_entropy(h, k, targets, jnp.ones((4, 256)), chunk=128)
  jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, kernel))
  assert "1024,5000" not in jaxpr.replace(" ", "") and "4,256,5000" not in jaxpr.replace(" ", "")
  assert "4,128,5000" in jaxpr.replace(" ", "")
