"""kernels/vq.py: every nearest_code path against brute force; TPU and GPU lowering;
the chunked entropy loss; the SDE train step under each implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_sde_config
from flax import nnx
from tpu_topology import tpu_mesh

from muse_jax.kernels import vq
from muse_jax.models import quantizer as quantizer_lib
from muse_jax.parallel import sharding
from muse_jax.train import sde_trainer

IMPLS = ("naive", "chunked", "pallas", "auto")
# small tiles so that a few hundred tokens and codes span several of them, ragged at the end
TILES = dict(chunk_size=96, block_n=64, block_k=256)


def _brute_force(f, book):
  d = ((f[:, None, :].astype(np.float64) - book[None].astype(np.float64)) ** 2).sum(-1)
  return d.argmin(-1)  # first minimum


def _search(f, book, impl):
  return np.asarray(jax.jit(lambda f, b: vq.nearest_code(f, b, impl=impl, **TILES))(f, book))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [8, 32])
def test_matches_brute_force_at_ragged_sizes(impl, d):
  rng = np.random.default_rng(d)
  f = rng.normal(size=(333, d)).astype(np.float32)      # 333 = 5 x 64 + 13
  book = rng.normal(size=(1000, d)).astype(np.float32)  # 1000 = 3 x 256 + 232
  np.testing.assert_array_equal(_search(f, book, impl), _brute_force(f, book))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [8, 32])
def test_ties_and_duplicate_rows_go_to_the_lowest_index(impl, d):
  rng = np.random.default_rng(7)
  book = rng.normal(size=(700, d)).astype(np.float32)
  # duplicate rows in different codebook tiles (256 wide): the earlier copy must win
  for low, high in [(3, 300), (250, 600), (255, 256)]:
    book[high] = book[low]
  f = book[[300, 600, 256, 3]] + 0.0
  # a feature exactly between two rows in different tiles: e = f +- u with u orthogonal to
  # f, so norms and dot products are equal in floating point too
  u = np.zeros(d, np.float32)
  u[0] = 0.5
  middle = rng.normal(size=d).astype(np.float32)
  middle[0] = 0.0
  book[100], book[500] = middle + u, middle - u
  # an exact three-way tie for the origin: the shortest rows, of equal norm, in three tiles
  for row, (x, y) in zip((650, 20, 400), [(1, 0), (0, 1), (-1, 0)]):
    book[row] = 0.0
    book[row, :2] = (0.01 * x, 0.01 * y)
  origin = np.zeros(d, np.float32)
  f = np.concatenate([f, middle[None], origin[None]])
  expected = [3, 250, 255, 3, 100, 20]
  brute = _brute_force(f, book)
  np.testing.assert_array_equal(brute, expected)
  np.testing.assert_array_equal(_search(f, book, impl), expected)


def test_unknown_impl_is_named():
  with pytest.raises(ValueError, match="'triton'.*naive"):
    vq.nearest_code(np.zeros((2, 8), np.float32), np.zeros((4, 8), np.float32), impl="triton")


def test_default_tiles_cover_a_large_codebook():
  rng = np.random.default_rng(3)
  f = rng.normal(size=(40, 32)).astype(np.float32)
  book = rng.normal(size=(5000, 32)).astype(np.float32)  # 3 default-size codebook tiles
  codes = jax.jit(lambda f, b: vq.nearest_code(f, b, impl="pallas"))(f, book)
  np.testing.assert_array_equal(np.asarray(codes), _brute_force(f, book))


@pytest.mark.parametrize("impl", ["pallas", "auto"])
def test_kernel_compiles_for_tpu_inside_shard_map(impl):
  mesh = tpu_mesh((2, 2, 1))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None))
  f = jax.ShapeDtypeStruct((4096, 8), jnp.float32, sharding=rows)
  book = jax.ShapeDtypeStruct((4096, 8), jnp.float32,
                              sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  search = jax.jit(lambda f, b: vq.nearest_code(f, b, impl=impl, sharding=rows))
  compiled = search.lower(f, book).compile()
  hlo = compiled.as_text()
  assert "muse_nearest_code" in hlo and "tpu_custom_call" in hlo
  # each device searches its own 1024 tokens
  assert "s32[1024,1]" in hlo
  assert compiled.memory_analysis().temp_size_in_bytes < 1 << 20


@pytest.mark.parametrize("impl", ["naive", "chunked", "auto", "pallas"])
def test_exports_for_cuda(impl):
  f = jax.ShapeDtypeStruct((1000, 8), jnp.float32)
  book = jax.ShapeDtypeStruct((3000, 8), jnp.float32)
  exported = jax.export.export(jax.jit(lambda f, b: vq.nearest_code(f, b, impl=impl)),
                               platforms=["cuda"])(f, book)
  # auto and chunked are plain XLA on GPU; pallas runs interpreted there (docs/kernels.md)
  assert "tpu_custom_call" not in exported.mlir_module()


def _dense_entropy(flat, book, temperature):
  sq_dist = (jnp.sum(flat ** 2, -1, keepdims=True) - 2.0 * flat @ book.T
             + jnp.sum(book ** 2, -1)[None])
  log_probs = jax.nn.log_softmax(-sq_dist / temperature, axis=-1)
  probs = jnp.exp(log_probs)
  mean_probs = jnp.mean(probs, axis=0)
  return (-jnp.mean(jnp.sum(probs * log_probs, -1))
          + jnp.sum(mean_probs * jnp.log(mean_probs + 1e-10)))


def test_chunked_entropy_loss_and_gradient_equal_the_dense_formula():
  rng = np.random.default_rng(5)
  flat = jnp.asarray(rng.normal(size=(70, 8)), jnp.float32)
  book = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
  chunked = lambda f, b: quantizer_lib._entropy_loss(f, b, 0.5, chunk_size=16)  # 70 = 4 x 16 + 6
  dense = lambda f, b: _dense_entropy(f, b, 0.5)
  np.testing.assert_allclose(chunked(flat, book), dense(flat, book), rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.grad(chunked, (0, 1))(flat, book), jax.grad(dense, (0, 1))(flat, book)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_quantizer_passes_its_impl():
  q = quantizer_lib.VectorQuantizer(300, 8, rngs=nnx.Rngs(0), impl="pallas")
  f = jax.random.normal(jax.random.key(0), (2, 9, 8))
  f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
  jaxpr = str(jax.make_jaxpr(lambda f: q(f).codes)(f))
  assert "muse_nearest_code" in jaxpr
  book = np.asarray(q.entries())
  np.testing.assert_array_equal(np.asarray(q(f).codes).reshape(-1),
                                _brute_force(np.asarray(f).reshape(-1, 8), book))


def test_sde_train_step_loss_is_the_same_for_every_impl(tmp_path):
  losses = {}
  for impl in ("naive", "chunked", "pallas"):
    config = tiny_sde_config(batch_size=2, total_steps=2, disc_start=100)
    config.model.vq_impl = impl
    config.loss.entropy_weight = 0.1   # the chunked entropy loss too
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    run = sde_trainer.setup(config, mesh)
    state, lpips_params = run.init()
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    _, metrics, counts = run.train_step(state, lpips_params, images, False)
    losses[impl] = (float(metrics["loss/total"]), float(metrics["loss/entropy"]),
                    np.asarray(counts))
  for impl in ("chunked", "pallas"):
    np.testing.assert_allclose(losses[impl][:2], losses["naive"][:2], rtol=1e-6)
    np.testing.assert_array_equal(losses[impl][2], losses["naive"][2])
