"""The shared training loop on the tiny SDE run: real kills (kill -9 during an
asynchronous save, SIGTERM) and resume, a gs:// workdir on a local GCS emulator,
the non-finite guard, resume hygiene, profiling, start-up and the stage registry.

Runs that must really die are subprocesses of ``python -m muse_jax.main`` on
``tests/tiny_run_config.py``; their final state is compared with an
uninterrupted in-process run of the same config.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_run_config
from conftest import ROOT, assert_same_state
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from muse_jax import config_lib
from muse_jax.parallel import distributed
from muse_jax.parallel import sharding
from muse_jax.train import checkpoint as checkpoint_lib
from muse_jax.train import loop
from muse_jax.train import llm_trainer, sde_trainer
from muse_jax.train import stages

CONFIG_FILE = str(ROOT / "tests" / "tiny_run_config.py")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: (workdir, final state on the host)."""
  workdir = tmp_path_factory.mktemp("straight")
  result = sde_trainer.train(tiny_run_config.get_config(), str(workdir))
  return workdir, jax.device_get(result["state"])


def restore(checkpoints: str, step: int):
  config = tiny_run_config.get_config()
  abstract = sde_trainer.setup(config, sharding.make_mesh(config.mesh)).abstract_state
  ckpt = checkpoint_lib.Checkpointer(checkpoints)
  try:
    return jax.device_get(ckpt.restore(step, abstract)[0])
  finally:
    ckpt.close()


def eval_steps(text: str) -> list[int]:
  return [json.loads(line)["step"] for line in text.splitlines()]


def tensorboard_steps(logdir: str, tag: str) -> list[int]:
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0})
  acc.Reload()
  return [e.step for e in acc.Scalars(tag)]


class Run:
  """``python -m muse_jax.main`` on the tiny config, its output in a log file."""

  def __init__(self, workdir: str, log: str, *overrides: str, env: dict | None = None,
               cwd: str = str(ROOT)):
    self.log = log
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env or {}))
    with open(log, "w") as out:
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "muse_jax.main", f"--config={CONFIG_FILE}",
           f"--workdir={workdir}", *overrides], cwd=cwd, env=full_env, stdout=out,
          stderr=subprocess.STDOUT)

  def text(self) -> str:
    with open(self.log) as f:
      return f.read()

  def wait_for(self, condition, what: str, timeout: float = 240.0, poll: float = 0.002) -> None:
    deadline = time.time() + timeout
    while not condition():
      if self.proc.poll() is not None:
        pytest.fail(f"run ended (exit {self.proc.returncode}) before {what}:\n"
                    f"{self.text()[-3000:]}")
      if time.time() > deadline:
        self.proc.kill()
        pytest.fail(f"no {what} within {timeout} s:\n{self.text()[-3000:]}")
      time.sleep(poll)

  def finish(self, timeout: float = 300.0) -> int:
    return self.proc.wait(timeout)


def test_kill_during_async_save_then_sigterm_resume_bit_exact(straight, tmp_path):
  straight_dir, straight_state = straight
  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"

  def saving_step_4():
    names = os.listdir(checkpoints) if checkpoints.exists() else []
    return "2" in names and any(n.startswith("4.orbax-checkpoint-tmp") for n in names)

  # 1. kill -9 while step 4's checkpoint is written in the background
  run = Run(workdir, tmp_path / "1.log")
  run.wait_for(saving_step_4, "the asynchronous save of step 4")
  run.proc.send_signal(signal.SIGKILL)
  run.finish()
  assert checkpoint_lib.Checkpointer(str(checkpoints)).latest_step() == 2

  # 2. restart; SIGTERM during its first step -> checkpoint at that step, exit code 75
  run = Run(workdir, tmp_path / "2.log")
  run.wait_for(lambda: "resumed from" in run.text(), "the resume")
  assert re.search(r"resumed from \S+ at step 2\b", run.text())
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == loop.PREEMPTED_EXIT_CODE, run.text()[-3000:]
  saved = int(re.search(r"checkpoint saved at step (\d+)", run.text()).group(1))
  assert 3 <= saved < 6
  assert checkpoint_lib.Checkpointer(str(checkpoints)).latest_step() == saved

  # 3. restart to the end: the state and the last eval equal the uninterrupted run's
  run = Run(workdir, tmp_path / "3.log")
  assert run.finish() == 0, run.text()[-3000:]
  assert re.search(rf"resumed from \S+ at step {saved}\b", run.text())
  assert_same_state(straight_state, restore(str(checkpoints), 6))
  history = (workdir / "eval_history.jsonl").read_text()
  assert history == (straight_dir / "eval_history.jsonl").read_text()
  # resume hygiene: the killed run had logged steps 3-4 and evaluated at 3 before the save
  assert eval_steps(history) == [0, 3, 6]
  assert tensorboard_steps(str(workdir / "tensorboard"), "loss/total") == [1, 2, 3, 4, 5, 6]
  assert tensorboard_steps(str(workdir / "tensorboard"), "eval/psnr") == [0, 3, 6]


def nan_images_at(bad_step: int):
  """A stage whose batch at ``bad_step`` is NaN: a non-finite loss, injected."""
  def make(config, mesh):
    stage = sde_trainer.stage(config, mesh)
    real_step = stage.step

    def step(state, batch, step):
      if step == bad_step:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      return real_step(state, batch, step)
    return dataclasses.replace(stage, step=step)
  return make


