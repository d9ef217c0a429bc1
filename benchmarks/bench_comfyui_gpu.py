"""Real ComfyUI (0.3.64, in-process) at full size with random weights: core, GGUF and the pack's quantized models
side by side, plus small simulated cards and the Quantize Model scenarios.

    python benchmarks/bench_comfyui_gpu.py --comfy COMFYUI_DIR --gguf-nodes DIR/comfyui_gguf --work /tmp/qsb \
        --out benchmarks/results

--gguf-nodes: a checkout of city96/ComfyUI-GGUF in a folder whose name is a Python identifier (needs ``gguf``).
--tiny: the same script on the CPU with the tiny test models (a smoke test of the script, not a measurement).

Models (written by the script, random normal(0, 1/sqrt(fan_in)) weights): FLUX.1-schnell transformer (bf16, 11.9 B
parameters), GGUF Q8_0 / Q4_0 of it, SDXL UNet (fp16, 2.6 B). Sampling: 4 steps euler / "simple", batch 1,
FLUX 1024² (4096 image + 512 text tokens), SDXL 512². Per config: load time, peak anonymous host RAM during the
load (RssAnon: memory-mapped file pages are page cache and not counted), ComfyUI's model_size(), VRAM held by
PyTorch after sampling, s/step eager (second run) and compiled (ComfyUI's TorchCompileModel wrapper, inductor).
Small cards: ComfyUI's free/total memory queries answer for a card of N GiB and PyTorch's allocator is capped there
(``torch.cuda.set_per_process_memory_fraction``). Every result is appended to OUT/comfyui_h200.json as it comes.

Parts (``--part A|B``, or ``--only family/format/mode,...``; benchmarks/comfyui_parts.py lists them): ordered lists
of configs for one device call each (10 minutes at most), written to OUT/comfyui_h200_part<X>.json; each config
records eager / compiled / CUDA-graph s/step and a kernel-time breakdown of one profiled sampling run
(benchmarks/kernel_breakdown.py). Without --part/--only the sections of the first run (files, flux, prequant, cards,
scenarios, sdxl, fastpath, compile) run as before; ``--skip`` takes section names, families, formats or modes.
``benchmarks/report_comfyui.py`` renders the tables from the JSON files.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
import traceback

P = argparse.ArgumentParser()
P.add_argument("--comfy", required=True)
P.add_argument("--gguf-nodes", default=None)
P.add_argument("--work", required=True)
P.add_argument("--out", required=True)
P.add_argument("--tiny", action="store_true")
P.add_argument("--budget-s", type=float, default=520.0)
P.add_argument("--skip", default="", help="comma-separated sections to skip")
P.add_argument("--gguf-only", action="store_true", help="FLUX: core bf16 (state dict in memory) vs GGUF Q8_0/Q4_0")
P.add_argument("--part", default=None, help="an ordered list of configs: A (FLUX), B (SDXL), tiny (CPU smoke test)")
P.add_argument("--only", default=None, help="comma-separated config keys family/format/mode (comfyui_parts.py)")
P.add_argument("--no-profile", action="store_true", help="no kernel-time breakdown")
ARGS = P.parse_args()
T0 = time.time()

import simcard  # noqa: E402

GGUF_PARENT = [os.path.dirname(os.path.abspath(ARGS.gguf_nodes))] if ARGS.gguf_nodes else []
simcard.enter_comfyui(ARGS.comfy, ARGS.tiny, *GGUF_PARENT)

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
from comfy_api.torch_helpers import set_torch_compile_wrapper  # noqa: E402
import comfyui_parts as parts  # noqa: E402
from simcard import clean, sync  # noqa: E402
import kernel_breakdown  # noqa: E402
from qsched_pack.calibration.testing import AnonPeak  # noqa: E402
from qsched_pack.nodes.quant_model import load_quantized, quantize_comfy_model, save_quantized  # noqa: E402

DEV = mm.get_torch_device()
CUDA = getattr(DEV, "type", "cpu") == "cuda"
os.makedirs(ARGS.work, exist_ok=True)
os.makedirs(ARGS.out, exist_ok=True)
SKIP = set(filter(None, ARGS.skip.split(",")))
PART = ARGS.part or ("only" if ARGS.only else None)
KEYS = parts.select(ARGS.part, ARGS.only, SKIP)  # a bad key stops here, before anything is written
OUT = os.path.join(ARGS.out, ("comfyui_tiny_cpu" if ARGS.tiny else "comfyui_h200") + (f"_part{PART}" if PART else "")
                   + ".json")
RUN = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
R = {"gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__, "run": RUN, "part": PART,
     "keys": KEYS, "budget_s": ARGS.budget_s, "configs": [], "cards": [], "scenarios": {}, "files": {}, "errors": [],
     "skipped": []}
GiB = 2 ** 30


def save():
    with open(OUT + ".tmp", "w") as f:
        json.dump(R, f, indent=1, default=str)
    os.replace(OUT + ".tmp", OUT)


def left():
    return ARGS.budget_s - (time.time() - T0)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def guarded(name, need_s=0.0):
    """Decorator: run a section if time allows; record errors and go on."""
    def deco(fn):
        def run(*a, **k):
            if name in SKIP or left() < need_s:
                R["skipped"].append(f"{name} ({left():.0f} s left, needs {need_s:.0f})")
                log("skip", name)
                save()
                return None
            try:
                return fn(*a, **k)
            except Exception as exc:  # a failed config is a result too: recorded, the benchmark goes on
                R["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                    "trace": traceback.format_exc()[-2000:]})
                log("ERROR", name, type(exc).__name__, str(exc)[:300])
                return None
            finally:
                save()
        return run
    return deco


# ------------------------------------------------------------------------------------------------------ models
def flux_model(device):
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    if ARGS.tiny:
        kw = dict(vec_in_dim=2048, depth=1, depth_single_blocks=0)
    else:
        kw = dict(vec_in_dim=768, depth=19, depth_single_blocks=38)
    return Flux(image_model="flux", in_channels=16, out_channels=16, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                guidance_embed=False, dtype=torch.bfloat16, device=device, operations=comfy.ops.disable_weight_init,
                **kw)


def sdxl_model(device):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if ARGS.tiny:
        kw = dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                  transformer_depth_middle=1, context_dim=768, num_heads=8, use_linear_in_transformer=False,
                  adm_in_channels=None)
    else:
        kw = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                  transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                  context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
                  num_classes="sequential")
    return UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                     legacy=False, use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float16,
                     device=device, operations=comfy.ops.disable_weight_init, **kw)


def random_state_dict(module, dtype, seed):
    return simcard.random_state_dict(module, dtype, seed, DEV)


FILES = {}


def ensure_file(fam, with_gguf=False):
    """Write the family's random-weight file once (FLUX ~24 GB, SDXL ~5 GB), only when a config needs it."""
    from safetensors.torch import save_file

    if fam in FILES:
        return
    if fam in SKIP:
        raise RuntimeError(f"{fam} is in --skip but a selected config needs its file")
    for fam, build, dtype in [x for x in (("flux", flux_model, torch.bfloat16), ("sdxl", sdxl_model, torch.float16))
                              if x[0] == fam]:
        t = time.time()
        sd = random_state_dict(build("meta"), dtype, 5 if fam == "flux" else 2)
        path = os.path.join(ARGS.work, f"{fam}.safetensors")
        save_file(sd, path)
        FILES[fam] = path
        R["files"][fam] = {"bytes": os.path.getsize(path), "write_s": time.time() - t}
        log("wrote", path, os.path.getsize(path) / GiB)
        if fam == "flux" and with_gguf and ARGS.gguf_nodes and "gguf" not in SKIP:
            from gguf_files import write_gguf

            for q in ("Q8_0", "Q4_0"):
                t = time.time()
                gp = os.path.join(ARGS.work, f"flux_{q}.gguf")
                R["files"][f"flux_{q}"] = {"bytes": write_gguf(gp, sd, q, "flux", device=DEV),
                                          "write_s": time.time() - t}
                FILES[f"flux_{q}"] = gp
                log("wrote", gp)
        del sd
        gc.collect()


