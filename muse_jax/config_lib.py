"""Config building blocks and validation shared by the files in ``configs/``.

Config files stay big_vision style (``get_config(arg)`` returning a ConfigDict,
run command in the docstring); what they share lives here so that ``sde_256``
and ``sde_384`` differ only in the numbers that really differ.

Validation turns an impossible config into one line that names the field and
the fix (``ConfigError``), before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types

import ml_collections

from muse_jax.kernels import attention
from muse_jax.kernels import vq
from muse_jax.models import discriminator as discriminator_lib
from muse_jax.models import muse_vl
from muse_jax.models import qwen2
from muse_jax.models import sde as sde_lib
from muse_jax.models import siglip
from muse_jax.models import stack
from muse_jax.models import vqgan
from muse_jax.parallel import sharding

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def check(ok: bool, field: str, problem: str, fix: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {problem}; {fix}")


def check_batch_fits_mesh(c: ml_collections.ConfigDict, mesh) -> None:
  """The global batch must split evenly over the batch axes (data x fsdp) and hosts."""
  import jax
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  need = math.lcm(shards, jax.process_count())
  check(c.batch_size % need == 0, "batch_size",
        f"{c.batch_size} does not split over the mesh's {shards} batch shards (data x fsdp) "
        f"and {jax.process_count()} processes",
        f"use a multiple of {need}, or give config.mesh more tensor parallelism")


def parse_arg(arg: str | None) -> dict[str, str]:
  """``"demo,res=384"`` -> {"demo": "", "res": "384"} (big_vision-style config args)."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip()
  return out


def sibling_config(config_file: str, name: str) -> types.ModuleType:
  """The config file ``name``.py next to ``config_file``, as a module: how one config
  builds on another (configs are files, not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"muse_jax_configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


NONFINITE_MODES = ("stop", "skip")


def loop_defaults(c: ml_collections.ConfigDict) -> None:
  """The training loop's fields (``muse_jax/train/loop.py``), shared by every stage."""
  c.log_every = 50
  c.eval_every = 5_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.nonfinite = "stop"             # stop | skip: what a non-finite loss or gradient norm does
  c.profile_steps = ""             # "a,b": jax.profiler trace of steps a..b (workdir/tensorboard)


