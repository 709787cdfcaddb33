"""The MUSE-VL decoder stage: next-token cross-entropy over packed rows, on the shared loop.

``setup(config, mesh)`` builds everything a loop or the ahead-of-time compiler
needs: the jitted initialiser (parameters and AdamW moments are created already
sharded: no host or device ever holds the whole model), the jitted step with
explicit in/out shardings and donated state, and the held-out eval step.

A batch is a dict of [B, T] arrays (``batch_spec``):
  ids          int32 input tokens (text ids, visual ids, ``<soi>``/``<eoi>``)
  segment_ids  int32 document index of each token in a packed row, 0 = padding
  targets      int32 the token each position must predict (``next_token_targets``)
  weights      float32 loss weight per position (0 = no loss: prompt, padding,
               the last token of a segment)

The loss is one weighted mean over all targets; its sums are also split by
whether the target is a visual id (``loss/text``, ``loss/visual``,
``accuracy/text``, ``accuracy/visual``: argmax of the logits = target), at no
extra matmul (``lm_loss.chunked_group_stats``).

``load_pretrained(setup, state, config)`` replaces the random parameters of a
fresh state by ``config.init_from``: converted weights (``python -m
muse_jax.convert llm-from-hf --muse_vl``) or a previous decoder run's workdir
(pre-training -> instruction tuning), read straight into the state's shardings.

``stage(config, mesh)`` is the VLM stage for ``loop.train`` (``configs/vlm_pretrain.py``,
``configs/vlm_sft.py``): captioned images as SDE codes, read from the shards of
``python -m muse_jax.tokenize_images`` (``config.data.code_shards``,
``muse_jax/data/code_shards.py``) or encoded once when the stage starts by a trained
SDE run (``muse_jax/data/image_codes.py``), built into sequences by the task mixture of
``config.sequences.tasks`` (``muse_jax/data/sequences.py``), packed
(``muse_jax/data/packing.py``) in a Grain pipeline whose position is in every
checkpoint. Logged: the losses and accuracies above, ``tokens_per_second``
(real tokens, all processes), the packer's counters (``data/padding_fraction``,
``data/dropped_too_long``, ``data/skipped_<reason>``), and at every eval the
same losses over a fixed set of packed rows from held-out images (``eval/...``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from muse_jax import config_lib
from muse_jax import weights
from muse_jax.data import code_shards
from muse_jax.data import image_codes
from muse_jax.data import packing
from muse_jax.data import pipeline
from muse_jax.data import sequences
from muse_jax.data import sources
from muse_jax.data import text_tokenizer
from muse_jax.models import qwen2
from muse_jax.parallel import sharding
from muse_jax.train import checkpoint as checkpoint_lib
from muse_jax.train import lm_loss
from muse_jax.train import loop as loop_lib
from muse_jax.train import metrics as metrics_lib
from muse_jax.train import optimizers
from muse_jax.train import param_groups

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


def stats_metrics(stats, prefix: str = "") -> dict[str, Any]:
  """Losses and accuracies from ``chunked_group_stats`` sums [3, 2] (text, visual targets);
  a group without weighted targets reports 0 (jax or numpy arrays)."""
  xp = jnp if isinstance(stats, jax.Array) else np
  per = lambda row, g: row[g] / xp.maximum(stats[2][g], 1e-8)
  total = xp.maximum(xp.sum(stats[2]), 1e-8)
  return {f"{prefix}loss/text": per(stats[0], 0), f"{prefix}loss/visual": per(stats[0], 1),
          f"{prefix}accuracy/text": per(stats[1], 0), f"{prefix}accuracy/visual": per(stats[1], 1),
          f"{prefix}accuracy": xp.sum(stats[1]) / total}


EMBEDDING = "model/embed_tokens/embedding"


def load_pretrained(setup: Setup, state: dict[str, Any],
                    config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``state`` with its parameters read from ``config.init_from`` (unchanged when empty):
  converted weights, or the latest checkpoint of a decoder run (a workdir with a
  ``config.json``, e.g. the pre-training stage's, where instruction tuning starts).

  The random parameters are freed first, so the device peak is that of training.
  AdamW's moments start at zero either way and are kept. Weights stored in another
  float dtype (e.g. bfloat16) are cast to the run's ``model.param_dtype``.
  """
  if not config.init_from:
    return state
  if (epath.Path(config.init_from) / "config.json").exists():   # a training run of ours
    checkpoint_lib.check_same_layout(config, config.init_from, "the run config.init_from =")
    jax.tree.map(lambda x: x.delete(), state["params"])
    restored, step = weights.load_run_params(config.init_from,
                                             {"params": setup.abstract_state["params"]})
    logging.info("decoder parameters from %s, step %d", config.init_from, step)
    return dict(state, params=restored["params"])
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
  eval_step: Any                # (params, batch) -> [3, 2] sums (see stats_metrics)

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

  layout = config_lib.vocab_layout(config)
  grouped = param_groups.active(config)
  if grouped:
    param_groups.validate(config, [n for name, leaf in weights.named_leaves(abstract["params"])
                                   for n in param_groups.unrolled_names(name, leaf.shape)])

  def stats_fn(params, batch):
    """[3, 2] sums (nll, correct, weight) over text targets (column 0) and visual ones (1)."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["ids"], segment_ids=batch["segment_ids"])
    groups = layout.is_visual(batch["targets"]).astype(jnp.int32)
    return lm_loss.chunked_group_stats(hidden, model.lm_head_kernel(), batch["targets"],
                                       batch["weights"], groups, 2, chunk=config.loss_chunk)

  def loss_fn(params, batch):
    stats = stats_fn(params, batch)
    return jnp.sum(stats[0]) / jnp.maximum(jnp.sum(stats[2]), 1e-8), stats

  def train_step(state, batch):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    if grouped:
      scales = param_groups.scales(state["params"], config, model_config.vocab_size,
                                   layout.text_size)
      grads = param_groups.mask_gradients(grads, scales)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    if grouped:
      updates = param_groups.scale_updates(updates, scales)
    new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt_state": opt_state}
    metrics = {"loss/lm": loss, **stats_metrics(stats), "grad_norm": optax.tree.norm(grads),
               "lr": lr(state["step"]), "tokens_with_loss": jnp.sum(batch["weights"])}
    return new, metrics

  def eval_step(params, batch):
    return stats_fn(params, batch)

  batch = sharding.batch_sharding(mesh)
  batch_shardings = {k: batch for k in BATCH_KEYS}
  replicated = NamedSharding(mesh, P())
  return Setup(
      model_config=model_config,
      abstract_state=sharding.with_shardings(abstract, state_shardings),
      batch_sharding=batch,
      init=jax.jit(build, out_shardings=state_shardings),
      train_step=sharding.jit_sharded(
          loop_lib.skip_nonfinite(train_step) if config.nonfinite == "skip" else train_step,
          mesh, donate_argnums=0, in_shardings=(state_shardings, batch_shardings),
          out_shardings=(state_shardings, replicated)),
      eval_step=sharding.jit_sharded(
          eval_step, mesh, in_shardings=(state_shardings["params"], batch_shardings),
          out_shardings=replicated))


HEADLINE = ("loss/lm", "loss/text", "loss/visual", "accuracy", "tokens_per_second")


class PackedBatches:
  """The stage's ``loop.Batches``: ``batch_size`` packed rows at a time as the step's batch
  (``next_token_targets``). Whole batches only are drawn, so the packer's state
  between two batches is the source's position, and its counters are the data counters."""

  def __init__(self, rows: packing.PackIterator, batch_size: int):
    self._rows = rows
    self._batch_size = batch_size

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [next(self._rows) for _ in range(self._batch_size)]
    stacked = {k: np.stack([r[k] for r in rows]) for k in ("ids", "segment_ids", "loss_mask")}
    return next_token_targets(stacked["ids"], stacked["segment_ids"], stacked["loss_mask"])

  def get_state(self) -> dict:
    return self._rows.get_state()

  def set_state(self, state: dict) -> None:
    self._rows.set_state(state)

  def counters(self) -> dict[str, float]:
    return self._rows.counters()

  def close(self) -> None:
    """Nothing to stop: the examples are in memory and packed in this thread."""


