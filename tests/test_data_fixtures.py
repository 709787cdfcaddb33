"""Small datasets in the real on-disk formats, built from real photographs.

Shared by the tests/test_data_*.py files (it holds no tests itself): tar
shards as img2dataset writes them, a TFDS-prepared imagenet2012 in ArrayRecord
(written without TensorFlow, read back by tfds), the extracted ImageNet tree,
recaption files and a local Hugging Face tokenizer.
"""

import io
import json
import os
import struct
import tarfile
import zlib

from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core.proto import dataset_info_pb2
from tensorflow_datasets.proto import tf_example_pb2
from google.protobuf import json_format

from muse_jax.data import sources

WNIDS = ('n01440764', 'n01443537', 'n01484850')
CAPTION_WORDS = ('a photo of the red cat dog car on street sky moon rocket'
                 ' man woman coffee cup coins grass').split()


def photos(count: int, size: int = 80) -> list[Image.Image]:
  """`count` real photographs (bundled ones, cycled), shrunk, RGB."""
  files = sources.bundled_files()
  result = []
  for index in range(count):
    image = Image.open(files[index % len(files)]).convert('RGB')
    image.thumbnail((size * 2, size * 2))
    if index >= len(files):  # repeated photos get a distinct crop
      image = image.crop((index % 7, 0, image.width, image.height))
    result.append(image)
  return result


def jpeg_bytes(image: Image.Image, **options) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', quality=90, **options)
  return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, 'PNG')
  return buffer.getvalue()


def caption_for(index: int) -> str:
  words = [CAPTION_WORDS[(index * 7 + k) % len(CAPTION_WORDS)]
           for k in range(4)]
  return ' '.join(words)


def decompression_bomb_png(side: int = 100_000) -> bytes:
  """A valid PNG header declaring side x side pixels, with a tiny body: a
  decoder that trusted the header would allocate tens of gigabytes."""
  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack('>I', len(body)) + kind + body +
            struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))
  header = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
  body = zlib.compress(b'\x00' * (side + 1) * 4)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
          chunk(b'IDAT', body) + chunk(b'IEND', b''))


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]):
  """A webdataset shard: each sample's files as consecutive tar members."""
  with tarfile.open(path, 'w') as tar:
    for key, fields in samples:
      for extension, data in fields.items():
        info = tarfile.TarInfo(f'{key}.{extension}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def webdataset_samples(count: int, start: int = 0):
  """img2dataset-style samples: .jpg, .txt alt-text, .json metadata."""
  samples = []
  for index, image in enumerate(photos(count), start):
    key = f'{index:09d}'
    caption = caption_for(index)
    samples.append((key, {
        'jpg': jpeg_bytes(image),
        'txt': caption.encode(),
        'json': json.dumps({'key': key, 'caption': caption,
                            'status': 'success'}).encode(),
    }))
  return samples


def write_webdataset(directory: str, shards: int, per_shard: int
                     ) -> list[str]:
  os.makedirs(directory, exist_ok=True)
  paths = []
  for shard in range(shards):
    path = os.path.join(directory, f'{shard:05d}.tar')
    write_tar(path, webdataset_samples(per_shard, shard * per_shard))
    paths.append(path)
  return paths


def write_recaptions(path: str, keys: list[str], skip: tuple[str, ...] = (),
                     empty: tuple[str, ...] = ()):
  """A LLaVA-ReCap-style key -> caption file (.jsonl or .parquet)."""
  rows = [{'id': key, 'caption': '' if key in empty else
           f'A detailed recaption of sample {key}: {caption_for(int(key))}.'}
          for key in keys if key not in skip]
  if path.endswith('.parquet'):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    with open(path, 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
  return rows


def _tf_example(image: bytes, label: int, file_name: str) -> bytes:
  example = tf_example_pb2.Example()
  features = example.features.feature
  features['image'].bytes_list.value.append(image)
  features['label'].int64_list.value.append(label)
  features['file_name'].bytes_list.value.append(file_name.encode())
  return example.SerializeToString()


def write_tfds_imagenet(data_dir: str, train: int, validation: int) -> dict:
  """TFDS-prepared imagenet2012/5.1.0 in ArrayRecord, without TensorFlow.

  The layout tfds itself writes: features.json, dataset_info.json and
  `imagenet2012-<split>.array_record-0000X-of-0000N` shards of serialized
  tf.train.Example protos. Returns {split: [(file_name, label), ...]}.
  """
  root = os.path.join(data_dir, 'imagenet2012', '5.1.0')
  os.makedirs(root, exist_ok=True)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(names=list(WNIDS)),
      'file_name': tfds.features.Text(),
  })
  features.save_config(root)
  info = dataset_info_pb2.DatasetInfo(
      name='imagenet2012', version='5.1.0', file_format='array_record')
  images = photos(train + validation)
  written = {}
  for split, count, offset, shards in (('train', train, 0, 2),
                                       ('validation', validation, train, 1)):
    entries = []
    bounds = np.linspace(0, count, shards + 1).astype(int)
    split_info = info.splits.add(name=split, num_bytes=1)
    split_info.filepath_template = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
    for shard in range(shards):
      path = os.path.join(
          root, f'imagenet2012-{split}.array_record-{shard:05d}-of-{shards:05d}')
      writer = ArrayRecordWriter(path, 'group_size:1')
      for index in range(bounds[shard], bounds[shard + 1]):
        label = index % len(WNIDS)
        name = f'{WNIDS[label]}_{split}_{index}.JPEG'
        writer.write(_tf_example(jpeg_bytes(images[offset + index]), label,
                                 name))
        entries.append((name, label))
      writer.close()
      split_info.shard_lengths.append(int(bounds[shard + 1] - bounds[shard]))
    written[split] = entries
  with open(os.path.join(root, 'dataset_info.json'), 'w') as f:
    f.write(json_format.MessageToJson(info))
  return written


