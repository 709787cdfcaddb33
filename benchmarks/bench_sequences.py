"""Tokens per second from tokenized examples to packed rows, in one process.

  python benchmarks/bench_sequences.py --format=pretrain

Input: examples as a data pipeline would deliver them, 256 SDE codes (a 16x16
grid, 256 px) and a pre-tokenized caption of 20 to 160 tokens, as numpy
arrays. Ours: ``sequences.PretrainFormat`` (or ``GenerationFormat``) as a Grain
``random_map``, then ``packing.PackIterDataset`` (first-fit decreasing over
buffers of 256) into rows of ``--seq_len`` tokens. Peer: the same sequences built
and packed by a plain-Python greedy loop (lists, each sequence into the current
row or a new one), the obvious way to write it. Rounds alternate the two so both
see the same machine load.

Figures: real (non-padding) tokens per second and CPU time per token for both,
each side's padding fraction, and last ``ratio`` = our tokens/s / peer tokens/s
(median over rounds). Target: ours >= 70k tokens/s on one process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import grain
import numpy as np

from muse_jax.data import packing
from muse_jax.data import sequences
from muse_jax.data import text_tokenizer

SYSTEM_TEXTS = ["Please generate an image.", "Show me a photo.", "Draw this."]


def make_examples(count: int, num_visual: int, text_size: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"codes": rng.integers(0, num_visual, 256).astype(np.int32),
           "caption_ids": rng.integers(10, text_size, int(rng.integers(20, 161))).astype(np.int32)}
          for _ in range(count)]


def ours(fmt, examples: list[dict], seq_len: int, seed: int) -> tuple[int, int]:
  """(real tokens, rows) through the Grain stages."""
  stream = grain.MapDataset.source(examples).random_map(fmt, seed=seed).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # no reader threads: one core
  it = packing.PackIterDataset(stream, seq_len).__iter__()
  rows = sum(1 for _ in it)
  counters = it.counters()
  return rows * seq_len - counters["data/padding_tokens"], rows


def python_greedy(kind: str, examples: list[dict], seq_len: int, seed: int, layout, eos: int,
                  prompts: list[tuple[list[int], list[int]]]) -> tuple[int, int]:
  """(real tokens, rows): the peer, sequences built and packed with Python lists."""
  rnd = random.Random(seed)
  rows, row_ids, row_mask, row_segments, row_positions = [], [], [], [], []
  real = 0

  def flush():
    pad = seq_len - len(row_ids)
    rows.append((row_ids + [0] * pad, row_mask + [False] * pad, row_segments + [0] * pad,
                 row_positions + [0] * pad))

  for example in examples:
    visual = [layout.visual_start + c for c in example["codes"].tolist()]
    caption = example["caption_ids"].tolist()
    if kind == "pretrain":
      image = [layout.soi_id] + visual + [layout.eoi_id]
      ids = (image + caption if rnd.random() < 0.5 else caption + image) + [eos]
      mask = [True] * len(ids)
    else:
      with_caption, alone = prompts[rnd.randrange(len(prompts))]
      prompt = alone if rnd.random() < 0.1 else with_caption[0] + caption + with_caption[1]
      ids = prompt + [layout.soi_id] + visual + [layout.eoi_id]
      mask = [False] * (len(prompt) + 1) + [True] * (len(visual) + 1)
    if len(ids) > seq_len:
      continue
    if len(row_ids) + len(ids) > seq_len:
      flush()
      row_ids, row_mask, row_segments, row_positions = [], [], [], []
    segment = (row_segments[-1] if row_segments else 0) + 1
    row_ids += ids
    row_mask += mask
    row_segments += [segment] * len(ids)
    row_positions += list(range(len(ids)))
    real += len(ids)
  if row_ids:
    flush()
  arrays = [np.array(column) for column in zip(*rows)]  # the rows as one batch, like ours
  return real, len(arrays[0])


def peer_prompts(tokenizer) -> list[tuple[tuple[list[int], list[int]], list[int]]]:
  """Per system text: ((ids before the caption, ids after it), ids without a caption)."""
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  head, tail = map(encode, tokenizer.apply_chat_template(
      [{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True).split("\x00"))
  return [((head + encode(text + "\n"), tail), head + encode(text) + tail)
          for text in SYSTEM_TEXTS]


def timed(fn) -> tuple[float, float, tuple[int, int]]:
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return time.perf_counter() - wall, time.process_time() - cpu, out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--format", choices=("pretrain", "generation"), default="pretrain")
  parser.add_argument("--examples", type=int, default=2000)
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()

  import transformers  # pylint: disable=g-import-not-at-top
  directory = tempfile.mkdtemp()
  layout = text_tokenizer.build_demo_tokenizer(SYSTEM_TEXTS * 20, directory, vocab_size=300,
                                               num_visual=1024)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  examples = make_examples(args.examples, layout.num_visual, layout.text_size, seed=0)
  if args.format == "pretrain":
    fmt = sequences.PretrainFormat(tokenizer, layout, image_first_ratio=0.5)
    prompts = []
  else:
    fmt = sequences.GenerationFormat(tokenizer, layout, system_texts=SYSTEM_TEXTS,
                                     caption_drop_prob=0.1)
    prompts = peer_prompts(tokenizer)

  load = os.getloadavg()[0]
  results = {"ours": [], "peer": []}
  for round_index in range(args.rounds):
    results["ours"].append(timed(lambda: ours(fmt, examples, args.seq_len, round_index)))
    results["peer"].append(timed(lambda: python_greedy(
        args.format, examples, args.seq_len, round_index, layout, tokenizer.eos_token_id,
        prompts)))
  figures = {}
  for side, runs in results.items():
    tokens, rows = runs[0][2]
    rates = [out[0] / wall for wall, _, out in runs]
    figures[side] = {
        "tokens_per_s": round(float(np.median(rates))),
        "cpu_us_per_token": round(float(np.median([cpu / out[0] * 1e6 for _, cpu, out in runs])),
                                  3),
        "padding_fraction": round(1 - tokens / (rows * args.seq_len), 4)}
  ratios = [(o[2][0] / o[0]) / (p[2][0] / p[0])
            for o, p in zip(results["ours"], results["peer"])]
  print(json.dumps({
      "benchmark": f"sequences_{args.format}", "examples": args.examples,
      "seq_len": args.seq_len, "rounds": args.rounds,
      "load_average_1m_before": round(load, 2),
      "ours_tokens_per_s": figures["ours"]["tokens_per_s"],
      "ours_cpu_us_per_token": figures["ours"]["cpu_us_per_token"],
      "ours_padding_fraction": figures["ours"]["padding_fraction"],
      "peer_tokens_per_s": figures["peer"]["tokens_per_s"],
      "peer_cpu_us_per_token": figures["peer"]["cpu_us_per_token"],
      "peer_padding_fraction": figures["peer"]["padding_fraction"],
      "round_ratios": [round(r, 3) for r in ratios],
      "ratio": round(float(np.median(ratios)), 3)}))


if __name__ == "__main__":
  main()
