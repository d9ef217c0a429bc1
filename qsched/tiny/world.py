"""The trained tiny world as one object: weights file <-> networks, the calibration generator, the scorers and the
reference metric.

Weights: one safetensors file (``tiny_world.safetensors``) with prefixed tensors (``generator.``,
``text_encoder.``, ``tc.``, ``iq.``, ``ref.``) and the training config as JSON metadata. ``TinyWorld.load()``
looks in the pack (``qsched/tiny/weights/``), then in the cache (``$QSCHED_TINY_DIR`` or
``~/.cache/qsched/tiny``); with ``train_if_missing=True`` it trains there (about 5-8 min on 2 CPU cores).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .. import samplers
from ..coefficients import Coefficients
from ..schedules import few_step_sigmas
from .data import IMAGE_SIZE, load_digit_set, to_image
from .metrics import ReferenceMetric
from .model import QUANT_SKIP, FlowConfig, FlowDenoiser, TextEncoder, TinyFlowNet, to_pixels
from .scorers import ImageQualityNet, JointClassifierNet, ReferenceNet, TinyImageQuality, TinyTextAlignment

WEIGHTS_NAME = "tiny_world.safetensors"
PACKAGED = Path(__file__).resolve().parent / "weights" / WEIGHTS_NAME
ENV_DIR = "QSCHED_TINY_DIR"
PARTS = ("generator", "text_encoder", "tc", "iq", "ref")
FLOW_SAMPLERS = ("euler", "euler_ancestral", "lcm")


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "qsched" / "tiny")


def save_world(world: dict, path: str | os.PathLike) -> str:
    """Write the networks of ``train.train_world``'s result (atomically) to ``path``."""
    from safetensors.torch import save_file

    tensors = {}
    for part in PARTS:
        for k, v in world[part].state_dict().items():
            tensors[f"{part}.{k}"] = v.detach().contiguous().clone()
    meta = {"format": "qsched-tiny-world", "version": "1", "config": json.dumps(world["config"], sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return str(path)


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "qsched-tiny-world":
                raise ValueError(f"{path} is not a tiny-world weights file (metadata format={meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        fc = FlowConfig(**config["flow"])
        nets = {"generator": TinyFlowNet(fc), "text_encoder": TextEncoder(fc.word_dim, fc.text_dim),
                "tc": JointClassifierNet(), "iq": ImageQualityNet(), "ref": ReferenceNet()}
        for part, net in nets.items():
            sd = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
            net.load_state_dict(sd, strict=True)
        world = cls(**nets, config=config, model_hash=file_hash(path))
        world.source = str(path)
        return world

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, train_if_missing: bool = False, log=print) -> "TinyWorld":
        """``path``, else the packaged weights, else the cache; else train into the cache (if allowed)."""
        if path is not None:
            return cls.from_file(path)
        for candidate in (PACKAGED, cache_dir() / WEIGHTS_NAME):
            if candidate.is_file():
                return cls.from_file(candidate)
        if not train_if_missing:
            raise FileNotFoundError(f"no tiny-world weights at {PACKAGED} or {cache_dir() / WEIGHTS_NAME}; train them "
                                    "with `python -m qsched_pack.qsched.tiny.train --out DIR` (then set "
                                    f"{ENV_DIR}=DIR) or pass train_if_missing=True")
        from .train import train_world

        target = cache_dir() / WEIGHTS_NAME
        if log:
            log(f"training the tiny world into {target} (one time, a few minutes on CPU)")
        save_world(train_world(log=log), target)
        return cls.from_file(target)

    # ---------------------------------------------------------------------------------------- parts
    def quantized_generator(self, spec, backend: str = "simulated", skip=QUANT_SKIP):
        """A quantized copy of the generator (``qsched.quant.quantize_``) and its report."""
        from ..quant import quantize_

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
    out = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(int(s))
        out.append(torch.randn((1, 1, IMAGE_SIZE, IMAGE_SIZE), generator=g))
    return torch.cat(out)


def per_sample_noise_sampler(seeds: Sequence[int], offset: int = 1):
    """Per-step noise for ancestral samplers, one generator per image (same rule as calibration.generate)."""
    gens = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(int(s) * 1000003 + offset)
        gens.append(g)
    return lambda sigma, sigma_next: torch.cat(
        [torch.randn((1, 1, IMAGE_SIZE, IMAGE_SIZE), generator=g) for g in gens])


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
        prompts, seeds = list(prompts), list(seeds)
        if len(prompts) != len(seeds):
            raise ValueError(f"one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
        if coefficients is not None:
            coefficients.check_steps(self.steps)
        model = self.denoiser(prompts)
        if self.model_wrapper is not None:
            model = self.model_wrapper(model, self.sigmas)
        x = initial_noise(seeds) * self.sigmas[0]
        opts = dict(self.sampler_options)
        if self.sampler != "euler":
            opts["noise_sampler"] = per_sample_noise_sampler(seeds)
        fn = samplers.SAMPLERS[self.sampler]
        return fn(model, x, self.sigmas, None, disable=True, coefficients=coefficients, parameterization="flow",
                  **opts)

    def generate(self, coefficients: Coefficients | None, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return to_image(to_pixels(self.latents(coefficients, prompts, seeds)))
