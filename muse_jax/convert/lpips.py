"""Public PyTorch LPIPS files -> our ``LPIPS`` parameters.

Two inputs: torchvision's VGG16 state dict (``features.{0,2,...,28}.{weight,bias}``,
e.g. ``vgg16-397923af.pth``) and lpips' ``weights/v0.1/vgg.pth``
(``lin{0..4}.model.1.weight``, [1, C, 1, 1]). Either may be a torch pickle or a
safetensors file; torch itself is not needed. The output (``muse_jax.weights``)
is what the SDE trainer's ``config.lpips_checkpoint`` reads.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from muse_jax import weights
from muse_jax.convert import checkpoint, tensor_io
from muse_jax.models import lpips

KIND = "lpips_vgg16"


def tensor_name(path: tuple) -> tuple[str, tensor_io.Layout]:
  """Our LPIPS path -> (torch state-dict name, layout)."""
  if path[0] == "features":
    index, leaf = path[1], path[2]
    suffix = "weight" if leaf == "kernel" else "bias"
    layout = tensor_io.CONV2D if leaf == "kernel" else tensor_io.SAME
    return f"features.{lpips.VGG16_CONV_INDICES[index]}.{suffix}", layout
  return f"{path[0]}.model.1.weight", tensor_io.CONV2D


def _abstract_lpips() -> lpips.LPIPS:
  return nnx.eval_shape(lambda: lpips.LPIPS(rngs=nnx.Rngs(0)))


def read_lpips(vgg_path: str, heads_path: str):
  """Iterator of (param path, array) from the VGG16 backbone file and the LPIPS heads file."""
  vgg, heads = tensor_io.open_tensors(vgg_path), tensor_io.open_tensors(heads_path)
  reader = tensor_io.TensorReader({**vgg.locations, **heads.locations},
                                  f"{vgg.source} + {heads.source}")
  return tensor_io.iter_params(reader, checkpoint.param_shapes(_abstract_lpips()), tensor_name)


def load_lpips(vgg_path: str, heads_path: str) -> lpips.LPIPS:
  """A ready LPIPS module with the converted weights."""
  return checkpoint.with_params(_abstract_lpips(), {
      path: jnp.asarray(a) for path, a in read_lpips(vgg_path, heads_path)})


def torch_to_checkpoint(vgg_path: str, heads_path: str, out_dir: str) -> None:
  """Writes the LPIPS parameters (``muse_jax.weights``, one tensor at a time) for
  ``config.lpips_checkpoint``."""
  with weights.Writer(out_dir, {"kind": KIND}) as writer:
    for path, array in read_lpips(vgg_path, heads_path):
      writer.write(weights.tensor_name(path), array)
