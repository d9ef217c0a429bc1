"""What a file or a shared workflow holds cannot hurt: record lines bound to their record, no symlink followed by the
lock or the record, one confinement rule for every name, bounded YAML, a TorchScript reader that allocates only
what it read, checked pre-quantized tensors, no code from a model folder, clean errors instead of tracebacks.

Each test reproduces one hole of the attack audit (docs/security.md lists them) and was seen failing first."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from qsched_pack.calibration.record import RecordError, RecordWarning
from qsched_pack.calibration.runner import calibrate
from qsched_pack.calibration.search import SearchSpace, point_of
from qsched_pack.calibration.testing import ImageStatScorer, SyntheticGenerator, synthetic_objective

PROMPTS = ["a red car", "a blue house", "a green tree"]
SP = SearchSpace("start", 4)


def make_gen(name="ridge"):
    f = synthetic_objective(name, 2)
    return SyntheticGenerator(lambda c, p, s: f(point_of(SP, c)) + 0.001 * s, 4, name=name)


def run(folder, gen=None, **kw):
    args = dict(space=SP, strategy="zoom", points=21, record=str(folder / "rec.jsonl"),
                preset=str(folder / "preset.json"))
    args.update(kw)
    return calibrate(gen or make_gen(), ImageStatScorer(), PROMPTS, **args)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Two finished records of different models over the same points, and one of the same model at 1 CPU thread."""
    out = {}
    for name, gen, threads in (("ridge", "ridge", None), ("bowl", "bowl", None), ("ridge1", "ridge", 1)):
        d = tmp_path_factory.mktemp(name)
        before = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            r = run(d, gen=make_gen(gen))
        finally:
            torch.set_num_threads(before)
        out[name] = {"dir": d, "record": (d / "rec.jsonl").read_bytes(), "preset": (d / "preset.json").read_bytes(),
                     "points": len(r.points)}
    assert out["ridge"]["record"].split(b"\n")[0] != out["ridge1"]["record"].split(b"\n")[0]  # threads recorded
    return out


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


# ------------------------------------------------------------------ record lines belong to their record
@pytest.mark.parametrize("donor", ["bowl", "ridge1"])
def test_point_line_copied_from_another_record_is_refused(tmp_path, records, donor):
    """A line with a valid checksum from another model's record (or from a 1-thread run of the same model) is not
    accepted as this record's: it is skipped with a warning naming it and its point is computed again."""
    mine, theirs = _lines(records["ridge"]["record"]), _lines(records[donor]["record"])
    assert json.loads(mine[3])["point"] == json.loads(theirs[3])["point"]
    assert mine[3] != theirs[3]
    forged = mine[:3] + [theirs[3]] + mine[4:]
    (tmp_path / "rec.jsonl").write_bytes(b"".join(forged))
    gen = make_gen()
    with pytest.warns(RecordWarning, match=r"line 4 .*(another record|does not belong)"):
        run(tmp_path, gen=gen, resume=True)
    assert gen.calls == 1
    assert (tmp_path / "preset.json").read_bytes() == records["ridge"]["preset"]


def _resign(record: bytes, n: int, **changes) -> bytes:
    """Line n (0-based) changed and signed exactly like the record's writer signs it (so only the value checks
    can refuse it)."""
    from qsched_pack.calibration.record import point_line, record_key

    lines = _lines(record)
    header = json.loads(lines[0])
    entry = json.loads(lines[n])
    entry.pop("digest", None)
    entry.pop("crc", None)
    entry.update(changes)
    lines[n] = point_line(entry, record_key(header)).encode()
    return b"".join(lines)


@pytest.mark.parametrize("images", [-1000, True, 5000, 0, 2.5, "3", None])
def test_point_line_with_images_out_of_range_is_refused(tmp_path, records, images):
    """``images`` is the number of calibration prompts, nothing else: negative, boolean, huge or fractional counts
    would make the preset claim images it never spent."""
    (tmp_path / "rec.jsonl").write_bytes(_resign(records["ridge"]["record"], 3, images=images))
    gen = make_gen()
    with pytest.warns(RecordWarning, match="line 4 is damaged .*images"):
        run(tmp_path, gen=gen, resume=True)
    assert gen.calls == 1
    assert (tmp_path / "preset.json").read_bytes() == records["ridge"]["preset"]
    meta = json.loads((tmp_path / "preset.json").read_text())["metadata"]
    assert meta["images_spent"] == records["ridge"]["points"] * len(PROMPTS)


@pytest.mark.parametrize("changes", [{"jaq": [0.5]}, {"c_x": [1.0]}, {"point": [1.0, 1.0, 1.0]},
                                     {"components": {"tc": [1.0]}}, {"seconds": -1.0},
                                     {"point": [1.0, float("nan")]}])
