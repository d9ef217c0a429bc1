"""The few-step families in a real ComfyUI, in-process (run by tests/test_comfyui_families.py with ComfyUI's python).

    cd $COMFYUI_PATH && $COMFYUI_PYTHON tests/comfy_family_checks.py SHIM_DIR WORK_DIR CASE [CHECK]

Each CASE is one family's tiny random model written as users' files are (file name, key names, dtype), detected by
ComfyUI's own model detection. CHECK ``load`` (default): the pack's loaders in w8a8-fp8 / w4a8-fp8 / w4a8 and Q-Sched
Quantize Model (skip table, ComfyUI's model_size() vs the bytes held), then the family's distilled sampling setting
through Q-Sched KSampler and Q-Sched Sampler with identity coefficients == core KSampler / SamplerCustom bit for bit.
CHECK ``lora``: the family's few-step LoRA (random weights, its real key format) through core's LoRA loader on the
quantized model vs bf16. CHECK ``coefficients``: per-step coefficients on this family's sampler equal the Q-Sched
update written out here. Prints one JSON line ("RESULT {...}").
"""

from __future__ import annotations

import contextlib
import os
import time

from comfy_env import enter_comfyui, report

SHIM, WORK, CASE, *_rest = enter_comfyui()
CHECK = _rest[0] if _rest else "load"

import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
from qsched_pack.nodes.loaders import QSchedDiffusionModelLoader, QSchedQuantizeModel  # noqa: E402
from qsched_pack.nodes.sampling import QSchedKSampler, QSchedSampler  # noqa: E402
from qsched_pack.qsched.coefficients import Coefficients  # noqa: E402
from qsched_pack.nodes import quant_ops  # noqa: E402
from qsched_pack.qsched.quant import families  # noqa: E402

torch.manual_seed(0)
FORMATS = ("w8a8-fp8", "w4a8-fp8", "w4a8")
DM = os.path.join(WORK, "diffusion_models")
os.makedirs(DM, exist_ok=True)
folder_paths.add_model_folder_path("diffusion_models", DM, is_default=True)


def _cond(ctx_len, ctx_dim, **extra):
    def make():
        g = torch.Generator().manual_seed(1)
        opts = {k: (torch.randn(1, v, generator=g) if isinstance(v, int) else v) for k, v in extra.items()}
        return [[torch.randn(1, ctx_len, ctx_dim, generator=g), opts]]
    return make


# case -> user's file name, how it is built, its dtype, ComfyUI's model config, family, setting, latent, conditioning
CASES = {
    "qwen_image": dict(file="qwen_image_bf16.safetensors", build="build_qwen_image", dtype=torch.bfloat16,
                       config="QwenImage", family="qwen_image", setting="qwen_image_lightning_4step",
                       latent=(1, 16, 1, 8, 8), cond=_cond(6, 3584)),
    "wan22_5b": dict(file="wan2.2_ti2v_5B_fp16.safetensors", build=("build_wan", True), dtype=torch.float16,
                     config="WAN22_T2V", family="wan", setting="wan22_lightx2v_4step", latent=(1, 48, 2, 8, 8),
                     cond=_cond(6, 4096)),
    "wan22_a14b": dict(file="wan2.2_t2v_high_noise_14B_fp16.safetensors", build=("build_wan", False),
                       dtype=torch.float16, config="WAN21_T2V", family="wan", setting="wan22_lightx2v_4step",
                       latent=(1, 16, 2, 8, 8), cond=_cond(6, 4096)),
    # the same expert as Comfy-Org repackages it for 24 GiB cards: core's scaled fp8 (block Linear weights float8
    # with a per-layer scale_weight, a "scaled_fp8" marker key), the file most users of A14B have
    "wan22_a14b_fp8_scaled": dict(file="wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", build=("build_wan", False),
                                  dtype=torch.float16, fp8_scaled=True, config="WAN21_T2V", family="wan",
                                  setting="wan22_lightx2v_4step", latent=(1, 16, 2, 8, 8), cond=_cond(6, 4096)),
    # a family this ComfyUI does not know: a Z-Image-like NextDiT file (cap_embedder, x_embedder, layers.N...) that
    # ComfyUI 0.3.64 takes for Lumina2 and whose layers do not fit what it builds
    "newer_family": dict(file="z_image_turbo_bf16.safetensors", build="newer_family_file", dtype=torch.bfloat16,
                         config=None, family="generic", setting=None),
    "sd35_large_turbo": dict(file="sd3.5_large_turbo.safetensors", build="build_sd35", dtype=torch.bfloat16,
                             config="SD3", family="sd3", setting="sd35_large_turbo_4step", latent=(1, 16, 8, 8),
                             cond=_cond(6, 4096, pooled_output=2048)),
    "chroma": dict(file="chroma-unlocked-v50.safetensors", build="build_chroma", dtype=torch.bfloat16,
                   config="Chroma", family="chroma", setting="chroma_flash_8step", latent=(1, 16, 8, 8),
                   cond=_cond(6, 4096, pooled_output=None)),  # T5 only: ComfyUI's encoder gives pooled None
    "flux_dev": dict(file="flux1-dev.safetensors", build="build_flux_dev", dtype=torch.bfloat16, config="Flux",
                     family="flux", setting="flux_dev_turbo_8step", latent=(1, 16, 8, 8),
                     cond=_cond(6, 4096, pooled_output=768, guidance=3.5)),
    # SDXL's detection needs its full depth (transformer_depth 0,0,2,2,10,10); the Lightning/Hyper setting and the
    # kohya LoRA run on the same UNetModel class at SD1.5 size.
    "sdxl_lightning": dict(file="sdxl_lightning_unet_arch_sd15.safetensors", build=("build_sd_unet",),
                           dtype=torch.float16, config="SD15", family="sd_unet", setting="sdxl_lightning_4step",
                           latent=(1, 4, 8, 8), cond=_cond(77, 768)),
}
C = CASES[CASE]
FAMILY = families.get(C["family"])
SETTING = FAMILY.few_step[C["setting"]] if C["setting"] else {}
PATH = os.path.join(DM, C["file"])


