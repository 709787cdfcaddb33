"""SDE tokenizer training stage: state, jitted steps, and the stage the loop runs.

One train step updates the generator (tokenizer) and, once ``loss.disc_start``
is reached, the PatchGAN discriminator. Before that step the GAN is not merely
weighted by zero: the step is compiled without it, so early training pays
nothing for the discriminator. ``stage(config, mesh)`` hands these pieces to the
shared loop (``muse_jax/train/loop.py``), which resumes, logs, evaluates,
checkpoints and handles preemption; the codebook-usage metric stays here.

The step is a pure function of (state, batch): there is no dropout or noise,
and the data pipeline's randomness lives in its own checkpointed state, so a
resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from muse_jax import config_lib
from muse_jax import data as data_lib
from muse_jax import weights
from muse_jax.models import discriminator as discriminator_lib
from muse_jax.models import lpips as lpips_lib
from muse_jax.models import quantizer as quantizer_lib
from muse_jax.models import sde as sde_lib
from muse_jax.parallel import sharding
from muse_jax.train import checkpoint as checkpoint_lib
from muse_jax.train import loop as loop_lib
from muse_jax.train import losses
from muse_jax.train import metrics as metrics_lib
from muse_jax.train import optimizers

HEADLINE = ("loss/total", "loss/l2", "loss/lpips", "loss/semantic", "codebook/usage",
            "codebook/perplexity")


class Models:
  """Graph definitions of the stage's modules and a builder of their states.

  ``Models(config)`` holds no parameters: ``init()`` returns freshly
  initialised states (call it under ``jax.jit`` with output shardings so that
  parameters are created already sharded, never whole on one device).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model_cfg = config_lib.sde_model_config(config)
    self.has_disc = self.model_cfg.has_image_branch
    graphs = nnx.eval_shape(self._modules)
    self.graphdef = nnx.graphdef(graphs[0])
    self.disc_graphdef = nnx.graphdef(graphs[1]) if self.has_disc else None
    self.lpips_graphdef = nnx.graphdef(graphs[2]) if self.has_disc else None

  def _modules(self):
    seed = self.config.seed
    tokenizer = sde_lib.SDETokenizer(self.model_cfg, rngs=nnx.Rngs(seed))
    if not self.has_disc:
      return tokenizer, None, None
    disc = discriminator_lib.PatchGAN(config_lib.discriminator_config(self.config),
                                      rngs=nnx.Rngs(seed + 1))
    # VGG16 runs in the model's compute dtype, as under LlamaGen's bf16 autocast (in f32 its
    # activations at 256 px dominate the step's memory)
    lpips = lpips_lib.LPIPS(rngs=nnx.Rngs(seed + 2), width_divisor=self.config.lpips_width_divisor,
                            dtype=self.config.model.dtype)
    return tokenizer, disc, lpips

  def init(self) -> dict[str, Any]:
    """{'params', 'frozen', 'disc_params', 'lpips_params'} (the last two if image branch)."""
    tokenizer, disc, lpips = self._modules()
    _, trainable, frozen = nnx.split(tokenizer, sde_lib.TRAINABLE, ...)
    out = {"params": trainable, "frozen": frozen}
    if self.has_disc:
      out.update(disc_params=nnx.state(disc), lpips_params=nnx.state(lpips))
    return out

  def tokenizer(self, trainable, frozen) -> sde_lib.SDETokenizer:
    return nnx.merge(self.graphdef, trainable, frozen)


def load_pretrained(run: Setup, state: dict[str, Any], lpips_params: Any) -> Any:
  """Converted SigLIP weights into both encoders (in place in ``state``); returns the
  LPIPS parameters, converted ones when ``config.lpips_checkpoint`` is set. Weights
  are read straight into the run's shardings (``weights.load_pretrained``), cast to
  ``model.param_dtype`` if converted in another dtype."""
  models = run.models
  config = models.config
  if config.siglip_checkpoint:
    for group, tower in (("params", "image_encoder"), ("frozen", "semantic_encoder")):
      if tower in state[group]:
        state[group][tower] = weights.load_pretrained(
            config.siglip_checkpoint, run.abstract_state[group][tower], cast=True)
    logging.info("initialised image and semantic encoders from %s", config.siglip_checkpoint)
  elif models.model_cfg.has_semantic_branch:
    logging.warning("config.siglip_checkpoint is empty: the frozen semantic encoder keeps its "
                    "random init, so L_sem teaches nothing about SigLIP semantics "
                    "(fine for the demo; convert SigLIP weights for real runs)")
  if lpips_params is None:
    return None
  if config.lpips_checkpoint:
    logging.info("LPIPS weights from %s", config.lpips_checkpoint)
    return weights.load_pretrained(config.lpips_checkpoint, run.abstract_lpips, cast=True)
  logging.warning("config.lpips_checkpoint is empty: LPIPS uses RANDOM VGG16 weights, so the "
                  "perceptual loss is not the published LPIPS (convert the public weights "
                  "with `python -m muse_jax.convert lpips`)")
  return lpips_params


