"""Sampler parity: c = 1 vs the diffusers schedulers, c != 1 vs independent loops written from the paper's
Eq. (4) / the official update rules, and vs QSchedScheduler around the diffusers scheduler (float64)."""

import math

import pytest
import torch
from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchLCMScheduler, LCMScheduler, TCDScheduler)

from qsched_pack.qsched import Coefficients, samplers
from qsched_pack.qsched.diffusers import QSchedScheduler
from qsched_pack.qsched.schedules import alphas_cumprod_scaled_linear, few_step_sigmas, flow_sigmas

SHAPE = (2, 4, 8, 8)
SEED = 1234
AC = alphas_cumprod_scaled_linear()
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
RAMP = {2: Coefficients.ramp(2, 1.05, 0.97, 0.93, 1.08),
        4: Coefficients.ramp(4, 1.012, 0.967, 0.955, 1.099),
        8: Coefficients([0.98, 1.02, 1.01, 0.99, 1.03, 0.97, 1.0, 1.04], [1.05, 0.96, 1.02, 1.0, 0.97, 1.03, 1.01, 0.95])}


def toy_net(x_in, t):
    """Deterministic, nonlinear stand-in for a noise / velocity network: f(x_in, t)."""
    t = float(t) / 1000.0
    return 0.8 * torch.tanh(1.3 * x_in + t) + 0.15 * x_in.roll(1, dims=-1) - 0.3 * t * x_in.flip(-2)


def eps_denoiser(x, sigma, **_):
    """k-diffusion EPS denoiser around toy_net: input x/sqrt(1+sigma^2), timestep t(sigma)."""
    s = float(sigma[0])
    t = int(torch.argmin(((1 - AC) / AC).sqrt().sub(s).abs()))
    return x - s * toy_net(x / math.sqrt(1 + s * s), t)


def flow_denoiser(x, sigma, **_):
    s = float(sigma[0])
    return x - s * toy_net(x, s * 1000.0)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def noise_list(n, dtype=torch.float64):
    g = torch.Generator().manual_seed(SEED)
    return [torch.randn(SHAPE, generator=g, dtype=dtype).double() for _ in range(n)]


def replay(noises):
    it = iter(noises)
    return lambda sigma, sigma_next: next(it)


def run_diffusers(sched, x, steps, coefficients=None, noise_dtype=torch.float64, set_kw=None, **step_kw):
    if coefficients is not None:
        sched = QSchedScheduler(sched, coefficients)
    sched.set_timesteps(steps, **(set_kw or {}))
    g = torch.Generator().manual_seed(SEED)
    flow = isinstance(sched.base_scheduler if coefficients is not None else sched,
                      (FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler))
    for t in sched.timesteps:
        out = toy_net(x if flow else sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=g, return_dict=False, **step_kw)[0]
    return x


def init_noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def eps_vp_reference(x_vp, steps, timesteps, coeff, rule, noises):
    """Independent loop in VP space written from the paper / official schedulers (alpha = sqrt(ab))."""
    c_x, c_eps = coeff.c_x, coeff.c_eps
    it = iter(noises)
    for i, t in enumerate(timesteps):
        eps = toy_net(x_vp, t)
        a_t, s_t = math.sqrt(AC[t]), math.sqrt(1 - AC[t])
        last = i == steps - 1
        x_vp = rule(x_vp, eps, c_x[i], c_eps[i], t, timesteps[i + 1] if not last else None, a_t, s_t, it)
    return x_vp


# ---------------------------------------------------------------------------------------------- TCD
def tcd_rule(gamma):
    def rule(x, eps, cx, ce, t, t_next, a_t, s_t, noises):
        s = 0 if t_next is None else t_next
        sp = math.floor((1 - gamma) * s)
        a_s, a_sp, s_sp = math.sqrt(AC[s]), math.sqrt(AC[sp]), math.sqrt(1 - AC[sp])
        # Paper Eq. (4)
        inner = a_sp * (cx * x - s_t * ce * eps) / a_t + s_sp * ce * eps
        if gamma > 0 and t_next is not None:
            return (a_s / a_sp) * inner + math.sqrt(1 - a_s**2 / a_sp**2) * next(noises)
        return inner
    return rule


