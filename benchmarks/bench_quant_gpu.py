"""GPU benchmark of qsched.quant on the full-size architectures with random weights (no downloads).

FLUX.1-schnell transformer at 1024² (4096 image + 512 text tokens) and the SDXL UNet at 1024² and 512², batch 1, bf16:
per-step latency, weight bytes, peak VRAM, quantize time for bf16 and every format/backend, plus the weight-only
bitsandbytes NF4 path; a GEMM micro-benchmark at FLUX shapes; a kernel-time breakdown (GEMM / attention /
quantize-dequantize / other) of one FLUX step per format from the torch profiler.

    python benchmarks/bench_quant_gpu.py --out benchmarks/results   # writes quant_<gpu>.json and quant_<gpu>.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLUX_SCHNELL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=False, axes_dims_rope=(16, 56, 56))
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)

# (label, format, backend)
# backend "native-unfused": native with the fused W4A8 GEMM switched off (the previous dequantize + cuBLAS path).
FORMATS = [("bf16", "fp16", "native"), ("w8a8 int8", "w8a8", "native"), ("w8a8-fp8", "w8a8-fp8", "native"),
           ("w4a8-fp8", "w4a8-fp8", "native"), ("w4a8", "w4a8", "native"), ("w4a8 dequant+cuBLAS (previous)", "w4a8", "native-unfused"),
           ("w4a16", "w4a16", "native"), ("w4a4", "w4a4", "native"),
           ("nf4 (bnb weight-only)", "nf4", "bitsandbytes"), ("w4a8-nf4 (bnb)", "w4a8-nf4", "bitsandbytes"),
           ("w8a8 (bnb LLM.int8)", "w8a8", "bitsandbytes")]


def import_pack():
    """The pack as ``qsched_pack`` (installed, or this checkout aliased under that name)."""
    import importlib
    import importlib.util

    try:
        return importlib.import_module("qsched_pack.qsched.quant")
    except ImportError:
        spec = importlib.util.spec_from_file_location("qsched_pack", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        sys.modules["qsched_pack"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return importlib.import_module("qsched_pack.qsched.quant")


def random_model(cls, cfg):
    """Build on the meta device, allocate bf16 on the GPU, fill with scaled random weights (no fp32 copy)."""
    with torch.device("meta"):
        model = cls(**cfg)
    model = model.to(torch.bfloat16).to_empty(device="cuda").eval().requires_grad_(False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=gen)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    if list(model.buffers()):
        raise RuntimeError("model has buffers that to_empty() left uninitialised")
    return model


def flux_inputs():
    h = w = 64  # 1024² image -> 128² latent -> 64² packed tokens
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, h * w, 64, generator=g).cuda().bfloat16(),
                encoder_hidden_states=torch.randn(1, 512, 4096, generator=g).cuda().bfloat16(),
                pooled_projections=torch.randn(1, 768, generator=g).cuda().bfloat16(),
                timestep=torch.tensor([1.0], device="cuda", dtype=torch.bfloat16),
                img_ids=img_ids.reshape(-1, 3).cuda(), txt_ids=torch.zeros(512, 3, device="cuda"),
                return_dict=False)


def unet_inputs(size):
    s = size // 8
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(1, 4, s, s, generator=g).cuda().bfloat16(),
                timestep=torch.tensor([999.0], device="cuda"),
                encoder_hidden_states=torch.randn(1, 77, 2048, generator=g).cuda().bfloat16(),
                added_cond_kwargs=dict(text_embeds=torch.randn(1, 1280, generator=g).cuda().bfloat16(),
                                       time_ids=torch.tensor([[size, size, 0, 0, size, size]], device="cuda",
                                                             dtype=torch.bfloat16)),
                return_dict=False)


def time_step(model, inputs, warmup=2, iters=6):
    with torch.no_grad():
        for _ in range(warmup):
            model(**inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = model(**inputs)[0]
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times), torch.cuda.max_memory_allocated(), out


def time_graph(model, inputs, iters=6):
    """Median ms of a CUDA-graph replay of one step: GPU time without Python / launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(**inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**inputs)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times)


CATS = (("gemm", ("_w4a8_gemm",)),
        ("quant", ("_act_quant", "_dequant_int4", "_int_epilogue", "kdequantize", "kquantize", "int8_vectorwise",
                   "dequantize", "quantize")),
        ("attention", ("flash", "fmha", "attention", "cudnn")),
        ("gemm", ("gemm", "sm90_", "cutlass", "xmma", "nvjet", "gemv", "_mm", "wgmma", "igemm", "splitk")))