def demo_tokenizer_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``config.tokenizer_dir``, or (when empty) WORKDIR/tokenizer, the demo BPE tokenizer
  trained there on the annotations' texts the first time."""
  if config.tokenizer_dir:
    return config.tokenizer_dir
  directory = checkpoint_lib.as_path(workdir) / "tokenizer"
  if not (directory / "tokenizer.json").exists():
    entries = image_codes.load_annotations(config.data.annotations)
    layout = text_tokenizer.build_demo_tokenizer(
        image_codes.texts(entries), str(directory), vocab_size=config.model.vocab_size,
        num_visual=config.vocab.num_visual)
    config_lib.check(layout.text_size == config.model.vocab_size, "model.vocab_size",
                     f"{config.model.vocab_size}, but the demo tokenizer learnt from these "
                     f"texts has {layout.text_size} text tokens",
                     f"set it to {layout.text_size}")
    logging.info("demo tokenizer (byte-level BPE, %d text tokens) written to %s",
                 layout.text_size, directory)
  return str(directory)


class VlmData:
  """The stage's examples: training and held-out images of ``config.data`` as SDE codes
  (read from the shards of ``config.data.code_shards``, or else encoded once, by the run
  ``config.sde_workdir``, when the stage starts), and the sequence format."""

  def __init__(self, config: ml_collections.ConfigDict):
    import transformers  # pylint: disable=g-import-not-at-top
    self.layout = config_lib.vocab_layout(config)
    if config.data.code_shards:
      self._read_shards(config)
    else:
      self._encode_images(config)
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer_dir)
    s = config.sequences
    self.format = sequences.TaskMixture({
        "pretrain": lambda: sequences.PretrainFormat(
            self.tokenizer, self.layout, image_first_ratio=s.image_first_ratio),
        "understanding": lambda: sequences.UnderstandingFormat(self.tokenizer, self.layout),
        "generation": lambda: sequences.GenerationFormat(
            self.tokenizer, self.layout, system_texts=tuple(s.system_texts),
            caption_drop_prob=s.caption_drop_prob),
    }, dict(s.tasks))
    self.pad_id = self.tokenizer.pad_token_id or 0

  def _read_shards(self, config: ml_collections.ConfigDict) -> None:
    """The examples ``python -m muse_jax.tokenize_images`` wrote (the tokenizer is not
    loaded), if they are codes of the tokenizer this run decodes with."""
    directory = config.data.code_shards
    manifest = code_shards.read_manifest(directory)
    checkpoints = checkpoint_lib.Checkpointer(
        checkpoint_lib.as_path(config.sde_workdir) / "checkpoints")
    step = checkpoints.latest_step()
    checkpoints.close()
    code_shards.check_tokenizer(manifest, directory, sde_workdir=config.sde_workdir,
                                sde_step=step, num_visual=self.layout.num_visual)
    self.train = code_shards.examples(directory, manifest, "train")
    self.held_out = list(code_shards.examples(directory, manifest, "eval"))
    self.skipped = code_shards.skipped(manifest, "train")
    if not len(self.train):
      raise config_lib.ConfigError(f"config.data.code_shards: {directory!r} holds no training "
                                   "example; tokenize a dataset with readable images into it")
    logging.info("code shards %s (SDE run %s, step %d): %d training and %d held-out views",
                 directory, config.sde_workdir, step, len(self.train), len(self.held_out))

  def _encode_images(self, config: ml_collections.ConfigDict) -> None:
    """The annotated images encoded now by the SDE run (small runs and the demo)."""
    from muse_jax.inference import sde_tokenizer  # pylint: disable=g-import-not-at-top
    d = config.data
    if not (epath.Path(config.sde_workdir) / "config.json").exists():
      raise config_lib.ConfigError(
          f"config.sde_workdir: {config.sde_workdir!r} has no config.json; give a trained SDE "
          "run (python -m muse_jax.main --config=configs/sde_256.py:demo --workdir=DIR)")
    sde, sde_config, step = sde_tokenizer.load_tokenizer(config.sde_workdir)
    config_lib.check(sde_config.model.codebook_size == self.layout.num_visual, "vocab.num_visual",
                     f"{self.layout.num_visual}, but the SDE tokenizer in {config.sde_workdir} "
                     f"has {sde_config.model.codebook_size} codes",
                     f"set it to {sde_config.model.codebook_size}")
    image_dir = d.image_dir or sources.bundled_dir()
    train, held_out = image_codes.split(image_codes.load_annotations(d.annotations), image_dir,
                                        d.num_eval_images)
    encode = sde_tokenizer.batched_encoder(sde, d.encode_batch)
    common = dict(image_size=sde_config.model.encoder.image_size, max_pixels=d.max_image_pixels)
    start = time.perf_counter()
    train, self.skipped = image_codes.code_examples(
        train, image_dir, encode, views=d.views, min_scale=d.min_scale, seed=config.seed,
        **common)
    self.train = grain.MapDataset.source(train)
    self.held_out, held_out_skipped = image_codes.code_examples(held_out, image_dir, encode,
                                                                **common)
    if not train:
      raise config_lib.ConfigError(f"config.data.image_dir: no readable training image of the "
                                   f"annotations under {image_dir!r} ({self.skipped}); point "
                                   "it at the annotated images")
    logging.info("SDE tokenizer %s (step %d) encoded %d training and %d held-out views in "
                 "%.1fs; skipped %s", config.sde_workdir, step, len(self.train),
                 len(self.held_out), time.perf_counter() - start,
                 {**self.skipped, **held_out_skipped} or "none")

  def rows(self, config, process_index: int, process_count: int) -> packing.PackIterator:
    """This process's endless stream of packed training rows (Grain, checkpointable)."""
    examples = pipeline.EndlessShuffle(self.train, pipeline.derive_seed(config.seed, 0), process_index,
                                       process_count)
    formatted = examples.random_map(self.format, seed=pipeline.derive_seed(
        config.seed, 1, process_index)).to_iter_dataset()
    return packing.PackIterDataset(formatted, config.seq_len,
                                   buffer_size=config.sequences.pack_buffer,
                                   pad_id=self.pad_id).__iter__()

  def held_out_batches(self, config) -> list[dict[str, np.ndarray]]:
    """The held-out views formatted once (a fixed generator) and packed: the same rows at
    every eval, in this process's share of a batch (padded with empty rows). Every process
    feeds all of them: the sums count each row once per process, the ratios not at all."""
    rng = np.random.default_rng(pipeline.derive_seed(config.seed, 2))
    built = [self.format(example, rng) for example in self.held_out]
    built = [b for b in built if pipeline.SKIP_KEY not in b and len(b["ids"]) <= config.seq_len]
    plan = packing.first_fit_decreasing([len(b["ids"]) for b in built], config.seq_len)
    rows = [packing.make_row([built[i] for i in row], config.seq_len, self.pad_id)
            for row in plan]
    local = config.batch_size // jax.process_count()
    rows += [{"ids": np.full(config.seq_len, self.pad_id, np.int32),
              "segment_ids": np.zeros(config.seq_len, np.int32),
              "loss_mask": np.zeros(config.seq_len, bool)}] * (-len(rows) % local)
    return [next_token_targets(*(np.stack([r[k] for r in rows[i:i + local]])
                                 for k in ("ids", "segment_ids", "loss_mask")))
            for i in range(0, len(rows), local)]