@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_identity_matches_diffusers(steps, gamma):
    x_vp = init_noise()
    ref = run_diffusers(TCDScheduler(**SD_BETAS), x_vp, steps, eta=gamma)
    sigmas = few_step_sigmas("tcd", steps)
    ours = samplers.sample_tcd(eps_denoiser, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True, eta=gamma,
                               noise_sampler=replay(noise_list(steps)))
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_tcd_coefficients_match_eq4_and_wrapper(steps, gamma):
    c = RAMP[steps]
    x_vp = init_noise()
    sigmas = few_step_sigmas("tcd", steps)
    ours = samplers.sample_tcd(eps_denoiser, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True, eta=gamma,
                               coefficients=c, noise_sampler=replay(noise_list(steps)))
    sched = TCDScheduler(**SD_BETAS)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    ref = eps_vp_reference(x_vp, steps, ts, c, tcd_rule(gamma), noise_list(steps))
    wrapped = run_diffusers(TCDScheduler(**SD_BETAS), x_vp, steps, coefficients=c, eta=gamma)
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(wrapped, ref) <= 1e-5
    identity = samplers.sample_tcd(eps_denoiser, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True,
                                   eta=gamma, noise_sampler=replay(noise_list(steps)))
    assert rel_err(ours, identity) > 1e-3  # the coefficients do something


# ---------------------------------------------------------------------------------------------- LCM
def lcm_rule(x, eps, cx, ce, t, t_next, a_t, s_t, noises):
    # Q-Sched LCM (method.md §1b, by analogy with the official patches)
    ts = t * 10.0
    c_skip, c_out = 0.25 / (ts**2 + 0.25), ts / math.sqrt(ts**2 + 0.25)
    x0 = (cx * x - s_t * ce * eps) / a_t
    denoised = c_out * x0 + c_skip * cx * x
    if t_next is None:
        return denoised
    return math.sqrt(AC[t_next]) * denoised + math.sqrt(1 - AC[t_next]) * next(noises)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_identity_matches_diffusers(steps):
    x_vp = init_noise()
    ref = run_diffusers(LCMScheduler(**SD_BETAS), x_vp, steps)
    sigmas = few_step_sigmas("lcm", steps)
    ours = samplers.sample_lcm(eps_denoiser, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True,
                               noise_sampler=replay(noise_list(steps)))
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_lcm_coefficients_match_reference_and_wrapper(steps):
    c = RAMP[steps]
    x_vp = init_noise()
    sigmas = few_step_sigmas("lcm", steps)
    ours = samplers.sample_lcm(eps_denoiser, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True,
                               coefficients=c, noise_sampler=replay(noise_list(steps)))
    sched = LCMScheduler(**SD_BETAS)
    sched.set_timesteps(steps)
    ref = eps_vp_reference(x_vp, steps, [int(t) for t in sched.timesteps], c, lcm_rule, noise_list(steps))
    wrapped = run_diffusers(LCMScheduler(**SD_BETAS), x_vp, steps, coefficients=c)
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(wrapped, ref) <= 1e-5


@pytest.mark.parametrize("steps", [2, 4])
def test_flow_lcm_matches_diffusers_and_reference(steps):
    x = init_noise()
    sigmas = flow_sigmas(steps)
    noises = noise_list(steps)
    set_kw = {"sigmas": sigmas[:-1].tolist()}
    ref = run_diffusers(FlowMatchLCMScheduler(shift=1.0), x, steps, set_kw=set_kw)
    ours = samplers.sample_lcm(flow_denoiser, x, sigmas, disable=True, parameterization="flow",
                               noise_sampler=replay(noises))
    assert rel_err(ours, ref) <= 1e-5
    c = RAMP[steps]
    ours_c = samplers.sample_lcm(flow_denoiser, x, sigmas, disable=True, parameterization="flow", coefficients=c,
                                 noise_sampler=replay(noises))
    wrapped = run_diffusers(FlowMatchLCMScheduler(shift=1.0), x, steps, coefficients=c, set_kw=set_kw)
    y, it = x.clone(), iter(noises)
    for i in range(steps):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        v = toy_net(y, s * 1000)
        x0 = c.c_x[i] * y - s * c.c_eps[i] * v
        y = sn * next(it) + (1 - sn) * x0 if sn > 0 else x0
    assert rel_err(ours_c, y) <= 1e-5
    assert rel_err(wrapped, y) <= 1e-5


