"""Quantization formats and backends (W8A8 / W8A8-FP8 / W4A8 / W4A4-6 / weight-only; docs/quantization.md).

Pure torch at import time: bitsandbytes, Triton, diffusers and ComfyUI are imported only where they are used.
"""

from .comfy import quantize_comfy_model
from .layers import BnbLinear, QuantConv2d, QuantLinear
from .spec import FORMATS, QuantSpec
from .swap import BACKENDS, DEFAULT_SKIP, QuantReport, detect_family, quantize_, weight_bytes

__all__ = ["BACKENDS", "DEFAULT_SKIP", "FORMATS", "BnbLinear", "QuantConv2d", "QuantLinear", "QuantReport",
           "QuantSpec", "detect_family", "quantize_", "quantize_comfy_model", "weight_bytes"]
