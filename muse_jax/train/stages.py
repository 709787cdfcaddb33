"""The registry of training stages, shared by ``muse_jax.main`` and ``muse_jax.compile``.

``config.trainer`` names a stage. A stage is a module with

- ``setup(config, mesh)`` -> an object with ``aot_programs(config)`` (what
  ``python -m muse_jax.compile`` compiles for a TPU slice) and ``step_items(config)``
  (what one step consumes, e.g. ``(batch_size * seq_len, "tokens")``: the
  planner's throughput), and
- ``train(config, workdir, *, stop_after=None)`` running the shared loop
  (``muse_jax/train/loop.py``) on the stage's ``loop.Stage``
  (``stage(config, mesh)``).

Adding a stage is one entry below. Modules are imported on first use, so that
``--help`` and config errors stay quick.
"""

from __future__ import annotations

import importlib
import types

from muse_jax import config_lib

STAGES = {
    "sde": "muse_jax.train.sde_trainer",   # SDE tokenizer
    "llm": "muse_jax.train.llm_trainer",   # MUSE-VL decoder: the VLM stages (configs/vlm_*.py)
}


def stage_module(name: str | None, *, needs: str = "setup") -> types.ModuleType:
  """The module of stage ``name`` (``config.trainer``), which must define ``needs``."""
  if name not in STAGES:
    raise config_lib.ConfigError(f"config.trainer: {name!r} is not a stage; use one of "
                                 f"{sorted(STAGES)}")
  module = importlib.import_module(STAGES[name])
  if not hasattr(module, needs):
    with_it = sorted(n for n in STAGES if hasattr(importlib.import_module(STAGES[n]), needs))
    raise config_lib.ConfigError(f"config.trainer: stage {name!r} has no {needs} yet; stages "
                                 f"with one: {with_it}")
  return module
