"""Runner: on-disk record, resume without recomputation, kill-and-resume byte-identical presets, refusal of
corrupt/foreign records, image budget, progress/ETA and the interrupt hook, atomic presets."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qsched_pack.calibration.record import RecordError
from qsched_pack.calibration.runner import calibrate
from qsched_pack.calibration.search import SearchSpace, point_of
from qsched_pack.calibration.testing import ImageStatScorer, SyntheticGenerator, synthetic_objective
from qsched_pack.qsched import Coefficients

PROMPTS = ["a red car", "a blue house", "a green tree"]
SP = SearchSpace("start", 4)


def make_gen(name="ridge", seed_effect=True):
    f = synthetic_objective(name, 2)
    return SyntheticGenerator(lambda c, p, s: f(point_of(SP, c)) + (0.001 * s if seed_effect else 0.0), 4,
                              name=name)


def run(tmp_path, gen=None, scorer=None, **kw):
    args = dict(space=SP, strategy="zoom", points=21, record=str(tmp_path / "rec.jsonl"),
                preset=str(tmp_path / "preset.json"))
    args.update(kw)
    return calibrate(gen or make_gen(), scorer or ImageStatScorer(), PROMPTS, **args)


def test_record_holds_every_point_and_resume_recomputes_nothing(tmp_path):
    r1 = run(tmp_path)
    lines = (tmp_path / "rec.jsonl").read_text().splitlines()
    assert len(lines) == 1 + len(r1.points)
    e = json.loads(lines[1])
    assert e["point"] == [1.0, 1.0] and e["c_x"] == [1.0] * 4 and len(e["jaq"]) == 3
    assert set(e["components"]) == {"tc", "iq"} and e["images"] == 3 and e["seconds"] >= 0
    preset1 = (tmp_path / "preset.json").read_bytes()
    gen = make_gen()
    r2 = run(tmp_path, gen=gen, resume=True)
    assert gen.calls == 0
    assert (tmp_path / "preset.json").read_bytes() == preset1
    assert [p.point for p in r2.points] == [p.point for p in r1.points]
    assert r2.best == r1.best and r2.images_spent == r1.images_spent == 3 * len(r1.points)


def test_preset_metadata_and_roundtrip(tmp_path):
    r = run(tmp_path)
    c = Coefficients.load(tmp_path / "preset.json")
    assert c == r.best and c.steps == 4
    m = c.metadata
    assert m["family"] == "synthetic" and m["steps"] == 4 and m["sampler"] == "none" and m["quant"] is None
    assert len(m["model_hash"]) == 64 and m["jaq"] == ImageStatScorer().config
    assert m["scores"]["identity"]["jaq"] == pytest.approx(r.identity_score)
    assert m["scores"]["best"]["jaq"] == pytest.approx(r.best_score) and m["scores"]["best"]["jaq"] > \
        m["scores"]["identity"]["jaq"]
    assert set(m["scores"]["best"]) == {"jaq", "tc", "iq"}
    assert m["images_spent"] == r.images_spent and m["search"]["strategy"] == "zoom"
    assert m["prompts"]["count"] == 3


def test_existing_record_needs_resume(tmp_path):
    run(tmp_path)
    with pytest.raises(RecordError, match=r"rec\.jsonl: a calibration record already exists; pass resume=True"):
        run(tmp_path)


@pytest.mark.parametrize("change,field", [
    (dict(scorer=ImageStatScorer(k=3.0)), r"scorer.k \(record: 2.0, now: 3.0\)"),
    (dict(gen=make_gen("bowl")), "generator.model_hash"),
    (dict(points=11), "strategy.points"),
    (dict(strategy="pattern"), "strategy.name"),
    (dict(seed=7), "seeds"),
])
def test_foreign_record_is_refused_naming_file_and_field(tmp_path, change, field):
    run(tmp_path)
    with pytest.raises(RecordError, match=rf"rec\.jsonl: record was made for a different model/config .*{field}"):
        run(tmp_path, resume=True, **change)


def test_record_for_other_prompts_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(RecordError, match=r"rec\.jsonl: .*prompts\.sha256"):
        calibrate(make_gen(), ImageStatScorer(), PROMPTS[:2], space=SP, strategy="zoom", points=21,
                  record=str(tmp_path / "rec.jsonl"), resume=True)


def test_damaged_header_or_empty_record_is_refused_naming_the_file(tmp_path):
    run(tmp_path)
    path = tmp_path / "rec.jsonl"
    good = path.read_text().splitlines(keepends=True)
    path.write_text("".join([good[0][:40] + "X" + good[0][41:]] + good[1:]))
    with pytest.raises(RecordError, match=r"rec\.jsonl: its first line \(the header\) is damaged"):
        run(tmp_path, resume=True)
    path.write_text(json.dumps({"hello": 1}) + "\n")
    with pytest.raises(RecordError, match=r"rec\.jsonl: its first line \(the header\) is damaged"):
        run(tmp_path, resume=True)
    path.write_text("")
    with pytest.raises(RecordError, match=r"rec\.jsonl: empty calibration record"):
        run(tmp_path, resume=True)


def test_half_written_last_line_is_dropped_and_recomputed(tmp_path):
    r1 = run(tmp_path)
    preset1 = (tmp_path / "preset.json").read_bytes()
    path = tmp_path / "rec.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])  # killed inside a write
    gen = make_gen()
    r2 = run(tmp_path, gen=gen, resume=True)
    assert gen.calls == len(r1.points) - 5  # header + 5 complete points survived
    assert (tmp_path / "preset.json").read_bytes() == preset1 and r2.best == r1.best
    # the half line is gone from the file itself, not just ignored: every line is whole and the record reads clean
    data = path.read_bytes()
    assert data.endswith(b"\n") and all(("digest" if i else "crc") in json.loads(line)
                                        for i, line in enumerate(data.splitlines()))
    assert len(data.splitlines()) == 1 + len(r1.points)


def test_budget_stops_adaptive_and_resume_with_more_budget_finishes_identically(tmp_path):
    ref = run(tmp_path / "ref")
    r = run(tmp_path, budget=3 * 30)
    assert r.stopped == "budget" and r.images_spent == 90 and len(r.points) == 30
    assert r.best_score >= r.identity_score
    full = run(tmp_path, resume=True)
    assert full.stopped == "done" and full.best == ref.best
    assert (tmp_path / "preset.json").read_bytes() == (tmp_path / "ref" / "preset.json").read_bytes()


def test_budget_too_small_for_the_coarse_stage_refused_before_start(tmp_path):
    gen = make_gen()
    with pytest.raises(ValueError, match=r"budget too small: strategy 'zoom' needs at least 26 points x 3 prompts "
                                         r"= 78 images before it can choose, budget is 50"):
        run(tmp_path, gen=gen, budget=50)
    assert gen.calls == 0 and not (tmp_path / "rec.jsonl").exists()


def test_progress_reports_eta_and_interrupt_hook_stops_then_resume_is_identical(tmp_path):
    ref = run(tmp_path / "ref")
    infos = []
    run(tmp_path / "p", progress=infos.append)
    assert len(infos) == len(ref.points)
    assert infos[-1].points_done == len(ref.points) and infos[-1].images_spent == ref.images_spent
    assert all(i.eta is not None and i.eta >= 0 for i in infos)
    assert infos[-1].best_score == ref.best_score and "eta" in infos[-1].line()

    class Interrupted(Exception):
        pass

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] > 20:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run(tmp_path, interrupt=interrupt)
    assert not (tmp_path / "preset.json").exists()
    assert len((tmp_path / "rec.jsonl").read_text().splitlines()) == 1 + 10  # 2 hook calls per new point
    run(tmp_path, resume=True)
    assert (tmp_path / "preset.json").read_bytes() == (tmp_path / "ref" / "preset.json").read_bytes()


def test_preset_written_atomically(tmp_path, monkeypatch):
    run(tmp_path)
    before = (tmp_path / "preset.json").read_bytes()

    real_replace = os.replace

    def boom(src, dst):
        if str(dst).endswith("preset.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, gen=make_gen("bowl"), record=str(tmp_path / "rec2.jsonl"))
    assert (tmp_path / "preset.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset.json", "rec.jsonl", "rec2.jsonl"]


SCRIPT = textwrap.dedent("""
    import sys, time
    from qsched_pack.calibration.runner import calibrate
    from qsched_pack.calibration.search import SearchSpace, point_of
    from qsched_pack.calibration.testing import ImageStatScorer, SyntheticGenerator, synthetic_objective

    sp = SearchSpace("start", 4)
    f = synthetic_objective("multimodal", 2)

    def fn(c, p, s):
        time.sleep(0.004)
        return f(point_of(sp, c)) + 0.001 * s

    calibrate(SyntheticGenerator(fn, 4, name="kill"), ImageStatScorer(), ["a", "b", "c", "d"], space=sp,
              strategy=sys.argv[3], points=int(sys.argv[4]), record=sys.argv[1], preset=sys.argv[2], resume=True)