def build():
    if os.path.exists(PATH):
        return
    from safetensors.torch import save_file

    import build_tiny_comfy_models as b

    fn, *args = C["build"] if isinstance(C["build"], tuple) else (C["build"],)
    if fn == "newer_family_file":
        g = torch.Generator().manual_seed(23)
        sd = {k: torch.randn(shape, generator=g) for k, shape in (
            ("x_embedder.weight", (384, 64)), ("cap_embedder.0.weight", (256,)), ("cap_embedder.1.weight", (384, 256)),
            ("layers.0.attention.qkv.weight", (1152, 384)), ("layers.0.attention.out.weight", (384, 384)),
            ("layers.0.feed_forward.w1.weight", (1024, 384)), ("final_layer.linear.weight", (64, 384)))}
    else:
        sd = getattr(b, fn)(23, *args) if fn != "build_sd_unet" else b.build_sd_unet(23)
    sd = {k: (v.to(C["dtype"]) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    if C.get("fp8_scaled"):
        sd = fp8_scaled(sd)
    tmp = PATH + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, PATH)


def fp8_scaled(sd):
    """Core's scaled fp8 layout (what ComfyUI's fp8_scaled files hold): each block Linear weight as float8 e4m3 codes
    of weight / scale_weight (one float32 scale per layer, amax / 448), plus the ``scaled_fp8`` marker key."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2:
            scale = v.float().abs().amax() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    return out


#: seconds per phase of this run (in the RESULT: where a slow case spends its time)
TIMES: dict = {}


@contextlib.contextmanager
def timed(phase):
    t0 = time.perf_counter()
    yield
    TIMES[phase] = round(TIMES.get(phase, 0.0) + time.perf_counter() - t0, 1)


def rel(a, b):
    return float((a - b).float().norm() / b.float().norm())


def state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def direct(model):
    """One model call (the denoiser ComfyUI samples with), fully loaded."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(C["latent"], generator=g)
    cond = C["cond"]()[0]
    mm.load_models_gpu([model], force_full_load=True)
    base = model.model
    conds = {"c_crossattn": cond[0]}
    if cond[1].get("pooled_output") is not None:
        conds["y"] = cond[1]["pooled_output"]
    if "guidance" in cond[1] or FAMILY.name == "chroma":  # Chroma's model takes guidance (core's default 0)
        conds["guidance"] = torch.tensor([cond[1].get("guidance", 0.0)])
    sigma = torch.tensor([0.6 if FAMILY.flow else 5.0])
    with torch.no_grad():
        out = base.apply_model(x, sigma, **conds).float()
    mm.unload_all_models()
    return out


def with_setting(model):
    """The family's distilled setting's shift (core ModelSamplingSD3 node, the model's own multiplier)."""
    if "shift" not in SETTING:
        return model
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    ms = model.get_model_object("model_sampling")
    # Wan: the model's own multiplier (1000). Qwen-Image samples as FLUX (timestep = sigma, no multiplier): its
    # workflows set the shift with ModelSamplingAuraFlow, which is this patch with multiplier 1.
    return ModelSamplingSD3().patch(model, SETTING["shift"], multiplier=float(getattr(ms, "multiplier", 1.0)))[0]


# ------------------------------------------------------------------------------------------------------ checks
def check_load():
    import nodes

    core = comfy.sd.load_diffusion_model(PATH)
    config = type(core.model.model_config).__name__
    assert config == C["config"], f"ComfyUI detected {config}, expected {C['config']}"
    assert families.family_of_module(core.model.diffusion_model) is FAMILY
    assert families.family_of_keys(list(_keys())) is FAMILY
    y_core = direct(core)
    core_size = core.model_size()
    out = {"config": config, "family": FAMILY.name, "core_size": core_size,
           "core_scaled_fp8": str(core.model.model_config.scaled_fp8)}
    models = {}
    for fmt in FORMATS:
        for how in ("loader", "quantize_model"):
            t0 = time.perf_counter()
            if how == "loader":
                res = QSchedDiffusionModelLoader().load(C["file"], fmt, "auto")["result"]
            else:
                res = QSchedQuantizeModel().quantize(core, fmt, "auto")["result"]
            secs = time.perf_counter() - t0
            TIMES[f"quantize {fmt}"] = round(TIMES.get(f"quantize {fmt}", 0.0) + secs, 1)
            q, text = res[0], res[-1]
            report = q.model.qsched_report
            assert report.family.startswith(FAMILY.name), report.family
            layers = dict(quant_ops.quantized_layers(q.model.diffusion_model))
            assert layers and len(layers) == len(report.quantized)
            # every skipped Linear is in the family's table, with that entry's reason, and nothing else is skipped
            for name, why in report.skipped.items():
                hit = next(p for p in FAMILY.skip if name == p or name.startswith(p + "."))
                assert why == FAMILY.skip[hit], (name, why)
            size, held = q.model_size(), state_bytes(q.model)
            assert abs(size - held) <= 0.05 * held, (size, held)
            lin_q = sum(m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() *
                        m.weight_scale.element_size() for m in layers.values())
            lin_bf16 = sum(m.in_features * m.out_features * 2 for m in layers.values())
            with timed(f"direct {fmt}"):
                y = direct(q)
            out[f"{fmt}/{how}"] = {"quantized": len(layers), "skipped": sorted(report.skipped), "size": size,
                                   "held": held, "size_vs_core": size / core_size,
                                   "quantized_weights_vs_bf16": lin_q / lin_bf16, "rel_err": rel(y, y_core),
                                   "seconds": round(secs, 2), "report": text.splitlines()[0],
                                   "scaled_fp8_layers": report.scaled_fp8}
            if how == "loader":
                models[fmt] = q
            else:  # the quantized layers (codes, scales, exponents) of the two ways, tensor for tensor
                ref = dict(quant_ops.quantized_layers(models[fmt].model.diffusion_model))
                out[f"{fmt}/{how}"]["same_codes_as_loader"] = ref.keys() == layers.keys() and all(
                    all(torch.equal(getattr(m, t), getattr(ref[n], t)) for t in ("weight", "weight_scale")
                        if getattr(m, t, None) is not None) and
                    (m.weight_exp is None or torch.equal(m.weight_exp, ref[n].weight_exp)) for n, m in layers.items())
            mm.unload_all_models()
    # the family's distilled setting: Q-Sched KSampler / Q-Sched Sampler (identity) == core, on bf16 and quantized
    steps, cfg, sampler, sched = SETTING["steps"], SETTING["cfg"], SETTING["sampler"], SETTING["scheduler"]
    latent = {"samples": torch.zeros(C["latent"])}
    identity = Coefficients.identity(steps)
    ramp = Coefficients.ramp(steps, 0.97, 1.0, 1.03, 1.0)
    sampled = {}
    for key, m in (("bf16", core), ("w4a8", models["w4a8"]), ("w8a8-fp8", models["w8a8-fp8"])):
        m = with_setting(m)
        pos, neg = C["cond"](), C["cond"]()
        with timed(f"sample {key}"):
            y_core = nodes.KSampler().sample(m, 7, steps, cfg, sampler, sched, pos, neg, latent, 1.0)[0]["samples"]
            y_pack = QSchedKSampler().sample(m, pos, neg, latent, 7, steps, cfg, sampler, sched, 1.0, 1.0,
                                             coefficients=identity)[0]["samples"]
            assert torch.equal(y_pack, y_core), (key, rel(y_pack, y_core))
            sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), sched, steps).cpu()
            noise = comfy.sample.prepare_noise(latent["samples"], 7)

            def custom(smp):
                return comfy.sample.sample_custom(m, noise, cfg, smp, sigmas, pos, neg, latent["samples"], seed=7,
                                                  disable_pbar=True)

            # bf16: Q-Sched Sampler (identity) in core's SamplerCustom == core KSampler, and a coefficient ramp
            # changes the latent. The quantized models run the comparison that depends on the model (Q-Sched KSampler
            # == core KSampler above): each run is `steps` model calls, this check's cost on a CPU.
            if key == "bf16":
                b = custom(QSchedSampler().get_sampler(sampler, 1.0, identity)[0])
                assert torch.equal(b, y_core), (key, rel(b, y_core))
                r = custom(QSchedSampler().get_sampler(sampler, 1.0, ramp)[0])
                assert not torch.equal(r, y_core), key
        sampled[key] = y_core.float()
        mm.unload_all_models()
    out["sampling"] = {"setting": C["setting"], **SETTING, "identity_equals_core": True,
                       "w4a8_vs_bf16": rel(sampled["w4a8"], sampled["bf16"]),
                       "w8a8-fp8_vs_bf16": rel(sampled["w8a8-fp8"], sampled["bf16"])}
    return {**out, "timings": TIMES}


