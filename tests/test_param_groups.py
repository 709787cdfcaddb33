"""Parameter groups of the decoder: frozen parts do not move, new vocabulary rows train
alone, a group's learning-rate scale scales its first update, bad groups name the field."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from conftest import load_config
from test_weights import write_hf_qwen2

from muse_jax import config_lib, weights
from muse_jax.convert import __main__ as convert_cli
from muse_jax.models import qwen2
from muse_jax.parallel import sharding
from muse_jax.train import llm_trainer, param_groups


def tiny_decoder_config():
  c = load_config("muse_vl", "demo")
  c.model.update(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64,
                 tie_word_embeddings=False, dtype="float32", remat_policy="none")
  c.vocab.num_visual = 64
  c.update(batch_size=2, seq_len=32, loss_chunk=32)
  c.optimizer.update(warmup_steps=0, schedule="constant", lr=1e-2)
  return c


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny converted HF checkpoint with the MUSE-VL rows added."""
  c = tiny_decoder_config()
  tmp = tmp_path_factory.mktemp("hf")
  write_hf_qwen2(tmp / "hf", qwen2.Qwen2Config(**dict(c.model.to_dict())))
  convert_cli.main(["llm-from-hf", "--hf_dir", str(tmp / "hf"), "--out", str(tmp / "vl"),
                    "--muse_vl", "--num_visual", "64"])
  return str(tmp / "vl")


def batch(c, seed=0):
  """Random ids over the whole vocabulary: text and visual targets both get gradients."""
  layout = config_lib.vocab_layout(c)
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, layout.eoi_id + 1, (c.batch_size, c.seq_len)).astype(np.int32)
  segments = np.ones_like(ids)
  return llm_trainer.next_token_targets(ids, segments, np.ones(ids.shape, bool))


def train(c, init_from, steps=2):
  """(params after ``steps`` steps from the converted weights, the initial params, Adam's
  first moments), each as {name: array}."""
  c.init_from = init_from
  run = llm_trainer.setup(c, sharding.make_mesh(sharding.mesh_config(data=1),
                                                jax.devices()[:1]))
  state = llm_trainer.load_pretrained(run, run.init(), c)
  initial = dict(weights.named_leaves(jax.device_get(state["params"])))
  initial = {k: np.asarray(v.get_value()) for k, v in initial.items()}
  for step in range(steps):
    state, _ = run.train_step(state, batch(c, step))
  final = {k: np.asarray(v.get_value())
           for k, v in weights.named_leaves(jax.device_get(state["params"]))}
  adam, = [s for s in jax.tree.leaves(state["opt_state"],
                                      is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  moments = {k: np.asarray(v.get_value() if hasattr(v, "get_value") else v)
             for k, v in weights.named_leaves(jax.device_get(adam.mu))}
  return final, initial, moments


def test_only_the_new_vocabulary_rows_train_and_nothing_else_moves(converted):
  c = tiny_decoder_config()
  first_phase = load_config("vlm_pretrain", "new_rows_only")   # the config's groups
  c.param_groups = first_phase.param_groups
  c.param_groups_default_lr_scale = first_phase.param_groups_default_lr_scale
  final, initial, moments = train(c, converted)
  text = config_lib.vocab_layout(c).text_size
  for name, before in initial.items():
    after = final[name]
    # frozen parts get no gradient at all: Adam's moments stay zero
    if name not in (llm_trainer.EMBEDDING, "lm_head/kernel"):
      assert not moments[name].any(), name
    if name == llm_trainer.EMBEDDING:
      np.testing.assert_array_equal(after[:text], before[:text])
      np.testing.assert_array_equal(before, weights.read(converted, name))
      assert np.abs(after[text:] - before[text:]).max() > 0
    elif name == "lm_head/kernel":
      np.testing.assert_array_equal(after[:, :text], before[:, :text])
      assert np.abs(after[:, text:] - before[:, text:]).max() > 0
    else:
      np.testing.assert_array_equal(after, before, err_msg=name)


def test_a_group_scale_scales_its_first_update(converted):
  plain_config = tiny_decoder_config()
  plain_config.optimizer.grad_clip = 0.0   # the frozen group would change the clip norm
  plain, start, _ = train(plain_config, converted, steps=1)
  c = tiny_decoder_config()
  c.optimizer.grad_clip = 0.0
  c.param_groups.mlp = dict(pattern=r"/mlp/", lr_scale=0.5)
  c.param_groups.attention = dict(pattern=r"self_attn", lr_scale=0.0)
  grouped, _, _ = train(c, converted, steps=1)
  for name, before in start.items():
    full, part = plain[name] - before, grouped[name] - before
    if "/mlp/" in name:
      # (differences of float32 parameters: a few ulps of the weights, ~1e-8)
      np.testing.assert_allclose(part, 0.5 * full, rtol=1e-5, atol=3e-8, err_msg=name)
    elif "self_attn" in name:
      assert not part.any(), name
    else:
      np.testing.assert_allclose(part, full, rtol=1e-5, atol=3e-8, err_msg=name)


def _unrolled(tensors):
  """{name: array} with each scanned stack's tensor split into its layers' names."""
  out = {}
  for name, value in tensors.items():
    names = param_groups.unrolled_names(name, value.shape)
    out.update(zip(names, value) if names != [name] else [(name, value)])
  return out


def test_groups_name_layers_the_same_way_in_a_scanned_stack(converted):
  """A pattern with a layer index freezes that slice of a scanned stack's tensors, and both
  layouts take the same grouped step."""
  def grouped_step(scan):
    c = tiny_decoder_config()
    c.model.scan_layers = scan
    c.optimizer.grad_clip = 0.0
    c.param_groups.last_layer = dict(pattern=r"layers/1/", lr_scale=0.0)
    c.param_groups.mlp = dict(pattern=r"/mlp/", lr_scale=0.5)
    final, start, _ = train(c, converted, steps=1)
    assert ("model/layers/mlp/up_proj/kernel" in final) == scan
    return _unrolled(final), _unrolled(start)

  (plain, start), (scanned, scanned_start) = grouped_step(False), grouped_step(True)
  assert sorted(scanned) == sorted(plain) and "model/layers/1/mlp/up_proj/kernel" in plain
  for name, before in start.items():
    np.testing.assert_array_equal(scanned_start[name], before, err_msg=name)
    np.testing.assert_allclose(scanned[name], plain[name], rtol=1e-5, atol=3e-8, err_msg=name)
    moved = (plain[name] != before).any()
    assert moved == ("layers/1/" not in name), name


@pytest.mark.parametrize("group, message", [
    (dict(pattern="embed_tokenz"), r"param_groups.g.pattern: 'embed_tokenz' matches no "
                                   r"parameter"),
    (dict(pattern="("), r"param_groups.g.pattern: '\(' is not a regular expression"),
    (dict(pattern="mlp", lr_scale=-1.0), r"param_groups.g.lr_scale: -1.0"),
    (dict(pattern="mlp", rows="old"), r"param_groups.g.rows: 'old' is unknown"),
    (dict(patern="mlp"), r"param_groups.g: has the fields \['patern'\]"),
])
def test_bad_groups_name_the_field(group, message):
  c = tiny_decoder_config()
  c.param_groups.g = group
  with pytest.raises(config_lib.ConfigError, match=message):
    llm_trainer.setup(c, sharding.make_mesh(sharding.mesh_config(data=1), jax.devices()[:1]))
