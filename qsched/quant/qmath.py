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


# ------------------------------------------------------------------------------------------------ w4a8-fp8 weights
# int4 codes q in [-7, 7] times a power of two 2^e with e in [FP8W4_EMIN, FP8W4_EMAX] are exact float8 e4m3 values:
# |q| has at most 3 significant bits (e4m3 has 1 + 3), 7 * 2^6 = 448 is e4m3's largest finite value, and down to
# 2^-9 (q * 2^-9 is the subnormal with mantissa q) nothing is lost. So a weight stored as
# scale[n] * q * 2^e[n, g] is multiplied on the FP8 tensor cores as the exact float8 value q * 2^e, and only the
# per-channel ``scale`` is applied, once, in the epilogue.
FP8W4_EMIN, FP8W4_EMAX = -9, 6
FP8W4_CANDIDATES = 8  # per-channel scale candidates tried (fractional powers of two: where the 2^e grid lands)


def _ceil_log2(r: torch.Tensor) -> torch.Tensor:
    """ceil(log2(r)) for r > 0, exact (frexp: r = m * 2^x with m in [0.5, 1))."""
    m, x = torch.frexp(r)
    return torch.where(m == 0.5, x - 1, x)


def quantize_weight_fp8w4(w: torch.Tensor, group_size: int | None, candidates: int = FP8W4_CANDIDATES):
    """``w`` [N, K] -> (codes int8 [N, K] in [-7, 7], exps int8 [N, K // g] in [EMIN, EMAX], scale float32 [N, 1])
    with ``w ~ scale * codes * 2^exps`` (per group of ``g`` inputs; ``None``: one group per row).

    Per row, ``candidates`` channel scales ``top * 2^(j / candidates) / 2^EMAX`` (``top``: the largest group's ideal
    int4 step, so its exponent is at most EMAX) are tried; per group the exponent is the smallest one that does not
    clip (ceil of log2 of the ideal step) or one below it (clipping the largest values) if that has the smaller
    squared error; the row keeps the candidate with the smallest total squared error. Rounding half to even."""
    w = w.detach().float()
    n, k = w.shape
    g = group_size or k
    wg = w.reshape(n, k // g, g)
    step = wg.abs().amax(-1) / 7.0  # ideal step per group [N, G]
    top = step.amax(1, keepdim=True)
    ones = torch.ones_like(step)
    # Only the choice (exponent per group, scale per row) is carried through the search; the codes are computed once
    # from it at the end (the same float ops, so the same codes): one full-size temporary per trial, no full-size
    # selects (4x less memory traffic than keeping the codes of the best trial, which mattered on the CPU).
    best = None
    for j in range(candidates):
        scale = (top * 2.0 ** (j / candidates - FP8W4_EMAX)).clamp_min(_EPS)
        hi = _ceil_log2((step / scale).clamp_min(2.0 ** (FP8W4_EMIN - 1))).clamp(FP8W4_EMIN, FP8W4_EMAX)
        pick = None
        for e in (hi, (hi - 1).clamp_min(FP8W4_EMIN)):
            st = (scale * torch.ldexp(ones, e))[..., None]
            err = torch.div(wg, st).round_().clamp_(-7, 7).mul_(st).sub_(wg).square_().sum(-1)
            if pick is None:
                pick = (e, err)
            else:
                better = err < pick[1]
                pick = (torch.where(better, e, pick[0]), torch.where(better, err, pick[1]))
        total = pick[1].sum(1, keepdim=True)
        if best is None:
            best = (pick[0], scale, total)
        else:
            better = total < best[2]
            best = (torch.where(better, pick[0], best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, total, best[2]))
    e, scale, _ = best
    q = torch.div(wg, (scale * torch.ldexp(ones, e))[..., None]).round_().clamp_(-7, 7)
    return q.to(torch.int8).reshape(n, k), e.to(torch.int8), scale


def fp8w4_values(codes: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """The float8 e4m3 weights ``codes * 2^exps`` [N, K] (exact; codes unpacked int8, exps [N, K // g])."""
    n, k = codes.shape
    groups = exps.shape[1]
    v = torch.ldexp(codes.float().reshape(n, groups, k // groups), exps.float()[..., None])
    return v.reshape(n, k).to(FP8)


def dequantize_weight_fp8w4(codes: torch.Tensor, exps: torch.Tensor, scale: torch.Tensor,
                            dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_weight_fp8w4``: ``scale * codes * 2^exps`` (computed in float32)."""
    return (fp8w4_values(codes, exps).float() * scale.float()).to(dtype)


def requantize_fp8w4(w: torch.Tensor, exps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of ``w`` [N, K] on an existing grid (exps, scale), clamped to [-7, 7]."""
    n, k = w.shape
    groups = exps.shape[1]
    st = torch.ldexp(scale.float().to(w.device).expand(n, groups), exps.to(w.device).float())
    q = torch.round(w.float().reshape(n, groups, k // groups) / st[..., None]).clamp_(-7, 7)
    return q.to(torch.int8).reshape(n, k)


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
        q, scale = quantize_act_fp8(x)
        return q.float(), scale, None
    if symmetric:
        scale = (x.abs().amax(-1, keepdim=True) / qmax(bits)).clamp_min(_EPS)
        return torch.round(x / scale).clamp_(-qmax(bits), qmax(bits)), scale, None
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(_EPS)
    zero = torch.round(-lo / scale) - 2 ** (bits - 1)
    return (torch.round(x / scale) + zero).clamp_(-(2 ** (bits - 1)), qmax(bits)), scale, zero


def quantize_act_fp8(x: torch.Tensor, block_perm: int = 0):
    """Per-token float8 e4m3 codes (float8 tensor) and float32 scales [..., 1]: plain torch ops, so that under
    torch.compile inductor can fuse them into the op that produced ``x``. ``block_perm``: store the codes of each
    block of that many columns even columns first, then odd (the layout of ``kernels.fp8w4_gemm``)."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(_EPS)
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX)
    if block_perm:
        k = q.shape[-1]
        q = q.reshape(*q.shape[:-1], k // block_perm, block_perm // 2, 2).transpose(-1, -2).reshape(q.shape)
    return q.to(FP8), scale


def fake_quant_act(x: torch.Tensor, bits: int, symmetric: bool = True, dtype: str = "int") -> torch.Tensor:
    """Quantize-dequantize in float32, returned in ``x.dtype``."""
    if bits >= 16:
        return x
    q, scale, zero = quantize_act(x, bits, symmetric, dtype)
    if zero is not None:
        q = q - zero
    return (q * scale).to(x.dtype)
