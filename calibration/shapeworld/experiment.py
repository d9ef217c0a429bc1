"""The paper's Table 1 in miniature on the shape world: FP vs W8A8 / W4A8 / W4A4 naive vs PTQD vs Q-Sched (grid and
adaptive) at 2/4/8 steps for the LCM, TCD and flow families, plus the JAQ-gaming guards.

For every (family, steps, seed r):

* evaluation: the 20 calibration prompts x ``per_prompt`` images on unseen seeds ``1_000_000 + 10_000·r + i`` and the
  20 held-out prompts x ``per_prompt`` (seeds ``2_000_000 + ...``); reference metric (Fréchet distance in
  ``ReferenceNet`` features vs held-out renders of the same prompts, attribute accuracy) and JAQ (the pack's JAQ,
  CLIPScore + CLIP-IQA on the tiny CLIP: the calibration objective, here on unseen images);
* ``fp`` and ``fp+qsched`` (Q-Sched calibrated on the unquantized model: can the coefficients beat FP?);
* per format: ``naive``; ``ptqd`` (``qsched.ptqd.fit_ptqd`` on the FP trajectories of the calibration prompts);
  ``qsched-zoom`` / ``qsched-grid`` (``calibration.search.calibrate``, 2-D ``start`` space in [0.8, 1.2], 21-point
  lattice, 20 calibration prompts x 1 image, seeds ``5_000 + 100·r + i``, JAQ = ln(CLIPScore) + 2·CLIP-IQA);
* guards on the zoom search (cheap, no change to the search): ``+accept`` the existing acceptance guard (JAQ gain
  significant, a JAQ loss vs FP exists, no overshoot above FP; 20 extra FP images); ``+trust`` a trust region
  (the same search in [0.9, 1.1], the same lattice spacing); ``+heldout`` keep the best only if its JAQ gain over
  identity holds on the 20 held-out prompts (paired, z = 2; 40 extra images).

``python -m qsched_pack.calibration.shapeworld.experiment --out DIR`` runs everything in one process;
``--families/--formats`` and ``--no-fp`` split it (the GPU run uses one process per family x format, then
``--merge``). Same seeds -> same numbers on one device (CPU and GPU differ by float error; docs/shape_world.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from ...qsched._io import atomic_write_text
from ...qsched.coefficients import Coefficients
from ...qsched.ptqd import collect_pairs, fit_ptqd
from . import data as D
from ..guard import acceptance, paired
from .world import FAMILIES, PointBatched, ShapeWorld

FORMATS = ("w8a8", "w4a8", "w4a4")
STEPS = (2, 4, 8)
SEEDS = (0, 1, 2)
METRICS = ("fd", "accuracy", "jaq", "tc", "iq", "fd_heldout", "accuracy_heldout", "jaq_heldout")
TRUST = (0.9, 1.1)


def eval_seeds(r: int, n: int, heldout: bool = False) -> list[int]:
    return [(2_000_000 if heldout else 1_000_000) + 10_000 * r + i for i in range(n)]


def calib_seeds(r: int, n: int, heldout: bool = False) -> list[int]:
    return [(6_000 if heldout else 5_000) + 100 * r + i for i in range(n)]


class Evaluator:
    """Scores generated images: JAQ (components) + reference metrics, on calibration and held-out prompts."""

    def __init__(self, world: ShapeWorld, per_prompt: int, jaq=None, heldout: bool = True):
        self.world, self.per_prompt, self.heldout = world, per_prompt, heldout
        self.jaq = world.jaq() if jaq is None else jaq
        self.ref = world.reference()
        if heldout:
            from .world import HELDOUT_SEED, REFERENCE_PER_PROMPT, Reference

            caps = [c for c in D.heldout_prompts() for _ in range(REFERENCE_PER_PROMPT)]
            real = D.make_scenes(len(caps), HELDOUT_SEED + 1, world.device, captions=caps)
            self.ref_heldout = Reference(world.ref_net, real.images)

    def prompts(self, heldout: bool = False) -> list[str]:
        base = D.heldout_prompts() if heldout else D.calibration_prompts()
        return [p for p in base for _ in range(self.per_prompt)]

    def measure(self, gen, coefficients, r: int) -> dict:
        out = {}
        for held in (False, True) if self.heldout else (False,):
            prompts = self.prompts(held)
            images = gen.generate(coefficients, prompts, eval_seeds(r, len(prompts), held))
            comps = self.jaq.components(images, prompts)
            ref = self.ref_heldout if held else self.ref
            suffix = "_heldout" if held else ""
            out["fd" + suffix] = ref.fd(images)
            out["accuracy" + suffix] = ref.accuracy(images, prompts)
            out["jaq" + suffix] = float(self.jaq.aggregate(comps["tc"], comps["iq"]))
            if not held:
                out.update(tc=float(comps["tc"].mean()), iq=float(comps["iq"].mean()))
        return out

    def per_prompt_jaq(self, gen, coefficients, prompts, seeds) -> list[float]:
        return [float(v) for v in self.jaq.score(gen.generate(coefficients, prompts, seeds), prompts)]


def fit_ptqd_for(world: ShapeWorld, family: str, steps: int, net_q, prompts, seeds):
    from ...qsched import samplers

    fp, q = world.generator(family, steps), world.generator(family, steps, net=net_q)
    fn = samplers.SAMPLERS[fp.sampler]
    eps_fp, eps_q = collect_pairs(fn, fp.denoiser(prompts), q.denoiser(prompts), fp.start(seeds),
                                  fp.sigmas.to(fp.device), **fp.sampler_kwargs(seeds))
    return fit_ptqd(eps_fp, eps_q)


class DeadlinePassed(Exception):
    """A search was stopped because the run's deadline passed (its rows are reported as skipped)."""


