"""Quantized models inside a real ComfyUI, in-process (run by tests/test_comfyui_quant.py with ComfyUI's python).

    cd $COMFYUI_PATH && $COMFYUI_PYTHON tests/comfy_quant_checks.py SHIM_DIR WORK_DIR CHECK

SHIM_DIR holds ``qsched_pack`` (a link to this checkout); WORK_DIR the tiny model files (built on first use:
tests/data/build_tiny_comfy_models.py's SD1.5-architecture UNet and FLUX-schnell layout, unet-only files). Each
check raises AssertionError on failure and prints one JSON line of measured numbers ("RESULT {...}").
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
from pathlib import Path

from comfy_env import REPO, enter_comfyui, report

SHIM, WORK, CHECK = enter_comfyui()

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
from qsched_pack.calibration.testing import AnonPeak  # noqa: E402
from qsched_pack.nodes import quant_ops  # noqa: E402
from qsched_pack.nodes.quant_model import load_quantized, quantize_comfy_model, save_quantized  # noqa: E402
from qsched_pack.qsched.quant import prequant, swap  # noqa: E402
from qsched_pack.qsched.quant import layers as qlayers  # noqa: E402

torch.manual_seed(0)
FILES = {"sd": os.path.join(WORK, "sd_unet.safetensors"), "flux": os.path.join(WORK, "flux_unet.safetensors")}


def build():
    from safetensors.torch import save_file

    import build_tiny_comfy_models as b

    if not os.path.exists(FILES["sd"]):
        save_file({k: v.to(torch.float16).contiguous() for k, v in b.build_sd_unet(2).items()}, FILES["sd"])
    if not os.path.exists(FILES["flux"]):
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in b.build_flux(5).items()}, FILES["flux"])


def conds(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "sd":
        return [[torch.randn(1, 77, 768, generator=g), {}]], torch.zeros(1, 4, 8, 8)
    return [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]], \
        torch.zeros(1, 16, 8, 8)


def run(model, kind, steps=2):
    cond, latent = conds(kind)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    sampler = "euler"
    return comfy.sample.sample(model, noise, steps, 1.0, sampler, "simple", cond, cond, latent, seed=7,
                               disable_pbar=True).float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def lora_sd(model, rank=4, scale=0.05, shapes_ok=True):
    """A LoRA in ComfyUI's own key format (diffusion_model.<layer>.lora_up/lora_down/alpha) on every quantized
    Linear of ``model``."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, m in quant_ops.quantized_layers(model.model.diffusion_model):
        k = m.in_features if shapes_ok else m.in_features + 1
        out[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, k, generator=g) * scale
        out[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * scale
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank))
    return out


def with_lora(model, lsd, strength):
    m, _ = comfy.sd.load_lora_for_models(model, None, lsd, strength, 0)
    return m


# ------------------------------------------------------------------------------------------------------ checks
def check_load_time(kind="flux", fmt="w4a8"):
    ref = comfy.sd.load_diffusion_model(FILES[kind])
    y_ref = run(ref, kind)
    size_ref = ref.model_size()
    mm.unload_all_models()
    with AnonPeak() as peak:
        q, _, _, report = load_quantized(FILES[kind], fmt)
    dm = q.model.diffusion_model
    layers = dict(quant_ops.quantized_layers(dm))
    assert layers and all(m.weight.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn) for m in layers.values())
    assert all(isinstance(p, torch.nn.Parameter) for m in layers.values() for p in (m.weight, m.weight_scale))
    size = q.model_size()
    assert size == state_bytes(q.model), (size, state_bytes(q.model))
    y = run(q, kind)
    largest = max(m.out_features * m.in_features * 4 for m in layers.values())
    return {"kind": kind, "format": fmt, "layers": len(layers), "size": size, "size_bf16": size_ref,
            "size_ratio": size / size_ref, "rel_err": rel(y, y_ref), "anon_growth": peak.growth,
            "largest_layer_fp32": largest, "skipped": len(report.skipped)}


def check_formats():
    out = {}
    for kind in ("sd", "flux"):
        for fmt in ("w8a8", "w8a8-fp8", "w4a8"):
            r = check_load_time(kind, fmt)
            out[f"{kind}/{fmt}"] = {k: r[k] for k in ("size_ratio", "rel_err")}
            mm.unload_all_models()
    return out


