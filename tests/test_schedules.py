import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler, TCDScheduler

from qsched_pack.qsched.schedules import (alphas_cumprod_scaled_linear, few_step_sigmas, lcm_timesteps,
                                          timestep_from_sigma, trailing_timesteps)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_alphas_cumprod_is_diffusers_table():
    s = TCDScheduler(**SD)
    assert torch.equal(alphas_cumprod_scaled_linear().float(), s.alphas_cumprod)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8])
def test_sdxl_turbo_trailing_matches_diffusers(steps):
    s = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing", steps_offset=1)
    s.set_timesteps(steps)
    assert trailing_timesteps(steps) == [int(t) for t in s.timesteps]
    torch.testing.assert_close(few_step_sigmas("sdxl_turbo", steps).float(), s.sigmas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("cls", [TCDScheduler, LCMScheduler])
def test_lcm_tcd_grid_matches_diffusers(steps, cls):
    s = cls(**SD)
    s.set_timesteps(steps)
    assert lcm_timesteps(steps) == [int(t) for t in s.timesteps]


def test_known_values_from_the_paper_setup():
    assert trailing_timesteps(4) == [999, 749, 499, 249]
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    assert lcm_timesteps(2) == [999, 499]
    assert lcm_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    torch.testing.assert_close(few_step_sigmas("sdxl_turbo", 4),
                               torch.tensor([14.6146, 4.0817, 1.6129, 0.6932, 0.0], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(few_step_sigmas("tcd", 4),
                               torch.tensor([14.6146, 4.2606, 1.6129, 0.7194, 0.0], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert few_step_sigmas("flux_schnell", 4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flux_schedule_matches_diffusers_with_pipeline_sigmas(shift):
    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    base = torch.linspace(1.0, 1.0 / 4, 4).tolist()  # what FluxPipeline passes
    s.set_timesteps(4, sigmas=base)
    torch.testing.assert_close(few_step_sigmas("flux_schnell", 4, shift=shift).float(), s.sigmas, rtol=1e-6, atol=1e-7)


def test_timestep_from_sigma_round_trips_every_timestep():
    ac = alphas_cumprod_scaled_linear()
    sig = ((1 - ac) / ac).sqrt()
    assert all(timestep_from_sigma(sig[t], ac) == t for t in range(0, 1000, 7))
    assert timestep_from_sigma(0.0, ac) == 0


@pytest.mark.parametrize("family,steps,match", [
    ("sdxl", 4, "family must be one of"),
    ("tcd", 0, r"steps must be an integer in \[1, 50\]"),
    ("tcd", 51, r"steps must be an integer in \[1, 50\]"),
    ("sdxl_turbo", 2.5, r"steps must be an integer"),
])
def test_bad_schedule_inputs(family, steps, match):
    with pytest.raises(ValueError, match=match):
        few_step_sigmas(family, steps)
    with pytest.raises(ValueError, match="shift must be"):
        few_step_sigmas("flux_schnell", 4, shift=0.0)
