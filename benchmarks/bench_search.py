"""Benchmark: how many images the adaptive strategies spend to get as good as the full grid (Algorithm 1).

For every objective the full grid is evaluated once (all its points cached); each adaptive strategy is then
run against the cache, counting the images it would spend (points x prompts). Reported per objective:

* ``img→0.5%``  images spent until the best-so-far is within 0.5% of the grid's best mean JAQ (the issue's
  criterion, relative to |best|);
* ``img→99%``   images until the best-so-far recovers 99% of the grid's gain over identity (stricter: on
  objectives whose values vary little, 0.5% of |best| is reached by identity itself);
* ``gain``      final (strategy best − identity) / (grid best − identity); ``total`` images the strategy spent;
  ``%grid`` that total as a share of the grid's images.

Objectives: synthetic (bowl / ridge / multimodal, with and without deterministic "measurement" noise,
in the 2-D ``start``, 4-D ``start_end`` and 4-D ``per_step`` spaces; 20 prompts per point as in the paper), and
the tiny random SDXL-like pipeline (W4A4-quantized, 4 steps, 32x32, 4 prompts, 15x15 ``start`` grid) under
three scorers: fidelity to the full-precision images (1 − MSE, what Theorem 1 is about), the weight-free image
statistic stand-in, and the real JAQ code (CLIPScore + 2·CLIP-IQA) with tiny random CLIP weights; and the models
trained by this project (the shape world's flow model, ``calibration/shapeworld``: W4A4 and W8A8 at 2/4/8 steps, the
pack's JAQ on its tiny CLIP, its 20 calibration prompts, 21x21 ``start`` grid on calibration seed 0), whose landscape
is a real one.

    .venv/bin/python benchmarks/bench_search.py            # everything
    .venv/bin/python benchmarks/bench_search.py --synthetic-only
    .venv/bin/python benchmarks/bench_search.py --trained-only     # the trained shape-world model only
Writes benchmarks/results/search_benchmark.md and .json (--trained-only: search_benchmark_trained.md and .json). The
shape-world part is six 21x21 grids of 20 images, 1.0-2.9 s a grid point on one thread of a 2-core machine: about
80 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def noisy(f, amp):
    """f plus a deterministic pseudo-random offset per point (a fixed calibration set's sampling noise)."""
    def g(p):
        h = hashlib.sha256(json.dumps([round(v, 9) for v in p]).encode()).digest()
        return f(p) + amp * (int.from_bytes(h[:8], "big") / 2**64 - 0.5)
    return g


def replay(space, strategy, table, n, per_point, options=None):
    """Run ``strategy`` against a cached table point -> score; return the trace of best-so-far per image."""
    from qsched_pack.calibration.search import run_strategy

    order = []

    def ev(points):
        out = []
        for p in points:
            if p not in table:
                raise KeyError(f"{p} is not a grid point")
            if p not in order:
                order.append(p)
            out.append(table[p])
        return out

    run_strategy(space, strategy, ev, n, options)
    return order


def metrics(order, table, identity, grid_best, per_point, grid_images):
    ident = table[identity]
    thr_rel = grid_best - 0.005 * abs(grid_best)
    gain = grid_best - ident
    thr_gain = ident + 0.99 * gain
    best, img_rel, img_gain = -math.inf, None, None
    for i, p in enumerate(order):
        best = max(best, table[p])
        images = (i + 1) * per_point
        if img_rel is None and best >= thr_rel:
            img_rel = images
        if img_gain is None and best >= thr_gain:
            img_gain = images
    total = len(order) * per_point
    return {"img_rel": img_rel, "img_gain": img_gain, "gain": 1.0 if gain == 0 else (best - ident) / gain,
            "total": total, "pct_grid": 100.0 * total / grid_images, "grid_images": grid_images}


def bench_table(name, space, table, n, per_point, rows, strategies=("zoom", "pattern")):
    identity = space.identity
    grid_pts = [p for p in table if p != identity or 1.0 in space.axis(n)]
    grid_best = max(table.values())
    grid_images = len(table) * per_point
    for strategy in strategies:
        order = replay(space, strategy, table, n, per_point)
        m = metrics(order, table, identity, grid_best, per_point, grid_images)
        m.update(objective=name, space=space.kind, dim=space.dim, n=n, strategy=strategy, grid_points=len(table),
                 grid_best=grid_best, identity=table[identity], prompts=per_point)
        rows.append(m)
        print(fmt_row(m), flush=True)
    return grid_pts


def synthetic(rows):
    from qsched_pack.calibration.search import SearchSpace
    from qsched_pack.calibration.testing import synthetic_objective

    per_point = 20
    for kind, steps, n in (("start", 4, 50), ("start_end", 4, 11), ("per_step", 2, 9)):
        space = SearchSpace(kind, steps)
        for obj in ("bowl", "ridge", "multimodal"):
            for amp in (0.0, 0.002):
                f = synthetic_objective(obj, space.dim)
                f = noisy(f, amp) if amp else f
                table = {space.identity: f(space.identity)}
                for p in space.grid(n):
                    table[p] = f(p)
                label = f"synthetic {obj}{' +noise' if amp else ''}"
                bench_table(label, space, table, n, per_point, rows)


def tiny_pipeline(rows, n=21, prompts_n=4, steps=4, size=32):
    import torch

    from qsched_pack.calibration.generate import DiffusersGenerator
    from qsched_pack.calibration.testing import ImageStatScorer
    from qsched_pack.calibration.runner import score_images
    from qsched_pack.calibration.search import SearchSpace
    from qsched_pack.calibration.tiny_pipelines import build_sdxl_pipeline
    from qsched_pack.qsched import Coefficients
    from qsched_pack.qsched._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    prompts = ["a photo of a cat sitting on a red chair", "a watercolor painting of a dog in the snow",
               "a futuristic city at night with neon lights", "a bowl of fruit on a wooden table, studio photo"]
    prompts = prompts[:prompts_n]
    seeds = [42 + i for i in range(len(prompts))]
    fp = DiffusersGenerator(build_sdxl_pipeline(0), steps=steps, height=size, width=size, batch_size=4,
                            model_hash_value="tiny-sdxl")
    q = DiffusersGenerator(build_sdxl_pipeline(0), steps=steps, height=size, width=size, batch_size=4,
                           quant="w4a4", model_hash_value="tiny-sdxl")
    ref = fp.generate(Coefficients.identity(steps), prompts, seeds)

    class Fidelity:
        config = {"class": "Fidelity", "score": "1 - MSE to the full-precision images"}

        def components(self, images, prompts):
            return {"mse": ((images - ref) ** 2).flatten(1).mean(1)}

        def score(self, images, prompts):
            return 1.0 - self.components(images, prompts)["mse"]

    scorers = {"tiny SDXL W4A4, fidelity (1−MSE to FP)": Fidelity(),
               "tiny SDXL W4A4, image-stat stand-in": ImageStatScorer()}
    jaq = _tiny_jaq()
    if jaq is not None:
        scorers["tiny SDXL W4A4, JAQ code + random tiny CLIPs"] = jaq
    space = SearchSpace("start", steps)
    tables = {k: {} for k in scorers}
    t0 = time.perf_counter()
    pts = space.grid(n)
    for i, p in enumerate(pts):
        imgs = q.generate(space.coefficients(p), prompts, seeds)
        for k, s in scorers.items():
            vals, _ = score_images(s, imgs, prompts)
            tables[k][p] = math.fsum(vals) / len(vals)
        if i % 50 == 0:
            print(f"  tiny grid {i + 1}/{len(pts)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    for k in scorers:
        bench_table(k, space, tables[k], n, len(prompts), rows)
    return {k: {json.dumps(list(p)): v for p, v in t.items()} for k, t in tables.items()}


def trained_world(rows, n=21, formats=("w4a4", "w8a8"), steps_list=(2, 4, 8), family="flow"):
    """The trained shape world (docs/shape_world.md): full grid once per (format, steps), then the strategies
    replayed against it."""
    from qsched_pack.calibration.runner import score_images
    from qsched_pack.calibration.search import SearchSpace
    from qsched_pack.calibration.shapeworld.data import calibration_prompts
    from qsched_pack.calibration.shapeworld.experiment import calib_seeds, threads
    from qsched_pack.calibration.shapeworld.world import ShapeWorld

    world = ShapeWorld.load()
    jaq = world.jaq()
    prompts = calibration_prompts()
    seeds = calib_seeds(0, len(prompts))
    tables = {}
    with threads(1):
        for fmt in formats:
            net = world.quantized(family, fmt)[0]
            for steps in steps_list:
                gen = world.generator(family, steps, net=net, quant=fmt)
                space = SearchSpace("start", steps)
                table = {}
                for p in [space.identity] + space.grid(n):
                    vals, _ = score_images(jaq, gen.generate(space.coefficients(p), prompts, seeds), prompts)
                    table[p] = math.fsum(vals) / len(vals)
                label = f"shape world {family} {fmt.upper()} {steps} steps, JAQ"
                bench_table(label, space, table, n, len(prompts), rows)
                tables[label] = {json.dumps(list(p)): v for p, v in table.items()}
    return tables


def _tiny_jaq():
    """The real JAQ class on tiny random CLIPs written in the users' file format."""
    import tempfile
    from pathlib import Path

    from qsched_pack.calibration.jaq import JAQ
    from qsched_pack.calibration.testing import save_openai_torchscript

    d = Path(tempfile.mkdtemp(prefix="qsched-bench-clip-"))
    return JAQ(preset="clip", k=2.0, device="cpu",
               weights={"clipiqa": str(save_openai_torchscript(d / "RN50.pt", "rn", seed=1)),
                        "clipscore": str(save_openai_torchscript(d / "ViT-L-14.pt", "vit", seed=3))})


def fmt_row(m):
    def f(v):
        return "not reached" if v is None else str(v)
    return (f"| {m['objective']} | {m['space']} ({m['dim']}-D, n={m['n']}) | {m['strategy']} | "
            f"{m['grid_images']} | {f(m['img_rel'])} | {f(m['img_gain'])} | {100 * m['gain']:.1f}% | "
            f"{m['total']} | {m['pct_grid']:.2f}% |")


HEADER = ("| objective | space | strategy | grid images | img→0.5% | img→99% gain | gain recovered | total images | "
          "%grid |\n|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic-only", action="store_true")
    ap.add_argument("--trained-only", action="store_true")
    ap.add_argument("--points", type=int, default=15, help="grid points per dim on the tiny pipeline")
    args = ap.parse_args(argv)
    rows = []
    print(HEADER)
    tiny = trained = None
    if not args.trained_only:
        synthetic(rows)
    if not (args.synthetic_only or args.trained_only):
        tiny = tiny_pipeline(rows, n=args.points)
    if not args.synthetic_only:
        trained = trained_world(rows)
    os.makedirs(RESULTS, exist_ok=True)
    from qsched_pack.qsched._io import atomic_write_text

    summary = {}
    for strat in ("zoom", "pattern"):
        rs = [r for r in rows if r["strategy"] == strat]
        summary[strat] = {
            "reached_0.5%": sum(r["img_rel"] is not None for r in rs), "objectives": len(rs),
            "max_pct_grid_to_0.5%": max(100.0 * r["img_rel"] / r["grid_images"] for r in rs if r["img_rel"]),
            "reached_99%_gain": sum(r["img_gain"] is not None for r in rs),
            "median_pct_grid_total": sorted(r["pct_grid"] for r in rs)[len(rs) // 2]}
    text = ("# Search benchmark (benchmarks/bench_search.py)\n\n" + HEADER + "\n" +
            "\n".join(fmt_row(r) for r in rows) + "\n\nSummary: " + json.dumps(summary) + "\n")
    name = "search_benchmark_trained" if args.trained_only else "search_benchmark"
    atomic_write_text(os.path.join(RESULTS, name + ".md"), text)
    atomic_write_text(os.path.join(RESULTS, name + ".json"),
                      json.dumps({"rows": rows, "summary": summary, "tiny_tables": tiny, "trained_tables": trained},
                                 indent=1) + "\n")
    print("\nSummary:", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
