"""The tests' tiny SDE run as a config file, for subprocesses of ``muse_jax.main``
(tests that kill a run for real):

  python -m muse_jax.main --config=tests/tiny_run_config.py --workdir=DIR

Importing ``conftest`` also points the subprocess at the tests' compile cache.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from conftest import tiny_sde_config  # noqa: E402


def get_config(arg=None):
  del arg
  c = tiny_sde_config(batch_size=2, total_steps=6, disc_start=4)
  c.update(eval_every=3, checkpoint_every=2)
  return c
