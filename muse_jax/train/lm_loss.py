"""Next-token cross-entropy without materialising [B, T, vocab] float32 logits.

With a ~185k MUSE-VL vocabulary, full fp32 logits for a batch dwarf the model's
activations. ``chunked_cross_entropy`` walks the tokens in chunks: each chunk's
logits [chunk, V] are built, reduced to per-token losses and dropped, and
rematerialised in the backward pass (``jax.checkpoint``), so peak memory holds
one chunk of logits instead of all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_loss_sum(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                    weights: jax.Array) -> jax.Array:
  logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
  return jnp.sum(nll * weights)


def chunked_cross_entropy(hidden: jax.Array, lm_head_kernel: jax.Array, targets: jax.Array,
                          weights: jax.Array, chunk: int = 1024) -> jax.Array:
  """Weighted mean of -log softmax(hidden @ kernel)[target] over all tokens.

  Args:
    hidden: [B, T, E] final hidden states (``Qwen2ForCausalLM.hidden_states``).
    lm_head_kernel: [E, V] (``Qwen2ForCausalLM.lm_head_kernel()``); matmuls run in
      ``hidden``'s dtype with float32 accumulation, the softmax in float32.
    targets: [B, T] int target ids.
    weights: [B, T] loss weights (0 masks a token, e.g. prompt or padding).
    chunk: tokens per chunk; the token count is padded up to a multiple of it.
  Returns:
    sum(weights * nll) / sum(weights) (0 when all weights are 0), a float32 scalar.
  """
  e = hidden.shape[-1]
  hidden = hidden.reshape(-1, e)
  targets = targets.reshape(-1).astype(jnp.int32)
  weights = weights.reshape(-1).astype(jnp.float32)
  n = hidden.shape[0]
  chunk = min(chunk, n)
  pad = -n % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad))
    weights = jnp.pad(weights, (0, pad))
  kernel = lm_head_kernel.astype(hidden.dtype)
  chunk_loss = jax.checkpoint(_chunk_loss_sum)

  def body(total, xs):
    return total + chunk_loss(xs[0], kernel, xs[1], xs[2]), None

  total, _ = jax.lax.scan(
      body, jnp.zeros((), jnp.float32),
      (hidden.reshape(-1, chunk, e), targets.reshape(-1, chunk), weights.reshape(-1, chunk)))
  return total / jnp.maximum(jnp.sum(weights), 1e-8)
