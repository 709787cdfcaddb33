"""Runs a few SDE train steps on one or more meshes and saves losses and parameters.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/sde_steps.py \
      --meshes=2,2,2:1,8,1 --save_on=2,2,2 --restore_onto=1,8,1 --out=/tmp/r.npz --workdir=/tmp/w

Run as its own process because the number of CPU devices is fixed when JAX
starts; tests/test_parallel.py compares the outputs of several meshes. Every
mesh uses all devices and trains ``--steps`` of a ``--steps + 1`` step run
(the discriminator is on from the first step), ending with a checkpoint. Mesh
(1,8,1) replicates the frozen weights (``config.replicate_frozen``), the others
shard them like the trained ones. Per mesh it saves the shapes and the first
device's shard shapes of an MLP kernel, a conv kernel and the codebook.
Dead-codebook-entry restarts run in every step (``codebook.restart_after=1``),
so the codebook and its restart state are compared across meshes too.
``--restore_onto=M`` then resumes the ``--save_on`` run's checkpoint on mesh M
for the last step (``resumed/loss``).
"""

import os
import shutil
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import mesh_run_parser, tiny_sde_config  # noqa: E402

from muse_jax.train import sde_trainer  # noqa: E402


def config_for(spec, steps):
  c = tiny_sde_config(batch_size=8, total_steps=steps, disc_start=0)
  c.update(eval_every=1000, checkpoint_every=1000)
  # dead entries restart every step (8 x 16 tokens for 64 entries): the restart's
  # gather of features and its random draw must agree on every mesh
  c.codebook.restart_after = 1
  data, fsdp, tensor = (int(x) for x in spec.split(","))
  c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  c.replicate_frozen = spec == "1,8,1"      # the other meshes shard the frozen weights
  return c


def main():
  parser = mesh_run_parser()
  args = parser.parse_args()
  arrays = {"devices": np.int64(jax.device_count())}
  for spec in args.meshes.split(":"):
    result = sde_trainer.train(config_for(spec, args.steps + 1),
                               os.path.join(args.workdir, spec), stop_after=args.steps)
    state = result["state"]
    arrays[f"{spec}/loss"] = np.float64(result["metrics"]["loss/total"])
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
      arrays[f"{spec}/params{jax.tree_util.keystr(path)}"] = np.asarray(jax.device_get(leaf))
    arrays[f"{spec}/params.codebook_last_used"] = np.asarray(
        jax.device_get(state["codebook"]["last_used"]))
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["disc_params"]):
      arrays[f"{spec}/disc_params{jax.tree_util.keystr(path)}"] = np.asarray(
          jax.device_get(leaf))
    fc1 = state["params"]["image_encoder"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
    arrays[f"{spec}/fc1_shard_shape"] = np.asarray(fc1[...].addressable_shards[0].data.shape)
    frozen = state["frozen"]["semantic_encoder"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
    arrays[f"{spec}/frozen_fc1_shard_shape"] = np.asarray(
        frozen[...].addressable_shards[0].data.shape)
    for name, param in (("conv", state["params"]["pixel_decoder"]["conv_in"]["kernel"]),
                        ("codebook", state["params"]["quantizer"]["codebook"])):
      arrays[f"{spec}/{name}_shape"] = np.asarray(param[...].shape)
      arrays[f"{spec}/{name}_shard_shape"] = np.asarray(
          param[...].addressable_shards[0].data.shape)
  if args.restore_onto:
    workdir = os.path.join(args.workdir, "resumed")
    shutil.copytree(os.path.join(args.workdir, args.save_on), workdir)
    result = sde_trainer.train(config_for(args.restore_onto, args.steps + 1), workdir)
    assert result["step"] == args.steps + 1
    arrays["resumed/loss"] = np.float64(result["metrics"]["loss/total"])
  np.savez(args.out, **arrays)


if __name__ == "__main__":
  main()
