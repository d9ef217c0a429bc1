"""ComfyUI side: quantized MODELs that ComfyUI's memory manager sees as what they are.

* ``load_quantized(path, spec)``: a checkpoint / diffusion-model file loaded by ComfyUI's own loader with
  ``model_options["custom_operations"] = make_ops(spec)``: every Linear is quantized as its weight streams in
  (no full-precision model in RAM or VRAM), or read from a pre-quantized file (``prequant``).
* ``quantize_comfy_model(model_patcher, spec)``: any MODEL (core, GGUF, with LoRA patches) -> a **new** model object
  (its own BaseModel + ModelPatcher) built with the same operations, filled layer by layer from the source's weights
  (dequantized and patched where needed). It shares no tensor, patch list, uuid or cached size with the source, so
  ComfyUI accounts, loads and evicts the two independently and any number of them alternate with the original.
  (An object patch swapping ``diffusion_model`` is unsound in ComfyUI's patcher: it inherits the parent's size,
  ``patches_uuid`` and backups, and keeps the full-precision tree loaded.)
* ``save_quantized(model_patcher, path)``: the pre-quantized file of a MODEL made by either.

Imports ComfyUI only inside functions.
"""

from __future__ import annotations

import copy
import json
import os
import weakref

import torch

from ..qsched._io import atomic_write, file_sha256
from ..qsched.quant import families, native, prequant
from ..qsched.quant.spec import QuantSpec
from ..qsched.quant.swap import COMFY_SKIP, QuantReport
from .quant_ops import make_ops, quantized_layers


def _devices():
    import comfy.model_management as mm

    run = mm.get_torch_device()
    return run, (run if torch.device(run).type == "cuda" else None)


def _file_family(path: str):
    """The family of a safetensors file from its header (no tensor is read); None when unknown or unreadable (the
    load that follows reports a bad file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return families.family_of_keys(f.keys())
    except (OSError, ValueError, SafetensorError):  # not safetensors, or damaged: ComfyUI's load names the problem
        return None


def _no_layer_error(name: str, model_patcher, report: QuantReport, family) -> ValueError:
    """Why nothing was quantized, naming the layer types that hold the model's weights and what to do (one error,
    no traceback)."""
    held: dict[str, int] = {}
    dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    for m in (dm.modules() if dm is not None else ()):
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n:
            held[type(m).__name__] = held.get(type(m).__name__, 0) + n
    total = sum(held.values()) or 1
    top = sorted(held.items(), key=lambda kv: -kv[1])[:2]
    kinds = ", ".join(f"{k} ({100 * v / total:.0f} % of the weights)" for k, v in top) or "no layers"
    fam = f"family {family.name}" if family is not None else "an unrecognised layout"
    kept = (f"; its {len(report.skipped)} Linear layers are all ones the skip table keeps in 16 bit (embedders, "
            "global modulation, final layer)") if report.skipped else ""
    return ValueError(f"{name}: nothing to quantize in this model ({fam}, {type(dm).__name__}): its weights are in "
                      f"{kinds}, and the pack quantizes only Linear layers built through ComfyUI's operations{kept}. "
                      "Load it with the core loader (Load Diffusion Model / Load Checkpoint) instead")


def _finish(model_patcher, report: QuantReport, source: dict):
    """Manual-cast models (16-bit weights computed in another dtype) need ComfyUI's casting path everywhere."""
    base = model_patcher.model
    if getattr(base, "manual_cast_dtype", None) is not None:
        for m in base.diffusion_model.modules():
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = True
    base.qsched_source = source
    base.qsched_report = report
    return model_patcher


