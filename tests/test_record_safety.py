"""Never silently wrong, never loses work: resume refuses anything that changes a score (naming the field), one
writer per record, damaged lines recomputed, limits checked before work, clean interrupts, full disks named;
every parser fuzzed (hypothesis) raises only its documented error."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsched_pack.calibration.record import RecordError, RecordLocked, RecordWarning, RecordWriteError
from qsched_pack.calibration.runner import Runner, calibrate
from qsched_pack.calibration.search import SearchSpace, check_budget, point_of
from qsched_pack.calibration.testing import ImageStatScorer, SyntheticGenerator, synthetic_objective
from qsched_pack.qsched import Coefficients
from qsched_pack.qsched._io import TextFileError

PROMPTS = ["a red car", "a blue house", "a green tree"]
SP = SearchSpace("start", 4)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_gen():
    f = synthetic_objective("ridge", 2)
    return SyntheticGenerator(lambda c, p, s: f(point_of(SP, c)) + 0.001 * s, 4, name="ridge")


def run(folder, gen=None, **kw):
    args = dict(space=SP, strategy="zoom", points=21, record=str(folder / "rec.jsonl"),
                preset=str(folder / "preset.json"))
    args.update(kw)
    return calibrate(gen or make_gen(), ImageStatScorer(), PROMPTS, **args)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    r = run(d)
    return {"dir": d, "preset": (d / "preset.json").read_bytes(), "record": (d / "rec.jsonl").read_bytes(),
            "points": len(r.points)}


# ------------------------------------------------------------------ what changes a score is in the fingerprint
def test_cli_resume_refuses_each_change_naming_the_field(tmp_path, jaq_dir, capsys, tiny_pipelines):
    from jaq_fixtures import save_openai_torchscript

    from qsched_pack.calibration.app.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_pipelines["sdxl"], model)
    weights = tmp_path / "weights"
    shutil.copytree(jaq_dir, weights)
    out = tmp_path / "run"
    base = ["calibrate", "--model", str(model), "--family", "sdxl_turbo", "--steps", "1", "--size", "32",
            "--jaq", "clip", "--jaq-weights", str(weights), "--limit", "2", "--strategy", "grid", "--points", "2",
            "--out", str(out), "--quiet"]
    assert main(base) == 0
    preset = (out / "preset.json").read_bytes()
    capsys.readouterr()

    def refused(args, field):
        assert main(args + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert "cannot be resumed" in err and field in err, err
        assert (out / "preset.json").read_bytes() == preset

    refused(base + ["--batch-size", "1"], "generator.batch_size (record: 4, now: 1)")
    save_openai_torchscript(weights / "RN50.pt", "rn", seed=99)  # another file under the same name
    refused(base, "scorer.weights_sha256.clipiqa")
    shutil.copy(jaq_dir / "RN50.pt", weights / "RN50.pt")
    cfg = model / "vae" / "config.json"
    original = cfg.read_text()
    edited = json.loads(original)
    edited["scaling_factor"] = 0.5
    cfg.write_text(json.dumps(edited))
    refused(base, "generator.config_hash")
    cfg.write_text(original)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        refused(base, f"cpu_threads (record: {threads}, now: {threads + 1})")
    finally:
        torch.set_num_threads(threads)
    assert main(base + ["--resume"]) == 0  # the original settings resume, nothing recomputed, same preset
    assert (out / "preset.json").read_bytes() == preset


def test_record_written_by_an_older_version_gets_a_clear_message(tmp_path, clean):
    lines = clean["record"].decode().splitlines(keepends=True)
    header = json.loads(lines[0])
    header.pop("crc")
    header["version"] = 1
    from qsched_pack.calibration.record import record_line

    (tmp_path / "rec.jsonl").write_text(record_line(header) + "".join(lines[1:]))
    with pytest.raises(RecordError, match="written by an older version of Q-Sched .record version 1"):
        run(tmp_path, resume=True)


# ------------------------------------------------------------------ one writer, damaged lines, temp files
def test_second_writer_in_another_process_is_refused_naming_it(tmp_path, clean):
    shutil.copy(clean["dir"] / "rec.jsonl", tmp_path / "rec.jsonl")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from qsched_pack.calibration.record import RecordLock
        lock = RecordLock({str(tmp_path / "rec.jsonl")!r})
        lock.acquire()
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        gen = make_gen()
        with pytest.raises(RecordLocked, match=rf"in use by pid {holder.pid} on host "):
            run(tmp_path, gen=gen, resume=True)
        assert gen.calls == 0 and (tmp_path / "rec.jsonl").read_bytes() == clean["record"]
    finally:
        holder.kill()
        holder.wait()
    run(tmp_path, resume=True)  # a killed holder leaves a stale lock file that does not block
    assert (tmp_path / "preset.json").read_bytes() == clean["preset"]
    assert not (tmp_path / "rec.jsonl.lock").exists()


def test_two_runs_in_one_process_cannot_share_a_record(tmp_path):
    first = Runner(make_gen(), ImageStatScorer(), PROMPTS, space=SP, strategy="zoom", points=21,
                   record=str(tmp_path / "rec.jsonl"))
    try:
        with pytest.raises(RecordLocked, match=rf"in use by pid {os.getpid()}"):
            run(tmp_path, resume=True)
    finally:
        first.close()
    run(tmp_path, resume=True)


def test_flipped_byte_recomputes_that_point_only_and_gives_the_clean_preset(tmp_path, clean):
    lines = clean["record"].splitlines(keepends=True)
    i = 4
    pos = lines[i].index(b'"score":') + 10
    lines[i] = lines[i][:pos] + bytes([lines[i][pos] ^ 0x01]) + lines[i][pos + 1:]
    (tmp_path / "rec.jsonl").write_bytes(b"".join(lines))
    gen = make_gen()
    with pytest.warns(RecordWarning, match=rf"rec\.jsonl: line {i + 1} is damaged \(.*\); skipping it, its point "
                                           "will be computed again"):
        run(tmp_path, gen=gen, resume=True)
    assert gen.calls == 1
    assert (tmp_path / "preset.json").read_bytes() == clean["preset"]


def test_temp_files_are_cleaned_and_never_listed_as_presets(tmp_path, clean, folder_paths):
    from qsched_pack.nodes.common import preset_names, register_qsched_folder

    shutil.copy(clean["dir"] / "rec.jsonl", tmp_path / "rec.jsonl")
    (tmp_path / ".tmp-k1l2m3rec.jsonl").write_text("half")  # a killed atomic write of this record
    run(tmp_path, resume=True)
    assert not (tmp_path / ".tmp-k1l2m3rec.jsonl").exists()
    register_qsched_folder()
    d = tmp_path / "models" / "qsched"
    d.mkdir(parents=True)
    Coefficients.identity(2).save(d / "a.json")
    (d / ".tmp-abc123a.json").write_text("{}")
    (d / "sub").mkdir()
    (d / "sub" / ".tmp-x.json").write_text("{}")
    assert preset_names() == ["a.json"]
    from qsched_pack.nodes.sampling import QSchedLoadPreset

    with pytest.raises(ValueError, match="input 'preset'"):  # refused on queue: VALIDATE_INPUTS raises
        QSchedLoadPreset.VALIDATE_INPUTS(preset=".tmp-abc123a.json")


# ------------------------------------------------------------------ disk full / read-only, interrupts
def test_disk_full_names_the_record_and_the_run_resumes_identically(tmp_path, clean, monkeypatch):
    real = os.fsync
    calls = {"n": 0}

    def full(fd):
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RecordWriteError, match=r"cannot write the calibration record .*rec\.jsonl: the disk is "
                                               r"full\. Everything recorded before is kept.*--resume"):
        run(tmp_path)
    monkeypatch.setattr(os, "fsync", real)
    run(tmp_path, resume=True)
    assert (tmp_path / "preset.json").read_bytes() == clean["preset"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_read_only_folder_names_the_record_not_a_temp_file(tmp_path, monkeypatch):
    import qsched_pack.qsched._io as io_mod

    def readonly(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".tmp-q1w2e3rec.jsonl"))

    monkeypatch.setattr(io_mod.tempfile, "mkstemp", readonly)
    with pytest.raises(RecordWriteError) as exc:
        run(tmp_path)
    assert f"{tmp_path / 'rec.jsonl'}: the file system is read-only" in str(exc.value)
    assert ".tmp-" not in str(exc.value)


def test_atomic_writes_name_the_target_not_the_temp_file(tmp_path, monkeypatch):
    import qsched_pack.qsched._io as io_mod

    target = tmp_path / "preset.json"
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as exc:
        Coefficients.identity(2).save(target)
    assert exc.value.filename == str(target) and exc.value.errno == errno.ENOSPC and ".tmp-" not in str(exc.value)
    assert os.listdir(tmp_path) == []  # nothing half-written left behind
    monkeypatch.setattr(os, "fsync", real)

    def readonly(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".tmp-abc"))

    monkeypatch.setattr(io_mod.tempfile, "mkstemp", readonly)
    with pytest.raises(OSError) as exc:
        io_mod.atomic_write_text(target, "x")
    assert exc.value.filename == str(target) and ".tmp-" not in str(exc.value)


def test_cli_ctrl_c_ends_cleanly_with_the_resume_hint(tmp_path, monkeypatch, capsys):
    from qsched_pack.calibration import runner
    from qsched_pack.calibration.app import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_build_generator", lambda *a, **k: make_gen())
    monkeypatch.setattr(cli, "_build_jaq", lambda args: (ImageStatScorer(), None))
    monkeypatch.setattr(runner, "calibrate", interrupted)
    rc = cli.main(["calibrate", "--model", "m", "--steps", "4", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "resume with the same command plus --resume" in err
    assert "Traceback" not in err


def test_interrupt_hook_stops_between_points_and_the_record_resumes(tmp_path, clean):
    class Stop(Exception):
        pass

    n = {"calls": 0}

    def interrupt():
        n["calls"] += 1
        if n["calls"] == 9:
            raise Stop()

    with pytest.raises(Stop):
        run(tmp_path, interrupt=interrupt)
    assert not (tmp_path / "rec.jsonl.lock").exists()  # released on the way out
    run(tmp_path, resume=True)
    assert (tmp_path / "preset.json").read_bytes() == clean["preset"]


# ------------------------------------------------------------------ limits before work
def test_huge_searches_are_refused_arithmetically_before_anything_is_built():
    t0 = time.perf_counter()
    sp = SearchSpace("per_step", 50)
    with pytest.raises(ValueError, match=r"10000\^100 = about 10\^400 points .*set a budget"):
        check_budget(sp, "grid", 10000, 20, None)
    with pytest.raises(ValueError, match=r"coarse grid of 2\^100 = about 10\^30 points.*use strategy 'pattern'"):
        check_budget(sp, "zoom", 10000, 20, None)
    with pytest.raises(ValueError, match="budget too small"):
        check_budget(sp, "grid", 10000, 20, 10 ** 9)
    # an adaptive search's length is bounded by its lattice: without a budget a huge lattice is refused too ...
    with pytest.raises(ValueError, match=r"strategy 'pattern' on a 100-D space .*set a budget"):
        check_budget(sp, "pattern", 10000, 20, None)
    check_budget(sp, "pattern", 10000, 20, 10 ** 6)  # ... and a budget makes it fine (it polls neighbours only)
    assert time.perf_counter() - t0 < 1.0


def test_non_finite_settings_are_refused_before_the_record_is_written(tmp_path):
    class NanGen(SyntheticGenerator):
        def fingerprint(self):
            return {**super().fingerprint(), "guidance": float("nan")}

    with pytest.raises(ValueError, match=r"non-finite number \(generator.guidance\)"):
        calibrate(NanGen(lambda c, p, s: 1.0, 4), ImageStatScorer(), PROMPTS, space=SP, record=str(tmp_path / "r"))
    assert not os.listdir(tmp_path)


def test_validation_before_the_record_is_written(tmp_path):
    with pytest.raises(ValueError, match="coarse grid"):
        calibrate(SyntheticGenerator(lambda c, p, s: 1.0, 50), ImageStatScorer(), PROMPTS,
                  space=SearchSpace("per_step", 50), strategy="zoom", points=10000, record=str(tmp_path / "r.jsonl"))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("option,value,msg", [
    ("--guidance", "nan", "--guidance must be a finite number in [0, 100], got 'nan'"),
    ("--guidance", "inf", "--guidance must be a finite number"),
    ("--eta", "5", "--eta must be a finite number in [0, 1], got '5'"),
    ("--eta", "-inf", "--eta must be a finite number"),
    ("--k", "nan", "--k must be a finite number"),
    ("--range", "nan", "--range must be a finite number > 0"),
])
def test_cli_float_options_refuse_nan_inf_and_out_of_range_before_anything(tmp_path, capsys, option, value, msg):
    from qsched_pack.calibration.app.cli import main

    args = ["calibrate", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]
    args += [option, value, "1.2"] if option == "--range" else [f"{option}={value}"]
    with pytest.raises(SystemExit):
        main(args)
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_generator_checks_eta_and_guidance_before_any_record(tiny_pipelines):
    from qsched_pack.calibration.generate import DiffusersGenerator, load_pipeline

    pipe = load_pipeline(str(tiny_pipelines["sdxl"]))
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\], got 5"):
        DiffusersGenerator(pipe, family="sdxl_turbo", eta=5.0, model_hash_value="x")
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0, got nan"):
        DiffusersGenerator(pipe, family="sdxl_turbo", guidance=float("nan"), model_hash_value="x")


# ------------------------------------------------------------------ preset and prompt files
def test_preset_files_are_capped_and_named(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(Coefficients.identity(2).to_json()[:-2] + " " * (1 << 20) + "}\n")
    t0 = time.perf_counter()
    with pytest.raises(TextFileError, match=r"big\.json: .* bytes is too large for a Q-Sched preset"):
        Coefficients.load(big)
    assert time.perf_counter() - t0 < 0.5
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=r"deep\.json: preset: nested more than 32 levels"):
        Coefficients.load(deep)
    utf16 = tmp_path / "u16.json"
    utf16.write_text(Coefficients.identity(2).to_json(), encoding="utf-16")
    with pytest.raises(TextFileError, match=r"u16\.json: the Q-Sched preset is UTF-16 text; save it as UTF-8"):
        Coefficients.load(utf16)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"c_x": [1.0], "c_eps": [1.0], "metadata": {"name": "caf\xe9"}}')
    with pytest.raises(TextFileError, match=r"latin\.json: the Q-Sched preset is not UTF-8 text"):
        Coefficients.load(latin)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + Coefficients.identity(2).to_json().encode())
    assert Coefficients.load(bom) == Coefficients.identity(2)


def test_prompt_files_are_capped_and_named(tmp_path, monkeypatch):
    from qsched_pack.calibration import prompts as P

    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ValueError, match=r"deep\.yaml: nested more than 32 levels"):
        P.load_prompts(deep)
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=r"deep\.json: nested"):
        P.load_prompts(deep_json)
    u16 = tmp_path / "p.txt"
    u16.write_text("a cat\na dog\n", encoding="utf-16")
    with pytest.raises(TextFileError, match=r"p\.txt: the prompt file is UTF-16 text; save it as UTF-8"):
        P.load_prompts(u16)
    monkeypatch.setattr(P, "PROMPTS_MAX_BYTES", 10)
    small = tmp_path / "s.txt"
    small.write_text("a cat sitting on a chair\n")
    with pytest.raises(TextFileError, match=r"s\.txt: 25 bytes is too large for a prompt file"):
        P.load_prompts(small)
    nan = tmp_path / "n.json"
    nan.write_text("[NaN]")
    with pytest.raises(ValueError, match=r"n\.json: not valid JSON"):
        P.load_prompts(nan)


# ------------------------------------------------------------------ property-based fuzz of every parser
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(["c_x", "c_eps", "steps", "metadata",
                                                                                 "x"]), kids, max_size=4),
    max_leaves=20)


@FUZZ
@given(st.one_of(st.text(max_size=200), json_values.map(lambda v: json.dumps(v, allow_nan=True))))
def test_fuzz_preset_parser_raises_only_value_error(text):
    try:
        c = Coefficients.from_json(text)
    except ValueError:
        return
    assert isinstance(c, Coefficients)


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".json", ".yaml"]))
def test_fuzz_prompt_file_parser_raises_only_value_error(tmp_path, data, suffix):
    from qsched_pack.calibration.prompts import load_prompts

    f = tmp_path / f"p{suffix}"
    f.write_bytes(data)
    try:
        prompts = load_prompts(f)
    except ValueError as exc:
        assert str(f) in str(exc)
        return
    assert prompts and all(isinstance(p, str) and p for p in prompts)


@FUZZ
@given(st.text(max_size=30))
def test_fuzz_cli_float_parser_raises_only_argument_type_error(text):
    from qsched_pack.calibration.app.args import finite_float, positive_float

    for parse, lo, hi in ((finite_float("--eta", 0.0, 1.0), 0.0, 1.0), (positive_float("--range"), 0.0, None)):
        try:
            v = parse(text)
        except argparse.ArgumentTypeError:
            continue
        assert v == v and v not in (float("inf"), float("-inf")) and v >= lo and (hi is None or v <= hi)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_record_damage_is_refused_or_recomputed_to_the_clean_preset(tmp_path_factory, clean, flips):
    """Any byte changes: a damaged header is refused with RecordError; damaged point lines are skipped and
    recomputed, and the preset is the clean run's, byte for byte."""
    d = tmp_path_factory.mktemp("fuzz")
    data = bytearray(clean["record"])
    for pos, byte in flips:
        data[pos % len(data)] = byte
    (d / "rec.jsonl").write_bytes(bytes(data))
    try:
        with _any_warnings():
            run(d, resume=True)
    except RecordError:
        header_end = clean["record"].index(b"\n")
        assert any(pos % len(data) <= header_end for pos, _ in flips)
        return
    assert (d / "preset.json").read_bytes() == clean["preset"]


class _any_warnings:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RecordWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
