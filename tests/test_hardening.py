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

from qsched_pack.calibration.runner import RecordError, RecordWarning, calibrate
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
    from qsched_pack.calibration.runner import point_line, record_key

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
    from qsched_pack.calibration.runner import RECORD_VERSION

    lines = _lines(records["ridge"]["record"])
    header = json.loads(lines[0])
    assert header["version"] == RECORD_VERSION >= 3
    header.pop("crc")
    header["version"] = 2
    from qsched_pack.calibration.runner import _line

    (tmp_path / "rec.jsonl").write_text(_line(header) + b"".join(lines[1:]).decode())
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


# ------------------------------------------------------------------ the TorchScript reader allocates what it read
def _claim_size(archive: Path, out: Path, claim: int) -> str:
    """A copy of ``archive`` whose central directory claims ``claim`` bytes for its largest storage entry (the
    bytes themselves are unchanged): the 404-byte-archive-claims-4-GB attack, on a real file."""
    import struct
    import zipfile

    with zipfile.ZipFile(archive) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(archive.read_bytes())
    pos = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        assert pos >= 0
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46:pos + 46 + n].decode() == info.filename:
            break
        pos += 4
    struct.pack_into("<I", data, pos + 24, claim)  # uncompressed size in the central directory
    out.write_bytes(bytes(data))
    return info.filename


def test_torchscript_reader_never_allocates_what_a_header_claims(tmp_path):
    import tracemalloc

    from jaq_fixtures import save_openai_torchscript

    from qsched_pack.calibration.metrics import WeightFileError
    from qsched_pack.calibration.metrics.safe_load import read_weights

    good = save_openai_torchscript(tmp_path / "good.pt", "rn", seed=1)
    _claim_size(Path(good), tmp_path / "RN50.pt", 1 << 30)  # claims 1 GiB
    tracemalloc.start()
    try:
        with pytest.raises(WeightFileError, match=r"RN50\.pt"):
            read_weights(tmp_path / "RN50.pt", "CLIP RN50")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated for a {os.path.getsize(tmp_path / 'RN50.pt')}-byte file"


def test_torchscript_reader_refuses_compressed_storages(tmp_path):
    import zipfile

    from jaq_fixtures import save_openai_torchscript

    from qsched_pack.calibration.metrics import WeightFileError
    from qsched_pack.calibration.metrics.safe_load import read_weights

    good = tmp_path / "good.pt"
    save_openai_torchscript(good, "rn", seed=1)
    out = tmp_path / "RN50.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, zin.read(item), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(WeightFileError, match=r"RN50\.pt.*compressed"):
        read_weights(out, "CLIP RN50")


# ------------------------------------------------------------------ YAML: no aliases, no huge messages
# one entry holding a chain of aliases, each 9 x the one before (the audit's 343-byte bomb had 9 levels and ran
# > 120 s to 1.5 GB formatting the expanded value; 5 levels keep the unfixed run short enough to see it fail)
BOMB = "p: [&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(4)) + "]\n"


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    from qsched_pack.calibration.prompts import load_prompts

    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    assert len(BOMB) < 400
    with pytest.raises(ValueError) as exc:
        load_prompts(f)
    msg = str(exc.value)
    assert "bomb.yaml" in msg and "alias" in msg and len(msg) < 600, msg[:300]


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "a: " + str(list(range(20000))) + "\n"),
    (".json", json.dumps({"a": "x", "b": list(range(20000))})),
    (".json", json.dumps(["ok", {"k" * 5000: 1}])),
])
def test_prompt_file_errors_never_format_a_huge_value(tmp_path, suffix, text):
    from qsched_pack.calibration.prompts import load_prompts

    f = tmp_path / f"p{suffix}"
    f.write_text(text)
    with pytest.raises(ValueError) as exc:
        load_prompts(f)
    assert str(f) in str(exc.value) and len(str(exc.value)) < 600, str(exc.value)[:300]


# ------------------------------------------------------------------ FIFOs never hang the CLI
def _cli(args, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "import sys; from qsched_pack.calibration.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case", ["prompts", "preset", "image"])
def test_fifo_inputs_are_refused_not_waited_on(tmp_path, case):
    fifo = tmp_path / {"prompts": "p.txt", "preset": "p.json", "image": "a.png"}[case]
    os.mkfifo(fifo)
    args = {"prompts": ["calibrate", "--model", str(tmp_path), "--prompts", str(fifo), "--out", str(tmp_path / "o")],
            "preset": ["sample", "--model", str(tmp_path), "--preset", str(fifo), "--prompt", "a"],
            "image": ["score", str(fifo), "--prompt", "a"]}[case]
    r = _cli(args, timeout=90)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and str(fifo) in r.stderr and "not a regular file" in r.stderr, r.stderr


def test_decompression_bomb_png_is_a_clean_error(tmp_path):
    """A PNG whose header claims 30000 x 30000 pixels (900 Mpx; a few KiB of zeros)."""
    import struct
    import zlib

    w = h = 30000

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (w // 8 + 1)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(200)) + comp.flush()  # truncated data: never decoded
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(png)
    from qsched_pack.calibration.plots import load_images

    with pytest.raises(ValueError, match=r"bomb\.png: the image has more than .* pixels"):
        load_images([str(tmp_path / "bomb.png")])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"junk\.png: not a readable image"):
        load_images([str(tmp_path / "junk.png")])
