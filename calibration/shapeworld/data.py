"""Shape world data: procedurally rendered 32x32 colour scenes with captions whose every word is a generating factor.

A scene holds a group A (one or two objects of one colour and shape) and one object B, arranged by a relation:

    "two red circles above a blue square"        "a green triangle left of a yellow circle"

Factors (all in the caption, so alignment is checkable exactly): layout (``above`` / ``left of``), A's colour, shape
and count (1-2), B's colour and shape. Nuisance factors (not in the caption): object sizes, positions (jittered
inside their half of the image), background tone, and the **texture**: every object is filled with fine stripes
(period 4 px, orientation horizontal / vertical / diagonal, random phase) over a fine background checker, so that
quality can be lost (blur and noise erase the stripes first).

Everything is vectorised torch (CPU or GPU), seeded by an explicit ``torch.Generator``. Images are float
``[N, 3, 32, 32]`` in 0..1 (``to_image`` gives ComfyUI's ``[N, H, W, 3]``).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIZE = 32
SUPER = 4  # supersampling factor for anti-aliased edges
COLOURS = {"red": (0.86, 0.16, 0.14), "green": (0.16, 0.66, 0.22), "blue": (0.16, 0.30, 0.86),
           "yellow": (0.92, 0.80, 0.14)}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
LAYOUTS = ("above", "left of")
COUNT_WORDS = ("a", "two")
TEXTURES = ("horizontal", "vertical", "diagonal")
#: factor name -> number of classes (the caption factors first; ``texture`` is a nuisance factor)
FACTORS = {"layout": 2, "a_colour": 4, "a_shape": 3, "a_count": 2, "b_colour": 4, "b_shape": 3, "texture": 3}
CAPTION_FACTORS = ("layout", "a_colour", "a_shape", "a_count", "b_colour", "b_shape")
QUALITY_WORDS = ("good", "blurry", "noisy")


def caption(f: dict) -> str:
    """Caption of caption-factor indices ``f`` (keys ``CAPTION_FACTORS``)."""
    shape = SHAPES[f["a_shape"]] + ("s" if f["a_count"] == 1 else "")
    return (f"{COUNT_WORDS[f['a_count']]} {COLOUR_NAMES[f['a_colour']]} {shape} {LAYOUTS[f['layout']]} a "
            f"{COLOUR_NAMES[f['b_colour']]} {SHAPES[f['b_shape']]}")


def all_captions() -> list[str]:
    """Every caption of the world (2·4·3·2·4·3 = 576), in factor order."""
    out = []
    for lay, ac, ash, an, bc, bsh in itertools.product(range(2), range(4), range(3), range(2), range(4), range(3)):
        out.append(caption(dict(layout=lay, a_colour=ac, a_shape=ash, a_count=an, b_colour=bc, b_shape=bsh)))
    return out


def parse_caption(text: str) -> dict:
    """Caption -> caption-factor indices; raises ValueError naming the caption if it is not of the grammar."""
    words = text.strip().split()
    try:
        if words[3] == "left":
            words = words[:3] + ["left of"] + words[5:]
        count, colour, shape, layout, art, bcolour, bshape = words
        if art != "a":
            raise ValueError
        a_count = COUNT_WORDS.index(count)
        base = shape[:-1] if a_count == 1 and shape.endswith("s") else shape
        if a_count == 1 and not shape.endswith("s"):
            raise ValueError
        return dict(layout=LAYOUTS.index(layout), a_colour=COLOUR_NAMES.index(colour), a_shape=SHAPES.index(base),
                    a_count=a_count, b_colour=COLOUR_NAMES.index(bcolour), b_shape=SHAPES.index(bshape))
    except (ValueError, IndexError):
        raise ValueError(f"not a shape-world caption: {text!r} (expected e.g. 'two red circles above a blue "
                         f"square'; colours {COLOUR_NAMES}, shapes {SHAPES}, relations {LAYOUTS})") from None


def prompt_sets() -> tuple[list[str], list[str]]:
    """(calibration prompts, held-out prompts): 20 + 20 distinct captions, fixed (seeded shuffle), disjoint.

    The calibration set is what Q-Sched calibrates on and what the table is evaluated on (unseen seeds); the
    held-out prompts never enter a search (they check a calibration's gain on new prompts)."""
    caps = all_captions()
    rng = random.Random(20250901)
    rng.shuffle(caps)
    return caps[:20], caps[20:40]


def calibration_prompts() -> list[str]:
    return prompt_sets()[0]


def heldout_prompts() -> list[str]:
    return prompt_sets()[1]


@dataclass
class Scenes:
    images: torch.Tensor  # [N, 3, 32, 32] in 0..1
    factors: dict  # name -> LongTensor [N]
    captions: list


def random_factors(n: int, g: torch.Generator) -> dict:
    return {k: torch.randint(0, v, (n,), generator=g) for k, v in FACTORS.items()}


def factors_of(captions: list[str], g: torch.Generator) -> dict:
    """Caption factors of ``captions``, nuisance factors (texture) drawn from ``g``."""
    parsed = [parse_caption(c) for c in captions]
    out = {k: torch.tensor([p[k] for p in parsed], dtype=torch.long) for k in CAPTION_FACTORS}
    out["texture"] = torch.randint(0, 3, (len(captions),), generator=g)
    return out


def _shape_mask(kind: torch.Tensor, cx, cy, r, xx, yy) -> torch.Tensor:
    """Binary masks [N, H, W] of circles (0), squares (1), upward triangles (2); centres/radii [N] in px."""
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    r_ = r[:, None, None]
    circle = dx ** 2 + dy ** 2 <= r_ ** 2
    square = (dx.abs() <= 0.85 * r_) & (dy.abs() <= 0.85 * r_)
    # triangle: apex at (0, -r), base at y = +0.8r from -r to +r
    tri = (dy <= 0.8 * r_) & (dy >= -r_) & (dx.abs() <= (dy + r_) / 1.8 * 1.0)
    k = kind[:, None, None]
    return torch.where(k == 0, circle, torch.where(k == 1, square, tri))


def render(factors: dict, g: torch.Generator, device="cpu") -> torch.Tensor:
    """Render scenes of ``factors`` (dict of LongTensor [N]); nuisance draws from ``g`` (CPU generator)."""
    n = factors["layout"].shape[0]
    hs = SIZE * SUPER
    coords = (torch.arange(hs, device=device, dtype=torch.float32) + 0.5) / SUPER  # pixel units
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    u = lambda *shape: torch.rand(*shape, generator=g).to(device)  # noqa: E731
    f = {k: v.to(device) for k, v in factors.items()}
    # background: tone + fine checker (period 2 px) + a soft vertical gradient
    tone = 0.70 + 0.22 * u(n)
    checker = ((torch.arange(SIZE, device=device)[:, None] // 1 + torch.arange(SIZE, device=device)[None]) % 2) * 2 - 1
    grad = torch.linspace(-1, 1, SIZE, device=device)[:, None].expand(SIZE, SIZE)
    img = (tone[:, None, None] + 0.035 * checker[None] + 0.05 * grad[None] * (u(n)[:, None, None] - 0.5) * 2)
    img = img[:, None].expand(n, 3, SIZE, SIZE).clone()
    # object placement: group A in the first half (top / left), B in the second half
    vertical = f["layout"] == 0  # "above": halves are top/bottom
    # A's object slots: one object centred in its half, or two side by side along the other axis
    jit = lambda: (u(n) - 0.5) * 3.0  # noqa: E731
    along_a = torch.full((n,), 8.0, device=device) + jit()  # position along the split axis (first half)
    along_b = torch.full((n,), 24.0, device=device) + jit()
    two = f["a_count"] == 1
    across1 = torch.where(two, torch.full((n,), 8.5, device=device), torch.full((n,), 16.0, device=device)) + jit()
    across2 = torch.full((n,), 23.5, device=device) + jit()
    across_b = torch.full((n,), 16.0, device=device) + jit() * 2
    r_a = torch.where(two, 4.0 + 1.8 * u(n), 4.6 + 2.2 * u(n))
    r_a2 = torch.where(two, 4.0 + 1.8 * u(n), r_a)
    r_b = 4.6 + 2.2 * u(n)

    def xy(along, across):  # "above": along = y; "left of": along = x
        return torch.where(vertical, across, along), torch.where(vertical, along, across)

    # stripes texture, per scene orientation + phase, period 4 px
    phase = u(n)[:, None, None] * 4.0
    t = f["texture"][:, None, None]
    coord = torch.where(t == 0, yy[None], torch.where(t == 1, xx[None], (xx[None] + yy[None]) / math.sqrt(2)))
    stripes = torch.where(((coord + phase) % 4.0) < 2.0, 1.0, -1.0)  # [N, hs, hs]

    always = torch.ones(n, dtype=torch.bool, device=device)
    objects = [(f["a_colour"], f["a_shape"], *xy(along_a, across1), r_a, always),
               (f["a_colour"], f["a_shape"], *xy(along_a, across2), r_a2, two),
               (f["b_colour"], f["b_shape"], *xy(along_b, across_b), r_b, always)]
    palette = torch.tensor(list(COLOURS.values()), device=device)  # [4, 3]
    for colour, shape, cx, cy, r, present in objects:
        mask = _shape_mask(shape, cx, cy, r, xx, yy) & present[:, None, None]
        shade = 1.0 + 0.20 * stripes  # [N, hs, hs]
        col = palette[colour][:, :, None, None] * shade[:, None]  # [N, 3, hs, hs]
        m = mask[:, None].float()
        cov = F.avg_pool2d(m, SUPER)  # coverage in 0..1 at 32x32
        fill = F.avg_pool2d(col * m, SUPER) / cov.clamp_min(1e-6)
        img = img * (1 - cov) + fill * cov
    return img.clamp(0.0, 1.0)


def make_scenes(n: int, seed: int, device="cpu", captions: list[str] | None = None) -> Scenes:
    """``n`` scenes: random factors (or the factors of ``captions``, one per scene) drawn with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    if captions is None:
        fac = random_factors(n, g)
    else:
        if len(captions) != n:
            raise ValueError(f"one caption per scene: {n} scenes, {len(captions)} captions")
        fac = factors_of(captions, g)
    caps = [caption({k: int(fac[k][i]) for k in CAPTION_FACTORS}) for i in range(n)]
    return Scenes(render(fac, g, device), fac, caps)


# ------------------------------------------------------------------------------------------ degradations
def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma [N] in px, 0 = none), 7-tap separable, reflect padding."""
    taps = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (taps[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # [N, 7]
    n, c, h, w = x.shape
    xp = F.pad(x, (3, 3, 3, 3), mode="reflect")
    # horizontal then vertical, per image weights via unfold
    cols = xp.unfold(3, 7, 1)  # [N, C, H+6, W, 7]
    xh = (cols * k[:, None, None, None, :]).sum(-1)
    rows = xh.unfold(2, 7, 1)  # [N, C, H, W, 7]
    return (rows * k[:, None, None, None, :]).sum(-1)


def degrade(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Random degradation per image: ``good`` (none), ``blurry`` (sigma 0.6-1.6 px) or ``noisy`` (std 0.04-0.18).

    Returns the images and the quality word of each (``QUALITY_WORDS``)."""
    n = x.shape[0]
    kind = torch.randint(0, 3, (n,), generator=g)
    sig = 0.6 + 1.0 * torch.rand(n, generator=g)
    std = 0.04 + 0.14 * torch.rand(n, generator=g)
    noise = torch.randn(x.shape, generator=g).to(x.device)
    blurred = gaussian_blur(x, sig)
    noisy = x + std.to(x.device)[:, None, None, None] * noise
    k = kind.to(x.device)[:, None, None, None]
    out = torch.where(k == 1, blurred, torch.where(k == 2, noisy, x)).clamp(0, 1)
    return out, [QUALITY_WORDS[int(i)] for i in kind]


def to_image(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> ComfyUI IMAGE [N, H, W, 3] (float, 0..1, CPU)."""
    return x.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().contiguous()
