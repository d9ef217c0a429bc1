"""Q-Sched coefficients: one (c_x, c_eps) pair per sampling step.

``c_x[i]`` multiplies the sample x_t and ``c_eps[i]`` the model's noise prediction at step i (paper Eq. 4;
official code: ``sample *= sample_coeff[step_index]``, ``model_output *= model_coeff[step_index]``).
Identity (all ones) reproduces the stock sampler exactly.

Preset JSON (what ``save``/``load`` read and write)::

    {"format": "qsched-coefficients", "version": 1, "steps": 4,
     "c_x": [1.012, 0.997, 0.982, 0.967], "c_eps": [0.955, 1.003, 1.051, 1.099],
     "metadata": {...free-form, e.g. model hash, quant spec, JAQ scores...}}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ._io import PRESET_MAX_BYTES, atomic_write_text, brief, check_nesting, read_text_capped

FORMAT = "qsched-coefficients"
VERSION = 1

#: Allowed range of every coefficient: 0 < c <= C_MAX. The paper searches [0.8, 1.2]; values far outside
#: that range do not correct quantization drift, they destroy the image, so anything above C_MAX is
#: treated as a typo.
C_MAX = 10.0
#: Largest number of steps a preset may describe (few-step samplers use 1-8; 1000 is the training grid).
MAX_STEPS = 1000


def check_coefficient(v: Any, name: str = "coefficient") -> float:
    """The coefficient rule, the one place it lives: a finite number in (0, C_MAX]. Returns it as float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number in (0, {C_MAX:g}], got {brief(v)}")
    v = float(v)
    if not math.isfinite(v) or v <= 0.0 or v > C_MAX:
        raise ValueError(f"{name} must be finite and in (0, {C_MAX:g}], got {v!r}")
    return v


