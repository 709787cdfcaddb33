"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant.

Layout mirrors the public PyTorch files so conversion is mechanical:
``features[i]`` is torchvision ``vgg16().features[VGG16_CONV_INDICES[i]]`` (kernel
HWIO here, OIHW in torch) and ``lin{k}`` is lpips' ``lin{k}.model.1`` (a bias-free
1x1 conv, [1, 1, C, 1] here, [1, C, 1, 1] in torch). The trainer keeps LPIPS
outside the trained state: it is a fixed function of converted weights, or of a
seeded random init (announced in the log) when no weights are given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from muse_jax.models import layers

# torchvision vgg16.features: index of each conv, its channels, and whether the
# ReLU after it is an LPIPS tap (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_TAP_AFTER = (1, 3, 6, 9, 12)          # positions in the conv list
_POOL_AFTER = (1, 3, 6, 9)             # 2x2 max-pool follows these convs
TAP_CHANNELS = (64, 128, 256, 512, 512)

# lpips.ScalingLayer: inputs in [-1, 1] are standardised with ImageNet statistics.
_SHIFT = jnp.array([-0.030, -0.088, -0.188], jnp.float32)
_SCALE = jnp.array([0.458, 0.448, 0.450], jnp.float32)


class LPIPS(nnx.Module):
  """``__call__(x, y) -> [B]`` perceptual distance of two NHWC batches in [-1, 1].

  ``width_divisor`` > 1 narrows every VGG layer; only the CPU demos use it (the
  published weights need 1) so that a laptop run is not dominated by VGG16.
  """

  def __init__(self, *, rngs: nnx.Rngs, width_divisor: int = 1, dtype=None,
               param_dtype=jnp.float32):
    convs, in_ch = [], 3
    for out_ch in _VGG16_CHANNELS:
      out_ch //= width_divisor
      convs.append(layers.conv(in_ch, out_ch, 3, padding=1, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype))
      in_ch = out_ch
    self.features = nnx.List(convs)
    for k, ch in enumerate(c // width_divisor for c in TAP_CHANNELS):
      setattr(self, f"lin{k}", layers.conv(
          ch, 1, 1, padding=0, use_bias=False, rngs=rngs, dtype=dtype,
          param_dtype=param_dtype,
          kernel_init=nnx.initializers.uniform(2.0 / ch)))  # positive, like trained heads

  def taps(self, x: jax.Array) -> list[jax.Array]:
    """The five unit-normalised VGG activations LPIPS compares."""
    x = (x.astype(jnp.float32) - _SHIFT) / _SCALE
    out = []
    for i, conv in enumerate(self.features):
      x = layers.constrain(jax.nn.relu(conv(x)), "batch", "spatial", "spatial", "act_channels")
      if i in _TAP_AFTER:
        norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True))
        out.append(x / (norm + 1e-10))
      if i in _POOL_AFTER:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return out

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    total = 0.0
    for k, (fx, fy) in enumerate(zip(self.taps(x), self.taps(y))):
      head = getattr(self, f"lin{k}")
      total = total + jnp.mean(head(jnp.square(fx - fy)), axis=(1, 2, 3))
    return total
