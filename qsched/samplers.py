"""Few-step samplers with Q-Sched coefficients, in the k-diffusion convention ComfyUI uses.

Every sampler has the signature ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
coefficients=None, ...)`` where ``denoised = model(x, sigma * s_in, **extra_args)``, so the same function is a
ComfyUI ``KSAMPLER`` body and a headless sampler.

Sigma space: EPS models ``x = x0 + sigma·eps`` (VP sample ``x·sqrt(alpha_bar)``, ``alpha_bar = 1/(1+sigma²)``);
flow models ``x = (1-sigma)·x0 + sigma·noise``. ``(x - denoised)/sigma`` is the noise (EPS) or the velocity (flow).

Q-Sched (paper Eq. 4; official code scales ``sample`` by c_x and ``model_output`` by c_eps at the top of the
scheduler's ``step()``): the model is evaluated unchanged on x_i, then the stock update runs with

    x'        = c_x · x
    denoised' = c_x · x − c_eps · (x − denoised)       (= c_x·x − sigma·c_eps·eps)

With c_x = c_eps = 1 the stock update runs untouched, bit for bit, with the same noise draws.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from .coefficients import Coefficients, as_coefficients
from .schedules import alphas_cumprod_scaled_linear, timestep_from_sigma

PARAMETERIZATIONS = ("eps", "flow")
#: Samplers written for eps-prediction (VP) models only; the others run eps and flow models.
EPS_ONLY = ("tcd",)


# Follows ComfyUI comfy/k_diffusion/sampling.py default_noise_sampler (k-diffusion).
def default_noise_sampler(x: torch.Tensor, seed: int | None = None):
    """Noise source of k-diffusion/ComfyUI: one generator seeded once, one ``randn`` per call."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=generator)


def precondition(x: torch.Tensor, denoised: torch.Tensor, c_x: float, c_eps: float):
    """Q-Sched in sigma space: (x, denoised) -> (c_x·x, c_x·x − c_eps·(x − denoised))."""
    if c_x == 1.0 and c_eps == 1.0:
        return x, denoised
    x_c = x * c_x
    return x_c, x_c - c_eps * (x - denoised)


def _per_step(coefficients: Coefficients | None, sigmas: torch.Tensor) -> list[tuple[float, float]]:
    steps = len(sigmas) - 1
    if steps < 1:
        raise ValueError(f"sigmas must hold at least 2 values (steps + 1), got {len(sigmas)}")
    c = as_coefficients(coefficients, steps)
    if c is None:
        return [(1.0, 1.0)] * steps
    return list(zip(c.c_x, c.c_eps))


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_eta(eta, name: str = "eta") -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0.0 <= eta <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {eta!r}")
    return float(eta)


def _noise_sampler(noise_sampler, x, extra_args):
    return default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler


def _callback(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


# Follows ComfyUI comfy/k_diffusion/sampling.py sample_euler (k-diffusion; churn omitted).
@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, coefficients=None,
                 parameterization="eps"):
    """Euler (Karras Alg. 2 without churn); for flow models this is FlowMatchEulerDiscrete (FLUX schnell).

    x_{i+1} = x' + (x' − denoised')/sigma_i · (sigma_{i+1} − sigma_i)
            = c_x·x_i + (sigma_{i+1} − sigma_i)·c_eps·eps_i           (official flow-Euler patch)
    """
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)  # same update for both
    extra_args = {} if extra_args is None else extra_args
    cs = _per_step(coefficients, sigmas)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        x_c, denoised = precondition(x, denoised, *cs[i])
        _callback(callback, x, i, sigmas[i], denoised)
        d = (x_c - denoised) / sigmas[i]
        x = x_c + d * (sigmas[i + 1] - sigmas[i])
    return x


