"""The tiny world's data: scikit-learn's handwritten digits (1,797 images, 8x8, shipped inside the pip package),
upscaled to 16x16, each with a prompt built from its class and a style attribute read off the image.

* pixels: ``load_digits().images / 16`` (0..1, ink = 1), bilinearly upscaled 8x8 -> 16x16; tensors [N, 1, 16, 16].
* style: stroke thickness from ink mass (sum of the 8x8 pixels), split at the median *of the digit's own class*
  (a "1" has less ink than an "8" whatever the pen, so a global split would just re-encode the class):
  ``thin`` below or at the class median, ``thick`` above. 10 digits x 2 styles = 20 prompts.
* prompt: ``"a handwritten digit seven, thick stroke"``.
* split (deterministic, no RNG): image i is held out when ``i % 5 == 0`` (360 images), else train (1,437).

scikit-learn is imported only when the data is loaded (``pip install scikit-learn``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("thin", "thick")
IMAGE_SIZE = 16
HELDOUT_EVERY = 5
# The text encoder's vocabulary: every word of every prompt; anything else maps to <unk>.
VOCAB = ("<pad>", "<unk>", "a", "handwritten", "digit", "stroke") + DIGIT_NAMES + STYLES
_WORD = re.compile(r"[a-z]+")


def prompt_for(digit: int, style: int) -> str:
    """``prompt_for(7, 1) == "a handwritten digit seven, thick stroke"``."""
    return f"a handwritten digit {DIGIT_NAMES[digit]}, {STYLES[style]} stroke"


def all_prompts() -> list[str]:
    """The 20 prompts, digit-major: zero thin, zero thick, one thin, ... (the calibration set)."""
    return [prompt_for(d, s) for d in range(10) for s in range(len(STYLES))]


def joint_label(digit: int, style: int) -> int:
    return digit * len(STYLES) + style


def parse_prompt(prompt: str) -> tuple[int, int | None]:
    """(digit, style) named by a prompt; style is None when the prompt names none. Raises when no digit or two
    different digits/styles are named (the alignment score would be undefined)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = _WORD.findall(prompt.lower())
    digits = {DIGIT_NAMES.index(w) for w in words if w in DIGIT_NAMES}
    styles = {STYLES.index(w) for w in words if w in STYLES}
    if len(digits) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one digit ({', '.join(DIGIT_NAMES)}); "
                         f"it names {len(digits)}")
    if len(styles) > 1:
        raise ValueError(f"prompt {prompt!r} names both stroke styles {STYLES}")
    return digits.pop(), (styles.pop() if styles else None)


