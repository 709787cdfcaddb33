"""``python -m muse_jax.evaluate COMMAND ...``: see docs/evaluate.md.

  fid       --real=DIR|STATS.npz --fake=DIR|STATS.npz --inception=WEIGHTS [--save_stats=F.npz]
  quality   --reference=DIR --candidate=DIR [--size=256]   (PSNR / SSIM by file name)
  mjhq      --mjhq_dir=DIR --generated=DIR --inception=WEIGHTS [--categories=people,food]
  codebook  --codes=FILE.npy --codebook_size=N                (utilisation, perplexity)
  geneval   --metadata=evaluation_metadata.jsonl --images=DIR --out=DIR

Each prints its results as one JSON line and, with --out_dir, writes
``<out_dir>/<command>.json`` and TensorBoard scalars under ``<out_dir>/tensorboard``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from muse_jax import cli

PROG = "python -m muse_jax.evaluate"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def command(name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--out_dir", default=None, help="write <command>.json and TensorBoard here")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p

  p = command("fid", "FID between two folders of images (or saved statistics)")
  p.add_argument("--real", required=True, help="image folder, or .npz statistics (mu, sigma)")
  p.add_argument("--fake", required=True, help="image folder, or .npz statistics (mu, sigma)")
  p.add_argument("--save_stats", default=None,
                 help="also write the statistics of --real (a folder) to this .npz")
  p.add_argument("--inception", required=True,
                 help="converted FID Inception weights (python -m muse_jax.convert inception)")
  p.add_argument("--batch_size", type=int, default=50)

  p = command("quality", "PSNR / SSIM of candidate images against references (same names)")
  p.add_argument("--reference", required=True)
  p.add_argument("--candidate", required=True)
  p.add_argument("--size", type=int, default=256, help="both are centre-cropped to this size")
  p.add_argument("--batch_size", type=int, default=16)

  p = command("mjhq", "generation FID on MJHQ-30K, per category and overall")
  p.add_argument("--mjhq_dir", required=True, help="holds meta_data.json and mjhq30k_imgs/")
  p.add_argument("--generated", required=True, help="generated images named <id>.png")
  p.add_argument("--inception", required=True)
  p.add_argument("--categories", default="", help="comma-separated subset (default: all)")
  p.add_argument("--batch_size", type=int, default=50)

  p = command("codebook", "codebook utilisation and perplexity of saved codes")
  p.add_argument("--codes", required=True, help=".npy of integer codes, any shape")
  p.add_argument("--codebook_size", type=int, required=True)

  p = command("geneval", "lay generated images out for GenEval's evaluator")
  p.add_argument("--metadata", required=True, help="GenEval's evaluation_metadata.jsonl")
  p.add_argument("--images", required=True, help="images named <prompt>_<sample>.png")
  p.add_argument("--out", required=True, help="new GenEval output folder")
  return parser


def _features(args):
  from muse_jax.convert import inception as inception_convert
  from muse_jax.evaluate import fid
  if args.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
  return fid.InceptionFeatures(inception_convert.load(args.inception), args.batch_size)


def _fid(args, show: bool) -> dict:
  from muse_jax.evaluate import fid
  features = None
  gaussians, result = [], {}
  for side in ("real", "fake"):
    source = getattr(args, side)
    if source.endswith(".npz"):
      gaussians.append((*fid.load_gaussian(source), None))
      continue
    features = features or _features(args)
    stats = fid.folder_stats(source, features, show_progress=show)
    if side == "real" and args.save_stats:
      stats.save(args.save_stats)
    gaussians.append((stats.mean, stats.covariance, stats.factor()))
    result[f"{side}_images"] = stats.count
  (mu1, sigma1, factor1), (mu2, sigma2, factor2) = gaussians
  return {"fid": fid.frechet_distance(mu1, sigma1, mu2, sigma2, factor1, factor2), **result}


def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  show = not args.no_progress
  images = None
  if args.command == "fid":
    result = _fid(args, show)
  elif args.command == "quality":
    from muse_jax.evaluate import quality
    if args.size < 11:
      raise ValueError(f"--size must be at least 11 (SSIM's 11 x 11 window), got {args.size}")
    result = quality.folders(args.reference, args.candidate, size=args.size,
                             batch_size=args.batch_size, show_progress=show)
  elif args.command == "mjhq":
    from muse_jax.evaluate import mjhq
    categories = [c for c in args.categories.split(",") if c]
    result = mjhq.evaluate(args.mjhq_dir, args.generated, _features(args),
                           categories=categories, show_progress=show)
  elif args.command == "codebook":
    from muse_jax.evaluate import codebook
    try:
      codes = np.load(args.codes)
    except (OSError, ValueError) as error:
      raise ValueError(f"--codes={args.codes}: not a readable .npy file ({error})") from error
    usage = codebook.CodebookUsage(args.codebook_size)
    usage.add(codes)
    result, images = usage.summary(), {"histogram": usage.histogram_image()}
  else:
    from muse_jax.evaluate import geneval
    metadata = geneval.read_metadata(args.metadata)
    written = geneval.write(args.out, metadata,
                            geneval.samples_from_folder(args.images, len(metadata)),
                            show_progress=show)
    result = {"wrote": args.out, "prompts": len(metadata), "images": written}
  if args.out_dir:
    from muse_jax.evaluate import results
    results.write(args.out_dir, args.command, result, images=images)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  cli.run(main, sys.argv[1:], PROG)
