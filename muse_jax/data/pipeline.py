"""Train and eval pipelines: records -> examples -> per-host batches, on Grain.

Shape of every training pipeline:

  records            random access: host slice -> endless shuffle
                     (tar shards: host's shards -> endless shuffle ->
                      interleave open shards -> window shuffle)
    -> random_map(ExampleTransform)    per-example RNG, deterministic
    [-> mix]                           weighted mixture of sources
    -> chunks of chunk_size examples   one transfer per chunk
    -> mp_prefetch                     worker processes decode
    -> SkipAndBatch                    count skips, cut exact batches
    -> thread prefetch                 batches ready before the step asks

Bad examples are decided in the workers but counted in the training process:
a worker returns a small skip marker instead of an example; a chunk carries
its good examples and the reasons of its skipped ones to the training
process, where `SkipAndBatch` counts the reasons and cuts batches from the
good examples. So the batch size is always exact, the counters are one
number in one process (no cross-process aggregation), and they live in the
iterator state that Grain already checkpoints and restores, worker processes
included.
"""

import math
import sys

from absl import flags
from etils import epath
import grain
import numpy as np

from muse_jax.data import captions
from muse_jax.data import images
from muse_jax.data import imagenet
from muse_jax.data import sources
from muse_jax.data.config import DataConfigError, validate_config

SKIP_KEY = '_skipped'
SKIP_REASONS = ('unreadable', 'corrupt', 'too_small', 'too_large',
                'corrupt_shard', 'missing_caption', 'empty_caption',
                'bad_caption_encoding')
COUNTER_NAMES = ('data/examples',) + tuple(
    f'data/skipped_{reason}' for reason in SKIP_REASONS)
# Consecutive skips after which the source is declared broken (not one bad
# file but a wrong path or format): raising beats spinning forever.
MAX_CONSECUTIVE_SKIPS = 10_000


def derive_seed(seed: int, *parts: int) -> int:
  """A 32-bit seed from the trainer's seed and a purpose/host tag."""
  return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def _read_file(path: str) -> bytes:
  try:
    return epath.Path(path).read_bytes()
  except OSError as error:
    raise images.BadExample('unreadable', str(error)) from error


def _caption_fields(config) -> tuple[bool, bool]:
  """(emit cleaned caption text, emit caption tokens) for this config."""
  has_captions = config.source == 'cc12m'
  return (has_captions and config.with_captions,
          has_captions and bool(config.tokenizer_dir))


class ExampleTransform:
  """record -> example dict, or a skip marker {SKIP_KEY: reason}.

  Called by Grain's random_map with a per-example generator for training;
  called with rng=None it applies the deterministic eval geometry (resize +
  centre crop, no flip). The fields it emits depend only on the config, so
  every batch of a run has the same structure.
  """

  def __init__(self, config, *, train: bool):
    self._size = config.image_size
    self._min_scale = config.min_scale
    self._flip = train and config.flip
    self._fit = config.fit
    self._max_pixels = config.max_image_pixels
    self._min_short_side = math.ceil(config.image_size / config.max_upscale)
    crops_further = train and config.fit == 'crop'
    self._draft_short_side = math.ceil(
        config.image_size / (config.min_scale if crops_further else 1.0))
    self._with_keys = config.with_keys
    self._with_labels = config.source == 'imagenet' and config.with_labels
    self._with_text, with_tokens = _caption_fields(config)
    self._tokenizer = (captions.CaptionTokenizer(
        config.tokenizer_dir, config.max_caption_tokens)
                       if with_tokens else None)
    self._recaptions = None
    if (self._with_text or with_tokens) and (
        config.caption_source == 'recaption'):
      self._recaptions = captions.CaptionTable(
          config.recaption_file, config.caption_key_field,
          config.caption_text_field)

  def __call__(self, record: dict, rng: np.random.Generator | None = None):
    if SKIP_KEY in record:
      return record
    try:
      return self._example(record, rng)
    except images.BadExample as bad:
      return {SKIP_KEY: bad.reason}

  def _caption(self, record: dict) -> dict:
    raw = (self._recaptions.get(record['key']) if self._recaptions
           else record.get('caption'))
    if raw is None:
      raise images.BadExample('missing_caption', record['key'])
    text = captions.decode_caption(raw)
    fields = self._tokenizer(text) if self._tokenizer else {}
    if self._with_text:
      fields['caption'] = text
    return fields

  def _example(self, record: dict, rng: np.random.Generator | None) -> dict:
    # Captions first: a sample without one is skipped before paying for the
    # image decode.
    caption = (self._caption(record)
               if self._with_text or self._tokenizer else {})
    data = record['image'] if 'image' in record else _read_file(record['path'])
    image = images.decode_rgb(
        data, max_pixels=self._max_pixels, min_short_side=self._min_short_side,
        draft_short_side=self._draft_short_side)
    flip = self._flip and rng is not None and rng.random() < 0.5
    if self._fit == 'pad':
      pixels = images.pad_resize(image, self._size, flip)
    else:
      width, height = image.size
      box = (images.random_crop_box(width, height, self._min_scale, rng)
             if rng is not None else images.center_crop_box(width, height))
      pixels = images.crop_resize(image, box, self._size, flip)
    example = {'image': pixels, **caption}
    if self._with_labels:
      example['label'] = np.int32(record['label'])
    if self._with_keys:
      example['key'] = record['key']
    return example


