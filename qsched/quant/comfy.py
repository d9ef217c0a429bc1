"""ComfyUI side: a quantized MODEL that leaves the full-precision one untouched.

``quantize_comfy_model(model_patcher, spec)`` clones the ModelPatcher (clones share the nn.Module), makes a
*structural* copy of ``diffusion_model`` whose parameters and buffers are the original tensors (no weights are
copied), quantizes the copy's Linear layers (new modules; the originals are only read) and installs the copy with
``add_object_patch("diffusion_model", copy)``. ComfyUI swaps it in when the clone is patched and back out after, so
one loaded checkpoint serves every format. Needs no ComfyUI import: it only calls ModelPatcher methods.
"""

from __future__ import annotations

import copy

from torch import nn

from .swap import QuantReport, detect_family, quantize_


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer with ``module``."""
    memo = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def quantize_comfy_model(model_patcher, spec, backend: str = "auto", *, skip=None, extra_skip=(), device=None):
    """-> (quantized ModelPatcher clone, QuantReport). ``device`` defaults to the patcher's load device, so the
    rounding runs on the GPU while the weights stay where ComfyUI keeps them."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    q = shared_copy(diffusion_model)
    if device is None:
        device = getattr(model_patcher, "load_device", None)
    report: QuantReport = quantize_(q, spec, backend, skip=skip, extra_skip=extra_skip,
                                    family=detect_family(diffusion_model), device=device)
    patched = model_patcher.clone()
    patched.add_object_patch("diffusion_model", q)
    return patched, report
