"""The ~30M-parameter Qwen2 both Qwen2 benchmarks compare: one torch model, and
ours converted from its saved weights, so both sides hold the same numbers."""

from __future__ import annotations

import tempfile

import jax.numpy as jnp
import torch
import transformers

from muse_jax.convert import hf

CONFIG = dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
              rope_theta=1e6, max_position_embeddings=1024)


def build(**overrides):
  """(torch Qwen2ForCausalLM, our converted model, parameters in millions)."""
  torch.manual_seed(0)
  torch_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG, **overrides))
  with tempfile.TemporaryDirectory() as folder:
    torch_model.save_pretrained(folder)
    ours = hf.load_qwen2(folder, dtype=jnp.float32)
  return torch_model, ours, sum(p.numel() for p in torch_model.parameters()) / 1e6


def steal_ticks() -> tuple[int, int]:
  """(steal, all) CPU ticks since boot from /proc/stat ((0, 0) where it does not exist).

  On a VM the hypervisor 'steals' time for other guests; a run with a large
  steal share measures the neighbours as much as the code.
  """
  try:
    with open("/proc/stat") as f:
      ticks = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return 0, 0
  return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int]) -> float:
  """Fraction of all CPU ticks since ``before`` that the hypervisor stole."""
  steal, total = steal_ticks()
  return round((steal - before[0]) / max(total - before[1], 1), 3)
