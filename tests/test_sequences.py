"""MUSE-VL sequence formats (loss masks token by token), packing, and the demo tokenizer."""

from __future__ import annotations

import json
import pickle

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muse_jax import config_lib
from muse_jax.data import packing
from muse_jax.data import pipeline
from muse_jax.data import sequences
from muse_jax.data import text_tokenizer
from muse_jax.kernels import attention
from muse_jax.models import qwen2
from muse_jax.train import llm_trainer
from tests import references

CAPTIONS = ["A dog runs on the grass.", "A red car parked by the sea.",
            "Two cats sleep on a sofa.", "What is it? A dog. And the color? Red.",
            "Show me a photo. Please generate an image."]
CODES = np.array([3, 1, 2])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """(tokenizer loaded by AutoTokenizer, layout) of a demo tokenizer with 64 visual codes."""
  transformers = references.require("transformers")
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  layout = text_tokenizer.build_demo_tokenizer(CAPTIONS * 4, directory, vocab_size=300,
                                               num_visual=64)
  return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True), layout


def _encode(tokenizer, text):
  return tokenizer.encode(text, add_special_tokens=False)


def _expected(tokenizer, pieces):
  """(ids, loss_mask) from hand-written (text or id list, loss) pieces."""
  ids, mask = [], []
  for piece, loss in pieces:
    piece_ids = _encode(tokenizer, piece) if isinstance(piece, str) else list(piece)
    ids += piece_ids
    mask += [loss] * len(piece_ids)
  return ids, mask


def _image(layout):
  return [layout.soi_id, *(layout.visual_start + CODES), layout.eoi_id]


def _check(out, ids, mask):
  assert out["ids"].dtype == np.int32 and out["loss_mask"].dtype == bool
  np.testing.assert_array_equal(out["ids"], ids)
  np.testing.assert_array_equal(out["loss_mask"], mask)


def test_demo_tokenizer_has_chatml_and_the_layout_tokens(tok):
  tokenizer, layout = tok
  assert layout.text_size == 300 and len(tokenizer) == layout.eoi_id + 1
  assert tokenizer.convert_tokens_to_ids(["<soi>", "<|vis_0|>", "<|vis_63|>", "<eoi>"]) == [
      layout.soi_id, layout.visual_start, layout.visual_end - 1, layout.eoi_id]
  assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
  assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True) == (
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert tokenizer.decode(_image(layout)) == "<soi><|vis_3|><|vis_1|><|vis_2|><eoi>"
  text = "A dog runs on the grass."
  assert tokenizer.decode(_encode(tokenizer, text)) == text
  assert max(_encode(tokenizer, "<|im_start|>" + text + "<|im_end|>")) < layout.text_size


def test_pretrain_both_orders_loss_on_everything(tok):
  tokenizer, layout = tok
  example = {"codes": CODES, "caption": "A dog runs."}
  eos = [tokenizer.eos_token_id]
  rng = np.random.default_rng(0)
  image_first = sequences.PretrainFormat(tokenizer, layout, image_first_ratio=1.0)
  _check(image_first.build(example, rng),
         *_expected(tokenizer, [(_image(layout), True), ("A dog runs.", True), (eos, True)]))
  caption_first = sequences.PretrainFormat(tokenizer, layout, image_first_ratio=0.0)
  _check(caption_first.build(example, rng),
         *_expected(tokenizer, [("A dog runs.", True), (_image(layout), True), (eos, True)]))
  # pre-tokenized text gives the same sequence
  pre = {"codes": CODES, "caption_ids": np.array(_encode(tokenizer, "A dog runs."))}
  _check(caption_first.build(pre, rng), *_expected(
      tokenizer, [("A dog runs.", True), (_image(layout), True), (eos, True)]))


@pytest.mark.parametrize("example, reason", [
    ({"codes": CODES}, "missing_caption"),
    ({"codes": CODES, "caption_ids": np.zeros(0, np.int32)}, "empty_caption"),
    ({"codes": CODES, "caption_ids": np.array([4, -1])}, "bad_caption_ids"),
    ({"codes": np.array([0, 64]), "caption": "A dog."}, "bad_codes"),
    ({"codes": np.array([0.5]), "caption": "A dog."}, "bad_codes"),
    ({"caption": "A dog."}, "bad_codes"),
])
def test_unusable_pairs_become_skip_markers(tok, example, reason):
  fmt = sequences.PretrainFormat(*tok)
  assert fmt(example, np.random.default_rng(0)) == {pipeline.SKIP_KEY: reason}
  # markers pass through the formats untouched
  assert fmt({pipeline.SKIP_KEY: "corrupt"}, None) == {pipeline.SKIP_KEY: "corrupt"}


def test_a_grid_of_codes_is_read_row_by_row(tok):
  fmt = sequences.PretrainFormat(*tok, image_first_ratio=1.0)
  rng = np.random.default_rng(0)
  flat = fmt.build({"codes": np.array([3, 1, 2, 0]), "caption": "A dog."}, rng)
  _check(fmt.build({"codes": np.array([[3, 1], [2, 0]]), "caption": "A dog."}, rng),
         flat["ids"], flat["loss_mask"])


CONVERSATION = [{"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A dog."},
                {"from": "human", "value": "And the color?"},
                {"from": "gpt", "value": "Red."}]


def test_understanding_loss_on_assistant_turns_only(tok):
  tokenizer, layout = tok
  fmt = sequences.UnderstandingFormat(tokenizer, layout)
  out = fmt.build({"codes": CODES, "conversations": CONVERSATION})
  pieces = [("<|im_start|>user\n", False), (_image(layout), False),
            ("\nWhat is it?<|im_end|>\n<|im_start|>assistant\n", False),
            ("A dog.<|im_end|>", True),
            ("\n<|im_start|>user\nAnd the color?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Red.<|im_end|>", True), ("\n", False)]
  _check(out, *_expected(tokenizer, pieces))
  # piecewise tokenization equals tokenizing the whole rendered text
  whole = "".join(p if isinstance(p, str) else tokenizer.decode(p) for p, _ in pieces)
  np.testing.assert_array_equal(out["ids"], _encode(tokenizer, whole))
  assert tokenizer.decode(out["ids"][out["loss_mask"]]) == "A dog.<|im_end|>Red.<|im_end|>"

  # role/content turns, no placeholder: the image opens the first user turn; a
  # system turn and a trailing user turn (dropped) never get loss
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is it?"},
              {"role": "assistant", "content": "A dog."},
              {"role": "user", "content": "Unanswered."}]
  _check(fmt.build({"codes": CODES, "conversations": messages}), *_expected(tokenizer, [
      ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n", False),
      (_image(layout), False), ("\nWhat is it?<|im_end|>\n<|im_start|>assistant\n", False),
      ("A dog.<|im_end|>", True), ("\n", False)]))


