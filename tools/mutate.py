"""Mutation check: does the suite catch plausible one-line mistakes in the library?

  python tools/mutate.py                  # every mutation, after a baseline run
  python tools/mutate.py --only=commitment-beta-dropped,rule-vocab-none
  python tools/mutate.py --list           # ids, files and the tests each names

Each entry of ``MUTATIONS`` names a file, an exact snippet of it, its replacement, and the
tests that should fail. For each entry the script copies the package, configs and tests to
a temporary folder (the working tree is never touched), replaces the snippet there, runs
the named tests with ``PYTHONPATH`` pointing at the copy, and prints a table: mutation,
tests run, killed / survived. A snippet that is not in the file (the code moved on) is
reported as "not applicable", one that occurs more than once as "ambiguous"; update the
entry. First the named tests run once unmutated: a kill only means something if they
pass without the mutation. Exit status 1 when a mutation survives or the baseline fails.

Not part of the test suite (minutes of CPU); run it after changing the code or the tests
that guard these lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("muse_jax", "tests", "configs", "setup.py")


@dataclasses.dataclass(frozen=True)
class Mutation:
  id: str
  file: str                    # relative to the repository root
  original: str                # exact snippet, must occur once
  replacement: str
  tests: tuple[str, ...]       # pytest node ids that should fail


ORACLES = "tests/test_oracles.py"
SEQUENCES = "tests/test_sequences.py"
RULE_TESTS = ("tests/test_parallel.py::test_every_logical_rule",
              "tests/test_parallel.py::test_model_parameters_follow_the_rules")


def _rule(name: str, axes: str, new: str) -> Mutation:
  return Mutation(f"rule-{name.replace('_', '-')}-{new.strip(chr(34)).lower()}",
                  "muse_jax/parallel/sharding.py", f'("{name}", {axes}),', f'("{name}", {new}),',
                  RULE_TESTS)


MUTATIONS = (
    # the mistakes issue 15 lists
    Mutation("commitment-beta-dropped", "muse_jax/train/sde_trainer.py",
             "lc.codebook_weight * (q.codebook_loss + lc.commitment_beta * q.commitment_loss)",
             "lc.codebook_weight * (q.codebook_loss + q.commitment_loss)",
             (f"{ORACLES}::test_sde_total_is_the_configured_weighted_sum",)),
    _rule("kv_heads", '"tensor"', "None"),
    _rule("vocab", '"tensor"', "None"),
    _rule("conv_out", '"fsdp"', "None"),
    Mutation("rope-theta-ignored", "muse_jax/models/qwen2.py",
             "rope = rope_tables(positions, c.kv_dim, c.rope_theta, c.dtype)",
             "rope = rope_tables(positions, c.kv_dim, 10000.0, c.dtype)",
             (f"{ORACLES}::test_model_uses_the_configured_rope_theta",)),
    # issue 12's fixed line (symmetric init) back to the one-sided range it replaces
    Mutation("codebook-init-one-sided", "muse_jax/models/quantizer.py",
             "symmetric_uniform(1.0 / codebook_size)",
             "nnx.initializers.uniform(2.0 / codebook_size)",
             ("tests/test_quantizer.py",)),
    Mutation("planner-any-program-fits", "muse_jax/compile.py",
             "  if not over:",
             '  if len(over) < len(result["programs"]):',
             ("tests/test_compile.py::test_planner_reports_the_decision_and_exits_1_when_a_"
              "program_does_not_fit",)),
    Mutation("frozen-groups-keep-gradients", "muse_jax/train/llm_trainer.py",
             "      grads = param_groups.mask_gradients(grads, scales)",
             "      pass",
             ("tests/test_param_groups.py",)),
    Mutation("group-scales-ignored", "muse_jax/train/llm_trainer.py",
             "      updates = param_groups.scale_updates(updates, scales)",
             "      pass",
             ("tests/test_param_groups.py",)),
    Mutation("uneven-host-epochs", "muse_jax/data/pipeline.py",
             "self.epoch_length = len(parent) // process_count",
             "self.epoch_length = len(range(process_index, len(parent), process_count))",
             ("tests/test_data_hosts.py::test_every_host_gets_an_equal_disjoint_share_of_each_"
              "epoch",)),
    Mutation("index-missing-tensor-unchecked", "muse_jax/convert/tensor_io.py",
             "  if missing:\n    raise ShardIndexError(",
             "  if False:\n    raise ShardIndexError(",
             ("tests/test_convert_qwen2.py::test_index_that_points_to_a_missing_tensor_names_it",)),
    Mutation("two-index-files-first-taken", "muse_jax/convert/tensor_io.py",
             "if len(indexes) > 1:", "if False:",
             ("tests/test_convert_qwen2.py::test_two_index_files_in_one_folder_name_both",)),
    # our own, in losses, quantizer, rules, RoPE, masks and conversion
    Mutation("hinge-generator-sign", "muse_jax/train/losses.py",
             "return -jnp.mean(logits_fake)", "return jnp.mean(logits_fake)",
             (f"{ORACLES}::test_sde_total_is_the_configured_weighted_sum",)),
    Mutation("lm-loss-mean-over-all-positions", "muse_jax/train/lm_loss.py",
             "return total / jnp.maximum(jnp.sum(weights), 1e-8)",
             "return total / weights.size",
             (f"{ORACLES}::test_chunked_cross_entropy_is_the_weighted_mean_nll",)),
    Mutation("vlm-step-loss-mean-over-all-positions", "muse_jax/train/llm_trainer.py",
             "return jnp.sum(stats[0]) / jnp.maximum(jnp.sum(stats[2]), 1e-8), stats",
             "return jnp.sum(stats[0]) / stats[2].size, stats",
             (f"{ORACLES}::test_decoder_step_loss_is_masked_next_token_nll",)),
    Mutation("visual-loss-split-off-by-one", "muse_jax/train/llm_trainer.py",
             'groups = layout.is_visual(batch["targets"])',
             'groups = layout.is_visual(batch["ids"])',
             (f"{ORACLES}::test_decoder_step_loss_is_masked_next_token_nll",)),
    Mutation("codebook-not-normalised", "muse_jax/models/quantizer.py",
             "return layers.l2_normalize(book) if self.l2_normalized else book",
             "return book",
             (f"{ORACLES}::test_sde_total_is_the_configured_weighted_sum",)),
    _rule("heads", '"tensor"', '"fsdp"'),
    Mutation("rope-rotates-backwards", "muse_jax/models/qwen2.py",
             "[x1 * cos - x2 * sin, x2 * cos + x1 * sin]",
             "[x1 * cos + x2 * sin, x2 * cos - x1 * sin]",
             (f"{ORACLES}::test_rope_against_complex_rotation",)),
    Mutation("targets-cross-segment-boundaries", "muse_jax/train/llm_trainer.py",
             "same[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & "
             "(segment_ids[:, :-1] > 0)",
             "same[:, :-1] = segment_ids[:, :-1] > 0",
             (f"{ORACLES}::test_next_token_targets_at_segment_boundaries",)),
    # VLM sequences and packing
    Mutation("pack-one-segment-per-row", "muse_jax/data/packing.py",
             "np.repeat(np.arange(1, len(sequences) + 1, dtype=np.int32), lengths)",
             "np.repeat(np.ones(len(sequences), np.int32), lengths)",
             (f"{SEQUENCES}::test_packing_drops_and_counts_never_cuts",
              f"{SEQUENCES}::test_packed_segments_never_attend_across_each_other")),
    Mutation("pack-positions-run-on", "muse_jax/data/packing.py",
             "np.arange(used, dtype=np.int32) - np.repeat(starts, lengths)",
             "np.arange(used, dtype=np.int32)",
             (f"{SEQUENCES}::test_packed_segments_never_attend_across_each_other",)),
    Mutation("pack-restore-restarts-buffer", "muse_jax/data/packing.py",
             '      self._emitted = state["rows_emitted"]', "      self._emitted = 0",
             (f"{SEQUENCES}::test_packing_state_restores_mid_buffer",)),
    Mutation("generation-loss-on-soi", "muse_jax/data/sequences.py",
             "(self._soi, False)", "(self._soi, True)",
             (f"{SEQUENCES}::test_generation_loss_on_visual_ids_and_eoi",)),
    Mutation("understanding-loss-after-end-of-turn", "muse_jax/data/sequences.py",
             "(kept, True), (response[len(kept):], False)]",
             "(kept, True), (response[len(kept):], True)]",
             (f"{SEQUENCES}::test_understanding_loss_on_assistant_turns_only",)),
    Mutation("hf-rope-theta-from-top-level-only", "muse_jax/convert/hf.py",
             'theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))',
             'theta = hf.get("rope_theta", 10000.0)',
             ("tests/test_convert_qwen2.py::test_multi_shard_checkpoint_written_by_transformers_"
              "loads",)),
)


def _copy_tree(dest: str) -> None:
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
  for name in COPIED:
    src = os.path.join(ROOT, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dest, name), ignore=ignore)
    else:
      shutil.copy2(src, os.path.join(dest, name))


def _pytest(copy: str, tests: tuple[str, ...], log: str) -> int:
  env = dict(os.environ, PYTHONPATH=copy, JAX_PLATFORMS="cpu")
  env.setdefault("MUSE_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "jaxcache-mutate"))
  with open(log, "w") as out:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *tests], cwd=copy, env=env, stdout=out,
                          stderr=subprocess.STDOUT).returncode


def _outcome(code: int) -> str:
  # pytest: 1 tests failed, 2 interrupted (e.g. an import error), 4 usage (unknown test id),
  # 5 nothing collected
  return {0: "SURVIVED", 1: "killed", 2: "killed (collection error)",
          4: "tests not found", 5: "no tests collected"}.get(code, f"error (exit {code})")


def run(mutations, workdir: str) -> bool:
  base = os.path.join(workdir, "baseline")
  _copy_tree(base)
  union = tuple(dict.fromkeys(t for m in mutations for t in m.tests
                              if os.path.exists(os.path.join(base, t.split("::")[0]))))
  start = time.time()
  code = _pytest(base, union, os.path.join(workdir, "baseline.log"))
  print(f"baseline: {len(union)} test ids, {_outcome(code) if code else 'pass'} "
        f"({time.time() - start:.0f}s)", flush=True)
  if code:
    print(f"baseline must pass first; see {workdir}/baseline.log")
    return False
  rows = []
  for m in mutations:
    path = os.path.join(ROOT, m.file)
    text = open(path).read() if os.path.exists(path) else ""
    count = text.count(m.original)
    if count != 1:
      rows.append((m, "not applicable" if count == 0 else f"ambiguous ({count} matches)", 0.0))
      print(f"{m.id}: {rows[-1][1]}", flush=True)
      continue
    copy = os.path.join(workdir, m.id)
    _copy_tree(copy)
    with open(os.path.join(copy, m.file), "w") as f:
      f.write(text.replace(m.original, m.replacement))
    start = time.time()
    outcome = _outcome(_pytest(copy, m.tests, os.path.join(workdir, f"{m.id}.log")))
    rows.append((m, outcome, time.time() - start))
    print(f"{m.id}: {outcome} ({rows[-1][2]:.0f}s)", flush=True)
    shutil.rmtree(copy)
  print("\n| mutation | file | tests run | result |\n|---|---|---|---|")
  for m, outcome, _ in rows:
    tests = ", ".join(f"`{t.replace('tests/', '')}`" for t in m.tests)
    print(f"| {m.id} | `{m.file}` | {tests} | {outcome} |")
  print(f"\nlogs: {workdir}")
  return all(o.startswith("killed") or o == "not applicable" for _, o, _ in rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help="comma-separated mutation ids")
  parser.add_argument("--list", action="store_true", help="print the mutations and exit")
  parser.add_argument("--workdir", default="", help="keep copies' logs here (default: a temp dir)")
  args = parser.parse_args()
  chosen = [m for m in MUTATIONS if not args.only or m.id in args.only.split(",")]
  unknown = set(filter(None, args.only.split(","))) - {m.id for m in MUTATIONS}
  if unknown:
    sys.exit(f"--only: unknown ids {sorted(unknown)}; see --list")
  if args.list:
    for m in chosen:
      print(f"{m.id}: {m.file}: {' '.join(m.tests)}")
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix="mutate-")
  os.makedirs(workdir, exist_ok=True)
  sys.exit(0 if run(chosen, workdir) else 1)


if __name__ == "__main__":
  main()