""")


@pytest.mark.parametrize("strategy,points", [("zoom", "31"), ("grid", "7")])
def test_killed_at_random_points_then_resumed_gives_byte_identical_preset(tmp_path, strategy, points):
    script = tmp_path / "calib.py"
    script.write_text(SCRIPT)
    ref_rec, ref_preset = tmp_path / "ref.jsonl", tmp_path / "ref.json"
    subprocess.run([sys.executable, str(script), str(ref_rec), str(ref_preset), strategy, points], check=True, timeout=120)
    n_lines = len(ref_rec.read_text().splitlines())
    rec, preset = tmp_path / "rec.jsonl", tmp_path / "preset.json"
    rng = random.Random(1234 + len(strategy))
    targets = sorted(rng.sample(range(2, n_lines - 1), 4))
    kills = 0
    for target in targets:
        proc = subprocess.Popen([sys.executable, str(script), str(rec), str(preset), strategy, points])
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if rec.exists() and rec.read_bytes().count(b"\n") >= target:
                time.sleep(rng.random() * 0.01)  # land anywhere, including inside a write
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        assert not preset.exists() or proc.returncode == 0
    assert kills >= 3
    subprocess.run([sys.executable, str(script), str(rec), str(preset), strategy, points], check=True, timeout=120)
    assert preset.read_bytes() == ref_preset.read_bytes()

    def strip(path):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "crc", "digest")}
                for line in path.read_text().splitlines()]
    assert strip(rec) == strip(ref_rec)  # every point exactly once, same order, same scores
