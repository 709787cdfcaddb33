"""GenEval-ready output: the folder layout GenEval's own evaluator reads unchanged.

GenEval's prompts come as ``evaluation_metadata.jsonl`` (one JSON object per
line: tag, include, prompt, ...). For prompt i its evaluator expects

  <outdir>/<i:05d>/metadata.jsonl     that prompt's JSON object, on one line
  <outdir>/<i:05d>/samples/<k:04d>.png

and then runs ``python evaluation/evaluate_images.py <outdir> --outfile ...``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import numpy as np
from etils import epath
from PIL import Image

from muse_jax.evaluate import images as image_lib
from muse_jax.evaluate import progress as progress_lib


def read_metadata(path: str | epath.PathLike) -> list[dict[str, Any]]:
  """GenEval's prompt metadata: one JSON object per non-empty line."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist (GenEval's evaluation_metadata.jsonl)")
  entries = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error
      if "prompt" not in entry:
        raise ValueError(f"{path}:{number}: no \"prompt\" field")
      entries.append(entry)
  return entries


def _as_pil(image: np.ndarray | Image.Image | epath.Path) -> Image.Image:
  if isinstance(image, epath.Path):
    with image.open("rb") as f:
      return Image.open(f).convert("RGB")
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  image = np.asarray(image)
  return Image.fromarray(image if image.dtype == np.uint8 else image_lib.to_uint8(image))


def write(outdir: str | epath.PathLike, metadata: Sequence[dict[str, Any]],
          samples: Iterable[Sequence[np.ndarray | Image.Image | epath.Path]], *,
          show_progress: bool = True) -> int:
  """Writes prompt i's samples (uint8 HWC, [-1, 1] float HWC, PIL images or files) in
  GenEval's layout; returns the number of images written."""
  out = epath.Path(outdir)
  written = 0
  items = progress_lib.progress(zip(metadata, samples), total=len(metadata),
                                desc="GenEval samples", unit="prompt", enabled=show_progress)
  prompts = 0
  for index, (entry, images) in enumerate(items):
    prompts += 1
    if not images:
      raise ValueError(f"prompt {index} ({entry['prompt']!r}) has no images")
    folder = out / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
    for k, image in enumerate(images):
      with (folder / "samples" / f"{k:04d}.png").open("wb") as f:
        _as_pil(image).save(f, format="PNG")
      written += 1
  if prompts != len(metadata):
    raise ValueError(f"images for {prompts} prompts, but the metadata has {len(metadata)}")
  return written


def samples_from_folder(images_dir: str | epath.PathLike,
                        count: int) -> Iterable[list[epath.Path]]:
  """Per prompt i, the files ``<i:05d>_<k>.<ext>`` of a folder of generated images
  (sorted by k), for the ``geneval`` command."""
  by_prompt: dict[int, list[epath.Path]] = {}
  for path in image_lib.list_images(images_dir):
    prompt, _, sample = path.stem.partition("_")
    if not (prompt.isdigit() and sample.isdigit()):
      raise ValueError(f"{path.name}: generated images must be named <prompt>_<sample>.png "
                       "(e.g. 00012_0003.png)")
    by_prompt.setdefault(int(prompt), []).append(path)
  missing = [i for i in range(count) if i not in by_prompt]
  if missing:
    raise FileNotFoundError(f"{images_dir} has no images for prompt {missing[0]} "
                            f"({len(missing)} of {count} prompts missing)")
  for i in range(count):
    yield sorted(by_prompt[i], key=lambda p: int(p.stem.partition("_")[2]))
