"""The shape world as one object: weight files -> generators of the three few-step families, the pack's real JAQ
(CLIPScore + CLIP-IQA on the tiny CLIP file) and the reference metric.

Files (``calibration/shapeworld/weights/``, or ``$QSCHED_SHAPEWORLD_DIR``):

* ``shapeworld.safetensors`` -- float16 tensors ``lcm.*``, ``tcd.*``, ``flow.*`` (``ShapeUNet``) and ``ref.*``
  (``ReferenceNet``), the training config as JSON metadata.
* ``shapeworld_clip.safetensors`` -- the tiny CLIP as an **OpenAI-format state dict** (the key layout of OpenAI's
  ``RN50.pt``) in safetensors, loaded by the pack's own CLIPScore and CLIP-IQA exactly as a user's
  ``RN50.safetensors`` / ``ViT-L-14.safetensors``.

Families: ``lcm`` (``samplers.sample_lcm``, EPS, LCM schedule), ``tcd`` (``samplers.sample_tcd``, gamma 0.3, TCD
schedule), ``flow`` (``samplers.sample_euler`` flow, FLUX-schnell schedule).
"""

from __future__ import annotations

import copy
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from ...qsched import samplers
from ...qsched._io import atomic_write, file_sha256
from ...qsched.coefficients import Coefficients
from ...qsched.schedules import alphas_cumprod_scaled_linear, few_step_sigmas
from ..generate import per_sample_noise_sampler
from ..metrics.frechet import frechet_distance
from . import data as D
from .nets import QUANT_SKIP, EpsDenoiser, FlowDenoiser, ReferenceNet, ShapeUNet, UNetConfig

WEIGHTS = "shapeworld.safetensors"
CLIP_FILE = "shapeworld_clip.safetensors"
PACKAGED = Path(__file__).resolve().parent / "weights"
ENV_DIR = "QSCHED_SHAPEWORLD_DIR"
FAMILIES = ("lcm", "tcd", "flow")
FAMILY = {  # family -> (sampler, parameterization, schedule family, sampler options)
    "lcm": ("lcm", "eps", "lcm", {}),
    "tcd": ("tcd", "eps", "tcd", {"eta": 0.3}),
    "flow": ("euler", "flow", "flux_schnell", {}),
}
HELDOUT_SEED = 777_000
REFERENCE_PER_PROMPT = 50


