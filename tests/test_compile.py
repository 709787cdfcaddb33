"""Ahead-of-time TPU compiles on a CPU machine (needs libtpu: pip install -e .[tpu])."""

import functools
import os
import re
import subprocess
import sys

import pytest

from muse_jax import compile as compile_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, expected", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5p-128", "v5p:4x4x4"),
    ("v5p-1024", "v5p:8x8x8"), ("v5e-16", "v5e:4x4"), ("v5litepod-32", "v5e:4x8"),
    ("v6e-64", "v6e:8x8"), ("v6e-256", "v6e:16x16"), ("v5p:4x4x8", "v5p:4x4x8"),
])
def test_slice_names(name, expected):
  assert compile_lib.parse_topology(name)[1] == expected


@pytest.mark.parametrize("name, message", [
    ("v3-8", "chip one of"), ("v5p-7", "even size"), ("v5e-24", "not a standard slice"),
])
def test_bad_slice_names(name, message):
  with pytest.raises(compile_lib.TopologyError, match=message):
    compile_lib.parse_topology(name)


def _compile(*flags):
  # the planner measures compile times: none is read from the tests' compilation cache
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "muse_jax.compile", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_demo_decoder_compiles_for_a_v5e_slice():
  """The real init and train step, sharded FSDP x tensor over 4 v5e chips, and the step
  time and throughput their FLOPs predict."""
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4", "--mfu=0.5",
                 "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.mesh.data=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "4 x TPU v5 lite (v5e:2x2" in out.stdout
  assert "'fsdp': 2, 'tensor': 2" in out.stdout
  rows = {m.group(1): [float(x) for x in m.group(2).split()]
          for m in re.finditer(r"^\s+(init|train_step)\s+([0-9. ]+?)\s+yes\s", out.stdout, re.M)}
  assert set(rows) == {"init", "train_step"}, out.stdout
  init, step = rows["init"], rows["train_step"]
  # init takes nothing and outputs the sharded state; the step's state is donated
  assert init[0] == 0 and init[1] > 0
  assert step[0] > 0 and step[2] > 0
  assert "512 tokens per step) at 50% of 197 bf16 TFLOP/s per chip" in out.stdout
  speed = re.search(r"^\s+train_step\s.*\syes\s+([0-9.]+)\s+(\S+)\s+(\S+)\s+(\S+)$",
                    out.stdout, re.M)
  compile_s, tflop, step_ms, tokens_per_s = map(float, speed.groups())
  assert compile_s > 0 and tflop > 0
  # the printed figures (4 significant digits) agree: time = FLOPs / (MFU x peak)
  assert step_ms == pytest.approx(tflop * 1e12 / (0.5 * 197e12) * 1e3, rel=1e-3)
  assert tokens_per_s == pytest.approx(8 * 64 / (step_ms / 1e3), rel=1e-3)


def test_a_config_that_cannot_fit_the_slice_says_so():
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4",
                 "--config.batch_size=6")
  assert out.returncode != 0
  assert "error: config.batch_size: 6 does not split over the mesh's 4 batch shards" in (
      out.stderr)


def test_two_slices_put_data_parallelism_across_dcn():
  """Multi-slice: a hybrid mesh, fsdp inside each slice and data across the two."""
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4", "--num_slices=2")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "8 x TPU v5 lite (v5e:2x2, 2 slice(s))" in out.stdout
  assert "'data': 2, 'fsdp': 4, 'tensor': 1" in out.stdout


def test_init_alone_and_unknown_programs():
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4", "--programs=init")
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"^\s+init\s", out.stdout, re.M) and "train_step" not in out.stdout
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4", "--programs=step")
  assert out.returncode != 0
  assert "error: --programs: ['step'] unknown; use some of ['init', 'train_step']" in out.stderr


class _MemoryAnalysis:
  """What ``compiled.memory_analysis()`` reports, with chosen sizes."""

  def __init__(self, arguments, outputs, aliased, temporaries, code):
    self.argument_size_in_bytes = arguments
    self.output_size_in_bytes = outputs
    self.alias_size_in_bytes = aliased
    self.temp_size_in_bytes = temporaries
    self.generated_code_size_in_bytes = code


class _Compiled:
  def __init__(self, **sizes):
    self.analysis = _MemoryAnalysis(**sizes)

  def memory_analysis(self):
    return self.analysis


