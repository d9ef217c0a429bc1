"""The one place where the pack's code depends on which ComfyUI core runs it (a ComfyUI adapter, beside the other
adapters of quantized models: nodes/quant_ops.py, nodes/quant_model.py).

Every other module calls ComfyUI names that are the same in the two cores the pack is checked against (the table
"ComfyUI versions" in docs/comfyui.md lists each name the pack uses, in both):

* **0.3.64** (commit a125cd84): verified by execution here (tests, the real server, the browser suite);
* **0.38.1** (Comfy-Org/ComfyUI as read: ``comfy/ops.py`` @0271a469, ``comfy/model_patcher.py`` @08d0e510,
  ``comfy/sd.py`` @033046cc, ``comfyui_version.py`` @20ca544e): verified by reading, and by tests that run this
  module's newer-core branches on 0.3.64 against stand-ins of the newer API (tests/test_compat.py,
  tests/comfy_quant_checks.py).

Where they differ, this module has one function with one branch per core, named by the version whose behaviour it
follows. The branches are chosen by feature (a parameter, an attribute), never by a version string, so a core in
between takes whichever behaviour it already has. Imports ComfyUI only inside functions.
"""

from __future__ import annotations

import inspect

import torch

_CAST_API: dict = {}


def _cast_takes_offloadable(cast_bias_weight) -> bool:
    """0.38.1: ``cast_bias_weight(s, input, dtype, device, bias_dtype, offloadable=False, compute_dtype=None,
    want_requant=False)`` returns (weight, bias, handle) when offloadable and wants ``uncast_bias_weight`` after
    the last use (async offload streams; Dynamic VRAM's vbar streaming). 0.3.64: (weight, bias), nothing after."""
    key = id(cast_bias_weight)
    if key not in _CAST_API:
        _CAST_API.clear()
        _CAST_API[key] = "offloadable" in inspect.signature(cast_bias_weight).parameters
    return _CAST_API[key]


def weight_patches(layer) -> list:
    """The functions core attached to a streamed layer's ``weight``, in the order core applies them.

    0.3.64 / 0.38.1 classic patcher: ``layer.weight_function`` (a LoRA as ``LowVramPatch``, plus weight wrappers).
    0.38.1 Dynamic VRAM (``ModelPatcherDynamic``): a LoRA is ``layer.weight_lowvram_function`` (applied before the
    ``weight_function`` wrappers)."""
    lowvram = getattr(layer, "weight_lowvram_function", None)
    return ([lowvram] if lowvram is not None else []) + list(getattr(layer, "weight_function", ()))


def apply_float_patch(fn, w: torch.Tensor) -> torch.Tensor:
    """One patch function on a float32 weight. A LoRA (core's ``LowVramPatch``: ``.patches[.key]``) is computed here
    with ``comfy.lora.calculate_weight`` in float32, because the patch object itself changed meaning: 0.3.64's
    converts the stored weight with the layer's ``convert_weight`` and rounds back with ``set_weight`` (it expects
    codes), 0.38.1's adds the patch to whatever tensor it is handed (it expects the float weight). Other functions
    (weight wrappers) take and return the float weight in both."""
    patches, key = getattr(fn, "patches", None), getattr(fn, "key", None)
    if isinstance(patches, dict) and key in patches:
        import comfy.lora

        return comfy.lora.calculate_weight(patches[key], w, key, intermediate_dtype=torch.float32)
    return fn(w)


def cast_stored(layer, x: torch.Tensor):
    """(stored weight, bias in ``x``'s dtype, handle, weight patches): the layer's ``weight`` exactly as stored
    (codes) and its bias on ``x``'s device, fetched through core's own cast so that core's offload machinery
    streams them; the weight patches (``weight_patches``) are returned for the caller to apply to the dequantized
    weight, because core would apply them to the codes. Bias patches are applied by core (the bias is a float
    tensor in both versions). Call ``release`` after the last use of the tensors.

    0.38.1: ``cast_bias_weight(..., offloadable=True)``: Dynamic VRAM serves the codes from its vbar (resident after
    the first call, evicted under memory pressure) and the classic patcher copies them on an offload stream.
    0.3.64: ``cast_bias_weight`` (copy on the offload stream, synchronized before it returns)."""
    import comfy.ops

    patches = weight_patches(layer)
    own = {k: layer.__dict__[k] for k in ("weight_lowvram_function", "weight_function") if k in layer.__dict__}
    if patches:  # hidden from core for the duration of the cast (restored below, also on error)
        layer.weight_lowvram_function = None
        layer.weight_function = []
    try:
        cast = comfy.ops.cast_bias_weight
        dtype = layer.weight.dtype
        if _cast_takes_offloadable(cast):
            w, b, handle = cast(layer, x, dtype=dtype, bias_dtype=x.dtype, offloadable=True)
        else:
            (w, b), handle = cast(layer, x, dtype=dtype, bias_dtype=x.dtype), None
    finally:
        if patches:
            for k in ("weight_lowvram_function", "weight_function"):
                layer.__dict__.pop(k, None)
            layer.__dict__.update(own)
    return w, b, handle, patches


def release(layer, weight, bias, handle) -> None:
    """0.38.1: ``uncast_bias_weight`` (the offload stream may reuse the buffers); 0.3.64: nothing to do."""
    if handle is not None:
        import comfy.ops

        comfy.ops.uncast_bias_weight(layer, weight, bias, handle)


def model_patcher_class():
    """The patcher core's own loaders use. 0.38.1: ``comfy.model_patcher.CoreModelPatcher`` (main.py sets it to
    ``ModelPatcherDynamic`` where Dynamic VRAM is on; that class hands CPU load devices to the classic patcher).
    0.3.64: ``ModelPatcher`` (no CoreModelPatcher)."""
    import comfy.model_patcher

    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def is_dynamic(model_patcher) -> bool:
    """0.38.1: ``ModelPatcher.is_dynamic()`` (True for ModelPatcherDynamic: weights stream per call from the vbar,
    ``model_lowvram`` stays False). 0.3.64: no such method, never dynamic."""
    fn = getattr(model_patcher, "is_dynamic", None)
    return bool(fn()) if callable(fn) else False