# ---------------------------------------------------------------------------------------------- Euler-ancestral
def ea_scheduler():
    return EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing", steps_offset=1)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_euler_ancestral_identity_matches_diffusers(steps):
    sigmas = few_step_sigmas("sdxl_turbo", steps)
    x = init_noise() * float(sigmas[0])  # diffusers' init_noise_sigma for trailing spacing
    ref = run_diffusers(ea_scheduler(), x, steps)
    ours = samplers.sample_euler_ancestral(eps_denoiser, x, sigmas, disable=True,
                                           noise_sampler=replay(noise_list(steps)))
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_euler_ancestral_coefficients_match_official_rule_and_wrapper(steps):
    c = RAMP[steps]
    sigmas = few_step_sigmas("sdxl_turbo", steps)
    x = init_noise() * float(sigmas[0])
    ours = samplers.sample_euler_ancestral(eps_denoiser, x, sigmas, disable=True, coefficients=c,
                                           noise_sampler=replay(noise_list(steps)))
    wrapped = run_diffusers(ea_scheduler(), x, steps, coefficients=c)
    # Official rule (method.md §1c): x_{i+1} = c_x·x + (sigma_down − sigma_i)·c_eps·eps + sigma_up·z
    y, it = x.clone(), iter(noise_list(steps))
    for i in range(steps):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        t = int(torch.argmin(((1 - AC) / AC).sqrt().sub(s).abs()))
        eps = toy_net(y / math.sqrt(1 + s * s), t)
        up = math.sqrt(sn**2 * (s**2 - sn**2) / s**2)
        down = math.sqrt(sn**2 - up**2)
        y = c.c_x[i] * y + (down - s) * c.c_eps[i] * eps + (up * next(it) if sn > 0 else 0.0)
    assert rel_err(ours, y) <= 1e-5
    assert rel_err(wrapped, y) <= 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_euler_ancestral_rf_matches_reference(eta):
    steps, c = 4, RAMP[4]
    sigmas = flow_sigmas(steps)
    x = init_noise()
    for coeff in (None, c):
        ours = samplers.sample_euler_ancestral(flow_denoiser, x, sigmas, disable=True, parameterization="flow",
                                               eta=eta, coefficients=coeff, noise_sampler=replay(noise_list(steps)))
        cc = coeff or Coefficients.identity(steps)
        y, it = x.clone(), iter(noise_list(steps))
        for i in range(steps):
            s, sn = float(sigmas[i]), float(sigmas[i + 1])
            v = toy_net(y, s * 1000)
            xc, x0 = cc.c_x[i] * y, cc.c_x[i] * y - s * cc.c_eps[i] * v
            if sn == 0:
                y = x0
                continue
            # rectified flow: x_t = (1 - t) x0 + t n; deterministic step to sigma_down, re-noise to sigma_next
            sd = sn * (1 + (sn / s - 1) * eta)
            n_hat = (xc - (1 - s) * x0) / s
            y = (1 - sd) * x0 + sd * n_hat
            if eta > 0:
                y = (1 - sn) / (1 - sd) * y + math.sqrt(sn**2 - sd**2 * (1 - sn) ** 2 / (1 - sd) ** 2) * next(it)
        assert rel_err(ours, y) <= 1e-5
    # eta = 0 is flow Euler
    if eta == 0.0:
        euler = samplers.sample_euler(flow_denoiser, x, sigmas, disable=True, parameterization="flow", coefficients=c)
        ea = samplers.sample_euler_ancestral(flow_denoiser, x, sigmas, disable=True, parameterization="flow", eta=0.0,
                                             coefficients=c)
        assert rel_err(ea, euler) <= 1e-12


