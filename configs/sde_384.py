"""SDE tokenizer, 384 px: SigLIP-SO400M-patch14-384 encoders, 27x27 = 729 tokens.

As sde_256 but with the SO400M tower (width 1152, 27 layers, 16 heads, mlp
4304). 384 / 14 leaves 6 edge pixels that SigLIP's patch conv drops; the 27x27
code grid is resized bilinearly to 24x24 before the 16x pixel decoder so that it
outputs 384 x 384 (as DualToken's released code does).

Run:

  python -m muse_jax.main --config=configs/sde_384.py --workdir=/tmp/sde_384 \
      --config.data.imagenet_dir=/data/tfds --config.data.cc12m_shards="/data/cc12m/*.tar" \
      --config.siglip_checkpoint=/ckpt/siglip_so400m_384 --config.lpips_checkpoint=/ckpt/lpips

Demo (72 px, patch 7: a 10x10 code grid resized to the decoder's 9x9, the
same path as 27 -> 24; a few minutes on 2 CPU cores):

  python -m muse_jax.main --config=configs/sde_384.py:demo --workdir=/tmp/sde384_demo
"""

from muse_jax import config_lib
from muse_jax import data


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  c = config_lib.sde_defaults()
  c.model = config_lib.sde_model(image_size=384, patch_size=14, width=1152, depth=27,
                                 num_heads=16, mlp_dim=4304, drop_partial_patches=True)
  # ImageNet-1K + CC12M, as the paper; set the paths (docs/data.md), e.g.
  # --config.data.imagenet_dir=/data/tfds --config.data.cc12m_shards='/data/cc12m/*.tar'
  c.data = data.image_data_config(source="mixture", image_size=384, worker_count=8,
                                  num_eval_images=1000)
  if "demo" in args:
    config_lib.shrink_for_demo(c, image_size=72, patch_size=7)
    c.data = data.image_data_config(source="bundled", image_size=72, num_eval_images=4)
  return c
