"""Generators for calibration: ``generate(coefficients, prompts, seeds) -> images [B, H, W, 3]`` in 0..1.

Contract (``Generator``), what ``runner.Runner`` relies on:

* common random numbers: the image for (prompt i, seed i) uses the same initial noise *and* the same per-step
  noise draws at every coefficient point, and does not depend on which other prompts share its batch;
* text encodings are computed once per prompt and reused at every point;
* ``steps`` (the sampler's step count) and ``fingerprint()`` (a JSON dict naming the model file hash, family,
  sampler, steps, quantization, size... used to refuse resuming a record made for another setup).

``DiffusersGenerator`` runs a diffusers pipeline's networks through ``qsched.samplers`` (the same update rules
ComfyUI runs), for SDXL-Turbo, FLUX.1[schnell], LCM and PCM/TCD. ``load_pipeline`` reads a local diffusers
folder or a single-file checkpoint; nothing is ever downloaded. Deterministic stand-ins for tests and benchmarks
live in ``calibration.testing``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch

from ..qsched._io import file_sha256
from ..qsched import samplers
from ..qsched.coefficients import Coefficients, check_steps

# family -> (sampler, parameterization, sampler options, default guidance, default size, initial-noise rule)
FAMILIES = {
    "sdxl_turbo": ("euler_ancestral", "eps", {}, 0.0, 512, "sigma"),
    "flux_schnell": ("euler", "flow", {}, 0.0, 1024, "flow"),
    "lcm": ("lcm", "eps", {}, 8.0, 768, "vp"),
    "tcd": ("tcd", "eps", {"eta": 0.0}, 0.0, 1024, "vp"),
    "pcm": ("tcd", "eps", {"eta": 0.0}, 0.0, 1024, "vp"),
}
#: Few-step samplers: the schedules of ``qsched.schedules`` stop at 50 steps (the LCM/TCD training grid).
MAX_GENERATOR_STEPS = 50
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")


@runtime_checkable
class Generator(Protocol):
    steps: int

    def fingerprint(self) -> dict: ...

    def generate(self, coefficients: Coefficients, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------------
# hashing and loading

def check_generate_args(coefficients, prompts: Sequence[str], seeds: Sequence[int], steps: int):
    """The checks every generator runs first: coefficients for ``steps`` (or None), one seed per prompt.
    Returns (prompts, seeds) as lists."""
    if coefficients is not None:
        coefficients.check_steps(steps)
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    return prompts, seeds


def model_hash(path: str | os.PathLike) -> str:
    """sha256 of a single-file checkpoint; for a diffusers folder, sha256 over (relative name, file sha256)
    of every weight file in it, so renaming the folder keeps the hash and changing any weight changes it."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{p}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in this folder")
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def pipeline_config_digest(pipe) -> str:
    """sha256 over the configuration of every pipeline component as loaded (model configs, scheduler config,
    tokenizer vocabularies), so an edited VAE/UNet/scheduler config changes the fingerprint. Paths and library
    versions (keys starting with '_', ``transformers_version``) are left out: moving the folder keeps the hash."""
    h = hashlib.sha256()
    components = getattr(pipe, "components", None) or {}
    for name in sorted(components):
        comp = components[name]
        cfg = getattr(comp, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and not isinstance(cfg, dict):
            cfg = cfg.to_dict()
        if isinstance(cfg, dict):
            payload = {k: v for k, v in cfg.items() if not str(k).startswith("_") and k != "transformers_version"}
        elif hasattr(comp, "get_vocab"):
            vocab = json.dumps(sorted(comp.get_vocab().items()), ensure_ascii=False)
            payload = {"vocab": hashlib.sha256(vocab.encode()).hexdigest(),
                       "model_max_length": getattr(comp, "model_max_length", None)}
        else:
            payload = None
        h.update(json.dumps([name, type(comp).__name__, payload], sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()


#: Libraries a model_index.json component may come from: diffusers (models, schedulers, pipeline modules) and
#: transformers (text encoders, tokenizers). Anything else would be a module of the model folder.
COMPONENT_LIBRARIES = ("diffusers", "transformers")
INDEX_MAX_BYTES = 1 << 20


def _check_diffusers_folder(folder: Path, allow_missing_weights: Sequence[str] = ()) -> dict:
    """The parsed ``model_index.json`` of a diffusers folder, checked before diffusers sees it: a JSON object whose
    ``_class_name`` is a diffusers pipeline, whose components are ``[library, class]`` pairs of diffusers or
    transformers (or a diffusers pipeline module) in folders inside ``folder`` that hold no Python code, with
    their config and weight files. Nothing from the folder is ever imported (docs/security.md)."""
    from ..qsched._io import INDEX_NESTING, UnsafePath, brief, check_nesting, confined, read_text_capped

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: {index_file} is missing "
                                "(give the folder that holds model_index.json, or a single-file checkpoint with "
                                "--config <diffusers folder>)")
    text = read_text_capped(index_file, INDEX_MAX_BYTES, "model_index.json")
    check_nesting(text, str(index_file), INDEX_NESTING)
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{index_file} is not valid JSON: {brief(str(exc), 200)}") from None

    def bad(what: str):
        return ValueError(f"{index_file}: {what}. Use the pipeline folder as its publisher saved it "
                          "(save_pretrained); Q-Sched never runs code from a model folder")

    if not isinstance(index, dict):
        raise bad(f"must be a JSON object (component -> [library, class]), got {type(index).__name__}")
    _pipeline_class(index, index_file)
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec == [None, None]:
            continue  # pipeline config values (e.g. force_zeros_for_empty_prompt), absent optional components
        if not (len(spec) == 2 and all(isinstance(x, str) for x in spec)):
            raise bad(f"component {brief(name, 60)} must be [library, class], got {brief(spec)}")
        try:
            sub = confined(folder, name)
        except UnsafePath as exc:
            raise bad(f"component {exc}") from None
        _check_library(spec[0], name, bad)
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub} is missing (model_index.json lists component {name!r})")
        code = sorted(f.name for f in sub.iterdir() if f.suffix == ".py")
        if code:
            raise bad(f"component folder {name!r} holds Python code ({', '.join(code[:3])})")
        if name.startswith("scheduler"):
            need = [sub / "scheduler_config.json"]
        elif name.startswith("tokenizer"):
            need = []
            if not any(sub.iterdir()):
                raise FileNotFoundError(f"{sub} is empty (tokenizer files expected)")
        else:
            need = [sub / "config.json"]
            if name not in allow_missing_weights and not any(f.suffix in WEIGHT_SUFFIXES for f in sub.iterdir()):
                raise FileNotFoundError(f"{sub}: no weight file (*.safetensors / *.bin) for component {name!r}")
        for f in need:
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing (component {name!r} of {folder})")
    return index


def _check_library(library: str, name: str, bad) -> None:
    import diffusers.pipelines

    if library in COMPONENT_LIBRARIES:
        return
    if library.isidentifier() and isinstance(getattr(diffusers.pipelines, library, None), type(diffusers)):
        return  # a diffusers pipeline module (e.g. stable_diffusion's safety checker)
    from ..qsched._io import brief

    raise bad(f"component {brief(name, 60)} names library {brief(library, 60)}; only "
              f"{' and '.join(COMPONENT_LIBRARIES)} components are loaded")


def _denoiser_name(index: Mapping) -> str:
    if "transformer" in index:
        return "transformer"
    if "unet" in index:
        return "unet"
    raise ValueError(f"pipeline has neither a unet nor a transformer (components: {sorted(index)})")


def load_pipeline(path: str | os.PathLike, *, config: str | os.PathLike | None = None, dtype=torch.float32,
                  device: str | torch.device = "cpu"):
    """Load a diffusers pipeline from local files only.

    * ``path`` a diffusers folder (``model_index.json`` + component folders);
    * ``path`` a single ``.safetensors`` file with ``config`` a local diffusers folder of the same architecture
      (its configs/tokenizers/VAE/text encoders are used; its denoiser weights may be absent). The file may hold
      the denoiser in diffusers key layout (loaded strictly), or an original-layout checkpoint (UNet-only,
      FLUX transformer-only, or a full SD/SDXL checkpoint), converted by diffusers' single-file loaders.
    """
    from ..qsched._compat import ensure_torchvision_importable, require

    ensure_torchvision_importable()
    require("diffusers", "diffusers>=0.38", "loading a diffusers pipeline (qsched calibrate / sample)")
    from diffusers import DiffusionPipeline

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    if p.is_dir():
        _check_diffusers_folder(p)
        pipe = DiffusionPipeline.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype)
    else:
        if config is None:
            raise ValueError(f"single-file checkpoint {p} needs config: a local diffusers folder of the same "
                             "architecture (model_index.json, configs, tokenizers, text encoders, VAE); nothing "
                             "is downloaded")
        cfg = Path(config).expanduser()
        index = _check_diffusers_folder(cfg, allow_missing_weights=("unet", "transformer"))
        name = _denoiser_name(index)
        denoiser = _load_single_file_denoiser(p, cfg, name, index[name], dtype)
        if denoiser is None:  # a full original-layout checkpoint
            cls = _pipeline_class(index)
            pipe = cls.from_single_file(str(p), config=str(cfg), local_files_only=True, torch_dtype=dtype)
        else:
            pipe = DiffusionPipeline.from_pretrained(str(cfg), local_files_only=True, torch_dtype=dtype,
                                                     **{name: denoiser})
    pipe.to(device)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_class(index: Mapping, where="model_index.json"):
    """The diffusers pipeline class ``_class_name`` names (ValueError naming the file otherwise)."""
    import diffusers

    from ..qsched._io import brief

    name = index.get("_class_name")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{where}: _class_name must name a diffusers pipeline class (e.g. StableDiffusionXLPipeline"
                         f", FluxPipeline), got {brief(name)}")
    try:
        cls = getattr(diffusers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ValueError(f"{where}: _class_name {name!r} is not a diffusers pipeline class this diffusers "
                         f"({diffusers.__version__}) knows (e.g. StableDiffusionXLPipeline, FluxPipeline)")
    return cls


def _load_single_file_denoiser(file: Path, cfg: Path, name: str, spec, dtype):
    import diffusers
    from safetensors.torch import load_file

    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: single-file checkpoints must be .safetensors (got {file.suffix!r})")
    cls = getattr(diffusers, spec[1])
    model = cls.from_config(cls.load_config(str(cfg / name)))
    want = model.state_dict()
    sd = load_file(str(file))
    for prefix in ("", "model.diffusion_model.", f"{name}.", "diffusion_model."):
        cand = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if set(cand) == set(want):
            model.load_state_dict(cand, strict=True)
            return model.to(dtype).eval()
    if any(k.startswith("first_stage_model.") or k.startswith("conditioner.") or k.startswith("cond_stage_model.")
           for k in sd):
        return None  # full checkpoint: the pipeline's single-file loader converts every component
    if hasattr(cls, "from_single_file"):
        return cls.from_single_file(str(file), config=str(cfg), subfolder=name, local_files_only=True,
                                    torch_dtype=dtype)
    raise ValueError(f"{file}: keys do not match a {spec[1]} and the format is not recognised")


def pipeline_family(pipe) -> str:
    """Default family of a pipeline from its components and scheduler."""
    if getattr(pipe, "transformer", None) is not None:
        return "flux_schnell"
    sched = type(getattr(pipe, "scheduler", None)).__name__
    if sched == "LCMScheduler":
        return "lcm"
    if sched == "TCDScheduler":
        return "tcd"
    return "sdxl_turbo"


# ---------------------------------------------------------------------------------------------------------
# diffusers generator

def per_sample_noise_sampler(x: torch.Tensor, seeds: Sequence[int], offset: int = 1):
    """One generator per image, seeded from its own seed: the noise of image i never depends on the batch."""
    gens = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed((int(s) * 1000003 + offset) % 2**63)  # any seed; unchanged below ~9e12
        gens.append(g)

    def sample(sigma, sigma_next):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float32) for g in gens]).to(
            x.device, x.dtype)
    return sample


