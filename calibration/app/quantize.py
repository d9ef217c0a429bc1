"""``qsched quantize``: write a pre-quantized diffusion-model file for the Q-Sched ComfyUI loaders
(``qsched.quant.prequant``; docs/quantization.md)."""

from __future__ import annotations

import os

from .args import device_arg


def add_quantize(sub):
    q = sub.add_parser("quantize", help="write a pre-quantized diffusion-model file for the Q-Sched ComfyUI loaders",
                       description="Quantizes the Linear layers of a ComfyUI-layout diffusion model (FLUX, SD1.x/SDXL "
                                   "UNet, or a checkpoint's model.diffusion_model part) tensor by tensor and writes one "
                                   "safetensors file (codes, scales, format, skip list, source sha256) that Q-Sched "
                                   "Diffusion Model Loader loads without a full-precision pass.")
    q.add_argument("source", help="full-precision .safetensors file")
    q.add_argument("out", help="output .safetensors file (e.g. models/diffusion_models/flux1-schnell-w4a8.safetensors)")
    q.add_argument("--format", default="w4a8", help="w8a8, w8a8-fp8, w4a8 (default), w4a6, w4a5, w4a4, w8a16, w4a16")
    q.add_argument("--device", type=device_arg, default=None,
                   help="where the rounding runs (default: cuda if available, else cpu)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    q.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ...qsched.quant.prequant import quantize_file

    if not str(args.source).lower().endswith((".safetensors", ".sft")) or not os.path.isfile(args.source):
        raise ValueError(f"source {args.source!r}: give an existing .safetensors file")
    if not str(args.out).lower().endswith(".safetensors"):
        raise ValueError(f"out {args.out!r}: the output name must end in .safetensors")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = quantize_file(args.source, args.out, args.format, device=device, overwrite=args.overwrite)
    print(f"wrote {args.out}: {r['layers']} Linear layers in {args.format}, {r['bytes'] / 2**30:.2f} GiB "
          f"({r['bytes'] / r['source_bytes']:.2f}x the source)")
    return 0
