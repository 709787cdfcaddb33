"""Host memory of loading converted decoder weights onto an fsdp=8 mesh, side by side.

Writes a random decoder of ~470 MB in the weights format (``muse_jax.weights``),
then loads it onto 8 forced CPU devices in fresh subprocesses
(``tests/multidevice/load_pretrained.py``) two ways: ``weights.load_pretrained``
(each device reads its own slice) and the path it replaces (the whole model on
one device, then ``jax.device_put`` onto the shardings). On CPU the devices'
buffers are host memory too, so the figure compared is the resident memory
beyond the loaded shards at the peak. Last field: ours / whole-first.

  python benchmarks/bench_load_pretrained.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from muse_jax.convert import checkpoint  # noqa: E402
from muse_jax.models import qwen2  # noqa: E402

CONFIG = qwen2.Qwen2Config(vocab_size=32000, hidden_size=1024, num_layers=8, num_heads=8,
                           num_kv_heads=2, mlp_dim=2816, tie_word_embeddings=False)
SCRIPT = os.path.join(ROOT, "tests", "multidevice", "load_pretrained.py")


def _load(weights_dir: str, out: str, *flags: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, MALLOC_ARENA_MAX="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  subprocess.run([sys.executable, SCRIPT, f"--weights={weights_dir}", f"--out={out}", *flags],
                 check=True, env=env, capture_output=True)
  with open(out) as f:
    r = json.load(f)
  assert not r["mismatched"], r["mismatched"]
  r["beyond_shards"] = r["peak_rss"] - r["rss_before"] - sum(r["device_bytes"])
  return r


def main() -> None:
  argparse.ArgumentParser(description=__doc__).parse_args()
  rng = np.random.default_rng(0)
  shapes = checkpoint.param_shapes(checkpoint.abstract_model(CONFIG))
  with tempfile.TemporaryDirectory() as root:
    weights_dir = os.path.join(root, "decoder")
    checkpoint.save(weights_dir, CONFIG, ((path, rng.normal(0, 0.02, shape).astype(dtype))
                                          for path, (shape, dtype) in shapes.items()))
    ours = _load(weights_dir, os.path.join(root, "ours.json"))
    peer = _load(weights_dir, os.path.join(root, "peer.json"), "--whole_first")
  mb = 2**20
  print(json.dumps({
      "benchmark": "load_pretrained_fsdp8_host_memory",
      "weights_mb": round(ours["total_bytes"] / mb, 1),
      "largest_tensor_mb": round(ours["largest_tensor_bytes"] / mb, 1),
      "per_device_mb": round(max(ours["device_bytes"]) / mb, 1),
      "ours: beyond_shards_mb": round(ours["beyond_shards"] / mb, 1),
      "whole_first: beyond_shards_mb": round(peer["beyond_shards"] / mb, 1),
      "ours_over_whole_first": round(ours["beyond_shards"] / peer["beyond_shards"], 3)}))


if __name__ == "__main__":
  main()
