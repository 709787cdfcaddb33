"""Offline image tokenization: a dataset's images as SDE codes, for the VLM stages.

  python -m muse_jax.tokenize_images --sde_workdir=/ckpt/sde_256 --out=/data/codes \\
      --annotations=/data/captions.json --image_dir=/data/images

  python -m muse_jax.tokenize_images --sde_workdir=/ckpt/sde_256 --out=/data/cc12m_codes \\
      --source=data --data.source=cc12m --data.cc12m_shards='/data/cc12m/*.tar' \\
      --data.caption_source=recaption --data.recaption_file=/data/recap.parquet

The VLM stages then read ``--config.data.code_shards=/data/codes`` (format:
``muse_jax/data/code_shards.py``) and never load the tokenizer; without it they
encode their (small) image folder when they start (``muse_jax/data/image_codes.py``).

Sources. ``--source=annotations`` (default): an image folder and an annotations
JSON as the VLM demo reads them (default: the photographs scikit-image ships and
``demo_annotations.json``); captions and question/answer conversations come
along, and the held-out images are ``image_codes.split``'s. ``--source=data``: the
Grain sources of ``--data.*`` (``muse_jax.data.config``): an image folder,
ImageNet (labels kept, no captions) or CC12M (alt-text or recaptions), with their
eval records as the held-out split. Images are read, and bad ones skipped and
counted by reason, by the same code as those pipelines (``images.BadExample``).
Training images give ``--views`` crops (centre + random squares drawn from a seed
derived from ``--seed`` and the image key, so they do not depend on how the work
is split); held-out images their centre crop.

Work split. Each split's records are enumerated in a fixed order (annotations or
sorted file order, ArrayRecord order, or per tar shard for webdataset CC12M) and
cut into units of ``--shard_size`` records (webdataset: one unit per tar); each
unit becomes one shard file named by its index, and with the units of both
splits in one list, process p of P takes units u with u % P == p: disjoint, and
the same list whatever P is, so a restart may use another process count.

Resumption. A unit is written under a temporary name, its counts sidecar is
written, and only then is the shard renamed to its final name (on object stores:
uploaded in one piece, which appears whole or not at all). A restart skips units
whose shard exists and redoes the rest from their start, so a kill loses at
most the units in flight and no sample is written twice. The job refuses an
``--out`` holding shards of other settings (another tokenizer, source or crops).
The process that finds every sidecar present writes the totals and
``complete: true`` into ``manifest.json``; readers refuse a directory without it.

Encoding. Each process encodes on a mesh of its own devices, the batch of
``--batch_size`` crops split over the mesh's data axis, one jitted program for
every batch (the last one padded, the padding dropped): processes never wait on
each other, so a host with fewer units simply finishes first.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
import zlib
from typing import Callable, Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from ml_collections import config_flags

from muse_jax import cli
from muse_jax.data import code_shards
from muse_jax.data import config as data_config
from muse_jax.data import image_codes
from muse_jax.data import imagenet
from muse_jax.data import images as image_lib
from muse_jax.data import pipeline
from muse_jax.data import sources
from muse_jax.data import webdataset
from muse_jax.parallel import distributed
from muse_jax.parallel import sharding

PROG = "python -m muse_jax.tokenize_images"
# data config fields that change how fast records are read, not what is written
RUNTIME_FIELDS = ("worker_count", "chunk_size", "worker_buffer_size", "read_threads",
                  "prefetch_batches", "shuffle_buffer", "open_shards", "output")


@dataclasses.dataclass(frozen=True)
class Unit:
  """One output shard's worth of records: ``load()`` gives them, in order."""
  split: str
  index: int
  count: int
  load: Callable[[], Sequence[dict]]

  @property
  def name(self) -> str:
    return code_shards.shard_name(self.split, self.index, self.count)


def _take(records, start: int, stop: int) -> list[dict]:
  return [records[i] for i in range(start, stop)]


