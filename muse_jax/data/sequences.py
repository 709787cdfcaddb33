"""MUSE-VL training sequences: an example (SDE codes + text) -> token ids and a loss mask.

Three formats, one per training stage (MUSE-VL section 3.2, DESIGN.md section 4).
Each is an object built once from the text tokenizer (a Hugging Face tokenizer
object), the ``muse_vl.VocabLayout`` and the stage's options; its ``build(example,
rng)`` is a pure function of the example and the generator, returning
``{"ids": int32 [L], "loss_mask": bool [L]}``. ``loss_mask[t]`` marks the tokens
that are *predicted* with loss, the convention of ``llm_trainer.next_token_targets``
(the first token of a sequence is never predicted, whatever its mask).
Called as ``format(example, rng)`` (how Grain's ``random_map`` calls it) an
example that cannot be used becomes a skip marker ``{pipeline.SKIP_KEY: reason}``,
which the packer counts (``data/skipped_<reason>``) instead of packing.

Images: SDE code ``c`` is token ``layout.visual_start + c``; ``codes`` may be
the [h, w] grid, read row by row (the order generation samples them in); an
image is always ``<soi> codes <eoi>`` with the layout's ids, written directly, never
tokenized from text. Text is tokenized without the tokenizer's own special tokens
(no BOS: Qwen2.5 has none); text that tokenizes into the visual or ``<soi>/<eoi>``
ids (a caption containing the literal string ``<soi>``, with a tokenizer that has
the MUSE-VL tokens) is skipped as ``text_has_image_tokens``.

``PretrainFormat`` (image-caption pairs, loss on all tokens)::

  image first:   <soi> codes <eoi> caption <eos>
  caption first: caption <soi> codes <eoi> <eos>

The order is drawn per example: image first with probability
``image_first_ratio``. ``<eos>`` (the tokenizer's ``eos_token_id``; left out when
it has none) closes both, so the model learns where a document ends.

``UnderstandingFormat`` (LLaVA-style conversations, loss on the assistant turns):
the turns (``{"from": "human"|"gpt"|"system", "value": ...}`` or ``{"role",
"content"}``) are rendered with the tokenizer's own chat template, and the image
goes where the ``<image>`` placeholder is (LLaVA's convention; without one it is
put at the start of the first user turn, followed by a newline). An assistant
turn's tokens are the text the template adds between the prompt of that turn
(rendered with ``add_generation_prompt=True``) and the conversation up to and
including the turn: the response and the template's end-of-turn marker
(``<|im_end|>`` in ChatML) get loss; whitespace after it does not. So no chat
format is hard-coded: any template whose renderings of successive prefixes extend
each other works (ChatML, the format of Qwen2.5's and Yi-1.5's templates, is
one); others raise ConfigError.
Turns after the last assistant turn are dropped (nothing to learn from them).

``GenerationFormat`` (text-to-image, loss on the image)::

  chat(user: "{system text}\\n{caption}") + generation prompt, then <soi> codes <eoi>

The system text is drawn per example from ``system_texts`` (the paper's "Please
generate an image.", "Show me a photo.", ...). With probability
``caption_drop_prob`` the caption is left out (the user turn is the system text
alone): the unconditional prompt that classifier-free guidance contrasts with.
Loss is on the visual ids and ``<eoi>``; ``<soi>`` is in the sequence but
without loss, because generation forces it (and then samples exactly h*w visual
ids). The chat pieces around the user text are tokenized once, so per example
only the caption is tokenized, or nothing when it comes pre-tokenized.

``TaskMixture`` draws one of several formats per example with configured weights
(the instruction-tuning mixture of understanding and generation; pre-training is
the mixture of ``PretrainFormat`` alone).

Text can come pre-tokenized: ``caption_ids`` (int array) is used instead of
``caption`` when the example has it. Piecewise tokenization equals tokenizing the
whole text as long as the pieces split at special tokens or newlines, which is
where this module splits them (true for byte-level BPE pre-tokenizers: GPT-2,
Qwen2).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from muse_jax import config_lib
from muse_jax.data import images
from muse_jax.data import pipeline
from muse_jax.models import muse_vl

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


def _check_tokenizer(tokenizer, layout: muse_vl.VocabLayout) -> None:
  """The tokenizer's text ids fit below the visual ids, and its MUSE-VL tokens (if any) agree."""
  ids = tokenizer.convert_tokens_to_ids([muse_vl.SOI_TOKEN, muse_vl.EOI_TOKEN])
  if tokenizer.unk_token_id is not None:
    ids = [None if i == tokenizer.unk_token_id else i for i in ids]
  has_tokens = ids != [None, None]
  config_lib.check(
      not has_tokens or ids == [layout.soi_id, layout.eoi_id], "model.vocab_size",
      f"the tokenizer has <soi>, <eoi> at ids {ids} but the layout puts them at "
      f"{[layout.soi_id, layout.eoi_id]}",
      "set model.vocab_size to the base model's vocabulary (the layout's text_size)")
  config_lib.check(
      has_tokens or len(tokenizer) <= layout.visual_start, "model.vocab_size",
      f"the tokenizer has {len(tokenizer)} tokens, more than the layout's "
      f"{layout.visual_start} text ids", "set it to the base model's vocabulary size")


