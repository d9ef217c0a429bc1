"""Drop-in Q-Sched wrapper for any diffusers scheduler: ``pipe.scheduler = QSchedScheduler(pipe.scheduler, c)``.

Official semantics (enyac-group/q-sched, e.g. ``scheduling_euler_ancestral_discrete.py:410-411``): at the top of
``step()``, before any other arithmetic, ``model_output *= c_eps[i]`` and ``sample *= c_x[i]`` where i is the
scheduler's step counter. Everything else passes through to the wrapped scheduler.

Differences from the official patch, on purpose: the coefficients are not sticky attributes of the scheduler
(they belong to this wrapper and are checked against ``num_inference_steps`` at every ``set_timesteps``), and the
wrapped scheduler object is never modified, so the same scheduler can be reused without Q-Sched.
"""

from __future__ import annotations

import functools

import torch

from .coefficients import Coefficients


# Follows enyac-group/q-sched scheduling_*.py step() patches (c_eps on model_output, c_x on sample).
class QSchedScheduler:
    def __init__(self, base_scheduler, coefficients: Coefficients):
        if not hasattr(base_scheduler, "step") or not hasattr(base_scheduler, "set_timesteps"):
            raise ValueError(f"base_scheduler must be a diffusers scheduler (with step and set_timesteps), got "
                             f"{type(base_scheduler).__name__}")
        if not isinstance(coefficients, Coefficients):
            raise ValueError(f"coefficients must be a qsched Coefficients, got {type(coefficients).__name__}")
        object.__setattr__(self, "base_scheduler", base_scheduler)
        object.__setattr__(self, "coefficients", coefficients)
        # Pipelines inspect these signatures (set_timesteps: `sigmas`/`timesteps`; step: `eta`, `generator`) to
        # decide what to pass: expose the wrapped scheduler's.
        for name, impl in (("set_timesteps", self._set_timesteps), ("step", self._step)):
            object.__setattr__(self, name, _with_signature_of(getattr(base_scheduler, name), impl))

    def _set_timesteps(self, *args, **kwargs):
        out = self.base_scheduler.set_timesteps(*args, **kwargs)
        self.coefficients.check_steps(len(self.base_scheduler.timesteps), where="diffusers scheduler")
        return out

    def _step_index(self, timestep) -> int:
        base = self.base_scheduler
        if getattr(base, "step_index", None) is None and hasattr(base, "_init_step_index"):
            base._init_step_index(timestep)
        i = getattr(base, "step_index", None)
        if i is None:  # schedulers without a step counter (e.g. DDIM): find the timestep in the schedule
            matches = (base.timesteps == torch.as_tensor(timestep).to(base.timesteps.device)).nonzero()
            if len(matches) == 0:
                raise ValueError(f"timestep {timestep!r} is not in the scheduler's timesteps")
            i = int(matches[0])
        return int(i)

    def _step(self, model_output, timestep, sample, *args, **kwargs):
        c = self.coefficients
        c.check_steps(len(self.base_scheduler.timesteps), where="diffusers scheduler")
        i = self._step_index(timestep)
        if not (c.c_x[i] == 1.0 and c.c_eps[i] == 1.0):
            model_output = model_output * c.c_eps[i]
            sample = sample * c.c_x[i]
        return self.base_scheduler.step(model_output, timestep, sample, *args, **kwargs)

    # Everything else is the wrapped scheduler's.
    def __getattr__(self, name):
        if name == "base_scheduler":  # not initialised yet (copy/pickle): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.base_scheduler, name)

    def __setattr__(self, name, value):
        setattr(self.base_scheduler, name, value)

    def __repr__(self) -> str:
        return f"QSchedScheduler({self.base_scheduler.__class__.__name__}, steps={self.coefficients.steps})"


def _with_signature_of(original, impl):
    def forward(*args, **kwargs):
        return impl(*args, **kwargs)

    return functools.update_wrapper(forward, original)
