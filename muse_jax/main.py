"""Entry point: ``python -m muse_jax.main --config=configs/X.py[:arg] --workdir=DIR``.

Parses flags, starts the distributed runtime when several processes run and
hands over to the stage the config names (``config.trainer``, looked up in
``muse_jax/train/stages.py``; its loop writes the resolved config to
``DIR/config.json``). Re-running with the same workdir resumes from its latest
checkpoint. ``DIR`` may be ``gs://bucket/path``.

Exit codes: 0 done; 1 an error (one line for a bad config, a mismatched
checkpoint or a non-finite loss under ``config.nonfinite=stop``); 75
(``loop.PREEMPTED_EXIT_CODE``) preempted by SIGTERM after saving a checkpoint:
run the same command again to continue.

Multi-process start-up (``muse_jax/parallel/distributed.py``): the runtime
starts where the cluster environment is complete (on SLURM: inside an ``srun``
step) or as ``--coordinator_address``, ``--num_processes`` and ``--process_id``
say; otherwise one line says what is missing and the run is one process.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from muse_jax import config_lib
from muse_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/sde_256.py:demo; override fields with "
    "--config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// URL) for checkpoints, logs "
                               "and images.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's "
                                   "coordinator; with --num_processes and --process_id, "
                                   "overrides cluster detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed() -> None:
  """Multi-process runs (TPU pods, multi-node GPU) must connect before touching devices."""
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


class _QuietLibraries(logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; warnings still pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  from muse_jax.train import loop
  from muse_jax.train import stages
  config, workdir = _CONFIG.value, _WORKDIR.value
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  try:
    stage = stages.stage_module(config.get("trainer"), needs="train")
    maybe_initialize_distributed()
    stage.train(config, workdir)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
  except loop.NonFiniteError as e:
    sys.exit(f"error: {e}")
  except (config_lib.ConfigError, ValueError) as e:
    if type(e).__name__ in ("ConfigError", "DataConfigError", "CheckpointMismatchError"):
      sys.exit(f"error: {e}")
    raise


if __name__ == "__main__":
  app.run(main)
