"""Image + question -> answer with a trained MUSE-VL run, one or several turns.

  python -m muse_jax.inference.understand --workdir=/tmp/vlm_sft \\
      --image=chelsea.png --question="What animal is this?"
  python -m muse_jax.inference.understand --workdir=/tmp/vlm_sft \\
      --conversations=questions.json --out=answers.json

``--conversations`` is a JSON file holding a list of conversations, each one
image and its questions, asked in order::

  [{"image": "chelsea.png", "turns": ["What animal is this?", "What color are its eyes?"]},
   {"image": "/photos/coffee.png", "turns": ["What is in the cup?"]}]

Image paths are relative to the JSON file's folder (or absolute). Each answer
is generated, then kept in the conversation for the next question: the model
sees the turns it answered itself, as a chat. The answers are printed as one
JSON line per conversation (``{"image", "turns": [{"question", "answer"}]}``)
and, with ``--out``, written as a JSON list of those.

How an answer is produced:

* The image is centre-cropped and resized to the SDE tokenizer's size (as the
  VLM stages encode their images) and encoded to codes.
* The prompt is the layout understanding was trained on
  (``sequences.UnderstandingFormat.prompt``): the tokenizer's chat template over
  the conversation, the image as ``<soi> codes <eoi>`` at the start of the
  first user turn, earlier answers as assistant turns, then the generation
  prompt.
* Greedy (``temperature`` 0, the default) or sampled (temperature, top-k,
  top-p; each conversation has its own seed) over the text ids only, for at
  most ``max_new_tokens``; an answer ends at the template's end-of-turn token
  (``<|im_end|>`` for ChatML) or the tokenizer's eos. Prefill and decoding are
  one jitted ``lax.scan`` over a KV cache, the conversations of a turn in one
  left-padded batch (shapes fixed per batch and prompt length, rounded up to
  ``PROMPT_BUCKET``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from muse_jax import cli
from muse_jax.data import images as image_lib
from muse_jax.data import sequences
from muse_jax.inference import generate as generate_lib
from muse_jax.inference import sde_tokenizer
from muse_jax.inference import vlm_run
from muse_jax.models import muse_vl
from muse_jax.models import qwen2
from muse_jax.models import sde as sde_lib

PROG = "python -m muse_jax.inference.understand"
PROMPT_BUCKET = 64
END_OF_TURN = "<|im_end|>"     # ChatML's; templates without it stop at eos alone


@dataclasses.dataclass(frozen=True)
class AnswerOptions:
  max_new_tokens: int = 64
  temperature: float = 0.0     # 0: greedy
  top_k: int = 0
  top_p: float = 1.0


def stop_ids(tokenizer) -> list[int]:
  """The ids that end an answer: the chat template's end-of-turn token and eos."""
  ids = [tokenizer.eos_token_id]
  if END_OF_TURN in tokenizer.get_vocab():
    ids.append(tokenizer.convert_tokens_to_ids(END_OF_TURN))
  ids = [i for i in dict.fromkeys(ids) if i is not None]
  if not ids:
    raise ValueError("the tokenizer has neither an eos token nor <|im_end|>: answers could "
                     "not end")
  return ids


def load_image(path: str, size: int, max_pixels: int = 89_478_485) -> np.ndarray:
  """float32 [size, size, 3] in [-1, 1]: the centre crop the VLM stages encode.
  An unreadable file is a one-line ValueError."""
  try:
    rgb = image_lib.decode_rgb(epath.Path(path).read_bytes(), max_pixels=max_pixels)
  except (OSError, image_lib.BadExample) as error:
    raise ValueError(f"{path}: not a readable image ({error})") from error
  pixels = image_lib.crop_resize(rgb, image_lib.center_crop_box(*rgb.size), size, flip=False)
  return pixels.astype(np.float32) / 127.5 - 1.0


def encode_images(sde: sde_lib.SDETokenizer, paths: Sequence[str]) -> np.ndarray:
  """Image files -> codes int32 [N, h, w] through the SDE tokenizer."""
  return encode_pixels(sde, np.stack([load_image(p, sde.cfg.encoder.image_size)
                                      for p in paths]))


