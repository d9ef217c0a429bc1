"""``ComfyGenerator``: calibration images from a ComfyUI MODEL / CLIP / VAE (the ``calibration.generate.Generator``
protocol that ``calibration.runner`` drives), plus the digests that fingerprint the model, VAE and text encodings.

Every prompt is encoded once with the CLIP; sampling is ``comfy.sample.sample_custom`` with the KSAMPLER of
nodes/sampling.py (``make_sampler``) and the SIGMAS of ``schedule_sigmas``; the VAE decodes. Common random numbers:
the initial noise of prompt i is ``prepare_noise`` seeded with seed i, and its per-step noise (euler_ancestral, tcd,
lcm) comes from its own generator (``calibration.generate.per_sample_noise_sampler``), so an image never depends on
the coefficient point nor on which prompts share its batch. ComfyUI modules are imported inside functions only.
"""

from __future__ import annotations

import hashlib

from ..calibration.generate import per_sample_noise_sampler
from ..qsched import samplers as qsamplers
from ..qsched.coefficients import Coefficients
from .common import is_flow, model_sampling_of, node_input
from .sampling import make_sampler, sampler_options, schedule_sigmas

#: Prompts shown in the preview grid (identity row vs best row): each column costs two extra images.
PREVIEW_PROMPTS = 4
SAMPLE_VALUES = 64  # values read per tensor for the model/VAE digests


# ---------------------------------------------------------------------------------------------------------------
# fingerprints: what identifies the model, VAE and text encodings a record was made with
# ---------------------------------------------------------------------------------------------------------------
def _update_tensor(h, t, full: bool = False) -> None:
    import torch

    t = t.detach()
    h.update(f"{tuple(t.shape)}|{str(t.dtype)}|".encode())
    flat = t.reshape(-1)
    if flat.numel() == 0 or flat.is_meta:
        return
    if not full and flat.numel() > SAMPLE_VALUES:
        n = flat.numel()
        idx = torch.arange(SAMPLE_VALUES, dtype=torch.int64) * (n - 1) // (SAMPLE_VALUES - 1)  # first ... last
        flat = flat[idx.to(flat.device)]
    h.update(flat.float().cpu().contiguous().numpy().tobytes())


def _update_obj(h, obj, full: bool = False) -> None:
    """Digest of nested tuples/lists/dicts of tensors, numbers and strings (anything else by type name)."""
    import torch

    if torch.is_tensor(obj):
        _update_tensor(h, obj, full)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"k:{k}|".encode())
            _update_obj(h, obj[k], full)
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}|".encode())
        for v in obj:
            _update_obj(h, v, full)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())
    else:
        h.update(f"<{type(obj).__name__}>|".encode())


def module_digest(module, backup: dict | None = None, prefix: str = "") -> str:
    """sha256 over every parameter/buffer's name, shape, dtype and ``SAMPLE_VALUES`` evenly spaced values.

    ``backup``: ComfyUI ModelPatcher's original weights of keys it patched in place (LoRA), so a loaded-and-patched
    model gives the same digest as a fresh one; the patches are digested separately."""
    import torch

    h = hashlib.sha256()
    backup = backup or {}
    for name, t in module.state_dict(keep_vars=True).items():
        saved = backup.get(prefix + name)
        if saved is not None:
            t = saved.weight
        elif t.is_meta:  # other packs' quantized layers (ComfyUI-GGUF) export placeholders: digest what is held
            t = _held_tensor(module, name, t)
        h.update(name.encode() + b"\0")
        _update_tensor(h, t.detach().as_subclass(torch.Tensor))
    return h.hexdigest()


def _held_tensor(module, name: str, placeholder):
    """The tensor a module holds under a state-dict name, or the placeholder itself (digested by shape only) for
    names that exist only in the state dict (GGUF's memory-estimate entries)."""
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return placeholder
    return obj if hasattr(obj, "detach") and not obj.is_meta else placeholder


def quant_label(module) -> str | None:
    from ..qsched.quant.layers import QuantConv2d, QuantLinear

    names = sorted({m.spec.name for m in module.modules() if isinstance(m, (QuantLinear, QuantConv2d))}
                   | {m.qsched_spec.name for m in module.modules() if getattr(m, "qsched_spec", None) is not None})
    return "+".join(names) or None


