"""The two halves of the in-process real-ComfyUI checks (tests/comfy_*_checks.py), in one place.

pytest side (tests/test_comfyui_*.py): ``require_comfyui()`` skips the module unless COMFYUI_PATH holds a ComfyUI
checkout (fails it under QSCHED_REQUIRE_COMFYUI=1); ``check_dirs()`` makes the shim folder (``qsched_pack`` -> this checkout) and the model folder;
``run_check()`` runs a checks script with COMFYUI_PYTHON inside the checkout and returns its ``RESULT`` line.

ComfyUI side (the checks scripts, run with ComfyUI's python, no pytest there): ``enter_comfyui()`` reads the script's
arguments (SHIM_DIR WORK_DIR ...), puts the checkout, the shim and tests/data on sys.path and lets ComfyUI parse
``--cpu``; ``report()`` runs the named check and prints its ``RESULT`` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)


def require_comfyui() -> None:
    """Skip the calling test module unless COMFYUI_PATH points at a ComfyUI checkout (and COMFYUI_PYTHON, when set,
    at an interpreter). With QSCHED_REQUIRE_COMFYUI=1 (CI) the module fails instead: the suite must run."""
    import pytest

    why = None
    if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "main.py").is_file():
        why = f"COMFYUI_PATH ({COMFYUI_PATH!r}) does not point at a ComfyUI checkout"
    elif not os.access(COMFYUI_PYTHON, os.X_OK):
        why = f"COMFYUI_PYTHON ({COMFYUI_PYTHON!r}) is not an executable: the python of ComfyUI's venv"
    if why and os.environ.get("QSCHED_REQUIRE_COMFYUI"):
        pytest.fail(f"{why}, and QSCHED_REQUIRE_COMFYUI is set: run scripts/setup_comfyui.sh (scripts/test.sh "
                    "does)", pytrace=False)
    if why:
        pytest.skip(why, allow_module_level=True)


def check_dirs(tmp_path_factory, models_env: str, name: str) -> tuple[Path, Path]:
    """(shim folder holding ``qsched_pack``, model folder): the model folder is ``$models_env`` when set (kept
    between runs, so tiny models are built once) else a fresh temporary one."""
    shim = tmp_path_factory.mktemp("shim")
    (shim / "qsched_pack").symlink_to(REPO, target_is_directory=True)
    work = Path(os.environ.get(models_env) or tmp_path_factory.mktemp(name))
    work.mkdir(parents=True, exist_ok=True)
    return shim, work


def run_check(script: str, dirs: tuple[Path, Path], *args: str, timeout: int = 1200) -> dict:
    """Run tests/``script`` SHIM WORK *args with ComfyUI's python in the checkout; its last ``RESULT`` JSON line."""
    shim, work = dirs
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run([COMFYUI_PYTHON, str(REPO / "tests" / script), str(shim), str(work), *args],
                       cwd=COMFYUI_PATH, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, (p.stdout[-3000:], p.stderr[-6000:])
    return json.loads(lines[-1][len("RESULT "):])


def enter_comfyui() -> list[str]:
    """In a checks script run as ``cd $COMFYUI_PATH && $COMFYUI_PYTHON tests/SCRIPT SHIM_DIR WORK_DIR ...``: its
    arguments; afterwards ``comfy.*``, ``folder_paths``, ``qsched_pack.*`` and the tiny-model builders import, and
    ComfyUI's own arguments read ``--cpu``."""
    args = sys.argv[1:]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, args[0])
    sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
    import comfy.options

    comfy.options.enable_args_parsing()
    return args


def report(checks: dict, check: str) -> None:
    """Run ``check_<check>`` from a checks script's globals and print its result as the ``RESULT`` line."""
    result = checks[f"check_{check}"]()
    print("RESULT " + json.dumps(result, default=str), flush=True)