def slice_units(split: str, records, shard_size: int) -> list[Unit]:
  """Random-access records cut into consecutive units of ``shard_size``."""
  count = -(-len(records) // shard_size)
  return [Unit(split, u, count, functools.partial(_take, records, u * shard_size,
                                                  min((u + 1) * shard_size, len(records))))
          for u in range(count)]


def view_rng(seed: int, key: str) -> np.random.Generator:
  """The random crops' generator of one image: from the seed and its key only."""
  return np.random.default_rng(pipeline.derive_seed(seed, zlib.crc32(key.encode("utf-8"))))


class AnnotationSource:
  """An image folder with an annotations JSON (``image_codes``): captions and
  conversations, the held-out images of ``image_codes.split``."""

  def __init__(self, annotations: str, image_dir: str, *, image_size: int, num_eval: int,
               views: int, min_scale: float, seed: int, max_pixels: int):
    self.image_size = image_size
    self._image_dir = image_dir or sources.bundled_dir()
    self._views, self._min_scale, self._seed = views, min_scale, seed
    self._max_pixels = max_pixels
    train, held_out = image_codes.split(image_codes.load_annotations(annotations),
                                        self._image_dir, num_eval)
    self._records = {"train": [self._record(e) for e in train],
                     "eval": [self._record(e) for e in held_out]}
    self.description = {"kind": "annotations",
                        # the defaults by name: a restart from another install is the same job
                        "annotations": code_shards.canonical(annotations) if annotations
                                       else "demo",
                        "image_dir": code_shards.canonical(image_dir) if image_dir else "bundled",
                        "num_eval": num_eval, "views": views, "min_scale": min_scale,
                        "seed": seed}

  def _record(self, entry: dict) -> dict:
    return {"key": entry["file"], "path": os.path.join(self._image_dir, entry["file"]),
            "caption": entry["caption"],
            "conversations": image_codes.conversation(entry.get("qa", ()))}

  def units(self, shard_size: int) -> list[Unit]:
    return [u for split in code_shards.SPLITS
            for u in slice_units(split, self._records[split], shard_size)]

  def views(self, record: dict, split: str) -> list[tuple[np.ndarray, dict]]:
    try:
      data = epath.Path(record["path"]).read_bytes()
    except OSError as e:
      raise image_lib.BadExample("unreadable", str(e)) from e
    crops = image_codes.view_crops(
        data, size=self.image_size, views=self._views if split == "train" else 1,
        min_scale=self._min_scale, rng=view_rng(self._seed, record["key"]),
        max_pixels=self._max_pixels)
    fields = {"caption": record["caption"], "conversations": record["conversations"]}
    return [(crop, fields) for crop in crops]


class DataSource:
  """The Grain sources of a data config (``muse_jax.data.config``): records, decoding,
  captions and skip reasons exactly as the training pipelines have them."""

  def __init__(self, config, *, views: int, seed: int):
    config = config.copy_and_resolve_references()
    config.update(with_captions=True, with_keys=False, flip=False, tokenizer_dir="")
    data_config.validate_config(config)
    if config.source == "mixture":
      raise data_config.DataConfigError(
          "config.data.source='mixture' mixes sources at training time; tokenize imagenet "
          "and cc12m into two --out directories (--data.source=imagenet, then cc12m)")
    self.config = config
    self.image_size = config.image_size
    self._views, self._seed = views, seed
    self._centre = pipeline.ExampleTransform(config, train=False)
    self._random = pipeline.ExampleTransform(config, train=True)
    self.description = {"kind": "data", "views": views, "seed": seed,
                        "data": {k: v for k, v in config.to_dict().items()
                                 if k not in RUNTIME_FIELDS}}

  def _train_records(self):
    c = self.config
    if c.source in ("bundled", "image_folder"):
      return sources.folder_records(c, "train")
    if c.source == "imagenet":
      return imagenet.records(c, "train")
    if c.cc12m_format == "array_record":
      return sources.cc12m_array_records(c, "train")
    return None

  def units(self, shard_size: int) -> list[Unit]:
    units = slice_units("eval", pipeline.eval_records(self.config), shard_size)
    train = self._train_records()
    if train is not None:
      return units + slice_units("train", train, shard_size)
    tars = sources.cc12m_files(self.config)
    return units + [Unit("train", i, len(tars), functools.partial(
        self._tar_records, tar, self.config.num_eval_images if i == 0 else 0))
                    for i, tar in enumerate(tars)]

  @staticmethod
  def _tar_records(tar: str, skip: int) -> list[dict]:
    """A webdataset shard's samples; its readable part and one corrupt_shard skip
    when it is cut short."""
    records = [webdataset.sample_record(key, fields) if key is not None
               else {pipeline.SKIP_KEY: "corrupt_shard"}
               for key, fields in webdataset.iter_tar_samples(tar)]
    return records[skip:]

  def _example(self, record: dict, rng: np.random.Generator | None = None) -> dict:
    example = (self._random(record, rng) if rng is not None else self._centre(record))
    if pipeline.SKIP_KEY in example:
      raise image_lib.BadExample(example[pipeline.SKIP_KEY])
    return example

  def views(self, record: dict, split: str) -> list[tuple[np.ndarray, dict]]:
    first = self._example(record)
    crops = [first["image"]]
    if split == "train" and self._views > 1:
      rng = view_rng(self._seed, record["key"])
      crops += [self._example(record, rng)["image"] for _ in range(self._views - 1)]
    fields = {"caption": first.get("caption", ""), "conversations": []}
    if "label" in first:
      fields["label"] = int(first["label"])
    return [(crop, fields) for crop in crops]


def _prepare(source, split: str, record: dict) -> list[tuple[str, np.ndarray, dict]] | str:
  """A record's encoded-to-be views, keyed ``<key>#<view>``, or its skip reason."""
  try:
    views = source.views(record, split)
  except image_lib.BadExample as bad:
    return bad.reason
  return [(f"{record['key']}#{v}", crop, fields) for v, (crop, fields) in enumerate(views)]


class UnitWriter:
  """Writes units of one ``--out`` directory: a temporary file, the counts sidecar,
  then the shard under its final name."""

  def __init__(self, out: str, encode: Callable[[np.ndarray], np.ndarray], *, image_size: int,
               batch_size: int, threads: int):
    self.out = epath.Path(out)
    self._size = image_size
    self._local = "://" not in out
    self._encode = encode
    self._batch_size = batch_size
    self._threads = threads

  def done(self, unit: Unit) -> bool:
    return (self.out / unit.name).exists()

  def _temporary(self, unit: Unit) -> str:
    if self._local:
      return os.fspath(self.out / f".{unit.name}.tmp")
    directory = os.path.join(tempfile.gettempdir(), "muse_jax_tokenize_images")
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, unit.name)

  def write(self, unit: Unit, source) -> dict:
    """Encodes and writes one unit; returns its counts."""
    temporary = self._temporary(unit)
    writer = ArrayRecordWriter(temporary, "group_size:1")
    counts = {"split": unit.split, "unit": unit.index, "records": 0, "examples": 0,
              "skipped": collections.Counter()}
    pending = []

    def flush(upto: int) -> None:
      pixels = np.empty((upto, self._size, self._size, 3), np.float32)
      for i, (_, crop, _) in enumerate(pending[:upto]):
        image_lib.to_float(crop, pixels[i])
      for (key, _, fields), codes in zip(pending[:upto], self._encode(pixels)):
        writer.write(code_shards.encode_example({"key": key, "codes": codes, **fields}))
      counts["examples"] += upto
      del pending[:upto]

    records = unit.load()
    counts["records"] = len(records)
    prepare = functools.partial(_prepare, source, unit.split)
    with concurrent.futures.ThreadPoolExecutor(self._threads) as pool:
      for start in range(0, len(records), self._batch_size):
        for result in pool.map(prepare, records[start:start + self._batch_size]):
          if isinstance(result, str):
            counts["skipped"][result] += 1
          else:
            pending += result
        if len(pending) >= self._batch_size:
          flush(len(pending) - len(pending) % self._batch_size)
    if pending:
      flush(len(pending))
    writer.close()
    counts["skipped"] = dict(sorted(counts["skipped"].items()))
    (self.out / code_shards.counts_name(unit.name)).write_text(json.dumps(counts))
    final = self.out / unit.name
    if self._local:
      epath.Path(temporary).replace(final)
    else:
      final.write_bytes(epath.Path(temporary).read_bytes())
      os.remove(temporary)
    return counts


