"""A CPU matmul for the few rows of batched decoding: ``x [M, K] @ w[N, K].T``.

Batch-8 greedy decoding is bound by how fast the weights stream through an
8-row matmul, and XLA:CPU's library matmul reads them at about a third of the
machine's bandwidth. ``cpu_matmul.cc`` reads each weight row once and
multiplies it with every input row while it is in L1 (see its header). It
takes ``[out, in]`` kernels, the serving layout of ``layers.use_out_in_kernels``.

It is one selectable matmul implementation (``IMPLEMENTATION``), opt-in for CPU
serving: ``layers.use_out_in_kernels(model, matmul_impl=IMPLEMENTATION)`` calls
``load()`` once, outside any trace. ``load()`` compiles the C++ source with the
system C++ compiler (``$CXX``, else ``g++``; ``-O3 -march=native``) against the
XLA FFI headers shipped with jaxlib, caches it under ``$MUSE_JAX_CACHE_DIR``
(default ``~/.cache/muse_jax``) by a hash of the source, compiler, flags and jax
version, and registers it with XLA. Where that fails (no compiler, say), one
warning names the reason and every call falls back to XLA's dot, which gives the
same result to rounding. ``MUSE_JAX_CPU_KERNELS=0`` turns the kernel off.
Tracing never builds anything: ``applies`` only asks whether ``load()`` succeeded.

``matmul_out_in`` is the entry point: it uses the kernel only for float32,
``MIN_ROWS`` to ``MAX_ROWS`` rows, on the CPU backend, and XLA's dot everywhere else
(including the backward pass, so models stay differentiable).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile

import jax
import jax.numpy as jnp

# Rows for which the kernel beats XLA's dot (16384 x 1024 weight, 2-core AMD EPYC):
# one row is XLA's matrix-vector emitter at full bandwidth (31 vs 23 GB/s); 4 and 8
# rows stream at 18 / 14 GB/s against 11 / 9; from 12 rows on, XLA's matmul is as fast.
MIN_ROWS, MAX_ROWS = 2, 8
TARGET = "muse_small_rows_matmul"
SOURCE = pathlib.Path(__file__).with_name("cpu_matmul.cc")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")


def _cpu_signature() -> str:
  """What -march=native compiles for: a cache shared by different CPUs keeps one build each."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.machine() + platform.processor()
  return "".join(sorted({l for l in lines if l.startswith(("model name", "flags", "Features"))}))


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("MUSE_JAX_CACHE_DIR", "~/.cache/muse_jax")).expanduser()


def compile_library(compiler: str | None = None, cache_dir: pathlib.Path | None = None
                    ) -> pathlib.Path:
  """Builds (or finds in the cache) the kernel's shared library; returns its path.

  Raises ``RuntimeError`` with the compiler's output when the build fails.
  """
  compiler = compiler or os.environ.get("CXX", "g++")
  source = SOURCE.read_bytes()
  key = hashlib.sha256(b"\0".join([
      source, compiler.encode(), " ".join(FLAGS).encode(), jax.__version__.encode(),
      _cpu_signature().encode()])).hexdigest()[:16]
  cache_dir = cache_dir or _cache_dir()
  library = cache_dir / f"cpu_matmul_{key}.so"
  if library.exists():
    return library
  cache_dir.mkdir(parents=True, exist_ok=True)
  # Build beside the target, then rename: concurrent processes never load a half-written file.
  with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
    built = pathlib.Path(scratch) / library.name
    command = [*shlex.split(compiler), *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE),
               "-o", str(built)]
    try:
      result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
      raise RuntimeError(f"cannot run the C++ compiler {compiler!r} ({error}); set $CXX") from error
    if result.returncode != 0:
      raise RuntimeError(f"building {SOURCE.name} failed:\n$ {shlex.join(command)}\n"
                         f"{result.stderr.strip()}")
    os.replace(built, library)
  return library


IMPLEMENTATION = "cpu_small_rows"
_load_error: str | None = "cpu_matmul.load() was not called"


@functools.cache
def load() -> bool:
  """Builds (or finds) and registers the kernel, once per process; False with a warning
  naming the reason where it cannot (``load_error()``). Never called while tracing."""
  global _load_error
  if os.environ.get("MUSE_JAX_CPU_KERNELS", "1") == "0":
    _load_error = "MUSE_JAX_CPU_KERNELS=0"
    return False
  try:
    handle = ctypes.cdll.LoadLibrary(str(compile_library()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handle.MuseSmallRowsMatmul),
                                platform="cpu")
  except (RuntimeError, OSError) as error:
    _load_error = str(error)
    logging.warning("muse_jax CPU decode kernel unavailable, using XLA's dot: %s", error)
    return False
  _load_error = None
  return True


def available() -> bool:
  """Whether ``load()`` registered the kernel (builds nothing)."""
  return _load_error is None


def load_error() -> str | None:
  """Why the kernel is not available (None when it is)."""
  return _load_error


def _xla(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))


def _kernel(x: jax.Array, w: jax.Array) -> jax.Array:
  out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
  # Only the CPU lowering calls the kernel; an accelerator compile of the same trace uses XLA.
  return jax.lax.platform_dependent(x, w, cpu=call, default=_xla)


@jax.custom_vjp
def _kernel_with_xla_grad(x: jax.Array, w: jax.Array) -> jax.Array:
  return _kernel(x, w)


def _forward(x, w):
  return _kernel(x, w), (x, w)


def _backward(residuals, grad):
  x, w = residuals
  return grad @ w, grad.T @ x


_kernel_with_xla_grad.defvjp(_forward, _backward)


def applies(x: jax.Array, w: jax.Array) -> bool:
  """Whether ``matmul_out_in(x, w)`` would run the kernel (decided at trace time)."""
  return (x.ndim == 2 and w.ndim == 2 and MIN_ROWS <= x.shape[0] <= MAX_ROWS
          and x.dtype == jnp.float32 and w.dtype == jnp.float32
          and jax.default_backend() == "cpu" and available())


def matmul_out_in(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [M, K] @ w[N, K].T`` -> [M, N]: the kernel where it applies, else XLA's dot."""
  if applies(x, w):
    return _kernel_with_xla_grad(x, w)
  return _xla(x, w)
