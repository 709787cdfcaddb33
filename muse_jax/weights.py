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

Layer stacks come in two layouts (``muse_jax.models.stack``): one tensor per
layer (``model/layers/3/mlp/up_proj/kernel``) or one stacked tensor per stack
(``model/layers/mlp/up_proj/kernel`` [layers, ...]). Reading resolves either
against the other (``_sources``): a scanned model loads unscanned weights, each
device reading its layers' slices, and the other way round; ``Writer.put`` streams
layer tensors into their slices of stacked ones, and ``convert_layout`` rewrites a
directory in the other layout.

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

from muse_jax.models import stack
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
    self._stacks: dict[str, tuple[ts.TensorStore, set[int]]] = {}   # stacked: layers written

  def _create(self, name: str, shape: tuple[int, ...], dtype: np.dtype,
              per_layer: bool) -> ts.TensorStore:
    if name in self.tensors:
      raise ValueError(f"tensor {name} written twice to {self.root}")
    leftover = self.root / TENSORS / name
    if leftover.exists():           # from a conversion into this directory that did not finish
      leftover.rmtree()
    # a stacked tensor is one file per layer, so that each layer is written on its own
    inner = shape[1:] if per_layer else shape
    read_chunk = chunk_shape(inner, dtype.itemsize)
    write_chunk = [max(1, n) for n in inner]
    if per_layer:
      read_chunk, write_chunk = [1, *read_chunk], [1, *write_chunk]
    store = ts.open(_array_spec(self.root, name), create=True, dtype=ts.dtype(dtype.name),
                    shape=shape, chunk_layout=ts.ChunkLayout(
                        read_chunk_shape=read_chunk, write_chunk_shape=write_chunk)).result()
    self.tensors[name] = TensorInfo(tuple(shape), dtype)
    return store

  def write(self, name: str, array: Any) -> None:
    """Writes one tensor (numpy or a fully addressable jax array)."""
    array = np.asarray(array)
    self._create(name, array.shape, array.dtype, per_layer=False).write(array).result()

  def put(self, name: str, array: Any, scan_depth: int | None = None) -> None:
    """Writes a parameter in the directory's layout: with ``scan_depth`` (the stack's
    depth), a layer's tensor (``.../layers/3/...``) goes into its slice of the stacked
    tensor, created at its first layer; anything else is written whole."""
    layer = stack.stacked_name(name) if scan_depth is not None else None
    if layer is None:
      self.write(name, array)
      return
    name, index = layer
    array = np.asarray(array)
    if name not in self._stacks:
      store = self._create(name, (scan_depth, *array.shape), array.dtype, per_layer=True)
      self._stacks[name] = (store, set())
    store, done = self._stacks[name]
    store[index].write(array).result()
    done.add(index)

  def close(self) -> None:
    for name, (store, done) in self._stacks.items():
      if len(done) != store.shape[0]:
        raise ValueError(f"stacked tensor {name} in {self.root} got layers {sorted(done)} of "
                         f"{store.shape[0]}")
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


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where a wanted tensor is stored: one tensor whole, one layer (``layer``) of a stored
  stacked tensor, or (``stacked``) the stored layer tensors ``names`` stacked."""
  names: tuple[str, ...]
  info: TensorInfo
  layer: int | None = None
  stacked: bool = False

  def read(self, root: epath.Path, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The region ``index`` (default: all) of the wanted tensor."""
    index = tuple(slice(None) for _ in self.info.shape) if index is None else tuple(index)
    if self.stacked:
      layers = range(len(self.names))[index[0]]
      return np.stack([_open(root, self.names[i])[index[1:]].read().result() for i in layers])
    store = _open(root, self.names[0])
    return store[((self.layer,) if self.layer is not None else ()) + index].read().result()


