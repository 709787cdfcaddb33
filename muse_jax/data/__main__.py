"""Look at a training pipeline: throughput, skip counters, decoded examples.

  python -m muse_jax.data --config=configs/sde_256.py:demo --batches=20 \
      --grid=/tmp/data_grid.png

Builds the pipeline of `config.data` exactly as the trainer does, pulls
--batches batches, prints one JSON line (examples/s after the first batch,
which pays for worker start-up, and every counter) and writes a grid of the
first batch's images (captions, if any, are printed).
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

from muse_jax import data

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'experiment config file; its `data` field is used')
_BATCHES = flags.DEFINE_integer('batches', 10, 'batches to pull')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 0, 'global batch size; 0 takes config.batch_size')
_SEED = flags.DEFINE_integer('seed', 0, 'pipeline seed')
_PROCESS_INDEX = flags.DEFINE_integer('process_index', 0, 'simulated host')
_PROCESS_COUNT = flags.DEFINE_integer('process_count', 1, 'simulated hosts')
_GRID = flags.DEFINE_string(
    'grid', os.path.join(tempfile.gettempdir(), 'muse_jax_data_grid.png'),
    'PNG to write the first batch into')


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """[N, S, S, 3] float [-1, 1] or uint8 -> one uint8 mosaic, 2 px gaps."""
  if images.dtype != np.uint8:
    images = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  count, size = images.shape[0], images.shape[1]
  columns = min(columns, count)
  rows = -(-count // columns)
  step = size + 2
  grid = np.full((rows * step + 2, columns * step + 2, 3), 255, np.uint8)
  for index, image in enumerate(images):
    top, left = 2 + (index // columns) * step, 2 + (index % columns) * step
    grid[top:top + size, left:left + size] = image
  return grid


def main(argv):
  del argv
  config = _CONFIG.value
  batch_size = _BATCH_SIZE.value or config.get('batch_size', 8)
  start = time.perf_counter()
  with data.build_train_pipeline(
      config.data, global_batch_size=batch_size, seed=_SEED.value,
      process_index=_PROCESS_INDEX.value,
      process_count=_PROCESS_COUNT.value) as pipe:
    first = next(pipe)
    first_batch_s = time.perf_counter() - start
    timed_start = time.perf_counter()
    for _ in range(_BATCHES.value - 1):
      next(pipe)
    elapsed = time.perf_counter() - timed_start
    counters = pipe.counters()
  Image.fromarray(image_grid(first['image'][:16])).save(_GRID.value)
  for caption in first.get('caption', [])[:4]:
    print(f'caption: {caption}')
  per_host_batch = batch_size // _PROCESS_COUNT.value
  timed_examples = per_host_batch * (_BATCHES.value - 1)
  print(json.dumps({
      'source': config.data.source,
      'image_size': config.data.image_size,
      'worker_count': config.data.worker_count,
      'per_host_batch': per_host_batch,
      'batches': _BATCHES.value,
      'first_batch_s': round(first_batch_s, 3),
      'examples_per_s': (round(timed_examples / elapsed, 1)
                         if timed_examples else None),
      'grid': _GRID.value,
      **counters,
  }))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
