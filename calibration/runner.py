"""Calibration runner and ``calibrate()``, the entry point: evaluates the points a search strategy asks for, records
every one on disk (``calibration.record``), resumes.

Kill the process at any moment and run again with ``resume=True``: the strategies are deterministic, so they
ask for the same points in the same order; recorded points are answered from the record (nothing is
recomputed) and the final preset is byte-identical to an uninterrupted run (it holds no wall-clock data).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..qsched.coefficients import Coefficients
from .record import Record
from .search import (DEFAULT_RANGE, BudgetExhausted, Point, SearchSpace, check_budget, check_points, check_strategy,
                     default_points, estimate_points, run_strategy, select_best)

OBJECTIVES = ("jaq", "reference", "hybrid")
#: Hybrid: the JAQ search multiplies the reference fit by factors in [1 - TRUST, 1 + TRUST].
TRUST = 0.05
#: Hybrid: its held-out distance to FP may exceed the reference fit's by at most this share.
HYBRID_DISTANCE_TOLERANCE = 0.05
PRESET_KIND = "qsched-calibration"


# ---------------------------------------------------------------------------------------------------------
# helpers

def _floats(values) -> list[float]:
    if torch.is_tensor(values):
        values = values.detach().float().cpu().reshape(-1).tolist()
    return [float(v) for v in values]


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def scorer_config(scorer, explicit: Mapping | None = None) -> dict:
    """What identifies a scorer in a record/preset: ``explicit``, ``scorer.config`` or the JAQ fields."""
    if explicit is not None:
        return dict(explicit)
    cfg = getattr(scorer, "config", None)
    if callable(cfg):
        cfg = cfg()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    out: dict[str, Any] = {"class": type(scorer).__name__}
    for attr in ("k", "k_on", "tc_transform", "score_rule"):
        if hasattr(scorer, attr):
            out[attr] = getattr(scorer, attr)
    for attr in ("tc", "iq"):
        m = getattr(scorer, attr, None)
        if m is not None:
            out[attr] = getattr(m, "name", type(m).__name__)
    return out


def check_calibration_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least 1 calibration prompt (the paper uses 20)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}] must be a non-empty string, got {p!r}")
    return prompts


def check_seeds(seeds, count: int, seed: int) -> list[int]:
    if seeds is None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        return [seed + i for i in range(count)]
    seeds = list(seeds)
    if len(seeds) != count or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be {count} integers >= 0 (one per prompt), got {seeds!r}")
    return seeds


@dataclass
class ProgressInfo:
    points_done: int
    points_total: int  # exact for grid, an estimate for adaptive strategies
    images_spent: int
    images_total: int
    best_score: float
    identity_score: float | None
    elapsed: float  # seconds of this session
    eta: float | None  # seconds left (None until one new point has been timed)
    cached: bool  # the last point came from the record
    #: how points_total is known: "" exact (grid), "~" a typical count (adaptive), "<=" capped by the budget
    points_kind: str = "~"

    def line(self) -> str:
        eta = "?" if self.eta is None else _hms(self.eta)
        return (f"[{self.points_done}/{self.points_kind}{self.points_total} points] "
                f"images {self.images_spent}/{self.images_total} best {self.best_score:.5g} "
                f"(identity {self.identity_score if self.identity_score is None else format(self.identity_score, '.5g')}) "
                f"elapsed {_hms(self.elapsed)} eta {eta}")


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------------------
# result

@dataclass
class EvaluatedPoint:
    point: Point
    coefficients: Coefficients
    score: float  # mean JAQ over the calibration prompts
    per_prompt: list = field(default_factory=list)
    components: dict = field(default_factory=dict)  # metric name -> per-prompt values
    seconds: float = 0.0
    images: int = 0


@dataclass
class CalibrationResult:
    """What ``calibrate`` returns: the winner, identity's score, every evaluated point, images spent."""

    best: Coefficients
    best_point: Point
    best_score: float
    identity_score: float
    points: list  # [EvaluatedPoint] in evaluation order
    images_spent: int
    space: SearchSpace
    strategy: str
    grid_points: int
    stopped: str  # "done" or "budget"
    preset_path: str | None = None
    #: "jaq" (the paper's search), "reference" (fitted to the FP model) or "hybrid" (JAQ around the fit)
    objective: str = "jaq"
    #: False: the held-out test refused the coefficients and ``best`` is identity (``acceptance`` says why)
    accepted: bool = True
    acceptance: str = "JAQ search (the paper's objective): no held-out test"
    #: held-out numbers of the acceptance test (``reference.Acceptance.to_dict()``, plus the hybrid's JAQ check)
    heldout: dict | None = None
    #: the FP reference generator's fingerprint (reference / hybrid)
    reference: dict | None = None

    @property
    def improvement(self) -> float:
        return self.best_score - self.identity_score

    def summary(self) -> str:
        if self.objective != "jaq":
            return (f"{self.objective} objective ({self.strategy}, {self.images_spent} images): "
                    f"{self.acceptance}; c_x = {_fmt(self.best.c_x)}, c_eps = {_fmt(self.best.c_eps)}")
        return (f"{self.strategy} over {self.space.kind} ({len(self.points)} points, {self.images_spent} images"
                f"{', stopped by the image budget' if self.stopped == 'budget' else ''}): best JAQ "
                f"{self.best_score:.6g} vs identity {self.identity_score:.6g} (Δ {self.improvement:+.4g}); "
                f"c_x = {_fmt(self.best.c_x)}, c_eps = {_fmt(self.best.c_eps)}")


