"""Hugging Face Qwen2 / Llama <-> muse_jax: logits parity, cached greedy decoding, round trips."""

import json
import os
import shutil

import pytest
import references

torch = references.require("torch")
transformers = references.require("transformers")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from muse_jax.convert import __main__ as cli  # noqa: E402
from muse_jax import weights  # noqa: E402
from muse_jax.convert import checkpoint, hf, tensor_io  # noqa: E402
from muse_jax.models import muse_vl, qwen2, stack  # noqa: E402

VOCAB = 320
CASES = {
    "qwen2_tied": dict(arch="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_untied": dict(arch="qwen2", num_key_value_heads=2, tie_word_embeddings=False),
    "llama_gqa": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=False),
    "llama_mqa": dict(arch="llama", num_key_value_heads=1, tie_word_embeddings=True),
}


def _build_hf(arch, folder, seed=0, max_shard_size=None, **kw):
  """A tiny random HF model with non-trivial norms / biases, saved with save_pretrained
  (in several shards plus an index when ``max_shard_size`` is given)."""
  torch.manual_seed(seed)
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256,
                initializer_range=0.1, bos_token_id=1, eos_token_id=2, **kw)
  if arch == "qwen2":
    config = transformers.Qwen2Config(rope_theta=1e6, **common)
    model = transformers.Qwen2ForCausalLM(config)
  else:
    config = transformers.LlamaConfig(rope_theta=5e6, **common)
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(folder, **(
      {"max_shard_size": max_shard_size} if max_shard_size else {}))
  return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: (str(root / name), _build_hf(folder=str(root / name), seed=i, **kw))
          for i, (name, kw) in enumerate(CASES.items())}


def _ids(shape, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, shape)


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


forward = nnx.jit(lambda m, ids, segment_ids=None: m(ids, segment_ids=segment_ids))


def _assert_close_to_scale(ours, ref, rel=1e-4):
  scale = float(np.abs(ref).max())
  assert float(np.abs(np.asarray(ours) - ref).max()) <= rel * scale, (
      np.abs(np.asarray(ours) - ref).max(), scale)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_models, case):
  folder, model = hf_models[case]
  ours = hf.load_qwen2(folder, dtype=jnp.float32)
  assert ours.config.attention_bias == (CASES[case]["arch"] == "qwen2")
  assert (ours.lm_head is None) == CASES[case]["tie_word_embeddings"]
  ids = _ids((3, 17), seed=1)
  _assert_close_to_scale(forward(ours, jnp.asarray(ids, jnp.int32)), _torch_logits(model, ids))


def test_packed_row_matches_each_segment_alone(hf_models):
  folder, model = hf_models["qwen2_untied"]
  ours = hf.load_qwen2(folder)
  a, b = _ids((1, 9), seed=2), _ids((1, 6), seed=3)
  packed = jnp.asarray(np.concatenate([a, b, np.zeros((1, 1), int)], 1), jnp.int32)
  seg = jnp.array([[1] * 9 + [2] * 6 + [0]])
  out = np.asarray(forward(ours, packed, seg))
  _assert_close_to_scale(out[:, :9], _torch_logits(model, a))
  _assert_close_to_scale(out[:, 9:15], _torch_logits(model, b))


@pytest.mark.parametrize("case", ["qwen2_untied", "llama_mqa"])
def test_greedy_kv_cache_decoding_matches_transformers_generate(hf_models, case):
  folder, model = hf_models[case]
  ours = hf.load_qwen2(folder)
  prompt = _ids((2, 6), seed=4)
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 6, dtype=torch.long),
                         max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[:, 6:].numpy()
  mine = np.asarray(qwen2.generate(ours, jnp.asarray(prompt, jnp.int32), 32))
  assert len(set(ref.ravel())) > 4          # a real sequence, not one repeated token
  np.testing.assert_array_equal(mine, ref)


def test_roundtrip_hf_ours_hf_with_sharding_and_bfloat16(hf_models, tmp_path):
  folder, model = hf_models["qwen2_untied"]
  ckpt = str(tmp_path / "ckpt")
  config = hf.hf_to_checkpoint(folder, ckpt)
  assert checkpoint.read_config(ckpt) == config
  out = str(tmp_path / "export")
  shards = hf.checkpoint_to_hf(ckpt, out, max_shard_bytes=60_000)
  assert len(shards) > 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back).__name__ == "Qwen2ForCausalLM"
  assert back.generation_config.eos_token_id == 2
  ids = _ids((2, 11), seed=5)
  np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(model, ids), atol=1e-6)
  # the sharded export reads back through its index
  np.testing.assert_allclose(forward(hf.load_qwen2(out), jnp.asarray(ids, jnp.int32)),
                             _torch_logits(model, ids), atol=1e-4)
  # a bfloat16 export: BF16 tensors that transformers and our reader both take
  out16 = str(tmp_path / "export16")
  hf.checkpoint_to_hf(ckpt, out16, dtype="bfloat16")
  reader = tensor_io.open_tensors(out16)
  assert reader.dtype("lm_head.weight").name == "bfloat16"
  back16 = transformers.AutoModelForCausalLM.from_pretrained(out16, dtype=torch.bfloat16)
  ref16 = _torch_logits(back16, ids)
  ours16 = np.asarray(forward(hf.load_qwen2(out16, dtype=jnp.float32), jnp.asarray(ids, jnp.int32)))
  assert np.abs(ours16 - ref16).max() < 0.05 * np.abs(ref16).max()


