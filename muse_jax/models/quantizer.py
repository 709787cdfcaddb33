"""Vector quantizer with an L2-normalised codebook (LlamaGen / ViT-VQGAN style).

Features and codebook rows are unit vectors, so the nearest entry is the one of
highest cosine similarity; quantisation uses a straight-through estimator.
Shared by every tokenizer configuration that needs a single codebook.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from muse_jax.kernels import vq
from muse_jax.models import layers


@dataclasses.dataclass
class Quantized:
  quantized: jax.Array        # straight-through code vectors [..., d] (float32)
  codes: jax.Array            # int32 [...]
  codebook_loss: jax.Array    # ||sg[f] - z_q||^2: moves codes towards features
  commitment_loss: jax.Array  # ||f - sg[z_q]||^2: keeps features near their code (x beta outside)
  entropy_loss: jax.Array     # per-sample entropy - codebook entropy (0 unless requested)


jax.tree_util.register_dataclass(
    Quantized, data_fields=[f.name for f in dataclasses.fields(Quantized)], meta_fields=[])


class VectorQuantizer(nnx.Module):

  def __init__(self, codebook_size: int, code_dim: int, *, rngs: nnx.Rngs,
               l2_normalized: bool = True, impl: str = "auto", param_dtype=jnp.float32):
    self.codebook_size = codebook_size
    self.code_dim = code_dim
    self.l2_normalized = l2_normalized
    self.impl = impl
    self.codebook = layers.param(
        rngs, nnx.initializers.uniform(2.0 / codebook_size), (codebook_size, code_dim),
        ("codebook", "code_dim"), param_dtype)

  def entries(self) -> jax.Array:
    book = self.codebook[...].astype(jnp.float32)
    return layers.l2_normalize(book) if self.l2_normalized else book

  def lookup(self, codes: jax.Array) -> jax.Array:
    """int codes [...] -> code vectors [..., code_dim]."""
    return jnp.take(self.entries(), codes, axis=0)

  def __call__(self, f: jax.Array, *, entropy_temperature: float | None = None) -> Quantized:
    """Quantise ``f`` [..., d] (already L2-normalised when the codebook is)."""
    f = f.astype(jnp.float32)
    book = self.entries()
    flat = f.reshape(-1, self.code_dim)
    codes = vq.nearest_code(flat, book, impl=self.impl,
                            sharding=layers.placement(("batch", None), flat.shape))
    codes = codes.reshape(f.shape[:-1])
    z_q = jnp.take(book, codes, axis=0)
    entropy = jnp.zeros((), jnp.float32)
    if entropy_temperature is not None:
      entropy = _entropy_loss(flat, book, entropy_temperature)
    return Quantized(
        quantized=f + jax.lax.stop_gradient(z_q - f),
        codes=codes,
        codebook_loss=jnp.mean(jnp.square(jax.lax.stop_gradient(f) - z_q)),
        commitment_loss=jnp.mean(jnp.square(f - jax.lax.stop_gradient(z_q))),
        entropy_loss=entropy)


def _entropy_loss(flat: jax.Array, book: jax.Array, temperature: float,
                  chunk_size: int = vq.CHUNK_SIZE) -> jax.Array:
  """Mean per-token entropy minus entropy of the mean assignment (MaskGIT / LlamaGen).

  Low per-token entropy makes assignments confident; high batch entropy spreads
  them over the codebook. The [N, K] soft assignments exist one [chunk, K] block
  at a time, forward and backward (each chunk is rematerialised for its gradient).
  """
  n = flat.shape[0]
  chunk_size = min(chunk_size, n)
  pad = -n % chunk_size
  chunks = jnp.pad(flat, ((0, pad), (0, 0))).reshape(-1, chunk_size, flat.shape[1])
  valid = (jnp.arange(n + pad) < n).astype(jnp.float32).reshape(-1, chunk_size)
  sq_norms = jnp.sum(jnp.square(book), -1)

  @jax.checkpoint
  def add_chunk(totals, chunk):
    rows, weights = chunk
    sq_dist = (jnp.sum(jnp.square(rows), -1, keepdims=True) - 2.0 * rows @ book.T
               + sq_norms[None])
    log_probs = jax.nn.log_softmax(-sq_dist / temperature, axis=-1)
    probs = jnp.exp(log_probs) * weights[:, None]
    entropy_sum, probs_sum = totals
    return (entropy_sum - jnp.sum(probs * log_probs), probs_sum + jnp.sum(probs, axis=0)), None

  zeros = (jnp.zeros((), jnp.float32), jnp.zeros(book.shape[0], jnp.float32))
  (entropy_sum, probs_sum), _ = jax.lax.scan(add_chunk, zeros, (chunks, valid))
  mean_probs = probs_sum / n
  batch = -jnp.sum(mean_probs * jnp.log(mean_probs + 1e-10))
  return entropy_sum / n - batch
