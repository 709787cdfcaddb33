"""Text -> image with a trained MUSE-VL run.

  python -m muse_jax.inference.generate --workdir=/tmp/vlm_sft \\
      --prompt="A tabby cat with green eyes." --prompt="A red cup of coffee." --out=/tmp/gen

Reads the run's ``config.json`` (its ``tokenizer_dir`` and ``sde_workdir``), the
decoder's and the SDE tokenizer's parameters from their latest checkpoints, and
writes ``0000.png, 0001.png, ...`` (one per prompt, in order), ``codes.npy``
(int32 [N, h, w]) and ``prompts.json`` into ``--out``. ``--prompts=FILE`` reads
one prompt per line instead of (or after) the ``--prompt`` flags.

How an image is sampled (MUSE-VL section 3.2, DESIGN.md section 4):

* The prompt is the layout generation was trained on (``sequences.GenerationFormat``):
  the chat template's user turn "{system text}\\n{caption}", the generation
  prompt, then ``<soi>``. The system text defaults to the run's first
  ``sequences.system_texts``.
* Exactly h * w ids follow, each sampled from the logits of the visual ids only
  (the LM head's visual columns, sliced once), so every id is a code; ``<eoi>``
  is implied and never sampled. Prefill and all steps run in one jitted
  ``lax.scan`` over a KV cache; shapes are fixed per (batch, prompt length
  rounded up to ``PROMPT_BUCKET``), so a new batch of prompts compiles nothing.
* Classifier-free guidance: the unconditional prompt is the caption-dropped
  one that training saw with probability ``caption_drop_prob`` (or any other
  caption, ``unconditional``). Conditional and unconditional rows form one
  batch of 2B rows and one cache; both rows of a prompt are fed the guided
  sample. Guided logits are uncond + s (cond - uncond), computed as
  cond + (s - 1)(cond - uncond): the same value, and exactly cond at s = 1.
* Temperature (0 = greedy), top-k (0 = off), top-p (``qwen2.sample_logits``).
  Every prompt has its own seed (``seeds``; the CLI uses seed + i for prompt
  i) and draws its noise from it alone, so an image does not depend on the
  other prompts of its batch.
* Codes decode through the SDE tokenizer's ``decode``, the path its training
  reconstructs with (a 27 x 27 grid is resized to the 24 x 24 decoder grid there).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from muse_jax import cli
from muse_jax.data import images as image_lib
from muse_jax.data import sequences
from muse_jax.inference import sde_tokenizer
from muse_jax.inference import vlm_run
from muse_jax.models import muse_vl
from muse_jax.models import qwen2
from muse_jax.models import sde as sde_lib

PROG = "python -m muse_jax.inference.generate"
PROMPT_BUCKET = 32    # prompts are left-padded to a multiple of this: one compile serves many


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  cfg_scale: float | None = 3.0   # None: no guidance (B rows); 1.0 samples the same codes
  temperature: float = 1.0        # 0: greedy
  top_k: int = 0                  # 0: all visual ids
  top_p: float = 1.0


def generation_prompts(tokenizer, layout: muse_vl.VocabLayout, captions: Sequence[str], *,
                       system_text: str, unconditional: str | None = None
                       ) -> tuple[list[np.ndarray], np.ndarray]:
  """(one prompt per caption, the unconditional prompt): token ids ending in ``<soi>``,
  laid out as ``GenerationFormat`` trains them. ``unconditional`` None is the
  caption-dropped prompt; a caption is a ValueError if empty or if it tokenizes
  into image ids."""
  fmt = sequences.GenerationFormat(tokenizer, layout, system_texts=(system_text,),
                                   caption_drop_prob=0.0)

  def prompt(caption: str | None, name: str) -> np.ndarray:
    if caption is None:
      return fmt.prompt(None)
    ids = np.asarray(tokenizer.encode(caption, add_special_tokens=False), np.int32)
    if not ids.size:
      raise ValueError(f"{name} is empty")
    try:
      return fmt.prompt(ids)
    except image_lib.BadExample as bad:
      raise ValueError(f"{name} {caption!r:.60} is not usable text ({bad})") from bad

  return ([prompt(c, f"prompt {i}") for i, c in enumerate(captions)],
          prompt(unconditional, "the unconditional prompt"))


def left_pad(prompts: Sequence[np.ndarray], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> ids [N, length] aligned on the right, and valid [N, length] (0 = padding)."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  valid = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, length - len(prompt):] = prompt
    valid[row, length - len(prompt):] = 1
  return ids, valid


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "num_tokens", "guided",
                                             "temperature", "top_k", "top_p"))
def _sample(graphdef, state, prompt_ids, prompt_valid, seeds, cfg_scale, *, layout,
            num_tokens, guided, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  batch = seeds.shape[0]
  head = model.output_kernel(layout.visual_start, layout.visual_end)
  row_keys = jax.vmap(jax.random.key)(seeds)

  def choose(hidden, index):
    """Hidden states of the last tokens [rows, D] -> codes [B] of this step."""
    logits = model.logits(hidden, head)
    if guided:
      cond, uncond = logits[:batch], logits[batch:]
      logits = cond + (cfg_scale - 1.0) * (cond - uncond)
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, index)
    return jax.vmap(lambda row, key: qwen2.sample_logits(
        row[None], key, temperature, top_k, top_p)[0])(logits, keys)

  def feed(codes):
    ids = codes + layout.visual_start
    return jnp.concatenate([ids, ids]) if guided else ids

  cache = model.init_cache(prompt_ids.shape[0], prompt_ids.shape[1] + num_tokens - 1)
  hidden, cache = model.extend(prompt_ids, cache, prompt_valid)
  first = choose(hidden[:, -1], 0)

  def step(carry, index):
    codes, cache = carry
    hidden, cache = model.extend(feed(codes)[:, None], cache)
    codes = choose(hidden[:, 0], index)
    return (codes, cache), codes

  _, rest = jax.lax.scan(step, (first, cache), jnp.arange(1, num_tokens, dtype=jnp.int32))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def sample_codes(decoder: qwen2.Qwen2ForCausalLM, layout: muse_vl.VocabLayout,
                 prompts: Sequence[np.ndarray], unconditional: np.ndarray, grid: int, *,
                 options: SamplingOptions = SamplingOptions(), seeds: Sequence[int],
                 pad_id: int = 0) -> np.ndarray:
  """Codes int32 [B, grid, grid] in [0, num_visual), one image per prompt (ids ending in
  ``<soi>``), in one jitted call. ``seeds`` [B]: each row's noise comes from its seed."""
  if len(seeds) != len(prompts):
    raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
  guided = options.cfg_scale is not None
  rows = list(prompts) + [unconditional] * len(prompts) if guided else list(prompts)
  length = -(-max(len(p) for p in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
  ids, valid = left_pad(rows, length, pad_id)
  graphdef, state = nnx.split(decoder)
  codes = _sample(graphdef, state, jnp.asarray(ids), jnp.asarray(valid),
                  jnp.asarray(seeds, jnp.uint32),
                  jnp.asarray(1.0 if options.cfg_scale is None else options.cfg_scale,
                              jnp.float32),
                  layout=layout, num_tokens=grid * grid, guided=guided,
                  temperature=float(options.temperature), top_k=int(options.top_k),
                  top_p=float(options.top_p))
  return np.asarray(codes).reshape(len(prompts), grid, grid)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, codes):
  images = nnx.merge(graphdef, state).decode(codes)
  return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def decode_images(tokenizer: sde_lib.SDETokenizer, codes: np.ndarray) -> np.ndarray:
  """Codes [B, h, w] -> uint8 images [B, H, W, 3] through the SDE tokenizer's decoder."""
  graphdef, state = nnx.split(tokenizer)
  return np.asarray(_decode(graphdef, state, jnp.asarray(codes, jnp.int32)))


@dataclasses.dataclass
class Generated:
  codes: np.ndarray     # int32 [N, h, w]
  images: np.ndarray    # uint8 [N, H, W, 3]


def generate(decoder: qwen2.Qwen2ForCausalLM, sde: sde_lib.SDETokenizer, tokenizer,
             layout: muse_vl.VocabLayout, captions: Sequence[str], *,
             system_text: str = "Please generate an image.", unconditional: str | None = None,
             options: SamplingOptions = SamplingOptions(), seeds: Sequence[int] | None = None,
             batch_size: int | None = None) -> Generated:
  """Images for ``captions`` from loaded models (a notebook's entry point; see the module
  docstring). ``seeds`` default to 0, 1, ...; ``batch_size`` prompts are sampled at a
  time (default: all), the last batch filled up with repeats so its shape is the same."""
  if not captions:
    raise ValueError("no prompts")
  if sde.cfg.codebook_size != layout.num_visual:
    raise ValueError(f"the SDE tokenizer has {sde.cfg.codebook_size} codes but the decoder's "
                     f"layout has {layout.num_visual} visual ids")
  seeds = list(range(len(captions))) if seeds is None else list(seeds)
  prompts, uncond = generation_prompts(tokenizer, layout, captions, system_text=system_text,
                                       unconditional=unconditional)
  batch_size = batch_size or len(prompts)
  codes = []
  for start in range(0, len(prompts), batch_size):
    part = slice(start, start + batch_size)
    fill = batch_size - len(prompts[part])
    codes.append(sample_codes(
        decoder, layout, prompts[part] + [prompts[0]] * fill, uncond, sde.cfg.grid,
        options=options, seeds=seeds[part] + [seeds[0]] * fill,
        pad_id=tokenizer.pad_token_id or 0)[:batch_size - fill])
  codes = np.concatenate(codes)
  return Generated(codes, decode_images(sde, codes))


def _read_prompts(args) -> list[str]:
  prompts = list(args.prompt or [])
  if args.prompts:
    try:
      lines = epath.Path(args.prompts).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
      raise ValueError(f"--prompts={args.prompts}: not a readable text file ({error})") from error
    prompts += [line.strip() for line in lines if line.strip()]
  if not prompts:
    raise ValueError("no prompts: give --prompt=TEXT (repeatable) or --prompts=FILE "
                     "(one prompt per line)")
  return prompts


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a VLM run (vlm_pretrain / vlm_sft)")
  parser.add_argument("--prompt", action="append", help="a caption (repeatable)")
  parser.add_argument("--prompts", help="text file, one caption per line")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--cfg_scale", type=float, default=3.0,
                      help="classifier-free guidance scale (1 = no guidance)")
  parser.add_argument("--unconditional", default=None,
                      help="caption of the unconditional prompt (default: none, as trained)")
  parser.add_argument("--system_text", default=None,
                      help="instruction before the caption (default: the run's first)")
  vlm_run.add_sampling_flags(parser, temperature=1.0, item="prompt")
  return parser


