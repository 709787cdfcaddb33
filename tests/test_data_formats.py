"""ImageNet (TFDS ArrayRecord and folders), CC12M (tar shards, ArrayRecord,
recaptions, tokens), mixtures, multi-host splits, resume with workers, bad
data and the CLIs, on small fixtures in the real formats."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from muse_jax import data
from muse_jax.data import convert
from muse_jax.data import webdataset
import test_data_fixtures as fx

SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keys(batches):
  return [str(k) for batch in batches for k in batch['key']]


def _take(config, batch_size, count, **kwargs):
  with data.build_train_pipeline(config, global_batch_size=batch_size,
                                 seed=kwargs.pop('seed', 0), **kwargs) as pipe:
    batches = [next(pipe) for _ in range(count)]
    return batches, pipe.counters()


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('tfds'))
  return root, fx.write_tfds_imagenet(root, train=10, validation=4)


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('cc12m'))
  return fx.write_webdataset(root, shards=4, per_shard=5)


def test_imagenet_tfds_array_record_without_tensorflow(tfds_dir):
  root, written = tfds_dir
  config = data.image_data_config(source='imagenet', imagenet_dir=root,
                                  image_size=SIZE, with_keys=True,
                                  num_eval_images=3)
  batches, counters = _take(config, 10, 2)
  # Two epochs, each a permutation of the whole train split, labels intact.
  label_of = dict(written['train'])
  for batch in batches:
    assert sorted(batch['key']) == sorted(label_of)
    assert [label_of[k] for k in batch['key']] == batch['label'].tolist()
    assert batch['image'].shape == (10, SIZE, SIZE, 3)
  assert list(batches[0]['key']) != list(batches[1]['key'])
  assert counters['data/examples'] == 20
  evaluated = list(data.iter_eval_batches(config, batch_size=2))
  assert _keys(evaluated) == [name for name, _ in written['validation'][:3]]
  assert data.load_eval_images(config).shape == (3, SIZE, SIZE, 3)
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('labels_format', ['lines', 'csv', 'subfolders'])
def test_imagenet_extracted_folders(tmp_path, labels_format):
  layout = fx.write_imagenet_folder(
      str(tmp_path), per_class=2, validation=4,
      labels_format='csv' if labels_format == 'csv' else 'lines')
  labels_file = layout['labels']
  if labels_format == 'subfolders':  # val/<wnid>/*.JPEG, no labels file
    for name, label in layout['val']:
      target = tmp_path / 'val' / fx.WNIDS[label] / os.path.basename(name)
      target.parent.mkdir(exist_ok=True)
      os.rename(tmp_path / name, target)
    layout['val'] = sorted(
        (os.path.join('val', fx.WNIDS[label], os.path.basename(name)), label)
        for name, label in layout['val'])
    labels_file = ''
  config = data.image_data_config(
      source='imagenet', imagenet_format='folder', imagenet_dir=str(tmp_path),
      imagenet_val_labels=labels_file, image_size=SIZE, with_keys=True,
      num_eval_images=50_000, read_threads=0)
  (batch,), _ = _take(config, 6, 1)
  train_labels = dict(layout['train'])
  assert sorted(batch['key']) == sorted(train_labels)
  assert [train_labels[k] for k in batch['key']] == batch['label'].tolist()
  (evaluated,) = data.iter_eval_batches(config, batch_size=8)
  assert list(zip(evaluated['key'], evaluated['label'].tolist())) == (
      layout['val'])


def test_cc12m_webdataset_streams_every_sample_with_its_alt_text(shards):
  config = data.image_data_config(
      source='cc12m', cc12m_shards=os.path.join(os.path.dirname(shards[0]),
                                                '*.tar'),
      image_size=SIZE, with_keys=True, with_captions=True, num_eval_images=2,
      shuffle_buffer=6, open_shards=1)  # shards one after another: the
  (batch,), counters = _take(config, 18, 1)  # first 18 are exactly epoch 0
  all_keys = [f'{i:09d}' for i in range(20)]
  # The first two samples of the first shard are the eval set.
  assert sorted(batch['key']) == all_keys[2:]
  for key, caption in zip(batch['key'], batch['caption']):
    assert caption == fx.caption_for(int(key))
  assert counters['data/examples'] == 18
  evaluated = list(data.iter_eval_batches(config, batch_size=8))
  assert _keys(evaluated) == all_keys[:2]
  assert [str(c) for c in evaluated[0]['caption']] == [
      fx.caption_for(0), fx.caption_for(1)]


def test_cc12m_converted_to_array_record_gives_the_same_samples(
    shards, tmp_path):
  output = str(tmp_path / 'array_record')
  result = subprocess.run(
      [sys.executable, '-m', 'muse_jax.data.convert',
       f'--shards={os.path.dirname(shards[0])}/*.tar', f'--output_dir={output}',
       '--workers=1'], cwd=REPO, capture_output=True, text=True, check=True)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary == {'converted_shards': 4, 'samples': 20,
                     'damaged_shards': 0}
  # Converting again finds nothing left to do.
  assert convert.pending_shards(f'{os.path.dirname(shards[0])}/*.tar',
                                output) == []
  config = data.image_data_config(
      source='cc12m', cc12m_format='array_record',
      cc12m_shards=f'{output}/*.array_record', image_size=SIZE,
      with_keys=True, with_captions=True, num_eval_images=2)
  (batch,), _ = _take(config, 18, 1)
  assert sorted(batch['key']) == [f'{i:09d}' for i in range(2, 20)]
  assert all(c == fx.caption_for(int(k))
             for k, c in zip(batch['key'], batch['caption']))
  # Random access: a global shuffle, not shard order.
  assert list(batch['key']) != sorted(batch['key'])
  # The record format keeps every file of a sample.
  key, fields = webdataset.decode_sample(webdataset.encode_sample(
      'k', {'jpg': b'\xff\xd8', 'txt': b'', 'json': b'{}'}))
  assert key == 'k' and fields == {'jpg': b'\xff\xd8', 'txt': b'',
                                   'json': b'{}'}


@pytest.mark.parametrize('suffix', ['parquet', 'jsonl'])
def test_recaptions_are_joined_by_key_and_tokenized(tmp_path, suffix):
  shard = str(tmp_path / '00000.tar')
  samples = fx.webdataset_samples(8)
  fx.write_tar(shard, samples)
  keys = [key for key, _ in samples]
  recaptions = str(tmp_path / f'recaptions.{suffix}')
  rows = fx.write_recaptions(recaptions, keys, skip=(keys[1],),
                             empty=(keys[4],))
  config = data.image_data_config(
      source='cc12m', cc12m_shards=shard, caption_source='recaption',
      recaption_file=recaptions, caption_key_field='id',
      caption_text_field='caption', image_size=SIZE, with_keys=True,
      with_captions=True, num_eval_images=0, shuffle_buffer=1, chunk_size=8,
      tokenizer_dir=fx.write_tokenizer(str(tmp_path / 'tokenizer')),
      max_caption_tokens=12)
  (batch,), counters = _take(config, 6, 1)
  recaption_of = {row['id']: row['caption'] for row in rows}
  assert list(batch['key']) == [k for k in keys if k not in (keys[1],
                                                             keys[4])]
  assert [str(c) for c in batch['caption']] == [
      recaption_of[k] for k in batch['key']]
  assert counters['data/skipped_missing_caption'] == 1
  assert counters['data/skipped_empty_caption'] == 1
  assert batch['caption_tokens'].shape == (6, 12)
  assert batch['caption_mask'].sum(axis=1).tolist() == [12] * 6
  assert not np.array_equal(batch['caption_tokens'][0],
                            batch['caption_tokens'][1])


def test_bad_samples_in_a_shard_are_skipped_and_counted(tmp_path):
  good = fx.webdataset_samples(4)
  tiny = Image.new('RGB', (6, 9), (200, 10, 10))
  truncated = good[0][1]['jpg'][:len(good[0][1]['jpg']) // 2]
  bad = [
      ('zero', {'jpg': b'', 'txt': b'zero bytes'}),
      ('text', {'jpg': b'this is not an image', 'txt': b'text'}),
      ('truncated', {'jpg': truncated, 'txt': b'truncated'}),
      ('tiny', {'jpg': fx.jpeg_bytes(tiny), 'txt': b'too small'}),
      ('bomb', {'png': fx.decompression_bomb_png(), 'txt': b'bomb'}),
      ('empty_caption', {'jpg': good[1][1]['jpg'], 'txt': b'  \n'}),
      ('latin1', {'jpg': good[2][1]['jpg'], 'txt': b'caf\xe9 \xff photo'}),
      ('no_caption', {'jpg': good[3][1]['jpg'], 'json': b'{}'}),
  ]
  shard = str(tmp_path / '00000.tar')
  fx.write_tar(shard, bad + good)  # tar order: all bad samples first
  config = data.image_data_config(
      source='cc12m', cc12m_shards=shard, image_size=SIZE, with_keys=True,
      with_captions=True, num_eval_images=0, shuffle_buffer=1,
      chunk_size=len(bad + good))  # one chunk = one pass over the shard
  (batch,), counters = _take(config, 4, 1)
  assert sorted(batch['key']) == [key for key, _ in good]
  skipped = {name: count for name, count in counters.items()
             if name.startswith('data/skipped_') and count}
  assert skipped == {'data/skipped_corrupt': 3, 'data/skipped_too_small': 1,
                     'data/skipped_too_large': 1,
                     'data/skipped_empty_caption': 1,
                     'data/skipped_bad_caption_encoding': 1,
                     'data/skipped_missing_caption': 1}


def test_a_truncated_shard_ends_early_and_is_counted(tmp_path):
  shard = tmp_path / '00000.tar'
  fx.write_tar(str(shard), fx.webdataset_samples(6))
  raw = shard.read_bytes()
  shard.write_bytes(raw[:len(raw) * 2 // 3])
  readable = [key for key, _ in webdataset.iter_tar_samples(str(shard))
              if key is not None]
  assert 0 < len(readable) < 6
  config = data.image_data_config(
      source='cc12m', cc12m_shards=str(shard), image_size=SIZE,
      with_keys=True, num_eval_images=0, shuffle_buffer=1,
      chunk_size=len(readable) + 1)  # one chunk = one pass over the shard
  batches, counters = _take(config, len(readable), 3)
  # Every pass reads what survives, then counts the damage once.
  assert all(sorted(b['key']) == sorted(readable) for b in batches)
  assert counters['data/skipped_corrupt_shard'] == 3


def test_mixture_follows_its_weights(tfds_dir, shards):
  root, written = tfds_dir
  config = data.image_data_config(
      source='mixture', imagenet_dir=root,
      cc12m_shards=os.path.join(os.path.dirname(shards[0]), '*.tar'),
      imagenet_weight=3.0, cc12m_weight=1.0, image_size=SIZE, with_keys=True)
  batches, _ = _take(config, 8, 5)
  imagenet_names = {name for name, _ in written['train']}
  from_imagenet = sum(k in imagenet_names for k in _keys(batches))
  assert from_imagenet == 30  # exactly 3 of every 4 examples
  assert set(batches[0]) == {'image', 'key'}  # labels/captions are dropped
  # The mixture evaluates on ImageNet val.
  assert data.load_eval_images(config).shape == (2, SIZE, SIZE, 3)


def test_two_hosts_read_disjoint_halves_of_the_epoch(tfds_dir, shards):
  root, written = tfds_dir
  random_access = data.image_data_config(
      source='imagenet', imagenet_dir=root, image_size=SIZE, with_keys=True)
  streamed = data.image_data_config(
      source='cc12m', image_size=SIZE, with_keys=True, num_eval_images=0,
      cc12m_shards=os.path.join(os.path.dirname(shards[0]), '*.tar'),
      shuffle_buffer=5)
  for config, epoch in ((random_access, [n for n, _ in written['train']]),
                        (streamed, [f'{i:09d}' for i in range(20)])):
    per_host = []
    for process_index in range(2):
      (batch,), _ = _take(config, len(epoch), 1,
                          process_index=process_index, process_count=2)
      assert batch['image'].shape[0] == len(epoch) // 2
      per_host.append(set(batch['key']))
    assert not per_host[0] & per_host[1]
    assert per_host[0] | per_host[1] == set(epoch)


def test_ten_batches_equal_five_plus_checkpoint_restore_five_with_workers(
    tfds_dir, shards, tmp_path):
  root, _ = tfds_dir
  # Bad samples in the stream too, so counters must survive the restore.
  broken = str(tmp_path / 'broken.tar')
  fx.write_tar(broken, [(f'bad{i}', {'jpg': b'not a jpeg', 'txt': b'x'})
                        for i in range(3)] + fx.webdataset_samples(3, 100))
  config = data.image_data_config(
      source='mixture', imagenet_dir=root, image_size=SIZE, with_keys=True,
      cc12m_shards=os.path.join(os.path.dirname(shards[0]), '*.tar') + ','
      + broken, worker_count=2, shuffle_buffer=4)
  with data.build_train_pipeline(config, 4, seed=11) as pipe:
    straight = [next(pipe) for _ in range(5)]
    saved = json.dumps(pipe.get_state())
    counters_at_save = pipe.counters()
    straight += [next(pipe) for _ in range(5)]
    final_counters = pipe.counters()
  with data.build_train_pipeline(config, 4, seed=11) as pipe:
    pipe.set_state(json.loads(saved))
    assert pipe.counters() == counters_at_save
    resumed = [next(pipe) for _ in range(5)]
    assert pipe.counters() == final_counters
  for expected, got in zip(straight[5:], resumed):
    assert list(expected['key']) == list(got['key'])
    np.testing.assert_array_equal(expected['image'], got['image'])
  assert final_counters['data/skipped_corrupt'] > 0


def test_inspection_cli_prints_rate_and_counters_and_writes_a_grid(tmp_path):
  fx.photos(3)[0].save(tmp_path / 'a.jpg')
  fx.photos(3)[1].save(tmp_path / 'b.png')
  (tmp_path / 'c.jpg').write_bytes(b'')
  grid = tmp_path / 'grid.png'
  result = subprocess.run(
      [sys.executable, '-m', 'muse_jax.data',
       f'--config=tests/test_data_cli_config.py:{tmp_path}', '--batches=3',
       f'--grid={grid}'], cwd=REPO, capture_output=True, text=True,
      check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['examples_per_s'] > 0
  assert report['data/examples'] == 12
  assert report['data/skipped_corrupt'] >= 3
  assert list(report)[-1] == 'data/skipped_bad_caption_encoding'
  assert Image.open(grid).size == (4 * 34 + 2, 36)
