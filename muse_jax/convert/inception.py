"""The public PyTorch FID Inception file -> our ``FIDInceptionV3`` parameters.

Input: ``pt_inception-2015-12-05-6726825d.pth`` (what ``pytorch-fid`` downloads),
a torch pickle read without torch. Its ``fc.*`` tensors (the 1008-way classifier)
are not needed for pool features and are skipped. The output (``muse_jax.weights``)
is what ``python -m muse_jax.evaluate ... --inception=DIR`` reads.
"""

from __future__ import annotations

from etils import epath
from flax import nnx

from muse_jax import weights
from muse_jax.convert import checkpoint, tensor_io
from muse_jax.models import inception

KIND = "fid_inception_v3"
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def tensor_name(path: tuple) -> tuple[str, tensor_io.Layout]:
  """Our path (``Mixed_5b``, ``branch1x1``, ``kernel``) -> (torch name, layout)."""
  *module, leaf = map(str, path)
  prefix = ".".join(module)
  if leaf == "kernel":
    return f"{prefix}.conv.weight", tensor_io.CONV2D
  return f"{prefix}.bn.{_BN_NAMES[leaf]}", tensor_io.SAME


def abstract_inception(input_size: int = inception.INPUT_SIZE) -> inception.FIDInceptionV3:
  return nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0),
                                                         input_size=input_size))


def read_inception(pth_path: str):
  """Iterator of (param path, array) from the PyTorch file, one tensor at a time."""
  reader = tensor_io.open_tensors(pth_path)
  return tensor_io.iter_params(reader, checkpoint.param_shapes(abstract_inception()), tensor_name)


def torch_to_checkpoint(pth_path: str, out_dir: str) -> None:
  """Writes the FID Inception parameters as ``muse_jax.weights``."""
  with weights.Writer(out_dir, {"kind": KIND}) as writer:
    for path, array in read_inception(pth_path):
      writer.write(weights.tensor_name(path), array)


def load(weights_dir: str | epath.PathLike,
         input_size: int = inception.INPUT_SIZE) -> inception.FIDInceptionV3:
  """A ready ``FIDInceptionV3`` from converted weights (names, shapes and dtypes checked);
  ``input_size`` other than 299 is for tests only (not FID)."""
  index = weights.read_index(weights_dir)
  if index.metadata.get("kind") != KIND:
    raise weights.WeightsMismatchError(
        f"{weights_dir} holds {index.metadata.get('kind')!r} weights, not the FID Inception: "
        "convert pt_inception-2015-12-05-*.pth with `python -m muse_jax.convert inception`")
  model = abstract_inception(input_size)
  params = weights.load_pretrained(weights_dir, nnx.state(model, nnx.Param))
  nnx.update(model, params)
  return model
