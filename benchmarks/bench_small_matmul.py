"""How fast each library streams weights through an 8-row float32 matmul.

Batch-8 greedy decoding multiplies 8 rows by every weight matrix once per
token, so its speed is set by how many weight bytes per second the matmul
reads. This measures that rate for XLA:CPU (through jax) and for torch on the
same CPU, with weights far larger than the caches (256 MB), in both weight
layouts: ``in_out`` ([in, out], x @ W, our kernels' layout) and ``out_in``
([out, in], x @ W.T, torch's nn.Linear layout and our tied LM head), and for
our CPU small-row kernel (``muse_jax.kernels.cpu_matmul``, [out, in]), which
decoding uses up to 8 rows. A jitted ``jnp.sum`` over the same array gives the
machine's streaming rate. The last fields are the kernel, and XLA's best
layout, over torch's best layout (higher is better).

  python benchmarks/bench_small_matmul.py [--rows 8]
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

from muse_jax.kernels import cpu_matmul


def gb_per_s(run, nbytes: int, repeats: int = 9) -> float:
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return round(nbytes / statistics.median(times) / 1e9, 2)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--features", type=int, default=1024)
  parser.add_argument("--outputs", type=int, default=65536)
  args = parser.parse_args()

  cpu_matmul.load()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.rows, args.features), np.float32)
  in_out = rng.standard_normal((args.features, args.outputs), np.float32)
  out_in = np.ascontiguousarray(in_out.T)
  nbytes = in_out.nbytes

  jx, j_in_out, j_out_in = jnp.asarray(x), jnp.asarray(in_out), jnp.asarray(out_in)
  matmul_nn = jax.jit(lambda x, w: x @ w)
  matmul_nt = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
  kernel = jax.jit(cpu_matmul.matmul_out_in)
  total = jax.jit(jnp.sum)
  tx, t_in_out, t_out_in = torch.from_numpy(x), torch.from_numpy(in_out), torch.from_numpy(out_in)

  rates = {
      "xla_in_out_gb_s": gb_per_s(lambda: matmul_nn(jx, j_in_out).block_until_ready(), nbytes),
      "xla_out_in_gb_s": gb_per_s(lambda: matmul_nt(jx, j_out_in).block_until_ready(), nbytes),
      "kernel_out_in_gb_s": gb_per_s(lambda: kernel(jx, j_out_in).block_until_ready(), nbytes),
      "xla_sum_gb_s": gb_per_s(lambda: total(j_in_out).block_until_ready(), nbytes),
      "torch_in_out_gb_s": gb_per_s(lambda: tx @ t_in_out, nbytes),
      "torch_out_in_gb_s": gb_per_s(lambda: tx @ t_out_in.T, nbytes),
  }
  best_xla = max(rates["xla_in_out_gb_s"], rates["xla_out_in_gb_s"])
  best_torch = max(rates["torch_in_out_gb_s"], rates["torch_out_in_gb_s"])
  print(json.dumps({
      "benchmark": "small_matmul_weight_stream_fp32", "rows": args.rows,
      "weights_mb": round(nbytes / 2**20), "torch_threads": torch.get_num_threads(), **rates,
      "cpu_cores": os.cpu_count(), "load_average_1m_before": os.getloadavg()[0],
      "kernel_applies": cpu_matmul.applies(jx, j_out_in),
      "ratio_kernel_over_torch": round(rates["kernel_out_in_gb_s"] / best_torch, 2),
      "ratio_xla_over_torch": round(best_xla / best_torch, 2)}))


if __name__ == "__main__":
  main()
