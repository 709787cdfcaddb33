"""Independent oracles: the training losses and the LR schedule recomputed by hand.

Every other trainer test compares the code with itself (straight vs resumed, sharded vs one
device), so a mistake made on both sides passes. Here each loss term is recomputed in numpy
from the model's raw outputs (features, codebook, reconstruction, VGG taps, discriminator
logits, LM logits) and the reported total must equal the configured weighted sum.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, tiny_sde_config
from flax import nnx

from muse_jax import config_lib
from muse_jax.models import qwen2
from muse_jax.parallel import sharding
from muse_jax.train import llm_trainer, lm_loss, optimizers, sde_trainer

# distinct weights: a dropped or swapped weight changes the total
SDE_WEIGHTS = dict(l2_weight=0.7, perceptual_weight=1.3, semantic_weight=0.9, codebook_weight=1.1,
                   commitment_beta=0.25, entropy_weight=0.05, entropy_temperature=0.5,
                   disc_weight=0.4)


def _np(x):
  return np.asarray(jax.device_get(x), np.float64)


def _entropy_np(f, book, temperature):
  """Mean per-token entropy of softmax(-d^2 / T) minus the entropy of the mean assignment."""
  d2 = ((f[:, None, :] - book[None]) ** 2).sum(-1)
  logits = -d2 / temperature
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  per_token = -np.mean(np.sum(p * np.log(np.maximum(p, 1e-300)), -1))
  mean_p = p.mean(0)
  return per_token + np.sum(mean_p * np.log(mean_p + 1e-10))


def _sde_oracle(run, state, lpips_params, images, config):
  """Each generator loss term recomputed in numpy from the model's outputs."""
  models, lc = run.models, config.loss
  out = models.tokenizer(state["params"], state["frozen"])(
      images, entropy_temperature=lc.entropy_temperature)
  f = _np(out["f"]).reshape(-1, config.model.code_dim)
  raw = _np(state["params"]["quantizer"]["codebook"][...])
  book = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
  codes = ((f[:, None, :] - book[None]) ** 2).sum(-1).argmin(-1)
  z_q = book[codes]
  np.testing.assert_array_equal(np.asarray(out["quantized"].codes).reshape(-1), codes)
  x, recon = _np(images), _np(out["reconstruction"])
  lpips = nnx.merge(models.lpips_graphdef, lpips_params)
  lpips_value = 0.0
  for k, (fx, fy) in enumerate(zip(lpips.taps(images), lpips.taps(out["reconstruction"]))):
    head = _np(getattr(lpips, f"lin{k}").kernel[...]).reshape(-1)   # 1x1 conv -> one unit
    lpips_value += np.mean(((_np(fx) - _np(fy)) ** 2) @ head)
  pred, target = _np(out["semantic_prediction"]), _np(out["semantic_target"])
  cosine = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1)
                                      * np.linalg.norm(target, axis=-1))
  disc = nnx.merge(models.disc_graphdef, state["disc_params"])
  fake_logits, real_logits = _np(disc(out["reconstruction"])), _np(disc(images))
  return {
      "loss/l2": np.mean((x - recon) ** 2),
      "loss/lpips": lpips_value,
      "loss/semantic": np.mean(1.0 - cosine),
      "loss/codebook": np.mean((f - z_q) ** 2),
      "loss/commitment": np.mean((f - z_q) ** 2),
      "loss/entropy": _entropy_np(f, book, lc.entropy_temperature),
      "loss/generator_adv": -np.mean(fake_logits),
      "loss/discriminator": 0.5 * (np.mean(np.maximum(0, 1 - real_logits))
                                   + np.mean(np.maximum(0, 1 + fake_logits))),
  }


@pytest.fixture(scope="module")
def sde_run():
  config = tiny_sde_config(batch_size=2, total_steps=10, disc_start=0)
  config.loss.update(SDE_WEIGHTS)
  config.optimizer.update(lr=3e-3, warmup_steps=4, schedule="cosine")
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run = sde_trainer.setup(config, mesh)
  state, lpips_params = run.init()
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  oracle = _sde_oracle(run, state, lpips_params, jnp.asarray(images), config)
  return config, run, state, lpips_params, images, oracle