def test_point_line_with_values_that_do_not_fit_the_record_is_refused(tmp_path, records, changes):
    data = _resign(records["ridge"]["record"], 3, **changes)
    (tmp_path / "rec.jsonl").write_bytes(data)
    gen = make_gen()
    with pytest.warns(RecordWarning, match="line 4 is damaged"):
        run(tmp_path, gen=gen, resume=True)
    assert gen.calls == 1
    assert (tmp_path / "preset.json").read_bytes() == records["ridge"]["preset"]


def test_record_of_the_previous_line_format_is_refused_naming_the_version(tmp_path, records):
    from qsched_pack.calibration.record import RECORD_VERSION

    lines = _lines(records["ridge"]["record"])
    header = json.loads(lines[0])
    assert header["version"] == RECORD_VERSION >= 3
    header.pop("crc")
    header["version"] = 2
    from qsched_pack.calibration.record import record_line

    (tmp_path / "rec.jsonl").write_text(record_line(header) + b"".join(lines[1:]).decode())
    with pytest.raises(RecordError, match="older version of Q-Sched .record version 2"):
        run(tmp_path, resume=True)


def test_a_failed_start_leaves_no_record_that_demands_resume(tmp_path):
    """A run that fails before its first point (wrong device, wrong family) leaves no header-only record behind:
    the same command, fixed, runs without --resume."""
    class Broken(SyntheticGenerator):
        def generate(self, *a, **k):
            raise ValueError("device 'meta' cannot run the model")

    f = synthetic_objective("ridge", 2)
    with pytest.raises(ValueError, match="meta"):
        run(tmp_path, gen=Broken(lambda c, p, s: f(point_of(SP, c)), 4, name="ridge"))
    assert not (tmp_path / "rec.jsonl").exists() and not (tmp_path / "rec.jsonl.lock").exists()
    run(tmp_path)  # no --resume needed


# ------------------------------------------------------------------ lock and record never follow a symlink
def test_lock_symlink_is_refused_and_its_target_untouched(tmp_path, records):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    shutil.copy(records["ridge"]["dir"] / "rec.jsonl", tmp_path / "rec.jsonl")
    os.symlink(victim, tmp_path / "rec.jsonl.lock")
    with pytest.raises(RecordError, match=r"rec\.jsonl\.lock.*(symbolic link|not a regular file)"):
        run(tmp_path, resume=True)
    assert victim.read_text() == "precious\n"
    os.symlink(tmp_path / "missing-target", tmp_path / "rec2.jsonl.lock")  # dangling: not created either
    with pytest.raises(RecordError, match="symbolic link|not a regular file"):
        run(tmp_path, record=str(tmp_path / "rec2.jsonl"))
    assert not (tmp_path / "missing-target").exists()


def test_lock_that_is_a_fifo_or_folder_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "rec.jsonl.lock")
    with pytest.raises(RecordError, match="not a regular file"):
        run(tmp_path)
    (tmp_path / "rec2.jsonl.lock").mkdir()
    with pytest.raises(RecordError, match="not a regular file"):
        run(tmp_path, record=str(tmp_path / "rec2.jsonl"))


def test_record_symlink_is_refused_and_its_target_untouched(tmp_path, records):
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(records["ridge"]["record"])
    os.symlink(victim, tmp_path / "rec.jsonl")
    with pytest.raises(RecordError, match=r"rec\.jsonl.*(symbolic link|not a regular file)"):
        run(tmp_path, resume=True)
    assert victim.read_bytes() == records["ridge"]["record"]


# ------------------------------------------------------------------ one confinement rule for every name
def _qsched_dir(folder_paths) -> Path:
    from qsched_pack.nodes.common import register_qsched_folder

    register_qsched_folder()
    d = Path(folder_paths.get_folder_paths("qsched")[0])
    d.mkdir(parents=True, exist_ok=True)
    return d


def _refused(check, **kw) -> str:
    from qsched_pack.nodes.common import NodeInputError

    with pytest.raises(NodeInputError) as exc:
        check(**kw)
    return str(exc.value)