# Follows ComfyUI comfy/k_diffusion/sampling.py sample_euler_ancestral / sample_euler_ancestral_RF.
@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, *, coefficients=None,
                           parameterization="eps", eta=1.0, s_noise=1.0, noise_sampler=None):
    """Euler-ancestral (SDXL-Turbo). EPS: EulerAncestralDiscreteScheduler; flow: the rectified-flow variant
    (ComfyUI ``sample_euler_ancestral_RF``; eta = 0 is flow Euler).

    EPS:  sigma_up = min(sigma_{i+1}, eta·sqrt(sigma_{i+1}²(sigma_i² − sigma_{i+1}²)/sigma_i²)),
          sigma_down = sqrt(sigma_{i+1}² − sigma_up²)
          x_{i+1} = x' + (x' − denoised')/sigma_i·(sigma_down − sigma_i) + sigma_up·z;  last step: denoised'
    """
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    eta = _check_eta(eta)
    extra_args = {} if extra_args is None else extra_args
    cs = _per_step(coefficients, sigmas)
    noise_sampler = _noise_sampler(noise_sampler, x, extra_args)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        x_c, denoised = precondition(x, denoised, *cs[i])
        _callback(callback, x, i, sigmas[i], denoised)
        if parameterization == "flow":
            x = _euler_ancestral_rf_step(x_c, denoised, sigmas[i], sigmas[i + 1], eta, s_noise, noise_sampler)
            continue
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            d = (x_c - denoised) / sigmas[i]
            x = x_c + d * (sigma_down - sigmas[i]) + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


# k-diffusion get_ancestral_step (ComfyUI comfy/k_diffusion/sampling.py).
def _ancestral_step(sigma_from, sigma_to, eta):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


# ComfyUI comfy/k_diffusion/sampling.py sample_euler_ancestral_RF, one step.
def _euler_ancestral_rf_step(x, denoised, sigma, sigma_next, eta, s_noise, noise_sampler):
    """Rectified flow, alpha = 1 − sigma: Euler step down to sigma_down, then re-noise up to sigma_next.

    sigma_down = sigma_{i+1}·(1 + (sigma_{i+1}/sigma_i − 1)·eta)
    x = (sigma_down/sigma_i)·x' + (1 − sigma_down/sigma_i)·denoised'
    x = (alpha_{i+1}/alpha_down)·x + sqrt(sigma_{i+1}² − sigma_down²·alpha_{i+1}²/alpha_down²)·z
    """
    if sigma_next == 0:
        return denoised
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    ratio = sigma_down / sigma
    x = ratio * x + (1 - ratio) * denoised
    if eta > 0:
        renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
        x = (alpha_next / alpha_down) * x + noise_sampler(sigma, sigma_next) * s_noise * renoise
    return x


# Follows diffusers src/diffusers/schedulers/scheduling_tcd.py TCDScheduler.step, in sigma space.
@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, *, coefficients=None,
               parameterization="eps", eta=0.3, alphas_cumprod=None, noise_sampler=None):
    """TCD strategic stochastic sampling (PCM/TCD LoRAs; diffusers TCDScheduler), paper Eq. (4).

    ``eta`` is TCD's gamma (diffusers' ``eta``): s = t_{i+1}, s' = floor((1 − gamma)·s).

      x_s' = sqrt(alpha_bar_s')·(c_x·x_t − sigma_t·c_eps·eps)/alpha_t + sqrt(1 − alpha_bar_s')·c_eps·eps   (VP)
      x_s  = sqrt(alpha_bar_s/alpha_bar_s')·x_s' + sqrt(1 − alpha_bar_s/alpha_bar_s')·z    if gamma > 0, not last
      x_s  = x_s'                                                                            otherwise

    As in diffusers, the final step lands on alpha_bar[0] (not 1), so the output keeps 0.029·c_eps·eps.
    ``alphas_cumprod`` maps sigma -> timestep; default: the scaled-linear SD/SDXL table.
    """
    _check_choice("parameterization", parameterization, ("eps",))
    gamma = _check_eta(eta)
    extra_args = {} if extra_args is None else extra_args
    cs = _per_step(coefficients, sigmas)
    noise_sampler = _noise_sampler(noise_sampler, x, extra_args)
    ac = alphas_cumprod_scaled_linear() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod).double().cpu()
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        x_c, denoised = precondition(x, denoised, *cs[i])
        _callback(callback, x, i, sigmas[i], denoised)
        eps = (x_c - denoised) / sigma                      # c_eps·eps  (denoised' is the x0 of Eq. 4)
        s = timestep_from_sigma(sigma_next, ac)
        s_prime = int(math.floor((1.0 - gamma) * s))
        ab_s, ab_sp = float(ac[s]), float(ac[s_prime])
        x_vp = math.sqrt(ab_sp) * denoised + math.sqrt(1.0 - ab_sp) * eps
        if gamma > 0 and sigma_next > 0:
            z = noise_sampler(sigmas[i], sigmas[i + 1])
            x_vp = math.sqrt(ab_s / ab_sp) * x_vp + math.sqrt(1.0 - ab_s / ab_sp) * z
        x = x_vp * math.sqrt(1.0 + sigma_next**2)         # VP sample at s -> sigma space
    return x


