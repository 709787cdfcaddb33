"""Optimisers and learning-rate schedules from a config block (shared by all trainers)."""

from __future__ import annotations

import ml_collections
import optax


def schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``c.lr``, then constant or cosine decay to 0 at ``total_steps``."""
  warmup = max(int(c.warmup_steps), 0)
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, c.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.lr, warmup), optax.constant_schedule(c.lr)], [warmup])
  return optax.constant_schedule(c.lr)


def adam(c: ml_collections.ConfigDict, total_steps: int, *,
         decoupled_weight_decay: bool = False) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then Adam with weight decay.

  ``decoupled_weight_decay=False`` adds ``weight_decay * param`` to the gradient
  before the Adam moments, as ``torch.optim.Adam(weight_decay=...)`` does (what
  LlamaGen's tokenizer training uses); True gives AdamW (the LLM stages).
  """
  lr = schedule(c, total_steps)
  decay = optax.add_decayed_weights(c.weight_decay) if c.weight_decay else optax.identity()
  parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip else []
  if decoupled_weight_decay:
    parts += [optax.scale_by_adam(c.b1, c.b2, c.eps), decay]
  else:
    parts += [decay, optax.scale_by_adam(c.b1, c.b2, c.eps)]
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts), lr