def test_save_preset_never_replaces_a_scorer_file(folder_paths):
    from qsched_pack.nodes import sampling
    from qsched_pack.nodes.common import NodeInputError
    from qsched_pack.qsched import Coefficients

    d = _qsched_dir(folder_paths)
    (d / "clip-vit-large-patch14").mkdir()
    config = d / "clip-vit-large-patch14" / "config.json"
    config.write_text('{"model_type": "clip"}')
    with pytest.raises(NodeInputError, match="input 'name'.*not a Q-Sched preset"):
        sampling.QSchedSavePreset().save(Coefficients.identity(2), "clip-vit-large-patch14/config", True)
    assert config.read_text() == '{"model_type": "clip"}'
    sampling.QSchedSavePreset().save(Coefficients.identity(2), "mine", True)  # a preset replaces a preset
    sampling.QSchedSavePreset().save(Coefficients.identity(3), "mine", True)
    assert Coefficients.load(d / "mine.json").steps == 3


def test_save_preset_through_a_symlinked_subfolder_is_refused(folder_paths, tmp_path):
    from qsched_pack.nodes import sampling
    from qsched_pack.nodes.common import NodeInputError
    from qsched_pack.qsched import Coefficients

    d = _qsched_dir(folder_paths)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, d / "linked")
    msg = _refused(sampling.QSchedSavePreset.VALIDATE_INPUTS, name="linked/p")
    assert "input 'name'" in msg and "leads out" in msg
    with pytest.raises(NodeInputError, match="input 'name'"):
        sampling.QSchedSavePreset().save(Coefficients.identity(2), "linked/p", True)
    assert list(outside.iterdir()) == []


def test_load_preset_never_reads_through_a_symlink_out(folder_paths, tmp_path):
    from qsched_pack.nodes import sampling
    from qsched_pack.qsched import Coefficients

    d = _qsched_dir(folder_paths)
    outside = tmp_path / "outside"
    outside.mkdir()
    Coefficients.identity(2).with_metadata(secret="from outside").save(outside / "x.json")
    os.symlink(outside / "x.json", d / "evil.json")
    os.symlink(outside, d / "linked")
    for name in ("evil.json", "linked/x.json"):
        msg = _refused(sampling.QSchedLoadPreset.VALIDATE_INPUTS, preset=name)
        assert "input 'preset'" in msg and "leads out" in msg and "from outside" not in msg
        with pytest.raises(Exception, match="input 'preset'"):
            sampling.QSchedLoadPreset().load(name)
        assert name not in sampling.QSchedLoadPreset.INPUT_TYPES()["required"]["preset"][0]


def test_calibrate_preset_name_follows_the_same_rule(folder_paths, tmp_path):
    from qsched_pack.nodes.calibration import check_settings

    d = _qsched_dir(folder_paths)
    os.symlink(tmp_path, d / "linked")
    for bad in ("linked/p", "../p", ".hidden", "x/", "a" * 300):
        with pytest.raises(ValueError, match="input 'preset_name'"):
            check_settings(preset_name=bad)


@pytest.mark.parametrize("name", [".hidden", "x/", "..", "sub/.tmp-x", "a" * 300, "d/" * 600 + "x",
                                  "./x", "x/./y"])
def test_save_preset_refuses_names_load_preset_would_refuse(folder_paths, name):
    """Every name Save Preset accepts, Load Preset lists and loads (and the other way round)."""
    from qsched_pack.nodes import sampling

    _qsched_dir(folder_paths)
    msg = _refused(sampling.QSchedSavePreset.VALIDATE_INPUTS, name=name)
    assert msg.startswith("Q-Sched Save Preset: input 'name'") and len(msg) < 600, msg
    msg = _refused(sampling.QSchedLoadPreset.VALIDATE_INPUTS, preset=name + ".json")
    assert msg.startswith("Q-Sched Load Preset: input 'preset'") and len(msg) < 600, msg


@pytest.mark.parametrize("choice", [".", "./", "sub", "a" * 300 + ".pt"])
def test_jaq_loader_refuses_a_folder_or_dot_at_queue_time(folder_paths, choice):
    from qsched_pack.nodes import scoring

    d = _qsched_dir(folder_paths)
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "weights.bin").write_bytes(b"x")
    msg = _refused(scoring.QSchedJAQLoader.VALIDATE_INPUTS, preset="clip", tc_weights=choice, iq_weights="auto")
    assert msg.startswith("Q-Sched JAQ Loader: input 'tc_weights'"), msg


def test_one_confinement_function_serves_every_named_file():
    """The rule lives in one place: every module that turns a name into a path inside a folder imports it."""
    import re

    root = Path(__file__).resolve().parents[1]
    users = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("tests/", ".venv/", "benchmarks/")) or "/." in "/" + rel:
            continue
        text = f.read_text(encoding="utf-8")
        if re.search(r"def confined\(", text):
            users.append(("defines", rel))
        if re.search(r"get_full_path\(\s*QSCHED_FOLDER", text):
            users.append(("bypasses", rel))
    assert users == [("defines", "qsched/_io.py")], users