@guarded("files")
def write_files():
    for fam in parts.FAMILIES:
        if fam not in SKIP:
            ensure_file(fam, with_gguf=True)


# ------------------------------------------------------------------------------------------------------ loaders
def core(fam, fp8_fast=False):
    def load():
        opts = {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True} if fp8_fast else {}
        return comfy.sd.load_diffusion_model(FILES[fam], model_options=opts)
    return load


def pack(fam, fmt):
    return lambda: load_quantized(FILES[fam], fmt)[0]


def gguf(q):
    def load():
        import importlib

        gn = importlib.import_module(os.path.basename(os.path.abspath(ARGS.gguf_nodes)) + ".nodes")
        ops = gn.GGMLOps()
        ops.Linear.dequant_dtype = ops.Linear.patch_dtype = None
        m = comfy.sd.load_diffusion_model_state_dict(gn.gguf_sd_loader(FILES[f"flux_{q}"]),
                                                     model_options={"custom_operations": ops})
        return gn.GGUFModelPatcher.clone(m)
    return load


# ------------------------------------------------------------------------------------------------------ sampling
def inputs(fam):
    g = torch.Generator().manual_seed(11)
    if fam == "flux":
        n = 8 if ARGS.tiny else 128
        ctx, pooled = (torch.randn(1, 8, 4096, generator=g), torch.randn(1, 2048, generator=g)) if ARGS.tiny else (
            torch.randn(1, 512, 4096, generator=g), torch.randn(1, 768, generator=g))
        return [[ctx, {"pooled_output": pooled}]], torch.zeros(1, 16, n, n)
    n = 8 if ARGS.tiny else 64
    if ARGS.tiny:
        return [[torch.randn(1, 77, 768, generator=g), {}]], torch.zeros(1, 4, n, n)
    return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g),
                                                      "width": 512, "height": 512}]], torch.zeros(1, 4, n, n)