@pytest.mark.parametrize("conversation, reason", [
    ([{"from": "human", "value": "<image> hi"}], "bad_conversation"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
     "bad_conversation"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}],
     "bad_conversation"),
    ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "bad_conversation"),
    ([{"from": "human", "value": "<soi> hi"}, {"from": "gpt", "value": "x"}],
     "text_has_image_tokens"),
    ("<image> hi", "bad_conversation"),
    (["<image> hi", "x"], "bad_conversation"),
])
def test_unusable_conversations_become_skip_markers(tok, conversation, reason):
  fmt = sequences.UnderstandingFormat(*tok)
  assert fmt({"codes": CODES, "conversations": conversation}) == {pipeline.SKIP_KEY: reason}


def test_generation_loss_on_visual_ids_and_eoi(tok):
  tokenizer, layout = tok
  rng = np.random.default_rng(0)
  example = {"codes": CODES, "caption": "A red car."}
  keep = sequences.GenerationFormat(tokenizer, layout, system_texts=["Show me a photo."],
                                    caption_drop_prob=0.0)
  pieces = [("<|im_start|>user\nShow me a photo.\nA red car.<|im_end|>\n<|im_start|>assistant\n",
             False), ([layout.soi_id], False), (list(layout.visual_start + CODES), True),
            ([layout.eoi_id], True)]
  out = keep.build(example, rng)
  _check(out, *_expected(tokenizer, pieces))
  _check(keep.build({"codes": CODES, "caption_ids": _encode(tokenizer, "A red car.")}, rng),
         *_expected(tokenizer, pieces))
  drop = sequences.GenerationFormat(tokenizer, layout, system_texts=["Show me a photo."],
                                    caption_drop_prob=1.0)
  _check(drop.build(example, rng), *_expected(tokenizer, [
      ("<|im_start|>user\nShow me a photo.<|im_end|>\n<|im_start|>assistant\n", False),
      ([layout.soi_id], False), (list(layout.visual_start + CODES), True),
      ([layout.eoi_id], True)]))
  # through the train step's targets: exactly the positions predicting the codes and <eoi>
  batch = llm_trainer.next_token_targets(out["ids"][None], np.ones((1, len(out["ids"]))),
                                         out["loss_mask"][None])
  weighted = batch["targets"][0][batch["weights"][0] > 0]
  np.testing.assert_array_equal(weighted, [*(layout.visual_start + CODES), layout.eoi_id])


def _through_grain(fmt, examples, seed):
  return list(grain.MapDataset.source(examples).random_map(fmt, seed=seed))


