"""Captioned images as SDE codes, tokenized when a run starts: the VLM stages' small-run source.

The VLM stages train on examples ``{"key", "codes" [h, w] int32, "caption",
"conversations"}`` (what ``muse_jax.data.sequences`` formats read). For the demo
and other small runs the images are encoded here, once, by a trained SDE
tokenizer (an ``encode`` function: ``inference.sde_tokenizer.batched_encoder``),
so that the offline tokenization job (``python -m muse_jax.tokenize_images``, whose
shards hold these same example dicts) need not run first; the examples then live in
memory for the whole run.

Annotations are a JSON file ``{"images": [{"file", "caption", "qa": [[question,
answer], ...]}, ...]}``, ``file`` relative to the image folder. The package ships
one for the photographs scikit-image bundles (``demo_annotations.json``, the
demo's data): a factual caption and two question/answer pairs per photograph,
which become a two-turn conversation for understanding SFT.

Each training image gives ``views`` examples: its centre crop and ``views - 1``
random square crops (``images.random_crop_box``, side >= ``min_scale`` x the
shorter side; drawn from ``seed``, so every process and every resume sees the
same codes). Held-out images give their centre crop only. Unreadable images are
skipped and counted (``data/skipped_<reason>``).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
from etils import epath

from muse_jax.data import images as image_lib
from muse_jax.data import sources
from muse_jax.data.config import DataConfigError

DEMO_ANNOTATIONS = os.path.join(os.path.dirname(__file__), "demo_annotations.json")


def load_annotations(path: str = "") -> list[dict]:
  """The ``images`` entries of an annotations file (default: the shipped demo file)."""
  path = path or DEMO_ANNOTATIONS
  try:
    entries = json.loads(epath.Path(path).read_text())["images"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataConfigError(f"config.data.annotations={path!r} is not an annotations file "
                          f"({type(e).__name__}: {e}); give a JSON file "
                          '{"images": [{"file", "caption", "qa"}, ...]}') from e
  bad = [e for e in entries if not (isinstance(e, dict) and isinstance(e.get("file"), str)
                                    and isinstance(e.get("caption"), str))]
  if bad:
    raise DataConfigError(f"config.data.annotations={path!r}: entry {bad[0]!r:.80} has no "
                          "string 'file' and 'caption'; fix the file")
  return entries


def texts(entries: list[dict]) -> list[str]:
  """Every caption, question and answer: what a demo tokenizer is trained on."""
  return [e["caption"] for e in entries] + [s for e in entries for qa in e.get("qa", ())
                                            for s in qa]


def conversation(qa: list) -> list[dict[str, str]]:
  """Question/answer pairs -> LLaVA turns (the image goes before the first question)."""
  turns = []
  for question, answer in qa:
    turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
  return turns


def split(entries: list[dict], image_dir: str, num_eval: int) -> tuple[list[dict], list[dict]]:
  """(train, held-out) entries; the held-out ones are the images ``sources.split_eval``
  holds out of the same folder, so an SDE demo and a VLM demo hold out the same photos."""
  paths = [os.path.join(image_dir, e["file"]) for e in entries]
  _, held_out = sources.split_eval(paths, num_eval, image_dir)
  held_out = set(held_out)
  return ([e for e, p in zip(entries, paths) if p not in held_out],
          [e for e, p in zip(entries, paths) if p in held_out])


def view_crops(data: bytes, *, size: int, views: int, min_scale: float,
               rng: np.random.Generator, max_pixels: int) -> list[np.ndarray]:
  """uint8 [size, size, 3] crops of an encoded image: its centre, then ``views - 1``
  random squares. Raises ``images.BadExample`` for undecodable bytes."""
  rgb = image_lib.decode_rgb(data, max_pixels=max_pixels)
  boxes = [image_lib.center_crop_box(*rgb.size)]
  boxes += [image_lib.random_crop_box(*rgb.size, min_scale, rng) for _ in range(views - 1)]
  return [image_lib.crop_resize(rgb, box, size, flip=False) for box in boxes]


def code_examples(entries: list[dict], image_dir: str,
                  encode: Callable[[np.ndarray], np.ndarray], *, image_size: int,
                  views: int = 1, min_scale: float = 1.0, seed: int = 0,
                  max_pixels: int = 89_478_485) -> tuple[list[dict], dict[str, int]]:
  """(examples, skip counters): every entry's ``views`` crops encoded by ``encode``
  (float32 [N, size, size, 3] in [-1, 1] -> int codes [N, h, w])."""
  rng = np.random.default_rng(seed)
  pixels, owners, skipped = [], [], {}
  for entry in entries:
    try:
      data = epath.Path(os.path.join(image_dir, entry["file"])).read_bytes()
      crops = view_crops(data, size=image_size, views=views, min_scale=min_scale, rng=rng,
                         max_pixels=max_pixels)
    except (OSError, image_lib.BadExample) as e:
      reason = e.reason if isinstance(e, image_lib.BadExample) else "unreadable"
      skipped[f"data/skipped_{reason}"] = skipped.get(f"data/skipped_{reason}", 0) + 1
      continue
    pixels += crops
    owners += [(entry, view) for view in range(len(crops))]
  if not pixels:
    return [], skipped
  batch = np.empty((len(pixels), image_size, image_size, 3), np.float32)
  for i, p in enumerate(pixels):
    image_lib.to_float(p, batch[i])
  codes = np.asarray(encode(batch), np.int32)
  examples = [{"key": f"{entry['file']}#{view}", "codes": c, "caption": entry["caption"],
               "conversations": conversation(entry.get("qa", ()))}
              for (entry, view), c in zip(owners, codes)]
  return examples, skipped