def load_quantized(path: str, spec, backend: str = "auto", *, checkpoint: bool = False, embedding_directory=None,
                   skip=None, extra_skip=()):
    """-> (MODEL, CLIP or None, VAE or None, QuantReport). ValueError (message names the file) for bad files."""
    import comfy.sd

    run_device, quant_device = _devices()
    name = os.path.basename(path)
    meta = prequant.read_metadata(path)
    if meta is not None:
        if checkpoint:
            raise ValueError(f"{name} is a pre-quantized diffusion model (no text encoder / VAE): load it with "
                             "Q-Sched Diffusion Model Loader (quantized)")
        spec = QuantSpec.parse(meta.get("qsched.spec", "w4a8"))
        report = QuantReport(spec, backend, "comfy (pre-quantized file)")
        sd = prequant.comfy_state_dict(path, meta)
        ops = make_ops(spec, backend, run_device=run_device, prequantized=meta["layers"], report=report)
        try:
            model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})
        except (RuntimeError, ValueError) as exc:  # shapes in the file that do not fit the detected model
            raise ValueError(f"{name} does not fit the model ComfyUI detected from it ({str(exc)[:300]}); the "
                             "file is damaged or was edited: re-create it") from None
        if model is None:
            raise ValueError(f"{name}: ComfyUI cannot detect the model type of this pre-quantized file")
        arch = type(model.model.model_config).__name__
        missing = sorted(set(meta["layers"]) - set(report.quantized))
        if missing or (meta.get("qsched.arch") and meta["qsched.arch"] != arch):
            raise ValueError(f"{name} was written for {meta.get('qsched.arch')!r} but ComfyUI built {arch!r} "
                             f"({len(missing)} quantized layers without a place, e.g. {missing[:3]}); use the file "
                             "with the model it was made from, or re-create it from that model")
        return _finish(model, report, {"path": path, "sha256": meta.get("qsched.source_sha256", ""),
                                       "name": meta.get("qsched.source_name", name)}), None, None, report
    spec = QuantSpec.parse(spec)
    family = _file_family(path)
    report = QuantReport(spec, backend, f"{family.name if family else 'comfy'} (quantized while loading)")
    configs = native.read_configs(path)  # a ComfyUI-native quantized file: comfy-kitchen dequantizes its layers
    sd = None
    if configs:
        native.kitchen()
        sd = native.loader_state_dict(path, configs)
    ops = make_ops(spec, backend, skip=skip, extra_skip=extra_skip, quant_device=quant_device,
                   run_device=run_device, native_layers=native.strip_prefix(configs, sd or ()) or None, report=report,
                   family=family)
    clip = vae = None
    if checkpoint:
        opts = dict(output_vae=True, output_clip=True, embedding_directory=embedding_directory,
                    model_options={"custom_operations": ops})
        out = (comfy.sd.load_checkpoint_guess_config(path, **opts) if sd is None else
               comfy.sd.load_state_dict_guess_config(sd, **opts))
        model, clip, vae = out[:3] if out is not None else (None, None, None)
        if model is None:
            raise ValueError(f"{name}: ComfyUI found no diffusion model in this file")
    elif sd is None:
        model = comfy.sd.load_diffusion_model(path, model_options={"custom_operations": ops})
    else:
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})
        if model is None:
            raise ValueError(f"{name}: ComfyUI cannot detect the model type of this ComfyUI-native quantized file")
    if not report.quantized:
        raise _no_layer_error(name, model, report, family)
    return _finish(model, report, {"path": path, "sha256": "", "name": name}), clip, vae, report


def _source_tensor(model_patcher, src_module, full_key: str, attr: str):
    """One float tensor of the source model as it would run: dequantized (GGUF, scaled fp8) and with the MODEL's
    weight patches (LoRA) applied."""
    import comfy.lora
    import comfy.model_patcher

    t = getattr(src_module, attr)
    get_weight = getattr(src_module, "get_weight", None)
    if callable(get_weight) and attr in ("weight", "bias"):  # ComfyUI-GGUF layers: dequantize
        t = get_weight(t, torch.float32)
    elif attr == "weight":
        _, _, convert = comfy.model_patcher.get_key_weight(model_patcher.model, full_key)
        if convert is not None:  # core scaled fp8 (or a quantized layer): float32 weight
            t = convert(t.to(torch.float32, copy=True), inplace=True)
    patches = model_patcher.patches.get(full_key)
    if patches:
        t = comfy.lora.calculate_weight(patches, t.to(torch.float32, copy=True), full_key)
    return t


