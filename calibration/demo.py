"""``qsched demo``: the README's first command.

Default: **the trained tiny world** (docs/tiny_world.md). It loads the shipped weights (or, if they are missing,
trains them once into the cache), quantizes the digit generator (``--quant``, default W4A4: the setting with a real
loss), calibrates Q-Sched with JAQ (the tiny TC/IQ stand-ins, ln(TC) + 2·IQ) on the 20 prompts with the adaptive
``zoom`` search under an image budget, and evaluates FP32 vs naive vs PTQD vs Q-Sched on the reference metrics
(Fréchet distance vs held-out real digits, digit accuracy) and JAQ, on unseen seeds, mean ± std over seeds. The
numbers are the matching rows of the experiment table (same seeds, same code: ``calibration.tinyworld.experiment``). Writes
into ``--out``: ``table.md`` (table + summary), ``results.json``, ``landscape.png`` (the search of the first seed),
``grid.png`` (rows: prompts; columns: FP32 | naive | Q-Sched, the same noise in every column), ``preset.json``.

``--random-models``: the machinery demo on tiny *random* SDXL-like / FLUX-like pipelines -- every sampler, identity
vs Q-Sched coefficients (noise-like pictures; it shows the update rules run end to end).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from ..qsched import Coefficients, samplers
from ..qsched._io import atomic_write, atomic_write_text
from ..qsched.schedules import few_step_sigmas
from .denoisers import FluxFlowDenoiser, UNetEpsDenoiser, flux_conditioning, sdxl_conditioning

# ---------------------------------------------------------------------------------------------------------
# the trained-model demo

DEFAULTS = dict(quant="w4a4", steps=4, seeds=(0, 1, 2), per_prompt=20, points=21, strategy="zoom", budget=1500,
                grid_images=4)


def check_demo_options(seeds, strategy: str, per_prompt: int, grid_images: int | None, points: int, steps: int,
                       budget: int | None, default_grid_images: int) -> tuple[list, int]:
    """The trained-model demos' option checks, before anything is loaded or written: (unique seeds, grid images)."""
    from .search import SearchSpace, check_budget, check_points

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


def run_demo(out_dir: str = "qsched-demo", *, quant: str = "w4a4", steps: int = 4, seeds=(0, 1, 2),
             per_prompt: int = 20, points: int = 21, strategy: str = "zoom", budget: int | None = 1500,
             guard: bool = False, z: float = 2.0, weights: str | None = None, grid_images: int | None = None,
             log=print) -> dict:
    """The trained-model demo (module docstring). Returns ``{"result", "summary", "files", "seconds"}``."""
    from .tinyworld import experiment as E
    from .tinyworld.train import load_or_train
    from .plots import plot_landscape

    seeds, grid_images = check_demo_options(seeds, strategy, per_prompt, grid_images, points, steps, budget,
                                            DEFAULTS["grid_images"])
    log = log or (lambda *a: None)
    t0 = time.perf_counter()
    with E.single_thread():
        world = load_or_train(weights, log=log)
        log(f"model: {world.source} (sha256 {str(world.model_hash)[:12]})")
        jaq = E.make_jaq(world)
        net, report = world.quantized_generator(quant)
        if not report.quantized:
            raise ValueError(f"format {quant!r} quantizes no layer of the tiny generator; use w8a8, w4a8, w4a4, ...")
        log(f"quantized {len(report.quantized)} layers to {quant.upper()} (simulated); embedders and output "
            f"projection stay FP32")
        rows, kept = [], {}
        for r in seeds:
            rows.append(E.fp_row(world, jaq, steps, r, per_prompt))
            keep: dict = {}
            done = E.quantized_rows(world, jaq, steps, quant, net, r, per_prompt=per_prompt, points=points,
                                    strategies=(strategy,), budget=budget, guard=guard, z=z, keep=keep)
            rows.extend(done)
            kept[r] = keep
            res = keep[strategy]
            log(f"seed {r}: Q-Sched {strategy} searched {res.images_spent} images, best c_x[0] = "
                f"{res.best_point[0]:.3f}, c_eps[0] = {res.best_point[1]:.3f}; " + ", ".join(
                    f"{x['method']} FD {x['fd']:.2f}" for x in [rows[-len(done) - 1]] + done))
        result = {"config": dict(E.config([steps], [quant], seeds, per_prompt, points, 2.0, "log_per_image", (strategy,), world,
                                          budget, guard, z), demo=True), "rows": rows}
        table = E.format_table(result)
        summary = E.summary(result, steps, quant, strategy)

        os.makedirs(out_dir, exist_ok=True)
        first = kept[seeds[0]][strategy]
        files = {}
        files["landscape"] = plot_landscape(
            first, os.path.join(out_dir, "landscape.png"),
            title=f"tiny world {quant.upper()}, {steps} steps, seed {seeds[0]}: {strategy} search, "
                  f"{first.images_spent} images\nmean JAQ over the 20 calibration prompts: best "
                  f"{first.best_score:.3f}, identity {first.identity_score:.3f}")
        files["grid"] = sample_grid(world, net, steps, quant, first.best, seeds[0], per_prompt, grid_images,
                                    os.path.join(out_dir, "grid.png"))
        files["preset"] = os.path.join(out_dir, "preset.json")
        first.best.with_metadata(tiny_world_demo=True).save(files["preset"])
    seconds = time.perf_counter() - t0
    result["seconds"] = seconds
    files["results"] = os.path.join(out_dir, "results.json")
    atomic_write_text(files["results"], json.dumps(result, indent=1) + "\n")
    files["table"] = os.path.join(out_dir, "table.md")
    text = (f"# Q-Sched demo: a model trained here, quantized to {quant.upper()}, recovered\n\n"
            f"Tiny text-conditioned rectified-flow digit generator (qsched/tiny, docs/tiny_world.md), {steps} "
            f"Euler steps. Q-Sched: {strategy} search over (c_x, c_eps) start values in [0.8, 1.2] "
            f"({points}-point lattice{'' if budget is None else f', budget {budget} images'}), JAQ = ln(TC) + 2·IQ "
            f"with the tiny stand-in scorers, on the 20 prompts (1 image each). FD and accuracy: a separate "
            f"reference network vs held-out real digits, never seen by the calibration.\n\n"
            + table + "\n" + "\n".join(summary) + "\n\n"
            f"grid.png: rows = the 20 prompts, columns = FP32 | naive {quant.upper()} | Q-Sched {quant.upper()} "
            f"({grid_images} images each, the same seeds in every column; seed {seeds[0]}). landscape.png: the "
            f"search of seed {seeds[0]}. preset.json: its coefficients.\n")
    atomic_write_text(files["table"], text)
    return finish_demo(log, result, table, summary, files, seconds)


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
    tile: int = 48  # a 16x16 digit upscaled 3x (nearest)
    gap: int = 2  # between tiles of one block
    block_gap: int = 14  # between blocks
    label: int = 64  # label column width
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