def validate_loop(c: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """Checks the loop's fields; returns the profiled (first, last) steps, or None."""
  check(c.nonfinite in NONFINITE_MODES, "nonfinite", f"{c.nonfinite!r} is not a mode",
        f"use one of {NONFINITE_MODES}")
  for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    check(c[field] >= 1, field, f"{c[field]}", "use a positive number")
  if not c.profile_steps:
    return None
  parts = [p.strip() for p in str(c.profile_steps).split(",")]
  check(len(parts) == 2 and all(p.isdigit() for p in parts), "profile_steps",
        f"{c.profile_steps!r} is not two step numbers", "use first,last, e.g. 10,15")
  first, last = int(parts[0]), int(parts[1])
  check(1 <= first <= last, "profile_steps", f"{c.profile_steps!r}",
        "use 1 <= first <= last, e.g. 10,15")
  return first, last


def sde_defaults() -> ml_collections.ConfigDict:
  """Everything of an SDE tokenizer run except model shapes and data (LlamaGen defaults)."""
  c = ml_collections.ConfigDict()
  c.trainer = "sde"
  c.seed = 0
  c.mesh = sharding.mesh_config()  # (data, fsdp, tensor); data=-1 takes all devices
  c.total_steps = 400_000          # LlamaGen: 40 ImageNet epochs at batch 128
  c.batch_size = 128               # global
  c.loss = ml_collections.ConfigDict(dict(
      l2_weight=1.0,
      perceptual_weight=1.0,
      semantic_weight=1.0,
      codebook_weight=1.0,
      commitment_beta=0.25,
      entropy_weight=0.0,          # LlamaGen option, off in the paper
      entropy_temperature=0.01,
      disc_weight=0.5,
      disc_start=20_000,
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05,           # coupled L2 as torch.optim.Adam, LlamaGen's default
      grad_clip=1.0,
      warmup_steps=0,
      schedule="constant",         # constant | cosine
  ))
  c.disc_optimizer = ml_collections.ConfigDict(dict(c.optimizer.to_dict()))
  c.discriminator = ml_collections.ConfigDict(dict(ndf=64, n_layers=3, norm_groups=32))
  c.lpips_checkpoint = ""          # converted LPIPS weights (python -m muse_jax.convert lpips)
  c.lpips_width_divisor = 1        # >1 narrows VGG16 (CPU demos only; real weights need 1)
  c.siglip_checkpoint = ""         # converted SigLIP tower: initialises both encoders
  c.replicate_frozen = False       # True: semantic encoder + LPIPS whole on every device
  loop_defaults(c)
  c.usage_window = 1_000           # steps over which codebook usage is measured
  # Codebook health; the paper's recipe is the default: plain gradient updates, no restarts.
  c.codebook = ml_collections.ConfigDict(dict(
      init="uniform",              # uniform [-1/K, 1/K) | kmeans++ (seeded from data at step 0)
      init_batches=1,              # training batches whose features seed kmeans++
      update_rule="gradient",      # gradient (codebook loss) | ema (VQ-VAE-2 moving averages)
      ema_decay=0.99,
      restart_after=0,             # >0: entries unused this many steps move to recent features
      usage_floor=0.1,             # console warning when window usage falls below this
  ))
  c.num_grid_images = 8
  return c


def sde_model(*, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
              mlp_dim: int, drop_partial_patches: bool = False) -> ml_collections.ConfigDict:
  """Model block of an SDE config; the encoders take the SigLIP tower's shape."""
  return ml_collections.ConfigDict(dict(
      mode="both",
      encoder=dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                   num_heads=num_heads, mlp_dim=mlp_dim, layer_norm_eps=1e-6,
                   drop_partial_patches=drop_partial_patches),
      codebook_size=32768,
      code_dim=8,
      simvq=False,                 # entries = frozen random basis @ learned map (SimVQ)
      semantic_decoder=dict(depth=3, width=width, num_heads=num_heads, mlp_dim=mlp_dim),
      decoder=dict(z_channels=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=3,
                   norm_groups=32),
      dtype="bfloat16",
      param_dtype="float32",
      attention_impl="auto",   # auto | xla | splash | cudnn (docs/kernels.md)
      attention_block_q=512,   # splash tiles: multiples of 128
      attention_block_kv=512,
      vq_impl="auto",          # auto | naive | chunked | pallas (docs/kernels.md)
      # SigLIP towers and semantic decoder: stacked layers under lax.scan (one layer
      # compiled, not 24-27). save_dots: a scan keeps every intermediate a layer's backward
      # needs, so "none" doubles the sde_256 step's memory and does not fit sde_384 on a
      # v5p-8; keeping the matmul outputs costs no FLOPs over "none" (README, "Parallelism";
      # python -m muse_jax.compile ... --remat_policy=sweep)
      scan_layers=True,
      remat_policy="save_dots",
  ))


def shrink_for_demo(c: ml_collections.ConfigDict, *, image_size: int, patch_size: int) -> None:
  """Same code path, laptop-sized: small widths, bundled images, minutes on 2 CPU cores."""
  m = c.model
  m.encoder.update(image_size=image_size, patch_size=patch_size, width=64, depth=2,
                   num_heads=2, mlp_dim=256)
  m.semantic_decoder.update(depth=1, width=64, num_heads=2, mlp_dim=256)
  m.codebook_size = 1024
  m.decoder.update(z_channels=64, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=8)
  m.dtype = "float32"              # bf16 matmuls are emulated (slow) on CPU
  # 1-2 layers unrolled, no remat: nothing to save, and the demo figures stay
  m.scan_layers = False
  m.remat_policy = "none"
  c.discriminator.update(ndf=32, norm_groups=8)
  c.lpips_width_divisor = 4
  c.batch_size = 8
  c.total_steps = 300
  c.loss.disc_start = 250
  c.loss.disc_weight = 0.05        # at 0.5 a 64 px toy generator collapses within 100 steps
  c.optimizer.update(lr=1e-3, warmup_steps=20, schedule="cosine")
  c.optimizer.weight_decay = c.disc_optimizer.weight_decay = 0.0
  c.log_every = 20
  c.eval_every = 50
  c.checkpoint_every = 100
  c.usage_window = 50
  c.num_grid_images = 4


