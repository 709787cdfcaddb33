"""The one pretrained-weights format, written tensor by tensor and loaded sharded.

Every converted set of weights (a decoder LLM, a SigLIP tower, LPIPS) is a
directory:

  DIR/weights.json      the index: {"format": "muse_jax.weights/1",
                        "tensors": {name: {"shape": [...], "dtype": "bfloat16"}},
                        "metadata": {...}}  (what the writer wants to keep: the
                        model config, the MUSE-VL vocabulary layout, the source
                        Hugging Face config, ...)
  DIR/tensors/<name>/   one zarr v3 array per tensor: a single uncompressed file
                        ("shard" in zarr's terms) whose index locates chunks of
                        at most ``CHUNK_BYTES``

A tensor's name is its parameter path joined by "/" (``model/layers/3/mlp/
up_proj/kernel``), the same path ``load_pretrained`` derives from the pytree it
fills. All I/O goes through tensorstore (arrays) and ``etils.epath`` (the index),
so DIR may be a local path or ``gs://bucket/...``.

``Writer`` writes one tensor at a time and the index last: a directory without
``weights.json`` is an unfinished write, never read. ``load_pretrained(path,
abstract)`` fills a pytree of ``jax.ShapeDtypeStruct`` (or nnx Variables holding
them) that carry the run's shardings: for each tensor it reads, device by device,
only the slice that device holds and puts it there at once, so a host never
holds more than one device's shard of one tensor beyond what is already on the
devices (replicated tensors are read once per host). Names, shapes and dtypes are
all checked before any data is read; a mismatch names the tensor.

``load_run_params(workdir, abstract)`` is the other half of "no trainer
internals": it restores chosen subtrees (e.g. ``params`` and ``frozen``) of a
training run's latest checkpoint, with shardings, without building optimisers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from muse_jax.train import checkpoint as checkpoint_lib

INDEX = "weights.json"
TENSORS = "tensors"
FORMAT = "muse_jax.weights/1"
# Reading a device's slice reads (by byte range) only the chunks it overlaps, and
# each chunk whole: small chunks keep both the host memory beyond the slice and the
# bytes read for it small, whichever axis the run shards.
CHUNK_BYTES = 2**20


class WeightsMismatchError(ValueError):
  """Stored weights that do not fit the tree they are loaded into."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  shape: tuple[int, ...]
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Index:
  path: str
  tensors: dict[str, TensorInfo]
  metadata: dict[str, Any]


def tensor_name(path: Iterable[Any]) -> str:
  """A parameter path (tuple of keys, or jax key path entries) -> the tensor's name."""
  parts = []
  for key in path:
    key = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
    parts.append(str(key))
  return "/".join(parts)


