"""The training loop every stage shares.

A stage (``muse_jax/train/stages.py`` names them) hands the loop a ``Stage``:
how to build and restore its train state, its batch source, its step, its eval
hook and its own host-side metrics. The loop does the rest, the same for every
stage:

- resume: the latest checkpoint's state and data-iterator state; ``config.json``
  is written only after a successful restore (a restart whose config does not fit
  the checkpoints must not replace the run's record);
- metric writers on process 0, the progress line with ETA, and the log / eval /
  checkpoint cadence (``config.log_every``, ``eval_every``, ``checkpoint_every``);
- resume hygiene: replayed steps do not show twice in TensorBoard (a
  ``SessionLog.START`` event makes TensorBoard purge what the killed run logged
  after the checkpoint) nor in ``eval_history.jsonl`` (lines after the
  checkpoint's step are dropped);
- preemption: on SIGTERM every process agrees on one step (JAX's preemption
  sync point when several processes run), saves a checkpoint there and the run
  exits with ``PREEMPTED_EXIT_CODE`` (75); re-running continues from that step;
- the non-finite guard (``config.nonfinite``), on every ``loss/*`` and
  ``grad_norm*`` metric: "stop" raises ``NonFiniteError`` naming the step and
  the metric before anything else is saved; "skip" (the stage compiles its step
  with ``skip_nonfinite``, which keeps the old state) counts the step
  (``train/nonfinite_steps``) and goes on. Either way no non-finite state
  reaches a checkpoint;
- ``config.profile_steps = "a,b"``: a ``jax.profiler`` trace of steps a..b in
  ``workdir/tensorboard`` (TensorBoard's profile plugin opens it);
- a clean shutdown: pending checkpoint saves finish, writers and data workers close.

The workdir may be local or ``gs://``: every path goes through ``etils.epath``
or Orbax.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from muse_jax import config_lib
from muse_jax.parallel import sharding
from muse_jax.train import checkpoint as checkpoint_lib
from muse_jax.train import metrics as metrics_lib

# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry".
# A launcher that sees it re-runs the same command, which resumes.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """SIGTERM arrived; the run saved a checkpoint at ``step`` and must exit."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint saved at step {step}; exit code "
                     f"{PREEMPTED_EXIT_CODE}; re-run the same command to continue")
    self.step = step


class NonFiniteError(RuntimeError):
  """A non-finite loss or gradient norm under ``config.nonfinite = "stop"``."""


class Batches(Protocol):
  """A stage's batch source: an iterator whose position is checkpointable."""

  def __next__(self) -> Any: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...
  def counters(self) -> Mapping[str, float]: ...
  def close(self) -> None: ...


@dataclasses.dataclass
class Stage:
  """What a stage gives the loop, and nothing else.

  The train state is opaque to the loop: any pytree of arrays Orbax can save,
  restored into ``abstract_state`` (sharded ShapeDtypeStructs).
  """
  abstract_state: Any
  init: Callable[[], Any]                            # () -> fresh train state (weights loaded)
  batches: Callable[[int, int], Batches]             # (process index, count) -> batch source
  step: Callable[[Any, Any, int], tuple[Any, dict]]  # (state, batch, step) -> (state, metrics)
  evaluate: Callable[[Any, int, metrics_lib.MetricWriter, epath.Path], dict]
  log_metrics: Callable[[], dict] = dict              # stage's host-side metrics at each log
  # (state, batches) -> state, once, when no checkpoint exists: data-dependent
  # initialisation (it may draw batches; their position is in every checkpoint)
  fresh_start: Callable[[Any, Batches], Any] | None = None
  headline: tuple[str, ...] = ()                      # metrics shown on the progress line


def guarded(name: str) -> bool:
  """The metrics the non-finite guard watches: losses and gradient norms."""
  return name.startswith(("loss/", "grad_norm"))


def skip_nonfinite(step_fn: Callable) -> Callable:
  """Wraps ``step(state, *args) -> (new_state, metrics, *rest)`` (before ``jax.jit``)
  so that a step whose guarded metrics are not all finite returns the old state.
  Stages use it under ``config.nonfinite = "skip"`` only: the select is part of the
  compiled step and may change its rounding in the last bit, and "stop" needs no
  select (the loop stops before a non-finite state is saved)."""

  @functools.wraps(step_fn)
  def guarded_step(state, *args, **kwargs):
    new, metrics, *rest = step_fn(state, *args, **kwargs)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for k, v in metrics.items()
                                if guarded(k)]))
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    return (new, metrics, *rest)

  return guarded_step


class _NonFiniteGuard:
  """Reads each step's losses and gradient norms one step late (so that the host
  does not wait for every step), and at once before anything is logged or saved."""

  def __init__(self, mode: str):
    self.mode = mode
    self.count = 0
    self._pending: tuple[int, dict] | None = None

  def push(self, step: int, metrics: dict) -> None:
    self.check()
    self._pending = (step, {k: v for k, v in metrics.items() if guarded(k)})

  def check(self) -> None:
    if self._pending is None:
      return
    step, watched = self._pending
    self._pending = None
    values = jax.device_get(watched)
    bad = sorted(k for k, v in values.items() if not np.all(np.isfinite(v)))
    if not bad:
      return
    self.count += 1
    if self.mode == "stop":
      raise NonFiniteError(
          f"step {step}: {', '.join(f'{k}={float(values[k])}' for k in bad)} is not finite; "
          "nothing after the last checkpoint was saved (config.nonfinite='skip' skips such "
          "steps instead)")
    logging.warning("step %d: non-finite %s; update skipped (%d so far)", step,
                    ", ".join(bad), self.count)


