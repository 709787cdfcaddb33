"""Hugging Face <-> muse_jax for the decoder (Qwen2 / Qwen2.5, Llama / Yi-1.5) and SigLIP.

Weights travel through safetensors files directly (``tensor_io``), one tensor
at a time; ``transformers`` is only needed to write tokenizers (and config.json
files for checkpoints that did not come from Hugging Face). Our module paths
mirror HF names, so the name map is mechanical: ``a.b.kernel`` <-> ``a.b.weight``
transposed, ``embedding`` <-> ``weight``, everything else unchanged.

Stable entry points: ``load_qwen2`` and ``load_siglip_vision`` (models ready to
call), ``hf_to_checkpoint`` / ``checkpoint_to_hf`` (the CLI's work).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import weights
from muse_jax.convert import checkpoint, tensor_io
from muse_jax.convert.siglip import load_siglip_vision  # noqa: F401  (stable entry point)
from muse_jax.data import text_tokenizer
from muse_jax.models import muse_vl, qwen2

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _dtype_name(dtype: Any) -> str:
  return np.dtype(jnp.dtype(dtype)).name


def _rope_settings(hf: dict) -> tuple[float, str]:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  rope_type = (params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
               or "default")
  return float(theta), rope_type


def config_from_hf(hf: dict, dtype: Any = "float32") -> qwen2.Qwen2Config:
  """Our config from a HF config.json dict; rejects what the decoder does not implement."""
  architecture = (hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), "")])[0]
  if architecture not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"unsupported architecture {architecture or hf.get('model_type')!r}; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  theta, rope_type = _rope_settings(hf)
  problems = []
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu')")
  if rope_type != "default":
    problems.append(f"rope type {rope_type!r} (only plain RoPE)")
  if hf.get("use_sliding_window"):
    problems.append("use_sliding_window=True")
  if architecture == "LlamaForCausalLM" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    problems.append("Llama attention_bias / mlp_bias")
  if problems:
    raise ValueError(f"{architecture} checkpoint uses features the decoder does not implement: "
                     f"{'; '.join(problems)}")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  dtype = _dtype_name(dtype)
  return qwen2.Qwen2Config(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads, mlp_dim=hf["intermediate_size"],
      head_dim=None if head_dim in (None, hf["hidden_size"] // heads) else head_dim,
      rope_theta=theta, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      attention_bias=architecture == "Qwen2ForCausalLM",
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      dtype=dtype, param_dtype=dtype)


def config_to_hf(config: qwen2.Qwen2Config, dtype: str, base: dict | None = None) -> dict:
  """A config.json for ``config``: the source config with sizes updated, else a fresh one."""
  fields = dict(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      rms_norm_eps=config.rms_norm_eps,
      tie_word_embeddings=config.tie_word_embeddings,
      max_position_embeddings=config.max_position_embeddings, hidden_act="silu", dtype=dtype)
  if config.head_dim is not None:
    fields["head_dim"] = config.head_dim
  if base is not None:
    hf = dict(base, **fields)
    hf.pop("torch_dtype", None)
    return hf
  import transformers  # only for the canonical set of config fields
  if config.attention_bias:
    cls, extra = transformers.Qwen2Config, {}
  else:
    cls, extra = transformers.LlamaConfig, dict(attention_bias=False, mlp_bias=False)
  fields.pop("dtype")
  hf = cls(**fields, **extra, rope_parameters={"rope_type": "default",
                                               "rope_theta": config.rope_theta}).to_dict()
  hf["architectures"] = ["Qwen2ForCausalLM" if config.attention_bias else "LlamaForCausalLM"]
  hf["dtype"] = dtype
  return hf


def qwen2_tensor_name(path: tuple) -> tuple[str, tensor_io.Layout]:
  """Our parameter path -> (HF tensor name, layout)."""
  *parents, leaf = path
  base = ".".join(str(p) for p in parents)
  if leaf == "kernel":
    return f"{base}.weight", tensor_io.LINEAR
  if leaf == "embedding":
    return f"{base}.weight", tensor_io.SAME
  return f"{base}.{leaf}", tensor_io.SAME


def _read_qwen2(hf_dir: str, dtype: Any):
  """(HF config dict, our config, iterator of (path, array) in our layout)."""
  hf = _read_json(os.path.join(hf_dir, "config.json"))
  if hf is None:
    raise FileNotFoundError(f"{hf_dir} has no config.json")
  config = config_from_hf(hf, dtype)
  shapes = checkpoint.layer_shapes(config)
  return hf, config, tensor_io.iter_params(tensor_io.open_tensors(hf_dir), shapes,
                                           qwen2_tensor_name)


def load_qwen2(hf_dir: str, dtype: Any = jnp.float32) -> qwen2.Qwen2ForCausalLM:
  """A ready ``Qwen2ForCausalLM`` from a HF Qwen2 / Llama directory (computes in ``dtype``),
  every tensor on the default device. For a model that needs a mesh, convert it
  (``hf_to_checkpoint``) and ``checkpoint.load(dir, mesh=mesh)``."""
  _, config, params = _read_qwen2(hf_dir, dtype)
  return checkpoint.model_from_params(config, {path: jnp.asarray(a) for path, a in params})


# the vocabulary axis of each table the MUSE-VL extension grows
_VOCAB_TABLES = {("model", "embed_tokens", "embedding"): 0, ("lm_head", "kernel"): 1}


def hf_to_checkpoint(hf_dir: str, out_dir: str, *, dtype: Any = "float32",
                     num_visual: int | None = None, seed: int = 0,
                     new_rows_scale: float = 1.0, scan_layers: bool = False) -> qwen2.Qwen2Config:
  """Converts a HF decoder to our weights, one tensor at a time; ``num_visual``
  extends the vocabulary for MUSE-VL; ``scan_layers`` writes each layer's tensors into
  their slices of stacked ones (either layout loads into either model)."""
  hf, config, params = _read_qwen2(hf_dir, dtype)
  config = dataclasses.replace(config, scan_layers=scan_layers)
  layout = None
  if num_visual is not None:
    layout = muse_vl.VocabLayout(config.vocab_size, num_visual)
    config = dataclasses.replace(config, vocab_size=layout.vocab_size)

    def extended(params):
      for path, array in params:
        if path in _VOCAB_TABLES:
          axis = _VOCAB_TABLES[path]
          # one generator per table: the new rows do not depend on the order of tensors
          array = muse_vl.extend_vocab(array, layout.vocab_size,
                                       np.random.default_rng((seed, axis)), axis=axis,
                                       scale=new_rows_scale)
        yield path, array
    params = extended(params)
  checkpoint.save(out_dir, config, params, vocab_layout=layout, hf_config=hf,
                  hf_generation_config=_read_json(os.path.join(hf_dir, "generation_config.json")))
  return config


def export_tokenizer(tokenizer_dir: str, out_dir: str,
                     layout: muse_vl.VocabLayout | None) -> None:
  """Copies a HF tokenizer, adding the MUSE-VL tokens at exactly the layout's ids
  (``text_tokenizer.add_muse_vl_tokens``)."""
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  if layout is not None:
    text_tokenizer.add_muse_vl_tokens(tokenizer, layout)
  tokenizer.save_pretrained(out_dir)


def checkpoint_to_hf(ckpt_dir: str, out_dir: str, *, dtype: str | None = None,
                     tokenizer_dir: str | None = None,
                     max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes config.json + safetensors (+ tokenizer) that transformers loads, streaming
  one tensor at a time from our weights; returns the shard names."""
  metadata = checkpoint.read_metadata(ckpt_dir)
  config = checkpoint.read_config(ckpt_dir)
  dtype = _dtype_name(dtype or config.param_dtype)
  np_dtype = np.dtype(jnp.dtype(dtype))
  shapes = checkpoint.layer_shapes(config)   # a scanned store is read a layer slice at a time
  stored = {weights.tensor_name(path): jax.ShapeDtypeStruct(shape, source_dtype)
            for path, (shape, source_dtype) in shapes.items()}
  weights.check(weights.read_index(ckpt_dir), stored)

  def produce(path, layout):
    return lambda: layout.to_theirs(
        weights.read(ckpt_dir, weights.tensor_name(path))).astype(np_dtype, copy=False)

  specs = []
  for path, (shape, _) in shapes.items():
    name, layout = qwen2_tensor_name(path)
    specs.append(tensor_io.TensorSpec(name, layout.their_shape(shape), np_dtype,
                                      produce(path, layout)))
  os.makedirs(out_dir, exist_ok=True)
  shards = tensor_io.write_safetensors(out_dir, specs, max_shard_bytes=max_shard_bytes)
  hf = config_to_hf(config, dtype, metadata.get("hf_config"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  generation = metadata.get("hf_generation_config")
  if generation is not None:
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2, sort_keys=True)
  if tokenizer_dir is not None:
    export_tokenizer(tokenizer_dir, out_dir, checkpoint.read_vocab_layout(ckpt_dir))
  return shards
