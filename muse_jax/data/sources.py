"""Where records come from: image folders (bundled photos included) and CC12M.

A record is a small dict that a worker turns into an example: {'key': str}
plus either 'path' (read lazily in the worker) or 'image' (encoded bytes),
and optionally 'label' (int) and 'caption' (raw alt-text bytes). Every source
yields records of this shape, so one example transform serves them all.
ImageNet lives in imagenet.py; this module holds the rest.
"""

import hashlib
import importlib.util
import os

from etils import epath
import grain

from muse_jax.data import webdataset
from muse_jax.data.config import DataConfigError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff')

# Real photographs shipped inside scikit-image (charts, text, logos and
# synthetic images left out). Grayscale ones are converted to RGB on decode.
BUNDLED_PHOTOS = (
    'astronaut.png', 'brick.png', 'camera.png', 'cell.png', 'chelsea.png',
    'clock_motion.png', 'coffee.png', 'coins.png', 'grass.png', 'gravel.png',
    'hubble_deep_field.jpg', 'ihc.png', 'moon.png', 'motorcycle_left.png',
    'motorcycle_right.png', 'retina.jpg', 'rocket.jpg',
)


def bundled_dir() -> str:
  """scikit-image's data directory, found without importing scikit-image."""
  package = importlib.util.find_spec('skimage')
  return os.path.join(package.submodule_search_locations[0], 'data')


def bundled_files() -> list[str]:
  """Paths of the bundled photographs present in this scikit-image install."""
  root = bundled_dir()
  return [os.path.join(root, name) for name in BUNDLED_PHOTOS
          if os.path.exists(os.path.join(root, name))]


def list_image_files(root: str) -> list[str]:
  """Every file with an image extension under `root`, sorted, recursively."""
  found = []
  for directory, _, names in epath.Path(root).walk():
    found.extend(os.fspath(directory / name) for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(found)


def _hash_rank(key: str) -> str:
  return hashlib.sha1(key.encode('utf-8')).hexdigest()


def split_eval(files: list[str], num_eval: int, root: str
               ) -> tuple[list[str], list[str]]:
  """(train, eval) with the `num_eval` files of lowest path hash held out.

  Hashing the path relative to `root` makes the split independent of listing
  order and of where the folder is mounted.
  """
  if len(files) <= num_eval:
    raise DataConfigError(
        f'config.data.num_eval_images={num_eval} leaves no training images'
        f' out of {len(files)} under {root!r}; set'
        ' --config.data.num_eval_images to a smaller number')
  ranked = sorted(files, key=lambda f: _hash_rank(os.path.relpath(f, root)))
  held_out = set(ranked[:num_eval])
  return ([f for f in files if f not in held_out],
          [f for f in files if f in held_out])


class FileRecord:
  """path -> record; the key is the path relative to the folder root."""

  def __init__(self, root: str):
    self._root = root

  def __call__(self, path: str) -> dict:
    return {'key': os.path.relpath(path, self._root), 'path': path}


def folder_records(config, split: str) -> grain.MapDataset:
  """Records of the bundled photos or a user image folder; split is
  'train' or 'eval' (the held-out files)."""
  if config.source == 'bundled':
    root, files = bundled_dir(), bundled_files()
  else:
    root = config.path
    if not epath.Path(root).is_dir():
      raise DataConfigError(
          f'config.data.path={root!r} is not a directory; set'
          ' --config.data.path to a folder of images')
    files = list_image_files(root)
  if not files:
    raise DataConfigError(
        f'config.data.path={root!r} holds no files ending in'
        f' {IMAGE_EXTENSIONS}; set --config.data.path to a folder of images')
  train, held_out = split_eval(files, config.num_eval_images, root)
  chosen = train if split == 'train' else held_out
  return grain.MapDataset.source(chosen).map(FileRecord(root))


def glob_files(patterns: str) -> list[str]:
  """Sorted files matching a glob or comma-separated globs (gs:// too)."""
  files = set()
  for pattern in patterns.split(','):
    directory, glob = os.path.split(pattern.strip())
    files.update(os.fspath(p) for p in epath.Path(directory or '.').glob(glob))
  return sorted(files)


def cc12m_files(config) -> list[str]:
  """The shard (or ArrayRecord) files matched by config.cc12m_shards."""
  files = glob_files(config.cc12m_shards)
  if not files:
    raise DataConfigError(
        f'config.data.cc12m_shards={config.cc12m_shards!r} matches no files;'
        ' set --config.data.cc12m_shards to a glob like'
        ' /data/cc12m/{00000..01242}.tar -> /data/cc12m/*.tar')
  return files


def cc12m_array_records(config, split: str) -> grain.MapDataset:
  """ArrayRecord CC12M; the first num_eval_images records are the eval set."""
  source = grain.sources.ArrayRecordDataSource(cc12m_files(config))
  records = grain.MapDataset.source(source).map(
      webdataset.array_record_to_record)
  held_out = config.num_eval_images
  return records[held_out:] if split == 'train' else records[:held_out]


class ShardOpener:
  """shard path -> its Grain dataset; the first shard starts with the eval
  samples, which training skips."""

  def __init__(self, first_shard: str, num_eval: int, skip_marker: dict):
    self._first_shard = first_shard
    self._num_eval = num_eval
    self._skip_marker = skip_marker

  def __call__(self, path: str) -> webdataset.TarShardDataset:
    skip = self._num_eval if path == self._first_shard else 0
    return webdataset.TarShardDataset(path, skip, self._skip_marker)


def cc12m_eval_records(config) -> list[dict]:
  """The first num_eval_images samples of the first webdataset shard."""
  held_out = []
  for key, fields in webdataset.iter_tar_samples(cc12m_files(config)[0]):
    if key is None or len(held_out) >= config.num_eval_images:
      break
    held_out.append(webdataset.sample_record(key, fields))
  return held_out
