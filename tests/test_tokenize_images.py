"""Offline image tokenization (``python -m muse_jax.tokenize_images``) with a random tiny
SDE tokenizer: the shards hold exactly the tokenizer's codes, bad images are counted,
a killed job resumes without losing or repeating a sample, processes split the work,
and the VLM stage reads the shards as it would have encoded the images itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest
import test_vlm_stage
from test_vlm_stage import tiny_vlm_config

from muse_jax.data import code_shards
from muse_jax.data import config as data_config
from muse_jax.data import image_codes
from muse_jax.data import images as image_lib
from muse_jax.data import sources
from muse_jax.data.config import DataConfigError
from muse_jax.inference import sde_tokenizer
from muse_jax.train import llm_trainer
from muse_jax import tokenize_images

sde_run = test_vlm_stage.sde_run     # the fixture: a random tiny SDE tokenizer saved as a run
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg")


def read_all(directory) -> list[dict]:
  """Every record of every shard file in ``directory``, whatever the manifest says."""
  files = sorted(str(p) for p in directory.glob("*.array_record"))
  source = grain.sources.ArrayRecordDataSource(files)
  return [code_shards.decode_example(source[i]) for i in range(len(source))]


@pytest.fixture
def folder(tmp_path):
  """Five photographs, a file that is no image, and their annotations."""
  image_dir = tmp_path / "images"
  image_dir.mkdir()
  for name in PHOTOS:
    shutil.copy(os.path.join(sources.bundled_dir(), name), image_dir / name)
  (image_dir / "bad.png").write_bytes(b"\x89PNG not really")
  entries = [{"file": name, "caption": f"a photo called {name}", "qa": [["what?", name]]}
             for name in PHOTOS + ("bad.png",)]
  annotations = tmp_path / "annotations.json"
  annotations.write_text(json.dumps({"images": entries}))
  return str(annotations), str(image_dir)


def annotation_source(folder, **overrides):
  kwargs = dict(image_size=32, num_eval=1, views=2, min_scale=0.5, seed=3,
                max_pixels=89_478_485)
  kwargs.update(overrides)
  return tokenize_images.AnnotationSource(*folder, **kwargs)


def test_shards_hold_the_tokenizers_codes_and_count_bad_images(sde_run, folder, tmp_path):
  out = tmp_path / "codes"
  manifest = tokenize_images.tokenize(annotation_source(folder), sde_run, str(out),
                                      batch_size=4, shard_size=2)
  assert manifest["complete"] and manifest["grid"] == [4, 4]
  assert (manifest["sde_step"], manifest["codebook_size"]) == (1, 64)
  assert manifest["totals"]["train"] == {"records": 5, "examples": 8, "skipped": {"corrupt": 1}}
  assert manifest["totals"]["eval"] == {"records": 1, "examples": 1, "skipped": {}}
  assert manifest["units"] == {"eval": 1, "train": 3}

  sde, _, _ = sde_tokenizer.load_tokenizer(sde_run)
  encode = sde_tokenizer.batched_encoder(sde, 4)
  annotations, image_dir = folder
  for split in ("eval", "train"):
    got = list(code_shards.examples(str(out), manifest, split))
    expected_keys, pixels = [], []
    train, held_out = image_codes.split(image_codes.load_annotations(annotations), image_dir, 1)
    for entry in train if split == "train" else held_out:
      if entry["file"] == "bad.png":
        continue
      crops = image_codes.view_crops(
          open(os.path.join(image_dir, entry["file"]), "rb").read(), size=32,
          views=2 if split == "train" else 1, min_scale=0.5,
          rng=tokenize_images.view_rng(3, entry["file"]), max_pixels=89_478_485)
      for view, crop in enumerate(crops):
        expected_keys.append(f"{entry['file']}#{view}")
        pixels.append(np.empty((32, 32, 3), np.float32))
        image_lib.to_float(crop, pixels[-1])
    assert [e["key"] for e in got] == expected_keys
    np.testing.assert_array_equal(np.stack([e["codes"] for e in got]), encode(np.stack(pixels)))
    name = got[0]["key"].split("#")[0]
    assert got[0]["caption"] == f"a photo called {name}"
    assert got[0]["conversations"] == [{"from": "human", "value": "what?"},
                                       {"from": "gpt", "value": name}]

  # the same --out with other crops is another job: refused, nothing overwritten
  with pytest.raises(ValueError, match=r"holds shards of another job \(source.views: 2 there, 1 now\)"):
    tokenize_images.tokenize(annotation_source(folder, views=1), sde_run, str(out),
                             batch_size=4, shard_size=2)


def test_processes_write_disjoint_units_whose_union_is_everything(sde_run, folder, tmp_path):
  out = tmp_path / "codes"
  source = annotation_source(folder, views=1)
  first = tokenize_images.tokenize(source, sde_run, str(out), batch_size=2, shard_size=1,
                                   process_index=1, process_count=2)
  assert not first["complete"]
  with pytest.raises(DataConfigError, match=r"is incomplete \(3 of 6 shards written\)"):
    code_shards.read_manifest(str(out))
  written_by_1 = {p.name for p in out.glob("*.array_record")}
  assert written_by_1 == {"train-00000-of-00005.array_record",
                          "train-00002-of-00005.array_record",
                          "train-00004-of-00005.array_record"}
  second = tokenize_images.tokenize(source, sde_run, str(out), batch_size=2, shard_size=1,
                                    process_index=0, process_count=2)
  assert second["complete"] and code_shards.read_manifest(str(out)) == second
  keys = [e["key"] for e in read_all(out)]
  assert sorted(keys) == sorted(f"{name}#0" for name in PHOTOS)


@pytest.fixture(scope="module")
def demo_shards(sde_run, tmp_path_factory):
  """The demo's 17 photographs tokenized by the CLI, one image per shard, SIGKILLed as soon
  as its first shard appears and then run again to the end: (directory, shards complete at
  the kill, all)."""
  out = tmp_path_factory.mktemp("demo") / "codes"
  command = [sys.executable, "-m", "muse_jax.tokenize_images", f"--sde_workdir={sde_run}",
             f"--out={out}", "--shard_size=1", "--batch_size=1", "--num_eval_images=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 240
  while not (out.is_dir() and any(out.glob("*.array_record"))):
    assert job.poll() is None, job.stderr.read().decode()[-2000:]
    assert time.monotonic() < deadline, "no shard written in 4 minutes"
    time.sleep(0.005)
  job.send_signal(signal.SIGKILL)
  job.wait()
  at_kill = len(list(out.glob("*.array_record")))
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return out, at_kill, json.loads(done.stdout.strip().splitlines()[-1])


def test_killed_job_resumes_without_missing_or_duplicated_samples(demo_shards):
  out, at_kill, summary = demo_shards
  assert 1 <= at_kill < 17, "the kill came after the job ended: nothing was resumed"
  assert summary["complete"] and summary["units"] == {"eval": 2, "train": 15}
  keys = [e["key"] for e in read_all(out)]
  expected = [f"{e['file']}#0" for e in image_codes.load_annotations()]
  assert len(keys) == len(set(keys)) == 17 and set(keys) == set(expected)
  assert not [p.name for p in out.iterdir() if p.name.startswith(".")]   # no temporary left
  assert summary["totals"]["train"] == {"records": 15, "examples": 15, "skipped": {}}


def test_vlm_stage_reads_the_shards_as_it_encodes_the_images(demo_shards, sde_run, tmp_path):
  out, _, _ = demo_shards
  config = tiny_vlm_config(sde_run)
  config.data.views = 1                   # the centre crops the job wrote
  config.tokenizer_dir = llm_trainer.demo_tokenizer_dir(config, str(tmp_path))
  encoded = llm_trainer.VlmData(config)
  config.data.code_shards = str(out)
  read = llm_trainer.VlmData(config)
  for a, b in ((list(encoded.train), list(read.train)), (encoded.held_out, read.held_out)):
    assert [e["key"] for e in a] == [e["key"] for e in b] and len(a) > 1
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["codes"], y["codes"])
      assert (x["caption"], x["conversations"]) == (y["caption"], y["conversations"])
  assert read.skipped == {}

  config.vocab.num_visual = 128
  with pytest.raises(DataConfigError, match=r"64-entry codebook.*num_visual=64"):
    llm_trainer.VlmData(config)
  config.vocab.num_visual = 64
  config.sde_workdir = str(tmp_path)
  with pytest.raises(DataConfigError, match=r"encoded by the SDE run .* at step 1, but"):
    llm_trainer.VlmData(config)

  # an empty sde_workdir is the shards' run; the stage trains from them
  config = tiny_vlm_config("")
  del config["sde_config"]
  config.data.code_shards = str(out)
  config.tokenizer_dir = read.tokenizer.name_or_path
  result = llm_trainer.train(config, str(tmp_path / "run"), stop_after=1)
  assert result["step"] == 1 and np.isfinite(result["metrics"]["loss/lm"])
  assert json.load(open(tmp_path / "run" / "config.json"))["sde_workdir"] == sde_run


def test_cc12m_webdataset_with_recaptions_through_the_grain_sources(sde_run, tmp_path):
  from test_data_fixtures import write_recaptions, write_webdataset
  write_webdataset(str(tmp_path / "cc12m"), shards=2, per_shard=3)
  keys = [f"{i:09d}" for i in range(6)]
  rows = write_recaptions(str(tmp_path / "recap.jsonl"), keys, skip=(keys[4],))
  data = data_config.image_data_config(
      source="cc12m", cc12m_shards=str(tmp_path / "cc12m" / "*.tar"), image_size=32,
      num_eval_images=1, caption_source="recaption", recaption_file=str(tmp_path / "recap.jsonl"))
  source = tokenize_images.DataSource(data, views=2, seed=0)
  out = tmp_path / "codes"
  manifest = tokenize_images.tokenize(source, sde_run, str(out), batch_size=4, shard_size=4)
  assert manifest["units"] == {"eval": 1, "train": 2}      # one unit per tar shard
  assert manifest["totals"]["train"] == {"records": 5, "examples": 8,
                                         "skipped": {"missing_caption": 1}}
  held_out = list(code_shards.examples(str(out), manifest, "eval"))
  assert [e["key"] for e in held_out] == [f"{keys[0]}#0"]
  train = list(code_shards.examples(str(out), manifest, "train"))
  assert [e["key"] for e in train] == [f"{k}#{v}" for k in keys[1:] if k != keys[4]
                                       for v in (0, 1)]
  captions = {r["id"]: r["caption"] for r in rows}
  assert all(e["caption"] == captions[e["key"][:9]] for e in train)
