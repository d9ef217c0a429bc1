"""``qsched demo``: the shape world's models, quantized, calibrated (``--objective``: ``reference``,
the default, fitted to the full-precision model; ``hybrid``; ``jaq``, the paper's search with the pack's real JAQ),
compared with FP, naive and PTQD on the independent reference metric, on the 20 calibration prompts (unseen seeds)
and on 20 held-out prompts. The rows are the experiment's rows for one (family, steps, format) -- same functions,
same seeds -- on fewer evaluation images (CPU, about a minute).

Writes into ``--out``: ``table.md`` (table, held-out rows first, + a few plain sentences read on the held-out
prompts), ``results.json`` (rows with ``method`` and ``prompts`` = ``calibration`` / ``heldout``), ``grid.png`` (rows:
the 20 calibration prompts; columns: FP | naive | Q-Sched, the same noise in every column), ``landscape.png`` (jaq
only: the search of the first seed) and ``preset.json`` (the coefficients of the first seed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from ...qsched._io import atomic_write_text
from ..plots import plot_landscape, save_png
from ..search import SearchSpace, check_budget, check_points
from ..shapeworld import data as D
from ..shapeworld import experiment as E
from ..shapeworld.world import FAMILIES, ShapeWorld

DEFAULTS = dict(family="flow", quant="w4a8", steps=4, seeds=(0, 1), per_prompt=5, points=21, strategy="zoom",
                budget=1000, grid_images=4, objective="reference")
#: --objective -> the experiment's method (the rows the demo shows beside FP, naive and PTQD)
OBJECTIVES = {"jaq": "qsched-zoom", "reference": "qsched-reference", "hybrid": "qsched-hybrid"}


def check_demo_options(seeds, strategy: str, per_prompt: int, grid_images: int | None, points: int, steps: int,
                       budget: int | None, default_grid_images: int) -> tuple[list, int]:
    """The trained-model demos' option checks, before anything is loaded or written: (unique seeds, grid images)."""
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise ValueError("give at least one seed")
    if strategy not in ("zoom", "pattern"):
        raise ValueError(f"strategy must be an adaptive one (zoom, pattern), got {strategy!r}")
    grid_images = min(default_grid_images, per_prompt) if grid_images is None else grid_images
    if not 1 <= grid_images <= per_prompt:
        raise ValueError(f"grid images per prompt must be in [1, per-prompt = {per_prompt}], got {grid_images}")
    check_points(points)
    check_budget(SearchSpace("start", steps), strategy, points, 20, budget)
    return seeds, grid_images


def demo_rows(rows: list[dict]) -> list[dict]:
    """The experiment's rows as results.json rows: one per prompt set, ``prompts`` = ``calibration`` (the 20
    calibration prompts, unseen seeds) or ``heldout`` (20 prompts no calibration saw), with ``fd``, ``accuracy``,
    ``jaq`` of that set; every other field as in the experiment."""
    out = []
    for x in rows:
        common = {k: v for k, v in x.items() if k not in E.METRICS}
        out.append(dict(common, prompts="calibration", fd=x["fd"], accuracy=x["accuracy"], jaq=x["jaq"]))
        if "fd_heldout" in x:
            out.append(dict(common, prompts="heldout", fd=x["fd_heldout"], accuracy=x["accuracy_heldout"],
                            jaq=x["jaq_heldout"]))
    return out


