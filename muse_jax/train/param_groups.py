"""Parameter groups: parts of the decoder frozen or trained at their own learning rate.

``config.param_groups`` maps a group name to ``{pattern, lr_scale, rows}``:

- ``pattern``: a regular expression searched in each parameter's name
  (``model/layers/3/mlp/up_proj/kernel``, ``model/embed_tokens/embedding``,
  ``lm_head/kernel``: the names of ``weights.named_leaves``);
- ``lr_scale``: the group's learning rate over the schedule's (0 freezes it);
- ``rows``: ``"all"``, or ``"new"`` for the vocabulary rows MUSE-VL adds to the
  base model (visual ids, ``<soi>``/``<eoi>``: ids >= ``vocab.text_size``) of a
  tensor with a vocabulary axis (embedding, LM head). The base rows of such a
  tensor then fall to the next group that matches, or to the default.

The first group whose pattern matches (and, for ``rows="new"``, the new rows)
decides; everything else trains at ``config.param_groups_default_lr_scale``.
Patterns read the unrolled names in either layout: a scanned stack's tensor
(``model/layers/mlp/up_proj/kernel``, layers stacked on axis 0) is matched one
layer at a time as ``model/layers/<i>/mlp/up_proj/kernel``, so ``layers/3/``
freezes slice 3 of it.
"Train only the new rows first" is a default of 0 and one group
``{pattern: "embed_tokens|lm_head", rows: "new", lr_scale: 1}``; the next stage
starts from that run (``init_from``) with no groups.

A frozen part gets no gradient: its gradients are zeroed before clipping (they
do not count in the global norm), Adam's moments stay zero, and its update,
weight decay included, is exactly zero, so its values do not move at all.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from muse_jax import config_lib
from muse_jax import weights
from muse_jax.models import stack

ROWS = ("all", "new")


def unrolled_names(name: str, shape: tuple[int, ...]) -> list[str]:
  """The names patterns see for a tensor: one per layer of a scanned stack's tensor."""
  if stack.is_stacked_name(name):
    return [stack.layer_name(name, layer) for layer in range(shape[0])]
  return [name]


def validate(c: ml_collections.ConfigDict, param_names: list[str]) -> None:
  """ConfigError for a group that cannot apply: a bad pattern, scale or rows value, or a
  pattern that matches no parameter (a typo would otherwise train everything).
  ``param_names``: the unrolled names (``unrolled_names``)."""
  config_lib.check(c.param_groups_default_lr_scale >= 0, "param_groups_default_lr_scale",
                   f"{c.param_groups_default_lr_scale}", "use 0 (frozen) or a positive scale")
  for name, group in c.param_groups.items():
    field = f"param_groups.{name}"
    config_lib.check(set(group) <= {"pattern", "lr_scale", "rows"} and "pattern" in group,
                     field, f"has the fields {sorted(group)}",
                     "give pattern (a regex), and optionally lr_scale and rows")
    try:
      pattern = re.compile(group.pattern)
    except re.error as e:
      raise config_lib.ConfigError(
          f"config.{field}.pattern: {group.pattern!r} is not a regular expression ({e}); "
          "fix it") from None
    config_lib.check(group.get("lr_scale", 1.0) >= 0, f"{field}.lr_scale",
                     f"{group.get('lr_scale')}", "use 0 (frozen) or a positive scale")
    config_lib.check(group.get("rows", "all") in ROWS, f"{field}.rows",
                     f"{group.get('rows')!r} is unknown", f"use one of {ROWS}")
    config_lib.check(any(pattern.search(n) for n in param_names), f"{field}.pattern",
                     f"{group.pattern!r} matches no parameter",
                     f"match names such as {param_names[0]!r} or {param_names[-1]!r}")


def scales(params: Any, c: ml_collections.ConfigDict, vocab_size: int,
           text_size: int) -> Any:
  """A tree like ``params`` of learning-rate scales: float32 scalars, or for a tensor whose
  vocabulary rows split between groups, an array broadcasting along its vocabulary axis.
  Built from iota inside a jitted step, so no [vocab] constant is stored."""
  groups = [(re.compile(g.pattern), float(g.get("lr_scale", 1.0)), g.get("rows", "all"))
            for g in c.param_groups.values()]
  default = float(c.param_groups_default_lr_scale)

  def tensor_scale(name, shape):
    vocab_axes = [i for i, size in enumerate(shape) if size == vocab_size]
    new_rows = None
    if len(vocab_axes) == 1:
      axis = vocab_axes[0]
      rows_shape = [1] * len(shape)
      rows_shape[axis] = vocab_size
      new_rows = jax.lax.broadcasted_iota(jnp.int32, rows_shape, axis) >= text_size
    # walk the groups backwards so that the first match is applied last and wins; a float
    # until a vocabulary split makes it an array
    scale = default
    for pattern, lr_scale, rows in reversed(groups):
      if not pattern.search(name):
        continue
      if rows == "all":
        scale = lr_scale
      elif new_rows is not None:
        scale = jnp.where(new_rows, jnp.float32(lr_scale), jnp.float32(scale))
    return scale

  def leaf_scale(path, leaf):
    # an nnx Variable's array sits under its ".value" attribute: not part of the name
    name = weights.tensor_name([k for k in path if not isinstance(k, jax.tree_util.GetAttrKey)])
    names = unrolled_names(name, leaf.shape)
    if names == [name]:
      return jnp.asarray(tensor_scale(name, leaf.shape), jnp.float32)
    # a scanned stack: one scale per layer slice, stacked along the layers axis
    per_layer = [tensor_scale(n, leaf.shape[1:]) for n in names]
    if all(isinstance(s, float) for s in per_layer) and len(set(per_layer)) == 1:
      return jnp.asarray(per_layer[0], jnp.float32)
    per_layer = [jnp.asarray(s, jnp.float32) for s in per_layer]
    slice_shape = jnp.broadcast_shapes(*(s.shape for s in per_layer))
    slice_shape = (1,) * (leaf.ndim - 1 - len(slice_shape)) + tuple(slice_shape)
    return jnp.stack([jnp.broadcast_to(s, slice_shape) for s in per_layer])

  return jax.tree_util.tree_map_with_path(leaf_scale, params)


def mask_gradients(grads: Any, scale_tree: Any) -> Any:
  """Zero gradients where the scale is 0, before clipping and the optimiser's moments."""
  return jax.tree.map(lambda g, s: jnp.where(s > 0, g, jnp.zeros_like(g)), grads, scale_tree)


def scale_updates(updates: Any, scale_tree: Any) -> Any:
  """The optimiser's updates times each part's scale (exactly 0 where frozen)."""
  return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scale_tree)


def active(c: ml_collections.ConfigDict) -> bool:
  """Whether any parameter trains at other than the schedule's rate."""
  return bool(c.param_groups) or c.param_groups_default_lr_scale != 1.0
