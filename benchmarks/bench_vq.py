"""Nearest-code search: the kernel's memory on TPU, and the chunked path's time on CPU.

Two measurements, each one JSON line ending in a ratio against its peer:

* ``--mode=tpu_memory``: compiles ``nearest_code`` ahead of time for a TPU
  topology (libtpu on a CPU host, DESIGN.md section 6) at N = K = 32768, d = 8
  and N = 32768, K = 131072, d = 32, with the Pallas kernel and with the naive
  XLA path, and reads ``memory_analysis()``: ``ratio`` = kernel temporaries /
  naive temporaries (target <= 0.02). One device: the whole batch on one chip.
* ``--mode=cpu_time``: wall time of the chunked path against the naive path on
  this CPU (N = 8192, K = 32768, d = 8; median of ``--repeats``):
  ``ratio`` = chunked / naive (target <= 0.5).

  python benchmarks/bench_vq.py --mode=tpu_memory
  python benchmarks/bench_vq.py --mode=cpu_time
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.kernels import vq

TPU_SHAPES = ((32768, 32768, 8), (32768, 131072, 32))


def tpu_memory(topology_name: str) -> None:
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices[0]
  mesh = jax.sharding.Mesh(np.asarray([device]), ("batch",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch", None))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for n, k, d in TPU_SHAPES:
    f = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=rows)
    book = jax.ShapeDtypeStruct((k, d), jnp.float32, sharding=whole)
    temps, hbm = {}, {}
    for impl in ("pallas", "naive"):
      search = jax.jit(lambda f, b: vq.nearest_code(f, b, impl=impl, sharding=rows))
      stats = search.lower(f, book).compile().memory_analysis()
      temps[impl] = stats.temp_size_in_bytes
      hbm[impl] = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                   + stats.temp_size_in_bytes)
    print(json.dumps({
        "mode": "tpu_memory", "topology": topology_name, "device": device.device_kind,
        "n": n, "k": k, "d": d, "distance_matrix_bytes": n * k * 4,
        "kernel_hbm_bytes": hbm["pallas"], "naive_hbm_bytes": hbm["naive"],
        "kernel_temp_bytes": temps["pallas"], "naive_temp_bytes": temps["naive"],
        "ratio": round(temps["pallas"] / max(temps["naive"], 1), 4)}), flush=True)


def cpu_time(n: int, k: int, d: int, chunk_size: int, repeats: int) -> None:
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  book = jnp.asarray(rng.standard_normal((k, d)), jnp.float32)
  runs = {impl: jax.jit(lambda f, b, impl=impl: vq.nearest_code(f, b, impl=impl,
                                                                 chunk_size=chunk_size))
          for impl in ("chunked", "naive")}
  for run in runs.values():
    run(f, book).block_until_ready()
  times = {impl: [] for impl in runs}
  for _ in range(repeats):          # interleaved: both see the same machine load
    for impl, run in runs.items():
      start = time.perf_counter()
      run(f, book).block_until_ready()
      times[impl].append(time.perf_counter() - start)
  median = {impl: statistics.median(t) for impl, t in times.items()}
  print(json.dumps({
      "mode": "cpu_time", "n": n, "k": k, "d": d, "chunk_size": chunk_size,
      "repeats": repeats, "load_average_1m": round(os.getloadavg()[0], 2),
      "chunked_s": round(median["chunked"], 3), "naive_s": round(median["naive"], 3),
      "ratio": round(median["chunked"] / median["naive"], 3)}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=("tpu_memory", "cpu_time"), required=True)
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--n", type=int, default=8192)
  parser.add_argument("--k", type=int, default=32768)
  parser.add_argument("--d", type=int, default=8)
  parser.add_argument("--chunk_size", type=int, default=vq.CHUNK_SIZE)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  if args.mode == "tpu_memory":
    tpu_memory(args.topology)
  else:
    cpu_time(args.n, args.k, args.d, args.chunk_size, args.repeats)


if __name__ == "__main__":
  main()
