"""The optional pyiqa CLIP-IQA backend (non-commercial licence; only when pyiqa is installed) gives the same
scores as the default open_clip backend on the same OpenAI TorchScript RN50 file."""

import pytest
import torch

pytest.importorskip("pyiqa")

from jaq_fixtures import planted_images, save_openai_torchscript  # noqa: E402
from qsched_pack.calibration.metrics import WeightFileError  # noqa: E402
from qsched_pack.calibration.metrics.clipiqa import CLIPIQA  # noqa: E402


def test_pyiqa_backend_equals_open_clip_backend(tmp_path):
    path = save_openai_torchscript(tmp_path / "RN50.pt", "rn", seed=7)
    imgs = planted_images(4, 96, 64, seed=1)
    ours = CLIPIQA(path, device="cpu")(imgs)
    theirs = CLIPIQA(path, device="cpu", backend="pyiqa")(imgs)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_pyiqa_backend_rejects_corrupt_file(tmp_path):
    bad = tmp_path / "RN50.pt"
    bad.write_bytes(b"\0" * 1000)
    with pytest.raises(WeightFileError, match="RN50.pt"):
        CLIPIQA(bad, device="cpu", backend="pyiqa")
