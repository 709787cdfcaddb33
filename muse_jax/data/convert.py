"""Converts CC12M webdataset tar shards to ArrayRecord for random access.

  python -m muse_jax.data.convert --shards='/data/cc12m/*.tar' \
      --output_dir=/data/cc12m_array_record --workers=8

Each shard becomes `<output_dir>/<shard name>.array_record` with one record
per sample (all its files: image, alt-text, metadata), in tar order. Shards
whose output already exists are skipped, so an interrupted conversion is
resumed by running the same command. Samples are copied as they are: bad
images are still skipped and counted when training reads them. Then train
with --config.data.cc12m_format=array_record
--config.data.cc12m_shards='/data/cc12m_array_record/*.array_record'.
"""

import json
import multiprocessing

from absl import app
from absl import flags
from etils import epath

from muse_jax.data import sources
from muse_jax.data import webdataset

_SHARDS = flags.DEFINE_string(
    'shards', None, 'glob (or comma-separated globs) of webdataset .tar shards')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'where to write')
_WORKERS = flags.DEFINE_integer('workers', 1, 'shards converted in parallel')


def pending_shards(patterns: str, output_dir: str) -> list[str]:
  """The matched shards whose ArrayRecord output does not exist yet."""
  shards = sources.glob_files(patterns)
  done = {p.name for p in epath.Path(output_dir).glob('*.array_record')}
  return [s for s in shards if webdataset.array_record_name(s) not in done]


def _convert(shard_and_output: tuple[str, str]) -> dict:
  return webdataset.convert_shard(*shard_and_output)


def main(argv):
  del argv
  epath.Path(_OUTPUT_DIR.value).mkdir(parents=True, exist_ok=True)
  shards = pending_shards(_SHARDS.value, _OUTPUT_DIR.value)
  jobs = [(shard, _OUTPUT_DIR.value) for shard in shards]
  with multiprocessing.get_context('spawn').Pool(_WORKERS.value) as pool:
    results = list(pool.imap(_convert, jobs))
  for result in results:
    print(json.dumps(result))
  print(json.dumps({'converted_shards': len(results),
                    'samples': sum(r['samples'] for r in results),
                    'damaged_shards': sum(r['damaged'] for r in results)}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['shards', 'output_dir'])
  app.run(main)
