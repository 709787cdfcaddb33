"""Nearest-codebook-entry search: the reference XLA path.

``nearest_code`` is what every quantizer calls; ``impl`` is where Pallas kernels
plug in. The reference processes tokens in chunks so the [tokens, K] distance
matrix never exists whole: at K = 32768 a 256-token image batch of 128 would
otherwise need 4 GiB of fp32 distances.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def _nearest_in_chunk(f: jax.Array, codebook: jax.Array, sq_norms: jax.Array) -> jax.Array:
  # ||f - e||^2 = ||f||^2 - 2 f.e + ||e||^2; ||f||^2 is constant per row.
  scores = sq_norms[None, :] - 2.0 * jnp.einsum(
      "nd,kd->nk", f, codebook, preferred_element_type=jnp.float32)
  return jnp.argmin(scores, axis=-1).astype(jnp.int32)  # first minimum: ties -> lowest index


def nearest_code(f: jax.Array, codebook: jax.Array, *, chunk_size: int = 4096,
                 impl: str = "xla") -> jax.Array:
  """Index of the codebook row closest (L2) to each row of ``f``.

  Args:
    f: [N, d] features; codebook: [K, d].
  Returns:
    int32 [N]; ties resolve to the lowest index.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"vq impl {impl!r} is not available; choose one of {IMPLEMENTATIONS}")
  f = f.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  sq_norms = jnp.sum(jnp.square(codebook), axis=-1)
  n = f.shape[0]
  if n <= chunk_size:
    return _nearest_in_chunk(f, codebook, sq_norms)
  pad = -n % chunk_size
  chunks = jnp.pad(f, ((0, pad), (0, 0))).reshape(-1, chunk_size, f.shape[1])
  codes = jax.lax.map(lambda c: _nearest_in_chunk(c, codebook, sq_norms), chunks)
  return codes.reshape(-1)[:n]
