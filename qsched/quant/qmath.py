"""Quantization arithmetic in plain torch: the one definition every backend is checked against.

Rounding is round-half-to-even (``torch.round``); every division happens in float32.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_EPS = 1e-12
# Group scales are stored in float16 (2 bytes per 64 weights); below its smallest normal value they would lose bits.
_FP16_SCALE_MIN = 2.0 ** -14


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


# ------------------------------------------------------------------------------------------------ weights
def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, dtype: str = "int"):
    """``w`` [N, K] -> (codes, scales). int: codes int8 [N, K] in [-qmax, qmax], scales [N, K // g]
    (float32 per channel, float16 per group). fp8: codes float8_e4m3fn [N, K], scales float32 [N, 1]."""
    w = w.detach().float()
    n, k = w.shape
    if dtype == "fp8":
        scale = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(_EPS)
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    g = group_size or k
    wg = w.reshape(n, k // g, g)
    scale = wg.abs().amax(-1) / qmax(bits)
    if g < k:
        scale = scale.clamp_min(_FP16_SCALE_MIN).to(torch.float16)
    else:
        scale = scale.clamp_min(_EPS)
    q = torch.round(wg / scale.float()[..., None]).clamp_(-qmax(bits), qmax(bits))
    return q.to(torch.int8).reshape(n, k), scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_weight`` (codes already unpacked)."""
    n, k = codes.shape
    groups = scale.shape[1]
    w = codes.float().reshape(n, groups, k // groups) * scale.float()[..., None]
    return w.reshape(n, k).to(dtype)


# ------------------------------------------------------------------------------------------------ int4 packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [N, K] with K even -> uint8 [N, K/2]; element 2j in the low nibble."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


# ------------------------------------------------------------------------------------------------ activations
def quantize_act(x: torch.Tensor, bits: int, symmetric: bool = True, dtype: str = "int"):
    """Dynamic per-token (last dim) quantization. Returns (codes as float32, scale [..., 1], zero [..., 1] or None);
    ``x ≈ (codes - zero) * scale``. fp8 codes are float8-representable values in [-448, 448]."""
    x = x.float()
    if dtype == "fp8":
        scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(_EPS)
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float(), scale, None
    if symmetric:
        scale = (x.abs().amax(-1, keepdim=True) / qmax(bits)).clamp_min(_EPS)
        return torch.round(x / scale).clamp_(-qmax(bits), qmax(bits)), scale, None
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(_EPS)
    zero = torch.round(-lo / scale) - 2 ** (bits - 1)
    return (torch.round(x / scale) + zero).clamp_(-(2 ** (bits - 1)), qmax(bits)), scale, zero


def fake_quant_act(x: torch.Tensor, bits: int, symmetric: bool = True, dtype: str = "int") -> torch.Tensor:
    """Quantize-dequantize in float32, returned in ``x.dtype``."""
    if bits >= 16:
        return x
    q, scale, zero = quantize_act(x, bits, symmetric, dtype)
    if zero is not None:
        q = q - zero
    return (q * scale).to(x.dtype)
