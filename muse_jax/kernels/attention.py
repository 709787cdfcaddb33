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
  s = k.shape[1]
  # Each KV head serves its query heads as one matmul: [B, Hkv, groups*T, D] x [B, Hkv, D, S].
  # On CPU this runs attention (forward + backward) ~2x faster than batching over the groups.
  qg = q.reshape(b, t, hkv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * t, d)
  logits = jnp.einsum("bkmd,bksd->bkms", qg, k.transpose(0, 2, 1, 3),
                      preferred_element_type=jnp.float32) * scale
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, hq, t, s)).reshape(b, hkv, groups * t, s)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:  # a fully masked row (padding) gives zeros, not a uniform average
    probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum("bkms,bksd->bkmd", probs.astype(v.dtype), v.transpose(0, 2, 1, 3))
  return out.reshape(b, hkv, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)
