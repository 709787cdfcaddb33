"""Evaluation as the papers measure it: ``python -m muse_jax.evaluate`` (docs/evaluate.md).

  fid       FID (Inception pool features, ``muse_jax.models.inception``), rFID helper
  quality   PSNR / SSIM (``muse_jax.train.losses``)
  codebook  codebook utilisation and perplexity over a dataset
  mjhq      generation FID on MJHQ-30K, per category and overall
  mmbench   MMBench-format multiple-choice VQA with circular evaluation
  geneval   GenEval's output folder layout
  results   JSON + TensorBoard scalars; progress: bars with ETA
"""
