"""``qsched calibrate`` / ``sample`` / ``score`` end to end on tiny models saved to disk (pipeline folder and
CLIP scorer files in the users' formats), plus the CLI's input errors."""

import json

import pytest

from qsched_pack.calibration.app.cli import main
from qsched_pack.calibration.reference import images_per_fit_prompt
from qsched_pack.qsched import Coefficients


@pytest.mark.slow  # 30-50 s on the 2-core CI machine
def test_calibrate_sample_score_end_to_end(tmp_path, jaq_dir, capsys, tiny_pipelines):
    model = str(tiny_pipelines["sdxl"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat sitting on a red chair\na dog in the snow\n")
    out = tmp_path / "run"
    args = ["calibrate", "--model", model, "--family", "sdxl_turbo", "--steps", "2", "--size", "32",
            "--quant", "w8a8", "--jaq", "clip", "--jaq-weights", str(jaq_dir), "--prompts", str(prompts),
            "--strategy", "zoom", "--points", "5", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "eta" in captured.err and "best JAQ" in captured.out
    for f in ("preset.json", "record.jsonl", "landscape.png", "preview.png"):
        assert (out / f).stat().st_size > 0
    preset = Coefficients.load(out / "preset.json")
    m = preset.metadata
    assert preset.steps == 2 and m["quant"] == "w8a8" and m["family"] == "sdxl_turbo"
    assert m["jaq"]["tc"] == "clipscore" and m["jaq"]["iq"] == "clipiqa" and m["jaq"]["k"] == 2.0
    assert m["jaq"]["weights"] == {"clipscore": "ViT-L-14.pt", "clipiqa": "RN50.pt"}
    assert m["scores"]["best"]["jaq"] >= m["scores"]["identity"]["jaq"]
    assert {"clipscore", "clipiqa"} <= set(m["scores"]["best"])
    lines = (out / "record.jsonl").read_text().splitlines()
    assert m["images_spent"] == 2 * (len(lines) - 1)
    before = (out / "preset.json").read_bytes()

    # resume: nothing recomputed, same preset
    assert main(args + ["--resume"]) == 0
    assert (out / "preset.json").read_bytes() == before
    assert len((out / "record.jsonl").read_text().splitlines()) == len(lines)
    assert main(args) == 2
    assert "record.jsonl exists: pass --resume" in capsys.readouterr().err

    # sample with the preset (steps default to the preset's)
    s_out = tmp_path / "samples"
    assert main(["sample", "--model", model, "--preset", str(out / "preset.json"), "--prompt", "a cat",
                 "--size", "32", "--compare", "--out", str(s_out)]) == 0
    assert (s_out / "qsched_000.png").exists() and (s_out / "compare.png").exists()
    assert main(["sample", "--model", model, "--preset", str(out / "preset.json"), "--prompt", "a cat",
                 "--steps", "4", "--out", str(s_out)]) == 2
    assert "steps mismatch: the preset" in capsys.readouterr().err

    # score the sampled images
    capsys.readouterr()
    assert main(["score", str(s_out / "qsched_000.png"), str(s_out / "identity_000.png"), "--prompt", "a cat",
                 "--jaq-weights", str(jaq_dir), "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["images"]
    assert len(rows) == 2 and all({"jaq", "clipscore", "clipiqa"} <= set(r) for r in rows)
    assert rows[0]["jaq"] == pytest.approx(rows[0]["clipscore"] + 2.0 * rows[0]["clipiqa"], rel=1e-5)


@pytest.mark.parametrize("extra,msg", [
    (["--range", "1.2", "0.8"], "range low must be smaller than range high"),
    (["--strategy", "grid", "--points", "50", "--budget", "100"], "budget too small: the grid evaluates 2501 points"),
    (["--limit", "1", "--prompts", "EMPTY"], "no prompts found"),
])
def test_calibrate_bad_input_fails_before_loading_anything_heavy(tmp_path, capsys, extra, msg):
    (tmp_path / "empty.txt").write_text("\n")
    extra = [str(tmp_path / "empty.txt") if e == "EMPTY" else e for e in extra]
    rc = main(["calibrate", "--model", str(tmp_path / "not-loaded"), "--steps", "2", "--size", "32",
               "--jaq-weights", str(tmp_path), "--out", str(tmp_path / "o")] + extra)
    assert rc == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_scorer_weight_file_is_named(tmp_path, capsys, tiny_pipelines):
    rc = main(["calibrate", "--model", str(tiny_pipelines["sdxl"]), "--steps", "2", "--size", "32",
               "--jaq-weights", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and "ViT-L-14.pt" in capsys.readouterr().err


def test_argparse_rejects_bad_ranges_with_allowed_values(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "m", "--range", "0", "1.2"])
    assert "--range must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "m", "--strategy", "cmaes"])
    assert "invalid choice: 'cmaes'" in capsys.readouterr().err


def test_calibrate_against_the_full_precision_model(tmp_path, capsys, tiny_pipelines):
    """--objective reference with --reference = --model (quantized at load): no scorer files, the preset names the
    objective, the verdict and the reference's fingerprint; the preview has the full-precision row."""
    model = str(tiny_pipelines["sdxl"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a {c} house\n" for c in ("red", "blue", "green", "white", "black", "grey", "pink",
                                                            "brown", "gold", "teal")))
    out = tmp_path / "ref"
    args = ["calibrate", "--model", model, "--reference", model, "--family", "sdxl_turbo", "--steps", "2",
            "--size", "32", "--quant", "w4a8", "--prompts", str(prompts), "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "reference objective" in text and "held-out" in text and "rows: full precision, identity, best" in text
    preset = Coefficients.load(out / "preset.json")
    m = preset.metadata
    assert m["objective"] == "reference" and isinstance(m["accepted"], bool) and m["heldout"]["pairs"] == 5
    assert m["reference"]["model_hash"] == m["model"]["model_hash"] and m["reference"]["quant"] is None
    assert m["model"]["quant"] == "w4a8" and m["images_spent"] == images_per_fit_prompt() * 5 + 3 * 5
    assert not (out / "record.jsonl").exists() and (out / "landscape.png").stat().st_size > 0
    from PIL import Image

    assert Image.open(out / "preview.png").size == (10 * 32, 3 * 32)


@pytest.mark.parametrize("extra,msg", [
    (["--objective", "reference"], "give --reference PATH"),
    (["--objective", "jaq", "--reference", "m"], "--reference is used by --objective reference / hybrid only"),
    (["--reference", "m"], "give --quant"),
    (["--objective", "hybrid", "--reference", "m", "--quant", "fp16"], "give --quant"),
])
def test_reference_objective_bad_input(tmp_path, capsys, extra, msg):
    rc = main(["calibrate", "--model", "m", "--steps", "2", "--out", str(tmp_path / "o")] + extra)
    assert rc == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything is written or loaded


def test_missing_model_names_the_path(tmp_path, capsys):
    assert main(["calibrate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert f"model not found: {tmp_path / 'nope'}" in capsys.readouterr().err
