"""Multi-head attention: the XLA reference and the fused kernels behind one call.

Every model calls ``dot_product_attention``. Implementations (``Options.impl``):

* ``xla``: the reference: softmax in float32 over explicit boolean masks. It
  materialises [B, Hq, T, S] logits; KV-cache decode steps and CPU always use it.
* ``splash``: JAX's splash attention (Pallas, TPU), wrapped for our layout:
  [B, T, H, D] in and out, GQA/MQA without repeating K/V (one MQA kernel per KV
  head), causal or full masks, packed rows by segment ids, lengths padded to the
  block size (729 -> 768). Mosaic on TPU, interpret mode anywhere else (tests).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's
  fused flash attention on NVIDIA GPUs (bf16 / fp16 only).
* ``auto``: splash on TPU, cuDNN on GPU where it applies (bf16 / fp16, no packed
  rows), else xla; decided at trace time from the mesh's devices, or the default
  backend without a mesh.

The fused kernels need the mask's structure rather than a dense array, so self
attention passes a ``SelfMask`` (causal flag, segment ids, positions); the XLA
path expands it with ``attention_mask``. docs/kernels.md has the decisions.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
# splash pads sequence lengths to whole blocks; Mosaic tiles need multiples of 128
_LANE = 128


@dataclasses.dataclass(frozen=True)
class Options:
  """How a model's attention runs (from ``config.model.attention_*``)."""
  impl: str = "xla"
  block_q: int = 512     # splash query / key-value tile lengths (multiples of 128)
  block_kv: int = 512


@dataclasses.dataclass(frozen=True)
class SelfMask:
  """The structure of a self-attention mask over one packed row.

  ``segment_ids`` [B, T] (0 marks padding, which attends nowhere) and ``positions``
  [B, T] may be None. The XLA path applies causality by positions; the kernels by
  index, which is the same rule while positions increase within a segment (as
  ``qwen2.segment_positions`` makes them).
  """
  causal: bool
  segment_ids: jax.Array | None = None
  positions: jax.Array | None = None

  def dense(self, length: int, batch: int) -> jax.Array | None:
    positions = self.positions
    if positions is None and self.causal:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return attention_mask(positions, positions, self.segment_ids, self.segment_ids,
                          causal=self.causal)


jax.tree_util.register_dataclass(SelfMask, data_fields=["segment_ids", "positions"],
                                 meta_fields=["causal"])


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
                          mask: jax.Array | SelfMask | None = None, scale: float | None = None,
                          options: Options = Options(),
                          sharding: jax.sharding.NamedSharding | None = None) -> jax.Array:
  """softmax(q k^T * scale + mask) v with grouped-query support.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv (GQA/MQA).
    mask: None (every key), a ``SelfMask`` (self-attention, T == S), or a boolean
      array broadcastable to [B, Hq, T, S]. A dense mask, or T != S (KV-cache
      steps), always takes the XLA path, whatever ``options.impl`` says.
    options: the implementation and its block sizes.
    sharding: where q lives ([B, T, Hq, D]; the models' ``layers.placement``), or None.
      The kernels run per shard under ``shard_map`` over its batch and head axes.
  Returns:
    [B, T, Hq, D] in q's dtype.
  """
  impl = options.impl
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl {impl!r} is unknown; choose one of {IMPLEMENTATIONS}")
  hq, hkv = q.shape[2], k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if not ((mask is None or isinstance(mask, SelfMask)) and q.shape[1] == k.shape[1]):
    impl = "xla"   # KV-cache steps and cross attention
  elif impl == "auto":
    impl = _auto(q, mask, sharding)
  if impl == "splash":
    return _sharded(_splash, q, k, v, mask, scale, options, sharding)
  if impl == "cudnn":
    return _sharded(_cudnn, q, k, v, mask, scale, options, sharding)
  if isinstance(mask, SelfMask):
    mask = mask.dense(q.shape[1], q.shape[0])
  return _xla(q, k, v, mask, scale, grouped_rows=_platform(sharding) == "cpu")


def _platform(sharding: jax.sharding.NamedSharding | None) -> str:
  if sharding is not None:
    return sharding.mesh.devices.flat[0].platform
  return jax.default_backend()


def _auto(q: jax.Array, mask: SelfMask | None, sharding) -> str:
  platform = _platform(sharding)
  if platform == "tpu":
    return "splash"
  if platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and (
      mask is None or mask.segment_ids is None):
    return "cudnn"
  return "xla"


def _xla(q, k, v, mask, scale, *, grouped_rows: bool):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  groups = hq // hkv
  if grouped_rows:
    # CPU layout: each KV head serves its query heads as one matmul, [B, Hkv, groups*T, D]
    # x [B, Hkv, D, S]; forward + backward ~2x faster on CPU than batching over the
    # groups. Compiled for TPU (v5e, T=2048, 28/4 heads, D=128, bf16, fwd+bwd) it needs
    # 940 MB of temporaries and 4.6 GB of traffic against 705 MB / 3.7 GB for the
    # [B, Hkv, groups, T, S] einsum below, so it stays a CPU-only layout.
    qg = q.reshape(b, t, hkv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * t, d)
    logits = jnp.einsum("bkmd,bksd->bkms", qg, k.transpose(0, 2, 1, 3),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, hkv, groups, d), k,
                        preferred_element_type=jnp.float32)
  logits = logits * scale
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, hq, t, s)).reshape(logits.shape)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:  # a fully masked row (padding) gives zeros, not a uniform average
    probs = jnp.where(mask, probs, 0.0)
  probs = probs.astype(v.dtype)
  if grouped_rows:
    out = jnp.einsum("bkms,bksd->bkmd", probs, v.transpose(0, 2, 1, 3))
    return out.reshape(b, hkv, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, hq, d)


