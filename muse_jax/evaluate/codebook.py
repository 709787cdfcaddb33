"""Codebook utilisation and perplexity over a whole dataset.

Counts are accumulated over every batch (not a moving window), so the figures
describe the tokenizer on the dataset: ``utilisation`` is the fraction of codes
used at least once, ``perplexity`` is exp of the entropy of the code frequencies
(= the codebook size when all codes are equally used). The tokenizer stage can
keep one ``CodebookUsage`` per eval and ``merge`` hosts' counts.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from muse_jax.evaluate import progress as progress_lib


class CodebookUsage:

  def __init__(self, codebook_size: int):
    if codebook_size < 1:
      raise ValueError(f"codebook_size must be positive, got {codebook_size}")
    self.counts = np.zeros(codebook_size, np.int64)

  @property
  def codebook_size(self) -> int:
    return self.counts.shape[0]

  def add(self, codes: np.ndarray) -> None:
    """Codes of any shape (e.g. [B, h, w]); every entry is one token."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(f"codes outside [0, {self.codebook_size}): min {codes.min()}, "
                       f"max {codes.max()}")
    self.counts += np.bincount(codes, minlength=self.codebook_size)

  def merge(self, other: CodebookUsage) -> None:
    if other.codebook_size != self.codebook_size:
      raise ValueError(f"codebook sizes differ: {self.codebook_size} vs {other.codebook_size}")
    self.counts += other.counts

  def summary(self) -> dict[str, float]:
    tokens = int(self.counts.sum())
    if not tokens:
      raise ValueError("no codes counted")
    p = self.counts[self.counts > 0] / tokens
    used = int(np.count_nonzero(self.counts))
    return {"tokens": tokens, "codebook_size": self.codebook_size, "used_codes": used,
            "utilisation": used / self.codebook_size,
            "perplexity": float(np.exp(-np.sum(p * np.log(p))))}

  def histogram_image(self, height: int = 128, width: int | None = None) -> np.ndarray:
    """uint8 [height, width, 3] bar chart of the counts by code id (ids binned into
    ``width`` columns, default min(codebook size, 1024)); bar heights are log(1 + count)
    so rarely used codes stay visible; unused bins are red along the bottom row."""
    width = width or min(self.codebook_size, 1024)
    edges = np.linspace(0, self.codebook_size, width + 1).astype(np.int64)
    binned = np.add.reduceat(self.counts, edges[:-1]) if width <= self.codebook_size else \
        self.counts[np.minimum(np.arange(width) * self.codebook_size // width,
                               self.codebook_size - 1)]
    heights = np.log1p(binned.astype(np.float64))
    heights = np.round(heights / max(heights.max(), 1e-12) * height).astype(np.int64)
    image = np.full((height, width, 3), 255, np.uint8)
    rows = np.arange(height)[:, None]
    bars = rows >= (height - heights)[None, :]
    image[bars] = (40, 90, 200)
    image[-1, binned == 0] = (220, 30, 30)
    return image


def dataset_usage(code_batches: Iterable[np.ndarray], codebook_size: int, *,
                  total: int | None = None, show_progress: bool = True) -> CodebookUsage:
  """Counts over every batch of codes (e.g. the tokenizer's ids for a dataset)."""
  usage = CodebookUsage(codebook_size)
  for codes in progress_lib.progress(code_batches, total=total, desc="codebook usage",
                                     unit="batch", enabled=show_progress):
    usage.add(codes)
  return usage
