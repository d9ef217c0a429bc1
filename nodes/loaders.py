"""Loader nodes: quantized models that ComfyUI's memory manager handles like its own.

* The two loaders hand ComfyUI's own loader ``model_options["custom_operations"]`` (``nodes.quant_ops``): each
  Linear is quantized while its weights stream in, or read from a pre-quantized file (Save Quantized Model /
  ``qsched quantize``), so the full-precision model never exists in RAM or VRAM.
* Quantize Model builds a new model object from any MODEL (core, GGUF, after LoRA); the input MODEL is untouched.
* Save Quantized Model writes the pre-quantized file.
ComfyUI modules are imported inside functions only.
"""

from __future__ import annotations

import os

from ..qsched.quant import QuantSpec, native
from .common import CATEGORY_LOADERS, NodeInputError, check_combo
from .quant_model import load_quantized, quantize_comfy_model, save_native, save_quantized
from .quant_ops import COMFY_BACKENDS

#: fp16 / bf16 = no quantization (weights kept in that dtype); "fast 8-bit" = w8a8-fp8 on GPUs with FP8 tensor cores
#: (Ada, Hopper, newer), else w8a8; the rest are qsched.quant formats.
FLOAT_PRECISIONS = ("fp16", "bf16")
FAST_8BIT = "fast 8-bit"
QUANT_PRECISIONS = ("w8a8", "w8a8-fp8", FAST_8BIT, "w4a8", "w4a6", "w4a5", "w4a4", "w4a8-fp8")
PRECISIONS = FLOAT_PRECISIONS + QUANT_PRECISIONS

_PRECISION_TIP = ("wXaY: X-bit weights and Y-bit activations on every Linear layer of the diffusion model (embedders "
                  "and final layer stay in 16 bit); w4a8 is the paper's main setting. w8a8-fp8: float8 weights and "
                  "activations, the fastest format on GPUs with FP8 (RTX 40xx, L4/L40, H100/H200); 'fast 8-bit' "
                  "picks it there and int8 w8a8 elsewhere. w4a8-fp8: 4-bit weights (w4a8's size) run on the FP8 "
                  "tensor cores; needs an FP8 GPU.")
_BACKEND = (list(COMFY_BACKENDS), {"default": "auto", "tooltip":
            "How quantized layers run. auto / native: integer and FP8 kernels where the device has them. simulated: "
            "round-trip in float32 (same numbers, any device, slow)."})


def resolve_precision(precision: str) -> str:
    """'fast 8-bit' -> w8a8-fp8 on an FP8 GPU, else w8a8; other names unchanged."""
    if precision != FAST_8BIT:
        return precision
    import torch

    import comfy.model_management as mm

    dev = mm.get_torch_device()
    if getattr(dev, "type", str(dev)) == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9):
        return "w8a8-fp8"
    return "w8a8"


def _dtype_options(precision: str) -> dict:
    import torch

    return {"fp16": {"dtype": torch.float16}, "bf16": {"dtype": torch.bfloat16}}.get(precision, {})


def _ui(model, report: str, *extra):
    return {"ui": {"text": [report]}, "result": (model, *extra, report)}


class _QSchedLoaderBase:
    """Shared by the checkpoint and diffusion-model loaders: resolve the file, load with quantizing operations,
    turn every bad input into one error naming the input and the file."""

    CATEGORY = CATEGORY_LOADERS
    FUNCTION = "load"
    FOLDER = ""
    FILE_INPUT = ""
    CHECKPOINT = False

    @classmethod
    def file_input(cls, tooltip: str) -> dict:
        import folder_paths

        return {"required": {
            cls.FILE_INPUT: (folder_paths.get_filename_list(cls.FOLDER), {"tooltip": tooltip}),
            "precision": (list(PRECISIONS), {"default": "w4a8", "tooltip":
                          _PRECISION_TIP + " fp16/bf16: no quantization. A pre-quantized file keeps its own format."}),
            "backend": _BACKEND,
        }}

    def _path(self, name: str) -> str:
        import folder_paths

        path = folder_paths.get_full_path(self.FOLDER, name)
        if path is None:
            raise NodeInputError(self.DISPLAY_NAME, self.FILE_INPUT, f"file {name!r} not found in models/{self.FOLDER}/ "
                                 f"(or the '{self.FOLDER}' paths of extra_model_paths.yaml)")
        return path

    def _check(self, precision: str, backend: str) -> str:
        check_combo(self.DISPLAY_NAME, "precision", precision, PRECISIONS)
        check_combo(self.DISPLAY_NAME, "backend", backend, COMFY_BACKENDS)
        return resolve_precision(precision)

    def _load_float(self, path: str, precision: str):
        raise NotImplementedError

    def load_file(self, name: str, precision: str, backend: str):
        """-> (model, clip, vae, report text)"""
        precision = self._check(precision, backend)
        path = self._path(name)
        from safetensors import SafetensorError

        try:
            if precision in FLOAT_PRECISIONS:
                from ..qsched.quant import prequant

                if prequant.read_metadata(path) is None:
                    model, clip, vae = self._load_float(path, precision)
                    return model, clip, vae, self._report(path, model, f"{precision}, not quantized")
            model, clip, vae, report = load_quantized(path, QuantSpec.parse(
                "w4a8" if precision in FLOAT_PRECISIONS else precision), backend, checkpoint=self.CHECKPOINT,
                embedding_directory=self._embeddings())
        except (ValueError, SafetensorError, OSError) as exc:
            raise NodeInputError(self.DISPLAY_NAME, self.FILE_INPUT, f"{name!r}: {exc}") from None
        except RuntimeError as exc:  # ComfyUI: "Could not detect model type of ...", or layers that do not fit
            raise NodeInputError(self.DISPLAY_NAME, self.FILE_INPUT, f"{name!r}: {_load_failure(exc, self.CHECKPOINT)}"
                                 ) from None
        return model, clip, vae, self._report(path, model, report)

    @staticmethod
    def _report(path: str, model, what: str) -> str:
        """The loader's box: the file, how it was loaded, and the size ComfyUI counts for it (quantized or not, so
        the full-precision reference and the quantized model can be compared)."""
        return f"{os.path.basename(path)}: {what}\nComfyUI size: {model.model_size() / 2**30:.2f} GiB"

    def _embeddings(self):
        import folder_paths

        return folder_paths.get_folder_paths("embeddings")


