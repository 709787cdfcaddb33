"""Impossible configs stop with one line naming the field and the fix."""

import subprocess
import sys

import pytest

from muse_jax import config_lib
from muse_jax import data


@pytest.mark.parametrize("override, field", [
    (lambda c: c.model.encoder.update(image_size=250), "config.model.encoder.image_size"),
    (lambda c: c.model.update(mode="pixels"), "config.model.mode"),
    (lambda c: c.model.update(code_dim=0), "config.model.code_dim"),
    (lambda c: c.model.decoder.update(norm_groups=48), "config.model.decoder.norm_groups"),
    (lambda c: c.model.encoder.update(num_heads=5), "config.model.encoder.width"),
    (lambda c: c.update(lpips_width_divisor=3), "config.lpips_width_divisor"),
    (lambda c: c.optimizer.update(schedule="linear"), "config.optimizer.schedule"),
    (lambda c: c.codebook.update(init="normal"), "config.codebook.init"),
    (lambda c: c.codebook.update(update_rule="kmeans"), "config.codebook.update_rule"),
    (lambda c: c.codebook.update(ema_decay=1.0), "config.codebook.ema_decay"),
    (lambda c: c.codebook.update(restart_after=-1), "config.codebook.restart_after"),
    (lambda c: (c.model.update(simvq=True), c.codebook.update(restart_after=10)),
     "config.model.simvq"),
])
def test_impossible_config_names_field(config_loader, override, field):
  config = config_loader("sde_256")
  config_lib.validate_sde(config)
  override(config)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate_sde(config)
  message = str(err.value)
  assert message.startswith(field) and "\n" not in message
  assert ";" in message  # problem; fix


def test_partial_patches_need_explicit_opt_in(config_loader):
  config = config_loader("sde_384")
  config_lib.validate_sde(config)              # 384 / 14 with drop_partial_patches=True
  config.model.encoder.drop_partial_patches = False
  with pytest.raises(config_lib.ConfigError, match="drop_partial_patches=True"):
    config_lib.validate_sde(config)


def test_demo_configs_are_valid(config_loader):
  for name in ("sde_256", "sde_384"):
    config = config_loader(name, "demo")
    config_lib.validate_sde(config)
    data.validate_config(config.data)
    assert config.data.image_size == config.model.encoder.image_size


def test_full_configs_keep_the_paper_codebook_recipe(config_loader):
  """Fixed init, gradient updates, no restarts, no SimVQ: the paper's recipe."""
  for name in ("sde_256", "sde_384"):
    config = config_loader(name)
    assert (config.codebook.init, config.codebook.update_rule, config.codebook.restart_after,
            config.model.simvq) == ("uniform", "gradient", 0, False)


def test_cli_reports_bad_config_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "muse_jax.main", "--config=configs/sde_256.py:demo",
       f"--workdir={tmp_path}", "--config.model.mode=pixels"],
      capture_output=True, text=True, cwd=config_lib.__file__.rsplit("/muse_jax/", 1)[0],
      timeout=300)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.model.mode:") and "both" in last
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, field", [
    (lambda c: c.model.update(num_kv_heads=5), "config.model.num_kv_heads"),
    (lambda c: c.model.update(num_heads=27, num_kv_heads=3), "config.model.hidden_size"),
    (lambda c: c.model.update(dtype="fp8"), "config.model.dtype"),
    (lambda c: c.vocab.update(num_visual=-1), "config.vocab.num_visual"),
    (lambda c: c.update(seq_len=0), "config.seq_len"),
])
def test_impossible_decoder_config_names_field(config_loader, override, field):
  config = config_loader("muse_vl")
  config_lib.validate_llm(config)
  override(config)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate_llm(config)
  assert str(err.value).startswith(field) and ";" in str(err.value)


@pytest.mark.parametrize("preset, vocab", [("qwen2.5-7b", 184960), ("qwen2.5-0.5b", 184832),
                                           ("yi-1.5-9b", 96896)])
def test_decoder_configs_extend_the_vocabulary(config_loader, preset, vocab):
  """Base rows + 32768 visual ids + <soi>, <eoi>, padded to a multiple of 128."""
  model = config_lib.llm_model_config(config_loader("muse_vl", preset))
  assert model.vocab_size == vocab and vocab % 128 == 0
