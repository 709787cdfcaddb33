"""SigLIP vision tower (ViT without class token), laid out like Hugging Face.

Attribute paths mirror ``transformers.SiglipVisionModel.vision_model`` so that
conversion is mechanical: ``embeddings.patch_embedding`` (conv, HWIO here, OIHW
in torch), ``embeddings.position_embedding``, ``encoder.layers[i].self_attn.
{q,k,v,out}_proj``, ``layer_norm1/2``, ``mlp.fc1/fc2``, ``post_layernorm``.
Linear kernels are the transposes of torch weights. The attention-pooling head
of SigLIP is not part of the tower: the SDE tokenizer uses per-patch features
(``last_hidden_state``).

The same ``VisionTransformer`` body also serves as the SDE semantic decoder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from muse_jax.kernels import attention as attention_lib
from muse_jax.models import layers
from muse_jax.models import stack


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"          # compute dtype
  param_dtype: str = "float32"
  attention_impl: str = "auto"     # kernels/attention.py: auto | xla | splash | cudnn
  attention_block_q: int = 512     # splash tiles (multiples of 128)
  attention_block_kv: int = 512
  scan_layers: bool = False        # stacked layers run by lax.scan (models/stack.py)
  remat_policy: str = "none"       # what each layer keeps for backward (stack.REMAT_POLICIES)

  @property
  def attention(self) -> attention_lib.Options:
    return attention_lib.Options(self.attention_impl, self.attention_block_q,
                                 self.attention_block_kv)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid


class Attention(nnx.Module):
  """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32,
               attention: attention_lib.Options = attention_lib.Options()):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.attention = attention
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = layers.linear(width, width, ("embed", "heads"), **kw)
    self.k_proj = layers.linear(width, width, ("embed", "heads"), **kw)
    self.v_proj = layers.linear(width, width, ("embed", "heads"), **kw)
    self.out_proj = layers.linear(width, width, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, c = x.shape
    split = lambda t: t.reshape(b, n, self.num_heads, c // self.num_heads)
    q = split(self.q_proj(x))
    out = attention_lib.dot_product_attention(
        q, split(self.k_proj(x)), split(self.v_proj(x)), options=self.attention,
        sharding=layers.placement(("batch", "seq", "heads", None), q.shape))
    return self.out_proj(out.reshape(b, n, c))


class Mlp(nnx.Module):

  def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = layers.linear(width, mlp_dim, ("embed", "mlp"), **kw)
    self.fc2 = layers.linear(mlp_dim, width, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))  # gelu_pytorch_tanh


class EncoderLayer(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, eps: float, *,
               rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
               attention: attention_lib.Options = attention_lib.Options()):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.layer_norm1 = layers.layer_norm(width, eps=eps, **kw)
    self.self_attn = Attention(width, num_heads, attention=attention, **kw)
    self.layer_norm2 = layers.layer_norm(width, eps=eps, **kw)
    self.mlp = Mlp(width, mlp_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + checkpoint_name(self.self_attn(self.layer_norm1(x)), stack.ATTN_OUT)
    x = x + checkpoint_name(self.mlp(self.layer_norm2(x)), stack.MLP_OUT)
    return layers.constrain(x, "batch", "seq", "act_embed")


class Encoder(nnx.Module):
  """``depth`` pre-norm blocks; ``scan_layers`` / ``remat_policy`` as in ``SiglipConfig``."""

  def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, eps: float, *,
               rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
               attention: attention_lib.Options = attention_lib.Options(),
               scan_layers: bool = False, remat_policy: str = "none"):
    stack.check_policy(remat_policy)
    self.remat_policy = remat_policy
    self.layers = stack.build(
        lambda r: EncoderLayer(width, num_heads, mlp_dim, eps, rngs=r, dtype=dtype,
                               param_dtype=param_dtype, attention=attention),
        depth, scan_layers, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return stack.run(self.layers, lambda layer, x, _: (layer(x), None), x,
                     remat_policy=self.remat_policy)[0]


class PatchEmbeddings(nnx.Module):
  """Non-overlapping patch conv + learned position table (no class token).

  As in Hugging Face, pixels past the last whole patch are dropped (SigLIP
  SO400M/14 at 384 px sees 27 x 14 = 378 of them).
  """

  def __init__(self, config: SiglipConfig, *, rngs: nnx.Rngs):
    p = config.patch_size
    self.patch_embedding = layers.conv(
        3, config.width, p, strides=p, padding="VALID", rngs=rngs,
        dtype=config.dtype, param_dtype=config.param_dtype)
    self.position_embedding = layers.embed(
        config.num_patches, config.width, ("positions", "embed"), rngs=rngs,
        dtype=config.dtype, param_dtype=config.param_dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    x = self.patch_embedding(pixels)                     # [B, g, g, C]
    b, gh, gw, c = x.shape
    x = x.reshape(b, gh * gw, c)
    x = x + self.position_embedding.embedding[...].astype(x.dtype)[None]
    return layers.constrain(x, "batch", "seq", "act_embed")


class SiglipVisionTower(nnx.Module):
  """Pixels NHWC in [-1, 1] -> ``last_hidden_state`` [B, num_patches, width]."""

  def __init__(self, config: SiglipConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.embeddings = PatchEmbeddings(config, rngs=rngs)
    self.encoder = Encoder(config.width, config.depth, config.num_heads, config.mlp_dim,
                           config.layer_norm_eps, attention=config.attention,
                           scan_layers=config.scan_layers, remat_policy=config.remat_policy,
                           **kw)
    self.post_layernorm = layers.layer_norm(config.width, eps=config.layer_norm_eps, **kw)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    expected = (self.config.image_size, self.config.image_size, 3)
    if pixels.shape[1:] != expected:
      raise ValueError(f"SigLIP tower expects images of shape [B, {expected}], got "
                       f"{pixels.shape}")
    x = self.embeddings(pixels.astype(self.config.dtype))
    return self.post_layernorm(self.encoder(x))
