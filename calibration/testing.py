"""Test doubles with known answers, for the tests and benchmarks/bench_search.py (never used by the product):

* ``synthetic_objective(name, dim)``: objectives on search points with known optima;
* ``SyntheticGenerator``: images whose pixels encode a function of the coefficients (``generate.Generator``
  protocol), so the real runner / record / preset machinery runs on a known landscape;
* ``ImageStatScorer``: a weight-free scorer with JAQ's protocol (``components``/``combine``/``score``);
* ``save_openai_torchscript``: a tiny random CLIP written in OpenAI's file format (what ``RN50.pt`` is), for a real
  JAQ without downloads;
* ``AnonPeak``: peak anonymous memory of the process (the in-process ComfyUI checks and the ComfyUI benchmark).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..qsched.coefficients import Coefficients
from .search import Point


def _quadratic(opt: Sequence[float], scale: Sequence[float] | None = None, base: float = 1.0):
    def f(p):
        s = scale or [1.0] * len(p)
        return base - math.fsum(w * (v - o) ** 2 for v, o, w in zip(p, opt, s))
    return f


def synthetic_objective(name: str, dim: int) -> Callable[[Point], float]:
    """Objectives on points of a ``dim``-D space, maximised; the names say their shape.

    * ``bowl``      concave quadratic, optimum at 0.93 / 1.07 alternating.
    * ``ridge``     correlated valley along c_x ≈ c_eps (as the Q-Sched update couples them).
    * ``multimodal`` bowl plus a cosine ripple: several local maxima, one global.
    * ``flat``      constant: every point ties, so selection must return identity.
    """
    opt = [0.93 if i % 2 == 0 else 1.07 for i in range(dim)]
    if name == "bowl":
        return _quadratic(opt, [1.0 + 0.5 * i for i in range(dim)])
    if name == "ridge":
        def f(p):
            d = [v - o for v, o in zip(p, opt)]
            along = math.fsum(d) / math.sqrt(dim)
            across = math.fsum(x * x for x in d) - along * along
            return 1.0 - 40.0 * across - 0.5 * along * along
        return f
    if name == "multimodal":
        bowl = _quadratic(opt, [4.0] * dim)
        return lambda p: bowl(p) + 0.01 * math.fsum(math.cos(60.0 * (v - o)) for v, o in zip(p, opt))
    if name == "flat":
        return lambda p: 1.0
    raise ValueError(f"synthetic objective must be one of bowl, ridge, multimodal, flat; got {name!r}")


class SyntheticGenerator:
    """Images whose every pixel is ``fn(coefficients, prompt, seed)``: a known objective behind the real
    runner/record/preset machinery. Values are not clamped to 0..1 (only ``ImageStatScorer`` reads them)."""

    def __init__(self, fn: Callable[[Coefficients, str, int], float], steps: int, size: int = 4,
                 name: str = "synthetic"):
        self.fn, self.steps, self.size, self.name = fn, steps, size, name
        self.calls = 0

    def fingerprint(self) -> dict:
        return {"class": "SyntheticGenerator", "name": self.name, "steps": self.steps, "family": "synthetic",
                "sampler": "none", "quant": None, "model_hash": hashlib.sha256(self.name.encode()).hexdigest()}

    def generate(self, coefficients, prompts, seeds):
        coefficients.check_steps(self.steps)
        self.calls += 1
        vals = torch.tensor([float(self.fn(coefficients, p, s)) for p, s in zip(prompts, seeds)], dtype=torch.float64)
        return vals.reshape(-1, 1, 1, 1).expand(-1, self.size, self.size, 3).clone()


class ImageStatScorer:
    """Deterministic, weight-free stand-in for JAQ with the same protocol: ``tc`` = mean pixel value,
    ``iq`` = pixel standard deviation (contrast), ``score = tc + k·iq``. Not a quality metric."""

    def __init__(self, k: float = 2.0):
        self.k = float(k)
        self.config = {"class": "ImageStatScorer", "tc": "mean", "iq": "std", "k": self.k}

    def components(self, images: torch.Tensor, prompts) -> dict:
        x = images.double().reshape(images.shape[0], -1)
        return {"tc": x.mean(dim=1), "iq": x.std(dim=1, unbiased=False)}

    def combine(self, tc, iq):
        return tc + self.k * iq

    def score(self, images, prompts):
        c = self.components(images, prompts)
        return self.combine(c["tc"], c["iq"])


class ToyTrajectoryGenerator:
    """A tiny deterministic denoiser behind the real samplers of ``qsched.samplers``, offering both generator
    protocols (``generate`` and ``reference.TrajectoryGenerator``): the reference fit's tests run the same
    sampler code as users. ``distortion`` perturbs the network (a stand-in for quantization error):

        denoised = tanh(x / sqrt(1 + sigma²) + m_prompt)·(1 + distortion) + distortion·0.3·sin(2x)
    """

    SCHEDULE = {"euler": "sdxl_turbo", "euler_ancestral": "sdxl_turbo", "tcd": "tcd", "lcm": "lcm"}

    def __init__(self, sampler: str = "euler", parameterization: str = "eps", steps: int = 4, *,
                 distortion: float = 0.0, eta: float | None = None, size: int = 6, batch_size: int | None = None,
                 name: str = "toy"):
        from ..qsched import samplers
        from ..qsched.schedules import few_step_sigmas

        samplers.check_sampler(sampler, parameterization)
        self.sampler, self.parameterization, self.steps = sampler, parameterization, steps
        self.distortion, self.size, self.batch_size, self.name = float(distortion), size, batch_size, name
        self.options = {} if eta is None else {"eta": float(eta)}
        family = "flux_schnell" if parameterization == "flow" else self.SCHEDULE[sampler]
        self.sigmas = few_step_sigmas(family, steps).float()

    def fingerprint(self) -> dict:
        return {"class": "ToyTrajectoryGenerator", "name": self.name, "sampler": self.sampler, "steps": self.steps,
                "parameterization": self.parameterization, "distortion": self.distortion, "options": self.options}

    def _m(self, prompts) -> torch.Tensor:
        vals = [int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) / 2**32 - 0.5 for p in prompts]
        return torch.tensor(vals).reshape(-1, 1, 1, 1)

    def denoiser(self, prompts):
        m, k = self._m(prompts), self.distortion

        def model(x, sigma, **_):
            s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
            d = torch.tanh(x / torch.sqrt(1 + s * s) + m)
            return d * (1 + k) + k * 0.3 * torch.sin(2 * x) if k else d
        return model

    def start(self, seeds) -> torch.Tensor:
        noise = torch.cat([torch.randn((1, 3, self.size, self.size), generator=torch.Generator().manual_seed(int(s)))
                           for s in seeds])
        s0 = float(self.sigmas[0])
        return noise * ((1 + s0 * s0) ** 0.5 if self.parameterization == "eps" else s0)

    def sampler_kwargs(self, seeds) -> dict:
        from .generate import per_sample_noise_sampler

        kw = dict(self.options)
        if self.sampler != "tcd":
            kw["parameterization"] = self.parameterization
        if self.sampler in ("tcd", "lcm", "euler_ancestral"):
            kw["noise_sampler"] = per_sample_noise_sampler(torch.zeros(1, 3, self.size, self.size), seeds)
        return kw

    def latents(self, coefficients, prompts, seeds) -> torch.Tensor:
        from ..qsched import samplers

        fn = samplers.SAMPLERS[self.sampler]
        return fn(self.denoiser(prompts), self.start(seeds), self.sigmas, None, disable=True,
                  coefficients=coefficients, **self.sampler_kwargs(seeds))

    def generate(self, coefficients, prompts, seeds) -> torch.Tensor:
        from .generate import check_generate_args

        prompts, seeds = check_generate_args(coefficients, prompts, seeds, self.steps)
        return torch.sigmoid(self.latents(coefficients, prompts, seeds)).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------------ tiny CLIP weight files
TEXT_CFG = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)


def tiny_clip(vision: dict, seed: int, quick_gelu: bool = True):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TEXT_CFG, quick_gelu=quick_gelu).eval()


def save_openai_torchscript(path: Path, kind: str, seed: int = 0) -> Path:
    """kind: "rn" (RN50-like ModifiedResNet) or "vit" (ViT with 7 blocks, so CLIP Surgery's 6 fit)."""
    import open_clip

    vision = (dict(layers=(1, 1, 1, 1), width=16, head_width=64, image_size=64) if kind == "rn"
              else dict(layers=7, width=64, head_width=64, patch_size=16, image_size=64))
    model = tiny_clip(vision, seed)
    model.logit_scale.data.fill_(math.log(100.0))  # as in OpenAI's released files (the clamp value)
    # OpenAI's files keep the causal mask out of the state dict; open_clip registers it as a buffer
    model.attn_mask = model._buffers.pop("attn_mask")
    with warnings.catch_warnings():  # tracing is only a way to write the TorchScript format OpenAI ships
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.rand(1, 3, 64, 64), open_clip.tokenize(["a photo"])), check_trace=False)
        traced.save(str(path))
    return path


# ------------------------------------------------------------------------------------ memory
class AnonPeak:
    """Peak anonymous resident memory of this process (Linux ``RssAnon``) while the ``with`` block runs, sampled
    every few milliseconds: memory-mapped file pages (safetensors tensors) are page cache and count under RssFile
    instead. ``growth`` = peak − value at entry."""

    def __enter__(self):
        self.base = self.peak = self.now()
        self.stop = False
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()
        return self

    @staticmethod
    def now():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def loop(self):
        while not self.stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self.now())
        self.growth = self.peak - self.base
