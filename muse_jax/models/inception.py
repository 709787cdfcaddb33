"""Inception-v3 pool features for FID: the "FID Inception" of ``pytorch-fid``.

This is the network of TensorFlow's 2015 FID graph as ``pytorch-fid`` ports it,
not torchvision's Inception-v3: its mixed blocks average-pool without counting
the padding (``count_include_pad=False``) and the last block max-pools in its
pool branch. Inputs are resized to 299 x 299 (bilinear, half-pixel centres, no
antialiasing, like ``F.interpolate(..., align_corners=False)``) and the output is
the 2048-d average of the last block, the features FID compares.

Module and parameter names follow the public PyTorch file
(``pt_inception-2015-12-05-*.pth``) so conversion is mechanical:
``Mixed_5b.branch1x1`` here is ``Mixed_5b.branch1x1.{conv,bn}`` there. Batch
norm is folded at call time from its four stored tensors; all of them are
``nnx.Param`` because this network is only ever a fixed function of converted
weights (it is never trained).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FEATURES = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
BN_EPS = 1e-3


class ConvBN(nnx.Module):
  """Bias-free conv, batch norm (running statistics), ReLU: torchvision's BasicConv2d."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], *,
               rngs: nnx.Rngs, stride: int = 1, padding: int | tuple[int, int] = 0):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.stride, self.padding = stride, ((ph, ph), (pw, pw))
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
    self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_ch, out_ch), jnp.float32))
    self.scale = nnx.Param(jnp.ones((out_ch,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    self.mean = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    self.var = nnx.Param(jnp.ones((out_ch,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    multiplier = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return jax.nn.relu(y * multiplier + (self.bias[...] - self.mean[...] * multiplier))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3 x 3 max pool; padded cells never win."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_excluding_pad(x: jax.Array) -> jax.Array:
  """3 x 3, stride 1, padding 1 average over the cells inside the image only."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return total / count


class InceptionA(nnx.Module):

  def __init__(self, in_ch: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = ConvBN(in_ch, 64, 1, rngs=rngs)
    self.branch5x5_1 = ConvBN(in_ch, 48, 1, rngs=rngs)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(in_ch, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = ConvBN(in_ch, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    pool = self.branch_pool(avg_pool_excluding_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nnx.Module):
  """Grid reduction 35 -> 17 (Mixed_6a)."""

  def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
    self.branch3x3 = ConvBN(in_ch, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(in_ch, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  """Factorised 7 x 7 convolutions (Mixed_6b..6e)."""

  def __init__(self, in_ch: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))   # (kernel, padding)
    self.branch1x1 = ConvBN(in_ch, 192, 1, rngs=rngs)
    self.branch7x7_1 = ConvBN(in_ch, c7, 1, rngs=rngs)
    self.branch7x7_2 = ConvBN(c7, c7, row[0], padding=row[1], rngs=rngs)
    self.branch7x7_3 = ConvBN(c7, 192, col[0], padding=col[1], rngs=rngs)
    self.branch7x7dbl_1 = ConvBN(in_ch, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = ConvBN(c7, c7, col[0], padding=col[1], rngs=rngs)
    self.branch7x7dbl_3 = ConvBN(c7, c7, row[0], padding=row[1], rngs=rngs)
    self.branch7x7dbl_4 = ConvBN(c7, c7, col[0], padding=col[1], rngs=rngs)
    self.branch7x7dbl_5 = ConvBN(c7, 192, row[0], padding=row[1], rngs=rngs)
    self.branch_pool = ConvBN(in_ch, 192, 1, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = conv(d)
    pool = self.branch_pool(avg_pool_excluding_pad(x))
    return jnp.concatenate([self.branch1x1(x), b7, d, pool], axis=-1)


class InceptionD(nnx.Module):
  """Grid reduction 17 -> 8 (Mixed_7a)."""

  def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = ConvBN(in_ch, 192, 1, rngs=rngs)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = ConvBN(in_ch, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """Expanded filter banks (Mixed_7b, 7c). The FID variant pools differently per block:
  Mixed_7b averages (padding excluded), Mixed_7c takes the max."""

  def __init__(self, in_ch: int, *, max_pool_branch: bool, rngs: nnx.Rngs):
    self.max_pool_branch = max_pool_branch
    self.branch1x1 = ConvBN(in_ch, 320, 1, rngs=rngs)
    self.branch3x3_1 = ConvBN(in_ch, 384, 1, rngs=rngs)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(in_ch, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = ConvBN(in_ch, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = max_pool(x, 1, padding=1) if self.max_pool_branch else avg_pool_excluding_pad(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
        self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
  """``__call__(images) -> [B, 2048]`` pool features of NHWC images in [-1, 1], any size.

  ``input_size`` is what images are resized to: 299 for FID; smaller (down to 75,
  where the last grid is still 1 x 1) only makes tests cheap.
  """

  def __init__(self, *, rngs: nnx.Rngs, input_size: int = INPUT_SIZE):
    if input_size < MIN_INPUT_SIZE:
      raise ValueError(f"input_size {input_size} is below Inception-v3's minimum {MIN_INPUT_SIZE}")
    self.input_size = input_size
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    size = self.input_size
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=False)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, 2)))
    x = max_pool(x, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))
