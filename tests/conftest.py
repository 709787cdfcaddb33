"""Test-wide setup: CPU only, and config files importable by path."""

import importlib.util
import os
import pathlib

import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Trainer tests build the same step functions several times (straight run, killed
# run, resumed run); a persistent compilation cache compiles each of them once.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MUSE_JAX_TEST_CACHE", tempfile.mkdtemp(prefix="jax_cache_")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py:get_config(arg), as `--config=configs/<name>.py:arg` would load it."""
  spec = importlib.util.spec_from_file_location(f"configs.{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def config_loader():
  return load_config
