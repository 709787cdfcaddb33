"""Attention memory on TPU: splash against the XLA reference, forward + backward.

Compiles the gradient of ``sum(attention(q, k, v))`` ahead of time for a TPU
topology (libtpu on a CPU host, DESIGN.md section 6), causal with packed-row
segment ids, at a 7B-like decoder shape (T = 8192, 28 query / 4 KV heads,
D = 128, bf16, one sequence on one chip), once with ``attention_impl="splash"``
and once with ``"xla"``, and reads ``memory_analysis()``:
``ratio`` = splash temporaries / XLA temporaries (target <= 0.1).

  python benchmarks/bench_attention.py [--topology v5p:2x2x1 --seq_len 8192 --q_heads 28 --kv_heads 4]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.kernels import attention


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--topology", default="v5p:2x2x1")  # XLA needs 15.9 GB: > a v5e chip
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq_len", type=int, default=8192)
  parser.add_argument("--q_heads", type=int, default=28)
  parser.add_argument("--kv_heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--block", type=int, default=512)
  args = parser.parse_args()

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
  mesh = jax.sharding.Mesh(np.asarray([device]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  P = jax.sharding.PartitionSpec
  heads = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None))
  b, t, d = args.batch, args.seq_len, args.head_dim
  q = jax.ShapeDtypeStruct((b, t, args.q_heads, d), jnp.bfloat16, sharding=heads)
  kv = jax.ShapeDtypeStruct((b, t, args.kv_heads, d), jnp.bfloat16, sharding=heads)
  segments = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)

  temps = {}
  for impl in ("splash", "xla"):
    options = attention.Options(impl, args.block, args.block)

    def loss(q, k, v, segment_ids, options=options):
      out = attention.dot_product_attention(
          q, k, v, mask=attention.SelfMask(True, segment_ids), options=options, sharding=heads)
      return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segments).compile()
    temps[impl] = compiled.memory_analysis().temp_size_in_bytes
  print(json.dumps({
      "topology": args.topology, "device": device.device_kind, "batch": b, "seq_len": t,
      "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": d, "dtype": "bfloat16",
      "block": args.block, "pass": "forward+backward",
      "splash_temp_bytes": temps["splash"], "xla_temp_bytes": temps["xla"],
      "ratio": round(temps["splash"] / temps["xla"], 4)}), flush=True)


if __name__ == "__main__":
  main()
