"""Q-Sched Calibrate: the calibration search (calibration/search.py + runner.py) run on a ComfyUI MODEL/CLIP/VAE.

``ComfyGenerator`` implements calibration/generate.py's generator protocol with ComfyUI's own machinery: every
prompt is encoded once with the CLIP; sampling is ``comfy.sample.sample_custom`` with the KSAMPLER of
nodes/sampling.py (``make_sampler``), the SIGMAS of ``schedule_sigmas``; the VAE decodes. Common random numbers: the
initial noise of prompt i is ``prepare_noise`` seeded with seed i, and its per-step noise (euler_ancestral, tcd,
lcm) comes from its own generator (``calibration.generate.per_sample_noise_sampler``), so an image never depends
on the coefficient point nor on which prompts share its batch.

The node keeps the runner's record in ComfyUI's output directory (``output/qsched_calibration/<key>.jsonl``, the key
a hash of the run's fingerprint): queue the same settings again after an interrupt (Cancel, POST /interrupt, a
crash) and it goes on from the record, recomputing nothing. The preset is written atomically to
``models/qsched/<preset_name>.json``. ComfyUI modules are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

from ..qsched.coefficients import C_MAX, Coefficients
from .common import (CATEGORY_CALIBRATION, COEFFICIENTS, JAQ_SCORER, QSCHED_FOLDER, NodeInputError, is_flow,
                     model_sampling_of, register_qsched_folder)
from .sampling import (_ETA, EPS_ONLY_SAMPLERS, SAMPLER_NAMES, SCHEDULES, _preset_relpath, _steps_input, describe,
                       make_sampler, schedule_sigmas)
from .scoring import check_scorer, parse_prompt_lines

NODE = "Q-Sched Calibrate"
RECORD_DIR = "qsched_calibration"
#: Prompts shown in the preview grid (identity row vs best row): each column costs two extra images.
PREVIEW_PROMPTS = 4
SPACES = ("start", "start_end", "per_step")
STRATEGIES = ("pattern", "zoom", "grid")
MAX_POINTS = 101
MAX_BUDGET = 10_000_000
MAX_SEED = 2**32 - 1
SAMPLE_VALUES = 64  # values read per tensor for the model/VAE digests

log = logging.getLogger("qsched")


def default_prompts_text() -> str:
    from ..calibration.prompts import default_prompts

    return "\n".join(default_prompts())


# ---------------------------------------------------------------------------------------------------------------
# fingerprints: what identifies the model, VAE and text encodings a record was made with
# ---------------------------------------------------------------------------------------------------------------
def _update_tensor(h, t, full: bool = False) -> None:
    import torch

    t = t.detach()
    h.update(f"{tuple(t.shape)}|{str(t.dtype)}|".encode())
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return
    if not full and flat.numel() > SAMPLE_VALUES:
        n = flat.numel()
        idx = torch.arange(SAMPLE_VALUES, dtype=torch.int64) * (n - 1) // (SAMPLE_VALUES - 1)  # first ... last
        flat = flat[idx.to(flat.device)]
    h.update(flat.float().cpu().contiguous().numpy().tobytes())


def _update_obj(h, obj, full: bool = False) -> None:
    """Digest of nested tuples/lists/dicts of tensors, numbers and strings (anything else by type name)."""
    import torch

    if torch.is_tensor(obj):
        _update_tensor(h, obj, full)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"k:{k}|".encode())
            _update_obj(h, obj[k], full)
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}|".encode())
        for v in obj:
            _update_obj(h, v, full)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())
    else:
        h.update(f"<{type(obj).__name__}>|".encode())


def module_digest(module, backup: dict | None = None, prefix: str = "") -> str:
    """sha256 over every parameter/buffer's name, shape, dtype and ``SAMPLE_VALUES`` evenly spaced values.

    ``backup``: ComfyUI ModelPatcher's original weights of keys it patched in place (LoRA), so a loaded-and-patched
    model gives the same digest as a fresh one; the patches are digested separately."""
    h = hashlib.sha256()
    backup = backup or {}
    for name, t in module.state_dict(keep_vars=True).items():
        saved = backup.get(prefix + name)
        if saved is not None:
            t = saved.weight
        h.update(name.encode() + b"\0")
        _update_tensor(h, t)
    return h.hexdigest()


def quant_label(module) -> str | None:
    from ..qsched.quant.layers import QuantConv2d, QuantLinear

    names = sorted({m.spec.name for m in module.modules() if isinstance(m, (QuantLinear, QuantConv2d))})
    return "+".join(names) or None


def model_fingerprint(model) -> dict:
    dm = model.get_model_object("diffusion_model")
    ms = model_sampling_of(model)
    h = hashlib.sha256()
    h.update(module_digest(dm, getattr(model, "backup", None), "diffusion_model.").encode())
    _update_obj(h, dict(getattr(model, "patches", {}) or {}))  # LoRAs and other weight patches
    sm = hashlib.sha256()
    sm.update(type(ms).__name__.encode())
    _update_obj(sm, {k: v for k, v in ms.state_dict().items()}, full=True)
    for attr in ("shift", "multiplier", "sigma_data"):
        if hasattr(ms, attr):
            _update_obj(sm, {attr: getattr(ms, attr)})
    dtype = model.model_dtype() if hasattr(model, "model_dtype") else None
    return {"model_hash": h.hexdigest(), "model_class": type(model.model).__name__,
            "model_sampling": sm.hexdigest()[:16], "quant": quant_label(dm),
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else None}


def conditioning_digest(conds: list) -> str:
    h = hashlib.sha256()
    _update_obj(h, conds, full=True)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# generator (calibration.generate.Generator protocol)
# ---------------------------------------------------------------------------------------------------------------
def _batchable(a, b) -> bool:
    """Two encoded prompts (ComfyUI CONDITIONING, one entry each) can share a batch: same keys and shapes."""
    import torch

    if len(a) != 1 or len(b) != 1:
        return False
    (ta, da), (tb, db) = a[0], b[0]
    if ta.shape != tb.shape or set(da) != set(db):
        return False
    for k in da:
        va, vb = da[k], db[k]
        if torch.is_tensor(va) or torch.is_tensor(vb):
            if not (torch.is_tensor(va) and torch.is_tensor(vb) and va.shape == vb.shape and va.shape[:1] == (1,)):
                return False
        elif va != vb:
            return False
    return True


def _concat(conds: list) -> list:
    """[[cond [1,...], {pooled_output [1,...], ...}]] x n -> one CONDITIONING of batch n (same prompt order)."""
    import torch

    if len(conds) == 1:
        return conds[0]
    first = conds[0][0][1]
    d = {k: (torch.cat([c[0][1][k] for c in conds]) if torch.is_tensor(v) else v) for k, v in first.items()}
    return [[torch.cat([c[0][0] for c in conds]), d]]


class ComfyGenerator:
    """Generates calibration images on a ComfyUI MODEL / CLIP / VAE (see the module docstring)."""

    def __init__(self, model, clip, vae, prompts, *, steps: int, sampler: str, schedule: str, eta: float,
                 cfg: float, width: int, height: int, batch_size: int, on_images=None, check_interrupt=None):
        import torch

        self.model, self.clip, self.vae = model, clip, vae
        self.steps, self.sampler, self.schedule = steps, sampler, schedule
        self.eta, self.cfg = float(eta), float(cfg)
        self.width, self.height, self.batch_size = width, height, batch_size
        self.on_images, self.check_interrupt = on_images, check_interrupt
        self.calls = 0  # generate() calls, i.e. coefficient points computed (plus previews)
        self.kept: dict = {}  # (c_x, c_eps, prompts, seeds) -> images, for the coefficients in keep_for
        self.keep_for: set = set()
        self.flow = is_flow(model_sampling_of(model))
        if self.flow and sampler in EPS_ONLY_SAMPLERS:
            raise NodeInputError(NODE, "sampler", (
                f"'{sampler}' works only with eps-prediction models (SD1.5, SDXL, SDXL-Turbo, LCM/TCD/PCM LoRAs), but "
                "this MODEL is a flow model (FLUX, SD3): choose 'euler' (FLUX schnell), 'euler_ancestral' or 'lcm'"))
        self.sigmas = schedule_sigmas(model, schedule, steps, 1.0, node=NODE)
        make_sampler(sampler, eta, None, node=NODE)  # checks the sampler name before anything is encoded
        self.cond = {}
        for p in dict.fromkeys(prompts):  # each prompt once, reused at every point
            self.cond[p] = self._encode(p)
        self.negative = self._encode("")  # used only when cfg != 1
        latent = torch.zeros([1, 4, height // 8, width // 8])
        import comfy.sample

        self.latent_shape = tuple(comfy.sample.fix_empty_latent_channels(model, latent).shape[1:])

    def _encode(self, text: str):
        tokens = self.clip.tokenize(text)
        return self.clip.encode_from_tokens_scheduled(tokens)

    def fingerprint(self) -> dict:
        fp = {"class": "ComfyGenerator", **model_fingerprint(self.model),
              "vae_hash": module_digest(self.vae.first_stage_model),
              "conditioning": conditioning_digest([self.cond[p] for p in sorted(self.cond)] + [self.negative]),
              "family": type(self.model.model).__name__, "flow": self.flow, "sampler": self.sampler,
              "schedule": self.schedule, "sigmas": [round(float(s), 8) for s in self.sigmas],
              "eta": self.eta if self.sampler in ("euler_ancestral", "tcd") else None,
              "cfg": self.cfg, "steps": self.steps, "height": self.height, "width": self.width,
              "latent_shape": list(self.latent_shape)}
        return fp

    def _groups(self, prompts, n: int):
        """Runs of consecutive prompts that can share a batch (same conditioning shapes), at most ``n`` long."""
        group = []
        for i, p in enumerate(prompts):
            if group and (len(group) == n or not _batchable(self.cond[prompts[group[0]]], self.cond[p])):
                yield group
                group = []
            group.append(i)
        if group:
            yield group

    def generate(self, coefficients: Coefficients, prompts, seeds):
        import comfy.sample
        import torch

        from ..calibration.generate import per_sample_noise_sampler

        coefficients.check_steps(self.steps)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        missing = [p for p in prompts if p not in self.cond]
        for p in missing:
            self.cond[p] = self._encode(p)
        self.calls += 1
        out = []
        for group in self._groups(list(prompts), self.batch_size):
            ps, ss = [prompts[i] for i in group], [int(seeds[i]) for i in group]
            latent = torch.zeros((len(ps),) + self.latent_shape)
            noise = torch.cat([comfy.sample.prepare_noise(latent[i:i + 1], s) for i, s in enumerate(ss)])
            ref = torch.zeros(latent.shape, device=self.model.load_device)
            ksampler = make_sampler(self.sampler, self.eta, coefficients, node=NODE,
                                    noise_sampler=per_sample_noise_sampler(ref, ss))
            samples = comfy.sample.sample_custom(
                self.model, noise, self.cfg, ksampler, self.sigmas, _concat([self.cond[p] for p in ps]),
                self.negative, latent, callback=self._step, disable_pbar=True, seed=ss[0])
            images = self.vae.decode(samples)
            if images.ndim == 5:  # video VAEs: [B, T, H, W, C]
                images = images.reshape(-1, *images.shape[-3:])
            out.append(images.float().cpu().clamp(0.0, 1.0))
            if self.on_images is not None:
                self.on_images(len(ps))
        images = torch.cat(out)
        if (coefficients.c_x, coefficients.c_eps) in self.keep_for:  # only what a preview shows
            n = min(PREVIEW_PROMPTS, len(prompts))
            self.kept[(coefficients.c_x, coefficients.c_eps, tuple(prompts[:n]), tuple(seeds[:n]))] = images[:n]
        return images

    def images_for(self, coefficients: Coefficients, prompts, seeds):
        """Images of these coefficients: kept ones (the same noise, so the same images) or newly generated."""
        key = (coefficients.c_x, coefficients.c_eps, tuple(prompts), tuple(seeds))
        if key in self.kept:
            return self.kept[key]
        n = len(prompts)
        for (cx, ce, ps, ss), images in self.kept.items():
            if (cx, ce) == (coefficients.c_x, coefficients.c_eps) and ps[:n] == tuple(prompts) and \
                    ss[:n] == tuple(seeds):
                return images[:n]
        return self.generate(coefficients, prompts, seeds)

    def _step(self, step, x0, x, total_steps):
        if self.check_interrupt is not None:
            self.check_interrupt()


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
def _int(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise NodeInputError(NODE, name, f"must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _range(low, high):
    for name, v in (("range_min", low), ("range_max", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= C_MAX:
            raise NodeInputError(NODE, name, f"must be a number in (0, {C_MAX:g}], got {v!r}")
    if not low < high:
        raise NodeInputError(NODE, "range_min", f"must be smaller than range_max: got range_min={low!r} >= "
                                                f"range_max={high!r}")


def check_settings(*, prompts=None, steps=None, space=None, strategy=None, range_min=None, range_max=None,
                   points=None, budget=None, base_seed=None, width=None, height=None, batch=None,
                   preset_name=None):
    """Checks what is known (None = linked, unknown at queue time); raises NodeInputError naming the input.
    Returns the parsed prompt list (or None)."""
    from ..calibration.search import SearchSpace, check_budget, estimate_points

    lines = None if prompts is None else parse_prompt_lines(prompts, NODE)
    if steps is not None:
        _int("steps", steps, 1, 100)
    if space is not None and space not in SPACES:
        raise NodeInputError(NODE, "space", f"{space!r} is not one of {', '.join(SPACES)}")
    if strategy is not None and strategy not in STRATEGIES:
        raise NodeInputError(NODE, "strategy", f"{strategy!r} is not one of {', '.join(STRATEGIES)}")
    if range_min is not None and range_max is not None:
        _range(range_min, range_max)
    if points is not None:
        _int("points", points, 2, MAX_POINTS)
    if budget is not None:
        _int("budget", budget, 1, MAX_BUDGET)
    if base_seed is not None:
        _int("base_seed", base_seed, 0, MAX_SEED)
    for name, v in (("width", width), ("height", height)):
        if v is not None:
            _int(name, v, 64, 4096)
            if v % 16:
                raise NodeInputError(NODE, name, f"must be a multiple of 16, got {v}")
    if batch is not None:
        _int("batch", batch, 1, 64)
    if preset_name is not None:
        _preset_relpath(preset_name, NODE, "preset_name")
    known = (lines, steps, space, strategy, range_min, range_max, points, budget)
    if all(v is not None for v in known):
        try:
            sp = SearchSpace(space, steps, float(range_min), float(range_max))
        except ValueError as exc:
            raise NodeInputError(NODE, "space", str(exc)) from None
        n_images = len(lines)
        if strategy == "grid":
            total = estimate_points(sp, strategy, points)
            if total * n_images > budget:
                raise NodeInputError(NODE, "budget", (
                    f"too small for this grid: {total} points ({points}^{sp.dim} grid"
                    f"{' + identity' if total > points ** sp.dim else ''}) x {n_images} prompts = "
                    f"{total * n_images} images, budget is {budget}. Raise 'budget' to {total * n_images}, "
                    "lower 'points', use fewer prompts, or choose strategy 'pattern'"))
        try:
            check_budget(sp, strategy, points, n_images, budget)
        except ValueError as exc:
            raise NodeInputError(NODE, "budget", f"{exc}: raise 'budget' or use fewer prompts") from None
    return lines


def record_key(gen_fp: dict, scorer_config: dict, prompts: list, seeds: list, space: dict, strategy: str,
               points: int) -> str:
    """Hash of what the runner's record fingerprint holds (calibration.runner.Runner), so one file per run setup."""
    from ..calibration.runner import prompts_digest

    body = {"generator": gen_fp, "scorer": scorer_config, "prompts": [len(prompts), prompts_digest(prompts)],
            "seeds": seeds, "space": space, "strategy": [strategy, points]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


class _Progress:
    """ComfyUI progress bar in images (points x prompts), plus a text line with the runner's ETA on the node."""

    def __init__(self, total: int, node_id):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(1, total))
        self.node_id = node_id
        self.done = 0

    def images(self, n: int) -> None:
        self.done += n
        self.bar.update_absolute(self.done)

    def point(self, info) -> None:
        self.done = info.images_spent
        self.bar.update_absolute(info.images_spent, max(1, info.images_total))
        line = info.line()
        log.info("[%s] %s", NODE, line)
        if self.node_id is not None:
            from server import PromptServer

            if PromptServer.instance is not None and hasattr(PromptServer.instance, "send_progress_text"):
                PromptServer.instance.send_progress_text(line, self.node_id)


def _png_to_image(path: str):
    from ..calibration.plots import load_images

    return load_images([path])


# ---------------------------------------------------------------------------------------------------------------
# node
# ---------------------------------------------------------------------------------------------------------------
class QSchedCalibrate:
    DESCRIPTION = ("Finds Q-Sched coefficients for this (quantized) model: samples the calibration prompts at each "
                   "coefficient point the search asks for, scores the images with JAQ, keeps the best, writes it as "
                   "a preset to models/qsched/. Interruptible: queue again with the same settings and it resumes "
                   "from its record without recomputing anything.")
    CATEGORY = CATEGORY_CALIBRATION
    RETURN_TYPES = (COEFFICIENTS, "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("coefficients", "landscape", "preview", "summary")
    OUTPUT_TOOLTIPS = ("The best coefficients (also saved as the preset).",
                       "The search landscape: mean JAQ over (c_x start, c_eps start) for the 'start' space, or the "
                       "score trace and one marginal per coefficient for the others.",
                       "Top row: stock sampler (identity); bottom row: the best coefficients, for the first "
                       f"{PREVIEW_PROMPTS} prompts with the same noise.",
                       "Best vs identity JAQ, coefficients, points and images, preset and record paths.")
    FUNCTION = "calibrate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to calibrate, as you will sample it (quantized, with its "
                                               "LoRAs). Coefficients are specific to model, precision and steps."}),
                "clip": ("CLIP", {"tooltip": "Text encoder(s) for the calibration prompts (each encoded once)."}),
                "vae": ("VAE", {"tooltip": "Decodes the samples for scoring."}),
                "scorer": (JAQ_SCORER, {"tooltip": "The JAQ scorer from Q-Sched JAQ Loader (what 'best' means)."}),
                "prompts": ("STRING", {"default": default_prompts_text(), "multiline": True, "tooltip":
                            "Calibration prompts, one per line (lines starting with '#' are ignored). Default: the "
                            "20 Q-Sched calibration prompts. Every point costs one image per prompt."}),
                "steps": _steps_input("Sampling steps to calibrate for; the preset only fits samplers with the same "
                                      "steps (4 for SDXL-Turbo and FLUX schnell)."),
                "sampler": (list(SAMPLER_NAMES), {"default": "euler_ancestral", "tooltip":
                            "Base sampler, as in Q-Sched Sampler: euler_ancestral (SDXL-Turbo), euler (FLUX schnell), "
                            "tcd (TCD/PCM, eps models only), lcm (LCM)."}),
                "schedule": (list(SCHEDULES), {"default": "simple", "tooltip":
                             "Timesteps, as in Q-Sched Scheduler: simple = the paper's for SDXL-Turbo / FLUX "
                             "schnell; the family names give that family's diffusers schedule."}),
                "eta": _ETA,
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01, "tooltip":
                                  "Classifier-free guidance (negative = empty prompt). 1.0 for SDXL-Turbo and FLUX "
                                  "schnell (no negative pass, half the cost)."}),
                "space": (list(SPACES), {"default": "start", "tooltip":
                          "What is searched. start: c_x and c_eps at the first step, ramping to 1 at the last (2 "
                          "numbers; the released Q-Sched search, cheapest). start_end: start and end of both ramps "
                          "(4; paper Algorithm 1). per_step: one c_x and c_eps per step (2 x steps)."}),
                "strategy": (list(STRATEGIES), {"default": "pattern", "tooltip":
                             "pattern: walks from identity to better neighbours on the grid (a few % of a full grid's "
                             "images). zoom: a coarse grid first, then pattern (safer on bumpy landscapes). grid: "
                             "every grid point (exact Algorithm 1, expensive)."}),
                "range_min": ("FLOAT", {"default": 0.8, "min": 0.01, "max": C_MAX, "step": 0.01, "tooltip":
                              "Smallest coefficient tried (paper: 0.8); must be below range_max."}),
                "range_max": ("FLOAT", {"default": 1.2, "min": 0.01, "max": C_MAX, "step": 0.01, "tooltip":
                              "Largest coefficient tried (paper: 1.2). Identity (1.0) is always scored too, as the "
                              "baseline."}),
                "points": ("INT", {"default": 11, "min": 2, "max": MAX_POINTS, "tooltip":
                           "Grid values per coefficient between range_min and range_max (11 = steps of 0.04 over "
                           "0.8-1.2). An odd number puts 1.0 on the grid. grid strategy: points^dimensions points."}),
                "budget": ("INT", {"default": 800, "min": 1, "max": MAX_BUDGET, "tooltip":
                           "Most images to generate (points x prompts). pattern/zoom stop early and keep the best so "
                           "far; a grid larger than the budget is refused before anything runs."}),
                # Not named "seed": the frontend gives every INT input called seed / noise_seed a "control after
                # generate" widget (default randomize), which would start a new calibration at every queue.
                "base_seed": ("INT", {"default": 42, "min": 0, "max": MAX_SEED, "tooltip":
                              "Noise seed of prompt 1 (prompt i uses base_seed + i - 1); the same noise at every "
                              "point, so points differ only by their coefficients. Fixed on purpose: a new seed is a "
                              "new calibration."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16, "tooltip":
                          "Image width for calibration (calibrate at the size you will sample at)."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16, "tooltip":
                           "Image height for calibration."}),
                "batch": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                          "Images per sampling call (more = faster on a big GPU, more memory). Each image keeps its "
                          "own noise whatever the batch, so a resumed run may use another batch."}),
                "preset_name": ("STRING", {"default": "my_calibration", "tooltip":
                                "File name of the preset written to models/qsched/ (.json is added; an existing one "
                                "is replaced). Load it later with Q-Sched Load Preset."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompts=None, steps=None, space=None, strategy=None, range_min=None, range_max=None,
                        points=None, budget=None, base_seed=None, width=None, height=None, batch=None,
                   preset_name=None):
        # Naming an input here turns off ComfyUI's own min/max/combo check for it: check_settings re-checks them.
        try:
            check_settings(prompts=prompts, steps=steps, space=space, strategy=strategy, range_min=range_min,
                           range_max=range_max, points=points, budget=budget, base_seed=base_seed, width=width,
                           height=height, batch=batch, preset_name=preset_name)
        except NodeInputError as exc:
            return str(exc)
        return True

    def calibrate(self, model, clip, vae, scorer, prompts, steps, sampler, schedule, eta, cfg, space, strategy,
                  range_min, range_max, points, budget, base_seed, width, height, batch, preset_name, unique_id=None):
        import comfy.model_management
        import folder_paths

        from ..calibration.plots import plot_landscape, preview_grid
        from ..calibration.runner import RecordError, calibrate
        from ..calibration.search import SearchSpace, estimate_points

        lines = check_settings(prompts=prompts, steps=steps, space=space, strategy=strategy, range_min=range_min,
                               range_max=range_max, points=points, budget=budget, base_seed=base_seed, width=width,
                               height=height, batch=batch, preset_name=preset_name)
        scorer = check_scorer(scorer, NODE)
        if sampler not in SAMPLER_NAMES:
            raise NodeInputError(NODE, "sampler", f"{sampler!r} is not one of {', '.join(SAMPLER_NAMES)}")
        sp = SearchSpace(space, steps, float(range_min), float(range_max))
        seeds = [base_seed + i for i in range(len(lines))]
        check = comfy.model_management.throw_exception_if_processing_interrupted
        progress = None

        def on_images(n):
            if progress is not None:
                progress.images(n)

        gen = ComfyGenerator(model, clip, vae, lines, steps=steps, sampler=sampler, schedule=schedule, eta=eta,
                             cfg=cfg, width=width, height=height, batch_size=batch, on_images=on_images,
                             check_interrupt=check)
        gen_fp = gen.fingerprint()
        key = record_key(gen_fp, scorer.config, lines, seeds, sp.to_dict(), strategy, points)
        record = os.path.join(folder_paths.get_output_directory(), RECORD_DIR, f"{key}.jsonl")
        register_qsched_folder()
        preset_path = os.path.join(folder_paths.get_folder_paths(QSCHED_FOLDER)[0],
                                   _preset_relpath(preset_name, NODE, "preset_name"))
        total = min(budget, estimate_points(sp, strategy, points) * len(lines))
        progress = _Progress(total, unique_id)
        identity = Coefficients.identity(steps)
        gen.keep_for.add((identity.c_x, identity.c_eps))  # the first point scored: reused for the preview
        extra = {"sampling": {"sampler": sampler, "schedule": schedule, "eta": gen_fp["eta"], "cfg": float(cfg),
                              "width": width, "height": height, "model_class": gen_fp["model_class"]}}
        try:
            result = calibrate(gen, scorer, lines, space=sp, strategy=strategy, points=points, seeds=seeds,
                               budget=budget, record=record, resume=True, preset=preset_path, progress=progress.point,
                               interrupt=check, scorer_config=scorer.config, extra_metadata=extra)
        except RecordError as exc:
            raise RuntimeError(f"{NODE}: {exc}") from None
        computed = gen.calls
        from_record = len(result.points) - computed
        n_prev = min(PREVIEW_PROMPTS, len(lines))
        ident = gen.images_for(identity, lines[:n_prev], seeds[:n_prev])
        best = gen.images_for(result.best, lines[:n_prev], seeds[:n_prev])
        gen.kept.clear()

        tmp = os.path.join(folder_paths.get_temp_directory(), "qsched")
        landscape_file = f"qsched_landscape_{key}.png"
        plot_landscape(result, os.path.join(tmp, landscape_file))
        preview_file = f"qsched_preview_{key}.png"
        preview_grid(ident, best, os.path.join(tmp, preview_file))

        summary = "\n".join([
            result.summary(),
            f"points: {len(result.points)} ({from_record} from the record, {computed} computed now); images: "
            f"{result.images_spent} of budget {budget}",
            describe(result.best),
            f"preset: {preset_path}",
            f"record: {record}",
        ])
        ui_images = [{"filename": f, "subfolder": "qsched", "type": "temp"} for f in (landscape_file, preview_file)]
        return {"ui": {"text": [summary], "images": ui_images},
                "result": (result.best, _png_to_image(os.path.join(tmp, landscape_file)),
                           _png_to_image(os.path.join(tmp, preview_file)), summary)}


NODE_CLASS_MAPPINGS = {"QSchedCalibrate": QSchedCalibrate}
NODE_DISPLAY_NAME_MAPPINGS = {"QSchedCalibrate": "Q-Sched Calibrate"}