def _sharded(kernel, q, k, v, mask, scale, options, sharding):
  """Runs ``kernel`` per shard: batch over the mesh's batch axes, heads over its head axis.

  Pallas calls cannot be partitioned by XLA. Query and KV heads split together,
  only when the KV heads divide evenly (else heads stay whole on every device);
  the sequence is never split.
  """
  segment_ids = None if mask is None else mask.segment_ids
  call = functools.partial(kernel, causal=bool(mask is not None and mask.causal), scale=scale,
                           options=options, interpret=_platform(sharding) != "tpu")
  if sharding is None:
    return call(q, k, v, segment_ids)
  spec = tuple(sharding.spec) + (None,) * (3 - len(sharding.spec))
  batch_axes, head_axes = spec[0], spec[2]
  if head_axes is not None:
    names = (head_axes,) if isinstance(head_axes, str) else tuple(head_axes)
    if k.shape[2] % math.prod(sharding.mesh.shape[n] for n in names):
      head_axes = None
  P = jax.sharding.PartitionSpec
  heads = P(batch_axes, None, head_axes, None)
  rows = P(batch_axes, None)
  if segment_ids is None:
    return jax.shard_map(lambda q, k, v: call(q, k, v, None), mesh=sharding.mesh,
                         in_specs=(heads, heads, heads), out_specs=heads,
                         check_vma=False)(q, k, v)
  return jax.shard_map(call, mesh=sharding.mesh, in_specs=(heads, heads, heads, rows),
                       out_specs=heads, check_vma=False)(q, k, v, segment_ids)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@functools.lru_cache(maxsize=64)
def _splash_kernel(causal: bool, length: int, groups: int, block_q: int, block_kv: int,
                   interpret: bool) -> splash.SplashAttentionKernel:
  """An MQA kernel for ``groups`` query heads over one KV head (built once per shape)."""
  head = (splash_mask.CausalMask((length, length)) if causal
          else splash_mask.FullMask((length, length)))
  blocks = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv)
  # concrete mask tables even when first built inside a trace, so the cache holds no tracers
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mqa(splash_mask.MultiHeadMask([head] * groups),
                                  block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _splash(q, k, v, segment_ids, *, causal: bool, scale: float, options: Options,
            interpret: bool):
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  groups = hq // hkv
  for name in ("block_q", "block_kv"):
    size = getattr(options, name)
    if size <= 0 or size % _LANE:
      raise ValueError(f"splash {name}={size} must be a positive multiple of {_LANE}")
  padded = _round_up(t, _LANE)
  block_q, block_kv = min(options.block_q, padded), min(options.block_kv, padded)
  padded = _round_up(padded, math.lcm(block_q, block_kv))
  if segment_ids is None and padded != t:
    segment_ids = jnp.ones((b, t), jnp.int32)   # padding keys must stay out of real rows
  # per-head layout [B, Hkv, groups, T, D]; splash leaves the scale to the caller
  q = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, hkv, groups, d).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  pad = padded - t
  if pad:
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
  kernel = _splash_kernel(causal, padded, groups, block_q, block_kv, interpret)
  run = functools.partial(_run_splash, kernel)
  if segment_ids is None:
    out = jax.vmap(lambda q, k, v: run(q, k, v, None))(q, k, v)
  else:
    out = jax.vmap(run)(q, k, v, segment_ids.astype(jnp.int32))
  out = out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)
  if segment_ids is not None:
    # splash lets padding (segment 0) attend to padding; the reference gives zeros
    out = jnp.where((segment_ids[:, :t] != 0)[:, :, None, None], out, 0).astype(out.dtype)
  return out


def _run_splash(kernel, q, k, v, segment_ids):
  """One batch row: q [Hkv, groups, L, D], k / v [Hkv, L, D], segment ids [L] or None."""
  segments = None if segment_ids is None else splash.SegmentIds(q=segment_ids, kv=segment_ids)
  return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q, k, v)


def _cudnn(q, k, v, segment_ids, *, causal: bool, scale: float, options: Options,
           interpret: bool):
  del options, interpret
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; "
                     "set the model dtype, or attention_impl='xla'")
  # packed rows: cuDNN takes the segment mask as a dense [B, 1, T, T] mask (a bias); as in
  # splash, padding attends to padding (no empty softmax rows) and is zeroed below
  mask = None if segment_ids is None else (
      segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                     implementation="cudnn")
  if segment_ids is not None:   # padding rows attend nowhere: zeros, as the reference
    out = jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(out.dtype)
  return out
