"""The data config: one ConfigDict shared by every source, checked up front.

Every field is documented in `image_data_config`; `validate_config` turns a bad
value into a one-line error that names the field and how to fix it, so a pod
run fails at start-up instead of an hour into data loading.
"""

import ml_collections

SOURCES = ('bundled', 'image_folder', 'imagenet', 'cc12m', 'mixture')
IMAGENET_FORMATS = ('tfds', 'folder')
CC12M_FORMATS = ('webdataset', 'array_record')
CAPTION_SOURCES = ('alt_text', 'recaption')
FITS = ('crop', 'pad')
OUTPUTS = ('float', 'uint8')


class DataConfigError(ValueError):
  """A data config field holds a value the pipeline cannot use."""


def image_data_config(**overrides) -> ml_collections.ConfigDict:
  """Returns the data config with defaults; keyword arguments override fields.

  Fields:
    source: where training images come from: 'bundled' (real photographs
      shipped with scikit-image, no download), 'image_folder' (every image
      file under `path`), 'imagenet', 'cc12m', or 'mixture' (weighted mix of
      imagenet and cc12m, as the paper trains the tokenizer).
    path: root directory for source='image_folder'.
    image_size: side of the square images the model sees.
    num_eval_images: eval images. bundled / image_folder: held out of
      training (chosen by a hash of their path, so the split never depends on
      file order). imagenet / mixture: the first ones of the val split
      (50000 = all). cc12m: the first samples of the first shard (or first
      ArrayRecord records), which training skips.
    min_scale: train crops are squares of side U(min_scale, 1) x the shorter
      image side at a random position, resized to image_size; 1.0 gives
      "resize shorter side + random crop".
    flip: random horizontal flips for training.
    fit: 'crop' (square crop as above) or 'pad' (aspect-preserving: the whole
      image resized so its longer side is image_size, centred on a grey
      square), for generation data where cropping would cut the subject.
    output: 'float' (float32 in [-1, 1]) or 'uint8' (0..255) images, NHWC.
    max_upscale: images whose shorter side is below image_size / max_upscale
      are skipped and counted (upscaling further only teaches blur).
    max_image_pixels: images declaring more pixels are skipped before decoding
      (decompression bombs).
    worker_count: Grain worker processes decoding in parallel; 0 decodes in
      the training process.
    chunk_size: examples a worker decodes and hands over together: one
      shared-memory transfer per chunk (per-example transfers cost the
      training process about a quarter of the decode time). Skip counters
      advance a chunk at a time.
    worker_buffer_size: chunks every worker keeps ready.
    read_threads: threads per process reading and decoding.
    prefetch_batches: batches assembled ahead in a background thread.
    with_keys: also emit 'key' (the sample's path or key, as strings) in each
      batch; for inspecting and testing data, not for the device.
    with_labels: emit 'label' (int32 class index) for source='imagenet'.
    shuffle_buffer: for streamed tar shards: examples shuffled together in a
      window (random-access sources are shuffled globally instead).
    open_shards: for streamed tar shards: shards each worker reads from at
      once, interleaved.
    imagenet_dir: for 'imagenet' / 'mixture': the TFDS data_dir holding
      imagenet2012/<version>/ (imagenet_format='tfds', ArrayRecord files) or
      the extracted root with train/<wnid>/*.JPEG and val/
      (imagenet_format='folder').
    imagenet_format: 'tfds' or 'folder'.
    imagenet_val_labels: for imagenet_format='folder' with a flat val/: one
      wnid per line in sorted file-name order (TFDS's
      imagenet2012_validation_labels.txt) or a CSV with an
      `ImageId,PredictionString` header (Kaggle's LOC_val_solution.csv);
      empty means val/ is laid out as val/<wnid>/*.JPEG.
    cc12m_shards: for 'cc12m' / 'mixture': a glob (or comma-separated globs)
      of img2dataset webdataset tar shards (cc12m_format='webdataset') or of
      ArrayRecord files written by `python -m muse_jax.data.convert`
      (cc12m_format='array_record').
    cc12m_format: 'webdataset' or 'array_record'.
    caption_source: 'alt_text' (the .txt in each sample) or 'recaption'
      (recaption_file joined by sample key).
    recaption_file: LLaVA-ReCap-CC12M style parquet or JSON-lines file
      mapping sample key -> caption.
    caption_key_field / caption_text_field: column names in recaption_file;
      a text field holding a LLaVA chat (list of {'from', 'value'} turns,
      e.g. 'conversations') yields the last 'gpt' answer.
    tokenizer_dir: for source='cc12m': local Hugging Face tokenizer
      directory; when set, captions are tokenized into 'caption_tokens' /
      'caption_mask' (int32 [max_caption_tokens], no special tokens).
    max_caption_tokens: length captions are padded / truncated to.
    with_captions: for source='cc12m': emit 'caption' (cleaned text).
      Captions are only read, and missing / empty / non-UTF-8 ones only
      skipped, when with_captions or tokenizer_dir asks for them.
    imagenet_weight / cc12m_weight: mixture proportions for source='mixture'.
  Shuffle and augmentation seeds are not fields: the trainer passes its seed.
  """
  config = ml_collections.ConfigDict()
  config.source = 'bundled'
  config.path = ''
  config.image_size = 256
  config.num_eval_images = 2
  config.min_scale = 0.5
  config.flip = True
  config.fit = 'crop'
  config.output = 'float'
  config.max_upscale = 2.0
  config.max_image_pixels = 89_478_485
  config.worker_count = 0
  config.chunk_size = 16
  config.worker_buffer_size = 2
  config.read_threads = 2
  config.prefetch_batches = 2
  config.with_keys = False
  config.with_labels = True
  config.shuffle_buffer = 1000
  config.open_shards = 4
  config.imagenet_dir = ''
  config.imagenet_format = 'tfds'
  config.imagenet_val_labels = ''
  config.cc12m_shards = ''
  config.cc12m_format = 'webdataset'
  config.caption_source = 'alt_text'
  config.recaption_file = ''
  config.caption_key_field = 'id'
  config.caption_text_field = 'caption'
  config.tokenizer_dir = ''
  config.max_caption_tokens = 128
  config.with_captions = False
  config.imagenet_weight = 0.5
  config.cc12m_weight = 0.5
  for name, value in overrides.items():
    if name not in config:
      raise DataConfigError(
          f'image_data_config() has no field {name!r}; fields are'
          f' {", ".join(sorted(config.keys()))}')
    config[name] = value
  return config


