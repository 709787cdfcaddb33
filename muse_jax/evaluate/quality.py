"""PSNR and SSIM of image pairs (``muse_jax.train.losses``, checked against scikit-image),
batched and jitted with fixed shapes; for folders, pairs are matched by file name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from muse_jax.evaluate import images as image_lib
from muse_jax.evaluate import progress as progress_lib
from muse_jax.train import losses


@jax.jit
def _psnr_ssim(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  return losses.psnr(x, y), losses.ssim(x, y)


class PairMetrics:
  """Sums of per-image PSNR and SSIM over any number of batches."""

  def __init__(self):
    self.count, self.psnr_sum, self.ssim_sum = 0, 0.0, 0.0

  def add(self, x: np.ndarray, y: np.ndarray, valid: int) -> None:
    psnr, ssim = _psnr_ssim(jnp.asarray(x), jnp.asarray(y))
    self.count += valid
    self.psnr_sum += float(np.sum(np.asarray(psnr)[:valid], dtype=np.float64))
    self.ssim_sum += float(np.sum(np.asarray(ssim)[:valid], dtype=np.float64))

  def summary(self) -> dict[str, float]:
    if not self.count:
      raise ValueError("no image pairs to compare")
    return {"psnr": self.psnr_sum / self.count, "ssim": self.ssim_sum / self.count}


def folders(reference: str | epath.PathLike, candidate: str | epath.PathLike, *, size: int,
            batch_size: int = 16, show_progress: bool = True) -> dict[str, float]:
  """Mean PSNR (dB) and SSIM of ``candidate/<name>`` against ``reference/<name>``,
  both centre-cropped and resized to ``size``."""
  refs = {p.stem: p for p in image_lib.list_images(reference)}
  cands = {p.stem: p for p in image_lib.list_images(candidate)}
  missing = sorted(set(refs) - set(cands))
  if missing:
    raise FileNotFoundError(f"{candidate} lacks {len(missing)} image(s) of {reference}, "
                            f"e.g. {missing[0]!r} (pairs are matched by file name)")
  names = sorted(refs)
  metrics = PairMetrics()
  ref_batches = image_lib.batches(image_lib.load_all([refs[n] for n in names], size), batch_size)
  cand_images = image_lib.load_all([cands[n] for n in names], size)
  for ref, cand in zip(ref_batches, image_lib.batches(
      progress_lib.progress(cand_images, total=len(names), desc="PSNR/SSIM",
                            enabled=show_progress), batch_size)):
    metrics.add(ref.images, cand.images, ref.valid)
  return {**metrics.summary(), "images": metrics.count}
