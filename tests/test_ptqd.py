import pytest
import torch

from qsched_pack.qsched import samplers
from qsched_pack.qsched.ptqd import PTQDCorrection, collect_pairs, fit_ptqd
from qsched_pack.qsched.schedules import few_step_sigmas

GAMMA = [0.12, -0.07, 0.05, 0.2]
DELTA = [[0.03, -0.02, 0.01, 0.05], [-0.04, 0.0, 0.02, 0.01], [0.1, -0.1, 0.0, 0.02], [0.0, 0.01, -0.03, 0.04]]


def planted(n_noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    fp, q = [], []
    for gam, d in zip(GAMMA, DELTA):
        f = torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64)
        noise = n_noise * torch.randn(f.shape, generator=g, dtype=torch.float64)
        fp.append(f)
        q.append((1 + gam) * f + torch.tensor(d, dtype=torch.float64).view(1, 4, 1, 1) + noise)
    return fp, q


def test_estimator_recovers_planted_values_exactly_without_noise():
    fp, q = planted()
    c = fit_ptqd(fp, q)
    assert c.gamma == pytest.approx(GAMMA, abs=1e-12)
    for got, want in zip(c.delta, DELTA):
        assert got == pytest.approx(want, abs=1e-12)
    for i in range(4):  # the correction inverts the planted error
        torch.testing.assert_close(c.correct(i, q[i]), fp[i], rtol=0, atol=1e-12)


def test_estimator_recovers_planted_values_under_noise():
    fp, q = planted(n_noise=0.05)
    c = fit_ptqd(fp, q)
    assert c.gamma == pytest.approx(GAMMA, abs=5e-3)
    assert c.residual_std == pytest.approx([0.05] * 4, rel=0.05)


def test_official_sign_convention_does_not_invert_the_error():
    """The official code fits error = eps_fp − eps_q = k·eps_fp + b and applies (eps_q − b)/(1 + k)."""
    fp, q = planted()
    f, e = fp[0].reshape(-1), (fp[0] - q[0]).reshape(-1)
    k = float(((f - f.mean()) * (e - e.mean())).sum() / ((f - f.mean()) ** 2).sum())
    b = e.view(8, 4, -1).mean(dim=(0, 2)).view(1, 4, 1, 1)  # channel bias of the error
    official = (q[0] - b) / (1 + k)
    ours = fit_ptqd(fp, q).correct(0, q[0])
    assert (official - fp[0]).abs().max() > 1e-2
    assert (ours - fp[0]).abs().max() < 1e-12


def test_scalar_delta_and_wrap_on_a_sampler():
    sigmas = few_step_sigmas("sdxl_turbo", 4)
    net = lambda x, s: 0.7 * torch.tanh(x)  # noqa: E731

    def model_fp(x, sigma, **_):
        s = sigma.view(-1, 1, 1, 1)
        return x - s * net(x / (1 + s**2).sqrt(), s)

    def model_q(x, sigma, **_):  # quantized-like: scaled and biased noise prediction
        s = sigma.view(-1, 1, 1, 1)
        return x - s * (1.1 * net(x / (1 + s**2).sqrt(), s) + 0.02)

    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) * float(sigmas[0])
    fp, q = collect_pairs(samplers.sample_euler, model_fp, model_q, x, sigmas)
    assert len(fp) == 4
    c = fit_ptqd(fp, q, per_channel=False)
    assert c.gamma == pytest.approx([0.1] * 4, abs=1e-10)
    assert all(d == pytest.approx([0.02], abs=1e-10) for d in c.delta)
    out_fp = samplers.sample_euler(model_fp, x, sigmas, disable=True)
    out_q = samplers.sample_euler(model_q, x, sigmas, disable=True)
    out_corr = samplers.sample_euler(c.wrap(model_q, sigmas), x, sigmas, disable=True)
    assert (out_q - out_fp).abs().max() > 1e-2
    torch.testing.assert_close(out_corr, out_fp, rtol=0, atol=1e-10)


def test_round_trip_and_validation(tmp_path):
    c = fit_ptqd(*planted())
    c.save(tmp_path / "p.json")
    assert PTQDCorrection.load(tmp_path / "p.json") == c
    with pytest.raises(ValueError, match=r"gamma\[0\] must be finite and > -1"):
        PTQDCorrection([-1.0], [[0.0]])
    with pytest.raises(ValueError, match="one entry per step"):
        PTQDCorrection([0.0, 0.0], [[0.0]])
    with pytest.raises(ValueError, match="eps_fp is constant"):
        fit_ptqd([torch.ones(2, 4, 2, 2)], [torch.ones(2, 4, 2, 2)])
    with pytest.raises(ValueError, match="differ in shape"):
        fit_ptqd([torch.ones(2, 4)], [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="has 4 steps but the schedule has 2"):
        c.wrap(lambda x, s: x, few_step_sigmas("tcd", 2))
    (tmp_path / "bad.json").write_text('{"format": "qsched-ptqd"}')
    with pytest.raises(ValueError, match="bad.json: PTQD file is malformed"):
        PTQDCorrection.load(tmp_path / "bad.json")