def pack_chunk(elements: list[dict]) -> dict:
  """Examples and skip markers -> one chunk: the good examples' fields
  stacked (one image array, so one shared-memory transfer) and the skip
  reasons."""
  good = [e for e in elements if SKIP_KEY not in e]
  return {
      'skipped': [e[SKIP_KEY] for e in elements if SKIP_KEY in e],
      'fields': ({name: np.stack([e[name] for e in good]) for name in good[0]}
                 if good else {}),
  }


def _good_rows(chunk: dict) -> int:
  return len(chunk['fields']['image']) if chunk['fields'] else 0


def assemble_batch(parts: list[tuple[dict, int, int]],
                   float_output: bool) -> dict:
  """Concatenates row ranges (fields, start, stop) of chunks into a batch;
  images go straight into the float32 output when float_output."""
  first = parts[0][0]
  batch = {name: np.concatenate([fields[name][start:stop]
                                 for fields, start, stop in parts])
           for name in first if name != 'image' or not float_output}
  if float_output:
    rows = sum(stop - start for _, start, stop in parts)
    batch['image'] = np.empty((rows, *first['image'].shape[1:]), np.float32)
    row = 0
    for fields, start, stop in parts:
      images.to_float(fields['image'][start:stop],
                      batch['image'][row:row + stop - start])
      row += stop - start
  return batch


class SkipAndBatchIterator(grain.DatasetIterator):
  """Counts the skipped examples of each chunk and cuts fixed-size batches
  from the good ones.

  State: the parent's state before the current chunk, the rows of that chunk
  already used, and the counters. Restoring re-reads the chunk and continues
  at the same row.
  """

  def __init__(self, parent, batch_size: int, float_output: bool):
    super().__init__(parent)
    self._batch_size = batch_size
    self._float_output = float_output
    self._counters = dict.fromkeys(COUNTER_NAMES, 0)
    self._state_before_chunk = parent.get_state()
    self._chunk = pack_chunk([])
    self._used = 0
    self._consecutive_skips = 0

  def _next_chunk(self):
    self._state_before_chunk = self._parent.get_state()
    chunk = next(self._parent)
    # Copy out of the worker's shared memory (cheap, once per chunk) so the
    # segment is released now rather than whenever the chunk is collected.
    self._chunk = {'skipped': chunk['skipped'],
                   'fields': {name: np.array(value)
                              for name, value in chunk['fields'].items()}}
    self._used = 0
    for reason in self._chunk['skipped']:
      self._counters[f'data/skipped_{reason}'] += 1
    if _good_rows(self._chunk):
      self._consecutive_skips = 0
    else:
      self._consecutive_skips += len(self._chunk['skipped'])
    if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
      raise RuntimeError(
          f'{self._consecutive_skips} examples in a row were unusable'
          f' ({self._counters}); the data source is broken, check'
          ' config.data paths and formats')

  def __next__(self) -> dict:
    parts, needed = [], self._batch_size
    while needed:
      if self._used == _good_rows(self._chunk):
        self._next_chunk()
        continue
      take = min(needed, _good_rows(self._chunk) - self._used)
      parts.append((self._chunk['fields'], self._used, self._used + take))
      self._used += take
      needed -= take
    self._counters['data/examples'] += self._batch_size
    return assemble_batch(parts, self._float_output)

  def get_state(self) -> dict:
    return {'parent': self._state_before_chunk, 'rows_used': self._used,
            'counters': dict(self._counters)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state['parent'])
    self._state_before_chunk = state['parent']
    self._chunk, self._used = pack_chunk([]), 0
    if state['rows_used']:  # 0 only before the first chunk was read
      self._next_chunk()
      self._used = state['rows_used']
    self._counters = {**dict.fromkeys(COUNTER_NAMES, 0), **state['counters']}


