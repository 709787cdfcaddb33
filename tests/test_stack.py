"""Layer stacks: scanned and unscanned layouts agree, convert exactly, and remat policies differ."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config, tiny_sde_config
from muse_jax import config_lib
from muse_jax.models import qwen2, sde, siglip, stack
from muse_jax.parallel import sharding
from muse_jax.train import llm_trainer

TINY = qwen2.Qwen2Config(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4,
                         num_kv_heads=2, mlp_dim=48, rope_theta=1e4, tie_word_embeddings=False)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 9)), jnp.int32)


def _scanned_copy(model):
  """The unscanned ``model``'s weights in the scanned layout (a new module)."""
  model = nnx.clone(model)
  for _, module in nnx.iter_modules(model):
    if isinstance(getattr(module, "layers", None), nnx.List):
      module.layers = stack.to_scanned(list(module.layers))
  return model


def _assert_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_layout_round_trip_is_exact_and_stacked_params_name_the_layers_axis():
  model = qwen2.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(0))
  scanned = stack.to_scanned(list(model.model.layers))
  kernel = scanned.self_attn.q_proj.kernel
  assert kernel.shape == (3, 32, 32)
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
  mesh = sharding.make_mesh(sharding.mesh_config(), jax.devices()[:1])
  assert sharding.logical_to_mesh(("layers", "embed", "heads"), kernel.shape, mesh)[0] is None
  back = stack.to_unscanned(scanned)
  assert back[1].self_attn.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
  again = stack.to_scanned(list(back))
  for a, b in zip(jax.tree.leaves(nnx.state(scanned)), jax.tree.leaves(nnx.state(again))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(nnx.state(model.model.layers)), jax.tree.leaves(nnx.state(back))):
    np.testing.assert_array_equal(a, b)


def test_decoder_logits_loss_gradients_and_greedy_decoding_agree_across_layouts():
  plain = qwen2.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(0))
  scanned = _scanned_copy(plain)
  assert stack.is_scanned(scanned.model.layers)
  # a seed gives the same weights in either layout
  built = qwen2.Qwen2ForCausalLM(dataclasses.replace(TINY, scan_layers=True), rngs=nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(nnx.state(scanned)), jax.tree.leaves(nnx.state(built))):
    np.testing.assert_array_equal(a, b)
  loss = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(IDS) ** 2)))
  value, grads = loss(plain)
  value_scanned, grads_scanned = loss(scanned)
  _assert_close(value_scanned, value)
  stacked = grads_scanned["model"]["layers"]["mlp"]["down_proj"]["kernel"][...]
  for i in range(TINY.num_layers):
    _assert_close(stacked[i], grads["model"]["layers"][i]["mlp"]["down_proj"]["kernel"][...])
  np.testing.assert_array_equal(qwen2.generate(scanned, IDS, 6), qwen2.generate(plain, IDS, 6))
  assert scanned.init_cache(2, 16).keys.shape == (3, 2, 2, 16, 8)


def test_scanned_init_traces_two_layers_whatever_the_depth():
  """Init builds the first layer and vmaps the rest, so its program does not grow with depth."""
  def equations(depth):
    config = dataclasses.replace(TINY, num_layers=depth, scan_layers=True)
    init = lambda: nnx.state(qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    return len(jax.make_jaxpr(init)().eqns)

  assert equations(3) == equations(12)


def test_siglip_tower_and_sde_forward_agree_across_layouts():
  """The SDE forward of the semantic ablation: a SigLIP tower, the quantiser and the
  semantic decoder (the image branch adds the same tower class and a pixel decoder,
  which has no stack and takes ~10 s to initialise here)."""
  config = tiny_sde_config(batch_size=2, total_steps=1, disc_start=1)
  config.model.update(mode="semantic")
  config.model.encoder.update(image_size=16, patch_size=4, depth=2)
  config.model.semantic_decoder.depth = 2
  plain = sde.SDETokenizer(config_lib.sde_model_config(config), rngs=nnx.Rngs(0))
  scanned = _scanned_copy(plain)
  assert stack.is_scanned(scanned.semantic_decoder.encoder.layers)
  assert stack.is_scanned(scanned.semantic_encoder.encoder.layers)
  config.model.scan_layers = True   # a seed gives the same weights in either layout
  built = sde.SDETokenizer(config_lib.sde_model_config(config), rngs=nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(nnx.state(scanned)), jax.tree.leaves(nnx.state(built))):
    np.testing.assert_array_equal(a, b)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  forward = nnx.jit(lambda m, x: (m.semantic_encoder(x), m(x)))
  (tower, out), (tower_scanned, out_scanned) = forward(plain, images), forward(scanned, images)
  _assert_close(tower_scanned, tower)
  for key in ("f", "semantic_prediction", "semantic_target"):
    _assert_close(out_scanned[key], out[key])
  np.testing.assert_array_equal(out_scanned["quantized"].codes, out["quantized"].codes)


def _grad_step_memory(policy):
  """(bytes of the residuals a grad step saves, compiled temporary bytes) of a tiny decoder."""
  config = dataclasses.replace(TINY, num_layers=8, hidden_size=64, mlp_dim=128,
                               scan_layers=True, remat_policy=policy)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen2.Qwen2ForCausalLM(config,
                                                                           rngs=nnx.Rngs(0))))
  ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  loss = lambda s, x: jnp.mean(nnx.merge(graphdef, s).hidden_states(x) ** 2)
  residuals = jax.eval_shape(lambda s, x: jax.vjp(lambda s: loss(s, x), s)[1], state, ids)
  saved = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))
  compiled = jax.jit(jax.grad(loss)).lower(state, ids).compile()
  return saved, compiled.memory_analysis().temp_size_in_bytes


def test_remat_policies_keep_less_in_the_expected_order():
  saved, temp = zip(*map(_grad_step_memory, ("none", "save_dots", "save_attn_mlp_out", "full")))
  assert saved[0] > saved[1] > saved[2] > saved[3], saved
  # compiled temporaries add each layer's working set of the recomputation: on XLA:CPU
  # "full" (which recomputes the attention and MLP outputs too) comes within a few
  # percent of "save_attn_mlp_out", either side, so only the saved bytes order those two
  assert temp[0] > temp[1] > max(temp[2], temp[3]), temp
  assert temp[3] < 1.1 * temp[2], temp


def test_siglip_encoder_rejects_unknown_policy_and_config_names_the_old_field():
  with pytest.raises(ValueError, match="save_dots"):
    siglip.Encoder(8, 1, 2, 16, 1e-6, rngs=nnx.Rngs(0), remat_policy="dots")
  config = load_config("muse_vl", "demo")
  config.model.remat = True
  with pytest.raises(config_lib.ConfigError, match="remat_policy='full'"):
    config_lib.validate_llm(config)


def test_scanned_decoder_train_step_matches_unscanned():
  metrics = {}
  for scan in (False, True):
    config = load_config("muse_vl", "demo")
    config.model.update(scan_layers=scan, remat_policy="save_attn_mlp_out" if scan else "none")
    config.update(batch_size=2, seq_len=16, loss_chunk=16)
    run = llm_trainer.setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    state = run.init()
    ids = np.random.default_rng(0).integers(0, run.model_config.vocab_size, (2, 16))
    batch = llm_trainer.next_token_targets(ids, np.ones((2, 16), np.int32))
    state, metrics[scan] = run.train_step(state, batch)
    _, metrics[scan] = run.train_step(state, batch)   # after one update with scanned gradients
  _assert_close(metrics[True]["loss/lm"], metrics[False]["loss/lm"])
