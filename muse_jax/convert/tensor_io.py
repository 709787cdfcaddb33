"""Streaming tensor files: the one reader / writer every converter uses.

``TensorReader`` indexes safetensors files (single, sharded with
``*.index.json``, or a directory of them; a directory with two index files, or
an index naming a tensor or shard that is not there, raises ``ShardIndexError``)
and PyTorch pickles (``torch.save`` zip files and the pre-1.6 legacy format)
without torch: it records where each
tensor's bytes live and reads one tensor at a time with plain file reads (no
mmap, so nothing stays resident after a tensor is converted). The unpickler
only accepts the handful of globals a state dict needs.

``write_safetensors`` writes tensors one at a time from producer callables, so
an export never holds more than the tensor being written next to the source.

``iter_params`` reads a model's parameters from a reader through a name map, one
tensor at a time, checking every shape and naming the tensor on any mismatch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import struct
import zipfile
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


@dataclasses.dataclass(frozen=True)
class TensorLocation:
  """Where one tensor's elements live: a byte offset in a file plus an element view."""
  path: str
  offset: int                      # byte offset of element 0 of the storage
  dtype: np.dtype
  shape: tuple[int, ...]
  element_offset: int = 0          # torch storage_offset
  strides: tuple[int, ...] | None = None   # in elements; None = C-contiguous


class ShardIndexError(ValueError):
  """A sharded safetensors folder whose ``*.safetensors.index.json`` does not match its
  shards, or a folder with more than one index."""


class TensorReader:
  """Named tensors from safetensors / torch files, read one at a time."""

  def __init__(self, locations: Mapping[str, TensorLocation], source: str):
    self.locations = dict(locations)
    self.source = source

  def __contains__(self, name: str) -> bool:
    return name in self.locations

  def keys(self) -> list[str]:
    return list(self.locations)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._location(name).shape

  def dtype(self, name: str) -> np.dtype:
    return self._location(name).dtype

  def _location(self, name: str) -> TensorLocation:
    if name not in self.locations:
      raise KeyError(f"tensor {name!r} is not in {self.source}")
    return self.locations[name]

  def read(self, name: str) -> np.ndarray:
    loc = self._location(name)
    itemsize = loc.dtype.itemsize
    if loc.strides is None:
      count = int(np.prod(loc.shape, dtype=np.int64))
      span = count
    else:
      span = 1 + sum((n - 1) * s for n, s in zip(loc.shape, loc.strides)) if all(loc.shape) else 0
    buffer = bytearray(span * itemsize)
    with open(loc.path, "rb") as f:
      f.seek(loc.offset + loc.element_offset * itemsize)
      if f.readinto(buffer) != len(buffer):
        raise ValueError(f"tensor {name!r} is truncated in {loc.path}")
    flat = np.frombuffer(buffer, dtype=loc.dtype)
    if loc.strides is None:
      return flat.reshape(loc.shape)
    view = np.lib.stride_tricks.as_strided(
        flat, loc.shape, tuple(s * itemsize for s in loc.strides), writeable=False)
    return np.ascontiguousarray(view)


def open_tensors(path: str | os.PathLike) -> TensorReader:
  """A reader for a safetensors file / index / directory or a torch .pth / .bin file."""
  path = os.fspath(path)
  if os.path.isdir(path):
    indexes = sorted(n for n in os.listdir(path) if n.endswith(".safetensors.index.json"))
    if len(indexes) > 1:
      raise ShardIndexError(f"{path} has {len(indexes)} safetensors index files: "
                            f"{', '.join(indexes)}; keep the one that belongs to the model (or "
                            "pass its path instead of the folder)")
    if indexes:
      return _open_safetensors_index(os.path.join(path, indexes[0]))
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files or safetensors index in {path}")
    locations = {}
    for name in files:
      locations.update(_safetensors_locations(os.path.join(path, name)))
    return TensorReader(locations, path)
  if path.endswith(".index.json"):
    return _open_safetensors_index(path)
  if path.endswith(".safetensors"):
    return TensorReader(_safetensors_locations(path), path)
  return TensorReader(_torch_locations(path), path)