HBM = 16 * compile_lib.GiB
# peak = arguments + outputs - aliased + temporaries + code
AT_LIMIT = dict(arguments=6 * compile_lib.GiB, outputs=6 * compile_lib.GiB,
                aliased=5 * compile_lib.GiB, temporaries=8 * compile_lib.GiB,
                code=compile_lib.GiB)


def test_memory_report_fits_up_to_the_last_byte():
  row = compile_lib.memory_report(_Compiled(**AT_LIMIT), HBM)
  assert row["peak"] == HBM and row["fits"]
  over = compile_lib.memory_report(_Compiled(**dict(AT_LIMIT, temporaries=AT_LIMIT[
      "temporaries"] + 1)), HBM)
  assert over["peak"] == HBM + 1 and not over["fits"]
  # donated (aliased) outputs are not counted twice: without them it would not fit
  no_alias = compile_lib.memory_report(_Compiled(**dict(AT_LIMIT, aliased=0)), HBM)
  assert no_alias["peak"] == HBM + 5 * compile_lib.GiB and not no_alias["fits"]


def _row(**sizes):
  return dict(compile_lib.memory_report(_Compiled(**sizes), HBM), flops=1e12, compile_s=1.0)


def _result(train_step_temporaries, mesh=None):
  programs = {"init": _row(**dict(AT_LIMIT, temporaries=0)),
              "train_step": _row(**dict(AT_LIMIT, temporaries=train_step_temporaries))}
  mesh = mesh or {"data": 1, "fsdp": 4, "tensor": 1}
  return {"topology": "v5e:2x2", "num_slices": 1, "devices": 4, "device_kind": "TPU v5 lite",
          "hbm_bytes": HBM, "peak_flops": 197e12, "mesh": mesh, "ici_mesh": mesh,
          "items_per_step": 512, "item_unit": "tokens", "programs": programs}


@pytest.fixture
def parsed_flags():
  from absl import flags
  flags.FLAGS(["compile", "--config=configs/muse_vl.py:demo", "--topology=v5e-4"])
  yield
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("temporaries, fits", [(AT_LIMIT["temporaries"], True),
                                                (AT_LIMIT["temporaries"] + 1, False)],
                         ids=["at_the_limit", "one_byte_over"])
def test_planner_reports_the_decision_and_exits_1_when_a_program_does_not_fit(
    monkeypatch, capsys, parsed_flags, temporaries, fits):
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(compile_lib, "compile_for_topology",
                      lambda *args: _result(temporaries))
  if fits:
    compile_lib.main([])
  else:
    with pytest.raises(SystemExit) as exit_info:
      compile_lib.main([])
    assert exit_info.value.code == 1
  out = capsys.readouterr().out
  rows = dict(re.findall(r"^\s+(init|train_step)\s.*\s(yes|no)\s", out, re.M))
  assert rows == {"init": "yes", "train_step": "yes" if fits else "no"}, out
  assert "HBM 16 GiB per chip" in out and "per device: memory in GiB" in out
  # the peak column: 16.00 GiB at the limit, just above it otherwise; then the HBM
  assert re.search(r"^\s+train_step\s.*\s16\.00\s+16\.00\s+(yes|no)\s", out, re.M), out
  assert ("what may fit (--suggest compiles each):" in out) != fits


def test_suggestions_spread_the_shortfall_over_chips_batch_and_mesh():
  from ml_collections import config_dict
  config = config_dict.ConfigDict(dict(batch_size=64, model=dict(remat_policy="none"),
                                       mesh=dict(data=4, fsdp=1, tensor=1)))
  result = _result(3 * HBM, mesh={"data": 4, "fsdp": 1, "tensor": 1})
  result["programs"]["train_step"]["peak"] = 3.5 * HBM   # short by 3.5x: a factor of 4
  factor = compile_lib.shortfall(result)
  assert factor == 4
  found = compile_lib.suggestions(config, "v5e-4", 1, result, factor)
  assert {k: s.flags(config, "v5e-4", 1) for k, s in found.items()} == {
      "chips": "--topology=v5e-16 --config.mesh.fsdp=-1", "batch": "--config.batch_size=16",
      "fsdp": "--config.mesh.data=1 --config.mesh.fsdp=-1",
      "remat": "--config.model.remat_policy=full"}
  # past the largest v5e slice (256 chips), more slices instead
  result["devices"] = 256
  config.batch_size = 4096
  found = compile_lib.suggestions(config, "v5e-256", 1, result, factor)
  assert found["chips"].flags(config, "v5e-256", 1) == "--num_slices=4 --config.mesh.fsdp=-1"
  # a batch that does not split 4x further gets neither more chips nor a smaller batch
  config.batch_size = 8
  assert set(compile_lib.suggestions(config, "v5e-4", 1, result, factor)) == {"fsdp", "remat"}
  # when only the initialiser (the state) does not fit, neither batch nor remat helps
  config.batch_size = 64
  result["programs"]["train_step"]["fits"] = True
  result["programs"]["init"]["fits"] = False
  assert set(compile_lib.suggestions(config, "v5e-4", 1, result, factor)) == {"chips", "fsdp"}


