"""JAQ, the Joint Alignment-Quality objective of Q-Sched (arXiv 2509.01624, Eq. 5):

    JAQ(x) = TC(x) + k * IQ(x)          (higher is better; the paper fixes k = 2)

TC is a text-image compatibility metric, IQ a pure image-quality metric. Two presets, as in the paper §4:

* ``clip``       TC = CLIPScore (0..100),  IQ = CLIP-IQA (0..1)     -- LCM / PCM
* ``preference`` TC = AQ-MAP (0..1),       IQ = HPSv2.1 (~0.27)     -- SDXL-Turbo / FLUX.1

Where k goes: the paper's text (Eq. 5, §4) and the official search ranking (``kclip2``) weight the IQ term:
``AQ + 2*HPS``. The paper's Table 3 "JAQ" row, however, was printed with ``HPS + 2*AQ`` (SDXL-Turbo FP16:
0.276 + 2*0.693 = 1.662 ~ 1.663; FLUX FP16: 0.275 + 2*0.700 = 1.675 ~ 1.676; the Eq. 5 form would give
0.693 + 2*0.276 = 1.245). ``k_on="iq"`` (default) is Eq. 5; ``k_on="tc"`` reproduces Table 3.
The official CLIP variant (``new``) ranks a set of images by ``ln(mean CLIPScore) + k*mean CLIP-IQA``: the log of
the set's mean CLIPScore (torchmetrics' ``CLIPScore.compute()``), not the mean of per-image logs.
``tc_transform="log"`` gives exactly that through :meth:`JAQ.aggregate` (the mean CLIPScore is clamped at 1e-6
before the log, since it can be exactly 0); per image, :meth:`JAQ.combine` reports ``ln(TC_i) + k*IQ_i``.
``tc_transform="log_per_image"`` ranks by the mean of those per-image values instead (an option; by Jensen's
inequality it penalises sets with uneven alignment more, and it can rank two sets the other way round).

No normalisation is applied (as in the official code): the raw metric scales are added, so k must be read
together with the scales above (with ``clip``, 2*CLIP-IQA moves at most 2 points against 0..100 CLIPScore).
"""

from __future__ import annotations

import math

import torch

from .metrics import get_metric_class

PRESETS = {"clip": ("clipscore", "clipiqa"), "preference": ("aqmap", "hpsv2")}
LOG_FLOOR = 1e-6
TC_TRANSFORMS = ("identity", "log", "log_per_image")


class JAQ:
    """``JAQ(tc="clipscore", iq="clipiqa", k=2.0).score(images, prompts) -> Tensor[B]``.

    Args:
        tc, iq: metric names (``clipscore``, ``aqmap`` / ``clipiqa``, ``hpsv2``) or ready metric objects.
        k: weight of the IQ term (or of the TC term with ``k_on="tc"``).
        preset: ``"clip"`` or ``"preference"``; overrides ``tc``/``iq``.
        k_on: ``"iq"`` (paper Eq. 5, default) or ``"tc"`` (paper Table 3 printout).
        tc_transform: ``"identity"``, ``"log"`` (official ``new`` criterion: ln of the mean CLIPScore) or
            ``"log_per_image"`` (mean of per-image ln(CLIPScore)).
        weights: ``{metric_name: path}`` of local weight files/folders (else QSCHED_MODELS_DIR / ComfyUI
            ``models/qsched``); device, dtype, batch_size: passed to every metric.
        tc_options, iq_options: extra keyword arguments for the metric constructors.
    """

    def __init__(self, tc="clipscore", iq="clipiqa", k: float = 2.0, *, preset: str | None = None,
                 k_on: str = "iq", tc_transform: str = "identity", weights: dict | None = None, device=None,
                 dtype=None, batch_size: int = 32, tc_options: dict | None = None, iq_options: dict | None = None):
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown JAQ preset {preset!r}; choose from {sorted(PRESETS)}")
            tc, iq = PRESETS[preset]
        if k_on not in ("iq", "tc"):
            raise ValueError(f"k_on must be 'iq' (paper Eq. 5) or 'tc' (paper Table 3), got {k_on!r}")
        if tc_transform not in TC_TRANSFORMS:
            raise ValueError(f"tc_transform must be one of {', '.join(map(repr, TC_TRANSFORMS))}, got {tc_transform!r}")
        if not (isinstance(k, (int, float)) and math.isfinite(k)):
            raise ValueError(f"k must be a finite number, got {k!r}")
        self.k, self.k_on, self.tc_transform = float(k), k_on, tc_transform
        weights = weights or {}
        common = dict(device=device, dtype=dtype, batch_size=batch_size)
        self.tc = self._build(tc, weights, common, tc_options)
        self.iq = self._build(iq, weights, common, iq_options)

    @staticmethod
    def _build(metric, weights, common, options):
        if not isinstance(metric, str):
            return metric
        return get_metric_class(metric)(weights.get(metric), **common, **(options or {}))

    def components(self, images: torch.Tensor, prompts) -> dict[str, torch.Tensor]:
        """Per-image values of each metric, keyed by metric name (and ``"tc"`` / ``"iq"``)."""
        tc = self.tc(images, prompts)
        iq = self.iq(images, prompts)
        return {"tc": tc, "iq": iq, self.tc.name: tc, self.iq.name: iq}

    @property
    def score_rule(self) -> str:
        """How a set of images gets one score; recorded with calibration results (a record made under another
        rule is not resumed)."""
        if self.tc_transform != "log":
            return "mean(JAQ_i)"
        return "ln(mean TC) + k*mean(IQ)" if self.k_on == "iq" else "mean(IQ) + k*ln(mean TC)"

    def combine(self, tc: torch.Tensor, iq: torch.Tensor) -> torch.Tensor:
        """Per-image JAQ (with ``log``: ``ln(TC_i) + k*IQ_i``, a per-image view; the set score is
        :meth:`aggregate`)."""
        if self.tc_transform != "identity":
            tc = torch.log(tc.clamp(min=LOG_FLOOR))
        return tc + self.k * iq if self.k_on == "iq" else iq + self.k * tc

    def aggregate(self, tc, iq) -> float:
        """One score for a set of images (a calibration point): the mean of the per-image JAQ, except with
        ``tc_transform="log"``, where it is ``ln(mean TC) + k*mean IQ`` as in the official criterion."""
        tc = torch.as_tensor(tc, dtype=torch.float64).reshape(-1)
        iq = torch.as_tensor(iq, dtype=torch.float64).reshape(-1)
        if tc.numel() == 0 or tc.numel() != iq.numel():
            raise ValueError(f"aggregate needs as many TC as IQ values (at least 1), got {tc.numel()} and "
                             f"{iq.numel()}")
        if self.tc_transform != "log":
            return float(self.combine(tc, iq).mean())
        tc_term = math.log(max(float(tc.mean()), LOG_FLOOR))
        iq_term = float(iq.mean())
        return tc_term + self.k * iq_term if self.k_on == "iq" else iq_term + self.k * tc_term

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """JAQ per image (:meth:`combine`), float32 [B] on CPU. ``prompts``: one string per image, or one for all.
        The score of the whole set is :meth:`aggregate`."""
        c = self.components(images, prompts)
        return self.combine(c["tc"], c["iq"])

    __call__ = score
