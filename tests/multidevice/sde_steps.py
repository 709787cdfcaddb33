"""Runs a few SDE train steps on one mesh and saves losses and parameters.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/sde_steps.py \
      --mesh=2,2,2 --out=/tmp/r.npz --workdir=/tmp/w

Run as its own process because the number of CPU devices is fixed when JAX
starts; tests/test_parallel.py compares the outputs of several meshes.
"""

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import tiny_sde_config  # noqa: E402

from muse_jax.train import sde_trainer  # noqa: E402


def config_for(mesh, steps, disc_start):
  c = tiny_sde_config(batch_size=8, total_steps=steps, disc_start=disc_start)
  c.update(eval_every=1000, checkpoint_every=1000)
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return c


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mesh", required=True)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--disc_start", type=int, default=2)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  mesh = tuple(int(x) for x in args.mesh.split(","))
  result = sde_trainer.train(config_for(mesh, args.steps, args.disc_start), args.workdir)
  state = result["state"]
  arrays = {"loss": np.float64(result["metrics"]["loss/total"]),
            "devices": np.int64(jax.device_count())}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
    arrays["params" + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
  embed = state["params"]["image_encoder"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
  arrays["fc1_shard_shape"] = np.asarray(embed[...].addressable_shards[0].data.shape)
  np.savez(args.out, **arrays)


if __name__ == "__main__":
  main()