# ---------------------------------------------------------------------------------------------- Euler
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_flow_euler_identity_matches_diffusers(steps):
    x = init_noise()
    sigmas = flow_sigmas(steps)
    set_kw = {"sigmas": sigmas[:-1].tolist()}
    ref = run_diffusers(FlowMatchEulerDiscreteScheduler(shift=1.0), x, steps, set_kw=set_kw)
    ours = samplers.sample_euler(flow_denoiser, x, sigmas, disable=True, parameterization="flow")
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_flow_euler_coefficients_match_official_rule_and_wrapper(steps):
    c = RAMP[steps]
    x = init_noise()
    sigmas = flow_sigmas(steps)
    ours = samplers.sample_euler(flow_denoiser, x, sigmas, disable=True, parameterization="flow", coefficients=c)
    wrapped = run_diffusers(FlowMatchEulerDiscreteScheduler(shift=1.0), x, steps, coefficients=c,
                            set_kw={"sigmas": sigmas[:-1].tolist()})
    y = x.clone()
    for i in range(steps):  # official flow patch: x_{i+1} = c_x·x + (sigma_{i+1} − sigma_i)·c_eps·v
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        y = c.c_x[i] * y + (sn - s) * c.c_eps[i] * toy_net(y, s * 1000)
    assert rel_err(ours, y) <= 1e-5
    assert rel_err(wrapped, y) <= 1e-5


