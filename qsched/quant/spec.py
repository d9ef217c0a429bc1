"""Quantization formats: what a layer's weights and activations are rounded to.

Defaults (docs/quantization.md has the full table):
* weights: symmetric, no zero point. 8 bit: one scale per output channel. 4 bit (and below): one scale per group of
  ``group_size`` (64) consecutive input features. Codes lie in [-(2^(b-1)-1), 2^(b-1)-1].
* activations: dynamic (computed on every call), one scale per token (per row of the last dimension), symmetric
  by default; ``act_symmetric=False`` adds an integer zero point (codes in [-2^(b-1), 2^(b-1)-1]).
* ``w8a8-fp8``: weights and activations in float8 e4m3 with per-output-channel / per-token scales.
* ``w4a8-fp8``: int4 weight codes whose group scales are powers of two times one float scale per output channel,
  so that code x 2^e is an exact float8 e4m3 value: the GEMM converts the codes to float8 inside its main loop and
  runs on the FP8 tensor cores with no per-group rescale of the accumulator (qmath.quantize_weight_fp8w4).
  Activations as in ``w8a8-fp8``. Group 32 by default.
* ``-nf4`` / ``-fp4``: bitsandbytes 4-bit weight data types (blockwise absmax, block = group_size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

FORMATS = ("w8a8", "w8a8-fp8", "w4a8-fp8", "w4a8", "w4a6", "w4a5", "w4a4", "w8a16", "w4a16", "fp16",
           "nf4", "w4a8-nf4", "w4a16-nf4", "w4a8-fp4", "w4a16-fp4")
WEIGHT_DTYPES = ("int", "fp8", "nf4", "fp4")
ACT_DTYPES = ("int", "fp8")
FP8W4_GROUPS = (32, 64, 128)  # group sizes of w4a8-fp8 (the Triton GEMM reads 128 columns per K step)
_NAME = re.compile(r"^w(\d+)a(\d+)(?:-(fp8|nf4|fp4|int))?$")


@dataclass(frozen=True)
class QuantSpec:
    """One quantization format. ``w_bits``/``a_bits`` of 16 mean "left in the model's float dtype"."""

    w_bits: int = 16
    a_bits: int = 16
    w_dtype: str = "int"
    a_dtype: str = "int"
    group_size: int | None = None  # None: one scale per output channel (the whole input row)
    act_symmetric: bool = True
    quantize_conv: bool = False  # Conv2d through the simulated backend (weights per output channel)

    def __post_init__(self):
        _check(self.w_bits in (16,) or 2 <= self.w_bits <= 8, "w_bits", self.w_bits, "2..8 or 16")
        _check(self.a_bits in (16,) or 2 <= self.a_bits <= 8, "a_bits", self.a_bits, "2..8 or 16")
        _check(self.w_dtype in WEIGHT_DTYPES, "w_dtype", self.w_dtype, WEIGHT_DTYPES)
        _check(self.a_dtype in ACT_DTYPES, "a_dtype", self.a_dtype, ACT_DTYPES)
        if self.w_dtype in ("nf4", "fp4"):
            _check(self.w_bits == 4, "w_bits", self.w_bits, f"4 for w_dtype={self.w_dtype!r}")
            _check(self.group_size in (64, 128, 256, 512, 1024, 2048, 4096), "group_size", self.group_size,
                   "64, 128, ..., 4096 for bitsandbytes nf4/fp4 blocks")
        if self.w_dtype == "fp8":
            _check(self.w_bits in (4, 8), "w_bits", self.w_bits, "8 or 4 for w_dtype='fp8'")
            if self.w_bits == 4:  # int4 codes folded into float8: needs float8 activations and a group size
                _check(self.a_dtype == "fp8", "a_bits", self.a_bits, "8 (float8) for w4 float8-folded weights")
                _check(self.group_size in FP8W4_GROUPS + (None,), "group_size", self.group_size,
                       f"{FP8W4_GROUPS} (or None: one group per row) for w4a8-fp8")
        if self.a_dtype == "fp8":
            _check(self.a_bits == 8, "a_bits", self.a_bits, "8 for a_dtype='fp8'")
        if self.group_size is not None:
            _check(isinstance(self.group_size, int) and self.group_size >= 2 and self.group_size % 2 == 0,
                   "group_size", self.group_size, "None or an even int >= 2")
        _check(isinstance(self.act_symmetric, bool), "act_symmetric", self.act_symmetric, (True, False))
        _check(self.act_symmetric or self.a_dtype == "int", "act_symmetric", self.act_symmetric,
               "True for fp8 activations")

    @classmethod
    def parse(cls, name: "str | QuantSpec", **overrides) -> "QuantSpec":
        """``QuantSpec.parse("w4a8", group_size=128, act_symmetric=False)``. Names: see ``FORMATS``; any
        ``w<2..8>a<2..8|16>`` works too (the simulated backend runs every bit width)."""
        if isinstance(name, QuantSpec):
            return replace(name, **overrides) if overrides else name
        if not isinstance(name, str):
            raise ValueError(f"format must be a str or QuantSpec, got {type(name).__name__}; allowed: {FORMATS}")
        key = name.strip().lower()
        key = {"nf4": "w4a16-nf4", "bf16": "fp16", "none": "fp16"}.get(key, key)
        if key == "fp16":
            return replace(cls(), **overrides)
        m = _NAME.match(key)
        if not m:
            raise ValueError(f"unknown quantization format {name!r}; allowed: {FORMATS} or w<bits>a<bits>")
        w_bits, a_bits, suffix = int(m.group(1)), int(m.group(2)), m.group(3) or "int"
        base = dict(w_bits=w_bits, a_bits=a_bits, w_dtype=suffix,
                    a_dtype="fp8" if suffix == "fp8" and a_bits == 8 else "int",
                    group_size=(32 if suffix == "fp8" else 64) if w_bits <= 4 else None)
        base.update(overrides)
        return cls(**base)

    @property
    def fp8_folded(self) -> bool:
        """int4 codes with power-of-two group scales folded into float8 (``w4a8-fp8``)."""
        return self.w_dtype == "fp8" and self.w_bits == 4

    @property
    def is_identity(self) -> bool:
        return self.w_bits == 16 and self.a_bits == 16

    @property
    def name(self) -> str:
        if self.is_identity:
            return "fp16"
        s = f"w{self.w_bits}a{self.a_bits}"
        if self.w_dtype != "int":
            s += f"-{self.w_dtype}"
        return s

    def describe(self) -> str:
        """One line in words for the loaders' boxes and the CLI, e.g. ``w4a8: 4-bit integer weights, a scale per 64
        weights; 8-bit integer activations, a scale per token``."""
        per = "a scale per output channel" if self.group_size is None else f"a scale per {self.group_size} weights"
        if self.fp8_folded:
            return (f"{self.name}: 4-bit integer weights multiplied as float8 ({per}); float8 activations, a scale "
                    "per token")
        def kind(dtype, bits):
            return "float8" if dtype == "fp8" else f"{bits}-bit " + {"int": "integer", "nf4": "NF4", "fp4": "FP4"}[dtype]

        w = f"{kind(self.w_dtype, self.w_bits)} weights, {per}"
        if self.a_bits == 16:
            return f"{self.name}: {w}; activations in 16 bit"
        scale = "a scale" if self.act_symmetric else "a scale and an offset"
        return f"{self.name}: {w}; {kind(self.a_dtype, self.a_bits)} activations, {scale} per token"


def _check(ok: bool, field: str, value, allowed) -> None:
    if not ok:
        raise ValueError(f"invalid {field}={value!r}; allowed: {allowed}")