def check_lowvram(kind="sd"):
    """Partial loading: ComfyUI marks modules beyond the budget comfy_cast_weights and streams them per call; the
    quantized layers must follow that path and give the same result, with and without a LoRA."""
    q, _, _, _ = load_quantized(FILES[kind], "w4a8")
    full = run(q, kind)
    lsd = lora_sd(q)
    ql = with_lora(q, lsd, 1.0)
    full_lora = run(ql, kind)
    mm.unload_all_models()
    budget = q.model_size() // 3
    for m in (q, ql):
        m.model.diffusion_model  # noqa: B018
    q.patch_model(load_weights=False)
    q.load(torch.device("cpu"), lowvram_model_memory=budget)
    streamed = [n for n, m in quant_ops.quantized_layers(q.model.diffusion_model) if m.comfy_cast_weights]
    assert streamed, "no quantized layer was left for per-call streaming"
    x = run_direct(q, kind)
    q.unpatch_model()
    mm.unload_all_models()
    ql.patch_model(load_weights=False)
    ql.load(torch.device("cpu"), lowvram_model_memory=budget)
    xl = run_direct(ql, kind)
    ql.unpatch_model()
    ref_x = direct_ref(q, kind)
    ref_xl = direct_ref(ql, kind)
    assert torch.equal(x, ref_x), rel(x, ref_x)
    assert rel(xl, ref_xl) < 1e-6, rel(xl, ref_xl)
    assert rel(full_lora, full) > 1e-4
    return {"streamed_layers": len(streamed), "lora_lowvram_vs_full": rel(xl, ref_xl)}


def _direct_inputs(kind):
    g = torch.Generator().manual_seed(5)
    if kind == "sd":
        return torch.randn(1, 4, 8, 8, generator=g), {"c_crossattn": torch.randn(1, 77, 768, generator=g)}
    return torch.randn(1, 16, 8, 8, generator=g), {"c_crossattn": torch.randn(1, 8, 4096, generator=g),
                                                    "y": torch.randn(1, 2048, generator=g)}


def run_direct(model, kind):
    x, c = _direct_inputs(kind)
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([0.5 if kind == "flux" else 5.0]), **c).float()


def direct_ref(model, kind):
    mm.load_models_gpu([model], force_full_load=True)
    out = run_direct(model, kind)
    mm.unload_all_models()
    return out


def check_lora(kind="sd", fmt="w4a8"):
    ref = comfy.sd.load_diffusion_model(FILES[kind])
    q, _, _, _ = load_quantized(FILES[kind], fmt)
    lsd = lora_sd(q)
    y_q = direct_ref(q, kind)
    y_ref = direct_ref(ref, kind)
    y_q_l = direct_ref(with_lora(q, lsd, 1.0), kind)
    y_ref_l = direct_ref(with_lora(ref, lsd, 1.0), kind)
    y_q0 = direct_ref(with_lora(q, lsd, 0.0), kind)
    y_q_after = direct_ref(q, kind)  # the LoRA clone unpatched: the base model is exactly as before
    err_lora = rel(y_q_l, y_ref_l)
    err_plain = rel(y_q, y_ref)
    lora_effect = rel(y_ref_l, y_ref)
    assert torch.equal(y_q0, y_q), rel(y_q0, y_q)
    assert torch.equal(y_q_after, y_q), rel(y_q_after, y_q)
    assert lora_effect > 0.01, lora_effect
    # within the format's error on this model: quantized+LoRA is as far from bf16+LoRA as quantized from bf16
    assert err_lora <= 1.25 * err_plain + 0.02, (err_lora, err_plain)
    assert rel(y_q_l, y_q) > 0.5 * lora_effect, (rel(y_q_l, y_q), lora_effect)
    bad = lora_sd(q, shapes_ok=False)
    y_bad = direct_ref(with_lora(q, bad, 1.0), kind)  # ComfyUI logs the mismatch and skips those patches
    assert torch.equal(y_bad, y_q)
    return {"err_q_lora_vs_bf16_lora": err_lora, "err_q_vs_bf16": err_plain, "lora_effect": lora_effect}


