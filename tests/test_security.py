"""Nothing the pack reads from a file runs code, and nothing a graph names leads out of the model folder.

The attack files are real: a TorchScript archive whose ``__setstate__`` creates a file when ``torch.jit.load`` runs
it (checked first, so the test can fail), and pickles that would call ``os`` functions if unpickled freely.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Tuple

import pytest
import torch
from jaq_fixtures import planted_images, save_openai_torchscript

from qsched_pack.calibration.metrics import WeightFileError
from qsched_pack.calibration.metrics.safe_load import UnsafeWeightFile, read_torchscript_tensors, read_weights
from qsched_pack.calibration.metrics.weights import UnsafePath, confined, resolve
from qsched_pack.nodes.common import NodeInputError


class _FileWriter(torch.nn.Module):
    """Its TorchScript ``__setstate__`` creates ``target`` (8 floats) through ``torch.from_file(shared=True)``."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.target, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.weight = state[1] + torch.from_file(self.target, True, 8).sum() * 0  # used, so not optimised away
        self.training = state[2]


def _malicious_archive(path: Path, target: Path) -> Path:
    torch.jit.script(_FileWriter(str(target))).save(str(path))
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    d = tmp_path_factory.mktemp("attack")
    control_target = d / "control-created"
    control = _malicious_archive(d / "control.pt", control_target)
    torch.jit.load(str(control))  # the attack works when the archive is run: the test below can fail
    assert control_target.exists()
    save_openai_torchscript(d / "good-RN50.pt", "rn", seed=1)
    save_openai_torchscript(d / "good-ViT-L-14.pt", "vit", seed=3)
    return d


def test_restricted_reader_gives_the_state_dict_torchscript_would(archives):
    path = archives / "good-RN50.pt"
    got = read_torchscript_tensors(path)
    want = torch.jit.load(str(path)).state_dict()  # our own benign file: an independent reference
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _place(folder_paths, src: Path, name: str) -> Path:
    from qsched_pack.nodes.common import register_qsched_folder

    register_qsched_folder()
    d = Path(folder_paths.get_folder_paths("qsched")[0])
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, d / name)
    return d


def test_file_writing_archive_never_runs_through_the_node(folder_paths, archives, tmp_path):
    from qsched_pack.nodes import scoring

    target = tmp_path / "pwned"
    evil = _malicious_archive(tmp_path / "evil.pt", target)
    d = _place(folder_paths, archives / "good-ViT-L-14.pt", "ViT-L-14.pt")
    shutil.copy(evil, d / "RN50.pt")
    with pytest.raises(NodeInputError, match="input 'iq_weights'.*RN50.pt.*no state dict") as exc:
        scoring.QSchedJAQLoader().load("clip", 2.0, "auto", "RN50.pt", "cpu", "auto")
    assert exc.value.input_name == "iq_weights"
    with pytest.raises(NodeInputError, match="input 'iq_weights'"):
        scoring.load_jaq("clip", 2.0, "auto", "auto", device="cpu")
    assert not target.exists()


def test_file_writing_archive_never_runs_through_the_cli(archives, tmp_path, capsys):
    from qsched_pack.calibration.app.cli import main
    from PIL import Image

    target = tmp_path / "pwned"
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(archives / "good-ViT-L-14.pt", weights / "ViT-L-14.pt")
    _malicious_archive(weights / "RN50.pt", target)
    img = tmp_path / "a.png"
    Image.fromarray((planted_images(1)[0].numpy() * 255).astype("uint8")).save(img)
    assert main(["score", str(img), "--prompt", "a cat", "--jaq-weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "RN50.pt" in err and "no state dict" in err and "Traceback" not in err
    assert not target.exists()


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_code_in_a_torchscript_data_pkl_is_refused(archives, tmp_path):
    """A hand-edited archive whose data.pkl calls os.makedirs: refused by name, nothing created."""
    target = tmp_path / "made-by-pickle"
    src = archives / "good-RN50.pt"
    out = tmp_path / "RN50.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"x": _Reduce(os.makedirs, str(target))}, protocol=2)
            zout.writestr(item, data)
    with pytest.raises(UnsafeWeightFile, match="refers to 'posix.makedirs|refers to 'os.makedirs"):
        read_weights(out, "CLIP RN50")
    assert not target.exists()


def test_code_in_a_plain_pickle_is_refused(tmp_path):
    target = tmp_path / "made-by-pickle"
    f = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Reduce(os.makedirs, str(target))}, f)
    with pytest.raises(UnsafeWeightFile, match="not a plain weight file.*nothing from it was run"):
        read_weights(f, "HPSv2")
    assert not target.exists()
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as fh:
        torch.save({"x": _Reduce(os.makedirs, str(target))}, fh, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeWeightFile):
        read_weights(legacy, "HPSv2")
    assert not target.exists()


