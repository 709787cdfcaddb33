"""Robust decoding, the crop geometry and caption handling, one example at a
time (no pipelines, so these run in milliseconds)."""

import io
import json

import ml_collections
import numpy as np
from PIL import Image
import pytest

from muse_jax import data
from muse_jax.data import captions
from muse_jax.data import images
from muse_jax.data import pipeline
import test_data_fixtures as fx

LIMIT = 89_478_485


def _decode(raw, **options):
  options.setdefault('max_pixels', LIMIT)
  return np.asarray(images.decode_rgb(raw, **options))


def _encode(image, fmt, **options):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **options)
  return buffer.getvalue()


def _bad_reason(raw, **options):
  with pytest.raises(images.BadExample) as bad:
    _decode(raw, **options)
  return bad.value.reason


def test_grayscale_palette_and_cmyk_become_rgb():
  photo = fx.photos(1)[0]
  gray = _decode(_encode(photo.convert('L'), 'PNG'))
  assert gray.shape == (photo.height, photo.width, 3)
  assert np.array_equal(gray[..., 0], gray[..., 2])
  palette = _decode(_encode(photo.convert('P'), 'GIF'))
  assert palette.shape == gray.shape
  assert np.abs(palette.astype(int) - np.asarray(photo)).mean() < 20
  cmyk = _decode(_encode(photo.convert('CMYK'), 'JPEG', quality=95))
  assert cmyk.shape == gray.shape
  assert np.abs(cmyk.astype(int) - np.asarray(photo)).mean() < 8


def test_transparency_is_composited_on_white():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[:, :4] = (255, 0, 0, 255)  # opaque red left half, transparent right
  decoded = _decode(_encode(Image.fromarray(rgba, 'RGBA'), 'PNG'))
  assert np.array_equal(decoded[0, 0], [255, 0, 0])
  assert np.array_equal(decoded[0, 7], [255, 255, 255])
  palette = Image.fromarray(rgba, 'RGBA').convert('P')
  transparent_index = palette.getpixel((7, 0))
  decoded = _decode(_encode(palette, 'PNG', transparency=transparent_index))
  assert np.array_equal(decoded[0, 7], [255, 255, 255])