def _write_json(path: epath.Path, value: dict, tag: int) -> None:
  """Whole or not at all: a temporary file renamed (several processes may write the
  same manifest; each uses its own temporary name)."""
  temporary = path.parent / f".{path.name}.tmp{tag}"
  temporary.write_text(json.dumps(value, indent=1, sort_keys=True))
  temporary.replace(path)


def _leaves(tree: dict, prefix: str = "") -> dict:
  """A nested dict as {"a.b": leaf}: a mismatch is reported by the one field that differs."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_leaves(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _check_same_job(out: epath.Path, spec: dict) -> None:
  stored = _leaves(json.loads((out / code_shards.MANIFEST).read_text()))
  for field, value in _leaves(spec).items():
    if stored.get(field) != value:
      raise ValueError(f"--out={os.fspath(out)!r} holds shards of another job ({field}: "
                       f"{stored.get(field)!r} there, {value!r} now); use a new --out, or "
                       "the flags of that job to finish it")


def totals(out: epath.Path, units: list[Unit]) -> dict | None:
  """Each split's summed counts, or None while some unit's sidecar is missing."""
  result = {split: {"records": 0, "examples": 0, "skipped": {}} for split in code_shards.SPLITS}
  for unit in units:
    sidecar = out / code_shards.counts_name(unit.name)
    if not (out / unit.name).exists():
      return None
    counts = json.loads(sidecar.read_text())
    total = result[unit.split]
    total["records"] += counts["records"]
    total["examples"] += counts["examples"]
    for reason, n in counts["skipped"].items():
      total["skipped"][reason] = total["skipped"].get(reason, 0) + n
  return result


def tokenize(source, sde_workdir: str, out: str, *, step: int | None = None,
             batch_size: int = 64, shard_size: int = 1024, threads: int = 8,
             process_index: int | None = None, process_count: int | None = None) -> dict:
  """Writes this process's units of ``source`` into ``out``; returns the manifest
  (``complete`` once every process's units are there)."""
  from muse_jax.inference import sde_tokenizer  # pylint: disable=g-import-not-at-top
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"--process_index={process_index} is not in [0, {process_count}); "
                     "give an index below --process_count")
  if shard_size < 1 or batch_size < 1:
    raise ValueError(f"--shard_size={shard_size} and --batch_size={batch_size} must be "
                     "positive; give both >= 1")
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise ValueError(f"--batch_size={batch_size} does not split over this process's "
                     f"{len(devices)} devices; give a multiple of {len(devices)}")
  mesh = sharding.make_mesh(sharding.mesh_config(data=len(devices)), devices)
  sde, sde_config, sde_step = sde_tokenizer.load_tokenizer(sde_workdir, step, mesh)
  size = sde_config.model.encoder.image_size
  if source.image_size != size:
    raise ValueError(f"the source crops {source.image_size} px images but the SDE run "
                     f"{sde_workdir} encodes {size} px; give --data.image_size={size}")
  grid = jax.eval_shape(sde.encode, jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  units = source.units(shard_size)
  spec = {"format": code_shards.FORMAT, "sde_workdir": code_shards.canonical(sde_workdir),
          "sde_step": int(sde_step), "codebook_size": int(sde_config.model.codebook_size),
          "grid": list(grid.shape[1:]), "image_size": size, "source": source.description,
          "shard_size": shard_size,
          "units": {split: sum(u.split == split for u in units) for split in code_shards.SPLITS}}
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  if (out_dir / code_shards.MANIFEST).exists():
    _check_same_job(out_dir, spec)
  else:
    _write_json(out_dir / code_shards.MANIFEST, {**spec, "complete": False}, process_index)
  writer = UnitWriter(out, sde_tokenizer.batched_encoder(sde, batch_size, mesh),
                      image_size=size, batch_size=batch_size, threads=threads)
  mine = [u for g, u in enumerate(units) if g % process_count == process_index]
  todo = [u for u in mine if not writer.done(u)]
  logging.info("process %d of %d: %d of its %d units left (of %d in all)", process_index,
               process_count, len(todo), len(mine), len(units))
  for unit in todo:
    start = time.perf_counter()
    counts = writer.write(unit, source)
    logging.info("%s: %d examples from %d records in %.1fs, skipped %s", unit.name,
                 counts["examples"], counts["records"], time.perf_counter() - start,
                 counts["skipped"] or "none")
  summed = totals(out_dir, units)
  if summed is None:
    logging.info("this process's units are written; the last process to finish completes "
                 "%s", os.fspath(out_dir / code_shards.MANIFEST))
    return {**spec, "complete": False}
  manifest = {**spec, "complete": True, "totals": summed}
  _write_json(out_dir / code_shards.MANIFEST, manifest, process_index)
  return manifest


_SDE_WORKDIR = flags.DEFINE_string("sde_workdir", None, "A trained SDE tokenizer's run directory.")
_STEP = flags.DEFINE_integer("step", None, "Its checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Directory (or gs:// URL) for the shards and manifest.")
_SOURCE = flags.DEFINE_enum("source", "annotations", ["annotations", "data"],
                            "annotations: --image_dir + --annotations; data: the --data.* "
                            "Grain source (image folder, ImageNet, CC12M).")
_ANNOTATIONS = flags.DEFINE_string("annotations", "", "Annotations JSON (default: the demo's).")
_IMAGE_DIR = flags.DEFINE_string("image_dir", "", "Its image folder (default: the bundled "
                                 "photographs).")
_NUM_EVAL = flags.DEFINE_integer("num_eval_images", 4, "--source=annotations: images held out "
                                 "(the VLM stage's data.num_eval_images).")
_DATA = config_flags.DEFINE_config_dict(
    "data", data_config.image_data_config(min_scale=0.6),
    "--source=data: the data config (muse_jax/data/config.py); image_size comes from the "
    "SDE run.")
_VIEWS = flags.DEFINE_integer("views", 1, "Crops per training image (centre + random).")
_MIN_SCALE = flags.DEFINE_float("min_scale", 0.6, "--source=annotations: random crops' side "
                                ">= this x the shorter side (--source=data: --data.min_scale).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random crops.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Crops per jitted encode (a multiple of "
                                   "the process's devices).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1024, "Source records per output shard.")
_THREADS = flags.DEFINE_integer("threads", 8, "Threads reading and decoding images.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", None, "This process's index (default: "
                                      "jax.process_index()).")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", None, "Processes sharing the work "
                                      "(default: jax.process_count()).")


def main(argv) -> None:
  del argv
  if _PROCESS_COUNT.value is None:
    distributed.initialize()
  from muse_jax.inference import sde_tokenizer  # pylint: disable=g-import-not-at-top
  if not (epath.Path(_SDE_WORKDIR.value) / "config.json").exists():
    raise FileNotFoundError(f"--sde_workdir={_SDE_WORKDIR.value!r} has no config.json; give a "
                            "trained SDE run directory")
  size = sde_tokenizer.run_config(_SDE_WORKDIR.value).model.encoder.image_size
  if _SOURCE.value == "annotations":
    source = AnnotationSource(_ANNOTATIONS.value, _IMAGE_DIR.value, image_size=size,
                              num_eval=_NUM_EVAL.value, views=_VIEWS.value,
                              min_scale=_MIN_SCALE.value, seed=_SEED.value,
                              max_pixels=_DATA.value.max_image_pixels)
  else:
    data = _DATA.value.copy_and_resolve_references()
    data.image_size = size
    source = DataSource(data, views=_VIEWS.value, seed=_SEED.value)
  manifest = tokenize(source, _SDE_WORKDIR.value, _OUT.value, step=_STEP.value,
                      batch_size=_BATCH_SIZE.value, shard_size=_SHARD_SIZE.value,
                      threads=_THREADS.value, process_index=_PROCESS_INDEX.value,
                      process_count=_PROCESS_COUNT.value)
  summary = {k: manifest[k] for k in ("complete", "units", "grid", "codebook_size", "sde_step")}
  if manifest["complete"]:
    summary["totals"] = manifest["totals"]
  print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["sde_workdir", "out"])
  app.run(lambda argv: cli.run(main, argv, PROG))
