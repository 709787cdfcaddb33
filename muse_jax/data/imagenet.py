"""ImageNet-1K records, from a TFDS-prepared dataset or the extracted folders.

TFDS: `imagenet2012/<version>/` under a data_dir, ArrayRecord files, read
through tfds data sources (random access, no TensorFlow needed). Images are
kept as encoded bytes (SkipDecoding) so every source shares our decoder.

Folders: train/<wnid>/*.JPEG and val/ either as val/<wnid>/*.JPEG or flat with
a labels file: one wnid per line in sorted file-name order (as TFDS's
imagenet2012_validation_labels.txt), or a CSV with an `ImageId,
PredictionString` header (Kaggle's LOC_val_solution.csv). Labels are the index
of the wnid among the sorted train wnids, matching TFDS.
"""

import csv
import os

from etils import epath
import grain

from muse_jax.data import sources
from muse_jax.data.config import DataConfigError

TFDS_SPLITS = {'train': 'train', 'eval': 'validation'}


def _prepared_dir(data_dir: str) -> str:
  """The newest imagenet2012/<version> directory holding dataset_info.json."""
  root = epath.Path(data_dir)
  if (root / 'dataset_info.json').exists():
    return str(root)
  versions = [p for p in (root / 'imagenet2012').glob('*')
              if (p / 'dataset_info.json').exists()]
  if not versions:
    raise DataConfigError(
        f"config.data.imagenet_dir={data_dir!r} holds no TFDS-prepared"
        " imagenet2012/<version>/dataset_info.json; set"
        " --config.data.imagenet_dir to the TFDS data_dir, or"
        " --config.data.imagenet_format=folder for extracted JPEGs")
  version = lambda p: tuple(int(x) for x in p.name.split('.') if x.isdigit())
  return str(max(versions, key=version))


def _tfds_record(example: dict) -> dict:
  return {'key': example['file_name'].decode('utf-8'),
          'image': example['image'], 'label': int(example['label'])}


def tfds_records(data_dir: str, split: str) -> grain.MapDataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(_prepared_dir(data_dir))
  source = builder.as_data_source(
      split=TFDS_SPLITS[split], decoders={'image': tfds.decode.SkipDecoding()})
  return grain.MapDataset.source(source).map(_tfds_record)


def _subdirectories(path: epath.Path) -> list[str]:
  return sorted(p.name for p in path.iterdir() if p.is_dir())


def _val_labels_file(path: str) -> dict[str, str] | list[str]:
  """wnids in sorted file order (list), or file stem -> wnid (CSV)."""
  with epath.Path(path).open('r') as f:
    lines = [line.strip() for line in f if line.strip()]
  if lines and lines[0].startswith('ImageId'):
    rows = csv.reader(lines[1:])
    return {row[0]: row[1].split()[0] for row in rows}
  return lines


def folder_records(root: str, split: str, val_labels: str
                   ) -> grain.MapDataset:
  base = epath.Path(root)
  if not (base / 'train').is_dir():
    raise DataConfigError(
        f'config.data.imagenet_dir={root!r} has no train/<wnid>/ folders;'
        ' set --config.data.imagenet_dir to the extracted ImageNet root')
  wnids = _subdirectories(base / 'train')
  label_of = {wnid: index for index, wnid in enumerate(wnids)}
  split_dir = base / ('train' if split == 'train' else 'val')
  if split == 'train' or not val_labels:
    pairs = [(path, label_of[wnid])
             for wnid in _subdirectories(split_dir)
             for path in sources.list_image_files(str(split_dir / wnid))]
  else:
    files = sources.list_image_files(str(split_dir))
    labels = _val_labels_file(val_labels)
    if isinstance(labels, list):
      if len(labels) != len(files):
        raise DataConfigError(
            f'config.data.imagenet_val_labels={val_labels!r} has'
            f' {len(labels)} lines for {len(files)} val images; set it to the'
            ' labels file of this val/ folder')
      wnid_of_file = labels
    else:
      wnid_of_file = [labels.get(os.path.basename(f).split('.')[0], '')
                      for f in files]
    pairs = [(path, label_of[wnid]) for path, wnid in zip(files, wnid_of_file)
             if wnid in label_of]
  records = [(os.path.relpath(path, root), path, label)
             for path, label in pairs]
  return grain.MapDataset.source(records).map(_folder_record)


def _folder_record(entry: tuple) -> dict:
  key, path, label = entry
  return {'key': key, 'path': path, 'label': label}


def records(config, split: str) -> grain.MapDataset:
  """ImageNet records of 'train' or 'eval' (the val split)."""
  if config.imagenet_format == 'tfds':
    return tfds_records(config.imagenet_dir, split)
  return folder_records(config.imagenet_dir, split, config.imagenet_val_labels)
