"""Hugging Face SigLIP vision towers -> ``SiglipVisionTower`` (SDE encoders).

Accepts ``SiglipVisionModel`` directories and full ``SiglipModel`` ones (only the
``vision_model`` half is read). The tensor prefix differs between transformers
versions (``vision_model.`` or none for a saved SiglipVisionModel); both are
recognised. The attention-pooling head is not part of the tower and is skipped.

The output (``muse_jax.weights``, the tower's parameter paths) is what the SDE
trainer's ``config.siglip_checkpoint`` reads into both the image encoder and the
frozen semantic encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from muse_jax import weights
from muse_jax.convert import checkpoint, tensor_io
from muse_jax.models import siglip

SUPPORTED_ARCHITECTURES = ("SiglipVisionModel", "SiglipModel")
_PROBE = "embeddings.patch_embedding.weight"
KIND = "siglip_vision_tower"


def config_from_hf(hf: dict, dtype: Any = "float32") -> siglip.SiglipConfig:
  """Our tower config from a SiglipVisionModel or SiglipModel config.json dict."""
  model_type = hf.get("model_type")
  if model_type == "siglip":
    vision = hf.get("vision_config") or {}
  elif model_type == "siglip_vision_model":
    vision = hf
  else:
    raise ValueError(f"unsupported architecture {(hf.get('architectures') or [model_type])[0]!r}"
                     f"; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  if vision.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
    raise ValueError(f"SigLIP tower uses hidden_act={vision['hidden_act']!r}; the tower "
                     "implements gelu_pytorch_tanh only")
  if vision.get("num_channels", 3) != 3:
    raise ValueError(f"SigLIP tower has {vision['num_channels']} input channels; expected 3")
  dtype = np.dtype(jnp.dtype(dtype)).name
  defaults = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
              "num_attention_heads": 12, "intermediate_size": 3072, "layer_norm_eps": 1e-6}
  v = {**defaults, **vision}
  return siglip.SiglipConfig(
      image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
      depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
      mlp_dim=v["intermediate_size"], layer_norm_eps=v["layer_norm_eps"], dtype=dtype,
      param_dtype=dtype)


def tensor_name_map(prefix: str) -> tensor_io.NameMap:
  """Our tower path -> (HF name under ``prefix``, layout)."""
  def name_map(path: tuple) -> tuple[str, tensor_io.Layout]:
    *parents, leaf = path
    base = prefix + ".".join(str(p) for p in parents)
    if leaf == "kernel":
      layout = tensor_io.CONV2D if parents[-1] == "patch_embedding" else tensor_io.LINEAR
      return f"{base}.weight", layout
    if leaf in ("scale", "embedding"):
      return f"{base}.weight", tensor_io.SAME
    return f"{base}.{leaf}", tensor_io.SAME
  return name_map


def _abstract_tower(config: siglip.SiglipConfig) -> siglip.SiglipVisionTower:
  return nnx.eval_shape(lambda: siglip.SiglipVisionTower(config, rngs=nnx.Rngs(0)))


def _read_siglip_vision(hf_dir: str, dtype: Any):
  """(config, iterator of (param path, array)) of the vision tower in ``hf_dir``."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir} has no config.json")
  with open(path) as f:
    config = config_from_hf(json.load(f), dtype)
  reader = tensor_io.open_tensors(hf_dir)
  prefix = "vision_model." if f"vision_model.{_PROBE}" in reader else ""
  targets = checkpoint.param_shapes(_abstract_tower(config))
  return config, tensor_io.iter_params(reader, targets, tensor_name_map(prefix))


def load_siglip_vision(hf_dir: str, dtype: Any = jnp.float32) -> siglip.SiglipVisionTower:
  """A ready tower: NHWC pixels in [-1, 1] -> HF ``last_hidden_state`` [B, N, C]."""
  config, params = _read_siglip_vision(hf_dir, dtype)
  return checkpoint.with_params(_abstract_tower(config),
                                {path: jnp.asarray(a) for path, a in params})


def hf_to_checkpoint(hf_dir: str, out_dir: str, dtype: Any = "float32",
                     scan_layers: bool = False) -> siglip.SiglipConfig:
  """Writes the tower's parameters (``muse_jax.weights``, one tensor at a time) for
  ``config.siglip_checkpoint``; ``scan_layers`` writes each layer's tensors into their
  slices of stacked ones (either layout loads into either model)."""
  config, params = _read_siglip_vision(hf_dir, dtype)
  config = dataclasses.replace(config, scan_layers=scan_layers)
  depth = config.depth if scan_layers else None
  with weights.Writer(out_dir, {"kind": KIND, "config": dataclasses.asdict(config)}) as writer:
    for path, array in params:
      writer.put(weights.tensor_name(path), array, scan_depth=depth)
  return config
