"""Networks of the shape world: the text-conditioned UNet (eps teacher, LCM / TCD students, rectified flow), its
caption encoder, k-diffusion denoiser views, the tiny CLIP (open_clip's ``CLIP`` with a ``ModifiedResNet`` tower,
saved as an OpenAI-format state dict) and the independent reference network.

UNet layer names follow diffusers' ``UNet2DConditionModel`` where it matters for quantization: ``conv_in``,
``conv_out``, ``time_embedding`` and the caption encoder ``text_embedding`` stay full precision (``QUANT_SKIP``);
every other Conv2d / Linear is quantized (``QuantSpec(..., quantize_conv=True)``: this UNet is convolutional, so
a Linear-only format would leave nearly all of it in float).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import CAPTION_FACTORS, COLOUR_NAMES, COUNT_WORDS, FACTORS, LAYOUTS, SHAPES, SIZE

QUANT_SKIP = ("conv_in", "conv_out", "time_embedding", "text_embedding")
VOCAB = ("<pad>",) + tuple(sorted(set(COUNT_WORDS + COLOUR_NAMES + SHAPES + tuple(s + "s" for s in SHAPES)
                                      + ("above", "left", "of"))))
MAX_WORDS = 10


def tokenize(captions: list[str]) -> torch.Tensor:
    """Word ids [B, MAX_WORDS] (0 = padding; an empty caption is the unconditional input)."""
    out = torch.zeros(len(captions), MAX_WORDS, dtype=torch.long)
    for i, c in enumerate(captions):
        words = c.split()
        if len(words) > MAX_WORDS:
            raise ValueError(f"caption has {len(words)} words, at most {MAX_WORDS}: {c!r}")
        for j, w in enumerate(words):
            if w not in VOCAB:
                raise ValueError(f"word {w!r} of caption {c!r} is not in the shape-world vocabulary {VOCAB[1:]}")
            out[i, j] = VOCAB.index(w)
    return out


@dataclass
class UNetConfig:
    channels: tuple = (32, 48, 64)
    cond_dim: int = 96
    word_dim: int = 32
    groups: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TextEmbedding(nn.Module):
    """Order-aware caption encoder: word + position embeddings, flattened, 2-layer MLP."""

    def __init__(self, word_dim: int, out_dim: int):
        super().__init__()
        self.words = nn.Embedding(len(VOCAB), word_dim)
        self.pos = nn.Parameter(torch.randn(MAX_WORDS, word_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(MAX_WORDS * word_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = (self.words(ids) + self.pos[None]) * (ids > 0)[..., None].float()
        return self.mlp(e.flatten(1))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(cond_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cond):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class ShapeUNet(nn.Module):
    """32x32 RGB UNet (32 -> 16 -> 8), FiLM-conditioned on time + caption. ``forward(x, t, ids)``: ``t`` is the
    discrete timestep 0..999 (eps models) or 1000·sigma (flow); the output is eps (or the velocity)."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        c1, c2, c3 = cfg.channels
        d, g = cfg.cond_dim, cfg.groups
        self.time_embedding = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.text_embedding = TextEmbedding(cfg.word_dim, d)
        self.conv_in = nn.Conv2d(3, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, d, g)
        self.downsample1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, d, g)
        self.downsample2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.mid = ResBlock(c3, c3, d, g)
        self.up2 = ResBlock(c3 + c2, c2, d, g)
        self.up1 = ResBlock(c2 + c1, c1, d, g)
        self.norm_out = nn.GroupNorm(g, c1)
        self.conv_out = nn.Conv2d(c1, 3, 3, padding=1)

    def cond(self, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return F.silu(self.time_embedding(timestep_embedding(t, self.cfg.cond_dim)) + text)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``text``: the caption embedding [B, cond_dim] (``encode``), computed once per prompt."""
        c = self.cond(t, text)
        h1 = self.down1(self.conv_in(x), c)
        h2 = self.down2(self.downsample1(h1), c)
        h = self.mid(self.downsample2(h2), c)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up2(torch.cat([h, h2], 1), c)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], 1), c)
        return self.conv_out(F.silu(self.norm_out(h)))

    def encode(self, captions: list[str]) -> torch.Tensor:
        dev = self.conv_in.weight.device
        return self.text_embedding(tokenize(captions).to(dev))


# ------------------------------------------------------------------------------------------ sigma-space views
def vp_from_flow(net: ShapeUNet, x_vp: torch.Tensor, alpha_bar: torch.Tensor, text: torch.Tensor):
    """Read the velocity network on the VP diffusion path: (eps, x0) at ``x_vp = sqrt(ab)·x0 + sqrt(1−ab)·eps``.

    Exact change of variables: with a = sqrt(ab), s = sqrt(1−ab), ``x_vp/(a+s)`` is the rectified-flow point
    ``(1−sigma_f)·x0 + sigma_f·eps`` at ``sigma_f = s/(a+s)``; the net's ``v = eps − x0`` there gives
    ``x0 = x_f − sigma_f·v`` and ``eps = x_f + (1−sigma_f)·v``. ``alpha_bar``: [B, 1, 1, 1]."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    sf = s / (a + s)
    xf = x_vp / (a + s)
    v = net(xf, sf.reshape(-1) * 1000.0, text).to(x_vp.dtype)
    return xf + (1 - sf) * v, xf - sf * v


class EpsDenoiser:
    """k-diffusion view of the LCM / TCD students as EPS models on SD's VP schedule (sigma space
    ``x = x0 + sigma·eps``, ComfyUI ``ModelSamplingDiscrete``): ``denoised = x0`` of ``vp_from_flow`` at
    ``alpha_bar = 1/(1+sigma²)``; the sampler's eps is ``(x − denoised)/sigma``."""

    def __init__(self, net: ShapeUNet, text: torch.Tensor):
        self.net, self.text = net, text

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_):
        s = sigma.reshape(-1).expand(x.shape[0]).reshape(-1, 1, 1, 1).to(x.dtype)
        ab = 1 / (1 + s ** 2)
        return vp_from_flow(self.net, x * ab.sqrt(), ab, self.text)[1]


