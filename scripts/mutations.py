#!/usr/bin/env python3
"""Mutation check: each promise below is broken on purpose in a scratch copy of the repository, and the tests that
guard it must then fail. A mutation the tests survive means those tests cannot see the bug they exist for.

    .venv/bin/python scripts/mutations.py            # every mutation; exit 1 if one survives
    .venv/bin/python scripts/mutations.py --list     # names only
    .venv/bin/python scripts/mutations.py -k record  # those whose name contains 'record'
    .venv/bin/python scripts/mutations.py --baseline # also check the unmutated copy passes the same tests

The tracked files are copied to a temporary folder (the checkout is never modified), the mutation is applied there
as an exact text replacement (the text must occur exactly once, so a refactor that moves it is reported instead of
silently skipped), and pytest runs the named tests against the copy (imported as ``qsched_pack`` through a
per-copy alias on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "identity coefficients take the arithmetic path (c = 1 no longer bit-exact with the stock sampler)",
        "qsched/samplers.py",
        "    if c_x == 1.0 and c_eps == 1.0:\n        return x, denoised\n",
        "",
        ("tests/test_samplers.py::test_identity_coefficients_are_bit_exact_with_the_stock_sampler",)),
    Mutation(
        "record keeps a half-written last line (no truncation after a kill inside a write)",
        "calibration/record.py",
        "                f.truncate(complete)\n",
        "                pass\n",
        ("tests/test_runner.py::test_half_written_last_line_is_dropped_and_recomputed",)),
    Mutation(
        "shape-world training ignores its init seed",
        "calibration/shapeworld/train.py",
        '    torch.manual_seed(cfg["seed"] + SEED_INDEX[part])\n',
        '    torch.manual_seed(SEED_INDEX[part])\n',
        ("tests/test_shape_world.py::test_training_is_seeded_by_its_config",)),
    Mutation(
        "benchmark parts: a pack config measured before its family's core baseline",
        "benchmarks/comfyui_parts.py",
        'PART_A = ("flux/bf16/compiled+graph", "flux/w8a8-fp8/compiled+graph",',
        'PART_A = ("flux/w8a8-fp8/compiled+graph", "flux/bf16/compiled+graph",',
        ("tests/test_bench_comfyui_report.py",)),
    Mutation(
        "benchmark report: compiled ratio taken against the eager baseline",
        "benchmarks/report_comfyui.py",
        "                comp_cell = _cell(comp, _ratio(comp, bc), dc)\n",
        "                comp_cell = _cell(comp, _ratio(comp, be), dc)\n",
        ("tests/test_bench_comfyui_report.py",)),
    Mutation(
        "SDXL-Turbo template: the positive conditioning comes from the negative prompt's encoder",
        "workflows/qsched_sdxl_turbo_w4a8.json",
        '[\n   4,\n   2,\n   0,\n   6,\n   1,\n   "CONDITIONING"\n  ]',
        '[\n   4,\n   3,\n   0,\n   6,\n   1,\n   "CONDITIONING"\n  ]',
        ("tests/test_workflows.py::test_positive_and_negative_prompts_are_not_swapped",)),
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file() or src.is_symlink():
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    alias = dest / ".pp"
    alias.mkdir()
    (alias / "qsched_pack").symlink_to(dest)


def apply(dest: Path, m: Mutation) -> None:
    path = dest / m.file
    if not path.is_file():
        raise SystemExit(f"mutation {m.name!r}: {m.file} does not exist (moved?): update scripts/mutations.py")
    text = path.read_text(encoding="utf-8")
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutation {m.name!r}: the text to replace occurs {n} times in {m.file} (must be once): "
                         "update scripts/mutations.py to the current code")
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")


def run_tests(dest: Path, tests, timeout: float) -> int:
    env = dict(os.environ, PYTHONPATH=str(dest / ".pp"), PYTHONDONTWRITEBYTECODE="1")
    for name in ("COMFYUI_PATH", "QSCHED_REQUIRE_COMFYUI"):  # the guarded tests are the CPU ones
        env.pop(name, None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    try:
        return subprocess.run(cmd, cwd=dest, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return -1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--baseline", action="store_true", help="first check the unmutated copy passes each test set")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.file} -> {' '.join(m.tests)}]")
        return 0
    survived = []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="qsched-mutant-") as tmp:
            dest = Path(tmp)
            copy_repo(dest)
            if args.baseline:
                rc = run_tests(dest, m.tests, args.timeout)
                if rc != 0:
                    print(f"BASELINE FAILS (rc {rc}): {' '.join(m.tests)}")
                    survived.append(m)
                    continue
            apply(dest, m)
            t0 = time.monotonic()
            rc = run_tests(dest, m.tests, args.timeout)
            verdict = {1: "killed"}.get(rc, "SURVIVED" if rc == 0 else f"ERROR (pytest rc {rc})")
            print(f"{verdict:9s} {time.monotonic() - t0:6.1f} s  {m.name}")
            if rc != 1:
                survived.append(m)
    if survived:
        print(f"{len(survived)} of {len(chosen)} mutations not killed", file=sys.stderr)
        return 1
    print(f"all {len(chosen)} mutations killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