def _open_safetensors_index(index_path: str) -> TensorReader:
  with open(index_path) as f:
    weight_map = json.load(f)["weight_map"]
  folder = os.path.dirname(index_path)
  locations = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(folder, shard)
    if not os.path.exists(shard_path):
      listed = sorted(n for n, s in weight_map.items() if s == shard)
      raise ShardIndexError(f"{index_path} puts tensor {listed[0]!r} (and {len(listed) - 1} "
                            f"more) in {shard}, which is not in {folder}")
    for name, loc in _safetensors_locations(shard_path).items():
      if weight_map.get(name) == shard:
        locations[name] = loc
  missing = sorted(set(weight_map) - set(locations))
  if missing:
    raise ShardIndexError(
        f"{index_path} lists tensor {missing[0]!r} in {weight_map[missing[0]]}, which lacks it"
        + (f" ({len(missing)} such tensors: {missing[:5]})" if len(missing) > 1 else ""))
  return TensorReader(locations, index_path)


def _safetensors_locations(path: str) -> dict[str, TensorLocation]:
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  base = 8 + header_len
  locations = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {entry['dtype']}")
    start, _ = entry["data_offsets"]
    locations[name] = TensorLocation(path, base + start, SAFETENSORS_DTYPES[entry["dtype"]],
                                     tuple(entry["shape"]))
  return locations


@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _Storage
  element_offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict into _TensorRefs; refuses any other global."""

  _GLOBALS = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  }

  def __init__(self, file, storage_dtypes: dict[str, np.dtype]):
    super().__init__(file)
    self.storage_dtypes = storage_dtypes

  def find_class(self, module, name):
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return np.dtype(_TORCH_STORAGE_DTYPES[name])
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[(module, name)]
    raise pickle.UnpicklingError(
        f"refusing to unpickle {module}.{name}: only tensors and dicts of tensors are read")

  def persistent_load(self, pid):
    if pid[0] != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {pid[0]!r}")
    dtype, key = pid[1], str(pid[2])
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError("legacy storage views are not supported")
    self.storage_dtypes[key] = dtype
    return _Storage(key, dtype)


def _flatten(tree, prefix: str = "") -> Iterator[tuple[str, _TensorRef]]:
  if isinstance(tree, _TensorRef):
    yield prefix, tree
  elif isinstance(tree, Mapping):
    for key, value in tree.items():
      yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))


def _torch_locations(path: str) -> dict[str, TensorLocation]:
  storage_dtypes: dict[str, np.dtype] = {}
  if zipfile.is_zipfile(path):
    storage_offsets = {}
    with zipfile.ZipFile(path) as archive:
      pickle_name = next(n for n in archive.namelist()
                         if n.endswith("/data.pkl") or n == "data.pkl")
      prefix = pickle_name[: -len("data.pkl")]
      with archive.open(pickle_name) as f:
        tree = _StateDictUnpickler(f, storage_dtypes).load()
      with open(path, "rb") as raw:
        for info in archive.infolist():
          if not info.filename.startswith(prefix + "data/"):
            continue
          if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: compressed tensor data is not supported")
          raw.seek(info.header_offset + 26)
          name_len, extra_len = struct.unpack("<HH", raw.read(4))
          key = info.filename[len(prefix) + len("data/"):]
          storage_offsets[key] = info.header_offset + 30 + name_len + extra_len
  else:
    with open(path, "rb") as f:
      if pickle.load(f) != _LEGACY_MAGIC:
        raise ValueError(f"{path} is neither safetensors nor a torch.save file")
      pickle.load(f)  # protocol version
      pickle.load(f)  # system info
      tree = _StateDictUnpickler(f, storage_dtypes).load()
      storage_offsets = {}
      for key in pickle.load(f):
        (count,) = struct.unpack("<q", f.read(8))
        storage_offsets[key] = f.tell()
        f.seek(count * storage_dtypes[key].itemsize, os.SEEK_CUR)
  return {name: TensorLocation(path, storage_offsets[ref.storage.key], ref.storage.dtype,
                               ref.shape, ref.element_offset,
                               None if _is_contiguous(ref.shape, ref.strides) else ref.strides)
          for name, ref in _flatten(tree)}


def _is_contiguous(shape: Sequence[int], strides: Sequence[int]) -> bool:
  expected = 1
  for n, s in zip(reversed(shape), reversed(strides)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """A tensor to write: its name, shape, dtype, and a callable producing it on demand."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(out_dir: str | os.PathLike, tensors: Iterable[TensorSpec], *,
                      max_shard_bytes: int = 5 * 2**30, prefix: str = "model") -> list[str]:
  """Writes ``prefix.safetensors`` (or numbered shards + index), one tensor at a time.

  Returns the written file names.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  shards: list[list[TensorSpec]] = [[]]
  shard_bytes = 0
  for spec in tensors:
    if np.dtype(spec.dtype) not in _SAFETENSORS_NAMES:
      raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} has no safetensors name")
    if shards[-1] and shard_bytes + spec.nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(spec)
    shard_bytes += spec.nbytes
  if len(shards) == 1:
    names = [f"{prefix}.safetensors"]
  else:
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    _write_shard(os.path.join(out_dir, name), shard)
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(s.nbytes for shard in shards for s in shard)},
             "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
    with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  return names


def _write_shard(path: str, specs: Sequence[TensorSpec]) -> None:
  header = {"__metadata__": {"format": "pt"}}
  offset = 0
  for spec in specs:
    header[spec.name] = {"dtype": _SAFETENSORS_NAMES[np.dtype(spec.dtype)],
                         "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
    offset += spec.nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)   # keeps tensor data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for spec in specs:
      array = np.ascontiguousarray(spec.produce(), dtype=spec.dtype)
      if array.shape != tuple(spec.shape):
        raise ValueError(f"tensor {spec.name!r} was declared {tuple(spec.shape)} but produced "
                         f"{array.shape}")
      f.write(array.reshape(-1).view(np.uint8).data)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one of our parameters is stored in a foreign file (torch layouts)."""
  permutation: tuple[int, ...] | None = None   # ours = theirs.transpose(permutation)

  def to_ours(self, array: np.ndarray) -> np.ndarray:
    return array if self.permutation is None else np.ascontiguousarray(
        array.transpose(self.permutation))

  def to_theirs(self, array: np.ndarray) -> np.ndarray:
    return array if self.permutation is None else np.ascontiguousarray(
        array.transpose(np.argsort(self.permutation)))

  def their_shape(self, our_shape: Sequence[int]) -> tuple[int, ...]:
    if self.permutation is None:
      return tuple(our_shape)
    inverse = np.argsort(self.permutation)
    return tuple(our_shape[i] for i in inverse)


