"""Tiny random SDXL-like UNet and FLUX-like transformer for the quantization tests, saved the way users have them
(a diffusers folder; a single safetensors file) and loaded back through the real loaders."""

from __future__ import annotations

import torch


def tiny_unet_config() -> dict:
    # SDXL layout (text_time added embedding, linear projections, 2 text encoders' worth of context), scaled down.
    # Every Linear in_features is a multiple of 64 (bitsandbytes 4-bit blocks), and attention dominates the Linear
    # weights as in SDXL, so the embedders left in 16 bit are a small share.
    return dict(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 4),
        use_linear_projection=True, norm_num_groups=16, cross_attention_dim=128,
        addition_embed_type="text_time", addition_time_embed_dim=16, projection_class_embeddings_input_dim=6 * 16 + 64,
    )


def tiny_flux_config() -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
                axes_dims_rope=(16, 24, 24))


def build_unet(path: str | None = None):
    """A random UNet2DConditionModel; with ``path``, saved there and loaded back with from_pretrained."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    if path is None:
        return unet.eval()
    unet.save_pretrained(path)
    return UNet2DConditionModel.from_pretrained(path).eval()


def build_flux(path: str | None = None):
    """A random FluxTransformer2DModel; with ``path``, its weights go to one safetensors file and come back through
    safetensors.torch.load_file into a model built from the config (the single-file route)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**tiny_flux_config()).eval()
    if path is None:
        return model
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = FluxTransformer2DModel(**tiny_flux_config())
    loaded.load_state_dict(load_file(path), strict=True)
    return loaded.eval()


def unet_inputs(batch=1, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, 8, 128, generator=g),
        added_cond_kwargs=dict(text_embeds=torch.randn(batch, 64, generator=g),
                               time_ids=torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * batch)),
    )


def flux_inputs(batch=1, size=8, txt=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(size, size, 3)
    img_ids[..., 1] = torch.arange(size)[:, None]
    img_ids[..., 2] = torch.arange(size)[None, :]
    return dict(
        hidden_states=torch.randn(batch, size * size, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, txt, 64, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(txt, 3),
    )


def run_unet(unet, t, **inp):
    return unet(timestep=t, **inp).sample


def run_flux(model, t, **inp):
    return model(timestep=t, **inp).sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
