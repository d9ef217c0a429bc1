"""argparse types of the command line: each refuses a bad value with one message naming the option."""

from __future__ import annotations

import argparse
import math


def int_range(name: str, lo: int, hi: int, multiple: int = 1):
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


def positive_float(name: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number > 0, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return v

    return parse


def finite_float(name: str, lo: float | None = None, hi: float | None = None):
    """argparse type: a finite float (NaN and +-inf refused) within [lo, hi]."""
    where = (f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else
             f" >= {lo:g}" if lo is not None else f" <= {hi:g}" if hi is not None else "")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number{where}, got {text!r}") from None
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number{where}, got {text!r}")
        return v

    return parse


def device_arg(text: str) -> str:
    """argparse type of ``--device``: a device torch can run the models on here (cpu, an existing cuda:N, mps)."""
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        d = None
    if d is not None and d.type == "cpu":
        return str(d)
    if d is not None and d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"--device {text!r}: torch sees no CUDA GPU here; use --device cpu")
        if d.index is not None and d.index >= count:
            raise argparse.ArgumentTypeError(f"--device {text!r}: torch sees {count} CUDA GPU(s) (cuda:0 to "
                                             f"cuda:{count - 1})")
        return str(d)
    if d is not None and d.type == "mps" and torch.backends.mps.is_available():
        return str(d)
    raise argparse.ArgumentTypeError(f"--device {text[:40]!r} cannot run the models: use cpu, cuda or cuda:N")
