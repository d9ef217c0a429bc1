"""Sampling nodes: coefficients, presets, the Q-Sched SAMPLER and SIGMAS, and an all-in-one KSampler.

Thin adapters: the update rules live in ``qsched.samplers`` (one function per sampler, k-diffusion signature, so
it is the body of a ComfyUI ``KSAMPLER``), the schedules in ``qsched.schedules``, the value type in
``qsched.coefficients``. ComfyUI modules are imported inside functions only.
"""

from __future__ import annotations

import os

from ..qsched import samplers as qsamplers
from ..qsched import schedules as qschedules
from ..qsched.coefficients import C_MAX, Coefficients, check_coefficient, check_steps
from .common import (CATEGORY_SAMPLING, COEFFICIENTS, ETA, MAX_UI_STEPS, NodeInputError, check_combo, find_preset,
                     is_flow, load_preset, model_sampling_of, node_input, preset_file, preset_names, steps_input,
                     validation_result)
from .graph import (FAMILY_WORDS, GRAPH_CHECK_INPUT, compat_warnings, family_of_name, raise_graph_problem,
                    sampler_model_is_flow)

#: The samplers of ``qsched.samplers.SAMPLERS`` in widget order (SDXL-Turbo's first).
SAMPLER_NAMES = ("euler_ancestral", "euler", "tcd", "lcm")
NOISY_SAMPLERS = ("euler_ancestral", "tcd", "lcm")
#: "simple" / "sgm_uniform" are ComfyUI's own schedules on the model's sigma table (the paper's timesteps for
#: SDXL-Turbo, FLUX schnell, and LCM models patched with ModelSamplingDiscrete "lcm"); the family names give the
#: diffusers schedules of ``qsched.schedules`` (e.g. "tcd": 999, 759, 499, 259 on a plain SDXL/SD1.5 model).
#: ComfyUI's own schedulers (``comfy.samplers.KSampler.SCHEDULERS`` of 0.3.64), used where ComfyUI is absent (unit
#: tests); in ComfyUI the live list is read, so schedulers added by core or other packs appear too.
COMFY_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal")
#: The few-step families of ``qsched.schedules`` (Q-Sched Scheduler): the diffusers timesteps of that family.
FAMILY_SCHEDULES = tuple(qschedules.FAMILIES)
#: Everything ``schedule_sigmas`` accepts (ComfyUI's names first, then the families).
SCHEDULES = COMFY_SCHEDULERS + FAMILY_SCHEDULES

#: Coefficient widgets: the whole range the library accepts ((0, C_MAX]), moved in steps of 0.001 from 1.0 (a
#: slider over that range would put 0.8-1.2, where every useful value lies, in 4 % of its width).
_COEFF = {"default": 1.0, "min": 0.001, "max": C_MAX, "step": 0.001, "round": 0.001}


def _coeff(tooltip: str) -> tuple:
    return ("FLOAT", {**_COEFF, "tooltip": tooltip})


def comfy_schedulers() -> list[str]:
    """ComfyUI's scheduler names (the core KSampler's list), or ``COMFY_SCHEDULERS`` without ComfyUI."""
    try:
        import comfy.samplers
    except ImportError:
        return list(COMFY_SCHEDULERS)
    return list(comfy.samplers.KSampler.SCHEDULERS)


SAMPLER_TIP = ("Base update rule. euler_ancestral: SDXL-Turbo. euler: FLUX schnell (flow Euler). tcd: TCD/PCM LoRAs "
               "(eps models only, not FLUX). lcm: LCM models/LoRAs. Same names as ComfyUI's samplers.")
ETA_TIP = ("Used only by euler_ancestral (ancestral noise; 1 = SDXL-Turbo's EulerAncestral) and tcd (gamma; 0.3 is "
           "TCD's default, 0 = deterministic). euler and lcm ignore it.")


_COEFFS_OPTIONAL = (COEFFICIENTS, {"tooltip": "Per-step c_x / c_eps from Q-Sched Coefficients or Q-Sched Load Preset. "
                                              "Leave unconnected for the stock sampler (all coefficients 1)."})