def encode_pixels(sde: sde_lib.SDETokenizer, pixels: np.ndarray) -> np.ndarray:
  """Images float32 [N, H, W, 3] in [-1, 1] (``load_image``) -> codes int32 [N, h, w]."""
  return sde_tokenizer.batched_encoder(sde, len(pixels))(pixels)


@functools.partial(jax.jit, static_argnames=("graphdef", "text_size", "max_new_tokens",
                                             "temperature", "top_k", "top_p"))
def _answer(graphdef, state, prompt_ids, prompt_valid, seeds, turn, stops, *, text_size,
            max_new_tokens, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  head = model.output_kernel(0, text_size)
  row_keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), turn))(seeds)

  def choose(hidden, index, done):
    logits = model.logits(hidden, head)
    if temperature == 0.0:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, index)
      token = jax.vmap(lambda row, key: qwen2.sample_logits(
          row[None], key, temperature, top_k, top_p)[0])(logits, keys)
    token = jnp.where(done, stops[0], token)      # a finished row repeats a stop id
    return token, done | jnp.isin(token, stops)

  cache = model.init_cache(prompt_ids.shape[0], prompt_ids.shape[1] + max_new_tokens - 1)
  hidden, cache = model.extend(prompt_ids, cache, prompt_valid)
  first, done = choose(hidden[:, -1], 0, jnp.zeros(prompt_ids.shape[:1], bool))

  def step(carry, index):
    token, cache, done = carry
    hidden, cache = model.extend(token[:, None], cache)
    token, done = choose(hidden[:, 0], index, done)
    return (token, cache, done), token

  _, rest = jax.lax.scan(step, (first, cache, done),
                         jnp.arange(1, max_new_tokens, dtype=jnp.int32))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def answer(decoder: qwen2.Qwen2ForCausalLM, tokenizer, layout: muse_vl.VocabLayout,
           codes: np.ndarray, conversations: Sequence[Sequence[dict]], *,
           options: AnswerOptions = AnswerOptions(), seeds: Sequence[int] | None = None,
           turn: int = 0) -> list[str]:
  """The next assistant turn of each conversation (about the image of the same row of
  ``codes`` [B, h, w]), in one jitted call. A conversation is a list of
  ``{"role": "user"|"assistant", "content"}`` messages ending with a user turn. A row's
  sampling noise comes from its seed and ``turn`` alone."""
  fmt = sequences.UnderstandingFormat(tokenizer, layout)
  prompts = []
  for i, (image_codes, messages) in enumerate(zip(codes, conversations)):
    try:
      prompts.append(fmt.prompt({"codes": image_codes, "conversations": messages}))
    except image_lib.BadExample as bad:
      raise ValueError(f"conversation {i} cannot be prompted: {bad}") from bad
  seeds = list(range(len(prompts))) if seeds is None else list(seeds)
  length = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
  ids, valid = generate_lib.left_pad(prompts, length, tokenizer.pad_token_id or 0)
  stops = stop_ids(tokenizer)
  graphdef, state = nnx.split(decoder)
  tokens = np.asarray(_answer(
      graphdef, state, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(seeds, jnp.uint32),
      jnp.asarray(turn, jnp.int32), jnp.asarray(stops, jnp.int32), text_size=layout.text_size,
      max_new_tokens=options.max_new_tokens, temperature=float(options.temperature),
      top_k=int(options.top_k), top_p=float(options.top_p)))
  answers = []
  for row in tokens:
    ended = np.flatnonzero(np.isin(row, stops))
    row = row[:ended[0]] if ended.size else row
    answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
  return answers


