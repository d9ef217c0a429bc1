"""Pictures of a calibration: the search landscape and identity-vs-best previews.

* ``plot_landscape``: 2-D spaces -> heatmap of the mean JAQ over (c_x start, c_eps start) (a full grid fills
  every cell; an adaptive search shows the cells it visited), identity and best marked; more dimensions ->
  trace (score per evaluation + running best) and one marginal per coordinate (score against its value).
  Uses matplotlib when installed, else draws a plainer PNG with PIL.
* ``preview_grid``: identity (top row) vs best (bottom row) images, one column per calibration prompt (a
  full-precision row above them for the reference objective).
* ``plot_fit``: the per-step coefficients of a reference fit (what the landscape shows for that objective).
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from typing import Sequence

import torch

from ..qsched._io import atomic_write


def save_png(img, path: str) -> str:
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _have_matplotlib() -> bool:
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def plot_landscape(result, path: str, *, use_matplotlib: bool | None = None, title: str | None = None) -> str:
    """Write the landscape PNG of a ``CalibrationResult`` to ``path``; returns the path. A reference fit (no search
    points) is drawn as its per-step coefficients instead (:func:`plot_fit`)."""
    if not result.points and getattr(result, "objective", "jaq") != "jaq":
        return plot_fit(result, path)
    if not result.points:
        raise ValueError("the calibration result has no evaluated points to plot")
    mpl = _have_matplotlib() if use_matplotlib is None else use_matplotlib
    title = title or (f"{result.strategy} over {result.space.kind}: best {result.best_score:.4g}, "
                      f"identity {result.identity_score:.4g}, {result.images_spent} images")
    if result.space.dim == 2:
        return _heatmap_mpl(result, path, title) if mpl else _heatmap_pil(result, path)
    return _trace_mpl(result, path, title) if mpl else _trace_pil(result, path)


def _grid_cells(result):
    """Unique sorted axis values and a score matrix (NaN where not evaluated) for a 2-D result."""
    xs = sorted({p.point[0] for p in result.points})
    es = sorted({p.point[1] for p in result.points})
    ix, ie = {v: i for i, v in enumerate(xs)}, {v: i for i, v in enumerate(es)}
    m = torch.full((len(es), len(xs)), float("nan"), dtype=torch.float64)
    for p in result.points:
        m[ie[p.point[1]], ix[p.point[0]]] = p.score
    return xs, es, m


def _heatmap_mpl(result, path, title):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = result.space.names
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
    pts = result.points
    full = len(pts) >= 0.9 * len({p.point[0] for p in pts}) * len({p.point[1] for p in pts})
    if full:
        xs, es, m = _grid_cells(result)
        im = ax.pcolormesh(_edges(xs), _edges(es), m.numpy(), shading="flat", cmap="viridis")
    else:
        im = ax.scatter([p.point[0] for p in pts], [p.point[1] for p in pts], c=[p.score for p in pts], s=22,
                        cmap="viridis", edgecolors="none")
        ax.plot([p.point[0] for p in pts], [p.point[1] for p in pts], color="0.6", lw=0.4, zorder=0)
    fig.colorbar(im, ax=ax, label="mean JAQ")
    # identity: a ring that shows on the heatmap's colours and on the scatter's white background alike
    ax.plot([1.0], [1.0], marker="o", mfc="none", mec="white" if full else "black", ms=10, mew=2, label="identity")
    ax.plot([result.best_point[0]], [result.best_point[1]], marker="*", color="red", ms=14, label="best")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(title, fontsize=8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, fontsize=7, frameon=False)  # off the data
    fig.tight_layout()
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def _edges(vals):
    if len(vals) == 1:
        return [vals[0] - 0.005, vals[0] + 0.005]
    mids = [(a + b) / 2 for a, b in zip(vals[:-1], vals[1:])]
    return [vals[0] - (mids[0] - vals[0])] + mids + [vals[-1] + (vals[-1] - mids[-1])]


def _trace_mpl(result, path, title):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dim = result.space.dim
    cols = min(4, dim)
    rows = 1 + math.ceil(dim / cols)
    fig = plt.figure(figsize=(3.0 * cols, 2.4 * rows), dpi=100)
    ax = fig.add_subplot(rows, 1, 1)
    scores = [p.score for p in result.points]
    running = [max(scores[: i + 1]) for i in range(len(scores))]
    ax.plot(scores, ".", ms=3, label="evaluated")
    ax.plot(running, "-", color="red", label="best so far")
    ax.axhline(result.identity_score, color="0.4", ls="--", lw=0.8, label="identity")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("mean JAQ")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    for d, name in enumerate(result.space.names):
        a = fig.add_subplot(rows, cols, cols + d + 1)
        a.scatter([p.point[d] for p in result.points], scores, s=6, c=range(len(scores)), cmap="viridis")
        a.axvline(result.best_point[d], color="red", lw=0.8)
        a.set_xlabel(name, fontsize=8)
        a.tick_params(labelsize=6)
    fig.tight_layout()
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def _save_fig(fig, path):
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _color(t: float) -> tuple[int, int, int]:
    """Dark blue -> green -> yellow ramp for t in [0, 1]."""
    t = min(1.0, max(0.0, t))
    return (int(255 * t ** 1.5), int(40 + 200 * t), int(120 * (1 - t) + 30))


def _heatmap_pil(result, path, cell: int = 12):
    from PIL import Image, ImageDraw

    xs, es, m = _grid_cells(result)
    finite = m[~m.isnan()]
    lo, hi = float(finite.min()), float(finite.max())
    img = Image.new("RGB", (len(xs) * cell, len(es) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r in range(len(es)):
        for c in range(len(xs)):
            v = float(m[r, c])
            if math.isnan(v):
                continue
            y = (len(es) - 1 - r) * cell  # c_eps grows upwards
            draw.rectangle([c * cell, y, (c + 1) * cell - 1, y + cell - 1],
                           fill=_color((v - lo) / (hi - lo) if hi > lo else 0.5))
    bx, by = xs.index(result.best_point[0]), len(es) - 1 - es.index(result.best_point[1])
    draw.rectangle([bx * cell, by * cell, (bx + 1) * cell - 1, (by + 1) * cell - 1], outline=(255, 0, 0), width=2)
    return save_png(img, path)


def _trace_pil(result, path, w: int = 480, h: int = 240):
    from PIL import Image, ImageDraw

    scores = [p.score for p in result.points]
    lo, hi = min(scores), max(scores)
    span = hi - lo or 1.0
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    n = max(1, len(scores) - 1)

    def xy(i, s):
        return 4 + (w - 8) * i / n, h - 4 - (h - 8) * (s - lo) / span

    for i, s in enumerate(scores):
        x, y = xy(i, s)
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(40, 80, 200))
    running = [max(scores[: i + 1]) for i in range(len(scores))]
    draw.line([xy(i, s) for i, s in enumerate(running)], fill=(220, 0, 0), width=2)
    return save_png(img, path)


def plot_fit(result, path: str, w: int = 480, h: int = 260) -> str:
    """PNG of a reference fit: per step, the fitted c_x (blue) and c_eps (orange) around 1.0 (grey line), the
    coefficients in use filled, outlined only when identity was kept; the verdict as the first line."""
    from PIL import Image, ImageDraw

    fit = (result.best.metadata or {}).get("fit") or {}
    c_x, c_eps = fit.get("c_x", list(result.best.c_x)), fit.get("c_eps", list(result.best.c_eps))
    n = len(c_x)
    vals = list(c_x) + list(c_eps) + [1.0]
    half = max(0.05, max(abs(v - 1.0) for v in vals) * 1.2)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    top, bottom = 24, h - 20

    def y(v):
        return top + (bottom - top) * (0.5 - (v - 1.0) / (2 * half))

    draw.line([(4, y(1.0)), (w - 4, y(1.0))], fill=(160, 160, 160))
    slot = (w - 8) / max(1, n)
    for i in range(n):
        for j, (v, col) in enumerate(((c_x[i], (40, 80, 200)), (c_eps[i], (230, 130, 20)))):
            x0 = 4 + i * slot + slot * (0.2 + 0.3 * j)
            box = [x0, min(y(v), y(1.0)), x0 + slot * 0.25, max(y(v), y(1.0))]
            draw.rectangle(box, fill=col if result.accepted else None, outline=col)
        draw.text((4 + i * slot + slot * 0.35, bottom + 4), f"step {i + 1}", fill=(0, 0, 0))
    verdict = "kept" if result.accepted else "identity kept (fit shown outlined)"
    draw.text((4, 4), f"reference fit, c_x blue / c_eps orange, 1.0 +- {half:.3g}: {verdict}", fill=(0, 0, 0))
    return save_png(img, path)


def preview_grid(identity_images: torch.Tensor, best_images: torch.Tensor, path: str, *, tile: int = 256,
                 reference_images: torch.Tensor | None = None) -> str:
    """PNG with identity (top row) and best (bottom row) images [B, H, W, 3] in 0..1, one column per prompt;
    ``reference_images`` (the full-precision model's, same noise) add a row above them."""
    from PIL import Image

    rows = [identity_images, best_images] if reference_images is None else [reference_images, identity_images,
                                                                            best_images]
    if any(r.shape != identity_images.shape for r in rows) or identity_images.ndim != 4 or \
            identity_images.shape[-1] != 3:
        raise ValueError(f"preview needs image batches [B, H, W, 3] of the same shape, got "
                         f"{', '.join(str(tuple(r.shape)) for r in rows)}")
    b = identity_images.shape[0]
    h, w = identity_images.shape[1:3]
    scale = min(1.0, tile / max(h, w))
    th, tw = max(1, int(h * scale)), max(1, int(w * scale))
    grid = Image.new("RGB", (b * tw, len(rows) * th), (0, 0, 0))
    for row, batch in enumerate(rows):
        for i in range(b):
            arr = (batch[i].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            im = Image.fromarray(arr)
            if (th, tw) != (h, w):
                im = im.resize((tw, th), Image.BILINEAR)
            grid.paste(im, (i * tw, row * th))
    return save_png(grid, path)


def save_images(images: torch.Tensor, folder: str, prefix: str = "image") -> list[str]:
    """Write each image of [B, H, W, 3] (0..1) as ``{prefix}_{i:03d}.png``; returns the paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    out = []
    for i in range(images.shape[0]):
        arr = (images[i].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out.append(save_png(Image.fromarray(arr), os.path.join(folder, f"{prefix}_{i:03d}.png")))
    return out


def load_images(paths: Sequence[str]) -> torch.Tensor:
    """PNG/JPEG files of one size -> [B, H, W, 3] float in 0..1."""
    import numpy as np
    from PIL import Image

    if not paths:
        raise ValueError("no image files given")
    from ..qsched._io import NotRegularFile, open_regular

    arrs = []
    for p in paths:
        try:
            with warnings.catch_warnings(), os.fdopen(open_regular(p, what="image"), "rb") as f:
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # over PIL's limit: refused
                with Image.open(f) as im:
                    arrs.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {p}") from None
        except NotRegularFile as exc:
            raise ValueError(str(exc)) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"{p}: the image has more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression "
                             "bomb, or far larger than any image JAQ scores); scale it down") from None
        except (Image.UnidentifiedImageError, SyntaxError, OSError) as exc:  # not an image / damaged image
            raise ValueError(f"{p}: not a readable image ({type(exc).__name__}: {str(exc)[:200]})") from None
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"images must all have the same size, got {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrs))
