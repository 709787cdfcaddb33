"""Robust image decoding and the train / eval geometric transforms.

Decoding never raises on bad bytes: it raises `BadExample` with a counter
name, which the pipeline turns into a skipped-and-counted example, so one bad
file among ten million never stops a run.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# We enforce our own pixel limit (config.max_image_pixels) and count the
# offenders; PIL's warning for large-but-allowed images is only noise.
warnings.simplefilter('ignore', Image.DecompressionBombWarning)

PAD_VALUE = 128  # grey, 0.0 after scaling to [-1, 1]


class BadExample(Exception):
  """An example that must be skipped; `reason` names its skip counter."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}')
    self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB; transparency is composited on white."""
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
    values = np.asarray(image, dtype=np.float64)
    sixteen_bit = image.mode.startswith('I;16') or values.max(initial=0) > 255
    scale = 255.0 / 65535.0 if sixteen_bit else 1.0
    gray = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, 'L').convert('RGB')
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')
  return image.convert('RGB') if image.mode != 'RGB' else image


def decode_rgb(data: bytes, *, max_pixels: int,
               min_short_side: int = 1, draft_short_side: int = 0
               ) -> Image.Image:
  """Decodes encoded image bytes to an upright 8-bit RGB PIL image.

  Raises BadExample('corrupt' | 'too_large' | 'too_small'). `draft_short_side`
  lets JPEG decode at a reduced DCT scale that still keeps the shorter side at
  least that long (several times faster for large photos, same result after
  the downscale that follows).
  """
  if not data:
    raise BadExample('corrupt', 'zero bytes')
  try:
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
      raise BadExample('too_large', f'{width}x{height}')
    if min(width, height) < min_short_side:
      raise BadExample('too_small', f'{width}x{height}')
    if draft_short_side and image.format == 'JPEG':
      image.draft(None, (draft_short_side, draft_short_side))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return _to_rgb(image)
  except BadExample:
    raise
  except Image.DecompressionBombError as error:
    raise BadExample('too_large', str(error)) from error
  except Exception as error:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, ValueError, struct.error,
    # ...) for malformed files; all of them mean "this file is not usable".
    raise BadExample('corrupt', f'{type(error).__name__}: {error}') from error


def random_crop_box(width: int, height: int, min_scale: float,
                    rng: np.random.Generator) -> tuple[float, ...]:
  """A square of side U(min_scale, 1) x shorter side, at a random position."""
  side = min(width, height) * rng.uniform(min_scale, 1.0)
  left = rng.uniform(0.0, width - side)
  top = rng.uniform(0.0, height - side)
  return (left, top, left + side, top + side)


def center_crop_box(width: int, height: int) -> tuple[float, ...]:
  """The largest centred square."""
  side = min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


def crop_resize(image: Image.Image, box: tuple[float, ...], size: int,
                flip: bool) -> np.ndarray:
  """Crops `box` and resizes it to size x size in one antialiased pass."""
  out = image.resize((size, size), Image.Resampling.BICUBIC, box=box,
                     reducing_gap=3.0)
  return _to_array(out, flip)


def _to_array(image: Image.Image, flip: bool) -> np.ndarray:
  # PIL mirrors in C; numpy's reversed-stride copy of 3-byte pixels costs
  # about as much as the JPEG decode.
  if flip:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(image, dtype=np.uint8)


def pad_resize(image: Image.Image, size: int, flip: bool) -> np.ndarray:
  """Aspect-preserving: longer side to `size`, centred on a grey square."""
  width, height = image.size
  scale = size / max(width, height)
  new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
  resized = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
  canvas = Image.new('RGB', (size, size), (PAD_VALUE,) * 3)
  canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
  return _to_array(canvas, flip)


def to_float(pixels: np.ndarray, out: np.ndarray) -> None:
  """uint8 0..255 -> float32 in [-1, 1], written into `out`.

  No temporaries: this runs in the training process for every example, at
  about a third of the cost of `astype(float32) * scale - 1`.
  """
  np.multiply(pixels, np.float32(2.0 / 255.0), out=out, dtype=np.float32)
  np.subtract(out, np.float32(1.0), out=out)