class _Builder:
  """Shared pieces: text -> ids, the image span, and joining (ids, loss) pieces."""

  def __init__(self, tokenizer, layout: muse_vl.VocabLayout):
    _check_tokenizer(tokenizer, layout)
    self.tokenizer = tokenizer
    self.layout = layout
    self._soi = np.array([layout.soi_id], np.int32)
    self._eoi = np.array([layout.eoi_id], np.int32)

  def text(self, text: str) -> np.ndarray:
    ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)
    return self.checked(ids)

  def checked(self, ids: np.ndarray) -> np.ndarray:
    if ids.size and ids.max() >= self.layout.visual_start:
      raise images.BadExample("text_has_image_tokens", f"max id {ids.max()}")
    if ids.size and ids.min() < 0:
      raise images.BadExample("bad_caption_ids", f"min id {ids.min()}")
    return ids

  def caption(self, example: dict) -> np.ndarray:
    """The caption's ids: pre-tokenized ``caption_ids`` or tokenized ``caption``."""
    if "caption_ids" in example:
      ids = self.checked(np.asarray(example["caption_ids"], np.int32))
    elif example.get("caption") is not None:
      ids = self.text(example["caption"])
    else:
      raise images.BadExample("missing_caption")
    if not ids.size:
      raise images.BadExample("empty_caption")
    return ids

  def visual(self, example: dict) -> np.ndarray:
    """The codes (any shape: a grid is read row by row) as visual ids, no markers."""
    codes = np.asarray(example.get("codes", ())).reshape(-1)
    if not codes.size or not np.issubdtype(codes.dtype, np.integer):
      raise images.BadExample("bad_codes", f"codes of dtype {codes.dtype}, size {codes.size}")
    if codes.min() < 0 or codes.max() >= self.layout.num_visual:
      raise images.BadExample("bad_codes", f"codes outside [0, {self.layout.num_visual})")
    return codes.astype(np.int32) + np.int32(self.layout.visual_start)

  def image(self, example: dict) -> np.ndarray:
    """``<soi> visual ids <eoi>``."""
    return np.concatenate([self._soi, self.visual(example), self._eoi])

  @staticmethod
  def join(pieces: list[tuple[np.ndarray, bool]]) -> dict[str, np.ndarray]:
    ids = np.concatenate([p for p, _ in pieces])
    loss = np.concatenate([np.full(len(p), flag) for p, flag in pieces])
    return {"ids": ids, "loss_mask": loss}


class _Format:
  """Subclasses' ``build`` raises BadExample; calling returns a skip marker instead."""

  def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict[str, Any]:
    if pipeline.SKIP_KEY in example:
      return example
    try:
      return self.build(example, rng)
    except images.BadExample as bad:
      return {pipeline.SKIP_KEY: bad.reason}


def _probability(value: float, field: str) -> None:
  config_lib.check(0.0 <= value <= 1.0, f"sequences.{field}", f"{value} is not a probability",
                   "use a value in [0, 1]")


