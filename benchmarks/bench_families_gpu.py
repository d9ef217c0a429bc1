"""The few-step families at full size with random weights in a real ComfyUI (0.3.64, in-process): core bf16, core
fp8 (fp8_e4m3fn_fast) and the pack's Quantize Model results side by side, eager (and compiled where time allows).

    python benchmarks/bench_families_gpu.py --comfy COMFYUI_DIR --out benchmarks/results [--only qwen_image,wan5b]
    python benchmarks/bench_families_gpu.py --comfy /work/comfy --out /tmp/x --tiny     # CPU smoke test

Families (ComfyUI's own diffusion-model classes, widths of the released models, weights normal(0, 1/sqrt(fan_in)),
built as a state dict and loaded by ``comfy.sd.load_diffusion_model_state_dict``, so ComfyUI's detection picks the
model config): Qwen-Image 1024² 4 steps, Wan 2.2 5B 720p x 81 frames 4 steps, SD3.5 Large (Turbo) 1024² 4 steps,
Chroma 1024² 8 steps, Wan 2.2 A14B expert 480p x 33 frames 4 steps on a simulated 24 GiB card (core bf16 partially
loaded vs the pack fully loaded). Per config: ComfyUI's model_size(), bytes of the Linear weights (codes + scales vs
bf16), s/step (second run), peak VRAM, and with --compile the same compiled (ComfyUI's TorchCompileModel wrapper).
Results go to OUT/families_gpu.json after every config (a cut-short run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

P = argparse.ArgumentParser()
P.add_argument("--comfy", required=True)
P.add_argument("--out", required=True)
P.add_argument("--tiny", action="store_true")
P.add_argument("--only", default="", help="comma-separated families (default: all, in the order below)")
P.add_argument("--formats", default="core_bf16,core_fp8,w8a8-fp8,w4a8-fp8")
P.add_argument("--compile", default="", help="comma-separated families to also run compiled")
P.add_argument("--budget-s", type=float, default=420.0)
ARGS = P.parse_args()
T0 = time.time()

from simcard import Card, clean, enter_comfyui, random_state_dict, timed_sample  # noqa: E402

enter_comfyui(ARGS.comfy, ARGS.tiny)

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
from qsched_pack.nodes import quant_ops  # noqa: E402
from qsched_pack.nodes.quant_model import quantize_comfy_model  # noqa: E402

DEV = mm.get_torch_device()
CUDA = getattr(DEV, "type", "cpu") == "cuda"
os.makedirs(ARGS.out, exist_ok=True)
OUT = os.path.join(ARGS.out, "families_tiny_cpu.json" if ARGS.tiny else "families_gpu.json")
R = {"gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__,
     "run": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.orig_argv),
     "configs": [], "errors": [], "skipped": []}


def save():
    with open(OUT + ".tmp", "w") as f:
        json.dump(R, f, indent=1, default=str)
    os.replace(OUT + ".tmp", OUT)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def left():
    return ARGS.budget_s - (time.time() - T0)


# ------------------------------------------------------------------------------------------------------ families
def build(name):
    """(module on the meta device, dtype, conditioning, latent shape, steps, card GiB or None)."""
    ops = comfy.ops.disable_weight_init
    t = ARGS.tiny
    g = torch.Generator().manual_seed(11)
    if name == "qwen_image":
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

        m = QwenImageTransformer2DModel(num_layers=1 if t else 60, dtype=torch.bfloat16, device="meta",
                                        operations=ops)
        n = 8 if t else 128
        return m, torch.bfloat16, [[torch.randn(1, 8 if t else 256, 3584, generator=g), {}]], (1, 16, 1, n, n), 4, None
    if name in ("wan5b", "wan14b"):
        from comfy.ldm.wan.model import WanModel

        five = name == "wan5b"
        ch = 48 if five else 16
        kw = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=1) if t else (
            dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30) if five else
            dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40))
        m = WanModel(model_type="t2v", in_dim=ch, out_dim=ch, dtype=torch.float16, device="meta", operations=ops,
                     **kw)
        # 5B: 720p (704x1280) x 81 frames, VAE /16 spatial /4 time; A14B: 480p (480x832) x 33 frames, VAE /8
        lat = (1, ch, 2, 8, 8) if t else ((1, 48, 21, 44, 80) if five else (1, 16, 9, 60, 104))
        return m, torch.float16, [[torch.randn(1, 8 if t else 512, 4096, generator=g), {}]], lat, 4, \
            (None if five else 24)
    if name == "sd35_large":
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

        depth = 2 if t else 38
        m = OpenAISignatureMMDITWrapper(in_channels=16, patch_size=2, out_channels=16, depth=depth,
                                        adm_in_channels=2048, num_patches=(16 if t else 192) ** 2,
                                        pos_embed_max_size=16 if t else 192, qk_norm="rms",
                                        context_embedder_config={"target": "torch.nn.Linear", "params": {
                                            "in_features": 4096, "out_features": 64 * depth}},
                                        dtype=torch.bfloat16, device="meta", operations=ops)
        n = 8 if t else 128
        cond = [[torch.randn(1, 8 if t else 333, 4096, generator=g), {"pooled_output": torch.randn(1, 2048,
                                                                                                     generator=g)}]]
        return m, torch.bfloat16, cond, (1, 16, n, n), 4, None
    if name == "chroma":
        from comfy.ldm.chroma.model import Chroma

        m = Chroma(in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                   num_heads=24, depth=1 if t else 19, depth_single_blocks=0 if t else 38, axes_dim=[16, 56, 56],
                   theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5,
                   dtype=torch.bfloat16, device="meta", operations=ops)
        n = 8 if t else 128
        # T5 only: the conditioning carries pooled_output None (what ComfyUI's Chroma text encoder outputs)
        cond = [[torch.randn(1, 8 if t else 512, 4096, generator=g), {"pooled_output": None}]]
        return m, torch.bfloat16, cond, (1, 16, n, n), 8, None
    raise ValueError(name)


FAMILIES = ("qwen_image", "sd35_large", "wan5b", "chroma", "wan14b")


def sample(model, cond, latent_shape, steps):
    return timed_sample(model, cond, torch.zeros(latent_shape), steps)


def linear_bytes(model):
    """(bytes the Linear weights hold, the same layers in bf16): for a quantized model its quantized layers (codes +
    scales + group exponents), for a core model every Linear."""
    held = bf16 = 0
    layers = [m for m in model.model.diffusion_model.modules() if getattr(m, "qsched_spec", None) is not None]
    if not layers:
        layers = [m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    for m in layers:
        bf16 += m.in_features * m.out_features * 2
        for t in (m.weight, getattr(m, "weight_scale", None), getattr(m, "weight_exp", None)):
            held += 0 if t is None else t.numel() * t.element_size()
    return held, bf16


def measure(rec, model, cond, lat, steps, compiled):
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    y, first = sample(model, cond, lat, steps)
    y2, dt = sample(model, cond, lat, steps)
    held, bf16 = linear_bytes(model)
    loaded = [lm for lm in mm.current_loaded_models if not lm.is_dead() and lm.model is model]
    rec.update(comfy_size=model.model_size(), linear_bytes=held, linear_bytes_bf16=bf16,
               linear_ratio=held / bf16, first_run_s=first, s_per_step=dt / steps, finite=bool(torch.isfinite(y2).all()),
               peak_vram=torch.cuda.max_memory_allocated() if CUDA else 0,
               loaded_bytes=loaded[0].model.loaded_size() if loaded else None,
               partial=bool(getattr(model.model, "model_lowvram", False)))
    save()
    if compiled and left() > 150:
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        torch._dynamo.reset()
        c = model.clone()
        set_torch_compile_wrapper(model=c, backend="inductor")
        _, f = sample(c, cond, lat, steps)
        yc, dtc = sample(c, cond, lat, steps)
        rec.update(compile_first_run_s=f, s_per_step_compiled=dtc / steps,
                   compiled_vs_eager=float((yc - y2).norm() / (y2.norm() + 1e-12)))
    elif compiled:
        R["skipped"].append(f"{rec['family']} {rec['format']} compiled ({left():.0f} s left)")
    return y2


def run_family(name):
    mod, dtype, cond, lat, steps, card = build(name)
    t = time.time()
    sd = random_state_dict(mod, dtype, 5, DEV, keep_fp32=True)
    del mod
    log(name, "state dict", f"{sum(v.numel() for v in sd.values()) / 1e9:.2f} B params", f"{time.time() - t:.1f} s")
    formats = ARGS.formats.split(",")
    compiled = name in ARGS.compile.split(",")
    ref = None
    core = None
    for fmt in (["core_fp8"] if "core_fp8" in formats else []) + [f for f in formats if f != "core_fp8"]:
        if left() < (60 if not ARGS.tiny else 0):
            R["skipped"].append(f"{name} {fmt} ({left():.0f} s left)")
            continue
        clean()
        rec = {"family": name, "format": fmt, "card_gib": card, "steps": steps, "latent": list(lat)}
        R["configs"].append(rec)
        try:
            t = time.time()
            if fmt == "core_fp8":
                model = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={
                    "dtype": torch.float8_e4m3fn, "fp8_optimizations": True})
            elif fmt == "core_bf16":
                core = model = comfy.sd.load_diffusion_model_state_dict(sd)
                sd = None
            else:
                if core is None:
                    core = comfy.sd.load_diffusion_model_state_dict(sd)
                    sd = None
                model = quantize_comfy_model(core, fmt)[0]
                rec["quantized_layers"] = sum(1 for _ in quant_ops.quantized_layers(model.model.diffusion_model))
            rec["config"] = type(model.model.model_config).__name__
            rec["dtype"] = str(model.model.get_dtype())
            rec["load_s"] = time.time() - t
            with Card(card, clean):
                y = measure(rec, model, cond, lat, steps, compiled)
            if fmt == "core_bf16":
                ref = y
            elif ref is not None:
                rec["rel_err_vs_bf16"] = float((y - ref).norm() / ref.norm())
            log(name, fmt, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()})
            if model is not core:
                del model
        except Exception as exc:  # a failed config is a result: recorded, the next one runs
            rec["error"] = f"{type(exc).__name__}: {exc}"[:1500]
            R["errors"].append({"family": name, "format": fmt, "trace": traceback.format_exc()[-2000:]})
            log("ERROR", name, fmt, rec["error"][:300])
        save()
    del core, sd
    clean()


if __name__ == "__main__":
    for fam in (ARGS.only.split(",") if ARGS.only else FAMILIES):
        if left() < (90 if not ARGS.tiny else 0):
            R["skipped"].append(f"{fam} ({left():.0f} s left)")
            continue
        run_family(fam)
    R["total_s"] = time.time() - T0
    save()
    log("done", OUT)
