"""Will a config fit a TPU slice? Compile its real programs for the slice, on a CPU.

  pip install -e .[tpu]        # libtpu: the TPU compiler, no TPU needed
  python -m muse_jax.compile --config=configs/sde_256.py --topology=v5p-128
  python -m muse_jax.compile --config=configs/muse_vl.py:qwen2.5-7b --topology=v6e-64 \
      --config.mesh.fsdp=16 --config.mesh.data=-1

``--topology`` takes Cloud TPU slice names (``v5p-128`` counts TensorCores, two
per v5p chip; ``v5litepod-16`` / ``v5e-16`` and ``v6e-64`` count chips) or a
raw ``v5p:4x4x4``; ``--num_slices`` > 1 makes a multi-slice (DCN) system, with
data parallelism across slices unless ``config.mesh.dcn_*`` says otherwise.

``jax.experimental.topologies`` describes the slice's devices; the stage's own
``setup`` (``muse_jax/train/stages.py``) builds the mesh over them, and its
initialiser and train step are lowered with abstract (shape-only) arguments and
compiled by XLA:TPU. Nothing is allocated. Per device it prints what XLA reports:
arguments, outputs, the part of the outputs aliased to donated arguments,
temporaries, code, and the peak (arguments + outputs - aliased + temporaries +
code) against the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from muse_jax import config_lib
from muse_jax.parallel import sharding
from muse_jax.train import stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/sde_256.py",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v5e-16, v6e-64, "
                                "or v5p:4x4x4")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
_PROGRAMS = flags.DEFINE_list("programs", ["init", "train_step"],
                              "Which programs to compile (init alone is quick: it shows the "
                              "sharded state fits without compiling the backward pass).")
flags.mark_flags_as_required(["config", "topology"])

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  jax_name: str          # topology prefix jax.experimental.topologies understands
  hbm_bytes: int
  cores_per_chip: int    # how many TensorCores a slice name counts per chip
  dims: int              # torus dimensions


CHIPS = {
    "v5p": Chip("v5p", 95 * GiB, 2, 3),
    "v5e": Chip("v5e", 16 * GiB, 1, 2),
    "v5litepod": Chip("v5e", 16 * GiB, 1, 2),
    "v6e": Chip("v6e", 32 * GiB, 1, 2),
}


class TopologyError(ValueError):
  """A slice name this tool cannot turn into a topology."""


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Chip grid of a standard slice: from one host (2x2 or 2x2x1) by doubling the shortest side."""
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    shortest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == shortest)
    shape[last] *= 2
  if math.prod(shape) != chips:
    raise TopologyError(f"{chips} chips is not a standard slice size (use a power of two, at "
                        "least one host of 4 chips)")
  return tuple(shape)


def parse_topology(name: str) -> tuple[Chip, str]:
  """``v5p-128`` / ``v5e-16`` / ``v6e:8x8`` -> (chip, ``v5p:4x4x8``-style jax topology name)."""
  match = re.fullmatch(r"(v5p|v5e|v5litepod|v6e)([-:])([0-9x]+)", name.strip().lower())
  if not match:
    raise TopologyError(f"--topology={name!r}: use <chip>-<size> or <chip>:<AxBxC> with chip one "
                        f"of {sorted(CHIPS)}, e.g. v5p-128, v5e-16, v6e-64, v5p:4x4x4")
  chip = CHIPS[match.group(1)]
  if match.group(2) == ":":
    return chip, f"{chip.jax_name}:{match.group(3)}"
  size = int(match.group(3))
  if size % chip.cores_per_chip:
    raise TopologyError(f"--topology={name!r}: {match.group(1)} sizes count {chip.cores_per_chip} "
                        "cores per chip; use an even size")
  shape = slice_shape(size // chip.cores_per_chip, chip.dims)
  return chip, f"{chip.jax_name}:{'x'.join(map(str, shape))}"


def tpu_devices(topology: str, num_slices: int):
  # libtpu locks /tmp/libtpu_lockfile so that two processes never drive one TPU; a
  # compile-only process drives none, and must not fail beside a run or another compile
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        num_slices=num_slices)
  except Exception as e:  # libtpu missing or the name rejected: say which
    raise TopologyError(f"cannot describe TPU topology {topology!r} x{num_slices}: {e}. Is libtpu "
                        "installed (pip install -e .[tpu])?") from e
  return desc.devices


def memory_report(compiled, hbm_bytes: int) -> dict[str, float]:
  m = compiled.memory_analysis()
  row = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  row["peak"] = (row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]
                 + row["code"])
  row["fits"] = row["peak"] <= hbm_bytes
  return row


def compile_for_topology(config, topology: str, num_slices: int = 1,
                         programs: tuple[str, ...] = ("init", "train_step")) -> dict:
  """Compiles the config's programs for the slice; returns the mesh and per-program reports."""
  chip, jax_topology = parse_topology(topology)
  devices = tpu_devices(jax_topology, num_slices)
  mesh_config = config.mesh
  if num_slices > 1 and math.prod(mesh_config[f"dcn_{a}"] for a in sharding.MESH_AXES) == 1:
    mesh_config = mesh_config.copy_and_resolve_references()
    mesh_config.dcn_data = num_slices
  mesh = sharding.make_mesh(mesh_config, devices)
  run = stages.stage_module(config.get("trainer")).setup(config, mesh)
  reports = {}
  available = run.aot_programs(config)
  unknown = sorted(set(programs) - set(available))
  if unknown:
    raise config_lib.ConfigError(f"--programs: {unknown} unknown; use some of {sorted(available)}")
  for name in programs:
    fn, args = available[name]
    reports[name] = memory_report(fn.lower(*args).compile(), chip.hbm_bytes)
  return {"topology": jax_topology, "num_slices": num_slices, "devices": len(devices),
          "device_kind": devices[0].device_kind, "hbm_bytes": chip.hbm_bytes,
          "mesh": dict(mesh.shape), "programs": reports}


def format_report(result: dict) -> str:
  peak = max(r["peak"] for r in result["programs"].values())
  unit, scale = ("GiB", GiB) if peak >= GiB else ("MiB", 1024 ** 2)
  lines = [f"{result['devices']} x {result['device_kind']} ({result['topology']}, "
           f"{result['num_slices']} slice(s)), HBM {result['hbm_bytes'] / GiB:.0f} GiB per chip, "
           f"mesh {result['mesh']}",
           f"per device, {unit}:   arguments  outputs  aliased    temps     code     peak  fits"]
  for name, r in result["programs"].items():
    lines.append(f"  {name:<14} " + " ".join(f"{r[k] / scale:8.2f}" for k in (
        "arguments", "outputs", "aliased", "temporaries", "code", "peak"))
        + f"  {'yes' if r['fits'] else 'NO'}")
  return "\n".join(lines)


def main(argv):
  del argv
  try:
    result = compile_for_topology(_CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value,
                                  tuple(_PROGRAMS.value))
  except (config_lib.ConfigError, TopologyError, sharding.MeshError) as e:
    sys.exit(f"error: {e}")
  print(format_report(result))
  if not all(r["fits"] for r in result["programs"].values()):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