# ---------------------------------------------------------------------------------------------------------------
# sampler and schedule construction (shared with the calibration node)
# ---------------------------------------------------------------------------------------------------------------
def qsched_sample(model, x, sigmas, extra_args=None, callback=None, disable=None, *, base="euler_ancestral",
                  eta=1.0, coefficients=None, node="Q-Sched Sampler", noise_sampler=None):
    """The body of the ComfyUI ``KSAMPLER``: picks eps/flow from the model's ``model_sampling`` (CONST → flow).

    ``noise_sampler`` (optional, used by the calibration node): the per-step noise of euler_ancestral / tcd / lcm;
    None draws it from ComfyUI's ``extra_args["seed"]`` like the core samplers."""
    ms = model.inner_model.inner_model.model_sampling
    steps = len(sigmas) - 1
    if coefficients is not None:
        with node_input(node, "coefficients", f" (steps = length of SIGMAS - 1): set steps={steps} on the Q-Sched "
                                              f"Coefficients node, or make the schedule {coefficients.steps} steps"):
            coefficients.check_steps(steps)
    kwargs = sampler_options(ms, base, eta, node, noise_sampler)
    return qsamplers.SAMPLERS[base](model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                    coefficients=coefficients, **kwargs)


def sampler_options(model_sampling, base: str, eta: float, node: str, noise_sampler=None) -> dict:
    """The keywords of ``qsched.samplers.SAMPLERS[base]`` (all but the coefficients) for a ComfyUI model_sampling:
    parameterization, eta, TCD's alphas_cumprod, LCM's boundary condition, the per-step noise."""
    flow = is_flow(model_sampling)
    with node_input(node, "sampler_name"):
        qsamplers.check_sampler(base, "flow" if flow else "eps")
    kwargs = {"parameterization": "flow" if flow else "eps"}
    if base in ("euler_ancestral", "tcd"):
        kwargs["eta"] = eta
    if base == "tcd":
        kwargs["alphas_cumprod"] = _alphas_cumprod(model_sampling, node)
    if base == "lcm":
        # ComfyUI applies LCM's boundary condition inside the model (ModelSamplingDiscrete "lcm"), as its own
        # lcm sampler expects; applying it here too would do it twice.
        kwargs["boundary_condition"] = False
    if noise_sampler is not None and base in NOISY_SAMPLERS:
        kwargs["noise_sampler"] = noise_sampler
    return kwargs


def _alphas_cumprod(model_sampling, node):
    import torch

    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is None or len(sigmas) != qschedules.NUM_TRAIN_TIMESTEPS:
        raise NodeInputError(node, "sampler_name", (
            "'tcd' needs a model on the 1000-step discrete schedule (SD1.5 / SDXL); this MODEL's sampling has "
            f"{'no sigma table' if sigmas is None else f'{len(sigmas)} sigmas'} (remove ModelSamplingDiscrete 'lcm' "
            "or similar patches before a TCD sampler)"))
    s = sigmas.detach().to("cpu", torch.float64)
    return 1.0 / (1.0 + s * s)


def make_sampler(base: str, eta: float, coefficients, node: str = "Q-Sched Sampler", noise_sampler=None):
    """ComfyUI ``KSAMPLER`` running ``qsched_sample`` (shared by the sampler, KSampler and calibration nodes)."""
    import comfy.samplers

    check_combo(node, "sampler_name", base, SAMPLER_NAMES)
    if coefficients is not None and not isinstance(coefficients, Coefficients):
        raise NodeInputError(node, "coefficients", f"expected {COEFFICIENTS}, got {type(coefficients).__name__}")
    options = {"base": base, "eta": float(eta), "coefficients": coefficients, "node": node}
    if noise_sampler is not None:
        options["noise_sampler"] = noise_sampler
    return comfy.samplers.KSAMPLER(qsched_sample, extra_options=options)


