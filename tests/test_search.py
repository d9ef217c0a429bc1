"""Search spaces and strategies: Algorithm 1's grid, identity handling, ties, the adaptive strategies, errors."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsched_pack.calibration.runner import calibrate
from qsched_pack.calibration.search import SearchSpace, point_of, run_strategy, select_best
from qsched_pack.calibration.testing import ImageStatScorer, SyntheticGenerator, synthetic_objective
from qsched_pack.qsched import Coefficients

PROMPTS = ["a red car", "a blue house", "a green tree"]


def gen_for(space, f, per_prompt=None):
    """SyntheticGenerator whose images encode f(point) (+ a per-prompt offset that does not move the argmax)."""
    offs = per_prompt or {}
    return SyntheticGenerator(lambda c, p, s: f(point_of(space, c)) + offs.get(p, 0.0), space.steps)


def recorder(f):
    seen = {}

    def ev(points):
        out = []
        for p in points:
            if p not in seen:
                seen[p] = f(p)
            out.append(seen[p])
        return out
    return ev, seen


def test_space_maps_points_to_official_ramps():
    sp = SearchSpace("start", 4)
    c = sp.coefficients((0.9, 1.1))
    assert c.c_x == pytest.approx([0.9, 0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0]) and c.c_x[-1] == 1.0
    assert c.c_eps == pytest.approx(list(np.linspace(1.1, 1.0, 4)))
    se = SearchSpace("start_end", 4).coefficients((1.012, 0.967, 0.955, 1.099))
    assert se == Coefficients.ramp(4, 1.012, 0.967, 0.955, 1.099)
    ps = SearchSpace("per_step", 3).coefficients((0.9, 1.0, 1.1, 1.2, 0.8, 1.05))
    assert ps.c_x == (0.9, 1.0, 1.1) and ps.c_eps == (1.2, 0.8, 1.05)
    for kind, steps in (("start", 4), ("start_end", 4), ("per_step", 3)):
        s = SearchSpace(kind, steps)
        p = tuple(0.8 + 0.05 * i for i in range(s.dim))
        assert point_of(s, s.coefficients(p)) == pytest.approx(p)
        assert s.coefficients(s.identity).is_identity


def test_axis_is_linspace_and_grid_point_one_is_exact_identity():
    sp = SearchSpace("start", 4)
    for n in (2, 5, 11, 50):
        assert sp.axis(n) == pytest.approx(list(np.linspace(0.8, 1.2, n)), abs=1e-12)
    assert 1.0 in sp.axis(5) and sp.coefficients((sp.axis(5)[2],) * 2).is_identity


def test_grid_returns_known_optimum_and_evaluates_exactly_algorithm_1_points():
    sp = SearchSpace("start", 4)
    f = lambda p: -((p[0] - 0.9) ** 2 + 2.0 * (p[1] - 1.1) ** 2)  # noqa: E731  optimum on the 5-grid
    gen = gen_for(sp, f, {PROMPTS[1]: 0.3, PROMPTS[2]: -0.1})
    r = calibrate(gen, ImageStatScorer(), PROMPTS, space=sp, strategy="grid", points=5)
    assert r.best_point == (0.9, 1.1)
    assert r.best == sp.coefficients((0.9, 1.1))
    # identity first, then product(axis, axis) with c_x outer / c_eps inner (identity is on this grid: not twice)
    expected = list(itertools.product(sp.axis(5), repeat=2))
    assert [p.point for p in r.points] == [(1.0, 1.0)] + [p for p in expected if p != (1.0, 1.0)]
    assert r.images_spent == 25 * len(PROMPTS) and r.stopped == "done"
    assert r.identity_score == pytest.approx(f((1.0, 1.0)) + 0.2 / 3)
    assert r.best_score == pytest.approx(f((0.9, 1.1)) + 0.2 / 3)


def test_grid_4d_start_end_has_n_to_the_4_points_plus_identity_off_grid():
    sp = SearchSpace("start_end", 3, 0.85, 1.25)  # axis 0.85, 1.05, 1.25: identity is not a grid point
    f = synthetic_objective("bowl", 4)
    ev, seen = recorder(f)
    assert run_strategy(sp, "grid", ev, 3) == "done"
    assert list(seen) == [(1.0,) * 4] + list(itertools.product((0.85, 1.05, 1.25), repeat=4))


def test_maximises_not_minimises():
    sp = SearchSpace("start", 2)
    r = calibrate(gen_for(sp, lambda p: p[0] + p[1]), ImageStatScorer(), PROMPTS[:1], space=sp, strategy="grid",
                  points=3)
    assert r.best_point == (1.2, 1.2)


@pytest.mark.parametrize("strategy", ["grid", "zoom", "pattern"])
def test_flat_objective_ties_go_to_identity(strategy):
    sp = SearchSpace("start", 4)
    r = calibrate(gen_for(sp, synthetic_objective("flat", 2)), ImageStatScorer(), PROMPTS, space=sp,
                  strategy=strategy, points=9)
    assert r.best.is_identity and r.best_point == (1.0, 1.0)
    assert r.points[0].point == (1.0, 1.0)


def test_ties_without_identity_go_to_nearest_identity_then_first():
    pts = [(0.5, 0.5), (1.25, 1.0), (0.75, 1.0), (1.0, 0.75)]
    assert select_best(pts, [1.0, 2.0, 2.0, 2.0], (1.0, 1.0)) == 1  # all three at distance 0.25: first evaluated
    assert select_best(pts, [1.0, 2.0, 2.0, 2.5], (1.0, 1.0)) == 3
    assert select_best([(1.2, 1.2), (1.0, 1.0)], [3.0, 3.0], (1.0, 1.0)) == 1


def test_identity_always_evaluated_even_outside_the_range():
    sp = SearchSpace("start", 4, 1.05, 1.2)
    r = calibrate(gen_for(sp, lambda p: -abs(p[0] - 1.0) - abs(p[1] - 1.0)), ImageStatScorer(), PROMPTS, space=sp,
                  strategy="grid", points=4)
    assert r.points[0].point == (1.0, 1.0) and len(r.points) == 17
    assert r.best.is_identity  # better than every grid point here


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.integers(0, 49), st.integers(0, 49)), st.floats(0.2, 5.0))
def test_zoom_finds_the_grid_optimum_of_2d_bowls_with_few_points(opt_idx, aniso):
    sp = SearchSpace("start", 4)
    axis = sp.axis(50)
    opt = (axis[opt_idx[0]] + 0.003, axis[opt_idx[1]] - 0.002)
    f = lambda p: -((p[0] - opt[0]) ** 2 + aniso * (p[1] - opt[1]) ** 2)  # noqa: E731
    ev, seen = recorder(f)
    run_strategy(sp, "zoom", ev, 50)
    grid_best = max(f(p) for p in sp.grid(50))
    assert max(seen.values()) == grid_best
    assert len(seen) <= 0.1 * 2500


@pytest.mark.parametrize("kind,steps,n", [("start", 4, 50), ("start_end", 4, 11)])
@pytest.mark.parametrize("name", ["bowl", "ridge", "multimodal"])
@pytest.mark.parametrize("strategy", ["zoom", "pattern"])
def test_adaptive_strategies_reach_grid_best_on_synthetic_objectives(kind, steps, n, name, strategy):
    sp = SearchSpace(kind, steps)
    f = synthetic_objective(name, sp.dim)
    ev, seen = recorder(f)
    run_strategy(sp, strategy, ev, n)
    grid_best = max(f(p) for p in sp.grid(n))
    assert max(seen.values()) >= grid_best - 0.005 * abs(grid_best)
    assert len(seen) <= 0.1 * n ** sp.dim
    assert all(all(v in sp.axis(n) or v == 1.0 for v in p) for p in seen)  # lattice points (or identity) only


def test_zoom_on_per_step_space_returns_valid_coefficients():
    sp = SearchSpace("per_step", 2)
    f = synthetic_objective("bowl", 4)
    r = calibrate(gen_for(sp, f), ImageStatScorer(), PROMPTS[:1], space=sp, strategy="zoom", points=9)
    assert r.best.steps == 2 and r.best_score >= r.identity_score
    assert r.best_score == pytest.approx(max(f(p) for p in sp.grid(9)))


@pytest.mark.parametrize("kwargs,field", [
    (dict(low=1.2, high=0.8), "must be smaller than range high"), (dict(low=1.0, high=1.0), "must be smaller than range high"),
    (dict(low=0.0, high=1.2), "range low"), (dict(low=-0.5, high=1.2), "range low"),
    (dict(low=0.8, high=math.inf), "range high"), (dict(low=0.8, high=100.0), "range high"),
    (dict(kind="diagonal"), "space must be one of start, start_end, per_step"),
    (dict(kind="start_end", steps=1), "needs steps >= 2"), (dict(steps=0), "steps must be an integer"),
])
def test_bad_space_is_a_clear_value_error(kwargs, field):
    args = dict(kind="start", steps=4, low=0.8, high=1.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        SearchSpace(**args)


def test_bad_calibrate_inputs_are_clear_value_errors():
    sp = SearchSpace("start", 4)
    gen = gen_for(sp, synthetic_objective("bowl", 2))
    with pytest.raises(ValueError, match="prompts is empty"):
        calibrate(gen, ImageStatScorer(), [], space=sp)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty string"):
        calibrate(gen, ImageStatScorer(), ["ok", "  "], space=sp)
    with pytest.raises(ValueError, match=r"budget too small: the grid evaluates 2501 points \(50\^2 grid \+ identity\) x 3 prompts = 7503 images, "
                                         r"budget is 1000"):
        calibrate(gen, ImageStatScorer(), PROMPTS, space=sp, strategy="grid", points=50, budget=1000)
    assert gen.calls == 0  # refused before any image was made
    with pytest.raises(ValueError, match="steps mismatch: .*steps=2 .*steps=4"):
        calibrate(gen, ImageStatScorer(), PROMPTS, space=SearchSpace("start", 2))
    with pytest.raises(ValueError, match="strategy must be one of pattern, zoom, grid"):
        calibrate(gen, ImageStatScorer(), PROMPTS, space=sp, strategy="cmaes")
    with pytest.raises(ValueError, match=r"points .* must be an integer in \[2, 10000\]"):
        calibrate(gen, ImageStatScorer(), PROMPTS, space=sp, points=1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['coarse'\] for strategy 'pattern'; allowed: step"):
        calibrate(gen, ImageStatScorer(), PROMPTS, space=sp, strategy="pattern", strategy_options={"coarse": 3})
    with pytest.raises(ValueError, match="neighbourhood must be one of full, pairs, axis"):
        calibrate(gen, ImageStatScorer(), PROMPTS, space=sp, strategy="zoom", strategy_options={"neighbourhood": 1})
    with pytest.raises(ValueError, match="budget .* must be an integer >= 1"):
        calibrate(gen, ImageStatScorer(), PROMPTS, space=sp, budget=0)