def test_order_ratio_and_caption_dropping_follow_the_seed(tok):
  tokenizer, layout = tok
  examples = [{"codes": CODES, "caption_ids": np.array([5 + i % 7])} for i in range(400)]
  pretrain = sequences.PretrainFormat(tokenizer, layout, image_first_ratio=0.3)
  # a pickled copy (what Grain's worker processes get) draws the same
  copy = pickle.loads(pickle.dumps(pretrain))
  runs = [_through_grain(fmt, examples, seed) for fmt, seed in
          ((pretrain, 1), (copy, 1), (pretrain, 2))]
  first = [[int(out["ids"][0] == layout.soi_id) for out in run] for run in runs]
  assert first[0] == first[1] and first[0] != first[2]
  assert 0.25 < np.mean(first[0]) < 0.35

  systems = ["Show me a photo.", "Please generate an image."]
  gen = sequences.GenerationFormat(tokenizer, layout, system_texts=systems,
                                   caption_drop_prob=0.2)
  runs = [_through_grain(gen, examples, seed) for seed in (1, 1, 2)]
  lengths = [[len(out["ids"]) for out in run] for run in runs]
  assert lengths[0] == lengths[1] and lengths[0] != lengths[2]
  texts = [tokenizer.decode(out["ids"]) for out in runs[0]]
  dropped = [any(f"{s}<|im_end|>" in t for s in systems) for t in texts]
  assert 0.15 < np.mean(dropped) < 0.25
  for system in systems:
    assert 0.4 < np.mean([system in t for t in texts]) < 0.6


def test_bad_configs_name_the_field(tok):
  tokenizer, layout = tok
  with pytest.raises(config_lib.ConfigError, match="config.sequences.image_first_ratio"):
    sequences.PretrainFormat(tokenizer, layout, image_first_ratio=1.5)
  with pytest.raises(config_lib.ConfigError, match="config.sequences.system_texts"):
    sequences.GenerationFormat(tokenizer, layout, system_texts=[])
  with pytest.raises(config_lib.ConfigError, match="config.sequences.caption_drop_prob"):
    sequences.GenerationFormat(tokenizer, layout, system_texts=["Draw."], caption_drop_prob=-1)
  with pytest.raises(config_lib.ConfigError, match="config.model.vocab_size"):
    sequences.PretrainFormat(tokenizer, type(layout)(layout.text_size + 1, 64))
  with pytest.raises(config_lib.ConfigError, match="config.seq_len"):
    packing.PackIterDataset(grain.MapDataset.source([]).to_iter_dataset(), 0)
  no_template = type(tokenizer).from_pretrained(tokenizer.name_or_path)
  no_template.chat_template = None
  with pytest.raises(config_lib.ConfigError, match="config.tokenizer_dir: .*no chat template"):
    sequences.UnderstandingFormat(no_template, layout)
  # a template whose renderings of a conversation's prefixes do not extend each other
  no_template.chat_template = "{{ messages[-1]['content'] }}"
  with pytest.raises(config_lib.ConfigError, match="config.tokenizer_dir: .*inconsistently"):
    sequences.UnderstandingFormat(no_template, layout).build(
        {"codes": CODES, "conversations": CONVERSATION})


def _sequence(length, start):
  ids = np.arange(start, start + length, dtype=np.int32)
  return {"ids": ids, "loss_mask": ids % 3 != 0}


def _unpack(rows):
  """The sequences of packed rows, in row order."""
  out = []
  for row in rows:
    for segment in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == segment
      assert np.all(np.diff(np.flatnonzero(where)) == 1)  # contiguous
      out.append((row["ids"][where], row["loss_mask"][where]))
  return out


def test_packing_drops_and_counts_never_cuts():
  lengths = [5, 3, 9, 2, 11, 4, 6]  # 11 > seq_len: dropped
  stream = [_sequence(n, 100 * i) for i, n in enumerate(lengths)]
  stream.insert(3, {pipeline.SKIP_KEY: "bad_codes"})
  it = packing.PackIterDataset(grain.MapDataset.source(stream).to_iter_dataset(), 10,
                               buffer_size=4).__iter__()
  rows = list(it)
  # buffer 1: lengths 5, 3, 9 (+ the marker) -> [9], [5, 3]; buffer 2: 2, 11, 4, 6 -> [4, 6], [2]
  assert [r["segment_ids"].tolist() for r in rows] == [
      [1] * 9 + [0], [1] * 5 + [2] * 3 + [0] * 2, [1] * 4 + [2] * 6, [1] * 2 + [0] * 8]
  packed = _unpack(rows)
  expected = [stream[i] for i in (2, 0, 1, 6, 7, 4)]
  for (ids, mask), sequence in zip(packed, expected):
    np.testing.assert_array_equal(ids, sequence["ids"])
    np.testing.assert_array_equal(mask, sequence["loss_mask"])
  for row in rows:
    assert not row["loss_mask"][row["segment_ids"] == 0].any()
    assert (row["ids"][row["segment_ids"] == 0] == 0).all()
  assert it.counters() == {"data/sequences": 6, "data/dropped_too_long": 1,
                           "data/skipped_bad_codes": 1, "data/rows": 4,
                           "data/padding_tokens": 11, "data/padding_fraction": 11 / 40}