def schedule_sigmas(model, schedule: str, steps: int, denoise: float = 1.0, node: str = "Q-Sched Scheduler",
                    input_name: str = "scheduler"):
    """``steps + 1`` sigmas (float32, last 0): a ComfyUI scheduler name or a family of ``qsched.schedules``.
    ``denoise < 1`` keeps the last ``steps`` of a longer schedule, as ComfyUI's KSampler and BasicScheduler do."""
    import torch

    if schedule not in FAMILY_SCHEDULES:
        check_combo(node, input_name, schedule, comfy_schedulers())
    if denoise <= 0.0:
        return torch.FloatTensor([])
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    ms = model_sampling_of(model)
    if schedule not in FAMILY_SCHEDULES:
        import comfy.samplers

        sigmas = comfy.samplers.calculate_sigmas(ms, schedule, total).cpu()
    else:
        flow = is_flow(ms)
        if flow != (schedule == "flux_schnell"):
            kind = "a flow model (FLUX, SD3)" if flow else "an eps-prediction model (SD1.5, SDXL, LCM/TCD/PCM)"
            fits = "'flux_schnell'" if flow else "'sdxl_turbo', 'lcm', 'tcd' or 'pcm'"
            raise NodeInputError(node, input_name, f"'{schedule}' does not fit this MODEL, which is {kind}: use "
                                                   f"{fits}")
        if flow:
            sigmas = qschedules.few_step_sigmas(schedule, total)
        else:
            sigmas = qschedules.few_step_sigmas(schedule, total, alphas_cumprod=_alphas_cumprod(ms, node).float())
        sigmas = sigmas.float()
    return sigmas[-(steps + 1):]


def _parse_override(text: str, steps: int, field: str):
    text = (text or "").strip()
    if not text:
        return None
    return Coefficients.parse_list(text, steps, field)


def build_coefficients(steps, c_x_start, c_x_end, c_eps_start, c_eps_end, c_x_override="", c_eps_override="",
                       node="Q-Sched Coefficients") -> Coefficients:
    with node_input(node, "steps"):
        check_steps(steps, MAX_UI_STEPS)
    values = {}
    for name, v in (("c_x_start", c_x_start), ("c_x_end", c_x_end), ("c_eps_start", c_eps_start),
                    ("c_eps_end", c_eps_end)):
        with node_input(node, name):
            values[name] = check_coefficient(v, name)
    ramp = Coefficients.ramp(steps, values["c_x_start"], values["c_x_end"], values["c_eps_start"], values["c_eps_end"])
    c_x, c_eps = ramp.c_x, ramp.c_eps
    for name, text in (("c_x_override", c_x_override), ("c_eps_override", c_eps_override)):
        with node_input(node, name):
            parsed = _parse_override(text, steps, name)
        if parsed is not None:
            if name == "c_x_override":
                c_x = parsed
            else:
                c_eps = parsed
    return Coefficients(c_x, c_eps)


def _check_coefficient_inputs(steps, c_x_override, c_eps_override, node="Q-Sched Coefficients") -> None:
    """What can be checked at queue time (None = linked from another node)."""
    if steps is None:
        return
    with node_input(node, "steps"):
        check_steps(steps, MAX_UI_STEPS)
    for name, text in (("c_x_override", c_x_override), ("c_eps_override", c_eps_override)):
        if text is not None:
            with node_input(node, name):
                _parse_override(text, steps, name)


def describe(c: Coefficients) -> str:
    fmt = lambda vs: ", ".join(f"{v:.4g}" for v in vs)  # noqa: E731
    return f"{c.steps} steps{' (identity)' if c.is_identity else ''}\nc_x:   {fmt(c.c_x)}\nc_eps: {fmt(c.c_eps)}"