def tokenize(prompts, max_len: int = 12) -> torch.Tensor:
    """Word ids [B, max_len] (0 = padding, 1 = unknown word), truncated to ``max_len`` words."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = torch.zeros(len(prompts), max_len, dtype=torch.long)
    index = {w: i for i, w in enumerate(VOCAB)}
    for row, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}")
        ids = [index.get(w, 1) for w in _WORD.findall(p.lower())][:max_len]
        if ids:
            out[row, :len(ids)] = torch.tensor(ids)
    return out


@dataclass(frozen=True)
class DigitSet:
    """Images [N, 1, 16, 16] in 0..1 (ink = 1), with digit, style and joint (20-way) labels and prompts."""

    images: torch.Tensor
    digits: torch.Tensor
    styles: torch.Tensor
    index: torch.Tensor  # row in sklearn's load_digits

    @property
    def joint(self) -> torch.Tensor:
        return self.digits * len(STYLES) + self.styles

    @property
    def prompts(self) -> list[str]:
        return [prompt_for(int(d), int(s)) for d, s in zip(self.digits, self.styles)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, mask: torch.Tensor) -> "DigitSet":
        return DigitSet(self.images[mask], self.digits[mask], self.styles[mask], self.index[mask])


def upscale(images8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[N, 8, 8] or [N, 1, 8, 8] in 0..1 -> [N, 1, size, size], bilinear (half-pixel centres), clamped."""
    x = images8.float()
    if x.dim() == 3:
        x = x[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def thickness_styles(images8: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """1 (thick) where the ink mass exceeds the median ink mass of the image's digit class, else 0 (thin)."""
    ink = images8.reshape(images8.shape[0], -1).sum(1)
    styles = torch.zeros_like(digits)
    for d in range(10):
        m = digits == d
        styles[m] = (ink[m] > ink[m].median()).long()
    return styles


@lru_cache(maxsize=2)
def _load(size: int) -> DigitSet:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the tiny world needs scikit-learn's digits data: pip install scikit-learn") from exc
    d = load_digits()
    images8 = torch.tensor(d.images, dtype=torch.float32) / 16.0
    digits = torch.tensor(d.target, dtype=torch.long)
    styles = thickness_styles(images8, digits)
    return DigitSet(upscale(images8, size), digits, styles, torch.arange(len(digits)))


def load_digit_set(split: str = "train", size: int = IMAGE_SIZE) -> DigitSet:
    """``split``: "train" (i % 5 != 0), "heldout" (i % 5 == 0) or "all"."""
    full = _load(size)
    if split == "all":
        return full
    held = full.index % HELDOUT_EVERY == 0
    if split == "heldout":
        return full.subset(held)
    if split == "train":
        return full.subset(~held)
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def to_image(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] pixels (0..1) -> ComfyUI IMAGE [B, H, W, 3] (grey replicated), clamped to 0..1."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected [B, 1, H, W] pixels, got {tuple(x.shape)}")
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()


def from_image(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, 3] -> grey pixels [B, 1, H, W] (channel mean), resized to 16x16 if needed."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be [B, H, W, 3] (ComfyUI IMAGE), got {shape}")
    x = images.float().mean(-1, keepdim=True).permute(0, 3, 1, 2)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ degradations
DEGRADATIONS = ("noise", "blur", "contrast", "ghost", "speckle")


def blur(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Gaussian blur of [B, 1, H, W] with per-image ``sigma`` (pixels; 5x5 kernel, reflect padding)."""
    sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0]).clamp_min(1e-3)
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (r[None] / sig[:, None]) ** 2)
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :])[:, None]  # [B, 1, 5, 5]
    xp = F.pad(x, (2, 2, 2, 2), mode="reflect")
    out = F.conv2d(xp.reshape(1, x.shape[0], *xp.shape[-2:]), k2, groups=x.shape[0])
    return out.reshape_as(x)


def degrade(x: torch.Tensor, kind: str, strength: float | torch.Tensor, generator: torch.Generator | None = None,
            others: torch.Tensor | None = None) -> torch.Tensor:
    """Degraded copies of pixels ``x`` [B, 1, H, W] (0..1); ``strength`` in [0, 1] (0 = unchanged), per image.

    noise: + N(0, (0.5·s)²); blur: Gaussian sigma 2·s px; contrast: ink and paper pulled to grey by s/1.25;
    ghost: blended with ``others`` (another digit) at weight s/2; speckle: a fraction s/2 of pixels replaced by
    uniform values."""
    s = torch.as_tensor(strength, dtype=x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
    if kind == "noise":
        out = x + 0.5 * s * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    elif kind == "blur":
        out = torch.where(s > 0, blur(x, 2.0 * s.reshape(-1)), x)
    elif kind == "contrast":
        out = 0.5 + (x - 0.5) * (1.0 - s / 1.25)
    elif kind == "ghost":
        if others is None:
            others = x.roll(1, 0)
        out = (1.0 - s / 2) * x + (s / 2) * others
    elif kind == "speckle":
        mask = torch.rand(x.shape, generator=generator) < s / 2
        out = torch.where(mask, torch.rand(x.shape, generator=generator, dtype=x.dtype), x)
    else:
        raise ValueError(f"kind must be one of {DEGRADATIONS}, got {kind!r}")
    return out.clamp(0.0, 1.0)
