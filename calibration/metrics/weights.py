"""Offline resolution of scorer weight files.

Search order for a weight file (first hit wins):
1. an explicit path given by the caller (file or folder);
2. the folder(s) in the environment variable ``QSCHED_MODELS_DIR`` (``os.pathsep``-separated);
3. inside ComfyUI: ``models/qsched/`` and every extra path registered for the ``qsched`` folder key
   (``extra_model_paths.yaml``).

Nothing is ever downloaded. A missing file raises :class:`WeightFileError` naming the file, every folder
searched and where users get it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

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
        "ViT-L-14.pt from the OpenAI CLIP release (github.com/openai/CLIP, clip/clip.py _MODELS), or the "
        "folder of huggingface.co/openai/clip-vit-large-patch14 (config.json, model.safetensors, tokenizer "
        "and preprocessor files)",
    ),
    "clipiqa": WeightSpec(
        "clipiqa",
        ("RN50.pt",),
        "CLIP RN50 (OpenAI) for CLIP-IQA",
        "RN50.pt from the OpenAI CLIP release (github.com/openai/CLIP, clip/clip.py _MODELS); the same file "
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
        "ViT-B-16.pt from the OpenAI CLIP release (github.com/openai/CLIP, clip/clip.py _MODELS)",
    ),
}


def comfy_folders() -> list[Path]:
    """Folders ComfyUI knows for the ``qsched`` key; empty outside ComfyUI.

    ``folder_paths`` is only consulted when ComfyUI already imported it: importing it ourselves outside
    ComfyUI could pick up an unrelated module of that name.
    """
    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is None:
        return []
    register_comfy_folder(folder_paths)
    return [Path(p) for p in folder_paths.get_folder_paths(COMFY_FOLDER)]


def register_comfy_folder(folder_paths) -> None:
    """Add ``ComfyUI/models/qsched`` to the ``qsched`` key. Idempotent; folders from extra_model_paths.yaml
    stay first, the default one is appended if it is missing (it is not, when the key already exists only
    because extra_model_paths.yaml defined it, so "adds more" really adds)."""
    folder_paths.add_model_folder_path(COMFY_FOLDER, os.path.join(folder_paths.models_dir, COMFY_FOLDER))


def search_folders() -> list[Path]:
    env = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return env + comfy_folders()


def resolve(key: str, path: str | os.PathLike | None = None) -> Path:
    """Return the local weight file (or transformers folder) for metric ``key``."""
    spec = SPECS[key]
    if path is not None:
        p = Path(path).expanduser()
        if p.exists():
            return p
        folders = [p.parent]
        names = (p.name,)
    else:
        folders = search_folders()
        names = spec.filenames
        for folder in folders:
            for name in names:
                if (folder / name).exists():
                    return folder / name
    searched = ", ".join(str(f) for f in folders) or (
        f"none (pass an explicit path, set {ENV_VAR}, or put the file in ComfyUI's models/{COMFY_FOLDER}/)"
    )
    raise WeightFileError(
        f"{spec.what}: weight file {' or '.join(repr(n) for n in names)} not found. "
        f"Searched: {searched}. Get it from: {spec.source}. Nothing is downloaded at run time."
    )