def code_perplexity(codes: jax.Array, codebook_size: int, weights: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """(per-code counts [K], perplexity exp(H) of the batch's code distribution);
  ``weights`` (shaped like ``codes``) counts only some positions (eval padding)."""
  counts = jnp.bincount(codes.reshape(-1), None if weights is None else weights.reshape(-1),
                        length=codebook_size)
  return counts, perplexity_of(counts)


def perplexity_of(counts):
  """exp(entropy) of the distribution ``counts`` [K] (jax or numpy) describes."""
  xp = jnp if isinstance(counts, jax.Array) else np
  p = counts / xp.maximum(xp.sum(counts), 1)
  entropy = -xp.sum(xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1.0)), 0.0))
  return xp.exp(entropy)


CODEBOOK_PATH = "['quantizer']['codebook'].value"


def codebook_key(seed: int, step) -> jax.Array:
  """Randomness of codebook updates: a function of (seed, step) only, so a resumed
  run draws what an uninterrupted one draws (step 0: the data initialisation)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def _map_codebook_leaves(fn, tree):
  """``fn`` applied to the codebook leaf of ``tree`` (parameters, gradients or an
  optimiser moment shaped like them), every other leaf unchanged."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(x) if jax.tree_util.keystr(path).endswith(CODEBOOK_PATH) else x, tree)


def update_codebook(config: ml_collections.ConfigDict, state, params, opt_state, counts,
                    codes, features):
  """EMA update and dead-entry restart after the optimiser step. Returns (params,
  opt_state, codebook state, number of entries restarted)."""
  cb = config.codebook
  step = state["step"] + 1
  book_state = dict(state["codebook"])
  book_state["last_used"] = jnp.where(counts > 0, step, book_state["last_used"])
  book = _get_codebook(params)
  flat = features.reshape(-1, features.shape[-1])
  if cb.update_rule == "ema":
    book_state["ema_count"], book_state["ema_sum"], book = quantizer_lib.ema_update(
        book_state["ema_count"], book_state["ema_sum"], codes, flat, cb.ema_decay)
  restarted = jnp.zeros((), jnp.int32)
  if cb.restart_after:
    book, book_state["last_used"], dead = quantizer_lib.restart_dead_codes(
        book, book_state["last_used"], flat, step, codebook_key(config.seed, step),
        cb.restart_after)
    if cb.update_rule == "ema":   # the averages restart from the new entry, with unit count
      book_state["ema_count"] = jnp.where(dead, 1.0, book_state["ema_count"])
      book_state["ema_sum"] = jnp.where(dead[:, None], book, book_state["ema_sum"])
    # Adam's moments of a restarted row describe the dead entry's gradients, not the
    # new one's: zero them so its first updates are not pushed by stale momentum
    opt_state = _map_codebook_leaves(lambda m: jnp.where(dead[:, None], 0.0, m), opt_state)
    restarted = jnp.sum(dead)
  params = _map_codebook_leaves(lambda _: book, params)
  return params, opt_state, book_state, restarted


def _get_codebook(params) -> jax.Array:
  """The raw codebook [K, d] (a ShapeDtypeStruct when ``params`` is abstract)."""
  return params["quantizer"]["codebook"].get_value()


