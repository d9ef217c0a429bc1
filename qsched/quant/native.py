"""ComfyUI-native quantized files, both ways, through comfy-kitchen (optional dependency, extra ``[native]``;
ComfyUI 0.38 ships it).

Newer ComfyUI cores (read: 0.38.1, ``comfy/ops.py`` ``_load_quantized_module`` / ``_quantized_weight_state_dict``,
``comfy/quant_ops.py``) load quantized diffusion models whose Linear layers are declared either by a
``<layer>.comfy_quant`` tensor (uint8 bytes of a JSON object, ``{"format": ...}``) or by a safetensors header entry
``_quantization_metadata`` = ``{"layers": {<layer>: {"format": ...}}}``; the tensors of each layer are named as that
loader pops them (``weight`` plus ``weight_scale`` / ``weight_scale_2`` / ``weight_s_rel`` / ``weight_s_channel`` /
``weight_codebook``). The arithmetic of each layout is comfy-kitchen's (``comfy_kitchen.tensor`` layout classes, the
eager backend on a CPU): this module names tensors and parameters and calls comfy-kitchen, it quantizes nothing itself
except by comfy-kitchen's own quantizers.

* ``read_configs(path)``: {layer: config} of a file (empty for a file without markers).
* ``dequantize(config, tensors, shape)``: the float weight of one layer (every format comfy-kitchen can run here).
* ``encode(...)``: the native tensors + marker of one layer of the pack: ``int8_tensorwise`` (per-row scale) for the
  pack's 8-bit int codes is exact (the same codes and scales); ``float8_e4m3fn`` (core: one scale per tensor) and
  ``asym_w4a8_int8`` are made by comfy-kitchen's quantizers from the pack's dequantized weight, so they round again.
"""

from __future__ import annotations

import json
import os

import torch

MARKER = "comfy_quant"
HEADER = "_quantization_metadata"
# the formats this module can dequantize (core 0.38.1's list minus awq_w4a16, which needs a CUDA GEMV)
LOAD_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "asym_w4a8_int8", "convrot_w4a4", "nvfp4",
                "mxfp8")
SAVE_TARGETS = ("int8_tensorwise", "float8_e4m3fn", "asym_w4a8_int8")
PACKED = ("asym_w4a8_int8", "convrot_w4a4", "nvfp4")  # two 4-bit codes per byte: weight [N, K/2]
QDATA = "native_qdata"  # where ``loader_state_dict`` moves a packed weight (``weight`` becomes a placeholder)
_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "weight_s_rel", "weight_s_channel", "weight_codebook",
             "input_scale", MARKER)


def kitchen():
    """comfy_kitchen, or ValueError saying how to install it."""
    try:
        import comfy_kitchen
    except ImportError:
        raise ValueError("ComfyUI-native quantized files need the comfy-kitchen package (ComfyUI 0.38 ships it): "
                         "install it into ComfyUI's Python with `pip install comfy-kitchen==0.2.40`") from None
    return comfy_kitchen


def decode_marker(t: torch.Tensor) -> dict:
    try:
        conf = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        conf = None
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise ValueError("a comfy_quant marker is not a JSON object with a 'format'")
    return conf


def encode_marker(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def header_configs(metadata: dict | None) -> dict:
    """{layer: config} of a ``_quantization_metadata`` header entry (layer names as in the file's keys)."""
    raw = (metadata or {}).get(HEADER)
    if not raw:
        return {}
    try:
        layers = json.loads(raw).get("layers")
    except (ValueError, AttributeError):
        layers = None
    if not isinstance(layers, dict) or not all(isinstance(v, dict) and "format" in v for v in layers.values()):
        raise ValueError(f"the {HEADER} header entry is not {{'layers': {{layer: {{'format': ...}}}}}}")
    return {k: dict(v) for k, v in layers.items()}


def read_configs(path: str) -> dict:
    """{layer: config} of a safetensors file (markers win over the header); {} for a file that is not native.
    ValueError naming the file for malformed markers."""
    if not str(path).lower().endswith((".safetensors", ".sft")):
        return {}
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            out = header_configs(f.metadata())
            for k in f.keys():
                if k.endswith("." + MARKER):
                    out[k[: -len(MARKER) - 1]] = decode_marker(f.get_tensor(k))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}; the file is damaged: download or convert it again") from None
    except Exception as exc:  # safetensors' own error type for a bad header
        raise ValueError(f"{name} is not a readable safetensors file ({exc})") from None
    return out


