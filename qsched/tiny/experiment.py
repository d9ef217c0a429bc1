"""The tiny world's version of the paper's Table 1: FP32 vs quantized (naive, PTQD, Q-Sched) at 2/4/8 steps.

For every step count, format and seed r:

* evaluation: the 20 prompts x ``per_prompt`` images, noise seeds ``1_000_000 + 10_000·r + i`` (never used by any
  calibration); reference metric (Fréchet distance vs the real held-out digits, digit accuracy) and JAQ
  (= TC + 2·IQ with the tiny scorers, the calibration objective, here on unseen seeds);
* PTQD: ``qsched.ptqd.fit_ptqd`` on (eps_fp, eps_q) pairs along the FP trajectories of the 20 calibration prompts;
* Q-Sched: ``calibration.search.calibrate`` on the 20 prompts (one image each, seeds ``5_000 + 100·r + i``), JAQ
  objective, 2-D ``start`` space (ramps to 1 at the last step, as the released search), strategies ``zoom``
  (adaptive) and optionally ``grid`` on the same lattice.

``python -m qsched_pack.qsched.tiny.experiment --out DIR`` writes ``DIR/results.json`` (every number, every seed)
and ``DIR/table.md`` (mean ± std over seeds). Same seeds -> same table (everything is seeded; 1 CPU thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .. import samplers
from ..coefficients import atomic_write_text
from ..ptqd import collect_pairs, fit_ptqd
from .data import all_prompts
from .world import TinyWorld, initial_noise

FORMATS = ("w8a8", "w4a8", "w4a4")
STEPS = (2, 4, 8)
SEEDS = (0, 1, 2)


def eval_seeds(r: int, n: int) -> list[int]:
    return [1_000_000 + 10_000 * r + i for i in range(n)]


def calib_seeds(r: int, n: int) -> list[int]:
    return [5_000 + 100 * r + i for i in range(n)]


def make_jaq(world: TinyWorld, k: float = 2.0, tc_transform: str = "log"):
    """JAQ over the tiny scorers. Default ``tc_transform="log"``: ln(TC) + k·IQ, the official ``new`` criterion of
    the CLIP preset (docs/tiny_world.md: with the raw 0..100 TC the search buys alignment with diversity)."""
    from ...calibration.jaq import JAQ

    return JAQ(tc=world.text_alignment(), iq=world.image_quality(), k=k, tc_transform=tc_transform)


def measure(world: TinyWorld, jaq, gen, coefficients, prompts, seeds) -> dict:
    images = gen.generate(coefficients, prompts, seeds)
    comps = jaq.components(images, prompts)
    out = world.reference().evaluate(images, prompts)
    out.update(jaq=float(jaq.combine(comps["tc"], comps["iq"]).mean()), tc=float(comps["tc"].mean()),
               iq=float(comps["iq"].mean()))
    return out


def fit_ptqd_for(world: TinyWorld, net_q, steps: int, prompts, seeds):
    fp, q = world.sampler(steps), world.sampler(steps, net=net_q)
    x = initial_noise(seeds) * fp.sigmas[0]
    eps_fp, eps_q = collect_pairs(samplers.sample_euler, fp.denoiser(prompts), q.denoiser(prompts), x, fp.sigmas,
                                  parameterization="flow")
    return fit_ptqd(eps_fp, eps_q)


def run(out_dir: str, *, steps_list=STEPS, formats=FORMATS, seeds=SEEDS, per_prompt: int = 20, points: int = 21,
        strategies=("zoom",), weights: str | None = None, tc_transform: str = "log", k: float = 2.0,
        log=print) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed float reductions (and a busy 2-core CPU runs faster on one)
    try:
        return _run(out_dir, steps_list, formats, seeds, per_prompt, points, strategies, weights, tc_transform, k, log)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, steps_list, formats, seeds, per_prompt, points, strategies, weights, tc_transform, k, log) -> dict:
    from ...calibration.search import calibrate

    t_start = time.perf_counter()
    world = TinyWorld.load(weights, train_if_missing=True, log=log)
    jaq = make_jaq(world, k, tc_transform)
    calib_prompts = all_prompts()
    eval_prompts = [p for p in calib_prompts for _ in range(per_prompt)]
    nets = {f: world.quantized_generator(f)[0] for f in formats}
    rows = []  # one dict per (steps, format, method, seed)
    for steps in steps_list:
        for r in seeds:
            es, cs = eval_seeds(r, len(eval_prompts)), calib_seeds(r, len(calib_prompts))
            rows.append(dict(steps=steps, format="fp32", method="fp32", seed=r,
                             **measure(world, jaq, world.sampler(steps), None, eval_prompts, es)))
            for f in formats:
                gen = world.sampler(steps, net=nets[f], quant=f)
                base = dict(steps=steps, format=f, seed=r)
                rows.append(dict(base, method="naive", **measure(world, jaq, gen, None, eval_prompts, es)))
                corr = fit_ptqd_for(world, nets[f], steps, calib_prompts, cs)
                ptqd_gen = world.sampler(steps, net=nets[f], quant=f)
                ptqd_gen.model_wrapper = corr.wrap
                rows.append(dict(base, method="ptqd", gamma=list(corr.gamma),
                                 **measure(world, jaq, ptqd_gen, None, eval_prompts, es)))
                for strategy in strategies:
                    t0 = time.perf_counter()
                    res = calibrate(gen, jaq, calib_prompts, space="start", strategy=strategy, points=points,
                                    seeds=cs)
                    m = measure(world, jaq, gen, res.best, eval_prompts, es)
                    rows.append(dict(base, method=f"qsched-{strategy}", images=res.images_spent,
                                     search_seconds=time.perf_counter() - t0, c_x=list(res.best.c_x),
                                     c_eps=list(res.best.c_eps), calib_jaq=res.best_score,
                                     calib_jaq_identity=res.identity_score, **m))
                if log:
                    done = [x for x in rows if x["steps"] == steps and x["seed"] == r and x["format"] == f]
                    log(f"steps {steps} seed {r} {f}: " + ", ".join(
                        f"{x['method']} fd {x['fd']:.2f} jaq {x['jaq']:.2f}" for x in done))
    result = {"config": {"steps": list(steps_list), "formats": list(formats), "seeds": list(seeds),
                         "per_prompt": per_prompt, "points": points, "k": k, "tc_transform": tc_transform, "strategies": list(strategies),
                         "model_hash": world.model_hash, "calibration_prompts": len(calib_prompts)},
              "rows": rows, "seconds": time.perf_counter() - t_start}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1) + "\n")
    table = format_table(result)
    atomic_write_text(os.path.join(out_dir, "table.md"), table)
    if log:
        log(table)
    return result


def _ms(vals, digits: int) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    std = float(t.std()) if len(vals) > 1 else 0.0
    return f"{float(t.mean()):.{digits}f} ± {std:.{digits}f}"


def format_table(result: dict) -> str:
    """Markdown: one row per (steps, method); mean ± std over seeds; gap closed = share of the FP32→naive FD gap
    removed (paired by seed; 'n/a' unless the mean gap exceeds twice its spread over seeds and 5% of FP32's FD)."""
    rows = result["rows"]
    lines = ["| steps | model | method | FD ↓ | accuracy ↑ | JAQ ↑ | TC | IQ | FD gap closed | search images |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = ["fp32", "naive", "ptqd"] + [f"qsched-{s}" for s in result["config"]["strategies"]]
    for steps in result["config"]["steps"]:
        fp = {x["seed"]: x["fd"] for x in rows if x["steps"] == steps and x["method"] == "fp32"}
        for f in ["fp32"] + result["config"]["formats"]:
            naive = {x["seed"]: x["fd"] for x in rows if x["steps"] == steps and x["format"] == f
                     and x["method"] == "naive"}
            for method in order:
                sel = [x for x in rows if x["steps"] == steps and x["format"] == f and x["method"] == method]
                if not sel:
                    continue
                closed = ""
                if method not in ("fp32", "naive"):
                    gaps = [naive[x["seed"]] - fp[x["seed"]] for x in sel]
                    gain = [naive[x["seed"]] - x["fd"] for x in sel]
                    spread = torch.tensor(gaps, dtype=torch.float64).std().item() if len(gaps) > 1 else 0.0
                    mean_gap = sum(gaps) / len(gaps)
                    fp_mean = sum(fp.values()) / len(fp)
                    closed = (f"{100 * sum(gain) / len(gain) / mean_gap:.0f}%"
                              if mean_gap > max(2 * spread, 0.05 * fp_mean) else "n/a (no gap)")
                images = _ms([x["images"] for x in sel], 0) if "images" in sel[0] else ""
                lines.append(f"| {steps} | {f.upper()} | {method} | {_ms([x['fd'] for x in sel], 2)} | "
                             f"{_ms([x['accuracy'] for x in sel], 3)} | {_ms([x['jaq'] for x in sel], 2)} | "
                             f"{_ms([x['tc'] for x in sel], 1)} | {_ms([x['iq'] for x in sel], 3)} | {closed} | "
                             f"{images} |")
    cfg = result["config"]
    lines.append("")
    lines.append(f"{len(cfg['seeds'])} seeds; {cfg['per_prompt']} images per prompt x 20 prompts per evaluation; "
                 f"Q-Sched calibrated on 20 prompts (1 image each), space 'start', {cfg['points']}-point lattice, "
                 f"JAQ = {'ln(TC)' if cfg['tc_transform'] == 'log' else 'TC'} + {cfg['k']:g}·IQ; "
                 f"model {str(cfg['model_hash'])[:12]}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched_pack.qsched.tiny.experiment",
                                description="FP32 vs W8A8/W4A8/W4A4 naive vs PTQD vs Q-Sched on the tiny world.")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--per-prompt", type=int, default=20, help="evaluation images per prompt (default 20)")
    p.add_argument("--points", type=int, default=21, help="lattice points per dimension of the search (default 21)")
    p.add_argument("--strategies", nargs="+", default=["zoom"], choices=["zoom", "grid", "pattern"])
    p.add_argument("--tc-transform", choices=["log", "identity"], default="log",
                   help="JAQ = ln(TC) + k·IQ (log, default) or TC + k·IQ (identity)")
    p.add_argument("--k", type=float, default=2.0, help="JAQ weight of IQ (default 2, the paper's)")
    p.add_argument("--weights", default=None, help="tiny_world.safetensors (default: packaged, then cache)")
    args = p.parse_args(argv)
    run(args.out, steps_list=args.steps, formats=args.formats, seeds=args.seeds, per_prompt=args.per_prompt,
        points=args.points, strategies=tuple(args.strategies), weights=args.weights,
        tc_transform=args.tc_transform, k=args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
