"""``qsched demo --random-models``: the machinery demo on tiny *random* SDXL-like / FLUX-like pipelines -- every
sampler, identity vs Q-Sched coefficients (noise-like pictures; it shows the update rules run end to end).
"""

from __future__ import annotations

import os
import time

import torch

from ...qsched import Coefficients, samplers
from ...qsched._io import atomic_write, atomic_write_text
from ...qsched.schedules import few_step_sigmas
from ..denoisers import FluxFlowDenoiser, UNetEpsDenoiser, flux_conditioning, sdxl_conditioning

PROMPT = "a watercolor painting of a dog in the snow"

# (label, sampler, parameterization, schedule family, extra sampler options)
RUNS = [
    ("tcd (eps, gamma=0.3)", "tcd", "eps", "tcd", {"eta": 0.3}),
    ("lcm (eps)", "lcm", "eps", "lcm", {}),
    ("euler_ancestral (eps)", "euler_ancestral", "eps", "sdxl_turbo", {}),
    ("euler (eps)", "euler", "eps", "sdxl_turbo", {}),
    ("euler (flow)", "euler", "flow", "flux_schnell", {}),
    ("euler_ancestral (flow, RF)", "euler_ancestral", "flow", "flux_schnell", {"eta": 1.0}),
    ("lcm (flow)", "lcm", "flow", "flux_schnell", {}),
]


def run_random_models_demo(out_dir: str = "qsched-demo", steps: int = 4, size: int = 64, seed: int = 0) -> str:
    """Every sampler, identity vs the official example coefficients, on tiny random pipelines."""
    from PIL import Image

    from ..tiny_pipelines import build_flux_pipeline, build_sdxl_pipeline

    os.makedirs(out_dir, exist_ok=True)
    coeff = Coefficients.ramp(steps, 1.012, 0.967, 0.955, 1.099)  # the official example (collect_images.sh)
    ident = Coefficients.identity(steps)
    sdxl, flux = build_sdxl_pipeline(seed), build_flux_pipeline(seed)
    with torch.no_grad():
        eps_model = UNetEpsDenoiser(sdxl.unet, sdxl_conditioning(sdxl, PROMPT, size, size))
        flow_model = FluxFlowDenoiser(flux.transformer, flux_conditioning(flux, PROMPT))
    lat = size // 8
    rows, tiles = [], []
    for label, name, param, family, opts in RUNS:
        fn = samplers.SAMPLERS[name]
        sigmas = few_step_sigmas(family, steps)
        model, pipe, ch = (eps_model, sdxl, 4) if param == "eps" else (flow_model, flux, 16)
        noise = torch.randn(1, ch, lat, lat, generator=torch.Generator().manual_seed(seed))
        x0 = noise * ((1 + sigmas[0] ** 2).sqrt() if param == "eps" else sigmas[0])
        outs, secs = [], []
        for c in (ident, coeff):
            t0 = time.perf_counter()
            kw = dict(opts, parameterization=param) if name != "tcd" else dict(opts)
            outs.append(fn(model, x0.clone(), sigmas.float(), {"seed": seed}, disable=True, coefficients=c, **kw))
            secs.append(time.perf_counter() - t0)
        change = float((outs[1] - outs[0]).norm() / outs[0].norm())
        rows.append((label, secs[0], secs[1], float(outs[0].std()), float(outs[1].std()), change))
        tiles.append([_decode(pipe, o, param) for o in outs])

    # Wall times are indicative only (speed lives in benchmarks/, measured side by side).
    table = ["| sampler | s/img identity | latent std identity | latent std Q-Sched | ‖x_Q − x_1‖/‖x_1‖ |",
             "|---|---|---|---|---|"]
    table += [f"| {r[0]} | {r[1]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.4f} |" for r in rows]
    header = (f"Q-Sched demo: {steps} steps, {size}x{size}, seed {seed}, tiny random models; Q-Sched coefficients "
              f"c_x = {_fmt(coeff.c_x)}, c_eps = {_fmt(coeff.c_eps)}\n")
    text = header + "\n" + "\n".join(table) + "\n"
    atomic_write_text(os.path.join(out_dir, "table.md"), text)
    grid = Image.new("RGB", (2 * size, len(tiles) * size))
    for r, pair in enumerate(tiles):
        for c, img in enumerate(pair):
            grid.paste(img, (c * size, r * size))
    atomic_write(os.path.join(out_dir, "grid.png"), lambda tmp: grid.save(tmp, format="PNG"))
    print(text)
    print(f"wrote {os.path.join(out_dir, 'table.md')} and {os.path.join(out_dir, 'grid.png')} "
          f"(rows: samplers as in the table; left: identity, right: Q-Sched)")
    return text


def _decode(pipe, latents: torch.Tensor, param: str):
    from PIL import Image

    vae = pipe.vae
    with torch.no_grad():
        z = latents / vae.config.scaling_factor
        if param == "flow":
            z = z + vae.config.shift_factor
        img = vae.decode(z.to(vae.dtype)).sample[0]
    img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(img)


def _fmt(vals) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in vals) + "]"
