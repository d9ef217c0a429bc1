"""Two ways to hold a CLIP: an open_clip model or a transformers ``CLIPModel`` folder. Both give the same
interface (projected, un-normalised features), so CLIPScore runs on either."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .common import (OPENAI_MEAN, OPENAI_STD, cached_model, file_key, frozen_eval, letterbox, normalize,
                     open_clip_tokenize, resize_center_crop)
from .weights import WeightFileError


class OpenClipEncoder:
    """``geometry``: "crop" (CLIP: shortest side, centre crop) or "letterbox" (HPSv2: longest side, zero pad)."""

    def __init__(self, model, geometry: str = "crop"):
        if geometry not in ("crop", "letterbox"):
            raise ValueError(f"geometry must be 'crop' or 'letterbox', got {geometry!r}")
        self.model, self.geometry = model, geometry
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
        self.std = getattr(model.visual, "image_std", None) or OPENAI_STD
        self.context_length = model.context_length
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        fit = letterbox if self.geometry == "letterbox" else resize_center_crop
        return normalize(fit(x01, self.image_size), self.mean, self.std)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(open_clip_tokenize(texts, self.context_length).to(self.device))


class HFClipEncoder:
    """A transformers CLIP folder (config.json + weights + tokenizer [+ preprocessor_config.json])."""

    def __init__(self, folder: Path, device, dtype, what: str):
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise WeightFileError(f"{what}: cannot load the transformers CLIP folder {folder} "
                                  f"({type(exc).__name__}: {str(exc)[:500]})") from exc
        self.model = frozen_eval(model, device, dtype)
        self.device, self.dtype = device, dtype
        cfg = {}
        pp = folder / "preprocessor_config.json"
        if pp.is_file():
            cfg = json.loads(pp.read_text())
        crop = cfg.get("crop_size", model.config.vision_config.image_size)
        self.image_size = int(crop["height"] if isinstance(crop, dict) else crop)
        self.mean = tuple(cfg.get("image_mean", OPENAI_MEAN))
        self.std = tuple(cfg.get("image_std", OPENAI_STD))
        self.context_length = model.config.text_config.max_position_embeddings

    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        return normalize(resize_center_crop(x01, self.image_size), self.mean, self.std)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype))
        return self.model.visual_projection(out.pooler_output)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        # truncation keeps the end-of-text token: the tokenizer adds specials after cutting
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                             return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return self.model.text_projection(out.pooler_output)


def load_hf_clip(folder: Path, device, dtype, what: str) -> HFClipEncoder:
    return cached_model(("hf", file_key(folder / "config.json") if (folder / "config.json").exists()
                         else str(folder), str(device), dtype), lambda: HFClipEncoder(folder, device, dtype, what))
