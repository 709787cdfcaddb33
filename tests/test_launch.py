"""launch/: --dry-run command sequences of gcloud.sh and slurm.sbatch, and shellcheck."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCLOUD = os.path.join(ROOT, "launch", "gcloud.sh")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
ZONE = "--zone=us-east5-a"


def _run(script, *args, env=None):
  done = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60,
                        env={**os.environ, **(env or {})})
  return done.returncode, done.stdout.splitlines(), done.stderr


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path, monkeypatch):
  """A gcloud / srun on PATH that fails: --dry-run must never call them."""
  for tool in ("gcloud", "srun"):
    (tmp_path / tool).write_text(f"#!/bin/sh\necho '{tool} was called' >&2\nexit 99\n")
    (tmp_path / tool).chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def _gcloud(*args):
  """The dry-run lines of ``gcloud.sh ARGS`` (--dry-run goes before any ``--``)."""
  split = args.index("--") if "--" in args else len(args)
  rc, lines, stderr = _run(GCLOUD, *args[:split], "--dry-run", *args[split:])
  assert rc == 0, stderr
  return lines


def test_multislice_create_waits_for_active():
  assert _gcloud("create", "exp", ZONE, "--type=v5p-64", "--num-slices=2", "--spot") == [
      "gcloud compute tpus queued-resources create exp --zone=us-east5-a "
      "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot --node-count=2 "
      "--node-prefix=exp",
      "gcloud compute tpus queued-resources describe exp --zone=us-east5-a "
      "'--format=value(state.state)'"]


def test_single_slice_create_queued_or_direct():
  assert _gcloud("create", "one", ZONE, "--type=v6e-8", "--queued")[0] == (
      "gcloud compute tpus queued-resources create one --zone=us-east5-a "
      "--accelerator-type=v6e-8 --runtime-version=v2-alpha-tpuv6e --node-id=one")
  assert _gcloud("create", "one", ZONE, "--type=v5litepod-16") == [
      "gcloud compute tpus tpu-vm create one --zone=us-east5-a --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite"]


def test_setup_reaches_every_slice():
  lines = _gcloud("setup", "exp", ZONE, "--repo=https://example.com/muse_jax.git", "--ref=v1",
                  "--num-slices=3")
  assert [line.split(" --zone")[0] for line in lines] == [
      f"gcloud compute tpus tpu-vm ssh exp-{i}" for i in range(3)]
  for line in lines:
    assert "--worker=all" in line
    assert "git clone --depth 1 --branch '\\''v1'\\'' '\\''https://example.com/muse_jax.git" in line
    assert "pip install -q -e '\\''.[tpu]'\\''" in line


def test_multislice_run_adds_dcn_mesh():
  lines = _gcloud("run", "exp", ZONE, "--num-slices=2", "--", "python", "-m", "muse_jax.main",
                  "--config=configs/sde_256.py", "--workdir=gs://bucket/run")
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert line == (
        f"gcloud compute tpus tpu-vm ssh exp-{i} --zone=us-east5-a --worker=all "
        "'--command=cd ~/muse_jax && . ~/venv/bin/activate && nohup python -m muse_jax.main "
        "--config=configs/sde_256.py --workdir=gs://bucket/run --config.mesh.dcn_data=2 "
        "> ~/muse_jax_run.log 2>&1 &'")
  # a DCN size given by the user is kept, not overridden
  lines = _gcloud("run", "exp", ZONE, "--num-slices=2", "--", "python", "-m", "muse_jax.main",
                  "--config.mesh.dcn_fsdp=2")
  assert "dcn_data" not in lines[0] and "--config.mesh.dcn_fsdp=2" in lines[0]
  # one slice: nothing added
  assert "dcn" not in _gcloud("run", "exp", ZONE, "--", "python", "-m", "muse_jax.main")[0]


def test_delete():
  assert _gcloud("delete", "exp", ZONE, "--num-slices=2") == [
      "gcloud compute tpus queued-resources delete exp --zone=us-east5-a --force --quiet"]
  assert _gcloud("delete", "exp", ZONE) == [
      "gcloud compute tpus tpu-vm delete exp --zone=us-east5-a --quiet"]


def test_gcloud_bad_input():
  rc, _, stderr = _run(GCLOUD, "create", "exp", ZONE, "--num-slices=0", "--dry-run")
  assert rc == 2 and "--num-slices must be a positive integer" in stderr
  rc, _, stderr = _run(GCLOUD, "create", "exp", "--type=v5p-8", "--dry-run")
  assert rc == 2 and "--zone is required" in stderr


def test_slurm_dry_run_one_task_per_gpu():
  env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}
  rc, lines, stderr = _run(SLURM, "--dry-run", "--config=configs/sde_256.py",
                           "--workdir=/shared/run", env=env)
  assert rc == 0, stderr
  assert lines == ["srun --nodes=2 --ntasks-per-node=8 --ntasks=16 --kill-on-bad-exit=1 "
                   "--cpu-bind=none python -m muse_jax.main --config=configs/sde_256.py "
                   "--workdir=/shared/run"]
  rc, _, stderr = _run(SLURM, "--dry-run", "--config=x", env={**env, "SLURM_GPUS_ON_NODE": ""})
  assert rc == 2 and "no GPUs" in stderr
  rc, _, stderr = _run(SLURM, "--config=x", env={"SLURM_JOB_ID": ""})
  assert rc == 2 and "not inside a SLURM job" in stderr


@pytest.mark.parametrize("srun_exit, requeued, job_exit", [(75, True, 0), (1, False, 1),
                                                            (0, False, 0)])
def test_slurm_requeues_a_preempted_run(tmp_path, srun_exit, requeued, job_exit):
  """Exit code 75 (SIGTERM'd run, checkpoint saved) requeues the job; others end it."""
  tools = tmp_path / "tools"
  tools.mkdir()
  (tools / "srun").write_text(f"#!/bin/sh\nexit {srun_exit}\n")
  (tools / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol.args\n")
  for tool in ("srun", "scontrol"):
    (tools / tool).chmod(0o755)
  env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "8",
         "MUSE_JAX_DIR": str(tmp_path), "MUSE_JAX_VENV": str(tmp_path / "no_venv"),
         "PATH": f"{tools}:{os.environ['PATH']}"}
  rc, _, _ = _run(SLURM, "--config=x", env=env)
  assert rc == job_exit
  args = tmp_path / "scontrol.args"
  assert args.exists() == requeued
  if requeued:
    assert args.read_text().split() == ["requeue", "7"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", [GCLOUD, SLURM])
def test_shellcheck_clean(script):
  done = subprocess.run(["shellcheck", script], capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stdout
