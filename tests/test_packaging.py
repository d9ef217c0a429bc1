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
    assert {"PublisherId", "DisplayName", "Icon"} <= set(cfg["tool"]["comfy"])