SAME = Layout()
LINEAR = Layout((1, 0))              # torch Linear [out, in] -> ours [in, out]
CONV2D = Layout((2, 3, 1, 0))        # torch OIHW -> ours HWIO

ParamPath = tuple
NameMap = Callable[[ParamPath], tuple[str, Layout]]


def iter_params(reader: TensorReader,
                targets: Mapping[ParamPath, tuple[tuple[int, ...], np.dtype]],
                name_map: NameMap) -> Iterator[tuple[ParamPath, np.ndarray]]:
  """Yields (path, array in our layout and dtype) for every target, one tensor at a time.

  All names and shapes are checked here, before any data is read, so a wrong
  checkpoint fails at once (not at the first ``next``).
  """
  missing = []
  for path, (shape, _) in targets.items():
    name, layout = name_map(path)
    if name not in reader:
      missing.append(name)
    elif reader.shape(name) != layout.their_shape(shape):
      raise ValueError(
          f"tensor {name!r} in {reader.source} has shape {reader.shape(name)}, but parameter "
          f"{'/'.join(map(str, path))} needs {layout.their_shape(shape)} "
          f"(stored as {tuple(shape)} here)")
  if missing:
    raise KeyError(f"{reader.source} lacks {len(missing)} tensor(s) the model needs: "
                   f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")

  def read_each():
    for path, (_, dtype) in targets.items():
      name, layout = name_map(path)
      yield path, layout.to_ours(reader.read(name)).astype(dtype, copy=False)
  return read_each()
