"""Reconstruct images through a trained SDE tokenizer.

  python -m muse_jax.inference.reconstruct --workdir=/tmp/sde_demo \
      --images=photo1.jpg,photo2.png --out=/tmp/recon.png

Reads the run's ``config.json`` and the tokenizer's weights from its latest
checkpoint (``sde_tokenizer.load_tokenizer``: no optimiser is built), encodes each image
(resize shorter side + centre crop to the model's size) to codes, decodes them,
writes a grid (top: inputs, bottom: reconstructions), and prints the codes'
shape and each image's PSNR. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from etils import epath
from PIL import Image

from muse_jax import cli
from muse_jax.data import images as image_lib
from muse_jax.inference import sde_tokenizer
from muse_jax.train import losses
from muse_jax.train import metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of an SDE training run.")
_IMAGES = flags.DEFINE_list("images", None, "Image files to reconstruct.")
_OUT = flags.DEFINE_string("out", "reconstruction.png", "Where to write the grid.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
  del argv
  tokenizer, config, step = sde_tokenizer.load_tokenizer(_WORKDIR.value, _STEP.value)
  size = config.model.encoder.image_size
  names, inputs = [], []
  for path in _IMAGES.value:
    try:
      rgb = image_lib.decode_rgb(epath.Path(path).read_bytes(),
                                 max_pixels=config.data.max_image_pixels)
    except (OSError, image_lib.BadExample) as e:
      print(f"skipped {path}: {e}")
      continue
    box = image_lib.center_crop_box(*rgb.size)
    pixels = image_lib.crop_resize(rgb, box, size, flip=False)
    names.append(path)
    inputs.append(pixels.astype(np.float32) / 127.5 - 1.0)
  if not inputs:
    raise SystemExit("no readable images")
  x = jnp.asarray(np.stack(inputs))
  codes = jax.jit(lambda x: tokenizer.encode(x))(x)
  recon = np.asarray(jax.jit(lambda c: tokenizer.decode(c))(codes))
  print(f"checkpoint step {step}: codes {tuple(codes.shape)} int32, "
        f"{len(np.unique(np.asarray(codes)))} distinct")
  for path, p in zip(names, np.asarray(losses.psnr(x, recon))):
    print(f"{path}: PSNR {p:.2f} dB")
  Image.fromarray(metrics.image_grid([np.asarray(x), recon])).save(_OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "images"])
  # absl parses the flags; a user error (no such run, mismatched weights) is then one line
  app.run(lambda argv: cli.run(main, argv, "python -m muse_jax.inference.reconstruct"))
