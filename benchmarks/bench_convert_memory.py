"""Peak host memory of ``python -m muse_jax.convert`` relative to the size of the weights.

Builds a random Qwen2 of a few hundred MB with transformers, then runs each
conversion in a fresh subprocess and reads its peak RSS (the CLI prints
``peak_rss_mb`` from ``resource.getrusage``). The same commands on a tiny model
give the baseline of imports + runtime, which is subtracted. Import and export
both stream one tensor at a time into / out of ``muse_jax.weights`` (last field:
import's extra RSS / largest tensor, a few = independent of the model size);
MUSE-VL extension holds an old and a new embedding table at once.

  python benchmarks/bench_convert_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers

BIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
           num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _convert(*args: str) -> float:
  out = subprocess.run([sys.executable, "-m", "muse_jax.convert", *args], check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def _measure(config: dict, root: str) -> dict:
  torch.manual_seed(0)
  hf_dir = os.path.join(root, "hf")
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config))
  sizes = [p.numel() * p.element_size() / 2**20 for p in model.parameters()]
  model.save_pretrained(hf_dir)
  del model
  return {
      "weights_mb": sum(sizes), "largest_tensor_mb": max(sizes),
      "llm-from-hf": _convert("llm-from-hf", "--hf_dir", hf_dir, "--out", f"{root}/ckpt"),
      "llm-from-hf --muse_vl": _convert("llm-from-hf", "--hf_dir", hf_dir, "--out",
                                        f"{root}/ckpt_vl", "--muse_vl"),
      "llm-to-hf": _convert("llm-to-hf", "--ckpt", f"{root}/ckpt", "--out", f"{root}/export"),
  }


def main() -> None:
  argparse.ArgumentParser(description=__doc__).parse_args()
  with tempfile.TemporaryDirectory() as tiny_root, tempfile.TemporaryDirectory() as big_root:
    tiny, big = _measure(TINY, tiny_root), _measure(BIG, big_root)
  extra = {step: round(big[step] - tiny[step], 1)
           for step in ("llm-from-hf", "llm-from-hf --muse_vl", "llm-to-hf")}
  print(json.dumps({
      "benchmark": "convert_peak_rss", "weights_mb": round(big["weights_mb"], 1),
      "largest_tensor_mb": round(big["largest_tensor_mb"], 1),
      "baseline_rss_mb": tiny["llm-from-hf"],
      **{f"{step}: extra_rss_mb": value for step, value in extra.items()},
      "llm-from-hf: extra_over_weights": round(extra["llm-from-hf"] / big["weights_mb"], 2),
      "llm-to-hf: extra_over_largest_tensor":
          round(extra["llm-to-hf"] / big["largest_tensor_mb"], 2),
      "llm-from-hf: extra_over_largest_tensor":
          round(extra["llm-from-hf"] / big["largest_tensor_mb"], 2)}))


if __name__ == "__main__":
  main()