class SkipAndBatchDataset(grain.IterDataset):

  def __init__(self, parent, batch_size: int, float_output: bool):
    super().__init__(parent)
    self._batch_size = batch_size
    self._float_output = float_output

  def __iter__(self) -> SkipAndBatchIterator:
    return SkipAndBatchIterator(self._parent.__iter__(), self._batch_size,
                                self._float_output)


class DataPipeline:
  """What the trainer holds: an iterator of batches with checkpointable state.

  get_state() is JSON-serialisable (the trainer saves it with Orbax
  JsonSave); set_state() makes the pipeline continue exactly where the saved
  one was, worker processes included. counters() are cumulative and part of
  the state, so they survive a resume.
  """

  def __init__(self, dataset: grain.IterDataset):
    self._iterator = dataset.__iter__()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)

  def counters(self) -> dict[str, int]:
    return dict(self._iterator.get_state()['counters'])

  def close(self) -> None:
    """Stops worker processes (also done when the pipeline is collected)."""
    self._iterator.close()
    # Drop the iterator now: Grain closes again on collection, which fails
    # noisily if that only happens at interpreter shutdown.
    del self._iterator

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class EndlessShuffle(grain.MapDataset):
  """This process's share of the records, repeated forever, in a new order every epoch.

  Every epoch is a random permutation of all the records, the same on every
  process (``seed`` must not depend on the process); process ``i`` of ``n``
  takes positions ``i, i + n, i + 2n, ...`` of it, ``len(parent) // n`` of them.
  So every process has the same epoch length, hence the same number of batches
  per epoch, whatever the record count: with uneven shares one host would reach
  the end of its epoch before the others. The ``len(parent) % n`` records left
  over are a different random few every epoch, and no record is read twice in
  an epoch.

  Used instead of grain's shuffle().repeat(): its index_shuffle costs about
  0.5 ms per element on datasets of a few dozen records (the demo, shard
  lists), while a cached per-epoch permutation costs microseconds at any
  size, for 8 bytes of memory per record.
  """

  def __init__(self, parent: grain.MapDataset, seed: int, process_index: int = 0,
               process_count: int = 1):
    super().__init__(parent)
    self._seed = seed
    self._process_index = process_index
    self._process_count = process_count
    self.epoch_length = len(parent) // process_count
    self._permutations = {}

  def __len__(self) -> int:
    return sys.maxsize

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._permutations.get(epoch)
    if permutation is None:
      permutation = np.random.default_rng([self._seed, epoch]).permutation(
          len(self._parent))
      # Reader threads may straddle an epoch boundary: keep two epochs.
      self._permutations = {epoch - 1: self._permutations.get(epoch - 1),
                            epoch: permutation}
    return permutation

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, self.epoch_length)
    record = self._permutation(epoch)[self._process_index
                                      + position * self._process_count]
    return self._parent[int(record)]


