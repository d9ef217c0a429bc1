"""Search for Q-Sched coefficients (paper Algorithm 1, done right, plus adaptive strategies).

Search spaces (``SearchSpace.kind``), every value drawn from ``[low, high]`` (default [0.8, 1.2]):

* ``start``     2-D ``(c_x_start, c_eps_start)``; ramps ``linspace(start, 1, steps)`` -- the released search.
* ``start_end`` 4-D ``(c_x_start, c_x_end, c_eps_start, c_eps_end)`` -- the paper's Algorithm 1 (l. 5-6).
* ``per_step``  2·steps-D ``(c_x[0..N-1], c_eps[0..N-1])`` -- one free value per step (Theorem 1).

Strategies (all maximise the mean JAQ over the calibration prompts; the paper's ``S̄ < S*`` with ``S* = ∞``
is a typo for a higher-is-better score, and the released code's lexicographic ``max`` over score lists that
in effect ranks by CLIPScore is a bug, see docs/calibration.md, "The released search"):

* ``grid``    Algorithm 1 with ``opt`` = a full Cartesian grid: ``n`` points per dimension,
  ``linspace(low, high, n)``, iterated in ``itertools.product`` order of ``SearchSpace.names`` (for ``start``:
  outer loop c_x, inner loop c_eps, like the released code). Identity (all ones) is evaluated first, always.
* ``pattern`` (default) a pattern search on the lattice of the full grid, started from the grid point nearest
  identity: poll the neighbours at distance ``step``, move to the best one if it beats the incumbent, halve
  ``step`` when none does, stop at step 1. It only ever evaluates points of the full grid, so it can reach
  the grid's best exactly; benchmarks/bench_search.py: within 0.5% of the grid's best with <= 7.1% of the
  grid's images on all 21 objectives (synthetic and tiny pipeline), 1.8% (median) in total.
* ``zoom``    the same pattern search after a coarse sub-grid of the lattice (a global look first, for
  landscapes with several maxima); costs more up front (<= 11.6% of a small 15x15 grid to reach 0.5%).

Selection: the highest mean score wins; ties go to identity, then to the point nearest identity, then to
the point evaluated first. A strategy only talks to an ``evaluate(points) -> scores`` function, so the same
code runs on synthetic objectives (``calibration.testing``; tests, benchmark) and on the real pipeline through
``runner.Runner``, which records, caches and resumes; ``runner.calibrate()`` is the entry point.

A leaf: this module imports only ``qsched.coefficients``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..qsched.coefficients import C_MAX, Coefficients, check_coefficient, check_steps

SPACES = ("start", "start_end", "per_step")
STRATEGIES = ("pattern", "zoom", "grid")  # the default first (widget and --help order)
DEFAULT_RANGE = (0.8, 1.2)
#: Grid points per dimension when none is given: the shipped official run uses 50 for the 2-D space.
DEFAULT_POINTS = {"start": 50, "start_end": 11, "per_step": 5}
#: Axis values are rounded to this many decimals so that the grid point 1.0 is exactly identity and
#: record keys are stable across platforms (linspace(0.8, 1.2, 5)[2] is 0.9999999999999999 unrounded).
ROUND = 12

Point = tuple  # tuple[float, ...] in the order of SearchSpace.names


def check_range(low, high, names: tuple[str, str] = ("range low", "range high")) -> tuple[float, float]:
    """The search-range rule: two coefficients (``check_coefficient``) with low < high. ``names``: what the two
    values are called where the user typed them (e.g. the node inputs range_min / range_max)."""
    lo, hi = names
    low, high = check_coefficient(low, lo), check_coefficient(high, hi)
    if not low < high:
        raise ValueError(f"{lo} must be smaller than {hi} (allowed: 0 < {lo} < {hi} <= {C_MAX:g}), "
                         f"got {lo} = {low!r}, {hi} = {high!r}")
    return low, high


@dataclass(frozen=True)
class SearchSpace:
    """Where coefficients are searched. ``point`` tuples follow ``names``."""

    kind: str = "start"
    steps: int = 4
    low: float = DEFAULT_RANGE[0]
    high: float = DEFAULT_RANGE[1]

    def __post_init__(self):
        if self.kind not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}; got {self.kind!r}")
        check_steps(self.steps)
        if self.kind == "start_end" and self.steps < 2:
            raise ValueError("space 'start_end' needs steps >= 2 (with 1 step the end values are never used); "
                             "use space 'start' or 'per_step'")
        check_range(self.low, self.high)
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))

    @property
    def dim(self) -> int:
        return {"start": 2, "start_end": 4, "per_step": 2 * self.steps}[self.kind]

    @property
    def names(self) -> tuple[str, ...]:
        if self.kind == "start":
            return ("c_x_start", "c_eps_start")
        if self.kind == "start_end":
            return ("c_x_start", "c_x_end", "c_eps_start", "c_eps_end")
        return tuple(f"c_x[{i}]" for i in range(self.steps)) + tuple(f"c_eps[{i}]" for i in range(self.steps))

    @property
    def identity(self) -> Point:
        return (1.0,) * self.dim

    def axis(self, n: int) -> tuple[float, ...]:
        """``linspace(low, high, n)`` (Algorithm 1's per-parameter values), rounded to ``ROUND`` decimals."""
        check_points(n)
        return tuple(round(self.low + (self.high - self.low) * i / (n - 1), ROUND) for i in range(n))

    def grid(self, n: int) -> list[Point]:
        """Every point of the n^dim grid in Algorithm 1 order (``itertools.product`` over ``names``)."""
        return list(itertools.product(self.axis(n), repeat=self.dim))

    def coefficients(self, point: Sequence[float]) -> Coefficients:
        p = tuple(float(v) for v in point)
        if len(p) != self.dim:
            raise ValueError(f"a point of space {self.kind!r} has {self.dim} values ({', '.join(self.names)}), "
                             f"got {len(p)}")
        n = self.steps
        if self.kind == "start":
            return Coefficients.ramp(n, p[0], 1.0, p[1], 1.0)
        if self.kind == "start_end":
            return Coefficients.ramp(n, p[0], p[1], p[2], p[3])
        return Coefficients(p[:n], p[n:])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "low": self.low, "high": self.high}