def main(argv: Sequence[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  prompts = _read_prompts(args)
  if (args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.batch_size < 1
      or args.seed < 0):
    raise ValueError("need --temperature >= 0, --top_k >= 0, 0 < --top_p <= 1, "
                     "--batch_size >= 1, --seed >= 0")
  run = vlm_run.load(args.workdir, args.step)
  sde, _, sde_step = sde_tokenizer.load_tokenizer(vlm_run.sde_workdir(run.config))
  options = SamplingOptions(cfg_scale=None if args.cfg_scale == 1.0 else args.cfg_scale,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  start = time.perf_counter()
  out = generate(run.decoder, sde, run.tokenizer, run.layout, prompts,
                 system_text=args.system_text or run.config.sequences.system_texts[0],
                 unconditional=args.unconditional, options=options,
                 seeds=[args.seed + i for i in range(len(prompts))],
                 batch_size=min(args.batch_size, len(prompts)))
  seconds = time.perf_counter() - start
  directory = epath.Path(args.out)
  directory.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(out.images):
    with (directory / f"{i:04d}.png").open("wb") as f:
      Image.fromarray(image).save(f, format="PNG")
  with (directory / "codes.npy").open("wb") as f:
    np.save(f, out.codes)
  (directory / "prompts.json").write_text(json.dumps(
      [{"image": f"{i:04d}.png", "prompt": p, "seed": args.seed + i}
       for i, p in enumerate(prompts)], indent=1))
  result = {"wrote": str(directory), "images": len(prompts), "codes": list(out.codes.shape),
            "decoder_step": run.step, "sde_step": sde_step, "seconds": round(seconds, 2)}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  cli.run(main, sys.argv[1:], PROG)
