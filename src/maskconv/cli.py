"""Command line: ``maskconv <command>`` / ``python -m maskconv`` / ``torchrun -m maskconv``.

Parses arguments and calls ``maskconv.api``; nothing else happens here.
"""
from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskconv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="list registered models with params and GMACs")
    m.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'convnextv2_*'")
    m.add_argument("--img-size", type=int, default=224)
    m.add_argument("--throughput", action="store_true", help="also measure CPU inference img/s (<=30M params)")
    v = sub.add_parser("visualize", help="pictures of what a model learned")
    vsub = v.add_subparsers(dest="what", required=True)
    r = vsub.add_parser("recon", help="masked reconstructions from a pretraining checkpoint")
    r.add_argument("--checkpoint", required=True, help="file written by pretraining (save_objective)")
    r.add_argument("--images", required=True, help="an image file or a folder of images")
    r.add_argument("--out", required=True, help="PNG to write")
    r.add_argument("--size", type=int, default=None, help="crop size (multiple of the patch size)")
    r.add_argument("--mask-ratio", type=float, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--limit", type=int, default=8, help="at most this many images")
    d = sub.add_parser("demo", help="build every model, measure it, write a table and a figure")
    d.add_argument("--out", default="demo_out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from . import api

    try:
        if args.command == "models":
            rows = api.model_table(args.pattern, args.img_size,
                                   throughput_max_params_m=30.0 if args.throughput else 0.0)
            if not rows:
                print(f"no model matches {args.pattern!r}", file=sys.stderr)
                return 2
            print(api.format_table(rows, args.img_size))
        elif args.command == "visualize" and args.what == "recon":
            api.run_visualize_recon(args.checkpoint, args.images, args.out, args.size, args.mask_ratio,
                                    args.seed, args.limit)
        elif args.command == "demo":
            api.run_demo(args.out)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"maskconv: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
