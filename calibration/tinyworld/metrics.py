"""The reference metric of the tiny world, never used for calibration: Fréchet distance in the 64-d feature space
of ``ReferenceNet`` (an MLP with its own seed, unlike the CNN scorers) against the real held-out digits, and the
digit accuracy of that network on generated images w.r.t. the prompted digit.
"""

from __future__ import annotations

import torch

from .data import DigitSet, parse_prompt, to_image
from ..metrics.common import check_prompts
from .scorers import ReferenceNet, check_pixels


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


# The Fréchet distance of pytorch-fid src/pytorch_fid/fid_score.py calculate_frechet_distance, via eigh.
def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a − mu_b||² + tr(S_a + S_b − 2·(S_a^½ S_b S_a^½)^½), in float64 (eigendecompositions, no scipy).

    Exactly 0 for identical sets up to float error; sets need >= 2 rows each."""
    a, b = feats_a.double(), feats_b.double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need two [N>=2, D] feature sets of the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross)
    return float(fd.clamp_min(0))


class ReferenceMetric:
    """``fd(images)``, ``accuracy(images, prompts)`` and ``evaluate(images, prompts) -> dict``.

    ``reference``: the real images the Fréchet distance is measured against (the held-out split)."""

    def __init__(self, net: ReferenceNet, reference: DigitSet):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.reference = reference
        self.reference_features = self.features(to_image(reference.images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net.features(check_pixels(images)).double()

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(self.features(images), self.reference_features)

    def predicted_digits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(check_pixels(images)).argmax(-1)

    def accuracy(self, images: torch.Tensor, prompts) -> float:
        target = torch.tensor([parse_prompt(p)[0] for p in check_prompts(prompts, images.shape[0])])
        return float((self.predicted_digits(images) == target).float().mean())

    def evaluate(self, images: torch.Tensor, prompts) -> dict:
        return {"fd": self.fd(images), "accuracy": self.accuracy(images, prompts)}
