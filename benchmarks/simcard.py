"""A smaller card on a big GPU for ComfyUI's memory manager, the in-process ComfyUI start and the sync/clean steps
between configs (shared by the real-ComfyUI GPU benchmarks).

``enter_comfyui(checkout, cpu)`` before the first ``import comfy.*``: the checkout on sys.path, ComfyUI's own
arguments read (``--cpu`` for the CPU smoke tests, nothing else).

``with Card(24, clean):`` ComfyUI's free/total memory queries answer for a card of 24 GiB and PyTorch's allocator is
capped there (``torch.cuda.set_per_process_memory_fraction``); ``clean`` (unload every model, empty the cache) runs
on exit. Imports ComfyUI (``comfy.model_management``): run inside a ComfyUI process. No-op without CUDA or with
``gib=None``.
"""

from __future__ import annotations

import os
import sys

import torch

GiB = 2 ** 30


def enter_comfyui(checkout: str, cpu: bool, *more_paths: str) -> None:
    """Import ComfyUI from ``checkout`` (and anything in ``more_paths``, e.g. a custom node pack's parent folder) in
    this process, with ComfyUI's argument parser seeing only ``--cpu`` when ``cpu``."""
    sys.argv = [sys.argv[0]] + (["--cpu"] if cpu else [])
    for path in (checkout, *more_paths):
        sys.path.insert(0, os.path.abspath(path))
    import comfy.options

    comfy.options.enable_args_parsing()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clean():
    """Unload every model ComfyUI holds, collect, empty PyTorch's cache."""
    import gc

    import comfy.model_management as mm

    mm.unload_all_models()
    mm.cleanup_models_gc()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Card:
    """ComfyUI sees a card of ``gib`` GiB: its free/total queries answer for it, and PyTorch cannot allocate more."""

    def __init__(self, gib, clean):
        self.gib, self.clean = gib, clean
        self.active = gib is not None and torch.cuda.is_available()

    def __enter__(self):
        if not self.active:
            return self
        import comfy.model_management as mm

        cap = int(self.gib * GiB)
        total = torch.cuda.get_device_properties(0).total_memory
        self.saved = (mm.get_free_memory, mm.get_total_memory, mm.total_vram)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))

        def get_total_memory(dev=None, torch_total_too=False):
            return (cap, cap) if torch_total_too else cap

        def get_free_memory(dev=None, torch_free_too=False):
            st = torch.cuda.memory_stats()
            active, reserved = st["active_bytes.all.current"], st["reserved_bytes.all.current"]
            free_torch = reserved - active
            free_total = max(0, cap - reserved) + free_torch
            return (free_total, free_torch) if torch_free_too else free_total

        mm.get_free_memory, mm.get_total_memory, mm.total_vram = get_free_memory, get_total_memory, cap / 2 ** 20
        return self

    def __exit__(self, *exc):
        if self.active:
            import comfy.model_management as mm

            self.clean()
            mm.get_free_memory, mm.get_total_memory, mm.total_vram = self.saved
            torch.cuda.set_per_process_memory_fraction(1.0)


def random_state_dict(module, dtype, seed, device, keep_fp32=False):
    """normal(0, 1/sqrt(fan_in)) for matrices/kernels, 1 for norm scales, 0 for biases; generated on ``device``,
    returned on the CPU in ``dtype`` (``keep_fp32``: tensors the model builds in float32 stay float32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, p in module.state_dict().items():
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / p[0].numel() ** 0.5
        elif name.endswith("bias"):
            t = torch.zeros(p.shape, device=device)
        else:
            t = torch.ones(p.shape, device=device)
        sd[name] = t.to(p.dtype if keep_fp32 and p.dtype == torch.float32 else dtype).cpu()
    return sd


def timed_sample(model, cond, latent, steps=4):
    """ComfyUI's ``comfy.sample.sample``: euler / simple, cfg 1, seeded noise; -> (float32 latent, seconds)."""
    import time

    import comfy.sample

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    sync()
    t = time.time()
    out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=7,
                              disable_pbar=True)
    sync()
    return out.float(), time.time() - t