def strip_prefix(configs: dict, keys) -> dict:
    """Layer names of ``configs`` relative to the diffusion model (``model.diffusion_model.`` removed where the
    file's keys carry it, as core's loader does)."""
    for pre in ("model.diffusion_model.", "diffusion_model."):
        if any(k.startswith(pre) for k in keys):
            return {(k[len(pre):] if k.startswith(pre) else k): v for k, v in configs.items()}
    return dict(configs)


def _params(conf: dict) -> dict:
    p = conf.get("params")
    return p if isinstance(p, dict) else {}


def _opt(conf, key, default):
    return conf.get(key, _params(conf).get(key, default))


def dequantize(conf: dict, tensors: dict, shape, dtype=torch.float32, layer: str = "") -> torch.Tensor:
    """The float weight [N, K] of one native layer. ``tensors``: its tensors by suffix (``weight``,
    ``weight_scale``, ...). ValueError naming the layer for an unknown format or missing tensors."""
    ck = kitchen()
    from comfy_kitchen import tensor as ckt

    fmt = conf.get("format")
    shape = tuple(int(s) for s in shape)

    def need(*names):
        missing = [n for n in names if tensors.get(n) is None]
        if missing:
            raise ValueError(f"layer {layer!r} ({fmt}): tensors {missing} missing")
        return [tensors[n] for n in names]

    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        q, s = need("weight", "weight_scale")
        want = torch.float8_e4m3fn if fmt == "float8_e4m3fn" else torch.float8_e5m2
        q = q.view(want) if q.dtype == torch.uint8 else q
        w = ckt.TensorCoreFP8Layout.dequantize(q, ckt.TensorCoreFP8Layout.Params(
            scale=s.float(), orig_dtype=torch.float32, orig_shape=shape))
    elif fmt == "int8_tensorwise":
        q, s = need("weight", "weight_scale")
        w = ckt.TensorWiseINT8Layout.dequantize(q, ckt.TensorWiseINT8Layout.Params(
            scale=s.float(), orig_dtype=torch.float32, orig_shape=shape, convrot=bool(_opt(conf, "convrot", False)),
            convrot_groupsize=int(_opt(conf, "convrot_groupsize", 256))))
    elif fmt == "asym_w4a8_int8":
        q, s_rel = need("weight", "weight_s_rel")
        s_rel = s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel
        w = ck.dequantize_w4a8_int8_weight(q, s_rel, need("weight_s_channel")[0], tensors.get("weight_codebook"),
                                           None, group_size=int(_opt(conf, "group_size", 16)),
                                           convrot_groupsize=int(_opt(conf, "convrot_groupsize", 256)),
                                           output_dtype=torch.float32)
    elif fmt == "convrot_w4a4":
        q, s = need("weight", "weight_scale")
        w = ck.dequantize_convrot_w4a4_weight(q, s, convrot_groupsize=int(_opt(conf, "convrot_groupsize", 256)),
                                              quant_group_size=64, output_dtype=torch.float32)
    elif fmt == "nvfp4":
        q, bs, ts = need("weight", "weight_scale", "weight_scale_2")
        w = ckt.TensorCoreNVFP4Layout.dequantize(q, ckt.TensorCoreNVFP4Layout.Params(
            scale=ts.float(), block_scale=bs.view(torch.float8_e4m3fn), orig_dtype=torch.float32, orig_shape=shape))
    elif fmt == "mxfp8":
        q, bs = need("weight", "weight_scale")
        w = ckt.TensorCoreMXFP8Layout.dequantize(q, ckt.TensorCoreMXFP8Layout.Params(
            scale=bs.view(torch.float8_e8m0fnu), orig_dtype=torch.float32, orig_shape=shape))
    else:
        raise ValueError(f"layer {layer!r}: quantization format {fmt!r} cannot be read here; readable: "
                         f"{LOAD_FORMATS}")
    w = w.reshape(shape) if w.numel() == shape[0] * shape[1] else w
    if tuple(w.shape) != shape:
        raise ValueError(f"layer {layer!r} ({fmt}): the tensors give a {tuple(w.shape)} weight where the model "
                         f"has {shape}; the file does not fit this model")
    return w.to(dtype)


