"""Frechet Inception Distance: rFID (reconstructions vs their inputs) and generation FID.

Features are the 2048-d pool features of the FID Inception
(``muse_jax.models.inception``), computed in fixed-shape jitted batches. Their
statistics are accumulated in float64 (count, sum, sum of outer products), so a
dataset of any size costs 2048 x 2048 doubles, not its features.

The distance is ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)``; the
trace of the matrix square root is taken from the eigenvalues of the symmetric
``S1^1/2 S2 S1^1/2`` (same spectrum as ``S1 S2``), so no ``scipy.linalg.sqrtm``
and none of its complex round-off.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable

import jax
import numpy as np
from etils import epath
from flax import nnx

from muse_jax.evaluate import images as image_lib
from muse_jax.evaluate import progress as progress_lib
from muse_jax.evaluate import quality
from muse_jax.models import inception


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, factor1: np.ndarray | None = None,
                     factor2: np.ndarray | None = None) -> float:
  """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  ``factor1`` (or ``factor2``), A with sigma1 = A A^T ([dim, n], n < dim: few
  samples), is optional: S1 S2 and A^T S2 A (n x n, symmetric) share their nonzero
  eigenvalues, which spares a 2048 x 2048 eigensolve of a singular matrix (LAPACK's
  slow case).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
  if factor1 is not None:
    inner = factor1.T @ sigma2 @ factor1
  elif factor2 is not None:
    inner = factor2.T @ sigma1 @ factor2
  else:
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
  values = np.linalg.eigvalsh((inner + inner.T) / 2)
  trace_sqrt = np.sum(np.sqrt(np.clip(values, 0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


@dataclasses.dataclass
class FeatureStats:
  """Running mean and covariance of feature vectors (float64 sums).

  While there are no more vectors than dimensions the vectors are kept as well
  (no more memory than the sums): their covariance is then singular, and ``fid``
  passes them to ``frechet_distance`` as its factor.
  """
  dim: int = inception.FEATURES
  count: int = 0
  total: np.ndarray | None = None
  outer: np.ndarray | None = None
  rows: list[np.ndarray] | None = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros(self.dim, np.float64)
      self.outer = np.zeros((self.dim, self.dim), np.float64)

  def add(self, features: np.ndarray) -> None:
    features = np.asarray(features, np.float64)
    self.count += features.shape[0]
    self.total += features.sum(0)
    self.outer += features.T @ features
    self._keep_rows([features])

  def merge(self, other: FeatureStats) -> None:
    self.count += other.count
    self.total += other.total
    self.outer += other.outer
    self._keep_rows(other.rows)

  def _keep_rows(self, rows: list[np.ndarray] | None) -> None:
    if self.rows is not None and rows is not None and self.count <= self.dim:
      self.rows.extend(rows)
    else:
      self.rows = None

  def factor(self) -> np.ndarray | None:
    """A with covariance = A A^T ([dim, count]) while the vectors are kept, else None."""
    if self.rows is None or self.count < 2:
      return None
    centred = np.concatenate(self.rows) - self.mean
    return centred.T / np.sqrt(self.count - 1)

  @property
  def mean(self) -> np.ndarray:
    return self.total / self.count

  @property
  def covariance(self) -> np.ndarray:
    """Unbiased (``np.cov``'s), as pytorch-fid uses."""
    if self.count < 2:
      raise ValueError(f"FID needs at least 2 images per set, got {self.count}")
    mean = self.mean
    return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

  def save(self, path: str | epath.PathLike) -> None:
    """``mu`` and ``sigma`` (pytorch-fid's .npz keys) plus the count."""
    with epath.Path(path).open("wb") as f:
      np.savez(f, mu=self.mean, sigma=self.covariance, count=self.count)


def fid(a: FeatureStats, b: FeatureStats) -> float:
  return frechet_distance(a.mean, a.covariance, b.mean, b.covariance, a.factor(), b.factor())


def load_gaussian(path: str | epath.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from an .npz written by ``FeatureStats.save`` or by pytorch-fid
  (``--save-stats``), e.g. a dataset's reference statistics computed once."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist (FID statistics .npz with mu and sigma)")
  with path.open("rb") as f:
    data = np.load(f)
    if "mu" not in data or "sigma" not in data:
      raise ValueError(f"{path} lacks \"mu\" / \"sigma\": not FID statistics")
    return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _pool_features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(images)


class InceptionFeatures:
  """Jitted ``FIDInceptionV3`` over fixed-shape batches: one compile per image size
  (shared by every instance, e.g. the reference and the generated set)."""

  def __init__(self, model: inception.FIDInceptionV3, batch_size: int = 50):
    self._graphdef, self._state = nnx.split(model)
    self.batch_size = batch_size

  def __call__(self, batch: image_lib.Batch) -> np.ndarray:
    """[valid, 2048] features of the real rows of ``batch``."""
    return np.asarray(_pool_features(self._graphdef, self._state, batch.images))[:batch.valid]


def feature_stats(images: Iterable[np.ndarray], features: InceptionFeatures, *,
                  total: int | None = None, desc: str = "features",
                  show_progress: bool = True) -> FeatureStats:
  """Statistics of the features of equally sized [-1, 1] HWC images."""
  stats = FeatureStats()
  for batch in image_lib.batches(
      progress_lib.progress(images, total=total, desc=desc, enabled=show_progress),
      features.batch_size):
    stats.add(features(batch))
  return stats


def folder_stats(folder: str | epath.PathLike, features: InceptionFeatures, *,
                 size: int = inception.INPUT_SIZE, show_progress: bool = True) -> FeatureStats:
  """Statistics of every image in a folder, each centre-cropped and resized to ``size``."""
  paths = image_lib.list_images(folder)
  return feature_stats(image_lib.load_all(paths, size), features, total=len(paths),
                       desc=f"FID features {epath.Path(folder).name}",
                       show_progress=show_progress)


def rfid(images: Iterable[np.ndarray], reconstruct: Callable[[np.ndarray], np.ndarray],
         features: InceptionFeatures, *, total: int | None = None,
         show_progress: bool = True) -> dict[str, float]:
  """rFID of a tokenizer, with the mean PSNR / SSIM of the same reconstructions.

  ``reconstruct`` maps a fixed-shape [batch_size, H, W, 3] batch in [-1, 1] to its
  reconstruction (e.g. the tokenizer stage's jitted encode -> quantise -> decode).
  """
  inputs, outputs, pairs = FeatureStats(), FeatureStats(), quality.PairMetrics()
  for batch in image_lib.batches(
      progress_lib.progress(images, total=total, desc="rFID", enabled=show_progress),
      features.batch_size):
    recon = np.asarray(reconstruct(batch.images), np.float32)
    if recon.shape != batch.images.shape:
      raise ValueError(f"reconstruct returned shape {recon.shape} for a batch of "
                       f"{batch.images.shape}")
    inputs.add(features(batch))
    outputs.add(features(image_lib.Batch(recon, batch.valid)))
    pairs.add(batch.images, recon, batch.valid)
  return {"rfid": fid(inputs, outputs), **pairs.summary(), "images": inputs.count}
