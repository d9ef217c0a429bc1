"""Build random-weight model files that a real ComfyUI loads through its own loaders (integration test).

Run with the ComfyUI venv's python from inside the ComfyUI checkout:

    cd $COMFYUI_PATH && $COMFYUI_PYTHON /path/to/build_tiny_comfy_models.py MODELS_DIR

Writes (file names as the example workflows reference them):
* checkpoints/sd_xl_turbo_1.0_fp16.safetensors: an SD1.5-*architecture* single-file checkpoint (ComfyUI's key layout
  ``model.diffusion_model.* / cond_stage_model.* / first_stage_model.*``). ComfyUI's detector needs
  model_channels 320 and context 768, so the UNet is one level deep with one res block (~6 M parameters); the text
  encoder and VAE have their fixed full sizes (CLIP-L 123 M, VAE 83 M). The sampling math is that of SDXL-Turbo
  (eps, 1000-step discrete schedule).
* diffusion_models/flux1-schnell.safetensors: a FLUX-schnell layout model (no guidance_in). ComfyUI fixes
  hidden 3072 / 24 heads / context 4096 for FLUX files, so it has 1 double block and 0 single blocks (~390 M) and
  vec_in_dim 2048 (the pooled size of the CLIP-L-only text encoder the test substitutes for T5-XXL, which cannot
  be made small).
* text_encoders/clip_l.safetensors (transformers key layout) and vae/ae.safetensors (16 latent channels).
Weights: normal(0, 1/sqrt(fan_in)), norms 1, biases 0, seeded; stored in float16 (bfloat16 for FLUX).
"""

from __future__ import annotations

import os
import sys

MODELS_DIR = sys.argv[1] if __name__ == "__main__" else None
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, os.getcwd())

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def init_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight") or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()


def save(sd: dict, path: str, dtype) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(out, path)
    print(f"wrote {path}: {sum(v.numel() for v in out.values()) / 1e6:.1f} M values", flush=True)


def build_clip_l(seed: int) -> dict:
    from comfy import sd1_clip

    te = sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    init_(te, seed)
    sd = te.transformer.state_dict()  # keys: text_model.*, text_projection.weight
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def build_vae(z_channels: int, seed: int) -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": z_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=z_channels)
    init_(vae, seed)
    return vae.state_dict()


def _build(cls, seed: int, **kwargs) -> dict:
    import comfy.ops

    model = cls(dtype=torch.float32, operations=comfy.ops.disable_weight_init, **kwargs)
    init_(model, seed)
    return model.state_dict()


def build_sd_unet(seed: int) -> dict:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return _build(UNetModel, seed, image_size=32, in_channels=4, out_channels=4, model_channels=320,
                  num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                  transformer_depth_middle=1, context_dim=768, num_heads=8, use_spatial_transformer=True,
                  use_linear_in_transformer=False, adm_in_channels=None)


def build_flux(seed: int, dev: bool = False) -> dict:
    """FLUX, 1 double block: flux1-schnell layout (no guidance_in, pooled 2048: see the module docstring) or, with
    ``dev``, flux1-dev layout (guidance_in, pooled CLIP-L 768)."""
    from comfy.ldm.flux.model import Flux

    return _build(Flux, seed, image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768 if dev else 2048,
                  context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0,
                  axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=dev)


# Tiny models of the few-step families, keys as users' files have them (ComfyUI detects each from its keys; where
# ComfyUI fixes a width for the family, e.g. Qwen-Image / Chroma / FLUX hidden 3072, the model is 1 block deep).
def build_qwen_image(seed: int) -> dict:
    """qwen_image_bf16.safetensors layout (diffusers names, no prefix); 1 transformer block."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return _build(QwenImageTransformer2DModel, seed, num_layers=1)


def build_wan(seed: int, five_b: bool) -> dict:
    """Wan 2.2 (original names, no prefix). five_b: TI2V 5B layout (48 latent channels, Wan 2.2 VAE) -> ComfyUI's
    WAN22_T2V; else an A14B expert (16 channels) -> WAN21_T2V. dim 256 (2 heads of 128), 1 block."""
    from comfy.ldm.wan.model import WanModel

    ch = 48 if five_b else 16
    return _build(WanModel, seed, model_type="t2v", in_dim=ch, out_dim=ch, dim=256, ffn_dim=512, num_heads=2,
                  num_layers=1)


def build_sd35(seed: int) -> dict:
    """SD3.5 Large (Turbo) layout: MMDiT with RMS q/k norms, pooled 2048, context 4096 (``model.diffusion_model.``
    prefix as in sd3.5_large_turbo.safetensors); depth 2 -> hidden 128."""
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    sd = _build(OpenAISignatureMMDITWrapper, seed, in_channels=16, patch_size=2, out_channels=16, depth=2,
                adm_in_channels=2048, num_patches=256, pos_embed_max_size=16, qk_norm="rms",
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 128}})
    # pos_embed is a buffer ComfyUI allocates with torch.empty (real files carry it): without a value of its own the
    # file held whatever memory was there (once 1.6e22: NaN outputs)
    sd["pos_embed"] = torch.randn(sd["pos_embed"].shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return {f"model.diffusion_model.{k}": v for k, v in sd.items()}


def build_chroma(seed: int) -> dict:
    """chroma-unlocked layout (no prefix): ComfyUI's fixed Chroma widths, 1 double block, 0 single blocks."""
    from comfy.ldm.chroma.model import Chroma

    return _build(Chroma, seed, in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072,
                  mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5)


def build_flux_dev(seed: int) -> dict:
    """flux1-dev layout (the name the family checks build by)."""
    return build_flux(seed, dev=True)


def main(models_dir: str) -> None:
    clip = build_clip_l(1)
    ckpt = {f"model.diffusion_model.{k}": v for k, v in build_sd_unet(2).items()}
    ckpt.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.items()})
    ckpt.update({f"first_stage_model.{k}": v for k, v in build_vae(4, 3).items()})
    save(ckpt, os.path.join(models_dir, "checkpoints", "sd_xl_turbo_1.0_fp16.safetensors"), torch.float16)
    del ckpt
    save(clip, os.path.join(models_dir, "text_encoders", "clip_l.safetensors"), torch.float16)
    save(build_vae(16, 4), os.path.join(models_dir, "vae", "ae.safetensors"), torch.float16)
    save(build_flux(5), os.path.join(models_dir, "diffusion_models", "flux1-schnell.safetensors"), torch.bfloat16)


if __name__ == "__main__":
    main(MODELS_DIR)
