"""The tiny world's version of the paper's Table 1: FP32 vs quantized (naive, PTQD, Q-Sched) at 2/4/8 steps.

For every step count, format and seed r:

* evaluation: the 20 prompts x ``per_prompt`` images, noise seeds ``1_000_000 + 10_000·r + i`` (never used by any
  calibration); reference metric (Fréchet distance vs the real held-out digits, digit accuracy) and JAQ
  (= ln(TC) + 2·IQ with the tiny scorers, the calibration objective, here on unseen seeds);
* PTQD: ``qsched.ptqd.fit_ptqd`` on (eps_fp, eps_q) pairs along the FP trajectories of the 20 calibration prompts;
* Q-Sched: ``calibration.runner.calibrate`` on the 20 prompts (one image each, seeds ``5_000 + 100·r + i``), JAQ
  objective, 2-D ``start`` space (ramps to 1 at the last step, as the released search), strategies ``zoom``
  (adaptive) and optionally ``grid`` on the same lattice; optional image ``budget``;
* optional (``guard=True``, opt-in): a ``qsched-<strategy>+guard`` row = the search's best if
  ``guard.acceptance`` accepts it (against the FP32 model's JAQ on the same calibration images), else identity.
  The search itself is unchanged.

``qsched experiment --out DIR`` (= ``python -m qsched_pack.calibration.tinyworld.experiment --out DIR``) writes
``DIR/results.json`` (every number, every seed) and ``DIR/table.md`` (mean ± std over seeds). Same seeds -> same
table, byte for byte (everything is seeded; 1 CPU thread). ``calibration/demo.py`` (``qsched demo``) runs the
same functions for one (steps, format).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from ...qsched import samplers
from ...qsched._io import atomic_write_text
from ...qsched.ptqd import collect_pairs, fit_ptqd
from .data import all_prompts
from .train import load_or_train
from .world import TinyWorld, initial_noise

FORMATS = ("w8a8", "w4a8", "w4a4")
STEPS = (2, 4, 8)
SEEDS = (0, 1, 2)


def eval_seeds(r: int, n: int) -> list[int]:
    return [1_000_000 + 10_000 * r + i for i in range(n)]


def calib_seeds(r: int, n: int) -> list[int]:
    return [5_000 + 100 * r + i for i in range(n)]


def make_jaq(world: TinyWorld, k: float = 2.0, tc_transform: str = "log_per_image"):
    """JAQ over the tiny scorers. Default ``tc_transform="log_per_image"``: ln(TC_i) + k·IQ_i averaged over the
    prompts, the rule the stored tiny-world results were made with (the official ``new`` criterion takes ln of the
    mean TC: ``"log"``; docs/tiny_world.md: with the raw 0..100 TC the search buys alignment with diversity)."""
    from ..jaq import JAQ

    return JAQ(tc=world.text_alignment(), iq=world.image_quality(), k=k, tc_transform=tc_transform)


METRICS = ("fd", "accuracy", "jaq", "tc", "iq")


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


@contextlib.contextmanager
def single_thread():
    """1 CPU thread: fixed float reductions (and a busy 2-core CPU runs faster on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fp_row(world: TinyWorld, jaq, steps: int, r: int, per_prompt: int) -> dict:
    """The FP32 row of (steps, seed r): 20 prompts x ``per_prompt`` images on the evaluation seeds."""
    eval_prompts = [p for p in all_prompts() for _ in range(per_prompt)]
    return dict(steps=steps, format="fp32", method="fp32", seed=r,
                **measure(world, jaq, world.sampler(steps), None, eval_prompts, eval_seeds(r, len(eval_prompts))))


def fp_calibration_scores(world: TinyWorld, jaq, steps: int, r: int) -> list[float]:
    """Per-prompt JAQ of the FP32 model on the calibration prompts and seeds of seed r (for the guard)."""
    from ..runner import score_images

    prompts = all_prompts()
    images = world.sampler(steps).generate(None, prompts, calib_seeds(r, len(prompts)))
    return score_images(jaq, images, prompts)[0]


def quantized_rows(world: TinyWorld, jaq, steps: int, fmt: str, net, r: int, *, per_prompt: int = 20,
                   points: int = 21, strategies=("zoom",), budget: int | None = None, guard: bool = False,
                   z: float = 2.0, fp_calib: list | None = None, keep: dict | None = None) -> list[dict]:
    """Rows of (steps, format, seed r): naive, PTQD, Q-Sched per strategy (and, with ``guard``, the guarded
    Q-Sched: the search's best if ``guard.acceptance`` accepts it, else identity = the naive row's images).
    ``keep``: a dict that receives ``strategy -> CalibrationResult`` (and ``strategy + "+guard" -> Acceptance``)."""
    from ..runner import calibrate
    from ..guard import acceptance

    calib_prompts = all_prompts()
    eval_prompts = [p for p in calib_prompts for _ in range(per_prompt)]
    es, cs = eval_seeds(r, len(eval_prompts)), calib_seeds(r, len(calib_prompts))
    gen = world.sampler(steps, net=net, quant=fmt)
    base = dict(steps=steps, format=fmt, seed=r)
    naive = dict(base, method="naive", **measure(world, jaq, gen, None, eval_prompts, es))
    rows = [naive]
    corr = fit_ptqd_for(world, net, steps, calib_prompts, cs)
    ptqd_gen = world.sampler(steps, net=net, quant=fmt)
    ptqd_gen.model_wrapper = corr.wrap
    rows.append(dict(base, method="ptqd", gamma=list(corr.gamma),
                     **measure(world, jaq, ptqd_gen, None, eval_prompts, es)))
    if guard and fp_calib is None:
        fp_calib = fp_calibration_scores(world, jaq, steps, r)
    for strategy in strategies:
        t0 = time.perf_counter()
        res = calibrate(gen, jaq, calib_prompts, space="start", strategy=strategy, points=points, seeds=cs,
                        budget=budget)
        m = measure(world, jaq, gen, res.best, eval_prompts, es)
        row = dict(base, method=f"qsched-{strategy}", images=res.images_spent,
                   search_seconds=time.perf_counter() - t0, c_x=list(res.best.c_x), c_eps=list(res.best.c_eps),
                   calib_jaq=res.best_score, calib_jaq_identity=res.identity_score, **m)
        if res.stopped != "done":
            row["stopped"] = res.stopped
        rows.append(row)
        if keep is not None:
            keep[strategy] = res
        if guard:
            acc = acceptance(res, fp_calib, z)
            chosen = acc.choice(res)
            src = row if acc.accept else naive
            rows.append(dict(base, method=f"qsched-{strategy}+guard", images=res.images_spent + len(calib_prompts),
                             accepted=acc.accept, guard=acc.to_dict(), c_x=list(chosen.c_x),
                             c_eps=list(chosen.c_eps), **{k: src[k] for k in METRICS}))
            if keep is not None:
                keep[strategy + "+guard"] = acc
    return rows


def run(out_dir: str, *, steps_list=STEPS, formats=FORMATS, seeds=SEEDS, per_prompt: int = 20, points: int = 21,
        strategies=("zoom",), weights: str | None = None, tc_transform: str = "log_per_image", k: float = 2.0,
        budget: int | None = None, guard: bool = False, z: float = 2.0, log=print) -> dict:
    with single_thread():
        return _run(out_dir, steps_list, formats, seeds, per_prompt, points, strategies, weights, tc_transform, k,
                    budget, guard, z, log)


def _run(out_dir, steps_list, formats, seeds, per_prompt, points, strategies, weights, tc_transform, k, budget, guard,
         z, log) -> dict:
    t_start = time.perf_counter()
    world = load_or_train(weights, log=log)
    jaq = make_jaq(world, k, tc_transform)
    nets = {f: world.quantized_generator(f)[0] for f in formats}
    rows = []  # one dict per (steps, format, method, seed)
    for steps in steps_list:
        for r in seeds:
            rows.append(fp_row(world, jaq, steps, r, per_prompt))
            fp_calib = fp_calibration_scores(world, jaq, steps, r) if guard else None
            for f in formats:
                done = quantized_rows(world, jaq, steps, f, nets[f], r, per_prompt=per_prompt, points=points,
                                      strategies=strategies, budget=budget, guard=guard, z=z, fp_calib=fp_calib)
                rows.extend(done)
                if log:
                    log(f"steps {steps} seed {r} {f}: " + ", ".join(
                        f"{x['method']} fd {x['fd']:.2f} jaq {x['jaq']:.2f}" for x in done))
    result = {"config": config(steps_list, formats, seeds, per_prompt, points, k, tc_transform, strategies, world,
                               budget, guard, z),
              "rows": rows, "seconds": time.perf_counter() - t_start}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1) + "\n")
    table = format_table(result)
    atomic_write_text(os.path.join(out_dir, "table.md"), table)
    if log:
        log(table)
    return result


