"""Loss terms of the tokenizer stage and the image-quality metrics of its evals.

All return float32 scalars (means over the batch) unless stated otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error (LlamaGen's reconstruction loss)."""
  return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def cosine_distance(pred: jax.Array, target: jax.Array, eps: float = 1e-8) -> jax.Array:
  """L_sem = mean over tokens of 1 - cos(pred, target) along the last axis."""
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  dot = jnp.sum(pred * target, -1)
  norms = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1)
  return jnp.mean(1.0 - dot / jnp.maximum(norms, eps))


def hinge_discriminator(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) +
                jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_generator(logits_fake: jax.Array) -> jax.Array:
  """-E[D(G(z))]: the generator's side of the hinge GAN."""
  return -jnp.mean(logits_fake)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image PSNR in dB for images in [-1, 1] (data range 2), shape [B]."""
  mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> jax.Array:
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-0.5 * jnp.square(r / sigma))
  return g / jnp.sum(g)


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5), mean over channels, [B].

  Images in [-1, 1] (data range 2); statistics over the valid region, as
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  use_sample_covariance=False, data_range=2)``.
  """
  x = jnp.clip(x.astype(jnp.float32), -1, 1)
  y = jnp.clip(y.astype(jnp.float32), -1, 1)
  c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
  g = _gaussian_window()

  def blur(img):  # separable valid filtering of [B, H, W, C]
    c = img.shape[-1]
    kh = jnp.tile(g[:, None, None, None], (1, 1, 1, c))
    kw = jnp.tile(g[None, :, None, None], (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    out = jax.lax.conv_general_dilated(img, kh, (1, 1), "VALID", dimension_numbers=dn,
                                       feature_group_count=c)
    return jax.lax.conv_general_dilated(out, kw, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c)

  mx, my = blur(x), blur(y)
  vx = blur(x * x) - mx * mx
  vy = blur(y * y) - my * my
  cxy = blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))
