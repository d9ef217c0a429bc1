"""Triton kernels for the CUDA paths: each one is a single pass over memory that torch would do in several.

* per-token activation quantization (int8 codes + scale [+ zero point], float8 e4m3 codes + scale, or
  quantize-dequantize in place of the input dtype): one program per row, the row kept in registers;
* int4 weight dequantization (packed nibbles x float16 group scales -> bf16/fp16), one pass;
* the int32 -> float epilogue of ``torch._int_mm`` (zero-point correction, both scales, bias, output cast);
* W4A8 GEMM (``w4a8_gemm``): int8 per-token activations x packed int4 group-wise weights in one kernel. The nibbles
  are unpacked to int8 inside the K loop, each group is one exact int8 tensor-core dot (int32), scaled by its
  float16 group scale into a float32 accumulator; per-token scale, bias and the output cast in the epilogue.
* W4A8-FP8 GEMM (``fp8w4_gemm``, format ``w4a8-fp8``): float8 per-token activations x packed int4 codes whose group
  scales are powers of two. Inside the K loop each nibble becomes the exact float8 value code * 2^e (a sign-extend,
  an int8 -> float16 convert, a multiply by the power of two built from its exponent bits, a float16 -> float8
  convert), so each K block is one FP8 tensor-core dot with no per-group rescale of the accumulator; the
  per-channel and per-token scales, bias and the output cast are applied once in the epilogue.

Semantics equal ``qmath`` (round-half-to-even, float32 division); tests/test_quant_gpu.py checks them there.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: without it (or without CUDA) the layers use the torch code in qmath.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None


_AVAILABLE: bool | None = None


def available() -> bool:
    # A plain global rather than functools.lru_cache: torch.compile traces this call (the float8 formats ask it
    # inside compiled forwards) and warns about every lru_cache it meets.
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = triton is not None and torch.cuda.is_available()
    return _AVAILABLE


if triton is not None:

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, K, stride_x, stride_q,
                          QMAX: tl.constexpr, MODE: tl.constexpr, FAKE: tl.constexpr, BLOCK: tl.constexpr,
                          PERM: tl.constexpr):
        # MODE 0: symmetric int, 1: asymmetric int, 2: float8 e4m3. FAKE: write dequantized values in x's dtype.
        # PERM > 0: within each group of PERM columns, write the even columns first, then the odd ones (the order in
        # which w4a8_gemm unpacks the low and high nibbles of a packed weight byte).
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
        if PERM > 0:
            dst = (offs // PERM) * PERM + (offs % 2) * (PERM // 2) + (offs % PERM) // 2
        else:
            dst = offs
        tl.store(q_ptr + row * stride_q + dst, out.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, s)

    @triton.jit
    def _dequant_int4_kernel(p_ptr, s_ptr, out_ptr, total_bytes, GROUP: tl.constexpr, EXP: tl.constexpr,
                             BLOCK: tl.constexpr):
        # Packed int4 codes [N, K/2] x one factor per group of GROUP inputs -> [N, K] in out's dtype, flat over the
        # packed bytes: contiguous loads of BLOCK bytes, contiguous stores of 2 * BLOCK values. Rows are contiguous
        # and K is a multiple of GROUP, so byte i holds columns 2i, 2i+1 of the flat [N * K] and group 2i // GROUP.
        # The factor is the group scale s (w4a8: codes * s) or, with EXP, 2^s for int8 exponents s (w4a8-fp8:
        # codes * 2^e, exact in float8).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total_bytes
        p = tl.load(p_ptr + offs, mask=mask, other=0x88).to(tl.int32)
        f = tl.load(s_ptr + (2 * offs) // GROUP, mask=mask, other=0).to(tl.float32)
        if EXP:
            f = tl.exp2(f)
        vals = tl.interleave(((p & 15) - 8).to(tl.float32) * f, ((p >> 4) - 8).to(tl.float32) * f)
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

    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column indices of this program's output tile, grouped along M so that consecutive programs share
        weight tiles in L2."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    @triton.jit
    def _w4a8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, M, N, GROUPS, stride_xm, stride_wn,
                          stride_om, HAS_B: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # x: int8 codes [M, K], each group of GROUP columns stored even columns first (quantize_act_int8(perm=...)).
        # w: uint8 [N, K/2], byte j of a row holds column 2j (low nibble) and 2j+1 (high nibble), offset by 8.
        # ws: float16/float32 [N, GROUPS]. One program: a BLOCK_M x BLOCK_N tile of the output, grouped along M so
        # that consecutive programs share weight tiles in L2.
        HALF: tl.constexpr = GROUP // 2
        rm, rn = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rk = tl.arange(0, HALF)
        # Out-of-range rows / columns read a valid row (modulo) and are masked at the store: no masks in the loop.
        am = (rm % M).to(tl.int64)
        wn = (rn % N).to(tl.int64)
        a_ptrs = x_ptr + am[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + wn[:, None] * stride_wn + rk[None, :]
        s_ptrs = ws_ptr + wn * GROUPS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, GROUPS):
            a_even = tl.load(a_ptrs)
            a_odd = tl.load(a_ptrs + HALF)
            p = tl.load(w_ptrs)
            # offset-binary nibble n -> n - 8: flip bit 3 of each nibble, then sign-extend it (arithmetic shifts).
            t = (p ^ 0x88).to(tl.int8, bitcast=True)
            w_even = (t << 4) >> 4
            w_odd = t >> 4
            part = tl.dot(a_even, tl.trans(w_even), out_dtype=tl.int32)
            part = tl.dot(a_odd, tl.trans(w_odd), part, out_dtype=tl.int32)
            sc = tl.load(s_ptrs + g).to(tl.float32)
            acc += part.to(tl.float32) * sc[None, :]
            a_ptrs += GROUP
            w_ptrs += HALF
        xs = tl.load(xs_ptr + am)
        y = acc * xs[:, None]
        if HAS_B:
            y += tl.load(b_ptr + wn).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask)


    @triton.jit
    def _fp8w4_gemm_kernel(x_ptr, xs_ptr, w_ptr, e_ptr, ws_ptr, b_ptr, out_ptr, M, N, KB, stride_xm, stride_wn,
                           stride_en, stride_om, HAS_B: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           SWAP: tl.constexpr, PROMOTE: tl.constexpr):
        # x: float8 e4m3 codes [M, K], each block of BLOCK_K columns stored even columns first
        # (quantize_act_fp8(perm=BLOCK_K)). w: uint8 [N, K/2], byte j of a row = column 2j (low nibble) and 2j+1
        # (high nibble), offset by 8. e: int8 [N, K / GROUP] exponents; ws: float32 [N] channel scales; xs: float32
        # [M] token scales. SWAP: compute the tile transposed (weights as the MMA's A operand, tokens as its N side:
        # small M tiles of 16 fill the 64-row wgmma with weights). PROMOTE: each K block's dot starts from zero and
        # is added to the float32 accumulator (Hopper's float8 MMA accumulates with fewer bits; this bounds it to one
        # block); else one accumulator throughout (Triton's default imprecise float8 accumulation on sm_90).
        HALF: tl.constexpr = BLOCK_K // 2
        GH: tl.constexpr = GROUP // 2  # columns of one group in each half of a K block
        rm, rn = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rk = tl.arange(0, HALF)
        am = (rm % M).to(tl.int64)  # out-of-range rows / columns read a valid one and are masked at the store
        wn = (rn % N).to(tl.int64)
        a_ptrs = x_ptr + am[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + wn[:, None] * stride_wn + rk[None, :]
        if GROUP == BLOCK_K:
            e_ptrs = e_ptr + wn * stride_en
        else:  # position j of either half is column 2j or 2j+1 of the block: group j // GH
            e_ptrs = e_ptr + wn[:, None] * stride_en + (rk // GH)[None, :]
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, KB):  # KB = K // BLOCK_K
            a_even = tl.load(a_ptrs)
            a_odd = tl.load(a_ptrs + HALF)
            p = tl.load(w_ptrs)
            t = (p ^ 0x88).to(tl.int8, bitcast=True)  # offset-binary nibbles -> two's complement, sign in bit 3/7
            e = tl.load(e_ptrs).to(tl.int16)
            f = ((e + 15) << 10).to(tl.float16, bitcast=True)  # 2^e exactly (float16 exponent bias 15)
            if GROUP == BLOCK_K:
                f = f[:, None]
            w_even = (((t << 4) >> 4).to(tl.float16) * f).to(tl.float8e4nv)
            w_odd = ((t >> 4).to(tl.float16) * f).to(tl.float8e4nv)
            if SWAP:
                if PROMOTE:
                    part = tl.dot(w_even, tl.trans(a_even))
                    acc += tl.dot(w_odd, tl.trans(a_odd), part)
                else:
                    acc = tl.dot(w_even, tl.trans(a_even), acc)
                    acc = tl.dot(w_odd, tl.trans(a_odd), acc)
            else:
                if PROMOTE:
                    part = tl.dot(a_even, tl.trans(w_even))
                    acc += tl.dot(a_odd, tl.trans(w_odd), part)
                else:
                    acc = tl.dot(a_even, tl.trans(w_even), acc)
                    acc = tl.dot(a_odd, tl.trans(w_odd), acc)
            a_ptrs += BLOCK_K
            w_ptrs += HALF
            e_ptrs += BLOCK_K // GROUP
        xs = tl.load(xs_ptr + am)
        ws = tl.load(ws_ptr + wn)
        if SWAP:
            y = acc * ws[:, None] * xs[None, :]
            if HAS_B:
                y += tl.load(b_ptr + wn).to(tl.float32)[:, None]
            mask = (rn[:, None] < N) & (rm[None, :] < M)
            tl.store(out_ptr + rm.to(tl.int64)[None, :] * stride_om + rn[:, None], y.to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            y = acc * xs[:, None] * ws[None, :]
            if HAS_B:
                y += tl.load(b_ptr + wn).to(tl.float32)[None, :]
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=mask)


def _act_launch(x2: torch.Tensor, out_dtype, qmax: int, mode: int, fake: bool, perm: int = 0,
                launcher=lambda kernel: kernel):
    x2 = x2.contiguous()
    m, k = x2.shape
    q = torch.empty((m, k), device=x2.device, dtype=out_dtype)
    s = torch.empty((m, 1), device=x2.device, dtype=torch.float32)
    z = torch.empty((m, 1), device=x2.device, dtype=torch.float32) if mode == 1 else s
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    launcher(_act_quant_kernel)[(m,)](x2, q, s, z, k, x2.stride(0), q.stride(0), QMAX=qmax, MODE=mode, FAKE=fake,
                            BLOCK=block, PERM=perm, num_warps=warps)
    return q, s, (z if mode == 1 else None)


def quantize_act_int8(x2: torch.Tensor, bits: int, symmetric: bool, perm: int = 0):
    """-> (int8 codes [M, K], scale [M, 1] fp32, zero [M, 1] fp32 or None). ``perm``: a group size; the codes of
    each group of ``perm`` columns are stored even columns first, then odd ones (the layout ``w4a8_gemm`` reads)."""
    if perm and (x2.shape[1] % perm or perm % 2):
        raise ValueError(f"invalid perm={perm!r}; allowed: 0 or an even divisor of K={x2.shape[1]}")
    return _act_launch(x2, torch.int8, 2 ** (bits - 1) - 1, 0 if symmetric else 1, False, perm)


def quantize_act_fp8(x2: torch.Tensor, perm: int = 0):
    """-> (float8 e4m3 codes [M, K], scale [M, 1] fp32). ``perm``: as in ``quantize_act_int8`` (``fp8w4_gemm``
    reads blocks of its BLOCK_K columns even columns first)."""
    if perm and (x2.shape[1] % perm or perm % 2):
        raise ValueError(f"invalid perm={perm!r}; allowed: 0 or an even divisor of K={x2.shape[1]}")
    q, s, _ = _act_launch(x2, torch.float8_e4m3fn, 1, 2, False, perm)
    return q, s


def quantize_act_fp8_traced(x2: torch.Tensor):
    """``quantize_act_fp8`` for code under torch.compile: the same one-pass kernel as a ``torch.library.triton_op``
    (inductor writes the launch into its generated code). Used for wide activations (K >= COMPILE_ONE_PASS_MIN_K),
    where inductor's own fusion of the per-token amax and the float8 cast into the producer is a looped reduction
    plus a second pass that recomputes the producer."""
    q, s = torch.ops.qsched.act_quant_fp8(x2)
    return q, s


def one_pass_traced(k: int) -> bool:
    """Whether a compiled float8 layer with K inputs quantizes them with ``quantize_act_fp8_traced``."""
    return _TRITON_OP and k >= COMPILE_ONE_PASS_MIN_K


# Activation widths from which a compiled float8 layer quantizes its input with the one-pass kernel instead of torch
# ops inductor fuses into the producer: FLUX's MLP outputs (12288) and single-block linear2 inputs (15360), the
# inputs inductor fused worst (a looped amax pass and a second pass that recomputes GELU, ~5.5 ms each per FLUX step
# in a compiled profile); the 3072-wide inputs after a norm / modulation keep the fusion.
COMPILE_ONE_PASS_MIN_K = 8192


def fake_quant_act(x2: torch.Tensor, bits: int, symmetric: bool, dtype: str) -> torch.Tensor:
    mode = 2 if dtype == "fp8" else (0 if symmetric else 1)
    return _act_launch(x2, x2.dtype, 2 ** (bits - 1) - 1, mode, True)[0]


def _unpack_int4(packed: torch.Tensor, factors: torch.Tensor, dtype, exp: bool) -> torch.Tensor:
    n, half = packed.shape
    k = 2 * half
    if factors.shape[0] != n or k % factors.shape[1]:
        raise ValueError(f"int4 unpack: packed {tuple(packed.shape)} and group factors {tuple(factors.shape)} "
                         "disagree")
    if _TRITON_OP and torch.compiler.is_compiling():
        return torch.ops.qsched.unpack_int4(packed, factors, dtype, exp)
    return _unpack_int4_launch(packed, factors, dtype, exp)


def _unpack_int4_launch(packed: torch.Tensor, factors: torch.Tensor, dtype: torch.dtype, exp: bool,
                        launcher=lambda kernel: kernel) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty((n, 2 * half), device=packed.device, dtype=dtype)
    total, block = packed.numel(), 2048
    launcher(_dequant_int4_kernel)[(triton.cdiv(total, block),)](packed.contiguous(), factors.contiguous(), out,
                                                                  total, GROUP=2 * half // factors.shape[1], EXP=exp,
                                                                  BLOCK=block, num_warps=8)
    return out


# Under torch.compile the unpack is a ``torch.library.triton_op``: inductor emits the kernel launch in its own
# generated code (no Python-side custom-op call per layer, which cost ~50 us of host time each inside compiled FLUX:
# 20.9 ms of launch gaps per step), and the kernel stays the single-pass Triton one (inductor's fusion of the same
# unpack in torch ops measured ~4x slower on the GPU: 123 vs 104 ms busy per FLUX step). Eager calls launch directly.
_TRITON_OP = triton is not None and hasattr(torch.library, "triton_op")  # torch >= 2.6
if _TRITON_OP:
    @torch.library.triton_op("qsched::unpack_int4", mutates_args=())
    def _unpack_int4_traced(packed: torch.Tensor, factors: torch.Tensor, dtype: torch.dtype,
                            exp: bool) -> torch.Tensor:
        return _unpack_int4_launch(packed, factors, dtype, exp, launcher=torch.library.wrap_triton)


if _TRITON_OP:
    @torch.library.triton_op("qsched::act_quant_fp8", mutates_args=())
    def _act_quant_fp8_traced(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, s, _ = _act_launch(x2, torch.float8_e4m3fn, 1, 2, False, 0, launcher=torch.library.wrap_triton)
        return q, s


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, k: int, dtype) -> torch.Tensor:
    if k != 2 * packed.shape[1]:
        raise ValueError(f"dequant_int4: k={k} but packed has {2 * packed.shape[1]} columns")
    return _unpack_int4(packed, scale, dtype, exp=False)


def int_mm_epilogue(acc, xs, xz, ws, wsum, bias, dtype) -> torch.Tensor:
    m, n = acc.shape
    out = torch.empty((m, n), device=acc.device, dtype=dtype)
    bm, bn = 32, 128
    _int_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        acc, xs, xz if xz is not None else xs, ws, wsum if wsum is not None else acc, bias if bias is not None else xs,
        out, m, n, HAS_Z=xz is not None, HAS_B=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out


# Fused W4A8 GEMM ------------------------------------------------------------------------------------------------
W4A8_GROUPS = (64, 128, 256)  # group sizes the fused GEMM runs (the int8 dot needs K >= 32 per nibble half)
# Largest M (tokens) for which QuantLinear routes through the fused GEMM. Measured on an H200 (Triton 3.6), whole
# layer incl. the activation quantize: M = 1, 3072 -> 18432 (FLUX modulation): fused 0.041 ms vs dequantize + cuBLAS
# 0.093 ms (bf16 0.042). From M = 77 up it loses: 77 x 2048 -> 1280 0.033 vs 0.014 ms, 128 x 3072 -> 3072 0.047 vs
# 0.027 ms, and at M = 4608 the GEMM alone is 2.8-3.1x cuBLAS bf16 (per-group int32 -> float32 rescale and in-loop
# unpack keep the int8 tensor cores waiting; docs/quantization.md has the breakdown). Larger M keeps the dequantize
# + cuBLAS path.
W4A8_FUSED_MAX_M = 16


def w4a8_config(m: int, n: int) -> tuple:
    """(BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages) for an M x N output (fastest of a sweep on an H200)."""
    if m <= 16:
        return 16, 32, 8, 4, 4
    if m <= 128:
        return 128, 64, 8, 4, 4
    return 128, 128, 8, 4, 3


def w4a8_gemm(xq: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, wscale: torch.Tensor,
              bias: torch.Tensor | None, dtype, config: tuple | None = None) -> torch.Tensor:
    """y[M, N] = xs * sum_g wscale[:, g] * (xq_g @ codes_g^T) (+ bias), in ``dtype``.

    ``xq``: int8 [M, K] from ``quantize_act_int8(..., perm=group)``; ``xs``: float32 [M, 1]; ``packed``: uint8
    [N, K/2] (``qmath.pack_int4``); ``wscale``: [N, K / group] (group = K / wscale.shape[1] in ``W4A8_GROUPS``).
    Each group's int8 x int4 dot is exact in int32; groups are summed in float32."""
    m, k = xq.shape
    n, groups = wscale.shape
    group = k // groups
    if group not in W4A8_GROUPS or group * groups != k or packed.shape != (n, k // 2):
        raise ValueError(f"w4a8_gemm: invalid shapes x={tuple(xq.shape)} packed={tuple(packed.shape)} "
                         f"wscale={tuple(wscale.shape)}; allowed: group size in {W4A8_GROUPS} dividing K")
    xq, packed, wscale = xq.contiguous(), packed.contiguous(), wscale.contiguous()
    out = torch.empty((m, n), device=xq.device, dtype=dtype)
    bm, bn, gm, warps, stages = config or w4a8_config(m, n)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w4a8_gemm_kernel[grid](xq, xs.reshape(-1).contiguous(), packed, wscale, bias if bias is not None else wscale,
                            out, m, n, groups, xq.stride(0), packed.stride(0), out.stride(0), HAS_B=bias is not None,
                            GROUP=group, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gm, num_warps=warps, num_stages=stages)
    return out


def fp8w4_expand(packed: torch.Tensor, wexp: torch.Tensor) -> torch.Tensor:
    """The float8 e4m3 weights [N, K] of a w4a8-fp8 layer (``qmath.fp8w4_values`` in one pass: read K/2 bytes,
    write K per row). Exact: every code * 2^e is a float8 value."""
    return _unpack_int4(packed, wexp, torch.float8_e4m3fn, exp=True)


# W4A8-FP8 GEMM ---------------------------------------------------------------------------------------------------
FP8W4_BLOCK_K = 128  # K columns per main-loop step (the activation codes are permuted per block of this size)
# Token counts up to which a layer runs the fused W4A8-FP8 GEMM (the GEMV-like calls: 4-bit weights read once).
# Above it the layer expands its weights to float8 (``fp8w4_expand``, one pass, a transient [N, K] float8 buffer)
# and runs cuBLASLt's row-wise scaled FP8 GEMM: at FLUX's 4608 tokens the fused kernel ran at 3.3x bf16 and
# torch._scaled_mm at 0.6x (benchmarks/results/kernels_h200.md), while the expansion costs one read of K/2 and one
# write of K bytes per row.
FP8W4_FUSED_MAX_M = 16


def fp8w4_eligible(k: int, group: int, dtype) -> bool:
    """Whether ``fp8w4_gemm`` runs a layer with K inputs and this group size (else the caller materialises the
    float8 weights and uses torch._scaled_mm)."""
    return (group in (32, 64, 128) and k % FP8W4_BLOCK_K == 0 and dtype in (torch.bfloat16, torch.float16,
                                                                              torch.float32))


def fp8w4_config(m: int, n: int) -> tuple:
    """(BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages, SWAP). Not yet tuned on a GPU (see
    benchmarks/bench_kernels_gpu.py, which sweeps these): small M runs transposed (weights as the wgmma A operand)."""
    if m <= 16:
        return 16, 64, 8, 4, 4, True
    if m <= 64:
        return 64, 128, 8, 4, 4, True
    return 128, 128, 8, 8, 3, False


def fp8w4_gemm(xq: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, wexp: torch.Tensor, wscale: torch.Tensor,
               bias: torch.Tensor | None, dtype, config: tuple | None = None, promote: bool = True) -> torch.Tensor:
    """y[M, N] = xs * wscale * (xq @ (codes * 2^wexp)^T) (+ bias), in ``dtype``; float32 accumulation.

    ``xq``: float8 e4m3 [M, K] from ``quantize_act_fp8(..., perm=FP8W4_BLOCK_K)``; ``xs``: float32 [M, 1];
    ``packed``: uint8 [N, K/2] (``qmath.pack_int4``); ``wexp``: int8 [N, K / group] (group 32/64/128); ``wscale``:
    float32 [N, 1]. ``config``: (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages, SWAP) or None (fp8w4_config)."""
    m, k = xq.shape
    n, groups = wexp.shape
    group = k // groups
    if not fp8w4_eligible(k, group, dtype) or group * groups != k or packed.shape != (n, k // 2) \
            or xq.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8w4_gemm: invalid inputs x={tuple(xq.shape)} {xq.dtype} packed={tuple(packed.shape)} "
                         f"wexp={tuple(wexp.shape)}; allowed: float8 x, group 32/64/128, K a multiple of "
                         f"{FP8W4_BLOCK_K}")
    xq, packed, wexp = xq.contiguous(), packed.contiguous(), wexp.contiguous()
    out = torch.empty((m, n), device=xq.device, dtype=dtype)
    bm, bn, gm, warps, stages, swap = config or fp8w4_config(m, n)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8w4_gemm_kernel[grid](xq, xs.reshape(-1).contiguous(), packed, wexp, wscale.reshape(-1).contiguous().float(),
                             bias if bias is not None else wscale, out, m, n, k // FP8W4_BLOCK_K, xq.stride(0), packed.stride(0),
                             wexp.stride(0), out.stride(0), HAS_B=bias is not None, GROUP=group, BLOCK_M=bm,
                             BLOCK_N=bn, BLOCK_K=FP8W4_BLOCK_K, GROUP_M=gm, SWAP=swap, PROMOTE=promote,
                             num_warps=warps, num_stages=stages)
    return out
