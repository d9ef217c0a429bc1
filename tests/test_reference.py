"""The reference objective (calibration/reference.py): exact math first (affine step, closed-form fit), then the
acceptance test and calibrate(objective=...)."""

import pytest
import torch

from qsched_pack.calibration import reference as R
from qsched_pack.calibration.testing import ToyTrajectoryGenerator
from qsched_pack.qsched import samplers
from qsched_pack.qsched.coefficients import Coefficients

# every sampler x parameterization the pack runs, stochastic ones included
SETUPS = [("euler", "eps", None), ("euler", "flow", None), ("euler_ancestral", "eps", None),
          ("euler_ancestral", "flow", 1.0), ("tcd", "eps", 0.3), ("tcd", "eps", 0.0), ("lcm", "eps", None),
          ("lcm", "flow", None)]
PROMPTS = [f"prompt {i}" for i in range(6)]
SEEDS = [100 + i for i in range(6)]


def known(steps):
    return Coefficients([0.93, 1.08, 0.97, 1.12][:steps], [1.06, 0.91, 1.04, 0.95][:steps])


@pytest.mark.parametrize("sampler,param,eta", SETUPS)
def test_step_is_affine_in_the_coefficients(sampler, param, eta):
    gen = ToyTrajectoryGenerator(sampler, param, distortion=0.2, eta=eta)
    fn = samplers.SAMPLERS[sampler]
    x = gen.start(SEEDS)
    sig = gen.sigmas
    for i in range(gen.steps):
        kw = gen.sampler_kwargs(SEEDS)
        if "noise_sampler" in kw:
            kw["noise_sampler"] = R.StepNoise(kw["noise_sampler"])
        d = gen.denoiser(PROMPTS)(x, sig[i] * x.new_ones(x.shape[0]))
        u, v, w = R.step_basis(fn, sig, i, x, d, kw)
        for a, b in ((0.9, 1.1), (1.2, 0.85), (1.0, 1.0)):
            direct = R.qsched_step(fn, sig, i, x, d, a, b, kw)
            torch.testing.assert_close(direct, u + a * v + b * w, rtol=1e-5, atol=1e-5)
        x = R.qsched_step(fn, sig, i, x, d, 1.0, 1.0, kw)


@pytest.mark.parametrize("sampler,param,eta", SETUPS)
def test_trajectory_is_the_stock_run(sampler, param, eta):
    gen = ToyTrajectoryGenerator(sampler, param, distortion=0.2, eta=eta, batch_size=4)
    c = known(4)
    traj = R.trajectory(gen, PROMPTS, SEEDS, coefficients=c)
    assert len(traj) == 5
    assert torch.equal(traj[0], gen.start(SEEDS))
    torch.testing.assert_close(traj[-1], gen.latents(c, PROMPTS, SEEDS), rtol=0, atol=1e-6)


class ScaledEps(ToyTrajectoryGenerator):
    """The FP toy with its noise prediction scaled by ``k[i]`` at step i (eps_q = k·eps_fp), plus ``noise``·a
    fixed high-frequency pattern of x (a prediction error the FP result does not share)."""

    def __init__(self, *a, k=(0.9, 1.1, 0.8, 1.2), noise=0.0, **kw):
        super().__init__(*a, **kw)
        self.k, self.noise = k, noise

    def denoiser(self, prompts):
        fp = super().denoiser(prompts)
        table = self.sigmas[:-1]

        def model(x, sigma, **_):
            i = int(torch.argmin((table - float(sigma.reshape(-1)[0])).abs()))
            d = fp(x, sigma)
            return x - self.k[i] * (x - d) + self.noise * torch.sin(23.0 * x + 5.0)
        return model


@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("sampler,param,eta", SETUPS)
def test_iv_fit_undoes_a_scaled_prediction_exactly(sampler, param, eta, mode):
    """eps_q = k·eps_fp: the instrumental fit matches the FP step from the same state, c_x = 1, c_eps = 1/k."""
    fp = ToyTrajectoryGenerator(sampler, param, eta=eta, batch_size=4)
    q = ScaledEps(sampler, param, eta=eta, batch_size=4)
    fit = R.fit_reference(q, fp, PROMPTS, SEEDS, mode=mode, match="iv", ridge=0.0)
    assert fit.coefficients.c_x == pytest.approx([1.0] * 4, abs=1e-4)
    assert fit.coefficients.c_eps == pytest.approx([1 / k for k in q.k], abs=1e-4)
    # FP run + quantized run (+ free-running: the FP model at the quantized states; teacher: the FP run's output)
    assert fit.images == (3 if mode == "free" else 2) * len(PROMPTS) == R.images_per_fit_prompt(mode) * len(PROMPTS)
    with pytest.raises(ValueError, match="needs the reference"):
        R.fit_to_trajectory(q, PROMPTS, SEEDS, R.trajectory(fp, PROMPTS, SEEDS), match="iv")