def check_refused():
    """What the loaders say where they cannot quantize, through the pack's real loading path: a file of a family this
    ComfyUI does not know (the loader node: one NodeInputError naming its input and what to do), and a model in which
    nothing is left to quantize (``load_quantized`` / ``quantize_comfy_model``, the functions behind the loader and
    Quantize Model, with every block skipped: the error names the layer types holding the weights)."""
    from qsched_pack.nodes.common import NodeInputError
    from qsched_pack.nodes.quant_model import load_quantized, quantize_comfy_model

    out = {}
    try:
        QSchedDiffusionModelLoader().load(C["file"], "w4a8", "auto")
    except NodeInputError as exc:
        out["newer_family"] = {"type": type(exc).__name__, "input": exc.input_name, "message": str(exc)}
    else:
        raise AssertionError("the loader accepted a file whose layers do not fit the model ComfyUI built")
    wan = os.path.join(DM, CASES["wan22_a14b"]["file"])
    if not os.path.exists(wan):
        raise AssertionError("run the wan22_a14b case first (it writes the file this check reads)")
    core = comfy.sd.load_diffusion_model(wan)
    for how, call in (("loader", lambda: load_quantized(wan, "w4a8", extra_skip=("blocks",))),
                      ("quantize_model", lambda: quantize_comfy_model(core, "w4a8", extra_skip=("blocks",)))):
        try:
            call()
        except ValueError as exc:
            out[f"nothing_to_quantize/{how}"] = {"type": type(exc).__name__, "message": str(exc)}
        else:
            raise AssertionError(f"{how}: no error for a model with nothing to quantize")
    return out


