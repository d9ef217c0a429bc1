"""LCM (LCM_Dreamshaper_v7-like: SD1.5 UNet with the guidance w-embedding, LCMScheduler, no CFG pass) and PCM
(SD1.5 + TCDScheduler, guidance 0, gamma 0) through the calibration generator, on tiny random SD1.5 pipelines
saved to disk and loaded back with ``load_pipeline``.

The headless path (generate.py's conditioning + denoiser + our sample_lcm / sample_tcd, identity coefficients)
must equal the diffusers pipeline given the same initial latents and the same per-step noise stream
(``per_sample_noise_sampler`` seeds image i's stream with ``seed_i * 1000003 + 1``; the pipeline gets one
generator per image seeded the same way, so its scheduler draws the same noise)."""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from qsched_pack.calibration.generate import DiffusersGenerator, load_pipeline, pipeline_family, seeded_noise
from qsched_pack.qsched import Coefficients

PROMPTS = ["a photo of a cat sitting on a red chair", "landscape with mountains, a lake and a blue sky"]
SEEDS = [11, 12]
SIZE = 64  # 8x8 latents


@functools.lru_cache(maxsize=None)
def sd15_models() -> dict:
    from qsched_pack.calibration.tiny_pipelines import build_sd15_pipeline

    root = Path(tempfile.mkdtemp(prefix="qsched-sd15-"))
    atexit.register(shutil.rmtree, root, True)
    build_sd15_pipeline(0, lcm=True).save_pretrained(root / "lcm")
    build_sd15_pipeline(0, lcm=False).save_pretrained(root / "pcm")
    return {"lcm": root / "lcm", "pcm": root / "pcm"}


@functools.lru_cache(maxsize=None)
def loaded(name: str):
    return load_pipeline(sd15_models()[name])


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def make(name, **kw):
    args = dict(steps=4, height=SIZE, width=SIZE, batch_size=2, model_file=sd15_models()[name])
    args.update(kw)
    return DiffusersGenerator(loaded(name), **args)


def generator_latents(g: DiffusersGenerator, coefficients, prompts=PROMPTS, seeds=SEEDS):
    """Run the generator's real ``generate`` and keep the latents it hands to the VAE."""
    captured = []
    real = g.decode
    g.decode = lambda lat: captured.append(lat.clone()) or real(lat)
    try:
        images = g.generate(coefficients, prompts, seeds)
    finally:
        del g.decode
    return torch.cat(captured), images


