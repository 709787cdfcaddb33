"""Evaluation results: one JSON file per evaluation, plus the same numbers as
TensorBoard scalars (``muse_jax.train.metrics.TensorBoardWriter``) so that they
sit next to a training run's curves."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np
from etils import epath

from muse_jax.train import metrics


def flatten_scalars(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """Nested results -> {"a/b": number}; strings and lists are left out."""
  scalars = {}
  for key, value in results.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      scalars.update(flatten_scalars(value, name + "/"))
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
      scalars[name] = float(value)
  return scalars


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.integer, np.floating)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def write(out_dir: str | epath.PathLike, name: str, results: Mapping[str, Any], *,
          step: int = 0, images: Mapping[str, np.ndarray] | None = None) -> epath.Path:
  """Writes ``<out_dir>/<name>.json`` and TensorBoard scalars (tags ``<name>/...``) under
  ``<out_dir>/tensorboard``; ``images`` (uint8 HWC) go to TensorBoard as well."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
  writer = metrics.TensorBoardWriter(str(out / "tensorboard"))
  try:
    writer.write_scalars(step, flatten_scalars(results, f"{name}/"))
    if images:
      writer.write_images(step, {f"{name}/{k}": v for k, v in images.items()})
  finally:
    writer.close()
  return path
