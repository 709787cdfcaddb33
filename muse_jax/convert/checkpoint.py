"""Our decoder checkpoint directory: everything needed to rebuild the model.

Layout of ``DIR``:
  config.json              our ``Qwen2Config`` (dataclass fields)
  params/                  Orbax PyTree checkpoint (StandardCheckpointer reads it) of
                           ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
  vocab_layout.json        MUSE-VL ``VocabLayout`` when the vocabulary was extended
  hf_config.json           the source Hugging Face config.json (kept for export)
  hf_generation_config.json  the source generation_config.json, if any

Parameters can be read back one tensor at a time (``read_param``), which is how
export to Hugging Face streams. ``param_shapes`` / ``with_params`` (any module)
are shared by all converters: they fill an abstract module with converted arrays
without random initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from muse_jax.models import muse_vl, qwen2

CONFIG = "config.json"
PARAMS = "params"
VOCAB_LAYOUT = "vocab_layout.json"
HF_CONFIG = "hf_config.json"
HF_GENERATION_CONFIG = "hf_generation_config.json"


def abstract_model(config: qwen2.Qwen2Config) -> qwen2.Qwen2ForCausalLM:
  """The model with ShapeDtypeStructs for parameters (allocates nothing)."""
  return nnx.eval_shape(lambda: qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))


def param_shapes(module: nnx.Module) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
  """{parameter path: (shape, dtype)} of a (possibly abstract) module."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  return {path: (tuple(v.shape), np.dtype(v.dtype)) for path, v in flat.items()}


def with_params(abstract_module: nnx.Module, flat_params: dict[tuple, Any]) -> nnx.Module:
  """The module with the given arrays as parameters (nothing randomly initialised)."""
  graphdef, state = nnx.split(abstract_module)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat_params))
  return nnx.merge(graphdef, state)


def model_from_params(config: qwen2.Qwen2Config,
                      flat_params: dict[tuple, Any]) -> qwen2.Qwen2ForCausalLM:
  return with_params(abstract_model(config), flat_params)


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)


def read_json(ckpt_dir: str, name: str) -> Any | None:
  path = os.path.join(ckpt_dir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def save(out_dir: str, config: qwen2.Qwen2Config, flat_params: dict[tuple, jax.Array], *,
         vocab_layout: muse_vl.VocabLayout | None = None, hf_config: dict | None = None,
         hf_generation_config: dict | None = None) -> None:
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, PARAMS)):
    raise FileExistsError(f"{out_dir} already holds a checkpoint; choose a new directory")
  os.makedirs(out_dir, exist_ok=True)
  # Uncompressed: Orbax then writes jax arrays straight from their buffers, where
  # compression would stage a second copy of everything in flight (and float
  # weights barely compress).
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
  checkpointer.save(os.path.join(out_dir, PARAMS),
                    args=ocp.args.PyTreeSave(traverse_util.unflatten_dict(flat_params)))
  _write_json(os.path.join(out_dir, CONFIG), dataclasses.asdict(config))
  for name, value in ((VOCAB_LAYOUT, vocab_layout and dataclasses.asdict(vocab_layout)),
                      (HF_CONFIG, hf_config), (HF_GENERATION_CONFIG, hf_generation_config)):
    if value is not None:
      _write_json(os.path.join(out_dir, name), value)


def read_config(ckpt_dir: str) -> qwen2.Qwen2Config:
  values = read_json(ckpt_dir, CONFIG)
  if values is None:
    raise FileNotFoundError(f"{ckpt_dir} has no {CONFIG}; is it a muse_jax decoder checkpoint?")
  return qwen2.Qwen2Config(**values)


def read_vocab_layout(ckpt_dir: str) -> muse_vl.VocabLayout | None:
  values = read_json(ckpt_dir, VOCAB_LAYOUT)
  return None if values is None else muse_vl.VocabLayout(**values)


def read_param(ckpt_dir: str, path: tuple, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """One parameter as a numpy array (an Orbax partial restore: reads nothing else)."""
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(os.path.abspath(ckpt_dir), PARAMS), args=ocp.args.PyTreeRestore(
          item=traverse_util.unflatten_dict({path: jax.ShapeDtypeStruct(shape, dtype)}),
          restore_args=traverse_util.unflatten_dict(
              {path: ocp.RestoreArgs(restore_type=np.ndarray)}),
          partial_restore=True))
  array = traverse_util.flatten_dict(restored)[path]
  if array.shape != tuple(shape):
    raise ValueError(f"checkpoint parameter {'/'.join(map(str, path))} in {ckpt_dir} has shape "
                     f"{array.shape}, its config.json implies {tuple(shape)}")
  return array


def iter_params(ckpt_dir: str, config: qwen2.Qwen2Config) -> Iterator[tuple[tuple, np.ndarray]]:
  """Yields (path, numpy array) one parameter at a time."""
  for path, (shape, dtype) in param_shapes(abstract_model(config)).items():
    yield path, read_param(ckpt_dir, path, shape, dtype)


def load(ckpt_dir: str, dtype: str | None = None) -> qwen2.Qwen2ForCausalLM:
  """Rebuilds the decoder; ``dtype`` overrides both compute and parameter dtype."""
  config = read_config(ckpt_dir)
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
  flat = {path: jax.numpy.asarray(array, config.param_dtype)
          for path, array in iter_params(ckpt_dir, config)}
  return model_from_params(config, flat)
