"""Opt-in acceptance guard for a Q-Sched calibration result: *report* whether the found coefficients should be
trusted, without changing the search (paper Algorithm 1 still returns the highest mean JAQ, whatever the margin).

Works on any ``calibration.runner.CalibrationResult`` (it only reads the per-prompt JAQ the runner records); the shape
world's experiment measures it (docs/shape_world.md).

Checks, all paired by calibration prompt (same prompt, same seed; ``z`` standard errors, default 2):

* ``gain``: mean JAQ(best) − JAQ(identity) > z·SE. The SE is the seed-to-seed spread of the paired per-prompt
  differences / sqrt(n). Optimistic: the best was *selected* on these same images, so a real acceptance test would
  re-score on fresh seeds (the shape world's ``+heldout`` guard does).
* with ``fp_scores`` (per-prompt JAQ of the full-precision model on the same prompts and seeds; costs one image
  per prompt):
  ``loss``: mean JAQ(FP) − JAQ(identity) > z·SE -- there is a quality loss to recover at all;
  ``overshoot``: mean JAQ(best) − JAQ(FP) > z·SE -- the coefficients score *better* than the unquantized model,
  which for a method meant to recover that model signals that the search is exploiting the scorers.

Accept iff the gain is significant and (without ``fp_scores``) nothing else, (with) a loss exists and there is no
overshoot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..qsched.coefficients import Coefficients


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a − b`` and its standard error (sample std / sqrt(n)); needs n >= 2 pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n < 2:
        raise ValueError(f"the acceptance guard needs >= 2 calibration prompts to estimate a spread, got {n}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = math.fsum(d) / n
    var = math.fsum((v - mean) ** 2 for v in d) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class Acceptance:
    accept: bool
    reasons: list = field(default_factory=list)  # why not (empty when accepted)
    z: float = 2.0
    gain: float = 0.0  # mean JAQ(best) − JAQ(identity) on the calibration images
    gain_se: float = 0.0
    loss: float | None = None  # mean JAQ(FP) − JAQ(identity)
    loss_se: float | None = None
    overshoot: float | None = None  # mean JAQ(best) − JAQ(FP)
    overshoot_se: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def choice(self, result) -> Coefficients:
        """The guarded coefficients: the search's best if accepted, else identity (the plain sampler)."""
        return result.best if self.accept else Coefficients.identity(result.space.steps)

    def line(self) -> str:
        parts = [f"JAQ gain {self.gain:+.3f} ± {self.gain_se:.3f}"]
        if self.loss is not None:
            parts.append(f"loss vs FP {self.loss:+.3f} ± {self.loss_se:.3f}")
            parts.append(f"best − FP {self.overshoot:+.3f} ± {self.overshoot_se:.3f}")
        verdict = "accept" if self.accept else "reject (" + "; ".join(self.reasons) + ")"
        return f"guard (z = {self.z:g}): {verdict}; " + ", ".join(parts)


def _per_prompt(result, point) -> list[float] | None:
    for p in result.points:
        if tuple(p.point) == tuple(point):
            return [float(v) for v in p.per_prompt]
    return None


def acceptance(result, fp_scores: Sequence[float] | None = None, z: float = 2.0) -> Acceptance:
    """Judge ``result`` (a ``CalibrationResult``); see the module docstring. Reads nothing but ``result``."""
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z >= 0):
        raise ValueError(f"z must be a finite number >= 0, got {z!r}")
    ident = _per_prompt(result, result.space.identity)
    best = _per_prompt(result, result.best_point)
    if ident is None:
        return Acceptance(False, ["identity was never evaluated (budget)"], z)
    if best is None or not best:
        raise ValueError("the calibration result has no per-prompt scores for its best point")
    gain, gain_se = paired(best, ident)
    acc = Acceptance(True, [], float(z), gain, gain_se)
    if tuple(result.best_point) == tuple(result.space.identity):
        acc.reasons.append("best is identity")
    elif not gain > z * gain_se:
        acc.reasons.append(f"JAQ gain within {z:g} SE of the seed-to-seed spread")
    if fp_scores is not None:
        fp = [float(v) for v in fp_scores]
        if len(fp) != len(ident):
            raise ValueError(f"fp_scores has {len(fp)} values for {len(ident)} calibration prompts")
        acc.loss, acc.loss_se = paired(fp, ident)
        acc.overshoot, acc.overshoot_se = paired(best, fp)
        if not acc.loss > z * acc.loss_se:
            acc.reasons.append("nothing to recover: the quantized model is within noise of FP on JAQ")
        if acc.overshoot > z * acc.overshoot_se:
            acc.reasons.append("overshoot: best scores above the FP model (the scorers are being gamed)")
    acc.accept = not acc.reasons
    return acc
