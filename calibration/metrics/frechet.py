"""Fréchet distance between two feature sets (the FID formula without the Inception network): the toy world's
reference metric, computed in the features of a network the calibration never sees."""

from __future__ import annotations

import torch


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
