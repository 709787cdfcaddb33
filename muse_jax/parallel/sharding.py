"""Device meshes and the logical-axis rules that place every array on them.

Models annotate parameters with logical names (``embed``, ``mlp``, ``heads``,
...; see ``muse_jax.models.layers``). ``DEFAULT_RULES`` maps each logical name to
mesh axes of the ``(data, fsdp, tensor)`` mesh:

* ``data``   pure data parallelism: parameters replicated, batch split;
* ``fsdp``   ZeRO-3 style: batch split *and* parameters/optimiser state split
             along their ``embed`` (or conv output) dimension, gathered per layer;
* ``tensor`` Megatron-style: attention heads and MLP hidden units split.

Which of these a run uses is only the mesh shape in the config. A dimension that
the assigned mesh axes do not divide evenly is replicated instead (e.g. a 1152
wide SigLIP on fsdp=256), so any mesh works for any model.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from muse_jax.models import layers

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")      # the batch dimension of activations and inputs

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("positions", None),
    ("norm", None),
    ("codebook", None),
    ("code_dim", None),
    # the stacked axis of scanned layers (models/stack.py): whole, so that each scan
    # step reads its layer locally; a rule naming a mesh axis here shards the stack
    ("layers", None),
    # activations (``layers.constrain``): split over the batch, whole otherwise, so
    # that tensor-parallel blocks all-reduce back into a replicated residual stream
    ("seq", None),
    ("act_embed", None),
    ("spatial", None),
    ("act_channels", None),
)


class MeshError(ValueError):
  """A mesh shape that does not fit the devices."""


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """``config.mesh``: ICI sizes per axis (-1 = all remaining devices) and DCN sizes
  (slices / nodes) for hybrid multi-slice meshes."""
  return ml_collections.ConfigDict(dict(
      data=data, fsdp=fsdp, tensor=tensor, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))


def _fill(sizes: list[int], total: int, what: str) -> list[int]:
  free = [i for i, s in enumerate(sizes) if s == -1]
  known = math.prod(s for s in sizes if s != -1)
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"config.mesh: {what} sizes {tuple(sizes)} may hold at most one -1 and "
                    "otherwise positive sizes")
  if free:
    if total % known:
      raise MeshError(f"config.mesh: {what} sizes {tuple(sizes)} cannot fill {total} devices "
                      f"({total} is not a multiple of {known})")
    sizes[free[0]] = total // known
  if math.prod(sizes) != total:
    raise MeshError(f"config.mesh: {what} mesh {dict(zip(MESH_AXES, sizes))} needs "
                    f"{math.prod(sizes)} devices but there are {total}; change the sizes so "
                    f"their product is {total}, or set one of them to -1")
  return sizes


def make_mesh(c: ml_collections.ConfigDict | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of ``config.mesh`` over ``devices`` (default: all)."""
  c = c or mesh_config()
  devices = list(jax.devices() if devices is None else devices)
  dcn = [c.get(f"dcn_{a}", 1) for a in MESH_AXES]
  num_slices = math.prod(dcn)
  if num_slices > 1:
    per_slice = len(devices) // num_slices
    ici = _fill([c[a] for a in MESH_AXES], per_slice, "per-slice (ICI)")
    _fill(list(dcn), num_slices, "across slices (DCN)")
    from jax.experimental import mesh_utils
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  else:
    sizes = _fill([c[a] for a in MESH_AXES], len(devices), "device")
    try:
      from jax.experimental import mesh_utils
      array = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (AssertionError, NotImplementedError, ValueError) as e:
      # CPU devices have no topology, any order is as good; on TPU / GPU the list order
      # may put an axis's collectives on slower links, so say so
      if devices[0].platform != "cpu":
        logging.warning("mesh %s: no topology-aware layout of these %s devices (%s); using "
                        "them in list order", dict(zip(MESH_AXES, sizes)), devices[0].platform, e)
      array = np.asarray(devices).reshape(sizes)
  return Mesh(array, MESH_AXES)


def logical_to_mesh(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> P:
  """PartitionSpec for an array with logical axis ``names`` and ``shape`` on ``mesh``."""
  if not names:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree of nnx Variables (or their abstract shapes) and arrays.

  Variables are placed by their ``out_sharding`` logical names; anything else
  (step counters, optimiser counts) is replicated. The result is a prefix tree
  usable as jit in/out shardings and as Orbax restore targets.
  """
  def place(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding")
      return NamedSharding(mesh, logical_to_mesh(names, x.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Context under which a step is traced so that ``layers.constrain`` pins the
  models' block-boundary activations on ``mesh`` by ``rules``."""
  return layers.activation_sharding(
      lambda names, shape: NamedSharding(mesh, logical_to_mesh(names, shape, mesh, rules)))


def jit_sharded(fn, mesh: Mesh, rules: Rules = DEFAULT_RULES, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)`` with ``fn`` traced under ``activation_sharding``:
  how every trainer compiles its steps."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)
  return jax.jit(traced, **jit_kwargs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Inputs split along their leading (batch) dimension over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's slice of the batch -> the global array (each host feeds its own part)."""
  return jax.make_array_from_process_local_data(sharding, local)


def with_shardings(tree: Any, placements: Any) -> Any:
  """Abstract state (from ``jax.eval_shape``) whose leaves carry the shardings of
  ``placements`` (from ``shardings``): the restore target that lets Orbax read a
  checkpoint onto any mesh, and the arguments of ahead-of-time compiles."""
  def attach(x, placement):
    abstract = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement)
    return x.replace(abstract) if isinstance(x, nnx.Variable) else abstract
  return jax.tree.map(attach, tree, placements, is_leaf=lambda x: isinstance(x, nnx.Variable))
