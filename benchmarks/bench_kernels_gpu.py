"""Kernel micro-benchmarks of the fast formats (no diffusers, no ComfyUI): one Linear at FLUX / SDXL shapes.

    python benchmarks/bench_kernels_gpu.py --out benchmarks/results [--budget-s 200] [--quick]

Per shape (M x K -> N, bf16 activations), side by side in one run (triton.testing.do_bench, median ms):
* whole layers: bf16 F.linear; w8a8-fp8 (Triton activation quantize + torch._scaled_mm); w4a8 (as routed); w4a8-fp8
  (Triton activation quantize + the W4A8-FP8 GEMM);
* bare GEMMs (activations already quantized): torch._scaled_mm (the FP8 ceiling), the W4A8-FP8 kernel for every tile
  configuration of ``SWEEP`` with and without per-block promotion, each checked against a float64 reference;
* quantize share: the fp8 activation-quantize kernel (plain / block-permuted) against a copy of the same tensor;
* compiled: LayerNorm -> Linear under torch.compile (inductor), bf16 vs w8a8-fp8 vs w4a8-fp8 with the activation
  quantization traced as torch ops (fusable into the LayerNorm) and as one opaque custom op; and the same blocks
  replayed from a CUDA graph (qsched.cudagraph.StepGraphs).
Writes OUT/kernels_h200.json (as it goes) and OUT/kernels_h200.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072), (1, 3072, 18432),
          (4096, 640, 640), (1024, 1280, 1280), (77, 2048, 1280)]
# (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages, SWAP)
SWEEP = [(16, 64, 8, 4, 4, True), (16, 128, 8, 4, 4, True), (64, 128, 8, 4, 4, True), (128, 128, 8, 8, 3, True),
         (128, 128, 8, 8, 3, False), (128, 128, 8, 4, 3, False), (128, 256, 8, 8, 3, False),
         (64, 128, 8, 4, 4, False), (128, 64, 8, 4, 4, False)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and configurations")
    ap.add_argument("--sections", default="linear,attention,compiled",
                    help="comma-separated: linear, attention (SDPA vs sageattention, float8 SDPA probe), compiled, "
                         "onepass (compiled wide per-token float8 quantization: inductor fusion vs the one-pass "
                         "triton_op)")
    ap.add_argument("--name", default="kernels_h200", help="result files OUT/NAME.json and OUT/NAME.md")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    t0 = time.time()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_quant_gpu import import_pack  # the pack as qsched_pack (installed or this checkout)

    import_pack()
    from triton.testing import do_bench

    from qsched_pack.qsched import cudagraph
    from qsched_pack.qsched.quant import kernels, qmath, quantize_
    from qsched_pack.qsched.quant import layers as qlayers

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.name + ".json")
    R = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": [], "compiled": [],
         "errors": []}
    import triton

    R["triton"] = triton.__version__

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(R, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def bench(fn):
        return do_bench(fn, warmup=10, rep=40, return_mode="median")

    def left():
        return args.budget_s - (time.time() - t0)

    shapes = [] if "linear" not in sections else SHAPES[:1] + SHAPES[4:6] if args.quick else SHAPES
    sweep = SWEEP[:5] if args.quick else SWEEP
    torch.manual_seed(0)
    for m, k, n in shapes:
        if left() < 20:
            R["errors"].append(f"budget: skipped {m}x{k}x{n} and later")
            break
        row = {"M": m, "K": k, "N": n}
        try:
            lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(torch.distributions.StudentT(3.0).sample((n, k)).cuda() * 0.02)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ref = lin(x).double()
                row["bf16"] = bench(lambda: lin(x))
                for fmt in ("w8a8-fp8", "w4a8", "w4a8-fp8"):
                    q = nn.Sequential(copy.deepcopy(lin))
                    quantize_(q, fmt, "native", skip=())
                    row[fmt] = bench(lambda: q(x))
                    row[f"{fmt} err vs bf16"] = float((q(x).double() - ref).norm() / ref.norm())
                    if fmt == "w4a8-fp8":
                        layer = q[0]
                # bare GEMMs
                mp = max(m, 32)
                xp = torch.nn.functional.pad(x, (0, 0, 0, mp - m))
                xf8, xs8 = kernels.quantize_act_fp8(xp)
                w8, ws8 = qmath.quantize_weight(lin.weight, 8, None, "fp8")
                row["_scaled_mm only"] = bench(lambda: torch._scaled_mm(
                    xf8, w8.t(), scale_a=xs8, scale_b=ws8.view(1, -1), out_dtype=torch.bfloat16))
                xq, xs = kernels.quantize_act_fp8(x, perm=kernels.FP8W4_BLOCK_K)
                xq0, _ = kernels.quantize_act_fp8(x)
                codes = qmath.unpack_int4(layer.qweight)
                exact = (xq0.double() @ qmath.fp8w4_values(codes, layer.wexp).double().t()) * xs.double() \
                    * layer.wscale.double().view(1, -1)
                row["fp8w4 default config"] = str(kernels.fp8w4_config(m, n))
                best = None
                for cfg in sweep:
                    for promote in (True, False):
                        tag = f"fp8w4 {cfg} promote={promote}"
                        try:
                            y = kernels.fp8w4_gemm(xq, xs, layer.qweight, layer.wexp, layer.wscale, None,
                                                   torch.float32, config=cfg, promote=promote)
                            err = float((y.double() - exact).norm() / exact.norm())
                            ms = bench(lambda: kernels.fp8w4_gemm(xq, xs, layer.qweight, layer.wexp, layer.wscale,
                                                                  None, torch.bfloat16, config=cfg,
                                                                  promote=promote))
                            row[tag] = {"ms": ms, "err_vs_f64": err}
                            if err < 1e-3 and (best is None or ms < best[1]):
                                best = (tag, ms)
                        except Exception as exc:  # a configuration that does not compile is a result too
                            row[tag] = f"{type(exc).__name__}: {str(exc)[:160]}"
                row["fp8w4 best"] = best
                row["fp8w4 expand only"] = bench(lambda: kernels.fp8w4_expand(layer.qweight, layer.wexp))
                row["fp8w4 route"] = "fused" if m <= kernels.FP8W4_FUSED_MAX_M else "expand + _scaled_mm"
                # quantize share
                row["copy"] = bench(lambda: x.clone())
                row["act quant fp8 (Triton)"] = bench(lambda: kernels.quantize_act_fp8(x))
                row["act quant fp8 block-permuted (Triton)"] = bench(
                    lambda: kernels.quantize_act_fp8(x, perm=kernels.FP8W4_BLOCK_K))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            R["errors"].append(traceback.format_exc()[-1500:])
        R["shapes"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("fp8w4 (")}, default=str), flush=True)
        save()

    if "attention" in sections:
        R["attention"] = attention_section(bench, left)
        save()
    if "onepass" in sections:
        R["onepass"] = onepass_section(bench, left, kernels, qmath)
        save()
    # compiled LayerNorm -> Linear blocks, fused vs opaque activation quantization, and CUDA-graph replay
    for m, k, n in ((4608, 3072, 12288), (4096, 640, 640), (1, 3072, 18432)) if "compiled" in sections else ():
        if left() < 40:
            R["errors"].append(f"budget: compiled section stopped before {m}x{k}x{n}")
            break
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for fmt in ("bf16", "w8a8-fp8", "w4a8-fp8"):
            for fuse in ((True,) if fmt == "bf16" else (True, False)):
                rec = {"M": m, "K": k, "N": n, "format": fmt, "fused_act_quant": fuse}
                try:
                    blk = nn.Sequential(nn.LayerNorm(k), nn.Linear(k, n)).cuda().to(torch.bfloat16).eval()
                    if fmt != "bf16":
                        quantize_(blk, fmt, "native", skip=())
                    qlayers.COMPILE_FUSE_ACT_QUANT = fuse
                    torch._dynamo.reset()
                    with torch.no_grad():
                        eager = blk(x)
                        rec["eager_ms"] = bench(lambda: blk(x))
                        cblk = torch.compile(blk, fullgraph=True)
                        yc = cblk(x)
                        rec["compiled_vs_eager"] = float((yc.double() - eager.double()).norm() / eager.double().norm())
                        rec["compiled_ms"] = bench(lambda: cblk(x))
                        g = cudagraph.StepGraphs()
                        g(cblk, x)
                        rec["compiled_graph_ms"] = bench(lambda: g(cblk, x))
                        rec["graph_stats"] = g.stats()
                except Exception as exc:
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    qlayers.COMPILE_FUSE_ACT_QUANT = True
                R["compiled"].append(rec)
                print(json.dumps(rec, default=str), flush=True)
                save()
    R["total_s"] = time.time() - t0
    save()
    write_md(R, os.path.join(args.out, args.name + ".md"))


ATTN_SHAPES = [("FLUX 1024²", 1, 24, 4608, 128), ("SDXL 512² level 1", 1, 10, 1024, 64),
               ("SDXL 512² level 2", 1, 20, 256, 64), ("SDXL 512² level 1 text (77 keys)", 1, 10, 1024, 64)]
ATTN_KEYS = {"SDXL 512² level 1 text (77 keys)": 77}  # key count where it differs from the query count
# q and k scales: 1 = logits ~ N(0, 1) (flat softmax), 3 = logits with std 9 (peaked, closer to trained models)
ATTN_SCALES = (1.0, 3.0)


def _sageattn():
    try:
        from sageattention import sageattn
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return sageattn, None


def attention_section(bench, left) -> list:
    """bf16 SDPA time at the models' shapes (the attention the pack leaves in 16-bit), whether this torch offers a
    float8 SDPA (aten._scaled_dot_product_attention_quantized, or SDPA taking float8 inputs), and the error that
    float8 q/k/v (one scale per head, e4m3) would add, simulated: quantize-dequantize, then bf16 SDPA."""
    import torch.nn.functional as F

    sageattn, sage_missing = _sageattn()
    out = []
    for name, b, h, s, d in ATTN_SHAPES:
        if left() < 15:
            break
        rec = {"shape": name, "B": b, "H": h, "S": s, "D": d, "keys": ATTN_KEYS.get(name, s)}
        try:
            g = torch.Generator(device="cuda").manual_seed(3)
            dtype = torch.bfloat16 if name.startswith("FLUX") else torch.float16  # the models' own dtypes
            q = torch.randn(b, h, s, d, device="cuda", generator=g, dtype=dtype)
            k, v = (torch.randn(b, h, rec["keys"], d, device="cuda", generator=g, dtype=dtype) for _ in range(2))
            sage_section(rec, q, k, v, sageattn, sage_missing, bench)
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()) if s <= 1024 else None
            y = F.scaled_dot_product_attention(q, k, v)
            rec["bf16_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))

            def fq(t):
                sc = t.float().abs().amax((-1, -2), keepdim=True).clamp_min(1e-12) / 448.0
                return (t.float() / sc).to(torch.float8_e4m3fn).float() * sc

            ys = F.scaled_dot_product_attention(fq(q).to(torch.bfloat16), fq(k).to(torch.bfloat16),
                                                fq(v).to(torch.bfloat16))
            base = ref if ref is not None else y.double()
            rec["err_fp8_qkv_sim_vs_ref"] = float((ys.double() - base).norm() / base.norm())
            if ref is not None:
                rec["err_bf16_vs_f64"] = float((y.double() - ref).norm() / ref.norm())
            rec["fp8_sdpa_api"] = hasattr(torch.ops.aten, "_scaled_dot_product_attention_quantized")
            try:
                f8 = [t.to(torch.float8_e4m3fn) for t in (q, k, v)]
                F.scaled_dot_product_attention(*f8)
                rec["sdpa_takes_float8"] = True
            except Exception as exc:  # the answer is the message: which backend refused float8 and why
                rec["sdpa_takes_float8"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(rec, default=str), flush=True)
        out.append(rec)
    return out


def sage_section(rec, q, k, v, sageattn, missing, bench):
    """SDPA (16-bit) vs sageattention at one shape, in the layouts ComfyUI passes (HND for FLUX: [b, h, s, d];
    NHD for SDXL: [b, s, h, d] views): ms and relative error vs float32 SDPA, for each scale of ATTN_SCALES."""
    import torch.nn.functional as F

    if sageattn is None:
        rec["sage"] = missing
        return
    layout = "HND" if rec["shape"].startswith("FLUX") else "NHD"
    for scale in ATTN_SCALES:
        qs, ks = q * scale, k * scale
        ref = F.scaled_dot_product_attention(qs.float(), ks.float(), v.float())
        y16 = F.scaled_dot_product_attention(qs, ks, v)
        t = (lambda x: x) if layout == "HND" else (lambda x: x.transpose(1, 2).contiguous())
        sq, sk, sv = t(qs), t(ks), t(v)
        ys = sageattn(sq, sk.clone(), sv, tensor_layout=layout, is_causal=False)  # sage subtracts k's mean in place
        ys = ys if layout == "HND" else ys.transpose(1, 2)
        rec[f"scale {scale:g}"] = {
            "sdpa_ms": bench(lambda: F.scaled_dot_product_attention(qs, ks, v)),
            "sage_ms": bench(lambda: sageattn(sq, sk.clone(), sv, tensor_layout=layout, is_causal=False)),
            "clone_k_ms": bench(lambda: sk.clone()),
            "err_sdpa_16": float((y16.float() - ref).norm() / ref.norm()),
            "err_sage": float((ys.float() - ref).norm() / ref.norm()),
            "layout": layout}


def onepass_section(bench, left, kernels, qmath) -> list:
    """Compiled per-token float8 quantization of FLUX's wide activations, the producer included: the single blocks'
    ``cat(attn, gelu(mlp))`` (15360 columns) and the double blocks' ``gelu(mlp)`` (12288). Inductor fusing the torch
    ops (qmath.quantize_act_fp8) into the producer vs the producer compiled alone + the one-pass kernel as a
    triton_op (kernels.quantize_act_fp8_traced); side by side, ms, and how many codes / scales agree."""
    import torch.nn.functional as F

    out = []
    m = 4608
    for name, widths in (("single-block linear2 input: cat(attn 3072, gelu(mlp 12288))", (3072, 12288)),
                         ("double-block mlp output input: gelu(mlp 12288)", (0, 12288))):
        if left() < 40:
            break
        rec = {"input": name, "M": m, "K": sum(widths)}
        try:
            g = torch.Generator(device="cuda").manual_seed(5)
            a = torch.randn(m, max(widths[0], 1), device="cuda", generator=g, dtype=torch.bfloat16)
            h = torch.randn(m, widths[1], device="cuda", generator=g, dtype=torch.bfloat16)

            def producer(a, h):
                y = F.gelu(h, approximate="tanh")
                return torch.cat((a, y), -1) if widths[0] else y

            variants = {"inductor fusion": lambda a, h: qmath.quantize_act_fp8(producer(a, h)),
                        "one-pass triton_op": lambda a, h: kernels.quantize_act_fp8_traced(producer(a, h))}
            got = {}
            for tag, fn in variants.items():
                torch._dynamo.reset()
                c = torch.compile(fn, fullgraph=True)
                got[tag] = c(a, h)
                rec[f"{tag} ms"] = bench(lambda: c(a, h))
            x = producer(a, h)
            rec["eager kernel alone ms"] = bench(lambda: kernels.quantize_act_fp8(x))
            rec["copy of the bf16 input ms"] = bench(lambda: x.clone())
            (q1, s1), (q2, s2) = got.values()
            rec["codes equal fraction"] = float((q1.view(torch.uint8) == q2.view(torch.uint8)).float().mean())
            rec["scales max rel diff"] = float(((s1 - s2).abs() / s1).max())
        except Exception as exc:  # a variant that does not compile is a result too
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(rec, default=str), flush=True)
        out.append(rec)
    return out


def write_md(R, path):
    def f(v):
        return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))

    lines = [f"# Kernel micro-benchmarks ({R['gpu']}, torch {R['torch']}, Triton {R.get('triton')})", "",
             "ms (median); × = relative to bf16 F.linear of the same shape.", "",
             "| M×K×N | bf16 | w8a8-fp8 | w4a8 | w4a8-fp8 | _scaled_mm only | best W4A8-FP8 GEMM only | act quant fp8 "
             "| copy | err w4a8 / w4a8-fp8 vs bf16 |", "|" + "---|" * 10]
    for r in R["shapes"]:
        if "bf16" not in r:
            continue
        b = r["bf16"]
        best = r.get("fp8w4 best")
        cell = lambda key: f"{f(r.get(key))} ({r[key] / b:.2f}×)" if isinstance(r.get(key), float) else "–"  # noqa
        lines.append(f"| {r['M']}×{r['K']}×{r['N']} | {f(b)} | {cell('w8a8-fp8')} | {cell('w4a8')} | "
                     f"{cell('w4a8-fp8')} | {cell('_scaled_mm only')} | "
                     f"{'–' if not best else f'{best[1]:.3f} ({best[1] / b:.2f}×) {best[0][6:]}'} | "
                     f"{f(r.get('act quant fp8 (Triton)'))} | {f(r.get('copy'))} | "
                     f"{f(r.get('w4a8 err vs bf16'))} / {f(r.get('w4a8-fp8 err vs bf16'))} |")
    lines += ["", "w4a8-fp8 routing: up to FP8W4_FUSED_MAX_M tokens the fused GEMM, above it the one-pass float8 "
              "expansion + torch._scaled_mm (ms of the expansion alone):", ""]
    lines += [f"- {r['M']}×{r['K']}×{r['N']}: {r.get('fp8w4 route')}, expand {f(r.get('fp8w4 expand only'))}"
              for r in R["shapes"] if "fp8w4 route" in r]
    if R.get("attention"):
        lines += ["", "Attention (torch SDPA, bf16) and float8 q/k/v:", "",
                  "| shape | B×H×S×D | bf16 ms | err fp8 q/k/v (simulated) | err bf16 vs float64 | float8 SDPA in this "
                  "torch |", "|" + "---|" * 6]
        for r in R["attention"]:
            api = "aten._scaled_dot_product_attention_quantized" if r.get("fp8_sdpa_api") else "none"
            lines.append(f"| {r['shape']} | {r['B']}×{r['H']}×{r['S']}×{r['D']} | {f(r.get('bf16_ms'))} | "
                         f"{f(r.get('err_fp8_qkv_sim_vs_ref'))} | {f(r.get('err_bf16_vs_f64'))} | {api}; SDPA with "
                         f"float8 inputs: {str(r.get('sdpa_takes_float8'))[:90]} |")
    sage_rows = [(r, key, v) for r in R.get("attention", []) for key, v in r.items()
                 if key.startswith("scale ") and isinstance(v, dict)]
    if sage_rows:
        lines += ["", "sageattention (8-bit Q·K) vs torch SDPA (16-bit), random q/k/v times the scale; error vs "
                  "float32 SDPA:", "",
                  "| shape | keys | scale | SDPA ms | sage ms (× SDPA) | err SDPA 16-bit | err sage |", "|" + "---|" * 7]
        for r, key, v in sage_rows:
            lines.append(f"| {r['shape']} | {r['keys']} | {key[6:]} | {f(v['sdpa_ms'])} | {f(v['sage_ms'])} "
                         f"({v['sage_ms'] / v['sdpa_ms']:.2f}×) | {f(v['err_sdpa_16'])} | {f(v['err_sage'])} |")
    if R.get("onepass"):
        lines += ["", "Compiled wide per-token float8 quantization (M = 4608), producer included, ms:", "",
                  "| input | K | inductor fusion | one-pass triton_op | eager kernel alone | bf16 copy | codes equal |",
                  "|" + "---|" * 7]
        for r in R["onepass"]:
            lines.append(f"| {r['input']} | {r['K']} | {f(r.get('inductor fusion ms'))} | "
                         f"{f(r.get('one-pass triton_op ms'))} | {f(r.get('eager kernel alone ms'))} | "
                         f"{f(r.get('copy of the bf16 input ms'))} | "
                         f"{f(r.get('codes equal fraction')) if 'error' not in r else r['error'][:80]} |")
    lines += ["", "Compiled LayerNorm → Linear (inductor), ms:", "",
              "| M×K×N | format | act quant traced (fusable) | eager | compiled | compiled + CUDA graph | "
              "compiled vs eager |", "|" + "---|" * 7]
    for r in R["compiled"]:
        lines.append(f"| {r['M']}×{r['K']}×{r['N']} | {r['format']} | {r['fused_act_quant']} | "
                     f"{f(r.get('eager_ms'))} | {f(r.get('compiled_ms'))} | {f(r.get('compiled_graph_ms'))} | "
                     f"{f(r.get('compiled_vs_eager')) if 'error' not in r else r['error'][:80]} |")
    if R["errors"]:
        lines += ["", "Errors / skipped:", ""] + [f"- {e.splitlines()[-1] if e else e}" for e in R["errors"]]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
