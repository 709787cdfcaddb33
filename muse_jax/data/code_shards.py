"""SDE code shards: the images of a dataset as codes, written once by
``python -m muse_jax.tokenize_images`` and read by the VLM stages.

A shard directory holds

  manifest.json                          what was encoded and by which tokenizer (below)
  {split}-{unit:05d}-of-{units:05d}.array_record       one work unit's examples
  {split}-{unit:05d}-of-{units:05d}.array_record.json  its counts (examples, skipped)

for the splits ``train`` and ``eval`` (held-out images, centre crops only). A
record is one example, msgpack (``flax.serialization``) of a dict ``{"key": str,
"codes": int32 [h, w], "caption": str, "conversations": [{"from", "value"}, ...]}``
plus ``"label": int`` for ImageNet: exactly the example dicts of
``muse_jax.data.image_codes`` that ``muse_jax.data.sequences`` formats read, so the
VLM stage is the same whichever way its codes were made. msgpack keeps the int32
array, the strings and the nested lists without a schema, and reads back with
the flax already installed.

``manifest.json`` names the tokenizer (``sde_workdir``, ``sde_step``,
``codebook_size``, the code ``grid``, ``image_size``), the source and the crops, the
unit count of each split, and once every unit is written ``complete: true`` with
each split's totals. A reader refuses a directory that is not complete or whose
tokenizer is not the one the stage decodes with (``check_tokenizer``).
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np
from etils import epath
from flax import serialization

from muse_jax.data.config import DataConfigError

MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("eval", "train")


def canonical(path: str) -> str:
  """Local paths absolute (so two spellings of one run compare equal); URLs kept."""
  return path if "://" in path else os.path.abspath(path)


def shard_name(split: str, unit: int, units: int) -> str:
  return f"{split}-{unit:05d}-of-{units:05d}.array_record"


def counts_name(shard: str) -> str:
  """The sidecar holding a shard's counts, written before the shard appears."""
  return shard + ".json"


def encode_example(example: dict) -> bytes:
  return serialization.msgpack_serialize(
      {**example, "codes": np.asarray(example["codes"], np.int32)})


def decode_example(raw: bytes) -> dict:
  return serialization.msgpack_restore(raw)


def read_manifest(directory: str, field: str = "code_shards") -> dict:
  """A complete shard directory's manifest; DataConfigError naming ``config.data.field``
  when there is none or its job has not finished."""
  path = epath.Path(directory) / MANIFEST
  fix = ("run python -m muse_jax.tokenize_images --out=DIR (again, with the same flags, "
         "to finish it)")
  if not path.exists():
    raise DataConfigError(f"config.data.{field}={directory!r} holds no {MANIFEST} "
                          f"(no code shards); {fix}")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise DataConfigError(f"config.data.{field}={directory!r} has shard format "
                          f"{manifest.get('format')!r}, this reader reads {FORMAT}; {fix}")
  if not manifest.get("complete"):
    done = sum(1 for split in SPLITS for unit in range(manifest["units"][split])
               if (epath.Path(directory) / shard_name(split, unit,
                                                      manifest["units"][split])).exists())
    raise DataConfigError(f"config.data.{field}={directory!r} is incomplete ({done} of "
                          f"{sum(manifest['units'].values())} shards written); {fix}")
  return manifest


def check_tokenizer(manifest: dict, directory: str, *, sde_workdir: str, sde_step: int,
                    num_visual: int) -> None:
  """Refuses shards encoded by another tokenizer than the stage's (another run, another
  checkpoint of it, or another codebook size): their ids would mean other images."""
  ours = (canonical(sde_workdir), sde_step)
  theirs = (manifest["sde_workdir"], manifest["sde_step"])
  if ours != theirs:
    raise DataConfigError(
        f"config.data.code_shards={directory!r} was encoded by the SDE run {theirs[0]} at "
        f"step {theirs[1]}, but config.sde_workdir is {ours[0]} at step {ours[1]}; give "
        "that run as --config.sde_workdir (or leave it empty), or tokenize again with this one")
  if manifest["codebook_size"] != num_visual:
    raise DataConfigError(
        f"config.data.code_shards={directory!r} holds codes of a {manifest['codebook_size']}"
        f"-entry codebook, but config.vocab.num_visual is {num_visual}; set "
        f"--config.vocab.num_visual={manifest['codebook_size']}")


def shard_files(directory: str, manifest: dict, split: str) -> list[str]:
  units = manifest["units"][split]
  return [os.fspath(epath.Path(directory) / shard_name(split, u, units)) for u in range(units)]


def examples(directory: str, manifest: dict, split: str) -> grain.MapDataset:
  """A split's examples in unit order, read lazily (random access: every training
  process draws its own share through ``pipeline.EndlessShuffle``)."""
  files = shard_files(directory, manifest, split)
  if not files:
    return grain.MapDataset.source([])
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files)).map(decode_example)


def skipped(manifest: dict, split: str) -> dict[str, int]:
  """The split's images the job skipped, as ``data/skipped_<reason>`` counters."""
  return {f"data/skipped_{reason}": n
          for reason, n in manifest["totals"][split]["skipped"].items()}
