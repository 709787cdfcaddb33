"""Loads converted decoder weights onto an fsdp mesh and reports device bytes and host memory.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/load_pretrained.py \
      --weights=/tmp/converted --out=/tmp/load.json

``--whole_first`` measures the path this replaces instead: the decoder is built
on one device (``checkpoint.load`` without a mesh, as ``hf.load_qwen2`` does), then
``jax.device_put`` onto the same shardings.

Writes a JSON object: ``devices``; ``device_bytes`` (bytes each device holds
after loading); ``total_bytes`` and ``largest_tensor_bytes`` of the weights;
``rss_before`` and ``peak_rss`` (host resident memory just before loading and the
highest seen while loading: sampled every millisecond, and exact from VmHWM when
the process's peak was reached while loading);
``mismatched`` (tensors whose loaded values differ from the stored ones, checked
one tensor at a time after the measurement).

On CPU the "devices" are host memory too, so the loaded shards themselves are part
of the RSS: what the host holds beyond them while loading is ``peak_rss -
rss_before - sum(device_bytes)``. Before measuring, one small tensor is loaded
onto the same mesh, so that the thread pools of tensorstore and of XLA's
transfers exist already (they are the runtime's, not the load's).

Run it with ``MALLOC_ARENA_MAX=2`` (the test does): glibc otherwise gives each of
those threads its own arena, and freed slices stay mapped there, so RSS grows by
memory that is free but not returned to the system (~70 MB more here).
"""

import argparse
import json
import os
import sys
import tempfile
import threading

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from muse_jax import weights  # noqa: E402
from muse_jax.convert import checkpoint  # noqa: E402
from muse_jax.convert.__main__ import peak_rss_mb  # noqa: E402
from muse_jax.parallel import sharding  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * PAGE


class PeakSampler:
  """The highest RSS seen by a thread polling /proc every millisecond."""

  def __init__(self):
    self.peak = rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(0.001):
      self.peak = max(self.peak, rss())

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return max(self.peak, rss())


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--weights", required=True)
  parser.add_argument("--fsdp", type=int, default=8)
  parser.add_argument("--whole_first", action="store_true")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  config = checkpoint.read_config(args.weights)
  mesh = sharding.make_mesh(sharding.mesh_config(data=1, fsdp=args.fsdp, tensor=1),
                            jax.devices()[:args.fsdp])
  abstract = nnx.state(checkpoint.abstract_model(config), nnx.Param)
  abstract = sharding.with_shardings(abstract, sharding.shardings(abstract, mesh))
  index = weights.read_index(args.weights)
  sizes = {n: int(np.prod(t.shape)) * t.dtype.itemsize for n, t in index.tensors.items()}
  with tempfile.TemporaryDirectory() as warm:
    weights.save(f"{warm}/w", {"x": np.ones((64, 64), np.float32)})
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    jax.block_until_ready(weights.load_pretrained(
        f"{warm}/w", {"x": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=spec)}))

  max_before = peak_rss_mb()
  before = rss()
  sampler = PeakSampler()
  if args.whole_first:
    whole = nnx.state(checkpoint.load(args.weights), nnx.Param)
    params = jax.device_put(whole, sharding.shardings(abstract, mesh))
    jax.block_until_ready(params)
    del whole
  else:
    params = weights.load_pretrained(args.weights, abstract)
    jax.block_until_ready(params)
  peak = sampler.stop()
  max_after = peak_rss_mb()
  if max_after > max_before:     # the process's peak was reached while loading: exact
    peak = max(peak, int(max_after * 2**20))

  device_bytes = {d.id: 0 for d in mesh.devices.flat}
  for leaf in jax.tree.leaves(params):
    for shard in leaf.addressable_shards:
      device_bytes[shard.device.id] += shard.data.nbytes

  mismatched = []
  for name, leaf in weights.named_leaves(params):
    if not np.array_equal(np.asarray(leaf.get_value()), weights.read(args.weights, name)):
      mismatched.append(name)
  with open(args.out, "w") as f:
    json.dump(dict(devices=len(device_bytes), device_bytes=list(device_bytes.values()),
                   total_bytes=sum(sizes.values()), largest_tensor_bytes=max(sizes.values()),
                   rss_before=before, peak_rss=peak, mismatched=mismatched), f)


if __name__ == "__main__":
  main()