def make_steps(models: Models, config: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, lr: optax.Schedule,
               dtx: optax.GradientTransformation | None, mesh: jax.sharding.Mesh,
               state_shardings: Any, lpips_shardings: Any):
  """Returns jitted ``train_step(state, lpips_params, images, use_gan)`` and
  ``eval_step(state, images)``. LPIPS weights are an argument, not state: they are
  fixed and come from ``config.lpips_checkpoint``, not from the run's checkpoints.
  Under ``config.nonfinite = "skip"`` a train step whose loss or gradient norm is
  not finite returns the state it was given (``loop.skip_nonfinite``)."""
  lc = config.loss
  cfg = models.model_cfg
  entropy_t = lc.entropy_temperature if lc.entropy_weight else None

  def generator_loss(trainable, frozen, disc_params, lpips_params, images, use_gan):
    tok = models.tokenizer(trainable, frozen)
    out = tok(images, entropy_temperature=entropy_t)
    q = out["quantized"]
    terms = {"loss/codebook": q.codebook_loss, "loss/commitment": q.commitment_loss}
    # with EMA updates the codebook loss has no parameter to move: only commitment remains
    codebook_loss = 0.0 if config.codebook.update_rule == "ema" else q.codebook_loss
    total = lc.codebook_weight * (codebook_loss + lc.commitment_beta * q.commitment_loss)
    if entropy_t is not None:
      terms["loss/entropy"] = q.entropy_loss
      total += lc.entropy_weight * q.entropy_loss
    recon = out.get("reconstruction")
    if recon is not None:
      lpips = nnx.merge(models.lpips_graphdef, lpips_params)
      terms["loss/l2"] = losses.l2(images, recon)
      terms["loss/lpips"] = jnp.mean(lpips(images, recon))
      total += lc.l2_weight * terms["loss/l2"] + lc.perceptual_weight * terms["loss/lpips"]
      if use_gan:
        disc = nnx.merge(models.disc_graphdef, disc_params)
        terms["loss/generator_adv"] = losses.hinge_generator(disc(recon))
        total += lc.disc_weight * terms["loss/generator_adv"]
    if cfg.has_semantic_branch:
      terms["loss/semantic"] = losses.cosine_distance(out["semantic_prediction"],
                                                      out["semantic_target"])
      total += lc.semantic_weight * terms["loss/semantic"]
    terms["loss/total"] = total
    return total, (terms, recon, q.codes, jax.lax.stop_gradient(out["f"]))

  def train_step(state, lpips_params, images, use_gan):
    grads, (terms, recon, codes, features) = jax.grad(generator_loss, has_aux=True)(
        state["params"], state["frozen"], state.get("disc_params"), lpips_params,
        images, use_gan)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    counts, perplexity = code_perplexity(codes, cfg.codebook_size)
    out = dict(terms, **{"grad_norm/generator": optax.tree.norm(grads),
                         "lr": lr(state["step"]), "codebook/perplexity": perplexity})
    new = dict(state, step=state["step"] + 1)
    if "codebook" in state:
      params, opt_state, new["codebook"], out["codebook/restarted"] = update_codebook(
          config, state, params, opt_state, counts, codes, features)
    new.update(params=params, opt_state=opt_state)
    if use_gan:
      fake = jax.lax.stop_gradient(recon)

      def disc_loss(disc_params):
        d = nnx.merge(models.disc_graphdef, disc_params)
        # one pass over both halves: the same FLOPs, one set of kernels, less peak memory on
        # TPU (GroupNorm's statistics are per example, so the halves do not mix)
        real_logits, fake_logits = jnp.split(d(jnp.concatenate([images, fake])), 2)
        return losses.hinge_discriminator(real_logits, fake_logits), (
            jnp.mean(real_logits), jnp.mean(fake_logits))

      (d_loss, (real_mean, fake_mean)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
          state["disc_params"])
      d_updates, d_opt = dtx.update(d_grads, state["disc_opt_state"], state["disc_params"])
      new.update(disc_params=optax.apply_updates(state["disc_params"], d_updates),
                 disc_opt_state=d_opt)
      out.update({"loss/discriminator": d_loss, "grad_norm/discriminator":
                  optax.tree.norm(d_grads), "disc/logits_real": real_mean,
                  "disc/logits_fake": fake_mean})
    return new, out, counts

  def eval_step(state, images, valid):
    """Sums of per-image metrics over the valid images of one batch, and a few
    reconstructions for the grid (reductions on device: outputs are small)."""
    tok = models.tokenizer(state["params"], state["frozen"])
    out = tok(images)
    per_image = {}
    if "reconstruction" in out:
      recon = out["reconstruction"]
      per_image.update(psnr=losses.psnr(images, recon), ssim=losses.ssim(images, recon))
    if "semantic_prediction" in out:
      per_image["semantic_cosine"] = 1.0 - jax.vmap(losses.cosine_distance)(
          out["semantic_prediction"], out["semantic_target"])
    result = {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in per_image.items()}
    result["count"] = jnp.sum(valid)
    codes = out["quantized"].codes
    result["code_counts"] = code_perplexity(
        codes, cfg.codebook_size, jnp.broadcast_to(valid[:, None], codes.shape).astype(int))[0]
    if "reconstruction" in out:
      result["reconstruction"] = out["reconstruction"][:config.num_grid_images]
    return result

  replicated = NamedSharding(mesh, P())
  batch = sharding.batch_sharding(mesh)
  step = loop_lib.skip_nonfinite(train_step) if config.nonfinite == "skip" else train_step
  return (sharding.jit_sharded(step, mesh,
                               static_argnames="use_gan", donate_argnums=0,
                               in_shardings=(state_shardings, lpips_shardings, batch),
                               out_shardings=(state_shardings, replicated, replicated)),
          sharding.jit_sharded(eval_step, mesh, in_shardings=(state_shardings, batch, batch),
                               out_shardings=replicated))


