"""256 px training examples per second: the Grain pipeline with its worker
processes against a plain single-process PIL loop over the same files.

  python benchmarks/bench_data_pipeline.py --workers=2

The files are the bundled photographs saved as ImageNet-like JPEGs (shorter
side 375 px, quality 90), several crops of each. The peer loop does the same
work per example as the pipeline (decode, RGB, random square crop resized to
256 with antialiasing, random flip, float32 in [-1, 1]) in one process, so
    ratio = pipeline rate / (single-process rate x workers)
is the fraction of perfect scaling the pipeline delivers, overheads (record
shuffling, inter-process transfer, batching, skip accounting) included.
Prints one JSON line whose last field is the ratio.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image
import psutil

from muse_jax import data
from muse_jax.data import sources

SIZE = 256


def write_jpegs(directory: str, copies: int) -> list[str]:
  """Bundled photos as ImageNet-sized JPEGs, `copies` different crops each."""
  paths = []
  for index, source in enumerate(sources.bundled_files()):
    photo = Image.open(source).convert('RGB')
    scale = 375 / min(photo.size)
    photo = photo.resize((round(photo.width * scale),
                          round(photo.height * scale)),
                         Image.Resampling.BICUBIC)
    for copy in range(copies):
      crop = photo.crop((copy * 3, copy * 2, photo.width, photo.height))
      path = os.path.join(directory, f'photo_{index:02d}_{copy}.jpg')
      crop.save(path, quality=90)
      paths.append(path)
  return paths


def cpu_seconds(process: psutil.Process) -> float:
  """CPU time of a process and its live children (the Grain workers)."""
  total = 0.0
  for proc in [process, *process.children(recursive=True)]:
    times = proc.cpu_times()
    total += times.user + times.system
  return total


def plain_loop_rate(paths: list[str], examples: int) -> tuple[float, float]:
  """(examples/s, CPU ms/example) of decode + crop + resize + flip + float in
  one process."""
  rng = np.random.default_rng(0)
  cpu_start = cpu_seconds(psutil.Process())
  start = time.perf_counter()
  for index in range(examples):
    with Image.open(paths[index % len(paths)]) as image:
      image = image.convert('RGB')
      side = min(image.size) * rng.uniform(0.5, 1.0)
      left = rng.uniform(0, image.width - side)
      top = rng.uniform(0, image.height - side)
      crop = image.resize((SIZE, SIZE), Image.Resampling.BICUBIC,
                          box=(left, top, left + side, top + side))
      pixels = np.asarray(crop)
      if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
      pixels.astype(np.float32) * (2 / 255) - 1
  elapsed = time.perf_counter() - start
  cpu = cpu_seconds(psutil.Process()) - cpu_start
  return examples / elapsed, 1000 * cpu / examples


def pipeline_rate(directory: str, workers: int, read_threads: int,
                  batch_size: int, batches: int) -> tuple[float, float]:
  """(examples/s, CPU ms/example over all its processes) of the training
  pipeline after its workers have started."""
  config = data.image_data_config(
      source='image_folder', path=directory, image_size=SIZE,
      num_eval_images=0, worker_count=workers, read_threads=read_threads)
  with data.build_train_pipeline(config, global_batch_size=batch_size,
                                 seed=0) as pipe:
    for _ in range(3):  # worker start-up and buffers filling
      next(pipe)
    cpu_start = cpu_seconds(psutil.Process())
    start = time.perf_counter()
    for _ in range(batches):
      next(pipe)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(psutil.Process()) - cpu_start
  examples = batches * batch_size
  return examples / elapsed, 1000 * cpu / examples


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workers', type=int, default=2)
  # Threads inside each worker hide storage latency but cost CPU; with as
  # many workers as cores and local files they only add overhead.
  parser.add_argument('--read_threads', type=int, default=0)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--copies', type=int, default=4)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  load_before = os.getloadavg()[0]
  rounds = []
  with tempfile.TemporaryDirectory() as directory:
    paths = write_jpegs(directory, args.copies)
    plain_loop_rate(paths, len(paths))  # page cache and PIL warm-up
    # Peer and pipeline side by side, several times: on a shared machine the
    # load drifts, and a ratio of neighbouring measurements follows it least.
    for _ in range(args.rounds):
      single = plain_loop_rate(paths, args.batch_size * args.batches // 2)
      piped = pipeline_rate(directory, args.workers, args.read_threads,
                            args.batch_size, args.batches)
      rounds.append((piped[0] / (single[0] * args.workers), single, piped))
  ratio, single, piped = sorted(rounds)[len(rounds) // 2]  # median round
  print(json.dumps({
      'image_size': SIZE,
      'files': len(paths),
      'workers': args.workers,
      'read_threads': args.read_threads,
      'cpu_cores': os.cpu_count(),
      'load_average_1m_before': round(load_before, 2),
      'round_ratios': [round(r[0], 3) for r in rounds],
      'single_process_cpu_ms_per_example': round(single[1], 3),
      'pipeline_cpu_ms_per_example': round(piped[1], 3),
      'single_process_examples_per_s': round(single[0], 1),
      'pipeline_examples_per_s': round(piped[0], 1),
      'ratio': round(ratio, 3),
  }))


if __name__ == '__main__':
  main()
