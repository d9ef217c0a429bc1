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
from .sampling import make_sampler, schedule_sigmas

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
                 node: str = "Q-Sched Calibrate"):
        import torch

        self.model, self.clip, self.vae = model, clip, vae
        self.steps, self.sampler, self.schedule = steps, sampler, schedule
        self.eta, self.cfg = float(eta), float(cfg)
        self.width, self.height, self.batch_size = width, height, batch_size
        self.on_images, self.check_interrupt = on_images, check_interrupt
        self.calls = 0  # generate() calls, i.e. coefficient points computed (plus previews)
        self.kept: dict = {}  # (c_x, c_eps, prompts, seeds) -> images, for the coefficients in keep_for
        self.keep_for: set = set()
        self.node = node
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

    def generate(self, coefficients: Coefficients, prompts, seeds):
        import comfy.sample
        import torch

        coefficients.check_steps(self.steps)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        missing = [p for p in prompts if p not in self.cond]
        for p in missing:
            self.cond[p] = self._encode(p)
        self.calls += 1
        out = []
        for group in self._groups(list(prompts), self.batch_size):
            ps, ss = [prompts[i] for i in group], [int(seeds[i]) for i in group]
            latent = torch.zeros((len(ps),) + self.latent_shape)
            noise = torch.cat([comfy.sample.prepare_noise(latent[i:i + 1], s) for i, s in enumerate(ss)])
            ref = torch.zeros(latent.shape, device=self.model.load_device)
            ksampler = make_sampler(self.sampler, self.eta, coefficients, node=self.node,
                                    noise_sampler=per_sample_noise_sampler(ref, ss))
            samples = comfy.sample.sample_custom(
                self.model, noise, self.cfg, ksampler, self.sigmas, _concat([self.cond[p] for p in ps]),
                self.negative, latent, callback=self._step, disable_pbar=True, seed=ss[0])
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
