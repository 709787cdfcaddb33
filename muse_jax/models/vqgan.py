"""LlamaGen VQ-16 convolutional pixel decoder (VQGAN family).

Latent grid [B, h, w, z_channels] -> image [B, h*f, w*f, 3] with f = 2**(len(ch_mult)-1).
Structure: conv_in; middle res-attn-res block; per level (lowest resolution first)
``num_res_blocks`` res blocks (+ self-attention at the lowest level only), then
nearest x2 upsampling + 3x3 conv except after the last level; GroupNorm, swish,
conv_out. The paper's image decoder "remains the same ConvNet as the VQGAN
decoder [LlamaGen]".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from muse_jax.kernels import attention
from muse_jax.models import layers


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  z_channels: int = 256
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 3           # LlamaGen decoder: encoder's 2 + 1
  norm_groups: int = 32
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def upsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


class ResBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, groups: int, **kw):
    self.norm1 = layers.group_norm(cin, num_groups=groups, **kw)
    self.conv1 = layers.conv(cin, cout, 3, **kw)
    self.norm2 = layers.group_norm(cout, num_groups=groups, **kw)
    self.conv2 = layers.conv(cout, cout, 3, **kw)
    self.shortcut = layers.conv(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.swish(self.norm1(x)))
    h = self.conv2(jax.nn.swish(self.norm2(h)))
    return layers.constrain((x if self.shortcut is None else self.shortcut(x)) + h, "batch", "spatial", "spatial", "act_channels")


class AttnBlock(nnx.Module):
  """Single-head spatial self-attention with 1x1-conv projections."""

  def __init__(self, ch: int, groups: int, **kw):
    self.norm = layers.group_norm(ch, num_groups=groups, **kw)
    self.q = layers.conv(ch, ch, 1, **kw)
    self.k = layers.conv(ch, ch, 1, **kw)
    self.v = layers.conv(ch, ch, 1, **kw)
    self.proj_out = layers.conv(ch, ch, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    n = self.norm(x)
    flat = lambda t: t.reshape(b, h * w, 1, c)
    out = attention.dot_product_attention(flat(self.q(n)), flat(self.k(n)), flat(self.v(n)))
    return layers.constrain(x + self.proj_out(out.reshape(b, h, w, c)), "batch", "spatial", "spatial", "act_channels")


class Upsample(nnx.Module):

  def __init__(self, ch: int, **kw):
    self.conv = layers.conv(ch, ch, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    return layers.constrain(x, "batch", "spatial", "spatial", "act_channels")


class DecoderLevel(nnx.Module):

  def __init__(self, cin: int, cout: int, cfg: DecoderConfig, *, attend: bool, upsample: bool,
               **kw):
    blocks, attns = [], []
    for i in range(cfg.num_res_blocks):
      blocks.append(ResBlock(cin if i == 0 else cout, cout, cfg.norm_groups, **kw))
      if attend:
        attns.append(AttnBlock(cout, cfg.norm_groups, **kw))
    self.blocks = nnx.List(blocks)
    self.attns = nnx.List(attns)
    self.upsample = Upsample(cout, **kw) if upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, block in enumerate(self.blocks):
      x = block(x)
      if self.attns:
        x = self.attns[i](x)
    return x if self.upsample is None else self.upsample(x)


class PixelDecoder(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.dtype = cfg.dtype
    block_in = cfg.ch * cfg.ch_mult[-1]
    self.conv_in = layers.conv(cfg.z_channels, block_in, 3, **kw)
    self.mid_block1 = ResBlock(block_in, block_in, cfg.norm_groups, **kw)
    self.mid_attn = AttnBlock(block_in, cfg.norm_groups, **kw)
    self.mid_block2 = ResBlock(block_in, block_in, cfg.norm_groups, **kw)
    levels = []
    n = len(cfg.ch_mult)
    for i, mult in enumerate(reversed(cfg.ch_mult)):
      block_out = cfg.ch * mult
      levels.append(DecoderLevel(block_in, block_out, cfg, attend=(i == 0),
                                 upsample=(i < n - 1), **kw))
      block_in = block_out
    self.levels = nnx.List(levels)
    self.norm_out = layers.group_norm(block_in, num_groups=cfg.norm_groups, **kw)
    self.conv_out = layers.conv(block_in, 3, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.conv_in(z.astype(self.dtype))
    x = self.mid_block2(self.mid_attn(self.mid_block1(x)))
    for level in self.levels:
      x = level(x)
    return self.conv_out(jax.nn.swish(self.norm_out(x)))