def model_fingerprint(model) -> dict:
    dm = model.get_model_object("diffusion_model")
    ms = model_sampling_of(model)
    h = hashlib.sha256()
    h.update(module_digest(dm, getattr(model, "backup", None), "diffusion_model.").encode())
    _update_obj(h, dict(getattr(model, "patches", {}) or {}))  # LoRAs and other weight patches
    sm = hashlib.sha256()
    sm.update(type(ms).__name__.encode())
    _update_obj(sm, {k: v for k, v in ms.state_dict().items()}, full=True)
    for attr in ("shift", "multiplier", "sigma_data"):
        if hasattr(ms, attr):
            _update_obj(sm, {attr: getattr(ms, attr)})
    dtype = model.model_dtype() if hasattr(model, "model_dtype") else None
    return {"model_hash": h.hexdigest(), "model_class": type(model.model).__name__,
            "model_sampling": sm.hexdigest()[:16], "quant": quant_label(dm),
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else None}


def conditioning_digest(conds: list) -> str:
    h = hashlib.sha256()
    _update_obj(h, conds, full=True)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# generator (calibration.generate.Generator protocol)
# ---------------------------------------------------------------------------------------------------------------
def _batchable(a, b) -> bool:
    """Two encoded prompts (ComfyUI CONDITIONING, one entry each) can share a batch: same keys and shapes."""
    import torch

    if len(a) != 1 or len(b) != 1:
        return False
    (ta, da), (tb, db) = a[0], b[0]
    if ta.shape != tb.shape or set(da) != set(db):
        return False
    for k in da:
        va, vb = da[k], db[k]
        if torch.is_tensor(va) or torch.is_tensor(vb):
            if not (torch.is_tensor(va) and torch.is_tensor(vb) and va.shape == vb.shape and va.shape[:1] == (1,)):
                return False
        elif va != vb:
            return False
    return True


def _concat(conds: list) -> list:
    """[[cond [1,...], {pooled_output [1,...], ...}]] x n -> one CONDITIONING of batch n (same prompt order)."""
    import torch

    if len(conds) == 1:
        return conds[0]
    first = conds[0][0][1]
    d = {k: (torch.cat([c[0][1][k] for c in conds]) if torch.is_tensor(v) else v) for k, v in first.items()}
    return [[torch.cat([c[0][0] for c in conds]), d]]


