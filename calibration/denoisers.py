"""k-diffusion denoisers around diffusers networks: ``denoised = model(x, sigma * s_in)``.

These let the samplers in ``qsched.samplers`` run headless on diffusers checkpoints (CLI, calibration, demo),
with text encodings computed once by the caller.
"""

from __future__ import annotations

import torch

from ..qsched.schedules import alphas_cumprod_scaled_linear, sigmas_from_alphas_cumprod


# Follows k-diffusion external.py DiscreteEpsDDPMDenoiser (ComfyUI comfy/model_sampling.py EPS).
class UNetEpsDenoiser:
    """EPS UNet (SD1.5/SDXL family): input x/sqrt(1+sigma²) at timestep t(sigma); denoised = x − sigma·eps.

    ``cond`` holds the UNet's conditioning kwargs (``encoder_hidden_states``, ``added_cond_kwargs``,
    ``timestep_cond``) for a batch of one; it is repeated to the batch size of x.
    """

    def __init__(self, unet, cond: dict, alphas_cumprod: torch.Tensor | None = None):
        self.unet = unet
        self.cond = cond
        ac = alphas_cumprod_scaled_linear() if alphas_cumprod is None else alphas_cumprod.double().cpu()
        self.log_sigmas = sigmas_from_alphas_cumprod(ac).log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        d = (sigma.detach().double().cpu().log().reshape(-1, 1) - self.log_sigmas.reshape(1, -1)).abs()
        return d.argmin(dim=1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        t = self.timestep(sigma).to(x.device)
        dtype = self.unet.dtype
        eps = self.unet((x / (1 + s**2).sqrt()).to(dtype), t, **_repeat(self.cond, x.shape[0], dtype)).sample
        return x - s * eps.to(x.dtype)


class FluxFlowDenoiser:
    """FLUX transformer (flow/velocity): packed 2x2 latents, timestep = sigma; denoised = x − sigma·v."""

    def __init__(self, transformer, cond: dict, guidance: float | None = None):
        self.transformer = transformer
        self.cond = cond  # pooled_projections, encoder_hidden_states, txt_ids
        self.guidance = guidance

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_):
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        dtype = self.transformer.dtype
        packed = FluxPipeline._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        kw = _repeat(self.cond, b, dtype)
        kw["txt_ids"] = self.cond["txt_ids"].to(x.device, dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        v = self.transformer(hidden_states=packed, timestep=sigma.to(dtype).expand(b), guidance=guidance,
                             img_ids=img_ids, return_dict=False, **kw)[0]
        v = v.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return x - s * v.to(x.dtype)


def _repeat(cond: dict, batch: int, dtype) -> dict:
    out = {}
    for k, v in cond.items():
        if k == "txt_ids":
            continue
        if isinstance(v, dict):
            out[k] = _repeat(v, batch, dtype)
        elif torch.is_tensor(v):
            v = v.to(dtype) if v.is_floating_point() else v
            out[k] = v if v.shape[0] == batch else v.expand(batch, *v.shape[1:])
        else:
            out[k] = v
    return out


def sdxl_conditioning(pipe, prompt: str, height: int, width: int) -> dict:
    """Encode one prompt with an SDXL pipeline's two text encoders (no CFG: few-step models run at cfg 1)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def flux_conditioning(pipe, prompt: str, max_sequence_length: int = 64) -> dict:
    embeds, pooled, txt_ids = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=max_sequence_length)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": txt_ids}


# ---- helpers for batched calibration (calibration/generate.py) ------------------------------------------

# diffusers pipelines/latent_consistency_models/pipeline_latent_consistency_text2img.py get_guidance_scale_embedding.
def guidance_scale_embedding(w: float, embedding_dim: int, dtype=torch.float32) -> torch.Tensor:
    """LCM's w-embedding (diffusers ``get_guidance_scale_embedding`` of ``w = guidance - 1``), shape [1, dim]."""
    w = torch.tensor([float(w)]) * 1000.0
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def sd_conditioning(pipe, prompt: str, guidance: float | None = None) -> dict:
    """Encode one prompt with an SD1.5-layout pipeline (one CLIP text encoder, no CFG pass). With a UNet that
    has ``time_cond_proj_dim`` (LCM), ``guidance`` enters through the w-embedding ``w = guidance - 1``."""
    embeds, _ = pipe.encode_prompt(prompt, pipe.unet.device, 1, False)
    cond = {"encoder_hidden_states": embeds}
    dim = getattr(pipe.unet.config, "time_cond_proj_dim", None)
    if dim is not None:
        cond["timestep_cond"] = guidance_scale_embedding((guidance or 1.0) - 1.0, dim, embeds.dtype)
    return cond


def conditioning_for(pipe, prompt: str, height: int, width: int, guidance: float | None = None) -> dict:
    """Batch-of-one conditioning of ``prompt`` for whichever layout ``pipe`` has (FLUX, SDXL, SD1.5/LCM)."""
    if getattr(pipe, "transformer", None) is not None:
        return flux_conditioning(pipe, prompt)
    if getattr(pipe, "text_encoder_2", None) is not None:
        cond = sdxl_conditioning(pipe, prompt, height, width)
        dim = getattr(pipe.unet.config, "time_cond_proj_dim", None)
        if dim is not None:
            cond["timestep_cond"] = guidance_scale_embedding((guidance or 1.0) - 1.0, dim,
                                                             cond["encoder_hidden_states"].dtype)
        return cond
    return sd_conditioning(pipe, prompt, guidance)


def concat_conditioning(conds: list) -> dict:
    """Stack batch-of-one conditionings along the batch axis (``txt_ids`` is shared and kept once)."""
    out = {}
    for k, v in conds[0].items():
        if k == "txt_ids":
            out[k] = v
        elif isinstance(v, dict):
            out[k] = concat_conditioning([c[k] for c in conds])
        elif torch.is_tensor(v):
            out[k] = torch.cat([c[k] for c in conds])
        else:
            out[k] = v
    return out