def test_nonfinite_skip_counts_and_continues_and_profiles(tmp_path):
  config = tiny_run_config.get_config()
  config.update(nonfinite="skip", profile_steps="2,3")
  result = loop.train(config, str(tmp_path), nan_images_at(3), stop_after=4)
  assert result["step"] == 4 and result["metrics"]["train/nonfinite_steps"] == 1
  state = jax.device_get(result["state"])
  assert int(state["step"]) == 3              # one of four updates skipped
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  # the trace TensorBoard's profile plugin reads: plugins/profile/<run>/<host>.xplane.pb
  assert list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_nonfinite_stop_names_step_and_keeps_last_good_checkpoint(straight, tmp_path):
  straight_dir, _ = straight
  config = tiny_run_config.get_config()
  assert config.nonfinite == "stop"
  with pytest.raises(loop.NonFiniteError, match=r"^step 3: .*loss/total=nan"):
    loop.train(config, str(tmp_path), nan_images_at(3))
  assert checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2
  assert_same_state(restore(str(straight_dir / "checkpoints"), 2),
                    restore(str(tmp_path / "checkpoints"), 2))


def test_gs_workdir_killed_and_resumed_from_the_bucket(straight, gcs_emulator, tmp_path):
  straight_dir, straight_state = straight
  workdir = "gs://muse-test/run"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  bucket = epath.Path(workdir)
  run = Run(workdir, tmp_path / "1.log", env=gcs_emulator, cwd=str(cwd))
  # on object stores Orbax marks a complete save with a commit file
  run.wait_for((bucket / "checkpoints" / "2" / "commit_success.txt").exists,
               "the commit of step 2", poll=0.05)
  run.proc.send_signal(signal.SIGKILL)
  run.finish()
  run = Run(workdir, tmp_path / "2.log", env=gcs_emulator, cwd=str(cwd))
  assert run.finish() == 0, run.text()[-3000:]
  assert re.search(r"resumed from gs://muse-test/run/checkpoints at step [2-5]\b", run.text())
  assert_same_state(straight_state, restore(f"{workdir}/checkpoints", 6))
  assert (bucket / "eval_history.jsonl").read_text() == (
      straight_dir / "eval_history.jsonl").read_text()
  assert json.loads((bucket / "config.json").read_text())["trainer"] == "sde"
  assert (bucket / "reconstructions" / "step_00000006.png").exists()
  assert list((bucket / "tensorboard").iterdir())
  assert not list(cwd.iterdir()) and not (ROOT / "gs:").exists()   # nothing on local disk


def test_slurm_without_step_variables_gives_one_line(tmp_path):
  env = {"SLURM_JOB_ID": "4242"}
  kwargs, why = distributed.plan(env, None, None, None)
  assert kwargs is None and "SLURM_STEP_NODELIST" in why and "srun" in why
  # the CLI says it in one line and goes on (here to a config error, so that it stops early)
  run = Run(tmp_path, tmp_path / "log", "--config.model.mode=pixels", env=env)
  assert run.finish() == 1
  text = run.text()
  assert "Traceback" not in text
  assert len([line for line in text.splitlines() if "without an srun step" in line]) == 1
  assert text.strip().splitlines()[-1].startswith("error: config.model.mode:")


def test_distributed_plan_explicit_flags_and_complete_environments():
  assert distributed.plan({}, "10.0.0.1:1234", 4, 2) == (
      {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2},
      "explicit flags")
  slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  assert distributed.plan(slurm, None, None, None)[0] == {}       # JAX reads the step
  assert distributed.plan(slurm, "h:1", 2, 1)[0]["coordinator_address"] == "h:1"  # flags win
  assert distributed.plan(dict(slurm, SLURM_NTASKS="1"), None, None, None)[0] is None
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a,b"}, None, None, None)[0] == {}
  assert distributed.plan({}, None, None, None)[0] is None
  with pytest.raises(config_lib.ConfigError, match="--process_id is missing"):
    distributed.plan({}, "h:1", 2, None)


def test_one_stage_registry_for_main_and_compile():
  assert stages.stage_module("sde", needs="train") is sde_trainer
  assert stages.stage_module("llm", needs="train") is llm_trainer
  with pytest.raises(config_lib.ConfigError,
                     match=r"stage 'llm' has no seed_codebook_from_data yet.*\['sde'\]"):
    stages.stage_module("llm", needs="seed_codebook_from_data")
  with pytest.raises(config_lib.ConfigError, match=r"^config.trainer: 'vit' is not a stage"):
    stages.stage_module("vit")
  for tool in ("main.py", "compile.py"):   # neither keeps a table of its own
    assert "stages.stage_module(" in (ROOT / "muse_jax" / tool).read_text()


def test_loop_config_fields_are_checked():
  config = tiny_run_config.get_config()
  config.profile_steps = "5"
  with pytest.raises(config_lib.ConfigError, match=r"^config.profile_steps: "):
    config_lib.validate_loop(config)
  config.update(profile_steps="", nonfinite="ignore")
  with pytest.raises(config_lib.ConfigError, match=r"^config.nonfinite: .*'stop', 'skip'"):
    config_lib.validate_loop(config)