def init_state(models: Models, tx, dtx) -> tuple[dict[str, Any], Any]:
  """(train state, LPIPS parameters) freshly initialised."""
  built = models.init()
  state = {"step": jnp.zeros((), jnp.int32), "params": built["params"],
           "frozen": built["frozen"], "opt_state": tx.init(built["params"])}
  if models.has_disc:
    state.update(disc_params=built["disc_params"],
                 disc_opt_state=dtx.init(built["disc_params"]))
  cb = models.config.codebook
  if cb.restart_after or cb.update_rule == "ema":
    k = models.model_cfg.codebook_size
    state["codebook"] = {"last_used": jnp.zeros((k,), jnp.int32)}
    if cb.update_rule == "ema":
      state["codebook"].update(ema_count=jnp.ones((k,), jnp.float32),
                               ema_sum=_get_codebook(built["params"]).astype(jnp.float32))
  return state, built.get("lpips_params")


class CodebookUsage:
  """Fraction of codebook entries hit at least once over the last ``window`` steps."""

  def __init__(self, codebook_size: int, window: int):
    self._counts = np.zeros(codebook_size, np.int64)
    self._history = collections.deque()
    self._window = window

  def add(self, counts: np.ndarray) -> None:
    self._counts += counts
    self._history.append(counts)
    if len(self._history) > self._window:
      self._counts -= self._history.popleft()

  def fraction(self) -> float:
    return float(np.mean(self._counts > 0))

  def scalars(self, floor: float, step: int) -> dict[str, float]:
    """Window usage and perplexity for the logs; warns when usage over a full
    window is under ``floor`` (a partial window under-counts by construction)."""
    fraction = self.fraction()
    if fraction < floor and len(self._history) >= self._window:
      logging.warning("step %d: codebook usage %.1f%% over the last %d steps is below "
                      "config.codebook.usage_floor %.1f%% (consider config.codebook."
                      "restart_after, or model.simvq)", step, 100 * fraction,
                      len(self._history), 100 * floor)
    return {"codebook/usage": fraction,
            "codebook/window_perplexity": float(perplexity_of(self._counts))}


def codebook_eval_scalars(counts: np.ndarray) -> dict[str, float]:
  """Usage, perplexity and dead entries of the code counts over the held-out set."""
  return {"eval/codebook_usage": float(np.mean(counts > 0)),
          "eval/codebook_perplexity": float(perplexity_of(counts.astype(np.float64))),
          "eval/dead_codes": float(np.sum(counts == 0))}


def seed_codebook_from_data(run: Setup, state, pipeline, config: ml_collections.ConfigDict):
  """k-means++ seeding of the codebook from the encoder features of the first
  ``config.codebook.init_batches`` training batches (once, at step 0; the result
  is a parameter, so checkpoints record it). Features stay global arrays, so
  every process seeds the same codebook."""
  models = run.models
  mesh = run.batch_sharding.mesh
  replicated = NamedSharding(mesh, P())

  def features(params, frozen, images):
    f = models.tokenizer(params, frozen).features(images)[0]
    return f.reshape(-1, f.shape[-1])

  encode = sharding.jit_sharded(features, mesh, out_shardings=replicated)
  batches = [encode(state["params"], state["frozen"],
                    sharding.global_batch(next(pipeline)["image"], run.batch_sharding))
             for _ in range(config.codebook.init_batches)]
  target = _get_codebook(run.abstract_state["params"])

  def seed(*batches):
    book = quantizer_lib.kmeans_plus_plus(jnp.concatenate(batches), target.shape[0],
                                          codebook_key(config.seed, 0))
    return book.astype(target.dtype), book

  book, book_f32 = jax.jit(seed, out_shardings=(target.sharding, replicated))(*batches)
  state["params"] = _map_codebook_leaves(lambda _: book, state["params"])
  if "ema_sum" in state.get("codebook", {}):
    state["codebook"]["ema_sum"] = jax.device_put(
        book_f32, run.abstract_state["codebook"]["ema_sum"].sharding)
  logging.info("codebook seeded by k-means++ from %d encoder features",
               sum(len(b) for b in batches))
  return state


