"""PTQD baseline (He et al., 2023), the per-step correction the paper compares Q-Sched with.

Model of the quantization error at step t (eps = the network's noise prediction; velocity for flow models):

    eps_q ≈ (1 + gamma_t)·eps_fp + delta_t[c]          (delta per channel c, or one scalar)

Correction applied to the quantized prediction:  eps = (eps_q − delta_t) / (1 + gamma_t).

``fit_ptqd`` estimates gamma_t, delta_t by least squares from paired FP/quantized predictions on the same
latents. The official Q-Sched code regresses ``error = eps_fp − eps_q = k·eps_fp + b`` (so
``eps_q = (1 − k)·eps_fp − b``) but then applies ``(eps_q − b)/(1 + k)``: both signs are wrong. Here the
fitted and the applied model are the same equation. PTQD's "noise fusion" (shrinking the sampler's own noise by
the residual variance) applies only to stochastic DDIM-type steps; it is not used (the paper's PCM runs are
deterministic, gamma_TCD = 0); the residual std is reported so it can be.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._io import atomic_write_text


@dataclass(frozen=True)
class PTQDCorrection:
    gamma: tuple[float, ...]                 # per step
    delta: tuple[tuple[float, ...], ...]     # per step: one value per channel, or a single value
    residual_std: tuple[float, ...] = ()     # per step, informational

    def __post_init__(self):
        g = tuple(float(v) for v in self.gamma)
        d = tuple(tuple(float(v) for v in row) for row in self.delta)
        if not g or len(g) != len(d):
            raise ValueError(f"gamma and delta must have one entry per step (same length >= 1), got {len(g)} and {len(d)}")
        for i, v in enumerate(g):
            if not math.isfinite(v) or v <= -1.0:
                raise ValueError(f"gamma[{i}] must be finite and > -1 (1 + gamma is a divisor), got {v!r}")
        for i, row in enumerate(d):
            if not row or not all(math.isfinite(v) for v in row):
                raise ValueError(f"delta[{i}] must be a non-empty list of finite numbers, got {row!r}")
        object.__setattr__(self, "gamma", g)
        object.__setattr__(self, "delta", d)
        object.__setattr__(self, "residual_std", tuple(float(v) for v in self.residual_std))

    @property
    def steps(self) -> int:
        return len(self.gamma)

    def correct(self, i: int, eps_q: torch.Tensor) -> torch.Tensor:
        """eps = (eps_q − delta_i) / (1 + gamma_i), delta broadcast over dim 1 (channels)."""
        delta = torch.tensor(self.delta[i], dtype=eps_q.dtype, device=eps_q.device)
        if delta.numel() > 1:
            if eps_q.ndim < 2 or eps_q.shape[1] != delta.numel():
                raise ValueError(f"delta[{i}] has {delta.numel()} channels but the prediction has shape {tuple(eps_q.shape)}")
            delta = delta.reshape(1, -1, *([1] * (eps_q.ndim - 2)))
        return (eps_q - delta) / (1.0 + self.gamma[i])

    def wrap(self, model: Callable, sigmas: torch.Tensor) -> Callable:
        """A k-diffusion denoiser that applies the correction to ``model`` (the quantized one).

        The step index is found from sigma (nearest of ``sigmas[:-1]``), so the wrapper works with any sampler.
        """
        if len(sigmas) - 1 != self.steps:
            raise ValueError(f"PTQD correction has {self.steps} steps but the schedule has {len(sigmas) - 1}")
        table = torch.as_tensor(sigmas[:-1], dtype=torch.float64).cpu()

        def corrected(x, sigma, **extra_args):
            s = float(sigma.reshape(-1)[0])
            i = int(torch.argmin((table - s).abs()))
            denoised = model(x, sigma, **extra_args)
            s_b = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
            eps = self.correct(i, (x - denoised) / s_b)
            return x - s_b * eps

        return corrected

    def to_dict(self) -> dict:
        return {"format": "qsched-ptqd", "version": 1, "gamma": list(self.gamma),
                "delta": [list(r) for r in self.delta], "residual_std": list(self.residual_std)}

    @classmethod
    def from_dict(cls, d) -> "PTQDCorrection":
        if not isinstance(d, dict) or d.get("format") != "qsched-ptqd":
            raise ValueError("PTQD file must be a JSON object with format 'qsched-ptqd'")
        try:
            return cls(d["gamma"], d["delta"], d.get("residual_std", ()))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"PTQD file is malformed ({exc!r}); expected keys gamma, delta (lists per step)") from None

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PTQDCorrection":
        with open(path, encoding="utf-8") as f:
            try:
                return cls.from_dict(json.load(f))
            except (json.JSONDecodeError, ValueError) as exc:
                raise ValueError(f"{os.fspath(path)}: {exc}") from None


# PTQD (Shang et al. 2023, github.com/ziplab/PTQD) correlated-error fit; sign fixed (docs/decisions.md).
def fit_ptqd(eps_fp: Sequence[torch.Tensor], eps_q: Sequence[torch.Tensor], per_channel: bool = True) -> PTQDCorrection:
    """Least squares, per step: eps_q = (1 + gamma)·eps_fp + delta[c] + r.

    One slope shared by all channels, one intercept per channel (or one overall): the exact LS solution is the
    pooled within-channel covariance over the pooled within-channel variance.
    """
    if len(eps_fp) != len(eps_q) or not eps_fp:
        raise ValueError(f"eps_fp and eps_q must be non-empty lists with one tensor per step, got {len(eps_fp)} and {len(eps_q)}")
    gamma, delta, resid = [], [], []
    for i, (f, q) in enumerate(zip(eps_fp, eps_q)):
        if f.shape != q.shape:
            raise ValueError(f"step {i}: eps_fp {tuple(f.shape)} and eps_q {tuple(q.shape)} differ in shape")
        f, q = f.double(), q.double()
        if per_channel and f.ndim >= 2:
            f = f.transpose(0, 1).reshape(f.shape[1], -1)   # [C, N]
            q = q.transpose(0, 1).reshape(q.shape[1], -1)
        else:
            f, q = f.reshape(1, -1), q.reshape(1, -1)
        fm, qm = f.mean(1, keepdim=True), q.mean(1, keepdim=True)
        var = ((f - fm) ** 2).sum()
        if var <= 0:
            raise ValueError(f"step {i}: eps_fp is constant, the slope cannot be estimated")
        slope = float(((f - fm) * (q - qm)).sum() / var)
        d = (qm - slope * fm).reshape(-1)
        r = q - slope * f - d[:, None]
        gamma.append(slope - 1.0)
        delta.append(d.tolist())
        resid.append(float(r.std()))
    return PTQDCorrection(gamma, delta, resid)


def collect_pairs(sampler: Callable, model_fp: Callable, model_q: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                  extra_args: dict | None = None, **sampler_kwargs):
    """Run ``sampler`` along the full-precision trajectory and record (eps_fp, eps_q) at every step, both
    evaluated on the same x (PTQD's calibration). Returns two lists with one tensor per step."""
    eps_fp, eps_q = [], []

    def paired(x, sigma, **ea):
        d_fp, d_q = model_fp(x, sigma, **ea), model_q(x, sigma, **ea)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        eps_fp.append((x - d_fp) / s)
        eps_q.append((x - d_q) / s)
        return d_fp

    sampler(paired, x, sigmas, extra_args, disable=True, **sampler_kwargs)
    return eps_fp, eps_q
