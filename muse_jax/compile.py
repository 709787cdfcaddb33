"""Will a config fit a TPU slice, and how fast would it train? Compile its real programs
for the slice, on a CPU.

  pip install -e .[tpu]        # libtpu: the TPU compiler, no TPU needed
  python -m muse_jax.compile --config=configs/sde_256.py --topology=v5p-128
  python -m muse_jax.compile --config=configs/muse_vl.py:qwen2.5-7b --topology=v6e-64 \
      --config.mesh.fsdp=16 --config.mesh.data=-1 --mfu=0.5

``--topology`` takes Cloud TPU slice names (``v4-32`` and ``v5p-128`` count
TensorCores, two per chip; ``v5litepod-16`` / ``v5e-16`` and ``v6e-64`` count
chips) or a raw ``v5p:4x4x4``; ``--num_slices`` > 1 makes a multi-slice (DCN)
system, with data parallelism across slices unless ``config.mesh.dcn_*`` says
otherwise.

``jax.experimental.topologies`` describes the slice's devices (one per chip); the
stage's own ``setup`` (``muse_jax/train/stages.py``) builds the mesh over them, and
its initialiser and train step are lowered with abstract (shape-only) arguments
and compiled by XLA:TPU. Nothing is allocated. Per device it prints what XLA
reports: arguments, outputs, the part of the outputs aliased to donated
arguments, temporaries, code, and the peak (arguments + outputs - aliased +
temporaries + code) against the chip's HBM; then the compile time, the FLOPs one
device runs per call, and the step time and throughput those FLOPs predict at a
given model FLOPs utilisation (``--mfu``) of the chip's peak bf16 rate.

When a program does not fit (XLA:TPU refuses to compile one whose temporaries
exceed HBM; its error names both sizes) the row says so, and the planner lists
changes that may fit: more chips, more fsdp or tensor parallelism, layer remat, a
smaller batch. ``--suggest`` compiles each of them and says which fit. Exit
status 1 when something does not fit.

``--remat_policy=NAME`` compiles with that ``config.model.remat_policy``
(``muse_jax.models.stack.REMAT_POLICIES``); ``--remat_policy=sweep`` compiles the
train step once per policy and prints each one's peak memory against its
predicted step time (recomputation costs FLOPs: the least remat that fits is the
fastest), then exits.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from muse_jax import config_lib
from muse_jax.models import stack
from muse_jax.parallel import sharding
from muse_jax.train import stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/sde_256.py",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v5e-16, v6e-64, "
                                "v4-32, or v5p:4x4x4")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
_PROGRAMS = flags.DEFINE_list("programs", ["init", "train_step"],
                              "Which programs to compile (init alone is quick: it shows the "
                              "sharded state fits without compiling the backward pass).")
_MFU = flags.DEFINE_float("mfu", 0.40, "Model FLOPs utilisation the predicted step time assumes: "
                          "the fraction of the chip's peak bf16 FLOP/s a step achieves.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Plan against this much HBM per chip instead of "
                               "the chip's own, e.g. to keep headroom (XLA still compiles for "
                               "the real chip, so only less helps).")
_SUGGEST = flags.DEFINE_bool("suggest", False, "When a program does not fit, compile each "
                             "suggested change and say which fit.")
_REMAT_POLICY = flags.DEFINE_string(
    "remat_policy", None, f"Compile with this config.model.remat_policy "
    f"({', '.join(stack.REMAT_POLICIES)}), or 'sweep': the train step once per policy, "
    "peak memory against predicted step time.")
flags.mark_flags_as_required(["config", "topology"])

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  jax_name: str          # topology prefix jax.experimental.topologies understands
  hbm_bytes: int
  cores_per_chip: int    # how many TensorCores a slice name counts per chip
  dims: int              # torus dimensions
  peak_bf16_flops: float  # dense bf16 FLOP/s of one chip
  max_chips: int         # the largest single slice
  chip_config: str | None = None  # libtpu's name for one device per chip where that is not
                                  # its default (v4 runs its two cores as one, "megacore")


# Per chip, from the Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e): HBM capacity, peak bf16 compute, TensorCores, largest slice.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 2, 3, 275e12, 4096, chip_config="megacore"),
    "v5p": Chip("v5p", 95 * GiB, 2, 3, 459e12, 8960),
    "v5e": Chip("v5e", 16 * GiB, 1, 2, 197e12, 256),
    "v5litepod": Chip("v5e", 16 * GiB, 1, 2, 197e12, 256),
    "v6e": Chip("v6e", 32 * GiB, 1, 2, 918e12, 256),
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
  match = re.fullmatch(rf"({'|'.join(CHIPS)})([-:])([0-9x]+)", name.strip().lower())
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


def tpu_devices(chip: Chip, topology: str, num_slices: int):
  # libtpu locks /tmp/libtpu_lockfile so that two processes never drive one TPU; a
  # compile-only process drives none, and must not fail beside a run or another compile
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  extra = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        num_slices=num_slices, **extra)
  except Exception as e:  # libtpu missing or the name rejected: say which
    raise TopologyError(f"cannot describe TPU topology {topology!r} x{num_slices}: {e}. Is libtpu "
                        "installed (pip install -e .[tpu])?") from e
  return desc.devices


def human_bytes(size: float) -> str:
  if math.isnan(size):   # XLA refused without saying how much
    return "more than XLA could place"
  return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / 1024 ** 2:.2f} MiB"


def memory_report(compiled, hbm_bytes: int) -> dict[str, float]:
  m = compiled.memory_analysis()
  row = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  row["peak"] = (row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]
                 + row["code"])
  row["available"] = hbm_bytes
  row["fits"] = row["peak"] <= hbm_bytes
  return row


# XLA:TPU's refusal, e.g. "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory
# required for HLO temporaries (23.98G) exceeds available HBM (15.75G)."; sizes are binary
_REFUSED = re.compile(r"required for HLO \w+ \((?P<required>[0-9.]+[KMGTP]?)B?\) "
                      r"exceeds available HBM \((?P<available>[0-9.]+[KMGTP]?)B?\)")
_BINARY_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4, "P": 1024 ** 5}


def _xla_bytes(text: str) -> float:
  """``"23.98G"`` (XLA's human-readable size, powers of 1024) -> bytes."""
  unit = text[-1] if text[-1] in _BINARY_UNITS else ""
  return float(text[:len(text) - len(unit)]) * _BINARY_UNITS[unit]


def refused_report(message: str, hbm_bytes: int) -> dict[str, float] | None:
  """The row of a program XLA refused to compile for lack of HBM (None: another error).

  XLA names only what it could not place (the temporaries) and the HBM left for
  them; those are the row's temporaries, peak and available bytes.
  """
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  match = _REFUSED.search(message)
  row = {k: math.nan for k in ("arguments", "outputs", "aliased", "temporaries", "code", "peak",
                               "flops")}
  row["available"] = hbm_bytes
  if match:
    row["temporaries"] = row["peak"] = _xla_bytes(match.group("required"))
    row["available"] = min(hbm_bytes, _xla_bytes(match.group("available")))
  row["fits"] = False
  return row


# -- FLOPs ------------------------------------------------------------------------------------
# ``compiled.cost_analysis()["flops"]`` counts what one device runs (a program split over 4
# devices reports a quarter of the whole), but it counts the body of every while loop once,
# whatever its trip count: a scan of 10 matmuls reports one. The loops here (the chunked
# cross-entropy, scanned layers) are matmuls, so the optimised HLO's loops are walked and
# their matmul FLOPs added for the remaining iterations.

_HLO_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_HLO_CALLS = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%([^\s,)]+)")


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  shape: str
  opcode: str
  rest: str        # operands and attributes

  def operands(self) -> list[str]:
    return re.findall(r"%([^\s,)]+)", self.rest.split("), ")[0])

  def attribute(self, key: str) -> str | None:
    match = re.search(rf"\b{key}=%?([^\s,]+)", self.rest)
    return match.group(1) if match else None


