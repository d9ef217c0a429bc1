"""The library pieces the toy world measures with: the acceptance guard (calibration.guard) and the Fréchet
distance (calibration.metrics.frechet)."""

import pytest
import torch

from qsched_pack.calibration.metrics.frechet import frechet_distance
from qsched_pack.qsched import Coefficients


# ------------------------------------------------------------------------------------------------ Fréchet distance
def test_frechet_distance_is_zero_for_identical_sets_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) < 1e-8
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # mean shift only
    b = torch.randn(500, 8, generator=g, dtype=torch.float64) * 2.0  # cov 4I vs ~I: tr = 8·(1 + 4 − 2·2) = 8
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.25)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :4])


# ------------------------------------------------------------------------------------------------ guard
def _synthetic_result(fn, points=5):
    from qsched_pack.calibration.runner import calibrate
    from qsched_pack.calibration.testing import ImageStatScorer, SyntheticGenerator

    gen = SyntheticGenerator(fn, steps=2, name="guard")
    return calibrate(gen, ImageStatScorer(k=0.0), [f"p{i}" for i in range(20)], space="start", strategy="grid",
                     points=points, seed=0)


def _scores(result, point):
    return next(list(p.per_prompt) for p in result.points if tuple(p.point) == tuple(point))


def test_guard_accepts_a_consistent_gain_and_rejects_noise_and_identity():
    from qsched_pack.calibration.guard import acceptance

    clear = _synthetic_result(lambda c, p, s: -(c.c_x[0] - 1.1) ** 2 + 0.01 * (s % 3))
    acc = acceptance(clear)
    assert clear.best_point == (1.1, 1.0) and acc.accept and acc.reasons == []
    assert acc.gain == pytest.approx(0.01) and acc.gain_se == pytest.approx(0.0, abs=1e-12)
    assert acc.choice(clear) == clear.best

    # the best point wins on the mean, but its gain is a few prompts' luck: within 2 SE of the spread
    noisy = _synthetic_result(lambda c, p, s: (c.c_x[0] - 1.0) * (1.0 if s < 11 else -1.0))
    acc = acceptance(noisy)
    assert noisy.best_point[0] == 1.2 and noisy.improvement > 0
    assert not acc.accept and acc.reasons == ["JAQ gain within 2 SE of the seed-to-seed spread"]
    assert acc.choice(noisy) == Coefficients.identity(2)
    assert acceptance(noisy, z=0.1).accept  # a looser threshold lets it through

    flat = _synthetic_result(lambda c, p, s: 1.0)
    assert acceptance(flat).reasons == ["best is identity"]


def test_guard_with_the_fp_model_rejects_nothing_to_recover_and_overshoot():
    from qsched_pack.calibration.guard import acceptance

    res = _synthetic_result(lambda c, p, s: -(c.c_x[0] - 1.1) ** 2 + 0.01 * (s % 3))
    ident = _scores(res, (1.0, 1.0))
    jitter = [1e-4 * ((i * 7) % 5 - 2) for i in range(20)]  # a small, nonzero spread

    none_lost = acceptance(res, [v + j for v, j in zip(ident, jitter)])
    assert not none_lost.accept and none_lost.loss == pytest.approx(0.0, abs=1e-4)
    assert none_lost.reasons == ["nothing to recover: the quantized model is within noise of FP on JAQ",
                                 "overshoot: best scores above the FP model (the scorers are being gamed)"]

    # FP32 was 0.005 above identity, the best is 0.01 above identity: it overshoots the FP model
    over = acceptance(res, [v + 0.005 + j for v, j in zip(ident, jitter)])
    assert over.loss == pytest.approx(0.005, abs=1e-4) and over.overshoot == pytest.approx(0.005, abs=1e-4)
    assert over.reasons == ["overshoot: best scores above the FP model (the scorers are being gamed)"]

    # FP32 0.02 above identity: a real loss, half of it recovered -> accepted
    ok = acceptance(res, [v + 0.02 + j for v, j in zip(ident, jitter)])
    assert ok.accept and ok.overshoot == pytest.approx(-0.01, abs=1e-4)
    assert "accept" in ok.line() and "loss vs FP +0.020" in ok.line()

    with pytest.raises(ValueError, match="fp_scores has 3 values for 20"):
        acceptance(res, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="z must be"):
        acceptance(res, z=-1)
