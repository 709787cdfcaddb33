"""Trains the demo decoder for a few steps on several meshes and saves what it saw.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/llm_steps.py \
      --meshes=1,1,1:8,1,1:1,8,1 --out=/tmp/r.npz --workdir=/tmp/w

Each mesh starts from the same seed and sees the same global batches. With
``--num_processes=2 --process_id=I --port=P`` the script is one of two
``jax.distributed`` processes on localhost that together hold the devices.

Per mesh the output holds ``<mesh>/loss`` (one per step), ``<mesh>/params...``
after the steps, ``<mesh>/param_bytes_per_device``, and the shapes and first-device
shard shapes of the embedding, the LM head and a KV projection (``<mesh>/<name>_shape``,
``<mesh>/<name>_shard_shape``). ``--save_on=M`` writes a
checkpoint after mesh M's steps and goes on one step (``saved/next_loss``);
``--restore_onto=M`` then reads it onto mesh M and takes that step again
(``resumed/loss``).
"""

import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import load_config, mesh_run_parser  # noqa: E402

import numpy as np  # noqa: E402

from muse_jax.parallel import sharding  # noqa: E402
from muse_jax.train import checkpoint as checkpoint_lib  # noqa: E402
from muse_jax.train import llm_trainer  # noqa: E402


def batches(config, vocab, steps):
  """The same packed batches for every mesh: two documents and padding per row."""
  rng = np.random.default_rng(1)
  b, t = config.batch_size, config.seq_len
  for _ in range(steps):
    ids = rng.integers(0, vocab, (b, t))
    segment_ids = np.ones((b, t), np.int32)
    split = rng.integers(t // 4, 3 * t // 4, b)
    segment_ids[np.arange(t)[None] >= split[:, None]] = 2
    segment_ids[:, -t // 8:] = 0
    yield llm_trainer.next_token_targets(ids, segment_ids)


def on_mesh(batch, run):
  """Each process supplies the rows its devices hold (every process knows the batch)."""
  return {k: jax.make_array_from_callback(v.shape, run.batch_sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def mesh_of(spec, config):
  data, fsdp, tensor = (int(x) for x in spec.split(","))
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  devices = jax.devices()[:data * fsdp * tensor]
  return sharding.make_mesh(config.mesh, devices)


def gathered(tree):
  """Full host copies of (possibly multi-process) sharded arrays."""
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      tree)


def main():
  parser = mesh_run_parser()
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args()
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)
  config = load_config("muse_vl", "demo")
  # large, constant steps: parameters move by ~1e-2 per step, far above the tolerance
  config.optimizer.update(lr=1e-2, warmup_steps=0)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(args.workdir, "checkpoints"))
  arrays = {"devices": np.int64(jax.device_count()),
            "processes": np.int64(jax.process_count())}
  for spec in args.meshes.split(":"):
    run = llm_trainer.setup(config, mesh_of(spec, config))
    state = run.init()
    vocab = run.model_config.vocab_size
    losses = []
    for batch in batches(config, vocab, args.steps):
      state, metrics = run.train_step(state, on_mesh(batch, run))
      losses.append(float(metrics["loss/lm"]))
    arrays[f"{spec}/loss"] = np.asarray(losses)
    for path, leaf in jax.tree_util.tree_leaves_with_path(gathered(state["params"])):
      arrays[f"{spec}/params{jax.tree_util.keystr(path)}"] = leaf
    arrays[f"{spec}/param_bytes_per_device"] = np.int64(sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state["params"])))
    arrays[f"{spec}/param_bytes"] = np.int64(sum(
        x.nbytes for x in jax.tree.leaves(state["params"])))
    params = state["params"]
    for name, param in (("embedding", params["model"]["embed_tokens"]["embedding"]),
                        ("lm_head", params["lm_head"]["kernel"]),
                        ("k_proj", params["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"])):
      arrays[f"{spec}/{name}_shape"] = np.asarray(param[...].shape)
      arrays[f"{spec}/{name}_shard_shape"] = np.asarray(
          param[...].addressable_shards[0].data.shape)
    if spec == args.save_on:
      ckpt.save(args.steps, state, {})
      ckpt.wait()
      next_batch = list(batches(config, vocab, args.steps + 1))[-1]
      arrays["saved/next_loss"] = np.float64(
          run.train_step(state, on_mesh(next_batch, run))[1]["loss/lm"])
  if args.restore_onto:
    run = llm_trainer.setup(config, mesh_of(args.restore_onto, config))
    state, _ = ckpt.restore(ckpt.latest_step(), run.abstract_state)
    assert int(state["step"]) == args.steps
    next_batch = list(batches(config, run.model_config.vocab_size, args.steps + 1))[-1]
    state, metrics = run.train_step(state, on_mesh(next_batch, run))
    arrays["resumed/loss"] = np.float64(metrics["loss/lm"])
    arrays["resumed/fc_shard_shape"] = np.asarray(
        state["params"]["model"]["layers"][0]["mlp"]["gate_proj"]["kernel"][...]
        .addressable_shards[0].data.shape)
  ckpt.close()
  if jax.process_index() == 0:
    np.savez(args.out, **arrays)


if __name__ == "__main__":
  main()