def test_iv_fit_is_not_attenuated_by_prediction_noise():
    """With an error the FP model does not share, least squares shrinks c_eps below 1/k; the instrumental fit
    stays near 1/k."""
    fp = ToyTrajectoryGenerator("euler", "eps", size=12)
    q = ScaledEps("euler", "eps", size=12, k=(0.8,) * 4, noise=0.4)
    ls = R.fit_reference(q, fp, PROMPTS, SEEDS, mode="teacher", match="state", ridge=0.0)
    iv = R.fit_reference(q, fp, PROMPTS, SEEDS, mode="teacher", match="iv", ridge=0.0)
    err_ls = max(abs(c - 1.25) for c in ls.coefficients.c_eps)
    err_iv = max(abs(c - 1.25) for c in iv.coefficients.c_eps)
    assert err_iv < 0.5 * err_ls, (ls.coefficients, iv.coefficients)


@pytest.mark.parametrize("match", [m for m in R.MATCHES if m != "iv"])
@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("sampler,param,eta", SETUPS)
def test_closed_form_fit_recovers_known_coefficients(sampler, param, eta, mode, match):
    """The target is the quantized model run with known per-step coefficients: the fit must find them exactly."""
    gen = ToyTrajectoryGenerator(sampler, param, distortion=0.2, eta=eta, batch_size=4)
    c = known(4)
    target = R.trajectory(gen, PROMPTS, SEEDS, coefficients=c)
    assert len(target.x0) == 4
    fit = R.fit_to_trajectory(gen, PROMPTS, SEEDS, target, mode=mode, ridge=0.0, match=match)
    assert fit.coefficients.c_x == pytest.approx(c.c_x, abs=2e-4)
    assert fit.coefficients.c_eps == pytest.approx(c.c_eps, abs=2e-4)
    assert all(r <= 1e-9 for r in fit.residual_fitted)
    assert all(ri > 1e-8 for ri in fit.residual_identity)  # identity does not already match: the test can fail


@pytest.mark.parametrize("sampler,param,eta", SETUPS[:3] + SETUPS[4:5])
def test_identity_when_fp_equals_quantized(sampler, param, eta):
    q = ToyTrajectoryGenerator(sampler, param, eta=eta)
    fit = R.fit_reference(q, q, PROMPTS, SEEDS)
    assert fit.coefficients.c_x == pytest.approx([1.0] * 4, abs=1e-6)
    assert fit.coefficients.c_eps == pytest.approx([1.0] * 4, abs=1e-6)
    res = R.calibrate_to_reference(q, q, PROMPTS[:3], SEEDS[:3], PROMPTS[3:], SEEDS[3:])
    assert not res.acceptance.accepted and res.coefficients.is_identity
    assert "already matches" in res.acceptance.text


def test_fit_brings_a_distorted_model_closer_on_heldout_images():
    fp = ToyTrajectoryGenerator("euler", "eps")
    q = ToyTrajectoryGenerator("euler", "eps", distortion=0.15)
    held_p, held_s = [f"held {i}" for i in range(8)], [900 + i for i in range(8)]
    res = R.calibrate_to_reference(q, fp, PROMPTS, SEEDS, held_p, held_s)
    assert res.acceptance.accepted, res.acceptance.text
    assert res.acceptance.distance_fitted < 0.8 * res.acceptance.distance_identity
    assert "kept" in res.acceptance.text and res.images == R.images_per_fit_prompt() * 6 + 3 * 8
    assert not res.coefficients.is_identity


def test_free_running_fit_beats_teacher_forcing_on_its_own_objective():
    """Free-running minimises each step's error from the state the corrected run is really in."""
    fp = ToyTrajectoryGenerator("euler", "flow")
    q = ToyTrajectoryGenerator("euler", "flow", distortion=0.3)
    held_p, held_s = [f"held {i}" for i in range(8)], [900 + i for i in range(8)]
    ref = fp.generate(None, held_p, held_s)
    dist = {}
    for mode in R.MODES:
        fit = R.fit_reference(q, fp, PROMPTS, SEEDS, mode=mode, match="state")
        dist[mode] = float(R.paired_distance(q.generate(fit.coefficients, held_p, held_s), ref).mean())
    naive = float(R.paired_distance(q.generate(None, held_p, held_s), ref).mean())
    assert dist["free"] < naive and dist["teacher"] < naive
    assert dist["free"] <= dist["teacher"] * 1.001


