"""Orbax checkpoints: the train state and the data iterator, saved together.

Each step directory holds two items: ``state`` (a pytree of arrays: step,
parameters, optimiser states) and ``data`` (the input pipeline's JSON state), so
a resumed run continues on exactly the batches it would have seen. Saves are
asynchronous: ``save`` returns once the arrays are copied off the devices, and
the files are written in the background while training goes on. Orbax writes
into a temporary directory and renames it when complete (on object stores, where
renames do not exist, it marks a complete save with a commit file), so a run
killed during a save resumes from the previous complete checkpoint. The
directory may be local or ``gs://`` (``etils.epath``).

Before restoring, every array's shape is compared with what the current config
builds; a mismatch names the tensor and both shapes instead of failing deep in
Orbax (e.g. a run restarted with a different ``model.code_dim``); a run restarted
with the other ``model.scan_layers`` is told the flag to set (``check_same_layout``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from muse_jax import config_lib


class CheckpointMismatchError(ValueError):
  """A checkpoint whose tensors do not fit the model the config builds."""


def _path_str(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def check_shapes(expected: Any, found: Any, where: str) -> None:
  """Compares two pytrees leaf by leaf (shape only); raises naming the first difference."""
  exp = {_path_str(p): tuple(getattr(x, "shape", np.shape(x)))
         for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  got = {_path_str(p): tuple(getattr(x, "shape", np.shape(x)))
         for p, x in jax.tree_util.tree_leaves_with_path(found)}
  missing = sorted(set(exp) - set(got))
  if missing:
    raise CheckpointMismatchError(f"{where}: tensor {missing[0]} (shape {exp[missing[0]]}) is "
                                  f"missing from the checkpoint ({len(missing)} missing)")
  extra = sorted(set(got) - set(exp))
  if extra:
    raise CheckpointMismatchError(f"{where}: checkpoint has tensor {extra[0]} (shape "
                                  f"{got[extra[0]]}) that the model does not")
  differ = [n for n in exp if got[n] != exp[n]]
  if differ:
    differ.sort(key=lambda n: ("opt_state" in n, n))   # parameters before optimiser moments
    shown = "; ".join(f"tensor {n} has shape {got[n]} in the checkpoint but the model expects "
                      f"{exp[n]}" for n in differ[:3])
    raise CheckpointMismatchError(
        f"{where}: {len(differ)} tensors differ from the config's model: {shown}"
        f"{'; ...' if len(differ) > 3 else ''}. The config differs from the one that wrote "
        "this checkpoint (compare with config.json in the workdir)")


class Checkpointer:
  """Interval + final saves of (state, data state); keeps the last ``keep``."""

  def __init__(self, directory: str | epath.Path, *, keep: int = 3,
               clean_incomplete: bool = False):
    """``clean_incomplete``: delete saves a kill interrupted (local ``*.orbax-checkpoint-tmp*``
    directories; on object stores, step directories without Orbax's commit file), so
    that their steps are later written afresh. Only for the run that owns the
    directory: a reader must not delete a live run's save in progress."""
    self.directory = as_path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=clean_incomplete),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the structure, shapes, dtypes and shardings of ``abstract_state``."""
    found = self._manager.item_metadata(step)["state"]
    check_shapes(abstract_state, found, f"checkpoint {self.directory}/{step}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def as_path(path: str | epath.Path) -> epath.Path:
  """Local paths made absolute (Orbax needs that); object-store URLs (gs://...) kept."""
  if isinstance(path, epath.Path) or "://" in str(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(path))


def check_same_layout(config, run_dir: str | epath.Path, whose: str) -> None:
  """A ConfigError when the run in ``run_dir`` (its ``config.json``) stored its layer stacks in
  the other layout than ``config.model.scan_layers`` builds (``models/stack.py``): its
  checkpoints then hold other tensors, and the fix is one flag."""
  saved = as_path(run_dir) / "config.json"
  if not saved.exists():
    return
  saved_scan = json.loads(saved.read_text()).get("model", {}).get("scan_layers", False)
  scan = config.model.get("scan_layers", False)
  config_lib.check(saved_scan == scan, "model.scan_layers",
                   f"{scan}, but {whose} {run_dir} stores its layers "
                   f"{'scanned' if saved_scan else 'unrolled'} (a run's checkpoints keep their "
                   "layout)", f"set --config.model.scan_layers={saved_scan}")


def save_config(config, workdir: str | epath.Path) -> None:
  """The resolved config as ``workdir/config.json`` (what inference tools rebuild from)."""
  if jax.process_index() == 0:
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

