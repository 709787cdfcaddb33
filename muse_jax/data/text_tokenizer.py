"""Text tokenizers for MUSE-VL: its image tokens at the layout's ids, and a demo tokenizer.

A MUSE-VL tokenizer is the base LLM's Hugging Face tokenizer plus, at exactly
the ids of ``muse_vl.VocabLayout``, one token per visual code
(``<|vis_c|>``), then ``<soi>`` and ``<eoi>``. Sequence building
(``muse_jax.data.sequences``) never tokenizes these markers: it writes the
layout's ids directly. The tokens exist so that ``tokenizer.decode`` shows a
mixed sequence readably and so that the exported model's tokenizer agrees with
its embedding table.

``build_demo_tokenizer`` makes a small byte-level BPE tokenizer from a few
captions (no hub download), with ChatML turn markers and a minimal ChatML chat
template (the format of Qwen2.5's template, without its default system
message), plus the MUSE-VL tokens. The demo VLM and the tests use it.
"""

from __future__ import annotations

import os

from muse_jax.models import muse_vl

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML: every message is "<|im_start|>{role}\n{content}<|im_end|>\n"; the
# generation prompt opens an assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def add_muse_vl_tokens(tokenizer, layout: muse_vl.VocabLayout):
  """Adds ``<|vis_c|>``, ``<soi>``, ``<eoi>`` to a HF tokenizer at the layout's ids, in place.

  Unused ids between the tokenizer's size and the first visual id (e.g. the
  padding rows of Qwen2.5's table) get placeholder tokens so the added ids
  line up. Returns the tokenizer.
  """
  size = len(tokenizer)
  if size > layout.visual_start:
    raise ValueError(f"the tokenizer has {size} tokens, more than the {layout.visual_start} "
                     "text rows of the vocabulary layout")
  placeholders = [f"<|muse_unused_{i}|>" for i in range(size, layout.visual_start)]
  visual = [muse_vl.visual_token(c) for c in range(layout.num_visual)]
  tokenizer.add_tokens(placeholders + visual + [muse_vl.SOI_TOKEN, muse_vl.EOI_TOKEN],
                       special_tokens=True)
  got = tokenizer.convert_tokens_to_ids([muse_vl.visual_token(0), muse_vl.SOI_TOKEN,
                                         muse_vl.EOI_TOKEN])
  if got != [layout.visual_start, layout.soi_id, layout.eoi_id]:
    raise ValueError(f"tokenizer assigned ids {got} to <|vis_0|>, <soi>, <eoi>; the "
                     f"layout needs {[layout.visual_start, layout.soi_id, layout.eoi_id]} "
                     "(does the tokenizer already contain some of these tokens?)")
  return tokenizer


def build_demo_tokenizer(captions: list[str], directory: str, *, vocab_size: int = 512,
                         num_visual: int = 1024) -> muse_vl.VocabLayout:
  """Trains a byte-level BPE on ``captions`` and saves a MUSE-VL tokenizer to ``directory``.

  The text part has the 256 byte tokens, merges learnt from the captions up to
  ``vocab_size`` tokens, and ``<|endoftext|>`` (end of text and padding),
  ``<|im_start|>``, ``<|im_end|>``; then ``num_visual`` visual tokens and
  ``<soi>``/``<eoi>`` follow at the ids of the returned layout (whose
  ``text_size`` is the text part's size: the decoder's base vocabulary).
  ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  specials = [END_OF_TEXT, IM_START, IM_END]
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(captions, trainer)
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
      additional_special_tokens=[IM_START, IM_END])
  tokenizer.chat_template = CHATML_TEMPLATE
  layout = muse_vl.VocabLayout(len(tokenizer), num_visual)
  add_muse_vl_tokens(tokenizer, layout)
  os.makedirs(directory, exist_ok=True)
  tokenizer.save_pretrained(directory)
  return layout
