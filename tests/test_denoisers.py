"""The headless path (k-diffusion denoiser + our sampler) equals the diffusers pipeline, same noise."""

import pytest
import torch
from diffusers import FluxPipeline

from qsched_pack.calibration.denoisers import (FluxFlowDenoiser, UNetEpsDenoiser, flux_conditioning,
                                               sdxl_conditioning)
from qsched_pack.calibration.tiny_pipelines import build_flux_pipeline, build_sdxl_pipeline
from qsched_pack.qsched import samplers
from qsched_pack.qsched.schedules import few_step_sigmas

PROMPT = "a bowl of fruit on a wooden table, studio photo"


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_headless_equals_pipeline(steps):
    pipe = build_sdxl_pipeline(seed=3)
    ref = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64, output_type="latent",
               generator=torch.Generator().manual_seed(5)).images
    with torch.no_grad():
        model = UNetEpsDenoiser(pipe.unet, sdxl_conditioning(pipe, PROMPT, 64, 64))
    sigmas = few_step_sigmas("sdxl_turbo", steps).float()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g) * sigmas[0]
    ours = samplers.sample_euler_ancestral(model, x, sigmas, disable=True,
                                           noise_sampler=lambda s, sn: torch.randn(1, 4, 8, 8, generator=g))
    assert rel_err(ours, ref) <= 1e-5


def test_flux_schnell_headless_equals_pipeline():
    pipe = build_flux_pipeline(seed=3)
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, height=64, width=64, output_type="latent",
               max_sequence_length=64, generator=torch.Generator().manual_seed(5)).images
    ref = FluxPipeline._unpack_latents(ref, 64, 64, pipe.vae_scale_factor)
    with torch.no_grad():
        model = FluxFlowDenoiser(pipe.transformer, flux_conditioning(pipe, PROMPT, max_sequence_length=64))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = samplers.sample_euler(model, x, few_step_sigmas("flux_schnell", 4).float(), disable=True,
                                 parameterization="flow")
    assert rel_err(ours, ref) <= 1e-5
