"""Diffusers generator on tiny random SDXL / FLUX pipelines saved to disk and loaded back through
``load_pipeline``: common random numbers, batching, text-encoding cache, families, quantization, loading errors."""

import functools
import json
import shutil

import pytest
import torch

from qsched_pack.calibration.generate import DiffusersGenerator, load_pipeline, model_hash
from qsched_pack.qsched import Coefficients

PROMPTS = ["a cat sitting on a red chair", "a dog in the snow", "a futuristic city at night"]
RAMP = Coefficients.ramp(2, 0.9, 1.0, 1.1, 1.0)


@functools.lru_cache(maxsize=None)
def _load(path: str):
    return load_pipeline(path)


def loaded(models: dict, name: str):
    return _load(str(models[name]))


def make(models: dict, name="sdxl", **kw):
    args = dict(steps=2, height=32, width=32, batch_size=2, model_file=models[name])
    args.update(kw)
    return DiffusersGenerator(loaded(models, name), **args)


@pytest.mark.parametrize("name,family", [("sdxl", "sdxl_turbo"), ("sdxl", "tcd"), ("sdxl", "lcm"),
                                         ("flux", "flux_schnell")])
def test_common_random_numbers_and_batch_invariance(name, family, tiny_pipelines):
    g = make(tiny_pipelines, name, family=family, eta=0.3 if family == "tcd" else None)
    a = g.generate(RAMP, PROMPTS, [5, 6, 7])
    assert a.shape == (3, 32, 32, 3) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, g.generate(RAMP, PROMPTS, [5, 6, 7]))  # same point -> same images, bit for bit
    single = g.generate(RAMP, PROMPTS[1:2], [6])  # image 1 alone: same noise, whatever else is in the batch
    assert torch.allclose(a[1:2], single, atol=1e-4)
    other = g.generate(RAMP, PROMPTS, [5, 6, 8])
    assert torch.equal(a[:2], other[:2]) and not torch.allclose(a[2], other[2], atol=1e-3)
    assert not torch.allclose(a, g.generate(Coefficients.identity(2), PROMPTS, [5, 6, 7]), atol=1e-4)


def test_identity_matches_stock_sampler_run_by_hand(tiny_pipelines):
    """The generator is the stock sampler + denoiser wiring: rebuild image 0 by hand and compare."""
    from qsched_pack.calibration.denoisers import UNetEpsDenoiser, sdxl_conditioning
    from qsched_pack.qsched import samplers
    from qsched_pack.qsched.schedules import few_step_sigmas

    g = make(tiny_pipelines, family="sdxl_turbo")
    img = g.generate(Coefficients.identity(2), PROMPTS[:1], [11])
    pipe = loaded(tiny_pipelines, "sdxl")
    sig = few_step_sigmas("sdxl_turbo", 2)
    x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(11)) * float(sig[0])
    gen = torch.Generator().manual_seed(11 * 1000003 + 1)
    noise = lambda s, t: torch.randn((1, 4, 4, 4), generator=gen)  # noqa: E731
    with torch.no_grad():
        model = UNetEpsDenoiser(pipe.unet, sdxl_conditioning(pipe, PROMPTS[0], 32, 32))
        lat = samplers.sample_euler_ancestral(model, x, sig.float(), disable=True, noise_sampler=noise)
    assert torch.allclose(img, g.decode(lat), atol=1e-5)


