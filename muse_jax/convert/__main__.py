"""``python -m muse_jax.convert SUBCOMMAND ...``: see docs/convert.md.

Each run ends by printing one JSON line: what was written and the process's peak
resident memory, the figure that shows conversion streams tensor by tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys

from etils import epath

from muse_jax import cli


def peak_rss_mb() -> float:
  """This process's peak resident memory. Linux's VmHWM belongs to the process image,
  while getrusage's ru_maxrss keeps the parent's peak across fork + exec, so a
  conversion started by a large process would report that process's memory."""
  status = epath.Path("/proc/self/status")
  if status.exists():
    for line in status.read_text().splitlines():
      if line.startswith("VmHWM:"):
        return round(int(line.split()[1]) / 1024, 1)
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _size(text: str) -> int:
  units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
  for unit, factor in units.items():
    if text.upper().endswith(unit):
      return int(float(text[:-len(unit)]) * factor)
  return int(text)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m muse_jax.convert", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("llm-from-hf", help="HF Qwen2 / Qwen2.5 / Llama (Yi-1.5) -> our weights")
  p.add_argument("--hf_dir", required=True, help="directory with config.json + safetensors")
  p.add_argument("--out", required=True, help="new weights directory (local or gs://)")
  p.add_argument("--dtype", default="float32", help="parameter dtype (float32, bfloat16)")
  p.add_argument("--muse_vl", action="store_true",
                 help="extend embedding and LM head with the MUSE-VL visual ids, <soi>, <eoi>")
  p.add_argument("--num_visual", type=int, default=32768, help="visual ids (SDE codebook size)")
  p.add_argument("--seed", type=int, default=0, help="seed of the new rows")
  p.add_argument("--new_rows_scale", type=float, default=1.0,
                 help="spread of new rows relative to the existing rows' covariance")
  p.add_argument("--scan_layers", action="store_true",
                 help="stack each layer's tensors (the scanned layout; either loads into either)")

  p = sub.add_parser("llm-to-hf", help="our weights -> HF directory (transformers loads it)")
  p.add_argument("--ckpt", required=True, help="our decoder weights directory")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--dtype", default=None, help="safetensors dtype (default: the stored one)")
  p.add_argument("--tokenizer", default=None,
                 help="HF tokenizer directory to copy, with the MUSE-VL tokens added")
  p.add_argument("--max_shard_size", default="5GB", help="e.g. 5GB, 500MB")

  p = sub.add_parser("siglip", help="HF SigLIP vision tower -> SDE encoder parameters")
  p.add_argument("--hf_dir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--scan_layers", action="store_true", help="stack each layer's tensors")

  p = sub.add_parser("layout", help="our weights -> the same weights with layer stacks "
                                    "scanned (stacked) or unscanned (one tensor per layer)")
  p.add_argument("--src", required=True, help="our weights directory")
  p.add_argument("--out", required=True, help="new weights directory")
  p.add_argument("--to", required=True, choices=("scanned", "unscanned"))

  p = sub.add_parser("lpips", help="torchvision VGG16 + lpips heads -> our LPIPS parameters")
  p.add_argument("--vgg", required=True, help="torchvision vgg16 state dict (.pth / .safetensors)")
  p.add_argument("--heads", required=True, help="lpips weights/v0.1/vgg.pth")
  p.add_argument("--out", required=True)

  p = sub.add_parser("inception", help="pytorch-fid's FID Inception file -> our FIDInceptionV3")
  p.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  p.add_argument("--out", required=True)
  return parser


def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  if args.command == "llm-from-hf":
    from muse_jax.convert import hf
    config = hf.hf_to_checkpoint(args.hf_dir, args.out, dtype=args.dtype,
                                 num_visual=args.num_visual if args.muse_vl else None,
                                 seed=args.seed, new_rows_scale=args.new_rows_scale,
                                 scan_layers=args.scan_layers)
    result = {"wrote": args.out, "config": dataclasses.asdict(config)}
  elif args.command == "llm-to-hf":
    from muse_jax.convert import hf
    shards = hf.checkpoint_to_hf(args.ckpt, args.out, dtype=args.dtype,
                                 tokenizer_dir=args.tokenizer,
                                 max_shard_bytes=_size(args.max_shard_size))
    result = {"wrote": args.out, "shards": shards}
  elif args.command == "siglip":
    from muse_jax.convert import siglip
    config = siglip.hf_to_checkpoint(args.hf_dir, args.out, dtype=args.dtype,
                                     scan_layers=args.scan_layers)
    result = {"wrote": args.out, "config": dataclasses.asdict(config)}
  elif args.command == "layout":
    from muse_jax import weights
    weights.convert_layout(args.src, args.out, scan=args.to == "scanned")
    result = {"wrote": args.out, "layout": args.to}
  elif args.command == "inception":
    from muse_jax.convert import inception
    inception.torch_to_checkpoint(args.pth, args.out)
    result = {"wrote": args.out}
  else:
    from muse_jax.convert import lpips
    lpips.torch_to_checkpoint(args.vgg, args.heads, args.out)
    result = {"wrote": args.out}
  result["peak_rss_mb"] = peak_rss_mb()
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  cli.run(main, sys.argv[1:], "python -m muse_jax.convert")
