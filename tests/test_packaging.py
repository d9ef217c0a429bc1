"""pyproject lists every sub-package (package-dir maps the repo root to qsched_pack, so nothing is found
automatically) and ships the data files the pack reads at run time."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {"tests", "benchmarks", "docs", "scripts", "workflows", "web", ".venv", ".git", "build", "dist"}


def test_every_subpackage_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)
    listed = set(cfg["tool"]["setuptools"]["packages"])
    found = {"qsched_pack"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                       and not d.endswith(".egg-info") and (rel != "." or d not in SKIP)]
        if rel != "." and "__init__.py" in filenames:
            found.add("qsched_pack." + rel.replace(os.sep, "."))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    assert cfg["project"]["scripts"]["qsched"] == "qsched_pack.calibration.app.cli:main"
    comfy = cfg["tool"]["comfy"]  # Comfy Registry metadata
    assert {"PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui"} <= set(comfy)
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith((".png", ".jpg", ".svg"))
    assert comfy["requires-comfyui"] == ">=0.3.64"  # the oldest core verified by execution
    assert cfg["project"]["urls"]["Repository"].startswith("https://github.com/")


def test_requirements_hold_what_every_node_needs_and_optional_packages_say_what_to_install(monkeypatch):
    """requirements.txt (what ComfyUI users install) holds no optional package; a feature that needs one raises one
    error naming the feature, the package and the pip command."""
    import re
    import sys

    import pytest
    import torch

    from qsched_pack.qsched._compat import MissingDependency

    with open(os.path.join(ROOT, "requirements.txt")) as f:
        required = {re.split(r"[<>=\[ ]", ln.strip())[0] for ln in f if ln.strip() and not ln.startswith("#")}
    assert required and not required & {"open_clip_torch", "matplotlib", "bitsandbytes", "diffusers", "pyiqa"}

    from qsched_pack.calibration.jaq import JAQ
    from qsched_pack.qsched.quant import QuantSpec
    from qsched_pack.qsched.quant.layers import BnbLinear

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(MissingDependency, match=r"JAQ scoring .* needs the optional package 'open_clip_torch>=2.24'.*"
                                                r"pip install \"open_clip_torch>=2.24\""):
        JAQ(preset="clip", weights={"clipscore": "ViT-L-14.pt", "clipiqa": "RN50.pt"})
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependency, match=r"format 'w4a16-nf4'.*'bitsandbytes>=0.45'"):
        BnbLinear.from_linear(torch.nn.Linear(64, 64), QuantSpec.parse("nf4"), 64)
