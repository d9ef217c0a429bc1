"""Landscape and preview PNGs (matplotlib and the PIL fallback)."""

import pytest
import torch
from PIL import Image

from qsched_pack.calibration.plots import load_images, plot_landscape, preview_grid, save_images
from qsched_pack.calibration.runner import calibrate
from qsched_pack.calibration.search import SearchSpace, point_of
from qsched_pack.calibration.testing import ImageStatScorer, SyntheticGenerator, synthetic_objective


def result_for(kind, strategy, n, steps=4):
    sp = SearchSpace(kind, steps)
    f = synthetic_objective("bowl", sp.dim)
    gen = SyntheticGenerator(lambda c, p, s: f(point_of(sp, c)), steps)
    return calibrate(gen, ImageStatScorer(), ["a"], space=sp, strategy=strategy, points=n)


@pytest.mark.parametrize("use_mpl", [True, False])
@pytest.mark.parametrize("kind,strategy,n", [("start", "grid", 7), ("start", "zoom", 21), ("start_end", "zoom", 5)])
def test_landscape_png(tmp_path, use_mpl, kind, strategy, n):
    r = result_for(kind, strategy, n)
    path = plot_landscape(r, str(tmp_path / "l.png"), use_matplotlib=use_mpl)
    im = Image.open(path)
    assert im.format == "PNG" and im.size[0] > 40 and im.size[1] > 40
    assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) >= 3  # not a blank canvas
    if not use_mpl and kind == "start" and strategy == "grid":
        # PIL heatmap: 12-px cells, c_eps upwards; the best cell is outlined in red
        ix = SearchSpace().axis(n).index(r.best_point[0])
        iy = n - 1 - SearchSpace().axis(n).index(r.best_point[1])
        assert im.convert("RGB").getpixel((ix * 12, iy * 12 + 5)) == (255, 0, 0)


def test_preview_grid_and_image_io(tmp_path):
    a = torch.rand(3, 16, 24, 3)
    b = torch.rand(3, 16, 24, 3)
    im = Image.open(preview_grid(a, b, str(tmp_path / "p.png")))
    assert im.size == (3 * 24, 2 * 16)
    assert im.getpixel((24 + 5, 16 + 3)) == tuple(int(v) for v in (b[1, 3, 5] * 255).round())
    paths = save_images(a, str(tmp_path / "imgs"))
    back = load_images(paths)
    assert back.shape == a.shape and (back - a).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="same shape"):
        preview_grid(a, b[:2], str(tmp_path / "x.png"))
