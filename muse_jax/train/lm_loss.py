"""Next-token cross-entropy without materialising [B, T, vocab] float32 logits.

With a ~185k MUSE-VL vocabulary, full fp32 logits for a batch dwarf the model's
activations. ``chunked_cross_entropy`` walks the sequence in chunks: each chunk's
logits [B, chunk, V] are built, reduced to per-token losses and dropped, and
rematerialised in the backward pass (``jax.checkpoint``), so peak memory holds
one chunk of logits instead of all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_loss_sum(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                    weights: jax.Array) -> jax.Array:
  logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
  return jnp.sum(nll * weights)


def chunked_cross_entropy(hidden: jax.Array, lm_head_kernel: jax.Array, targets: jax.Array,
                          weights: jax.Array, chunk: int = 512) -> jax.Array:
  """Weighted mean of -log softmax(hidden @ kernel)[target] over all tokens.

  Chunks run along the sequence, never across the batch: every chunk holds all
  rows, so under data/FSDP parallelism each device scans over its own rows and
  nothing is gathered (chunking the flattened tokens would make the scan axis
  the sharded one).

  Args:
    hidden: [B, T, E] final hidden states (``Qwen2ForCausalLM.hidden_states``).
    lm_head_kernel: [E, V] (``Qwen2ForCausalLM.lm_head_kernel()``); matmuls run in
      ``hidden``'s dtype with float32 accumulation, the softmax in float32.
    targets: [B, T] int target ids.
    weights: [B, T] loss weights (0 masks a token, e.g. prompt or padding).
    chunk: sequence positions per chunk (logits [B, chunk, V] at a time); T is
      padded up to a multiple of it.
  Returns:
    sum(weights * nll) / sum(weights) (0 when all weights are 0), a float32 scalar.
  """
  b, t, e = hidden.shape
  targets = targets.astype(jnp.int32)
  weights = weights.astype(jnp.float32)
  chunk = min(chunk, t)
  pad = -t % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  kernel = lm_head_kernel.astype(hidden.dtype)
  n = (t + pad) // chunk
  if n == 1:   # all logits exist at once anyway: recomputing them would only cost time
    return _chunk_loss_sum(hidden, kernel, targets, weights) / jnp.maximum(jnp.sum(weights), 1e-8)
  chunk_loss = jax.checkpoint(_chunk_loss_sum)
  # scan over the leading axis: [n, B, chunk, ...]
  to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  def body(total, xs):
    return total + chunk_loss(xs[0], kernel, xs[1], xs[2]), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
  return total / jnp.maximum(jnp.sum(weights), 1e-8)
