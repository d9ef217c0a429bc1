"""HPSv2.1 (Wu et al., 2023): ``<unit(f_img), unit(f_txt)>`` of an open_clip ViT-H-14 fine-tuned on human
preferences (typically 0.2..0.35 on real images; a cosine, so always within -1..1).

The architecture is built by open_clip from its bundled ``ViT-H-14`` config with ``pretrained=None`` (no
LAION download, unlike ``hpsv2.score``), then ``HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``) is loaded
strictly. Preprocessing is HPS's eval transform (``preprocess_val`` of ``hpsv2.img_score``, built with
``light_augmentation=True``): the longest side to 224 (bicubic), zero padding to a square (letterbox, no crop),
OpenAI mean/std.
"""

from __future__ import annotations

import os

import torch

from . import weights as W
from .clip_encoders import OpenClipEncoder
from .common import TextCache, batched_cosine, default_device_dtype, load_open_clip, unit

WHAT = W.SPECS["hpsv2"].what


class HPSv2:
    name = "hpsv2"
    range = (-1.0, 1.0)

    def __init__(self, weights: str | os.PathLike | None = None, *, model_name: str = "ViT-H-14", device=None,
                 dtype=None, batch_size: int = 32):
        self.device, self.dtype = default_device_dtype(device, dtype)
        path = W.resolve("hpsv2", weights)
        self.encoder = OpenClipEncoder(load_open_clip(path, model_name, self.device, self.dtype, what=WHAT),
                                       geometry="letterbox")
        self.batch_size = batch_size
        self.text = TextCache(lambda t: unit(self.encoder.encode_text(t)))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return batched_cosine(self.encoder, self.text, images, prompts, self.device, self.batch_size)