def config(steps_list, formats, seeds, per_prompt, points, k, tc_transform, strategies, world, budget=None,
           guard=False, z=2.0) -> dict:
    return {"steps": list(steps_list), "formats": list(formats), "seeds": list(seeds), "per_prompt": per_prompt,
            "points": points, "k": k, "tc_transform": tc_transform, "strategies": list(strategies),
            "model_hash": world.model_hash, "calibration_prompts": len(all_prompts()), "budget": budget,
            "guard": bool(guard), "z": z}


def _ms(vals, digits: int) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    std = float(t.std()) if len(vals) > 1 else 0.0
    return f"{float(t.mean()):.{digits}f} ± {std:.{digits}f}"


def gap_closed(rows: list, steps: int, fmt: str, method: str) -> dict:
    """Share of the FP32 -> naive FD gap that ``method`` removes at (steps, fmt), paired by seed.

    ``{"pct": float | None, "gap": mean gap, "spread": std of the gap over seeds, "fp": mean FP32 FD}``; ``pct`` is
    None ("no gap") unless the mean gap exceeds twice its spread over seeds and 5% of FP32's FD."""
    fp = {x["seed"]: x["fd"] for x in rows if x["steps"] == steps and x["method"] == "fp32"}
    naive = {x["seed"]: x["fd"] for x in rows if x["steps"] == steps and x["format"] == fmt and x["method"] == "naive"}
    sel = [x for x in rows if x["steps"] == steps and x["format"] == fmt and x["method"] == method]
    if not sel or not fp or not naive:
        raise ValueError(f"no rows for steps {steps}, format {fmt}, method {method} (and its fp32/naive rows)")
    gaps = [naive[x["seed"]] - fp[x["seed"]] for x in sel]
    gain = [naive[x["seed"]] - x["fd"] for x in sel]
    spread = torch.tensor(gaps, dtype=torch.float64).std().item() if len(gaps) > 1 else 0.0
    mean_gap = sum(gaps) / len(gaps)
    fp_mean = sum(fp.values()) / len(fp)
    pct = 100 * sum(gain) / len(gain) / mean_gap if mean_gap > max(2 * spread, 0.05 * fp_mean) else None
    return {"pct": pct, "gap": mean_gap, "spread": spread, "fp": fp_mean}


