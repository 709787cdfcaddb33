"""Vector quantizer with an L2-normalised codebook (LlamaGen / ViT-VQGAN style).

Features and codebook rows are unit vectors, so the nearest entry is the one of
highest cosine similarity; quantisation uses a straight-through estimator.
Shared by every tokenizer configuration that needs a single codebook.

Codebook health (which entries the encoder actually uses) is decided here too:
the symmetric initialisation, SimVQ's reparameterisation (``simvq=True``: the
effective codebook is a frozen random basis times a learned linear map), and
pure functions the trainer applies between steps: k-means++ seeding from data,
restart of dead entries from recent features, and EMA codebook updates. They
take and return arrays, so their state lives in the train state (and thus in
checkpoints) and their randomness in keys the caller derives from the step.
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


def symmetric_uniform(limit: float) -> layers.Initializer:
  """Uniform in [-limit, limit): every orthant of the code space gets entries."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def _identity(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(*shape, dtype=dtype)


class CodebookBasis(nnx.Variable):
  """SimVQ's random basis: not an ``nnx.Param``, so the optimiser never sees it."""


class VectorQuantizer(nnx.Module):

  def __init__(self, codebook_size: int, code_dim: int, *, rngs: nnx.Rngs,
               l2_normalized: bool = True, impl: str = "auto", simvq: bool = False,
               param_dtype=jnp.float32):
    self.codebook_size = codebook_size
    self.code_dim = code_dim
    self.l2_normalized = l2_normalized
    self.impl = impl
    self.simvq = simvq
    shape, names = (codebook_size, code_dim), ("codebook", "code_dim")
    init = symmetric_uniform(1.0 / codebook_size)  # [-1/K, 1/K) as LlamaGen, taming-transformers
    if simvq:
      # entries = basis @ map: gradients reach all entries through the shared map
      self.basis = CodebookBasis(init(rngs.params(), shape, param_dtype),
                                 out_sharding=names, eager_sharding=False)
      self.codebook_map = layers.param(rngs, _identity, (code_dim, code_dim),
                                       ("code_dim", None), param_dtype)
    else:
      self.codebook = layers.param(rngs, init, shape, names, param_dtype)

  def entries(self) -> jax.Array:
    if self.simvq:
      book = self.basis[...].astype(jnp.float32) @ self.codebook_map[...].astype(jnp.float32)
    else:
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


# -- codebook updates between steps (pure functions; the trainer owns their state) --

def kmeans_plus_plus(features: jax.Array, num_codes: int, key: jax.Array) -> jax.Array:
  """k-means++ seeding: ``num_codes`` rows of ``features`` [N, d], each drawn with
  probability proportional to its squared distance from the rows already drawn
  (uniformly once every feature is taken, when N < num_codes)."""
  features = features.astype(jnp.float32)
  n = features.shape[0]
  keys = jax.random.split(key, num_codes)
  first = features[jax.random.randint(keys[0], (), 0, n)]
  nearest = jnp.sum(jnp.square(features - first), -1)

  def pick(i, carry):
    centres, nearest = carry
    total = jnp.sum(nearest)
    probs = jnp.where(total > 0, nearest / jnp.where(total > 0, total, 1.0), 1.0 / n)
    row = features[jax.random.choice(keys[i], n, p=probs)]
    nearest = jnp.minimum(nearest, jnp.sum(jnp.square(features - row), -1))
    return centres.at[i].set(row), nearest

  centres = jnp.zeros((num_codes, features.shape[1]), jnp.float32).at[0].set(first)
  return jax.lax.fori_loop(1, num_codes, pick, (centres, nearest))[0]


def restart_dead_codes(book: jax.Array, last_used: jax.Array, features: jax.Array,
                       step: jax.Array, key: jax.Array, dead_after: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Moves every entry unused for ``dead_after`` steps onto a recent feature.

  ``book`` [K, d] raw entries, ``last_used`` [K] the last step that picked each
  entry (already updated for ``step``), ``features`` [N, d] this step's encoder
  outputs. Dead entries take distinct random features (with repeats only when
  more than N are dead), rescaled to the mean norm of the live entries so the
  optimiser moves them at the live entries' angular rate. Returns (book,
  last_used with restarted entries marked as used now, restarted mask [K]).
  """
  dead = step - last_used >= dead_after
  order = jax.random.permutation(key, features.shape[0])
  rank = jnp.cumsum(dead.astype(jnp.int32)) - 1   # the j-th dead entry takes order[j mod N]
  chosen = features[order[rank % features.shape[0]]].astype(jnp.float32)
  norms = jnp.linalg.norm(book.astype(jnp.float32), axis=-1)
  live = jnp.sum(jnp.where(dead, 0.0, norms)) / jnp.maximum(jnp.sum(~dead), 1)
  scale = jnp.where(jnp.any(~dead), live, 1.0)
  new_rows = layers.l2_normalize(chosen) * scale
  book = jnp.where(dead[:, None], new_rows.astype(book.dtype), book)
  return book, jnp.where(dead, step, last_used), dead


def ema_update(ema_count: jax.Array, ema_sum: jax.Array, codes: jax.Array,
               features: jax.Array, decay: float, eps: float = 1e-5
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Exponential moving averages of each entry's assignment count and feature sum
  (VQ-VAE-2); returns (count, sum, new entries = Laplace-smoothed sum / count)."""
  k = ema_count.shape[0]
  codes = codes.reshape(-1)
  flat = features.reshape(-1, ema_sum.shape[1]).astype(jnp.float32)
  # segment sums, not a one-hot matmul: [N, K] would not fit at K = 32768
  counts = jnp.bincount(codes, length=k).astype(jnp.float32)
  ema_count = decay * ema_count + (1 - decay) * counts
  ema_sum = decay * ema_sum + (1 - decay) * jax.ops.segment_sum(flat, codes, num_segments=k)
  total = jnp.sum(ema_count)
  smoothed = (ema_count + eps) / (total + k * eps) * total
  return ema_count, ema_sum, ema_sum / smoothed[:, None]
