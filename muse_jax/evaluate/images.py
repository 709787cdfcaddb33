"""Image folders as fixed-shape batches for jitted evaluation.

Every image is decoded to RGB, centre-cropped to a square and resized to one
size (the crop and resize of the training data, ``muse_jax.data.images``), as
float32 in [-1, 1]. Batches always have ``batch_size`` rows, the last one padded
with zeros, so a jitted function compiles once; ``valid`` says how many rows are
real.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np
from etils import epath
from PIL import Image

from muse_jax.data import images as image_ops

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | epath.PathLike) -> list[epath.Path]:
  """Image files directly in ``folder``, sorted by name."""
  root = epath.Path(folder)
  if not root.is_dir():
    raise NotADirectoryError(f"{root} is not a directory of images")
  files = sorted(p for p in root.iterdir() if p.suffix.lower() in EXTENSIONS)
  if not files:
    raise FileNotFoundError(f"{root} holds no images ({', '.join(EXTENSIONS)})")
  return files


def load(path: str | epath.PathLike, size: int) -> np.ndarray:
  """One image file -> [size, size, 3] float32 in [-1, 1]."""
  path = epath.Path(path)
  try:
    image = image_ops.decode_rgb(path.read_bytes(), max_pixels=2**30)
  except image_ops.BadExample as error:
    raise ValueError(f"{path}: not a readable image ({error})") from error
  return from_pil(image, size)


def from_pil(image: Image.Image, size: int) -> np.ndarray:
  pixels = image_ops.crop_resize(image.convert("RGB"), image_ops.center_crop_box(*image.size),
                                 size, flip=False)
  out = np.empty(pixels.shape, np.float32)
  image_ops.to_float(pixels, out)
  return out


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[-1, 1] float -> uint8 pixels."""
  return np.round((np.clip(np.asarray(image, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


@dataclasses.dataclass
class Batch:
  images: np.ndarray    # [batch_size, H, W, 3]
  valid: int            # rows that are real images


def batches(images: Iterable[np.ndarray], batch_size: int) -> Iterator[Batch]:
  """Fixed-shape batches of equally sized images; the last one zero-padded."""
  buffer: list[np.ndarray] = []
  for image in images:
    buffer.append(np.asarray(image, np.float32))
    if len(buffer) == batch_size:
      yield Batch(np.stack(buffer), batch_size)
      buffer = []
  if buffer:
    padded = np.zeros((batch_size,) + buffer[0].shape, np.float32)
    padded[:len(buffer)] = np.stack(buffer)
    yield Batch(padded, len(buffer))


def load_all(paths: Sequence[epath.Path], size: int) -> Iterator[np.ndarray]:
  return (load(p, size) for p in paths)
