"""Loader nodes: a checkpoint or diffusion model loaded by ComfyUI's own loaders, then quantized on a clone.

The quantization itself is ``qsched.quant.quantize_comfy_model`` (issue #3): it clones the ModelPatcher and installs
a quantized copy of ``diffusion_model`` as an object patch, so the full-precision MODEL stays usable and LoRAs or
other patches loaded before it keep working. ComfyUI modules are imported inside functions only.
"""

from __future__ import annotations

from ..qsched.quant import BACKENDS, QuantSpec, quantize_comfy_model
from .common import CATEGORY_LOADERS, NodeInputError

#: fp16 / bf16 = no quantization (weights kept in that dtype); the rest are qsched.quant formats.
PRECISIONS = ("fp16", "bf16", "w8a8", "w4a8", "w4a6", "w4a5", "w4a4")
FLOAT_PRECISIONS = ("fp16", "bf16")

_PRECISION = (list(PRECISIONS), {"default": "w4a8", "tooltip":
              "fp16/bf16: no quantization. wXaY: X-bit weights and Y-bit activations on every Linear layer of "
              "the diffusion model (embedders and final layer stay in full precision); w4a8 is the paper's "
              "main setting. Text encoders and VAE are never quantized."})
_BACKEND = (list(BACKENDS), {"default": "auto", "tooltip":
            "How quantized layers run. auto: native integer kernels where the device has them, else exact "
            "simulation. simulated: round-trip in float (same numbers, any device). bitsandbytes: int8/nf4 "
            "kernels of bitsandbytes (w8a8 only here)."})


def _dtype_options(precision: str) -> dict:
    import torch

    if precision == "fp16":
        return {"dtype": torch.float16}
    if precision == "bf16":
        return {"dtype": torch.bfloat16}
    return {}


def _quantize(model, precision: str, backend: str, node: str):
    """-> (MODEL, report text). fp16/bf16 leave the MODEL as loaded."""
    if precision not in PRECISIONS:
        raise NodeInputError(node, "precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if backend not in BACKENDS:
        raise NodeInputError(node, "backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
    if precision in FLOAT_PRECISIONS:
        return model, f"{precision}: not quantized"
    try:
        spec = QuantSpec.parse(precision)
        quantized, report = quantize_comfy_model(model, spec, backend)
    except ValueError as exc:
        raise NodeInputError(node, "backend", f"precision {precision!r} with backend {backend!r}: {exc}") from None
    return quantized, str(report)


def _full_path(folder: str, name: str, node: str, input_name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise NodeInputError(node, input_name, f"file {name!r} not found in models/{folder}/ (or the '{folder}' "
                                               "paths of extra_model_paths.yaml)")
    return path


class QSchedCheckpointLoader:
    DESCRIPTION = ("Loads a checkpoint (e.g. sd_xl_turbo_1.0_fp16.safetensors) like Load Checkpoint and quantizes "
                   "its diffusion model (MODEL) to the chosen precision. CLIP and VAE stay in full precision.")
    CATEGORY = CATEGORY_LOADERS
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE", "report")
    OUTPUT_TOOLTIPS = ("The quantized diffusion model.", "The text encoder(s).", "The VAE.",
                       "What was quantized, and how.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "ckpt_name": (folder_paths.get_filename_list("checkpoints"), {"tooltip":
                          "A checkpoint file in models/checkpoints/ (UNet + text encoders + VAE in one file)."}),
            "precision": _PRECISION,
            "backend": _BACKEND,
        }}

    def load(self, ckpt_name, precision, backend):
        import comfy.sd
        import folder_paths

        node = "Q-Sched Checkpoint Loader"
        path = _full_path("checkpoints", ckpt_name, node, "ckpt_name")
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"),
            model_options=_dtype_options(precision))[:3]
        if model is None:
            raise NodeInputError(node, "ckpt_name", f"{ckpt_name!r}: ComfyUI found no diffusion model in this file")
        model, report = _quantize(model, precision, backend, node)
        return {"ui": {"text": [report]}, "result": (model, clip, vae, report)}


class QSchedDiffusionModelLoader:
    DESCRIPTION = ("Loads a diffusion model alone (e.g. flux1-schnell.safetensors from models/diffusion_models/) "
                   "like Load Diffusion Model and quantizes it. Load its text encoders and VAE with the core nodes.")
    CATEGORY = CATEGORY_LOADERS
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    OUTPUT_TOOLTIPS = ("The quantized diffusion model.", "What was quantized, and how.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"), {"tooltip":
                          "A diffusion-model file in models/diffusion_models/ (e.g. flux1-schnell.safetensors)."}),
            "precision": _PRECISION,
            "backend": _BACKEND,
        }}

    def load(self, unet_name, precision, backend):
        import comfy.sd

        node = "Q-Sched Diffusion Model Loader"
        path = _full_path("diffusion_models", unet_name, node, "unet_name")
        model = comfy.sd.load_diffusion_model(path, model_options=_dtype_options(precision))
        if model is None:
            raise NodeInputError(node, "unet_name", f"{unet_name!r}: ComfyUI could not detect the model type")
        model, report = _quantize(model, precision, backend, node)
        return {"ui": {"text": [report]}, "result": (model, report)}


class QSchedQuantizeModel:
    DESCRIPTION = ("Quantizes any MODEL (from Load Checkpoint, a GGUF loader, after LoRAs...) on a clone: the input "
                   "MODEL is left unchanged, so full-precision and quantized branches can share one load.")
    CATEGORY = CATEGORY_LOADERS
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    OUTPUT_TOOLTIPS = ("The quantized clone.", "What was quantized, and how.")
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        precision = (list(PRECISIONS[2:]), {**_PRECISION[1], "tooltip":
                     "wXaY: X-bit weights, Y-bit activations on the diffusion model's Linear layers; w4a8 is the "
                     "paper's main setting."})
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to quantize (not modified)."}),
            "precision": precision,
            "backend": _BACKEND,
        }}

    def quantize(self, model, precision, backend):
        model, report = _quantize(model, precision, backend, "Q-Sched Quantize Model")
        return {"ui": {"text": [report]}, "result": (model, report)}


NODE_CLASS_MAPPINGS = {
    "QSchedCheckpointLoader": QSchedCheckpointLoader,
    "QSchedDiffusionModelLoader": QSchedDiffusionModelLoader,
    "QSchedQuantizeModel": QSchedQuantizeModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QSchedCheckpointLoader": "Q-Sched Checkpoint Loader (quantized)",
    "QSchedDiffusionModelLoader": "Q-Sched Diffusion Model Loader (quantized)",
    "QSchedQuantizeModel": "Q-Sched Quantize Model",
}
