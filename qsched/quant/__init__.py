"""Quantization formats and backends (W8A8 / W8A8-FP8 / W4A8 / W4A4-6 / weight-only; docs/quantization.md).

Pure torch: bitsandbytes and Triton are imported only where they are used; this package never imports ComfyUI
(its quantized-layer operations and MODEL builders are ComfyUI adapters: nodes/quant_ops.py, nodes/quant_model.py).
"""

from .layers import BnbLinear, QuantConv2d, QuantLinear, quant_linear
from .spec import FORMATS, QuantSpec
from .swap import BACKENDS, DEFAULT_SKIP, QuantReport, detect_family, quantize_, weight_bytes

__all__ = ["BACKENDS", "DEFAULT_SKIP", "FORMATS", "BnbLinear", "QuantConv2d", "QuantLinear", "QuantReport",
           "QuantSpec", "detect_family", "quant_linear", "quantize_", "weight_bytes"]
