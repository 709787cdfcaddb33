"""Compile time and per-chip peak memory of scanned vs unrolled layers, for TPU slices.

Compiles the real train step of each case twice with XLA:TPU on this CPU (libtpu,
``pip install -e .[tpu]``; nothing is allocated): once with
``model.scan_layers=True`` (one layer body under ``lax.scan``) and once with
``model.scan_layers=False`` (every layer compiled on its own), the same config
otherwise. Each compile runs in a fresh subprocess without a persistent
compilation cache, one at a time, so neither reuses the other's work. Prints a JSON
line per case and a last line with the ratios (scanned / unrolled; targets:
compile time <= 0.25, peak memory <= 1.05).

  python benchmarks/bench_scan_compile.py                      # the two targets, ~1 h here
  python benchmarks/bench_scan_compile.py --cases=qwen2.5-7b   # one case

``sde_256_semantic`` is not a target: the sde_256 ablation ``model.mode=semantic``
(the frozen SigLIP tower, forward only, and the 3-layer semantic decoder; no trainable
image tower, no convolution stacks), which shows what scanning does to a frozen tower.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (config file, config argument, slice, overrides)
CASES = {
    "qwen2.5-7b": ("muse_vl.py", "qwen2.5-7b", "v5p-128", {}),
    "sde_256": ("sde_256.py", None, "v5p-8", {}),
    "sde_256_semantic": ("sde_256.py", None, "v5p-8", {"model.mode": "semantic"}),
}
TARGETS = ("qwen2.5-7b", "sde_256")
GiB = 1024 ** 3


def compile_one(case: str, scan: bool) -> dict:
  """The train step's row from ``muse_jax.compile`` (run inside the child process)."""
  from muse_jax import compile as planner
  from muse_jax import config_lib
  config_file, arg, topology, overrides = CASES[case]
  module = config_lib.sibling_config(os.path.join(ROOT, "configs", config_file),
                                     config_file[:-3])
  config = planner.with_overrides(module.get_config(arg),
                                  {**overrides, "model.scan_layers": scan})
  result = planner.compile_for_topology(config, topology, programs=("train_step",))
  row = result["programs"]["train_step"]
  return {"compile_s": row["compile_s"], "peak_gib": row["peak"] / GiB,
          "temporaries_gib": row["temporaries"] / GiB, "tflop": row["flops"] / 1e12,
          "fits": bool(row["fits"])}


def measure(case: str, scan: bool) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "MUSE_JAX_TEST_CACHE")}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={case}",
                        f"--scan={int(scan)}"], env=env, check=True, capture_output=True,
                       text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default=",".join(TARGETS),
                      help=f"comma-separated, from {', '.join(CASES)}")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--scan", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(compile_one(args.child, bool(args.scan))))
    return
  cases = args.cases.split(",")
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f"--cases: {unknown} unknown; use some of {sorted(CASES)}")
  load = os.getloadavg()[0]
  ratios = {}
  for case in cases:
    scanned, unrolled = measure(case, True), measure(case, False)
    ratios[case] = {
        "compile_time": round(scanned["compile_s"] / unrolled["compile_s"], 3),
        "peak_memory": round(scanned["peak_gib"] / unrolled["peak_gib"], 3)}
    print(json.dumps({"case": case, "config": CASES[case][0], "arg": CASES[case][1],
                      "slice": CASES[case][2], "overrides": CASES[case][3],
                      "scanned": _rounded(scanned), "unrolled": _rounded(unrolled),
                      **ratios[case]}), flush=True)
  targets = [ratios[case] for case in cases if case in TARGETS]

  def met(key: str, limit: float) -> bool | None:   # None: no target case ran
    return all(r[key] <= limit for r in targets) if targets else None

  print(json.dumps({"cpu_cores": os.cpu_count(), "load_average_1m_before": round(load, 2),
                    "ratios": ratios, "compile_time_ok": met("compile_time", 0.25),
                    "peak_memory_ok": met("peak_memory", 1.05)}))


def _rounded(row: dict) -> dict:
  return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


if __name__ == "__main__":
  main()