def quantize_comfy_model(model_patcher, spec, backend: str = "auto", *, skip=None, extra_skip=(), device=None):
    """-> (new quantized ModelPatcher, QuantReport); the input MODEL is not modified (see module doc)."""
    import comfy.patcher_extension

    from . import comfy_compat

    src = model_patcher.model
    src_dm = src.diffusion_model
    if any(True for _ in quantized_layers(src_dm)):
        raise ValueError("this MODEL is already quantized by Q-Sched; quantize the full-precision MODEL (one "
                         "checkpoint serves every format)")
    spec = QuantSpec.parse(spec)
    run_device = model_patcher.load_device
    if device is None:
        device = run_device if torch.device(run_device).type == "cuda" else None
    family = families.family_of_module(src_dm)
    family = None if family.name == "generic" else family
    report = QuantReport(spec, backend, f"{family.name if family else 'comfy'} (new model from a MODEL)")
    cfg = copy.copy(src.model_config)
    cfg.custom_operations = make_ops(spec, backend, skip=skip, extra_skip=extra_skip, quant_device=device,
                                     run_device=run_device, report=report, family=family)
    new = cfg.get_model({}, "")
    new.model_sampling = copy.deepcopy(src.model_sampling)
    new.model_type = src.model_type
    offload = model_patcher.offload_device
    src_modules = dict(src_dm.named_modules())
    for name, module in new.diffusion_model.named_modules():
        src_mod = src_modules.get(name)
        if src_mod is None:
            raise ValueError(f"the MODEL has no layer {name!r} where its own architecture has one")
        keys = [k for k, v in list(src_mod._parameters.items()) + list(src_mod._buffers.items())
                if v is not None and k not in src_mod._non_persistent_buffers_set]
        if not keys:
            continue
        prefix = name + "." if name else ""
        sd = {prefix + k: _source_tensor(model_patcher, src_mod, "diffusion_model." + prefix + k, k) for k in keys}
        missing, unexpected, errors = [], [], []
        module._load_from_state_dict(sd, prefix, {}, True, missing, unexpected, errors)
        if missing or errors:
            raise ValueError(f"cannot rebuild layer {name!r} from the MODEL: missing {missing}, {errors}")
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None and t.device != torch.device(offload):
                t.data = t.data.to(offload)
    if not report.quantized:
        raise _no_layer_error("MODEL", model_patcher, report, family)
    out = comfy_compat.model_patcher_class()(new, load_device=run_device, offload_device=offload)
    out.model_options = copy.deepcopy(model_patcher.model_options)
    out.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "qsched_unload_source",
                             _unload_source_first(weakref.ref(src)))
    for k, v in model_patcher.object_patches.items():
        if not k.startswith("diffusion_model"):
            out.add_object_patch(k, v)
    return _finish(out, report, dict(getattr(src, "qsched_source", None) or {"path": "", "sha256": "",
                                                                              "name": "MODEL"})), report


def _unload_source_first(source_ref):
    """OUTER_SAMPLE wrapper of a Quantize Model result: before it samples, its full-precision source leaves the GPU
    (it was quantized to save that memory; running the source again reloads it), the way ComfyUI's own
    ``free_memory`` unloads a model. Holds the source weakly."""
    def wrapper(executor, *args, **kwargs):
        import comfy.model_management as mm

        src = source_ref()
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            lm = mm.current_loaded_models[i]
            if src is not None and not lm.is_dead() and lm.model.model is src and lm.model_unload():
                mm.current_loaded_models.pop(i)
        return executor(*args, **kwargs)

    return wrapper


