"""Cost of reading OpenAI-format CLIP files without running them (calibration/metrics/safe_load.py) against
``torch.jit.load(...).state_dict()`` (what open_clip does, and which runs the archive's code), on full-size
architectures with random weights saved as TorchScript archives like OpenAI's. Interleaved repeats, CPU.

    .venv/bin/python benchmarks/bench_safe_load.py [--models RN50 ViT-B-16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def save_openai_archive(name: str, path: Path) -> int:
    """A full-size open_clip ``name`` (QuickGELU, OpenAI's layout) traced and saved as TorchScript; -> parameters."""
    import open_clip

    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True).eval()
    model.attn_mask = model._buffers.pop("attn_mask")  # OpenAI files keep the mask out of the state dict
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.rand(1, 3, size, size), open_clip.tokenize(["a photo"])),
                                 check_trace=False)
        traced.save(str(path))
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    from qsched_pack.calibration.metrics.safe_load import read_weights
    from qsched_pack.qsched._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["RN50", "ViT-B-16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "safe_load_cpu.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = Path(tmp) / f"{name}.pt"
            params = save_openai_archive(name, path)
            times = {"restricted reader": [], "torch.jit.load + state_dict": []}
            for _ in range(args.repeats):  # interleaved: the machine is shared
                t0 = time.perf_counter()
                ours = read_weights(path)
                times["restricted reader"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                # the baseline being replaced; only ever on the archive this script wrote a moment ago
                theirs = torch.jit.load(str(path), map_location="cpu").state_dict()
                times["torch.jit.load + state_dict"].append(time.perf_counter() - t0)
            equal = sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
            rows.append({"model": name, "parameters": params, "file_mb": round(path.stat().st_size / 2**20, 1),
                         "equal_state_dicts": equal,
                         **{k: round(min(v), 3) for k, v in times.items()}})
            print(rows[-1], flush=True)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
              "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["equal_state_dicts"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
