"""QSchedScheduler inside real diffusers pipelines (tiny random SDXL / FLUX-schnell saved and loaded from disk)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline, TCDScheduler

from qsched_pack.calibration.tiny_pipelines import build_flux_pipeline, build_sdxl_pipeline
from qsched_pack.qsched import Coefficients
from qsched_pack.qsched.diffusers import QSchedScheduler

PROMPT = "a photo of a cat sitting on a red chair"


def _saved_and_loaded(tmp_path_factory, build, cls):
    d = tmp_path_factory.mktemp(cls.__name__)
    build().save_pretrained(d)
    pipe = cls.from_pretrained(d, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _saved_and_loaded(tmp_path_factory, build_sdxl_pipeline, StableDiffusionXLPipeline)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return _saved_and_loaded(tmp_path_factory, build_flux_pipeline, FluxPipeline)


def run(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(5), **kw).images


def test_sdxl_turbo_pipeline_identity_equals_stock_and_coefficients_change_output(sdxl):
    stock = run(sdxl)
    base = sdxl.scheduler
    try:
        sdxl.scheduler = QSchedScheduler(copy.deepcopy(base), Coefficients.identity(4))
        assert torch.equal(run(sdxl), stock)
        sdxl.scheduler = QSchedScheduler(copy.deepcopy(base), Coefficients.ramp(4, 0.95, 1.0, 1.05, 1.0))
        changed = run(sdxl)
        assert (changed - stock).abs().max() > 1e-3
        sdxl.scheduler = QSchedScheduler(copy.deepcopy(base), Coefficients.identity(2))
        with pytest.raises(ValueError, match="coefficients have 2 steps .* runs 4 steps"):
            run(sdxl)
    finally:
        sdxl.scheduler = base


def test_flux_pipeline_passes_sigmas_through_the_wrapper(flux):
    stock = run(flux)
    base = flux.scheduler
    try:
        # FluxPipeline inspects set_timesteps' signature for `sigmas`: the wrapper must expose it.
        flux.scheduler = QSchedScheduler(copy.deepcopy(base), Coefficients.identity(4))
        assert torch.equal(run(flux), stock)
        flux.scheduler = QSchedScheduler(copy.deepcopy(base), Coefficients.ramp(4, 1.0, 1.0, 1.1, 1.0))
        assert (run(flux) - stock).abs().max() > 1e-3
    finally:
        flux.scheduler = base


def test_tcd_pipeline_with_wrapper(sdxl):
    base = sdxl.scheduler
    try:
        tcd = TCDScheduler.from_config(base.config)
        sdxl.scheduler = tcd
        stock = run(sdxl, eta=0.3)
        sdxl.scheduler = QSchedScheduler(TCDScheduler.from_config(base.config), Coefficients.identity(4))
        np.testing.assert_array_equal(run(sdxl, eta=0.3).numpy(), stock.numpy())
    finally:
        sdxl.scheduler = base


def test_wrapper_is_transparent_and_validates():
    s = TCDScheduler()
    w = QSchedScheduler(s, Coefficients.identity(4))
    assert w.config is s.config and w.order == s.order
    w.set_timesteps(4)
    assert w.timesteps is s.timesteps and w.num_inference_steps == 4
    w.some_attribute = 3  # writes go to the wrapped scheduler
    assert s.some_attribute == 3
    assert "QSchedScheduler(TCDScheduler, steps=4)" == repr(w)
    with pytest.raises(ValueError, match="base_scheduler must be a diffusers scheduler"):
        QSchedScheduler(object(), Coefficients.identity(4))
    with pytest.raises(ValueError, match="coefficients must be a qsched Coefficients"):
        QSchedScheduler(s, [1.0] * 4)
    with pytest.raises(ValueError, match="coefficients have 4 steps .* runs 2 steps"):
        w.set_timesteps(2)
    copy.copy(w)  # no infinite __getattr__ recursion