def _host_records(records: grain.MapDataset, seed: int, process_index: int,
                  process_count: int, config) -> EndlessShuffle:
  if len(records) < process_count:
    raise DataConfigError(
        f'config.data.source={config.source!r} has {len(records)} training'
        f' records, too few for {process_count} processes; add data')
  return EndlessShuffle(records, seed, process_index, process_count)


def _read_options(config) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=config.read_threads,
                           prefetch_buffer_size=2 * config.read_threads)


def _random_access_examples(records: grain.MapDataset, config, seed: int,
                            tag: int, process_index: int, process_count: int
                            ) -> grain.MapDataset:
  """Disjoint equal host shares of each epoch, decoded per example. The
  shuffle seed is shared by the processes (they split one permutation);
  augmentation seeds are per process."""
  return (_host_records(records, derive_seed(seed, tag, 0), process_index,
                        process_count, config)
          .random_map(ExampleTransform(config, train=True),
                      seed=derive_seed(seed, tag, 1, process_index)))


def _webdataset_examples(config, seed: int, tag: int, process_index: int,
                         process_count: int) -> grain.IterDataset:
  """Streams this host's tar shards: shards -> interleave -> window shuffle."""
  shards = sources.cc12m_files(config)
  host_shards = shards[process_index::process_count]
  if not host_shards:
    raise DataConfigError(
        f'config.data.cc12m_shards={config.cc12m_shards!r} matches'
        f' {len(shards)} shards, fewer than the {process_count} processes;'
        ' every process needs its own shards')
  opener = sources.ShardOpener(shards[0], config.num_eval_images,
                               {SKIP_KEY: 'corrupt_shard'})
  shard_datasets = EndlessShuffle(grain.MapDataset.source(host_shards),
                                  derive_seed(seed, tag, 0, process_index)
                                  ).map(opener)
  # Workers split the shard sequence; keeping workers x open shards within
  # the host's shard count stops the next epoch's shards being opened while
  # this epoch's are still being read.
  shards_per_worker = math.ceil(len(host_shards) / max(1, config.worker_count))
  records = grain.experimental.InterleaveIterDataset(
      shard_datasets,
      cycle_length=max(1, min(config.open_shards, shards_per_worker)))
  records = grain.experimental.WindowShuffleIterDataset(
      records, window_size=config.shuffle_buffer,
      seed=derive_seed(seed, tag, 2, process_index))
  return records.random_map(ExampleTransform(config, train=True),
                            seed=derive_seed(seed, tag, 1, process_index))


def _source_examples(config, seed, tag, process_index, process_count
                     ) -> grain.MapDataset | grain.IterDataset:
  """Training examples of one (non-mixture) source: a MapDataset for
  random-access sources, an IterDataset for streamed shards."""
  if config.source in ('bundled', 'image_folder'):
    records = sources.folder_records(config, 'train')
  elif config.source == 'imagenet':
    records = imagenet.records(config, 'train')
  elif config.cc12m_format == 'array_record':
    records = sources.cc12m_array_records(config, 'train')
  else:
    return _webdataset_examples(config, seed, tag, process_index,
                                process_count)
  return _random_access_examples(records, config, seed, tag, process_index,
                                 process_count)


def _component(config, source: str):
  """The config of one mixture component: images only, shared geometry."""
  component = config.copy_and_resolve_references()
  component.source = source
  component.with_captions = False
  component.with_labels = False
  component.tokenizer_dir = ''
  return component


def _chunked(examples, config):
  """Groups examples into chunks (the stream is endless: no remainder)."""
  return examples.batch(config.chunk_size, drop_remainder=True,
                        batch_fn=pack_chunk)


