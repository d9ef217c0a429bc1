"""Quantization formats and backends (W8A8 / W8A8-FP8 / W4A8 / W4A4-6 / weight-only; docs/quantization.md).

Pure torch at import time: bitsandbytes, Triton, diffusers and ComfyUI are imported only where they are used.
"""

from .comfy import load_quantized, quantize_comfy_model, save_quantized
from .layers import BnbLinear, QuantConv2d, QuantLinear, quant_linear
from .spec import FORMATS, QuantSpec
from .swap import BACKENDS, DEFAULT_SKIP, QuantReport, detect_family, quantize_, weight_bytes

__all__ = ["BACKENDS", "DEFAULT_SKIP", "FORMATS", "BnbLinear", "QuantConv2d", "QuantLinear", "QuantReport",
           "QuantSpec", "detect_family", "load_quantized", "quant_linear", "quantize_", "quantize_comfy_model",
           "save_quantized", "weight_bytes"]
