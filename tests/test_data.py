"""The data contract the trainer relies on: shapes, held-out split,
determinism, exact resume, bad files skipped and counted, config errors."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from muse_jax import data
from muse_jax.data import sources

SIZE = 32


def _take(pipe, count):
  return [next(pipe) for _ in range(count)]


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


def _write_photo_folder(root, count, size=96):
  """Real photographs (bundled ones, shrunk) saved as JPEGs in a class tree."""
  paths = []
  for index, source in enumerate(sources.bundled_files()[:count]):
    image = Image.open(source).convert('RGB')
    image.thumbnail((size * 2, size * 2))
    path = os.path.join(root, f'class_{index % 2}', f'photo_{index}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, quality=90)
    paths.append(path)
  return paths


def test_bundled_batches_have_the_contract_shape_and_range():
  config = data.image_data_config(source='bundled', image_size=SIZE)
  with data.build_train_pipeline(config, global_batch_size=4, seed=0) as pipe:
    batch = next(pipe)
  assert set(batch) == {'image'}
  assert batch['image'].shape == (4, SIZE, SIZE, 3)
  assert batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  # Real photographs: plenty of contrast, and different images per row.
  assert batch['image'].std() > 0.1
  assert not np.array_equal(batch['image'][0], batch['image'][1])


def test_uint8_output_and_per_host_batch():
  config = data.image_data_config(source='bundled', image_size=SIZE,
                                  output='uint8')
  with data.build_train_pipeline(config, global_batch_size=8, seed=0,
                                 process_index=1, process_count=2) as pipe:
    batch = next(pipe)
  assert batch['image'].shape == (4, SIZE, SIZE, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['image'].max() > 200


def test_eval_images_are_held_out_of_training():
  config = data.image_data_config(source='bundled', image_size=SIZE,
                                  num_eval_images=3, with_keys=True,
                                  prefetch_batches=0)
  all_keys = {os.path.basename(p) for p in sources.bundled_files()}
  train_count = len(all_keys) - 3
  with data.build_train_pipeline(config, global_batch_size=train_count,
                                 seed=0) as pipe:
    seen = [k for batch in _take(pipe, 3) for k in batch['key']]
  # Each epoch shows every training image exactly once, never a held-out one.
  assert len(seen) == len(set(seen)) * 3 == train_count * 3
  held_out = sorted(all_keys - set(seen))
  assert len(held_out) == 3
  eval_images = data.load_eval_images(config)
  assert eval_images.shape == (3, SIZE, SIZE, 3)
  assert eval_images.dtype == np.float32
  assert np.array_equal(eval_images, data.load_eval_images(config))
  # The eval images are centre crops of exactly the held-out files.
  expected = []
  for name in held_out:
    image = Image.open(os.path.join(sources.bundled_dir(), name))
    image = image.convert('RGB')
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    crop = image.crop((left, top, left + side, top + side))
    crop = crop.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    expected.append(np.asarray(crop, np.float32) / 127.5 - 1.0)
  order = [min(range(3), key=lambda j: np.abs(e - expected[j]).mean())
           for e in eval_images]
  assert sorted(order) == [0, 1, 2]
  for image, j in zip(eval_images, order):
    assert np.abs(image - expected[j]).mean() < 0.03


def test_same_seed_same_batches_other_seed_other_batches():
  config = data.image_data_config(source='bundled', image_size=SIZE)
  runs = {}
  for name, seed in (('a', 7), ('b', 7), ('c', 8)):
    with data.build_train_pipeline(config, global_batch_size=4,
                                   seed=seed) as pipe:
      runs[name] = _take(pipe, 3)
  _assert_batches_equal(runs['a'], runs['b'])
  assert not np.array_equal(runs['a'][0]['image'], runs['c'][0]['image'])


@pytest.mark.parametrize('worker_count', [0, 2])
def test_resume_from_json_state_continues_exactly(worker_count):
  config = data.image_data_config(source='bundled', image_size=SIZE,
                                  worker_count=worker_count)
  with data.build_train_pipeline(config, global_batch_size=4,
                                 seed=3) as pipe:
    straight = _take(pipe, 5)
    saved = json.dumps(pipe.get_state())  # what the checkpoint stores
    straight += _take(pipe, 5)
  with data.build_train_pipeline(config, global_batch_size=4,
                                 seed=3) as pipe:
    pipe.set_state(json.loads(saved))
    assert pipe.counters()['data/examples'] == 20
    resumed = _take(pipe, 5)
    assert pipe.counters()['data/examples'] == 40
  _assert_batches_equal(straight[5:], resumed)


def test_worker_processes_and_chunking_do_not_change_the_batches():
  batches = {}
  for workers, chunk_size in ((0, 1), (2, 16)):
    config = data.image_data_config(source='bundled', image_size=SIZE,
                                    worker_count=workers,
                                    chunk_size=chunk_size)
    with data.build_train_pipeline(config, global_batch_size=4,
                                   seed=5) as pipe:
      batches[workers] = _take(pipe, 3)
  _assert_batches_equal(batches[0], batches[2])


def test_bad_files_in_an_image_folder_are_skipped_and_counted(tmp_path):
  good = _write_photo_folder(str(tmp_path), 5)
  bad_dir = tmp_path / 'class_0'
  (bad_dir / 'zero_bytes.jpg').write_bytes(b'')
  jpeg = open(good[0], 'rb').read()
  (bad_dir / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) // 3])
  (bad_dir / 'notes.jpg').write_text('not an image, just text\n')
  config = data.image_data_config(
      source='image_folder', path=str(tmp_path), image_size=SIZE,
      num_eval_images=0, with_keys=True, worker_count=2, chunk_size=8)
  with data.build_train_pipeline(config, global_batch_size=5,
                                 seed=0) as pipe:
    batches = _take(pipe, 3)
    counters = pipe.counters()
    state = json.loads(json.dumps(pipe.get_state()))
  keys = [k for batch in batches for k in batch['key']]
  # Three full epochs of the five good photos, never a bad file.
  assert sorted(keys) == sorted(
      [os.path.relpath(p, tmp_path) for p in good] * 3)
  assert all(batch['image'].shape == (5, SIZE, SIZE, 3) for batch in batches)
  # A chunk of 8 is one epoch of the 8 files: 3 chunks read, 3 x 3 skips.
  assert counters['data/skipped_corrupt'] == 9
  assert counters['data/examples'] == 15
  assert state['counters'] == counters


def test_eval_images_of_an_image_folder_skip_bad_files(tmp_path):
  _write_photo_folder(str(tmp_path), 4)
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  config = data.image_data_config(source='image_folder', path=str(tmp_path),
                                  image_size=SIZE, num_eval_images=5)
  with pytest.raises(data.DataConfigError, match='num_eval_images'):
    data.load_eval_images(config)
  config.num_eval_images = 4
  held_out = data.load_eval_images(config)
  # 4 of the 5 files are held out; a held-out broken file is left out.
  assert held_out.shape[0] in (3, 4)
  assert held_out.shape[1:] == (SIZE, SIZE, 3)


@pytest.mark.parametrize('field, value', [
    ('source', 'foo'),
    ('image_size', 0),
    ('num_eval_images', -1),
    ('min_scale', 1.5),
    ('worker_count', -1),
    ('output', 'int16'),
    ('fit', 'stretch'),
    ('max_upscale', 0.5),
])
def test_bad_config_values_raise_one_line_naming_the_field(field, value):
  config = data.image_data_config()
  config[field] = value
  with pytest.raises(data.DataConfigError) as error:
    data.validate_config(config)
  message = str(error.value)
  assert f'config.data.{field}=' in message
  assert f'--config.data.{field}' in message
  assert '\n' not in message


def test_missing_paths_and_unknown_fields_raise():
  config = data.image_data_config(source='image_folder')
  with pytest.raises(data.DataConfigError, match=r'config\.data\.path'):
    data.validate_config(config)
  config.path = '/nonexistent/folder'
  with pytest.raises(data.DataConfigError, match=r'config\.data\.path'):
    data.build_train_pipeline(config, global_batch_size=2, seed=0)
  with pytest.raises(data.DataConfigError, match='image_sise'):
    data.image_data_config(image_sise=256)
  with pytest.raises(data.DataConfigError, match='multiple'):
    data.build_train_pipeline(data.image_data_config(), global_batch_size=3,
                              seed=0, process_count=2)