def _kvstore(path: epath.Path) -> dict[str, Any]:
  text = str(path)
  if text.startswith("gs://"):
    bucket, _, key = text[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/"}
  return {"driver": "file", "path": str(path.resolve()) + "/"}


def _array_spec(root: epath.Path, name: str) -> dict[str, Any]:
  return {"driver": "zarr3", "kvstore": _kvstore(root / TENSORS / name)}


def chunk_shape(shape: tuple[int, ...], itemsize: int, limit: int | None = None) -> list[int]:
  """Halves the largest dimension until a chunk holds at most ``limit`` bytes
  (default ``CHUNK_BYTES``)."""
  limit = CHUNK_BYTES if limit is None else limit
  chunk = [max(1, n) for n in shape]
  while math.prod(chunk) * itemsize > limit and max(chunk) > 1:
    i = int(np.argmax(chunk))
    chunk[i] = -(-chunk[i] // 2)
  return chunk


class Writer:
  """Writes tensors one at a time into a new weights directory; the index on ``close``.

    with weights.Writer(out_dir, metadata={"config": ...}) as w:
      for name, array in tensors:
        w.write(name, array)
  """

  def __init__(self, path: str | epath.PathLike, metadata: dict[str, Any] | None = None):
    self.root = epath.Path(path)
    if (self.root / INDEX).exists():
      raise FileExistsError(f"{self.root} already holds weights ({INDEX}); choose a new directory")
    self.root.mkdir(parents=True, exist_ok=True)
    self.metadata = dict(metadata or {})
    self.tensors: dict[str, TensorInfo] = {}

  def write(self, name: str, array: Any) -> None:
    """Writes one tensor (numpy or a fully addressable jax array)."""
    if name in self.tensors:
      raise ValueError(f"tensor {name} written twice to {self.root}")
    array = np.asarray(array)
    leftover = self.root / TENSORS / name
    if leftover.exists():           # from a conversion into this directory that did not finish
      leftover.rmtree()
    store = ts.open(_array_spec(self.root, name), create=True,
                    dtype=ts.dtype(array.dtype.name), shape=array.shape,
                    chunk_layout=ts.ChunkLayout(
                        read_chunk_shape=chunk_shape(array.shape, array.dtype.itemsize),
                        write_chunk_shape=[max(1, n) for n in array.shape])).result()
    store.write(array).result()
    self.tensors[name] = TensorInfo(tuple(array.shape), array.dtype)

  def close(self) -> None:
    index = {"format": FORMAT, "metadata": self.metadata,
             "tensors": {n: {"shape": list(t.shape), "dtype": t.dtype.name}
                         for n, t in self.tensors.items()}}
    (self.root / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))

  def __enter__(self) -> Writer:
    return self

  def __exit__(self, exc_type, *unused) -> None:
    if exc_type is None:
      self.close()


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """(tensor name, leaf) of a pytree whose leaves are arrays / shape structs / nnx Variables."""
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return [(tensor_name(path), leaf) for path, leaf in flat]


def save(path: str | epath.PathLike, tree: Any, metadata: dict[str, Any] | None = None) -> None:
  """Writes every leaf of ``tree`` (e.g. ``nnx.state(module, nnx.Param)``), one at a time."""
  with Writer(path, metadata) as writer:
    for name, leaf in named_leaves(tree):
      writer.write(name, leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)


def read_index(path: str | epath.PathLike) -> Index:
  root = epath.Path(path)
  if not (root / INDEX).exists():
    raise FileNotFoundError(
        f"no {INDEX} in {root}: not converted weights (write them with `python -m "
        "muse_jax.convert`), or a conversion that did not finish")
  index = json.loads((root / INDEX).read_text())
  if index.get("format") != FORMAT:
    raise ValueError(f"{root / INDEX} has format {index.get('format')!r}; this code reads {FORMAT}")
  tensors = {n: TensorInfo(tuple(t["shape"]), np.dtype(_np_dtype(t["dtype"])))
             for n, t in index["tensors"].items()}
  return Index(str(root), tensors, index.get("metadata", {}))


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(jax.numpy.dtype(name))


def _open(root: epath.Path, name: str) -> ts.TensorStore:
  return ts.open(_array_spec(root, name), open=True, read=True).result()


def read(path: str | epath.PathLike, name: str) -> np.ndarray:
  """One whole tensor as a numpy array (export streams this way)."""
  info = read_index(path).tensors.get(name)
  if info is None:
    raise KeyError(f"tensor {name} is not in {path}")
  return _open(epath.Path(path), name).read().result()


def check(index: Index, targets: dict[str, Any], *, cast: bool = False) -> None:
  """Raises ``WeightsMismatchError`` naming the first tensor that does not fit."""
  missing = [n for n in targets if n not in index.tensors]
  if missing:
    raise WeightsMismatchError(
        f"{index.path} lacks tensor {missing[0]} (shape {tuple(targets[missing[0]].shape)}) "
        f"that the model needs ({len(missing)} missing; it holds {len(index.tensors)} tensors)")
  extra = [n for n in index.tensors if n not in targets]
  if extra:
    raise WeightsMismatchError(
        f"{index.path} holds tensor {extra[0]} (shape {index.tensors[extra[0]].shape}) that the "
        f"model does not have ({len(extra)} extra): weights of a different model?")
  for name, target in targets.items():
    info = index.tensors[name]
    if info.shape != tuple(target.shape):
      raise WeightsMismatchError(
          f"tensor {name} has shape {info.shape} in {index.path} but the model expects "
          f"{tuple(target.shape)}: the weights were converted from a model of another size")
    if not cast and info.dtype != np.dtype(target.dtype):
      raise WeightsMismatchError(
          f"tensor {name} is {info.dtype.name} in {index.path} but the model expects "
          f"{np.dtype(target.dtype).name}: convert with --dtype={np.dtype(target.dtype).name} "
          "or load with cast=True")


def _load_leaf(root: epath.Path, name: str, target: Any) -> jax.Array:
  """One tensor onto its sharding: each addressable device gets only its slice."""
  shape, dtype = tuple(target.shape), np.dtype(target.dtype)
  sharding = target.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  store = _open(root, name)
  by_slice: dict[tuple, list] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    by_slice.setdefault(key, [index, []])[1].append(device)
  shards = []
  for index, devices in by_slice.values():
    # the host copy is dropped before the next slice is read
    host = store[index].read().result().astype(dtype, copy=False)
    shards.extend(jax.device_put(host, device) for device in devices)
    del host
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def load_pretrained(path: str | epath.PathLike, abstract: Any, *, cast: bool = False) -> Any:
  """``abstract`` with every leaf read from the weights at ``path``, onto its sharding.

  ``abstract`` is a pytree of ``jax.ShapeDtypeStruct`` (or nnx Variables holding
  them), e.g. ``run.abstract_state["params"]``; leaves without a sharding go to
  the first local device. ``cast`` converts stored dtypes to the target's (e.g.
  bfloat16 weights into float32 master parameters) instead of refusing.
  """
  index = read_index(path)
  leaves = named_leaves(abstract)
  targets = {name: (leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)
             for name, leaf in leaves}
  check(index, targets, cast=cast)
  root = epath.Path(path)
  loaded = [_load_leaf(root, name, targets[name]) for name, _ in leaves]
  treedef = jax.tree_util.tree_structure(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return jax.tree_util.tree_unflatten(treedef, [
      leaf.replace(array) if isinstance(leaf, nnx.Variable) else array
      for (_, leaf), array in zip(leaves, loaded)])


def checkpoint_steps_dir(workdir: str | epath.PathLike) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def load_run_params(workdir: str | epath.PathLike, abstract: dict[str, Any],
                    step: int | None = None) -> tuple[dict[str, Any], int]:
  """(the subtrees named by ``abstract``'s keys, step) from a training run's checkpoint.

  A partial Orbax restore of the run's ``state`` item: only those subtrees (e.g.
  ``{"params": ..., "frozen": ...}``) are read, onto the shardings their abstract
  leaves carry; optimiser moments and the data iterator are never touched.
  """
  directory = checkpoint_steps_dir(workdir)
  if step is None:
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True)) as manager:
      step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  state_dir = directory / str(step) / "state"
  if not state_dir.exists():
    raise FileNotFoundError(f"no checkpoint of step {step} under {directory} ({state_dir})")
  checkpointer = ocp.PyTreeCheckpointer()
  found = checkpointer.metadata(state_dir).item_metadata.tree
  absent = [k for k in abstract if k not in found]
  if absent:
    raise WeightsMismatchError(f"{state_dir} has no {absent[0]!r} subtree (it has "
                               f"{sorted(found)})")
  checkpoint_lib.check_shapes(abstract, {k: found[k] for k in abstract}, str(state_dir))
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))
  return restored, step