def test_solve_step_is_the_least_squares_optimum_in_the_box():
    torch.manual_seed(0)
    v, w = torch.randn(200), torch.randn(200)
    for a0, b0 in ((1.1, 0.9), (2.0, 0.8), (0.2, 1.9), (3.0, 3.0)):
        g = R.StepGram()
        g.add(torch.zeros(200), v, w, a0 * v + b0 * w + 0.01 * torch.randn(200))
        a, b = R.solve_step(g, ridge=0.0, box=(0.5, 1.5))
        grid = [(0.5 + i / 100, 0.5 + j / 100) for i in range(101) for j in range(101)]
        best = min(grid, key=lambda c: g.loss(*c))
        assert g.loss(a, b) <= g.loss(*best) + 1e-12
        assert 0.5 <= a <= 1.5 and 0.5 <= b <= 1.5


def test_ridge_pulls_toward_identity():
    v, w = torch.randn(50), torch.randn(50)
    g = R.StepGram()
    g.add(torch.zeros(50), v, w, 1.3 * v + 0.7 * w)
    a0, b0 = R.solve_step(g, ridge=0.0)
    a1, b1 = R.solve_step(g, ridge=10.0)
    assert (a0, b0) == pytest.approx((1.3, 0.7), abs=1e-6)
    assert abs(a1 - 1) < abs(a0 - 1) and abs(b1 - 1) < abs(b0 - 1)


def test_acceptance_test_decisions():
    di = torch.tensor([1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 0.8, 1.05])
    ok = R.acceptance_test(di, di * 0.7)
    assert ok.accepted and ok.drop == pytest.approx(0.3) and ok.p_value == pytest.approx(1 / 256)
    worse = R.acceptance_test(di, di * 1.1)
    assert not worse.accepted and "further" in worse.text
    mixed = R.acceptance_test(di, di * torch.tensor([0.5, 1.6, 0.7, 1.3, 0.9, 1.2, 0.95, 1.1]))
    assert not mixed.accepted and "identity kept" in mixed.text
    few = R.acceptance_test(di[:3], di[:3] * 0.5)
    assert not few.accepted and "can never show it" in few.text
    assert R.sign_flip_p(torch.ones(20)) == pytest.approx(2 ** -20, abs=2e-4)


def test_paired_distance_pairs_by_position():
    ref = torch.rand(3, 4, 4, 3)
    imgs = torch.cat([ref, ref + 0.1])
    d = R.paired_distance(imgs, ref)
    assert d[:3].abs().max() == 0 and d[3:] == pytest.approx([0.01] * 3)
    with pytest.raises(ValueError, match="do not pair"):
        R.paired_distance(torch.rand(4, 4, 4, 3), ref)


def test_mismatched_reference_is_refused_naming_it():
    q = ToyTrajectoryGenerator("euler", "eps", distortion=0.1)
    with pytest.raises(ValueError, match="reference model: its steps"):
        R.fit_reference(q, ToyTrajectoryGenerator("euler", "eps", steps=2), PROMPTS, SEEDS)
    with pytest.raises(ValueError, match="reference model: its sampler"):
        R.fit_reference(q, ToyTrajectoryGenerator("lcm", "eps"), PROMPTS, SEEDS)
    with pytest.raises(ValueError, match="latent shape"):
        R.fit_reference(q, ToyTrajectoryGenerator("euler", "eps", size=8), PROMPTS, SEEDS)
    with pytest.raises(ValueError, match="disjoint"):
        R.calibrate_to_reference(q, q, PROMPTS, SEEDS, PROMPTS[:2], [1, 2])



# ---------------------------------------------------------------------------------------------------------
# calibrate(objective=...)

HELD = ([f"held {i}" for i in range(8)], [900 + i for i in range(8)])


def test_calibrate_reference_objective_needs_no_scorer(tmp_path):
    from qsched_pack.calibration.runner import calibrate

    fp = ToyTrajectoryGenerator("euler_ancestral", "eps", name="fp")
    q = ToyTrajectoryGenerator("euler_ancestral", "eps", distortion=0.15, name="q")
    preset = tmp_path / "preset.json"
    res = calibrate(q, None, PROMPTS, objective="reference", reference=fp, heldout_prompts=HELD[0],
                    heldout_seeds=HELD[1], preset=str(preset))
    assert res.objective == "reference" and res.accepted and "kept" in res.acceptance
    assert res.images_spent == R.images_per_fit_prompt() * 6 + 3 * 8
    assert res.heldout["distance_fitted"] < res.heldout["distance_identity"]
    loaded = Coefficients.load(str(preset))
    assert loaded.c_x == res.best.c_x and not loaded.is_identity
    meta = loaded.metadata
    assert meta["objective"] == "reference" and meta["reference"]["name"] == "fp" and meta["accepted"]
    assert meta["model"]["name"] == "q" and "kept" in meta["acceptance"]
    assert "reference" in res.summary()


