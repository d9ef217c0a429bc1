"""Offline resolution of scorer weight files.

Search order for a weight file (first hit wins):
1. an explicit path given by the caller (file or folder);
2. the folders the caller passes (CLI ``--jaq-weights``; the ComfyUI nodes pass ``models/qsched/`` and every
   extra path registered for the ``qsched`` folder key in ``extra_model_paths.yaml``);
3. the folder(s) in the environment variable ``QSCHED_MODELS_DIR`` (``os.pathsep``-separated).
In each folder the ``.safetensors`` twin of a ``.pt`` name is tried first.

A name looked up in a folder must stay inside it once symlinks are resolved (:func:`confined`).

Nothing is ever downloaded. A missing file raises :class:`WeightFileError` naming the file, every folder
searched and where users get it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ...qsched._io import UnsafePath, confined  # noqa: F401  (the one name rule; re-exported for callers)

ENV_VAR = "QSCHED_MODELS_DIR"
COMFY_FOLDER = "qsched"


class WeightFileError(FileNotFoundError):
    """A scorer weight file is missing, unreadable or does not fit the expected architecture."""


@dataclass(frozen=True)
class WeightSpec:
    key: str
    filenames: tuple[str, ...]  # accepted names, preferred first (a folder name for transformers models)
    what: str
    source: str  # where users download it (shown in errors and docs)


SPECS: dict[str, WeightSpec] = {
    "clipscore": WeightSpec(
        "clipscore",
        ("ViT-L-14.pt", "clip-vit-large-patch14"),
        "CLIP ViT-L/14 (OpenAI) for CLIPScore: the OpenAI file or a transformers CLIP folder",
        "ViT-L-14.pt from the OpenAI CLIP release (its download links are listed in github.com/openai/CLIP), or the "
        "folder of huggingface.co/openai/clip-vit-large-patch14 (config.json, model.safetensors, tokenizer "
        "and preprocessor files)",
    ),
    "clipiqa": WeightSpec(
        "clipiqa",
        ("RN50.pt",),
        "CLIP RN50 (OpenAI) for CLIP-IQA",
        "RN50.pt from the OpenAI CLIP release (its download links are listed in github.com/openai/CLIP); the same file "
        "piq/torchmetrics cache in ~/.cache/clip/RN50.pt",
    ),
    "hpsv2": WeightSpec(
        "hpsv2",
        ("HPS_v2.1_compressed.pt",),
        "HPSv2.1 checkpoint (a full open_clip ViT-H-14 state dict)",
        "HPS_v2.1_compressed.pt from huggingface.co/xswu/HPSv2 (files tab)",
    ),
    "aqmap": WeightSpec(
        "aqmap",
        ("ViT-B-16.pt",),
        "CLIP ViT-B/16 (OpenAI) for AQ-MAP (CLIP Surgery is applied at run time)",
        "ViT-B-16.pt from the OpenAI CLIP release (its download links are listed in github.com/openai/CLIP)",
    ),
}


def register_comfy_folder(folder_paths) -> None:
    """Add ``ComfyUI/models/qsched`` to the ``qsched`` key of ComfyUI's ``folder_paths`` (passed in by the nodes).
    Idempotent; folders from extra_model_paths.yaml stay first, the default one is appended if it is missing."""
    folder_paths.add_model_folder_path(COMFY_FOLDER, os.path.join(folder_paths.models_dir, COMFY_FOLDER))


def env_folders() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]


def search_folders(folders: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """``folders`` given by the caller (CLI ``--jaq-weights``; the nodes pass ComfyUI's ``qsched`` folders), then
    the ``QSCHED_MODELS_DIR`` folders."""
    return [Path(f).expanduser() for f in (folders or ())] + env_folders()


def candidates(spec: WeightSpec) -> tuple[str, ...]:
    """Accepted names, a ``.safetensors`` twin of each ``.pt`` first (it is preferred when both exist)."""
    out: list[str] = []
    for n in spec.filenames:
        if n.endswith(".pt"):
            out.append(n[:-3] + ".safetensors")
        out.append(n)
    return tuple(out)


def resolve(key: str, path: str | os.PathLike | None = None,
            folders: Sequence[str | os.PathLike] | None = None) -> Path:
    """Return the local weight file (or transformers folder) for metric ``key``.

    ``path`` is an explicit path given by the user (CLI / Python API); it may lie anywhere. Without it the
    standard names are looked up in ``QSCHED_MODELS_DIR`` and ``folders``, each confined to its folder.
    """
    spec = SPECS[key]
    if path is not None:
        p = Path(path).expanduser()
        if p.exists():
            return p
        searched_in, names = [p.parent], (p.name,)
    else:
        searched_in, names = search_folders(folders), candidates(spec)
        for folder in searched_in:
            for name in names:
                try:
                    p = confined(folder, name)
                except UnsafePath:
                    continue  # a standard name symlinked out of its folder is skipped, like a missing one
                if p.exists():
                    return p
    searched = ", ".join(str(f) for f in searched_in) or (
        f"none (pass an explicit path, set {ENV_VAR}, or put the file in ComfyUI's models/{COMFY_FOLDER}/)"
    )
    raise WeightFileError(
        f"{spec.what}: weight file {' or '.join(repr(n) for n in names)} not found. "
        f"Searched: {searched}. Get it from: {spec.source}. Nothing is downloaded at run time."
    )


_DIGESTS: dict[tuple, str] = {}


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of a weight file, or over (relative name, bytes) of every file of a folder; cached by (path, size,
    mtime). Recorded with calibration results, so a resume with another file of the same name is refused."""
    from ...qsched._io import update_from_file

    path = os.fspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    key = tuple((f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update(os.path.relpath(f, path).replace(os.sep, "/").encode() + b"\0")
            update_from_file(h, f)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]
