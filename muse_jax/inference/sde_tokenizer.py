"""A trained SDE tokenizer as a library: its weights from a run, and batched encoding.

Shared by ``python -m muse_jax.inference.reconstruct``, the offline tokenization job
(``python -m muse_jax.tokenize_images``) and the VLM stages, which encode their
images with it when a run starts (``muse_jax/data/image_codes.py``) unless they read
the job's code shards.
No flags here: importing it defines none.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from muse_jax import config_lib
from muse_jax import weights
from muse_jax.models import sde as sde_lib
from muse_jax.parallel import sharding


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config an SDE run was trained with (its ``config.json``)."""
  return ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))


def load_tokenizer(workdir: str, step: int | None = None,
                   mesh: jax.sharding.Mesh | None = None):
  """(tokenizer module with restored weights, config, step) from a training workdir.

  Reads only the tokenizer's ``params`` and ``frozen`` subtrees of the run's
  checkpoint (``weights.load_run_params``), onto ``mesh`` (default: the first
  device): no optimiser, discriminator or data state is built or read.
  """
  config = run_config(workdir)
  abstract_module = nnx.eval_shape(
      lambda: sde_lib.SDETokenizer(config_lib.sde_model_config(config), rngs=nnx.Rngs(0)))
  graphdef, trainable, frozen = nnx.split(abstract_module, sde_lib.TRAINABLE, ...)
  if mesh is None:
    mesh = sharding.make_mesh(sharding.mesh_config(data=1), jax.devices()[:1])
  abstract = {"params": trainable, "frozen": frozen}
  abstract = sharding.with_shardings(abstract, sharding.shardings(abstract, mesh))
  restored, step = weights.load_run_params(workdir, abstract, step)
  return nnx.merge(graphdef, restored["params"], restored["frozen"]), config, step


def batched_encoder(tokenizer: sde_lib.SDETokenizer, batch_size: int,
                    mesh: jax.sharding.Mesh | None = None):
  """images float32 [N, H, W, 3] in [-1, 1] -> codes int32 [N, h, w] (numpy), through one
  jitted encode of ``batch_size`` images (the last batch padded): compiled once for any N.

  With ``mesh`` (the tokenizer's weights placed on it by ``load_tokenizer``) each batch
  is split over its batch axes (``sharding.batch_sharding``); all its devices must be
  this process's, as the offline tokenization job's per-host mesh is.
  """
  if mesh is None:
    encode = jax.jit(lambda x: tokenizer.encode(x))
    place = jnp.asarray
  else:
    placement = sharding.batch_sharding(mesh)
    encode = jax.jit(lambda x: tokenizer.encode(x), in_shardings=placement,
                     out_shardings=placement)
    place = lambda x: jax.device_put(x, placement)

  def run(images: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
      part = images[start:start + batch_size]
      padded = np.concatenate([part, np.zeros((batch_size - len(part), *part.shape[1:]),
                                              part.dtype)])
      out.append(np.asarray(encode(place(padded)))[:len(part)])
    return np.concatenate(out)

  return run
