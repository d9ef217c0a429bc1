"""JAQ throughput on a GPU: images/s for both presets at 512² and 1024², full-size scorer architectures with
random weights, saved in the users' formats and loaded through the product's loaders.

    python benchmarks/bench_jaq_gpu.py [--batch 64] [--iters 5] [--out benchmarks/results/jaq_gpu.json]

Architectures: CLIPScore ViT-L/14 (OpenAI), CLIP-IQA RN50 (OpenAI; native resolution), HPSv2 ViT-H-14,
AQ-MAP CLIP-Surgery ViT-B/16. Images are ComfyUI IMAGE batches [B,H,W,3] in 0..1 already on the GPU (as after a
VAE decode); ``--cpu-input`` also times batches that start in host memory. Prompts come from a set of 20 (the
calibration set size), so after the warm-up their text features are cached, as during a calibration search.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"a photo of object {i}: a red car parked next to a small dog on a sunny street" for i in range(20)]


def import_pack():
    """The repository root is the package; import it as ``qsched_pack`` when it is not installed."""
    try:
        importlib.import_module("qsched_pack")
    except ImportError:
        spec = importlib.util.spec_from_file_location("qsched_pack", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["qsched_pack"] = mod
        spec.loader.exec_module(mod)
    from qsched_pack.qsched._compat import ensure_torchvision_importable

    ensure_torchvision_importable()


def save_random_weights(d: Path) -> dict:
    """Random full-size scorers in the users' file formats (fp16 like OpenAI's files)."""
    import open_clip

    out = {}
    for key, arch, fname in [("clipscore", "ViT-L-14-quickgelu", "ViT-L-14.pt"), ("clipiqa", "RN50-quickgelu", "RN50.pt"),
                             ("aqmap", "ViT-B-16-quickgelu", "ViT-B-16.pt")]:
        m = open_clip.create_model(arch, pretrained=None, device="cuda")
        sd = {k: v.half().cpu() for k, v in m.state_dict().items() if k != "attn_mask"}  # OpenAI key layout
        torch.save(sd, d / fname)
        out[key] = d / fname
    m = open_clip.create_model("ViT-H-14", pretrained=None, device="cuda")
    torch.save({"state_dict": {k: v.half().cpu() for k, v in m.state_dict().items()}}, d / "HPS_v2.1_compressed.pt")
    out["hpsv2"] = d / "HPS_v2.1_compressed.pt"
    del m
    torch.cuda.empty_cache()
    return out


def timeit(fn, iters: int) -> float:
    fn()  # warm-up: kernels, cuDNN autotune, text-feature cache
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--cpu-input", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "jaq_gpu.json"))
    args = ap.parse_args()
    import_pack()
    from qsched_pack.calibration.jaq import JAQ

    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        weights = save_random_weights(Path(tmp))
        print(f"wrote random weights in {time.perf_counter() - t0:.1f}s", flush=True)
        for preset in ("clip", "preference"):
            t0 = time.perf_counter()
            jaq = JAQ(preset=preset, weights=weights, device="cuda", dtype=dtype, batch_size=args.batch)
            load_s = time.perf_counter() - t0
            for size in [int(s) for s in args.sizes.split(",")]:
                b = args.batch
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
                places = ["cuda", "cpu"] if args.cpu_input else ["cuda"]
                for place in places:
                    imgs = torch.rand(b, size, size, 3, device=place)
                    if place == "cpu":
                        imgs = imgs.pin_memory()
                    torch.cuda.reset_peak_memory_stats()
                    sec = timeit(partial(jaq.score, imgs, prompts), args.iters)
                    per = {}
                    for name, metric in (("tc", jaq.tc), ("iq", jaq.iq)):
                        per[metric.name] = round(b / timeit(partial(metric, imgs, prompts), args.iters), 1)
                    row = dict(preset=preset, size=size, input=place, batch=b, dtype=args.dtype,
                               images_per_s=round(b / sec, 1), per_metric_images_per_s=per,
                               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                               load_s=round(load_s, 1))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    del imgs
            # accuracy of the half-precision path against fp32 on the same random weights
            ref = JAQ(preset=preset, weights=weights, device="cuda", dtype=torch.float32, batch_size=args.batch)
            imgs = torch.rand(8, 512, 512, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
            lo, hi = jaq.components(imgs, PROMPTS[:8]), ref.components(imgs, PROMPTS[:8])
            check = {k: round(float((lo[k] - hi[k]).abs().max()), 5) for k in (jaq.tc.name, jaq.iq.name)}
            rows.append(dict(preset=preset, check=f"max |{args.dtype} - float32| on 8 images at 512", **check,
                             fp32_values={k: [round(float(v), 4) for v in hi[k]] for k in check}))
            print(json.dumps(rows[-1]), flush=True)
            del jaq, ref
            torch.cuda.empty_cache()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
               command=" ".join(["python"] + sys.argv))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print(json.dumps(env))


if __name__ == "__main__":
    main()
