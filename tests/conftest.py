import os

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