def seeded_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return torch.randn((1, *shape), generator=g, dtype=torch.float32)


class DiffusersGenerator:
    """Headless Q-Sched sampling on a diffusers pipeline's networks (see the module docstring).

    Args:
        pipe: a loaded pipeline (``load_pipeline``), SDXL / SD1.5 / LCM / FLUX layout.
        family: ``sdxl_turbo``, ``flux_schnell``, ``lcm``, ``tcd``, ``pcm`` (default: ``pipeline_family``).
        steps: sampling steps; sampler: one of ``qsched.samplers.SAMPLERS`` (default: the family's).
        height, width: image size (default: the family's, capped at the VAE's sample size only by memory).
        quant: quantization spec name (``"w4a8"``...) applied to the denoiser with ``qsched.quant.quantize_``;
            ``None``/``"fp16"`` leaves it unquantized.
        guidance: LCM w-embedding guidance (LCM: 8.0); ignored by families without one.
        eta: TCD gamma / ancestral eta override. batch_size: images per network call.
        model_file: the file/folder the pipeline came from (its hash goes into the fingerprint).
    """

    def __init__(self, pipe, *, family: str | None = None, steps: int = 4, sampler: str | None = None,
                 height: int | None = None, width: int | None = None, quant: str | None = None,
                 guidance: float | None = None, eta: float | None = None, batch_size: int = 4,
                 model_file: str | os.PathLike | None = None, model_hash_value: str | None = None,
                 quant_backend: str = "auto", device: str | torch.device | None = None):
        from ..qsched.schedules import few_step_sigmas

        detected = pipeline_family(pipe)
        family = detected if family is None else family
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
        if (family == "flux_schnell") != (detected == "flux_schnell"):  # transformer vs UNet: cannot run at all
            raise ValueError(f"family {family!r} does not fit this pipeline ({type(pipe).__name__}, a "
                             f"{'transformer' if detected == 'flux_schnell' else 'UNet'} model): use "
                             f"{'flux_schnell' if detected == 'flux_schnell' else 'sdxl_turbo, lcm, tcd or pcm'}, or "
                             "leave the family out to detect it")
        d_sampler, self.parameterization, opts, d_guidance, d_size, self.noise_rule = FAMILIES[family]
        sampler = d_sampler if sampler is None else sampler
        samplers.check_sampler(sampler, self.parameterization)
        check_steps(steps, MAX_GENERATOR_STEPS)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.pipe, self.family, self.steps, self.sampler = pipe, family, steps, sampler
        self.options = dict(opts)
        if eta is not None:
            if sampler not in ("tcd", "euler_ancestral"):
                raise ValueError(f"eta applies to samplers tcd and euler_ancestral, not {sampler!r}")
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
                raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
            self.options["eta"] = float(eta)
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                     or not math.isfinite(guidance) or guidance < 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
        self.guidance = d_guidance if guidance is None else float(guidance)
        self.height = d_size if height is None else height
        self.width = d_size if width is None else width
        for name, v in (("height", self.height), ("width", self.width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v % 16:
                raise ValueError(f"{name} must be a multiple of 16 >= 16, got {v!r}")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _module_device(self.denoiser_module)
        self.flow = self.parameterization == "flow"
        self.sigmas = few_step_sigmas("flux_schnell" if self.flow else ("sdxl_turbo" if family == "sdxl_turbo"
                                                                         else family), steps)
        self.model_file = None if model_file is None else os.fspath(model_file)
        self.model_hash = model_hash_value or (model_hash(model_file) if model_file is not None else None)
        self.quant = None if quant in (None, "", "none", "fp16", "bf16") else str(quant)
        self.quant_report = None
        if self.quant is not None:
            from ..qsched.quant import quantize_

            self.quant_report = quantize_(self.denoiser_module, self.quant, backend=quant_backend)
        self._cond: dict[str, dict] = {}

    # -- protocol -----------------------------------------------------------------------------------
    @property
    def denoiser_module(self):
        return self.pipe.transformer if getattr(self.pipe, "transformer", None) is not None else self.pipe.unet

    def fingerprint(self) -> dict:
        return {"class": "DiffusersGenerator", "model_hash": self.model_hash,
                "model_file": None if self.model_file is None else os.path.basename(self.model_file),
                "pipeline": type(self.pipe).__name__, "family": self.family, "sampler": self.sampler,
                "sampler_options": self.options, "steps": self.steps, "quant": self.quant,
                "height": self.height, "width": self.width, "guidance": self.guidance,
                "dtype": str(self.denoiser_module.dtype).replace("torch.", ""),
                # images differ between batch sizes (batched kernels) and devices: a resume must match them
                "batch_size": self.batch_size, "device": self.device.type,
                "config_hash": pipeline_config_digest(self.pipe)}

    @torch.no_grad()
    def generate(self, coefficients: Coefficients, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        prompts, seeds = check_generate_args(coefficients, prompts, seeds, self.steps)
        out = []
        for s in range(0, len(prompts), self.batch_size):
            out.append(self._batch(coefficients, list(prompts[s:s + self.batch_size]),
                                   list(seeds[s:s + self.batch_size])))
        return torch.cat(out)

    # -- internals ----------------------------------------------------------------------------------
    def conditioning(self, prompt: str) -> dict:
        """Text encodings for one prompt, computed on first use and cached."""
        if prompt not in self._cond:
            from .denoisers import conditioning_for

            self._cond[prompt] = conditioning_for(self.pipe, prompt, self.height, self.width, self.guidance)
        return self._cond[prompt]

    def _model(self, prompts: list[str]):
        from .denoisers import FluxFlowDenoiser, UNetEpsDenoiser, concat_conditioning

        cond = concat_conditioning([self.conditioning(p) for p in prompts])
        if self.flow:
            return FluxFlowDenoiser(self.pipe.transformer, cond)
        ac = getattr(self.pipe.scheduler, "alphas_cumprod", None)
        return UNetEpsDenoiser(self.pipe.unet, cond, None if ac is None else torch.as_tensor(ac))

    def _latent_shape(self) -> tuple[int, int, int]:
        f = getattr(self.pipe, "vae_scale_factor", 8)
        if self.flow:
            ch = self.pipe.transformer.config.in_channels // 4
            return ch, 2 * (self.height // (2 * f)), 2 * (self.width // (2 * f))
        return self.pipe.unet.config.in_channels, self.height // f, self.width // f

    def _batch(self, coefficients, prompts, seeds) -> torch.Tensor:
        x = self.start(seeds)
        fn = samplers.SAMPLERS[self.sampler]
        latents = fn(self.denoiser(prompts), x, self.sigmas.to(torch.float32), None, disable=True,
                     coefficients=coefficients, **self.sampler_kwargs(seeds))
        return self.decode(latents)

    # -- the paired-run protocol of calibration.reference (TrajectoryGenerator) --------------------------------
    def start(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_0 for these seeds (each image's noise from its own seed, scaled by the family's rule), on the device."""
        shape = self._latent_shape()
        noise = torch.cat([seeded_noise(s, shape) for s in seeds]).to(self.device)
        s0 = float(self.sigmas[0])
        return noise * {"sigma": s0, "vp": math.sqrt(1.0 + s0 * s0), "flow": s0}[self.noise_rule]

    def sampler_kwargs(self, seeds: Sequence[int]) -> dict:
        """Keywords of the sampler function but the coefficients, with a fresh per-image noise sampler."""
        kw = dict(self.options)
        if self.sampler != "tcd":
            kw["parameterization"] = self.parameterization
        if self.sampler in ("tcd", "lcm", "euler_ancestral"):
            kw["noise_sampler"] = per_sample_noise_sampler(
                torch.zeros((len(seeds), *self._latent_shape()), device=self.device), seeds)
        return kw

    def denoiser(self, prompts: Sequence[str]):
        """``model(x, sigma) -> denoised`` (k-diffusion convention) for these prompts, without autograd."""
        model = self._model(list(prompts))

        @torch.no_grad()
        def run(x, sigma, **kwargs):
            return model(x, sigma, **kwargs)
        return run

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if self.flow and shift is not None:
            z = z + shift
        img = vae.decode(z.to(vae.dtype)).sample
        return ((img.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().cpu()


def _module_device(module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
