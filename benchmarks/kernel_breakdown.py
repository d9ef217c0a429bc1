"""Where a sampling step's device time goes: GEMM, attention, quantize, conv, other (pure Python; the benchmark
feeds it the events of one profiled sampling run, see ``bench_comfyui_gpu.profile_breakdown``).

On CUDA the items are the kernels (and memcpy/memset) the profiler saw: shares are of their summed time; GPU busy
is the union of their intervals, so launch overhead = wall time per step - GPU busy per step. On the CPU (the smoke
test) the items are the operators' self CPU times: the same classification by operator name, no overhead figure.

What the name-based classification can and cannot separate (``NOTE``, stored with every breakdown).
"""

from __future__ import annotations

import re

CATEGORIES = ("gemm", "attention", "quantize", "conv", "other")
NOTE = ("Kernels classified by name. gemm: cuBLAS/cuBLASLt/CUTLASS/nvjet (incl. torch._scaled_mm, torch._int_mm and "
        "their fused epilogues), our Triton GEMMs (_w4a8_gemm_kernel, _fp8w4_gemm_kernel) and the int8 epilogue "
        "kernel. attention: flash/fmha/cuDNN SDPA kernels and sageattention's (_attn_fwd, its q/k int8 "
        "quantization quant_per_block_int8_kernel). quantize: our _act_quant_kernel, the weight unpack "
        "kernel (_dequant_int4_kernel, also w4a8-fp8's float8 expansion: 4-bit weights expanded per call "
        "before a cuBLAS GEMM), and inductor kernels whose name has amax/quant/float8 (compiled fp8 formats: inductor fuses the "
        "per-token quantization into the preceding norm/modulation/GELU kernel, so that kernel's whole time counts "
        "as quantize, an over-count); an inductor kernel that only casts to fp8 without amax in its name counts as "
        "other. conv: cuDNN convolution kernels (SDXL). other: norms, elementwise, copies.")

_ATTN = re.compile(r"flash|fmha|attention|sdpa|mha_|_attn_fwd|quant_per_block_int8", re.I)  # + sageattention's
_CONV = re.compile(r"conv|fprop|dgrad|wgrad|winograd", re.I)
_QUANT = re.compile(r"quant|amax|fp8w4_expand|expand_fp8|float8|_to_fp8", re.I)
_GEMM = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|Kernel2\b|splitKreduce|int_epilogue|"
                   r"aten::(addmm|mm|bmm|baddbmm|_int_mm|_scaled_mm|matmul)$", re.I)


def classify(name: str) -> str:
    """One of CATEGORIES for a kernel or operator name."""
    if _ATTN.search(name):
        return "attention"
    if name.startswith("triton_tem"):  # an inductor GEMM template (max-autotune)
        return "gemm"
    if name.startswith("triton_"):  # inductor-generated fused elementwise/reductions
        return "quantize" if _QUANT.search(name) else "other"
    if _CONV.search(name):
        return "conv"
    if _QUANT.search(name):
        return "quantize"
    if _GEMM.search(name):
        return "gemm"
    return "other"


def busy_us(intervals) -> float:
    """Length of the union of (start, duration) intervals."""
    total, end = 0.0, None
    for s, d in sorted((float(s), float(d)) for s, d in intervals):
        e = s + d
        if end is None or s > end:
            total += d
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(items, *, steps: int, wall_step_s: float | None, profiled_s: float, device: str,
              top: int = 3) -> dict:
    """``items``: (name, start_us, duration_us) of one profiled sampling run of ``steps`` steps."""
    items = [(str(n), float(s), float(d)) for n, s, d in items if d > 0]
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict = {}
    for name, _, d in items:
        by_name[name] = by_name.get(name, 0.0) + d
    for name, d in by_name.items():
        per_cat[classify(name)] += d
    total = sum(per_cat.values())
    out = {"device": device, "steps": steps, "n_items": len(items), "note": NOTE,
           "time_per_step_s": total / steps / 1e6, "profiled_wall_s": profiled_s,
           "shares": {c: (per_cat[c] / total if total else None) for c in CATEGORIES},
           "top": {c: [[n[:120], round(d / steps / 1e3, 3)] for n, d in
                       sorted(((n, d) for n, d in by_name.items() if classify(n) == c), key=lambda x: -x[1])[:top]]
                   for c in CATEGORIES}}
    if device == "cuda":
        busy = busy_us((s, d) for _, s, d in items) / steps / 1e6
        out["gpu_busy_per_step_s"] = busy
        out["wall_per_step_s"] = wall_step_s
        out["launch_overhead_per_step_s"] = None if wall_step_s is None else wall_step_s - busy
    return out