def train_chunks(config, seed: int, process_index: int, process_count: int
                 ) -> grain.IterDataset:
  """This process's training stream as chunks (see pack_chunk).

  Random-access sources are chunked before to_iter_dataset, so a chunk is
  chunk_size consecutive examples of the global order and workers take whole
  chunks in turn: the batches do not depend on worker_count or chunk_size.
  Streams and mixtures are chunked per worker.
  """
  if config.source != 'mixture':
    examples = _source_examples(config, seed, 0, process_index, process_count)
    if isinstance(examples, grain.MapDataset):
      return _chunked(examples, config).to_iter_dataset(_read_options(config))
    return _chunked(examples, config)
  parts, weights = [], []
  for tag, name, weight in ((1, 'imagenet', config.imagenet_weight),
                            (2, 'cc12m', config.cc12m_weight)):
    if weight:  # a component with weight 0 is never opened
      examples = _source_examples(_component(config, name), seed, tag,
                                  process_index, process_count)
      if isinstance(examples, grain.MapDataset):
        examples = examples.to_iter_dataset(_read_options(config))
      parts.append(examples)
      weights.append(weight)
  if len(parts) == 1:
    return _chunked(parts[0], config)
  return _chunked(grain.IterDataset.mix(parts, weights), config)


def build_train_pipeline(config, global_batch_size: int, seed: int,
                         process_index: int = 0, process_count: int = 1
                         ) -> DataPipeline:
  """This process's endless stream of training batches.

  Each process reads a disjoint part of the data and returns batches of
  global_batch_size // process_count examples.
  """
  validate_config(config)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataConfigError(
        f'global batch size {global_batch_size} is not a positive multiple of'
        f' the process count {process_count}; set --config.batch_size to a'
        ' multiple of it')
  chunks = train_chunks(config, seed, process_index, process_count)
  if config.worker_count:
    if not flags.FLAGS.is_parsed():
      # Grain's workers read absl flags; outside an absl app (tests,
      # notebooks) their defaults are the right values.
      flags.FLAGS.mark_as_parsed()
    chunks = chunks.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count,
        per_worker_buffer_size=config.worker_buffer_size))
  batches = SkipAndBatchDataset(chunks, global_batch_size // process_count,
                                config.output == 'float')
  if config.prefetch_batches:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=config.prefetch_batches)
  return DataPipeline(batches)


def eval_records(config) -> list[dict] | grain.MapDataset:
  """The held-out records: folder hold-out, ImageNet val (first
  num_eval_images), or the CC12M eval samples."""
  if config.source in ('bundled', 'image_folder'):
    return sources.folder_records(config, 'eval')
  if config.source in ('imagenet', 'mixture'):
    records = imagenet.records(config, 'eval')
    return records[:config.num_eval_images]
  if config.cc12m_format == 'array_record':
    return sources.cc12m_array_records(config, 'eval')
  return sources.cc12m_eval_records(config)


def iter_eval_batches(config, batch_size: int, process_index: int = 0,
                      process_count: int = 1):
  """One deterministic pass over this process's share of the eval images.

  Yields batch dicts like training (the last one may be smaller); unusable
  files are left out. For large eval sets (ImageNet val for rFID) where
  load_eval_images would not fit in memory.
  """
  validate_config(config)
  eval_config = (_component(config, 'imagenet') if config.source == 'mixture'
                 else config)
  transform = ExampleTransform(eval_config, train=False)
  records = eval_records(config)
  examples = []
  indices = range(process_index, len(records), process_count)
  for position, index in enumerate(indices, 1):
    example = transform(records[index])
    if SKIP_KEY not in example:
      examples.append(example)
    if examples and (len(examples) == batch_size or position == len(indices)):
      yield assemble_batch([(pack_chunk(examples)['fields'], 0,
                             len(examples))], config.output == 'float')
      examples = []


def load_eval_images(config) -> np.ndarray:
  """The held-out images, resized and centre-cropped: [N, S, S, 3].

  float32 in [-1, 1] (or uint8 with config.output='uint8'); unusable files
  are left out.
  """
  batches = [b['image'] for b in iter_eval_batches(config, batch_size=64)]
  if batches:
    return np.concatenate(batches)
  dtype = np.float32 if config.output == 'float' else np.uint8
  return np.zeros((0, config.image_size, config.image_size, 3), dtype)
