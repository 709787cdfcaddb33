"""Multi-process start-up that does not guess.

Explicit settings (``--coordinator_address``, ``--num_processes``,
``--process_id`` of ``muse_jax.main``: all three) are used as given. Without
them the runtime starts only where the cluster environment is complete: on SLURM
inside an ``srun`` step with more than one task (an ``sbatch`` shell lacks the
step variables: one line says so and the run continues as one process), on a
multi-host Cloud TPU slice (JAX asks the TPU metadata for its peers), or where
``JAX_COORDINATOR_ADDRESS`` / Open MPI's variables say a launcher set it up.
"""

from __future__ import annotations

import logging
import os

import jax

from muse_jax import config_lib

SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OTHER_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
                      "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def plan(env: dict[str, str], coordinator_address: str | None, num_processes: int | None,
         process_id: int | None) -> tuple[dict | None, str]:
  """(keyword arguments for ``jax.distributed.initialize`` or None for one process, why).

  Raises ConfigError for an incomplete set of explicit flags.
  """
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given:
    missing = sorted(set(explicit) - set(given))
    if missing:
      raise config_lib.ConfigError(
          f"--{missing[0]} is missing: --coordinator_address, --num_processes and --process_id "
          "go together")
    return given, "explicit flags"
  if "SLURM_JOB_ID" in env:
    missing = [v for v in SLURM_STEP_VARS if v not in env]
    if missing:
      return None, (f"SLURM job {env['SLURM_JOB_ID']} without an srun step ({', '.join(missing)} "
                    "unset): running as one process; start with `srun python -m muse_jax.main "
                    "...` or pass --coordinator_address/--num_processes/--process_id")
    if int(env["SLURM_NTASKS"]) == 1:
      return None, "SLURM step with one task"
    return {}, f"SLURM step with {env['SLURM_NTASKS']} tasks"
  if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return {}, "multi-host Cloud TPU slice"
  for var in OTHER_CLUSTER_VARS:
    if var in env:
      return {}, f"{var} is set"
  return None, "no cluster environment"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts ``jax.distributed`` when ``plan`` says so, before anything touches devices."""
  kwargs, why = plan(dict(os.environ), coordinator_address, num_processes, process_id)
  if kwargs is None:
    if why.startswith("SLURM job"):
      logging.warning(why)
    return
  logging.info("starting the distributed runtime (%s)", why)
  jax.distributed.initialize(**kwargs)
