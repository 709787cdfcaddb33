"""Our decoder weights: a ``muse_jax.weights`` directory plus what rebuilds the model.

``DIR`` is the one pretrained-weights format (``muse_jax/weights.py``): one array
per parameter under ``DIR/tensors/`` and ``DIR/weights.json``, whose metadata
holds
  config                 our ``Qwen2Config`` (dataclass fields)
  vocab_layout           MUSE-VL ``VocabLayout`` when the vocabulary was extended
  hf_config              the source Hugging Face config.json (kept for export)
  hf_generation_config   the source generation_config.json, if any

``save`` takes parameters one at a time (import streams), ``weights.read``
gives them back one at a time (export streams), ``load`` rebuilds the model straight
onto a mesh's shardings (``weights.load_pretrained``): a model too big for one
chip never passes through one. ``param_shapes`` / ``with_params`` (any module)
are shared by all converters: they fill an abstract module with converted arrays
without random initialisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx, traverse_util

from muse_jax import weights
from muse_jax.models import muse_vl, qwen2
from muse_jax.parallel import sharding

KIND = "qwen2_decoder"


def abstract_model(config: qwen2.Qwen2Config) -> qwen2.Qwen2ForCausalLM:
  """The model with ShapeDtypeStructs for parameters (allocates nothing)."""
  return nnx.eval_shape(lambda: qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))


def layer_shapes(config: qwen2.Qwen2Config) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
  """``param_shapes`` with one entry per layer (the unscanned layout), whatever
  ``config.scan_layers`` says: how Hugging Face files name the parameters."""
  return param_shapes(abstract_model(dataclasses.replace(config, scan_layers=False)))


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


def save(out_dir: str, config: qwen2.Qwen2Config, params: Iterable[tuple[tuple, Any]], *,
         vocab_layout: muse_vl.VocabLayout | None = None, hf_config: dict | None = None,
         hf_generation_config: dict | None = None) -> None:
  """Writes (parameter path, array) pairs as they come, then the index."""
  metadata = {"kind": KIND, "config": dataclasses.asdict(config)}
  for name, value in (("vocab_layout", vocab_layout and dataclasses.asdict(vocab_layout)),
                      ("hf_config", hf_config), ("hf_generation_config", hf_generation_config)):
    if value is not None:
      metadata[name] = value
  depth = config.num_layers if config.scan_layers else None
  with weights.Writer(out_dir, metadata) as writer:
    for path, array in params:   # layer by layer: a scanned config stacks them as they come
      writer.put(weights.tensor_name(path), array, scan_depth=depth)


def read_metadata(ckpt_dir: str) -> dict[str, Any]:
  metadata = weights.read_index(ckpt_dir).metadata
  if metadata.get("kind") != KIND:
    raise ValueError(f"{ckpt_dir} holds {metadata.get('kind') or 'unlabelled'} weights, not a "
                     "decoder (convert one with `python -m muse_jax.convert llm-from-hf`)")
  return metadata


def read_config(ckpt_dir: str) -> qwen2.Qwen2Config:
  return qwen2.Qwen2Config(**read_metadata(ckpt_dir)["config"])


def read_vocab_layout(ckpt_dir: str) -> muse_vl.VocabLayout | None:
  values = read_metadata(ckpt_dir).get("vocab_layout")
  return None if values is None else muse_vl.VocabLayout(**values)


def load(ckpt_dir: str, dtype: str | None = None,
         mesh: jax.sharding.Mesh | None = None) -> qwen2.Qwen2ForCausalLM:
  """Rebuilds the decoder, its parameters read straight onto ``mesh`` by the logical
  sharding rules (default: the first local device); ``dtype`` overrides both
  compute and parameter dtype."""
  config = read_config(ckpt_dir)
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
  graphdef, abstract, rest = nnx.split(abstract_model(config), nnx.Param, ...)
  if mesh is not None:
    abstract = sharding.with_shardings(abstract, sharding.shardings(abstract, mesh))
  return nnx.merge(graphdef, weights.load_pretrained(ckpt_dir, abstract, cast=dtype is not None),
                   rest)