def methods(result: dict) -> list[str]:
    order = ["fp32", "naive", "ptqd"]
    for s in result["config"]["strategies"]:
        order.append(f"qsched-{s}")
        if result["config"].get("guard"):
            order.append(f"qsched-{s}+guard")
    return order


def format_table(result: dict) -> str:
    """Markdown: one row per (steps, method); mean ± std over seeds; gap closed = share of the FP32→naive FD gap
    removed (paired by seed; 'n/a' unless the mean gap exceeds twice its spread over seeds and 5% of FP32's FD)."""
    rows = result["rows"]
    lines = ["| steps | model | method | FD ↓ | accuracy ↑ | JAQ ↑ | TC | IQ | FD gap closed | search images |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for steps in result["config"]["steps"]:
        for f in ["fp32"] + result["config"]["formats"]:
            for method in methods(result):
                sel = [x for x in rows if x["steps"] == steps and x["format"] == f and x["method"] == method]
                if not sel:
                    continue
                closed = ""
                if method not in ("fp32", "naive"):
                    pct = gap_closed(rows, steps, f, method)["pct"]
                    closed = "n/a (no gap)" if pct is None else f"{pct:.0f}%"
                images = _ms([x["images"] for x in sel], 0) if "images" in sel[0] else ""
                label = method
                if method.endswith("+guard"):
                    label += f" (accepted {sum(bool(x['accepted']) for x in sel)}/{len(sel)})"
                if any(x.get("stopped") == "budget" for x in sel):
                    label += " (budget hit)"
                lines.append(f"| {steps} | {f.upper()} | {label} | {_ms([x['fd'] for x in sel], 2)} | "
                             f"{_ms([x['accuracy'] for x in sel], 3)} | {_ms([x['jaq'] for x in sel], 2)} | "
                             f"{_ms([x['tc'] for x in sel], 1)} | {_ms([x['iq'] for x in sel], 3)} | {closed} | "
                             f"{images} |")
    cfg = result["config"]
    lines.append("")
    n_seeds = len(cfg["seeds"])
    note = (f"{n_seeds} seed{'s' * (n_seeds != 1)}; {cfg['per_prompt']} images per prompt x 20 prompts per evaluation; "
            f"Q-Sched calibrated on 20 prompts (1 image each), space 'start', {cfg['points']}-point lattice, "
            f"JAQ = {'ln(TC)' if cfg['tc_transform'].startswith('log') else 'TC'} + {cfg['k']:g}·IQ; ")
    if cfg.get("budget") is not None:
        note += f"search budget {cfg['budget']} images; "
    if cfg.get("guard"):
        note += (f"+guard: the search's best only if qsched.tiny.guard accepts it (z = {cfg['z']:g}; JAQ gain, "
                 f"loss and overshoot vs FP32 on the calibration images), else identity (= naive); ")
    note += f"model {str(cfg['model_hash'])[:12]}."
    lines.append(note)
    return "\n".join(lines) + "\n"


def summary(result: dict, steps: int, fmt: str, strategy: str) -> list[str]:
    """A few honest sentences on (steps, fmt): is the quantized model worse, does Q-Sched close the gap, at what
    cost, and what happened to JAQ vs the reference metric."""
    rows = result["rows"]

    def mean(method, key):
        sel = [x[key] for x in rows if x["steps"] == steps and x["method"] == method
               and (method == "fp32" or x["format"] == fmt)]
        return sum(sel) / len(sel)

    q, F = f"qsched-{strategy}", fmt.upper()
    n = len(result["config"]["seeds"])
    fd = {m: mean(m, "fd") for m in ("fp32", "naive", "ptqd", q)}
    jq = {m: mean(m, "jaq") for m in ("fp32", "naive", "ptqd", q)}
    gap = gap_closed(rows, steps, fmt, q)
    ptqd = gap_closed(rows, steps, fmt, "ptqd")["pct"]
    out = [f"{F}, {steps} steps, mean of {n} seed{'s' * (n > 1)} "
           f"({result['config']['per_prompt'] * 20} unseen images each):"]
    if gap["pct"] is not None:
        out.append(f"- Quantization hurts: FD {fd['fp32']:.2f} (FP32) -> {fd['naive']:.2f} (naive {F}, "
                   f"{100 * (fd['naive'] / fd['fp32'] - 1):+.0f}%).")
        verdict = ("closes" if gap["pct"] >= 90 else "recovers part of" if gap["pct"] > 10
                   else "does not close" if gap["pct"] > -10 else "widens")
        out.append(f"- Q-Sched ({strategy}, {mean(q, 'images'):.0f} images searched) {verdict} the gap: FD "
                   f"{fd[q]:.2f}, {gap['pct']:.0f}% of the FD gap closed (PTQD: {fd['ptqd']:.2f}, "
                   + ("n/a" if ptqd is None else f"{ptqd:.0f}%") + ").")
    else:
        out.append(f"- No measurable loss to recover: FD {fd['fp32']:.2f} (FP32) vs {fd['naive']:.2f} (naive {F}); "
                   f"gap {gap['gap']:+.2f} ± {gap['spread']:.2f} over seeds.")
        worse = fd[q] > fd["naive"] * 1.05
        out.append(f"- Q-Sched ({strategy}, {mean(q, 'images'):.0f} images searched) changes FD to {fd[q]:.2f}"
                   + (" (worse): the search raises JAQ by fooling the stand-in scorers, not by restoring quality."
                      if worse and jq[q] > jq["naive"] else "."))
    out.append(f"- JAQ (the calibration objective, on unseen seeds): FP32 {jq['fp32']:.2f}, naive {jq['naive']:.2f}, "
               f"PTQD {jq['ptqd']:.2f}, Q-Sched {jq[q]:.2f}"
               + (" -- above FP32: JAQ and the reference metric disagree." if jq[q] > jq["fp32"] + 0.05 else "."))
    from ..search import DEFAULT_RANGE

    qs = [x for x in rows if x["steps"] == steps and x["format"] == fmt and x["method"] == q]
    edge = [x for x in qs if any(v in DEFAULT_RANGE for v in (x["c_x"][0], x["c_eps"][0]))]
    if edge:
        out.append(f"- The best point lies on the edge of the search range {list(DEFAULT_RANGE)} for {len(edge)}/"
                   f"{len(qs)} seeds (c_x, c_eps start = " + "; ".join(
                       f"{x['c_x'][0]:.2f}, {x['c_eps'][0]:.2f}" for x in edge) + "): the JAQ optimum may lie "
                   "outside it.")
    if gap["pct"] is not None:
        out.append("- Where quantization loses nothing (W8A8, W4A8 on this model) the search still raises JAQ and "
                   "makes FD worse (the stand-in scorers are fooled): docs/tiny_world.md; try --quant w8a8 --guard.")
    g = [x for x in rows if x["steps"] == steps and x["format"] == fmt and x["method"] == q + "+guard"]
    if g:
        ok = sum(bool(x["accepted"]) for x in g)
        out.append(f"- Guard: accepted the coefficients for {ok}/{len(g)} seeds; guarded FD "
                   f"{sum(x['fd'] for x in g) / len(g):.2f}.")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder: results.json, table.md")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS), choices=range(1, 9), metavar="STEPS",
                   help="step counts, 1-8 (default 2 4 8)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), help="quantization formats (default w8a8 w4a8 w4a4)")
    p.add_argument("--seeds", type=_nonneg, nargs="+", default=list(SEEDS), help="seed indices r (default 0 1 2)")
    p.add_argument("--per-prompt", type=_positive, default=20, help="evaluation images per prompt (default 20)")
    p.add_argument("--points", type=_positive, default=21,
                   help="lattice points per dimension of the search (default 21)")
    p.add_argument("--strategies", nargs="+", default=["zoom"], choices=["zoom", "grid", "pattern"])
    p.add_argument("--budget", type=_positive, default=None, help="maximum images per calibration (default: none)")
    p.add_argument("--guard", action="store_true",
                   help="also report the guarded Q-Sched rows (calibration.tinyworld.guard; opt-in, the search is unchanged)")
    p.add_argument("--z", type=float, default=2.0, help="guard threshold in standard errors (default 2)")
    p.add_argument("--tc-transform", choices=["log_per_image", "log", "identity"], default="log_per_image",
                   help="JAQ = mean of ln(TC_i) + k·IQ_i (log_per_image, default), ln(mean TC) + k·mean IQ (log, "
                        "official) or TC + k·IQ (identity)")
    p.add_argument("--k", type=float, default=2.0, help="JAQ weight of IQ (default 2, the paper's)")
    p.add_argument("--weights", default=None, help="tiny_world.safetensors (default: packaged, then cache)")


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return v


def _nonneg(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return v


def from_args(args) -> dict:
    return run(args.out, steps_list=args.steps, formats=args.formats, seeds=args.seeds, per_prompt=args.per_prompt,
               points=args.points, strategies=tuple(args.strategies), weights=args.weights,
               tc_transform=args.tc_transform, k=args.k, budget=args.budget, guard=args.guard, z=args.z)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched_pack.calibration.tinyworld.experiment",
                                description="FP32 vs W8A8/W4A8/W4A4 naive vs PTQD vs Q-Sched on the tiny world.")
    add_arguments(p)
    from_args(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
