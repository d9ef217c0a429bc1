"""ComfyUI custom operations that create every Linear quantized while its weights stream in.

``make_ops(spec)`` returns an operations class for ``model_options["custom_operations"]`` (the extension point
ComfyUI-GGUF and the NF4 pack use): ComfyUI builds the diffusion model with it, and each Linear's
``_load_from_state_dict`` turns the one weight it is handed into codes + scales, so the full-precision model never
exists at once. The classes subclass ComfyUI's own ``comfy.ops`` classes, so they are built lazily (this module
imports no ``comfy`` at import time).

What ComfyUI's memory manager sees (comfy/model_patcher.py, 0.3.64):
* codes (``weight``: int8, packed int4 as uint8, or float8), ``weight_scale`` [, ``weight_sum`` or the w4a8-fp8
  group exponents ``weight_exp``] and ``bias`` are
  frozen ``nn.Parameter``s: ``model_size()`` / ``module_size()`` count the real bytes, full loads move them, and
  partial (lowvram) loading streams them per call through ``forward_comfy_cast_weights`` like core layers;
* LoRA and other weight patches go through ``convert_weight`` / ``set_weight`` (the hooks core's scaled-fp8 layers
  use): the codes are dequantized, the patch is added in float32, and the result is rounded back with the layer's
  existing scales. Keeping the scales means ComfyUI's backup of ``weight`` restores the layer exactly on unpatch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..qsched.quant import families, native, qmath
from ..qsched.quant.layers import (dequantize, frozen_param, quant_linear, quantize_linear_weight,
                                   requantize_with_scales)
from ..qsched.quant.spec import QuantSpec
from ..qsched.quant.swap import QuantReport, check_runnable, layer_kernel, matching_pattern

COMFY_BACKENDS = ("auto", "native", "simulated")


def make_ops(spec, backend: str = "auto", *, skip=None, extra_skip=(), quant_device=None, run_device=None,
             prequantized: dict | None = None, native_layers: dict | None = None, report: QuantReport | None = None,
             family=None):
    """ComfyUI operations class quantizing Linear layers to ``spec`` at load time.

    ``quant_device``: where the rounding runs (e.g. the GPU while the model is loaded to the CPU; results go back to
    where each weight came from). ``run_device``: where the model will run (picks the kernels; None: CPU).
    ``prequantized``: {layer name: {"format", "group_size"}} of a pre-quantized file (codes are read, not computed).
    ``native_layers``: {layer name: config} from a ComfyUI-native file's ``_quantization_metadata`` header (layers
    with a ``<layer>.comfy_quant`` marker tensor are found without it): such a layer's weight is dequantized by
    comfy-kitchen (``native.dequantize``) and then treated as a float weight.
    ``report`` collects what happened to each layer. ``family`` (a ``families.Family``): whose skip table applies
    (None: every ComfyUI family's patterns, ``COMFY_SKIP``); ``skip`` replaces it."""
    import comfy.float
    import comfy.model_management
    import comfy.ops

    from . import comfy_compat

    spec = QuantSpec.parse(spec)
    if backend not in COMFY_BACKENDS:
        raise ValueError(f"invalid backend={backend!r} for load-time quantization; allowed: {COMFY_BACKENDS}")
    if spec.w_dtype in ("nf4", "fp4"):
        raise ValueError(f"format {spec.name!r} (bitsandbytes) cannot be created at load time; allowed: int and "
                         "fp8 formats (w8a8, w8a8-fp8, w4a8, ...)")
    check_runnable(spec, run_device)
    table = {} if skip is not None else family.skip if family is not None else {
        p: why for name in families.COMFY_FAMILIES for p, why in families.FAMILIES[name].skip.items()}
    patterns = tuple(table if skip is None else skip) + tuple(extra_skip)
    cuda = run_device is not None and torch.device(run_device).type == "cuda"
    report = report if report is not None else QuantReport(spec, backend, "comfy")
    base = comfy.ops.disable_weight_init
    cast_to = comfy.model_management.cast_to

    class Linear(base.Linear):
        qsched_spec = None  # QuantSpec of this layer, None: left in 16 bit
        qsched_kernel = None

        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            nn.Module.__init__(self)  # no float weight is allocated: it arrives in _load_from_state_dict
            self.in_features, self.out_features = in_features, out_features
            self.weight = None
            self.bias = None
            self.weight_scale = None
            self.weight_sum = None
            self.weight_exp = None
            self._qsched_dtype, self._qsched_has_bias = dtype, bias

        def reset_parameters(self):
            return None

        def _load_from_state_dict(self, sd, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            name = prefix[:-1]
            bkey = prefix + "bias"
            if bkey in sd:
                b = sd[bkey]
                self.bias = frozen_param(b.to(self._qsched_dtype or b.dtype, copy=True))
            elif self._qsched_has_bias:
                missing_keys.append(bkey)
            if prequantized is not None and name in prequantized:
                self._load_prequantized(sd, prefix, name, prequantized[name])
                return
            w = sd.get(prefix + "weight")
            conf = (native.decode_marker(sd[prefix + native.MARKER]) if prefix + native.MARKER in sd
                    else (native_layers or {}).get(name))
            if conf is not None and w is not None:  # a ComfyUI-native quantized layer: its float weight
                w = native.dequantize(conf, native.layer_tensors(sd, prefix), (self.out_features, self.in_features),
                                      layer=name)
                report.native[name] = conf["format"]
            if w is None or w.is_meta:
                missing_keys.append(prefix + "weight")
                return
            sw = sd.get(prefix + "scale_weight")
            if sw is not None and w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                # core's scaled fp8 file (*_fp8_scaled.safetensors): the weight is float8 codes x scale_weight. (A
                # MODEL from core's loader reaches Quantize Model already converted to float32 by its convert_weight.)
                w = w.float() * sw.float()
                report.scaled_fp8 += 1
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{name}.weight: shape {tuple(w.shape)} != ({self.out_features}, "
                                  f"{self.in_features})")
                return
            hit = None if prequantized is not None else matching_pattern(name, patterns)
            if prequantized is not None or hit is not None:
                self.weight = frozen_param(w.to(self._qsched_dtype or w.dtype, copy=True))
                report.skipped[name] = "16 bit in the file" if prequantized is not None else table.get(hit, "skip list")
                return
            kernel, group, why = layer_kernel(spec, backend, self.in_features, self.out_features, cuda)
            q = quantize_linear_weight(w, spec, kernel, group, quant_device)
            self._set_codes(QuantSpec.parse(spec, group_size=group), kernel, q["qweight"], q["wscale"],
                            q.get("wsum"), q.get("wexp"))
            report.quantized[name] = kernel
            if why:
                report.fallbacks[name] = why

        def _load_prequantized(self, sd, prefix, name, info):
            lspec = QuantSpec.parse(info["format"], group_size=info.get("group_size"))
            check_runnable(lspec, run_device)
            codes, scale = sd.get(prefix + "qweight"), sd.get(prefix + "weight_scale")
            if codes is None or scale is None:
                raise ValueError(f"layer {name!r}: qweight/weight_scale missing")
            k, n = self.in_features, self.out_features
            packed = codes.dtype == torch.uint8
            want = (n, k // 2) if packed else (n, k)
            groups = 1 if lspec.group_size is None else k // lspec.group_size
            want_scale = (n, 1) if lspec.fp8_folded else (n, groups)  # w4a8-fp8: groups are in weight_exp
            if tuple(codes.shape) != want or tuple(scale.shape) != want_scale:
                raise ValueError(f"layer {name!r}: codes {tuple(codes.shape)} / scales {tuple(scale.shape)} do not "
                                 f"fit a Linear({k} -> {n}) in {lspec.name} (expected {want} / {want_scale})")
            kernel, group, _ = layer_kernel(lspec, backend, k, n, cuda)
            if group != lspec.group_size:
                raise ValueError(f"layer {name!r}: group size {lspec.group_size} does not divide {k}")
            wexp = sd.get(prefix + "weight_exp")
            if lspec.fp8_folded and (wexp is None or wexp.dtype != torch.int8 or tuple(wexp.shape) != (n, groups)
                                     or int(wexp.min()) < qmath.FP8W4_EMIN or int(wexp.max()) > qmath.FP8W4_EMAX):
                raise ValueError(f"layer {name!r}: weight_exp (int8 {(n, groups)}, values in [{qmath.FP8W4_EMIN}, "
                                 f"{qmath.FP8W4_EMAX}]) missing or malformed for {lspec.name}")
            self._set_codes(lspec, kernel, codes, scale, sd.get(prefix + "weight_sum"), wexp)
            report.quantized[name] = kernel

        def _set_codes(self, lspec, kernel, codes, scale, wsum, wexp=None):
            self.qsched_spec, self.qsched_kernel = lspec, kernel
            self.weight = frozen_param(codes)
            self.weight_scale = frozen_param(scale)
            if lspec.fp8_folded:
                self.weight_exp = frozen_param(wexp)
            if kernel == "int8_mm" and not lspec.act_symmetric:
                self.weight_sum = frozen_param(codes.sum(1, dtype=torch.int32) if wsum is None else wsum)

        def extra_repr(self):
            fmt = "16 bit" if self.qsched_spec is None else f"{self.qsched_spec.name}, kernel={self.qsched_kernel}"
            return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}"

        # ----------------------------------------------------------------------------------------- forward
        def forward(self, x, *args, **kwargs):
            if self.qsched_spec is None:
                return super().forward(x, *args, **kwargs)
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                return self.forward_comfy_cast_weights(x)
            return quant_linear(x, self.weight, self.weight_scale, self._waux(self.weight_sum, self.weight_exp),
                                self.bias, self.qsched_spec, self.qsched_kernel, self.out_features)

        @staticmethod
        def _waux(wsum, wexp):
            return wsum if wexp is None else wexp

        def forward_comfy_cast_weights(self, x, *args, **kwargs):
            if self.qsched_spec is None:
                return super().forward_comfy_cast_weights(x, *args, **kwargs)
            # Streaming (partial loading; Dynamic VRAM in newer cores): core's own cast fetches the codes and the
            # bias (``comfy_compat.cast_stored``: vbar / offload streams where the core has them). Weight patches (a LoRA
            # while streamed, weight wrappers) apply to the dequantized float32 weight, and the result is rounded
            # with the layer's own scales, as ``set_weight`` does when core merges a LoRA into a loaded layer.
            codes, bias, handle, patches = comfy_compat.cast_stored(self, x)
            try:
                dev = x.device
                nb = comfy.model_management.device_supports_non_blocking(dev)
                scale = cast_to(self.weight_scale, None, dev, non_blocking=nb)
                wsum = None if self.weight_sum is None else cast_to(self.weight_sum, None, dev, non_blocking=nb)
                wexp = None if self.weight_exp is None else cast_to(self.weight_exp, None, dev, non_blocking=nb)
                w = codes
                if patches:
                    wf = dequantize(codes, scale, self.in_features, torch.float32, wexp)
                    for f in patches:
                        wf = comfy_compat.apply_float_patch(f, wf)
                    w = requantize_with_scales(wf, codes, scale, self.qsched_spec, wexp)
                    if wsum is not None:
                        wsum = w.sum(1, dtype=torch.int32)
                return quant_linear(x, w, scale, self._waux(wsum, wexp), bias, self.qsched_spec, self.qsched_kernel,
                                    self.out_features)
            finally:
                comfy_compat.release(self, codes, bias, handle)

        # ----------------------------------------------------------------------------------------- patches
        def convert_weight(self, weight, inplace=False, **kwargs):
            """ComfyUI hands a float32 copy of the stored ``weight``: for a quantized layer, the codes."""
            if self.qsched_spec is None:
                return weight
            codes = weight.to(self.weight.dtype)  # code values are exact in float32
            wexp = None if self.weight_exp is None else self.weight_exp.to(weight.device)
            return dequantize(codes, self.weight_scale.to(weight.device), self.in_features, torch.float32, wexp)

        def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            if self.qsched_spec is None:
                new = comfy.float.stochastic_rounding(weight, self.weight.dtype, seed=seed)
            else:
                new = requantize_with_scales(weight, self.weight, self.weight_scale, self.qsched_spec, self.weight_exp)
            if return_weight:
                return new
            if inplace_update:
                self.weight.data.copy_(new)
            else:
                self.weight = frozen_param(new)

    class QSchedOps(base):
        pass

    QSchedOps.Linear = Linear
    QSchedOps.qsched_report = report
    return QSchedOps


def quantized_layers(module: nn.Module):
    """(name, layer) of every Linear created quantized by ``make_ops``."""
    for name, m in module.named_modules():
        if getattr(m, "qsched_spec", None) is not None and hasattr(m, "weight_scale"):
            yield name, m
