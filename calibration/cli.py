"""``qsched`` command line: demo, and (as they land) sample, calibrate, score, bench."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, size=args.size, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsched", description="Q-Sched: quantization-aware few-step sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="every sampler with identity and Q-Sched coefficients on tiny models")
    d.add_argument("--out", default="qsched-demo", help="output folder (default: qsched-demo)")
    d.add_argument("--steps", type=_int_range("--steps", 1, 8), default=4, help="sampling steps, 1-8 (default 4)")
    d.add_argument("--size", type=_int_range("--size", 16, 512, multiple=16), default=64,
                   help="image size in pixels, 16-512, multiple of 16 (default 64)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return p


def _int_range(name: str, lo: int, hi: int, multiple: int = 1):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer in [{lo}, {hi}], got {text!r}") from None
        if not lo <= v <= hi or v % multiple:
            extra = f", a multiple of {multiple}" if multiple > 1 else ""
            raise argparse.ArgumentTypeError(f"{name} must be an integer in [{lo}, {hi}]{extra}, got {v}")
        return v

    return parse


def main(argv: list[str] | None = None) -> int:
    from ..qsched._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
