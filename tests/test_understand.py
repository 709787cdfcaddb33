"""Image + question -> answer (muse_jax.inference.understand): a 2-layer decoder trained here
to memorise two-turn conversations about two bundled photographs (their demo questions
and answers), over a random tiny SDE tokenizer, answers them back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import test_vlm_stage
import transformers
from test_vlm_stage import tiny_vlm_config

from muse_jax import cli, config_lib
from muse_jax.data import image_codes
from muse_jax.data import sequences
from muse_jax.data import sources
from muse_jax.inference import sde_tokenizer
from muse_jax.inference import understand as understand_lib
from muse_jax.inference import vlm_run
from muse_jax.parallel import sharding
from muse_jax.train import checkpoint as checkpoint_lib
from muse_jax.train import llm_trainer

sde_run = test_vlm_stage.sde_run     # the fixture: a random tiny SDE tokenizer saved as a run

PHOTOS = ("astronaut.png", "chelsea.png")
STEPS = 120


@pytest.fixture(scope="module")
def memorised(sde_run, tmp_path_factory):
  """(run directory, annotation entries, image paths): the conversations of PHOTOS trained
  STEPS full-batch steps with ``llm_trainer.setup``'s step, saved as a VLM run."""
  workdir = str(tmp_path_factory.mktemp("vlm_understand"))
  config = tiny_vlm_config(sde_run, "vlm_sft")
  config.model.update(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
  config.sequences.tasks.update(pretrain=0.0, understanding=1.0, generation=0.0)
  config.update(total_steps=STEPS, batch_size=2, seq_len=128)
  config.optimizer.update(lr=1e-2, warmup_steps=10)
  config.tokenizer_dir = llm_trainer.demo_tokenizer_dir(config, workdir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer_dir)
  entries = [e for e in image_codes.load_annotations() if e["file"] in PHOTOS]
  paths = [os.path.join(sources.bundled_dir(), e["file"]) for e in entries]
  sde, _, _ = sde_tokenizer.load_tokenizer(sde_run)
  codes = understand_lib.encode_images(sde, paths)
  fmt = sequences.UnderstandingFormat(tokenizer, config_lib.vocab_layout(config))
  rows = [fmt({"codes": c, "conversations": image_codes.conversation(e["qa"])})
          for c, e in zip(codes, entries)]
  ids = np.zeros((2, config.seq_len), np.int32)
  segment_ids, loss_mask = np.zeros_like(ids), np.zeros(ids.shape, bool)
  for i, row in enumerate(rows):
    n = len(row["ids"])
    assert n <= config.seq_len
    ids[i, :n], segment_ids[i, :n], loss_mask[i, :n] = row["ids"], 1, row["loss_mask"]
  run = llm_trainer.setup(config, sharding.make_mesh(config.mesh))
  batch = {k: sharding.global_batch(v, run.batch_sharding)
           for k, v in llm_trainer.next_token_targets(ids, segment_ids, loss_mask).items()}
  state = run.init()
  for _ in range(STEPS):
    state, metrics = run.train_step(state, batch)
  assert float(metrics["accuracy"]) == 1.0, float(metrics["loss/lm"])
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  checkpointer.save(STEPS, state, {})
  checkpointer.close()
  checkpoint_lib.save_config(config, workdir)
  return workdir, entries, paths


def test_understand_reproduces_the_memorised_answers_turn_after_turn(memorised, sde_run):
  workdir, entries, paths = memorised
  run = vlm_run.load(workdir)
  sde, _, _ = sde_tokenizer.load_tokenizer(sde_run)
  codes = understand_lib.encode_images(sde, paths)
  questions = [[q for q, _ in e["qa"]] for e in entries]
  answers = understand_lib.understand(run.decoder, run.tokenizer, run.layout, codes, questions)
  assert answers == [[a for _, a in e["qa"]] for e in entries]
  # the second turn is asked after the model's own first answer, as one conversation
  fmt = sequences.UnderstandingFormat(run.tokenizer, run.layout)
  chat = [{"role": "user", "content": questions[0][0]},
          {"role": "assistant", "content": answers[0][0]},
          {"role": "user", "content": questions[0][1]}]
  trained = fmt({"codes": codes[0], "conversations": image_codes.conversation(entries[0]["qa"])})
  prompt = fmt.prompt({"codes": codes[0], "conversations": chat})
  np.testing.assert_array_equal(prompt, trained["ids"][:len(prompt)])
  assert not trained["loss_mask"][len(prompt) - 1] and trained["loss_mask"][len(prompt)]
  # sampled, one conversation at a time in batches of one: still at most max_new_tokens
  sampled = understand_lib.understand(
      run.decoder, run.tokenizer, run.layout, codes, questions, batch_size=1,
      options=understand_lib.AnswerOptions(max_new_tokens=8, temperature=1.0, top_k=5))
  assert [len(a) for a in sampled] == [2, 2] and all(isinstance(t, str) for a in sampled
                                                     for t in a)


def test_cli_answers_a_conversations_file_and_one_image(memorised, tmp_path, capsys):
  workdir, entries, paths = memorised
  folder = tmp_path / "photos"
  folder.mkdir()
  (folder / "cat.png").write_bytes(open(paths[1], "rb").read())
  spec = [{"image": "cat.png", "turns": [q for q, _ in entries[1]["qa"]]},
          {"image": paths[0], "turns": [entries[0]["qa"][0][0]]}]
  (folder / "questions.json").write_text(json.dumps(spec))
  out = tmp_path / "answers.json"
  results = understand_lib.main([f"--workdir={workdir}",
                                 f"--conversations={folder / 'questions.json'}",
                                 f"--out={out}"])
  assert [[t["answer"] for t in r["turns"]] for r in results] == [
      [a for _, a in entries[1]["qa"]], [entries[0]["qa"][0][1]]]
  assert json.loads(out.read_text()) == results
  assert capsys.readouterr().out.count("\n") == 2
  single = understand_lib.main([f"--workdir={workdir}", f"--image={paths[0]}",
                                f"--question={entries[0]['qa'][0][0]}"])
  assert single[0]["turns"][0]["answer"] == entries[0]["qa"][0][1]


def test_cli_user_error_is_one_line_and_exit_1(memorised, tmp_path):
  done = subprocess.run([sys.executable, "-m", "muse_jax.inference.understand",
                         f"--workdir={memorised[0]}", f"--image={tmp_path / 'missing.png'}",
                         "--question=What?"], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 1, done.stderr
  assert done.stderr.strip().splitlines() == [
      f"{understand_lib.PROG}: error: {tmp_path / 'missing.png'}: not a readable image "
      f"([Errno 2] No such file or directory: '{tmp_path / 'missing.png'}')"]


@pytest.mark.parametrize("make_args, message", [
    (lambda t: [f"--conversations={t / 'bad.json'}"], "entry 0 {'image': 'x.png', 'turns': []"),
    (lambda t: [f"--conversations={t / 'missing.json'}"], "not a readable JSON file"),
    (lambda t: ["--image=x.png"], "--image needs at least one --question"),
    (lambda t: [], "give either --conversations=FILE or --image=PATH"),
])
def test_cli_user_errors_name_the_problem(memorised, tmp_path, capsys, make_args, message):
  (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.png", "turns": []}]))
  with pytest.raises(SystemExit) as exit_info:
    cli.run(understand_lib.main, [f"--workdir={memorised[0]}", *make_args(tmp_path)],
            understand_lib.PROG)
  assert exit_info.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{understand_lib.PROG}: error: ")
  assert message in lines[0]
