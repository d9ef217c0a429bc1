"""``qsched demo`` end to end on a reduced budget: the shape world's models quantized, calibrated and evaluated, the
files it writes, its option checks, and ``--random-models`` (every sampler on tiny random pipelines)."""

import json

import numpy as np
import pytest
import torch

from qsched_pack.calibration.app import demo as demo_mod
from qsched_pack.calibration.app import random_demo
from qsched_pack.calibration.app.cli import main
from qsched_pack.calibration.shapeworld import data as D
from qsched_pack.calibration.shapeworld import experiment as E
from qsched_pack.calibration.shapeworld.world import ShapeWorld
from qsched_pack.qsched import Coefficients

# the default objective (reference) on 1 seed, 1 evaluation image per prompt, 2 steps
REDUCED = ["--seeds", "0", "--per-prompt", "1", "--grid-images", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One reduced demo run: (output folder, what it printed)."""
    import contextlib
    import io

    pytest.importorskip("open_clip", reason="the JAQ metrics need open_clip_torch")

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out)] + REDUCED) == 0
    return out, printed.getvalue()


def test_default_demo_is_the_shape_world_and_writes_every_file(demo):
    """The default objective (reference): rows per prompt set, the table's held-out rows first, the summary read on
    the held-out prompts, the preset the row's coefficients."""
    out, printed = demo
    assert "shape world" in printed and "flow family, W4A8, 2 steps" in printed and "held-out prompts" in printed
    for f in ("table.md", "results.json", "grid.png", "preset.json"):
        assert (out / f).stat().st_size > 0, f
    assert not (out / "landscape.png").exists()  # no search to draw
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["objective"] == "reference"
    assert {(x["method"], x["prompts"]) for x in res["rows"]} == {
        (m, p) for m in ("fp", "naive", "ptqd", "qsched-reference") for p in ("calibration", "heldout")}
    q = [x for x in res["rows"] if x["method"] == "qsched-reference"]
    assert all(x["images"] == 32 and len(x["c_x"]) == 2 and "acceptance" in x for x in q)
    preset = Coefficients.load(out / "preset.json")
    assert list(preset.c_x) == q[0]["c_x"] and preset.metadata["objective"] == "reference"
    table = (out / "table.md").read_text()
    first = [ln for ln in table.splitlines() if ln.startswith("| heldout") or ln.startswith("| calibration")]
    assert first[0].startswith("| heldout | FP32 | fp |") and len(first) == 8
    assert "on the 20 held-out prompts" in table


def test_demo_jaq_objective_keeps_the_papers_search(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--objective", "jaq", "--seeds", "0", "--per-prompt", "1", "--points", "5",
            "--budget", "600", "--grid-images", "1", "--steps", "2"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert {x["method"] for x in res["rows"]} == {"fp", "naive", "ptqd", "qsched-zoom"}
    q = next(x for x in res["rows"] if x["method"] == "qsched-zoom")
    assert q["images"] <= 600 and len(q["c_x"]) == 2
    assert (out / "landscape.png").is_file()


def _tile(path, layout, row, col, i):
    from PIL import Image

    with Image.open(path) as im:
        crop = im.convert("RGB").crop(layout.box(row, col, i))
    scale = layout.tile // D.SIZE
    return torch.from_numpy(np.array(crop))[::scale, ::scale].int()


def _uint8(images):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).int()


def test_demo_preset_is_the_searched_best_and_the_grid_shows_each_models_images(demo):
    """Re-made here without the demo's code path: FP / naive W4A8 / W4A8 + the written preset on the first unseen
    evaluation seed of each prompt, against the tiles of grid.png."""
    from PIL import Image

    out, _ = demo
    q = next(x for x in json.loads((out / "results.json").read_text())["rows"] if x["method"] == "qsched-reference")
    preset = Coefficients.load(out / "preset.json")
    assert list(preset.c_x) == q["c_x"] and list(preset.c_eps) == q["c_eps"]
    world = ShapeWorld.load(None)
    net = world.quantized("flow", "w4a8")[0]
    layout = demo_mod.GridLayout(rows=20, columns=3, images=1)
    with Image.open(out / "grid.png") as im:
        assert im.size == layout.size
    # one batch of the 20 prompts, as the grid makes it (activation scales of W4A8 are per batch)
    prompts, seeds = D.calibration_prompts(), E.eval_seeds(0, 20)
    q = world.generator("flow", 2, net=net, quant="w4a8")
    expect = [world.generator("flow", 2).generate(None, prompts, seeds), q.generate(None, prompts, seeds),
              q.generate(preset, prompts, seeds)]
    for row in (0, 7, 19):
        for col, images in enumerate(expect):
            assert torch.equal(_tile(out / "grid.png", layout, row, col, 0), _uint8(images[row])), (row, col)


@pytest.mark.parametrize("argv,msg", [
    (["--random-models", "--quant", "w4a8"], "--quant only apply to the trained-model demo"),
    (["--random-models", "--guard"], "--guard only apply to the trained-model demo"),
    (["--random-models", "--family", "lcm"], "--family only apply to the trained-model demo"),
    (["--size", "32"], "--size only apply to --random-models"),
    (["--budget", "100"], "budget too small"),
    (["--budget", "900", "--no-budget"], "give --budget or --no-budget, not both"),
    (["--per-prompt", "2", "--grid-images", "3"], "grid images per prompt must be in [1, per-prompt = 2]"),
    (["--family", "sdxl"], "invalid choice: 'sdxl'"),
    (["--random-models", "--objective", "jaq"], "--objective only apply to the trained-model demo"),
    (["--objective", "reference", "--guard"], "--guard applies to --objective jaq"),
])
def test_demo_bad_options_fail_before_anything_is_written(tmp_path, capsys, argv, msg):
    try:
        rc = main(["demo", "--out", str(tmp_path / "o")] + argv)
    except SystemExit as exc:  # argparse's own refusal of a bad choice
        rc = exc.code
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_random_models_demo_runs_every_sampler(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "r"
    assert main(["demo", "--random-models", "--out", str(out), "--size", "16", "--steps", "2"]) == 0
    lines = [l for l in (out / "table.md").read_text().splitlines() if l.startswith("| ") and "---" not in l]
    body = lines[1:]
    assert [l.split(" | ")[0][2:] for l in body] == [r[0] for r in random_demo.RUNS]
    changes = [float(l.rstrip(" |").split(" | ")[-1]) for l in body]
    assert all(c > 1e-4 for c in changes), changes  # the coefficients move every sampler's output
    with Image.open(out / "grid.png") as im:
        assert im.size == (2 * 16, len(random_demo.RUNS) * 16)
    assert "tiny random models" in capsys.readouterr().out
