"""Vector quantizer: nearest code, tie-breaking, straight-through gradient, VQ losses,
initialisation, SimVQ, and the codebook updates (restart, k-means++, EMA)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muse_jax.kernels import vq
from muse_jax.models import layers
from muse_jax.models import quantizer as quantizer_lib
from muse_jax.models import sde as sde_lib


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


def _orthants(book):
  return len({tuple(row) for row in (np.asarray(book) > 0).astype(int)})


@pytest.mark.parametrize("simvq", [False, True])
def test_initial_codes_cover_the_sphere(simvq):
  """K >> 2^d entries hit every orthant and average to ~0 (a one-sided init range
  puts them all in the positive orthant)."""
  q = quantizer_lib.VectorQuantizer(4096, 8, rngs=nnx.Rngs(0), simvq=simvq)
  book = np.asarray(q.entries())
  assert _orthants(book) == 2 ** 8
  assert np.linalg.norm(book.mean(0)) < 0.05
  raw = np.asarray(q.basis[...] if simvq else q.codebook[...])
  assert raw.min() >= -1 / 4096 and raw.max() < 1 / 4096


def test_simvq_entries_are_basis_times_map_and_only_the_map_learns():
  q = quantizer_lib.VectorQuantizer(32, 4, rngs=nnx.Rngs(1), simvq=True)
  q.codebook_map[...] = jax.random.normal(jax.random.key(2), (4, 4))
  product = np.asarray(q.basis[...]) @ np.asarray(q.codebook_map[...])
  np.testing.assert_allclose(np.asarray(q.entries()),
                             product / np.linalg.norm(product, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # the trainer's split: the basis is frozen state, only the map is a parameter
  graphdef, trainable, rest = nnx.split(q, sde_lib.TRAINABLE, ...)
  assert set(trainable.keys()) == {"codebook_map"} and "basis" in rest
  f = layers.l2_normalize(jax.random.normal(jax.random.key(3), (20, 4)))
  loss = lambda trainable: nnx.merge(graphdef, trainable, rest)(f).codebook_loss
  grads = jax.grad(loss)(trainable)
  assert np.abs(np.asarray(grads["codebook_map"][...])).sum() > 0
  # one SGD step through the product changes every entry, the basis stays as drawn
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
  moved = nnx.merge(graphdef, stepped, rest)
  np.testing.assert_array_equal(np.asarray(moved.basis[...]), np.asarray(q.basis[...]))
  assert np.all(np.abs(np.asarray(moved.entries()) - np.asarray(q.entries())).sum(-1) > 0)


def test_restart_moves_dead_codes_to_features_and_leaves_used_ones():
  k, d, step, dead_after = 8, 4, 10, 3
  book = jax.random.uniform(jax.random.key(0), (k, d), minval=-1.0, maxval=1.0)
  last_used = jnp.array([10, 9, 7, 0, 10, 8, 2, 10], jnp.int32)   # dead: 2, 3, 6
  features = layers.l2_normalize(jax.random.normal(jax.random.key(1), (5, d)))
  new, new_last, dead = quantizer_lib.restart_dead_codes(
      book, last_used, features, jnp.int32(step), jax.random.key(2), dead_after)
  np.testing.assert_array_equal(np.asarray(dead), [0, 0, 1, 1, 0, 0, 1, 0])
  live = ~np.asarray(dead)
  np.testing.assert_array_equal(np.asarray(new)[live], np.asarray(book)[live])
  np.testing.assert_array_equal(np.asarray(new_last), np.where(live, last_used, step))
  # each dead entry now points at a distinct one of the features, at the live entries' scale
  unit = np.asarray(layers.l2_normalize(new))[~live]
  match = np.argmax(unit @ np.asarray(features).T, axis=1)
  np.testing.assert_allclose(unit, np.asarray(features)[match], atol=1e-6)
  assert len(set(match)) == 3
  live_norm = np.linalg.norm(np.asarray(book)[live], axis=-1).mean()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(new)[~live], axis=-1), live_norm,
                             rtol=1e-5)
  # the same key decides the same way (what makes a resumed run bit-exact)
  again = quantizer_lib.restart_dead_codes(book, last_used, features, jnp.int32(step),
                                           jax.random.key(2), dead_after)[0]
  np.testing.assert_array_equal(np.asarray(again), np.asarray(new))


def test_kmeans_plus_plus_seeds_one_entry_per_separated_cluster():
  centres = np.eye(4, dtype=np.float32) * 10
  noise = np.random.default_rng(0).normal(scale=0.01, size=(4, 50, 4)).astype(np.float32)
  features = (centres[:, None] + noise).reshape(-1, 4)
  seeds = np.asarray(quantizer_lib.kmeans_plus_plus(jnp.asarray(features), 4, jax.random.key(0)))
  # every seed is a data row, and the four seeds land in the four clusters
  assert all(np.any(np.all(features == s, axis=1)) for s in seeds)
  assert sorted(np.argmax(seeds, axis=1).tolist()) == [0, 1, 2, 3]
  # more entries than features: the rest are drawn uniformly, no NaN
  more = quantizer_lib.kmeans_plus_plus(jnp.asarray(features[:3]), 5, jax.random.key(1))
  assert np.all(np.isfinite(np.asarray(more)))


def test_ema_update_moves_used_entries_towards_their_features():
  count, total = jnp.ones(3), jnp.eye(3)
  codes = jnp.array([0, 0, 2])
  features = jnp.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  new_count, new_sum, entries = quantizer_lib.ema_update(count, total, codes, features, 0.5)
  np.testing.assert_allclose(np.asarray(new_count), [1.5, 0.5, 1.0])
  np.testing.assert_allclose(np.asarray(new_sum),
                             [[0.5, 1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
  # entries are the smoothed averages: entry 0 now leans towards its features
  e = np.asarray(entries)
  assert e[0, 1] > e[0, 0] > 0 and e[1, 1] > 0 and e[2, 2] > 0
  np.testing.assert_allclose(e[0], np.asarray(new_sum)[0] / 1.5, rtol=1e-3)
