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

from ..calibration.search import SPACES, STRATEGIES, SearchSpace, check_budget, check_range, estimate_points
from ..qsched.coefficients import C_MAX, Coefficients, check_coefficient, check_steps
from .common import (CATEGORY_CALIBRATION, COEFFICIENTS, ETA, JAQ_SCORER, MAX_UI_STEPS, NodeInputError,
                     check_combo, check_int, node_input, preset_file, steps_input,
                     validation_result)
from .comfy_generator import PREVIEW_PROMPTS, ComfyGenerator
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


def record_key(gen_fp: dict, scorer_config: dict, prompts: list, seeds: list, space: dict, strategy: str,
               points: int) -> str:
    """Hash of what the runner's record fingerprint holds (calibration.runner.Runner), so one file per run setup."""
    from ..calibration.runner import prompts_digest

    body = {"generator": gen_fp, "scorer": scorer_config, "prompts": [len(prompts), prompts_digest(prompts)],
            "seeds": seeds, "space": space, "strategy": [strategy, points]}
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
                          "own noise whatever the batch, so a resumed run may use another batch."}),
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
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompts=None, steps=None, space=None, strategy=None, range_min=None, range_max=None,
                        points=None, budget=None, base_seed=None, width=None, height=None, batch=None,
                        preset_name=None):
        # Naming an input here turns off ComfyUI's own min/max/combo check for it: check_settings re-checks them.
        return validation_result(check_settings, prompts=prompts, steps=steps, space=space, strategy=strategy,
                                 range_min=range_min, range_max=range_max, points=points, budget=budget,
                                 base_seed=base_seed, width=width, height=height, batch=batch,
                                 preset_name=preset_name)

    def calibrate(self, model, clip, vae, scorer, prompts, steps, sampler_name, scheduler, eta, cfg, space, strategy,
                  range_min, range_max, points, budget, base_seed, width, height, batch, preset_name,
                  overwrite=False, max_minutes=DEFAULT_MAX_MINUTES, unique_id=None):
        sampler, schedule = sampler_name, scheduler
        import comfy.model_management
        import folder_paths

        from ..calibration.plots import plot_landscape, preview_grid
        from ..calibration.record import RecordError, RecordWriteError
        from ..calibration.runner import calibrate

        lines = check_settings(prompts=prompts, steps=steps, space=space, strategy=strategy, range_min=range_min,
                               range_max=range_max, points=points, budget=budget, base_seed=base_seed, width=width,
                               height=height, batch=batch, preset_name=preset_name)
        scorer = check_scorer(scorer, NODE)
        max_minutes = check_int(NODE, "max_minutes", max_minutes, 0, MAX_MINUTES)
        check_combo(NODE, "sampler_name", sampler, SAMPLER_NAMES)
        check_combo(NODE, "scheduler", schedule, comfy_schedulers())
        sp = SearchSpace(space, steps, float(range_min), float(range_max))
        seeds = [base_seed + i for i in range(len(lines))]
        check = comfy.model_management.throw_exception_if_processing_interrupted
        n_points = estimate_points(sp, strategy, points)
        if n_points * len(lines) > budget:
            n_points, about = budget // len(lines), "at most "
        else:
            about = "" if strategy == "grid" else "about "
        progress = _Progress(min(budget, n_points * len(lines)), unique_id)

        def on_images(n):
            progress.images(n)

        progress.text(f"starting: {about}{n_points} points x {len(lines)} prompts = {about}"
                      f"{min(budget, n_points * len(lines))} images (budget {budget}); encoding the prompts")

        gen = ComfyGenerator(model, clip, vae, lines, steps=steps, sampler=sampler, schedule=schedule, eta=eta,
                             cfg=cfg, width=width, height=height, batch_size=batch, on_images=on_images,
                             check_interrupt=check)
        gen_fp = gen.fingerprint()
        key = record_key(gen_fp, scorer.config, lines, seeds, sp.to_dict(), strategy, points)
        record = os.path.join(folder_paths.get_output_directory(), RECORD_DIR, f"{key}.jsonl")
        preset_path = preset_file(preset_name, NODE, "preset_name")
        check_overwrite(preset_path, key, overwrite)
        kept = _record_points(record)
        if kept:
            progress.text(f"resuming: {_points(kept)} from the record {os.path.basename(record)}, computing the rest")
        identity = Coefficients.identity(steps)
        gen.keep_for.add((identity.c_x, identity.c_eps))  # the first point scored: reused for the preview
        extra = {"sampling": {"sampler": sampler, "schedule": schedule, "eta": gen_fp["eta"], "cfg": float(cfg),
                              "width": width, "height": height, "model_class": gen_fp["model_class"]},
                 "record": key}
        gate = CostGate(max_minutes)
        try:
            result = calibrate(gen, scorer, lines, space=sp, strategy=strategy, points=points, seeds=seeds,
                               budget=budget, record=record, resume=True, preset=preset_path,
                               progress=lambda info: (progress.point(info), gate(info)), interrupt=check,
                               scorer_config=scorer.config, extra_metadata=extra)
        except comfy.model_management.InterruptProcessingException:
            # ComfyUI shows its own "interrupted" state; the node and the console say how to go on
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
            f"best JAQ {result.best_score:.4f} vs {result.identity_score:.4f} for the stock sampler "
            f"({result.best_score - result.identity_score:+.4f})",
            describe(result.best),
            f"search: {strategy} over {space}, {_points(len(result.points))} ({from_record} from the record, "
            f"{computed} computed now), {result.images_spent} of {budget} images"
            f"{'; stopped by the budget' if result.stopped == 'budget' else ''}",
            f"preset: {preset_path}",
            f"record: {record}",
        ])
        progress.text(f"done: {_points(len(result.points))}, {result.images_spent} images")
        # The images go out through the 'landscape' / 'preview' outputs only (Preview Image shows them once).
        return {"ui": {"text": [summary]},
                "result": (result.best, _png_to_image(os.path.join(tmp, landscape_file)),
                           _png_to_image(os.path.join(tmp, preview_file)), summary)}


NODE_CLASS_MAPPINGS = {"QSchedCalibrate": QSchedCalibrate}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}
