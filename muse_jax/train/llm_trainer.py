"""The MUSE-VL decoder's train step: next-token cross-entropy over packed rows.

``setup(config, mesh)`` builds everything a loop or the ahead-of-time compiler
needs: the jitted initialiser (parameters and AdamW moments are created already
sharded: no host or device ever holds the whole model) and the jitted step with
explicit in/out shardings and donated state.

A batch is a dict of [B, T] arrays (``batch_spec``):
  ids          int32 input tokens (text ids, visual ids, ``<soi>``/``<eoi>``)
  segment_ids  int32 document index of each token in a packed row, 0 = padding
  targets      int32 the token each position must predict (``next_token_targets``)
  weights      float32 loss weight per position (0 = no loss: prompt, padding,
               the last token of a segment)

``load_pretrained(setup, state, config)`` replaces the random parameters of a
fresh state by converted weights (``config.init_from``, written by ``python -m
muse_jax.convert llm-from-hf --muse_vl``), read straight into the state's
shardings; a loop calls it after ``init()`` when it is not resuming.

The data pipeline of the VLM stages (captions / instructions with SDE codes)
produces these; until it lands this module has no loop of its own, and the step
is exercised by tests, benchmarks and ``python -m muse_jax.compile``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from muse_jax import config_lib
from muse_jax import weights
from muse_jax.models import qwen2
from muse_jax.parallel import sharding
from muse_jax.train import lm_loss
from muse_jax.train import optimizers

BATCH_KEYS = {"ids": jnp.int32, "segment_ids": jnp.int32, "targets": jnp.int32,
              "weights": jnp.float32}


def next_token_targets(ids: np.ndarray, segment_ids: np.ndarray,
                       loss_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Packed rows -> the step's batch: position t predicts ids[t + 1] of the same segment.

  ``loss_mask`` [B, T] (default: every real token) marks the tokens that are
  *predicted* with loss, e.g. only the response of an instruction example.
  """
  ids = np.asarray(ids, np.int32)
  segment_ids = np.asarray(segment_ids, np.int32)
  mask = segment_ids > 0 if loss_mask is None else np.asarray(loss_mask, bool)
  targets = np.zeros_like(ids)
  targets[:, :-1] = ids[:, 1:]
  same = np.zeros_like(mask)
  same[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
  weights = np.zeros(ids.shape, np.float32)
  weights[:, :-1] = same[:, :-1] & mask[:, 1:]
  return {"ids": ids, "segment_ids": segment_ids, "targets": targets, "weights": weights}


EMBEDDING = "model/embed_tokens/embedding"


def load_pretrained(setup: Setup, state: dict[str, Any],
                    config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``state`` with its parameters read from ``config.init_from`` (unchanged when empty).

  The random parameters are freed first, so the device peak is that of training.
  AdamW's moments start at zero either way and are kept. Weights stored in another
  float dtype (e.g. bfloat16) are cast to the run's ``model.param_dtype``.
  """
  if not config.init_from:
    return state
  index = weights.read_index(config.init_from)
  rows = setup.model_config.vocab_size
  stored = index.tensors.get(EMBEDDING)
  if stored is not None and stored.shape[0] != rows:
    layout = config_lib.vocab_layout(config)
    raise config_lib.ConfigError(
        f"config.init_from: tensor {EMBEDDING} of {config.init_from} has {stored.shape[0]} rows "
        f"but this run's MUSE-VL vocabulary has {rows} ({layout.text_size} text ids + "
        f"{layout.num_visual} visual ids + <soi>, <eoi>, padded to a multiple of "
        f"{layout.pad_multiple}); convert the base model with `python -m muse_jax.convert "
        f"llm-from-hf --muse_vl --num_visual={layout.num_visual}` (and model.vocab_size = the "
        "base model's vocabulary)")
  jax.tree.map(lambda x: x.delete(), state["params"])
  params = weights.load_pretrained(config.init_from, setup.abstract_state["params"], cast=True)
  return dict(state, params=params)


@dataclasses.dataclass
class Setup:
  """The jitted pieces of one run on one mesh, and the shapes they expect."""
  model_config: qwen2.Qwen2Config
  abstract_state: Any           # sharded ShapeDtypeStructs: the init's output, Orbax's target
  batch_sharding: NamedSharding
  init: Any                     # () -> state, created sharded
  train_step: Any               # (state, batch) -> (state, metrics)

  def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=self.batch_sharding)
            for k, dtype in BATCH_KEYS.items()}

  def aot_programs(self, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{name: (jitted function, abstract args)} for ahead-of-time compiles."""
    batch = self.batch_spec(config.batch_size, config.seq_len)
    return {"init": (self.init, ()),
            "train_step": (self.train_step, (self.abstract_state, batch))}

  def step_items(self, config: ml_collections.ConfigDict) -> tuple[int, str]:
    """What one train step consumes, for throughput: (count, unit)."""
    return config.batch_size * config.seq_len, "tokens"


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  config_lib.validate_llm(config)
  config_lib.check_batch_fits_mesh(config, mesh)
  model_config = config_lib.llm_model_config(config)
  tx, lr = optimizers.adam(config.optimizer, config.total_steps, decoupled_weight_decay=True)

  def build():
    model = qwen2.Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(config.seed))
    params = nnx.state(model, nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: qwen2.Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(0))))
  abstract = jax.eval_shape(build)
  state_shardings = sharding.shardings(abstract, mesh)

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["ids"], segment_ids=batch["segment_ids"])
    return lm_loss.chunked_cross_entropy(hidden, model.lm_head_kernel(), batch["targets"],
                                         batch["weights"], chunk=config.loss_chunk)

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt_state": opt_state}
    metrics = {"loss/lm": loss, "grad_norm": optax.tree.norm(grads), "lr": lr(state["step"]),
               "tokens_with_loss": jnp.sum(batch["weights"])}
    return new, metrics

  batch = sharding.batch_sharding(mesh)
  batch_shardings = {k: batch for k in BATCH_KEYS}
  return Setup(
      model_config=model_config,
      abstract_state=sharding.with_shardings(abstract, state_shardings),
      batch_sharding=batch,
      init=jax.jit(build, out_shardings=state_shardings),
      train_step=sharding.jit_sharded(
          train_step, mesh, donate_argnums=0, in_shardings=(state_shardings, batch_shardings),
          out_shardings=(state_shardings, NamedSharding(mesh, P()))))

