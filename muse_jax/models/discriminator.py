"""PatchGAN discriminator (pix2pix NLayerDiscriminator, as LlamaGen uses).

4x4 convs, LeakyReLU(0.2), channels ndf * (1, 2, 4, 8), stride 2 for all but the
last two convs; outputs one logit per overlapping patch. BatchNorm is replaced by
GroupNorm: its statistics are per example, so data-parallel sharding, gradient
accumulation and batch size changes cannot alter the function.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from muse_jax.models import layers


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  ndf: int = 64
  n_layers: int = 3
  norm_groups: int = 32
  dtype: str = "float32"
  param_dtype: str = "float32"


class PatchGAN(nnx.Module):
  """Images NHWC in [-1, 1] -> patch logits [B, h', w', 1]."""

  def __init__(self, cfg: DiscriminatorConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    init = nnx.initializers.normal(0.02)   # pix2pix weights_init
    self.dtype = cfg.dtype
    self.conv_in = layers.conv(3, cfg.ndf, 4, strides=2, padding=1, kernel_init=init, **kw)
    convs, norms, ch = [], [], cfg.ndf
    for n in range(1, cfg.n_layers + 1):
      out = cfg.ndf * min(2 ** n, 8)
      stride = 2 if n < cfg.n_layers else 1
      convs.append(layers.conv(ch, out, 4, strides=stride, padding=1, use_bias=False,
                               kernel_init=init, **kw))
      norms.append(layers.group_norm(out, num_groups=cfg.norm_groups, **kw))
      ch = out
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.conv_out = layers.conv(ch, 1, 4, padding=1, kernel_init=init, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.leaky_relu(self.conv_in(x.astype(self.dtype)), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      x = layers.constrain(jax.nn.leaky_relu(norm(conv(x)), 0.2), "batch", "spatial", "spatial", "act_channels")
    return self.conv_out(x).astype(jnp.float32)
