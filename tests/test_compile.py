"""Ahead-of-time TPU compiles on a CPU machine (needs libtpu: pip install -e .[tpu])."""

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
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "muse_jax.compile", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_demo_decoder_compiles_for_a_v5e_slice():
  """The real init and train step, sharded FSDP x tensor over 4 v5e chips."""
  out = _compile("--config=configs/muse_vl.py:demo", "--topology=v5e-4",
                 "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.mesh.data=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "4 x TPU v5 lite (v5e:2x2" in out.stdout
  assert "'fsdp': 2, 'tensor': 2" in out.stdout
  rows = {m.group(1): [float(x) for x in m.group(2).split()]
          for m in re.finditer(r"^\s+(init|train_step)\s+([0-9. ]+?)\s+yes$", out.stdout, re.M)}
  assert set(rows) == {"init", "train_step"}, out.stdout
  init, step = rows["init"], rows["train_step"]
  # init takes nothing and outputs the sharded state; the step's state is donated
  assert init[0] == 0 and init[1] > 0
  assert step[0] > 0 and step[2] > 0


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


def _result(train_step_temporaries):
  programs = {"init": compile_lib.memory_report(_Compiled(**dict(AT_LIMIT, temporaries=0)), HBM),
              "train_step": compile_lib.memory_report(_Compiled(**dict(
                  AT_LIMIT, temporaries=train_step_temporaries)), HBM)}
  return {"topology": "v5e:2x2", "num_slices": 1, "devices": 4, "device_kind": "TPU v5 lite",
          "hbm_bytes": HBM, "mesh": {"data": 1, "fsdp": 4, "tensor": 1}, "programs": programs}


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
  rows = dict(re.findall(r"^\s+(init|train_step)\s.*\s(yes|NO)$", out, re.M))
  assert rows == {"init": "yes", "train_step": "yes" if fits else "NO"}, out
  assert "HBM 16 GiB per chip" in out and "per device, GiB" in out
  # the peak column: 16.00 GiB at the limit, just above it otherwise
  assert re.search(r"^\s+train_step\s.*\s16\.00\s+(yes|NO)$", out, re.M), out