def sample(model, fam, steps=4):
    cond, latent = inputs(fam)
    return simcard.timed_sample(model, cond, latent, steps)


def held():
    loaded = [(type(lm.model.model).__name__, lm.model.loaded_size(), lm.model.model_size(),
               bool(getattr(lm.model.model, "model_lowvram", False))) for lm in mm.current_loaded_models
              if not lm.is_dead()]
    return {"allocated": torch.cuda.memory_allocated() if CUDA else 0,
            "loaded": [{"class": c, "loaded": a, "size": s, "lowvram": lv} for c, a, s, lv in loaded]}


def profile_breakdown(model, fam, wall_step_s):
    """Kernel-time breakdown of one profiled 4-step sampling run (after warm-up): see kernel_breakdown.py."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts) as prof:
        _, dt = sample(model, fam)
    want = DeviceType.CUDA if CUDA else DeviceType.CPU
    items = [(e.name, e.time_range.start, (e.time_range.end - e.time_range.start) if CUDA else e.self_cpu_time_total)
             for e in prof.events() if e.device_type == want]
    return kernel_breakdown.summarize(items, steps=4, wall_step_s=wall_step_s, profiled_s=dt,
                                      device="cuda" if CUDA else "cpu")


def stage(rec, name, fn):
    """One optional stage of a config (compile, CUDA graph, profile): its failure is recorded in the config's record
    and the earlier stages' numbers stay; the record is saved after every stage."""
    try:
        return fn()
    except Exception as exc:  # recorded in the result file next to the numbers that were measured
        rec.setdefault("stage_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:1500]
        log("ERROR", rec["name"], name, type(exc).__name__, str(exc)[:300])
        return None
    finally:
        save()


LATENTS = {}  # (family, format) -> the eager latent with 16-bit attention: the references of the error columns


def rel_err(y, ref) -> float:
    return float((y - ref).norm() / (ref.norm() + 1e-12))


def measure(name, fam, loader, *, compiled=False, card=None, keep=False, graph=False, key=None, mode=None,
            profile=False, fmt=None, sage=False):
    """Load, sample twice (eager: the second run is timed), then optionally compile / CUDA graph / profile. The
    record is in R (and on disk) from the first timed run on, updated after each stage. ``sage``: the eager pair
    runs with 16-bit attention first (its latent and s/step recorded), then every stage with the pack's 8-bit
    attention option; ``err_attention`` = 8-bit vs 16-bit attention latent, ``err_vs_core`` = this format's 16-bit
    latent vs the family's core one (when measured earlier in this process)."""
    clean()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    with AnonPeak() as peak:
        t = time.time()
        model = loader()
        load_s = time.time() - t
    rec = {"name": name, "family": fam, "card_gib": card, "key": key, "mode": mode, "part": PART, "run": RUN,
           "load_s": load_s, "host_anon_peak_growth": peak.growth, "comfy_size": model.model_size()}
    y, first = sample(model, fam)
    y2, dt = sample(model, fam)
    if fmt is not None and card is None:
        LATENTS[(fam, fmt)] = y2
        core_ref = LATENTS.get((fam, parts.BASELINE[fam]))
        if core_ref is not None and fmt != parts.BASELINE[fam]:
            rec["err_vs_core"] = rel_err(y2, core_ref)
    if sage:
        from qsched_pack.nodes.attention import ATTENTION_SAGE, apply_attention

        rec.update(s_per_step_16bit_attention=dt / 4, first_run_s_16bit_attention=first)
        y16 = y2
        model = apply_attention(model, ATTENTION_SAGE, "benchmark")
        y, first = sample(model, fam)
        y2, dt = sample(model, fam)
        rec["err_attention"] = rel_err(y2, y16)
    rec.update(first_run_s=first, s_per_step=dt / 4, finite=bool(torch.isfinite(y2).all()),
               repeat_equal=bool(torch.equal(y, y2)), **held())
    lm = [x for x in rec["loaded"] if x["size"] == rec["comfy_size"]]
    rec["weights_on_gpu"] = lm[0]["loaded"] if lm else None
    rec["partial"] = lm[0]["lowvram"] if lm else None
    (R["cards"] if card else R["configs"]).append(rec)
    save()
    if profile:
        rec["breakdown_eager"] = stage(rec, "profile eager", lambda: profile_breakdown(model, fam, dt / 4))
    base = model
    if compiled:
        def do_compile():
            # each config compiles the same forward code objects again: without a reset, dynamo's recompile limit
            # (8 per code object) would silently leave later configs eager, and old graphs would keep old weights
            torch._dynamo.reset()
            breaks = torch._dynamo.utils.counters["graph_break"]
            before = sum(breaks.values())
            c = model.clone()
            set_torch_compile_wrapper(model=c, backend="inductor")
            _, first_c = sample(c, fam)
            yc, dtc = sample(c, fam)
            rec.update(compile_first_run_s=first_c, s_per_step_compiled=dtc / 4,
                       graph_breaks=sum(breaks.values()) - before, graph_break_reasons=list(breaks)[:5],
                       compiled_vs_eager=float((yc - y2).norm() / (y2.norm() + 1e-12)))
            return c, yc

        got = stage(rec, "compile", do_compile)
        if got is None:
            graph = False
        else:
            base, yref = got
            if profile:
                rec["breakdown_compiled"] = stage(rec, "profile compiled",
                                                  lambda: profile_breakdown(base, fam, rec["s_per_step_compiled"]))
    if graph:  # the fast path: each step replayed from CUDA graphs (Q-Sched CUDA Graph node)
        def do_graph():
            from qsched_pack.nodes.fastpath import apply_cuda_graph

            gm, graphs = apply_cuda_graph(base, 2)
            _, first_g = sample(gm, fam)
            yg, dtg = sample(gm, fam)
            ref = yref if compiled else y2
            tag = "compiled" if compiled else "eager"
            rec.update({"graph_first_run_s": first_g, f"s_per_step_{'compiled_' if compiled else ''}graph": dtg / 4,
                        "graph_stats": graphs.stats(), f"graph_equal_{tag}": bool(torch.equal(yg, ref)),
                        f"graph_vs_{tag}": float((yg - ref).norm() / (ref.norm() + 1e-12))})
            return gm

        gm = stage(rec, "cuda graph", do_graph)
        if gm is not None and profile:
            rec["breakdown_graph"] = stage(rec, "profile graph", lambda: profile_breakdown(
                gm, fam, rec.get("s_per_step_compiled_graph", rec.get("s_per_step_graph"))))
    log(name, key or "", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                          if k not in ("loaded",) and not k.startswith("breakdown")})
    for k in ("breakdown_eager", "breakdown_compiled", "breakdown_graph"):
        if rec.get(k):
            log("  ", k, {c: round(v, 3) for c, v in rec[k]["shares"].items() if v is not None},
                "busy/step", rec[k].get("gpu_busy_per_step_s"))
    save()
    return (model, y2) if keep else None


