"""The tiny world's weights file: one safetensors file (``tiny_world.safetensors``) with prefixed tensors
(``generator.``, ``text_encoder.``, ``tc.``, ``iq.``, ``ref.``) and the training config as JSON metadata
(``{"format": "qsched-tiny-world", "version": "1", "config": "<json>"}``). Where it is looked for: the pack
(``calibration/tinyworld/weights/``), then the cache (``$QSCHED_TINY_DIR`` or ``~/.cache/qsched/tiny``).

This module is the only place that knows the layout; it reads and writes tensors, never networks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...qsched._io import atomic_write, file_sha256

FORMAT = "qsched-tiny-world"
VERSION = "1"
WEIGHTS_NAME = "tiny_world.safetensors"
PACKAGED = Path(__file__).resolve().parent / "weights" / WEIGHTS_NAME
ENV_DIR = "QSCHED_TINY_DIR"
PARTS = ("generator", "text_encoder", "tc", "iq", "ref")


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "qsched" / "tiny")


def cached_path() -> Path:
    return cache_dir() / WEIGHTS_NAME


def find() -> Path | None:
    """The packaged weights, else the cached ones, else None."""
    for candidate in (PACKAGED, cached_path()):
        if candidate.is_file():
            return candidate
    return None


def save(state_dicts: dict, config: dict, path: str | os.PathLike) -> str:
    """Write ``{part: state_dict}`` for every part of ``PARTS`` and the training config, atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for part in PARTS:
        for k, v in state_dicts[part].items():
            tensors[f"{part}.{k}"] = v.detach().contiguous().clone()
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(config, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read(path: str | os.PathLike) -> tuple[dict, dict, str]:
    """``({part: state_dict}, config, sha256 of the file)``; refuses a file of another format."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a tiny-world weights file (metadata format={meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    parts = {part: {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")} for part in PARTS}
    return parts, config, file_sha256(path)