# ---------------------------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------------------------
class QSchedCoefficients:
    DISPLAY_NAME = "Q-Sched Coefficients"
    DESCRIPTION = ("Per-step Q-Sched coefficients: c_x scales the sample and c_eps the model's noise prediction at "
                   "each step (paper Eq. 4). Linear ramps from start (first step) to end (last step), like the "
                   "official linspace(start, end, steps). All 1.0 = the stock sampler.")
    CATEGORY = CATEGORY_SAMPLING
    RETURN_TYPES = (COEFFICIENTS, "INT", "STRING")
    RETURN_NAMES = ("coefficients", "steps", "summary")
    OUTPUT_TOOLTIPS = ("Coefficients for Q-Sched Sampler / Q-Sched KSampler / Q-Sched Save Preset.",
                       "This node's steps: connect it to the sampler's (or Q-Sched Scheduler's) steps so the two "
                       "always match (same slot as on Q-Sched Load Preset).",
                       "The per-step values as text.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": steps_input("Number of sampling steps; must equal the steps of the sampler/scheduler "
                                      "these coefficients are used with."),
                "c_x_start": _coeff("c_x (sample multiplier) at the first step. <1 shrinks the noisy sample, "
                                    ">1 grows it. The paper searches 0.8-1.2; allowed (0, 10]."),
                "c_x_end": _coeff("c_x at the last step (linear ramp in between). The official search keeps 1.0."),
                "c_eps_start": _coeff("c_eps (noise-prediction multiplier) at the first step. >1 removes more "
                                       "predicted noise; quantized models often need slightly >1."),
                "c_eps_end": _coeff("c_eps at the last step (linear ramp in between). The official search keeps "
                                     "1.0."),
            },
            "optional": {
                "c_x_override": ("STRING", {"default": "", "multiline": False, "tooltip":
                                            "Optional per-step c_x replacing the ramp, e.g. '0.95, 0.97, 0.99, 1.0' "
                                            "(one number per step, or one number for all). Empty = use the ramp."}),
                "c_eps_override": ("STRING", {"default": "", "multiline": False, "tooltip":
                                              "Optional per-step c_eps replacing the ramp, e.g. '1.05, 1.03, 1.01, "
                                              "1.0'. Empty = use the ramp."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, steps=None, c_x_override=None, c_eps_override=None):
        # Naming `steps` here turns off ComfyUI's own min/max check for it, so the range is checked here too.
        return validation_result(_check_coefficient_inputs, steps, c_x_override, c_eps_override)

    def build(self, steps, c_x_start, c_x_end, c_eps_start, c_eps_end, c_x_override="", c_eps_override=""):
        c = build_coefficients(steps, c_x_start, c_x_end, c_eps_start, c_eps_end, c_x_override, c_eps_override)
        return (c, c.steps, describe(c))


class QSchedLoadPreset:
    DISPLAY_NAME = "Q-Sched Load Preset"
    DESCRIPTION = ("Loads Q-Sched coefficients from a preset JSON in models/qsched/ (written by Q-Sched Save Preset "
                   "or the calibration). A preset holds one c_x and one c_eps per step.")
    CATEGORY = CATEGORY_SAMPLING
    RETURN_TYPES = (COEFFICIENTS, "INT", "STRING")
    RETURN_NAMES = ("coefficients", "steps", "summary")
    OUTPUT_TOOLTIPS = ("The preset's coefficients.", "The preset's number of steps: connect it to the sampler's "
                       "steps so the two always match.", "The per-step values and the preset's metadata as text.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"preset": (preset_names(), {"tooltip": "A preset file in models/qsched/ (*.json). "
                                                                    "New presets appear after a calibration or Save "
                                                                    "Preset ran (or press 'r')."})},
                "hidden": GRAPH_CHECK_INPUT}

    @classmethod
    def VALIDATE_INPUTS(cls, preset=None, qsched_graph_check=None):
        # Naming `preset` here turns off ComfyUI's combo-membership check: _load covers it (missing file).
        if preset is not None:
            validation_result(load_preset, preset)
        return validation_result(raise_graph_problem, cls.DISPLAY_NAME, qsched_graph_check)

    @classmethod
    def IS_CHANGED(cls, preset, **hidden):
        try:
            path = find_preset(preset)
        except NodeInputError:
            path = None
        return os.path.getmtime(path) if path else float("nan")

    def load(self, preset, qsched_graph_check=None):
        c = load_preset(preset)
        text = preset_summary(c)
        uses = (qsched_graph_check or {}).get("uses") if isinstance(qsched_graph_check, dict) else None
        warnings = compat_warnings(c.metadata, uses or [])
        if warnings:
            text = "\n".join(f"⚠ {w}" for w in warnings) + "\n" + text
        return {"ui": {"text": [text]}, "result": (c, c.steps, text)}


def preset_summary(c: Coefficients) -> str:
    """The coefficients and, for a calibrated preset, what it was made for, in a few plain lines."""
    lines = [describe(c)]
    m = c.metadata or {}
    sampling = m.get("sampling") if isinstance(m.get("sampling"), dict) else {}
    family = m.get("family") or sampling.get("model_class")
    family = FAMILY_WORDS.get(family_of_name(family), family)  # "BaseModel" -> "SD 1.x/2.x"
    made = [str(v) for v in (family,
                             m.get("quant") or ("16-bit" if "quant" in m else None),
                             m.get("sampler") or sampling.get("sampler")) if v]
    if sampling.get("width") and sampling.get("height"):
        made.append(f"{sampling['width']}x{sampling['height']}")
    if made:
        lines.append("calibrated for: " + ", ".join(made))
    scores = m.get("scores") if isinstance(m.get("scores"), dict) else {}
    best, ident = (scores.get(k, {}).get("jaq") if isinstance(scores.get(k), dict) else None
                   for k in ("best", "identity"))
    if isinstance(best, (int, float)) and isinstance(ident, (int, float)):
        lines.append(f"JAQ {best:.4f} vs {ident:.4f} for the stock sampler ({best - ident:+.4f})")
    return "\n".join(lines)