def _fmt(vals) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in vals) + "]"


# ---------------------------------------------------------------------------------------------------------
# runner

class Runner:
    """Evaluate points for a strategy: generate with common random numbers, score, record, cache, budget."""

    def __init__(self, generator, scorer, prompts, *, space: SearchSpace, strategy: str = "pattern",
                 points: int | None = None, seed: int = 42, seeds: Sequence[int] | None = None,
                 budget: int | None = None, record: str | None = None, resume: bool = False,
                 progress: Callable[[ProgressInfo], None] | None = None, interrupt: Callable[[], None] | None = None,
                 scorer_config: Mapping | None = None, strategy_options: Mapping[str, Any] | None = None):
        self.prompts = check_calibration_prompts(prompts)
        self.seeds = check_seeds(seeds, len(self.prompts), seed)
        self.space = space
        self.strategy = strategy
        self.options = check_strategy(strategy, strategy_options)
        self.n = default_points(space.kind) if points is None else check_points(points)
        self.budget = budget
        self.generator, self.scorer = generator, scorer
        self.progress, self.interrupt = progress, interrupt
        per_point = len(self.prompts)
        self.estimate = estimate_points(space, strategy, self.n, self.options)
        check_budget(space, strategy, self.n, per_point, budget, self.options)
        self.scorer_config = scorer_config_ = _scorer_cfg(scorer, scorer_config)
        self.fingerprint = {
            "generator": _generator_fingerprint(generator),
            "scorer": scorer_config_,
            "prompts": {"count": len(self.prompts), "sha256": prompts_digest(self.prompts)},
            "seeds": self.seeds,
            "space": space.to_dict(),
            "strategy": {"name": strategy, "points": self.n, "options": self.options},
        }
        threads = _cpu_threads(generator, scorer_config_)
        if threads is not None:  # CPU results move with the thread count (float summation order)
            self.fingerprint["cpu_threads"] = threads
        try:  # must be JSON without NaN/inf (a record holding them could never be read back): fail before writing
            json.dumps(self.fingerprint, allow_nan=False)
        except ValueError:
            bad = [k for k, v in _flat(self.fingerprint) if isinstance(v, float) and not math.isfinite(v)]
            raise ValueError(f"the run's settings hold a non-finite number ({', '.join(bad) or 'somewhere'}): "
                             "every option must be a finite number") from None
        self.record = Record(record, self.fingerprint, resume,
                             expect={"images": per_point, "dim": space.dim, "steps": space.steps})
        self._session_images = 0
        self._session_seconds = 0.0
        self._t0 = time.perf_counter()
        self._evaluated: list[str] = []  # keys in the order the strategy asked for them (first time)

    # -- evaluation ---------------------------------------------------------------------------------
    @property
    def images_spent(self) -> int:
        return sum(int(self.record.entries[k]["images"]) for k in self.record.order)

    def _evaluate_one(self, point) -> dict:
        key = Record.point_key(point)
        if key in self.record.entries:
            return self.record.entries[key]
        if self.budget is not None and self.images_spent + len(self.prompts) > self.budget:
            raise BudgetExhausted()
        if self.interrupt is not None:
            self.interrupt()
        coeff = self.space.coefficients(point)
        t0 = time.perf_counter()
        images = self.generator.generate(coeff, self.prompts, self.seeds)
        _check_images(images, len(self.prompts))
        if self.interrupt is not None:
            self.interrupt()
        jaq, comps = score_images(self.scorer, images, self.prompts)
        seconds = time.perf_counter() - t0
        if not all(math.isfinite(v) for v in jaq):
            raise ValueError(f"scorer returned a non-finite JAQ for point {list(point)}: {jaq}")
        entry = {"point": [float(v) for v in point], "c_x": list(coeff.c_x), "c_eps": list(coeff.c_eps),
                 "score": point_score(self.scorer, jaq, comps), "jaq": jaq, "components": comps,
                 "images": len(self.prompts), "seconds": round(seconds, 4)}
        self.record.append(entry)
        self._session_images += len(self.prompts)
        self._session_seconds += seconds
        return entry

    def _evaluate_many(self, points) -> set:
        """Optional batched path: when the generator has ``generate_many(coefficient_list, prompts, seeds)`` (the
        images of every point, point after point, in one call: the same images as one ``generate`` per point up
        to float error), the uncached points of ``points`` are generated and scored together, as many as the
        budget allows, in order; each is recorded exactly as :meth:`_evaluate_one` records it. The per-point
        loop then finds them in the record (and stops at the budget where it always did). Returns their keys."""
        many = getattr(self.generator, "generate_many", None)
        todo, keys = [], set()
        for p in points:
            key = Record.point_key(p)
            if key not in self.record.entries and key not in keys:
                todo.append(p)
                keys.add(key)
        if self.budget is not None:
            todo = todo[:max(0, (self.budget - self.images_spent) // len(self.prompts))]
        if many is None or len(todo) < 2:
            return set()
        if self.interrupt is not None:
            self.interrupt()
        coeffs = [self.space.coefficients(p) for p in todo]
        n = len(self.prompts)
        t0 = time.perf_counter()
        images = many(coeffs, self.prompts, self.seeds)
        _check_images(images, n * len(todo))
        if self.interrupt is not None:
            self.interrupt()
        jaq, comps = score_images(self.scorer, images, self.prompts * len(todo))
        seconds = (time.perf_counter() - t0) / len(todo)
        for j, (point, coeff) in enumerate(zip(todo, coeffs)):
            part = jaq[j * n:(j + 1) * n]
            if not all(math.isfinite(v) for v in part):
                raise ValueError(f"scorer returned a non-finite JAQ for point {list(point)}: {part}")
            pc = {k: v[j * n:(j + 1) * n] for k, v in comps.items()}
            self.record.append({"point": [float(v) for v in point], "c_x": list(coeff.c_x),
                                "c_eps": list(coeff.c_eps), "score": point_score(self.scorer, part, pc),
                                "jaq": part, "components": pc, "images": n, "seconds": round(seconds, 4)})
            self._session_images += n
            self._session_seconds += seconds
        return {Record.point_key(p) for p in todo}

    def evaluate(self, points) -> list[float]:
        out = []
        fresh = self._evaluate_many(points)
        for p in points:
            key = Record.point_key(p)
            cached = key in self.record.entries and key not in fresh
            fresh.discard(key)
            e = self._evaluate_one(p)
            if key not in self._evaluated:
                self._evaluated.append(key)
            out.append(float(e["score"]))
            self._report(cached)
        return out

    def _report(self, cached: bool) -> None:
        if self.progress is None:
            return
        scores = [self.record.entries[k]["score"] for k in self._evaluated]
        ident = self.record.entries.get(Record.point_key(self.space.identity))
        total_pts = max(self.estimate, len(self._evaluated))
        per_point = len(self.prompts)
        kind = "" if self.strategy == "grid" else "~"
        if self.budget is not None and self.budget // per_point < total_pts:
            total_pts, kind = max(len(self._evaluated), self.budget // per_point), "<="
        images_total = total_pts * per_point
        if self.budget is not None:
            images_total = min(images_total, self.budget)
        eta = None
        if self._session_images:
            left = max(0, images_total - self.images_spent)
            eta = left * self._session_seconds / self._session_images
        self.progress(ProgressInfo(len(self._evaluated), total_pts, self.images_spent, images_total, max(scores),
                                   None if ident is None else ident["score"], time.perf_counter() - self._t0, eta,
                                   cached, kind))

    # -- run ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the record's lock (also done at the end of :meth:`run`)."""
        self.record.close()

    def run(self) -> CalibrationResult:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> CalibrationResult:
        stopped = run_strategy(self.space, self.strategy, self.evaluate, self.n, self.options)
        keys = self._evaluated
        if not keys:
            raise ValueError("the image budget does not allow a single point; raise the budget")
        entries = [self.record.entries[k] for k in keys]
        pts = [tuple(e["point"]) for e in entries]
        scores = [e["score"] for e in entries]
        b = select_best(pts, scores, self.space.identity)
        ident = self.record.entries.get(Record.point_key(self.space.identity))
        evaluated = [EvaluatedPoint(tuple(e["point"]), Coefficients(e["c_x"], e["c_eps"]), e["score"], e["jaq"],
                                    e["components"], e["seconds"], e["images"]) for e in entries]
        result = CalibrationResult(best=evaluated[b].coefficients, best_point=pts[b], best_score=scores[b],
                                   identity_score=float("nan") if ident is None else ident["score"],
                                   points=evaluated, images_spent=self.images_spent, space=self.space,
                                   strategy=self.strategy, grid_points=self.n, stopped=stopped)
        result.best = result.best.with_metadata(**self.preset_metadata(result))
        return result

    def preset_metadata(self, result: CalibrationResult, extra: Mapping | None = None) -> dict:
        def means(e):
            comps = e.get("components", {}) if e else {}
            return {k: math.fsum(v) / len(v) for k, v in sorted(comps.items()) if v}

        best_e = self.record.entries[Record.point_key(result.best_point)]
        ident_e = self.record.entries.get(Record.point_key(self.space.identity))
        gen = self.fingerprint["generator"]
        meta = {
            "kind": PRESET_KIND,
            "model": {k: gen.get(k) for k in ("model_hash", "model_file", "family", "sampler", "steps", "quant",
                                              "height", "width", "dtype") if k in gen},
            "family": gen.get("family"),
            "steps": self.space.steps,
            "sampler": gen.get("sampler"),
            "quant": gen.get("quant"),
            "model_hash": gen.get("model_hash"),
            "jaq": self.scorer_config,
            "scores": {"identity": {"jaq": ident_e["score"] if ident_e else None, **means(ident_e)},
                       "best": {"jaq": result.best_score, **means(best_e)}},
            "images_spent": result.images_spent,
            "points_evaluated": len(result.points),
            "search": {"space": self.space.to_dict(), "strategy": self.strategy, "points": self.n,
                       "options": self.options, "best_point": list(result.best_point), "stopped": result.stopped},
            "prompts": self.fingerprint["prompts"],
            "seeds": self.seeds,
        }
        if extra:
            meta.update(dict(extra))
        return meta

    def write_preset(self, result: CalibrationResult, path: str, extra_metadata: Mapping | None = None) -> str:
        preset = result.best.with_metadata(**self.preset_metadata(result, extra_metadata))
        preset.check_steps(self.space.steps, "search space")
        preset.save(path)  # atomic: temp file + fsync + rename
        result.best = preset
        result.preset_path = os.fspath(path)
        return result.preset_path


def _flat(obj, prefix: str = ""):
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def _cpu_threads(generator, scorer_cfg: Mapping) -> int | None:
    """torch's CPU thread count when images are generated or scored on the CPU (or the device is unknown)."""
    devices = [str(getattr(generator, "device", "cpu")), str(scorer_cfg.get("device", "cpu"))]
    return torch.get_num_threads() if any(d.startswith("cpu") for d in devices) else None


def point_score(scorer, jaq: list[float], comps: Mapping[str, list[float]]) -> float:
    """One score for a point: ``scorer.aggregate(tc, iq)`` when the scorer defines it (JAQ's ``log`` variant is
    ln of the mean TC, not a mean of per-image values), else the mean per-image JAQ."""
    if hasattr(scorer, "aggregate") and "tc" in comps and "iq" in comps:
        value = float(scorer.aggregate(comps["tc"], comps["iq"]))
    else:
        value = math.fsum(jaq) / len(jaq)
    if not math.isfinite(value):
        raise ValueError(f"scorer returned a non-finite score {value} for a point")
    return value


def score_images(scorer, images: torch.Tensor, prompts: list[str]) -> tuple[list[float], dict[str, list[float]]]:
    """Per-image JAQ and components from one metric pass: ``components`` then ``combine`` when the scorer
    has it (``calibration.jaq.JAQ`` does), else ``score`` (which may recompute)."""
    comps = scorer.components(images, prompts)
    if not isinstance(comps, Mapping):
        raise ValueError(f"scorer.components must return a mapping name -> per-image values, got {type(comps).__name__}")
    if hasattr(scorer, "combine") and "tc" in comps and "iq" in comps:
        jaq = scorer.combine(comps["tc"], comps["iq"])
    else:
        jaq = scorer.score(images, prompts)
    jaq = _floats(jaq)
    if len(jaq) != len(prompts):
        raise ValueError(f"scorer returned {len(jaq)} scores for {len(prompts)} images")
    out = {}
    for k, v in comps.items():
        vals = _floats(v)
        if len(vals) != len(prompts):
            raise ValueError(f"scorer component {k!r} has {len(vals)} values for {len(prompts)} images")
        out[str(k)] = vals
    return jaq, out


def _check_images(images, count: int) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] != count or images.shape[-1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"generator must return images [B={count}, H, W, 3], got {shape}")


def _scorer_cfg(scorer, explicit):
    cfg = scorer_config(scorer, explicit)
    try:
        json.dumps(cfg)
    except TypeError:
        raise ValueError(f"scorer config must be JSON-serialisable, got {cfg!r}") from None
    return cfg


def _generator_fingerprint(generator) -> dict:
    fp = generator.fingerprint() if hasattr(generator, "fingerprint") else {"class": type(generator).__name__}
    if not isinstance(fp, Mapping):
        raise ValueError(f"generator.fingerprint() must return a dict, got {type(fp).__name__}")
    return dict(fp)


# ---------------------------------------------------------------------------------------------------------
# entry point

def calibrate(generator, scorer, prompts, *, space: "str | SearchSpace" = "start", steps: int | None = None,
              low: float = DEFAULT_RANGE[0], high: float = DEFAULT_RANGE[1], strategy: str = "pattern",
              points: int | None = None, seed: int = 42, seeds: Sequence[int] | None = None,
              budget: int | None = None, record: str | None = None, resume: bool = False,
              preset: str | None = None, progress=None, interrupt=None, scorer_config: Mapping | None = None,
              strategy_options: Mapping[str, Any] | None = None, extra_metadata: Mapping | None = None,
              objective: str = "jaq", reference=None, heldout_prompts: Sequence[str] | None = None,
              heldout_seeds: Sequence[int] | None = None, fit_mode: str = "free", fit_match: str | None = None,
              trust: float = TRUST) -> CalibrationResult:
    """Find Q-Sched coefficients for ``generator`` (coefficients, prompts, seeds -> images) under ``scorer``.

    ``objective``: ``"jaq"`` (the paper: search maximising ``scorer``), ``"reference"`` (fit to the FP model
    ``reference`` on the same noise, ``calibration.reference``; ``scorer`` may be None; no search, no record) or
    ``"hybrid"`` (the JAQ search confined to ``[1 - trust, 1 + trust]`` times the reference fit). Reference and
    hybrid test the result on ``heldout_prompts`` / ``heldout_seeds`` (default: the second half of ``prompts``,
    the first half fits) and return identity, with the reason in ``result.acceptance``, when it does not hold
    there. ``generator`` and ``reference`` then follow ``reference.TrajectoryGenerator`` too.

    ``generator`` follows ``generate.Generator``; ``scorer`` has ``.score(images, prompts)`` and
    ``.components(images, prompts)`` (e.g. ``calibration.jaq.JAQ``). ``steps`` defaults to the generator's.
    ``record``: JSONL file of every evaluated point (kill and rerun with ``resume=True``: nothing is recomputed
    and the result is identical). ``budget``: maximum images (a grid that does not fit is refused before
    anything runs). ``preset``: where to write the preset JSON (atomically). ``progress(info)`` and
    ``interrupt()`` are called between points (``interrupt`` stops the run by raising).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if objective != "jaq":
        if reference is None:
            raise ValueError(f"objective {objective!r} needs the full-precision model as reference (connect the "
                             "unquantized model), or use objective 'jaq'")
        if objective == "hybrid" and scorer is None:
            raise ValueError("objective 'hybrid' needs a JAQ scorer (it searches JAQ around the reference fit); "
                             "use objective 'reference' to calibrate without one")
        return _calibrate_with_reference(
            generator, scorer, prompts, reference, objective=objective, seed=seed, seeds=seeds,
            heldout_prompts=heldout_prompts, heldout_seeds=heldout_seeds, fit_mode=fit_mode, match=fit_match,
            trust=trust,
            strategy=strategy, points=points, budget=budget, record=record, resume=resume, progress=progress,
            interrupt=interrupt, scorer_config=scorer_config, strategy_options=strategy_options, preset=preset,
            extra_metadata=extra_metadata)
    if scorer is None:
        raise ValueError("objective 'jaq' needs a scorer (the JAQ Loader); without scorer files use objective "
                         "'reference' with the full-precision model as reference")
    steps = getattr(generator, "steps", None) if steps is None else steps
    if isinstance(space, SearchSpace):
        sp = space
        if steps is not None and sp.steps != steps:
            raise ValueError(f"steps mismatch: the search space has steps={sp.steps} but the sampler runs "
                             f"steps={steps}")
    else:
        if steps is None:
            raise ValueError("steps must be given (the generator does not say how many steps it samples)")
        sp = SearchSpace(space, steps, low, high)
    gen_steps = getattr(generator, "steps", None)
    if gen_steps is not None and gen_steps != sp.steps:
        raise ValueError(f"steps mismatch: search space has steps={sp.steps} but the generator's sampler runs "
                         f"steps={gen_steps}")
    runner = Runner(generator, scorer, prompts, space=sp, strategy=strategy, points=points, seed=seed, seeds=seeds,
                    budget=budget, record=record, resume=resume, progress=progress, interrupt=interrupt,
                    scorer_config=scorer_config, strategy_options=strategy_options)
    result = runner.run()
    if preset is not None:
        runner.write_preset(result, preset, extra_metadata=extra_metadata)
    return result


# ---------------------------------------------------------------------------------------------------------
# reference and hybrid objectives

class ScaledGenerator:
    """``generator`` run with ``base ⊙ c`` (element-wise) for the coefficients ``c`` a search asks for: a search
    around ``base`` (identity of the search = ``base``). The fingerprint names the base and the reference."""

    def __init__(self, generator, base: Coefficients, reference_fingerprint: Mapping | None = None):
        self.generator, self.base = generator, base
        self.steps = base.steps
        self.reference_fingerprint = None if reference_fingerprint is None else dict(reference_fingerprint)
        if hasattr(generator, "generate_many"):
            self.generate_many = self._generate_many

    def scaled(self, c: Coefficients | None) -> Coefficients:
        if c is None:
            return self.base
        return Coefficients([b * v for b, v in zip(self.base.c_x, c.c_x)],
                            [b * v for b, v in zip(self.base.c_eps, c.c_eps)])

    def fingerprint(self) -> dict:
        return dict(_generator_fingerprint(self.generator), around={"c_x": list(self.base.c_x),
                                                                    "c_eps": list(self.base.c_eps)},
                    reference=self.reference_fingerprint)

    def generate(self, coefficients, prompts, seeds):
        return self.generator.generate(self.scaled(coefficients), prompts, seeds)

    def _generate_many(self, coefficient_list, prompts, seeds):
        return self.generator.generate_many([self.scaled(c) for c in coefficient_list], prompts, seeds)


def _calibrate_with_reference(generator, scorer, prompts, reference, *, objective, seed, seeds, heldout_prompts,
                              heldout_seeds, fit_mode, match, trust, strategy, points, budget, record, resume, progress,
                              interrupt, scorer_config, strategy_options, preset, extra_metadata):
    from . import reference as R

    prompts = check_calibration_prompts(prompts)
    seeds = check_seeds(seeds, len(prompts), seed)
    if heldout_prompts is None:
        if len(prompts) < 2:
            raise ValueError("the reference objective needs at least 2 prompts (half fit, half test), or "
                             "separate held-out prompts")
        prompts, seeds, heldout_prompts, heldout_seeds = R.split_heldout(prompts, seeds)
    else:
        heldout_prompts = check_calibration_prompts(heldout_prompts)
        if heldout_seeds is None:
            heldout_seeds = [max(seeds) + 1 + i for i in range(len(heldout_prompts))]
        heldout_seeds = check_seeds(heldout_seeds, len(heldout_prompts), seed)
    steps = generator.steps
    match = R.MATCH if match is None else match
    ref_fp = _generator_fingerprint(reference)
    res = R.calibrate_to_reference(generator, reference, prompts, seeds, heldout_prompts, heldout_seeds,
                                   mode=fit_mode, interrupt=interrupt, match=match)
    acc = res.acceptance
    heldout = dict(acc.to_dict(), prompts=len(heldout_prompts), seeds=list(heldout_seeds))
    fit_meta = {"mode": fit_mode, "match": match, "c_x": list(res.fit.coefficients.c_x), "c_eps": list(res.fit.coefficients.c_eps),
                "residual_identity": res.fit.residual_identity, "residual_fitted": res.fit.residual_fitted}
    best, accepted, text, images = res.coefficients, acc.accepted, acc.text, res.images
    d_best = acc.distance_fitted if accepted else acc.distance_identity
    search_result = None
    if objective == "hybrid":
        space = SearchSpace("start", steps, 1.0 - trust, 1.0 + trust)
        scaled = ScaledGenerator(generator, best, ref_fp)
        runner = Runner(scaled, scorer, prompts, space=space, strategy=strategy, points=points, seed=seed,
                        seeds=seeds, budget=budget, record=record, resume=resume, progress=progress,
                        interrupt=interrupt, scorer_config=scorer_config, strategy_options=strategy_options)
        search_result = runner.run()
        images += search_result.images_spent
        cand = scaled.scaled(search_result.best)
        if tuple(search_result.best_point) == tuple(space.identity):
            text = f"{text}. Hybrid: the JAQ search around it found nothing better, so it stays"
            heldout["hybrid"] = {"accepted": False, "reason": "search kept its start"}
        else:
            if not res.heldout_images:  # the fit was identity: nothing was generated yet
                res.heldout_images = {"reference": reference.generate(None, heldout_prompts, heldout_seeds),
                                      "identity": generator.generate(None, heldout_prompts, heldout_seeds)}
                images += 2 * len(heldout_prompts)
            base_images = res.heldout_images["fitted" if accepted else "identity"]
            cand_images = generator.generate(cand, heldout_prompts, heldout_seeds)
            images += len(heldout_prompts)
            d_cand = R.paired_distance(cand_images, res.heldout_images["reference"])
            d_base = R.paired_distance(base_images, res.heldout_images["reference"])
            jaq_base, _ = score_images(scorer, base_images, heldout_prompts)
            jaq_cand, _ = score_images(scorer, cand_images, heldout_prompts)
            gain = torch.tensor(jaq_cand, dtype=torch.float64) - torch.tensor(jaq_base, dtype=torch.float64)
            p = R.sign_flip_p(gain)
            growth = float(d_cand.mean()) / max(float(d_base.mean()), 1e-30) - 1.0
            ok = float(gain.mean()) > 0 and p <= R.ALPHA and growth <= HYBRID_DISTANCE_TOLERANCE
            heldout["hybrid"] = {"accepted": ok, "jaq_gain": float(gain.mean()), "p_value": p,
                                 "distance_growth": growth, "distance": float(d_cand.mean()),
                                 "tolerance": HYBRID_DISTANCE_TOLERANCE}
            if ok:
                best, d_best = cand, float(d_cand.mean())
                text = (f"{text}. Hybrid kept: on the held-out images JAQ rose by {float(gain.mean()):.4g} (paired "
                        f"test, p = {p:.3g}) and the distance to full precision changed by {100 * growth:+.1f}% "
                        f"(tolerance +{100 * HYBRID_DISTANCE_TOLERANCE:.0f}%)")
            else:
                why = (f"the distance to full precision grew {100 * growth:.1f}% (> {100 * HYBRID_DISTANCE_TOLERANCE:.0f}%)"
                       if growth > HYBRID_DISTANCE_TOLERANCE else
                       f"its JAQ gain did not hold on the held-out images ({float(gain.mean()):+.4g}, p = {p:.3g})")
                text = f"{text}. Hybrid refused ({why}): the reference result stays"
    point = tuple(best.c_x) + tuple(best.c_eps)
    meta = {"kind": PRESET_KIND, "objective": objective, "accepted": accepted, "acceptance": text,
            "model": _generator_fingerprint(generator), "reference": ref_fp, "steps": steps,
            "fit": fit_meta, "heldout": heldout, "images_spent": images,
            "prompts": {"count": len(prompts), "sha256": prompts_digest(prompts)}, "seeds": list(seeds),
            "heldout_prompts": {"count": len(heldout_prompts), "sha256": prompts_digest(heldout_prompts)}}
    if search_result is not None:
        meta["search"] = {"space": search_result.space.to_dict(), "strategy": strategy,
                          "best_point": list(search_result.best_point), "images": search_result.images_spent,
                          "jaq": getattr(runner, "scorer_config", None)}
    if extra_metadata:
        meta.update(dict(extra_metadata))
    best = best.with_metadata(**meta)
    result = CalibrationResult(
        best=best, best_point=point, best_score=-d_best, identity_score=-acc.distance_identity,
        points=[] if search_result is None else search_result.points, images_spent=images,
        space=SearchSpace("per_step", steps, *R.FIT_RANGE) if search_result is None else search_result.space,
        strategy=f"reference fit ({fit_mode})" + ("" if search_result is None else f" + {strategy} JAQ search"),
        grid_points=0 if search_result is None else search_result.grid_points,
        stopped="done" if search_result is None else search_result.stopped, objective=objective,
        accepted=accepted, acceptance=text, heldout=heldout, reference=ref_fp)
    if preset is not None:
        best.check_steps(steps, "sampler")
        best.save(preset)
        result.preset_path = os.fspath(preset)
    return result
