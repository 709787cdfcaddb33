"""Text -> image (muse_jax.inference.generate) on a tiny VLM run: a 1-layer decoder trained
two steps over a random tiny SDE tokenizer (4 x 4 codes of 64, 32 px images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
import test_vlm_stage
from conftest import tiny_sde_config
from test_vlm_stage import tiny_vlm_config

from muse_jax import config_lib
from muse_jax.data import sequences
from muse_jax.inference import generate as generate_lib
from muse_jax.inference import sde_tokenizer
from muse_jax.inference import vlm_run
from muse_jax.models import sde as sde_lib
from muse_jax.train import llm_trainer

sde_run = test_vlm_stage.sde_run     # the fixture: a random tiny SDE tokenizer saved as a run

SHORT = "A cat."
LONG = ("A red cup of coffee on a red saucer with a spoon, on a wooden table, seen from above, "
        "next to a gray brick wall.")


@pytest.fixture(scope="module")
def trained(sde_run, tmp_path_factory):
  """(run directory, loaded VlmRun, SDE tokenizer) of a two-step generation-only run."""
  config = tiny_vlm_config(sde_run, "vlm_sft")
  config.sequences.tasks.update(pretrain=0.0, understanding=0.0, generation=1.0)
  config.update(total_steps=2, checkpoint_every=2, eval_every=2)
  workdir = str(tmp_path_factory.mktemp("vlm_gen"))
  llm_trainer.train(config, workdir)
  run = vlm_run.load(workdir)
  sde, _, _ = sde_tokenizer.load_tokenizer(sde_run)
  return workdir, run, sde


def codes_for(trained, captions, options, seeds=None, **kw):
  _, run, sde = trained
  return generate_lib.generate(run.decoder, sde, run.tokenizer, run.layout, captions,
                               options=options, seeds=seeds, **kw)


def test_prompts_are_the_trained_layout(trained):
  _, run, _ = trained
  system = run.config.sequences.system_texts[0]
  prompts, uncond = generate_lib.generation_prompts(run.tokenizer, run.layout, [LONG],
                                                    system_text=system)
  example = {"caption": LONG, "codes": np.arange(16)}
  for drop, prompt in ((0.0, prompts[0]), (1.0, uncond)):
    fmt = sequences.GenerationFormat(run.tokenizer, run.layout, system_texts=[system],
                                     caption_drop_prob=drop)
    trained_ids = fmt(example, np.random.default_rng(0))["ids"]
    np.testing.assert_array_equal(prompt, trained_ids[:len(prompt)])
    assert prompt[-1] == run.layout.soi_id and len(trained_ids) == len(prompt) + 16 + 1
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate_lib.generation_prompts(run.tokenizer, run.layout, ["x", ""], system_text=system)


def test_exactly_h_times_w_codes_that_decode_to_images(trained):
  out = codes_for(trained, [SHORT, LONG, SHORT], generate_lib.SamplingOptions(cfg_scale=3.0))
  assert out.codes.shape == (3, 4, 4) and out.codes.dtype == np.int32
  assert out.codes.min() >= 0 and out.codes.max() < 64
  assert out.images.shape == (3, 32, 32, 3) and out.images.dtype == np.uint8
  assert len(np.unique(out.codes)) > 4     # sampled, not one repeated code


def test_guidance_at_scale_one_equals_unguided_sampling(trained):
  guided = codes_for(trained, [SHORT, LONG], generate_lib.SamplingOptions(cfg_scale=1.0),
                     seeds=[7, 8])
  unguided = codes_for(trained, [SHORT, LONG], generate_lib.SamplingOptions(cfg_scale=None),
                       seeds=[7, 8])
  np.testing.assert_array_equal(guided.codes, unguided.codes)
  stronger = codes_for(trained, [SHORT, LONG], generate_lib.SamplingOptions(cfg_scale=5.0),
                       seeds=[7, 8])
  assert not np.array_equal(stronger.codes, unguided.codes)


def test_top_k_one_is_greedy(trained):
  for scale in (None, 3.0):
    greedy = codes_for(trained, [SHORT, LONG], generate_lib.SamplingOptions(scale, 0.0))
    top1 = codes_for(trained, [SHORT, LONG], generate_lib.SamplingOptions(scale, 1.0, top_k=1),
                     seeds=[3, 4])
    np.testing.assert_array_equal(greedy.codes, top1.codes)


def test_cached_guided_greedy_matches_full_forward_argmax(trained):
  """The KV-cache loop against the plain definition: recompute both prompts' full
  forward for every token, guide, take the argmax over the visual ids."""
  _, run, sde = trained
  scale = 3.0
  out = codes_for(trained, [LONG], generate_lib.SamplingOptions(scale, 0.0))
  prompts, uncond = generate_lib.generation_prompts(
      run.tokenizer, run.layout, [LONG], system_text=run.config.sequences.system_texts[0])
  layout, cond_ids, uncond_ids, codes = run.layout, list(prompts[0]), list(uncond), []
  # causal: padding on the right changes nothing before it, and one length compiles once
  graphdef, state = nnx.split(run.decoder)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
  last_logits = lambda ids: np.asarray(forward(state, jnp.asarray(
      [ids + [0] * (len(prompts[0]) + 16 - len(ids))]))[0, len(ids) - 1])
  for _ in range(16):
    cond, free = last_logits(cond_ids), last_logits(uncond_ids)
    guided = free + scale * (cond - free)
    code = int(np.argmax(guided[layout.visual_start:layout.visual_end]))
    codes.append(code)
    cond_ids.append(code + layout.visual_start)
    uncond_ids.append(code + layout.visual_start)
  np.testing.assert_array_equal(out.codes.reshape(-1), codes)


def test_left_padded_batch_rows_equal_each_prompt_alone(trained):
  captions, seeds = [SHORT, LONG, "A gray brick wall."], [11, 12, 13]
  options = generate_lib.SamplingOptions(cfg_scale=2.0, temperature=1.0, top_p=0.9)
  batch = codes_for(trained, captions, options, seeds=seeds)
  for i, caption in enumerate(captions):
    alone = codes_for(trained, [caption], options, seeds=[seeds[i]])
    np.testing.assert_array_equal(alone.codes[0], batch.codes[i], err_msg=caption)
  # batches of 2: the last one is filled up, and the rows are still the same
  in_twos = codes_for(trained, captions, options, seeds=seeds, batch_size=2)
  np.testing.assert_array_equal(in_twos.codes, batch.codes)


def test_a_grid_unlike_the_decoders_decodes_through_the_tokenizers_resize(trained):
  """As sde_384's 27 x 27 codes feed a 24 x 24 decoder grid: here 4 x 4 codes (40 px,
  patches of 10) feed a 5 x 5 grid (the decoder upsamples 8x), resized by the
  tokenizer's own decode, the path its training reconstructs through."""
  _, run, _ = trained
  c = tiny_sde_config(batch_size=1, total_steps=1, disc_start=1)
  c.model.encoder.update(image_size=40, patch_size=10)
  sde = sde_lib.SDETokenizer(config_lib.sde_model_config(c), rngs=nnx.Rngs(1))
  assert (sde.cfg.grid, sde.cfg.decoder_grid) == (4, 5)
  out = generate_lib.generate(run.decoder, sde, run.tokenizer, run.layout, [SHORT],
                              options=generate_lib.SamplingOptions(cfg_scale=2.0))
  assert out.codes.shape == (1, 4, 4) and out.images.shape == (1, 40, 40, 3)
  reference = (np.clip(np.asarray(sde.decode(jnp.asarray(out.codes))), -1, 1) + 1) * 127.5
  np.testing.assert_allclose(out.images, np.round(reference), atol=1)