class PretrainFormat(_Format):
  """Image-caption pairs in either order, loss on every token."""

  def __init__(self, tokenizer, layout: muse_vl.VocabLayout, *, image_first_ratio: float = 0.5):
    _probability(image_first_ratio, "image_first_ratio")
    self._builder = _Builder(tokenizer, layout)
    self._image_first_ratio = image_first_ratio
    eos = tokenizer.eos_token_id
    self._eos = np.array([] if eos is None else [eos], np.int32)

  def build(self, example, rng):
    b = self._builder
    caption, image = b.caption(example), b.image(example)
    image_first = rng.random() < self._image_first_ratio
    parts = (image, caption) if image_first else (caption, image)
    return b.join([(parts[0], True), (parts[1], True), (self._eos, True)])


def _messages(conversation: Sequence[dict], answered: bool = True) -> list[dict[str, str]]:
  """LLaVA turns or role/content messages -> role/content messages, the image placed.

  ``answered``: the conversation must have an assistant turn, and ends with the last
  one; otherwise (a prompt) it must end with a user turn.
  """
  if not isinstance(conversation, (list, tuple)):
    raise images.BadExample("bad_conversation", f"turns are a {type(conversation).__name__}")
  messages = []
  for turn in conversation:
    if not isinstance(turn, dict):
      raise images.BadExample("bad_conversation", f"a turn is a {type(turn).__name__}")
    role = _ROLES.get(turn.get("from", turn.get("role")))
    content = turn.get("value", turn.get("content"))
    if role is None or not isinstance(content, str):
      raise images.BadExample("bad_conversation", f"unusable turn {turn!r:.80}")
    messages.append({"role": role, "content": content})
  if answered:
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
      raise images.BadExample("bad_conversation", "no assistant turn")
    messages = messages[:assistant[-1] + 1]
  elif not messages or messages[-1]["role"] != "user":
    raise images.BadExample("bad_conversation", "a prompt must end with a user turn")
  placeholders = [m["content"].count(IMAGE_PLACEHOLDER) for m in messages]
  if sum(placeholders) > 1 or any(p for p, m in zip(placeholders, messages)
                                  if m["role"] != "user"):
    raise images.BadExample("bad_conversation", "not exactly one <image> in the user turns")
  if not sum(placeholders):
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
      raise images.BadExample("bad_conversation", "no user turn")
    messages[first_user] = {"role": "user",
                            "content": f"{IMAGE_PLACEHOLDER}\n{messages[first_user]['content']}"}
  return messages