class QSchedSavePreset:
    DISPLAY_NAME = "Q-Sched Save Preset"
    DESCRIPTION = "Saves coefficients as a preset JSON in models/qsched/, for Q-Sched Load Preset and for sharing."
    CATEGORY = CATEGORY_SAMPLING
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the written preset.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "coefficients": (COEFFICIENTS, {"tooltip": "The coefficients to save."}),
            "name": ("STRING", {"default": "my_preset", "tooltip":
                                "File name inside models/qsched/ (.json is added). Letters, digits, '-', '_', '.' "
                                "and '/' for a subfolder."}),
            "overwrite": ("BOOLEAN", {"default": True, "tooltip": "Replace an existing preset of the same name."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, name=None):
        return True if name is None else validation_result(preset_file, name)

    def save(self, coefficients, name, overwrite):
        node = "Q-Sched Save Preset"
        if not isinstance(coefficients, Coefficients):
            raise NodeInputError(node, "coefficients", f"expected {COEFFICIENTS}, got {type(coefficients).__name__}")
        path = preset_file(name)
        if os.path.exists(path) and not overwrite:
            raise NodeInputError(node, "overwrite", f"{path} exists; turn overwrite on or choose another name")
        with node_input(node, "name"):
            coefficients.save(path)
        return {"ui": {"text": [f"saved {path}\n{describe(coefficients)}"]}, "result": (path,)}


class QSchedSampler:
    DISPLAY_NAME = "Q-Sched Sampler"
    DESCRIPTION = ("A SAMPLER for SamplerCustom / SamplerCustomAdvanced that applies Q-Sched coefficients at every "
                   "step. eps or flow (FLUX) is taken from the model. With no coefficients it equals ComfyUI's own "
                   "euler / euler_ancestral / lcm sampler.")
    CATEGORY = CATEGORY_SAMPLING
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("Connect to the sampler input of SamplerCustom or SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sampler_name": (list(SAMPLER_NAMES), {"default": "euler_ancestral", "tooltip": SAMPLER_TIP}),
                "eta": (ETA[0], {**ETA[1], "tooltip": ETA_TIP}),
            },
            "optional": {"coefficients": _COEFFS_OPTIONAL},
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID", **GRAPH_CHECK_INPUT},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, qsched_graph_check=None):
        return validation_result(raise_graph_problem, cls.DISPLAY_NAME, qsched_graph_check)

    def get_sampler(self, sampler_name, eta, coefficients=None, prompt=None, unique_id=None, qsched_graph_check=None):
        if sampler_name in qsamplers.EPS_ONLY and unique_id is not None and sampler_model_is_flow(prompt, unique_id):
            # The model that will reach this sampler is a flow model: say so here, on this node, before anything
            # is sampled (else the error comes from inside SamplerCustomAdvanced, after loading and quantizing).
            with node_input(self.DISPLAY_NAME, "sampler_name"):
                qsamplers.check_sampler(sampler_name, "flow")
        return (make_sampler(sampler_name, eta, coefficients),)


class QSchedScheduler:
    DISPLAY_NAME = "Q-Sched Scheduler"
    DESCRIPTION = ("SIGMAS of a few-step family, as diffusers runs it: sdxl_turbo (999, 749, 499, 249), "
                   "flux_schnell (1, .75, .5, .25), lcm / tcd / pcm (999, 759, 499, 259 on the plain SD/SDXL "
                   "table). For ComfyUI's own schedulers use BasicScheduler.")
    CATEGORY = CATEGORY_SAMPLING
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("Connect to the sigmas input of SamplerCustom or SamplerCustomAdvanced.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to sample; its noise schedule (eps or flow) is used."}),
            # Named "family", not "scheduler": on KSampler-like nodes "scheduler" is ComfyUI's list (simple, karras...).
            "family": (list(FAMILY_SCHEDULES), {"default": "sdxl_turbo", "tooltip":
                       "The model family whose diffusers timesteps to use: sdxl_turbo, lcm, tcd, pcm (eps models) "
                       "or flux_schnell (flow). sdxl_turbo / flux_schnell equal ComfyUI's 'simple' scheduler."}),
            "steps": steps_input("Number of steps; must equal the steps of the Q-Sched coefficients."),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "1.0 for text-to-image; lower keeps only the last steps (image-to-image)."}),
        }, "hidden": GRAPH_CHECK_INPUT}

    @classmethod
    def VALIDATE_INPUTS(cls, qsched_graph_check=None):
        return validation_result(raise_graph_problem, cls.DISPLAY_NAME, qsched_graph_check)

    def get_sigmas(self, model, family, steps, denoise, qsched_graph_check=None):
        return (schedule_sigmas(model, family, steps, denoise, input_name="family"),)


