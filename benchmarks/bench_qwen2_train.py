"""Forward + backward (next-token cross-entropy) of a ~30M-parameter Qwen2: ours vs transformers.

Both sides get the same weights (a random transformers model, converted with
``muse_jax.convert.hf.load_qwen2``), the same batch, float32, on the same CPU.
Steps alternate between the two so that machine load hits both alike; the
figure (last field) is the ratio of median wall-clock step times (ours / torch,
lower is better); the ratio of process CPU time per step is reported too, as a
figure that other jobs on a shared machine disturb less.

  python benchmarks/bench_qwen2_train.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the peer runs on the CPU; skip accelerator probes

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from muse_jax.train import lm_loss

import qwen2_pair



def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--chunk", type=int, default=256,
                      help="sequence positions per loss chunk (ours)")
  args = parser.parse_args()

  torch_model, ours, params_m = qwen2_pair.build()
  torch_model.train()

  vocab = qwen2_pair.CONFIG["vocab_size"]
  ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq))
  torch_ids = torch.tensor(ids)
  jax_ids = jnp.asarray(ids, jnp.int32)
  weights = jnp.ones((args.batch, args.seq - 1), jnp.float32)
  graphdef, params = nnx.split(ours, nnx.Param)

  @jax.jit
  def ours_step(params, ids):
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      hidden = model.hidden_states(ids)
      return lm_loss.chunked_cross_entropy(hidden[:, :-1], model.lm_head_kernel(), ids[:, 1:],
                                           weights, args.chunk)
    return jax.value_and_grad(loss_fn)(params)

  def torch_step():
    torch_model.zero_grad(set_to_none=True)
    loss = torch_model(input_ids=torch_ids, labels=torch_ids).loss
    loss.backward()
    return loss.item()

  def run_ours():
    loss, grads = ours_step(params, jax_ids)
    jax.block_until_ready(grads)
    return float(loss)

  loss_ours, loss_torch = run_ours(), torch_step()        # compile / warm up
  load_before = os.getloadavg()[0]
  steal_before = qwen2_pair.steal_ticks()
  times = {"ours": ([], []), "torch": ([], [])}            # (wall, process cpu) per step
  for _ in range(args.steps):
    for name, step in (("ours", run_ours), ("torch", torch_step)):
      wall, cpu = time.perf_counter(), time.process_time()
      step()
      times[name][0].append(time.perf_counter() - wall)
      times[name][1].append(time.process_time() - cpu)
  ms = {f"{name}_{kind}_ms": round(1e3 * statistics.median(values), 1)
        for name, pair in times.items() for kind, values in zip(("wall", "cpu"), pair)}
  print(json.dumps({
      "benchmark": "qwen2_train_step_fp32", "params_m": round(params_m, 1),
      "batch": args.batch, "seq": args.seq, "steps": args.steps,
      "loss_ours": round(loss_ours, 5), "loss_torch": round(loss_torch, 5), **ms,
      "cpu_ratio_ours_over_torch": round(ms["ours_cpu_ms"] / ms["torch_cpu_ms"], 3),
      "cpu_cores": os.cpu_count(), "load_average_1m_before": load_before,
      "cpu_steal_share": qwen2_pair.steal_share(steal_before),
      "ratio_ours_over_torch": round(ms["ours_wall_ms"] / ms["torch_wall_ms"], 3)}))


if __name__ == "__main__":
  main()