def understand(decoder: qwen2.Qwen2ForCausalLM, tokenizer, layout: muse_vl.VocabLayout,
               codes: np.ndarray, questions: Sequence[Sequence[str]], *,
               options: AnswerOptions = AnswerOptions(), seeds: Sequence[int] | None = None,
               batch_size: int | None = None) -> list[list[str]]:
  """Answers to each conversation's questions, asked in turn about its image (row of
  ``codes`` [N, h, w]), every answer kept in the chat for the next question. The
  conversations that have a k-th question are answered together, ``batch_size`` at a
  time (default: all), a short batch filled up with repeats so its shape is the same."""
  if len(codes) != len(questions):
    raise ValueError(f"{len(codes)} images for {len(questions)} conversations")
  seeds = list(range(len(questions))) if seeds is None else list(seeds)
  chats = [[] for _ in questions]
  answers = [[] for _ in questions]
  for turn in range(max((len(q) for q in questions), default=0)):
    open_rows = [i for i, q in enumerate(questions) if turn < len(q)]
    for i in open_rows:
      chats[i].append({"role": "user", "content": questions[i][turn]})
    size = batch_size or len(open_rows)
    for start in range(0, len(open_rows), size):
      rows = open_rows[start:start + size]
      rows_filled = rows + [rows[0]] * (size - len(rows))
      replies = answer(decoder, tokenizer, layout, np.asarray(codes)[rows_filled],
                       [chats[i] for i in rows_filled], options=options,
                       seeds=[seeds[i] for i in rows_filled], turn=turn)
      for i, reply in zip(rows, replies):
        chats[i].append({"role": "assistant", "content": reply})
        answers[i].append(reply)
  return answers


def read_conversations(path: str) -> list[dict]:
  """``[{"image": path, "turns": [question, ...]}, ...]`` (see the module docstring), image
  paths resolved against the file's folder; anything else is a one-line ValueError."""
  try:
    entries = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as error:
    raise ValueError(f"--conversations={path}: not a readable JSON file ({error})") from error
  usage = '; expected [{"image": "photo.png", "turns": ["question", ...]}, ...]'
  if not isinstance(entries, list) or not entries:
    raise ValueError(f"--conversations={path}: not a non-empty list{usage}")
  for k, entry in enumerate(entries):
    if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
            and isinstance(entry.get("turns"), list) and entry["turns"]
            and all(isinstance(t, str) and t.strip() for t in entry["turns"])):
      raise ValueError(f"--conversations={path}: entry {k} {entry!r:.60} is not usable{usage}")
  folder = os.path.dirname(path)
  return [{"image": os.path.join(folder, e["image"]), "turns": e["turns"]} for e in entries]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a VLM run (vlm_sft)")
  parser.add_argument("--image", help="one image (with --question)")
  parser.add_argument("--question", action="append", help="a question (repeatable: turns)")
  parser.add_argument("--conversations", help="JSON file of conversations (see above)")
  parser.add_argument("--out", default=None, help="write the answers here as JSON")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  vlm_run.add_sampling_flags(parser, temperature=0.0, item="conversation")
  return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = _parser().parse_args(argv)
  if bool(args.conversations) == bool(args.image):
    raise ValueError("give either --conversations=FILE or --image=PATH with --question")
  if args.conversations:
    entries = read_conversations(args.conversations)
  elif not args.question:
    raise ValueError("--image needs at least one --question")
  else:
    entries = [{"image": args.image, "turns": args.question}]
  if (args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1
      or args.batch_size < 1 or args.max_new_tokens < 1 or args.seed < 0):
    raise ValueError("need --temperature >= 0, --top_k >= 0, 0 < --top_p <= 1, "
                     "--batch_size >= 1, --max_new_tokens >= 1, --seed >= 0")
  # images are read before any weights, so that a bad path fails at once
  sde_dir = vlm_run.sde_workdir(vlm_run.read_config(args.workdir))
  sde_config = json.loads((epath.Path(sde_dir) / "config.json").read_text())
  pixels = np.stack([load_image(e["image"], sde_config["model"]["encoder"]["image_size"])
                     for e in entries])
  run = vlm_run.load(args.workdir, args.step)
  sde, _, _ = sde_tokenizer.load_tokenizer(sde_dir)
  codes = encode_pixels(sde, pixels)
  options = AnswerOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  answers = understand(run.decoder, run.tokenizer, run.layout, codes,
                       [e["turns"] for e in entries], options=options,
                       seeds=[args.seed + i for i in range(len(entries))],
                       batch_size=min(args.batch_size, len(entries)))
  results = [{"image": e["image"], "turns": [{"question": q, "answer": a}
                                             for q, a in zip(e["turns"], replies)]}
             for e, replies in zip(entries, answers)]
  for result in results:
    print(json.dumps(result))
  if args.out:
    epath.Path(args.out).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  cli.run(main, sys.argv[1:], PROG)