@pytest.mark.parametrize("use_gan", [False, True], ids=["before_disc_start", "after_disc_start"])
def test_sde_total_is_the_configured_weighted_sum(sde_run, use_gan):
  config, run, state, lpips_params, images, oracle = sde_run
  lc = config.loss
  copy = jax.tree.map(jnp.copy, state)      # the step donates its state
  _, metrics, _ = run.train_step(copy, lpips_params, images, use_gan)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  expected = (lc.l2_weight * oracle["loss/l2"] + lc.perceptual_weight * oracle["loss/lpips"]
              + lc.semantic_weight * oracle["loss/semantic"]
              + lc.codebook_weight * (oracle["loss/codebook"]
                                      + lc.commitment_beta * oracle["loss/commitment"])
              + lc.entropy_weight * oracle["loss/entropy"])
  gan_terms = ("loss/generator_adv", "loss/discriminator")
  if use_gan:
    expected += lc.disc_weight * oracle["loss/generator_adv"]
  else:
    assert not set(gan_terms) & set(metrics), "GAN terms reported before disc_start"
  for name, value in oracle.items():
    if use_gan or name not in gan_terms:
      np.testing.assert_allclose(metrics[name], value, rtol=2e-4, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(metrics["loss/total"], expected, rtol=1e-4, err_msg="loss/total")
  # the terms are large enough that any dropped weight shows above the tolerance
  assert min(abs(oracle[k]) for k in ("loss/codebook", "loss/generator_adv")) > 1e-3
  assert metrics["lr"] == 0.0    # step 0 of a linear warmup


def test_next_token_targets_at_segment_boundaries():
  """Two packed documents, padding, and a response-only mask, written out by hand."""
  ids = np.array([[11, 12, 13, 21, 22, 23, 24, 0, 0]])
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0]])
  batch = llm_trainer.next_token_targets(ids, segment_ids)
  np.testing.assert_array_equal(batch["targets"], [[12, 13, 21, 22, 23, 24, 0, 0, 0]])
  # position 2 (end of doc 1) must not predict doc 2's first token; 6 is doc 2's last
  np.testing.assert_array_equal(batch["weights"], [[1, 1, 0, 1, 1, 1, 0, 0, 0]])
  response = np.array([[0, 0, 1, 0, 0, 1, 1, 0, 0]], bool)   # predicted tokens with loss
  masked = llm_trainer.next_token_targets(ids, segment_ids, loss_mask=response)
  np.testing.assert_array_equal(masked["weights"], [[0, 1, 0, 0, 1, 1, 0, 0, 0]])


def _nll_np(logits, targets, weights):
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return (nll * weights).sum() / weights.sum()


@pytest.mark.parametrize("chunk", [64, 24], ids=["one_chunk", "padded_chunks"])
def test_chunked_cross_entropy_is_the_weighted_mean_nll(chunk):
  rng = np.random.default_rng(3)
  hidden = rng.normal(size=(2, 64, 16)).astype(np.float32)
  kernel = rng.normal(size=(16, 50)).astype(np.float32)
  targets = rng.integers(0, 50, (2, 64))
  weights = (rng.uniform(size=(2, 64)) < 0.3).astype(np.float32)
  got = lm_loss.chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(kernel),
                                      jnp.asarray(targets), jnp.asarray(weights), chunk=chunk)
  np.testing.assert_allclose(float(got), _nll_np(hidden @ kernel, targets, weights), rtol=1e-5)


def test_decoder_step_loss_is_masked_next_token_nll():
  """The train step's loss equals the NLL of the model's own logits, averaged over exactly
  the positions that predict a same-segment, unmasked next token."""
  config = load_config("muse_vl", "demo")
  config.update(batch_size=2, seq_len=16, loss_chunk=16)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run = llm_trainer.setup(config, mesh)
  state = run.init()
  rng = np.random.default_rng(4)
  ids = rng.integers(0, run.model_config.vocab_size, (2, 16))
  segment_ids = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 10 + [2] * 6])
  loss_mask = rng.uniform(size=(2, 16)) < 0.7
  batch = llm_trainer.next_token_targets(ids, segment_ids, loss_mask)
  # weights by hand: t predicts t+1 when both are in the same real segment and t+1 has loss
  weights = np.zeros((2, 16))
  for b in range(2):
    for t in range(15):
      same = segment_ids[b, t] > 0 and segment_ids[b, t + 1] == segment_ids[b, t]
      weights[b, t] = float(same and loss_mask[b, t + 1])
  np.testing.assert_array_equal(batch["weights"], weights)
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(
      lambda: qwen2.Qwen2ForCausalLM(run.model_config, rngs=nnx.Rngs(0)))), state["params"])
  logits = _np(model(jnp.asarray(ids, jnp.int32), segment_ids=jnp.asarray(segment_ids)))
  expected = _nll_np(logits, np.roll(ids, -1, axis=1), weights)
  _, metrics = run.train_step(jax.tree.map(jnp.copy, state), batch)
  np.testing.assert_allclose(float(metrics["loss/lm"]), expected, rtol=1e-4)
  assert float(metrics["tokens_with_loss"]) == weights.sum()
  # per task: the same mean over the positions whose target is a visual id, and the rest
  targets = np.roll(ids, -1, axis=1)
  visual = config_lib.vocab_layout(config).is_visual(targets)
  assert 0 < np.sum(weights * visual) < weights.sum()
  for name, part in (("visual", visual), ("text", ~visual)):
    np.testing.assert_allclose(float(metrics[f"loss/{name}"]),
                               _nll_np(logits, targets, weights * part), rtol=1e-4)
    correct = (logits.argmax(-1) == targets) * weights * part
    np.testing.assert_allclose(float(metrics[f"accuracy/{name}"]),
                               correct.sum() / (weights * part).sum(), rtol=1e-6)