def demo_table(rows: list[dict]) -> str:
    """The demo's table: held-out rows first (where the verdict is read), then the calibration prompts."""
    lines = ["| prompts | model | method | FD ↓ | accuracy ↑ | JAQ ↑ | FD gap closed | calibration images |",
             "|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(x["method"] for x in rows))
    for prompts in ("heldout", "calibration"):
        sel = [x for x in rows if x["prompts"] == prompts]
        fp = [x["fd"] for x in sel if x["method"] == "fp"]
        for m in methods:
            xs = [x for x in sel if x["method"] == m]
            if not xs:
                continue
            fmt = "FP32" if m == "fp" else xs[0]["format"].upper()
            label = m + (f" ({sum(bool(x['accepted']) for x in xs)}/{len(xs)} kept)" if "accepted" in xs[0] else "")
            gap = ""
            naive = [x["fd"] for x in sel if x["method"] == "naive"]
            if m not in ("fp", "naive") and fp and naive:
                g = E.gap_closed(sel, xs[0]["family"], xs[0]["steps"], xs[0]["format"], m)
                gap = "n/a (no gap)" if g is None else f"{g:.0f}%"
            images = E.mean_std([x["images"] for x in xs], 0) if "images" in xs[0] else ""
            lines.append(f"| {prompts} | {fmt} | {label} | {E.mean_std([x['fd'] for x in xs], 2)} | "
                         f"{E.mean_std([x['accuracy'] for x in xs], 3)} | {E.mean_std([x['jaq'] for x in xs], 3)} | {gap} | "
                         f"{images} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict], family: str, steps: int, fmt: str, method: str, prompts: str = "heldout") -> list[str]:
    """Plain sentences from the demo rows of one prompt set (default: the held-out prompts, where the verdict is
    read): is there a loss, how much of it Q-Sched and PTQD recover, and JAQ vs FD."""
    rows = [x for x in rows if x["prompts"] == prompts]

    def mean(method, key, f=fmt):
        v = [x[key] for x in E.select(rows, family, steps, f, method)]
        return sum(v) / len(v)

    q = method
    fd = {m: mean(m, "fd") for m in ("naive", "ptqd", q)}
    fd["fp"] = mean("fp", "fd", "fp32")
    acc = {m: mean(m, "accuracy") for m in ("naive", "ptqd", q)}
    acc["fp"] = mean("fp", "accuracy", "fp32")
    F = fmt.upper()
    n = len({x["seed"] for x in rows})
    where = "the 20 held-out prompts" if prompts == "heldout" else "the 20 calibration prompts (unseen seeds)"
    out = [f"{family} family, {F}, {steps} steps, mean of {n} seed{'s' * (n > 1)}, on {where}:"]
    strategy = q.replace("qsched-", "")
    gap = E.gap_closed(rows, family, steps, fmt, q)
    ptqd = E.gap_closed(rows, family, steps, fmt, "ptqd")
    if gap is None:
        out.append(f"- No measurable FD loss to recover: FD {fd['fp']:.1f} (FP) vs {fd['naive']:.1f} (naive {F}); "
                   f"Q-Sched gives {fd[q]:.1f}.")
    else:
        out.append(f"- Quantization hurts: FD {fd['fp']:.1f} (FP) -> {fd['naive']:.1f} (naive {F}); attribute "
                   f"accuracy {acc['fp']:.2f} -> {acc['naive']:.2f}.")
        out.append(f"- Q-Sched ({strategy}) closes {gap:.0f}% of the FD gap (FD {fd[q]:.1f}, accuracy {acc[q]:.2f}); "
                   f"PTQD closes " + ("n/a" if ptqd is None else f"{ptqd:.0f}%") + f" (FD {fd['ptqd']:.1f}).")
    jq = {m: mean(m, "jaq") for m in ("naive", "ptqd", q)}
    jq["fp"] = mean("fp", "jaq", "fp32")
    out.append(f"- JAQ (the paper's objective, on unseen seeds): FP {jq['fp']:.3f}, naive {jq['naive']:.3f}, "
               f"PTQD {jq['ptqd']:.3f}, Q-Sched {jq[q]:.3f}"
               + (" -- Q-Sched scores above FP on JAQ: read FD, not JAQ, for quality." if jq[q] > jq["fp"] else "."))
    return out


def run_demo(out_dir: str = "qsched-demo", *, family: str = "flow", quant: str = "w4a8", steps: int = 4,
             seeds=(0, 1), per_prompt: int = 5, points: int = 21, strategy: str = "zoom",
             budget: int | None = 1000, guard: bool = False, z: float = 2.0, weights=None,
             grid_images: int | None = None, objective: str = DEFAULTS["objective"], log=print) -> dict:
    from ...qsched.coefficients import Coefficients

    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if guard and objective != "jaq":
        raise ValueError("--guard applies to --objective jaq (the reference objective has its own held-out test)")
    seeds, grid_images = check_demo_options(seeds, strategy, per_prompt, grid_images, points, steps, budget,
                                            DEFAULTS["grid_images"])
    method = OBJECTIVES[objective]
    log = log or (lambda *a: None)
    t0 = time.perf_counter()
    with E.threads(1):
        world = ShapeWorld.load(weights)
        log(f"shape world: {world.clip_path.parent} (model {world.model_hash[:12]}); JAQ = ln(CLIPScore) + "
            f"2·CLIP-IQA with the pack's metric code on the tiny CLIP {world.clip_path.name}")
        net, report = world.quantized(family, quant)
        log(f"{family}: quantized {len(report.quantized)} layers to {quant.upper()} (simulated, convolutions "
            f"included); conv_in/conv_out/embeddings stay FP32")
        ev = E.Evaluator(world, per_prompt, heldout=True)
        rows, kept, coeffs = [], {}, {}
        for r in seeds:
            keep: dict = {}
            jaq = objective == "jaq"
            rows += E.setting_rows(world, ev, family, steps, r, [quant], {quant: net}, fp=True, points=points,
                                   strategies=(strategy,) if jaq else (), budget=budget, z=z,
                                   guards=("accept",) if guard else (), fp_search=False, keep=keep,
                                   reference=() if jaq else (objective,), unchecked=False)
            row = next(x for x in rows if x["seed"] == r and x["method"] == method)
            coeffs[r] = Coefficients(row["c_x"], row["c_eps"])
            if jaq:
                kept[r] = keep[(quant, strategy)]
            log(f"seed {r}: {method} spent {row['images']} images"
                + (f" ({'kept' if row['accepted'] else 'identity'}: {row['acceptance']})" if "accepted" in row
                   else "") + "; " + ", ".join(f"{x['method']} FD {x['fd_heldout']:.1f} (held-out prompts)"
                                               for x in rows if x["seed"] == r))
        drows = demo_rows(rows)
        result = {"config": dict(families=[family], steps=[steps], formats=[quant], seeds=seeds,
                                 per_prompt=per_prompt, points=points, strategies=[strategy], budget=budget, z=z,
                                 objective=objective, model_hash=world.model_hash, device="cpu", demo=True),
                  "rows": drows}
        table = demo_table(drows)
        lines = summary(drows, family, steps, quant, method)
        os.makedirs(out_dir, exist_ok=True)
        files = {}
        if objective == "jaq":
            first = kept[seeds[0]]
            files["landscape"] = plot_landscape(
                first, os.path.join(out_dir, "landscape.png"),
                title=f"shape world, {family} {quant.upper()} {steps} steps, seed {seeds[0]}: {strategy} search, "
                      f"{first.images_spent} images\nmean JAQ over the 20 calibration prompts: best "
                      f"{first.best_score:.3f}, identity {first.identity_score:.3f}")
        best = coeffs[seeds[0]]
        files["grid"] = sample_grid(world, family, net, steps, quant, best, seeds[0], per_prompt, grid_images,
                                    os.path.join(out_dir, "grid.png"))
        files["preset"] = os.path.join(out_dir, "preset.json")
        best.with_metadata(shape_world_demo=True, family=family, quant=quant, objective=objective).save(
            files["preset"])
    seconds = time.perf_counter() - t0
    result["seconds"] = seconds
    files["results"] = os.path.join(out_dir, "results.json")
    atomic_write_text(files["results"], json.dumps(result, indent=1) + "\n")
    files["table"] = os.path.join(out_dir, "table.md")
    how = {"jaq": f"the paper's JAQ search ({strategy}, 20 calibration prompts)",
           "reference": "fitted to the full-precision model (4 calibration prompts fit, 8 more test it; identity "
                        "unless the test shows a significant gain)",
           "hybrid": "the JAQ search around the reference fit, kept only if its JAQ gain holds on the test prompts "
                     "and the distance to full precision does not grow"}[objective]
    atomic_write_text(files["table"], (
        f"# Q-Sched demo: the shape world, {family} family, {quant.upper()}, {steps} steps, objective {objective}\n\n"
        f"Models trained here (docs/shape_world.md). Q-Sched coefficients: {how}. JAQ = ln(CLIPScore) + 2·CLIP-IQA "
        f"computed by the pack's own metric code on a tiny CLIP trained on the world; FD (Fréchet distance in an "
        f"independent network's features vs held-out renders) and accuracy (all caption attributes right, same "
        f"network) never enter the calibration. {per_prompt} images per prompt x 20 prompts per row and seed; "
        f"'heldout' rows: 20 prompts no calibration saw (read the verdict there), 'calibration' rows: the 20 "
        f"calibration prompts on unseen seeds (the full table: benchmarks/results/shapeworld/).\n\n"
        + table + "\n" + "\n".join(lines) + "\n\n"
        f"grid.png: rows = the 20 calibration prompts, columns = FP | naive {quant.upper()} | Q-Sched "
        f"{quant.upper()} ({grid_images} images each, same noise in every column; seed {seeds[0]}).\n"))
    return finish_demo(log, result, table, lines, files, seconds)


def finish_demo(log, result: dict, table: str, summary: list, files: dict, seconds: float) -> dict:
    """Print the table, the summary and the files written; the demos' return value."""
    log("")
    log(table)
    log("\n".join(summary))
    log(f"\nwrote {', '.join(files[k] for k in ('table', 'grid', 'landscape', 'results', 'preset') if k in files)} "
        f"in {seconds:.0f} s")
    return {"result": result, "summary": summary, "files": files, "seconds": seconds}


@dataclass(frozen=True)
class GridLayout:
    """Pixel layout of the sample grid: a header row, a label column, then one block of ``images`` tiles per
    column (method), one row per prompt."""

    rows: int
    columns: int
    images: int
    tile: int = 64  # a 32x32 render upscaled 2x (nearest)
    gap: int = 2  # between tiles of one block
    block_gap: int = 14  # between blocks
    label: int = 250  # label column width (the prompt)
    header: int = 20

    @property
    def block(self) -> int:
        return self.images * self.tile + (self.images - 1) * self.gap

    @property
    def size(self) -> tuple[int, int]:
        return (self.label + self.columns * self.block + (self.columns - 1) * self.block_gap,
                self.header + self.rows * (self.tile + self.gap))

    def box(self, row: int, column: int, i: int) -> tuple[int, int, int, int]:
        x = self.label + column * (self.block + self.block_gap) + i * (self.tile + self.gap)
        y = self.header + row * (self.tile + self.gap)
        return (x, y, x + self.tile, y + self.tile)


def grid_columns(world, family, net, steps, quant, coefficients, r, per_prompt, images):
    """``[(title, images [20·images, 32, 32, 3])]``: FP | naive | Q-Sched, the first ``images`` evaluation images of
    every calibration prompt for seed r (the same noise in every column)."""
    prompts = D.calibration_prompts()
    seeds_all = E.eval_seeds(r, len(prompts) * per_prompt)
    ps = [p for p in prompts for _ in range(images)]
    ss = [seeds_all[j * per_prompt + i] for j in range(len(prompts)) for i in range(images)]
    q = world.generator(family, steps, net=net, quant=quant)
    return [("FP32", world.generator(family, steps).generate(None, ps, ss)),
            (f"naive {quant.upper()}", q.generate(None, ps, ss)),
            (f"Q-Sched {quant.upper()}", q.generate(coefficients, ps, ss))]


def sample_grid(world, family, net, steps, quant, coefficients, r, per_prompt, images, path) -> str:
    from PIL import Image, ImageDraw, ImageFont


    cols = grid_columns(world, family, net, steps, quant, coefficients, r, per_prompt, images)
    prompts = D.calibration_prompts()
    lay = GridLayout(rows=len(prompts), columns=len(cols), images=images)
    canvas = Image.new("RGB", lay.size, (48, 48, 48))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, (title, batch) in enumerate(cols):
        draw.text((lay.box(0, c, 0)[0], 4), title, fill=(255, 255, 255), font=font)
        for j in range(len(prompts)):
            for i in range(images):
                arr = (batch[j * images + i].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                canvas.paste(Image.fromarray(arr).resize((lay.tile, lay.tile), Image.NEAREST), lay.box(j, c, i)[:2])
    for j, p in enumerate(prompts):
        draw.text((4, lay.box(j, 0, 0)[1] + lay.tile // 2 - 6), p, fill=(255, 255, 255), font=font)
    return save_png(canvas, path)
