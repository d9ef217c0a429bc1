"""CLIPScore (Hessel et al., 2021): ``100 * max(cos(E_img, E_txt), 0)`` per image.

The model is a CLIP ViT-L/14 by default (as torchmetrics' ``openai/clip-vit-large-patch14``), loaded from
an OpenAI ``.pt`` file, an open_clip checkpoint (give ``open_clip_model``) or a transformers CLIP folder.
Prompts longer than the text context are truncated and keep their end-of-text token.
"""

from __future__ import annotations

import os

import torch

from . import weights as W
from .clip_encoders import OpenClipEncoder, load_hf_clip
from .common import TextCache, batched_cosine, default_device_dtype, load_open_clip, load_openai_clip, unit

WHAT = W.SPECS["clipscore"].what


class CLIPScore:
    name = "clipscore"
    range = (0.0, 100.0)

    def __init__(self, weights: str | os.PathLike | None = None, *, open_clip_model: str | None = None,
                 device=None, dtype=None, batch_size: int = 64):
        self.device, self.dtype = default_device_dtype(device, dtype)
        path = W.resolve("clipscore", weights)
        if path.is_dir():
            self.encoder = load_hf_clip(path, self.device, self.dtype, WHAT)
        elif open_clip_model is not None:
            self.encoder = OpenClipEncoder(load_open_clip(path, open_clip_model, self.device, self.dtype, what=WHAT))
        else:
            self.encoder = OpenClipEncoder(load_openai_clip(path, self.device, self.dtype, expect="any", what=WHAT))
        self.batch_size = batch_size
        self.text = TextCache(lambda t: unit(self.encoder.encode_text(t)))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        cos = batched_cosine(self.encoder, self.text, images, prompts, self.device, self.batch_size)
        return 100.0 * cos.clamp(min=0.0)