def test_plain_and_safetensors_files_load_and_safetensors_is_preferred(archives, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from qsched_pack.calibration.metrics.clipiqa import CLIPIQA

    sd = read_torchscript_tensors(archives / "good-RN50.pt")
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(archives / "good-RN50.pt", d / "RN50.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "RN50.safetensors"))
    torch.save(sd, tmp_path / "plain.pt")
    monkeypatch.delenv("QSCHED_MODELS_DIR", raising=False)
    assert resolve("clipiqa", folders=[d]).name == "RN50.safetensors"
    imgs = planted_images(2, 64, 64, seed=3)
    a = CLIPIQA(d / "RN50.pt", device="cpu")(imgs)
    b = CLIPIQA(resolve("clipiqa", folders=[d]), device="cpu")(imgs)
    c = CLIPIQA(tmp_path / "plain.pt", device="cpu")(imgs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_damaged_archives_name_the_file(archives, tmp_path):
    src = (archives / "good-RN50.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(src[: len(src) // 2])
    with pytest.raises(WeightFileError, match="cut.pt"):
        read_weights(cut, "CLIP RN50")
    # a storage entry shorter than its tensors need
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(archives / "good-RN50.pt") as zin, zipfile.ZipFile(short, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, data[:4] if "/data/" in item.filename and len(data) > 64 else data)
    with pytest.raises(WeightFileError, match="short.pt"):
        read_weights(short, "CLIP RN50")


@pytest.mark.parametrize("name", ["../x.pt", "../../input/RN50.pt", "/etc/passwd", "sub/../../x.pt", "..",
                                  "C:\\Windows\\x.pt", "\\\\server\\share\\x.pt", "a\0b.pt"])
def test_confined_refuses_names_out_of_the_folder(tmp_path, name):
    with pytest.raises(UnsafePath):
        confined(tmp_path, name)


def test_node_refuses_names_and_symlinks_out_of_the_folder_before_running(folder_paths, archives, tmp_path):
    from qsched_pack.nodes import scoring

    d = _place(folder_paths, archives / "good-RN50.pt", "RN50.pt")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(archives / "good-ViT-L-14.pt", outside / "ViT-L-14.pt")
    os.symlink(outside / "ViT-L-14.pt", d / "linked.pt")
    os.symlink(outside, d / "linked_dir")
    (d / "sub").mkdir()
    shutil.copy(archives / "good-ViT-L-14.pt", d / "sub" / "ViT-L-14.pt")
    os.symlink(d / "sub" / "ViT-L-14.pt", d / "inside_link.pt")  # a symlink that stays inside is fine
    v = scoring.QSchedJAQLoader.VALIDATE_INPUTS
    for bad in (str(outside / "ViT-L-14.pt"), "../outside/ViT-L-14.pt", "linked.pt", "linked_dir/ViT-L-14.pt",
                "sub/../../outside/ViT-L-14.pt"):
        with pytest.raises(NodeInputError) as exc:  # refused on queue: VALIDATE_INPUTS raises (one message)
            v(preset="clip", tc_weights=bad, iq_weights="auto")
        msg = str(exc.value)
        assert msg.startswith("Q-Sched JAQ Loader: input 'tc_weights'"), (bad, msg)
        assert "inside" in msg or "leads out" in msg, msg
        with pytest.raises(NodeInputError, match="input 'tc_weights'"):
            scoring.load_jaq("clip", 2.0, bad, "auto", device="cpu")
    assert v(preset="clip", tc_weights="sub/ViT-L-14.pt", iq_weights="auto") is True
    assert v(preset="clip", tc_weights="inside_link.pt", iq_weights="RN50.pt") is True
    os.symlink(d, d / "sub" / "loop")  # a symlink loop inside the folder is listed once, not followed forever
    choices = scoring.weight_choices()
    assert "linked.pt" not in choices and not any(c.startswith("linked_dir") for c in choices)
    assert {"RN50.pt", "sub/ViT-L-14.pt", "inside_link.pt"} <= set(choices)


def test_standard_name_symlinked_out_of_a_search_folder_is_skipped(archives, tmp_path, monkeypatch):
    d, outside = tmp_path / "models", tmp_path / "elsewhere"
    d.mkdir()
    outside.mkdir()
    shutil.copy(archives / "good-RN50.pt", outside / "RN50.pt")
    os.symlink(outside / "RN50.pt", d / "RN50.pt")
    monkeypatch.delenv("QSCHED_MODELS_DIR", raising=False)
    with pytest.raises(WeightFileError, match="not found"):
        resolve("clipiqa", folders=[d])
    assert resolve("clipiqa", folders=[outside]) == Path(os.path.realpath(outside / "RN50.pt"))


def product_sources():
    """(relative path, text) of every product .py file (not tests, benchmarks or hidden folders)."""
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if not (rel.startswith(("tests/", ".venv/", "benchmarks/")) or "/." in "/" + rel):
            yield rel, f.read_text(encoding="utf-8")


def test_no_unrestricted_loader_in_product_code():
    """Every torch.load passes weights_only=True; torch.jit.load is never called on a file."""
    import re

    offenders = []
    for rel, text in product_sources():
        if re.search(r"torch\.jit\.load\(", text):
            offenders.append(f"{rel}: torch.jit.load")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.end():m.end() + 200].split("\n\n")[0]
            if "weights_only=True" not in call:
                offenders.append(f"{rel}: {text[m.start():m.start() + 80]}")
    assert not offenders, offenders


def test_requirements_demand_a_safe_torch():
    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    assert '"torch>=2.6"' in text
    assert "torch>=2.6" in (root / "requirements.txt").read_text()


def test_pickle_module_globals_of_a_good_archive_are_only_tensor_rebuilders(archives):
    """The allow-list is not wider than what real archives need (documents what a weight file may name)."""
    seen = set()
    with zipfile.ZipFile(archives / "good-RN50.pt") as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        import pickletools

        for op, arg, _ in pickletools.genops(io.BytesIO(z.read(name))):
            if op.name == "GLOBAL":
                seen.add(arg.split(" ")[0].split(".")[0])
    assert seen <= {"__torch__", "torch", "collections"}
