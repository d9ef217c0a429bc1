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

from test_record_safety import PROMPTS, SP
from test_record_safety import run as record_safety_run

from qsched_pack.calibration.record import RecordError, RecordWarning
from qsched_pack.calibration.search import SearchSpace, point_of
from qsched_pack.calibration.testing import SyntheticGenerator, synthetic_objective


def make_gen(name="ridge"):
    f = synthetic_objective(name, 2)
    return SyntheticGenerator(lambda c, p, s: f(point_of(SP, c)) + 0.001 * s, 4, name=name)


def run(folder, gen=None, **kw):  # the run of tests/test_record_safety.py, with another model when asked
    return record_safety_run(folder, gen=gen or make_gen(), **kw)


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

    from test_security import product_sources

    users = []
    for rel, text in product_sources():
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

    return subprocess.run([sys.executable, "-c", "import sys; from qsched_pack.calibration.app.cli import main; "
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


# ------------------------------------------------------------------ pre-quantized files: header and tensors checked
def _prequant_file(tmp_path, fmt="w4a8"):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qsched_pack.calibration.app.cli import main

    g = torch.Generator().manual_seed(0)
    src, out = tmp_path / "src.safetensors", tmp_path / f"q-{fmt}.safetensors"
    save_file({"blocks.0.qkv.weight": (torch.randn(192, 64, generator=g) / 8).to(torch.bfloat16),
               "blocks.0.qkv.bias": torch.zeros(192, dtype=torch.bfloat16),
               "blocks.0.mlp.weight": (torch.randn(128, 64, generator=g) / 8).to(torch.bfloat16)}, str(src))
    assert main(["quantize", str(src), str(out), "--format", fmt, "--device", "cpu"]) == 0
    with safe_open(str(out), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    return str(path)


def _load_prequant(path):
    from qsched_pack.qsched.quant import prequant

    meta = prequant.read_metadata(path)
    return prequant.comfy_state_dict(path, meta)


@pytest.mark.parametrize("layers, expected", [
    ("[]", "layers"), ("null", "layers"), ("3", "layers"), ('"x"', "layers"),
    ('{"blocks.0.qkv": {"group_size": 64, "shape": [192, 64], "dtype": "bfloat16"}}', "format"),
    ('{"blocks.0.qkv": {"format": "w4a8", "group_size": 64, "shape": [192.0, 64], "dtype": "bfloat16"}}', "shape"),
    ('{"blocks.0.qkv": {"format": "w4a8", "group_size": 64, "shape": ["192", "64"], "dtype": "bfloat16"}}', "shape"),
    ('{"blocks.0.qkv": {"format": "w4a8", "group_size": 64, "shape": [true, 64], "dtype": "bfloat16"}}', "shape"),
    ('{"blocks.0.qkv": {"format": "w4a8", "group_size": 64, "shape": [-192, 64], "dtype": "bfloat16"}}', "shape"),
    ('{"blocks.0.qkv": {"format": "bogus", "group_size": 64, "shape": [192, 64], "dtype": "bfloat16"}}', "format"),
    ('{"blocks.0.qkv": {"format": "w4a8", "group_size": "64", "shape": [192, 64], "dtype": "bfloat16"}}', "group"),
    ('{"blocks.0.qkv": {"format": "w4a8", "group_size": 64, "shape": [192, 64], "dtype": "int8"}}', "dtype"),
    ('{"blocks.0.qkv": []}', "blocks.0.qkv"),
])
def test_prequantized_header_fields_are_checked(tmp_path, layers, expected):
    meta, tensors = _prequant_file(tmp_path)
    meta["qsched.layers"] = layers
    path = _write(tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(ValueError, match=rf"bad\.safetensors.*{expected}") as exc:
        _load_prequant(path)
    assert len(str(exc.value)) < 600


@pytest.mark.parametrize("fmt, tensor, dtype", [
    ("w4a8", "qweight", torch.float32), ("w4a8", "qweight", torch.int32), ("w4a8", "qweight", torch.int8),
    ("w4a8", "weight_scale", torch.int8), ("w4a8", "weight_scale", torch.float64),
    ("w8a8", "qweight", torch.float32), ("w8a8", "qweight", torch.uint8), ("w8a8", "weight_scale", torch.int8),
    ("w8a8-fp8", "qweight", torch.int8), ("w4a8-fp8", "weight_exp", torch.float32),
    ("w4a8", "bias", torch.int8),
])
def test_prequantized_tensor_dtypes_are_checked_against_the_format(tmp_path, fmt, tensor, dtype):
    """Wrong dtypes used to load: float32/int32 codes crashed at sampling, int8 scales silently changed the output."""
    meta, tensors = _prequant_file(tmp_path, fmt)
    key = f"blocks.0.qkv.{tensor}"
    assert key in tensors and tensors[key].dtype != dtype
    t = tensors[key]
    tensors[key] = (t.float() if t.dtype == torch.float8_e4m3fn else t).to(dtype)
    path = _write(tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(ValueError, match=rf"bad\.safetensors.*blocks\.0\.qkv\.{tensor}.*{str(dtype)[6:]}"):
        _load_prequant(path)


@pytest.mark.parametrize("tensor, shape", [("qweight", (192, 64)), ("weight_scale", (192, 2)), ("bias", (64,))])
def test_prequantized_tensor_shapes_are_checked_against_the_header(tmp_path, tensor, shape):
    meta, tensors = _prequant_file(tmp_path)
    key = f"blocks.0.qkv.{tensor}"
    tensors[key] = torch.zeros(shape, dtype=tensors[key].dtype)
    path = _write(tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(ValueError, match=rf"bad\.safetensors.*blocks\.0\.qkv\.{tensor}.*shape"):
        _load_prequant(path)


@pytest.mark.parametrize("fmt", ["w8a8", "w8a8-fp8", "w4a8", "w4a4", "w8a16", "w4a16", "w4a8-fp8"])
def test_expected_tensors_rule_matches_what_the_quantizer_writes(fmt):
    """The validation rule and the writer cannot drift apart: every tensor quantize_linear_weight makes is what
    prequant.expected_tensors demands, for even and odd in_features."""
    from qsched_pack.qsched.quant import prequant
    from qsched_pack.qsched.quant.swap import layer_kernel
    from qsched_pack.qsched.quant.layers import quantize_linear_weight
    from qsched_pack.qsched.quant.spec import QuantSpec

    spec = QuantSpec.parse(fmt)
    for n, k in ((48, 256), (40, 64)):
        kernel, group, _ = layer_kernel(spec, "native", k, n, False)
        q = quantize_linear_weight(torch.randn(n, k), spec, kernel, group)
        names = {"qweight": "qweight", "wscale": "weight_scale", "wsum": "weight_sum", "wexp": "weight_exp"}
        got = {names[key]: (v.dtype, tuple(v.shape)) for key, v in q.items()}
        want = prequant.expected_tensors(fmt, group, n, k)
        assert {key: want[key] for key in got} == got


# ------------------------------------------------------------------ no code from a model folder
EVIL = '''
import pathlib
pathlib.Path({target!r}).write_text("code from the model folder ran")
class EvilUNet:
    pass
'''


def _evil_folder(tiny_pipelines, tmp_path, library="evilmod"):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipelines["sdxl"], model)
    target = tmp_path / "pwned"
    index = json.loads((model / "model_index.json").read_text())
    index["unet"] = [library, "EvilUNet"]
    (model / "model_index.json").write_text(json.dumps(index))
    (model / "unet" / f"{library}.py").write_text(EVIL.format(target=str(target)))
    return model, target


def test_installed_diffusers_refuses_component_code_without_trust_remote_code(tiny_pipelines, tmp_path):
    """The dependency guard: the diffusers this pack requires (>= 0.38) does not import <component>/<library>.py
    from a model folder unless trust_remote_code is set (0.32-0.37 did; see docs/security.md)."""
    import diffusers
    from packaging.version import Version

    from qsched_pack.qsched._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    assert Version(diffusers.__version__) >= Version("0.38")
    model, target = _evil_folder(tiny_pipelines, tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        diffusers.DiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    assert not target.exists()


@pytest.mark.parametrize("library", ["evilmod", "diffusers"])
def test_pack_refuses_a_model_folder_holding_component_code(tiny_pipelines, tmp_path, capsys, library):
    """The pack's own guard (independent of the diffusers version): a component folder with Python code, or a
    library that is not diffusers/transformers, is refused before diffusers is called."""
    from qsched_pack.calibration.app.cli import main

    model, target = _evil_folder(tiny_pipelines, tmp_path, library)
    assert main(["calibrate", "--model", str(model), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unet" in err and "never runs code from a model folder" in err, err
    assert not target.exists()


def test_requirements_demand_loaders_that_cannot_run_code():
    root = Path(__file__).resolve().parents[1]
    for f in ("requirements.txt", "pyproject.toml"):
        text = (root / f).read_text()
        assert "diffusers>=0.38" in text, f
        assert "torch>=2.6" in text, f


# ------------------------------------------------------------------ clean errors instead of tracebacks
@pytest.mark.parametrize("index, expected", [
    ("[1, 2]", "must be a JSON object"), ('"x"', "must be a JSON object"),
    ("[" * 100 + "]" * 100, "nested"), ('{"_class_name": "NoSuchPipeline"}', "NoSuchPipeline"),
    ('{"_class_name": "os.system"}', "_class_name must name a diffusers pipeline"),
    ('{"_class_name": "Path"}', "not a diffusers pipeline"),
    ('{"_class_name": ["evil", "X"]}', "_class_name"),
    ('{"_class_name": "StableDiffusionXLPipeline", "../../x": ["diffusers", "UNet2DConditionModel"]}', "../../x"),
    ('{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers"]}', "unet"),
    ('{"_class_name": "StableDiffusionXLPipeline", "unet": ["os", "system"]}', "library 'os'"),
])
def test_bad_model_index_is_a_clean_error(tmp_path, capsys, index, expected):
    from qsched_pack.calibration.app.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(index)
    assert main(["calibrate", "--model", str(model), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model_index.json" in err and expected in err, err
    assert not (tmp_path / "o" / "record.jsonl").exists()


@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:99", "cuda"])
@pytest.mark.parametrize("command", ["calibrate", "quantize", "score"])
def test_bad_device_is_refused_before_anything_runs(tmp_path, capsys, device, command):
    from qsched_pack.calibration.app.cli import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    args = {"calibrate": ["calibrate", "--model", str(tmp_path), "--out", str(tmp_path / "o")],
            "quantize": ["quantize", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
            "score": ["score", str(tmp_path / "a.png"), "--prompt", "x"]}[command]
    with pytest.raises(SystemExit) as exc:
        main(args + ["--device", device])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and device.split(":")[0] in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_family_that_does_not_fit_the_pipeline_is_refused_and_leaves_no_record(tiny_pipelines, tmp_path, capsys):
    from qsched_pack.calibration.app.cli import main

    out = tmp_path / "o"
    args = ["calibrate", "--model", str(tiny_pipelines["sdxl"]), "--out", str(out), "--device", "cpu",
            "--size", "64", "--limit", "2", "--budget", "4", "--jaq-weights", str(tmp_path)]
    assert main(args + ["--family", "flux_schnell"]) == 2
    err = capsys.readouterr().err
    assert "flux_schnell" in err and "does not fit" in err and "Traceback" not in err, err
    assert not (out / "record.jsonl").exists()


def test_quantize_never_replaces_its_source(tmp_path, capsys):
    from safetensors.torch import save_file

    from qsched_pack.calibration.app.cli import main

    src = tmp_path / "x.safetensors"
    save_file({"blocks.0.qkv.weight": torch.randn(64, 64).to(torch.bfloat16)}, str(src))
    before = src.read_bytes()
    os.symlink(src, tmp_path / "link.safetensors")
    for out in (src, tmp_path / "link.safetensors", tmp_path / "." / "x.safetensors"):
        assert main(["quantize", str(src), str(out), "--overwrite", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "source" in err and "Traceback" not in err, err
        assert src.read_bytes() == before


@pytest.mark.parametrize("delay", [1.0, 2.0, 3.0])  # after interpreter start-up (Python's own)
def test_ctrl_c_or_sigterm_at_any_moment_ends_cleanly(tmp_path, delay):
    import signal
    import subprocess
    import sys
    import time

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        p = subprocess.Popen([sys.executable, "-c", "import sys; from qsched_pack.calibration.app.cli import main; "
                              "sys.exit(main(sys.argv[1:]))", "calibrate", "--model", str(tmp_path / "m"),
                              "--out", str(tmp_path / "o"), "--device", "cpu"], stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(sig)
        err = p.communicate(timeout=120)[1]
        if p.returncode == 2 and "model not found" in err:
            continue  # finished before the signal came
        assert p.returncode == code and "Traceback" not in err and "qsched calibrate: " in err, (sig, err)


# ------------------------------------------------------------------ minor items
def test_temp_file_of_a_killed_preset_write_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys
    import time

    from qsched_pack.qsched import Coefficients

    target = tmp_path / "preset.json"
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; from qsched_pack.qsched._io import atomic_write; "
                          "atomic_write(sys.argv[1], lambda tmp: (open(tmp, 'w').write('half'), print('writing', "
                          "flush=True), time.sleep(60)))", str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.kill()
        p.wait()
    time.sleep(0.1)
    left = [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    assert left, "the killed writer left no temporary file (nothing to test)"
    Coefficients.identity(2).save(target)
    assert sorted(os.listdir(tmp_path)) == ["preset.json"]


def test_adaptive_search_without_a_budget_is_bounded():
    from qsched_pack.calibration.search import check_budget

    for space, strategy in ((SearchSpace("per_step", 50), "pattern"), (SearchSpace("per_step", 8), "zoom"),
                            (SearchSpace("per_step", 8), "pattern")):
        with pytest.raises(ValueError, match="set a budget"):
            check_budget(space, strategy, 5, 3, None)
        check_budget(space, strategy, 5, 3, 10 ** 6)  # with a budget it runs (and stops at the budget)
    check_budget(SearchSpace("start", 4), "pattern", 50, 20, None)  # the default search needs none
    check_budget(SearchSpace("start_end", 4), "zoom", 11, 20, None)


def test_calibrate_batch_tooltip_says_batch_is_part_of_the_record():
    from qsched_pack.nodes.calibration import QSchedCalibrate

    tip = QSchedCalibrate.INPUT_TYPES()["required"]["batch"][1]["tooltip"]
    assert "may use another batch" not in tip and "new record" in tip


# ------------------------------------------------------------------ fuzzers: only the pack's own errors come out
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers(-10 ** 6, 10 ** 6) | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=12)


@FUZZ
@given(line=st.integers(1, 30), field=st.sampled_from(["point", "c_x", "c_eps", "score", "jaq", "components",
                                                        "images", "seconds", "extra"]),
       value=json_values, signed=st.booleans())
def test_fuzz_record_lines_are_recomputed_never_trusted(tmp_path_factory, records, line, field, value, signed):
    """Any value in any field of any point line, signed like the writer signs (so only the value checks stand) or
    not: the run ends with the clean preset's images count, and only RecordWarning is raised."""
    from qsched_pack.calibration.record import point_line, record_key

    d = tmp_path_factory.mktemp("fuzzrec")
    lines = _lines(records["ridge"]["record"])
    n = 1 + line % (len(lines) - 1)
    entry = json.loads(lines[n])
    entry.pop("digest")
    entry[field] = value
    lines[n] = (point_line(entry, record_key(json.loads(lines[0]))) if signed
                else json.dumps(entry) + "\n").encode()
    (d / "rec.jsonl").write_bytes(b"".join(lines))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        r = run(d, resume=True)
    assert r.images_spent == len(r.points) * len(PROMPTS)
    meta = json.loads((d / "preset.json").read_text())["metadata"]
    assert meta["images_spent"] == r.images_spent


@pytest.fixture(scope="module")
def prequant_parts(tmp_path_factory):
    return _prequant_file(tmp_path_factory.mktemp("prequant"))


near_valid_entry = st.fixed_dictionaries({}, optional={
    "format": st.sampled_from(["w4a8", "w8a8", "w8a8-fp8", "w4a8-fp8", "nf4", "", "w99a1"]) | json_values,
    "group_size": st.sampled_from([None, 32, 64, 0, -64, 63]) | json_values,
    "shape": st.sampled_from([[192, 64], [64, 192], [192], [0, 64]]) | json_values,
    "dtype": st.sampled_from(["bfloat16", "float16", "float32", "int8"]) | json_values})


@FUZZ
@given(layers=st.one_of(json_values, st.dictionaries(st.sampled_from(["blocks.0.qkv", "blocks.0.mlp", "x", ""]),
                                                     near_valid_entry | json_values, max_size=3)),
       skip=st.one_of(st.just("[]"), json_values.map(json.dumps), st.text(max_size=8)))
def test_fuzz_prequantized_headers_raise_only_value_error(tmp_path_factory, prequant_parts, layers, skip):
    meta, tensors = prequant_parts
    meta = dict(meta, **{"qsched.layers": json.dumps(layers), "qsched.skip": skip})
    path = _write(tmp_path_factory.mktemp("fuzzhdr") / "f.safetensors", meta, tensors)
    try:
        sd = _load_prequant(path)
    except ValueError as exc:
        assert "f.safetensors" in str(exc) and len(str(exc)) < 1000
        return
    from qsched_pack.qsched.quant import prequant

    for layer, info in json.loads(meta["qsched.layers"]).items():  # what loads is exactly what the rule demands
        want = prequant.expected_tensors(info["format"], info.get("group_size"), *info["shape"])
        assert all(sd[f"{layer}.{k}"].dtype == dt and tuple(sd[f"{layer}.{k}"].shape) == sh
                   for k, (dt, sh) in want.items() if f"{layer}.{k}" in sd)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn]


@FUZZ
@given(key=st.sampled_from(["blocks.0.qkv.qweight", "blocks.0.qkv.weight_scale", "blocks.0.qkv.bias",
                            "blocks.0.mlp.qweight", "blocks.0.mlp.weight_scale"]),
       dtype=st.sampled_from(DTYPES), cut=st.sampled_from([0, 1, -1]))
def test_fuzz_prequantized_tensor_dtypes_and_shapes(tmp_path_factory, prequant_parts, key, dtype, cut):
    meta, tensors = prequant_parts
    t = tensors[key]
    new = torch.zeros(t.shape, dtype=torch.float32).to(dtype)
    if cut:
        new = torch.zeros((t.shape[0] + cut, *t.shape[1:]), dtype=torch.float32).to(dtype)
    path = _write(tmp_path_factory.mktemp("fuzzdt") / "f.safetensors", meta, {**tensors, key: new})
    same = (dtype == t.dtype or key.endswith(".bias") and dtype.is_floating_point) and cut == 0  # bias: cast
    if same:
        _load_prequant(path)
        return
    with pytest.raises(ValueError, match=rf"f\.safetensors.*{key.replace('.', chr(92) + '.')}"):
        _load_prequant(path)


names = st.text(st.sampled_from(list("ab_-.") + ["/", "\\", "\0", " ", "é", ":", "~", "*"]), max_size=12) | \
    st.sampled_from(["a" * 256, "d/" * 520, "C:x", "\\\\srv\\x", "/etc/x", "~/x"])


@FUZZ
@given(name=names)
def test_fuzz_preset_and_weight_names(folder_paths, name):
    """Every name: NodeInputError naming the input, or a preset inside models/qsched/ that Load Preset lists and
    loads under the same name (Save and Load follow one rule)."""
    from qsched_pack.nodes import sampling, scoring
    from qsched_pack.nodes.common import NodeInputError, preset_names
    from qsched_pack.qsched import Coefficients

    d = _qsched_dir(folder_paths)
    try:
        path = sampling.QSchedSavePreset().save(Coefficients.identity(2), name, True)["result"][0]
    except NodeInputError as exc:
        assert exc.input_name == "name" and len(str(exc)) < 600
    else:
        assert os.path.commonpath([os.path.realpath(path), os.path.realpath(d)]) == os.path.realpath(d)
        rel = os.path.relpath(path, d).replace(os.sep, "/")
        assert rel in preset_names()
        assert sampling.QSchedLoadPreset().load(rel)["result"][1] == 2
    for input_name in ("tc_weights", "iq_weights"):
        try:
            scoring.QSchedJAQLoader.VALIDATE_INPUTS(preset="clip", **{input_name: name})
        except NodeInputError as exc:
            assert exc.input_name == input_name and len(str(exc)) < 800
    try:
        sampling.QSchedLoadPreset.VALIDATE_INPUTS(preset=name)
    except NodeInputError as exc:
        assert exc.input_name == "preset"


@settings(max_examples=20, deadline=None, derandomize=True,  # bounded: seconds on an idle 2-core CI machine
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from(["model_index", "device", "prompts", "image", "preset"]), data=st.binary(max_size=200),
       value=json_values, text=st.text(max_size=12))
def test_fuzz_cli_gives_only_clean_errors(tmp_path_factory, capsys, case, data, value, text):
    """Random model_index.json objects, --device strings, prompt files, images and presets through ``qsched``:
    exit 2 with one 'qsched <command>: ...' line (or argparse's usage error), never a traceback or another
    exception."""
    from qsched_pack.calibration.app.cli import main

    d = tmp_path_factory.mktemp("fuzzcli")
    model = d / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps(value))
    (d / "p.yaml").write_bytes(data)
    (d / "a.png").write_bytes(data)
    (d / "p.json").write_bytes(data)
    args = {"model_index": ["calibrate", "--model", str(model), "--out", str(d / "o"), "--device", "cpu"],
            "device": ["quantize", str(d / "a.safetensors"), str(d / "b.safetensors"), "--device", text or "x"],
            "prompts": ["calibrate", "--model", str(model), "--prompts", str(d / "p.yaml"), "--out", str(d / "o")],
            "image": ["score", str(d / "a.png"), "--prompt", "x", "--jaq-weights", str(d)],
            "preset": ["sample", "--model", str(model), "--preset", str(d / "p.json"), "--prompt", "x"]}[case]
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse: a usage line, exit 2
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, (case, err[-500:])


def test_cli_calibrate_refuses_to_replace_a_file_that_is_not_a_preset_before_running(tmp_path, capsys):
    from qsched_pack.calibration.app.cli import main

    out = tmp_path / "o"
    out.mkdir()
    (out / "preset.json").write_text('{"model_type": "clip"}')
    assert main(["calibrate", "--model", str(tmp_path / "none"), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "preset.json exists and is not a Q-Sched preset" in err, err
    assert (out / "preset.json").read_text() == '{"model_type": "clip"}'
