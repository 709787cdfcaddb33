"""MUSE-VL pre-training: image-caption pairs, next-token loss on every token.

MUSE-VL section 4.1: the decoder (a published Qwen2.5 / Yi-1.5 LLM, its
vocabulary extended by the SDE codebook's 32768 visual ids plus <soi>/<eoi>)
trains on image-caption pairs in both orders (image then caption, caption then
image; ``sequences.image_first_ratio``), AdamW(0.9, 0.95), lr 1e-4, cosine
schedule with warmup. Examples are packed into rows of ``seq_len`` tokens.

The arg picks the base model (default qwen2.5-7b, any ``qwen2.PRESETS`` name).
A real run starts from a converted checkpoint and the base model's tokenizer
with the MUSE-VL tokens (``python -m muse_jax.convert llm-from-hf --muse_vl``):

  python -m muse_jax.main --config=configs/vlm_pretrain.py:qwen2.5-7b --workdir=/ckpt/vlm_pt \
      --config.init_from=/ckpt/qwen2.5-7b-muse-vl --config.tokenizer_dir=/ckpt/qwen2.5-7b-muse-vl \
      --config.sde_workdir=/ckpt/sde_256 --config.data.image_dir=/data/images \
      --config.data.annotations=/data/captions.json

With ``new_rows_only`` in the arg (``:qwen2.5-7b,new_rows_only``) only the rows the
vocabulary extension added (visual ids, <soi>/<eoi>) of the embedding and the LM
head train, everything else frozen (``muse_jax/train/param_groups.py``): a short
first phase; the full run then starts from it with ``--config.init_from=THAT_RUN``.

(the images are tokenized when the run starts, see ``muse_jax/data/image_codes.py``:
this serves folders of thousands of images. Datasets of millions are tokenized
once by ``python -m muse_jax.tokenize_images --sde_workdir=/ckpt/sde_256
--out=/data/codes ...`` and read with ``--config.data.code_shards=/data/codes``.)

Demo on a CPU: a 2-layer decoder trained from scratch on the bundled
photographs' captions (``muse_jax/data/demo_annotations.json``), with a byte-level
BPE tokenizer learnt from them into WORKDIR/tokenizer. Its images are encoded by
the SDE tokenizer demo (``configs/sde_256.py:demo``, carried as ``sde_config``),
trained first into WORKDIR/sde_tokenizer unless ``--config.sde_workdir`` names a
trained one:

  python -m muse_jax.main --config=configs/vlm_pretrain.py:demo --workdir=/tmp/vlm_pt

Then ``configs/vlm_sft.py:demo`` continues from /tmp/vlm_pt.
"""

from muse_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  presets = [a for a in args if a not in ("demo", "new_rows_only")]
  c = config_lib.vlm_defaults(presets[0] if presets else "qwen2.5-7b")
  if "new_rows_only" in args:
    c.param_groups_default_lr_scale = 0.0
    c.param_groups.new_rows = dict(pattern="embed_tokens|lm_head", rows="new", lr_scale=1.0)
  if "demo" in args:
    apply_demo(c)
    c.sde_config = config_lib.sibling_config(__file__, "sde_256").get_config("demo")
  return c


def apply_demo(c):
  """The CPU demo's decoder, data and schedule (shared with ``configs/vlm_sft.py:demo``)."""
  c.model.update(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=256, tie_word_embeddings=False, dtype="float32",
                 scan_layers=False, remat_policy="none")
  c.vocab.num_visual = 1024          # the SDE demo's codebook
  c.data.update(views=8)             # 13 training photographs x 8 crops
  c.sequences.pack_buffer = 64
  c.update(batch_size=8, seq_len=256, loss_chunk=128, total_steps=300, log_every=10,
           eval_every=100, checkpoint_every=100)
  c.optimizer.update(lr=1e-3, warmup_steps=20)