class FlowDenoiser:
    """Rectified flow ``x = (1−sigma)·x0 + sigma·noise``, net predicts ``v = noise − x0``:
    ``denoised = x − sigma·v``."""

    def __init__(self, net: ShapeUNet, text: torch.Tensor):
        self.net, self.text = net, text

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_):
        s = sigma.reshape(-1).expand(x.shape[0])
        v = self.net(x, s * 1000.0, self.text).to(x.dtype)
        return x - s.reshape(-1, 1, 1, 1).to(x.dtype) * v


# ------------------------------------------------------------------------------------------ tiny CLIP
@dataclass
class ClipConfig:
    """open_clip ``CLIP`` with a ``ModifiedResNet`` image tower (the CLIP-IQA architecture, RN50 in miniature)
    and a 64-wide text transformer; the token table is CLIP's BPE (49,408 rows), as the pack's tokenizer needs."""

    embed_dim: int = 64
    vision_layers: tuple = (1, 1, 1, 1)
    vision_width: int = 8
    image_size: int = SIZE
    context_length: int = 24
    text_width: int = 64
    text_layers: int = 1
    vocab_size: int = 49408

    def to_dict(self) -> dict:
        return asdict(self)


def build_clip(cfg: ClipConfig = ClipConfig()):
    """A fresh tiny CLIP built exactly like ``open_clip.build_model_from_openai_state_dict`` builds one from the
    saved file (QuickGELU, heads = width // 64), so that file loads back into the same architecture."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=tuple(cfg.vision_layers), width=cfg.vision_width, patch_size=None,
                           image_size=cfg.image_size)
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                       heads=cfg.text_width // 64, layers=cfg.text_layers)
    model = CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True, cast_dtype=None)
    with torch.no_grad():  # the attention pool's positional embedding is kept at zero (see train_clip)
        model.visual.attnpool.positional_embedding.zero_()
    model.visual.attnpool.positional_embedding.requires_grad_(False)
    return model


def clip_state_dict(model) -> dict:
    """The OpenAI-format state dict (the key layout of OpenAI's RN50.pt), float16, plus OpenAI's three scalars."""
    sd = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    sd["input_resolution"] = torch.tensor(model.visual.image_size if isinstance(model.visual.image_size, int)
                                          else model.visual.image_size[0])
    sd["context_length"] = torch.tensor(model.context_length)
    sd["vocab_size"] = torch.tensor(model.vocab_size)
    return sd


# ------------------------------------------------------------------------------------------ reference network
class ReferenceNet(nn.Module):
    """Plain CNN with batch norm (no attention pool, no text: unlike the CLIP), one head per factor including the
    nuisance ``texture`` (so its features notice lost texture). ``features`` (64-d) are the Fréchet space."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 2 * w),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * w * 16, 64), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(64, v) for k, v in FACTORS.items()})

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return self.body(x01 * 2 - 1)

    def forward(self, x01: torch.Tensor) -> dict:
        f = self.features(x01)
        return {k: h(f) for k, h in self.heads.items()}


__all__ = ["QUANT_SKIP", "VOCAB", "tokenize", "UNetConfig", "ShapeUNet", "vp_from_flow", "EpsDenoiser", "FlowDenoiser",
           "ClipConfig", "build_clip", "clip_state_dict", "ReferenceNet", "CAPTION_FACTORS", "LAYOUTS"]
