"""The trained tiny world as one object: weights file <-> networks, the calibration generator, the scorers and the
reference metric.

The weights file format and where it is looked for: ``checkpoint.py``. ``TinyWorld.load()`` never trains: a caller
that wants missing weights trained calls ``train.load_or_train()`` (about 5-8 min on 2 CPU cores).
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

import torch
from torch import nn

from ...qsched import samplers
from ...qsched.coefficients import Coefficients
from ...qsched.schedules import few_step_sigmas
from ..generate import per_sample_noise_sampler, seeded_noise
from . import checkpoint
from .data import IMAGE_SIZE, load_digit_set, to_image
from .metrics import ReferenceMetric
from .model import QUANT_SKIP, FlowConfig, FlowDenoiser, TextEncoder, TinyFlowNet, to_pixels
from .scorers import ImageQualityNet, JointClassifierNet, ReferenceNet, TinyImageQuality, TinyTextAlignment

FLOW_SAMPLERS = ("euler", "euler_ancestral", "lcm")


class TinyWorld:
    """Networks of the tiny world (all in eval mode, float32, CPU)."""

    def __init__(self, generator: TinyFlowNet, text_encoder: TextEncoder, tc: JointClassifierNet,
                 iq: ImageQualityNet, ref: ReferenceNet, config: dict | None = None, model_hash: str | None = None):
        self.generator, self.text_encoder = generator.eval(), text_encoder.eval()
        self.tc_net, self.iq_net, self.ref_net = tc.eval(), iq.eval(), ref.eval()
        for m in (self.generator, self.text_encoder, self.tc_net, self.iq_net, self.ref_net):
            for p in m.parameters():
                p.requires_grad_(False)
        self.config = config or {}
        self.model_hash = model_hash
        self.source: str | None = None  # the weights file it was loaded from
        self._reference = None

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_training(cls, world: dict) -> "TinyWorld":
        return cls(world["generator"], world["text_encoder"], world["tc"], world["iq"], world["ref"], world["config"])

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TinyWorld":
        parts, config, sha256 = checkpoint.read(path)
        fc = FlowConfig(**config["flow"])
        nets = {"generator": TinyFlowNet(fc), "text_encoder": TextEncoder(fc.word_dim, fc.text_dim),
                "tc": JointClassifierNet(), "iq": ImageQualityNet(), "ref": ReferenceNet()}
        for part, net in nets.items():
            net.load_state_dict(parts[part], strict=True)
        world = cls(**nets, config=config, model_hash=sha256)
        world.source = str(path)
        return world

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "TinyWorld":
        """``path``, else the packaged weights, else the cached ones. Missing weights raise FileNotFoundError:
        the caller decides whether to train (``train.load_or_train``)."""
        if path is not None:
            return cls.from_file(path)
        found = checkpoint.find()
        if found is None:
            raise FileNotFoundError(f"no tiny-world weights at {checkpoint.PACKAGED} or {checkpoint.cached_path()}; "
                                    "train them with `python -m qsched_pack.calibration.tinyworld.train --out DIR` "
                                    f"(then set {checkpoint.ENV_DIR}=DIR)")
        return cls.from_file(found)

    # ---------------------------------------------------------------------------------------- parts
    def quantized_generator(self, spec, backend: str = "simulated", skip=QUANT_SKIP):
        """A quantized copy of the generator (``qsched.quant.quantize_``) and its report."""
        from ...qsched.quant import quantize_

        net = copy.deepcopy(self.generator)
        report = quantize_(net, spec, backend=backend, skip=skip)
        return net.eval(), report

    def text_alignment(self) -> TinyTextAlignment:
        return TinyTextAlignment(self.tc_net)

    def image_quality(self) -> TinyImageQuality:
        return TinyImageQuality(self.iq_net)

    def reference(self) -> ReferenceMetric:
        if self._reference is None:
            self._reference = ReferenceMetric(self.ref_net, load_digit_set("heldout"))
        return self._reference

    def sampler(self, steps: int = 4, *, net: nn.Module | None = None, sampler: str = "euler", quant: str | None = None,
                **sampler_options) -> "TinyGenerator":
        return TinyGenerator(net if net is not None else self.generator, self.text_encoder, steps=steps,
                             sampler=sampler, quant=quant, model_hash=self.model_hash, **sampler_options)


def initial_noise(seeds: Sequence[int]) -> torch.Tensor:
    """One N(0, 1) image per seed from its own generator (an image never depends on its batch)."""
    return torch.cat([seeded_noise(s, (1, IMAGE_SIZE, IMAGE_SIZE)) for s in seeds])


class TinyGenerator:
    """``generate(coefficients, prompts, seeds) -> [B, 16, 16, 3]`` in 0..1 (``calibration.generate.Generator``).

    Flow schedule ``few_step_sigmas("flux_schnell", steps)`` (1, 1 − 1/N, ..., 1/N, 0); the image of (prompt,
    seed) uses the same noise at every coefficient point; prompts are encoded once and cached."""

    def __init__(self, net: nn.Module, text_encoder: TextEncoder, steps: int = 4, sampler: str = "euler",
                 quant: str | None = None, model_hash: str | None = None, model_wrapper=None, **sampler_options):
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler must be one of {FLOW_SAMPLERS} (flow model), got {sampler!r}")
        self.net, self.text_encoder = net, text_encoder
        self.steps, self.sampler, self.quant = steps, sampler, quant
        self.sampler_options = sampler_options
        self.sigmas = few_step_sigmas("flux_schnell", steps).float()
        self.model_hash = model_hash
        self.model_wrapper = model_wrapper  # e.g. PTQDCorrection.wrap-style: (denoiser, sigmas) -> denoiser
        self._text: dict[str, torch.Tensor] = {}

    def fingerprint(self) -> dict:
        return {"class": "TinyGenerator", "family": "tiny_flow", "sampler": self.sampler, "steps": self.steps,
                "quant": self.quant, "model_hash": self.model_hash, "size": IMAGE_SIZE,
                "sampler_options": self.sampler_options, "corrected": self.model_wrapper is not None}

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            for p, t in zip(missing, self.text_encoder.encode(missing)):
                self._text[p] = t
        return torch.stack([self._text[p] for p in prompts])

    def denoiser(self, prompts: Sequence[str]) -> FlowDenoiser:
        return FlowDenoiser(self.net, self.encode(list(prompts)))

    @torch.no_grad()
    def latents(self, coefficients: Coefficients | None, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        from ..generate import check_generate_args

        prompts, seeds = check_generate_args(coefficients, prompts, seeds, self.steps)
        model = self.denoiser(prompts)
        if self.model_wrapper is not None:
            model = self.model_wrapper(model, self.sigmas)
        x = initial_noise(seeds) * self.sigmas[0]
        opts = dict(self.sampler_options)
        if self.sampler != "euler":
            opts["noise_sampler"] = per_sample_noise_sampler(x, seeds)
        fn = samplers.SAMPLERS[self.sampler]
        return fn(model, x, self.sigmas, None, disable=True, coefficients=coefficients, parameterization="flow",
                  **opts)

    def generate(self, coefficients: Coefficients | None, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return to_image(to_pixels(self.latents(coefficients, prompts, seeds)))
