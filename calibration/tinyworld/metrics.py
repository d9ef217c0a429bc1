"""The reference metric of the tiny world, never used for calibration: Fréchet distance in the 64-d feature space
of ``ReferenceNet`` (an MLP with its own seed, unlike the CNN scorers) against the real held-out digits, and the
digit accuracy of that network on generated images w.r.t. the prompted digit.
"""

from __future__ import annotations

import torch

from ..metrics.frechet import frechet_distance
from .data import DigitSet, parse_prompt, to_image
from ..metrics.common import check_prompts
from .scorers import ReferenceNet, check_pixels


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