def weights_dir(path=None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else PACKAGED


def assemble(parts_dir: str, out_dir: str, config: dict) -> dict:
    """Write the two weight files from the parts ``train.run_parts`` wrote (``<part>.pt``)."""
    from safetensors.torch import save_file

    tensors, steps = {}, {}
    for part in ("teacher", "lcm", "tcd", "flow", "clip", "ref"):
        f = os.path.join(parts_dir, f"{part}.steps.json")
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                steps[part] = json.load(fh)["steps"]
    for part in ("lcm", "tcd", "flow", "ref"):
        sd = torch.load(os.path.join(parts_dir, f"{part}.pt"), map_location="cpu", weights_only=True)
        for k, v in sd.items():
            v = v.detach()
            tensors[f"{part}.{k}"] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous().clone()
    meta = {"format": "qsched-shapeworld", "version": "1",
            "config": json.dumps(dict(config, unet=UNetConfig().to_dict(), trained_steps=steps), sort_keys=True,
                                  default=str)}
    os.makedirs(out_dir, exist_ok=True)
    target = atomic_write(os.path.join(out_dir, WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata=meta))
    clip = torch.load(os.path.join(parts_dir, "clip.pt"), map_location="cpu", weights_only=True)
    clip = {k: v.contiguous() for k, v in clip.items()}
    clip_dst = atomic_write(os.path.join(out_dir, CLIP_FILE),
                            lambda tmp: save_file(clip, tmp, metadata={"format": "openai-clip-state-dict"}))
    return {"weights": target, "clip": clip_dst}


class ShapeWorld:
    """Networks of the shape world (float32, eval mode, on ``device``)."""

    def __init__(self, nets: dict, ref: ReferenceNet, clip_path: Path, config: dict, model_hash: str, device):
        self.nets, self.ref_net, self.clip_path = nets, ref, Path(clip_path)
        self.config, self.model_hash, self.device = config, model_hash, torch.device(device)
        for m in list(nets.values()) + [ref]:
            m.eval().requires_grad_(False)
        self._reference = None

    @classmethod
    def load(cls, path=None, device="cpu") -> "ShapeWorld":
        """``path``: a folder holding both files (default: ``$QSCHED_SHAPEWORLD_DIR``, else the packaged ones)."""
        from safetensors import safe_open

        folder = weights_dir(path)
        wfile, cfile = folder / WEIGHTS, folder / CLIP_FILE
        for f in (wfile, cfile):
            if not f.is_file():
                raise FileNotFoundError(f"shape world: {f} is missing; train it with `python -m "
                                        f"qsched_pack.calibration.shapeworld.train --out DIR --assemble` and pass "
                                        f"DIR (or set {ENV_DIR}=DIR)")
        with safe_open(str(wfile), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != "qsched-shapeworld":
                raise ValueError(f"{wfile} is not a shape-world weights file (format={meta.get('format')!r})")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        config = json.loads(meta["config"])
        ucfg = UNetConfig.from_dict(config["unet"])
        nets = {}
        for fam in FAMILIES:
            net = ShapeUNet(ucfg)
            net.load_state_dict({k[len(fam) + 1:]: v.float() for k, v in tensors.items()
                                 if k.startswith(fam + ".")}, strict=True)
            nets[fam] = net.to(device)
        ref = ReferenceNet()
        ref.load_state_dict({k[4:]: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()
                             if k.startswith("ref.")}, strict=True)
        return cls(nets, ref.to(device), cfile, config, file_sha256(wfile)[:16] + file_sha256(cfile)[:16], device)

    # ------------------------------------------------------------------------------------------ parts
    def quantized(self, family: str, fmt: str):
        """A quantized copy of ``family``'s UNet: the pack's ``quantize_`` (simulated backend), convolutions too
        (``quantize_conv=True``), ``QUANT_SKIP`` left full precision. Returns (net, report)."""
        from ...qsched.quant import QuantSpec, quantize_

        net = copy.deepcopy(self.nets[family])
        report = quantize_(net, QuantSpec.parse(fmt, quantize_conv=True), backend="simulated", skip=QUANT_SKIP)
        return net.eval(), report

    def jaq(self, k: float = 2.0, tc_transform: str = "log_per_image", batch_size: int = 256):
        """The pack's JAQ, unchanged: ln(CLIPScore) + k·CLIP-IQA, both loaded from the tiny CLIP file by the shipped
        loaders. Default ``log_per_image`` (mean of per-image ln CLIPScore): the rule the shipped tables were made
        with (the GPU run predates the official ln-of-mean ``log`` rule); pass ``"log"`` for that one."""
        from ..jaq import JAQ

        dtype = torch.float32  # fp32 everywhere: the same scores on CPU and GPU up to float error
        return JAQ(tc="clipscore", iq="clipiqa", k=k, tc_transform=tc_transform, device=self.device, dtype=dtype,
                   weights={"clipscore": str(self.clip_path), "clipiqa": str(self.clip_path)},
                   batch_size=batch_size)

    def reference(self) -> "Reference":
        if self._reference is None:
            caps = [c for c in D.calibration_prompts() for _ in range(REFERENCE_PER_PROMPT)]
            real = D.make_scenes(len(caps), HELDOUT_SEED, self.device, captions=caps)
            self._reference = Reference(self.ref_net, real.images)
        return self._reference

    def generator(self, family: str, steps: int, *, net=None, quant: str | None = None,
                  model_wrapper=None) -> "ShapeGenerator":
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        return ShapeGenerator(self.nets[family] if net is None else net, family, steps, quant=quant,
                              model_hash=self.model_hash, model_wrapper=model_wrapper)


def initial_noise(seeds: Sequence[int], device) -> torch.Tensor:
    """One N(0, 1) image per seed from its own CPU generator (same noise on every device and batch)."""
    return torch.cat([torch.randn((1, 3, D.SIZE, D.SIZE), generator=torch.Generator().manual_seed(int(s)))
                      for s in seeds]).to(device)


class ShapeGenerator:
    """``generate(coefficients, prompts, seeds) -> [B, 32, 32, 3]`` in 0..1 (``calibration.generate.Generator``)."""

    def __init__(self, net, family: str, steps: int, *, quant=None, model_hash=None, model_wrapper=None):
        self.net, self.family, self.steps, self.quant = net, family, steps, quant
        self.sampler, self.parameterization, sched, self.options = FAMILY[family]
        self.sigmas = few_step_sigmas(sched, steps).float()
        self.model_hash, self.model_wrapper = model_hash, model_wrapper
        self.device = next(net.buffers(), next(net.parameters(), None)).device
        self._ac = alphas_cumprod_scaled_linear()
        self._text: dict[str, torch.Tensor] = {}

    def fingerprint(self) -> dict:
        return {"class": "ShapeGenerator", "family": self.family, "sampler": self.sampler, "steps": self.steps,
                "quant": self.quant, "model_hash": self.model_hash, "size": D.SIZE, "options": self.options,
                "corrected": self.model_wrapper is not None}

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            with torch.no_grad():
                for p, t in zip(missing, self.net.encode(missing)):
                    self._text[p] = t
        return torch.stack([self._text[p] for p in prompts])

    def denoiser(self, prompts: Sequence[str]):
        """The k-diffusion model for that batch, with ``model_wrapper`` (e.g. PTQD's correction) applied: the
        model the sampler runs (and the reference fit probes)."""
        text = self.encode(list(prompts))
        model = (EpsDenoiser if self.parameterization == "eps" else FlowDenoiser)(self.net, text)
        return model if self.model_wrapper is None else self.model_wrapper(model, self.sigmas)

    def start(self, seeds: Sequence[int]) -> torch.Tensor:
        noise = initial_noise(seeds, self.device)
        s0 = float(self.sigmas[0])
        return noise * ((1 + s0 ** 2) ** 0.5 if self.parameterization == "eps" else s0)

    def sampler_kwargs(self, seeds: Sequence[int]) -> dict:
        kw = dict(self.options)
        if self.sampler in ("lcm", "tcd"):
            kw["noise_sampler"] = per_sample_noise_sampler(torch.empty((0, 3, D.SIZE, D.SIZE), device=self.device),
                                                           seeds)
        if self.sampler != "tcd":
            kw["parameterization"] = self.parameterization
        return kw

    @torch.no_grad()
    def latents(self, coefficients: Coefficients | None, prompts: Sequence[str], seeds: Sequence[int]):
        from ..generate import check_generate_args

        prompts, seeds = check_generate_args(coefficients, prompts, seeds, self.steps)
        model = self.denoiser(prompts)
        fn = samplers.SAMPLERS[self.sampler]
        return fn(model, self.start(seeds), self.sigmas.to(self.device), None, disable=True,
                  coefficients=coefficients, **self.sampler_kwargs(seeds))

    def generate(self, coefficients, prompts, seeds, batch: int = 512) -> torch.Tensor:
        prompts, seeds = list(prompts), list(seeds)
        out = [D.to_image((self.latents(coefficients, prompts[i:i + batch], seeds[i:i + batch]) + 1) / 2)
               for i in range(0, len(prompts), batch)]
        return torch.cat(out)


    def generate_points(self, coefficient_list: Sequence[Coefficients | None], prompts, seeds,
                        max_images: int = 2560) -> torch.Tensor:
        """The images of every coefficient set, set after set (``[len(coefficient_list)·B, 32, 32, 3]``): the same
        images as one :meth:`generate` per set up to float error, but the network runs once per step on up to
        ``max_images`` images of many sets (:class:`Lockstep`). Each set's sampler run, noise and coefficients are
        its own, unchanged (common random numbers: every set starts from the same noise of ``seeds``)."""
        prompts, seeds, sets = list(prompts), list(seeds), list(coefficient_list)
        per = max(1, max_images // max(1, len(prompts)))
        out = []
        for i in range(0, len(sets), per):
            chunk = sets[i:i + per]
            if len(chunk) == 1 or len(prompts) > max_images:
                out += [self.generate(c, prompts, seeds) for c in chunk]
            else:
                out.append(self._lockstep(chunk, prompts, seeds))
        return torch.cat(out)

    @torch.no_grad()
    def _lockstep(self, sets, prompts, seeds) -> torch.Tensor:
        from ..generate import check_generate_args

        for c in sets:
            check_generate_args(c, prompts, seeds, self.steps)
        text = self.encode(prompts).repeat(len(sets), 1)
        shared = (EpsDenoiser if self.parameterization == "eps" else FlowDenoiser)(self.net, text)
        step = Lockstep(shared, len(sets))
        start, sigmas = self.start(seeds), self.sigmas.to(self.device)
        fn = samplers.SAMPLERS[self.sampler]

        def run(j):
            def model(x, sigma, **_):
                return step.call(j, x, sigma)

            if self.model_wrapper is not None:
                model = self.model_wrapper(model, self.sigmas)
            try:
                x = fn(model, start.clone(), sigmas, None, disable=True, coefficients=sets[j],
                       **self.sampler_kwargs(seeds))
            except BaseException as exc:
                step.leave(exc)
                raise
            step.leave(None)
            return D.to_image((x + 1) / 2)

        with ThreadPoolExecutor(len(sets), thread_name_prefix="shapeworld-lockstep") as pool:
            futures = [pool.submit(run, j) for j in range(len(sets))]
        if any(f.exception() is not None for f in futures):  # the first failure, not the runs it stopped
            raise step.error if step.error is not None else next(f.exception() for f in futures if f.exception())
        return torch.cat([f.result() for f in futures])


class LockstepAborted(RuntimeError):
    """Another run of the same :class:`Lockstep` failed; this one stopped (the first error is raised)."""


class Lockstep:
    """K sampler runs (threads) that share one network call per step: each run calls ``call(j, x, sigma)``;
    when every run still going has arrived, the last one runs ``model`` once on all inputs (concatenated in run
    order) and each gets its own slice back. A run that ends calls ``leave`` (with its error, if it failed:
    the others then stop with :class:`LockstepAborted`)."""

    def __init__(self, model, k: int):
        self.model, self.active = model, k
        self.cond = threading.Condition()
        self.pending: dict[int, tuple] = {}
        self.results: dict[int, torch.Tensor] = {}
        self.error: BaseException | None = None

    def _fire(self) -> None:  # holding self.cond
        if not self.pending or len(self.pending) < self.active or self.error is not None:
            return
        order = sorted(self.pending)
        xs = [self.pending[j][0] for j in order]
        try:
            out = self.model(torch.cat(xs), torch.cat([self.pending[j][1] for j in order]))
            self.results.update(zip(order, out.split([x.shape[0] for x in xs])))
        except BaseException as exc:
            self.error = exc
        self.pending = {}
        self.cond.notify_all()

    def call(self, j: int, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with self.cond:
            self.pending[j] = (x, sigma.reshape(-1).expand(x.shape[0]))
            self._fire()
            while j not in self.results and self.error is None:
                self.cond.wait()
            if j in self.results:
                return self.results.pop(j)
            raise LockstepAborted("stopped: another run of this batch failed") from self.error

    def leave(self, error: BaseException | None) -> None:
        with self.cond:
            self.active -= 1
            if error is not None and self.error is None:
                self.error = error
                self.cond.notify_all()
            self._fire()


class PointBatched:
    """A :class:`ShapeGenerator` that offers ``generate_many`` (its ``generate_points``), so ``calibration.runner``
    evaluates a search's points together (the grid sends 64 at a time, zoom its polls); same fingerprint plus
    ``point_batched``. Opt-in: a plain ShapeGenerator is evaluated one point at a time, as before."""

    def __init__(self, gen: ShapeGenerator, max_images: int = 2560):
        self.gen, self.max_images = gen, max_images
        self.steps, self.device = gen.steps, gen.device

    def __getattr__(self, name):  # the rest of the generator (reference.TrajectoryGenerator: sigmas, denoiser...)
        if name == "gen":
            raise AttributeError(name)
        return getattr(self.gen, name)

    def fingerprint(self) -> dict:
        return dict(self.gen.fingerprint(), point_batched=True)

    def generate(self, coefficients, prompts, seeds) -> torch.Tensor:
        return self.gen.generate(coefficients, prompts, seeds)

    def generate_many(self, coefficient_list, prompts, seeds) -> torch.Tensor:
        return self.gen.generate_points(coefficient_list, prompts, seeds, self.max_images)


class Reference:
    """Never used for calibration: Fréchet distance (``ReferenceNet`` 64-d features) against held-out renders of
    the evaluation prompts, and attribute accuracy (all six caption factors right) of the same network."""

    def __init__(self, net: ReferenceNet, real: torch.Tensor):
        self.net = net.eval()
        self.device = next(net.parameters()).device
        self.real_features = self.features(real)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net.features(x01.to(self.device)).double().cpu()

    @staticmethod
    def _chw(images: torch.Tensor) -> torch.Tensor:
        return images.permute(0, 3, 1, 2).float()

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(self.features(self._chw(images)), self.real_features)

    def accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        with torch.inference_mode():
            out = self.net(self._chw(images).to(self.device))
        ok = torch.ones(images.shape[0], dtype=torch.bool)
        parsed = [D.parse_caption(p) for p in prompts]
        for k in D.CAPTION_FACTORS:
            target = torch.tensor([f[k] for f in parsed])
            ok &= out[k].argmax(-1).cpu() == target
        return float(ok.float().mean())

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        return {"fd": self.fd(images), "accuracy": self.accuracy(images, prompts)}
