"""Qwen2 / Llama decoder LLM (the language half of MUSE-VL).

Qwen2 is Llama with biases on the q/k/v projections, so one module serves both:
``attention_bias`` picks the family (Qwen2.5: True, Yi-1.5 / Llama: False).
Attribute paths mirror ``transformers.Qwen2ForCausalLM`` (``model.embed_tokens``,
``model.layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``,
``model.norm``, ``lm_head``) so Hugging Face conversion is a rename + transpose.

Sequences may be packed: ``segment_ids`` (0 = padding) keep documents apart and
``positions`` restart per segment. The KV cache is a plain pytree (``KVCache``)
threaded through ``prefill`` / ``decode_step``; both go through the same layer
code as the full forward, so cached decoding reproduces full-forward logits.

With ``scan_layers`` the layers are one stacked module run by ``lax.scan``
(``models/stack.py``; parameter paths lose the layer index: ``model.layers.mlp...``
holds every layer's slice) and the cache's keys / values are stacked [L, ...] the
same way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from muse_jax.kernels import attention
from muse_jax.models import layers
from muse_jax.models import stack


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  vocab_size: int = 151936
  hidden_size: int = 896
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  mlp_dim: int = 4864
  head_dim: int | None = None         # None: hidden_size // num_heads
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  attention_bias: bool = True         # q/k/v biases: Qwen2 yes, Llama / Yi no
  max_position_embeddings: int = 32768
  dtype: str = "float32"              # compute dtype
  param_dtype: str = "float32"
  attention_impl: str = "auto"        # kernels/attention.py: auto | xla | splash | cudnn
  attention_block_q: int = 512        # splash tiles (multiples of 128)
  attention_block_kv: int = 512
  scan_layers: bool = False           # stacked layers run by lax.scan (models/stack.py)
  remat_policy: str = "none"          # what each layer keeps for backward (stack.REMAT_POLICIES)

  @property
  def attention(self) -> attention.Options:
    return attention.Options(self.attention_impl, self.attention_block_q, self.attention_block_kv)

  @property
  def kv_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "Qwen2Config":
    """Published sizes by name (``qwen2.5-7b``, ``yi-1.5-9b``, ...), then overrides."""
    if name not in PRESETS:
      raise ValueError(f"unknown Qwen2 preset {name!r}; known: {sorted(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})

  def num_params(self) -> int:
    d, hd = self.hidden_size, self.kv_dim
    attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
    attn += (self.num_heads + 2 * self.num_kv_heads) * hd if self.attention_bias else 0
    per_layer = attn + 3 * d * self.mlp_dim + 2 * d
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.vocab_size * d + head + self.num_layers * per_layer + d


_QWEN25 = dict(rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=True)
_YI15 = dict(vocab_size=64000, rope_theta=5e6, rms_norm_eps=1e-6, attention_bias=False,
             tie_word_embeddings=False, max_position_embeddings=4096)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN25, vocab_size=151936, hidden_size=896, num_layers=24,
                         num_heads=14, num_kv_heads=2, mlp_dim=4864,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(_QWEN25, vocab_size=151936, hidden_size=1536, num_layers=28,
                         num_heads=12, num_kv_heads=2, mlp_dim=8960,
                         tie_word_embeddings=True, max_position_embeddings=131072),
    "qwen2.5-3b": dict(_QWEN25, vocab_size=151936, hidden_size=2048, num_layers=36,
                       num_heads=16, num_kv_heads=2, mlp_dim=11008,
                       tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, hidden_size=3584, num_layers=28,
                       num_heads=28, num_kv_heads=4, mlp_dim=18944,
                       tie_word_embeddings=False, max_position_embeddings=131072),
    "qwen2.5-32b": dict(_QWEN25, vocab_size=152064, hidden_size=5120, num_layers=64,
                        num_heads=40, num_kv_heads=8, mlp_dim=27648,
                        tie_word_embeddings=False, max_position_embeddings=131072),
    "yi-1.5-9b": dict(_YI15, hidden_size=4096, num_layers=48, num_heads=32, num_kv_heads=4,
                      mlp_dim=11008),
    "yi-1.5-34b": dict(_YI15, hidden_size=7168, num_layers=60, num_heads=56, num_kv_heads=8,
                       mlp_dim=20480),
}


@flax.struct.dataclass
class KVCache:
  """Rotated keys / values of every layer plus per-slot bookkeeping.

  Slots are filled left to right at ``index`` (shared by the batch: prompts are
  left-padded). ``valid`` marks written, non-padding slots; ``positions`` holds
  each slot's RoPE position and ``next_positions`` the position of each row's
  next token.
  """
  # per layer [B, kv_heads, S, head_dim]: a tuple, or stacked [L, ...] for scanned layers
  keys: tuple[jax.Array, ...] | jax.Array
  values: tuple[jax.Array, ...] | jax.Array
  positions: jax.Array                 # [B, S] int32
  valid: jax.Array                     # [B, S] int32, 1 = attendable
  next_positions: jax.Array            # [B] int32
  index: jax.Array                     # [] int32, next slot to write

  @property
  def max_len(self) -> int:
    return self.positions.shape[1]


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Per-segment token positions for packed rows: 0, 1, ... restarting at each segment."""
  t = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
      axis=-1)
  segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
  return index - segment_start


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                dtype) -> tuple[jax.Array, jax.Array]:
  """cos / sin [B, T, 1, head_dim // 2] computed in float32 (as HF), cast to ``dtype``."""
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles)[:, :, None, :].astype(dtype), jnp.sin(angles)[:, :, None, :].astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the two halves of each head (HF's rotate_half convention)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RMSNorm(nnx.Module):
  """x / rms(x) in float32, cast back, then scaled (HF Qwen2RMSNorm order)."""

  def __init__(self, features: int, eps: float, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.eps = eps
    self.dtype = dtype
    self.weight = layers.param(rngs, nnx.initializers.ones_init(), (features,), ("norm",),
                               dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class Attention(nnx.Module):
  """Causal GQA self-attention with RoPE; optionally reads / writes a KV cache."""

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    self.config = config
    c, hd = config, config.kv_dim
    kw = dict(rngs=rngs, dtype=c.dtype, param_dtype=c.param_dtype)
    self.q_proj = layers.linear(c.hidden_size, c.num_heads * hd, ("embed", "heads"),
                                use_bias=c.attention_bias, **kw)
    self.k_proj = layers.linear(c.hidden_size, c.num_kv_heads * hd, ("embed", "kv_heads"),
                                use_bias=c.attention_bias, **kw)
    self.v_proj = layers.linear(c.hidden_size, c.num_kv_heads * hd, ("embed", "kv_heads"),
                                use_bias=c.attention_bias, **kw)
    self.o_proj = layers.linear(c.num_heads * hd, c.hidden_size, ("heads", "embed"),
                                use_bias=False, **kw)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
               mask: attention.SelfMask | jax.Array, kv: tuple[jax.Array, jax.Array] | None = None,
               cache_index: jax.Array | None = None):
    c, hd = self.config, self.config.kv_dim
    b, t, _ = x.shape
    q = apply_rope(self.q_proj(x).reshape(b, t, c.num_heads, hd), *rope)
    k = apply_rope(self.k_proj(x).reshape(b, t, c.num_kv_heads, hd), *rope)
    v = self.v_proj(x).reshape(b, t, c.num_kv_heads, hd)
    if kv is not None:
      # the cache is [B, kv_heads, S, D]: the layout the attention matmuls consume, so
      # XLA reads it in place instead of transposing the whole cache every step
      zero = jnp.zeros((), jnp.int32)
      start = (zero, zero, cache_index, zero)
      kv = (jax.lax.dynamic_update_slice(kv[0], k.swapaxes(1, 2).astype(kv[0].dtype), start),
            jax.lax.dynamic_update_slice(kv[1], v.swapaxes(1, 2).astype(kv[1].dtype), start))
      k, v = kv[0].swapaxes(1, 2), kv[1].swapaxes(1, 2)
    out = attention.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, options=c.attention,
        sharding=layers.placement(("batch", "seq", "heads", None), q.shape))
    return self.o_proj(out.reshape(b, t, c.num_heads * hd)), kv


class Mlp(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype, use_bias=False)
    self.gate_proj = layers.linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"), **kw)
    self.up_proj = layers.linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"), **kw)
    self.down_proj = layers.linear(config.mlp_dim, config.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.mlp = Mlp(config, rngs=rngs)

  def __call__(self, x, rope, mask, kv=None, cache_index=None):
    attn, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, cache_index)
    x = x + checkpoint_name(attn, stack.ATTN_OUT)
    x = x + checkpoint_name(self.mlp(self.post_attention_layernorm(x)), stack.MLP_OUT)
    return layers.constrain(x, "batch", "seq", "act_embed"), kv


class Qwen2Model(nnx.Module):
  """Embedding, decoder stack and final norm (HF ``Qwen2Model``)."""

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = layers.embed(config.vocab_size, config.hidden_size, rngs=rngs,
                                     dtype=config.dtype, param_dtype=config.param_dtype)
    self.layers = stack.build(lambda r: DecoderLayer(config, rngs=r), config.num_layers,
                              config.scan_layers, rngs)
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs,
                        dtype=config.dtype, param_dtype=config.param_dtype)

  def __call__(self, ids, positions, mask, cache: KVCache | None = None):
    c = self.config
    x = layers.constrain(self.embed_tokens(ids), "batch", "seq", "act_embed")
    rope = rope_tables(positions, c.kv_dim, c.rope_theta, c.dtype)
    if cache is None:
      x, _ = stack.run(self.layers, lambda layer, x, _: layer(x, rope, mask), x,
                       remat_policy=c.remat_policy)
      return self.norm(x), None
    scanned = stack.is_scanned(self.layers)
    kv = (cache.keys, cache.values) if scanned else list(zip(cache.keys, cache.values))
    x, kv = stack.run(self.layers, lambda layer, x, kv: layer(x, rope, mask, kv, cache.index),
                      x, kv)
    return self.norm(x), (kv if scanned else tuple(zip(*kv)))


