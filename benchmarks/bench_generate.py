"""Text -> image token sampling with classifier-free guidance: ``inference.generate`` vs
transformers ``generate``, images per minute.

One small MUSE-VL decoder (Qwen2-shaped, ~45M parameters: 16384 text ids + 32768
visual ids + <soi>/<eoi>, hidden 512, 8 layers, 8 heads / 2 KV heads, MLP 1408,
tied embeddings, float32), random weights saved in our weights format and
exported with ``muse_jax.convert``'s Hugging Face export (``hf.checkpoint_to_hf``),
which ``transformers.Qwen2ForCausalLM`` loads: the same numbers on both sides.

Workload, the issue's: batch 8 prompts, CFG on (scale 3), a 16 x 16 grid, so
each side produces 8 x 256 visual ids from 16 rows (8 conditional prompts of 24
tokens, 8 copies of a 12-token unconditional prompt, left-padded, all ending in
``<soi>``):

* ours: ``generate.sample_codes`` (prefill + one ``lax.scan``, the LM head's
  visual columns only, guided logits, one sample per prompt fed to both of its
  rows), on the serving layout (``layers.use_out_in_kernels``, as
  ``bench_qwen2_generate.py``);
* transformers: ``model.generate`` over the same 16 rows with a
  ``LogitsProcessor`` that guides the visual logits the same way, chooses one id
  per prompt (argmax, or a draw from the softmax) and forces it on both rows,
  so both sides compute the same thing; its DynamicCache, its Python loop.

Two modes: ``greedy`` (both sides must produce the same ids: ``same_codes``)
and ``sampled`` (temperature 1; different random streams, so only speed is
compared). Pixel decoding, identical on both sides (our SDE decoder), is not
timed. Runs alternate between the two sides; the figure is images/min ours /
images/min torch in wall-clock time, the last field the smaller of the two
modes' ratios; ``cpu_ratio`` is the same in process CPU time.

  python benchmarks/bench_generate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the peer runs on the CPU; skip accelerator probes

# transformers imports torchvision whenever it is installed, and PyPI's torchvision next
# to the CPU torch fails to import; the tests' conftest declares the two operators it
# misses (see its _declare_torchvision_ops), on import
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
importlib.import_module("conftest")

import jax
import numpy as np
import torch
import transformers
from flax import nnx, traverse_util

from muse_jax.convert import checkpoint, hf
from muse_jax.inference import generate as generate_lib
from muse_jax.kernels import cpu_matmul
from muse_jax.models import layers, muse_vl, qwen2

import qwen2_pair

TEXT_SIZE, NUM_VISUAL = 16384, 32768
BATCH, GRID, CFG_SCALE = 8, 16, 3.0
COND_LEN, UNCOND_LEN = 24, 12


class GuidedChoice(transformers.LogitsProcessor):
  """CFG for transformers: rows [0, B) conditional, [B, 2B) unconditional. Guides the
  visual logits, picks one id per prompt and returns scores that make both of its rows
  take it (every other id -inf), so greedy decoding then emits exactly that id."""

  def __init__(self, layout: muse_vl.VocabLayout, temperature: float, seed: int):
    self.layout = layout
    self.temperature = temperature
    self.generator = torch.Generator().manual_seed(seed)

  def __call__(self, input_ids, scores):
    visual = scores[:, self.layout.visual_start:self.layout.visual_end]
    cond, uncond = visual[:BATCH], visual[BATCH:]
    guided = cond + (CFG_SCALE - 1.0) * (cond - uncond)
    if self.temperature == 0.0:
      choice = guided.argmax(dim=-1)
    else:
      probs = torch.softmax(guided / self.temperature, dim=-1)
      choice = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
    forced = torch.full_like(scores, -torch.inf)
    rows = torch.arange(2 * BATCH)
    forced[rows, self.layout.visual_start + torch.cat([choice, choice])] = 0.0
    return forced


def build_pair(folder: str):
  """(our decoder, the transformers model, layout, parameters in millions)."""
  layout = muse_vl.VocabLayout(TEXT_SIZE, NUM_VISUAL)
  shape = qwen2_pair.CONFIG
  config = qwen2.Qwen2Config(
      vocab_size=layout.vocab_size, hidden_size=shape["hidden_size"],
      num_layers=shape["num_hidden_layers"], num_heads=shape["num_attention_heads"],
      num_kv_heads=shape["num_key_value_heads"], mlp_dim=shape["intermediate_size"],
      tie_word_embeddings=True, max_position_embeddings=1024)
  model = qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
  params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  checkpoint.save(os.path.join(folder, "ours"), config,
                  ((path, np.asarray(value)) for path, value in params.items()),
                  vocab_layout=layout)
  hf.checkpoint_to_hf(os.path.join(folder, "ours"), os.path.join(folder, "hf"))
  torch_model = transformers.Qwen2ForCausalLM.from_pretrained(
      os.path.join(folder, "hf"), torch_dtype=torch.float32)
  torch_model.eval()
  ours = checkpoint.load(os.path.join(folder, "ours"))
  layers.use_out_in_kernels(ours, matmul_impl=cpu_matmul.IMPLEMENTATION)
  return ours, torch_model, layout, sum(p.numel() for p in torch_model.parameters()) / 1e6


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as folder:
    ours, torch_model, layout, params_m = build_pair(folder)

  rng = np.random.default_rng(0)
  soi = np.array([layout.soi_id], np.int32)
  prompts = [np.concatenate([rng.integers(0, TEXT_SIZE, COND_LEN - 1), soi]).astype(np.int32)
             for _ in range(BATCH)]
  uncond = np.concatenate([rng.integers(0, TEXT_SIZE, UNCOND_LEN - 1), soi]).astype(np.int32)
  length = -(-COND_LEN // generate_lib.PROMPT_BUCKET) * generate_lib.PROMPT_BUCKET
  ids, valid = generate_lib.left_pad(prompts + [uncond] * BATCH, length, 0)
  torch_ids, torch_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(valid)
  tokens = GRID * GRID

  result = {"benchmark": "muse_vl_generate_cfg_fp32", "params_m": round(params_m, 1),
            "batch": BATCH, "grid": f"{GRID}x{GRID}", "cfg_scale": CFG_SCALE,
            "cpu_kernel": cpu_matmul.available()}
  ratios = []
  load_before = os.getloadavg()[0]
  steal_before = qwen2_pair.steal_ticks()
  for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
    options = generate_lib.SamplingOptions(cfg_scale=CFG_SCALE, temperature=temperature)

    def run_ours():
      return generate_lib.sample_codes(ours, layout, prompts, uncond, GRID, options=options,
                                       seeds=list(range(BATCH))).reshape(BATCH, -1)

    def run_torch():
      with torch.no_grad():
        out = torch_model.generate(
            torch_ids, attention_mask=torch_mask, do_sample=False, max_new_tokens=tokens,
            min_new_tokens=tokens, eos_token_id=None, pad_token_id=0,
            logits_processor=transformers.LogitsProcessorList(
                [GuidedChoice(layout, temperature, seed=0)]))
      return out[:BATCH, length:].numpy() - layout.visual_start

    ours_codes, torch_codes = run_ours(), run_torch()      # also compiles / warms up
    assert ours_codes.shape == torch_codes.shape == (BATCH, tokens)
    assert 0 <= torch_codes.min() and torch_codes.max() < NUM_VISUAL
    if mode == "greedy":
      result["same_codes"] = bool(np.array_equal(ours_codes, torch_codes))
      result["same_codes_share"] = round(float(np.mean(ours_codes == torch_codes)), 3)
    times = {"ours": ([], []), "torch": ([], [])}        # (wall, process cpu)
    for _ in range(args.repeats):
      for name, run in (("ours", run_ours), ("torch", run_torch)):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(run())
        times[name][0].append(time.perf_counter() - wall)
        times[name][1].append(time.process_time() - cpu)
    per_min = {name: 60 * BATCH / statistics.median(pair[0]) for name, pair in times.items()}
    cpu_per_min = {name: 60 * BATCH / statistics.median(pair[1]) for name, pair in times.items()}
    ratios.append(per_min["ours"] / per_min["torch"])
    result.update({f"{mode}_ours_images_min": round(per_min["ours"], 1),
                   f"{mode}_torch_images_min": round(per_min["torch"], 1),
                   f"{mode}_cpu_ratio": round(cpu_per_min["ours"] / cpu_per_min["torch"], 2),
                   f"{mode}_ratio": round(ratios[-1], 2)})
  result["cpu_cores"] = os.cpu_count()
  result["load_average_1m_before"] = load_before
  result["cpu_steal_share"] = qwen2_pair.steal_share(steal_before)
  result["ratio_ours_over_torch_min"] = round(min(ratios), 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