# ------------------------------------------------------------------------------------------------------ refcal
class RandomTextEncoder:
    """Bench-only CLIP stand-in: conditioning of the family's real shapes (FLUX: 256 T5 tokens x 4096 + pooled 768;
    SDXL: 77 x 2048 + pooled 1280), random, seeded by the prompt. Text encoding is outside what is timed (Calibrate
    encodes each prompt once, before the fit); everything after it runs ComfyUI's own code."""

    def __init__(self, fam):
        self.fam = fam

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        import hashlib

        g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))
        if self.fam == "flux":
            n, ctx, pooled = (8, 4096, 2048) if ARGS.tiny else (256, 4096, 768)
            return [[torch.randn(1, n, ctx, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g)}]]
        if ARGS.tiny:
            return [[torch.randn(1, 77, 768, generator=g), {}]]
        return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]


def random_vae(fam):
    """A full-size VAE of the family's latent format (FLUX ae: 16 channels; SDXL: 4), random weights, fp16."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    z = 16 if fam == "flux" else 4
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=z)
    return comfy.sd.VAE(sd=random_state_dict(vae, torch.float16, 3))


def refcal(key, fam, fmt, card):
    """Q-Sched Calibrate (the node's own function, in-process) with objective "match full precision": the core
    model from a state dict in memory (no file write), Q-Sched Quantize Model's quantization in ``fmt``, 16 of the
    default prompts (8 fit, 8 held out), 4 steps, the template's sampler, size and batch. Timed twice: cold (first
    use of the models on the device) and warm; both runs recompute everything (the fit keeps no record)."""
    import folder_paths

    from qsched_pack.calibration.prompts import default_prompts
    from qsched_pack.nodes.calibration import QSchedCalibrate

    clean()
    folder_paths.set_output_directory(os.path.join(ARGS.work, "output"))
    folder_paths.set_temp_directory(os.path.join(ARGS.work, "temp"))
    folder_paths.add_model_folder_path("qsched", os.path.join(ARGS.work, "qsched"), is_default=True)
    rec = {"name": f"reference calibration {fmt}", "family": fam, "key": key, "mode": "refcal", "part": PART,
           "run": RUN, "card_gib": card}
    t = time.time()
    build = flux_model if fam == "flux" else sdxl_model
    sd = random_state_dict(build("meta"), torch.bfloat16 if fam == "flux" else torch.float16, 5 if fam == "flux" else 2)
    rec["random_weights_s"] = time.time() - t
    t = time.time()
    fp = comfy.sd.load_diffusion_model_state_dict(sd)
    del sd
    gc.collect()
    rec["load_s"] = time.time() - t
    t = time.time()
    q, _ = quantize_comfy_model(fp, fmt)
    rec["quantize_s"] = time.time() - t
    rec["sizes_gib"] = {"reference": fp.model_size() / GiB, "quantized": q.model_size() / GiB}
    t = time.time()
    vae = random_vae(fam)
    rec["vae_s"] = time.time() - t
    R["configs"].append(rec)
    save()
    size = 64 if ARGS.tiny else (1024 if fam == "flux" else 512)
    n, steps = (10, 2) if ARGS.tiny else (16, 4)  # --tiny: the smallest run the node takes (a smoke test)
    settings = dict(model=q, clip=RandomTextEncoder(fam), vae=vae, prompts="\n".join(default_prompts()[:n]), steps=steps,
                    sampler_name="euler" if fam == "flux" else "euler_ancestral", scheduler="simple", eta=1.0,
                    cfg=1.0, space="start", strategy="pattern", range_min=0.8, range_max=1.2, points=11, budget=600,
                    base_seed=42, width=size, height=size, batch=2 if fam == "flux" else 4,
                    reference_model=fp, objective="match full precision")
    node = QSchedCalibrate()
    with (Card(card) if card else contextlib.nullcontext()):
        for run in ("cold", "warm"):
            if left() < (rec.get("node_cold_s", 0) * 1.2 if run == "warm" else 0):
                rec["skipped_warm"] = f"{left():.0f} s left"
                break
            sync()
            t = time.time()
            with torch.inference_mode():  # as ComfyUI's executor runs a node
                out = node.calibrate(preset_name=f"bench_refcal_{fam}_{run}", **settings)
            sync()
            rec[f"node_{run}_s"] = time.time() - t
            rec[f"summary_{run}"] = out["result"][3]
            rec.update(**held())
            log(key, run, round(rec[f"node_{run}_s"], 2), "s |", out["result"][3].replace("\n", " | ")[:900])
            save()
    del fp, q, vae
    clean()


def run_config(key):
    """One config of --part/--only, guarded by its time estimate (the file write included when still needed)."""
    fam, fmt_key, mode = parts.parse(key)
    fmt, sage = parts.split_attention(fmt_key)

    if mode.startswith("refcal"):
        card = parts.REFCAL_CARD[fam] if mode == "refcal-card" else None
        guarded(f"config {key}", 0 if ARGS.tiny else parts.need_s(key, {fam}))(
            lambda: refcal(key, fam, fmt, card))()
        return

    def go():
        ensure_file(fam)
        loader = core(fam, fp8_fast=fmt == "fp8_fast") if fmt in parts.CORE_FORMATS else pack(fam, fmt)
        measure(parts.display_name(fmt_key), fam, loader, compiled=mode.startswith("compiled"),
                graph=mode.endswith("graph"), key=key, mode=mode, profile=not ARGS.no_profile, fmt=fmt, sage=sage)

    guarded(f"config {key}", 0 if ARGS.tiny else parts.need_s(key, set(FILES)))(go)()


# ------------------------------------------------------------------------------------------------------ cards
class Card(simcard.Card):
    """ComfyUI sees a card of ``gib`` GiB (benchmarks/simcard.py)."""

    def __init__(self, gib):
        super().__init__(gib, clean)


# ------------------------------------------------------------------------------------------------------ sections
@guarded("flux", 150)
def flux_configs():
    measure("core bf16", "flux", core("flux"))
    measure("core fp8_e4m3fn_fast", "flux", core("flux", fp8_fast=True))
    measure("pack w4a8", "flux", pack("flux", "w4a8"))
    measure("pack w8a8-fp8", "flux", pack("flux", "w8a8-fp8"))
    measure("pack w4a8-fp8", "flux", pack("flux", "w4a8-fp8"))
    measure("pack w8a8", "flux", pack("flux", "w8a8"))
    for q in ("Q8_0", "Q4_0"):
        if f"flux_{q}" in FILES:
            measure(f"GGUF {q}", "flux", gguf(q))
            clean()
            os.remove(FILES.pop(f"flux_{q}"))  # disk: the device has 64 GiB for all files


@guarded("prequant", 60)
def prequant():
    clean()
    q, _, _, _ = load_quantized(FILES["flux"], "w4a8")
    path = os.path.join(ARGS.work, "flux_w4a8_qsched.safetensors")
    t = time.time()
    size = save_quantized(q, path)
    R["files"]["flux_w4a8_prequant"] = {"bytes": size, "write_s": time.time() - t}
    del q
    clean()
    FILES["flux_w4a8_file"] = path
    measure("pack w4a8 (pre-quantized file)", "flux", lambda: load_quantized(path, "w4a8")[0])


@guarded("cards", 120)
def cards():
    pre = FILES.get("flux_w4a8_file")
    if "flux" in FILES:
        with Card(12):
            measure("core bf16", "flux", core("flux"), card=12)
            measure("core fp8_e4m3fn_fast", "flux", core("flux", fp8_fast=True), card=12)
            measure("pack w4a8" + (" (pre-quantized file)" if pre else ""), "flux",
                    (lambda: load_quantized(pre, "w4a8")[0]) if pre else pack("flux", "w4a8"), card=12)
            measure("pack w8a8-fp8", "flux", pack("flux", "w8a8-fp8"), card=12)
    if "sdxl" in FILES:
        with Card(6):
            measure("core fp16", "sdxl", core("sdxl"), card=6)
            measure("pack w4a8", "sdxl", pack("sdxl", "w4a8"), card=6)
            measure("pack w8a8", "sdxl", pack("sdxl", "w8a8"), card=6)
            measure("pack w8a8-fp8", "sdxl", pack("sdxl", "w8a8-fp8"), card=6)


@guarded("scenarios", 90)
def scenarios():
    """Quantize Model on an already-loaded FLUX, and two Quantize Model results alternating with the original."""
    clean()
    base = comfy.sd.load_diffusion_model(FILES["flux"])
    y0, _ = sample(base, "flux")
    before = held()
    t = time.time()
    q4, _ = quantize_comfy_model(base, "w4a8")
    quant_s = time.time() - t
    y4, _ = sample(q4, "flux")
    after_q4 = held()
    q8, _ = quantize_comfy_model(base, "w8a8-fp8")
    seq, ok = [], True
    ref = {"base": y0, "q4": y4}
    for name, m in (("q8", q8), ("base", base), ("q4", q4), ("q8", q8), ("base", base)):
        y, dt = sample(m, "flux")
        same = bool(torch.equal(y, ref[name])) if name in ref else None
        ref.setdefault(name, y)
        ok = ok and same is not False
        seq.append({"run": name, "same_as_first": same, "s": dt, **held()})
    R["scenarios"]["quantize_loaded_flux"] = {"quantize_s": quant_s, "held_before": before, "held_after_q4": after_q4,
                                              "sizes": {"base": base.model_size(), "q4": q4.model_size(),
                                                        "q8": q8.model_size()}}
    R["scenarios"]["clones_alternating"] = {"all_repeats_identical": ok, "sequence": seq}
    log("scenarios", R["scenarios"]["quantize_loaded_flux"], ok)
    del base, q4, q8
    clean()


@guarded("sdxl", 60)
def sdxl_configs():
    measure("core fp16", "sdxl", core("sdxl"))
    measure("core fp8_e4m3fn_fast", "sdxl", core("sdxl", fp8_fast=True))
    for fmt in ("w4a8", "w8a8", "w8a8-fp8", "w4a8-fp8"):
        measure(f"pack {fmt}", "sdxl", pack("sdxl", fmt))


# The first run's compile / fast-path sections as config keys (its order); --part A/B are the newer, split lists.
COMPILE = ["sdxl/w4a8/compiled", "sdxl/w8a8-fp8/compiled", "sdxl/w8a8/compiled", "flux/w4a8/compiled",
           "flux/w8a8-fp8/compiled", "sdxl/fp16/compiled", "flux/bf16/compiled", "flux/w8a8/compiled",
           "sdxl/w4a8-fp8/compiled", "flux/w4a8-fp8/compiled"]
FASTPATH = ["sdxl/fp16/compiled+graph", "sdxl/fp16/graph", "sdxl/w8a8-fp8/compiled+graph",
            "sdxl/w4a8-fp8/compiled+graph", "flux/bf16/compiled+graph", "flux/w8a8-fp8/compiled+graph",
            "flux/w4a8-fp8/compiled+graph"]


def compile_all():
    """ComfyUI's TorchCompileModel wrapper (inductor) on each config, as long as time allows."""
    for key in parts.select(None, ",".join(COMPILE), SKIP):
        if key.split("/")[0] in FILES:
            run_config(key)


