"""Tiny random CLIP scorers saved in the formats users have, for the JAQ tests.

* OpenAI format (what ``RN50.pt`` / ``ViT-B-16.pt`` / ``ViT-L-14.pt`` are): ``save_openai_torchscript``, which
  lives in ``calibration.testing`` because the search benchmark uses it too.
* open_clip checkpoint (what ``HPS_v2.1_compressed.pt`` is): ``{"state_dict": ...}`` of a registered config.
* transformers CLIP folder (``openai/clip-vit-large-patch14`` layout): ``save_pretrained`` of a tiny
  ``CLIPModel`` and a ``CLIPTokenizer`` rebuilt from the real CLIP BPE bundled with open_clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qsched_pack.calibration.testing import save_openai_torchscript  # noqa: F401  (the tests import it from here)

TINY_HPS = "qsched-tiny-hps"  # ViT-H-14's structure (GELU, no QuickGELU) at toy size


def register_tiny_hps_config(tmp: Path) -> str:
    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    f = tmp / f"{TINY_HPS}.json"
    f.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(f))
    return TINY_HPS


def save_open_clip_checkpoint(path: Path, model_name: str, seed: int = 0) -> Path:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def save_hf_clip(folder: Path, seed: int = 0) -> Path:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=bpe.encoder, merges=merges, unk_token="<end_of_text>", bos_token="<start_of_text>",
                        eos_token="<end_of_text>", pad_token="<end_of_text>")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=48, patch_size=16),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def planted_images(n: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Distinct smooth images in ComfyUI layout [n, h, w, 3], 0..1."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    img = (img + 0.15 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)
    return img.permute(0, 2, 3, 1).contiguous()
