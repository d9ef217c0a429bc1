"""Algorithm 1 on the tiny (quantized) SDXL-like pipeline: the grid evaluates exactly its points, each
generated with the coefficients Algorithm 1 defines, and the record/preset reflect it."""

import itertools

import numpy as np
import pytest

from qsched_pack.calibration.generate import DiffusersGenerator, load_pipeline
from qsched_pack.calibration.runner import calibrate
from qsched_pack.calibration.testing import ImageStatScorer
from qsched_pack.qsched import Coefficients

PROMPTS = ["a cat sitting on a red chair", "a dog in the snow"]


class Logged(DiffusersGenerator):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def generate(self, coefficients, prompts, seeds):
        self.seen.append((coefficients, tuple(prompts), tuple(seeds)))
        return super().generate(coefficients, prompts, seeds)


@pytest.mark.parametrize("kind", ["start", "start_end"])
def test_grid_on_tiny_pipeline_evaluates_exactly_algorithm_1(tmp_path, kind, tiny_pipelines):
    pipe = load_pipeline(tiny_pipelines["sdxl"])
    quant = "w4a8" if kind == "start" else None  # the simulated W4A8 kernels are slow on CPU: once is enough
    prompts = PROMPTS if kind == "start" else PROMPTS[:1]
    gen = Logged(pipe, steps=3, height=32, width=32, quant=quant, model_file=tiny_pipelines["sdxl"])
    n = 3 if kind == "start" else 2
    r = calibrate(gen, ImageStatScorer(), prompts, space=kind, strategy="grid", points=n, seed=42,
                  record=str(tmp_path / "rec.jsonl"), preset=str(tmp_path / "p.json"))
    axis = np.linspace(0.8, 1.2, n)
    if kind == "start":  # released code: ramps from the searched start to 1, outer c_x, inner c_eps
        expected = [Coefficients.ramp(3, s, 1.0, m, 1.0) for s, m in itertools.product(axis, axis)]
    else:  # paper Algorithm 1, lines 5-6: linspace(start, end, steps) for c_x and c_eps
        expected = [Coefficients.ramp(3, xs, xe, es, ee) for xs, xe, es, ee in itertools.product(axis, repeat=4)]
    got = [c for c, _, _ in gen.seen]
    assert got[0].is_identity  # identity first, always
    rest = [c for c in got[1:]]
    if kind == "start":  # 1.0 is on the 3-grid: identity is not generated twice
        expected = [c for c in expected if not c.is_identity]
    assert len(rest) == len(expected)
    for a, b in zip(rest, expected):
        assert a.c_x == pytest.approx(b.c_x, abs=1e-12) and a.c_eps == pytest.approx(b.c_eps, abs=1e-12)
    assert all(p == tuple(prompts) and s == (42, 43)[:len(prompts)] for _, p, s in gen.seen)  # common noise
    assert r.images_spent == len(got) * len(prompts)
    best = max(r.points, key=lambda p: p.score)
    assert r.best_score == best.score
    meta = Coefficients.load(tmp_path / "p.json").metadata
    assert meta["quant"] == quant and meta["family"] == "sdxl_turbo" and meta["sampler"] == "euler_ancestral"
    assert meta["steps"] == 3 and meta["images_spent"] == r.images_spent