def test_text_encodings_computed_once_per_prompt(monkeypatch, tiny_pipelines):
    from qsched_pack.calibration import denoisers

    calls = []
    real = denoisers.conditioning_for
    monkeypatch.setattr(denoisers, "conditioning_for", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    g = make(tiny_pipelines)
    for c in (RAMP, Coefficients.identity(2), RAMP):
        g.generate(c, PROMPTS, [1, 2, 3])
    assert sorted(calls) == sorted(PROMPTS)


def test_fingerprint_names_model_hash_family_sampler_quant(tiny_pipelines):
    g = make(tiny_pipelines, "flux", family="flux_schnell")
    fp = g.fingerprint()
    assert fp["model_hash"] == model_hash(tiny_pipelines["flux"]) and len(fp["model_hash"]) == 64
    assert (fp["family"], fp["sampler"], fp["steps"], fp["quant"]) == ("flux_schnell", "euler", 2, None)
    json.dumps(fp)


def test_quantized_generator_differs_from_full_precision(tiny_pipelines):
    q = DiffusersGenerator(load_pipeline(tiny_pipelines["sdxl"]), steps=2, height=32, width=32, quant="w4a8",
                           model_hash_value="x")
    assert q.fingerprint()["quant"] == "w4a8" and q.quant_report is not None
    a = q.generate(RAMP, PROMPTS[:1], [3])
    b = make(tiny_pipelines).generate(RAMP, PROMPTS[:1], [3])
    assert not torch.allclose(a, b, atol=1e-4)


def test_single_file_denoiser_with_local_config_folder(tmp_path, tiny_pipelines):
    m = tiny_pipelines
    cfg = tmp_path / "cfg"
    shutil.copytree(m["sdxl"], cfg)
    for f in (cfg / "unet").glob("*.safetensors"):
        f.unlink()  # a config folder without the denoiser's weights, like users download
    pipe = load_pipeline(m["unet_file"], config=cfg)
    g = DiffusersGenerator(pipe, steps=2, height=32, width=32, model_file=m["unet_file"])
    assert torch.allclose(g.generate(RAMP, PROMPTS[:1], [4]), make(tiny_pipelines).generate(RAMP, PROMPTS[:1], [4]),
                          atol=1e-5)
    assert g.model_hash == model_hash(m["unet_file"]) != model_hash(m["sdxl"])


def test_loading_errors_name_the_missing_file(tmp_path, tiny_pipelines):
    m = tiny_pipelines
    with pytest.raises(FileNotFoundError, match="model not found: .*nope"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"model_index\.json is missing"):
        load_pipeline(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(m["sdxl"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"broken/vae is missing \(model_index.json lists component 'vae'\)"):
        load_pipeline(broken)
    shutil.copytree(m["sdxl"] / "vae", broken / "vae")
    (broken / "text_encoder" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_encoder/config\.json is missing"):
        load_pipeline(broken)
    with pytest.raises(ValueError, match="single-file checkpoint .*unet.safetensors needs config"):
        load_pipeline(m["unet_file"])


def test_bad_generator_arguments(tiny_pipelines):
    pipe = loaded(tiny_pipelines, "sdxl")
    with pytest.raises(ValueError, match="family must be one of sdxl_turbo, flux_schnell, lcm, tcd, pcm"):
        DiffusersGenerator(pipe, family="sd3", model_hash_value="x")
    with pytest.raises(ValueError, match="sampler must be one of"):
        DiffusersGenerator(pipe, sampler="dpmpp", model_hash_value="x")
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        DiffusersGenerator(pipe, height=30, model_hash_value="x")
    g = make(tiny_pipelines)
    with pytest.raises(ValueError, match="coefficients have 4 steps .* but the sampler runs 2 steps"):
        g.generate(Coefficients.identity(4), PROMPTS, [1, 2, 3])


def test_per_sample_noise_sampler_accepts_any_seed():
    import torch

    from qsched_pack.calibration.generate import per_sample_noise_sampler

    x = torch.zeros(2, 4, 2, 2)
    big = per_sample_noise_sampler(x, [2**62, 2**62])(1.0, 0.5)
    assert big.shape == x.shape and torch.equal(big[0], big[1])
    small = per_sample_noise_sampler(x, [7, 8])(1.0, 0.5)
    g = torch.Generator().manual_seed(7 * 1000003 + 1)
    assert torch.equal(small[0:1], torch.randn((1, 4, 2, 2), generator=g))
