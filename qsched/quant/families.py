"""Model families: which layers stay in 16 bit, how a file's layout is recognised, the few-step settings artists run.

One ``Family`` per diffusion-model architecture (module names as ComfyUI or diffusers build it). Adding a family is
one entry in ``FAMILIES``: its skip table (layer-name pattern -> why it stays in 16 bit), the diffusion-model classes
and state-dict key prefixes that identify it, whether it is a flow model, and its distilled sampling settings.

Why these layers are skipped (the rule every table follows, from the architecture):
* embedders that read the conditioning or the raw latent (timestep, pooled text, text/caption, patch input): tiny
  (well under 1 % of the weights) and the first place a rounding error enters every token and every block;
* *global* modulation, i.e. one layer whose output scales/shifts every block (Wan's ``time_projection``, Chroma's
  ``distilled_guidance_layer``): an error there is applied in every block at once;
* the final layer / output projection (and its AdaLN modulation): its error goes straight into the prediction.
Per-block modulation (FLUX/Qwen ``img_mod``/``txt_mod``, SD3 ``adaLN_modulation`` of each joint block) *is*
quantized: it is a third of Qwen-Image's and a fifth of FLUX's weights, and each block's error stays in that block.
Patterns match a module name, its prefix ("time_embed" covers time_embed.0) or an fnmatch glob. Conv layers are
listed where they are embedders (only the simulated backend quantizes Conv2d, and only with ``quantize_conv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Prefixes in front of the diffusion model's own keys in users' files (single-file checkpoints, some repacks).
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    skip: dict  # pattern -> why the layer stays in 16 bit
    module_classes: tuple = ()  # class names of the diffusion model (ComfyUI's or diffusers')
    key_prefixes: tuple = ()  # a state-dict key (model prefix removed) starting with one of these: this layout
    flow: bool = False  # rectified flow (CONST) rather than eps prediction
    few_step: dict = field(default_factory=dict)  # setting name -> distilled sampling setting (ComfyUI names)

    @property
    def patterns(self) -> tuple:
        return tuple(self.skip)


_EMBED_T = "timestep embedder: reads the noise level, feeds every block"
_EMBED_TXT = "text embedder: the first layer every text token passes"
_EMBED_IMG = "patch embedder: the first layer every latent token passes"
_FINAL = "final layer: its error goes straight into the prediction"

# Order matters for layout detection: a more specific layout (Chroma) before the one it extends (FLUX).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd_unet", "SD1.x / SDXL UNet (Turbo, Lightning, Hyper, LCM)", {
        "time_embed": _EMBED_T,
        "label_emb": "SDXL pooled-text + size embedder (class/ADM embedding)",
        "input_blocks.0": "conv_in: " + _EMBED_IMG,
        "out": "final norm + conv_out: " + _FINAL,
    }, ("UNetModel",), ("input_blocks.",), False, {
        "sdxl_turbo": {"steps": 4, "sampler": "euler_ancestral", "scheduler": "simple", "cfg": 1.0},
        "sdxl_lightning_4step": {"steps": 4, "sampler": "euler", "scheduler": "sgm_uniform", "cfg": 1.0,
                                 "lora": "kohya"},
        "hyper_sdxl_8step": {"steps": 8, "sampler": "euler", "scheduler": "sgm_uniform", "cfg": 1.0,
                             "lora": "kohya"},
    }),
    Family("chroma", "Chroma", {
        "img_in": _EMBED_IMG,
        "txt_in": _EMBED_TXT,
        "distilled_guidance_layer": "global modulation (approximator): one MLP computes every block's scale/shift",
        "final_layer": _FINAL,
    }, ("Chroma",), ("distilled_guidance_layer.",), True, {
        "chroma_flash_8step": {"steps": 8, "sampler": "euler", "scheduler": "simple", "cfg": 1.0, "lora": "comfy"},
    }),
    Family("flux", "FLUX.1 (schnell, dev + turbo/hyper LoRA)", {
        "img_in": _EMBED_IMG,
        "txt_in": _EMBED_TXT,
        "time_in": _EMBED_T,
        "vector_in": "pooled CLIP embedder",
        "guidance_in": "guidance embedder (dev): reads the distilled guidance scale",
        "final_layer": "final AdaLN + projection: " + _FINAL,
    }, ("Flux",), ("double_blocks.",), True, {
        "flux_schnell": {"steps": 4, "sampler": "euler", "scheduler": "simple", "cfg": 1.0},
        "flux_dev_turbo_8step": {"steps": 8, "sampler": "euler", "scheduler": "simple", "cfg": 1.0,
                                 "guidance": 3.5, "lora": "diffusers"},
    }),
    Family("qwen_image", "Qwen-Image", {
        "img_in": _EMBED_IMG,
        "txt_in": _EMBED_TXT,
        "time_text_embed": _EMBED_T,
        "norm_out": "final AdaLN modulation: scales the last hidden state",
        "proj_out": _FINAL,
    }, ("QwenImageTransformer2DModel",), ("txt_norm.",), True, {
        "qwen_image_lightning_4step": {"steps": 4, "sampler": "euler", "scheduler": "simple", "cfg": 1.0,
                                       "shift": 3.0, "lora": "diffusers"},
        "qwen_image_lightning_8step": {"steps": 8, "sampler": "euler", "scheduler": "simple", "cfg": 1.0,
                                       "shift": 3.0, "lora": "diffusers"},
    }),
    Family("wan", "Wan 2.1 / 2.2 (5B TI2V, A14B experts)", {
        "patch_embedding": "Conv3d " + _EMBED_IMG,
        "text_embedding": _EMBED_TXT,
        "time_embedding": _EMBED_T,
        "time_projection": "global modulation: one Linear (dim -> 6 dim) scales/shifts every block",
        "img_emb": "CLIP image embedder (i2v)",
        "head": "head (final modulation + projection): " + _FINAL,
    }, ("WanModel",), ("head.modulation",), True, {
        "wan22_lightx2v_4step": {"steps": 4, "sampler": "euler", "scheduler": "simple", "cfg": 1.0, "shift": 5.0,
                                 "lora": "lightx2v"},
    }),
    Family("sd3", "SD3 / SD3.5 MMDiT (Large Turbo)", {
        "x_embedder": "Conv " + _EMBED_IMG,
        "t_embedder": _EMBED_T,
        "y_embedder": "pooled text embedder",
        "context_embedder": _EMBED_TXT,
        "final_layer": "final AdaLN + projection: " + _FINAL,
    }, ("OpenAISignatureMMDITWrapper", "MMDiT"), ("joint_blocks.",), True, {
        "sd35_large_turbo_4step": {"steps": 4, "sampler": "euler", "scheduler": "simple", "cfg": 1.0,
                                   "lora": "diffusers"},
    }),
    # diffusers' module names (qsched.generate's pipelines)
    Family("diffusers_unet", "diffusers UNet2DConditionModel", {
        "time_embedding": _EMBED_T, "add_embedding": "SDXL pooled-text + size embedder",
        "class_embedding": "class embedder", "encoder_hid_proj": "text projection",
        "conv_in": _EMBED_IMG, "conv_out": _FINAL,
    }, ("UNet2DConditionModel",)),
    Family("diffusers_flux", "diffusers FluxTransformer2DModel", {
        "x_embedder": _EMBED_IMG, "context_embedder": _EMBED_TXT, "time_text_embed": _EMBED_T,
        "norm_out": "final AdaLN modulation", "proj_out": _FINAL,
    }, ("FluxTransformer2DModel",), (), True),
    Family("generic", "any model (nothing skipped)", {}),
)}

# The names earlier releases used for the ComfyUI layouts (still accepted by ``quantize_(family=...)``).
ALIASES = {"comfy_unet": "sd_unet", "comfy_flux": "flux"}
#: ComfyUI layouts (what ``family_of_keys`` can recognise), in detection order.
COMFY_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.key_prefixes)


def get(name: str) -> Family:
    f = FAMILIES.get(ALIASES.get(name, name))
    if f is None:
        raise ValueError(f"invalid family={name!r}; allowed: {tuple(FAMILIES)}")
    return f


def family_of_module(module) -> Family:
    """The family of a diffusion model (by its class name); ``generic`` when unknown."""
    cls = type(module).__name__
    return next((f for f in FAMILIES.values() if cls in f.module_classes), FAMILIES["generic"])


def strip_model_prefix(keys) -> list[str]:
    keys = list(keys)
    for p in MODEL_PREFIXES:
        if any(k.startswith(p) for k in keys):
            return [k[len(p):] for k in keys if k.startswith(p)]
    return keys


def family_of_keys(keys) -> Family | None:
    """The ComfyUI layout of a state dict (its keys, with or without ``model.diffusion_model.``); None if unknown."""
    keys = strip_model_prefix(keys)
    for name in COMFY_FAMILIES:
        f = FAMILIES[name]
        if any(k.startswith(f.key_prefixes) for k in keys):
            return f
    return None


#: Every ComfyUI family's patterns at once (a model whose layout is not recognised before it is built).
def comfy_union() -> tuple:
    out: list[str] = []
    for name in COMFY_FAMILIES:
        out += [p for p in FAMILIES[name].patterns if p not in out]
    return tuple(out)
