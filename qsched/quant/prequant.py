"""Pre-quantized diffusion-model files: one safetensors file with codes, scales, the format and the skip list.

Layout (format_version 1). For every quantized Linear ``L`` (names as in ComfyUI's diffusion model):
``L.qweight`` (int8 codes; 4-bit codes packed two per byte as uint8; or float8_e4m3fn), ``L.weight_scale``
(float32 per output channel, or float16 per group of ``group_size`` inputs), optional ``L.weight_sum`` (int32,
asymmetric int8 activations), ``L.weight_exp`` (int8 group exponents of w4a8-fp8) and ``L.bias``. Every other
tensor is stored as in the source (16 bit). The header metadata (strings) holds ``qsched.format_version``,
``qsched.arch`` (ComfyUI model config class), ``qsched.layers`` (JSON: {L: {"format", "group_size", "shape",
"dtype"}}), ``qsched.skip`` (JSON list), ``qsched.spec``, ``qsched.source_sha256`` and ``qsched.source_name``.

The codes are *not* stored under ``L.weight``: ComfyUI detects the architecture from weight shapes, and packed
4-bit codes have half the columns. The loader hands ComfyUI a meta-device placeholder of the original shape and
dtype under ``L.weight`` (no memory), and the layer reads ``L.qweight``. Pure torch + safetensors; no ComfyUI.
"""

from __future__ import annotations

import json
import os

import torch

from .._io import atomic_write, brief

FORMAT_VERSION = "1"
KEY = "qsched.format_version"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_metadata(path: str) -> dict | None:
    """The ``qsched.*`` header entries of a safetensors file, or None for a file written by someone else.
    ValueError (naming the file) for a file that is not readable safetensors."""
    if not str(path).lower().endswith((".safetensors", ".sft")):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
        raise ValueError(f"{os.path.basename(path)} is not a readable safetensors file ({exc}): the file is "
                         "corrupt or truncated; copy it again or re-create it") from None
    if KEY not in meta:
        return None
    if meta[KEY] != FORMAT_VERSION:
        raise ValueError(f"{os.path.basename(path)}: pre-quantized format version {meta[KEY]!r}, this pack reads "
                         f"{FORMAT_VERSION!r}; re-create the file with this version (qsched quantize)")
    try:
        meta["layers"] = json.loads(meta["qsched.layers"])
        meta["skip"] = json.loads(meta.get("qsched.skip", "[]"))
    except (KeyError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{os.path.basename(path)}: damaged qsched header ({brief(exc)}); re-create the file") from None
    _check_header(os.path.basename(path), meta)
    return meta


def _check_header(name: str, meta: dict) -> None:
    """Every field of the header has the type and range the loader relies on (ValueError naming the file, the
    layer and the field)."""
    from .spec import QuantSpec

    def bad(what: str):
        return ValueError(f"{name}: damaged qsched header: {what}; the file was edited or damaged: re-create it "
                          "(qsched quantize)")

    layers, skip = meta["layers"], meta["skip"]
    if not isinstance(layers, dict) or not layers:
        raise bad(f"layers must be a non-empty mapping layer -> entry, got {brief(layers)}")
    if not isinstance(skip, list) or not all(isinstance(x, str) for x in skip):
        raise bad(f"skip must be a list of names, got {brief(skip)}")
    if not isinstance(meta.get("qsched.spec", "w4a8"), str):
        raise bad("spec must be a format name")
    for layer, info in layers.items():
        where = f"layer {brief(layer, 60)}"
        if not isinstance(info, dict):
            raise bad(f"{where}: entry must be a mapping with format, group_size, shape, dtype, got {brief(info)}")
        fmt, group, shape = info.get("format"), info.get("group_size"), info.get("shape")
        if not isinstance(fmt, str):
            raise bad(f"{where}: format missing or not a name ({brief(fmt)})")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise bad(f"{where}: group_size must be null or a positive integer, got {brief(group)}")
        try:
            QuantSpec.parse(fmt, group_size=group)
        except ValueError as exc:
            raise bad(f"{where}: format {brief(fmt)} / group_size {brief(group)} ({brief(str(exc), 200)})") from None
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1 << 20 for x in shape)):
            raise bad(f"{where}: shape must be [out_features, in_features] (positive integers), got {brief(shape)}")
        if info.get("dtype") not in _DTYPES:
            raise bad(f"{where}: dtype must be one of {', '.join(_DTYPES)}, got {brief(info.get('dtype'))}")