def check_steps(steps: Any, limit: int = MAX_STEPS) -> int:
    """The step-count rule: an integer in [1, limit] (``limit`` <= MAX_STEPS, e.g. a UI's smaller maximum)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise ValueError(f"steps must be an integer in [1, {limit}], got {steps!r}")
    return steps


def _check_list(name: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of numbers in (0, {C_MAX:g}], got {type(values).__name__}")
    out = tuple(check_coefficient(v, f"value {i + 1} of {name}") for i, v in enumerate(values))
    if not 1 <= len(out) <= MAX_STEPS:
        raise ValueError(f"{name} must have 1..{MAX_STEPS} values (one per step), got {len(out)}")
    return out


def _linspace(start: float, end: float, n: int) -> list[float]:
    """``torch.linspace(start, end, n)`` in float64 (the official ramps); n == 1 gives [start]."""
    if n == 1:
        return [float(start)]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


@dataclass(frozen=True)
class Coefficients:
    """Per-step Q-Sched coefficients. Construct with lists; values are validated and stored as tuples."""

    c_x: tuple[float, ...]
    c_eps: tuple[float, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        c_x = _check_list("c_x", self.c_x)
        c_eps = _check_list("c_eps", self.c_eps)
        if len(c_x) != len(c_eps):
            raise ValueError(f"c_x and c_eps must have the same length (one value per step), got {len(c_x)} and {len(c_eps)}")
        if not isinstance(self.metadata, Mapping):
            raise ValueError(f"metadata must be a mapping, got {type(self.metadata).__name__}")
        object.__setattr__(self, "c_x", c_x)
        object.__setattr__(self, "c_eps", c_eps)
        object.__setattr__(self, "metadata", dict(self.metadata))

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def identity(cls, steps: int) -> "Coefficients":
        check_steps(steps)
        return cls([1.0] * steps, [1.0] * steps)

    @classmethod
    def ramp(cls, steps: int, x_start: float = 1.0, x_end: float = 1.0, eps_start: float = 1.0,
             eps_end: float = 1.0) -> "Coefficients":
        """Linear ramps first step -> last step, as the official ``linspace(start, end, N)`` (Alg. 1, l. 5-6).

        The released search fixes ``x_end = eps_end = 1``; the paper's Algorithm 1 searches all four.
        """
        check_steps(steps)
        for name, v in (("x_start", x_start), ("x_end", x_end), ("eps_start", eps_start), ("eps_end", eps_end)):
            check_coefficient(v, name)
        return cls(_linspace(float(x_start), float(x_end), steps), _linspace(float(eps_start), float(eps_end), steps))

    @classmethod
    def parse_list(cls, text: str, steps: int, field_name: str = "values") -> tuple[float, ...]:
        """Parse a per-step override typed by a user, e.g. ``"1.0, 0.98 0.97;0.96"`` -> 4 floats.

        A single value is broadcast to every step. Errors name ``field_name`` and the allowed values.
        """
        if not isinstance(text, str):
            raise ValueError(f"{field_name} must be text with {steps} comma-separated numbers, got {type(text).__name__}")
        parts = [p for p in text.replace(";", ",").replace(" ", ",").replace("\n", ",").split(",") if p.strip()]
        if not parts:
            raise ValueError(f"{field_name} is empty: give {steps} numbers in (0, {C_MAX:g}] separated by commas")
        vals = []
        for i, p in enumerate(parts):
            try:
                vals.append(float(p))
            except ValueError:
                raise ValueError(f"value {i + 1} of {field_name}, {p.strip()!r}, is not a number; allowed: numbers "
                                 f"in (0, {C_MAX:g}]") from None
        if len(vals) == 1:
            vals = vals * steps
        if len(vals) != steps:
            raise ValueError(f"{field_name} has {len(vals)} values but steps = {steps}: give 1 value or {steps} values")
        return tuple(check_coefficient(v, f"value {i + 1} of {field_name}") for i, v in enumerate(vals))

    # ---- queries -------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.c_x)

    @property
    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.c_x) and all(v == 1.0 for v in self.c_eps)

    def check_steps(self, steps: int, where: str = "sampler") -> None:
        """Raise if these coefficients were made for a different number of steps (official bug (n))."""
        if self.steps != steps:
            raise ValueError(
                f"coefficients have {self.steps} steps (one c_x and one c_eps per step) but the {where} runs "
                f"{steps} steps: make coefficients with steps={steps}")

    def __len__(self) -> int:
        return self.steps

    def with_metadata(self, **metadata: Any) -> "Coefficients":
        return Coefficients(self.c_x, self.c_eps, {**self.metadata, **metadata})

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": FORMAT, "version": VERSION, "steps": self.steps, "c_x": list(self.c_x),
             "c_eps": list(self.c_eps)}
        if self.metadata:
            d["metadata"] = dict(self.metadata)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Coefficients":
        if not isinstance(d, Mapping):
            raise ValueError(f"preset must be a JSON object with keys c_x, c_eps, got {type(d).__name__}")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {brief(fmt)}")
        version = d.get("version", VERSION)
        if version != VERSION:
            raise ValueError(f"version must be {VERSION}, got {brief(version)} (preset written by a newer Q-Sched?)")
        missing = [k for k in ("c_x", "c_eps") if k not in d]
        if missing:
            raise ValueError(f"preset is missing {' and '.join(missing)} (lists of one number per step)")
        unknown = sorted(set(d) - {"format", "version", "steps", "c_x", "c_eps", "metadata"})
        if unknown:
            raise ValueError(f"unknown preset field(s) {brief(unknown)}; allowed: format, version, steps, c_x, c_eps, metadata")
        c = cls(d["c_x"], d["c_eps"], d.get("metadata") or {})
        if "steps" in d:
            steps = d["steps"]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps != c.steps:
                raise ValueError(f"steps must equal the number of c_x values ({c.steps}), got {brief(steps)}")
        return c

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Coefficients":
        if len(text) > PRESET_MAX_BYTES:
            raise ValueError(f"preset text of {len(text):,} characters is too large (at most {PRESET_MAX_BYTES:,})")
        check_nesting(text, "preset")
        try:
            d = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise ValueError(f"preset is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("preset is nested too deeply") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write the preset atomically: a crash never leaves a half-written or truncated file. A file there that
        is not a preset is never replaced (:func:`check_replaceable`)."""
        check_replaceable(path)
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Coefficients":
        try:
            text = read_text_capped(path, PRESET_MAX_BYTES, "Q-Sched preset")
        except FileNotFoundError:
            raise FileNotFoundError(f"Q-Sched preset not found: {os.fspath(path)}") from None
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None


def check_replaceable(path: str | os.PathLike) -> None:
    """A preset may replace only a preset: ValueError when ``path`` exists and is anything else (a scorer's
    ``config.json``, a folder, a link, a file that is not a preset JSON object)."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    try:
        d = json.loads(read_text_capped(path, PRESET_MAX_BYTES, "Q-Sched preset"), parse_constant=_reject_constant)
        ok = not os.path.islink(path) and isinstance(d, dict) and ("c_x" in d or d.get("format") == FORMAT)
    except (OSError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise ValueError(f"{path} exists and is not a Q-Sched preset; refusing to replace it: choose another name "
                         "(or move that file away)")


def _reject_constant(name: str) -> float:
    raise ValueError(f"preset contains {name}; coefficients must be finite numbers in (0, {C_MAX:g}]")


def as_coefficients(coefficients: "Coefficients | None", steps: int) -> "Coefficients | None":
    """Validate a sampler's ``coefficients=`` argument against its number of steps (None = stock sampler)."""
    if coefficients is None:
        return None
    if not isinstance(coefficients, Coefficients):
        raise ValueError(f"coefficients must be a qsched Coefficients or None, got {type(coefficients).__name__}")
    coefficients.check_steps(steps)
    return coefficients
