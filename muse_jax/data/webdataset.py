"""CC12M as img2dataset writes it: webdataset tar shards, and ArrayRecord.

A webdataset shard is a tar whose consecutive members share a key:
`000123.jpg`, `000123.txt` (alt-text), `000123.json` (metadata). Shards are
streamed with Grain iterator datasets (no random access into a tar); the
converter rewrites them as ArrayRecord files, one record per sample, for
random access and a global shuffle.
"""

import json
import posixpath
import tarfile

from etils import epath
import grain

IMAGE_FIELDS = ('jpg', 'jpeg', 'png', 'webp')


def iter_tar_samples(path: str):
  """Yields (key, {extension: bytes}) per sample, in tar order.

  A shard that is cut short or otherwise unreadable mid-way ends with
  (None, None) after the samples read before the damage.
  """
  key, fields = None, {}
  try:
    with epath.Path(path).open('rb') as f, tarfile.open(
        fileobj=f, mode='r|*') as tar:
      for member in tar:
        if not member.isfile():
          continue
        directory, base = posixpath.split(member.name)
        stem, dot, extension = base.partition('.')
        if not dot:
          continue
        member_key = posixpath.join(directory, stem)
        if member_key != key:
          if fields:
            yield key, fields
          key, fields = member_key, {}
        fields[extension.lower()] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError):
    yield from ([(key, fields)] if fields else [])
    yield None, None
    return
  if fields:
    yield key, fields


def sample_record(key: str, fields: dict[str, bytes]) -> dict:
  """A webdataset sample as a pipeline record (see sources.py)."""
  image = next((fields[f] for f in IMAGE_FIELDS if f in fields), b'')
  record = {'key': key, 'image': image}
  if 'txt' in fields:
    record['caption'] = fields['txt']
  return record


def encode_sample(key: str, fields: dict[str, bytes]) -> bytes:
  """One ArrayRecord record: a JSON header line, then the field bytes."""
  header = json.dumps({'key': key, 'fields': [[name, len(value)] for name,
                                              value in fields.items()]})
  return b''.join([header.encode('utf-8'), b'\n', *fields.values()])


def decode_sample(record: bytes) -> tuple[str, dict[str, bytes]]:
  header_end = record.index(b'\n')
  header = json.loads(record[:header_end])
  fields, offset = {}, header_end + 1
  for name, length in header['fields']:
    fields[name] = record[offset:offset + length]
    offset += length
  return header['key'], fields


def array_record_to_record(raw: bytes) -> dict:
  return sample_record(*decode_sample(raw))


class TarShardIterator(grain.DatasetIterator):
  """Records of one shard; its state is the number of samples read."""

  def __init__(self, path: str, skip_first: int, skip_marker: dict):
    super().__init__()
    self._path = path
    self._skip_first = skip_first
    self._skip_marker = skip_marker
    self._position = 0
    self._samples = None

  def _open_at(self, position: int):
    self._samples = iter_tar_samples(self._path)
    for _ in range(self._skip_first + position):
      if next(self._samples, (None, None))[0] is None:
        break
    self._position = position

  def __next__(self) -> dict:
    if self._samples is None:
      self._open_at(self._position)
    key, fields = next(self._samples)
    self._position += 1
    if key is None:
      # The damaged tail of a shard: counted, then the shard ends.
      self._samples = iter(())
      return dict(self._skip_marker)
    return sample_record(key, fields)

  def get_state(self) -> dict:
    return {'position': self._position}

  def set_state(self, state: dict) -> None:
    self._open_at(state['position'])


class TarShardDataset(grain.IterDataset):
  """A Grain iterator dataset over the samples of one webdataset shard."""

  def __init__(self, path: str, skip_first: int, skip_marker: dict):
    super().__init__()
    self._path = path
    self._skip_first = skip_first
    self._skip_marker = skip_marker

  def __iter__(self) -> TarShardIterator:
    return TarShardIterator(self._path, self._skip_first, self._skip_marker)

  def __str__(self) -> str:
    return f'TarShardDataset({self._path})'


def array_record_name(shard: str) -> str:
  """The converted file's name: `00042.tar` -> `00042.array_record`."""
  return posixpath.basename(shard).rsplit('.tar', 1)[0] + '.array_record'


def convert_shard(shard: str, output_dir: str) -> dict:
  """Rewrites one tar shard as `<output_dir>/<name>.array_record`; written
  under a temporary name first, so a present output is always complete."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter
  target = epath.Path(output_dir) / array_record_name(shard)
  partial = epath.Path(output_dir) / (array_record_name(shard) + '.partial')
  writer = ArrayRecordWriter(str(partial), 'group_size:1')
  samples, damaged = 0, False
  for key, fields in iter_tar_samples(shard):
    if key is None:
      damaged = True
      continue
    writer.write(encode_sample(key, fields))
    samples += 1
  writer.close()
  partial.rename(target)
  return {'shard': shard, 'output': str(target), 'samples': samples,
          'damaged': damaged}
