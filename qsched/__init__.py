"""The method: coefficients, samplers, schedules, PTQD baseline, quantization. Pure torch; imports
neither ComfyUI nor diffusers at module level."""

from .coefficients import Coefficients

__all__ = ["Coefficients"]
