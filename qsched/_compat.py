"""Environment fixes that user-facing entry points (CLI, tests) apply before importing torchvision users, and
``require``: the one way an optional package is imported where a feature needs it.

On CPU-only machines the only torchvision wheel that matches torch 2.13 is a CUDA build whose import
fails (``operator torchvision::nms does not exist``). Declaring the two operator schemas it registers
fake kernels for lets the pure-Python parts (transforms, models) import; its C++ ops stay unavailable.
Nothing changes on a machine where torchvision imports normally.
"""

from __future__ import annotations

import importlib
import sys

_TV_LIB = None  # keeps the torch.library registration alive for the life of the process


def ensure_torchvision_importable() -> str:
    """Return "native", "absent" or "shimmed"."""
    global _TV_LIB
    try:
        importlib.import_module("torchvision")
        return "native"
    except ModuleNotFoundError:
        return "absent"
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _TV_LIB is None:
        _TV_LIB = torch.library.Library("torchvision", "DEF")
        _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    importlib.import_module("torchvision")
    return "shimmed"


class MissingDependency(ImportError):
    """An optional package that the called feature needs is not installed; the message says what to install."""


def require(module: str, package: str, feature: str):
    """``import module``, or one error naming the feature, the package and the pip command (the ComfyUI pack's
    requirements.txt holds only what every node needs; the rest is optional: pyproject's extras)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(f"{feature} needs the optional package {package!r}, which is not installed ({exc}). "
                                f"Install it with pip install \"{package}\" (for ComfyUI: into ComfyUI's own Python) "
                                "and restart.") from None