def write_imagenet_folder(root: str, per_class: int, validation: int,
                          labels_format: str = 'lines') -> dict:
  """train/<wnid>/*.JPEG and a flat val/ with a labels file.

  labels_format 'lines': one wnid per line in sorted file order (TFDS's
  imagenet2012_validation_labels.txt); 'csv': Kaggle's LOC_val_solution.csv.
  Returns {'train': [(relpath, label)], 'val': [...], 'labels': path}.
  """
  images = photos(per_class * len(WNIDS) + validation)
  train = []
  for label, wnid in enumerate(WNIDS):
    os.makedirs(os.path.join(root, 'train', wnid), exist_ok=True)
    for k in range(per_class):
      name = os.path.join('train', wnid, f'{wnid}_{k}.JPEG')
      images.pop().save(os.path.join(root, name), quality=90)
      train.append((name, label))
  os.makedirs(os.path.join(root, 'val'))
  val = []
  for index in range(validation):
    name = os.path.join('val', f'ILSVRC2012_val_{index + 1:08d}.JPEG')
    images.pop().save(os.path.join(root, name), quality=90)
    val.append((name, (index * 2) % len(WNIDS)))
  labels_path = os.path.join(root, f'val_labels.{labels_format}')
  with open(labels_path, 'w') as f:
    if labels_format == 'csv':
      f.write('ImageId,PredictionString\n')
      f.writelines(f'{os.path.basename(n).split(".")[0]},{WNIDS[l]} 1 2 3 4\n'
                   for n, l in val)
    else:
      f.writelines(f'{WNIDS[l]}\n' for _, l in val)
  return {'train': train, 'val': val, 'labels': labels_path}


def write_tokenizer(directory: str) -> str:
  """A word-level Hugging Face tokenizer over the fixture caption words."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  words = sorted(set(CAPTION_WORDS) | {'A', 'detailed', 'recaption', 'sample'})
  vocab = {'[PAD]': 0, '[UNK]': 1, **{w: i + 2 for i, w in enumerate(words)}}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, pad_token='[PAD]',
      unk_token='[UNK]').save_pretrained(directory)
  return directory