def fastpath_all():
    for key in parts.select(None, ",".join(FASTPATH), SKIP):
        if key.split("/")[0] in FILES:
            run_config(key)


@guarded("gguf_only")
def gguf_only():
    """A second, short run: the GGUF rows beside core bf16 (the first run could not import ComfyUI-GGUF)."""
    from gguf_files import write_gguf

    sd = random_state_dict(flux_model("meta"), torch.bfloat16, 5)
    for q in ("Q8_0", "Q4_0"):
        t = time.time()
        FILES[f"flux_{q}"] = os.path.join(ARGS.work, f"flux_{q}.gguf")
        R["files"][f"flux_{q}"] = {"bytes": write_gguf(FILES[f"flux_{q}"], sd, q, "flux", device=DEV),
                                  "write_s": time.time() - t}
    for q in ("Q8_0", "Q4_0"):
        measure(f"GGUF {q}", "flux", gguf(q))
    measure("core bf16 (state dict in memory)", "flux", lambda: comfy.sd.load_diffusion_model_state_dict(sd))


if __name__ == "__main__" and ARGS.gguf_only:
    OUT = OUT.replace(".json", "_gguf.json")
    gguf_only()
    R["total_s"] = time.time() - T0
    save()
    log("done", OUT)
elif __name__ == "__main__" and PART:
    log("device", R["gpu"], torch.__version__, "part", PART, KEYS)
    if CUDA:
        import shutil

        R["disk_free_gib"] = shutil.disk_usage(ARGS.work).free / GiB
    for k in KEYS:
        run_config(k)
    R["total_s"] = time.time() - T0
    save()
    log("done", OUT)
elif __name__ == "__main__":
    log("device", R["gpu"], torch.__version__)
    if CUDA:
        import shutil

        R["disk_free_gib"] = shutil.disk_usage(ARGS.work).free / GiB
    write_files()
    if "flux" in FILES:
        flux_configs()
        prequant()
        scenarios()
    cards()
    if "sdxl" in FILES:
        sdxl_configs()
    if "fastpath" not in SKIP:  # before compile_all: the real-time acceptance configs first
        fastpath_all() if not ARGS.tiny else run_config("sdxl/fp16/graph")
    if not ARGS.tiny and "compile" not in SKIP:
        compile_all()
    R["total_s"] = time.time() - T0
    save()
    log("done", OUT)
