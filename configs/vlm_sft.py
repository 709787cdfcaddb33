"""MUSE-VL instruction tuning: understanding and generation conversations, one decoder.

MUSE-VL section 3.2 / 4.1: understanding examples (a conversation about an image,
the image as ``<soi>{codes}<eoi>`` in the first user turn, loss on the assistant
turns) and generation examples (a sampled instruction plus the caption, loss on
the image's visual ids and ``<eoi>``; the caption dropped with
``sequences.caption_drop_prob`` for classifier-free guidance), mixed with
``sequences.tasks`` weights. AdamW(0.9, 0.95), lr 1e-4, cosine with warmup; the
decoder starts from the pre-training stage's last checkpoint (``init_from`` a
run directory) or from converted weights.

  python -m muse_jax.main --config=configs/vlm_sft.py:qwen2.5-7b --workdir=/ckpt/vlm_sft \
      --config.init_from=/ckpt/vlm_pt --config.tokenizer_dir=/ckpt/qwen2.5-7b-muse-vl \
      --config.sde_workdir=/ckpt/sde_256 --config.data.image_dir=/data/images \
      --config.data.annotations=/data/conversations.json

Demo, after ``configs/vlm_pretrain.py:demo``: it starts from /tmp/vlm_pt
(``init_from``), whose config.json gives the SDE run and the text tokenizer:

  python -m muse_jax.main --config=configs/vlm_sft.py:demo --workdir=/tmp/vlm_sft
"""

from muse_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  presets = [a for a in args if a != "demo"]
  c = config_lib.vlm_defaults(presets[0] if presets else "qwen2.5-7b")
  c.sequences.tasks.update(pretrain=0.0, understanding=0.5, generation=0.5)
  c.optimizer.warmup_steps = 500
  if "demo" in args:
    config_lib.sibling_config(__file__, "vlm_pretrain").apply_demo(c)
    c.init_from = "/tmp/vlm_pt"
    c.update(total_steps=200)
    c.optimizer.update(lr=5e-4, warmup_steps=10)
  return c