class UnderstandingFormat(_Format):
  """Multi-turn conversations about one image, loss on the assistant turns."""

  def __init__(self, tokenizer, layout: muse_vl.VocabLayout):
    config_lib.check(bool(getattr(tokenizer, "chat_template", None)), "tokenizer_dir",
                     "the tokenizer has no chat template",
                     "use the base model's instruct tokenizer (or set its chat_template)")
    self._builder = _Builder(tokenizer, layout)

  def _render(self, messages, generation_prompt: bool) -> str:
    return self._builder.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt)

  def _text_spans(self, messages, open_turn: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, loss) spans, assistant turns with loss;
    ``open_turn`` adds the prompt of the next assistant turn after the last message."""
    spans, done = [], ""
    ends = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k in ends + ([len(messages)] if open_turn else []):
      prompt = self._render(messages[:k], True)
      full = self._render(messages[:k + 1], False) if k < len(messages) else prompt
      if not (prompt.startswith(done) and full.startswith(prompt)):
        raise config_lib.ConfigError(
            "config.tokenizer_dir: the tokenizer's chat template renders a conversation's "
            "prefixes inconsistently, so assistant turns cannot be located; use a template "
            "whose rendering of each turn extends the previous ones (e.g. ChatML)")
      response = full[len(prompt):]
      kept = response.rstrip()
      spans += [(prompt[len(done):], False), (kept, True), (response[len(kept):], False)]
      done = full
    return [(text, loss) for text, loss in spans if text]

  def _pieces(self, spans, example) -> dict[str, np.ndarray]:
    b = self._builder
    pieces = []
    for text, loss in spans:
      if IMAGE_PLACEHOLDER in text:
        if loss:
          raise images.BadExample("bad_conversation", "<image> in an assistant turn")
        before, after = text.split(IMAGE_PLACEHOLDER)
        pieces += [(b.text(before), False), (b.image(example), False), (b.text(after), False)]
      else:
        pieces.append((b.text(text), loss))
    return b.join(pieces)

  def build(self, example, rng=None):
    return self._pieces(self._text_spans(_messages(example.get("conversations", ()))), example)

  def prompt(self, example) -> np.ndarray:
    """The ids an answer continues: ``example``'s conversation, which ends with a user
    turn (earlier assistant turns included, laid out as ``build`` lays them out),
    then the template's generation prompt. Raises BadExample as ``build`` does.
    Inference (``muse_jax.inference.understand``) builds its prompts with this."""
    messages = _messages(example.get("conversations", ()), answered=False)
    return self._pieces(self._text_spans(messages, open_turn=True), example)["ids"]


class GenerationFormat(_Format):
  """Text-to-image: a sampled instruction and the caption, then the image with loss."""

  def __init__(self, tokenizer, layout: muse_vl.VocabLayout, *, system_texts: Sequence[str],
               caption_drop_prob: float = 0.1):
    config_lib.check(bool(system_texts) and all(isinstance(t, str) and t.strip()
                                                for t in system_texts),
                     "sequences.system_texts", f"{system_texts!r} has no usable text",
                     'give a list of instructions such as ["Please generate an image."]')
    _probability(caption_drop_prob, "caption_drop_prob")
    config_lib.check(bool(getattr(tokenizer, "chat_template", None)), "tokenizer_dir",
                     "the tokenizer has no chat template",
                     "use the base model's instruct tokenizer (or set its chat_template)")
    b = self._builder = _Builder(tokenizer, layout)
    self._caption_drop_prob = caption_drop_prob
    # The chat around the user text, rendered once with a stand-in for the text.
    stand_in = "\x00USER\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": stand_in}],
                                             tokenize=False, add_generation_prompt=True)
    config_lib.check(rendered.count(stand_in) == 1, "tokenizer_dir",
                     "the chat template does not render the user message verbatim once",
                     "use a template that does (e.g. ChatML)")
    head, tail = rendered.split(stand_in)
    self._head, self._tail = b.text(head), b.text(tail)
    self._alone = [b.text(t) for t in system_texts]
    self._with_caption = [b.text(t + "\n") for t in system_texts]
    self._soi = np.array([layout.soi_id], np.int32)
    self._eoi = np.array([layout.eoi_id], np.int32)

  def prompt(self, caption_ids: np.ndarray | None, choice: int = 0) -> np.ndarray:
    """The ids before the image, ending in ``<soi>``: with ``caption_ids`` after system
    text ``choice``, or (None) the caption-dropped, unconditional prompt. Inference
    (``muse_jax.inference.generate``) builds its prompts with this too."""
    user = ([self._alone[choice]] if caption_ids is None else
            [self._with_caption[choice], self._builder.checked(np.asarray(caption_ids, np.int32))])
    return np.concatenate([self._head, *user, self._tail, self._soi])

  def build(self, example, rng):
    b = self._builder
    visual = b.visual(example)
    choice = int(rng.integers(len(self._alone)))
    caption = None if rng.random() < self._caption_drop_prob else b.caption(example)
    return b.join([(self.prompt(caption, choice), False), (visual, True), (self._eoi, True)])


class TaskMixture(_Format):
  """One format per example, drawn with ``weights`` (task name -> weight >= 0).

  ``formats`` maps every task name to a builder of its format; only the tasks with
  a positive weight are built (a generation format needs a chat template, for one).
  """

  def __init__(self, formats: dict[str, Callable[[], _Format]], weights: dict[str, float]):
    unknown = sorted(set(weights) - set(formats))
    config_lib.check(not unknown, "sequences.tasks", f"unknown tasks {unknown}",
                     f"use task names from {sorted(formats)}")
    config_lib.check(all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0,
                     "sequences.tasks", f"weights {dict(weights)} are not a distribution",
                     "give non-negative weights with a positive sum")
    self._names = [n for n in sorted(weights) if weights[n] > 0]
    self._formats = [formats[n]() for n in self._names]
    total = sum(weights[n] for n in self._names)
    self._probs = np.array([weights[n] / total for n in self._names])

  def build(self, example, rng):
    task = int(rng.choice(len(self._formats), p=self._probs)) if len(self._formats) > 1 else 0
    return self._formats[task].build(example, rng)
