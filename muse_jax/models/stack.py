"""Transformer layer stacks, unrolled or scanned, and the named remat policies.

A stack is either an ``nnx.List`` of layers run by a Python loop (the unscanned
layout: XLA compiles every layer on its own) or one layer module whose parameters
carry a leading ``layers`` axis, run by ``jax.lax.scan`` (the scanned layout:
one layer body compiled once, so compile time no longer grows with depth).
A seed gives the same weights in both layouts (``build``), and ``to_scanned`` /
``to_unscanned`` convert between them exactly.

Every stack (the Qwen2 decoder, the SigLIP towers, the SDE semantic decoder)
is a module attribute named ``layers`` and runs through ``run``, which also
applies the remat policy to each layer. Tensor names (``muse_jax.weights``) follow:
``model/layers/3/mlp/up_proj/kernel`` unscanned is slice 3 of
``model/layers/mlp/up_proj/kernel`` scanned (``stacked_name`` / ``layer_name``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"   # logical name of the stacked axis (parallel/sharding.py rules)

# What a layer keeps for its backward pass (``jax.checkpoint`` policies); the
# layers name their attention and MLP outputs with ``checkpoint_name``.
ATTN_OUT, MLP_OUT = "attn_out", "mlp_out"
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,   # no remat: every intermediate is kept
    "full": jax.checkpoint_policies.nothing_saveable,   # keep only each layer's input
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,   # matmul outputs
    "save_attn_mlp_out": jax.checkpoint_policies.save_only_these_names(ATTN_OUT, MLP_OUT),
}

Stack = nnx.Module   # an nnx.List of layers, or one layer with stacked parameters


def check_policy(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {policy!r} is unknown; choose one of {tuple(REMAT_POLICIES)}")


def build(make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int, scan: bool,
          rngs: nnx.Rngs) -> Stack:
  """``depth`` layers ``make_layer(rngs)``, as a list or (``scan``) stacked.

  The scanned stack is not built layer by layer: the first layer is, and the rest
  come from one ``jax.vmap`` of ``make_layer`` over the layer index, so the
  initialiser's program holds two layers whatever the depth. Each vmapped layer
  gets its own ``Rngs`` whose stream counters start where the unrolled loop's
  would (an ``RngStream`` draws ``fold_in(key, count)`` and counts up), so both
  layouts draw the same keys and a seed gives the same weights.
  """
  if not scan:
    return nnx.List([make_layer(rngs) for _ in range(depth)])
  streams = dict(rngs.items())
  start = {name: stream.count[...] for name, stream in streams.items()}
  graphdef, first = nnx.split(make_layer(rngs))
  per_layer = {name: stream.count[...] - start[name] for name, stream in streams.items()}

  def layer_state(index):
    own = nnx.Rngs(**{name: stream.key[...] for name, stream in streams.items()})
    for name, stream in own.items():
      stream.count[...] = start[name] + index * per_layer[name]
    return nnx.split(make_layer(own))[1]

  rest = jax.vmap(layer_state)(jnp.arange(1, depth, dtype=jnp.uint32))
  for name, stream in streams.items():
    stream.count[...] = start[name] + depth * per_layer[name]
  stacked = jax.tree.map(lambda x, xs: jnp.concatenate([x[None], xs]), first, rest)
  return nnx.merge(graphdef, nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS_AXIS}))


def is_scanned(stack: Stack) -> bool:
  return not isinstance(stack, nnx.List)


def to_scanned(layers: Sequence[nnx.Module]) -> nnx.Module:
  """Layers of one structure -> one layer whose parameters are stacked on axis 0."""
  graphdef, _ = nnx.split(layers[0])
  states = [nnx.split(layer)[1] for layer in layers]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  return nnx.merge(graphdef, nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS_AXIS}))


def to_unscanned(stacked: nnx.Module) -> nnx.List:
  """The inverse of ``to_scanned``: one layer per slice of the stacked axis."""
  graphdef, state = nnx.split(stacked)
  state = nnx.spmd.remove_axis(state, 0, {nnx.PARTITION_NAME: LAYERS_AXIS})
  depth = jax.tree.leaves(state)[0].shape[0]
  return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
                   for i in range(depth)])


def run(stack: Stack, layer_fn: Callable[..., tuple[Any, Any]], carry: Any, xs: Any = None, *,
        remat_policy: str = "none") -> tuple[Any, Any]:
  """Threads ``carry`` through the layers: ``carry, y = layer_fn(layer, carry, x)``.

  ``xs`` holds each layer's own input (a KV cache entry): for a scanned stack a
  pytree with a leading layer axis (and the ys come back stacked the same way),
  for a list a sequence with one entry per layer (and the ys come back as a list).
  Each layer call is a ``jax.checkpoint`` with ``remat_policy`` unless it is "none".
  """
  check_policy(remat_policy)

  def call(graphdef, state, carry, x):
    return layer_fn(nnx.merge(graphdef, state), carry, x)

  if remat_policy != "none":
    # the optimisation barriers that keep XLA from merging the recomputation with the
    # forward pass are needed between unrolled layers only: a scan's backward loop cannot
    # reach the forward loop's values, and the barriers would constrain its scheduling
    call = jax.checkpoint(call, policy=REMAT_POLICIES[remat_policy], static_argnums=(0,),
                          prevent_cse=not is_scanned(stack))
  if is_scanned(stack):
    graphdef, state = nnx.split(stack)
    return jax.lax.scan(lambda c, s_x: call(graphdef, s_x[0], c, s_x[1]), carry, (state, xs))
  ys = []
  xs = [None] * len(stack) if xs is None else xs
  for layer, x in zip(stack, xs):
    graphdef, state = nnx.split(layer)
    carry, y = call(graphdef, state, carry, x)
    ys.append(y)
  return carry, ys


_LAYER = re.compile(r"(^|/)layers/(\d+)(?=/|$)")
_STACKED = re.compile(r"(^|/)layers(?=/(?!\d)|$)")


def stacked_name(name: str) -> tuple[str, int] | None:
  """A layer's tensor name -> (the scanned stack's tensor name, layer index); else None."""
  match = _LAYER.search(name)
  if match is None:
    return None
  return name[:match.start()] + match.group(1) + "layers" + name[match.end():], int(match.group(2))


def is_stacked_name(name: str) -> bool:
  """Whether ``name`` is a scanned stack's tensor (``.../layers/<not a number>/...``)."""
  return _STACKED.search(name) is not None


def layer_name(name: str, layer: int) -> str:
  """The inverse of ``stacked_name``: slice ``layer`` of the stacked tensor ``name``."""
  return _STACKED.sub(lambda m: f"{m.group(1)}layers/{layer}", name, count=1)