def check_clones(kind="sd"):
    """Any number of Quantize Model results of one MODEL alternate with the original in one process: each is a new
    model object; the original's output never changes; a clone equals the same format quantized while loading."""
    base = comfy.sd.load_diffusion_model(FILES[kind])
    y0 = run(base, kind)
    q8, r8 = quantize_comfy_model(base, "w8a8")
    q4, r4 = quantize_comfy_model(base, "w4a8")
    q4b, _ = quantize_comfy_model(base, "w4a8")
    seq = [("base", base), ("q4", q4), ("q8", q8), ("base", base), ("q4b", q4b), ("q4", q4), ("base", base)]
    outs = {}
    for name, m in seq:
        y = run(m, kind)
        if name != "base":  # the full-precision source left the device when a quantized model sampled
            assert not any(lm.model.model is base.model for lm in mm.current_loaded_models if not lm.is_dead())
        if name in outs:
            assert torch.equal(outs[name], y), name
        outs[name] = y
    assert torch.equal(outs["base"], y0)
    assert torch.equal(outs["q4"], outs["q4b"])
    loaded, _, _, _ = load_quantized(FILES[kind], "w4a8")
    assert torch.equal(run(loaded, kind), outs["q4"])
    assert q4.model is not base.model and q4.patches_uuid != base.patches_uuid
    ratio = q4.model_size() / base.model_size()
    assert q4.model_size() == state_bytes(q4.model)
    shared = {id(p) for p in base.model.parameters()} & {id(p) for p in q4.model.parameters()}
    assert not shared
    # a LoRA on the input MODEL is merged into the quantized one
    lsd = lora_sd(loaded)
    with_l = with_lora(base, lsd, 1.0)
    ql, _ = quantize_comfy_model(with_l, "w4a8")
    err = rel(run(ql, kind), run(with_l, kind))
    assert err < 0.15, err
    assert torch.equal(run(base, kind), y0)
    return {"size_ratio_w4a8": ratio, "size_ratio_w8a8": q8.model_size() / base.model_size(),
            "err_lora_merged": err}


def check_prequant(kind="flux", fmt="w4a8"):
    q, _, _, _ = load_quantized(FILES[kind], fmt)
    y = run(q, kind)
    path = os.path.join(WORK, f"{kind}_{fmt}_prequant.safetensors")
    size = save_quantized(q, path)
    meta = prequant.read_metadata(path)
    assert meta["qsched.spec"] == fmt and len(meta["qsched.source_sha256"]) == 64
    mm.unload_all_models()
    del q
    # what the loaded model must hold in its own memory: the file's 16-bit tensors (skip-listed layers, biases,
    # norms: copied into the model's parameters, as core's loader does); the codes stay memory-mapped
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        code_keys = {k for k in f.keys() if k.rsplit(".", 1)[0] in meta["layers"]
                     and k.rsplit(".", 1)[1] in ("qweight", "weight_scale", "weight_sum", "weight_exp")}
        nbytes = {k: f.get_tensor(k).nbytes for k in f.keys()}
    code_bytes = sum(v for k, v in nbytes.items() if k in code_keys)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the OS: the load's growth is not hidden
    real = qlayers.quantize_linear_weight

    def forbidden(*a, **k):
        raise AssertionError("a pre-quantized load must not quantize anything")

    quant_ops.quantize_linear_weight = forbidden
    try:
        with AnonPeak() as peak:
            q2, _, _, report = load_quantized(path, "w8a8")  # the file's own format wins
    finally:
        quant_ops.quantize_linear_weight = real
    assert report.spec.name == fmt
    y2 = run(q2, kind)
    assert torch.equal(y, y2), rel(y2, y)
    # the same file written by `qsched quantize` (no ComfyUI, tensor by tensor) loads to the same model
    cli = os.path.join(WORK, f"{kind}_{fmt}_cli.safetensors")
    prequant.quantize_file(FILES[kind], cli, fmt, device="cpu", overwrite=True)
    y3 = run(load_quantized(cli, fmt)[0], kind)
    assert torch.equal(y, y3), rel(y3, y)
    return {"file_bytes": size, "code_bytes": code_bytes, "model_size": q2.model_size(), "anon_growth": peak.growth,
            "anon_growth_over_file": peak.growth / size}


def expect_error(fn, *needles):
    try:
        fn()
    except ValueError as exc:
        msg = str(exc)
        assert all(n in msg for n in needles), msg
        return msg
    raise AssertionError("no error")


