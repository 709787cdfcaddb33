"""Vector quantizer: nearest code, tie-breaking, straight-through gradient, VQ losses."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from muse_jax.kernels import vq
from muse_jax.models import quantizer as quantizer_lib


def _brute_force(f, book):
  d = ((f[:, None, :].astype(np.float64) - book[None].astype(np.float64)) ** 2).sum(-1)
  return d.argmin(-1)  # numpy argmin: first minimum


def test_nearest_code_matches_brute_force():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(300, 8)).astype(np.float32)
  book = rng.normal(size=(512, 8)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(vq.nearest_code(f, book)), _brute_force(f, book))


def test_nearest_code_chunked_equals_single_pass():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(1000, 8)).astype(np.float32)
  book = rng.normal(size=(64, 8)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(vq.nearest_code(f, book, chunk_size=96)),
                                np.asarray(vq.nearest_code(f, book, chunk_size=4096)))


def test_ties_resolve_to_lowest_index():
  book = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [-1, 0]], np.float32)
  f = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
  np.testing.assert_array_equal(np.asarray(vq.nearest_code(f, book)), [1, 0, 4])
  # an input exactly between two entries goes to the lower index
  f_mid = np.array([[1, 1]], np.float32) / np.sqrt(2)
  assert int(vq.nearest_code(f_mid, book)[0]) == 0


def _quantizer(k=16, d=4, seed=0):
  return quantizer_lib.VectorQuantizer(k, d, rngs=nnx.Rngs(seed))


def test_quantizer_returns_nearest_normalised_entry():
  q = _quantizer()
  f = jax.random.normal(jax.random.key(3), (2, 5, 4))
  f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
  out = q(f)
  book = np.asarray(q.entries())
  np.testing.assert_allclose(np.linalg.norm(book, axis=-1), 1.0, rtol=1e-6)
  expected = _brute_force(np.asarray(f).reshape(-1, 4), book).reshape(2, 5)
  np.testing.assert_array_equal(np.asarray(out.codes), expected)
  np.testing.assert_allclose(np.asarray(out.quantized), book[expected], atol=1e-6)


def test_straight_through_gradient_is_identity_for_features():
  q = _quantizer()
  f = jax.random.normal(jax.random.key(4), (6, 4))
  w = jax.random.normal(jax.random.key(5), (6, 4))
  grad = jax.grad(lambda f: jnp.sum(w * q(f).quantized))(f)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(w), rtol=1e-6)


def test_vq_losses_hand_computed_and_routed():
  q = quantizer_lib.VectorQuantizer(2, 2, rngs=nnx.Rngs(0))
  q.codebook[...] = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  s = np.sqrt(0.5)
  f = jnp.array([[0.8, 0.6], [s, s]])   # unit vectors; the second is a tie -> code 0
  out = q(f)
  np.testing.assert_array_equal(np.asarray(out.codes), [0, 0])
  expected = np.mean(np.square(np.asarray(f) - np.array([[1, 0], [1, 0]])))
  np.testing.assert_allclose(float(out.codebook_loss), expected, rtol=1e-6)
  np.testing.assert_allclose(float(out.commitment_loss), expected, rtol=1e-6)

  # codebook loss moves only the codebook; commitment loss moves only the features
  graphdef, params = nnx.split(q)

  def grads(which):
    fn = lambda params, f: getattr(nnx.merge(graphdef, params)(f), which)
    g_params, g_f = jax.grad(fn, argnums=(0, 1))(params, f)
    return np.abs(np.asarray(g_params["codebook"][...])).sum(), np.abs(np.asarray(g_f)).sum()

  book_cb, f_cb = grads("codebook_loss")
  book_cm, f_cm = grads("commitment_loss")
  assert book_cb > 0 and f_cb == 0
  assert book_cm == 0 and f_cm > 0


def test_entropy_loss_rewards_confident_spread_assignments():
  q = quantizer_lib.VectorQuantizer(2, 2, rngs=nnx.Rngs(0))
  q.codebook[...] = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  spread = q(jnp.array([[1.0, 0.0], [0.0, 1.0]]), entropy_temperature=0.01).entropy_loss
  collapsed = q(jnp.array([[1.0, 0.0], [1.0, 0.0]]), entropy_temperature=0.01).entropy_loss
  # spread: ~0 per-token entropy, log 2 batch entropy; collapsed: ~0 both
  np.testing.assert_allclose(float(spread), -np.log(2), atol=1e-4)
  np.testing.assert_allclose(float(collapsed), 0.0, atol=1e-4)
