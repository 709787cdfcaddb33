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


def _chunk_group_stats(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                       weights: jax.Array, groups: jax.Array, num_groups: int) -> jax.Array:
  """[3, G]: per group, the weighted nll sum, weighted correct-argmax count, weight sum."""
  logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
  # a tie with the target counts as correct: exact ties do not happen in float logits
  correct = jax.lax.stop_gradient(target_logits >= jnp.max(logits, axis=-1))
  per_group = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32) * weights[..., None]
  return jnp.stack([jnp.einsum("bt,btg->g", nll, per_group),
                    jnp.einsum("bt,btg->g", correct.astype(jnp.float32), per_group),
                    jnp.sum(per_group, axis=(0, 1))])


def _scan_chunks(chunk_fn, hidden: jax.Array, lm_head_kernel: jax.Array, per_token: tuple,
                 chunk: int, zero: jax.Array) -> jax.Array:
  """Sum of ``chunk_fn(hidden, kernel, *per_token)`` over sequence chunks (padded with zeros,
  so padded positions carry zero weight), each chunk rematerialised in the backward pass."""
  b, t, _ = hidden.shape
  chunk = min(chunk, t)
  pad = -t % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    per_token = tuple(jnp.pad(x, ((0, 0), (0, pad))) for x in per_token)
  kernel = lm_head_kernel.astype(hidden.dtype)
  n = (t + pad) // chunk
  if n == 1:   # all logits exist at once anyway: recomputing them would only cost time
    return chunk_fn(hidden, kernel, *per_token)
  remat = jax.checkpoint(chunk_fn)
  # scan over the leading axis: [n, B, chunk, ...]
  to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  def body(total, xs):
    return total + remat(xs[0], kernel, *xs[1:]), None

  total, _ = jax.lax.scan(body, zero, (to_chunks(hidden), *map(to_chunks, per_token)))
  return total


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
  weights = weights.astype(jnp.float32)
  total = _scan_chunks(_chunk_loss_sum, hidden, lm_head_kernel,
                       (targets.astype(jnp.int32), weights), chunk, jnp.zeros((), jnp.float32))
  return total / jnp.maximum(jnp.sum(weights), 1e-8)


def chunked_group_stats(hidden: jax.Array, lm_head_kernel: jax.Array, targets: jax.Array,
                        weights: jax.Array, groups: jax.Array, num_groups: int,
                        chunk: int = 512) -> jax.Array:
  """``chunked_cross_entropy``'s sums split by token group (e.g. text / visual targets).

  ``groups`` [B, T] int in [0, num_groups). Returns float32 [3, num_groups]: row 0 the
  weighted nll sums (differentiable; their total over the weight total is
  ``chunked_cross_entropy``), row 1 the weighted counts of targets that are the
  argmax of the logits, row 2 the weight sums.
  """
  return _scan_chunks(
      lambda h, k, t, w, g: _chunk_group_stats(h, k, t, w, g, num_groups), hidden,
      lm_head_kernel, (targets.astype(jnp.int32), weights.astype(jnp.float32),
                       groups.astype(jnp.int32)), chunk, jnp.zeros((3, num_groups), jnp.float32))
