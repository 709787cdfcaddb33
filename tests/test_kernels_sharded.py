"""The kernels' shard_map paths on a 4-device CPU mesh (tests/multidevice/kernels_sharded.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent / "multidevice" / "kernels_sharded.py"


def test_sharded_kernels_match_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stdout + out.stderr
  assert out.stdout.count(": ok") == 2 and "gradients ok" in out.stdout
