import os
import sys
import types
from pathlib import Path

# Tests never touch the network: the hub must fail fast if anything tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from qsched_pack.qsched._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def jaq_dir(tmp_path_factory):
    """Tiny random CLIP scorer files (RN50.pt for CLIP-IQA, ViT-L-14.pt for CLIPScore) in OpenAI's format."""
    from jaq_fixtures import save_openai_torchscript

    d = tmp_path_factory.mktemp("scorers")
    save_openai_torchscript(d / "RN50.pt", "rn", seed=1)
    save_openai_torchscript(d / "ViT-L-14.pt", "vit", seed=3)
    return d


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Tiny SDXL-like and FLUX-like diffusers pipelines saved once per session (diffusers folders), plus the SDXL
    UNet alone as a single .safetensors file."""
    from safetensors.torch import save_file

    from qsched_pack.calibration.tiny_pipelines import build_flux_pipeline, build_sdxl_pipeline

    root = tmp_path_factory.mktemp("tiny-pipelines")
    sdxl = build_sdxl_pipeline(0)
    sdxl.save_pretrained(root / "sdxl")
    build_flux_pipeline(0).save_pretrained(root / "flux")
    save_file({k: v.contiguous() for k, v in sdxl.unet.state_dict().items()}, str(root / "unet.safetensors"))
    return {"sdxl": root / "sdxl", "flux": root / "flux", "unet_file": root / "unet.safetensors", "root": root}


@pytest.fixture()
def folder_paths(monkeypatch, tmp_path):
    """A stand-in for ComfyUI's ``folder_paths`` module: one folder per key under tmp_path."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):  # idempotent, like ComfyUI's
        paths = fp.folder_names_and_paths.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths.get(name, ([str(tmp_path / "models" / name)], set()))[0])

    def get_filename_list(name):
        out = []
        for d in get_folder_paths(name):
            p = Path(d)
            if p.is_dir():
                out += sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
        return out

    def get_full_path(name, filename):
        for d in get_folder_paths(name):
            f = Path(d) / filename
            if f.is_file():
                return str(f)
        return None

    fp.add_model_folder_path, fp.get_folder_paths = add_model_folder_path, get_folder_paths
    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp
