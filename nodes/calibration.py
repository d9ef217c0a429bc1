"""Q-Sched Calibrate: the calibration search (``calibration.runner.calibrate``) run on a ComfyUI MODEL/CLIP/VAE
through ``ComfyGenerator`` (nodes/comfy_generator.py).

The node keeps the runner's record in ComfyUI's output directory (``output/qsched_calibration/<key>.jsonl``, the key
a hash of the run's fingerprint): queue the same settings again after an interrupt (Cancel, POST /interrupt, a
crash) and it goes on from the record, recomputing nothing. The preset is written atomically to
``models/qsched/<preset_name>.json``. ComfyUI modules are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from ..calibration.reference import images_per_fit_prompt
from ..calibration.search import SPACES, STRATEGIES, SearchSpace, check_budget, check_range, estimate_points
from ..qsched.coefficients import C_MAX, Coefficients, check_coefficient, check_steps
from .common import (CATEGORY_CALIBRATION, COEFFICIENTS, ETA, JAQ_SCORER, MAX_UI_STEPS, NodeInputError,
                     check_combo, check_int, is_flow, model_sampling_of, node_input, preset_file, steps_input,
                     validation_result)
from .comfy_generator import PREVIEW_PROMPTS, ComfyGenerator
from .graph import GRAPH_CHECK_INPUT, raise_graph_problem
from .sampling import ETA_TIP, SAMPLER_NAMES, SAMPLER_TIP, comfy_schedulers, describe
from .scoring import check_scorer, parse_prompt_lines

NODE = "Q-Sched Calibrate"
RECORD_DIR = "qsched_calibration"
MAX_POINTS = 101
MAX_BUDGET = 10_000_000
MAX_SEED = 2**32 - 1
#: Default of ``max_minutes``: a calibration whose estimate is longer stops after its first point and asks.
DEFAULT_MAX_MINUTES = 30
MAX_MINUTES = 100_000
#: objective widget -> calibration.runner objective ("auto": match full precision with a reference_model, else JAQ)
OBJECTIVES = {"auto": None, "match full precision": "reference", "hybrid": "hybrid", "JAQ (paper)": "jaq"}
_UNLINKED = object()  # VALIDATE_INPUTS default of an optional input that is not connected (a linked one is None)

log = logging.getLogger("qsched")


def default_prompts_text() -> str:
    from ..calibration.prompts import default_prompts

    return "\n".join(default_prompts())


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
def check_settings(*, prompts=None, steps=None, space=None, strategy=None, range_min=None, range_max=None,
                   points=None, budget=None, base_seed=None, width=None, height=None, batch=None,
                   preset_name=None):
    """Checks what is known (None = linked, unknown at queue time); raises NodeInputError naming the input.
    Returns the parsed prompt list (or None)."""
    lines = None if prompts is None else parse_prompt_lines(prompts, NODE)
    if steps is not None:
        with node_input(NODE, "steps"):
            check_steps(steps, MAX_UI_STEPS)
    if space is not None:
        check_combo(NODE, "space", space, SPACES)
    if strategy is not None:
        check_combo(NODE, "strategy", strategy, STRATEGIES)
    if range_min is not None and range_max is not None:
        for name, v in (("range_min", range_min), ("range_max", range_max)):
            with node_input(NODE, name):
                check_coefficient(v, name)
        with node_input(NODE, "range_min"):
            check_range(range_min, range_max, ("range_min", "range_max"))
    if points is not None:
        check_int(NODE, "points", points, 2, MAX_POINTS)
    if budget is not None:
        check_int(NODE, "budget", budget, 1, MAX_BUDGET)
    if base_seed is not None:
        check_int(NODE, "base_seed", base_seed, 0, MAX_SEED)
    for name, v in (("width", width), ("height", height)):
        if v is not None:
            check_int(NODE, name, v, 64, 4096)
            if v % 16:
                raise NodeInputError(NODE, name, f"must be a multiple of 16, got {v}")
    if batch is not None:
        check_int(NODE, "batch", batch, 1, 64)
    if preset_name is not None:
        preset_file(preset_name, NODE, "preset_name")
    known = (lines, steps, space, strategy, range_min, range_max, points, budget)
    if all(v is not None for v in known):
        with node_input(NODE, "space"):
            sp = SearchSpace(space, steps, float(range_min), float(range_max))
        with node_input(NODE, "budget"):
            check_budget(sp, strategy, points, len(lines), budget)
    return lines


def resolve_objective(objective: str, reference: bool | None, scorer: bool | None) -> str | None:
    """The runner's objective for the widget value, given whether ``reference_model`` / ``scorer`` are connected
    (None = not known). Raises NodeInputError naming the input that is missing. Returns None while unknown."""
    check_combo(NODE, "objective", objective, OBJECTIVES)
    if objective == "auto":
        if reference is False and scorer is False:
            raise NodeInputError(NODE, "reference_model", "nothing to calibrate against: connect the full-precision "
                                 "MODEL you quantized (no scorer files needed), or a Q-Sched JAQ Loader to 'scorer' "
                                 "(the paper's JAQ search)")
        if reference is None:
            return None
        return "reference" if reference else "jaq"
    key = OBJECTIVES[objective]
    if key in ("reference", "hybrid") and reference is False:
        raise NodeInputError(NODE, "reference_model", f"objective '{objective}' fits the quantized model to the "
                             "full-precision one: connect the MODEL you quantized (e.g. Load Checkpoint's MODEL, the "
                             "input of Q-Sched Quantize Model), or choose objective 'JAQ (paper)'")
    if key in ("hybrid", "jaq") and scorer is False:
        raise NodeInputError(NODE, "scorer", f"objective '{objective}' scores images with JAQ: connect a Q-Sched JAQ "
                             "Loader" + (", or choose 'match full precision' (no scorer files)"
                                         if reference is not False else ""))
    return key


#: The held-out test of the reference objective needs this many held-out prompts to be able to keep anything.
MIN_HELDOUT = 5


def check_prompt_count(goal: str | None, lines: list | None) -> None:
    """The reference fit uses the first half of the prompts and tests on the rest: too few held out and it can only
    ever answer identity. Raises NodeInputError naming ``prompts``."""
    if goal in ("reference", "hybrid") and lines is not None and len(lines) - (len(lines) + 1) // 2 < MIN_HELDOUT:
        raise NodeInputError(NODE, "prompts", f"{len(lines)} prompts: the objective fits on the first half and "
                             f"tests on the rest, which needs at least {MIN_HELDOUT} held-out prompts to show a "
                             f"gain: give at least {2 * MIN_HELDOUT} prompts (the default 20 work)")


def _architecture(model) -> dict:
    """What must agree between the model and its reference: model class, latent format, prediction type and the
    diffusion model's configuration (layer sizes; the operations and dtype may differ)."""
    base = model.model
    cfg = getattr(base, "model_config", None)
    unet = dict(getattr(cfg, "unet_config", {}) or {})
    unet = {k: v for k, v in unet.items() if k not in ("dtype", "device", "operations")}
    latent = getattr(base, "latent_format", None)
    return {"model": type(base).__name__, "config": type(cfg).__name__ if cfg is not None else None,
            "latent format": type(latent).__name__ if latent is not None else None,
            "latent channels": getattr(latent, "latent_channels", None),
            "prediction": "flow" if is_flow(model_sampling_of(model)) else type(model_sampling_of(model)).__name__,
            "layers": json.dumps(unet, sort_keys=True, default=str)}


def check_reference(model, reference) -> None:
    """The reference must be the full-precision version of ``model``: same architecture and latent format, not
    itself quantized by Q-Sched, not the same weights. Raises NodeInputError naming ``reference_model``."""
    from .comfy_generator import quant_label

    if not hasattr(reference, "model") or not hasattr(reference, "get_model_object"):
        raise NodeInputError(NODE, "reference_model", f"expected a MODEL, got {type(reference).__name__}")
    a, b = _architecture(model), _architecture(reference)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        what = ", ".join(f"{k} {b[k]!s:.60} (model: {a[k]!s:.60})" for k in diff if k != "layers")
        raise NodeInputError(NODE, "reference_model", (f"is another architecture than 'model': {what or 'its layers differ'}. "
                             "Connect the full-precision version of the model being calibrated (the MODEL you "
                             "quantized)"))
    q = quant_label(reference.get_model_object("diffusion_model"))
    if q is not None:
        raise NodeInputError(NODE, "reference_model", f"is quantized by Q-Sched ({q}): connect the full-precision "
                             "MODEL (the input of Q-Sched Quantize Model, or Load Checkpoint / Load Diffusion Model)")
    if reference is model or reference.model is model.model:
        raise NodeInputError(NODE, "reference_model", "is the same model as 'model': connect the full-precision "
                             "MODEL to reference_model and the quantized one to model")


def record_key(gen_fp: dict, scorer_config: dict | None, prompts: list, seeds: list, space: dict, strategy: str,
               points: int, *, objective: str = "jaq", reference_fp: dict | None = None) -> str:
    """Hash of what the runner's record fingerprint holds (calibration.runner.Runner), so one file per run setup.
    The JAQ objective hashes what it always did (its records from earlier versions keep resuming)."""
    from ..calibration.runner import prompts_digest

    body = {"generator": gen_fp, "scorer": scorer_config, "prompts": [len(prompts), prompts_digest(prompts)],
            "seeds": seeds, "space": space, "strategy": [strategy, points]}
    if objective != "jaq":
        body.update(objective=objective, reference=reference_fp)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


class _Progress:
    """ComfyUI progress bar in images (points x prompts), plus a text line with the runner's ETA on the node."""

    def __init__(self, total: int, node_id):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(1, total))
        self.node_id = node_id
        self.done = 0

    def text(self, line: str) -> None:
        """A line on the node (ComfyUI's progress text) and in the log."""
        log.info("[%s] %s", NODE, line)
        if self.node_id is not None:
            from server import PromptServer

            if PromptServer.instance is not None and hasattr(PromptServer.instance, "send_progress_text"):
                PromptServer.instance.send_progress_text(line, self.node_id)

    def images(self, n: int) -> None:
        self.done += n
        self.bar.update_absolute(self.done)

    def point(self, info) -> None:
        self.done = info.images_spent
        self.bar.update_absolute(info.images_spent, max(1, info.images_total))
        self.text(info.line())


def _record_points(path: str) -> int:
    """Points already in a calibration record (lines after the header)."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        return max(0, sum(1 for line in f if line.strip()) - 1)


def _points(n: int) -> str:
    return f"{n} point{'s' if n != 1 else ''}"


def check_overwrite(preset_path: str, key: str, overwrite: bool) -> None:
    """Refuses to replace an existing preset unless ``overwrite`` is on or the file is this calibration's own result
    (same record: rewriting it gives the same file)."""
    if overwrite or not os.path.exists(preset_path):
        return
    try:
        own = Coefficients.load(preset_path).metadata.get("record") == key
    except (ValueError, OSError):
        own = False
    if not own:
        raise NodeInputError(NODE, "overwrite", (
            f"the preset {preset_path} already exists (from another calibration or saved by hand); nothing was "
            "run. Turn overwrite on to replace it, or change preset_name"))


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 90:
        return f"{max(1, round(minutes))} min"
    return f"{minutes / 60:.1f} h"


class CostGate:
    """After the first point computed in this run, stops a calibration whose estimated time left is longer than
    ``max_minutes`` (0 = no limit), with a message that says the estimate and how to run it anyway."""

    def __init__(self, max_minutes: int):
        self.max_minutes, self.checked, self.stopped = max_minutes, False, False

    def __call__(self, info) -> None:
        if self.checked or info.cached or info.eta is None:
            return
        self.checked = True
        if self.max_minutes and info.eta > 60 * self.max_minutes:
            images_left = max(0, info.images_total - info.images_spent)
            need = int(-(-info.eta // 60))
            self.stopped = True
            raise NodeInputError(NODE, "max_minutes", (
                f"this calibration needs about {_duration(info.eta)} more ({images_left} images at the speed of the "
                f"first point), longer than max_minutes = {self.max_minutes}. Nothing is lost: "
                f"{_points(info.points_done)} kept. To run it, set max_minutes to {need} or more and queue again; "
                "to make it shorter, use fewer prompts, a smaller budget or fewer grid values (points)"))


def _png_to_image(path: str):
    from ..calibration.plots import load_images

    return load_images([path])


# ---------------------------------------------------------------------------------------------------------------
# node
# ---------------------------------------------------------------------------------------------------------------
class QSchedCalibrate:
    DISPLAY_NAME = NODE
    DESCRIPTION = ("Finds Q-Sched coefficients for this (quantized) model and writes them as a preset to "
                   "models/qsched/. With reference_model (the full-precision model you quantized): fits them so the "
                   "quantized images follow the full-precision ones, no scorer files, kept only if they help on "
                   "held-out prompts. With a JAQ scorer: the paper's search on JAQ scores, interruptible (queue "
                   "again with the same settings and it resumes from its record).")
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
                "prompts": ("STRING", {"default": default_prompts_text(), "multiline": True, "tooltip":
                            "Calibration prompts, one per line (lines starting with '#' are ignored). Default: the "
                            "20 Q-Sched calibration prompts. Every point costs one image per prompt."}),
                "steps": steps_input("Sampling steps to calibrate for; the preset only fits samplers with the same "
                                      "steps (4 for SDXL-Turbo and FLUX schnell)."),
                "sampler_name": (list(SAMPLER_NAMES), {"default": "euler_ancestral", "tooltip":
                                 "As on the sampler you will use. " + SAMPLER_TIP}),
                "scheduler": (comfy_schedulers(), {"default": "simple", "tooltip":
                              "ComfyUI's schedulers, as on KSampler / Q-Sched KSampler: simple = the paper's timesteps "
                              "for SDXL-Turbo and FLUX schnell."}),
                "eta": (ETA[0], {**ETA[1], "tooltip": ETA_TIP}),
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
                          "own noise whatever the batch, but float results move with it, so the batch is part of "
                          "the record: another batch starts a new record instead of resuming."}),
                "preset_name": ("STRING", {"default": "my_calibration", "tooltip":
                                "File name of the preset written to models/qsched/ (.json is added). Load it later "
                                "with Q-Sched Load Preset."}),
                # New inputs go at the end: saved workflows store widget values by position, and a workflow saved
                # before an input existed loads with that input's default.
                "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                              "Replace an existing preset of the same name. Off: a preset from another calibration "
                              "(or saved by hand) is never replaced; the node stops before sampling and names it."}),
                "max_minutes": ("INT", {"default": DEFAULT_MAX_MINUTES, "min": 0, "max": MAX_MINUTES, "tooltip":
                                "Longest calibration that starts without asking, in minutes (0 = no limit). The "
                                "time is estimated from the first point; if the estimate is longer, the node stops "
                                "there (the point is kept), says the estimate, and runs it when you raise "
                                "max_minutes and queue again."}),
            },
            "optional": {
                "scorer": (JAQ_SCORER, {"tooltip": "The JAQ scorer from Q-Sched JAQ Loader: what 'best' means for the "
                                                   "objectives 'JAQ (paper)' and 'hybrid'. Not needed for 'match full "
                                                   "precision'."}),
                "reference_model": ("MODEL", {"tooltip": "The full-precision model you quantized (e.g. Load "
                                    "Checkpoint's MODEL, the input of Q-Sched Quantize Model). With it the "
                                    "coefficients are fitted to bring the quantized images to the full-precision "
                                    "ones on the same noise: no scorer files, and kept only if they help on prompts "
                                    "and seeds the fit never saw. Must be the same architecture as 'model'."}),
                "objective": (list(OBJECTIVES), {"default": "auto", "tooltip":
                              "auto: 'match full precision' when reference_model is connected, else 'JAQ (paper)'. "
                              "match full precision: fit the coefficients so the quantized model follows the "
                              "full-precision one (needs reference_model; never worse than doing nothing, checked "
                              "on held-out prompts). hybrid: the JAQ search kept close to that fit (needs both). "
                              "JAQ (paper): the paper's reference-free search on JAQ scores (needs scorer)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", **GRAPH_CHECK_INPUT},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompts=None, steps=None, space=None, strategy=None, range_min=None, range_max=None,
                        points=None, budget=None, base_seed=None, width=None, height=None, batch=None,
                        preset_name=None, objective=None, scorer=_UNLINKED, reference_model=_UNLINKED,
                        qsched_graph_check=None):
        # Naming an input here turns off ComfyUI's own min/max/combo check for it: check_settings re-checks them.
        # A connected MODEL / scorer arrives here as None (its value is not known before the run), an unconnected
        # optional input not at all (the default _UNLINKED): enough to say at queue time what is missing.
        def check(**kw):
            goal = None if objective is None else resolve_objective(objective, reference_model is not _UNLINKED,
                                                                     scorer is not _UNLINKED)
            if goal == "reference":  # no search: its budget does not apply
                kw["budget"] = None
            check_prompt_count(goal, check_settings(**kw))
            raise_graph_problem(NODE, qsched_graph_check)  # a reference file of another family (nodes/graph.py)

        return validation_result(check, prompts=prompts, steps=steps, space=space, strategy=strategy,
                                 range_min=range_min, range_max=range_max, points=points, budget=budget,
                                 base_seed=base_seed, width=width, height=height, batch=batch,
                                 preset_name=preset_name)

    def calibrate(self, model, clip, vae, prompts, steps, sampler_name, scheduler, eta, cfg, space, strategy,
                  range_min, range_max, points, budget, base_seed, width, height, batch, preset_name,
                  overwrite=False, max_minutes=DEFAULT_MAX_MINUTES, scorer=None, reference_model=None,
                  objective="auto", unique_id=None, qsched_graph_check=None):
        sampler, schedule = sampler_name, scheduler
        import comfy.model_management
        import folder_paths

        from ..calibration.plots import plot_landscape, preview_grid
        from ..calibration.record import RecordError, RecordWriteError
        from ..calibration.runner import calibrate

        goal = resolve_objective(objective, reference_model is not None, scorer is not None)
        search = goal != "reference"  # the coefficient search (space, strategy, budget) runs for jaq and hybrid
        lines = check_settings(prompts=prompts, steps=steps, space=space, strategy=strategy, range_min=range_min,
                               range_max=range_max, points=points, budget=budget if search else None,
                               base_seed=base_seed, width=width, height=height, batch=batch, preset_name=preset_name)
        check_prompt_count(goal, lines)
        if search:
            scorer = check_scorer(scorer, NODE)
        if goal != "jaq":
            check_reference(model, reference_model)
        max_minutes = check_int(NODE, "max_minutes", max_minutes, 0, MAX_MINUTES)
        check_combo(NODE, "sampler_name", sampler, SAMPLER_NAMES)
        check_combo(NODE, "scheduler", schedule, comfy_schedulers())
        sp = SearchSpace(space, steps, float(range_min), float(range_max))
        seeds = [base_seed + i for i in range(len(lines))]
        check = comfy.model_management.throw_exception_if_processing_interrupted
        fit_n = (len(lines) + 1) // 2  # the reference objectives fit on the first half, test on the rest
        if goal == "reference":  # the bar counts model evaluations: the fit's passes, then 3 per held-out prompt
            progress = _Progress(steps * (images_per_fit_prompt() * fit_n + 3 * (len(lines) - fit_n)), unique_id)
            progress.text(f"starting: fitting the coefficients to the full-precision model on {fit_n} prompts, then "
                          f"testing them on the other {len(lines) - fit_n} (held out); encoding the prompts")
            hooks = {"on_evaluations": progress.images}
        else:
            n_points = estimate_points(sp, strategy, points)
            if n_points * len(lines) > budget:
                n_points, about = budget // len(lines), "at most "
            else:
                about = "" if strategy == "grid" else "about "
            progress = _Progress(min(budget, n_points * len(lines)), unique_id)
            progress.text(f"starting: {'the full-precision fit, then ' if goal == 'hybrid' else ''}{about}{n_points} "
                          f"points x {len(lines)} prompts = {about}{min(budget, n_points * len(lines))} images "
                          f"(budget {budget}); encoding the prompts")
            hooks = {"on_images": progress.images}

        settings = dict(steps=steps, sampler=sampler, schedule=schedule, eta=eta, cfg=cfg, width=width, height=height,
                        batch_size=batch, check_interrupt=check, **hooks)
        gen = ComfyGenerator(model, clip, vae, lines, **settings)
        ref = None if goal == "jaq" else ComfyGenerator(reference_model, clip, vae, lines, **settings)
        gen_fp = gen.fingerprint()
        key = record_key(gen_fp, scorer.config if scorer is not None else None, lines, seeds, sp.to_dict(), strategy,
                         points, objective=goal, reference_fp=None if ref is None else ref.fingerprint())
        # the full-precision fit keeps no record (it is a few images); the searches (JAQ, hybrid) do
        record = os.path.join(folder_paths.get_output_directory(), RECORD_DIR, f"{key}.jsonl") if search else None
        preset_path = preset_file(preset_name, NODE, "preset_name")
        check_overwrite(preset_path, key, overwrite)
        kept = _record_points(record) if search else 0
        if kept:
            progress.text(f"resuming: {_points(kept)} from the record {os.path.basename(record)}, computing the rest")
        identity = Coefficients.identity(steps)
        gen.keep_for.add((identity.c_x, identity.c_eps))  # the first point scored: reused for the preview
        extra = {"sampling": {"sampler": sampler, "schedule": schedule, "eta": gen_fp["eta"], "cfg": float(cfg),
                              "width": width, "height": height, "model_class": gen_fp["model_class"]},
                 "record": key}
        gate = CostGate(max_minutes)
        options = {} if goal == "jaq" else {"objective": goal, "reference": ref}
        try:
            result = calibrate(gen, scorer, lines, space=sp, strategy=strategy, points=points, seeds=seeds,
                               budget=budget, record=record, resume=True, preset=preset_path,
                               progress=lambda info: (progress.point(info), gate(info)), interrupt=check,
                               scorer_config=None if scorer is None else scorer.config, extra_metadata=extra,
                               **options)
        except comfy.model_management.InterruptProcessingException:
            # ComfyUI shows its own "interrupted" state; the node and the console say how to go on
            if record is None:
                logging.warning("%s: interrupted; nothing was written (the preset is unchanged). Queue again to fit "
                                "anew (it takes seconds to minutes)", NODE)
                progress.text("interrupted — nothing written; queue again to run the fit again")
                raise
            logging.warning("%s: interrupted. Every finished point is kept in %s: queue the same settings again "
                            "to resume (nothing is recomputed)", NODE, record)
            progress.text(f"interrupted — queue again to resume ({_points(_record_points(record))} kept in the "
                          f"record {os.path.basename(record)})")
            raise
        except NodeInputError:
            if not gate.stopped:
                raise
            # the cost gate: the error says the estimate; the points so far are kept
            progress.text(f"stopped before a long run — {_points(_record_points(record))} kept in the record "
                          f"{os.path.basename(record)}")
            raise
        except (RecordError, RecordWriteError) as exc:
            raise RuntimeError(f"{NODE}: {exc}") from None
        from_record = min(kept, len(result.points))
        n_prev = min(PREVIEW_PROMPTS, len(lines))
        ident = gen.images_for(identity, lines[:n_prev], seeds[:n_prev])
        best = gen.images_for(result.best, lines[:n_prev], seeds[:n_prev])
        fp = None if ref is None else ref.generate(identity, lines[:n_prev], seeds[:n_prev])
        gen.kept.clear()

        tmp = os.path.join(folder_paths.get_temp_directory(), "qsched")
        landscape_file = f"qsched_landscape_{key}.png"
        plot_landscape(result, os.path.join(tmp, landscape_file))
        preview_file = f"qsched_preview_{key}.png"
        preview_grid(ident, best, os.path.join(tmp, preview_file), reference_images=fp)

        out = [] if goal == "jaq" else [result.acceptance]  # kept or identity, and why, in plain words
        if search:
            out.append(f"best JAQ {result.best_score:.4f} vs {result.identity_score:.4f} for the stock sampler "
                       f"({result.best_score - result.identity_score:+.4f})" if goal == "jaq" else
                       f"JAQ search around the fit: {_points(len(result.points))}")
        out.append(describe(result.best))
        if goal == "reference":
            out.append(f"fit on {fit_n} prompts, tested on {len(lines) - fit_n} held-out prompts: "
                       f"{result.images_spent} images")
        else:
            out.append(f"search: {strategy} over {space}, {_points(len(result.points))} ({from_record} from the "
                       f"record, {len(result.points) - from_record} computed now), {result.images_spent} of {budget} "
                       f"images{'; stopped by the budget' if result.stopped == 'budget' else ''}")
        if ref is not None:
            out.append(f"cost: quantized {gen.cost_text()}; full-precision reference {ref.cost_text()}")
        out.append(f"preset: {preset_path}")
        if record is not None:
            out.append(f"record: {record}")
        summary = "\n".join(out)
        progress.text(f"done: {result.images_spent} images" if goal == "reference" else
                      f"done: {_points(len(result.points))}, {result.images_spent} images")
        # The images go out through the 'landscape' / 'preview' outputs only (Preview Image shows them once).
        return {"ui": {"text": [summary]},
                "result": (result.best, _png_to_image(os.path.join(tmp, landscape_file)),
                           _png_to_image(os.path.join(tmp, preview_file)), summary)}


NODE_CLASS_MAPPINGS = {"QSchedCalibrate": QSchedCalibrate}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}