def _sources(index: Index, wanted: Iterable[str]) -> dict[str, _Source]:
  """The stored source of each wanted tensor that has one, in either stack layout."""
  stored = index.tensors
  layers: dict[str, dict[int, str]] = {}
  for name in stored:
    found = stack.stacked_name(name)
    if found is not None:
      layers.setdefault(found[0], {})[found[1]] = name
  out = {}
  for name in wanted:
    found = stack.stacked_name(name)
    if name in stored:
      out[name] = _Source((name,), stored[name])
    elif name in layers and sorted(layers[name]) == list(range(len(layers[name]))):
      names = tuple(layers[name][i] for i in range(len(layers[name])))
      first = stored[names[0]]
      out[name] = _Source(names, TensorInfo((len(names), *first.shape), first.dtype),
                          stacked=True)
    elif found is not None and found[0] in stored and found[1] < stored[found[0]].shape[0]:
      info = stored[found[0]]
      out[name] = _Source((found[0],), TensorInfo(info.shape[1:], info.dtype), layer=found[1])
  return out


def read(path: str | epath.PathLike, name: str) -> np.ndarray:
  """One whole tensor as a numpy array, in either stack layout (export streams this way)."""
  source = _sources(read_index(path), [name]).get(name)
  if source is None:
    raise KeyError(f"tensor {name} is not in {path}")
  return source.read(epath.Path(path))


def convert_layout(src: str | epath.PathLike, dst: str | epath.PathLike, scan: bool) -> None:
  """Rewrites the weights at ``src`` into ``dst`` with every layer stack scanned
  (``scan``) or one tensor per layer, a layer at a time; the stored model config's
  ``scan_layers`` follows."""
  index = read_index(src)
  metadata = json.loads(json.dumps(index.metadata))
  if "scan_layers" in metadata.get("config", {}):
    metadata["config"]["scan_layers"] = scan
  depths: dict[str, int] = {}
  for name in index.tensors:
    found = stack.stacked_name(name)
    if found is not None:
      depths[found[0]] = depths.get(found[0], 0) + 1
  with Writer(dst, metadata) as writer:
    for name, info in index.tensors.items():
      found = stack.stacked_name(name)
      if scan and found is not None:
        writer.put(name, read(src, name), scan_depth=depths[found[0]])
      elif not scan and stack.is_stacked_name(name):
        for layer in range(info.shape[0]):
          writer.write(stack.layer_name(name, layer), read(src, stack.layer_name(name, layer)))
      else:
        writer.write(name, read(src, name))


def check(index: Index, targets: dict[str, Any], *, cast: bool = False) -> None:
  """Raises ``WeightsMismatchError`` naming the first tensor that does not fit."""
  sources = _sources(index, targets)
  missing = [n for n in targets if n not in sources]
  if missing:
    raise WeightsMismatchError(
        f"{index.path} lacks tensor {missing[0]} (shape {tuple(targets[missing[0]].shape)}) "
        f"that the model needs ({len(missing)} missing; it holds {len(index.tensors)} tensors)")
  used = {n for source in sources.values() for n in source.names}
  extra = [n for n in index.tensors if n not in used]
  if extra:
    raise WeightsMismatchError(
        f"{index.path} holds tensor {extra[0]} (shape {index.tensors[extra[0]].shape}) that the "
        f"model does not have ({len(extra)} extra): weights of a different model?")
  for name, target in targets.items():
    info = sources[name].info
    if info.shape != tuple(target.shape):
      raise WeightsMismatchError(
          f"tensor {name} has shape {info.shape} in {index.path} but the model expects "
          f"{tuple(target.shape)}: the weights were converted from a model of another size")
    if not cast and info.dtype != np.dtype(target.dtype):
      raise WeightsMismatchError(
          f"tensor {name} is {info.dtype.name} in {index.path} but the model expects "
          f"{np.dtype(target.dtype).name}: convert with --dtype={np.dtype(target.dtype).name} "
          "or load with cast=True")


def _load_leaf(root: epath.Path, source: _Source, target: Any) -> jax.Array:
  """One tensor onto its sharding: each addressable device gets only its slice."""
  shape, dtype = tuple(target.shape), np.dtype(target.dtype)
  sharding = target.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  by_slice: dict[tuple, list] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    by_slice.setdefault(key, [index, []])[1].append(device)
  shards = []
  for index, devices in by_slice.values():
    # the host copy is dropped before the next slice is read
    host = source.read(root, index).astype(dtype, copy=False)
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
  sources = _sources(index, targets)
  loaded = [_load_leaf(root, sources[name], targets[name]) for name, _ in leaves]
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