def sde_model_config(c: ml_collections.ConfigDict) -> sde_lib.SDEConfig:
  """ConfigDict -> the model's frozen dataclasses (after ``validate_sde``)."""
  m = c.model
  enc = m.encoder
  encoder = siglip.SiglipConfig(
      image_size=enc.image_size, patch_size=enc.patch_size, width=enc.width, depth=enc.depth,
      num_heads=enc.num_heads, mlp_dim=enc.mlp_dim, layer_norm_eps=enc.layer_norm_eps,
      dtype=m.dtype, param_dtype=m.param_dtype, attention_impl=m.attention_impl,
      attention_block_q=m.attention_block_q, attention_block_kv=m.attention_block_kv,
      # runs saved before the fields existed are unscanned, without remat
      scan_layers=m.get("scan_layers", False), remat_policy=m.get("remat_policy", "none"))
  decoder = vqgan.DecoderConfig(
      z_channels=m.decoder.z_channels, ch=m.decoder.ch, ch_mult=tuple(m.decoder.ch_mult),
      num_res_blocks=m.decoder.num_res_blocks, norm_groups=m.decoder.norm_groups,
      dtype=m.dtype, param_dtype=m.param_dtype)
  sd = m.semantic_decoder
  return sde_lib.SDEConfig(
      encoder=encoder, decoder=decoder, mode=m.mode, codebook_size=m.codebook_size,
      code_dim=m.code_dim, semantic_decoder_depth=sd.depth, semantic_decoder_width=sd.width,
      semantic_decoder_heads=sd.num_heads, semantic_decoder_mlp_dim=sd.mlp_dim,
      vq_impl=m.vq_impl, simvq=m.simvq)


def discriminator_config(c: ml_collections.ConfigDict) -> discriminator_lib.DiscriminatorConfig:
  d = c.discriminator
  return discriminator_lib.DiscriminatorConfig(
      ndf=d.ndf, n_layers=d.n_layers, norm_groups=d.norm_groups, dtype=c.model.dtype,
      param_dtype=c.model.param_dtype)


def _check_divisible(value: int, by: int, field: str, what: str) -> None:
  check(by > 0 and value % by == 0, field, f"{value} is not divisible by {what} ({by})",
        f"set it to a multiple of {by}")


def _check_kernels(m: ml_collections.ConfigDict) -> None:
  """The kernel choices of a model block (``attention_*``, and ``vq_impl`` where present)."""
  check(m.attention_impl in attention.IMPLEMENTATIONS, "model.attention_impl",
        f"{m.attention_impl!r} is unknown",
        f"use one of {attention.IMPLEMENTATIONS} ('auto': splash on TPU, cuDNN on GPU, else xla)")
  for field in ("attention_block_q", "attention_block_kv"):
    check(m[field] >= 128 and m[field] % 128 == 0, f"model.{field}",
          f"{m[field]} is not a splash tile length", "use a positive multiple of 128 (e.g. 512)")
  if "vq_impl" in m:
    check(m.vq_impl in vq.IMPLEMENTATIONS, "model.vq_impl", f"{m.vq_impl!r} is unknown",
          f"use one of {vq.IMPLEMENTATIONS} ('auto': the Pallas kernel on TPU, else chunked)")


def _check_layers(m: ml_collections.ConfigDict) -> None:
  """The layer stack fields of a model block (``scan_layers``, ``remat_policy``)."""
  check("remat" not in m, "model.remat", "the boolean was replaced by model.remat_policy",
        "set model.remat_policy='full' (was remat=True) or 'none' (was remat=False)")
  check(m.remat_policy in stack.REMAT_POLICIES, "model.remat_policy",
        f"{m.remat_policy!r} is unknown", f"use one of {tuple(stack.REMAT_POLICIES)}")