def breakdown(model, inputs):
    """ms per step by kernel category from the torch profiler (one step after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**inputs)
            torch.cuda.synchronize()
    cats = {"gemm": 0.0, "attention": 0.0, "quant": 0.0, "other": 0.0}
    top = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if not t:
            continue
        name = e.key.lower()
        cat = next((c for c, keys in CATS if any(k.lower() in name for k in keys)), "other")
        cats[cat] += t / 1000
        top[e.key[:60]] = t / 1000
    cats["top"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:6])
    return cats


def _unfuse(model):
    for mod in model.modules():
        if hasattr(mod, "fused_w4a8"):
            mod.fused_w4a8 = False


def gemm_bench(quant):
    """bf16 vs int8 vs fp8 vs w4a8 layers at FLUX shapes (M = 4608 tokens), whole layer incl. quantize kernels;
    then the bare GEMM kernels (activations already quantized)."""
    import copy
    from importlib import import_module

    from torch import nn
    from triton.testing import do_bench

    kernels = import_module(quant.__name__ + ".kernels")
    qmath = import_module(quant.__name__ + ".qmath")

    rows = []
    for m, k, n in ((4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072),
                    (1, 3072, 18432), (77, 2048, 1280)):
        lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row = {"M": m, "K": k, "N": n}
        with torch.no_grad():
            row["bf16"] = do_bench(lambda: lin(x), return_mode="median")
            for fmt in ("w8a8", "w8a8-fp8", "w4a8", "w4a16"):
                q = nn.Sequential(copy.deepcopy(lin))
                quant.quantize_(q, fmt, "native")
                row[fmt] = do_bench(lambda: q(x), return_mode="median")
                if fmt == "w4a8":
                    _unfuse(q)
                    row["w4a8 dequant+cuBLAS (previous)"] = do_bench(lambda: q(x), return_mode="median")
            xq8 = torch.randint(-127, 127, (max(m, 32), k), device="cuda", dtype=torch.int8)  # _int_mm: M > 16
            w8 = torch.randint(-127, 127, (n, k), device="cuda", dtype=torch.int8)
            row["_int_mm only"] = do_bench(lambda: torch._int_mm(xq8, w8.t()), return_mode="median")
            xf8, wf8 = xq8.to(torch.float8_e4m3fn), w8.to(torch.float8_e4m3fn)
            sa, sb = torch.ones(max(m, 32), 1, device="cuda"), torch.ones(1, n, device="cuda")
            row["_scaled_mm only"] = do_bench(lambda: torch._scaled_mm(xf8, wf8.t(), scale_a=sa, scale_b=sb,
                                                                       out_dtype=torch.bfloat16), return_mode="median")
            codes, ws = qmath.quantize_weight(lin.weight, 4, 64)
            packed = qmath.pack_int4(codes)
            xq, xs, _ = kernels.quantize_act_int8(x, 8, True, perm=64)
            row["w4a8 fused GEMM only"] = do_bench(lambda: kernels.w4a8_gemm(xq, xs, packed, ws, lin.bias,
                                                                             torch.bfloat16), return_mode="median")
        rows.append(row)
    return rows


def run_model(quant, name, model, inputs_list, formats, profile_step=False):
    from importlib import import_module

    comfy = import_module(quant.__name__ + ".comfy")
    results = []
    base_bytes = quant.weight_bytes(model)
    ref = {}
    for label, fmt, backend in formats:
        torch.cuda.empty_cache()
        rec = {"model": name, "format": label, "spec": fmt, "backend": backend}
        try:
            m = comfy.shared_copy(model)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            report = quant.quantize_(m, fmt, backend.replace("-unfused", ""))
            if backend.endswith("-unfused"):
                _unfuse(m)
            torch.cuda.synchronize()
            rec["quantize_s"] = time.perf_counter() - t0
            rec["kernels"] = {k: list(report.quantized.values()).count(k) for k in set(report.quantized.values())}
            rec["fallbacks"] = len(report.fallbacks)
            rec["weight_bytes"] = quant.weight_bytes(m)
            rec["weight_ratio"] = rec["weight_bytes"] / base_bytes
            for tag, inputs in inputs_list:
                ms, peak, out = time_step(m, inputs)
                rec[f"ms_{tag}"] = ms
                rec[f"peak_gb_{tag}"] = peak / 1e9
                try:
                    rec[f"graph_ms_{tag}"] = time_graph(m, inputs)
                except Exception as exc:  # e.g. a kernel that synchronises with the CPU
                    rec[f"graph_error_{tag}"] = f"{type(exc).__name__}: {exc}"[:200]
                torch.cuda.empty_cache()
                if fmt == "fp16":
                    ref[tag] = out.float()
                else:
                    rec[f"rel_err_{tag}"] = float((out.float() - ref[tag]).norm() / ref[tag].norm())
            if profile_step:
                rec["breakdown_ms"] = breakdown(m, inputs_list[0][1])
        except Exception as exc:  # a format that fails on this GPU is recorded, the others still run
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(json.dumps(rec), flush=True)
        results.append(rec)
        del m
    return results


def table(results, tags):
    base = {(r["model"]): r for r in results if r["spec"] == "fp16"}
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        b = base[model]
        head = "| format | backend | " + " | ".join(f"ms/step {t} eager (× bf16)" for t in tags[model]) + " | " + \
               " | ".join(f"ms/step {t} CUDA graph (× bf16)" for t in tags[model]) + \
               " | weights GB (× bf16) | peak GB | quantize s | rel err vs bf16 |"
        lines += [f"\n**{model}**\n", head, "|" + "---|" * (head.count("|") - 1)]
        for r in (r for r in results if r["model"] == model):
            if "error" in r:
                lines.append(f"| {r['format']} | {r['backend']} | failed: {r['error'][:120]} |")
                continue
            cells = [f"{r['ms_' + t]:.1f} ({r['ms_' + t] / b['ms_' + t]:.2f}×)" for t in tags[model]]
            cells += [f"{r['graph_ms_' + t]:.1f} ({r['graph_ms_' + t] / b['graph_ms_' + t]:.2f}×)"
                      if 'graph_ms_' + t in r and 'graph_ms_' + t in b else "n/a" for t in tags[model]]
            err = r.get(f"rel_err_{tags[model][0]}")
            lines.append(f"| {r['format']} | {r['backend']} | " + " | ".join(cells) +
                         f" | {r['weight_bytes'] / 1e9:.2f} ({r['weight_ratio']:.2f}×) | "
                         f"{r['peak_gb_' + tags[model][0]]:.1f} | {r.get('quantize_s', 0):.1f} | "
                         f"{'-' if err is None else f'{err:.3f}'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--models", default="flux,sdxl")
    ap.add_argument("--formats", default=",".join(f[0] for f in FORMATS))
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    quant = import_pack()
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    formats = [f for f in FORMATS if f[0] in args.formats.split(",")]
    meta = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "command": "python " + " ".join(sys.argv)}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    results, gemm = [], []
    tags = {}
    if "flux" in args.models:
        gemm = gemm_bench(quant)
        for r in gemm:
            print(json.dumps(r), flush=True)
        model = random_model(FluxTransformer2DModel, FLUX_SCHNELL)
        tags["FLUX.1-schnell transformer, 1024², batch 1"] = ["1024"]
        results += run_model(quant, "FLUX.1-schnell transformer, 1024², batch 1", model,
                             [("1024", flux_inputs())], formats, profile_step=not args.no_profile)
        del model
        torch.cuda.empty_cache()
    if "sdxl" in args.models:
        model = random_model(UNet2DConditionModel, SDXL_UNET)
        tags["SDXL UNet, batch 1"] = ["1024", "512"]
        results += run_model(quant, "SDXL UNet, batch 1", model,
                             [("1024", unet_inputs(1024)), ("512", unet_inputs(512))], formats,
                             profile_step=not args.no_profile)
    md = [f"GPU: {gpu}; torch {meta['torch']} (CUDA {meta['cuda']}), Triton {meta.get('triton')}; "
          f"command: `{meta['command']}`", table(results, tags)]
    if gemm:
        cols = [c for c in gemm[0] if c not in ("M", "K", "N")]
        md += ["\n**Linear layer at FLUX/SDXL shapes, ms (× bf16); layer columns include their quantize kernels; "
               "`_int_mm`/`_scaled_mm` use M ≥ 32; `w4a8 fused GEMM only` has its activations already quantized**\n",
               "| M×K×N | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        md += [f"| {r['M']}×{r['K']}×{r['N']} | " + " | ".join(f"{r[c]:.3f} ({r[c] / r['bf16']:.2f}×)" for c in cols)
               + " |" for r in gemm]
    prof = [r for r in results if "breakdown_ms" in r]
    if prof:
        md += ["\n**Kernel time per step by category (torch profiler, ms; first resolution)**\n",
               "| model | format | GEMM | attention | quant/dequant | other | top kernels |", "|---|---|---|---|---|---|---|"]
        for r in prof:
            b = r["breakdown_ms"]
            tops = "; ".join(f"{k} {v:.1f}" for k, v in list(b["top"].items())[:3])
            md.append(f"| {r['model'].split(',')[0]} | {r['format']} | {b['gemm']:.1f} | {b['attention']:.1f} | "
                      f"{b['quant']:.1f} | {b['other']:.1f} | {tops} |")
    text = "\n".join(md)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    slug = gpu.lower().replace("nvidia ", "").replace(" ", "-")
    with open(os.path.join(args.out, f"quant_{slug}.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "gemm": gemm}, f, indent=1)
    with open(os.path.join(args.out, f"quant_{slug}.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