class QSchedKSampler:
    DISPLAY_NAME = "Q-Sched KSampler"
    DESCRIPTION = ("All-in-one sampler: ComfyUI's KSampler (same inputs, same order) with a Q-Sched sampler and "
                   "coefficients. With no coefficients (or all 1.0) it gives the same latent as KSampler with the same "
                   "sampler_name and scheduler.")
    CATEGORY = CATEGORY_SAMPLING
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The (quantized) model used for denoising."}),
                "positive": ("CONDITIONING", {"tooltip": "What to include in the image."}),
                "negative": ("CONDITIONING", {"tooltip": "What to exclude (ignored at cfg 1.0, as with SDXL-Turbo "
                                                         "and FLUX schnell)."}),
                "latent_image": ("LATENT", {"tooltip": "The latent to denoise (Empty Latent Image for txt2img)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the initial noise and of the ancestral noise."}),
                "steps": steps_input("Sampling steps (4 for SDXL-Turbo and FLUX schnell in the paper); must "
                                      "equal the steps of the coefficients."),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip":
                                  "Classifier-free guidance. 1.0 for SDXL-Turbo and FLUX schnell (no negative pass)."}),
                "sampler_name": (list(SAMPLER_NAMES), {"default": "euler_ancestral", "tooltip": SAMPLER_TIP}),
                "scheduler": (comfy_schedulers(), {"default": "simple", "tooltip":
                              "ComfyUI's schedulers, as on KSampler. simple = the paper's timesteps for SDXL-Turbo "
                              "and FLUX schnell (999, 749, 499, 249). Family schedules (lcm / tcd / pcm): Q-Sched "
                              "Scheduler with SamplerCustom."}),
                "eta": (ETA[0], {**ETA[1], "tooltip": ETA_TIP}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                            "1.0 for text-to-image; lower for image-to-image."}),
            },
            "optional": {"coefficients": _COEFFS_OPTIONAL},
            "hidden": GRAPH_CHECK_INPUT,
        }

    @classmethod
    def VALIDATE_INPUTS(cls, qsched_graph_check=None):
        return validation_result(raise_graph_problem, cls.DISPLAY_NAME, qsched_graph_check)

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, eta, denoise,
               coefficients=None, qsched_graph_check=None):
        import comfy.sample
        import comfy.utils
        import latent_preview

        node = self.DISPLAY_NAME
        if coefficients is not None:
            with node_input(node, "coefficients", ": connect the 'steps' output of Q-Sched Coefficients / Q-Sched "
                                                  "Load Preset to 'steps' so the two always match"):
                coefficients.check_steps(steps, "input 'steps'")
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        if scheduler in FAMILY_SCHEDULES:  # a family name is Q-Sched Scheduler's choice, not a ComfyUI scheduler
            check_combo(node, "scheduler", scheduler, comfy_schedulers())
        sigmas = schedule_sigmas(model, scheduler, steps, denoise, node=node)
        ksampler = make_sampler(sampler_name, eta, coefficients, node=node)
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        samples = comfy.sample.sample_custom(model, noise, cfg, ksampler, sigmas, positive, negative, latent,
                                             noise_mask=latent_image.get("noise_mask"), callback=callback,
                                             disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples
        return (out,)


NODE_CLASS_MAPPINGS = {
    "QSchedCoefficients": QSchedCoefficients,
    "QSchedLoadPreset": QSchedLoadPreset,
    "QSchedSavePreset": QSchedSavePreset,
    "QSchedSampler": QSchedSampler,
    "QSchedScheduler": QSchedScheduler,
    "QSchedKSampler": QSchedKSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}