def test_cli_writes_pngs_codes_and_prompts(trained, tmp_path):
  workdir = trained[0]
  (tmp_path / "prompts.txt").write_text(f"{LONG}\n\n{SHORT}\n")
  out = tmp_path / "out"
  result = generate_lib.main([f"--workdir={workdir}", f"--prompt={SHORT}",
                              f"--prompts={tmp_path / 'prompts.txt'}", f"--out={out}",
                              "--seed=5", "--batch_size=2"])
  assert result["images"] == 3 and result["codes"] == [3, 4, 4]
  codes = np.load(out / "codes.npy")
  assert codes.shape == (3, 4, 4) and codes.max() < 64
  for i in range(3):
    assert Image.open(out / f"{i:04d}.png").size == (32, 32)
  listed = json.loads((out / "prompts.json").read_text())
  assert [p["prompt"] for p in listed] == [SHORT, LONG, SHORT]
  assert [p["seed"] for p in listed] == [5, 6, 7]
  # the CLI's defaults: guidance 3, temperature 1, the run's first system text
  again = codes_for(trained, [SHORT], generate_lib.SamplingOptions(cfg_scale=3.0), seeds=[5],
                    system_text=trained[1].config.sequences.system_texts[0])
  np.testing.assert_array_equal(codes[0], again.codes[0])


@pytest.mark.parametrize("args, message", [
    (["--workdir=/nonexistent/run", "--prompt=A cat.", "--out=/tmp/x"],
     "has no config.json"),
    (["--prompts=/nonexistent/prompts.txt", "--out=/tmp/x"], "not a readable text file"),
])
def test_cli_user_errors_are_one_line(trained, args, message):
  if not args[0].startswith("--workdir"):
    args = [f"--workdir={trained[0]}"] + args
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", "muse_jax.inference.generate", *args],
                        capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 1, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{generate_lib.PROG}: error: "), done.stderr
  assert message in lines[0]