def test_sixteen_bit_png_is_scaled_not_clipped():
  values = np.array([[0, 32896, 65535]], np.uint16).repeat(4, axis=0)
  raw = _encode(Image.fromarray(values), 'PNG')
  assert Image.open(io.BytesIO(raw)).mode.startswith('I')
  decoded = _decode(raw)
  assert decoded[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
  stored = np.zeros((20, 40, 3), np.uint8)
  stored[:, :20] = (255, 0, 0)  # stored left half red, right half blue
  stored[:, 20:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6  # display rotated 90 degrees clockwise
  raw = _encode(Image.fromarray(stored), 'JPEG', quality=95, exif=exif)
  upright = _decode(raw)
  assert upright.shape == (40, 20, 3)
  assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 60  # top is red
  assert upright[35, 10, 2] > 200 and upright[35, 10, 0] < 60


def test_bad_bytes_are_classified():
  good = fx.jpeg_bytes(fx.photos(1)[0])
  assert _bad_reason(b'') == 'corrupt'
  assert _bad_reason(b'just some text, not pixels') == 'corrupt'
  assert _bad_reason(good[:len(good) // 2]) == 'corrupt'
  assert _bad_reason(fx.decompression_bomb_png()) == 'too_large'
  # Our own limit applies before decoding, below PIL's.
  assert _bad_reason(good, max_pixels=1000) == 'too_large'
  assert _bad_reason(_encode(Image.new('RGB', (10, 30)), 'PNG'),
                     min_short_side=16) == 'too_small'


def test_random_crop_boxes_stay_inside_with_the_requested_scale():
  rng = np.random.default_rng(0)
  for _ in range(200):
    width, height = rng.integers(20, 500, size=2)
    left, top, right, bottom = images.random_crop_box(width, height, 0.5, rng)
    side = right - left
    assert side == pytest.approx(bottom - top)
    assert 0.5 * min(width, height) - 1e-6 <= side <= min(width, height)
    assert left >= 0 and top >= 0
    assert right <= width + 1e-6 and bottom <= height + 1e-6
  assert images.center_crop_box(40, 20) == (10, 0, 30, 20)


def test_crop_resize_flip_and_pad():
  gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4,
                     (32, 1, 3))
  image = Image.fromarray(gradient)
  crop = images.crop_resize(image, images.center_crop_box(64, 32), 16, False)
  flipped = images.crop_resize(image, images.center_crop_box(64, 32), 16, True)
  assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
  assert np.array_equal(flipped, crop[:, ::-1])
  assert crop[0, 0, 0] < crop[0, -1, 0]
  padded = images.pad_resize(image, 16, False)
  assert padded.shape == (16, 16, 3)
  # A 2:1 image fills the middle 8 rows; the rest is grey padding.
  assert (padded[:4] == images.PAD_VALUE).all()
  assert (padded[12:] == images.PAD_VALUE).all()
  assert padded[8, 0, 0] < padded[8, -1, 0]
  floats = np.empty(3, np.float32)
  images.to_float(np.array([0, 128, 255], np.uint8), floats)
  assert floats[0] == -1.0 and floats[2] == 1.0 and abs(floats[1]) < 0.01


def test_example_transform_eval_is_deterministic_and_train_varies():
  config = data.image_data_config(image_size=32, with_keys=True)
  record = {'key': 'photo', 'image': fx.jpeg_bytes(fx.photos(1)[0])}
  evaluate = pipeline.ExampleTransform(config, train=False)
  train = pipeline.ExampleTransform(config, train=True)
  first, second = evaluate(record), evaluate(record)
  assert np.array_equal(first['image'], second['image'])
  assert first['key'] == 'photo'
  crops = [train(record, np.random.default_rng(seed))['image']
           for seed in range(4)]
  assert len({c.tobytes() for c in crops}) == 4
  assert pipeline.ExampleTransform(config, train=True)(
      {'key': 'x', 'image': b''}, np.random.default_rng(0)) == {
          pipeline.SKIP_KEY: 'corrupt'}


def test_caption_cleaning_and_rejections():
  assert captions.clean_caption(
      '  A &amp; B <b>bold</b>\tcat\x00 on\n\nthe  mat ') == (
          'A & B bold cat on the mat')
  assert captions.decode_caption('Caf\u00e9 photo'.encode()) == 'Caf\u00e9 photo'
  for raw, reason in ((b'\xff\xfe\xfa caption', 'bad_caption_encoding'),
                      (b' \t\n ', 'empty_caption'),
                      (b'<p></p>', 'empty_caption')):
    with pytest.raises(images.BadExample) as bad:
      captions.decode_caption(raw)
    assert bad.value.reason == reason


@pytest.mark.parametrize('suffix', ['jsonl', 'parquet'])
def test_caption_table_lookup(tmp_path, suffix):
  path = str(tmp_path / f'recaptions.{suffix}')
  keys = [f'{i:09d}' for i in range(30)]
  rows = fx.write_recaptions(path, keys, skip=('000000007',))
  table = captions.CaptionTable(path, 'id', 'caption')
  assert len(table) == 29
  for row in rows:
    assert table.get(row['id']) == row['caption'].encode()
  assert table.get('000000007') is None
  assert table.get('zzz') is None
  # A second table over the same file reuses the memory-mapped cache.
  again = captions.CaptionTable(path, 'id', 'caption')
  assert again.get(keys[3]) == table.get(keys[3])


def test_caption_table_keeps_binary_captions_for_validation(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'binary.parquet')
  pq.write_table(pa.table({
      'id': ['a', 'b'],
      'caption': pa.array([b'caf\xe9 latin-1', b'fine caption'], pa.binary()),
  }), path)
  table = captions.CaptionTable(path, 'id', 'caption')
  with pytest.raises(images.BadExample) as bad:
    captions.decode_caption(table.get('a'))
  assert bad.value.reason == 'bad_caption_encoding'
  assert captions.decode_caption(table.get('b')) == 'fine caption'


def test_caption_table_reads_llava_conversations(tmp_path):
  path = tmp_path / 'llava.jsonl'
  chat = [{'from': 'human', 'value': '<image>\nDescribe the image.'},
          {'from': 'gpt', 'value': 'A cat sleeping on a red sofa.'}]
  path.write_text(json.dumps({'id': 'k1', 'conversations': chat}) + '\n')
  table = captions.CaptionTable(str(path), 'id', 'conversations')
  assert table.get('k1') == b'A cat sleeping on a red sofa.'


def test_tokenizer_from_a_local_directory(tmp_path):
  directory = fx.write_tokenizer(str(tmp_path / 'tokenizer'))
  tokenize = captions.CaptionTokenizer(directory, max_tokens=6)
  out = tokenize('a photo of the red cat dog')
  assert out['caption_tokens'].shape == (6,)
  assert out['caption_tokens'].dtype == np.int32
  assert out['caption_mask'].tolist() == [1] * 6  # 7 words, truncated
  short = tokenize('red cat')
  assert short['caption_mask'].tolist() == [1, 1, 0, 0, 0, 0]
  assert short['caption_tokens'][2:].tolist() == [0] * 4  # [PAD] id
  assert short['caption_tokens'][0] != short['caption_tokens'][1]


def test_config_cross_field_errors():
  cases = [
      (dict(source='imagenet'), 'imagenet_dir'),
      (dict(source='cc12m'), 'cc12m_shards'),
      (dict(source='cc12m', cc12m_shards='x', caption_source='recaption'),
       'recaption_file'),
      (dict(source='mixture', imagenet_dir='a', cc12m_shards='b',
            imagenet_weight=0.0, cc12m_weight=0.0), 'imagenet_weight'),
      (dict(source='imagenet', imagenet_dir='a', imagenet_format='zip'),
       'imagenet_format'),
  ]
  for overrides, field in cases:
    with pytest.raises(data.DataConfigError) as error:
      data.validate_config(data.image_data_config(**overrides))
    assert f'config.data.{field}=' in str(error.value)
  assert isinstance(data.image_data_config(), ml_collections.ConfigDict)
