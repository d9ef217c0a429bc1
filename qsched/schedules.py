"""Few-step sigma schedules (k-diffusion sigma space) that match the timesteps diffusers uses.

EPS models (SDXL-Turbo, LCM, TCD/PCM) live on a discrete VP schedule ``alpha_bar[t]``, t = 0..999, with
``sigma(t) = sqrt((1 - alpha_bar[t]) / alpha_bar[t])``. Flow models (FLUX.1[schnell]) use ``sigma in [0, 1]``.
Every schedule returned here has ``steps + 1`` entries and ends with 0.

| family        | diffusers scheduler (config)                         | 4-step timesteps / sigmas            |
|---------------|------------------------------------------------------|--------------------------------------|
| sdxl_turbo    | EulerAncestralDiscrete, timestep_spacing="trailing"  | 999, 749, 499, 249                   |
| lcm, tcd, pcm | LCMScheduler / TCDScheduler, original_steps=50       | 999, 759, 499, 259                   |
| flux_schnell  | FlowMatchEulerDiscrete, shift=1, FluxPipeline sigmas | sigma 1, 0.75, 0.5, 0.25             |
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .coefficients import check_steps

FAMILIES = ("sdxl_turbo", "lcm", "tcd", "pcm", "flux_schnell")
NUM_TRAIN_TIMESTEPS = 1000


# diffusers schedulers/scheduling_ddpm.py betas for beta_schedule="scaled_linear".
def alphas_cumprod_scaled_linear(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """alpha_bar of the "scaled_linear" beta schedule shared by SD1.5/SDXL/LCM/PCM/SDXL-Turbo (float64).

    Built like diffusers (betas in float32, cumprod in float32) so the table is identical to the one its
    schedulers index; returned as float64 for the sampler arithmetic.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep t."""
    ac = alphas_cumprod.to(torch.float64)
    return ((1.0 - ac) / ac).sqrt()


# ComfyUI comfy/model_sampling.py ModelSamplingDiscrete.timestep.
def timestep_from_sigma(sigma: float | torch.Tensor, alphas_cumprod: torch.Tensor) -> int:
    """The training timestep whose sigma is nearest in log space (ComfyUI's ``ModelSamplingDiscrete.timestep``)."""
    s = float(sigma)
    if s <= 0.0:
        return 0
    table = sigmas_from_alphas_cumprod(alphas_cumprod)
    return int(torch.argmin((table.log() - math.log(s)).abs()).item())


# diffusers schedulers/scheduling_euler_discrete.py set_timesteps, timestep_spacing="trailing".
def trailing_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers ``timestep_spacing="trailing"``: round(arange(T, 0, -T/N)) - 1 -> 999, 749, 499, 249 for N=4."""
    check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]


# diffusers schedulers/scheduling_lcm.py LCMScheduler.set_timesteps (original_inference_steps).
def lcm_timesteps(steps: int, original_steps: int = 50, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """LCM/TCD skipping on the distillation grid: orig = [19, 39, ..., 999] reversed, taken at
    floor(linspace(0, len(orig), N, endpoint=False)) -> 999, 759, 499, 259 for N=4."""
    check_steps(steps, original_steps)
    k = num_train_timesteps // original_steps
    origin = [(i + 1) * k - 1 for i in range(original_steps)][::-1]
    return [origin[int(math.floor(i * original_steps / steps))] for i in range(steps)]


def discrete_sigmas(timesteps: Sequence[int], alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma at each integer timestep, then a final 0."""
    table = sigmas_from_alphas_cumprod(alphas_cumprod)
    return torch.cat([table[torch.as_tensor(list(timesteps), dtype=torch.long)], table.new_zeros(1)])


# diffusers schedulers/scheduling_flow_match_euler_discrete.py set_timesteps (static shift).
def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """FluxPipeline schedule: sigma = linspace(1, 1/N, N), shifted by shift·s / (1 + (shift - 1)·s), then 0."""
    check_steps(steps, NUM_TRAIN_TIMESTEPS)
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return torch.cat([s, s.new_zeros(1)])


def few_step_sigmas(family: str, steps: int, *, alphas_cumprod: torch.Tensor | None = None,
                    shift: float = 1.0, original_steps: int = 50) -> torch.Tensor:
    """The sigma schedule (``steps + 1`` values, float64, ending in 0) diffusers uses for ``family``.

    ``alphas_cumprod`` defaults to the scaled-linear table every supported EPS family was trained with;
    pass a model's own table (ComfyUI: ``model_sampling.alphas_cumprod``) to follow a different one.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if family == "flux_schnell":
        return flow_sigmas(steps, shift)
    ac = alphas_cumprod_scaled_linear() if alphas_cumprod is None else alphas_cumprod
    T = len(ac)
    if family == "sdxl_turbo":
        return discrete_sigmas(trailing_timesteps(steps, T), ac)
    return discrete_sigmas(lcm_timesteps(steps, original_steps, T), ac)