def stage(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> loop_lib.Stage:
  """The VLM stage for the shared loop: the decoder step of ``setup``, initialised from
  ``config.init_from``; packed rows of captioned SDE codes; per-task metrics and the
  held-out loss."""
  config_lib.validate_vlm(config)
  run = setup(config, mesh)
  data = VlmData(config)
  held_out = data.held_out_batches(config)
  tokens = {"count": 0, "since": time.perf_counter()}

  def init():
    return load_pretrained(run, run.init(), config)

  def batches(process_index: int, process_count: int):
    config_lib.check(config.batch_size % process_count == 0, "batch_size",
                     f"{config.batch_size} is not a multiple of {process_count} processes",
                     "use a multiple of the process count")
    return PackedBatches(data.rows(config, process_index, process_count),
                         config.batch_size // process_count)

  def step(state, batch, step: int):
    del step
    tokens["count"] += int(np.sum(batch["segment_ids"] > 0))
    on_mesh = {k: sharding.global_batch(v, run.batch_sharding) for k, v in batch.items()}
    return run.train_step(state, on_mesh)

  def log_metrics():
    now = time.perf_counter()
    rate = tokens["count"] * jax.process_count() / max(now - tokens["since"], 1e-9)
    tokens.update(count=0, since=now)
    # images that could not be read when the run started (the packer counts the rest)
    return {"tokens_per_second": rate, **{f"data/images_{k.split('/')[-1]}": v
                                          for k, v in data.skipped.items()}}

  def evaluate(state, step: int, writer: metrics_lib.MetricWriter, workdir):
    if not held_out:
      return {}
    totals = sum(np.asarray(jax.device_get(run.eval_step(state["params"], {
        k: sharding.global_batch(v, run.batch_sharding) for k, v in b.items()})))
                 for b in held_out)
    scalars = {"eval/loss": float(np.sum(totals[0]) / max(np.sum(totals[2]), 1e-8)),
               **{k: float(v) for k, v in stats_metrics(totals, "eval/").items()}}
    writer.write_scalars(step, scalars)
    writer.flush()
    if jax.process_index() == 0:
      loop_lib.append_eval_history(checkpoint_lib.as_path(workdir), dict(step=step, **scalars))
    logging.info("held-out at step %d: %s", step,
                 ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
    return scalars

  return loop_lib.Stage(abstract_state=run.abstract_state, init=init, batches=batches,
                        step=step, evaluate=evaluate, log_metrics=log_metrics,
                        headline=HEADLINE)


def inputs_from_run(config: ml_collections.ConfigDict) -> None:
  """Empty ``sde_workdir`` / ``tokenizer_dir`` take the values of the decoder run that
  ``config.init_from`` names (instruction tuning reads pre-training's images and text the
  same way). Nothing changes when ``init_from`` is converted weights or empty."""
  if not config.init_from:
    return
  saved = epath.Path(config.init_from) / "config.json"
  if not saved.exists():
    return
  run = json.loads(saved.read_text())
  for field in ("sde_workdir", "tokenizer_dir"):
    if not config[field] and run.get(field):
      config[field] = run[field]
      logging.info("config.%s from the run %s: %s", field, config.init_from, run[field])


def sde_run_of_shards(config: ml_collections.ConfigDict) -> None:
  """An empty ``sde_workdir`` takes the SDE run that encoded ``config.data.code_shards``
  (the run the stage's images are decoded with later)."""
  if config.data.code_shards and not config.sde_workdir:
    config.sde_workdir = code_shards.read_manifest(config.data.code_shards)["sde_workdir"]
    logging.info("config.sde_workdir from the code shards %s: %s", config.data.code_shards,
                 config.sde_workdir)


def sde_run_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``config.sde_workdir``, or (when it is empty and the config carries an SDE run
  ``config.sde_config``, as the demo does) WORKDIR/sde_tokenizer, where that run is
  trained first. A run already there resumes; a complete one is used as it is."""
  if config.sde_workdir or "sde_config" not in config:
    return config.sde_workdir
  from muse_jax.train import sde_trainer  # pylint: disable=g-import-not-at-top
  directory = str(checkpoint_lib.as_path(workdir) / "sde_tokenizer")
  checkpoints = checkpoint_lib.Checkpointer(checkpoint_lib.as_path(directory) / "checkpoints")
  finished = checkpoints.latest_step() == config.sde_config.total_steps
  checkpoints.close()
  if finished:   # a restart of the VLM run: nothing to build or restore
    return directory
  logging.warning("config.sde_workdir is empty: training the SDE tokenizer of "
                  "config.sde_config into %s first (%d steps); give "
                  "--config.sde_workdir=DIR to use a trained one", directory,
                  config.sde_config.total_steps)
  sde_trainer.train(config.sde_config, directory)
  return directory


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) a VLM stage with the shared loop; returns the final state, the
  last logged metrics and the step (see ``loop.train``).

  Before the loop: empty ``sde_workdir`` / ``tokenizer_dir`` come from an ``init_from``
  run (``inputs_from_run``), or ``sde_workdir`` from the code shards
  (``sde_run_of_shards``); an SDE tokenizer is trained first when the config carries
  one and names none (``sde_run_dir``); an empty ``tokenizer_dir`` is the demo
  tokenizer, built into the workdir. The run's config.json records what was used.
  """
  config_lib.validate_vlm(config, inputs_resolved=False)
  config = config.copy_and_resolve_references()
  inputs_from_run(config)
  sde_run_of_shards(config)
  config.sde_workdir = sde_run_dir(config, workdir)
  config_lib.validate_vlm(config)
  config.tokenizer_dir = demo_tokenizer_dir(config, workdir)
  return loop_lib.train(config, workdir, stage, stop_after=stop_after)