def expected_tensors(fmt: str, group_size: int | None, n: int, k: int) -> dict:
    """{tensor suffix: (dtype, shape)} a layer of format ``fmt`` (out ``n``, in ``k``) stores: the one rule the
    loader checks every pre-quantized tensor against (``qweight``, ``weight_scale``, ``weight_sum``,
    ``weight_exp``); kept equal to what ``layers.quantize_linear_weight`` writes by a test."""
    from . import qmath
    from .spec import QuantSpec

    spec = QuantSpec.parse(fmt, group_size=group_size)
    groups = 1 if spec.group_size is None else k // spec.group_size
    packed = spec.w_bits <= 4 and k % 2 == 0
    if spec.fp8_folded:
        return {"qweight": (torch.uint8, (n, k // 2)), "weight_scale": (torch.float32, (n, 1)),
                "weight_exp": (torch.int8, (n, groups))}
    codes = torch.uint8 if packed else qmath.FP8 if spec.w_dtype == "fp8" else torch.int8
    grouped = spec.w_dtype != "fp8" and spec.group_size is not None and spec.group_size < k
    scale = torch.float16 if grouped else torch.float32  # one group covering the row: per-channel float32
    out = {"qweight": (codes, (n, k // 2 if packed else k)), "weight_scale": (scale, (n, groups))}
    if not spec.act_symmetric:
        out["weight_sum"] = (torch.int32, (n,))
    return out


def _check_tensors(name: str, layer: str, info: dict, sd: dict) -> None:
    n, k = info["shape"]
    group = info.get("group_size")
    if group is not None and k % group:
        raise ValueError(f"{name}: layer {brief(layer, 60)}: group_size {group} does not divide in_features {k}; "
                         "re-create the file")
    want = expected_tensors(info["format"], group, n, k)
    for suffix, (dtype, shape) in want.items():
        key = f"{layer}.{suffix}"
        t = sd.get(key)
        if t is None:
            if suffix in ("qweight", "weight_scale", "weight_exp"):
                raise ValueError(f"{name}: tensor {key} listed in the header is missing; the file is damaged: "
                                 "re-create it")
            continue
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name}: tensor {key} is {str(t.dtype)[6:]} of shape {tuple(t.shape)}; a "
                             f"{info['format']} layer [{n}, {k}] stores {str(dtype)[6:]} of shape {shape}: the file "
                             "was edited or damaged: re-create it (qsched quantize)")
    bias = sd.get(f"{layer}.bias")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        raise ValueError(f"{name}: tensor {layer}.bias is {str(bias.dtype)[6:]} of shape {tuple(bias.shape)}; "
                         f"expected a float tensor of shape ({n},): re-create the file")


def comfy_state_dict(path: str, meta: dict) -> dict:
    """The tensors of a pre-quantized file as ComfyUI's loader should see them: each quantized layer also gets a
    meta-device ``L.weight`` placeholder of its original shape and dtype (for model detection; no memory).
    Tensors stay memory-mapped. ValueError for a file whose tensors do not match its header."""
    from safetensors import safe_open

    name = os.path.basename(path)
    sd = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except Exception as exc:
        raise ValueError(f"{name}: cannot read its tensors ({exc}); the file is corrupt or truncated: copy it "
                         "again or re-create it") from None
    for layer, info in meta["layers"].items():
        _check_tensors(name, layer, info, sd)
        sd[f"{layer}.weight"] = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")
    return sd


def write(path: str, tensors: dict, layers: dict, *, spec_name: str, arch: str, skip=(), source_sha256: str = "",
          source_name: str = "") -> int:
    """Write the file atomically (``qsched._io.atomic_write``); returns its size in bytes."""
    from safetensors.torch import save_file

    meta = {KEY: FORMAT_VERSION, "qsched.spec": spec_name, "qsched.arch": arch,
            "qsched.layers": json.dumps(layers, sort_keys=True), "qsched.skip": json.dumps(list(skip)),
            "qsched.source_sha256": source_sha256, "qsched.source_name": source_name}
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata=meta))
    return os.path.getsize(path)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def quantize_file(src: str, out: str, spec, *, skip=None, device=None, overwrite: bool = False) -> dict:
    """Pre-quantize a ComfyUI-layout diffusion-model file (a family of ``families``; a full checkpoint's
    ``model.diffusion_model.*`` part) without building the model: every 2-D ``*.weight`` not on the skip list is a
    Linear weight in these layouts and is quantized one tensor at a time (memory: the codes plus one layer).
    ``device``: where the rounding runs. Returns a summary. ValueError (naming the file) for bad input."""
    from safetensors import safe_open

    from .._io import file_sha256
    from . import families
    from .layers import quantize_linear_weight
    from .spec import QuantSpec
    from .swap import COMFY_SKIP, layer_kernel, matching_pattern

    spec = QuantSpec.parse(spec)
    if spec.is_identity or spec.w_dtype in ("nf4", "fp4"):
        raise ValueError(f"format {spec.name!r} cannot be written as a pre-quantized file; allowed: int and fp8 "
                         "formats (w8a8, w8a8-fp8, w4a8, ...)")
    if os.path.exists(out) and os.path.samefile(src, out):
        raise ValueError(f"{out} is the source file itself; the full-precision source is never replaced: choose "
                         "another output name")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; choose another name or pass --overwrite")
    name = os.path.basename(src)
    if read_metadata(src) is not None:
        raise ValueError(f"{name} is already a pre-quantized file; quantize the full-precision file")
    tensors, layers = {}, {}
    with safe_open(src, framework="pt", device="cpu") as f:
        keys = list(f.keys())
        family = families.family_of_keys(keys)
        patterns = tuple(skip if skip is not None else family.patterns if family is not None else COMFY_SKIP)
        prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in keys) else ""
        for k in keys:
            if not k.startswith(prefix):
                continue
            key = k[len(prefix):]
            t = f.get_tensor(k)
            layer, _, attr = key.rpartition(".")
            if attr != "weight" or t.ndim != 2 or not t.is_floating_point() or matching_pattern(layer, patterns):
                tensors[key] = t
                continue
            n, kdim = t.shape
            kernel, group, _ = layer_kernel(spec, "native", kdim, n, False)
            q = quantize_linear_weight(t, spec, kernel, group, device)
            tensors[f"{layer}.qweight"], tensors[f"{layer}.weight_scale"] = q["qweight"], q["wscale"]
            if "wsum" in q:
                tensors[f"{layer}.weight_sum"] = q["wsum"]
            if "wexp" in q:  # w4a8-fp8 group exponents
                tensors[f"{layer}.weight_exp"] = q["wexp"]
            layers[layer] = {"format": spec.name, "group_size": group, "shape": [n, kdim], "dtype": dtype_name(t.dtype)}
    if not layers:
        raise ValueError(f"{name}: no Linear weight found to quantize (is it a ComfyUI-layout diffusion model?)")
    size = write(out, tensors, layers, spec_name=spec.name, arch="", skip=patterns, source_sha256=file_sha256(src),
                 source_name=name)
    return {"layers": len(layers), "bytes": size, "source_bytes": os.path.getsize(src)}