def grid_columns(world, net, steps: int, quant: str, coefficients, r: int, per_prompt: int, images: int):
    """``[(title, tensor [20·images, 16, 16, 3])]`` for FP32 | naive | Q-Sched: the first ``images`` evaluation
    images of every prompt for seed r (the same noise in every column)."""
    from .tinyworld.data import all_prompts
    from .tinyworld.experiment import eval_seeds

    prompts = all_prompts()
    seeds_all = eval_seeds(r, len(prompts) * per_prompt)
    ps = [p for p in prompts for _ in range(images)]
    ss = [seeds_all[j * per_prompt + i] for j in range(len(prompts)) for i in range(images)]
    q = world.sampler(steps, net=net, quant=quant)
    return [("FP32", world.sampler(steps).generate(None, ps, ss)),
            (f"naive {quant.upper()}", q.generate(None, ps, ss)),
            (f"Q-Sched {quant.upper()}", q.generate(coefficients, ps, ss))]


def sample_grid(world, net, steps: int, quant: str, coefficients, r: int, per_prompt: int, images: int,
                path: str) -> str:
    from PIL import Image, ImageDraw, ImageFont

    from .tinyworld.data import STYLES, all_prompts, parse_prompt
    from .plots import _save_png

    cols = grid_columns(world, net, steps, quant, coefficients, r, per_prompt, images)
    prompts = all_prompts()
    lay = GridLayout(rows=len(prompts), columns=len(cols), images=images)
    canvas = Image.new("RGB", lay.size, (48, 48, 48))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, (title, batch) in enumerate(cols):
        x0 = lay.box(0, c, 0)[0]
        draw.text((x0, 4), title, fill=(255, 255, 255), font=font)
        for j in range(len(prompts)):
            for i in range(images):
                arr = (batch[j * images + i].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                tile = Image.fromarray(arr).resize((lay.tile, lay.tile), Image.NEAREST)
                canvas.paste(tile, lay.box(j, c, i)[:2])
    for j, p in enumerate(prompts):
        d, s = parse_prompt(p)
        draw.text((4, lay.box(j, 0, 0)[1] + lay.tile // 2 - 6), f"{d}  {STYLES[s]}", fill=(255, 255, 255),
                  font=font)
    return _save_png(canvas, path)


# ---------------------------------------------------------------------------------------------------------
# the random-model machinery demo (``qsched demo --random-models``)

PROMPT = "a watercolor painting of a dog in the snow"

# (label, sampler, parameterization, schedule family, extra sampler options)
RUNS = [
    ("tcd (eps, gamma=0.3)", "tcd", "eps", "tcd", {"eta": 0.3}),
    ("lcm (eps)", "lcm", "eps", "lcm", {}),
    ("euler_ancestral (eps)", "euler_ancestral", "eps", "sdxl_turbo", {}),
    ("euler (eps)", "euler", "eps", "sdxl_turbo", {}),
    ("euler (flow)", "euler", "flow", "flux_schnell", {}),
    ("euler_ancestral (flow, RF)", "euler_ancestral", "flow", "flux_schnell", {"eta": 1.0}),
    ("lcm (flow)", "lcm", "flow", "flux_schnell", {}),
]


def run_random_models_demo(out_dir: str = "qsched-demo", steps: int = 4, size: int = 64, seed: int = 0) -> str:
    """Every sampler, identity vs the official example coefficients, on tiny random pipelines."""
    from PIL import Image

    from .tiny_pipelines import build_flux_pipeline, build_sdxl_pipeline

    os.makedirs(out_dir, exist_ok=True)
    coeff = Coefficients.ramp(steps, 1.012, 0.967, 0.955, 1.099)  # the official example (collect_images.sh)
    ident = Coefficients.identity(steps)
    sdxl, flux = build_sdxl_pipeline(seed), build_flux_pipeline(seed)
    with torch.no_grad():
        eps_model = UNetEpsDenoiser(sdxl.unet, sdxl_conditioning(sdxl, PROMPT, size, size))
        flow_model = FluxFlowDenoiser(flux.transformer, flux_conditioning(flux, PROMPT))
    lat = size // 8
    rows, tiles = [], []
    for label, name, param, family, opts in RUNS:
        fn = samplers.SAMPLERS[name]
        sigmas = few_step_sigmas(family, steps)
        model, pipe, ch = (eps_model, sdxl, 4) if param == "eps" else (flow_model, flux, 16)
        noise = torch.randn(1, ch, lat, lat, generator=torch.Generator().manual_seed(seed))
        x0 = noise * ((1 + sigmas[0] ** 2).sqrt() if param == "eps" else sigmas[0])
        outs, secs = [], []
        for c in (ident, coeff):
            t0 = time.perf_counter()
            kw = dict(opts, parameterization=param) if name != "tcd" else dict(opts)
            outs.append(fn(model, x0.clone(), sigmas.float(), {"seed": seed}, disable=True, coefficients=c, **kw))
            secs.append(time.perf_counter() - t0)
        change = float((outs[1] - outs[0]).norm() / outs[0].norm())
        rows.append((label, secs[0], secs[1], float(outs[0].std()), float(outs[1].std()), change))
        tiles.append([_decode(pipe, o, param) for o in outs])

    # Wall times are indicative only (speed lives in benchmarks/, measured side by side).
    table = ["| sampler | s/img identity | latent std identity | latent std Q-Sched | ‖x_Q − x_1‖/‖x_1‖ |",
             "|---|---|---|---|---|"]
    table += [f"| {r[0]} | {r[1]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.4f} |" for r in rows]
    header = (f"Q-Sched demo: {steps} steps, {size}x{size}, seed {seed}, tiny random models; Q-Sched coefficients "
              f"c_x = {_fmt(coeff.c_x)}, c_eps = {_fmt(coeff.c_eps)}\n")
    text = header + "\n" + "\n".join(table) + "\n"
    atomic_write_text(os.path.join(out_dir, "table.md"), text)
    grid = Image.new("RGB", (2 * size, len(tiles) * size))
    for r, pair in enumerate(tiles):
        for c, img in enumerate(pair):
            grid.paste(img, (c * size, r * size))
    atomic_write(os.path.join(out_dir, "grid.png"), lambda tmp: grid.save(tmp, format="PNG"))
    print(text)
    print(f"wrote {os.path.join(out_dir, 'table.md')} and {os.path.join(out_dir, 'grid.png')} "
          f"(rows: samplers as in the table; left: identity, right: Q-Sched)")
    return text


def _decode(pipe, latents: torch.Tensor, param: str):
    from PIL import Image

    vae = pipe.vae
    with torch.no_grad():
        z = latents / vae.config.scaling_factor
        if param == "flow":
            z = z + vae.config.shift_factor
        img = vae.decode(z.to(vae.dtype)).sample[0]
    img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(img)


def _fmt(vals) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in vals) + "]"
