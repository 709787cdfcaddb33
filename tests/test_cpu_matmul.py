"""The CPU small-row matmul kernel: build, numerics, gradient, dispatch from ``layers``.

Tests that need the kernel skip, naming the reason, where it cannot be built (no C++
compiler); the XLA fallback is tested everywhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muse_jax.kernels import cpu_matmul
from muse_jax.models import layers


def _arrays(m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((m, k)), jnp.float32),
          jnp.asarray(rng.standard_normal((n, k)), jnp.float32))


needs_kernel = pytest.mark.skipif(
    not cpu_matmul.load(), reason=f"CPU kernel not built: {cpu_matmul.load_error()}")


def _without_kernel(monkeypatch):
  """As on a machine where ``load()`` failed (no C++ compiler)."""
  monkeypatch.setattr(cpu_matmul, "_load_error", "no C++ compiler (simulated)")


@needs_kernel
def test_kernel_builds_and_registers():
  assert cpu_matmul.compile_library().exists()
  assert cpu_matmul.available() and cpu_matmul.load_error() is None


@needs_kernel
@pytest.mark.parametrize("m,k,n", [
    (8, 512, 1408),   # a decode step's MLP projection
    (2, 17, 5),       # K not a multiple of the vector width
    (7, 7, 3),        # K shorter than one vector
    (5, 1024, 99),
    (8, 16, 2500),    # many blocks of weight rows, shared between threads
])
def test_matches_float64_reference(m, k, n):
  x, w = _arrays(m, k, n)
  got = np.asarray(jax.jit(cpu_matmul.matmul_out_in)(x, w))
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  assert got.shape == (m, n)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@needs_kernel
def test_gradient_and_vmap_match_xla():
  x, w = _arrays(4, 40, 24)
  loss = lambda mm: lambda x, w: jnp.sum(jnp.sin(mm(x, w)))
  ours = jax.grad(loss(cpu_matmul.matmul_out_in), (0, 1))(x, w)
  xla = jax.grad(loss(lambda x, w: x @ w.T), (0, 1))(x, w)
  for a, b in zip(ours, xla):
    np.testing.assert_allclose(a, b, atol=1e-4)
  batched = jax.vmap(cpu_matmul.matmul_out_in)(jnp.stack([x, 2 * x]), jnp.stack([w, w]))
  np.testing.assert_allclose(batched[1], 2 * (x @ w.T), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_applies_to_min_to_max_rows_of_float32():
  x, w = _arrays(cpu_matmul.MAX_ROWS, 32, 16)
  assert cpu_matmul.applies(x, w) and cpu_matmul.applies(x[:cpu_matmul.MIN_ROWS], w)
  assert not cpu_matmul.applies(jnp.concatenate([x, x[:1]]), w)
  assert not cpu_matmul.applies(x[:cpu_matmul.MIN_ROWS - 1], w)
  assert not cpu_matmul.applies(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


@needs_kernel
def test_linear_uses_the_kernel_for_out_in_decode_rows_only():
  linear = layers.linear(32, 16, ("embed", "mlp"), rngs=nnx.Rngs(0))
  layers.use_out_in_kernels(linear, matmul_impl=cpu_matmul.IMPLEMENTATION)
  lowered = lambda rows: jax.jit(lambda m, x: m(x)).lower(
      linear, jnp.ones((rows, 32), jnp.float32)).as_text()
  assert cpu_matmul.TARGET in lowered(cpu_matmul.MAX_ROWS)
  assert cpu_matmul.TARGET not in lowered(cpu_matmul.MAX_ROWS + 1)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 32)), jnp.float32)
  np.testing.assert_allclose(linear(x), x @ linear.in_out_kernel() + linear.bias[...],
                             rtol=1e-5, atol=1e-5)


def test_build_failure_names_the_compiler(tmp_path):
  with pytest.raises(RuntimeError, match="no-such-compiler"):
    cpu_matmul.compile_library(compiler="no-such-compiler", cache_dir=tmp_path)


@needs_kernel
def test_accelerator_lowering_of_the_same_trace_uses_xla():
  x, w = _arrays(cpu_matmul.MAX_ROWS, 64, 32)
  traced = jax.jit(cpu_matmul.matmul_out_in).trace(x, w)
  assert cpu_matmul.TARGET in traced.lower().as_text()
  assert cpu_matmul.TARGET not in traced.lower(lowering_platforms=("tpu",)).as_text()


def test_out_in_layout_alone_keeps_xla():
  linear = layers.linear(32, 16, ("embed", "mlp"), rngs=nnx.Rngs(0))
  layers.use_out_in_kernels(linear)
  lowered = jax.jit(lambda m, x: m(x)).lower(linear, jnp.ones((4, 32), jnp.float32)).as_text()
  assert cpu_matmul.TARGET not in lowered
  with pytest.raises(ValueError, match="'fast'"):
    layers.use_out_in_kernels(linear, matmul_impl="fast")


def test_fallback_without_a_compiler_is_xla(monkeypatch):
  _without_kernel(monkeypatch)
  x, w = _arrays(cpu_matmul.MAX_ROWS, 40, 24)
  assert not cpu_matmul.applies(x, w)
  lowered = jax.jit(cpu_matmul.matmul_out_in).lower(x, w).as_text()
  assert cpu_matmul.TARGET not in lowered
  np.testing.assert_allclose(cpu_matmul.matmul_out_in(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
  linear = layers.linear(40, 24, ("embed", "mlp"), rngs=nnx.Rngs(0))
  layers.use_out_in_kernels(linear, matmul_impl=cpu_matmul.IMPLEMENTATION)
  np.testing.assert_allclose(linear(x), x @ linear.in_out_kernel() + linear.bias[...],
                             rtol=1e-5, atol=1e-5)
