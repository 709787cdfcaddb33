"""Reconstruct images through a trained SDE tokenizer.

  python -m muse_jax.inference.reconstruct --workdir=/tmp/sde_demo \
      --images=photo1.jpg,photo2.png --out=/tmp/recon.png

Reads the run's ``config.json`` and the tokenizer's weights from its latest
checkpoint (nothing else: no optimiser is built), encodes each image
(resize shorter side + centre crop to the model's size) to codes, decodes them,
writes a grid (top: inputs, bottom: reconstructions), and prints the codes'
shape and each image's PSNR. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from etils import epath
from flax import nnx
from PIL import Image

from muse_jax import config_lib
from muse_jax import weights
from muse_jax.data import images as image_lib
from muse_jax.models import sde as sde_lib
from muse_jax.parallel import sharding
from muse_jax.train import losses
from muse_jax.train import metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of an SDE training run.")
_IMAGES = flags.DEFINE_list("images", None, "Image files to reconstruct.")
_OUT = flags.DEFINE_string("out", "reconstruction.png", "Where to write the grid.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def load_tokenizer(workdir: str, step: int | None = None,
                   mesh: jax.sharding.Mesh | None = None):
  """(tokenizer module with restored weights, config, step) from a training workdir.

  Reads only the tokenizer's ``params`` and ``frozen`` subtrees of the run's
  checkpoint (``weights.load_run_params``), onto ``mesh`` (default: the first
  device): no optimiser, discriminator or data state is built or read.
  """
  config = ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))
  abstract_module = nnx.eval_shape(
      lambda: sde_lib.SDETokenizer(config_lib.sde_model_config(config), rngs=nnx.Rngs(0)))
  graphdef, trainable, frozen = nnx.split(abstract_module, sde_lib.TRAINABLE, ...)
  if mesh is None:
    mesh = sharding.make_mesh(sharding.mesh_config(data=1), jax.devices()[:1])
  abstract = {"params": trainable, "frozen": frozen}
  abstract = sharding.with_shardings(abstract, sharding.shardings(abstract, mesh))
  restored, step = weights.load_run_params(workdir, abstract, step)
  return nnx.merge(graphdef, restored["params"], restored["frozen"]), config, step


def batched_encoder(tokenizer: sde_lib.SDETokenizer, batch_size: int):
  """images float32 [N, H, W, 3] in [-1, 1] -> codes int32 [N, h, w] (numpy), through one
  jitted encode of ``batch_size`` images (the last batch padded): compiled once for any N."""
  encode = jax.jit(lambda x: tokenizer.encode(x))

  def run(images: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
      part = images[start:start + batch_size]
      padded = np.concatenate([part, np.zeros((batch_size - len(part), *part.shape[1:]),
                                              part.dtype)])
      out.append(np.asarray(encode(jnp.asarray(padded)))[:len(part)])
    return np.concatenate(out)

  return run


def main(argv):
  del argv
  tokenizer, config, step = load_tokenizer(_WORKDIR.value, _STEP.value)
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
  app.run(main)