def test_refused_compile_reads_the_sizes_from_xla_error():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (23.98G) exceeds available HBM (15.75G).")
  row = compile_lib.refused_report(message, HBM)
  assert row["temporaries"] == row["peak"] == 23.98 * compile_lib.GiB
  assert row["available"] == 15.75 * compile_lib.GiB and not row["fits"]
  assert compile_lib.refused_report("INVALID_ARGUMENT: bad sharding", HBM) is None


@pytest.fixture(scope="module")
def v5e_mesh():
  """Four abstract v5e chips in a one-axis mesh; TPU executables stay out of the test
  compilation cache (its CPU client cannot load them)."""
  import jax
  import numpy as np
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  chip, name = compile_lib.parse_topology("v5e-4")
  yield chip, jax.sharding.Mesh(np.array(compile_lib.tpu_devices(chip, name, 1)), ("x",))
  jax.config.update("jax_enable_compilation_cache", enabled)


def test_flops_per_device_count_every_loop_iteration(v5e_mesh):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  chip, mesh = v5e_mesh
  m, k, n = 512, 256, 384

  def arg(shape, spec=P()):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))

  def flops(fn, *args):
    row = compile_lib.compile_program(jax.jit(fn), args, chip.hbm_bytes)
    assert row["unknown_loops"] == 0 and row["fits"]
    return row["flops"]

  def matmul(a, b):
    return a @ b

  def scan(a, b):
    return jax.lax.scan(lambda x, _: (x @ b, None), a, None, length=10)[0]

  def nested(a, b):
    return jax.lax.fori_loop(0, 3, lambda i, x: scan(x, b), a)

  assert flops(matmul, arg((m, k)), arg((k, n))) == 2 * m * n * k
  # per device: rows split over 4 chips, a quarter each
  assert flops(matmul, arg((m, k), P("x")), arg((k, n))) == 2 * m * n * k / 4
  square = (arg((m, n)), arg((n, n)))
  assert flops(scan, *square) == 10 * 2 * m * n * n
  assert flops(nested, *square) == 30 * 2 * m * n * n
  # a padded 3x3 convolution in a loop: each output element sums over the input features
  # and the window positions inside the image (per row: 16 x 3 pairs, less 2 on the border)
  images, kernel = arg((8, 16, 16, 32)), arg((3, 3, 32, 32))
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def convs(x, w):
    return jax.lax.scan(lambda y, _: (y + conv(y, w), None), x, None, length=4)[0]

  assert flops(convs, images, kernel) == pytest.approx(4 * 2 * (8 * 32) * 46 * 46 * 32,
                                                       rel=1e-2)   # and the adds
  # the gradient runs the scan forward, then two matmuls per step backward (plus the
  # elementwise sum and casts that XLA counts too)
  grad = jax.grad(lambda b, a: jnp.sum(scan(a, b).astype(jnp.float32)))
  assert flops(grad, *square[::-1]) == pytest.approx(30 * 2 * m * n * n, rel=1e-3)


@pytest.mark.parametrize("size, window, stride, pad_lo, pad_hi, lhs_dilate, rhs_dilate", [
    (16, 3, 1, 1, 1, 1, 1), (16, 3, 2, 1, 0, 1, 1), (1, 28, 1, 27, 27, 1, 1),
    (7, 4, 1, 3, 3, 2, 1), (9, 3, 1, 2, 2, 1, 2), (5, 5, 3, 0, 0, 1, 1)])
def test_window_terms_count_the_pairs_that_read_the_input(size, window, stride, pad_lo, pad_hi,
                                                          lhs_dilate, rhs_dilate):
  dilated = (size - 1) * lhs_dilate + 1
  out = (dilated + pad_lo + pad_hi - (window - 1) * rhs_dilate - 1) // stride + 1
  brute = sum(1 for o in range(out) for w in range(window)
              if 0 <= o * stride + w * rhs_dilate - pad_lo < dilated
              and (o * stride + w * rhs_dilate - pad_lo) % lhs_dilate == 0)
  assert compile_lib._window_terms(size, out, window, stride, pad_lo, lhs_dilate,
                                   rhs_dilate) == brute


