"""MUSE-VL vocabulary layout, code <-> id helpers, and extension from existing-row statistics."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muse_jax.models import muse_vl, qwen2


def test_layout_for_published_base_models():
  qwen = muse_vl.VocabLayout(qwen2.Qwen2Config.preset("qwen2.5-7b").vocab_size)
  assert (qwen.visual_start, qwen.visual_end) == (152064, 152064 + 32768)
  assert (qwen.soi_id, qwen.eoi_id) == (184832, 184833)
  assert qwen.vocab_size == 184960 and qwen.vocab_size % 128 == 0
  small = muse_vl.VocabLayout(qwen2.Qwen2Config.preset("qwen2.5-0.5b").vocab_size)
  assert (small.soi_id, small.vocab_size) == (184704, 184832)
  yi = muse_vl.VocabLayout(64000)
  assert (yi.soi_id, yi.eoi_id, yi.vocab_size) == (96768, 96769, 96896)


def test_codes_and_ids_round_trip():
  layout = muse_vl.VocabLayout(1000, num_visual=64, pad_multiple=16)
  codes = jnp.array([[0, 5, 63], [7, 7, 1]])
  ids = layout.codes_to_ids(codes)
  np.testing.assert_array_equal(ids, codes + 1000)
  np.testing.assert_array_equal(layout.ids_to_codes(ids), codes)
  np.testing.assert_array_equal(layout.ids_to_codes(jnp.array([999, 1064, 1065, 3])), [-1] * 4)
  np.testing.assert_array_equal(layout.is_visual(jnp.array([999, 1000, 1063, 1064])),
                                [False, True, True, False])
  seq = layout.image_tokens(codes)
  assert seq.shape == (2, 5)
  np.testing.assert_array_equal(seq[:, 0], layout.soi_id)
  np.testing.assert_array_equal(seq[:, -1], layout.eoi_id)
  np.testing.assert_array_equal(layout.ids_to_codes(seq[:, 1:-1]), codes)
  assert (layout.soi_id, layout.eoi_id, layout.vocab_size) == (1064, 1065, 1072)
  assert muse_vl.visual_token(12) == "<|vis_12|>"


def _correlated_table(rows, width, seed=0):
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(width, width))
  return (rng.normal(size=(rows, width)) @ mixing * 0.1 + rng.normal(size=width)).astype(np.float32)


def test_extend_vocab_keeps_old_rows_and_matches_their_statistics():
  table = _correlated_table(4000, 8)
  grown = muse_vl.extend_vocab(table, 24000, np.random.default_rng(1))
  assert grown.shape == (24000, 8) and grown.dtype == table.dtype
  np.testing.assert_array_equal(grown[:4000], table)
  new = grown[4000:].astype(np.float64)
  mean, cov = muse_vl.row_statistics(table)
  np.testing.assert_allclose(mean, table.astype(np.float64).mean(0), atol=1e-6)
  np.testing.assert_allclose(cov, np.cov(table.astype(np.float64), rowvar=False), atol=1e-6)
  spread = np.sqrt(np.diag(cov))
  assert np.all(np.abs(new.mean(0) - mean) < 0.05 * spread)
  np.testing.assert_allclose(np.cov(new, rowvar=False), cov, atol=0.05 * spread.max() ** 2)
  # LM-head layout [E, V]: rows are columns, same statistics
  head = muse_vl.extend_vocab(table.T.copy(), 24000, np.random.default_rng(1), axis=1)
  np.testing.assert_array_equal(head, grown.T)
  # scale 0: every new row is the mean row
  flat = muse_vl.extend_vocab(table, 4010, np.random.default_rng(2), scale=0.0)
  np.testing.assert_allclose(flat[4000:], np.broadcast_to(mean, (10, 8)), atol=1e-6)
  with pytest.raises(ValueError, match="cannot extend"):
    muse_vl.extend_vocab(table, 10, np.random.default_rng(0))


def test_extend_vocab_survives_rank_deficient_tables():
  table = np.zeros((300, 6), np.float32)
  table[:200, :3] = np.random.default_rng(0).normal(size=(200, 3))
  grown = muse_vl.extend_vocab(table, 400, np.random.default_rng(0))
  assert np.isfinite(grown).all()
  # no real spread where the table has none (only the tiny ridge)
  assert np.abs(grown[300:, 3:]).max() < 0.01 * grown[300:, :3].std()


@pytest.mark.parametrize("tied", [True, False])
def test_muse_vl_from_llm_keeps_text_behaviour(tied):
  config = qwen2.Qwen2Config(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1, mlp_dim=32, tie_word_embeddings=tied)
  llm = qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
  model = muse_vl.MuseVL.from_llm(llm, num_visual=40, seed=3)
  layout = model.layout
  assert model.llm.config.vocab_size == layout.vocab_size == 256
  assert model.llm.model.embed_tokens.embedding[...].shape == (256, 16)
  ids = jnp.array([[1, 5, 99, 7]], jnp.int32)
  forward = nnx.jit(lambda m, x: m(x))
  text_logits = forward(model, ids)
  np.testing.assert_allclose(text_logits[..., :100], forward(llm, ids), atol=1e-5)
  # visual ids are real inputs now, and visual_logits is the visual slice of the logits
  mixed = jnp.concatenate([ids, layout.image_tokens(jnp.array([[0, 39, 2]]))], axis=1)
  hidden = nnx.jit(lambda m, x: m.hidden_states(x))(model, mixed)
  full = nnx.jit(lambda m, h: m.llm.logits(h))(model, hidden)
  visual = nnx.jit(lambda m, h: m.visual_logits(h))(model, hidden)
  assert visual.shape == (1, 9, 40)
  np.testing.assert_allclose(visual, full[..., layout.visual_start:layout.visual_end], atol=1e-5)
  with pytest.raises(ValueError, match="does not match the MUSE-VL layout"):
    muse_vl.MuseVL(config, layout, rngs=nnx.Rngs(0))