class _Preemption:
  """Has a preemption notice (SIGTERM) reached this run? All processes answer alike.

  With several processes JAX's coordination service catches SIGTERM and its sync
  point names the same step everywhere; a single process catches SIGTERM itself.
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._noticed = False
    self._previous = None
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._notice)

  def _notice(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
    self._noticed = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._noticed

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Profiler:
  """jax.profiler trace from the start of step ``first`` to the end of step ``last``."""

  def __init__(self, steps: tuple[int, int] | None, logdir: epath.Path):
    self._steps, self._logdir, self._active = steps, logdir, False

  def before(self, step: int) -> None:
    if self._steps and step == self._steps[0]:
      jax.profiler.start_trace(str(self._logdir))
      self._active = True

  def after(self, step: int, state: Any) -> None:
    if self._active and step == self._steps[1]:
      jax.block_until_ready(state)   # the trace must contain the steps' device work
      self.stop()
      logging.info("profile of steps %d-%d written under %s/plugins/profile", *self._steps,
                   self._logdir)

  def stop(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False


def eval_history_path(workdir: epath.Path) -> epath.Path:
  return workdir / "eval_history.jsonl"


def append_eval_history(workdir: epath.Path, record: dict) -> None:
  """One JSON line per eval. Object stores cannot append: the small file is rewritten."""
  path = eval_history_path(workdir)
  previous = path.read_text() if path.exists() else ""
  path.write_text(previous + json.dumps(record) + "\n")


def _forget_after(workdir: epath.Path, step: int, writer: metrics_lib.MetricWriter) -> None:
  """A resumed run replays the steps after ``step``: drop what the previous run
  recorded for them (process 0 only)."""
  path = eval_history_path(workdir)
  if path.exists():
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
      path.write_text("".join(line + "\n" for line in kept))
  writer.restart(step + 1)


def _every(step: int, interval: int) -> bool:
  return step % interval == 0


def train(config: ml_collections.ConfigDict, workdir: str,
          make_stage: Callable[[ml_collections.ConfigDict, jax.sharding.Mesh], Stage], *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) a stage; returns {"state", "metrics" (last logged), "step"}.

  ``stop_after`` ends this call after that many steps, with a checkpoint there
  (tests use it to stand for a killed run). Raises ``Preempted`` after saving
  on SIGTERM and ``NonFiniteError`` under ``config.nonfinite = "stop"``.
  """
  profile_steps = config_lib.validate_loop(config)
  process_index, process_count = jax.process_index(), jax.process_count()
  workdir = checkpoint_lib.as_path(workdir)
  preemption = _Preemption()   # first: a SIGTERM during start-up still gets its checkpoint
  try:
    return _train(config, workdir, make_stage, stop_after, profile_steps, preemption,
                  process_index, process_count)
  finally:
    preemption.close()


def _train(config, workdir, make_stage, stop_after, profile_steps, preemption, process_index,
           process_count):
  is_lead = process_index == 0
  mesh = sharding.make_mesh(config.mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                     clean_incomplete=True)
  start = ckpt.latest_step()
  if start is not None:   # before anything compiles: a resume in the other layout stops here
    checkpoint_lib.check_same_layout(config, workdir, "the run in")
  stage = make_stage(config, mesh)
  state = stage.init()
  batches = stage.batches(process_index, process_count)
  if start is not None:
    state, data_state = ckpt.restore(start, stage.abstract_state)
    batches.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  elif stage.fresh_start is not None:
    state = stage.fresh_start(state, batches)
  start = start or 0
  checkpoint_lib.save_config(config, workdir)   # only now: see the module docstring

  writer = (metrics_lib.TensorBoardWriter(str(workdir / "tensorboard")) if is_lead
            else metrics_lib.MetricWriter())
  if start and is_lead:
    _forget_after(workdir, start, writer)
  guard = _NonFiniteGuard(config.nonfinite)
  profiler = _Profiler(profile_steps, workdir / "tensorboard")
  progress = metrics_lib.ProgressLine(config.total_steps, start)
  last: dict[str, float] = {}
  step = start
  try:
    if start == 0:
      last.update(stage.evaluate(state, 0, writer, workdir))
    end = config.total_steps if stop_after is None else min(config.total_steps,
                                                            start + stop_after)
    for step in range(start + 1, end + 1):
      profiler.before(step)
      state, metrics = stage.step(state, next(batches), step)
      guard.push(step, metrics)
      profiler.after(step, state)
      if _every(step, config.log_every) or step == end:
        guard.check()
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(stage.log_metrics())
        scalars.update({k: float(v) for k, v in batches.counters().items()})
        if config.nonfinite == "skip":
          scalars["train/nonfinite_steps"] = guard.count
        scalars["steps_per_second"] = progress.report(step, scalars, stage.headline)
        writer.write_scalars(step, scalars)
        last.update(scalars)
      if _every(step, config.eval_every) or step == config.total_steps:
        guard.check()
        last.update(stage.evaluate(state, step, writer, workdir))
      preempted = preemption.reached(step) and step < config.total_steps
      if _every(step, config.checkpoint_every) or step == end or preempted:
        guard.check()
        ckpt.save(step, state, batches.get_state())   # asynchronous: the next step goes on
      if preempted:
        ckpt.wait()
        raise Preempted(step)
  finally:
    profiler.stop()
    ckpt.close()
    writer.close()
    batches.close()
  return {"state": state, "metrics": last, "step": step}