def _dims(shape: str) -> list[int]:
  match = re.match(r"\w+\[([0-9,]*)\]", shape)
  return [int(d) for d in match.group(1).split(",") if d] if match else []


def _window(rest: str, spatial: int) -> list[tuple[int, tuple[int, int], int, int]]:
  """(stride, (pad low, pad high), lhs dilation, rhs dilation) per spatial dimension of a
  convolution's ``window={size=3x3 stride=2x2 pad=1_1x1_1 lhs_dilate=... rhs_dilate=...}``."""
  match = re.search(r"window=\{([^}]*)\}", rest)
  fields = dict(f.split("=", 1) for f in match.group(1).split()) if match else {}

  def per_dim(key, default):
    return ([int(v) if "_" not in v else tuple(int(p) for p in v.split("_"))
             for v in fields[key].split("x")] if key in fields else [default] * spatial)

  return list(zip(per_dim("stride", 1), per_dim("pad", (0, 0)), per_dim("lhs_dilate", 1),
                  per_dim("rhs_dilate", 1)))


def _window_terms(size: int, out: int, window: int, stride: int, pad_lo: int,
                  lhs_dilate: int, rhs_dilate: int) -> int:
  """Pairs (output position, window position) of one dimension that read an input element:
  position ``o * stride + w * rhs_dilate - pad_lo`` of the dilated input, which holds the
  input at multiples of ``lhs_dilate`` up to ``(size - 1) * lhs_dilate``."""
  last = (size - 1) * lhs_dilate
  total = 0
  for w in range(window):
    start = w * rhs_dilate - pad_lo   # the position output 0 reads
    if lhs_dilate == 1:   # outputs o with 0 <= start + o * stride <= last
      first = max(0, -(-(-start) // stride))
      total += max(0, min(out - 1, (last - start) // stride) - first + 1) if last >= start else 0
    else:
      total += sum(1 for o in range(out)
                   if 0 <= start + o * stride <= last and (start + o * stride) % lhs_dilate == 0)
  return total


class HloFlops:
  """Matmul FLOPs of an optimised HLO module (``compiled.as_text()``), loops counted per
  iteration: ``loop_extra()`` is what ``cost_analysis`` leaves out."""

  def __init__(self, hlo_text: str):
    self.computations: dict[str, list[_Instruction]] = {}
    self.instructions: dict[str, _Instruction] = {}
    self.entry = None
    self.unknown_loops = 0
    self._flops: dict[tuple[str, bool], float] = {}
    body = None
    for line in hlo_text.splitlines():
      header = _HLO_COMPUTATION.match(line)
      if header:
        body = self.computations.setdefault(header.group(2), [])
        if header.group(1):
          self.entry = header.group(2)
        continue
      instruction = _HLO_INSTRUCTION.match(line)
      if instruction and body is not None:
        ins = _Instruction(*instruction.groups())
        body.append(ins)
        self.instructions[ins.name] = ins

  def _matmul(self, ins: _Instruction) -> float:
    if ins.opcode == "dot":
      lhs = _dims(self.instructions[ins.operands()[0]].shape)
      contracted = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.rest).group(1)
      return 2.0 * math.prod(_dims(ins.shape)) * math.prod(
          lhs[int(d)] for d in contracted.split(",") if d)
    if ins.opcode == "convolution":
      # each output element is a dot over the kernel's input features and the window
      # positions that fall on the input, not on its padding. XLA:TPU writes some batched
      # dots as a convolution whose window slides over zero padding (window 28, padding
      # 27 each side: one real term per output), so padding must not be counted.
      lhs_labels, kernel_labels, out_labels = re.search(
          r"dim_labels=(\w+)_(\w+)->(\w+)", ins.rest).groups()
      lhs = _dims(self.instructions[ins.operands()[0]].shape)
      kernel = _dims(self.instructions[ins.operands()[1]].shape)
      out = _dims(ins.shape)
      window = _window(ins.rest, sum(c.isdigit() for c in kernel_labels))
      terms = 1
      for d, (stride, (pad_lo, _), lhs_dilate, rhs_dilate) in enumerate(window):
        terms *= _window_terms(lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))],
                               kernel[kernel_labels.index(str(d))], stride, pad_lo,
                               lhs_dilate, rhs_dilate)
      return (2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * terms
              * kernel[kernel_labels.index("i")])
    return 0.0

  def _source(self, name: str) -> _Instruction | None:
    """The instruction a value comes from, through copies and bitcasts."""
    ins = self.instructions.get(name)
    while ins is not None and ins.opcode in ("copy", "bitcast", "convert") and ins.operands():
      ins = self.instructions.get(ins.operands()[0])
    return ins

  def _constant(self, name: str) -> int | None:
    ins = self._source(name)
    if ins is None or ins.opcode != "constant":
      return None
    try:
      return int(ins.rest.split(")")[0])
    except ValueError:   # not an integer scalar
      return None

  def _gte_index(self, name: str) -> int | None:
    ins = self._source(name)
    if ins is None or ins.opcode != "get-tuple-element":
      return None
    return int(ins.attribute("index"))

  def trip_count(self, loop: _Instruction) -> int | None:
    """Iterations of a ``while``: XLA's known_trip_count, else its ``i < N`` pattern
    (induction variable i in the loop tuple, set from a constant, stepped by a constant)."""
    known = re.search(r'"known_trip_count":\{"n":"([0-9]+)"', loop.rest)
    if known:
      return int(known.group(1))
    compare = self.computations[loop.attribute("condition")][-1]
    if compare.opcode != "compare" or compare.attribute("direction") != "LT":
      return None
    index, limit = (self._gte_index(compare.operands()[0]),
                    self._constant(compare.operands()[1]))
    root = self.computations[loop.attribute("body")][-1]
    init = self.instructions.get(loop.operands()[0])
    if None in (index, limit, init) or root.opcode != "tuple" or init.opcode != "tuple":
      return None
    step = self.instructions.get(root.operands()[index])
    if step is None or step.opcode != "add":
      return None
    a, b = step.operands()
    stride = self._constant(b) if self._gte_index(a) == index else (
        self._constant(a) if self._gte_index(b) == index else None)
    start = self._constant(init.operands()[index])
    if stride is None or start is None or stride <= 0:
      return None
    return max(0, -(-(limit - start) // stride))

  def flops(self, computation: str, per_iteration: bool) -> float:
    """Matmul FLOPs of ``computation`` and what it calls; loop bodies once, or
    ``per_iteration`` times their trip count."""
    key = (computation, per_iteration)
    if key in self._flops:
      return self._flops[key]
    total = 0.0
    for ins in self.computations[computation]:
      total += self._matmul(ins)
      if ins.opcode == "while":
        trips = self.trip_count(ins) if per_iteration else 1
        if trips is None:
          self.unknown_loops += 1
          trips = 1
        total += trips * self.flops(ins.attribute("body"), per_iteration)
      elif ins.opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
        if branches:
          total += max(self.flops(b.strip().lstrip("%"), per_iteration)
                       for b in branches.group(1).split(","))
      total += sum(self.flops(c, per_iteration) for c in _HLO_CALLS.findall(ins.rest))
    self._flops[key] = total
    return total

  def loop_extra(self) -> float:
    return self.flops(self.entry, True) - self.flops(self.entry, False)


def program_flops(compiled) -> tuple[float, int]:
  """(FLOPs one device runs per call, loops whose trip count was not found: counted once)."""
  hlo = HloFlops(compiled.as_text())
  extra = hlo.loop_extra()
  return compiled.cost_analysis()["flops"] + extra, hlo.unknown_loops


def compile_program(fn, args, hbm_bytes: int) -> dict[str, float]:
  """One program's row: memory, compile seconds, FLOPs per device (NaN when refused)."""
  import jax
  start = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    row = refused_report(str(e), hbm_bytes)
    if row is None:
      raise
  else:
    row = memory_report(compiled, hbm_bytes)
    row["flops"], row["unknown_loops"] = program_flops(compiled)
  row["compile_s"] = time.perf_counter() - start
  return row


def compile_for_topology(config, topology: str, num_slices: int = 1,
                         programs: tuple[str, ...] = ("init", "train_step"),
                         hbm_bytes: int | None = None) -> dict:
  """Compiles the config's programs for the slice; returns the mesh and per-program reports.
  ``hbm_bytes``: what a chip may use (default: all its HBM)."""
  chip, jax_topology = parse_topology(topology)
  if hbm_bytes is not None and not 0 < hbm_bytes <= chip.hbm_bytes:
    raise config_lib.ConfigError(f"--hbm_gib={hbm_bytes / GiB:g}: give more than 0 and at most "
                                 f"the {chip.hbm_bytes / GiB:g} GiB of a {topology} chip")
  hbm_bytes = hbm_bytes or chip.hbm_bytes
  devices = tpu_devices(chip, jax_topology, num_slices)
  mesh_config = config.mesh
  if num_slices > 1 and math.prod(mesh_config[f"dcn_{a}"] for a in sharding.MESH_AXES) == 1:
    mesh_config = mesh_config.copy_and_resolve_references()
    mesh_config.dcn_data = num_slices
  mesh = sharding.make_mesh(mesh_config, devices)
  run = stages.stage_module(config.get("trainer")).setup(config, mesh)
  available = run.aot_programs(config)
  unknown = sorted(set(programs) - set(available))
  if unknown:
    raise config_lib.ConfigError(f"--programs: {unknown} unknown; use some of {sorted(available)}")
  reports = {name: compile_program(*available[name], hbm_bytes) for name in programs}
  items, unit = run.step_items(config)
  return {"topology": jax_topology, "num_slices": num_slices, "devices": len(devices),
          "device_kind": devices[0].device_kind, "hbm_bytes": hbm_bytes,
          "peak_flops": chip.peak_bf16_flops, "mesh": dict(mesh.shape),
          "ici_mesh": {a: mesh.shape[a] // mesh_config[f"dcn_{a}"] for a in sharding.MESH_AXES},
          "items_per_step": items, "item_unit": unit, "programs": reports}


def predict(row: dict, result: dict, mfu: float) -> tuple[float, float]:
  """(seconds per call, items per second) of a program at ``mfu`` of the chip's peak."""
  seconds = row["flops"] / (mfu * result["peak_flops"])
  return seconds, result["items_per_step"] / seconds if seconds > 0 else math.nan


def format_report(result: dict, mfu: float) -> str:
  rows = result["programs"]
  peak = max((r["peak"] for r in rows.values() if not math.isnan(r["peak"])), default=0)
  unit, scale = ("GiB", GiB) if peak >= GiB else ("MiB", 1024 ** 2)
  per_s = f"{result['item_unit']}/s"
  lines = [f"{result['devices']} x {result['device_kind']} ({result['topology']}, "
           f"{result['num_slices']} slice(s)), HBM {result['hbm_bytes'] / GiB:.4g} GiB per chip, "
           f"mesh {result['mesh']}",
           f"per device: memory in {unit}, TFLOP per call as XLA:TPU counts them (loops times "
           f"their trips); step time and global {per_s} ({result['items_per_step']} "
           f"{result['item_unit']} per step) at {mfu:.0%} of "
           f"{result['peak_flops'] / 1e12:.0f} bf16 TFLOP/s per chip",
           f"{'':16} arguments  outputs  aliased    temps     code     peak      HBM  fits"
           f"  compile s     TFLOP    step ms  {per_s:>10}"]
  for name, r in rows.items():
    memory = " ".join("       -" if math.isnan(r[k]) else f"{r[k] / scale:8.2f}" for k in (
        "arguments", "outputs", "aliased", "temporaries", "code", "peak", "available"))
    if math.isnan(r["flops"]):
      speed = f"{'-':>9} {'-':>10} {'-':>10}"
    else:
      seconds, rate = predict(r, result, mfu)
      speed = f"{r['flops'] / 1e12:9.4g} {seconds * 1e3:10.4g} " + (
          f"{rate:10.4g}" if name == "train_step" else f"{'-':>10}")
    lines.append(f"  {name:<14} {memory}  {'yes' if r['fits'] else 'no':>4}"
                 f" {r['compile_s']:10.1f} {speed}")
  if any(r.get("unknown_loops") for r in rows.values()):
    lines.append("some loops' trip counts were not found: their bodies count once, so FLOPs "
                 "and step times are lower bounds")
  return "\n".join(lines)


# -- what may fit -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Suggestion:
  why: str
  overrides: dict          # config path -> value
  topology: str
  num_slices: int

  def flags(self, config, topology: str, num_slices: int) -> str:
    """The command-line flags that differ from the run's."""
    out = [] if self.topology == topology else [f"--topology={self.topology}"]
    if self.num_slices != num_slices:
      out.append(f"--num_slices={self.num_slices}")
    out += [f"--config.{path}={value}" for path, value in self.overrides.items()
            if _get(config, path) != value]
    return " ".join(out)


def _get(config, path: str):
  for key in path.split("."):
    config = config[key]
  return config


def with_overrides(config, overrides: dict):
  """A copy of ``config`` with ``{"mesh.fsdp": -1, ...}`` set."""
  config = config.copy_and_resolve_references()
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config


def shortfall(result: dict) -> int:
  """The power of two (at least 2) by which the worst program's peak exceeds its HBM."""
  ratios = [r["peak"] / r["available"] for r in result["programs"].values()
            if not r["fits"] and not math.isnan(r["peak"])]
  return 2 ** max(1, math.ceil(math.log2(max(ratios, default=2.0))))


SCALABLE = ("chips", "batch")   # kinds whose memory keeps shrinking with a larger factor


def suggestions(config, topology: str, num_slices: int, result: dict,
                factor: int) -> dict[str, Suggestion]:
  """{kind: change} that may cut per-chip memory by ``factor``: more chips, a smaller
  batch, fsdp instead of data or more tensor parallelism, layer remat. Only the first
  and third when the initialiser alone does not fit: it holds the state, no batch."""
  chip, _ = parse_topology(topology)
  ici, mesh = result["ici_mesh"], result["mesh"]
  shards = mesh["data"] * mesh["fsdp"]
  chips = result["devices"] // num_slices
  state_only = all(r["fits"] for name, r in result["programs"].items() if name != "init")
  out = {}
  if config.batch_size % (shards * factor) == 0:
    spread = {"mesh.data": ici["data"], "mesh.fsdp": -1, "mesh.tensor": ici["tensor"]}
    if chips * factor <= chip.max_chips:
      out["chips"] = Suggestion(f"{factor}x the chips, the new ones in fsdp", spread,
                                f"{chip.jax_name}-{chips * factor * chip.cores_per_chip}",
                                num_slices)
    else:
      out["chips"] = Suggestion(f"{factor}x the slices", spread, topology, num_slices * factor)
    if not state_only:
      out["batch"] = Suggestion(
          f"{factor}x smaller batch: {config.batch_size // shards} -> "
          f"{config.batch_size // shards // factor} rows per batch shard (a smaller global "
          "batch)", {"batch_size": config.batch_size // factor}, topology, num_slices)
  if ici["data"] > 1:
    out["fsdp"] = Suggestion("fsdp instead of data: the state split over the chips, not copied",
                             {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": ici["tensor"]},
                             topology, num_slices)
  elif ici["fsdp"] > 1:
    out["tensor"] = Suggestion(f"tensor {2 * ici['tensor']}: heads and MLP units split too",
                               {"mesh.fsdp": -1, "mesh.tensor": 2 * ici["tensor"]},
                               topology, num_slices)
  if not state_only and config.model.get("remat_policy", "full") != "full":
    out["remat"] = Suggestion("layer remat: each layer recomputed in the backward pass",
                              {"model.remat_policy": "full"}, topology, num_slices)
  return out


def sweep_remat(config, topology: str, num_slices: int = 1,
                hbm_bytes: int | None = None) -> dict[str, dict]:
  """{policy: compile_for_topology result of the train step} for every remat policy."""
  return {policy: compile_for_topology(with_overrides(config, {"model.remat_policy": policy}),
                                       topology, num_slices, ("train_step",), hbm_bytes)
          for policy in stack.REMAT_POLICIES}


def format_sweep(results: dict[str, dict], mfu: float) -> str:
  """One row per policy: the train step's temporaries and peak per device, and its
  FLOPs and the step time they predict at ``mfu``."""
  first = next(iter(results.values()))
  per_s = f"{first['item_unit']}/s"
  rows = {policy: result["programs"]["train_step"] for policy, result in results.items()}
  peak = max((r["peak"] for r in rows.values() if not math.isnan(r["peak"])), default=0)
  unit, scale = ("GiB", GiB) if peak >= GiB else ("MiB", 1024 ** 2)
  lines = [f"remat policies, train step per device on {first['devices']} x "
           f"{first['device_kind']} ({first['topology']}), mesh {first['mesh']}; step time at "
           f"{mfu:.0%} of {first['peak_flops'] / 1e12:.0f} bf16 TFLOP/s per chip",
           f"{'policy':<18} {'temps ' + unit:>9} {'peak ' + unit:>9} {'HBM GiB':>8} {'fits':>4} "
           f"{'TFLOP':>9} {'step ms':>10} {per_s:>10}"]
  for policy, result in results.items():
    r = rows[policy]
    memory = " ".join("        -" if math.isnan(r[k]) else f"{r[k] / scale:9.2f}"
                      for k in ("temporaries", "peak"))
    if math.isnan(r["flops"]):
      speed = f"{'-':>9} {'-':>10} {'-':>10}"
    else:
      seconds, rate = predict(r, result, mfu)
      speed = f"{r['flops'] / 1e12:9.4g} {seconds * 1e3:10.4g} {rate:10.4g}"
    lines.append(f"{policy:<18} {memory} {r['available'] / GiB:8.2f} "
                 f"{'yes' if r['fits'] else 'no':>4} {speed}")
  return "\n".join(lines)


PLANNER_ERRORS = (config_lib.ConfigError, TopologyError, sharding.MeshError)


def try_suggestion(config, suggestion: Suggestion, programs: tuple[str, ...],
                   hbm_bytes: int | None) -> tuple[bool, str]:
  """Compiles the suggested change: (whether its programs fit, what to print)."""
  try:
    result = compile_for_topology(with_overrides(config, suggestion.overrides),
                                  suggestion.topology, suggestion.num_slices, programs, hbm_bytes)
  except PLANNER_ERRORS as e:
    return False, f"error: {e}"
  rows = list(result["programs"].values())
  fits = all(r["fits"] for r in rows)
  worst = max(rows, key=lambda r: math.inf if math.isnan(r["peak"]) else r["peak"] / r["available"])
  return fits, (f"{'fits' if fits else 'no'}: peak {human_bytes(worst['peak'])} of "
                f"{human_bytes(worst['available'])}")


def checked_suggestion(config, topology: str, num_slices: int, result: dict, kind: str,
                       programs: tuple[str, ...], hbm_bytes: int | None,
                       doublings: int = 2) -> tuple[Suggestion, str]:
  """Compiles suggestion ``kind``; more chips or a smaller batch that still does not fit is
  doubled again, at most ``doublings`` times. Returns the last one tried and its outcome."""
  factor = shortfall(result)
  tried = None
  for _ in range(1 + (doublings if kind in SCALABLE else 0)):
    suggestion = suggestions(config, topology, num_slices, result, factor).get(kind)
    if suggestion is None:
      break
    fits, outcome = try_suggestion(config, suggestion, programs, hbm_bytes)
    tried = suggestion, outcome
    if fits:
      break
    factor *= 2
  return tried


def main(argv):
  del argv
  if not 0 < _MFU.value <= 1:
    sys.exit(f"error: --mfu={_MFU.value}: give the fraction of the chip's peak a step reaches, "
             "in (0, 1], e.g. 0.4")
  config, topology, num_slices = _CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value
  hbm_bytes = None if _HBM_GIB.value is None else int(_HBM_GIB.value * GiB)
  policy = _REMAT_POLICY.value
  if policy is not None and policy != "sweep" and policy not in stack.REMAT_POLICIES:
    sys.exit(f"error: --remat_policy={policy}: use one of {', '.join(stack.REMAT_POLICIES)} "
             "or sweep")
  if policy == "sweep":
    try:
      print(format_sweep(sweep_remat(config, topology, num_slices, hbm_bytes), _MFU.value))
    except PLANNER_ERRORS as e:
      sys.exit(f"error: {e}")
    return
  if policy is not None:
    config = with_overrides(config, {"model.remat_policy": policy})
  try:
    result = compile_for_topology(config, topology, num_slices, tuple(_PROGRAMS.value),
                                  hbm_bytes)
  except PLANNER_ERRORS as e:
    sys.exit(f"error: {e}")
  print(format_report(result, _MFU.value))
  over = tuple(name for name, r in result["programs"].items() if not r["fits"])
  if not over:
    return
  for name in over:
    r = result["programs"][name]
    print(f"{name} does not fit: it needs {human_bytes(r['peak'])} per chip, "
          f"{human_bytes(r['available'])} available")
  found = suggestions(config, topology, num_slices, result, shortfall(result))
  print("what may fit" + (", each compiled:" if _SUGGEST.value
                          else " (--suggest compiles each):") if found else
        "none of the planner's changes apply: give it a larger chip or a smaller model",
        flush=True)
  for kind, suggestion in found.items():
    outcome = ""
    if _SUGGEST.value:
      suggestion, outcome = checked_suggestion(config, topology, num_slices, result, kind, over,
                                               hbm_bytes)
      outcome = f"\n      -> {outcome}"
    print(f"  {suggestion.flags(config, topology, num_slices):<48} {suggestion.why}{outcome}",
          flush=True)
  sys.exit(1)


if __name__ == "__main__":
  app.run(main)