def save_quantized(model_patcher, path: str, *, source_sha256: str | None = None) -> int:
    """Write the pre-quantized file of a MODEL made by ``load_quantized`` / ``quantize_comfy_model``; returns bytes.
    ``source_sha256``: hash of the full-precision source (default: computed from the recorded source file)."""
    base = model_patcher.model
    dm = base.diffusion_model
    layers = dict(quantized_layers(dm))
    if not layers:
        raise ValueError("this MODEL has no Q-Sched quantized layers: quantize it first (Q-Sched loaders or "
                         "Quantize Model)")
    tensors, table = {}, {}
    qnames = set(layers)
    for k, v in dm.state_dict().items():
        layer, _, attr = k.rpartition(".")
        if layer in qnames and attr == "weight":
            k = f"{layer}.qweight"
        tensors[k] = v
    for name, m in layers.items():
        table[name] = {"format": m.qsched_spec.name, "group_size": m.qsched_spec.group_size,
                       "shape": [m.out_features, m.in_features],
                       "dtype": prequant.dtype_name(base.get_dtype() if hasattr(base, "get_dtype") else
                                                    torch.bfloat16)}
    spec = next(iter(layers.values())).qsched_spec
    family = families.family_of_module(dm)
    source = getattr(base, "qsched_source", None) or {}
    if source_sha256 is None:
        source_sha256 = source.get("sha256", "")
        if not source_sha256 and source.get("path") and os.path.isfile(source["path"]):
            source_sha256 = file_sha256(source["path"])
    skip = family.patterns if family.name != "generic" else COMFY_SKIP
    return prequant.write(path, tensors, table, spec_name=spec.name, arch=type(base.model_config).__name__,
                          skip=list(skip), source_sha256=source_sha256, source_name=source.get("name", ""))


def save_native(model_patcher, path: str) -> dict:
    """Write a MODEL made by ``load_quantized`` / ``quantize_comfy_model`` as a ComfyUI-native quantized file (the
    layout newer cores load with the stock Load Diffusion Model; ``native`` module doc): each quantized layer in
    ``native.target_for`` its format (8-bit int codes: int8_tensorwise, the same codes and scales; float8: one scale
    per tensor; 4-bit: asym_w4a8_int8, both made by comfy-kitchen from the dequantized weight), every other tensor
    as the model holds it; ``<layer>.comfy_quant`` markers and the ``_quantization_metadata`` header. Returns
    {"bytes", "layers": {format: count}, "exact": bool (every layer's weights unchanged)}."""
    from safetensors.torch import save_file

    from ..qsched.quant.layers import dequantize

    dm = model_patcher.model.diffusion_model
    layers = dict(quantized_layers(dm))
    if not layers:
        raise ValueError("this MODEL has no Q-Sched quantized layers: quantize it first (Q-Sched loaders or "
                         "Quantize Model)")
    native.kitchen()
    own = {"weight", "weight_scale", "weight_sum", "weight_exp"}
    tensors = {k: v for k, v in dm.state_dict().items()
               if not (k.rpartition(".")[0] in layers and k.rpartition(".")[2] in own)}
    configs, counts, exact = {}, {}, True
    for name, m in layers.items():
        spec, scale = m.qsched_spec, m.weight_scale.detach().cpu()
        codes = m.weight.detach().cpu()
        wexp = None if m.weight_exp is None else m.weight_exp.detach().cpu()
        target = native.target_for(spec, m.in_features)
        w = dequantize(codes, scale, m.in_features, torch.float32, wexp)
        same = target == "int8_tensorwise" and spec.w_bits == 8 and codes.dtype == torch.int8 and scale.shape[1] == 1
        t, conf = native.encode(target, w, codes=codes if same else None, scale=scale if same else None)
        exact = exact and same
        for k, v in t.items():
            tensors[f"{name}.{k}"] = v
        tensors[f"{name}.{native.MARKER}"] = native.encode_marker(conf)
        configs[name] = conf
        counts[target] = counts.get(target, 0) + 1
    header = {native.HEADER: json.dumps({"layers": configs}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata=header))
    return {"bytes": os.path.getsize(path), "layers": counts, "exact": exact}
