"""Tiny random CLIP scorers saved in the formats users have, for the JAQ tests.

* OpenAI format (what ``RN50.pt`` / ``ViT-B-16.pt`` / ``ViT-L-14.pt`` are): a TorchScript archive of a CLIP
  whose state dict has OpenAI's key names; built from an open_clip config with OpenAI's head rule
  (head width 64) and QuickGELU, then traced and saved.
* open_clip checkpoint (what ``HPS_v2.1_compressed.pt`` is): ``{"state_dict": ...}`` of a registered config.
* transformers CLIP folder (``openai/clip-vit-large-patch14`` layout): ``save_pretrained`` of a tiny
  ``CLIPModel`` and a ``CLIPTokenizer`` rebuilt from the real CLIP BPE bundled with open_clip.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

TEXT_CFG = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
TINY_HPS = "qsched-tiny-hps"  # ViT-H-14's structure (GELU, no QuickGELU) at toy size


def _clip(vision: dict, seed: int, quick_gelu: bool = True):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TEXT_CFG, quick_gelu=quick_gelu).eval()


def save_openai_torchscript(path: Path, kind: str, seed: int = 0) -> Path:
    """kind: "rn" (RN50-like ModifiedResNet) or "vit" (ViT with 7 blocks, so CLIP Surgery's 6 fit)."""
    import open_clip

    vision = (dict(layers=(1, 1, 1, 1), width=16, head_width=64, image_size=64) if kind == "rn"
              else dict(layers=7, width=64, head_width=64, patch_size=16, image_size=64))
    model = _clip(vision, seed)
    model.logit_scale.data.fill_(math.log(100.0))  # as in OpenAI's released files (the clamp value)
    # OpenAI's files keep the causal mask out of the state dict; open_clip registers it as a buffer
    model.attn_mask = model._buffers.pop("attn_mask")
    with warnings.catch_warnings():  # tracing is only a way to write the TorchScript format OpenAI ships
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.rand(1, 3, 64, 64), open_clip.tokenize(["a photo"])), check_trace=False)
        traced.save(str(path))
    return path


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