def test_scanned_layout_hf_ours_hf_and_layout_round_trip(hf_models, tmp_path):
  """HF -> ours (scanned, each layer written into its slice) -> HF loads in transformers
  with the same logits; the layout command's scanned -> unscanned -> scanned is exact; and
  either layout loads into either model."""
  folder, model = hf_models["qwen2_untied"]
  ids = _ids((2, 11), seed=5)
  scanned = str(tmp_path / "scanned")
  cli.main(["llm-from-hf", "--hf_dir", folder, "--out", scanned, "--scan_layers"])
  stored = weights.read_index(scanned).tensors
  assert stored["model/layers/mlp/up_proj/kernel"].shape == (2, 64, 96)
  assert not any(stack.stacked_name(name) for name in stored)
  ours = checkpoint.load(scanned)
  assert stack.is_scanned(ours.model.layers)
  _assert_close_to_scale(forward(ours, jnp.asarray(ids, jnp.int32)), _torch_logits(model, ids))
  hf.checkpoint_to_hf(scanned, str(tmp_path / "export"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(model, ids), atol=1e-6)

  unscanned, again = str(tmp_path / "unscanned"), str(tmp_path / "again")
  cli.main(["layout", "--src", scanned, "--out", unscanned, "--to", "unscanned"])
  cli.main(["layout", "--src", unscanned, "--out", again, "--to", "scanned"])
  assert not checkpoint.read_config(unscanned).scan_layers
  assert "model/layers/1/mlp/up_proj/kernel" in weights.read_index(unscanned).tensors
  assert weights.read_index(again).tensors == stored
  for name in stored:
    np.testing.assert_array_equal(weights.read(again, name), weights.read(scanned, name))
  # unscanned weights into a scanned model, a device's layers at a time, and back
  abstract = nnx.state(checkpoint.abstract_model(checkpoint.read_config(scanned)), nnx.Param)
  loaded = weights.load_pretrained(unscanned, abstract)
  np.testing.assert_array_equal(loaded["model"]["layers"]["self_attn"]["q_proj"]["bias"][...],
                                weights.read(scanned, "model/layers/self_attn/q_proj/bias"))
  np.testing.assert_array_equal(weights.read(scanned, "model/layers/1/mlp/down_proj/kernel"),
                                weights.read(unscanned, "model/layers/1/mlp/down_proj/kernel"))


def _tiny_tokenizer(folder):
  """A byte-level BPE Qwen2 tokenizer with 259 tokens (256 bytes, two merges, <|endoftext|>)."""
  tokenizers = references.require("tokenizers")
  vocab = {c: i for i, c in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
  merges = [("\u0120", "w"), ("\u0120w", "o")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  transformers.Qwen2Tokenizer(vocab=vocab, merges=merges).save_pretrained(folder)


@pytest.mark.parametrize("case", ["qwen2_tied", "llama_gqa"])
def test_vocabulary_extension_roundtrip_through_the_cli(hf_models, tmp_path, case, capsys):
  folder, model = hf_models[case]
  ckpt, out, tok_dir = (str(tmp_path / n) for n in ("ckpt", "export", "tok"))
  _tiny_tokenizer(tok_dir)
  cli.main(["llm-from-hf", "--hf_dir", folder, "--out", ckpt, "--muse_vl", "--num_visual", "300"])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  layout = checkpoint.read_vocab_layout(ckpt)
  assert layout == muse_vl.VocabLayout(VOCAB, 300)
  assert summary["config"]["vocab_size"] == layout.vocab_size == 640 and summary["peak_rss_mb"] > 0
  cli.main(["llm-to-hf", "--ckpt", ckpt, "--out", out, "--tokenizer", tok_dir])

  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert back.config.vocab_size == 640
  old, new = model.state_dict(), back.state_dict()
  np.testing.assert_array_equal(new["model.embed_tokens.weight"][:VOCAB],
                                old["model.embed_tokens.weight"])
  if not CASES[case]["tie_word_embeddings"]:
    np.testing.assert_array_equal(new["lm_head.weight"][:VOCAB], old["lm_head.weight"])
  ids = _ids((2, 10), seed=6)
  logits = _torch_logits(back, ids)
  assert logits.shape == (2, 10, 640)
  np.testing.assert_allclose(logits[..., :VOCAB], _torch_logits(model, ids), atol=1e-5)
  ours = checkpoint.load(ckpt)
  np.testing.assert_allclose(forward(ours, jnp.asarray(ids, jnp.int32)), logits, atol=1e-4)

  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizer.convert_tokens_to_ids(
      [muse_vl.SOI_TOKEN, muse_vl.EOI_TOKEN, muse_vl.visual_token(0), muse_vl.visual_token(299)]
  ) == [layout.soi_id, layout.eoi_id, layout.visual_start, layout.visual_end - 1]
  text = f"hi{muse_vl.SOI_TOKEN}{muse_vl.visual_token(7)}{muse_vl.EOI_TOKEN} wow"
  ids = tokenizer(text)["input_ids"]
  assert ids[2:5] == [layout.soi_id, layout.visual_start + 7, layout.eoi_id]
  assert tokenizer.decode(ids) == text


def test_errors_name_the_tensor_the_shapes_and_the_supported_architectures(hf_models, tmp_path):
  folder, _ = hf_models["qwen2_untied"]
  broken = tmp_path / "broken"
  shutil.copytree(folder, broken)
  config = json.loads((broken / "config.json").read_text())

  (broken / "config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(64, 96\).*"
                                       r"\(64, 80\)"):
    hf.load_qwen2(str(broken))

  mistral = dict(config, architectures=["MistralForCausalLM"])
  (broken / "config.json").write_text(json.dumps(mistral))
  with pytest.raises(ValueError, match="MistralForCausalLM.*Qwen2ForCausalLM, LlamaForCausalLM"):
    hf.load_qwen2(str(broken))

  (broken / "config.json").write_text(json.dumps(config))
  reader = tensor_io.open_tensors(folder)
  keep = [n for n in reader.keys() if n != "model.layers.1.self_attn.k_proj.bias"]
  os.remove(broken / "model.safetensors")
  tensor_io.write_safetensors(broken, [
      tensor_io.TensorSpec(n, reader.shape(n), reader.dtype(n), lambda n=n: reader.read(n))
      for n in keep])
  with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
    hf.load_qwen2(str(broken))


@pytest.fixture(scope="module")
def sharded_by_transformers(tmp_path_factory):
  """A Qwen2 saved by transformers itself in ~100 KB shards, with its index."""
  folder = tmp_path_factory.mktemp("hf_sharded") / "qwen2"
  model = _build_hf("qwen2", str(folder), seed=5, max_shard_size="100KB",
                    num_key_value_heads=2, tie_word_embeddings=False)
  return folder, model


def test_multi_shard_checkpoint_written_by_transformers_loads(sharded_by_transformers):
  folder, model = sharded_by_transformers
  shards = sorted(p.name for p in folder.glob("*.safetensors"))
  assert len(shards) >= 3 and (folder / "model.safetensors.index.json").exists(), shards
  weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
  assert set(weight_map.values()) == set(shards)
  ours = hf.load_qwen2(str(folder), dtype=jnp.float32)
  ids = _ids((2, 11), seed=2)
  _assert_close_to_scale(forward(ours, jnp.asarray(ids)), _torch_logits(model, ids))


def _index_of(folder):
  return json.loads((folder / "model.safetensors.index.json").read_text())


def test_index_that_points_to_a_missing_tensor_names_it(sharded_by_transformers, tmp_path):
  folder, _ = sharded_by_transformers
  broken = tmp_path / "broken"
  shutil.copytree(folder, broken)
  index = _index_of(folder)
  name = "model.layers.1.mlp.up_proj.weight"
  elsewhere = next(s for s in sorted(set(index["weight_map"].values()))
                   if s != index["weight_map"][name])
  index["weight_map"][name] = elsewhere            # the index says a shard has it; it has not
  (broken / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(tensor_io.ShardIndexError,
                     match=rf"lists tensor '{name}' in {elsewhere}, which lacks it"):
    hf.load_qwen2(str(broken))
  index = _index_of(folder)
  index["weight_map"]["model.extra.weight"] = "model-00009-of-00009.safetensors"
  (broken / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(tensor_io.ShardIndexError, match=r"puts tensor 'model\.extra\.weight' \(and "
                                                      r"0 more\) in model-00009-of-00009"):
    hf.load_qwen2(str(broken))


def test_two_index_files_in_one_folder_name_both(sharded_by_transformers, tmp_path):
  folder, _ = sharded_by_transformers
  doubled = tmp_path / "doubled"
  shutil.copytree(folder, doubled)
  shutil.copy(doubled / "model.safetensors.index.json",
              doubled / "consolidated.safetensors.index.json")
  with pytest.raises(tensor_io.ShardIndexError,
                     match=r"2 safetensors index files: consolidated\.safetensors\.index\.json, "
                           r"model\.safetensors\.index\.json"):
    hf.load_qwen2(str(doubled))