def check_bad_input():
    q, _, _, _ = load_quantized(FILES["sd"], "w4a8")
    good = os.path.join(WORK, "bad_src.safetensors")
    save_quantized(q, good)
    data = open(good, "rb").read()
    out = {}
    trunc = os.path.join(WORK, "truncated.safetensors")
    open(trunc, "wb").write(data[: len(data) // 2])
    out["truncated"] = expect_error(lambda: load_quantized(trunc, "w4a8"), "truncated.safetensors")
    garbage = os.path.join(WORK, "garbage.safetensors")
    open(garbage, "wb").write(b"\x00" * 64)
    out["garbage"] = expect_error(lambda: load_quantized(garbage, "w4a8"), "garbage.safetensors", "corrupt")
    # a pre-quantized file whose layers belong to another architecture: FLUX codes under SD names
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(good, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["qsched.arch"] = "FluxSchnell"
    other = os.path.join(WORK, "other_arch.safetensors")
    save_file(tensors, other, metadata=meta)
    out["arch"] = expect_error(lambda: load_quantized(other, "w4a8"), "other_arch.safetensors", "FluxSchnell")
    layers = json.loads(meta["qsched.layers"])
    first = sorted(layers)[0]
    tensors[f"{first}.qweight"] = tensors[f"{first}.qweight"][:, :-2].contiguous()
    meta["qsched.arch"] = "SD15"
    edited = os.path.join(WORK, "edited.safetensors")
    save_file(tensors, edited, metadata=meta)
    out["shape"] = expect_error(lambda: load_quantized(edited, "w4a8"), first)
    out["checkpoint_loader"] = expect_error(lambda: load_quantized(good, "w4a8", checkpoint=True),
                                            "Diffusion Model Loader")
    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda d=None: (8, 6)
    try:
        out["no_fp8"] = expect_error(lambda: swap.check_runnable(prequant_spec("w8a8-fp8"), "cuda:0"),
                                     "w8a8-fp8", "w8a8")
    finally:
        torch.cuda.get_device_capability = real
    return out


def check_gguf(kind="sd"):
    """Q-Sched on a MODEL from city96/ComfyUI-GGUF (QSCHED_GGUF_NODES = a checkout of it): the Q-Sched sampler and
    scheduler nodes run on GGUF Q8_0 / Q4_0 models (identity coefficients equal core euler on the same model),
    the Calibrate node's model fingerprint reads GGUF tensors, and Quantize Model takes a GGUF MODEL."""
    import importlib

    from safetensors.torch import load_file

    from gguf_files import write_gguf

    from qsched_pack.nodes import sampling as qnodes
    from qsched_pack.nodes.comfy_generator import model_fingerprint
    from qsched_pack.qsched.coefficients import Coefficients

    src = os.environ["QSCHED_GGUF_NODES"]
    sys.path.insert(0, os.path.dirname(src))
    gn = importlib.import_module(os.path.basename(src) + ".nodes")
    sd = load_file(FILES[kind])
    ref = comfy.sd.load_diffusion_model(FILES[kind])
    y_ref = run(ref, kind)
    cond, latent = conds(kind)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    out = {}
    for qtype in ("Q8_0", "Q4_0"):
        path = os.path.join(WORK, f"{kind}_{qtype}.gguf")
        write_gguf(path, sd, qtype, "sd1" if kind == "sd" else "flux")
        ops = gn.GGMLOps()
        ops.Linear.dequant_dtype = ops.Linear.patch_dtype = None
        model = comfy.sd.load_diffusion_model_state_dict(gn.gguf_sd_loader(path), model_options={
            "custom_operations": ops})
        model = gn.GGUFModelPatcher.clone(model)
        sigmas = qnodes.QSchedScheduler().get_sigmas(model, "simple", 2, 1.0)[0]
        identity = qnodes.QSchedSampler().get_sampler("euler", 1.0, Coefficients.identity(2))[0]
        ramp = qnodes.QSchedSampler().get_sampler("euler", 1.0, Coefficients([0.99, 1.0], [0.95, 0.98]))[0]
        core = comfy.samplers.sampler_object("euler")
        y_core = comfy.sample.sample_custom(model, noise, 1.0, core, sigmas, cond, cond, latent, seed=7,
                                            disable_pbar=True).float()
        y_id = comfy.sample.sample_custom(model, noise, 1.0, identity, sigmas, cond, cond, latent, seed=7,
                                          disable_pbar=True).float()
        y_ramp = comfy.sample.sample_custom(model, noise, 1.0, ramp, sigmas, cond, cond, latent, seed=7,
                                            disable_pbar=True).float()
        assert torch.equal(y_id, y_core)
        assert not torch.equal(y_ramp, y_core)
        fp = model_fingerprint(model)
        assert fp["model_hash"] != model_fingerprint(ref)["model_hash"]
        q, _ = quantize_comfy_model(model, "w8a8")
        y_q = run(q, kind)
        out[qtype] = {"gguf_vs_bf16": rel(y_core, run(ref, kind)), "qsched_w8a8_of_gguf_vs_bf16": rel(y_q, y_ref),
                      "file_bytes": os.path.getsize(path)}
        mm.unload_all_models()
    assert out["Q8_0"]["gguf_vs_bf16"] < out["Q4_0"]["gguf_vs_bf16"] < 0.5, out
    return out


def prequant_spec(name):
    from qsched_pack.qsched.quant import QuantSpec

    return QuantSpec.parse(name)


def _in_pack(filename: str) -> bool:
    """Whether a frame's file is the pack's own code (qsched/, calibration/, nodes/ of this checkout), whatever the
    path of the ComfyUI checkout (CI's lives under ~/.cache/qsched, so a substring test would count ComfyUI)."""
    try:
        rel = Path(filename).resolve().relative_to(REPO)
    except ValueError:
        return False
    return rel.parts[0] in ("qsched", "calibration", "nodes")


def check_compile(kind="sd"):
    """Dynamo over the whole diffusion model: the quantized layers add no graph break (same count as bf16)."""
    import torch._dynamo

    x, c = _direct_inputs(kind)
    res = {}
    for name, model in (("bf16", comfy.sd.load_diffusion_model(FILES[kind])),
                        ("w4a8", load_quantized(FILES[kind], "w4a8")[0]),
                        ("w8a8-fp8", load_quantized(FILES[kind], "w8a8-fp8")[0])):
        mm.load_models_gpu([model], force_full_load=True)
        base = model.model
        t = torch.tensor([0.5 if kind == "flux" else 5.0])
        torch._dynamo.reset()
        explain = torch._dynamo.explain(base.apply_model)(x, t, **c)
        pack = [str(r.reason).splitlines()[0] for r in explain.break_reasons
                if any(_in_pack(f.filename) for f in (r.user_stack or []))]
        res[name] = {"graph_breaks": explain.graph_break_count, "in_pack": pack}
        mm.unload_all_models()
    # ComfyUI's own breaks (psutil free-memory queries in CPU attention) are the same for every model; none of the
    # breaks comes from the pack's layers
    assert all(not r["in_pack"] for r in res.values()), res
    return res


def check_w4a8_fp8():
    """w4a8-fp8 in ComfyUI: quantized while loading (the group exponents are a parameter ComfyUI counts
    and moves), saved and loaded back from a pre-quantized file with the same output."""
    out = {}
    for kind in ("flux", "sd"):
        r = check_load_time(kind, "w4a8-fp8")
        out[kind] = {k: r[k] for k in ("size_ratio", "rel_err")}
        mm.unload_all_models()
    out["prequant"] = check_prequant("sd", "w4a8-fp8")
    return out


def check_fastpath():
    """Q-Sched CUDA Graph on the CPU is a no-op: the same latent as without it, nothing captured, and the input
    MODEL is left without the wrapper."""
    from qsched_pack.nodes.fastpath import apply_cuda_graph

    out = {}
    for kind in ("sd", "flux"):
        m = comfy.sd.load_diffusion_model(FILES[kind])
        y = run(m, kind)
        fast, graphs = apply_cuda_graph(m, 2)
        y_fast = run(fast, kind)
        assert torch.equal(y, y_fast), rel(y_fast, y)
        st = graphs.stats()
        assert st["captures"] == 0 and st["replays"] == 0 and st["eager_calls"] > 0, st
        assert torch.equal(run(m, kind), y)
        out[kind] = st
        mm.unload_all_models()
    return out


# ------------------------------------------------------------------------- newer core (0.38.1) on 0.3.64: stand-ins
class LowVramPatch038:
    """0.38.1's ``comfy.model_patcher.LowVramPatch.__call__``: the LoRA is added to whatever tensor it is handed
    (no convert_func / set_func any more), in that tensor's dtype."""
    is_lowvram_patch = True

    def __init__(self, key, patches):
        self.key, self.patches = key, patches

    def __call__(self, weight):
        import comfy.lora

        return comfy.lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=weight.dtype)


class CastContract038:
    """0.38.1's ``comfy.ops.cast_bias_weight(s, input, dtype, device, bias_dtype, offloadable, compute_dtype,
    want_requant)`` / ``uncast_bias_weight`` installed on 0.3.64's comfy.ops: the classic (non-vbar) path's
    semantics, plus the Dynamic VRAM post-cast of a ``weight_lowvram_function`` (applied to the weight cast to
    ``dtype``), and a record of every call."""

    def __init__(self):
        self.casts, self.uncasts = [], []

    def cast_bias_weight(self, s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False,
                         compute_dtype=None, want_requant=False):
        if input is not None:
            dtype = input.dtype if dtype is None else dtype
            bias_dtype = dtype if bias_dtype is None else bias_dtype
            device = input.device if device is None else device
        fns, lowvram = list(s.weight_function), getattr(s, "weight_lowvram_function", None)
        weight = mm.cast_to(s.weight, None, device, copy=bool(fns))
        bias = None if s.bias is None else mm.cast_to(s.bias, None, device).to(bias_dtype)
        for f in s.bias_function:
            bias = f(bias)
        if fns or lowvram is not None or weight.dtype != dtype:
            weight = weight.to(dtype)
            if lowvram is not None:
                weight = lowvram(weight)
            for f in fns:
                weight = f(weight)
        handle = ("offload stream", weight, bias)
        self.casts.append((s, dtype, offloadable))
        return (weight, bias, handle) if offloadable else (weight, bias)

    def uncast_bias_weight(self, s, weight, bias, handle):
        self.uncasts.append((s, handle[1] is weight))

    def __enter__(self):
        import comfy.ops

        self.saved = comfy.ops.cast_bias_weight, getattr(comfy.ops, "uncast_bias_weight", None)
        comfy.ops.cast_bias_weight, comfy.ops.uncast_bias_weight = self.cast_bias_weight, self.uncast_bias_weight
        return self

    def __exit__(self, *exc):
        import comfy.ops

        comfy.ops.cast_bias_weight = self.saved[0]
        if self.saved[1] is None:
            del comfy.ops.uncast_bias_weight
        else:
            comfy.ops.uncast_bias_weight = self.saved[1]


def dynamic_load(patcher):
    """What 0.38.1's ``ModelPatcherDynamic.load`` leaves on each module (model_patcher.py, minus the vbar address
    space, which needs a GPU): ``comfy_cast_weights`` forced on, a LoRA as ``<param>_lowvram_function`` and no
    ``weight_function``; the weights themselves stay where they are and stream per call. Returns what
    ``restore`` needs."""
    patcher.patch_model(load_weights=False)
    saved = []
    for n, m in patcher.model.named_modules():
        if hasattr(m, "comfy_cast_weights"):
            saved.append((m, {k: m.__dict__[k] for k in ("comfy_cast_weights", "weight_function", "bias_function")
                              if k in m.__dict__}))
            m.comfy_cast_weights = True
            for p in ("weight", "bias"):
                key = f"{n}.{p}"
                setattr(m, p + "_lowvram_function", LowVramPatch038(key, patcher.patches) if key in patcher.patches
                        else None)
                setattr(m, p + "_function", [])
    return saved


def restore(patcher, saved):
    for m, attrs in saved:
        for k in ("comfy_cast_weights", "weight_function", "bias_function", "weight_lowvram_function",
                  "bias_lowvram_function"):
            m.__dict__.pop(k, None)
        m.__dict__.update(attrs)
    patcher.unpatch_model()


def check_newer_core_contract(kind="sd"):
    """The quantized layers under 0.38.1's casting contract, run on 0.3.64 with stand-ins: (1) Dynamic VRAM (every
    layer streamed through ``cast_bias_weight(..., offloadable=True)``, a LoRA as ``weight_lowvram_function``),
    (2) 0.38.1's classic lowvram path (a LoRA as a ``weight_function`` LowVramPatch that no longer converts): the same
    output as the full load on 0.3.64, with and without a LoRA; every quantized layer cast with its codes' dtype and
    released with the handle it got; the Quantize Model result uses core's CoreModelPatcher."""
    q, _, _, _ = load_quantized(FILES[kind], "w4a8")
    ql = with_lora(q, lora_sd(q), 1.0)
    ref, ref_l = direct_ref(q, kind), direct_ref(ql, kind)
    layers = dict(quant_ops.quantized_layers(q.model.diffusion_model))
    out = {}
    with CastContract038() as contract:
        for name, m in (("plain", q), ("lora", ql)):
            saved = dynamic_load(m)
            y = run_direct(m, kind)
            restore(m, saved)
            want = ref if name == "plain" else ref_l
            assert (torch.equal(y, want) if name == "plain" else rel(y, want) < 1e-6), (name, rel(y, want))
            out[f"dynamic_{name}_vs_full_load"] = rel(y, want)
        cast_layers = {id(s) for s, _, _ in contract.casts}
        assert all(id(m) in cast_layers for m in layers.values()), "a quantized layer was not streamed by core's cast"
        assert all(off for s, dt, off in contract.casts if id(s) in {id(m) for m in layers.values()})
        assert all(dt == s.weight.dtype for s, dt, _ in contract.casts if s in layers.values())
        assert len(contract.uncasts) == sum(off for _, _, off in contract.casts) and \
            all(same for _, same in contract.uncasts)
        # 0.38.1 classic lowvram: LowVramPatch in weight_function, applied by the layer to the float weight
        ql.patch_model(load_weights=False)
        saved = []
        for name, m in layers.items():
            key = f"diffusion_model.{name}.weight"
            saved.append((m, {k: m.__dict__[k] for k in ("comfy_cast_weights", "weight_function") if k in m.__dict__}))
            m.comfy_cast_weights = True
            m.weight_function = [LowVramPatch038(key, ql.patches)]
        y = run_direct(ql, kind)
        restore(ql, saved)
        assert rel(y, ref_l) < 1e-6, rel(y, ref_l)
        out["classic038_lora_vs_full_load"] = rel(y, ref_l)
    assert torch.equal(direct_ref(q, kind), ref)  # nothing left behind
    import comfy.model_patcher

    class Dyn(comfy.model_patcher.ModelPatcher):
        pass

    comfy.model_patcher.CoreModelPatcher = Dyn  # what 0.38.1's main.py sets where Dynamic VRAM is on
    try:
        base = comfy.sd.load_diffusion_model(FILES[kind])
        qm, _ = quantize_comfy_model(base, "w8a8")
        assert type(qm) is Dyn, type(qm)
    finally:
        del comfy.model_patcher.CoreModelPatcher
    out["layers"] = len(layers)
    return out


def check_native(kind="sd"):
    """ComfyUI-native files both ways, through comfy-kitchen: Save Quantized Model's native file of each pack format
    dequantizes (comfy-kitchen's eager backend) to the pack's weights, exactly for w8a8; the pack's loader reads it
    back (w8a8: the same codes and output); files written the way newer core writes them (markers, or only the
    ``_quantization_metadata`` header; asym_w4a8_int8, nvfp4, float8, int8 ConvRot) load through Q-Sched's loader
    to the weights comfy-kitchen dequantizes."""
    from comfy_kitchen import tensor as ckt
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from qsched_pack.qsched.quant import native
    from qsched_pack.nodes.quant_model import save_native

    out = {}
    for fmt in ("w8a8", "w8a8-fp8", "w4a8"):
        q, _, _, _ = load_quantized(FILES[kind], fmt)
        path = os.path.join(WORK, f"{kind}_{fmt}_native.safetensors")
        info = save_native(q, path)
        assert info["exact"] == (fmt == "w8a8"), info
        configs = native.read_configs(path)
        layers = dict(quant_ops.quantized_layers(q.model.diffusion_model))
        assert set(configs) == set(layers)
        with safe_open(path, "pt") as f:
            header = json.loads(f.metadata()[native.HEADER])["layers"]
            assert header == configs
            worst = 0.0
            for name, m in layers.items():
                t = {s: f.get_tensor(f"{name}.{s}") for s in ("weight", "weight_scale", "weight_s_rel",
                                                               "weight_s_channel", "weight_codebook")
                     if f"{name}.{s}" in f.keys()}
                got = native.dequantize(configs[name], t, (m.out_features, m.in_features))
                ref = qlayers.dequantize(m.weight, m.weight_scale, m.in_features, torch.float32, m.weight_exp)
                if fmt == "w8a8":
                    assert torch.equal(got, ref), name
                worst = max(worst, rel(got, ref))
        y = run_direct(q, kind)
        back, _, _, report = load_quantized(path, fmt)
        assert set(report.native) == set(layers)
        if fmt == "w8a8":
            for name, m in dict(quant_ops.quantized_layers(back.model.diffusion_model)).items():
                assert torch.equal(m.weight, layers[name].weight), name
            assert torch.equal(run_direct(back, kind), y)
        out[fmt] = {"layers": info["layers"], "worst_weight_rel_err": worst, "bytes": info["bytes"],
                    "output_rel_err_reloaded": rel(run_direct(back, kind), y)}
        mm.unload_all_models()
    # files as newer core writes them: comfy-kitchen's own QuantizedTensor state dicts (core's saver calls them)
    src = load_file(FILES[kind])
    q, _, _, _ = load_quantized(FILES[kind], "w8a8")
    names = [n for n, _ in quant_ops.quantized_layers(q.model.diffusion_model)]
    cases = [("asym_w4a8_int8", ckt.AsymW4A8Int8Layout, {}, "header"),
             ("nvfp4", ckt.TensorCoreNVFP4Layout, {}, "markers"),
             ("float8_e4m3fn", ckt.TensorCoreFP8Layout, {}, "markers"),
             ("int8_tensorwise", ckt.TensorWiseINT8Layout, {"per_channel": True, "convrot": True}, "markers")]
    for fmt, layout, kw, style in cases:
        sd, configs, want = dict(src), {}, {}
        for n in names:
            w = sd.pop(f"{n}.weight").float()
            if w.shape[1] % 256:
                sd[f"{n}.weight"] = w.to(torch.bfloat16)
                continue
            qd, params = layout.quantize(w, **kw)
            qt = ckt.QuantizedTensor(qd, layout.__name__, params)
            for k, v in qt.state_dict(f"{n}.weight").items():
                sd[k] = v
            conf = {"format": fmt}
            if fmt == "asym_w4a8_int8":
                conf.update(group_size=16, convrot_groupsize=256)
            if kw.get("convrot"):
                conf.update(convrot=True, convrot_groupsize=256)
            configs[n] = conf
            want[n] = qt.dequantize().float()
            if style == "markers":
                sd[f"{n}.comfy_quant"] = native.encode_marker(conf)
        path = os.path.join(WORK, f"{kind}_core_{fmt}_{style}.safetensors")
        meta = {native.HEADER: json.dumps({"layers": configs})} if style == "header" else None
        save_file(sd, path, metadata=meta)
        m16, _, _, report = load_quantized(path, "w8a8")
        assert set(report.native) == set(configs), (fmt, style)
        # the pack's w8a8 of comfy-kitchen's dequantized weight = the pack's w8a8 of that float weight
        got = dict(quant_ops.quantized_layers(m16.model.diffusion_model))
        for n, w in want.items():
            codes, scale = qlayers.qmath.quantize_weight(w, 8, None, "int")
            assert torch.equal(got[n].weight, codes), (fmt, style, n)
        out[f"core_{fmt}_{style}"] = len(configs)
        mm.unload_all_models()
    return out


def check_attention():
    """The 'sage 8-bit' option in real ComfyUI: ComfyUI's wrap_attn hands every attention call of the model to the
    pack's override, calls the shape rule accepts go to the registered "sage" function with ComfyUI's own arguments,
    the rest to ComfyUI's function. On the CPU a stand-in "sage" (ComfyUI's own attention function, counting calls)
    takes the place of the GPU library: same latent bit for bit; the input MODEL keeps 16-bit attention."""
    from comfy.ldm.modules import attention as ca

    from qsched_pack.nodes import attention as qa
    from qsched_pack.nodes.fastpath import QSchedCudaGraph

    calls = {"sage": 0, "seen": 0, "sage_shape": 0}
    real_rule = qa.sage_eligible

    def stand_in(*args, **kwargs):
        calls["sage"] += 1
        return ca.optimized_attention(*args, **kwargs)  # the function ComfyUI picked for this device

    def rule(args, kwargs):  # the shape rule alone (the CPU is never eligible), scaled to the tiny models
        calls["seen"] += 1
        calls["sage_shape"] += 1 if qa.sage_shape_ok(args[0].shape, args[1].shape, args[3], None,
                                                     kwargs.get("skip_reshape", False)) else 0
        return qa.sage_shape_ok(args[0].shape, args[1].shape, args[3], qa._arg(args, kwargs, 4, "mask"),
                                kwargs.get("skip_reshape", False))

    ca.REGISTERED_ATTENTION_FUNCTIONS.setdefault("sage", stand_in)
    saved = qa.SAGE_HEAD_DIMS, qa.SAGE_KEY_BLOCK
    # tiny models: any head size; keys in blocks of 8 (FLUX 16 image + 8 text tokens pass, SD's 77-token text
    # attention still goes to ComfyUI's function)
    qa.SAGE_HEAD_DIMS, qa.SAGE_KEY_BLOCK = range(1, 1025), 8
    assert ca.get_attention_function("sage") is stand_in, "a real sageattention is installed in ComfyUI's venv"
    qa.sage_eligible = rule
    out = {}
    try:
        for kind in ("sd", "flux"):
            m = comfy.sd.load_diffusion_model(FILES[kind])
            y = run(m, kind)
            calls.update(sage=0, seen=0, sage_shape=0)
            fast = QSchedCudaGraph().patch(m, 2, qa.ATTENTION_SAGE)["result"][0]
            y_sage = run(fast, kind)
            assert torch.equal(y, y_sage), rel(y_sage, y)
            assert calls["seen"] > 0, "ComfyUI never called the override"
            out[kind] = dict(calls)
            calls.update(sage=0, seen=0, sage_shape=0)
            assert torch.equal(run(m, kind), y) and calls["seen"] == 0  # the input MODEL is untouched
            mm.unload_all_models()
    finally:
        qa.sage_eligible = real_rule
        qa.SAGE_HEAD_DIMS, qa.SAGE_KEY_BLOCK = saved
    for kind in out:
        assert out[kind]["sage"] == out[kind]["sage_shape"] > 0, out
    assert out["sd"]["sage"] < out["sd"]["seen"], out  # the 77-token text attention stayed with ComfyUI
    return out


if __name__ == "__main__":
    build()
    report(globals(), CHECK)