def _search(gen, jaq, r, points, strategy, budget, low=0.8, high=1.2, *, batch: int = 0,
            deadline: float | None = None):
    """``calibration.runner.calibrate`` on the 20 calibration prompts. ``batch`` > 0: the runner evaluates a
    strategy's points together, up to ``batch`` images per network call (``world.PointBatched``: the same images
    up to float error); ``deadline`` (a ``time.time()``): stop with :class:`DeadlinePassed` once it has passed."""
    from ..runner import calibrate

    def interrupt():
        if deadline is not None and time.time() > deadline:
            raise DeadlinePassed(f"{strategy} search stopped at the deadline")

    prompts = D.calibration_prompts()
    t0 = time.perf_counter()
    res = calibrate(PointBatched(gen, batch) if batch else gen, jaq, prompts, space="start", strategy=strategy,
                    points=points, seeds=calib_seeds(r, len(prompts)), budget=budget, low=low, high=high,
                    interrupt=interrupt if deadline is not None else None)
    return res, time.perf_counter() - t0


def _qrow(base, method, res, seconds, m, **extra) -> dict:
    return dict(base, method=method, images=res.images_spent, search_seconds=round(seconds, 2),
                c_x=list(res.best.c_x), c_eps=list(res.best.c_eps), calib_jaq=res.best_score,
                calib_jaq_identity=res.identity_score, stopped=res.stopped, **extra, **m)


def grid_rows(world, ev: Evaluator, family: str, steps: int, r: int, formats, nets, *, points: int, budget,
              log=None, batch: int = 0, deadline: float | None = None) -> list[dict]:
    """The ``qsched-grid`` rows of (family, steps, seed r): Algorithm 1's full grid on the same lattice."""
    rows = []
    for fmt in formats:
        gen = world.generator(family, steps, net=nets[fmt], quant=fmt)
        res, sec = _search(gen, ev.jaq, r, points, "grid", budget, batch=batch, deadline=deadline)
        rows.append(_qrow(dict(family=family, steps=steps, seed=r, format=fmt), "qsched-grid", res, sec,
                          ev.measure(gen, res.best, r)))
        if log:
            log(f"{family} steps {steps} seed {r} {fmt}: grid fd {rows[-1]['fd']:.2f} jaq {rows[-1]['jaq']:.3f}")
    return rows


GUARDS = ("accept", "heldout", "trust")
#: Reference-anchored methods (calibration.reference): the free-running fit (the default), the teacher-forced
#: fit, a zoom search on the final-output distance, and the hybrid (JAQ zoom around the fit).
REFERENCE_METHODS = ("reference", "reference-tf", "reference-x0", "reference-search", "hybrid")
REFERENCE_CHOICES = REFERENCE_METHODS + ("reference+ptqd", "reference-rules", "reference-iv", "reference-iv-tf")
#: the candidates of the rule analysis: method -> (row name, fit mode, fit match)
RULE_FITS = {"reference-rules": ("qsched-reference", "free", "state"),
             "reference+ptqd": ("qsched-reference+ptqd", "free", "state"),
             "reference-iv": ("qsched-reference-iv", "free", "iv"),
             "reference-iv-tf": ("qsched-reference-iv-tf", "teacher", "iv")}
#: The confirmatory candidates (docs/shape_world.md, "Confirmatory run"): ``reference-rules`` measures the shipped
#: free-running fit under both acceptance rules; ``reference+ptqd`` fits PTQD's bias correction on the same 4 fit
#: prompts, the coefficients on top of it, and tests the result against naive under both rules. Rows:
#: ``qsched-<m>`` (shipped rule: pixel distance, p <= 0.05; ``reference-rules`` writes the rows of ``reference``:
#: run one of the two), ``qsched-<m>-A`` (rule A: pixel or 8x8 low-pass
#: distance, each at p <= 0.025, the pixel distance not growing), ``qsched-<m>-unchecked`` (the fit, no test).
LOWPASS = 8
#: The reference objective's prompts: fit on calibration prompts [0, 4), test on [4, 12) (2·4 + 3·8 = 32 images:
#: about 4% of a zoom search); the 20 held-out prompts of the table are never used.
REFERENCE_FIT, REFERENCE_TEST = slice(0, 4), slice(4, 12)
#: method -> (fit mode, what each step matches) of calibration.reference
REFERENCE_FITS = {"reference": ("free", "state"), "reference-tf": ("teacher", "state"),
                  "reference-x0": ("free", "state+x0")}


