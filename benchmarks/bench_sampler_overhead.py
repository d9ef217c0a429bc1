"""Wall-time cost of Q-Sched coefficients, measured side by side in one run.

For every sampler, three variants run interleaved (rotating order, same inputs) on a tiny SDXL-like UNet:
stock (coefficients=None), identity Coefficients, and a non-identity ramp; plus QSchedScheduler(identity /
ramp) around the matching diffusers scheduler vs the bare diffusers scheduler. Prints medians and ratios.

    .venv/bin/python benchmarks/bench_sampler_overhead.py [--rounds 30] [--size 64] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--size", type=int, default=64, help="image size (latent = size/8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    from qsched_pack.qsched._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from diffusers import EulerAncestralDiscreteScheduler, LCMScheduler, TCDScheduler

    from qsched_pack.calibration.denoisers import UNetEpsDenoiser, sdxl_conditioning
    from qsched_pack.calibration.tiny_pipelines import build_sdxl_pipeline
    from qsched_pack.qsched import Coefficients, samplers
    from qsched_pack.qsched.diffusers import QSchedScheduler
    from qsched_pack.qsched.schedules import few_step_sigmas

    torch.set_num_threads(1)  # steadier timings on a shared 2-core machine
    pipe = build_sdxl_pipeline()
    with torch.no_grad():
        cond = sdxl_conditioning(pipe, "a photo of a cat", args.size, args.size)
    model = UNetEpsDenoiser(pipe.unet, cond)
    lat = args.size // 8
    steps = args.steps
    ident, ramp = Coefficients.identity(steps), Coefficients.ramp(steps, 1.012, 0.967, 0.955, 1.099)

    def k_runner(name, family, coeff, **kw):
        sigmas = few_step_sigmas(family, steps).float()
        x = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        fn = samplers.SAMPLERS[name]
        return lambda: fn(model, x, sigmas, {"seed": 0}, disable=True, coefficients=coeff, **kw)

    def d_runner(make, coeff, **step_kw):
        def run():
            s = make()
            if coeff is not None:
                s = QSchedScheduler(s, coeff)
            s.set_timesteps(steps)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
            t_cond = pipe.unet
            with torch.no_grad():
                for t in s.timesteps:
                    eps = t_cond(s.scale_model_input(x, t), t, **cond).sample
                    x = s.step(eps, t, x, generator=g, return_dict=False, **step_kw)[0]
            return x
        return run

    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    cases = {
        "sample_tcd (gamma 0.3)": lambda c: k_runner("tcd", "tcd", c, eta=0.3),
        "sample_lcm": lambda c: k_runner("lcm", "lcm", c),
        "sample_euler_ancestral": lambda c: k_runner("euler_ancestral", "sdxl_turbo", c),
        "sample_euler": lambda c: k_runner("euler", "sdxl_turbo", c),
        "QSchedScheduler(EulerAncestral)": lambda c: d_runner(
            lambda: EulerAncestralDiscreteScheduler(**sd, timestep_spacing="trailing", steps_offset=1), c),
        "QSchedScheduler(TCD)": lambda c: d_runner(lambda: TCDScheduler(**sd), c, eta=0.3),
        "QSchedScheduler(LCM)": lambda c: d_runner(lambda: LCMScheduler(**sd), c),
    }
    rows = []
    for label, make in cases.items():
        variants = {"stock": make(None), "identity": make(ident), "ramp": make(ramp)}
        for fn in variants.values():  # warm-up
            fn()
        times = {k: [] for k in variants}
        order = list(variants)
        for r in range(args.rounds):
            order = order[1:] + order[:1]
            for k in order:
                t0 = time.perf_counter()
                variants[k]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((label, med["stock"] * 1e3, med["identity"] / med["stock"], med["ramp"] / med["stock"]))

    head = (f"Sampler overhead of Q-Sched coefficients: tiny SDXL-like UNet, {steps} steps, {args.size}x{args.size}, "
            f"batch 1, {args.rounds} interleaved rounds, median; torch {torch.__version__}, 1 thread, "
            f"{platform.processor() or platform.machine()}\n")
    lines = ["| sampler | stock ms/img | identity / stock | Q-Sched ramp / stock |", "|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.3f} | {r[3]:.3f} |" for r in rows]
    text = head + "\n" + "\n".join(lines) + "\n\nstock = coefficients=None (k-diffusion samplers) or the bare " \
        "diffusers scheduler (QSchedScheduler rows).\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sampler_overhead.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
