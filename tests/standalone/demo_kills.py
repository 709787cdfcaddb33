"""kill -9 the SDE demo at three moments; the restarted run must end bit-exact.

  JAX_PLATFORMS=cpu python tests/standalone/demo_kills.py --reference=/tmp/loop_base \
      --workdir=/tmp/demo_kills [--steps=60]

``--reference`` is the workdir of an uninterrupted demo run with the same
flags (``--config.total_steps=STEPS --config.eval_every=20
--config.loss.disc_start=40``; its checkpoint cadence does not matter). This
script runs the same demo (checkpoints every 10 steps) and kills it with
SIGKILL:

  1. during the asynchronous save of step 20 (its temporary directory exists);
  2. right after the eval at step 40 (the save of step 40 starts at once);
  3. one second after the save of step 50 is complete, in the middle of steps.

After each kill the same command is re-run; the last run finishes. It then
compares the final checkpoint with the reference's, leaf by leaf, and
``eval_history.jsonl`` line by line, and prints one JSON line. Too long for the
suite (minutes on 2 cores); tests/test_loop.py does the same on a tiny config.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from muse_jax.parallel import sharding  # noqa: E402
from muse_jax.train import checkpoint as checkpoint_lib  # noqa: E402
from muse_jax.train import sde_trainer  # noqa: E402


def demo_config(steps: int):
  import importlib.util
  spec = importlib.util.spec_from_file_location("sde_256", os.path.join(ROOT, "configs",
                                                                        "sde_256.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("demo")
  c.update(total_steps=steps, eval_every=20)
  c.loss.disc_start = 40
  return c


def launch(workdir: str, steps: int, log: str) -> subprocess.Popen:
  out = open(log, "a")
  return subprocess.Popen(
      [sys.executable, "-m", "muse_jax.main", "--config=configs/sde_256.py:demo",
       f"--workdir={workdir}", f"--config.total_steps={steps}", "--config.eval_every=20",
       "--config.loss.disc_start=40", "--config.checkpoint_every=10"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=out, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, condition, what: str, delay: float = 0.0) -> None:
  while not condition():
    if proc.poll() is not None:
      sys.exit(f"the run ended (exit {proc.returncode}) before {what}")
    time.sleep(0.005)
  time.sleep(delay)
  proc.kill()
  proc.wait()
  print(f"killed: {what}", file=sys.stderr)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reference", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args()
  ckpts = os.path.join(args.workdir, "checkpoints")
  log = args.workdir.rstrip("/") + ".log"

  def names():
    return os.listdir(ckpts) if os.path.isdir(ckpts) else []

  def logged(text):
    with open(log) as f:
      return text in f.read()

  open(log, "w").close()
  kill_when(launch(args.workdir, args.steps, log),
            lambda: any(n.startswith("20.orbax-checkpoint-tmp") for n in names()),
            "during the asynchronous save of step 20")
  kill_when(launch(args.workdir, args.steps, log), lambda: logged("eval at step 40"),
            "right after the eval at step 40")
  kill_when(launch(args.workdir, args.steps, log), lambda: "50" in names(),
            "one second after the save of step 50", delay=1.0)
  final = launch(args.workdir, args.steps, log)
  if final.wait():
    sys.exit(f"the last run failed; see {log}")

  config = demo_config(args.steps)
  abstract = sde_trainer.setup(config, sharding.make_mesh(config.mesh)).abstract_state

  def final_state(workdir):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    state = jax.device_get(ckpt.restore(args.steps, abstract)[0])
    ckpt.close()
    return dict((jax.tree_util.keystr(p), np.asarray(x))
                for p, x in jax.tree_util.tree_leaves_with_path(state))

  ours, theirs = final_state(args.workdir), final_state(args.reference)
  differing = [k for k in theirs if not np.array_equal(ours.get(k), theirs[k])]
  with open(os.path.join(args.workdir, "eval_history.jsonl")) as f:
    ours_eval = f.read()
  with open(os.path.join(args.reference, "eval_history.jsonl")) as f:
    theirs_eval = f.read()
  resumes = open(log).read().count("resumed from")
  print(json.dumps({"kills": 3, "resumes": resumes, "leaves": len(theirs),
                    "leaves_differing": len(differing), "eval_history_identical":
                    ours_eval == theirs_eval,
                    "final_eval": json.loads(ours_eval.splitlines()[-1])}))
  sys.exit(1 if differing or ours_eval != theirs_eval else 0)


if __name__ == "__main__":
  main()