def _reference_row(base, method, gen, ev, r, naive, res, seconds, extra=None) -> dict:
    """A row for a reference-anchored result ``res`` (a ``CalibrationResult``): its metrics if accepted, else
    naive's (identity), plus the raw fit's FD when it was refused."""
    h = res.heldout or {}
    row = dict(base, method=method, images=res.images_spent, search_seconds=round(seconds, 2),
               accepted=bool(res.accepted if method != "qsched-hybrid" else h.get("hybrid", {}).get("accepted")),
               acceptance=res.acceptance, c_x=list(res.best.c_x), c_eps=list(res.best.c_eps),
               test_drop=h.get("drop"), test_p=h.get("p_value"), **(extra or {}))
    if res.best.is_identity:
        row.update({k: naive[k] for k in METRICS if k in naive})
    else:
        row.update(ev.measure(gen, res.best, r))
    return row


def reference_rows(world, ev: Evaluator, family: str, steps: int, r: int, fmt: str, gen, naive: dict, *,
                   methods=REFERENCE_METHODS, points: int = 21, budget=None, batch: int = 0,
                   unchecked: bool = True) -> list[dict]:
    """The reference-anchored rows of (family, steps, seed r, fmt): fitted on ``REFERENCE_FIT`` of the calibration
    prompts (seeds ``calib_seeds(r)``), accepted on ``REFERENCE_TEST`` (``calibration.runner.calibrate``).
    ``unchecked``: where the held-out test refuses the free-running fit, also measure the refused fit
    (``qsched-reference-unchecked``: what skipping the test would have given)."""
    from .. import reference as R
    from ..runner import calibrate

    base = dict(family=family, steps=steps, seed=r, format=fmt)
    fp_gen = world.generator(family, steps)
    prompts, cs = D.calibration_prompts(), calib_seeds(r, 20)
    fit_p, fit_s = prompts[REFERENCE_FIT], cs[REFERENCE_FIT]
    test_p, test_s = prompts[REFERENCE_TEST], cs[REFERENCE_TEST]
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        if method in REFERENCE_FITS:
            mode, match = REFERENCE_FITS[method]
            res = calibrate(gen, None, fit_p, seeds=fit_s, objective="reference", reference=fp_gen,
                            heldout_prompts=test_p, heldout_seeds=test_s, fit_mode=mode, fit_match=match)
            fit = res.best.metadata["fit"]
            rows.append(_reference_row(base, f"qsched-{method}", gen, ev, r, naive, res, time.perf_counter() - t0,
                                       {"fit_c_x": fit["c_x"], "fit_c_eps": fit["c_eps"]}))
            if unchecked and not res.accepted and method == "reference":  # what the refused fit would have done
                raw = Coefficients(fit["c_x"], fit["c_eps"])
                rows.append(dict(base, method="qsched-reference-unchecked", images=res.images_spent,
                                 c_x=fit["c_x"], c_eps=fit["c_eps"], **ev.measure(gen, raw, r)))
        elif method == "reference-search":  # zoom on the final-output distance, then the same acceptance test
            scorer = R.DistanceScorer(fp_gen.generate(None, fit_p, fit_s))
            sres = calibrate(PointBatched(gen, batch) if batch else gen, scorer, fit_p, seeds=fit_s, space="start",
                             strategy="zoom", points=points, budget=budget)
            fit = R.ReferenceFit(sres.best, "search", images=sres.images_spent + len(fit_p))
            test = R.calibrate_to_reference(gen, fp_gen, fit_p, fit_s, test_p, test_s, fit=fit)
            sres.best, sres.accepted, sres.acceptance = test.coefficients, test.acceptance.accepted, test.acceptance.text
            sres.heldout, sres.images_spent = test.acceptance.to_dict(), test.images
            rows.append(_reference_row(base, "qsched-reference-search", gen, ev, r, naive, sres,
                                       time.perf_counter() - t0))
        elif method in RULE_FITS:
            rows += _rule_rows(world, ev, base, method, gen, fp_gen, naive, r, fit_p, fit_s, test_p, test_s)
        elif method == "hybrid":
            res = calibrate(PointBatched(gen, batch) if batch else gen, ev.jaq, fit_p, seeds=fit_s,
                            objective="hybrid", reference=fp_gen, heldout_prompts=test_p, heldout_seeds=test_s,
                            strategy="zoom", points=points, budget=budget)
            h = res.heldout.get("hybrid", {})
            rows.append(_reference_row(base, "qsched-hybrid", gen, ev, r, naive, res, time.perf_counter() - t0,
                                       {"reference_accepted": res.accepted, "hybrid_jaq_gain": h.get("jaq_gain"),
                                        "hybrid_distance_growth": h.get("distance_growth")}))
        else:
            raise ValueError(f"reference method must be one of {', '.join(REFERENCE_CHOICES)}; got {method!r}")
    return rows