def layer_tensors(sd: dict, prefix: str) -> dict:
    """The native tensors of one layer from a state dict (``prefix`` ends with '.')."""
    out = {s: sd[prefix + s] for s in _SUFFIXES if prefix + s in sd}
    if prefix + QDATA in sd:
        out["weight"] = sd[prefix + QDATA]
    return out


def loader_state_dict(path: str, configs: dict) -> dict:
    """The file's tensors (memory-mapped) as ComfyUI's loader should see them: a packed 4-bit layer's codes move to
    ``<layer>.native_qdata`` and ``<layer>.weight`` becomes a meta-device placeholder of the float shape [N, K], so
    ComfyUI's model detection, which reads weight shapes, finds the architecture (newer core reads the shape from
    the layout instead)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    for layer, conf in configs.items():
        q = sd.get(layer + ".weight")
        if conf.get("format") in PACKED and q is not None and q.dim() == 2:
            sd[layer + "." + QDATA] = sd.pop(layer + ".weight")
            sd[layer + ".weight"] = torch.empty((q.shape[0], 2 * q.shape[1]), dtype=torch.bfloat16, device="meta")
    return sd


def target_for(spec, in_features: int) -> str:
    """The native format a layer of the pack's ``spec`` is written in: 8-bit int codes -> int8_tensorwise (exact);
    8-bit float8 -> float8_e4m3fn; 4-bit and narrower -> asym_w4a8_int8 (needs in_features divisible by 256,
    comfy-kitchen's rotation block; otherwise int8_tensorwise)."""
    if spec.w_bits == 8:
        return "float8_e4m3fn" if spec.w_dtype == "fp8" else "int8_tensorwise"
    return "asym_w4a8_int8" if in_features % 256 == 0 else "int8_tensorwise"


def encode(target: str, w: torch.Tensor, *, codes: torch.Tensor | None = None, scale: torch.Tensor | None = None
           ) -> tuple[dict, dict]:
    """({suffix: tensor}, config) of one layer in ``target``. ``w``: the layer's float weight [N, K] (the pack's
    dequantized weight). ``codes`` / ``scale``: the pack's int8 codes [N, K] and per-row scales [N, 1], written as
    they are for int8_tensorwise (exact); without them int8_tensorwise is comfy-kitchen's per-row quantizer."""
    ck = kitchen()
    w = w.detach().float().cpu()
    if target == "int8_tensorwise":
        if codes is None:
            codes, scale = ck.quantize_int8_rowwise(w)
        return {"weight": codes.to(torch.int8).contiguous(), "weight_scale": scale.float().reshape(-1, 1)}, \
            {"format": target}
    if target == "float8_e4m3fn":
        s = (w.abs().amax() / torch.finfo(torch.float8_e4m3fn).max).clamp_min(1e-12).float()
        return {"weight": ck.quantize_per_tensor_fp8(w, s), "weight_scale": s.reshape(())}, {"format": target}
    if target == "asym_w4a8_int8":
        q, s_rel, s_channel, _corr, codebook = ck.quantize_w4a8_int8_weight(w)
        out = {"weight": q, "weight_s_rel": s_rel, "weight_s_channel": s_channel}
        if codebook is not None:
            out["weight_codebook"] = codebook
        return out, {"format": target, "group_size": 16, "convrot_groupsize": 256}
    raise ValueError(f"cannot write native format {target!r}; allowed: {SAVE_TARGETS}")