def code_histogram(counts: np.ndarray, width: int = 512, height: int = 128) -> np.ndarray:
  """Rank-frequency chart of code counts as a uint8 image: entries sorted by
  count (most used left), bar height proportional to the count (dead ones flat)."""
  ranked = np.sort(counts.astype(np.float64))[::-1]
  bins = np.array_split(ranked, min(width, len(ranked)))
  bars = np.array([b.mean() for b in bins]) / max(ranked[0], 1)
  rows = np.arange(height)[::-1, None] / height
  img = np.where(rows < bars[None], 40, 255).astype(np.uint8)
  img = np.repeat(img, max(1, width // len(bins)), axis=1)
  return np.repeat(img[..., None], 3, axis=-1)


def evaluate(eval_step, state, config: ml_collections.ConfigDict, mesh,
             writer: metrics_lib.MetricWriter, step: int,
             workdir: str | epath.Path) -> dict[str, float]:
  """Reconstruction metrics over the held-out images, in batches of the train batch size,
  and codebook usage, perplexity and dead entries over all their codes (with a
  code-frequency chart for TensorBoard).

  Every process runs the same number of eval steps (ceil(num_eval_images / batch));
  a process out of images feeds zeros that a validity mask drops.
  """
  process_count = jax.process_count()
  local = config.batch_size // process_count
  batches = data_lib.iter_eval_batches(config.data, batch_size=local,
                                       process_index=jax.process_index(),
                                       process_count=process_count)
  size = config.data.image_size
  sums, count, first = collections.defaultdict(float), 0, None
  code_counts = np.zeros(config.model.codebook_size, np.int64)
  batch = sharding.batch_sharding(mesh)
  for _ in range(-(-config.data.num_eval_images // config.batch_size)):
    images = next(batches, {"image": np.zeros((0, size, size, 3), np.float32)})["image"]
    valid = np.arange(local) < len(images)
    padded = np.concatenate([images, np.zeros((local - len(images), size, size, 3),
                                              np.float32)])
    out = jax.device_get(eval_step(state, sharding.global_batch(padded, batch),
                                   sharding.global_batch(valid, batch)))
    count += int(out.pop("count"))
    code_counts += np.asarray(out.pop("code_counts")).astype(np.int64)
    recon = out.pop("reconstruction", None)
    for key, value in out.items():
      sums[key] += float(value)
    if first is None and recon is not None:
      n = min(config.num_grid_images, len(images))
      first = metrics_lib.image_grid([images[:n], recon[:n]])
  if not count:
    return {}
  scalars = {f"eval/{k}": v / count for k, v in sums.items()}
  scalars.update(codebook_eval_scalars(code_counts))
  writer.write_scalars(step, scalars)
  if jax.process_index() == 0:
    writer.write_images(step, {"eval/code_frequencies": code_histogram(code_counts)})
  if first is not None and jax.process_index() == 0:
    writer.write_images(step, {"eval/inputs_vs_reconstructions": first})
    workdir = checkpoint_lib.as_path(workdir)
    (workdir / "reconstructions").mkdir(parents=True, exist_ok=True)
    with (workdir / "reconstructions" / f"step_{step:08d}.png").open("wb") as f:
      Image.fromarray(first).save(f, format="PNG")
    loop_lib.append_eval_history(workdir, dict(step=step, num_images=count, **scalars))
  writer.flush()
  logging.info("eval at step %d over %d images: %s", step, count,
               ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
  return scalars


@dataclasses.dataclass
class Setup:
  """The jitted pieces of one run on one mesh, and the shapes they expect."""
  models: Models
  abstract_state: Any           # sharded ShapeDtypeStructs: the init's output, Orbax's target
  abstract_lpips: Any
  batch_sharding: NamedSharding
  init: Any                     # () -> (state, LPIPS parameters), created sharded
  train_step: Any               # (state, lpips_params, images, use_gan) -> (state, metrics, counts)
  eval_step: Any

  def aot_programs(self, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{name: (jitted function, abstract args)} for ahead-of-time compiles:
    the initialiser and the heaviest train step (discriminator on)."""
    size = config.model.encoder.image_size
    images = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32,
                                  sharding=self.batch_sharding)
    return {"init": (self.init, ()),
            "train_step": (self.train_step, (self.abstract_state, self.abstract_lpips, images,
                                             self.models.has_disc))}

  def step_items(self, config: ml_collections.ConfigDict) -> tuple[int, str]:
    """What one train step consumes, for throughput: (count, unit)."""
    return config.batch_size, "images"


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  config_lib.validate_sde(config)
  config_lib.check_batch_fits_mesh(config, mesh)
  models = Models(config)
  tx, lr = optimizers.adam(config.optimizer, config.total_steps)
  dtx = optimizers.adam(config.disc_optimizer, config.total_steps)[0] if models.has_disc else None
  build = functools.partial(init_state, models, tx, dtx)
  abstract_state, abstract_lpips = jax.eval_shape(build)
  # frozen weights (semantic encoder, LPIPS) get no gradients or moments: replicating
  # them trades memory for the all-gathers that sharding them costs in every step
  frozen_rules = () if config.replicate_frozen else sharding.DEFAULT_RULES
  state_shardings = sharding.shardings(abstract_state, mesh)
  state_shardings["frozen"] = sharding.shardings(abstract_state["frozen"], mesh, frozen_rules)
  lpips_shardings = sharding.shardings(abstract_lpips, mesh, frozen_rules)
  train_step, eval_step = make_steps(models, config, tx, lr, dtx, mesh, state_shardings,
                                     lpips_shardings)
  return Setup(
      models=models, abstract_state=sharding.with_shardings(abstract_state, state_shardings),
      abstract_lpips=sharding.with_shardings(abstract_lpips, lpips_shardings),
      batch_sharding=sharding.batch_sharding(mesh),
      init=jax.jit(build, out_shardings=(state_shardings, lpips_shardings)),
      train_step=train_step, eval_step=eval_step)


def stage(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> loop_lib.Stage:
  """The SDE stage for the shared loop: ``setup``'s pieces, the pretrained weights,
  the image pipeline, and the codebook-usage metric."""
  data_lib.validate_config(config.data)
  run = setup(config, mesh)
  models = run.models
  lpips_params = None
  usage = CodebookUsage(config.model.codebook_size, config.usage_window)
  pending_counts = []
  latest_step = 0   # the step of the last log: the usage warning names it

  def init():
    nonlocal lpips_params
    state, lpips_params = run.init()
    lpips_params = load_pretrained(run, state, lpips_params)
    return state

  def batches(process_index: int, process_count: int):
    return data_lib.build_train_pipeline(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=process_index, process_count=process_count)

  def step(state, batch, step: int):
    nonlocal latest_step
    use_gan = models.has_disc and step > config.loss.disc_start
    images = sharding.global_batch(batch["image"], run.batch_sharding)
    state, metrics, counts = run.train_step(state, lpips_params, images, use_gan)
    pending_counts.append(counts)
    latest_step = step
    return state, metrics

  def fresh_start(state, pipeline):
    if config.codebook.init == "kmeans++":
      return seed_codebook_from_data(run, state, pipeline, config)
    return state

  def log_metrics():
    for counts in jax.device_get(pending_counts):
      usage.add(counts)
    pending_counts.clear()
    return usage.scalars(config.codebook.usage_floor, latest_step)

  def run_eval(state, step: int, writer, workdir):
    return evaluate(run.eval_step, state, config, mesh, writer, step, workdir)

  return loop_lib.Stage(abstract_state=run.abstract_state, init=init, batches=batches,
                        step=step, evaluate=run_eval, log_metrics=log_metrics,
                        fresh_start=fresh_start, headline=HEADLINE)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) the SDE tokenizer with the shared loop; returns the final
  state, the last logged metrics and the step (see ``loop.train``)."""
  config_lib.validate_sde(config)
  return loop_lib.train(config, workdir, stage, stop_after=stop_after)
