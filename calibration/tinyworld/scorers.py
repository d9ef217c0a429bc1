"""Stand-ins for the CLIP metrics of JAQ, trained on the tiny world's data (``train.py``).

* ``TinyTextAlignment`` (TC, like CLIPScore, 0..100): ``100 · p(prompted digit & stroke | image)`` from a 20-way
  (digit x style) CNN classifier; a prompt that names no style gets ``100 · p(digit)`` (style marginalised).
* ``TinyImageQuality`` (IQ, like CLIP-IQA, 0..1): ``p(real | image)`` from a CNN discriminator trained on real
  digits (with light pixel noise) against degraded ones (noise, blur, low contrast, ghosting, speckle).

Both are JAQ metric objects: ``metric(images, prompts) -> Tensor[B]`` (float32, CPU) on ComfyUI IMAGE batches
[B, H, W, 3] in 0..1 (grey replicated; other sizes are resized to 16x16), with ``name`` and ``range``, so
``calibration.jaq.JAQ(tc=TinyTextAlignment(...), iq=TinyImageQuality(...), k=2)`` combines them unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..metrics.common import check_prompts
from .data import STYLES, from_image, parse_prompt

RANGE_TOL = 1e-3


def _cnn(out: int, width: int = 16) -> nn.Sequential:
    """16x16 -> 16/32/32 channels at 16/8/4 px -> 64 -> ``out``."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.GELU(), nn.Linear(64, out))


class JointClassifierNet(nn.Module):
    """Pixels [B, 1, 16, 16] (0..1) -> logits over the 20 (digit, style) pairs, ``digit·2 + style``."""

    def __init__(self, classes: int = 10 * len(STYLES)):
        super().__init__()
        self.body = _cnn(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)


class ImageQualityNet(nn.Module):
    """Pixels -> logits (degraded, real)."""

    def __init__(self):
        super().__init__()
        self.body = _cnn(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)


class ReferenceNet(nn.Module):
    """The reference metric's network, deliberately unlike the scorers (an MLP, digit labels only):
    pixels -> 256 -> 128 -> ``features`` (64, the Fréchet space) -> 10 digit logits."""

    def __init__(self, pixels: int = 256, feature_dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(),
                                   nn.Linear(128, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def check_pixels(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, 3] float 0..1 -> grey pixels [B, 1, 16, 16]; wrong layouts and ranges raise."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("images must be a float tensor [B, H, W, 3] in 0..1 (ComfyUI IMAGE)")
    if images.dim() != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [B, H, W, 3] batch, got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or Inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
        raise ValueError(f"images must be in 0..1, got min {lo:.3g} max {hi:.3g}")
    return from_image(images)


class _Metric:
    def __init__(self, net: nn.Module, batch_size: int = 512):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.net(x[i:i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])


class TinyTextAlignment(_Metric):
    """TC stand-in: ``100 · p(prompted digit [& style] | image)``."""

    name = "tiny_tc"
    range = (0.0, 100.0)

    def __init__(self, net: JointClassifierNet, scale: float = 100.0, batch_size: int = 512):
        super().__init__(net, batch_size)
        self.scale = float(scale)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 10, 2] joint probabilities p(digit, style | image)."""
        x = check_pixels(images)
        return self._logits(x).softmax(-1).reshape(x.shape[0], 10, len(STYLES))

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        probs = self.probabilities(images)
        out = torch.empty(probs.shape[0])
        for i, p in enumerate(check_prompts(prompts, probs.shape[0])):
            d, s = parse_prompt(p)
            out[i] = probs[i, d].sum() if s is None else probs[i, d, s]
        return (self.scale * out).float()


class TinyImageQuality(_Metric):
    """IQ stand-in: ``p(real | image)`` in 0..1 (prompts are accepted and ignored, like CLIP-IQA)."""

    name = "tiny_iq"
    range = (0.0, 1.0)

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        return self._logits(check_pixels(images)).softmax(-1)[:, 1].float()