def lowpass_distance(images: torch.Tensor, reference_images: torch.Tensor, size: int = LOWPASS) -> torch.Tensor:
    """Per-image mean squared difference of the ``size`` x ``size`` box-filtered images ([B, H, W, C] in 0..1): the
    layout and colours, not the pixels."""
    def pool(x):
        return torch.nn.functional.adaptive_avg_pool2d(x.double().permute(0, 3, 1, 2), size)
    n = reference_images.shape[0]
    return ((pool(images) - pool(reference_images).repeat(images.shape[0] // n, 1, 1, 1)) ** 2).flatten(1).mean(1)


def image_stats(images: torch.Tensor, bands: int = 4) -> torch.Tensor:
    """Per image ([B, H, W, C] in 0..1): channel means and standard deviations and the log power of the image in
    ``bands`` radial frequency bands per channel: colour, contrast and sharpness, not where things are."""
    x = images.double().permute(0, 3, 1, 2)
    mean, std = x.mean((2, 3)), x.std((2, 3))
    power = torch.fft.fft2(x - x.mean((2, 3), keepdim=True)).abs() ** 2
    h, w = x.shape[2:]
    fy, fx = torch.fft.fftfreq(h).abs(), torch.fft.fftfreq(w).abs()
    radius = torch.maximum(fy[:, None], fx[None, :])  # 0 .. 0.5
    band = torch.clamp((radius * 2 * bands).long(), max=bands - 1)
    logp = torch.stack([torch.log(power[..., band == b].mean(-1) + 1e-12) for b in range(bands)], -1)
    return torch.cat([mean, std, logp.flatten(1)], 1)


#: Per-image distances to the FP image of the same prompt and seed, for the acceptance-rule analysis.
DISTANCES = {
    "pixel": lambda a, b: ((a.double() - b.double()) ** 2).flatten(1).mean(1),
    "lowpass8": lambda a, b: lowpass_distance(a, b, 8),
    "lowpass4": lambda a, b: lowpass_distance(a, b, 4),
    "stats": lambda a, b: ((image_stats(a) - image_stats(b)) ** 2).mean(1),
}


def _rule_rows(world, ev, base, method, gen, fp_gen, naive, r, fit_p, fit_s, test_p, test_s) -> list[dict]:
    """The rows of a confirmatory candidate (``REFERENCE_METHODS``' comment): one fit, every rule applied to the
    same held-out images (8 prompts/seeds the fit never saw; FP, naive, fitted)."""
    from .. import reference as R
    t0 = time.perf_counter()
    fit_gen, images, extra = gen, 0, {}
    name, mode, match = RULE_FITS[method]
    if method == "reference+ptqd":
        corr = fit_ptqd_for(world, base["family"], base["steps"], gen.net, fit_p, fit_s)
        fit_gen = world.generator(base["family"], base["steps"], net=gen.net, quant=base["format"],
                                  model_wrapper=corr.wrap)
        images += 2 * len(fit_p)  # PTQD's pairs: FP and quantized on the FP trajectory
        extra["gamma"] = list(corr.gamma)
    fit = R.fit_reference(fit_gen, fp_gen, fit_p, fit_s, mode=mode, match=match)
    images += fit.images + 3 * len(test_p)
    ref = fp_gen.generate(None, test_p, test_s)
    idn = gen.generate(None, test_p, test_s)
    fitted = fit_gen.generate(fit.coefficients, test_p, test_s)
    sets = {"identity": idn, "fitted": fitted}
    if fit_gen is not gen:
        sets["corrected"] = fit_gen.generate(None, test_p, test_s)  # PTQD alone (not counted: analysis only)
        # PTQD's slope as Q-Sched coefficients (c_x = 1, c_eps = 1 / (1 + gamma)): the correlated part of its
        # correction without the per-channel offset, fitted by regressing the quantized prediction on the FP one
        scale = Coefficients([1.0] * base["steps"], [1.0 / (1.0 + g) for g in extra["gamma"]])
        sets["scale"] = gen.generate(scale, test_p, test_s)
    extra["distances"] = {k: {n: [round(float(v), 8) for v in f(x, ref)] for n, x in sets.items()}
                          for k, f in DISTANCES.items()}
    d = {"pixel": (R.paired_distance(idn, ref), R.paired_distance(fitted, ref)),
         "lowpass": (lowpass_distance(idn, ref), lowpass_distance(fitted, ref))}
    full = {k: R.acceptance_test(*v) for k, v in d.items()}
    half = {k: R.acceptance_test(*v, alpha=R.ALPHA / 2) for k, v in d.items()}
    shipped = full["pixel"].accepted
    rule_a = half["pixel"].accepted or (half["lowpass"].accepted and full["pixel"].drop >= 0)
    same_as_naive = fit.coefficients.is_identity and fit_gen is gen
    m = {k: naive[k] for k in METRICS if k in naive} if same_as_naive else ev.measure(fit_gen, fit.coefficients, r)
    common = dict(base, images=images, search_seconds=round(time.perf_counter() - t0, 2), c_x=list(fit.coefficients.c_x),
                  c_eps=list(fit.coefficients.c_eps), test_p=full["pixel"].p_value, test_drop=full["pixel"].drop,
                  test_p_lowpass=full["lowpass"].p_value, test_drop_lowpass=full["lowpass"].drop, **extra)
    out = [dict(common, method=f"{name}-unchecked", **m)]
    for suffix, ok in (("", shipped), ("-A", rule_a)):
        src = m if ok else {k: naive[k] for k in METRICS if k in naive}
        out.append(dict(common, method=name + suffix, accepted=bool(ok), **src))
    if method == "reference+ptqd":
        out.append(dict(common, method="ptqd-fit4", **(ev.measure(fit_gen, None, r))))
        out.append(dict(common, method="ptqd-scale", c_x=list(scale.c_x), c_eps=list(scale.c_eps),
                        **(ev.measure(gen, scale, r))))
    return out


def setting_rows(world, ev: Evaluator, family: str, steps: int, r: int, formats, nets, *, fp: bool, points: int,
                 strategies, budget, z: float, guards=GUARDS, fp_search: bool = True, keep: dict | None = None,
                 log=None, batch: int = 0, reference=REFERENCE_METHODS, unchecked: bool = True) -> list[dict]:
    """Every row of (family, steps, seed r) for ``formats`` (and the FP rows if ``fp``), except the full grid.
    ``batch``: see :func:`_search`. ``reference``: which reference-anchored methods (:func:`reference_rows`)."""
    rows = []
    base0 = dict(family=family, steps=steps, seed=r)
    fp_gen = world.generator(family, steps)
    prompts = D.calibration_prompts()
    cs = calib_seeds(r, len(prompts))
    fp_calib = ev.per_prompt_jaq(fp_gen, None, prompts, cs)  # for the acceptance guard (20 images)
    if fp:
        rows.append(dict(base0, format="fp32", method="fp", **ev.measure(fp_gen, None, r)))
        if "zoom" in strategies and fp_search:
            res, sec = _search(fp_gen, ev.jaq, r, points, "zoom", budget, batch=batch)
            rows.append(_qrow(dict(base0, format="fp32"), "fp+qsched-zoom", res, sec,
                              ev.measure(fp_gen, res.best, r)))
    held_prompts = D.heldout_prompts()
    hs = calib_seeds(r, len(held_prompts), heldout=True)
    for fmt in formats:
        net = nets[fmt]
        base = dict(base0, format=fmt)
        gen = world.generator(family, steps, net=net, quant=fmt)
        naive = dict(base, method="naive", **ev.measure(gen, None, r))
        rows.append(naive)
        corr = fit_ptqd_for(world, family, steps, net, prompts, cs)
        pg = world.generator(family, steps, net=net, quant=fmt, model_wrapper=corr.wrap)
        rows.append(dict(base, method="ptqd", gamma=list(corr.gamma), **ev.measure(pg, None, r)))
        if reference:
            rows += reference_rows(world, ev, family, steps, r, fmt, gen, naive, methods=reference, points=points,
                                   budget=budget, batch=batch, unchecked=unchecked)
        for strategy in strategies:
            res, sec = _search(gen, ev.jaq, r, points, strategy, budget, batch=batch)
            m = ev.measure(gen, res.best, r)
            row = _qrow(base, f"qsched-{strategy}", res, sec, m)
            rows.append(row)
            if keep is not None:
                keep[(fmt, strategy)] = res
            if strategy != "zoom":
                continue
            if "accept" in guards:  # guard 1: the existing acceptance guard (FP-anchored)
                rows.append(_accept_row(base, res, row, naive, fp_calib, z, len(prompts)))
            if "heldout" in guards:  # guard 2: held-out prompt split
                rows.append(_heldout_row(base, ev, gen, res, row, naive, held_prompts, hs, z))
            if "trust" in guards:  # guard 3: trust region around identity
                tpoints = (points - 1) // 2 + 1 if (points - 1) % 2 == 0 else points
                tres, tsec = _search(gen, ev.jaq, r, tpoints, "zoom", budget, *TRUST, batch=batch)
                rows.append(_qrow(base, "qsched-zoom+trust", tres, tsec, ev.measure(gen, tres.best, r)))
        if log:
            log(f"{family} steps {steps} seed {r} {fmt}: " + ", ".join(
                f"{x['method']} fd {x['fd']:.2f} jaq {x['jaq']:.3f}" for x in rows if x.get("format") == fmt))
    return rows


def _accept_row(base, res, row, naive, fp_calib, z, n_prompts) -> dict:
    acc = acceptance(res, fp_calib, z)
    src = row if acc.accept else naive
    return dict(base, method="qsched-zoom+accept", images=res.images_spent + n_prompts, accepted=acc.accept,
                reasons=acc.reasons, **{k: src[k] for k in METRICS if k in src})


def _heldout_row(base, ev, gen, res, row, naive, held_prompts, seeds, z) -> dict:
    """Keep the best only if its JAQ gain over identity holds on the held-out prompts (paired, > z·SE)."""
    if tuple(res.best_point) == tuple(res.space.identity):
        ok, gain, se = False, 0.0, 0.0
    else:
        gain, se = paired(ev.per_prompt_jaq(gen, res.best, held_prompts, seeds),
                          ev.per_prompt_jaq(gen, None, held_prompts, seeds))
        ok = gain > z * se
    src = row if ok else naive
    return dict(base, method="qsched-zoom+heldout", images=res.images_spent + 2 * len(held_prompts), accepted=ok,
                heldout_gain=gain, heldout_se=se, **{k: src[k] for k in METRICS if k in src})


@contextlib.contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def plan_of(families, steps_list, seeds, formats, fp: bool) -> list[list]:
    """What a run computes rows for: ``[family, steps, seed, model]``, model ``"fp32"`` (the FP rows, if ``fp``)
    or a format."""
    return [[fam, st, r, m] for fam in families for st in steps_list for r in seeds
            for m in (["fp32"] if fp else []) + list(formats)]


def status(plan, done, grid_plan, grid_done) -> dict:
    """What was planned but not computed (time limit, or a worker killed): ``missing`` (settings without their
    rows) and ``grid_skipped`` (full-grid searches without their row), as ``[family, steps, seed, model]``."""
    return {"missing": [p for p in plan if p not in done], "grid_skipped": [p for p in grid_plan if p not in grid_done]}


#: images per network call when a search's points are evaluated together, by device type (0: one point at a
#: time). The CPU gains nothing from large batches (it is compute-bound; per-image cost rises with the batch);
#: a GPU running these tiny models is bound by kernel launches, which batching removes.
POINT_BATCH = {"cuda": 2560, "cpu": 0}


def run(out_dir: str, *, families=FAMILIES, steps_list=STEPS, formats=FORMATS, seeds=SEEDS, per_prompt: int = 20,
        points: int = 21, strategies=("zoom", "grid"), budget: int | None = None, z: float = 2.0, fp: bool = True,
        weights=None, device=None, deadline: float | None = None, num_threads: int | None = 1, log=print,
        name: str = "results", guards=GUARDS, batch: int | None = None, reference=REFERENCE_METHODS,
        fp_search: bool = True) -> dict:
    """Run the rows of ``families`` x ``steps_list`` x ``seeds`` x ``formats``; write ``out_dir/<name>.json`` at the
    start and after every setting / grid search (so a killed run keeps what it finished, and says what it did not)
    and ``table.md``. ``deadline`` (a ``time.time()``): settings not started by then are skipped and a grid search
    running then is stopped (the JSON's ``missing`` / ``grid_skipped`` list them). ``batch``: images per network
    call for a search's points (None: ``POINT_BATCH`` of the device; 0: one point at a time)."""
    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = POINT_BATCH.get(device.type, 0) if batch is None else int(batch)
    rows: list[dict] = []
    plan = plan_of(families, steps_list, seeds, formats, fp)
    grid_plan = plan_of(families, steps_list, seeds, formats, False) if "grid" in strategies else []
    done, grid_done = [], []
    cfg = dict(families=list(families), steps=list(steps_list), formats=list(formats), seeds=list(seeds),
               per_prompt=per_prompt, points=points, strategies=list(strategies), budget=budget, z=z,
               guards=list(guards), reference=list(reference), fp=fp, batch=batch, model_hash=None, device=str(device), torch=torch.__version__)
    first = [s for s in strategies if s != "grid"]
    result = None

    def save():
        nonlocal result
        result = {"config": dict(cfg, **status(plan, done, grid_plan, grid_done)), "plan": plan,
                  "grid_plan": grid_plan, "done": done, "grid_done": grid_done, "rows": rows,
                  "seconds": time.perf_counter() - t_start}
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(result, indent=1) + "\n")

    def late() -> bool:
        return deadline is not None and time.time() > deadline

    save()  # first of all: a worker killed while loading still says what it was to compute
    with threads(num_threads):
        world = ShapeWorld.load(weights, device=device)
        cfg["model_hash"] = world.model_hash
        ev = Evaluator(world, per_prompt)
        nets = {fam: {f: world.quantized(fam, f)[0] for f in formats} for fam in families}
        settings = [(fam, steps, r) for fam in families for steps in steps_list for r in seeds]
        for fam, steps, r in settings:  # pass 1: everything but the full grid
            if late():
                continue
            rows += setting_rows(world, ev, fam, steps, r, formats, nets[fam], fp=fp, points=points,
                                 strategies=first, budget=budget, z=z, guards=guards, log=log, batch=batch,
                                 reference=reference, fp_search=fp_search)
            done.extend([fam, steps, r, m] for m in (["fp32"] if fp else []) + list(formats))
            save()
        for fam, steps, r, fmt in grid_plan:  # pass 2: the full grid, while time is left
            if late():
                continue
            try:
                rows += grid_rows(world, ev, fam, steps, r, [fmt], nets[fam], points=points, budget=budget,
                                  log=log, batch=batch, deadline=deadline)
            except DeadlinePassed:
                if log:
                    log(f"{fam} steps {steps} seed {r} {fmt}: grid stopped at the deadline")
                continue
            grid_done.append([fam, steps, r, fmt])
            save()
        save()
    atomic_write_text(os.path.join(out_dir, f"{'table' if name == 'results' else name}.md"), format_table(result))
    return result


def merge(out_dir: str, parts: list[str]) -> dict:
    """One result from several worker results (same config apart from families / formats / steps / seeds). A
    worker killed before it finished contributes what it saved; its unfinished settings and grid searches are
    listed in ``config.missing`` / ``config.grid_skipped``."""
    rows, cfg, seconds = [], None, 0.0
    plan, done, grid_plan, grid_done, workers = [], [], [], [], []
    for p in parts:
        with open(p, encoding="utf-8") as f:
            res = json.load(f)
        rows += res["rows"]
        plan += res.get("plan", [])
        done += res.get("done", [])
        grid_plan += res.get("grid_plan", [])
        grid_done += res.get("grid_done", [])
        seconds = max(seconds, res["seconds"])
        workers.append({"file": os.path.basename(p), "seconds": round(res["seconds"], 1), "rows": len(res["rows"])})
        if cfg is None:
            cfg = dict(res["config"])
            cfg["families"], cfg["formats"], cfg["steps"], cfg["seeds"] = [], [], [], []
        for k in ("families", "formats", "steps", "seeds"):
            cfg[k] += [v for v in res["config"][k] if v not in cfg[k]]
        cfg["model_hash"] = cfg.get("model_hash") or res["config"].get("model_hash")  # None: killed while loading
    cfg["steps"], cfg["seeds"] = sorted(cfg["steps"]), sorted(cfg["seeds"])
    cfg["families"] = [f for f in FAMILIES if f in cfg["families"]]
    cfg["formats"] = [f for f in FORMATS if f in cfg["formats"]] + [f for f in cfg["formats"] if f not in FORMATS]
    cfg.update(status(plan, done, grid_plan, grid_done))
    cfg["fp"] = any(p[3] == "fp32" for p in plan)
    result = {"config": cfg, "plan": plan, "grid_plan": grid_plan, "done": done, "grid_done": grid_done,
              "workers": workers, "rows": rows, "seconds": seconds}
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(os.path.join(out_dir, "table.md"), format_table(result))
    return result


# ------------------------------------------------------------------------------------------ table
def mean_std(vals, digits: int) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    std = float(t.std()) if len(vals) > 1 else 0.0
    return f"{float(t.mean()):.{digits}f} ± {std:.{digits}f}"


METHODS = ("fp", "fp+qsched-zoom", "naive", "ptqd", "qsched-zoom", "qsched-grid", "qsched-zoom+accept",
           "qsched-zoom+heldout", "qsched-zoom+trust", "qsched-reference", "qsched-reference-unchecked",
           "qsched-reference-tf", "qsched-reference-x0", "qsched-reference-search", "qsched-hybrid")


def select(rows, family, steps, fmt, method):
    return [x for x in rows if x["family"] == family and x["steps"] == steps and x["format"] == fmt
            and x["method"] == method]


def gap_closed(rows, family, steps, fmt, method, key="fd") -> float | None:
    """Share of the FP -> naive gap of ``key`` (lower is better) that ``method`` removes, paired by seed; None
    unless the mean gap exceeds twice its spread over seeds and 5% of FP's value."""
    fp = {x["seed"]: x[key] for x in select(rows, family, steps, "fp32", "fp")}
    naive = {x["seed"]: x[key] for x in select(rows, family, steps, fmt, "naive")}
    sel = [x for x in select(rows, family, steps, fmt, method) if x["seed"] in fp and x["seed"] in naive]
    if not sel:
        return None
    gaps = [naive[x["seed"]] - fp[x["seed"]] for x in sel]
    gain = [naive[x["seed"]] - x[key] for x in sel]
    mean_gap = sum(gaps) / len(gaps)
    spread = float(torch.tensor(gaps, dtype=torch.float64).std()) if len(gaps) > 1 else 0.0
    fp_mean = sum(fp.values()) / len(fp)
    if mean_gap > max(2 * spread, 0.05 * fp_mean):
        return 100 * sum(gain) / len(gain) / mean_gap
    return None


def format_table(result: dict) -> str:
    rows, cfg = result["rows"], result["config"]
    lines = ["| family | steps | model | method | FD ↓ | FD held-out prompts ↓ | accuracy ↑ | JAQ ↑ | "
             "CLIPScore | CLIP-IQA | FD gap closed | search images |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family in cfg["families"]:
        for steps in cfg["steps"]:
            for fmt in ["fp32"] + cfg["formats"]:
                for method in METHODS:
                    sel = select(rows, family, steps, fmt, method)
                    if not sel:
                        continue
                    closed = ""
                    if fmt != "fp32" and method != "naive":
                        pct = gap_closed(rows, family, steps, fmt, method)
                        closed = "n/a (no gap)" if pct is None else f"{pct:.0f}%"
                    label = method
                    if "accepted" in sel[0]:
                        label += f" ({sum(bool(x['accepted']) for x in sel)}/{len(sel)} kept)"
                    if any(x.get("stopped") == "budget" for x in sel):
                        label += " (budget hit)"
                    images = mean_std([x["images"] for x in sel], 0) if "images" in sel[0] else ""
                    lines.append(
                        f"| {family} | {steps} | {fmt.upper()} | {label} | {mean_std([x['fd'] for x in sel], 2)} | "
                        f"{mean_std([x['fd_heldout'] for x in sel], 2) if 'fd_heldout' in sel[0] else ''} | "
                        f"{mean_std([x['accuracy'] for x in sel], 3)} | "
                        f"{mean_std([x['jaq'] for x in sel], 3)} | {mean_std([x['tc'] for x in sel], 2)} | "
                        f"{mean_std([x['iq'] for x in sel], 3)} | {closed} | {images} |")
    n = len(cfg["seeds"])
    held = any("fd_heldout" in x for x in rows)
    lines += ["", f"{n} seed{'s' * (n != 1)}; {cfg['per_prompt']} images per prompt x 20 calibration prompts (FD, "
              f"accuracy, JAQ)" + (" and x 20 held-out prompts (FD held-out)" if held else "") + "; Q-Sched: 20 "
              f"calibration prompts x 1 image, 'start' space in [0.8, 1.2], {cfg['points']}-point lattice, JAQ = "
              f"mean of per-image ln(CLIPScore) + 2·CLIP-IQA (tiny CLIP, the pack's metric code); device "
              f"{cfg.get('device')}; model {str(cfg['model_hash'])[:12]}."]
    if cfg.get("missing"):
        lines.append(f"Not computed (time limit): the rows of {len(cfg['missing'])} (family, steps, seed, model) "
                     f"settings: {cfg['missing']}.")
    if cfg.get("grid_skipped"):
        lines.append(f"Grid search skipped (time limit) for {len(cfg['grid_skipped'])} (family, steps, seed"
                     f"{', format' if len(cfg['grid_skipped'][0]) == 4 else ''}) settings: {cfg['grid_skipped']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched_pack.calibration.shapeworld.experiment",
                                description="Shape world: FP vs W8A8/W4A8/W4A4 naive vs PTQD vs Q-Sched, with guards.")
    p.add_argument("--out", required=True)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--per-prompt", type=int, default=20)
    p.add_argument("--points", type=int, default=21)
    p.add_argument("--strategies", nargs="*", default=["zoom", "grid"], choices=["zoom", "grid", "pattern"])
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--no-fp", action="store_true", help="skip the FP rows (another worker computes them)")
    p.add_argument("--no-fp-search", action="store_true", help="skip the FP + Q-Sched zoom row")
    p.add_argument("--weights", default=None, help="folder with the two weight files (default: packaged)")
    p.add_argument("--device", default=None)
    p.add_argument("--deadline", type=float, default=None,
                   help="unix time after which settings are skipped and a running grid search stops")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="results")
    p.add_argument("--guards", nargs="*", default=list(GUARDS), choices=GUARDS)
    p.add_argument("--reference", nargs="*", default=list(REFERENCE_METHODS), choices=REFERENCE_CHOICES,
                   help="reference-anchored methods to run (none: only the JAQ methods)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per network call when a search's points are evaluated together (default: 2560 on "
                        "a GPU, 0 = one point at a time on the CPU); the same images up to float error")
    p.add_argument("--seconds", type=float, default=None,
                   help="time limit from now (sets --deadline): later settings are skipped, a running grid stops")
    p.add_argument("--merge", nargs="+", default=None, help="merge these worker result files into --out")
    a = p.parse_args(argv)
    if a.merge:
        print(format_table(merge(a.out, a.merge)))
        return 0
    res = run(a.out, families=a.families, steps_list=a.steps, formats=a.formats, seeds=a.seeds,
              per_prompt=a.per_prompt, points=a.points, strategies=tuple(a.strategies), budget=a.budget,
              fp=not a.no_fp, weights=a.weights, device=a.device, num_threads=a.threads, name=a.name,
              deadline=a.deadline if a.seconds is None else time.time() + a.seconds, guards=tuple(a.guards),
              batch=a.batch, reference=tuple(a.reference), fp_search=not a.no_fp_search)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