def check_points(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 10_000:
        raise ValueError(f"points (grid values per dimension) must be an integer in [2, 10000], got {n!r}")
    return n


def default_points(kind: str) -> int:
    if kind not in DEFAULT_POINTS:
        raise ValueError(f"space must be one of {', '.join(SPACES)}; got {kind!r}")
    return DEFAULT_POINTS[kind]


# ---------------------------------------------------------------------------------------------------------
# selection

def distance_to_identity(point: Sequence[float]) -> float:
    return math.fsum((v - 1.0) ** 2 for v in point)


def select_best(points: Sequence[Point], scores: Sequence[float], identity: Point | None = None) -> int:
    """Index of the best point: highest score; ties -> identity, then nearest identity, then first evaluated."""
    if not points:
        raise ValueError("no evaluated points to select from")
    if len(points) != len(scores):
        raise ValueError(f"{len(points)} points but {len(scores)} scores")
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return min(tied, key=lambda i: (0 if identity is not None and tuple(points[i]) == tuple(identity) else 1,
                                    distance_to_identity(points[i]), i))


# ---------------------------------------------------------------------------------------------------------
# strategies: each is f(space, evaluate, n, **options); evaluate(list of points) -> list of mean scores
# (already-evaluated points come back from the runner's cache at no cost).

class BudgetExhausted(Exception):
    """Raised by an evaluate function when the next point would exceed the image budget."""


Evaluate = Callable[[Sequence[Point]], list]


def strategy_grid(space: SearchSpace, evaluate: Evaluate, n: int) -> None:
    """Algorithm 1: identity, then the full grid. Points are sent in batches so progress stays fine-grained."""
    evaluate([space.identity])
    batch: list[Point] = []
    for p in itertools.product(space.axis(n), repeat=space.dim):
        batch.append(p)
        if len(batch) == 64:
            evaluate(batch)
            batch = []
    if batch:
        evaluate(batch)


class _Lattice:
    """Index arithmetic on the n^dim grid; caches scores by point so polls are cheap to reason about."""

    def __init__(self, space: SearchSpace, n: int, evaluate: Evaluate):
        self.space, self.n, self.axis = space, n, space.axis(n)
        self._evaluate = evaluate
        self.scores: dict[Point, float] = {}
        self.order: list[Point] = []

    def point(self, idx: Sequence[int]) -> Point:
        return tuple(self.axis[i] for i in idx)

    def nearest_index(self, point: Sequence[float]) -> tuple[int, ...]:
        return tuple(min(range(self.n), key=lambda i: (abs(self.axis[i] - v), i)) for v in point)

    def evaluate(self, points: Sequence[Point]) -> None:
        todo = []
        for p in points:
            if p not in self.scores and p not in todo:
                todo.append(p)
        if not todo:
            return
        for p, s in zip(todo, self._evaluate(todo)):
            self.scores[p] = float(s)
            self.order.append(p)

    def best(self) -> Point:
        pts = self.order
        return pts[select_best(pts, [self.scores[p] for p in pts], self.space.identity)]


def _moves(dim: int, kind: str):
    if kind == "full":
        return [m for m in itertools.product((-1, 0, 1), repeat=dim) if any(m)]
    moves = [tuple(s if j == k else 0 for j in range(dim)) for k in range(dim) for s in (-1, 1)]
    if kind == "pairs":  # axis moves plus the 2-coordinate diagonals: follows ridges where c_x and c_eps trade off
        for a, b in itertools.combinations(range(dim), 2):
            for sa in (-1, 1):
                for sb in (-1, 1):
                    moves.append(tuple(sa if j == a else sb if j == b else 0 for j in range(dim)))
    return moves


def _neighbours(idx: tuple[int, ...], step: int, n: int, kind: str) -> list[tuple[int, ...]]:
    """Lattice points at distance ``step`` along the moves of ``kind``, clipped to the grid, deduplicated."""
    out = []
    for m in _moves(len(idx), kind):
        q = tuple(min(n - 1, max(0, i + step * d)) for i, d in zip(idx, m))
        if q != idx and q not in out:
            out.append(q)
    return out


def _pattern_search(lat: _Lattice, start: tuple[int, ...], step: int, kind: str) -> None:
    """Poll the neighbours at ``step``; move to the best one if it beats the incumbent, else halve ``step``."""
    idx = start
    while True:
        here = lat.point(idx)
        cand = [lat.point(q) for q in _neighbours(idx, step, lat.n, kind)]
        lat.evaluate([here] + cand)
        best_q, best_s = None, lat.scores[here]
        for q, p in zip(_neighbours(idx, step, lat.n, kind), cand):
            if lat.scores[p] > best_s:
                best_q, best_s = q, lat.scores[p]
        if best_q is not None:
            idx = best_q
        elif step > 1:
            step = max(1, step // 2)
        else:
            return


NEIGHBOURHOODS = ("full", "pairs", "axis")


def _neighbourhood(dim: int, option) -> str:
    """Poll pattern: all 3^d - 1 neighbours (default up to 2-D), axis + pairwise diagonals (default above),
    or the 2d axis moves only."""
    if option is None:
        return "full" if dim <= 2 else "pairs"
    if option not in NEIGHBOURHOODS:
        raise ValueError(f"neighbourhood must be one of {', '.join(NEIGHBOURHOODS)} or unset, got {option!r}")
    return option


def default_coarse(dim: int) -> int:
    """Coarse-grid points per dimension of ``zoom`` when none is given (a global look first)."""
    return 5 if dim <= 2 else 3 if dim <= 4 else 2


def strategy_zoom(space: SearchSpace, evaluate: Evaluate, n: int, coarse: int | None = None,
                  neighbourhood: str | None = None) -> None:
    """Identity + a coarse sub-grid of the n-grid, then a lattice pattern search from its best point."""
    if coarse is None:
        coarse = default_coarse(space.dim)
    if isinstance(coarse, bool) or not isinstance(coarse, int) or not 2 <= coarse:
        raise ValueError(f"coarse (coarse-grid points per dimension) must be an integer >= 2, got {coarse!r}")
    coarse = min(coarse, n)
    kind = _neighbourhood(space.dim, neighbourhood)
    lat = _Lattice(space, n, evaluate)
    lat.evaluate([space.identity])
    sub = sorted({round(i * (n - 1) / (coarse - 1)) for i in range(coarse)})
    lat.evaluate([lat.point(q) for q in itertools.product(sub, repeat=space.dim)])
    step = max(1, (n - 1) // (2 * (coarse - 1)))
    _pattern_search(lat, lat.nearest_index(lat.best()), step, kind)


def strategy_pattern(space: SearchSpace, evaluate: Evaluate, n: int, step: int | None = None,
                     neighbourhood: str | None = None) -> None:
    """Lattice pattern search from the grid point nearest identity, initial step a quarter of the range."""
    step = max(1, (n - 1) // 4) if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step (initial pattern step in grid cells) must be an integer >= 1, got {step!r}")
    kind = _neighbourhood(space.dim, neighbourhood)
    lat = _Lattice(space, n, evaluate)
    lat.evaluate([space.identity])
    _pattern_search(lat, lat.nearest_index(space.identity), step, kind)


STRATEGY_FUNCS = {"grid": strategy_grid, "zoom": strategy_zoom, "pattern": strategy_pattern}
STRATEGY_OPTIONS = {"grid": (), "zoom": ("coarse", "neighbourhood"), "pattern": ("step", "neighbourhood")}


def check_strategy(strategy: str, options: Mapping[str, Any] | None) -> dict:
    if strategy not in STRATEGY_FUNCS:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(STRATEGY_OPTIONS[strategy]))
    if unknown:
        allowed = ", ".join(STRATEGY_OPTIONS[strategy]) or "none"
        raise ValueError(f"unknown option(s) {unknown} for strategy {strategy!r}; allowed: {allowed}")
    return options


def run_strategy(space: SearchSpace, strategy: str, evaluate: Evaluate, n: int | None = None,
                 options: Mapping[str, Any] | None = None) -> str:
    """Run a strategy to completion; return "done" or "budget" (stopped by ``BudgetExhausted``)."""
    options = check_strategy(strategy, options)
    n = default_points(space.kind) if n is None else check_points(n)
    try:
        STRATEGY_FUNCS[strategy](space, evaluate, n, **options)
    except BudgetExhausted:
        return "budget"
    return "done"


MAX_POINTS_WITHOUT_BUDGET = 1_000_000
MAX_FIRST_DESIGN = 100_000


def _big(n: int) -> str:
    """An exact count, or its order of magnitude when it has more than 15 digits."""
    return str(n) if n < 10 ** 15 else f"about 10^{len(str(n)) - 1}"


def estimate_points(space: SearchSpace, strategy: str, n: int, options: Mapping[str, Any] | None = None) -> int:
    """Points a run will evaluate: exact for grid; for adaptive strategies a typical count (for the ETA)."""
    options = check_strategy(strategy, options)
    if strategy == "grid":
        return n ** space.dim + 1 - _identity_on_grid(space, n)
    poll = len(_moves(space.dim, _neighbourhood(space.dim, options.get("neighbourhood"))))
    levels = max(1, math.ceil(math.log2(max(2, n - 1))))
    if strategy == "zoom":
        c = options.get("coarse") or default_coarse(space.dim)
        return 1 + min(c, n) ** space.dim + poll * (levels + 2)
    return 1 + poll * (levels + 4)


def _identity_on_grid(space: SearchSpace, n: int) -> int:
    return 1 if 1.0 in space.axis(n) else 0


def check_budget(space: SearchSpace, strategy: str, n: int, per_point: int, budget: int | None,
                 options: Mapping[str, Any] | None = None) -> None:
    """Refuse, before anything runs, a grid larger than the budget or a budget below an adaptive strategy's
    first design (identity + coarse grid). Without a budget a grid above ``MAX_POINTS_WITHOUT_BUDGET`` points is
    refused, and a ``zoom`` coarse grid above ``MAX_FIRST_DESIGN`` points always is (sizes are computed as exact
    integers, nothing is built)."""
    options = check_strategy(strategy, options)
    if strategy == "zoom":
        coarse = options.get("coarse") or default_coarse(space.dim)
        design = min(coarse, n) ** space.dim
        if design > MAX_FIRST_DESIGN:
            raise ValueError(
                f"strategy 'zoom' would start with a coarse grid of {min(coarse, n)}^{space.dim} = {_big(design)} "
                f"points (more than {MAX_FIRST_DESIGN:,}): use strategy 'pattern' for a {space.dim}-D space, or a "
                "smaller space (start, start_end)")
    if budget is None:
        lattice = n ** space.dim  # every point an adaptive strategy can visit lies on this lattice, once
        if strategy != "grid" and lattice > MAX_POINTS_WITHOUT_BUDGET:
            raise ValueError(
                f"strategy {strategy!r} on a {space.dim}-D space may evaluate up to {n}^{space.dim} = {_big(lattice)} "
                f"points x {per_point} prompts, more than {MAX_POINTS_WITHOUT_BUDGET:,} points: set a budget "
                "(maximum images; CLI --budget), or use fewer points per dimension or a smaller space")
        if strategy == "grid":
            total = estimate_points(space, strategy, n, options)
            if total > MAX_POINTS_WITHOUT_BUDGET:
                raise ValueError(
                    f"the grid evaluates {n}^{space.dim} = {_big(total)} points x {per_point} prompts = "
                    f"{_big(total * per_point)} images, more than {MAX_POINTS_WITHOUT_BUDGET:,} points: set a budget "
                    "(maximum images; CLI --budget) to run a search this large, use fewer points per dimension, "
                    "a smaller space, or an adaptive strategy (pattern, zoom)")
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget (maximum images) must be an integer >= 1 or unset, got {budget!r}")
    if strategy == "grid":
        total = estimate_points(space, strategy, n, options)
        if total * per_point > budget:
            identity = " + identity" if total > n ** space.dim else ""
            raise ValueError(
                f"budget too small: the grid evaluates {_big(total)} points ({n}^{space.dim} grid{identity}) x "
                f"{per_point} prompts = {_big(total * per_point)} images, budget is {budget}: raise the budget to >= "
                f"{_big(total * per_point)}, use fewer points or prompts, or an adaptive strategy (pattern, zoom)")
        return
    first = 1
    if strategy == "zoom":
        coarse = options.get("coarse") or default_coarse(space.dim)
        first += min(coarse, n) ** space.dim
    if first * per_point > budget:
        raise ValueError(f"budget too small: strategy {strategy!r} needs at least {first} points x {per_point} "
                         f"prompts = {first * per_point} images before it can choose, budget is {budget}: raise the "
                         "budget or use fewer prompts")


def point_of(space: SearchSpace, coefficients: Coefficients) -> Point:
    """Search coordinates of coefficients made by ``space.coefficients`` (inverse map)."""
    coefficients.check_steps(space.steps, "search space")
    cx, ce = coefficients.c_x, coefficients.c_eps
    if space.kind == "start":
        return (cx[0], ce[0])
    if space.kind == "start_end":
        return (cx[0], cx[-1], ce[0], ce[-1])
    return tuple(cx) + tuple(ce)
