"""Loop efficiency of the VLM pre-training demo: the shared loop against its bare step.

  python benchmarks/bench_vlm_loop.py --sde_workdir=/tmp/vlm_pt/sde_tokenizer

Ours: ``llm_trainer.train`` on ``configs/vlm_pretrain.py:demo`` (a trained SDE
run is given, so nothing else is trained first), with everything a step of the
loop does: drawing and packing rows from the Grain pipeline, moving them to the
mesh, the step, the non-finite guard, metrics and the progress line every
``log_every`` steps. Its rate is read from the TensorBoard events' wall times
between two logged steps after warm-up, so compilation, the start-of-run eval
and the final checkpoint are outside it. Peer: the same jitted step, run
back to back on batches made ready on the device beforehand (drawn from the
same pipeline).

Figures: steps/s of both, and last ``ratio`` = loop / bare (median over
rounds). Target: >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
from tensorboard.backend.event_processing import event_accumulator

from muse_jax import config_lib
from muse_jax.parallel import sharding
from muse_jax.train import llm_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(sde_workdir: str, steps: int, log_every: int):
  configs = os.path.join(ROOT, "configs", "vlm_pretrain.py")
  c = config_lib.sibling_config(configs, "vlm_pretrain").get_config("demo")
  c.sde_workdir = sde_workdir
  c.update(total_steps=steps, log_every=log_every, eval_every=10 * steps,
           checkpoint_every=10 * steps)
  return c


def loop_rate(config, warmup: int) -> float:
  """Steps/s of the loop between the first logged step after ``warmup`` and the last
  logged step before the end (TensorBoard wall times)."""
  with tempfile.TemporaryDirectory() as workdir:
    llm_trainer.train(config, workdir)
    events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                                size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.wall_time) for e in events.Scalars("loss/lm")]
  inside = [(s, t) for s, t in logged if warmup <= s < config.total_steps]
  (s0, t0), (s1, t1) = inside[0], inside[-1]
  return (s1 - s0) / (t1 - t0)


def bare_rate(config, steps: int) -> float:
  """Steps/s of the jitted step alone on batches already on the device."""
  mesh = sharding.make_mesh(config.mesh)
  config = config.copy_and_resolve_references()
  with tempfile.TemporaryDirectory() as workdir:
    config.tokenizer_dir = llm_trainer.demo_tokenizer_dir(config, workdir)
    run = llm_trainer.setup(config, mesh)
    data = llm_trainer.VlmData(config)
    source = llm_trainer.PackedBatches(data.rows(config, 0, 1), config.batch_size)
    batches = [{k: sharding.global_batch(v, run.batch_sharding) for k, v in next(source).items()}
               for _ in range(steps)]
  state = run.init()
  state, metrics = run.train_step(state, batches[0])          # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = run.train_step(state, batch)
  jax.block_until_ready((state, metrics))
  return (steps - 1) / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sde_workdir", required=True, help="a trained SDE run (e.g. the demo's)")
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  config = demo_config(args.sde_workdir, args.steps, args.log_every)
  ratios = []
  for round_index in range(args.rounds):
    bare = bare_rate(config, args.steps - args.warmup)
    loop = loop_rate(config, args.warmup)
    ratios.append(loop / bare)
    print(json.dumps({"round": round_index, "loop_steps_per_s": round(loop, 3),
                      "bare_steps_per_s": round(bare, 3), "ratio": round(loop / bare, 3)}),
          flush=True)
  print(json.dumps({"ratio": round(statistics.median(ratios), 3), "target": ">= 0.9"}))


if __name__ == "__main__":
  main()