def _keys():
    from safetensors import safe_open

    with safe_open(PATH, "pt") as f:
        return list(f.keys())


def lora_sd(model, fmt: str, rank=4, scale=0.3):
    """A LoRA on every Linear of the diffusion model that core's key map reaches in format ``fmt``: kohya
    (``lora_unet_<diffusers name with _>``), diffusers (``transformer.<diffusers name>.lora_A/lora_B``), lightx2v
    (``diffusion_model.<name>.lora_down/lora_up/alpha``). Returns (state dict, model keys it patches)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(3)
    out, targets = {}, set()
    for lkey, target in sorted(key_map.items()):
        if fmt == "kohya" and not lkey.startswith("lora_unet_"):
            continue
        if fmt == "diffusers" and not lkey.startswith("transformer."):
            continue
        if fmt == "lightx2v" and not lkey.startswith("diffusion_model."):
            continue
        mkey, sl = (target, None) if isinstance(target, str) else target[:2]
        if not isinstance(target, str) and len(target) > 2:  # a key whose patch goes through a transform
            continue
        w = sd.get(mkey)
        if w is None or w.ndim != 2 or mkey in targets and sl is None:
            continue
        n_out = w.shape[0] if sl is None else sl[2]
        down = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5 * scale
        up = torch.randn(n_out, rank, generator=g) / rank ** 0.5 * scale
        if fmt == "diffusers":
            out[f"{lkey}.lora_A.weight"], out[f"{lkey}.lora_B.weight"] = down, up
        else:
            out[f"{lkey}.lora_down.weight"], out[f"{lkey}.lora_up.weight"] = down, up
            out[f"{lkey}.alpha"] = torch.tensor(float(rank))
        targets.add(mkey)
    return out, targets


def check_lora():
    core = comfy.sd.load_diffusion_model(PATH)
    fmt = SETTING.get("lora", "kohya")
    lsd, targets = lora_sd(core, fmt)
    assert targets, "no LoRA key in this format maps onto the model"
    y0 = direct(core)
    t0 = time.perf_counter()
    core_l = comfy.sd.load_lora_for_models(core, None, lsd, 1.0, 0)[0]
    assert set(core_l.patches) == targets, (len(core_l.patches), len(targets))
    y_l = direct(core_l)
    d_ref = y_l - y0
    out = {"format": fmt, "lora_tensors": len(lsd), "patched_weights": len(targets),
           "lora_effect_bf16": float(d_ref.norm() / y0.norm())}
    for qfmt in FORMATS:
        with timed(f"quantize {qfmt}"):
            q = QSchedDiffusionModelLoader().load(C["file"], qfmt, "auto")["result"][0]
        yq = direct(q)
        t0 = time.perf_counter()
        ql = comfy.sd.load_lora_for_models(q, None, lsd, 1.0, 0)[0]
        assert set(ql.patches) == targets
        t_apply = time.perf_counter() - t0
        t0 = time.perf_counter()
        y_ql = direct(ql)  # direct() loads the model: the patches are applied to the quantized codes here
        d_q = y_ql - yq
        t_patch_run = time.perf_counter() - t0
        quantized = {f"diffusion_model.{n}.weight" for n, _ in quant_ops.quantized_layers(q.model.diffusion_model)}
        assert torch.equal(direct(q), yq)  # the base model is unchanged after the LoRA clone ran
        out[qfmt] = {"lora_contribution_rel_diff": rel(d_q, d_ref), "patched_quantized_layers":
                     len(targets & quantized), "load_s": round(t_apply, 3), "patch_and_run_s": round(t_patch_run, 3),
                     "rel_err_vs_bf16_with_lora": rel(y_ql, y_l), "rel_err_without_lora": rel(yq, y0)}
        if qfmt == "w4a8":  # the other way: the LoRA merged into the full-precision MODEL, then Quantize Model
            with timed("quantize merged w4a8"):
                qm = QSchedQuantizeModel().quantize(core_l, qfmt, "auto")["result"][0]
            out[qfmt]["merged_then_quantized_rel_err_vs_bf16_with_lora"] = rel(direct(qm), y_l)
            del qm
        mm.unload_all_models()
    return {**out, "timings": TIMES}


def check_coefficients():
    """Per-step coefficients on this family's flow/eps sampler: the Q-Sched Sampler's latent equals the Q-Sched
    Euler update written out here (x' = c_x x, denoised' = c_x x - c_eps (x - denoised)), on ComfyUI's denoiser."""
    import comfy.k_diffusion.sampling  # noqa: F401

    core = with_setting(comfy.sd.load_diffusion_model(PATH))
    steps = SETTING["steps"]
    coeffs = Coefficients.ramp(steps, 0.95, 1.0, 1.05, 1.0)

    @torch.no_grad()
    def written_out(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
            cx, ce = coeffs.c_x[i], coeffs.c_eps[i]
            x_c = x * cx
            den = x_c - ce * (x - denoised)
            x = x_c + (x_c - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    latent = torch.zeros(C["latent"])
    pos = C["cond"]()
    sigmas = comfy.samplers.calculate_sigmas(core.get_model_object("model_sampling"), SETTING["scheduler"],
                                             steps).cpu()
    noise = comfy.sample.prepare_noise(latent, 7)
    ref = comfy.sample.sample_custom(core, noise, 1.0, comfy.samplers.KSAMPLER(written_out), sigmas, pos, pos,
                                     latent, seed=7, disable_pbar=True)
    ours = comfy.sample.sample_custom(core, noise, 1.0, QSchedSampler().get_sampler("euler", 1.0, coeffs)[0],
                                      sigmas, pos, pos, latent, seed=7, disable_pbar=True)
    plain = comfy.sample.sample_custom(core, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, pos, pos,
                                       latent, seed=7, disable_pbar=True)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), rel(ours, ref)
    return {"max_abs_diff_vs_written_out": float((ours - ref).abs().max()), "coefficients_effect": rel(ours, plain),
            "latent_shape": list(latent.shape), "flow": FAMILY.flow, "timings": TIMES}


if __name__ == "__main__":
    with timed("build"):
        build()
    report(globals(), CHECK)
