"""Greedy generation of 128 new tokens with the KV cache: ours vs transformers ``generate``.

Same ~30M-parameter Qwen2 weights on both sides (converted with
``muse_jax.convert.hf.load_qwen2``, then ``layers.use_out_in_kernels``: the
serving layout, [out, in] kernels like torch's, whose decode-step matmuls run
the CPU small-row kernel ``muse_jax.kernels.cpu_matmul``; ``cpu_kernel`` says
whether it was built, and ``MUSE_JAX_CPU_KERNELS=0`` measures XLA's matmul
instead), float32, same CPU, batch 1 and batch 8.
Our whole decode loop is one jitted ``lax.scan``; transformers runs its Python
loop with a DynamicCache. Runs alternate between the two; the figure is
tokens/s ours / tokens/s torch in wall-clock time (higher is better), the
last field being the smaller of the two batch sizes' ratios; ``cpu_ratio`` is
the same figure in process CPU time, which other jobs disturb less. ``same_tokens`` checks that both
produced identical ids.

  python benchmarks/bench_qwen2_generate.py [--repeats 3]
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
from muse_jax.models import layers, qwen2

import qwen2_pair



def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--prompt", type=int, default=16)
  args = parser.parse_args()

  torch_model, ours, params_m = qwen2_pair.build(initializer_range=0.05)
  torch_model.eval()
  layers.use_out_in_kernels(ours, matmul_impl=cpu_matmul.IMPLEMENTATION)

  result = {"benchmark": "qwen2_greedy_generate_fp32",
            "params_m": round(params_m, 1),
            "prompt": args.prompt, "new_tokens": args.new_tokens,
            "cpu_kernel": cpu_matmul.available()}
  ratios = []
  load_before = os.getloadavg()[0]
  steal_before = qwen2_pair.steal_ticks()
  for batch in (1, 8):
    vocab = qwen2_pair.CONFIG["vocab_size"]
    prompt = np.random.default_rng(batch).integers(0, vocab, (batch, args.prompt))
    torch_prompt = torch.tensor(prompt)
    mask = torch.ones_like(torch_prompt)

    def run_torch():
      with torch.no_grad():
        out = torch_model.generate(torch_prompt, attention_mask=mask, do_sample=False,
                                   max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, eos_token_id=None,
                                   pad_token_id=0)
      return out[:, args.prompt:].numpy()

    def run_ours():
      return np.asarray(jax.block_until_ready(
          qwen2.generate(ours, jnp.asarray(prompt, jnp.int32), args.new_tokens)))

    same = bool(np.array_equal(run_ours(), run_torch()))         # also compiles / warms up
    times = {"ours": ([], []), "torch": ([], [])}               # (wall, process cpu)
    for _ in range(args.repeats):
      for name, run in (("ours", run_ours), ("torch", run_torch)):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        times[name][0].append(time.perf_counter() - wall)
        times[name][1].append(time.process_time() - cpu)
    tokens = batch * args.new_tokens
    wall_tps = {name: tokens / statistics.median(pair[0]) for name, pair in times.items()}
    cpu_tps = {name: tokens / statistics.median(pair[1]) for name, pair in times.items()}
    ratios.append(wall_tps["ours"] / wall_tps["torch"])
    result.update({f"b{batch}_same_tokens": same,
                   f"b{batch}_ours_tok_s": round(wall_tps["ours"], 1),
                   f"b{batch}_torch_tok_s": round(wall_tps["torch"], 1),
                   f"b{batch}_cpu_ratio": round(cpu_tps["ours"] / cpu_tps["torch"], 2),
                   f"b{batch}_ratio": round(ratios[-1], 2)})
  result["load_average_1m_before"] = load_before
  result["cpu_steal_share"] = qwen2_pair.steal_share(steal_before)
  result["ratio_ours_over_torch_min"] = round(min(ratios), 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