def test_packed_segments_never_attend_across_each_other():
  stream = [_sequence(n, 7 * i + 1) for i, n in enumerate([4, 3, 5, 2, 6])]
  rows = list(packing.PackIterDataset(grain.MapDataset.source(stream).to_iter_dataset(), 12,
                                      buffer_size=5))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  segments, positions = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"])
  real = batch["segment_ids"] > 0  # (segment_positions counts padding as a segment too)
  np.testing.assert_array_equal(batch["positions"][real],
                                np.asarray(qwen2.segment_positions(segments))[real])
  mask = np.asarray(attention.SelfMask(True, segments, positions).dense(12, len(rows)))[:, 0]
  for b in range(len(rows)):
    s = batch["segment_ids"][b]
    allowed = (s[:, None] == s[None, :]) & (s[None, :] > 0) & (
        np.arange(12)[None, :] <= np.arange(12)[:, None])
    np.testing.assert_array_equal(mask[b], allowed)
  # the decoder gives each packed sequence the logits it gets alone (alone: at the start
  # of its own row, no segment ids; causality keeps the padding after it out)
  config = qwen2.Qwen2Config(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                             num_kv_heads=1, mlp_dim=32)
  model = qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, ids, segment_ids: m(ids, segment_ids=segment_ids))
  packed = np.asarray(forward(model, jnp.asarray(batch["ids"]), segments))
  alone_ids = np.zeros((len(stream), 12), np.int32)
  for i, sequence in enumerate(stream):
    alone_ids[i, :len(sequence["ids"])] = sequence["ids"]
  alone = np.asarray(forward(model, jnp.asarray(alone_ids), None))
  segments_and_logits = list(zip(_unpack(rows), _segment_logits(rows, packed)))
  assert len(segments_and_logits) == len(stream)
  for ids, logits in segments_and_logits:
    i = next(i for i, sequence in enumerate(stream) if np.array_equal(sequence["ids"], ids[0]))
    np.testing.assert_allclose(logits, alone[i, :len(ids[0])], atol=1e-5)


def _segment_logits(rows, logits):
  for b, row in enumerate(rows):
    for segment in range(1, row["segment_ids"].max() + 1):
      yield logits[b, row["segment_ids"] == segment]


def test_packing_state_restores_mid_buffer():
  rng = np.random.default_rng(0)
  stream = [_sequence(int(n), i) for i, n in enumerate(rng.integers(1, 20, size=60))]
  stream[10] = {pipeline.SKIP_KEY: "empty_caption"}
  dataset = packing.PackIterDataset(grain.MapDataset.source(stream).to_iter_dataset(), 24,
                                    buffer_size=8)
  it = dataset.__iter__()
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  restored = dataset.__iter__()
  restored.set_state(state)
  again = list(restored)
  assert len(again) == len(rest) > 0
  for a, b in zip(rest, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert restored.counters() == it.counters()
  assert it.counters()["data/sequences"] == 59 and it.counters()["data/skipped_empty_caption"] == 1


def test_task_mixture_draws_formats_by_weight_and_builds_only_those_used(tok):
  tokenizer, layout = tok
  built = []

  def pretrain():
    built.append("pretrain")
    return sequences.PretrainFormat(tokenizer, layout, image_first_ratio=1.0)

  mixture = sequences.TaskMixture(
      {"pretrain": pretrain,
       "generation": lambda: sequences.GenerationFormat(tokenizer, layout,
                                                        system_texts=["Draw."]),
       "understanding": lambda: pytest.fail("a task of weight 0 was built")},
      {"pretrain": 3.0, "generation": 1.0, "understanding": 0.0})
  assert built == ["pretrain"]
  example = {"codes": CODES, "caption": "a cat"}
  outs = _through_grain(mixture, [example] * 400, seed=0)
  # pre-training sequences start with <soi> (image first); generation ones with the chat
  pretrain_share = np.mean([o["ids"][0] == layout.soi_id for o in outs])
  assert 0.68 < pretrain_share < 0.82
  with pytest.raises(config_lib.ConfigError, match=r"^config.sequences.tasks: .*not a distr"):
    sequences.TaskMixture({"pretrain": pretrain}, {"pretrain": 0.0})
  with pytest.raises(config_lib.ConfigError, match=r"^config.sequences.tasks: unknown tasks"):
    sequences.TaskMixture({"pretrain": pretrain}, {"captioning": 1.0})
