"""``qsched demo --world digits`` (the trained digits world, and ``--random-models``) and ``qsched experiment``, end
to end on reduced budgets: quantize -> calibrate -> evaluate -> files written, reproducibly. The default world
(shapes) is tested in tests/test_shape_world.py."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the tiny world's data ships in scikit-learn (pip install scikit-learn)")

from qsched_pack.calibration import demo as demo_mod  # noqa: E402
from qsched_pack.calibration.cli import main  # noqa: E402
from qsched_pack.qsched import Coefficients  # noqa: E402
from qsched_pack.calibration.tinyworld import experiment as E  # noqa: E402
from qsched_pack.calibration.tinyworld.data import all_prompts  # noqa: E402
from qsched_pack.calibration.tinyworld.checkpoint import PACKAGED  # noqa: E402
from qsched_pack.calibration.tinyworld.world import TinyWorld  # noqa: E402

# a reduced demo: 1 seed, 2 evaluation images per prompt, a 5x5 lattice, 600-image budget
REDUCED = ["--world", "digits", "--seeds", "0", "--per-prompt", "2", "--points", "5", "--budget", "600"]


def _tile(path, layout, row, col, i):
    from PIL import Image

    with Image.open(path) as im:
        crop = im.convert("RGB").crop(layout.box(row, col, i))
    scale = layout.tile // 16
    return torch.from_numpy(np.array(crop))[::scale, ::scale]


def _uint8(images):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One reduced demo run: (output folder, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out)] + REDUCED) == 0
    return out, printed.getvalue()


def _table_rows(text: str) -> dict:
    """method -> the cells of its row in table.md (steps, model, method, FD, accuracy, ...)."""
    rows = [ln.strip("| ").split(" | ") for ln in text.splitlines() if ln.startswith("| 4 |")]
    return {r[2]: r for r in rows}


def _mean(cell: str) -> float:
    return float(cell.split(" ± ")[0])


def test_demo_writes_every_file_and_its_table_reports_the_images_the_models_make(demo):
    out, printed = demo
    for f in ("table.md", "results.json", "landscape.png", "grid.png", "preset.json"):
        assert (out / f).stat().st_size > 0, f
    rows = _table_rows((out / "table.md").read_text())
    assert list(rows) == ["fp32", "naive", "ptqd", "qsched-zoom"]
    # Measured here without the demo's code path: the packaged model, FP32 / W4A4 / W4A4 + the written preset,
    # on the 20 prompts x 2 unseen evaluation seeds of seed 0, scored by the reference network.
    world = TinyWorld.from_file(PACKAGED)
    net = world.quantized_generator("w4a4")[0]
    preset = Coefficients.load(out / "preset.json")
    prompts = [p for p in all_prompts() for _ in range(2)]
    seeds = E.eval_seeds(0, len(prompts))
    for method, gen, coeff in (("fp32", world.sampler(4), None), ("naive", world.sampler(4, net=net), None),
                               ("qsched-zoom", world.sampler(4, net=net), preset)):
        ref = world.reference().evaluate(gen.generate(coeff, prompts, seeds), prompts)
        assert _mean(rows[method][3]) == pytest.approx(ref["fd"], abs=0.006), method
        assert _mean(rows[method][4]) == pytest.approx(ref["accuracy"], abs=0.0006), method
    assert "wrote" in printed and rows["qsched-zoom"][3] in printed


def test_demo_summary_states_the_gap_its_table_shows(demo):
    out, printed = demo
    rows = _table_rows((out / "table.md").read_text())
    fd = {m: _mean(rows[m][3]) for m in ("fp32", "naive", "qsched-zoom")}
    gap = fd["naive"] - fd["fp32"]
    if gap > 0.05 * fd["fp32"]:  # one seed: no spread, the 5% floor decides
        pct = 100 * (fd["naive"] - fd["qsched-zoom"]) / gap
        said = [ln for ln in printed.splitlines() if "% of the FD gap closed" in ln]
        assert len(said) == 1
        stated = float(said[0].split("% of the FD gap closed")[0].rsplit(" ", 1)[-1])
        assert stated == pytest.approx(pct, abs=1.5)  # the table's FDs are rounded to 0.01
        assert said[0] in (out / "table.md").read_text()
    else:
        assert "No measurable loss" in printed


def test_demo_preset_is_the_searched_best_and_the_grid_shows_each_models_images(demo):
    out, _ = demo
    q = json.loads((out / "results.json").read_text())["rows"][-1]
    assert 0 < q["images"] <= 600 and q["calib_jaq"] >= q["calib_jaq_identity"]  # within budget, never below identity
    preset = Coefficients.load(out / "preset.json")
    assert list(preset.c_x) == q["c_x"] and list(preset.c_eps) == q["c_eps"]
    world = TinyWorld.from_file(PACKAGED)
    net = world.quantized_generator("w4a4")[0]
    layout = demo_mod.GridLayout(rows=20, columns=3, images=2)
    from PIL import Image

    with Image.open(out / "grid.png") as im:
        assert im.size == layout.size
    prompts, seeds = all_prompts(), E.eval_seeds(0, 40)
    for row, i in ((0, 0), (15, 1), (19, 0)):
        p, s = [prompts[row]], [seeds[row * 2 + i]]
        expect = {0: world.sampler(4).generate(None, p, s),
                  1: world.sampler(4, net=net).generate(None, p, s),
                  2: world.sampler(4, net=net).generate(preset, p, s)}
        for col, img in expect.items():
            assert torch.equal(_tile(out / "grid.png", layout, row, col, i), _uint8(img[0])), (row, col, i)


def test_demo_is_reproducible_and_matches_the_experiment(demo, tmp_path):
    out, _ = demo
    again = tmp_path / "again"
    assert main(["demo", "--out", str(again)] + REDUCED) == 0
    assert (again / "table.md").read_bytes() == (out / "table.md").read_bytes()
    assert (again / "grid.png").read_bytes() == (out / "grid.png").read_bytes()
    # the demo's numbers are the experiment's rows for the same setting
    exp = E.run(str(tmp_path / "exp"), steps_list=(4,), formats=("w4a4",), seeds=(0,), per_prompt=2, points=5,
                budget=600, log=None)
    strip = lambda rs: [{k: v for k, v in x.items() if k != "search_seconds"} for x in rs]  # noqa: E731
    assert strip(exp["rows"]) == strip(json.loads((out / "results.json").read_text())["rows"])


def test_demo_guard_rows_follow_the_guard(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["demo", "--out", str(out), "--quant", "w8a8", "--guard"] + REDUCED) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    by = {x["method"]: x for x in rows}
    g = by["qsched-zoom+guard"]
    src = by["qsched-zoom"] if g["accepted"] else by["naive"]
    assert all(g[k] == src[k] for k in E.METRICS)
    assert g["images"] == by["qsched-zoom"]["images"] + 20  # + the FP32 images the guard compares against
    assert "Guard: accepted the coefficients for" in capsys.readouterr().out


def test_demo_trains_and_caches_the_weights_when_they_are_missing(tmp_path, monkeypatch, capsys):
    from qsched_pack.calibration.tinyworld import checkpoint, train
    from qsched_pack.calibration.tinyworld.train import TrainConfig

    real_train = train.train_world
    calls = []

    def reduced_train(cfg=None, log=print):
        calls.append(cfg)
        return real_train(TrainConfig.reduced(), log=None)

    monkeypatch.setattr(checkpoint, "PACKAGED", tmp_path / "not-shipped.safetensors")
    monkeypatch.setenv("QSCHED_TINY_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(train, "train_world", reduced_train)
    assert main(["demo", "--out", str(tmp_path / "a")] + REDUCED) == 0
    cached = tmp_path / "cache" / "tiny_world.safetensors"
    assert len(calls) == 1 and cached.is_file()
    assert f"training the tiny world into {cached}" in capsys.readouterr().out

    # the second run loads the cache and trains nothing
    assert main(["demo", "--out", str(tmp_path / "b")] + REDUCED) == 0
    assert len(calls) == 1 and f"model: {cached}" in capsys.readouterr().out
    assert (tmp_path / "b" / "grid.png").is_file()


@pytest.mark.parametrize("argv,msg", [
    (["--random-models", "--quant", "w4a8"], "--quant only apply to the trained-model demo"),
    (["--random-models", "--guard"], "--guard only apply to the trained-model demo"),
    (["--size", "32"], "--size only apply to --random-models"),
    (["--world", "digits", "--budget", "100"], "budget too small: strategy 'zoom' needs at least 26 points x 20 "
                                                "prompts"),
    (["--world", "digits", "--budget", "900", "--no-budget"], "give --budget or --no-budget, not both"),
    (["--world", "digits", "--per-prompt", "2", "--grid-images", "3"],
     "grid images per prompt must be in [1, per-prompt = 2]"),
])
def test_demo_bad_options_fail_before_anything_is_written(tmp_path, capsys, argv, msg):
    assert main(["demo", "--out", str(tmp_path / "o")] + argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_without_scikit_learn_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    assert main(["demo", "--world", "digits", "--out", str(tmp_path / "o")]) == 2
    assert "needs scikit-learn" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_random_models_demo_runs_every_sampler(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "r"
    assert main(["demo", "--random-models", "--out", str(out), "--size", "16", "--steps", "2"]) == 0
    lines = [l for l in (out / "table.md").read_text().splitlines() if l.startswith("| ") and "---" not in l]
    body = lines[1:]
    assert [l.split(" | ")[0][2:] for l in body] == [r[0] for r in demo_mod.RUNS]
    changes = [float(l.rstrip(" |").split(" | ")[-1]) for l in body]
    assert all(c > 1e-4 for c in changes), changes  # the coefficients move every sampler's output
    with Image.open(out / "grid.png") as im:
        assert im.size == (2 * 16, len(demo_mod.RUNS) * 16)
    assert "tiny random models" in capsys.readouterr().out


def test_experiment_subcommand_writes_the_table(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["experiment", "--out", str(out), "--steps", "2", "--formats", "w4a4", "--seeds", "0",
                 "--per-prompt", "1", "--points", "5"]) == 0
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [x["method"] for x in rows] == ["fp32", "naive", "ptqd", "qsched-zoom"]
    assert E.format_table(json.loads((out / "results.json").read_text())) == table