class ComfyGenerator:
    """Generates calibration images on a ComfyUI MODEL / CLIP / VAE (see the module docstring)."""

    def __init__(self, model, clip, vae, prompts, *, steps: int, sampler: str, schedule: str, eta: float,
                 cfg: float, width: int, height: int, batch_size: int, on_images=None, check_interrupt=None,
                 node: str = "Q-Sched Calibrate", on_evaluations=None):
        import torch

        self.model, self.clip, self.vae = model, clip, vae
        self.steps, self.sampler, self.schedule = steps, sampler, schedule
        self.eta, self.cfg = float(eta), float(cfg)
        self.width, self.height, self.batch_size = width, height, batch_size
        self.on_images, self.check_interrupt = on_images, check_interrupt
        self.on_evaluations = on_evaluations  # called with the number of image-steps run (progress of a fit)
        self.calls = 0  # generate() calls, i.e. coefficient points computed (plus previews)
        self.kept: dict = {}  # (c_x, c_eps, prompts, seeds) -> images, for the coefficients in keep_for
        self.keep_for: set = set()
        self.node = node
        self.sampling_seconds, self.evaluations = 0.0, 0  # model evaluations (images x steps) and their seconds
        self.memory: dict = {}
        self.flow = is_flow(model_sampling_of(model))
        make_sampler(sampler, eta, None, node=node)  # checks the sampler name before anything is encoded
        with node_input(node, "sampler_name"):
            qsamplers.check_sampler(sampler, "flow" if self.flow else "eps")
        self.sigmas = schedule_sigmas(model, schedule, steps, 1.0, node=node)
        self.cond = {}
        for p in dict.fromkeys(prompts):  # each prompt once, reused at every point
            self.cond[p] = self._encode(p)
        self.negative = self._encode("")  # used only when cfg != 1
        latent = torch.zeros([1, 4, height // 8, width // 8])
        import comfy.model_management
        import comfy.sample

        self.latent_shape = tuple(comfy.sample.fix_empty_latent_channels(model, latent).shape[1:])
        self.device = comfy.model_management.get_torch_device()  # the runner records CPU threads only for CPU runs

    def _encode(self, text: str):
        tokens = self.clip.tokenize(text)
        return self.clip.encode_from_tokens_scheduled(tokens)

    def fingerprint(self) -> dict:
        fp = {"class": "ComfyGenerator", **model_fingerprint(self.model),
              "vae_hash": module_digest(self.vae.first_stage_model),
              "conditioning": conditioning_digest([self.cond[p] for p in sorted(self.cond)] + [self.negative]),
              "family": type(self.model.model).__name__, "flow": self.flow, "sampler": self.sampler,
              "schedule": self.schedule, "sigmas": [round(float(s), 8) for s in self.sigmas],
              "eta": self.eta if self.sampler in ("euler_ancestral", "tcd") else None,
              "cfg": self.cfg, "steps": self.steps, "height": self.height, "width": self.width,
              "latent_shape": list(self.latent_shape),
              # images differ by ~1e-3 between batch sizes (batched kernels), so a resume must use the same one
              "batch_size": self.batch_size}
        return fp

    def _groups(self, prompts, n: int):
        """Runs of consecutive prompts that can share a batch (same conditioning shapes), at most ``n`` long."""
        group = []
        for i, p in enumerate(prompts):
            if group and (len(group) == n or not _batchable(self.cond[prompts[group[0]]], self.cond[p])):
                yield group
                group = []
            group.append(i)
        if group:
            yield group

    def generate(self, coefficients: Coefficients | None, prompts, seeds):
        import time

        import comfy.sample
        import torch

        coefficients = Coefficients.identity(self.steps) if coefficients is None else coefficients
        coefficients.check_steps(self.steps)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        self._encode_missing(prompts)
        self.calls += 1
        out = []
        for group in self._groups(list(prompts), self.batch_size):
            ps, ss = [prompts[i] for i in group], [int(seeds[i]) for i in group]
            latent = torch.zeros((len(ps),) + self.latent_shape)
            ksampler = make_sampler(self.sampler, self.eta, coefficients, node=self.node,
                                    noise_sampler=self._noise_sampler(ss))
            t0 = time.perf_counter()
            samples = comfy.sample.sample_custom(
                self.model, self._noise(ss), self.cfg, ksampler, self.sigmas, _concat([self.cond[p] for p in ps]),
                self.negative, latent, callback=self._step, disable_pbar=True, seed=ss[0])
            self._timed(time.perf_counter() - t0, len(ps) * self.steps)
            images = self.vae.decode(samples)
            if images.ndim == 5:  # video VAEs: [B, T, H, W, C]
                images = images.reshape(-1, *images.shape[-3:])
            out.append(images.float().cpu().clamp(0.0, 1.0))
            if self.on_images is not None:
                self.on_images(len(ps))
        images = torch.cat(out)
        if (coefficients.c_x, coefficients.c_eps) in self.keep_for:  # only what a preview shows
            n = min(PREVIEW_PROMPTS, len(prompts))
            self.kept[(coefficients.c_x, coefficients.c_eps, tuple(prompts[:n]), tuple(seeds[:n]))] = images[:n]
        return images

    def _encode_missing(self, prompts) -> None:
        for p in prompts:
            if p not in self.cond:
                self.cond[p] = self._encode(p)

    def _noise(self, seeds):
        """The initial noise of each image from its own seed (ComfyUI's ``prepare_noise``), [B, *latent_shape]."""
        import comfy.sample
        import torch

        one = torch.zeros((1,) + self.latent_shape)
        return torch.cat([comfy.sample.prepare_noise(one, int(s)) for s in seeds])

    def _noise_sampler(self, seeds):
        import torch

        return per_sample_noise_sampler(torch.zeros((len(seeds),) + self.latent_shape, device=self.model.load_device),
                                        seeds)

    def _timed(self, seconds: float, evaluations: int) -> None:
        self.sampling_seconds += seconds
        self.evaluations += evaluations
        self._note_memory()
        if self.on_evaluations is not None:
            self.on_evaluations(evaluations)

    # -- the paired-run protocol of calibration.reference (TrajectoryGenerator) ------------------------------------
    def start(self, seeds):
        """x_0 of the sampler for these seeds, as ComfyUI's KSAMPLER makes it (``noise_scaling`` of the seed's
        ``prepare_noise``, with its max-denoise rule), on the model's device: the same for two MODELs of one
        architecture, so a full-precision and a quantized run start from the same noise."""
        import math

        import torch

        ms = model_sampling_of(self.model)
        s0 = self.sigmas[:1].to(torch.float32)
        top = float(ms.sigma_max)
        max_denoise = math.isclose(top, float(s0), rel_tol=1e-05) or float(s0) > top
        noise = self._noise(seeds)
        return ms.noise_scaling(s0, noise, torch.zeros_like(noise), max_denoise).to(self.model.load_device)

    def sampler_kwargs(self, seeds) -> dict:
        """Keywords of ``qsched.samplers.SAMPLERS[self.sampler]`` but the coefficients, with a fresh per-image noise
        sampler for these seeds (the draws :meth:`generate` makes)."""
        return sampler_options(model_sampling_of(self.model), self.sampler, self.eta, self.node,
                               self._noise_sampler(seeds))

    def denoiser(self, prompts):
        """``model(x, sigma) -> denoised`` for these prompts (k-diffusion convention, x on the model's device). Each
        call is one ComfyUI sampling run of one model evaluation (``comfy.sample.sample_custom`` with a KSAMPLER
        that evaluates the model on ``x`` and stops), so ComfyUI loads the model (partially on a small card),
        prepares the conditioning and applies the model's patches and wrappers exactly as when it samples."""
        import torch

        prompts = list(prompts)
        self._encode_missing(prompts)
        groups = list(self._groups(prompts, len(prompts)))

        @torch.no_grad()
        def model(x, sigma, **_):
            if self.check_interrupt is not None:
                self.check_interrupt()
            parts = [self._evaluate(x[g[0]:g[-1] + 1], sigma[g[0]:g[-1] + 1], [prompts[i] for i in g])
                     for g in groups]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return model

    def _evaluate(self, x, sigma, prompts):
        import time

        import comfy.sample
        import comfy.samplers
        import torch

        got = []

        def body(model_k, noise, sigmas, extra_args=None, callback=None, disable=None, **_):
            got.append(model_k(x.to(noise.device, noise.dtype), sigma.to(noise.device, noise.dtype),
                               **(extra_args or {})))
            return noise

        zeros = torch.zeros((x.shape[0],) + self.latent_shape)
        t0 = time.perf_counter()
        comfy.sample.sample_custom(self.model, zeros, self.cfg, comfy.samplers.KSAMPLER(body), self.sigmas,
                                   _concat([self.cond[p] for p in prompts]), self.negative, zeros, disable_pbar=True,
                                   seed=0)
        self._timed(time.perf_counter() - t0, x.shape[0])
        return got[0]

    def _note_memory(self) -> None:
        """How much of the model ComfyUI had on the device for the last run (partial loading on small cards)."""
        size = self.model.model_size()
        loaded = self.model.loaded_size() if hasattr(self.model, "loaded_size") else size
        self.memory["size"] = size
        self.memory["loaded_min"] = min(self.memory.get("loaded_min", loaded), loaded)

    @property
    def partially_loaded(self) -> bool:
        """True when some run had only part of the model's weights on the device (ComfyUI's low-VRAM mode)."""
        m = self.memory
        return bool(m) and str(self.device) != "cpu" and m["loaded_min"] < m["size"]

    def cost_text(self) -> str:
        """One line: seconds per image, and how much of the model was on the device (e.g. ``1.9 s/image, 9.0 of
        22.2 GiB on the GPU (partially loaded)``)."""
        per = self.sampling_seconds / max(1, self.evaluations) * self.steps
        m = self.memory
        if not m or str(self.device) == "cpu":
            return f"{per:.2f} s/image"
        gib = 2 ** 30
        where = (f"{m['loaded_min'] / gib:.1f} of {m['size'] / gib:.1f} GiB on the GPU (partially loaded by ComfyUI's "
                 "memory manager)" if self.partially_loaded else f"{m['size'] / gib:.1f} GiB, fully on the GPU")
        return f"{per:.2f} s/image, {where}"

    def images_for(self, coefficients: Coefficients, prompts, seeds):
        """Images of these coefficients: kept ones (the same noise, so the same images) or newly generated."""
        key = (coefficients.c_x, coefficients.c_eps, tuple(prompts), tuple(seeds))
        if key in self.kept:
            return self.kept[key]
        n = len(prompts)
        for (cx, ce, ps, ss), images in self.kept.items():
            if (cx, ce) == (coefficients.c_x, coefficients.c_eps) and ps[:n] == tuple(prompts) and \
                    ss[:n] == tuple(seeds):
                return images[:n]
        return self.generate(coefficients, prompts, seeds)

    def _step(self, step, x0, x, total_steps):
        if self.check_interrupt is not None:
            self.check_interrupt()
