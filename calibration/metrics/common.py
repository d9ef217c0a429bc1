"""Shared pieces of the metric backends: image checks, preprocessing, model loading and caching.

Images enter every metric in ComfyUI IMAGE layout: a float tensor [B, H, W, 3] in 0..1. Preprocessing
(resize, crop, CLIP normalisation) runs on tensors, batched, on the scoring device.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .safe_load import read_weights, state_dict_of
from .weights import WeightFileError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RANGE_TOL = 1e-3  # VAE decodes may overshoot 0..1 by float error; anything more is a wrong range
OVERSHOOT_MAX = 1.5  # above: another pixel range (0..255); up to it: an unclamped 0..1 image
UNDERSHOOT_MIN = -0.5  # below: -1..1 pixels; down to it: an unclamped 0..1 image


def check_images(images: torch.Tensor, device=None) -> torch.Tensor:
    """Validate a ComfyUI IMAGE batch and return it as float32 [B, 3, H, W] in 0..1 on ``device``.

    uint8 batches (0..255) are converted with a warning; every other layout, dtype or range problem raises,
    so that no image is ever scored silently wrong.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B,H,W,3] (ComfyUI IMAGE), got {type(images).__name__}")
    if images.dim() == 3 and images.shape[-1] == 3:
        raise ValueError(f"images must be a batch [B,H,W,3]; got one image {tuple(images.shape)}: use images[None]")
    if images.dim() != 4 or images.shape[-1] != 3:
        hint = " (this looks channels-first [B,3,H,W]: use images.permute(0, 2, 3, 1))" if (
            images.dim() == 4 and images.shape[1] == 3) else ""
        raise ValueError(f"images must be [B,H,W,3] (ComfyUI IMAGE layout), got shape {tuple(images.shape)}{hint}")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"empty image batch {tuple(images.shape)}")
    if device is not None:  # check and convert where the scoring happens (fast on GPU)
        images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        warnings.warn("uint8 images (0..255) were converted to float 0..1 by dividing by 255", stacklevel=3)
        x = images.float() / 255.0
    elif images.is_floating_point():
        x = images.float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or Inf")
        lo, hi = float(x.min()), float(x.max())
        if hi > 1.0 + RANGE_TOL:
            hint = ("This looks like 0..255 pixels: divide by 255 first" if hi > OVERSHOOT_MAX else
                    "The values overshoot 1 slightly (e.g. a decoder or an upscaler without a clamp): use "
                    "images.clamp(0, 1) first")
            raise ValueError(f"float images must be in 0..1 (ComfyUI IMAGE); max is {hi:.6g}. {hint}")
        if lo < -RANGE_TOL:
            hint = ("This looks like -1..1 (VAE/diffusers range): use (images + 1) / 2 first" if lo < UNDERSHOOT_MIN
                    else "The values dip below 0 slightly: use images.clamp(0, 1) first")
            raise ValueError(f"float images must be in 0..1 (ComfyUI IMAGE); min is {lo:.6g}. {hint}")
        x = x.clamp(0.0, 1.0)
    else:
        raise TypeError(f"images must be float (0..1) or uint8 (0..255), got dtype {images.dtype}")
    return x.permute(0, 3, 1, 2)


