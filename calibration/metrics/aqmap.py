"""AQ-MAP (Q-Refine, Li et al. 2024; as used by Q-Sched): text-image alignment from CLIP Surgery.

For a prompt with head nouns ``n_1..n_J`` (see :mod:`.nouns`) and an image:

    T   = CLIP-Surgery ViT-B/16 image tokens, shape [1+P, D] (token 0 = CLS of the original path)
    F   = T / ||T||_2 taken over the token axis (dim=1, as the official code does; ``feature_norm="features"``
          normalises each token over channels instead)
    g_j = prompt-ensemble text feature of n_j (85 templates, each unit-normed, mean, unit-normed), g_0 of ""
    AQ  = mean_j sigmoid(10 * <F[0], g_j - g_0>)                                   in (0, 1); '' gives 0.5

CLIP Surgery (Li et al., "A closer look at the explainability of CLIP") runs the last 6 vision blocks on
two paths: the original one, and a path that adds the blocks' v-v self-attention outputs (no MLP); the
output tokens come from the surgery path except CLS, which is taken from the original path. The image is
resized to the model resolution (224, no crop). The official Q-Sched code JPEG-recompresses every image
first and turns any failure into 0.0; we score the image as given and raise on errors.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import weights as W
from .common import (TextCache, check_images, check_prompts, chunks, default_device_dtype, load_openai_clip,
                     normalize, open_clip_tokenize, resize, unit)
from .nouns import extract_nouns

WHAT = W.SPECS["aqmap"].what
SURGERY_BLOCKS = 6
SHARPNESS = 10.0

# Prompt-ensemble templates of CLIP Surgery (OpenAI's ImageNet templates plus five "scene" templates).
TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.', 'there is a {} in the scene.', 'there is the {} in the scene.',
    'this is a {} in the scene.', 'this is the {} in the scene.', 'this is one {} in the scene.',
)


def _dual_attention(blk, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(surgery, original) outputs of one block's attention on already layer-normed ``x`` [B, N, C]."""
    attn = blk.attn
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    merge = lambda t: attn.out_proj(t.transpose(1, 2).reshape(b, n, c))  # noqa: E731
    return merge(F.scaled_dot_product_attention(v, v, v)), merge(F.scaled_dot_product_attention(q, k, v))


def surgery_tokens(visual, pixels: torch.Tensor, blocks: int = SURGERY_BLOCKS) -> torch.Tensor:
    """CLIP-Surgery image tokens [B, 1+P, D] of an open_clip ``VisionTransformer`` (batch-first blocks)."""
    if not getattr(visual.transformer, "batch_first", True):
        raise RuntimeError("AQ-MAP needs open_clip >= 2.24 (batch-first transformer blocks)")
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    resblocks = list(visual.transformer.resblocks)
    blocks = min(blocks, len(resblocks))
    for blk in resblocks[:len(resblocks) - blocks]:
        x = blk(x)
    surg, orig = None, x
    for blk in resblocks[len(resblocks) - blocks:]:
        s, o = _dual_attention(blk, blk.ln_1(orig))
        surg = (orig if surg is None else surg) + blk.ls_1(s)  # the surgery path skips the MLP
        orig = orig + blk.ls_1(o)
        orig = orig + blk.ls_2(blk.mlp(blk.ln_2(orig)))
    surg = torch.cat([orig[:, :1], surg[:, 1:]], dim=1)  # CLS from the original path
    return visual.ln_post(surg) @ visual.proj


class AQMAP:
    name = "aqmap"
    range = (0.0, 1.0)

    def __init__(self, weights: str | os.PathLike | None = None, *, nouns: str = "auto",
                 feature_norm: str = "tokens", device=None, dtype=None, batch_size: int = 32):
        if feature_norm not in ("tokens", "features"):
            raise ValueError(f"feature_norm must be 'tokens' (official) or 'features', got {feature_norm!r}")
        self.device, self.dtype = default_device_dtype(device, dtype)
        self.model = load_openai_clip(W.resolve("aqmap", weights), self.device, self.dtype, expect="vit", what=WHAT)
        size = self.model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.nouns, self.feature_norm, self.batch_size = nouns, feature_norm, batch_size
        self.text = TextCache(self._ensemble)

    def _ensemble(self, words: list[str]) -> torch.Tensor:
        out = []
        for w in words:
            tokens = open_clip_tokenize([t.format(w) for t in TEMPLATES], self.model.context_length)
            e = unit(self.model.encode_text(tokens.to(self.device))).mean(dim=0)
            out.append(e / e.norm())
        return torch.stack(out)

    def image_tokens(self, x01: torch.Tensor) -> torch.Tensor:
        pixels = normalize(resize(x01.to(self.device), self.image_size)).to(self.dtype)
        t = surgery_tokens(self.model.visual, pixels).float()
        return t / t.norm(dim=1 if self.feature_norm == "tokens" else -1, keepdim=True)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        x = check_images(images, self.device)
        prompts = check_prompts(prompts, x.shape[0])
        g0 = self.text([""])[0]
        out = []
        for s in chunks(x.shape[0], self.batch_size):
            cls = self.image_tokens(x[s])[:, 0]
            for f, prompt in zip(cls, prompts[s]):
                g = self.text(list(extract_nouns(prompt, self.nouns))) - g0
                out.append(torch.sigmoid(SHARPNESS * (g @ f)).mean())
        return torch.stack(out).float().cpu()