class Qwen2ForCausalLM(nnx.Module):
  """Token ids [B, T] -> logits [B, T, vocab] (float32), with a KV-cache API."""

  matmul_impl: str = "xla"   # of the LM head; ``layers.use_out_in_kernels`` selects it

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.model = Qwen2Model(config, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else layers.linear(
        config.hidden_size, config.vocab_size, ("embed", "vocab"), use_bias=False, rngs=rngs,
        dtype=config.dtype, param_dtype=config.param_dtype)

  def lm_head_kernel(self) -> jax.Array:
    """[hidden, vocab] output projection (the transposed embedding when tied)."""
    if self.lm_head is None:
      return self.model.embed_tokens.embedding[...].T
    return self.lm_head.in_out_kernel()

  def output_kernel(self, start: int = 0, stop: int | None = None) -> tuple[jax.Array, bool]:
    """(LM-head kernel of vocab ids [start, stop), whether it is stored [out, in]).

    A sampler restricted to some ids (MUSE-VL's visual ids) slices it once, outside
    its decode loop, and passes it to ``logits`` at every step.
    """
    if self.lm_head is None:   # the embedding is [vocab, hidden]: an [out, in] kernel
      kernel, out_in = self.model.embed_tokens.embedding[...], True
    else:
      kernel, out_in = self.lm_head.kernel[...], self.lm_head.kernel_out_in
    if start or stop is not None:
      kernel = kernel[start:stop] if out_in else kernel[:, start:stop]
    return kernel, out_in

  def logits(self, hidden: jax.Array,
             output_kernel: tuple[jax.Array, bool] | None = None) -> jax.Array:
    """Logits [..., vocab] (float32), or over the ids of ``output_kernel`` when given."""
    kernel, out_in = output_kernel or self.output_kernel()
    rows = hidden.reshape(-1, hidden.shape[-1]).astype(self.config.dtype)
    logits = layers.matmul(rows, kernel.astype(self.config.dtype), kernel_out_in=out_in,
                           preferred_element_type=jnp.float32, impl=self.matmul_impl)
    return logits.reshape(*hidden.shape[:-1], logits.shape[-1])

  def hidden_states(self, ids: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states [B, T, hidden]; the trainer applies a chunked LM-head loss."""
    if positions is None:
      positions = (segment_positions(segment_ids) if segment_ids is not None else
                   jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape))
    mask = attention.SelfMask(causal=True, segment_ids=segment_ids, positions=positions)
    return self.model(ids, positions, mask)[0]

  def __call__(self, ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    return self.logits(self.hidden_states(ids, positions, segment_ids))

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    c = self.config
    shape = (batch, c.num_kv_heads, max_len, c.kv_dim)
    dtype = dtype or c.dtype
    if stack.is_scanned(self.model.layers):
      keys = values = jnp.zeros((c.num_layers, *shape), dtype)
    else:
      keys = values = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))
    return KVCache(
        keys=keys,
        values=values,
        positions=jnp.zeros((batch, max_len), jnp.int32),
        valid=jnp.zeros((batch, max_len), jnp.int32),
        next_positions=jnp.zeros((batch,), jnp.int32),
        index=jnp.zeros((), jnp.int32))

  def extend(self, ids: jax.Array, cache: KVCache,
             valid: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Appends tokens [B, T] to the cache; returns their hidden states and the new cache.

    ``valid`` [B, T] (default all True) marks real tokens; False marks left padding,
    which takes no position and is never attended to. The caller keeps
    ``cache.index + T <= cache.max_len``.
    """
    b, t = ids.shape
    valid = jnp.ones((b, t), jnp.int32) if valid is None else valid.astype(jnp.int32)
    positions = cache.next_positions[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    zero = jnp.zeros((), jnp.int32)
    kv_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (zero, cache.index))
    kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (zero, cache.index))
    mask = attention.attention_mask(positions, kv_positions, valid, kv_valid, causal=True)
    hidden, (keys, values) = self.model(ids, positions, mask, cache)
    cache = KVCache(keys=keys, values=values, positions=kv_positions, valid=kv_valid,
                    next_positions=cache.next_positions + jnp.sum(valid, axis=1),
                    index=cache.index + t)
    return hidden, cache

  def prefill(self, ids: jax.Array, cache: KVCache,
              valid: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Runs a (left-padded) prompt through the cache; returns last-token logits [B, V]."""
    hidden, cache = self.extend(ids, cache, valid)
    return self.logits(hidden[:, -1]), cache

  def decode_step(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One new token per row [B] -> its logits [B, V] and the updated cache."""
    hidden, cache = self.extend(tokens[:, None], cache)
    return self.logits(hidden[:, 0]), cache


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Samples ids [B] from logits [B, V] with temperature, top-k (0 = off) and top-p."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p"))
def _generate(graphdef, state, prompt_ids, prompt_valid, rng, eos_id, *, max_new_tokens,
              temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_ids.shape

  def choose(logits, key, done):
    if temperature == 0.0:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      token = sample_logits(logits, key, temperature, top_k, top_p)
    token = jnp.where(done, eos_id, token)
    return token, done | (token == eos_id)

  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.prefill(prompt_ids, cache, prompt_valid)
  keys = jax.random.split(rng, max_new_tokens)
  first, done = choose(logits, keys[0], jnp.zeros((batch,), bool))

  def step(carry, key):
    token, cache, done = carry
    logits, cache = model.decode_step(token, cache)
    new_token, done = choose(logits, key, done)
    return (new_token, cache, done), new_token

  _, rest = jax.lax.scan(step, (first, cache, done), keys[1:])
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: Qwen2ForCausalLM, prompt_ids: jax.Array, max_new_tokens: int, *,
             prompt_valid: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, rng: jax.Array | None = None,
             eos_id: int | None = None) -> jax.Array:
  """Generates ``max_new_tokens`` ids [B, N] after left-padded prompts, in one jitted loop.

  ``temperature`` 0 is greedy. After ``eos_id`` a row keeps emitting ``eos_id``
  (a traced value: changing it does not recompile).
  """
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  if prompt_valid is None:
    prompt_valid = jnp.ones(prompt_ids.shape, jnp.int32)
  eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)   # -1 never matches
  return _generate(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), prompt_valid, rng, eos,
                   max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p))
