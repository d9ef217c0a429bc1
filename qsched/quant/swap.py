"""``quantize_``: swap a model's Linear (and optionally Conv2d) layers for quantized ones, all or nothing."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .families import FAMILIES, comfy_union, family_of_module
from .families import get as get_family
from .layers import BnbLinear, QuantConv2d, QuantLinear
from .spec import QuantSpec

BACKENDS = ("auto", "simulated", "native", "bitsandbytes")

# Layers left in full precision per model family: one table per architecture in ``families`` (with the reason
# for each entry).
DEFAULT_SKIP = {name: f.patterns for name, f in FAMILIES.items()}
# Every ComfyUI family's skip patterns at once: used where a model's layout is not known before it is built
# (pre-quantizing a file, quantizing while ComfyUI loads it); each family's own table is in ``families``.
COMFY_SKIP = comfy_union()


def detect_family(module: nn.Module) -> str:
    return family_of_module(module).name


#: How each kernel runs, in words for the report shown on the loader nodes.
KERNEL_WORDS = {"simulated": "simulated in float32", "int8_mm": "on int8 matmuls", "fp8_mm": "on float8 matmuls",
                "dequant": "unpacked to 16 bit per call", "fp8w4": "4-bit unpacked to float8 matmuls"}


@dataclass
class QuantReport:
    spec: QuantSpec
    backend: str
    family: str
    quantized: dict = field(default_factory=dict)  # name -> kernel ("int8_mm", "bnb-nf4", ...)
    skipped: dict = field(default_factory=dict)  # name -> why it stayed in full precision
    fallbacks: dict = field(default_factory=dict)  # name -> what was changed for this layer and why
    native: dict = field(default_factory=dict)  # name -> ComfyUI-native format it was read from (comfy-kitchen)
    scaled_fp8: int = 0  # layers read from core's scaled fp8 (float8 weight x scale_weight)
    seconds: float = 0.0

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for k in self.quantized.values():
            kinds[k] = kinds.get(k, 0) + 1
        how = ", ".join(f"{n} {KERNEL_WORDS.get(k, k)}" for k, n in sorted(kinds.items()))
        counts = f"{len(self.quantized)} layers quantized" + (f" ({how})" if how else "")
        counts += f", {len(self.skipped)} kept in 16 bit"
        if self.fallbacks:
            counts += f", {len(self.fallbacks)} with a fallback"
        if self.seconds >= 0.05:
            counts += f", in {self.seconds:.1f} s"
        how_loaded = self.family.partition("(")[2].rstrip(")")  # "comfy (pre-quantized file)" -> its words
        lines = [self.spec.describe(), f"{counts}; backend {self.backend}" + (f"; {how_loaded}" if how_loaded else "")]
        if self.native:
            fmts: dict[str, int] = {}
            for f in self.native.values():
                fmts[f] = fmts.get(f, 0) + 1
            lines.append("  read from a ComfyUI-native file (dequantized by comfy-kitchen): "
                         + ", ".join(f"{n} {f}" for f, n in sorted(fmts.items())))
        if self.scaled_fp8:
            lines.append(f"  read from a scaled fp8 file: {self.scaled_fp8} layers (float8 weight x scale_weight)")
        lines += [f"  fallback {n}: {why}" for n, why in self.fallbacks.items()]
        return "\n".join(lines)


def matching_pattern(name: str, patterns) -> str | None:
    """The first pattern that matches a module name (the name itself, a prefix of it, or an fnmatch glob)."""
    return next((p for p in patterns if name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p)), None)


def native_kernel(spec: QuantSpec, k: int, n: int, group: int | None, cuda: bool) -> tuple[str, str | None]:
    """(kernel, reason it is not the fast one or None)."""
    if spec.fp8_folded:
        if cuda and k % 128:
            return "fp8w4", (f"in_features {k} not a multiple of 128 (fused W4A8-FP8 GEMM): float8 weights are "
                             "materialised per call")
        return "fp8w4", None
    if spec.w_dtype == "fp8" and spec.a_dtype == "fp8" and spec.a_bits == 8:
        if cuda and (k % 16 or n % 16):
            return "dequant", f"in/out features {k}/{n} not multiples of 16 (torch._scaled_mm)"
        return "fp8_mm", None
    if spec.w_dtype == "int" and spec.w_bits > 4 and group is None and spec.a_bits <= 8 and spec.a_dtype == "int":
        if cuda and (k % 8 or n % 8):
            return "dequant", f"in/out features {k}/{n} not multiples of 8 (torch._int_mm)"
        return "int8_mm", None
    return "dequant", None


def layer_kernel(spec: QuantSpec, backend: str, in_features: int, out_features: int, cuda: bool):
    """(kernel, group size, fallback reason or None) for one Linear of this shape."""
    group = spec.group_size
    why = None
    if group is not None and in_features % group:
        why = f"in_features {in_features} not a multiple of group_size {group}: one scale per channel"
        group = None
    if backend == "simulated":
        return "simulated", group, why
    kernel, reason = native_kernel(spec, in_features, out_features, group, cuda)
    return kernel, group, reason or why


def check_runnable(spec: QuantSpec, device) -> None:
    """ValueError if ``device`` cannot run the format (float8 activations need an FP8 GPU: Ada / Hopper or newer)."""
    device = torch.device(device) if device is not None else None
    if spec.a_dtype == "fp8" and device is not None and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
            raise ValueError(f"format {spec.name!r} needs a GPU with FP8 tensor cores (compute capability 8.9+: "
                             f"RTX 40xx, L4/L40, H100/H200 or newer); {name} has {cap[0]}.{cap[1]}. Choose w8a8 "
                             "(int8) or w4a8 instead")


def _pick_backend(spec: QuantSpec, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"invalid backend={backend!r}; allowed: {BACKENDS}")
    bnb_formats = "w8a8 (int), w4a<bits>-nf4, w4a<bits>-fp4"
    bnb_ok = (spec.w_dtype in ("nf4", "fp4")) or (
        spec.w_bits == 8 and spec.a_bits == 8 and spec.w_dtype == "int" and spec.a_dtype == "int"
        and spec.act_symmetric and spec.group_size is None)
    if backend == "auto":
        return "bitsandbytes" if spec.w_dtype in ("nf4", "fp4") else "native"
    if backend == "bitsandbytes" and not bnb_ok:
        raise ValueError(f"invalid format={spec.name!r} for backend='bitsandbytes'; allowed: {bnb_formats} "
                         "(bitsandbytes has no int4 weight type: use backend='native' for int4)")
    if backend in ("native", "simulated") and spec.w_dtype in ("nf4", "fp4"):
        raise ValueError(f"invalid format={spec.name!r} for backend={backend!r}; nf4/fp4 need "
                         "backend='bitsandbytes' (allowed: 'auto', 'bitsandbytes')")
    return backend


def quantize_(module: nn.Module, spec: "QuantSpec | str", backend: str = "auto", *, skip=None, extra_skip=(),
              family: str | None = None, device: "torch.device | str | None" = None) -> QuantReport:
    """Quantize ``module`` in place and return a ``QuantReport``.

    ``skip`` replaces the family's default skip list (``DEFAULT_SKIP``), ``extra_skip`` adds to it. ``device`` is
    where the rounding is computed (e.g. "cuda" for a model kept on the CPU); results go back where each weight was.
    Every replacement layer is built before the first one is swapped in, so an error leaves ``module`` as it was.
    """
    t0 = time.perf_counter()
    spec = QuantSpec.parse(spec)
    backend = _pick_backend(spec, backend)
    family = get_family(family).name if family else detect_family(module)
    patterns = tuple(DEFAULT_SKIP[family] if skip is None else skip) + tuple(extra_skip)
    reasons = FAMILIES[family].skip if skip is None else {}
    report = QuantReport(spec, backend, family)
    if spec.is_identity:
        report.seconds = time.perf_counter() - t0
        return report
    device = torch.device(device) if device is not None else None

    plan = []  # (parent, attribute, new module)
    for name, child in module.named_modules():
        if isinstance(child, (QuantLinear, QuantConv2d, BnbLinear)) or type(child).__module__.startswith(
                "bitsandbytes"):
            raise ValueError(f"layer {name!r} is already quantized ({type(child).__name__}); quantize the "
                             "full-precision model (one checkpoint serves every format)")
        if not name:
            continue
        is_linear = isinstance(child, nn.Linear)
        is_conv = isinstance(child, nn.Conv2d) and spec.quantize_conv
        if not (is_linear or is_conv):
            continue
        hit = matching_pattern(name, patterns)
        if hit is not None:
            report.skipped[name] = reasons.get(hit, "skip list")
            continue
        new = _build(name, child, spec, backend, device, report)
        if new is not None:
            parent_name, _, attr = name.rpartition(".")
            plan.append((module.get_submodule(parent_name), attr, new, child))
    if not plan:
        raise ValueError(f"no quantizable layers in {type(module).__name__} (family {family!r}, format {spec.name}): "
                         f"{len(report.skipped)} Linear/Conv2d layers skipped by the skip list {patterns}")
    done = []
    try:
        for parent, attr, new, old in plan:
            setattr(parent, attr, new)
            done.append((parent, attr, old))
    except BaseException:
        for parent, attr, old in reversed(done):
            setattr(parent, attr, old)
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _build(name: str, child: nn.Module, spec: QuantSpec, backend: str, device, report: QuantReport):
    k = child.weight[0].numel()
    n = child.weight.shape[0]
    group = spec.group_size
    if group is not None and k % group:
        if spec.w_dtype in ("nf4", "fp4"):
            report.fallbacks[name] = f"in_features {k} not a multiple of block {group}: simulated int4 per channel"
            fb = QuantSpec(w_bits=4, a_bits=spec.a_bits, act_symmetric=spec.act_symmetric)
            return QuantLinear.from_linear(child, fb, "simulated", None, device)
        report.fallbacks[name] = f"in_features {k} not a multiple of group_size {group}: one scale per channel"
        group = None
    if isinstance(child, nn.Conv2d):
        if child.padding_mode != "zeros":
            report.skipped[name] = f"padding_mode {child.padding_mode!r}"
            return None
        report.quantized[name] = "simulated"
        return QuantConv2d(child, spec, group, device)
    if backend == "bitsandbytes":
        report.quantized[name] = f"bnb-{spec.w_dtype if spec.w_bits == 4 else 'int8'}"
        return BnbLinear.from_linear(child, spec, group, device)
    if backend == "simulated":
        kernel, why = "simulated", None
    else:
        cuda = (device or child.weight.device).type == "cuda"
        kernel, why = native_kernel(spec, k, n, group, cuda)
    if why:
        report.fallbacks[name] = why
    report.quantized[name] = kernel
    return QuantLinear.from_linear(child, spec, kernel, group, device)


# ------------------------------------------------------------------------------------------------ size accounting
def _own_tensors(m: nn.Module):
    """A module's own parameters and buffers, bitsandbytes quantization state included."""
    yield from m.parameters(recurse=False)
    yield from m.buffers(recurse=False)
    w = getattr(m, "weight", None)
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # bnb 4-bit: absmax (double-quantized: int8 absmax + float32 second level) + codebooks
        yield from (qs.absmax, qs.code)
        if qs.state2 is not None:
            yield from (qs.state2.absmax, qs.state2.code)
    scb = getattr(w, "SCB", None)  # bnb int8: per-row scales
    if isinstance(scb, torch.Tensor):
        yield scb


def is_quantizable_layer(m: nn.Module) -> bool:
    """Linear layers, quantized or not (the population of the 'Linear bytes' ratio)."""
    return isinstance(m, (nn.Linear, QuantLinear, BnbLinear))


def weight_bytes(module: nn.Module, *, linear_only: bool = False) -> int:
    """Bytes of every parameter and buffer (codes, scales, zero-point sums, biases, bnb state), each tensor once.

    ``linear_only``: only Linear layers, quantized or left in full precision by the skip list."""
    seen: set[int] = set()
    total = 0
    for m in module.modules():
        if linear_only and not is_quantizable_layer(m):
            continue
        for mod in (m, m.inner) if isinstance(m, BnbLinear) else (m,):
            for t in _own_tensors(mod):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total