def pipeline_latents(pipe, steps, prompts=PROMPTS, seeds=SEEDS, **call_kw):
    f = pipe.vae_scale_factor
    latents = torch.cat([seeded_noise(s, (pipe.unet.config.in_channels, SIZE // f, SIZE // f)) for s in seeds])
    gens = [torch.Generator().manual_seed(s * 1000003 + 1) for s in seeds]
    with torch.no_grad():
        return pipe(list(prompts), num_inference_steps=steps, height=SIZE, width=SIZE, latents=latents,
                    generator=gens, output_type="latent", **call_kw).images


def test_loader_returns_the_sd15_pipelines_and_families():
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, TCDScheduler

    lcm, pcm = loaded("lcm"), loaded("pcm")
    assert type(lcm) is LatentConsistencyModelPipeline and isinstance(lcm.scheduler, LCMScheduler)
    assert type(pcm) is StableDiffusionPipeline and isinstance(pcm.scheduler, TCDScheduler)
    assert lcm.unet.config.time_cond_proj_dim and pcm.unet.config.time_cond_proj_dim is None
    assert lcm.text_encoder.config.hidden_size == lcm.unet.config.cross_attention_dim
    assert getattr(lcm, "text_encoder_2", None) is None and lcm.safety_checker is None
    assert lcm.vae.config.scaling_factor == pytest.approx(0.18215)
    assert (pipeline_family(lcm), pipeline_family(pcm)) == ("lcm", "tcd")
    g = DiffusersGenerator(lcm, steps=4, height=SIZE, width=SIZE, model_hash_value="x")
    assert (g.family, g.sampler, g.guidance) == ("lcm", "lcm", 8.0)
    g = DiffusersGenerator(pcm, family="pcm", steps=4, height=SIZE, width=SIZE, model_hash_value="x")
    assert (g.sampler, g.options, g.guidance) == ("tcd", {"eta": 0.0}, 0.0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_headless_equals_pipeline_with_w_embedding(steps):
    """Family default guidance 8 -> w = 7 through the UNet's timestep_cond, no CFG pass, LCM boundary condition,
    fresh noise at every non-final step."""
    ours, _ = generator_latents(make("lcm", steps=steps), Coefficients.identity(steps))
    ref = pipeline_latents(loaded("lcm"), steps, guidance_scale=8.0)
    assert ours.shape == ref.shape == (2, 4, 8, 8)
    assert rel_err(ours, ref) <= 1e-5


def test_lcm_guidance_reaches_the_w_embedding():
    """A non-default guidance must give the pipeline's result at that guidance, which differs from guidance 8's
    (so the equality above cannot hold with the w-embedding missing or wrong)."""
    ours, _ = generator_latents(make("lcm", guidance=2.5), Coefficients.identity(4))
    ref = pipeline_latents(loaded("lcm"), 4, guidance_scale=2.5)
    assert rel_err(ours, ref) <= 1e-5
    ref8 = pipeline_latents(loaded("lcm"), 4, guidance_scale=8.0)
    assert rel_err(ref8, ref) > 1e-3


@pytest.mark.parametrize("family,steps,eta", [("pcm", 1, None), ("pcm", 2, None), ("pcm", 4, None),
                                              ("tcd", 4, 0.3)])
def test_tcd_headless_equals_pipeline(family, steps, eta):
    """PCM: guidance 0 (no CFG), gamma 0 (deterministic); TCD with gamma 0.3 also checks the injected noise."""
    g = make("pcm", family=family, steps=steps, eta=eta)
    ours, _ = generator_latents(g, Coefficients.identity(steps))
    ref = pipeline_latents(loaded("pcm"), steps, guidance_scale=0.0, eta=0.0 if eta is None else eta)
    assert rel_err(ours, ref) <= 1e-5
    if eta:
        det = pipeline_latents(loaded("pcm"), steps, guidance_scale=0.0, eta=0.0)
        assert rel_err(det, ref) > 1e-3  # the noise draws matter, so matching them is tested


def test_decoded_images_are_the_pipeline_latents_decoded():
    g = make("pcm", family="pcm")
    _, images = generator_latents(g, Coefficients.identity(4))
    ref = pipeline_latents(loaded("pcm"), 4, guidance_scale=0.0, eta=0.0)
    with torch.no_grad():
        dec = loaded("pcm").vae.decode(ref / loaded("pcm").vae.config.scaling_factor).sample
    dec = ((dec.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    assert images.shape == (2, SIZE, SIZE, 3)
    assert torch.allclose(images, dec, atol=1e-5)


@pytest.mark.parametrize("name,family", [("lcm", "lcm"), ("pcm", "pcm")])
def test_coefficients_change_the_output(name, family):
    g = make(name, family=family)
    ident, _ = generator_latents(g, Coefficients.identity(4))
    for c in (Coefficients.ramp(4, 0.9, 1.0, 1.0, 1.0), Coefficients.ramp(4, 1.0, 1.0, 1.1, 1.0),
              Coefficients.ramp(4, 1.05, 0.95, 0.9, 1.1)):
        lat, _ = generator_latents(g, c)
        assert rel_err(lat, ident) > 1e-3, c


@pytest.mark.parametrize("name,family", [("lcm", "lcm"), ("pcm", "pcm")])
def test_one_step_uniform_coefficient_scales_the_result(name, family):
    """One step, c_x = c_eps = c: the update is linear in (x, eps), so the latent is exactly c times identity's
    (LCM: c_out·x0' + c_skip·c_x·x; TCD gamma 0: sqrt(ab)·x0' + sqrt(1-ab)·c_eps·eps)."""
    g = make(name, family=family, steps=1)
    ident, _ = generator_latents(g, Coefficients.identity(1))
    scaled, _ = generator_latents(g, Coefficients([1.1], [1.1]))
    assert rel_err(scaled, 1.1 * ident) <= 1e-5
    assert rel_err(scaled, ident) > 0.05


# ---- qsched calibrate on the saved folders --------------------------------------------------------------

@pytest.mark.parametrize("name,family,sampler,quant", [("lcm", "lcm", "lcm", "w8a8"), ("pcm", "pcm", "tcd", "w4a8")])
def test_calibrate_end_to_end_on_saved_sd15_folder(tmp_path, jaq_dir, capsys, name, family, sampler, quant):
    from qsched_pack.calibration.app.cli import main

    model = str(sd15_models()[name])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat sitting on a red chair\na dog in the snow\n")
    out = tmp_path / "run"
    args = ["calibrate", "--model", model, "--family", family, "--steps", "2", "--size", "32", "--quant", quant,
            "--jaq", "clip", "--jaq-weights", str(jaq_dir), "--prompts", str(prompts), "--strategy", "grid",
            "--points", "3", "--budget", "40", "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "best JAQ" in capsys.readouterr().out
    for f in ("preset.json", "record.jsonl", "landscape.png", "preview.png"):
        assert (out / f).stat().st_size > 0
    preset = Coefficients.load(out / "preset.json")
    m = preset.metadata
    assert preset.steps == 2
    assert (m["family"], m["sampler"], m["quant"]) == (family, sampler, quant)
    assert m["scores"]["best"]["jaq"] >= m["scores"]["identity"]["jaq"]
    lines = (out / "record.jsonl").read_text().splitlines()
    assert len(lines) - 1 == 9  # 3x3 grid over [0.8, 1.2]; identity (1.0, 1.0) is one of its points
    assert m["images_spent"] == 2 * 9
    s_out = tmp_path / "samples"
    assert main(["sample", "--model", model, "--preset", str(out / "preset.json"), "--prompt", "a cat",
                 "--size", "32", "--device", "cpu", "--out", str(s_out)]) == 0
    assert (s_out / "qsched_000.png").stat().st_size > 0
