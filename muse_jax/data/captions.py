"""Captions: decoding and cleaning, the recaption join, tokenization.

A recaption file (LLaVA-ReCap-CC12M style: one row per sample, key ->
caption) can hold millions of rows. Loading it into a dict in every worker
process would cost gigabytes per worker, so it is converted once into a
sorted key array and one UTF-8 buffer, saved as .npy files, and memory-mapped
by the workers: the pages are shared between processes and lookups are a
binary search.
"""

import hashlib
import html
import json
import os
import re
import tempfile
import unicodedata

from etils import epath
import numpy as np

from muse_jax.data.images import BadExample

_TAG = re.compile(r'<[^>]{0,200}>')
_SPACE = re.compile(r'\s+')


def decode_caption(raw: bytes | str) -> str:
  """UTF-8 bytes (or text) -> cleaned caption; BadExample if unusable."""
  if isinstance(raw, bytes):
    try:
      raw = raw.decode('utf-8')
    except UnicodeDecodeError as error:
      raise BadExample('bad_caption_encoding', str(error)) from error
  text = clean_caption(raw)
  if not text:
    raise BadExample('empty_caption')
  return text


def clean_caption(text: str) -> str:
  """Normalises web alt-text: entities, tags, control chars, whitespace."""
  text = unicodedata.normalize('NFC', html.unescape(text))
  text = _TAG.sub(' ', text)
  text = ''.join(ch if unicodedata.category(ch)[0] != 'C' else ' '
                 for ch in text)
  return _SPACE.sub(' ', text).strip()


def _caption_text(value) -> str | bytes | None:
  """The caption in a row: text (or raw bytes, validated when used), or the
  answer of a LLaVA chat."""
  if isinstance(value, (str, bytes)) or value is None:
    return value
  answers = [turn.get('value') for turn in value
             if isinstance(turn, dict) and turn.get('from') == 'gpt']
  return answers[-1] if answers else None


def _read_rows(path: str, key_field: str, text_field: str):
  """Yields (key, caption text or None) from a parquet or JSON-lines file."""
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with epath.Path(path).open('rb') as f:
      table = pq.read_table(f, columns=[key_field, text_field])
    yield from zip(table.column(key_field).to_pylist(),
                   map(_caption_text, table.column(text_field).to_pylist()))
    return
  with epath.Path(path).open('r') as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        yield row.get(key_field), _caption_text(row.get(text_field))


class CaptionTable:
  """key -> caption bytes, memory-mapped from a cache built once per file."""

  def __init__(self, path: str, key_field: str, text_field: str):
    self._path = path
    self._key_field = key_field
    self._text_field = text_field
    stat = epath.Path(path).stat()
    digest = hashlib.sha1(
        f'{path}|{stat.length}|{stat.mtime}|{key_field}|{text_field}'.encode()
    ).hexdigest()[:16]
    self._cache_dir = os.path.join(tempfile.gettempdir(), 'muse_jax_captions',
                                   digest)
    if not os.path.exists(os.path.join(self._cache_dir, 'keys.npy')):
      self._build()
    self._arrays = None

  def _build(self):
    rows = sorted((str(key), text if isinstance(text, bytes) else
                   (text or '').encode('utf-8'))
                  for key, text in _read_rows(self._path, self._key_field,
                                              self._text_field)
                  if key is not None)
    keys = np.array([key.encode('utf-8') for key, _ in rows], dtype=bytes)
    lengths = np.array([len(text) for _, text in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    buffer = np.frombuffer(b''.join(text for _, text in rows), np.uint8)
    # Build beside the final place and rename: concurrent builders on one
    # host cannot leave a half-written cache behind.
    os.makedirs(os.path.dirname(self._cache_dir), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(self._cache_dir))
    for name, array in (('keys', keys), ('offsets', offsets),
                        ('text', buffer)):
      np.save(os.path.join(staging, f'{name}.npy'), array)
    try:
      os.rename(staging, self._cache_dir)
    except OSError:  # another process finished first; theirs is identical
      for name in ('keys', 'offsets', 'text'):
        os.remove(os.path.join(staging, f'{name}.npy'))
      os.rmdir(staging)

  def __getstate__(self):
    return {**self.__dict__, '_arrays': None}

  def _load(self):
    self._arrays = tuple(
        np.load(os.path.join(self._cache_dir, f'{name}.npy'), mmap_mode='r')
        for name in ('keys', 'offsets', 'text'))
    return self._arrays

  def __len__(self) -> int:
    return len((self._arrays or self._load())[0])

  def get(self, key: str) -> bytes | None:
    keys, offsets, text = self._arrays or self._load()
    wanted = key.encode('utf-8')
    index = int(np.searchsorted(keys, wanted))
    if index >= len(keys) or keys[index] != wanted:
      return None
    return text[offsets[index]:offsets[index + 1]].tobytes()


class CaptionTokenizer:
  """A Hugging Face tokenizer from a local directory, loaded per process."""

  def __init__(self, directory: str, max_tokens: int):
    self._directory = directory
    self._max_tokens = max_tokens
    self._tokenizer = None

  def __getstate__(self):
    return {**self.__dict__, '_tokenizer': None}

  def _load(self):
    import transformers  # pylint: disable=g-import-not-at-top
    self._tokenizer = transformers.AutoTokenizer.from_pretrained(
        self._directory, local_files_only=True)
    return self._tokenizer

  def __call__(self, text: str) -> dict:
    """Caption -> fixed-length ids and mask (no special tokens: the model's
    prompt format adds its own)."""
    tokenizer = self._tokenizer or self._load()
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    ids = ids[:self._max_tokens]
    pad_id = tokenizer.pad_token_id or 0
    tokens = np.full(self._max_tokens, pad_id, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros(self._max_tokens, np.int32)
    mask[:len(ids)] = 1
    return {'caption_tokens': tokens, 'caption_mask': mask}