def validate_sde(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an SDE config that cannot build or train."""
  m = c.model
  _check_kernels(m)
  _check_layers(m)
  enc = m.encoder
  check(m.mode in sde_lib.MODES, "model.mode", f"{m.mode!r} is not an ablation mode",
        f"use one of {sde_lib.MODES} (Table 6: image only, semantic only, both)")
  for field in ("dtype", "param_dtype"):
    check(m[field] in DTYPES, f"model.{field}", f"{m[field]!r} is not a dtype",
          f"use one of {DTYPES}")
  check(enc.patch_size > 0 and enc.image_size >= enc.patch_size, "model.encoder.patch_size",
        f"patch {enc.patch_size} does not fit image_size {enc.image_size}",
        "use a positive patch size no larger than the image")
  if enc.image_size % enc.patch_size and not enc.drop_partial_patches:
    raise ConfigError(
        f"config.model.encoder.image_size: {enc.image_size} is not divisible by patch_size "
        f"{enc.patch_size}; use a multiple of {enc.patch_size} (e.g. "
        f"{enc.image_size // enc.patch_size * enc.patch_size}), or set "
        "config.model.encoder.drop_partial_patches=True to drop edge pixels as SigLIP-SO400M/14 "
        "at 384 px does")
  _check_divisible(enc.width, enc.num_heads, "model.encoder.width", "num_heads")
  sd = m.semantic_decoder
  _check_divisible(sd.width, sd.num_heads, "model.semantic_decoder.width", "num_heads")
  check(sd.depth >= 1, "model.semantic_decoder.depth", f"{sd.depth} layers", "use at least 1")
  check(m.code_dim >= 1, "model.code_dim", f"{m.code_dim} is not a code width",
        "use a positive code dimension (the paper uses 8)")
  check(m.codebook_size >= 2, "model.codebook_size", f"{m.codebook_size} entries",
        "use at least 2 codebook entries (the paper uses 32768)")
  factor = 2 ** (len(m.decoder.ch_mult) - 1)
  _check_divisible(enc.image_size, factor, "model.encoder.image_size",
                   "the pixel decoder's upsampling factor 2**(len(decoder.ch_mult)-1)")
  check(enc.image_size // enc.patch_size >= enc.image_size // factor, "model.decoder.ch_mult",
        f"the decoder grid {enc.image_size // factor} is finer than the token grid "
        f"{enc.image_size // enc.patch_size}", "add a level to decoder.ch_mult")
  widths = [m.decoder.ch * k for k in m.decoder.ch_mult]
  check(all(w % m.decoder.norm_groups == 0 for w in widths), "model.decoder.norm_groups",
        f"{m.decoder.norm_groups} groups do not divide the decoder widths {widths}",
        "use a divisor of decoder.ch")
  d = c.discriminator
  widths = [d.ndf * min(2 ** k, 8) for k in range(d.n_layers + 1)]
  check(all(w % d.norm_groups == 0 for w in widths), "discriminator.norm_groups",
        f"{d.norm_groups} groups do not divide the discriminator widths {widths}",
        "use a divisor of discriminator.ndf")
  check(c.batch_size >= 1, "batch_size", f"{c.batch_size}", "use a positive global batch")
  for opt in ("optimizer", "disc_optimizer"):
    check(c[opt].schedule in ("constant", "cosine"), f"{opt}.schedule",
          f"{c[opt].schedule!r} is unknown", "use 'constant' or 'cosine'")
  check(c.lpips_width_divisor == 1 or not c.lpips_checkpoint, "lpips_width_divisor",
        f"{c.lpips_width_divisor} narrows VGG16 but converted LPIPS weights are given",
        "set it to 1 (published weights are full width)")
  check(c.lpips_width_divisor >= 1 and 64 % c.lpips_width_divisor == 0, "lpips_width_divisor",
        f"{c.lpips_width_divisor}", "use 1, 2, 4, 8, 16, 32 or 64")
  check(c.total_steps >= 1, "total_steps", f"{c.total_steps}", "train for at least one step")
  _validate_codebook(c)
  if "data" in c and c.data.get("image_size", enc.image_size) != enc.image_size:
    raise ConfigError(
        f"config.data.image_size: {c.data.image_size} differs from model.encoder.image_size "
        f"{enc.image_size}; set both to the same value")


def _validate_codebook(c: ml_collections.ConfigDict) -> None:
  cb = c.codebook
  check(cb.init in ("uniform", "kmeans++"), "codebook.init", f"{cb.init!r} is unknown",
        "use 'uniform' or 'kmeans++'")
  check(cb.update_rule in ("gradient", "ema"), "codebook.update_rule",
        f"{cb.update_rule!r} is unknown", "use 'gradient' or 'ema'")
  check(cb.init_batches >= 1, "codebook.init_batches", f"{cb.init_batches}",
        "use at least one batch")
  check(0.0 < cb.ema_decay < 1.0, "codebook.ema_decay", f"{cb.ema_decay}",
        "use a decay in (0, 1), e.g. 0.99")
  check(cb.restart_after >= 0, "codebook.restart_after", f"{cb.restart_after}",
        "use 0 (off) or a positive number of steps")
  direct = cb.init != "uniform" or cb.update_rule != "gradient" or cb.restart_after
  check(not (c.model.simvq and direct), "model.simvq",
        "SimVQ entries are a product (basis @ map), so codebook.init='kmeans++', "
        "codebook.update_rule='ema' and codebook.restart_after cannot write them",
        "set model.simvq=False, or keep codebook at init='uniform', update_rule='gradient', "
        "restart_after=0")


# The remat policy of each planned preset: the fastest policy whose train step (256 x 2048
# tokens, fsdp over a v5p-128) leaves at least 15% of a chip's HBM free, from
# `python -m muse_jax.compile --config=configs/muse_vl.py:PRESET --topology=v5p-128
# --remat_policy=sweep` (README, "Parallelism"). Other presets keep "full", the least memory.
PLANNED_REMAT_POLICY = {"qwen2.5-7b": "save_dots", "qwen2.5-32b": "save_attn_mlp_out",
                        "yi-1.5-34b": "save_dots"}


def llm_defaults(preset: str) -> ml_collections.ConfigDict:
  """A MUSE-VL decoder run on the published ``preset`` (``qwen2.5-7b``, ``yi-1.5-9b``, ...).

  ``model`` holds every ``Qwen2Config`` field with the base model's (text)
  vocabulary; ``vocab.num_visual`` visual ids, ``<soi>`` and ``<eoi>`` are added on
  top (``muse_vl.VocabLayout``). Batch and sequence length are ours: the paper
  gives neither.
  """
  c = ml_collections.ConfigDict()
  c.trainer = "llm"
  c.seed = 0
  # converted weights to start from (`python -m muse_jax.convert llm-from-hf --muse_vl`);
  # "" = random initialisation
  c.init_from = ""
  c.mesh = sharding.mesh_config(data=1, fsdp=-1, tensor=1)   # ZeRO-3 over every chip
  model = dataclasses.asdict(qwen2.Qwen2Config.preset(preset))
  # stacked layers under lax.scan, with the remat policy planned for the preset (below)
  model.update(dtype="bfloat16", param_dtype="float32", scan_layers=True,
               remat_policy=PLANNED_REMAT_POLICY.get(preset, "full"))
  c.model = ml_collections.ConfigDict(model)
  c.vocab = ml_collections.ConfigDict(dict(num_visual=32768, pad_multiple=128))
  c.total_steps = 100_000
  c.batch_size = 256                # global, packed rows
  c.seq_len = 2048
  c.loss_chunk = 512                # sequence positions per cross-entropy chunk
  loop_defaults(c)
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.0,             # AdamW (decoupled); the paper gives no decay
      grad_clip=1.0,
      warmup_steps=2_000,
      schedule="cosine",
  ))
  # parts of the decoder frozen or trained at their own rate (muse_jax/train/param_groups.py):
  # name -> dict(pattern=regex on parameter names, lr_scale=float, rows="all" | "new")
  c.param_groups = ml_collections.ConfigDict()
  c.param_groups_default_lr_scale = 1.0
  return c


def vocab_layout(c: ml_collections.ConfigDict) -> muse_vl.VocabLayout:
  return muse_vl.VocabLayout(c.model.vocab_size, c.vocab.num_visual, c.vocab.pad_multiple)


def llm_model_config(c: ml_collections.ConfigDict) -> qwen2.Qwen2Config:
  """The decoder of a run: the base model over the extended MUSE-VL vocabulary."""
  fields = dict(c.model.to_dict(), vocab_size=vocab_layout(c).vocab_size)
  if "remat" in fields:   # a run saved before remat_policy replaced the boolean
    fields["remat_policy"] = "full" if fields.pop("remat") else "none"
  return qwen2.Qwen2Config(**fields)


def validate_llm(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a decoder config that cannot build or train."""
  m = c.model
  _check_kernels(m)
  _check_layers(m)
  for field in ("dtype", "param_dtype"):
    check(m[field] in DTYPES, f"model.{field}", f"{m[field]!r} is not a dtype",
          f"use one of {DTYPES}")
  check(m.num_heads >= 1 and m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads == 0,
        "model.num_kv_heads", f"{m.num_kv_heads} does not divide num_heads {m.num_heads}",
        "use a divisor of num_heads (GQA groups must be whole)")
  if m.head_dim is None:
    _check_divisible(m.hidden_size, m.num_heads, "model.hidden_size", "num_heads")
  check(c.vocab.num_visual >= 0, "vocab.num_visual", f"{c.vocab.num_visual}",
        "use the SDE codebook size (32768), or 0 for a text-only decoder")
  check(c.vocab.pad_multiple >= 1, "vocab.pad_multiple", f"{c.vocab.pad_multiple}",
        "use a positive multiple (128 shards evenly)")
  for field in ("batch_size", "seq_len", "loss_chunk", "total_steps"):
    check(c[field] >= 1, field, f"{c[field]}", "use a positive value")
  check(c.optimizer.schedule in ("constant", "cosine"), "optimizer.schedule",
        f"{c.optimizer.schedule!r} is unknown", "use 'constant' or 'cosine'")


# The paper's generation instructions (MUSE-VL section 3.2 names the first two; the
# rest are in the same spirit), one drawn per generation example.
SYSTEM_TEXTS = ("Please generate an image.", "Show me a photo.", "Draw a picture of this.",
                "Create an image that matches the description.")
VLM_TASKS = ("pretrain", "understanding", "generation")


def vlm_defaults(preset: str) -> ml_collections.ConfigDict:
  """A VLM stage (``configs/vlm_pretrain.py``, ``configs/vlm_sft.py``): the decoder run of
  ``llm_defaults`` plus its data: captioned images tokenized by a trained SDE run
  (``muse_jax.data.image_codes``), built into sequences (``sequences``) and packed."""
  c = llm_defaults(preset)
  c.sde_workdir = ""                # a trained SDE tokenizer's run directory
  # Hugging Face tokenizer directory with the MUSE-VL tokens; "" = train the demo BPE
  # tokenizer on the annotations' texts into WORKDIR/tokenizer (once)
  c.tokenizer_dir = ""
  c.data = ml_collections.ConfigDict(dict(
      # SDE code shards of python -m muse_jax.tokenize_images (its --out directory): read
      # instead of encoding the images below when the stage starts (the SDE run is not
      # loaded); their eval split is the held-out set
      code_shards="",
      image_dir="",                 # "" = the photographs scikit-image ships
      annotations="",               # "" = muse_jax/data/demo_annotations.json
      num_eval_images=4,            # held out (sources.split_eval): the held-out loss
      views=1,                      # crops encoded per training image (centre + random)
      min_scale=0.6,                # random crops' side >= this x the shorter side
      encode_batch=8,               # images per jitted SDE encode
      max_image_pixels=89_478_485,
  ))
  c.sequences = ml_collections.ConfigDict(dict(
      tasks=ml_collections.ConfigDict(dict(pretrain=1.0, understanding=0.0, generation=0.0)),
      image_first_ratio=0.5,        # pre-training: image then caption, else caption then image
      system_texts=SYSTEM_TEXTS,
      caption_drop_prob=0.1,        # generation: unconditional prompts for CFG
      pack_buffer=256,              # examples packed at a time (first-fit decreasing)
  ))
  return c


def validate_vlm(c: ml_collections.ConfigDict, *, inputs_resolved: bool = True) -> None:
  """Raises ConfigError for a VLM stage config that cannot build, train or evaluate.

  ``inputs_resolved=False``: before ``llm_trainer.train`` fills an empty ``sde_workdir``
  (from an ``init_from`` run, or by training ``sde_config``), it may still be empty.
  """
  validate_llm(c)
  check("sequences" in c and "data" in c and "sde_workdir" in c, "trainer",
        "this decoder config has no data (no sde_workdir, data, sequences fields)",
        "run a VLM stage config: configs/vlm_pretrain.py or configs/vlm_sft.py")
  check(bool(c.sde_workdir) or not inputs_resolved, "sde_workdir", "is empty",
        "give a trained SDE run directory (python -m muse_jax.main "
        "--config=configs/sde_256.py:demo --workdir=DIR), or an init_from run that names "
        "one, or set config.sde_config to train one first as configs/vlm_pretrain.py:demo does")
  unknown = sorted(set(c.sequences.tasks) - set(VLM_TASKS))
  check(not unknown, "sequences.tasks", f"unknown tasks {unknown}", f"use {VLM_TASKS}")
  for field in ("views", "encode_batch", "num_eval_images"):
    check(c.data[field] >= 1, f"data.{field}", f"{c.data[field]}", "use a positive number")
  check(0.05 <= c.data.min_scale <= 1.0, "data.min_scale", f"{c.data.min_scale}",
        "use a value in [0.05, 1]")
