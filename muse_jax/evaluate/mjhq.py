"""Generation FID on MJHQ-30K: per category and overall.

The dataset's layout (as published):

  <mjhq_dir>/meta_data.json                    {"<id>": {"category": ..., "prompt": ...}, ...}
  <mjhq_dir>/mjhq30k_imgs/<category>/<id>.jpg  the reference images

Generated images are one file per prompt, named by id, in one folder
(``<generated_dir>/<id>.png`` or .jpg). Every image is centre-cropped and resized
to 299 x 299 (the FID Inception's input) before its features are taken.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np
from etils import epath

from muse_jax.evaluate import fid as fid_lib
from muse_jax.evaluate import images as image_lib
from muse_jax.evaluate import progress as progress_lib
from muse_jax.models import inception

META = "meta_data.json"
IMAGES = "mjhq30k_imgs"


@dataclasses.dataclass(frozen=True)
class Entry:
  id: str
  category: str
  prompt: str


def read_meta(mjhq_dir: str | epath.PathLike,
              categories: Sequence[str] | None = None) -> list[Entry]:
  """Entries sorted by id, optionally only some categories."""
  path = epath.Path(mjhq_dir) / META
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: --mjhq_dir must hold MJHQ-30K's {META}")
  meta = json.loads(path.read_text())
  entries = []
  for image_id, info in sorted(meta.items()):
    if "category" not in info or "prompt" not in info:
      raise ValueError(f"{path}: entry {image_id!r} lacks \"category\" or \"prompt\"")
    entries.append(Entry(image_id, info["category"], info["prompt"]))
  if categories:
    known = {e.category for e in entries}
    unknown = sorted(set(categories) - known)
    if unknown:
      raise ValueError(f"unknown MJHQ categories {unknown}; {path} has {sorted(known)}")
    entries = [e for e in entries if e.category in set(categories)]
  return entries


def reference_path(mjhq_dir: str | epath.PathLike, entry: Entry) -> epath.Path:
  return epath.Path(mjhq_dir) / IMAGES / entry.category / f"{entry.id}.jpg"


def generated_paths(generated_dir: str | epath.PathLike,
                    entries: Sequence[Entry]) -> list[epath.Path]:
  """The generated file of every entry; a missing one is an error naming it."""
  by_stem = {p.stem: p for p in image_lib.list_images(generated_dir)}
  missing = [e.id for e in entries if e.id not in by_stem]
  if missing:
    raise FileNotFoundError(f"{generated_dir} lacks {len(missing)} of {len(entries)} generated "
                            f"images, e.g. {missing[0]}.png (name each by its MJHQ id)")
  return [by_stem[e.id] for e in entries]


def _stats_by_category(paths: Sequence[epath.Path], entries: Sequence[Entry],
                       features: fid_lib.InceptionFeatures, desc: str,
                       show_progress: bool) -> dict[str, fid_lib.FeatureStats]:
  """Feature statistics per category from one pass over the images."""
  stats: dict[str, fid_lib.FeatureStats] = {}
  loaded = image_lib.load_all(paths, inception.INPUT_SIZE)
  start = 0
  for batch in image_lib.batches(
      progress_lib.progress(loaded, total=len(paths), desc=desc, enabled=show_progress),
      features.batch_size):
    rows = features(batch)
    labels = np.array([e.category for e in entries[start:start + batch.valid]])
    start += batch.valid
    for category in np.unique(labels):
      stats.setdefault(str(category), fid_lib.FeatureStats()).add(rows[labels == category])
  return stats


def evaluate(mjhq_dir: str | epath.PathLike, generated_dir: str | epath.PathLike,
             features: fid_lib.InceptionFeatures, *, categories: Sequence[str] | None = None,
             show_progress: bool = True) -> dict:
  """{"fid": overall, "per_category": {category: fid}, "images": n, ...}."""
  entries = read_meta(mjhq_dir, categories)
  generated = generated_paths(generated_dir, entries)
  real = _stats_by_category([reference_path(mjhq_dir, e) for e in entries], entries, features,
                            "MJHQ reference", show_progress)
  fake = _stats_by_category(generated, entries, features, "generated", show_progress)
  overall_real, overall_fake = fid_lib.FeatureStats(), fid_lib.FeatureStats()
  per_category, counts = {}, {}
  for category in sorted(real):
    overall_real.merge(real[category])
    overall_fake.merge(fake[category])
    per_category[category] = fid_lib.fid(real[category], fake[category])
    counts[category] = real[category].count
  return {"fid": fid_lib.fid(overall_real, overall_fake), "per_category": per_category,
          "images": overall_real.count, "images_per_category": counts}
