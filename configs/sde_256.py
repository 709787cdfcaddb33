"""SDE tokenizer, 256 px: SigLIP-Large-patch16-256 encoders, 16x16 = 256 tokens.

MUSE-VL section 4.1 / LlamaGen defaults: codebook 32768 x 8 (L2-normalised),
semantic loss weight 1, Adam(0.9, 0.95) lr 1e-4, global batch 128, bf16 compute,
discriminator (weight 0.5) from step 20000, ImageNet-1K + CC12M.

Run (a pod slice or a GPU node; the ImageNet + CC12M paths are required, see docs/data.md):

  python -m muse_jax.main --config=configs/sde_256.py --workdir=/tmp/sde_256 \
      --config.data.imagenet_dir=/data/tfds --config.data.cc12m_shards="/data/cc12m/*.tar" \
      --config.siglip_checkpoint=/ckpt/siglip_large_256 --config.lpips_checkpoint=/ckpt/lpips

Demo on a laptop CPU (bundled scikit-image photographs, 64 px, ~5-7 minutes on
2 cores: 300 steps, the discriminator joins at step 250; TensorBoard logs,
checkpoints and reconstruction grids land in the workdir):

  python -m muse_jax.main --config=configs/sde_256.py:demo --workdir=/tmp/sde_demo

Its 1024-entry codebook sees 512 tokens a step, so the demo restarts entries
unused for 40 steps (config.codebook.restart_after), which keeps it healthy. Last
run: codebook usage 100% over the last 50 steps (perplexity 265), held-out PSNR
10.2 -> 19.3 dB; before the init fix and without restarts: 9.6%, 53, 17.25 dB.
The full config keeps the paper's recipe (symmetric init, no restarts).

Ablations (paper Table 6): --config.model.mode=image | semantic | both.

The towers and the semantic decoder are stacked and scanned (``model.scan_layers``)
and keep only their matmul outputs for the backward pass
(``model.remat_policy="save_dots"``: the fastest policy that fits, README,
"Parallelism"); the demo unrolls them without remat.
"""

from muse_jax import config_lib
from muse_jax import data


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  c = config_lib.sde_defaults()
  c.model = config_lib.sde_model(image_size=256, patch_size=16, width=1024, depth=24,
                                 num_heads=16, mlp_dim=4096)
  # ImageNet-1K + CC12M, as the paper; set the paths (docs/data.md), e.g.
  # --config.data.imagenet_dir=/data/tfds --config.data.cc12m_shards='/data/cc12m/*.tar'
  c.data = data.image_data_config(source="mixture", image_size=256, worker_count=8,
                                  num_eval_images=1000)
  if "demo" in args:
    config_lib.shrink_for_demo(c, image_size=64, patch_size=8)
    c.data = data.image_data_config(source="bundled", image_size=64, num_eval_images=4)
    # 1024 entries for 512 tokens a step: restart what the encoder stops using
    c.codebook.update(restart_after=40, usage_floor=0.5)
  return c
