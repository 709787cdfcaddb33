"""MUSE-VL decoder: a published Qwen2.5 / Yi-1.5 LLM over text + 32768 visual ids.

MUSE-VL section 4.1: the embedding and LM head grow by 32768 visual ids (plus
``<soi>``/``<eoi>``, padded to a multiple of 128); AdamW(0.9, 0.95), lr 1e-4,
cosine with warmup. bf16 compute, fp32 parameters and moments, FSDP over every
chip by default. The layers are stacked and scanned (``model.scan_layers``); the
remat policy is the one planned for the preset on a v5p-128
(``config_lib.PLANNED_REMAT_POLICY``: the fastest that leaves 15% of HBM free;
``full``, the least memory, for presets not planned). Compare the policies on
another slice with ``--remat_policy=sweep`` (README, "Parallelism").

The arg picks the base model (default qwen2.5-7b; any name in
``muse_jax.models.qwen2.PRESETS``). Check that a slice fits before renting it:

  python -m muse_jax.compile --config=configs/muse_vl.py:qwen2.5-7b --topology=v5p-128
  python -m muse_jax.compile --config=configs/muse_vl.py:qwen2.5-32b --topology=v5p-256 \
      --config.mesh.fsdp=64 --config.mesh.tensor=2

``:demo`` is a 2-layer decoder of the same shape family that compiles in seconds
(CI compiles it for a TPU topology; the sharding tests train it).

This config is the decoder and its step only (what ``muse_jax.compile`` plans);
the runnable stages add their data on top of it: ``configs/vlm_pretrain.py``
(image-caption pre-training) and ``configs/vlm_sft.py`` (instruction tuning).
"""

from muse_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  presets = [a for a in args if a != "demo"]
  c = config_lib.llm_defaults(presets[0] if presets else "qwen2.5-7b")
  if "demo" in args:
    c.model.update(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=128, dtype="float32", scan_layers=False,
                   remat_policy="none")
    c.vocab.num_visual = 1024
    c.update(batch_size=8, seq_len=64, loss_chunk=32, total_steps=100)
    c.optimizer.update(lr=1e-3, warmup_steps=10)
  return c
