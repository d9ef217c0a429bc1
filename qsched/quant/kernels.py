"""Triton kernels for the CUDA paths: each one is a single pass over memory that torch would do in several.

* per-token activation quantization (int8 codes + scale [+ zero point], float8 e4m3 codes + scale, or
  quantize-dequantize in place of the input dtype): one program per row, the row kept in registers;
* int4 weight dequantization (packed nibbles x float16 group scales -> bf16/fp16), one pass;
* the int32 -> float epilogue of ``torch._int_mm`` (zero-point correction, both scales, bias, output cast).

Semantics equal ``qmath`` (round-half-to-even, float32 division); tests/test_quant_gpu.py checks them there.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton is optional: without it (or without CUDA) the layers use the torch code in qmath.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None


@functools.lru_cache(maxsize=None)
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, K, stride_x, stride_q,
                          QMAX: tl.constexpr, MODE: tl.constexpr, FAKE: tl.constexpr, BLOCK: tl.constexpr):
        # MODE 0: symmetric int, 1: asymmetric int, 2: float8 e4m3. FAKE: write dequantized values in x's dtype.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            lo = tl.minimum(tl.min(x, axis=0), 0.0)
            hi = tl.maximum(tl.max(x, axis=0), 0.0)
            s = tl.maximum(tl.div_rn(hi - lo, 2.0 * QMAX + 1.0), 1e-12)
            z = libdevice.rint(tl.div_rn(-lo, s)) - (QMAX + 1.0)
            q = tl.clamp(libdevice.rint(tl.div_rn(x, s)) + z, -QMAX - 1.0, QMAX * 1.0)
            if FAKE:
                out = (q - z) * s
            else:
                out = q
            tl.store(z_ptr + row, z)
        elif MODE == 0:
            s = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), QMAX * 1.0), 1e-12)
            q = tl.clamp(libdevice.rint(tl.div_rn(x, s)), -QMAX * 1.0, QMAX * 1.0)
            if FAKE:
                out = q * s
            else:
                out = q
        else:
            s = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), 448.0), 1e-12)
            q = tl.clamp(tl.div_rn(x, s), -448.0, 448.0)
            if FAKE:
                out = q.to(tl.float8e4nv).to(tl.float32) * s
            else:
                out = q
        tl.store(q_ptr + row * stride_q + offs, out.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, s)

    @triton.jit
    def _dequant_int4_kernel(p_ptr, s_ptr, out_ptr, total_bytes, HALF_K, GROUPS, GROUP: tl.constexpr,
                             BLOCK: tl.constexpr):
        # Flat over the packed bytes: contiguous loads of BLOCK bytes, contiguous stores of 2 * BLOCK values.
        offs = (tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK))
        mask = offs < total_bytes
        p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32)
        row = offs // HALF_K
        col = (offs - row * HALF_K) * 2
        sc = tl.load(s_ptr + row * GROUPS + col // GROUP, mask=mask, other=0.0).to(tl.float32)
        vals = tl.interleave(((p & 15) - 8).to(tl.float32) * sc, ((p >> 4) - 8).to(tl.float32) * sc)
        o = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + o, vals.to(out_ptr.dtype.element_ty), mask=o < 2 * total_bytes)

    @triton.jit
    def _int_epilogue_kernel(acc_ptr, xs_ptr, xz_ptr, ws_ptr, wsum_ptr, b_ptr, out_ptr, M, N,
                             HAS_Z: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = tl.load(acc_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0)
        if HAS_Z:
            z = tl.load(xz_ptr + rm, mask=rm < M, other=0.0).to(tl.int32)
            wsum = tl.load(wsum_ptr + rn, mask=rn < N, other=0)
            acc = acc - z[:, None] * wsum[None, :]
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_B:
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _act_launch(x2: torch.Tensor, out_dtype, qmax: int, mode: int, fake: bool):
    x2 = x2.contiguous()
    m, k = x2.shape
    q = torch.empty((m, k), device=x2.device, dtype=out_dtype)
    s = torch.empty((m, 1), device=x2.device, dtype=torch.float32)
    z = torch.empty((m, 1), device=x2.device, dtype=torch.float32) if mode == 1 else s
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _act_quant_kernel[(m,)](x2, q, s, z, k, x2.stride(0), q.stride(0), QMAX=qmax, MODE=mode, FAKE=fake,
                            BLOCK=block, num_warps=warps)
    return q, s, (z if mode == 1 else None)


def quantize_act_int8(x2: torch.Tensor, bits: int, symmetric: bool):
    """-> (int8 codes [M, K], scale [M, 1] fp32, zero [M, 1] fp32 or None)."""
    return _act_launch(x2, torch.int8, 2 ** (bits - 1) - 1, 0 if symmetric else 1, False)


def quantize_act_fp8(x2: torch.Tensor):
    q, s, _ = _act_launch(x2, torch.float8_e4m3fn, 1, 2, False)
    return q, s


def fake_quant_act(x2: torch.Tensor, bits: int, symmetric: bool, dtype: str) -> torch.Tensor:
    mode = 2 if dtype == "fp8" else (0 if symmetric else 1)
    return _act_launch(x2, x2.dtype, 2 ** (bits - 1) - 1, mode, True)[0]


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, k: int, dtype) -> torch.Tensor:
    n = packed.shape[0]
    groups = scale.shape[1]
    out = torch.empty((n, k), device=packed.device, dtype=dtype)
    total, block = packed.numel(), 2048
    _dequant_int4_kernel[(triton.cdiv(total, block),)](packed, scale.contiguous(), out, total, k // 2, groups,
                                                       GROUP=k // groups, BLOCK=block, num_warps=8)
    return out


def int_mm_epilogue(acc, xs, xz, ws, wsum, bias, dtype) -> torch.Tensor:
    m, n = acc.shape
    out = torch.empty((m, n), device=acc.device, dtype=dtype)
    bm, bn = 32, 128
    _int_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        acc, xs, xz if xz is not None else xs, ws, wsum if wsum is not None else acc, bias if bias is not None else xs,
        out, m, n, HAS_Z=xz is not None, HAS_B=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out