def test_a_step_xla_refuses_is_reported_with_what_may_fit():
  """XLA:TPU refuses the demo step at 8192 rows per chip: a row saying so, no traceback."""
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4", "--programs=train_step",
                 "--config.batch_size=32768")
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr + out.stdout
  row = re.search(r"^\s+train_step\s+-\s+-\s+-\s+([0-9.]+)\s+-\s+([0-9.]+)\s+([0-9.]+)\s+no\s",
                  out.stdout, re.M)
  assert row, out.stdout
  temps, peak, available = map(float, row.groups())
  assert temps == peak > available == 15.75   # XLA's figures, in GiB
  assert (f"train_step does not fit: it needs {peak:.2f} GiB per chip, 15.75 GiB available"
          in out.stdout)
  assert "what may fit (--suggest compiles each):" in out.stdout
  listed = re.findall(r"^  (--\S+)", out.stdout, re.M)
  assert listed == ["--topology=v5e-8", "--config.batch_size=16384", "--config.mesh.tensor=2",
                    "--config.model.remat_policy=full"], out.stdout


def test_remat_sweep_prints_each_policy_memory_against_step_time():
  """The demo decoder's step (scanned layers) compiled once per remat policy: a row each,
  and the more a policy recomputes, the more FLOPs and time it predicts. (Which keeps the
  fewest bytes is for XLA:TPU to say: at this toy size its own scheduling decides, so
  tests/test_stack.py checks the policies' saved bytes instead.)"""
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4", "--remat_policy=sweep",
                 "--config.model.scan_layers=True", "--config.batch_size=32",
                 "--config.seq_len=256", "--config.loss_chunk=128")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "policy             temps MiB  peak MiB  HBM GiB fits" in out.stdout, out.stdout
  rows = {m.group(1): [float(x) for x in m.group(2).split()] for m in re.finditer(
      r"^(none|full|save_dots|save_attn_mlp_out)\s+([0-9. ]+)\s+yes\s+(\S+)\s+(\S+)\s+\S+$",
      out.stdout, re.M)}
  flops = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
      r"^(\S+)\s+[0-9. ]+\s+yes\s+(\S+)\s+(\S+)\s+\S+$", out.stdout, re.M)}
  assert list(rows) == ["none", "full", "save_dots", "save_attn_mlp_out"], out.stdout
  assert all(len(r) == 3 and r[0] < r[1] for r in rows.values()), rows   # temps < peak, HBM
  tflop = {policy: f[0] for policy, f in flops.items()}
  assert tflop["full"] > tflop["save_attn_mlp_out"] > tflop["save_dots"] > tflop["none"], tflop
  assert flops["full"][1] > flops["none"][1]                             # step ms


def test_suggest_compiles_each_change_and_says_which_fit():
  """The sharded state alone is over a (lowered) HBM: more chips fit, tensor 2 does not."""
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4", "--programs=init",
                 "--hbm_gib=0.0014", "--suggest")
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr + out.stdout
  assert "HBM 0.0014 GiB per chip" in out.stdout
  assert re.search(r"^\s+init\s+[0-9. ]+\s1\.43\s+no\s", out.stdout, re.M), out.stdout
  assert "what may fit, each compiled:" in out.stdout
  outcomes = dict(re.findall(r"^  (--\S+).*\n\s+-> (fits|no|error)", out.stdout, re.M))
  assert outcomes == {"--topology=v5e-8": "fits", "--config.mesh.tensor=2": "no"}, out.stdout


@pytest.mark.parametrize("flag, message", [
    ("--mfu=1.5", "error: --mfu=1.5: give the fraction of the chip's peak a step reaches, in "
                  "(0, 1]"),
    ("--hbm_gib=64", "error: --hbm_gib=64: give more than 0 and at most the 16 GiB of a v5e-4 "
                     "chip"),
    ("--remat_policy=dots", "error: --remat_policy=dots: use one of none, full, save_dots, "
                            "save_attn_mlp_out or sweep"),
])
def test_bad_planner_flags_are_named(flag, message):
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4", flag)
  assert out.returncode == 1 and message in out.stderr, out.stderr[-3000:]
