"""Loss terms and image metrics on hand-computed cases; LPIPS identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from flax import nnx

from muse_jax.models import lpips as lpips_lib
from muse_jax.train import losses


def test_l2_hand_computed():
  x = jnp.array([[0.0, 1.0], [2.0, -1.0]])
  y = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  assert float(losses.l2(x, y)) == pytest.approx((1 + 0 + 4 + 1) / 4)


def test_cosine_distance_hand_computed():
  pred = jnp.array([[[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]]])
  target = jnp.array([[[0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]]])
  # cos = 0, 1, -1 -> 1 - cos = 1, 0, 2
  assert float(losses.cosine_distance(pred, target)) == pytest.approx(1.0)


def test_hinge_losses_hand_computed():
  real = jnp.array([2.0, 0.5, -1.0])     # relu(1 - real) = 0, 0.5, 2
  fake = jnp.array([-2.0, 0.0, 1.0])     # relu(1 + fake) = 0, 1, 2
  assert float(losses.hinge_discriminator(real, fake)) == pytest.approx(
      0.5 * (2.5 / 3 + 3 / 3))
  assert float(losses.hinge_generator(fake)) == pytest.approx(1.0 / 3)


def test_psnr_and_ssim_match_reference():
  metrics = references.require("skimage.metrics")
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.1, x.shape), -1, 1).astype(np.float32)
  for i in range(2):
    ref_psnr = metrics.peak_signal_noise_ratio(x[i], y[i], data_range=2.0)
    ref_ssim = metrics.structural_similarity(
        x[i], y[i], data_range=2.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False)
    assert float(losses.psnr(x, y)[i]) == pytest.approx(ref_psnr, rel=1e-4)
    assert float(losses.ssim(x, y)[i]) == pytest.approx(ref_ssim, abs=2e-3)
  assert float(losses.ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def lpips_model():
  return lpips_lib.LPIPS(rngs=nnx.Rngs(0), width_divisor=4)


def test_lpips_identity_symmetry_and_order(lpips_model):
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.uniform(k[0], (2, 32, 32, 3), minval=-1, maxval=1)
  noise = jax.random.normal(k[1], x.shape)
  y = jnp.clip(x + 0.5 * noise, -1, 1)
  z = jnp.clip(x + 0.05 * noise, -1, 1)
  np.testing.assert_allclose(np.asarray(lpips_model(x, x)), 0.0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(lpips_model(x, y)), np.asarray(lpips_model(y, x)),
                             rtol=1e-5)
  assert np.all(np.asarray(lpips_model(x, y)) > np.asarray(lpips_model(x, z)))
  assert np.all(np.asarray(lpips_model(x, z)) > 0)


def test_lpips_full_width_layout():
  model = nnx.eval_shape(lambda: lpips_lib.LPIPS(rngs=nnx.Rngs(0)))
  shapes = [tuple(c.kernel.shape) for c in model.features]
  assert shapes[0] == (3, 3, 3, 64) and shapes[-1] == (3, 3, 512, 512) and len(shapes) == 13
  assert [tuple(getattr(model, f"lin{k}").kernel.shape) for k in range(5)] == [
      (1, 1, c, 1) for c in lpips_lib.TAP_CHANNELS]