def _load_failure(exc: RuntimeError, checkpoint: bool) -> str:
    """ComfyUI's RuntimeError while it detects or builds the model, in one sentence with what to do. Layers that do not
    fit the model ComfyUI built from the file's keys ("Error(s) in loading state_dict for X"): a family this ComfyUI
    does not know (a newer model whose keys look like an older family's) or a damaged file."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    if head.startswith("Error(s) in loading state_dict for "):
        built = head[len("Error(s) in loading state_dict for "):].rstrip(":")
        first = lines[1][:200] if len(lines) > 1 else ""
        return (f"its layers do not fit the model ComfyUI built from its keys ({built}; {first}): this ComfyUI does "
                "not know the model's family (a model newer than this ComfyUI needs a newer ComfyUI) or the file is "
                "damaged. Check that the core Load Diffusion Model loads it; update ComfyUI if it does not")
    return f"{head}; is it a {'checkpoint' if checkpoint else 'diffusion model'} file?"


class QSchedCheckpointLoader(_QSchedLoaderBase):
    DESCRIPTION = ("Loads a checkpoint (e.g. sd_xl_turbo_1.0_fp16.safetensors) like Load Checkpoint; its diffusion "
                   "model's Linear layers are quantized while they load (no full-precision copy). CLIP and VAE stay "
                   "in full precision.")
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE", "report")
    OUTPUT_TOOLTIPS = ("The quantized diffusion model.", "The text encoder(s).", "The VAE.",
                       "What was quantized, and how; ComfyUI's size of the model.")
    FOLDER, FILE_INPUT, CHECKPOINT = "checkpoints", "ckpt_name", True
    DISPLAY_NAME = "Q-Sched Checkpoint Loader (quantized)"

    @classmethod
    def INPUT_TYPES(cls):
        return cls.file_input("A checkpoint file in models/checkpoints/ (UNet + text encoders + VAE in one file).")

    def _load_float(self, path, precision):
        import comfy.sd

        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                    embedding_directory=self._embeddings(),
                                                    model_options=_dtype_options(precision))
        if out[0] is None:
            raise ValueError("ComfyUI found no diffusion model in this file")
        return out[:3]

    def load(self, ckpt_name, precision, backend):
        model, clip, vae, text = self.load_file(ckpt_name, precision, backend)
        return {"ui": {"text": [text]}, "result": (model, clip, vae, text)}


class QSchedDiffusionModelLoader(_QSchedLoaderBase):
    DESCRIPTION = ("Loads a diffusion model alone (e.g. flux1-schnell.safetensors from models/diffusion_models/) "
                   "like Load Diffusion Model, quantizing its Linear layers while they load; also loads the "
                   "pre-quantized files of Q-Sched Save Quantized Model. Load text encoders and VAE with core nodes.")
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    OUTPUT_TOOLTIPS = ("The quantized diffusion model.", "What was quantized, and how; ComfyUI's size of the model.")
    FOLDER, FILE_INPUT = "diffusion_models", "unet_name"
    DISPLAY_NAME = "Q-Sched Diffusion Model Loader (quantized)"

    @classmethod
    def INPUT_TYPES(cls):
        return cls.file_input("A diffusion-model file in models/diffusion_models/ (e.g. flux1-schnell.safetensors), "
                              "or a pre-quantized file written by Q-Sched Save Quantized Model.")

    def _load_float(self, path, precision):
        import comfy.sd

        return comfy.sd.load_diffusion_model(path, model_options=_dtype_options(precision)), None, None

    def load(self, unet_name, precision, backend):
        model, _, _, text = self.load_file(unet_name, precision, backend)
        return _ui(model, text)


class QSchedQuantizeModel:
    DESCRIPTION = ("Quantizes any MODEL (Load Checkpoint, a GGUF loader, after LoRAs...) into a new model: the input "
                   "MODEL is left unchanged, and ComfyUI loads, counts and evicts the two independently, so "
                   "full-precision and quantized branches can share one load.")
    CATEGORY = CATEGORY_LOADERS
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    OUTPUT_TOOLTIPS = ("The quantized model (a new model object).", "What was quantized, and how.")
    FUNCTION = "quantize"
    DISPLAY_NAME = "Q-Sched Quantize Model"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to quantize (not modified). LoRAs applied to it are merged."}),
            "precision": (list(QUANT_PRECISIONS), {"default": "w4a8", "tooltip": _PRECISION_TIP}),
            "backend": _BACKEND,
        }}

    def quantize(self, model, precision, backend):
        check_combo(self.DISPLAY_NAME, "precision", precision, QUANT_PRECISIONS)
        check_combo(self.DISPLAY_NAME, "backend", backend, COMFY_BACKENDS)
        try:
            quantized, report = quantize_comfy_model(model, QuantSpec.parse(resolve_precision(precision)), backend)
        except ValueError as exc:
            raise NodeInputError(self.DISPLAY_NAME, "model", str(exc)) from None
        text = f"{report}\nComfyUI size: {quantized.model_size() / 2**30:.2f} GiB (input MODEL: " \
               f"{model.model_size() / 2**30:.2f} GiB)"
        return _ui(quantized, text)


FILE_FORMATS = ("qsched", "comfyui native")


class QSchedSaveQuantizedModel:
    DESCRIPTION = ("Writes a quantized MODEL (from the Q-Sched loaders or Quantize Model) to "
                   "models/diffusion_models/<name>.safetensors: codes, scales, format, skip list and the source "
                   "file's hash. Q-Sched Diffusion Model Loader loads it directly (no full-precision pass).")
    CATEGORY = CATEGORY_LOADERS
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    DISPLAY_NAME = "Q-Sched Save Quantized Model"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A MODEL quantized by a Q-Sched loader or Q-Sched Quantize Model."}),
            "filename": ("STRING", {"default": "flux1-schnell-w4a8", "tooltip":
                         "File name (without folder) in models/diffusion_models/; .safetensors is added."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            "file_format": (list(FILE_FORMATS), {"default": FILE_FORMATS[0], "tooltip":
                            "qsched: this pack's file (exact codes and scales; Q-Sched loaders only). comfyui native: "
                            "the quantized format newer ComfyUI (0.38+) loads with the stock Load Diffusion Model "
                            "(comfy-kitchen layouts: 8-bit int exact, float8 with one scale per tensor, 4-bit as "
                            "asym_w4a8_int8 re-rounded by comfy-kitchen); needs comfy-kitchen."}),
        }}

    def save(self, model, filename, overwrite, file_format=FILE_FORMATS[0]):
        import folder_paths

        name = (filename or "").strip()
        if name.lower().endswith(".safetensors"):
            name = name[:-len(".safetensors")]
        if not name or os.path.basename(name) != name or name.startswith("."):
            raise NodeInputError(self.DISPLAY_NAME, "filename", f"{filename!r}: give a plain file name (no folders, not "
                                 "starting with '.')")
        folder = folder_paths.get_folder_paths("diffusion_models")[0]
        path = os.path.join(folder, name + ".safetensors")
        if os.path.exists(path) and not overwrite:
            raise NodeInputError(self.DISPLAY_NAME, "filename", f"{path} exists; choose another name or set overwrite")
        check_combo(self.DISPLAY_NAME, "file_format", file_format, FILE_FORMATS)
        if file_format == "comfyui native":
            try:
                native.kitchen()
            except ValueError as exc:
                raise NodeInputError(self.DISPLAY_NAME, "file_format", str(exc)) from None
        try:
            if file_format == "comfyui native":
                info = save_native(model, path)
                size = info["bytes"]
                how = "same weights" if info["exact"] else "re-rounded by comfy-kitchen"
                extra = f", ComfyUI-native {info['layers']}, {how}"
            else:
                size, extra = save_quantized(model, path), ""
        except ValueError as exc:
            raise NodeInputError(self.DISPLAY_NAME, "model", str(exc)) from None
        text = f"wrote {path} ({size / 2**30:.2f} GiB{extra})"
        return {"ui": {"text": [text]}, "result": (path,)}


NODE_CLASS_MAPPINGS = {
    "QSchedCheckpointLoader": QSchedCheckpointLoader,
    "QSchedDiffusionModelLoader": QSchedDiffusionModelLoader,
    "QSchedQuantizeModel": QSchedQuantizeModel,
    "QSchedSaveQuantizedModel": QSchedSaveQuantizedModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}
