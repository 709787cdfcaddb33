"""Entry point: ``python -m muse_jax.main --config=configs/X.py[:arg] --workdir=DIR``.

Parses flags, starts the distributed runtime when several processes run and
hands over to the trainer the config names (which writes the resolved config to
``DIR/config.json``). Re-running with the same workdir resumes from its latest
checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from muse_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/sde_256.py:demo; override fields with "
    "--config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
flags.mark_flags_as_required(["config", "workdir"])


def trainers():
  """Trainer name (``config.trainer``) -> train(config, workdir)."""
  from muse_jax.train import sde_trainer
  return {"sde": sde_trainer.train}


def maybe_initialize_distributed() -> None:
  """Multi-process runs (TPU pods, multi-node GPU) must connect before touching devices."""
  import jax
  if any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
                                   "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                                   "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
    jax.distributed.initialize()


class _QuietLibraries(logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; warnings still pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  available = trainers()
  if config.get("trainer") not in available:
    sys.exit(f"config error: config.trainer: {config.get('trainer')!r} is not a trainer; "
             f"use one of {sorted(available)}")
  maybe_initialize_distributed()
  try:
    available[config.trainer](config, workdir)
  except (config_lib.ConfigError, ValueError) as e:
    if type(e).__name__ in ("ConfigError", "DataConfigError", "CheckpointMismatchError"):
      sys.exit(f"error: {e}")
    raise


if __name__ == "__main__":
  app.run(main)