# Follows ComfyUI comfy/k_diffusion/sampling.py sample_lcm and diffusers schedulers/scheduling_lcm.py step.
@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, *, coefficients=None,
               parameterization="eps", alphas_cumprod=None, boundary_condition=True, timestep_scaling=10.0,
               sigma_data=0.5, noise_sampler=None):
    """Multistep consistency sampling (LCM; diffusers LCMScheduler, FlowMatchLCMScheduler for flow).

    The official Q-Sched LCM patch is missing from its repository; this applies the same rule as the other
    samplers (scale sample by c_x and noise prediction by c_eps before the update):

      x0' = c_x·x − sigma·c_eps·eps;  denoised = c_out(t)·x0' + c_skip(t)·c_x·x_vp     (EPS, LCM boundary)
      x_{i+1} = denoised + sigma_{i+1}·z   (EPS)    |   sigma_{i+1}·z + (1 − sigma_{i+1})·x0'   (flow)
      last step: denoised

    ``boundary_condition=False`` when the model already returns LCM's boundary-conditioned output
    (ComfyUI ``ModelSamplingDiscrete`` "lcm"); c_skip <= 1.3e-7 for the 2-8 step schedules.
    """
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    extra_args = {} if extra_args is None else extra_args
    cs = _per_step(coefficients, sigmas)
    noise_sampler = _noise_sampler(noise_sampler, x, extra_args)
    ac = None
    if parameterization == "eps" and boundary_condition:
        ac = alphas_cumprod_scaled_linear() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod).double().cpu()
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        x_c, denoised = precondition(x, denoised, *cs[i])
        if ac is not None:
            t = timestep_from_sigma(sigmas[i], ac) * timestep_scaling
            c_skip = sigma_data**2 / (t**2 + sigma_data**2)
            c_out = t / (t**2 + sigma_data**2) ** 0.5
            denoised = c_out * denoised + c_skip * (x_c / math.sqrt(1.0 + float(sigmas[i]) ** 2))
        _callback(callback, x, i, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            z = noise_sampler(sigmas[i], sigmas[i + 1])
            if parameterization == "eps":
                x = z * sigmas[i + 1] + x
            else:
                x = sigmas[i + 1] * z + (1.0 - sigmas[i + 1]) * x
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "tcd": sample_tcd,
    "lcm": sample_lcm,
}


def check_sampler(name, parameterization: str = "eps") -> str:
    """The rule for choosing a sampler: a name of ``SAMPLERS``; an ``EPS_ONLY`` one only for eps models."""
    _check_choice("sampler", name, tuple(SAMPLERS))
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if parameterization == "flow" and name in EPS_ONLY:
        raise ValueError(f"'{name}' works only with eps-prediction models (SD1.5, SDXL, SDXL-Turbo, LCM/TCD/PCM "
                         "LoRAs), but this is a flow model (FLUX, SD3): choose 'euler' (FLUX schnell), "
                         "'euler_ancestral' or 'lcm'")
    return name
