"""Chunked cross-entropy against the plain one: peak temporary memory and time.

  python benchmarks/bench_chunked_ce.py

Ours: ``lm_loss.chunked_cross_entropy`` (the sequence cut into ``--chunk``
positions, each chunk's logits rematerialised in the backward pass; a chunk
holds rows-on-the-device x ``--chunk`` tokens, so its logits scale with the
per-device batch as well as with the chunk), loss and
gradients with respect to the hidden states and the LM head. Peer: the same
loss written plainly (all logits at once, ``log_softmax``, gather), what a
first implementation does.

Memory: the compiled programs' ``memory_analysis()`` temporaries (nothing is
allocated) for 16k tokens (8 x 2048) of Qwen2.5-7B's hidden size 3584 over the
MUSE-VL vocabulary (151936 text rows + 32768 visual + <soi>/<eoi>, padded to a
multiple of 128), bf16 hidden states and float32 head, compiled for the CPU
backend and for one chip of ``--topology`` (libtpu on this machine). Target:
ours / plain <= 0.1.

Time: the plain loss of that size needs ~24 GB for its logits and their
gradient, more than this machine has; both run at ``--time_tokens`` tokens with
``--time_hidden`` (Qwen2.5-0.5B's 896) over the same vocabulary, rounds
alternating. Target: ours / plain <= 1.2.

Last line: both ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import compile as compile_lib
from muse_jax.models import muse_vl
from muse_jax.train import lm_loss

QWEN_TEXT_ROWS = 151936


def plain_cross_entropy(hidden, kernel, targets, weights):
  logits = jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def gradient_program(loss, chunk: int | None):
  if chunk is None:
    fn = loss
  else:
    fn = lambda h, k, t, w: loss(h, k, t, w, chunk=chunk)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def specs(batch: int, seq: int, hidden: int, vocab: int, device=None):
  """Argument shapes, placed on ``device`` (a TPU chip of a topology description: the
  program then compiles for it) or left to the default backend."""
  placed = {} if device is None else {"sharding": jax.sharding.SingleDeviceSharding(device)}
  return (jax.ShapeDtypeStruct((batch, seq, hidden), jnp.bfloat16, **placed),
          jax.ShapeDtypeStruct((hidden, vocab), jnp.float32, **placed),
          jax.ShapeDtypeStruct((batch, seq), jnp.int32, **placed),
          jax.ShapeDtypeStruct((batch, seq), jnp.float32, **placed))


def temporaries(program, args) -> int:
  return program.lower(*args).compile().memory_analysis().temp_size_in_bytes


def seconds(program, args, repeats: int) -> float:
  jax.block_until_ready(program(*args))              # compile + warm
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(program(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  # sequence positions per chunk: with 8 rows on the device, 1024 tokens per chunk
  parser.add_argument("--chunk", type=int, default=128)
  parser.add_argument("--time_tokens", type=int, default=1024)
  parser.add_argument("--time_hidden", type=int, default=896)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--topology", default="v5p-8", help="TPU whose one chip the memory "
                      "figures also compile for (libtpu, no TPU needed)")
  args = parser.parse_args()
  vocab = muse_vl.VocabLayout(QWEN_TEXT_ROWS).vocab_size
  ours = gradient_program(lm_loss.chunked_cross_entropy, args.chunk)
  plain = gradient_program(plain_cross_entropy, None)

  chip, topology = compile_lib.parse_topology(args.topology)
  memory = {}
  for backend, device in (("cpu", None),
                          (args.topology, compile_lib.tpu_devices(chip, topology, 1)[0])):
    full = specs(8, 2048, 3584, vocab, device)
    ours_gib, plain_gib = (temporaries(ours, full) / 2**30, temporaries(plain, full) / 2**30)
    memory[backend] = ours_gib / plain_gib
    print(json.dumps({"backend": backend, "tokens": 8 * 2048, "hidden": 3584, "vocab": vocab,
                      "ours_temp_gib": round(ours_gib, 3), "plain_temp_gib": round(plain_gib, 3),
                      "memory_ratio": round(ours_gib / plain_gib, 4)}), flush=True)

  rng = np.random.default_rng(0)
  t, e = args.time_tokens, args.time_hidden
  data = (jnp.asarray(rng.normal(0, 1, (1, t, e)), jnp.bfloat16),
          jnp.asarray(rng.normal(0, 0.02, (e, vocab)), jnp.float32),
          jnp.asarray(rng.integers(0, vocab, (1, t)), jnp.int32),
          jnp.ones((1, t), jnp.float32))
  ratios = []
  for round_index in range(args.rounds):
    ours_s, plain_s = seconds(ours, data, 2), seconds(plain, data, 2)
    ratios.append(ours_s / plain_s)
    print(json.dumps({"round": round_index, "tokens": t, "hidden": e, "ours_s": round(ours_s, 3),
                      "plain_s": round(plain_s, 3), "ratio": round(ours_s / plain_s, 3)}),
          flush=True)
  print(json.dumps({"memory_ratio_tpu": round(memory[args.topology], 4),
                    "memory_ratio_cpu": round(memory["cpu"], 4), "memory_target": "<= 0.1",
                    "time_ratio": round(statistics.median(ratios), 3), "time_target": "<= 1.2"}))


if __name__ == "__main__":
  main()