def _fail(field: str, value, problem: str, fix: str):
  raise DataConfigError(
      f'config.data.{field}={value!r} {problem}; {fix}')


def _check_choice(config, field: str, choices: tuple[str, ...]):
  value = config[field]
  if value not in choices:
    _fail(field, value, f'is not one of {choices}',
          f'set --config.data.{field}={choices[0]}')


def _check_range(config, field: str, low, high, kind=(int, float)):
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, kind) or not (
      low <= value <= high):
    _fail(field, value, f'must be a number in [{low}, {high}]',
          f'set --config.data.{field} inside that range')


def _check_path(config, field: str, why: str):
  if not config[field]:
    _fail(field, config[field], f'is empty but {why}',
          f'set --config.data.{field}=/path/to/it')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises DataConfigError naming the first field the pipeline cannot use."""
  _check_choice(config, 'source', SOURCES)
  _check_range(config, 'image_size', 8, 8192, int)
  _check_range(config, 'num_eval_images', 0, 1_000_000, int)
  _check_range(config, 'min_scale', 0.05, 1.0)
  _check_choice(config, 'fit', FITS)
  _check_choice(config, 'output', OUTPUTS)
  _check_range(config, 'max_upscale', 1.0, 64.0)
  _check_range(config, 'max_image_pixels', 64, 1 << 40, int)
  _check_range(config, 'worker_count', 0, 1024, int)
  _check_range(config, 'chunk_size', 1, 4096, int)
  _check_range(config, 'worker_buffer_size', 1, 4096, int)
  _check_range(config, 'read_threads', 0, 256, int)
  _check_range(config, 'prefetch_batches', 0, 64, int)
  _check_range(config, 'max_caption_tokens', 1, 1 << 20, int)
  _check_range(config, 'shuffle_buffer', 1, 1 << 24, int)
  _check_range(config, 'open_shards', 1, 1024, int)
  source = config.source
  if source == 'image_folder':
    _check_path(config, 'path', "source='image_folder' reads images from it")
  if source in ('imagenet', 'mixture'):
    _check_path(config, 'imagenet_dir', f'source={source!r} reads ImageNet')
    _check_choice(config, 'imagenet_format', IMAGENET_FORMATS)
  if source in ('cc12m', 'mixture'):
    _check_path(config, 'cc12m_shards', f'source={source!r} reads CC12M')
    _check_choice(config, 'cc12m_format', CC12M_FORMATS)
    _check_choice(config, 'caption_source', CAPTION_SOURCES)
    if config.caption_source == 'recaption':
      _check_path(config, 'recaption_file',
                  "caption_source='recaption' joins captions from it")
  if source == 'mixture':
    _check_range(config, 'imagenet_weight', 0.0, 1e6)
    _check_range(config, 'cc12m_weight', 0.0, 1e6)
    if config.imagenet_weight + config.cc12m_weight <= 0:
      _fail('imagenet_weight', config.imagenet_weight,
            'and cc12m_weight are both 0',
            'set --config.data.imagenet_weight=0.5')
