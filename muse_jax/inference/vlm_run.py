"""A trained MUSE-VL decoder run as a library: its decoder, vocabulary layout and tokenizer.

Shared by ``muse_jax.inference.generate`` and ``muse_jax.inference.understand``.
A run is the workdir of a VLM stage (``configs/vlm_pretrain.py``,
``configs/vlm_sft.py``): its ``config.json`` names the text tokenizer
(``tokenizer_dir``) and the SDE tokenizer run whose codes it reads and writes
(``sde_workdir``). Only the decoder's parameters are read from the latest
checkpoint (``weights.load_run_params``): no optimiser is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from muse_jax import config_lib
from muse_jax import weights
from muse_jax.models import muse_vl
from muse_jax.models import qwen2
from muse_jax.parallel import sharding


@dataclasses.dataclass
class VlmRun:
  decoder: qwen2.Qwen2ForCausalLM
  layout: muse_vl.VocabLayout
  tokenizer: Any                 # the run's Hugging Face tokenizer
  config: ml_collections.ConfigDict
  step: int


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json; a directory that is not a VLM run is a one-line ValueError."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{workdir!r} has no config.json; give the workdir of a VLM run (python -m "
        "muse_jax.main --config=configs/vlm_sft.py:demo --workdir=DIR)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if "sde_workdir" not in config or "tokenizer_dir" not in config:
    raise ValueError(f"{workdir!r} is not a VLM run (its config.json has no sde_workdir / "
                     "tokenizer_dir); give the workdir of configs/vlm_pretrain.py or vlm_sft.py")
  return config


def sde_workdir(config: ml_collections.ConfigDict) -> str:
  """The run's SDE tokenizer run, checked to exist."""
  if not (epath.Path(config.sde_workdir) / "config.json").exists():
    raise FileNotFoundError(f"the run's sde_workdir {config.sde_workdir!r} has no "
                            "config.json (the SDE tokenizer run must stay where it was)")
  return config.sde_workdir


def load_decoder(workdir: str, config: ml_collections.ConfigDict, step: int | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[qwen2.Qwen2ForCausalLM, int]:
  """(decoder with the run's parameters, step), on ``mesh`` (default: the first device)."""
  model_config = config_lib.llm_model_config(config)
  graphdef, params = nnx.split(nnx.eval_shape(
      lambda: qwen2.Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(0))))
  if mesh is None:
    mesh = sharding.make_mesh(sharding.mesh_config(data=1), jax.devices()[:1])
  abstract = {"params": params}
  abstract = sharding.with_shardings(abstract, sharding.shardings(abstract, mesh))
  restored, step = weights.load_run_params(workdir, abstract, step)
  return nnx.merge(graphdef, restored["params"]), step


def load(workdir: str, step: int | None = None) -> VlmRun:
  """The decoder, layout and tokenizer of a VLM run (see the module docstring)."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = read_config(workdir)
  decoder, step = load_decoder(workdir, config, step)
  if not (epath.Path(config.tokenizer_dir) / "tokenizer_config.json").exists():
    raise FileNotFoundError(f"the run's tokenizer_dir {config.tokenizer_dir!r} has no "
                            "tokenizer_config.json")
  tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer_dir)
  return VlmRun(decoder, config_lib.vocab_layout(config), tokenizer, config, step)


def add_sampling_flags(parser: argparse.ArgumentParser, *, temperature: float, item: str) -> None:
  """The sampling, batching and checkpoint flags ``generate`` and ``understand`` share;
  ``item`` names what one seed and one batch row stand for (prompt, conversation)."""
  parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0 = off")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0, help=f"{item} i uses seed + i")
  parser.add_argument("--batch_size", type=int, default=8, help=f"{item}s per jitted call")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
