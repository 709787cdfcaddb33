"""Multi-head attention: the reference XLA path.

Every model calls ``dot_product_attention``; the ``impl`` argument is where Pallas
kernels plug in (TPU / GPU). The XLA path is the oracle the kernels are tested
against, so it favours clarity: softmax in float32, explicit boolean masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def attention_mask(q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
                   q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None, *, causal: bool) -> jax.Array | None:
  """Boolean mask [B, 1, T, S]: True where a query may attend to a key.

  Positions are per-token indices ([B, T] / [B, S]) so packed sequences and KV
  caches share one rule: causal means key position <= query position, and
  segment ids must match (id 0 marks padding, which attends nowhere).
  """
  mask = None
  if causal:
    mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if q_segment_ids is not None:
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
        kv_segment_ids[:, None, :] != 0)
    mask = same if mask is None else mask & same
  return None if mask is None else mask[:, None, :, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, scale: float | None = None,
                          impl: str = "xla") -> jax.Array:
  """softmax(q k^T * scale + mask) v with grouped-query support.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv (GQA/MQA).
    mask: boolean, broadcastable to [B, Hq, T, S].
  Returns:
    [B, T, Hq, D] in q's dtype.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl {impl!r} is not available; choose one of {IMPLEMENTATIONS}")
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
  groups = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, hkv, groups, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                      preferred_element_type=jnp.float32) * scale
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, hq) + mask.shape[2:]).reshape(b, hkv, groups, t, -1)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:  # a fully masked row (padding) gives zeros, not a uniform average
    probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
  return out.reshape(b, t, hq, d)