def _opt_config(schedule, warmup, lr=2e-3):
  c = load_config("muse_vl", "demo").optimizer
  c.update(schedule=schedule, warmup_steps=warmup, lr=lr)
  return c


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (5, 1e-3), (10, 2e-3),                        # linear warmup over 10 steps
    (55, 1e-3),                                             # cosine half-way from 10 to 100
    (32.5, 1e-3 * (1 + math.cos(math.pi / 4))),             # a quarter of the way
    (100, 0.0), (150, 0.0),                                 # decayed to 0 at total_steps
])
def test_cosine_schedule_breakpoints(step, expected):
  lr = optimizers.schedule(_opt_config("cosine", 10), total_steps=100)
  np.testing.assert_allclose(float(lr(step)), expected, atol=1e-9)


@pytest.mark.parametrize("warmup, step, expected", [
    (4, 0, 0.0), (4, 1, 5e-4), (4, 4, 2e-3), (4, 10_000, 2e-3), (0, 0, 2e-3), (0, 99, 2e-3),
])
def test_constant_schedule_breakpoints(warmup, step, expected):
  lr = optimizers.schedule(_opt_config("constant", warmup), total_steps=100)
  np.testing.assert_allclose(float(lr(step)), expected, atol=1e-9)


def test_adam_applies_the_scheduled_rate():
  """One Adam step moves every parameter by lr(step) * sign(grad) (first step, no decay)."""
  c = _opt_config("cosine", 2)
  c.update(grad_clip=0.0, weight_decay=0.0, eps=1e-12)
  tx, lr = optimizers.adam(c, total_steps=10)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([0.5, -2.0, 1.0])}
  state = tx.init(params)
  state = tx.update(grads, state, params)[1]               # step 0: lr 0
  updates, _ = tx.update(grads, state, params)             # step 1: lr = half the peak
  np.testing.assert_allclose(_np(updates["w"]), -float(lr(1)) * np.sign(_np(grads["w"])),
                             rtol=1e-5)
  assert float(lr(1)) == pytest.approx(1e-3)


def _rope_np(x, positions, theta):
  """HF rotate-half RoPE in complex numbers: pair (x_i, x_{i+d/2}) turns by p * theta^(-2i/d)."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[..., None, None] * freq)
  return np.concatenate([z.real, z.imag], -1)


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_against_complex_rotation(theta):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)     # [B, T, heads, head_dim]
  positions = np.array([np.arange(7), [0, 1, 2, 0, 1, 5, 900]])
  cos, sin = qwen2.rope_tables(jnp.asarray(positions), 16, theta, jnp.float32)
  got = qwen2.apply_rope(jnp.asarray(x), cos, sin)
  np.testing.assert_allclose(_np(got), _rope_np(x.astype(np.float64), positions, theta),
                             atol=2e-4)


def test_model_uses_the_configured_rope_theta():
  """Same weights, two θ: position 0 is unrotated (identical logits), later ones differ."""
  base = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
              mlp_dim=64)
  ids = jnp.asarray(np.random.default_rng(6).integers(0, 64, (1, 12)), jnp.int32)
  logits = []
  for theta in (1e6, 10.0):
    model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(rope_theta=theta, **base),
                                   rngs=nnx.Rngs(0))
    logits.append(_np(model(ids)))
  np.testing.assert_allclose(logits[0][:, 0], logits[1][:, 0], rtol=1e-5)
  assert np.abs(logits[0][:, 1:] - logits[1][:, 1:]).max() > 1e-3