def test_calibrate_reference_returns_identity_when_nothing_to_gain():
    from qsched_pack.calibration.runner import calibrate

    q = ToyTrajectoryGenerator("euler", "flow")
    res = calibrate(q, None, PROMPTS + HELD[0], objective="reference", reference=q)
    assert not res.accepted and res.best.is_identity and "identity kept" in res.acceptance
    assert res.heldout["pairs"] == 7  # default split: 14 prompts, the second half tests


def test_calibrate_objective_errors_name_what_is_missing():
    from qsched_pack.calibration.runner import calibrate

    q = ToyTrajectoryGenerator("euler", "eps")
    with pytest.raises(ValueError, match="needs the full-precision model"):
        calibrate(q, None, PROMPTS, objective="reference")
    with pytest.raises(ValueError, match="objective must be one of"):
        calibrate(q, None, PROMPTS, objective="fp", reference=q)
    with pytest.raises(ValueError, match="needs a JAQ scorer"):
        calibrate(q, None, PROMPTS, objective="hybrid", reference=q)
    with pytest.raises(ValueError, match="needs a scorer"):
        calibrate(q, None, PROMPTS)


def test_calibrate_hybrid_searches_around_the_fit(tmp_path):
    from qsched_pack.calibration.runner import calibrate
    from qsched_pack.calibration.testing import ImageStatScorer

    fp = ToyTrajectoryGenerator("euler", "eps", name="fp")
    q = ToyTrajectoryGenerator("euler", "eps", distortion=0.15, name="q")
    base = calibrate(q, None, PROMPTS, objective="reference", reference=fp, heldout_prompts=HELD[0],
                     heldout_seeds=HELD[1])
    res = calibrate(q, ImageStatScorer(), PROMPTS, objective="hybrid", reference=fp, heldout_prompts=HELD[0],
                    heldout_seeds=HELD[1], strategy="pattern", points=11, record=str(tmp_path / "r.jsonl"))
    assert res.objective == "hybrid" and res.accepted
    h = res.heldout["hybrid"]
    # the JAQ stand-in (mean + 2·contrast) rewards moving away from FP: JAQ rises on the held-out images, but the
    # distance check sees the move and keeps the reference fit
    assert h["jaq_gain"] > 0 and h["distance_growth"] > 0.05 and not h["accepted"]
    assert "Hybrid refused (the distance to full precision grew" in res.acceptance
    assert res.best.c_x == base.best.c_x and res.best.c_eps == base.best.c_eps
    assert res.images_spent == base.images_spent + len(res.points) * 6 + 8
    header = (tmp_path / "r.jsonl").read_text().splitlines()[0]
    assert '"reference"' in header and '"around"' in header  # the record fingerprints the reference and base


def test_search_on_the_final_distance_finds_a_closer_point():
    from qsched_pack.calibration.runner import calibrate

    fp = ToyTrajectoryGenerator("euler", "eps")
    q = ToyTrajectoryGenerator("euler", "eps", distortion=0.15)
    scorer = R.DistanceScorer(fp.generate(None, PROMPTS, SEEDS))
    res = calibrate(q, scorer, PROMPTS, seeds=SEEDS, strategy="pattern", points=21)
    assert res.best_score > res.identity_score and not res.best.is_identity
    assert scorer.score(fp.generate(None, PROMPTS, SEEDS), PROMPTS).abs().max() == 0


def test_an_identity_fit_skips_the_test_and_its_preset_loads(tmp_path, monkeypatch):
    from qsched_pack.calibration.runner import calibrate

    q = ToyTrajectoryGenerator("euler", "eps", distortion=0.1)
    ident = R.ReferenceFit(Coefficients.identity(4), "free", images=12)
    monkeypatch.setattr(R, "fit_reference", lambda *a, **k: ident)
    res = calibrate(q, None, PROMPTS, objective="reference", reference=ToyTrajectoryGenerator("euler", "eps"),
                    preset=str(tmp_path / "p.json"))
    assert not res.accepted and "nothing to correct" in res.acceptance and res.images_spent == 12
    assert Coefficients.load(str(tmp_path / "p.json")).is_identity