@pytest.mark.parametrize("steps", [2, 4])
def test_eps_euler_matches_diffusers(steps):
    sigmas = few_step_sigmas("sdxl_turbo", steps)
    x = init_noise() * float(sigmas[0])
    sched = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing", steps_offset=1)
    for c in (None, RAMP[steps]):
        ref = run_diffusers(EulerDiscreteScheduler.from_config(sched.config), x, steps, coefficients=c)
        ours = samplers.sample_euler(eps_denoiser, x, sigmas, disable=True, coefficients=c)
        assert rel_err(ours, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------- contract
ALL = [("euler", {}), ("euler_ancestral", {}), ("tcd", {"eta": 0.3}), ("lcm", {})]


@pytest.mark.parametrize("name,kw", ALL)
def test_identity_coefficients_are_bit_exact_with_no_coefficients(name, kw):
    fn = samplers.SAMPLERS[name]
    sigmas = few_step_sigmas("tcd", 4)
    x = init_noise() * float(sigmas[0])
    a = fn(eps_denoiser, x, sigmas, {"seed": 3}, disable=True, **kw)
    b = fn(eps_denoiser, x, sigmas, {"seed": 3}, disable=True, coefficients=Coefficients.identity(4), **kw)
    assert torch.equal(a, b)


# The stock k-diffusion loops (ComfyUI comfy/k_diffusion/sampling.py sample_euler / sample_euler_ancestral), written
# from their equations: the promise is that c = 1 reproduces *these* bit-for-bit, not merely our own c = 1 path.
def stock_euler(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def stock_euler_ancestral(model, x, sigmas, seed):
    noise = samplers.default_noise_sampler(x, seed=seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_up = min(sigmas[i + 1], (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2) ** 0.5)
        sigma_down = (sigmas[i + 1] ** 2 - sigma_up ** 2) ** 0.5
        if sigma_down == 0:
            x = denoised
            continue
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_identity_coefficients_are_bit_exact_with_the_stock_sampler(dtype):
    sigmas = few_step_sigmas("tcd", 4).to(dtype)
    x = (init_noise() * float(sigmas[0])).to(dtype)
    ident = Coefficients.identity(4)
    for model in (eps_denoiser, flow_denoiser):
        m = (lambda x_, s_, **kw: model(x_.double(), s_.double(), **kw).to(dtype))
        assert torch.equal(samplers.sample_euler(m, x, sigmas, disable=True, coefficients=ident),
                           stock_euler(m, x, sigmas))
    m = (lambda x_, s_, **kw: eps_denoiser(x_.double(), s_.double(), **kw).to(dtype))
    assert torch.equal(samplers.sample_euler_ancestral(m, x, sigmas, {"seed": 5}, disable=True, coefficients=ident),
                       stock_euler_ancestral(m, x, sigmas, 5))


@pytest.mark.parametrize("name,kw", ALL)
def test_same_seed_same_output_different_seed_different(name, kw):
    fn = samplers.SAMPLERS[name]
    sigmas = few_step_sigmas("tcd", 4)
    x = init_noise() * float(sigmas[0])
    c = RAMP[4]
    a = fn(eps_denoiser, x, sigmas, {"seed": 11}, disable=True, coefficients=c, **kw)
    b = fn(eps_denoiser, x, sigmas, {"seed": 11}, disable=True, coefficients=c, **kw)
    assert torch.equal(a, b)
    if name != "euler":  # the stochastic samplers use the seed
        d = fn(eps_denoiser, x, sigmas, {"seed": 12}, disable=True, coefficients=c, **kw)
        assert not torch.equal(a, d)


@pytest.mark.parametrize("name,kw", ALL + [("lcm", {"boundary_condition": False})])
def test_callback_sees_every_step_with_preconditioned_denoised(name, kw):
    fn = samplers.SAMPLERS[name]
    sigmas = few_step_sigmas("tcd", 4)
    x = init_noise() * float(sigmas[0])
    c = Coefficients([0.9, 1.0, 1.0, 1.0], [1.1, 1.0, 1.0, 1.0])
    seen = []
    fn(eps_denoiser, x, sigmas, {"seed": 1}, callback=seen.append, disable=True, coefficients=c, **kw)
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    raw = eps_denoiser(x, sigmas[0] * x.new_ones(x.shape[0]))
    expected = 0.9 * x - 1.1 * (x - raw)  # c_x·x − c_eps·(x − denoised)
    if name == "lcm" and kw.get("boundary_condition", True):
        # LCM's boundary condition on the preconditioned sample (diffusers LCMScheduler.step, timestep_scaling 10):
        # c_out(t)·x0' + c_skip(t)·c_x·x_vp, with x_vp = x / sqrt(1 + sigma²) and t the timestep of sigma.
        ac = alphas_cumprod_scaled_linear()
        t = 10.0 * float(torch.argmin((((1 - ac) / ac).sqrt() - float(sigmas[0])).abs()))
        c_skip, c_out = 0.25 / (t * t + 0.25), t / math.sqrt(t * t + 0.25)
        expected = c_out * expected + c_skip * 0.9 * x / math.sqrt(1.0 + float(sigmas[0]) ** 2)
    assert torch.allclose(seen[0]["denoised"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_bad_inputs_raise_value_errors_naming_the_field(name):
    fn = samplers.SAMPLERS[name]
    sigmas = few_step_sigmas("tcd", 4)
    x = init_noise()
    with pytest.raises(ValueError, match="coefficients have 2 steps.*runs 4 steps"):
        fn(eps_denoiser, x, sigmas, disable=True, coefficients=Coefficients.identity(2))
    with pytest.raises(ValueError, match="parameterization must be one of"):
        fn(eps_denoiser, x, sigmas, disable=True, parameterization="v")
    with pytest.raises(ValueError, match="coefficients must be a qsched Coefficients"):
        fn(eps_denoiser, x, sigmas, disable=True, coefficients=[1.0, 1.0, 1.0, 1.0])
    if name in ("tcd", "euler_ancestral"):
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
                fn(eps_denoiser, x, sigmas, disable=True, eta=bad)


def test_tcd_is_eps_only():
    with pytest.raises(ValueError, match="parameterization must be one of 'eps'"):
        samplers.sample_tcd(flow_denoiser, init_noise(), flow_sigmas(4), disable=True, parameterization="flow")