def normalize(x: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def resize(x: torch.Tensor, size: tuple[int, int], clamp: bool = True) -> torch.Tensor:
    """Bicubic, antialiased (torchvision's tensor Resize); clamped back to 0..1 unless ``clamp=False`` (PIL, which
    CLIP's reference preprocessing resizes with, saturates; a tensor pipeline such as HPSv2's does not)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0) if clamp else x


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's eval transform: shortest side to ``size`` (bicubic), then a centred ``size`` x ``size`` crop.

    The long side is ``int(size * long / short)`` (truncated), as torchvision's ``Resize(int)`` and transformers'
    ``CLIPImageProcessor`` compute it; the crop offsets round like torchvision's ``center_crop``.
    """
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = max(size, int(size * long / short))
    nh, nw = (size, new_long) if h <= w else (new_long, size)
    x = resize(x, (nh, nw))
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def letterbox(x: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's eval transform (``ResizeMaxSize`` of its open_clip fork): the longest side to ``size`` (bicubic,
    ``round`` of each side), then zero padding to ``size`` x ``size``, left/top getting the smaller half. Runs on
    the 0..1 tensor like the original (no clamp). The original skips resize and padding when the longest side is
    already ``size``, which leaves a non-square image its ViT cannot take; we pad it as well."""
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    nh, nw = (round(h * scale), round(w * scale)) if scale != 1.0 else (h, w)
    x = resize(x, (nh, nw), clamp=False)
    pad_h, pad_w = size - nh, size - nw
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA + fp16 when available, else CPU + fp32 (CPU half-precision convs are slow or missing)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


_MODELS: dict[tuple, object] = {}


def cached_model(key: tuple, build: Callable[[], object]):
    """Load each (kind, file, device, dtype) once per process."""
    if key not in _MODELS:
        _MODELS[key] = build()
    return _MODELS[key]


def clear_model_cache() -> None:
    _MODELS.clear()


def file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def frozen_eval(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_openai_clip(path: Path, device, dtype, *, expect: str, what: str):
    """An OpenAI-format CLIP (the TorchScript archive OpenAI ships, its plain state dict, or a safetensors copy),
    built as an open_clip model. The archive is read by :mod:`.safe_load` (tensors only; its code never runs).

    ``expect`` is "resnet" or "vit": a file of the other family is rejected with a clear error.
    """

    def build():
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.model import build_model_from_openai_state_dict
        from open_clip.modified_resnet import ModifiedResNet

        state_dict = state_dict_of(read_weights(path, what), path, what)
        try:
            model = build_model_from_openai_state_dict(state_dict, cast_dtype=None).float()
        except Exception as exc:  # keys or shapes of another architecture: say which file and why
            raise WeightFileError(f"{what}: {path} is not an OpenAI CLIP checkpoint "
                                  f"({type(exc).__name__}: {str(exc)[:300]})") from None
        model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        is_resnet = isinstance(model.visual, ModifiedResNet)
        if expect in ("resnet", "vit") and (expect == "resnet") != is_resnet:
            got = "ResNet" if is_resnet else "ViT"
            raise WeightFileError(f"{what}: {path} holds a {got} CLIP, but this metric needs a "
                                  f"{'ResNet (RN50)' if expect == 'resnet' else 'ViT'} CLIP")
        return frozen_eval(model, device, dtype)

    return cached_model(("openai", file_key(path), expect, str(device), dtype), build)


def load_open_clip(path: Path, model_name: str, device, dtype, *, what: str):
    """open_clip architecture ``model_name`` built without any download, then the local checkpoint (open_clip
    training checkpoint ``{"state_dict": ...}``, plain state dict or safetensors) loaded strictly, read without
    running code from the file."""

    def build():
        import open_clip

        state_dict = state_dict_of(read_weights(path, what), path, what)
        model = open_clip.create_model(model_name, pretrained=None, device=device)  # random init is fast on GPU
        try:
            model.load_state_dict(state_dict, strict=True)
        except Exception as exc:
            raise WeightFileError(
                f"{what}: {path} is not a loadable {model_name} open_clip checkpoint "
                f"({type(exc).__name__}: {str(exc)[:500]})") from None
        return frozen_eval(model, device, dtype)

    return cached_model(("open_clip", file_key(path), model_name, str(device), dtype), build)


def open_clip_tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """CLIP BPE tokens; prompts longer than the context are cut and keep the end-of-text token last, so the
    text embedding (taken at EOT) still exists (torchmetrics instead drops EOT for long sDCI prompts)."""
    from open_clip.tokenizer import tokenize

    return tokenize(list(texts), context_length=context_length)


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


def chunks(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


class TextCache:
    """Per-model cache of prompt embeddings: calibration scores the same prompts at every grid point."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_items: int = 4096):
        self._encode, self._max, self._store = encode, max_items, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._store))
        if len(self._store) + len(missing) > self._max:
            self._store.clear()
            missing = list(dict.fromkeys(texts))
        if missing:
            for t, e in zip(missing, self._encode(missing)):
                self._store[t] = e
        return torch.stack([self._store[t] for t in texts])


def check_prompts(prompts, n: int) -> list[str]:
    """One prompt string per image (or one string for all): anything else raises naming what was given."""
    if prompts is None:
        raise ValueError(f"prompts are missing (None): give one prompt string per image, or one string for all "
                         f"{n} images")
    if isinstance(prompts, str):
        prompts = [prompts] * n
    elif isinstance(prompts, (bytes, bytearray)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__} ({p!r:.60})")
    if len(prompts) == 1 and n > 1:
        prompts = prompts * n
    if len(prompts) != n:
        raise ValueError(f"need one prompt string per image (or a single prompt for all): {n} images, "
                         f"{len(prompts)} prompts")
    return prompts


__all__ = ["check_images", "check_prompts", "normalize", "resize", "resize_center_crop", "letterbox",
           "default_device_dtype",
           "cached_model", "clear_model_cache", "load_openai_clip", "load_open_clip", "open_clip_tokenize",
           "unit", "chunks", "TextCache"]


def batched_cosine(encoder, text: "TextCache", images: torch.Tensor, prompts, device, batch_size: int) -> torch.Tensor:
    """cos(unit image feature, unit prompt feature) per image, in batches; float32 on the CPU."""
    x = check_images(images, device)
    prompts = check_prompts(prompts, x.shape[0])
    out = []
    for s in chunks(x.shape[0], batch_size):
        img = unit(encoder.encode_image(encoder.preprocess(x[s].to(device))))
        out.append((img * text(prompts[s])).sum(-1))
    return torch.cat(out).float().cpu()
