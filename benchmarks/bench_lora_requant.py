"""LoRA on a quantized Linear: merge + requantize (what the ComfyUI layers do) vs an exact 16-bit side branch.

    python benchmarks/bench_lora_requant.py          # CPU, a few seconds

One 3072x3072 Linear (FLUX width), random weights normal(0, 1/K), a rank-16 LoRA scaled so that
||dW|| / ||W|| = 0.1, 0.3, 1.0; 256 random tokens. Error = ||y - y_float|| / ||y_float||, y_float = x (W + dW)^T.
* side branch: quantized W as stored + x dW^T in float (the nunchaku approach; no requantization);
* merge + requantize, fixed scales: the layer's `set_weight` (codes of dequant(W) + dW with the existing scales;
  ComfyUI's backup of `weight` then restores the layer exactly);
* requantize, fresh scales: quantizing W + dW from scratch (what a new quantization would give).
"""

from __future__ import annotations

import torch

from qsched_pack.qsched.quant import QuantSpec
from qsched_pack.qsched.quant.layers import dequantize, quant_linear, quantize_linear_weight, requantize_with_scales

KERNEL = {"w4a8": "dequant", "w8a8": "int8_mm", "w8a8-fp8": "fp8_mm"}


def main(k: int = 3072, n: int = 3072, rank: int = 16) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(n, k) / k ** 0.5
    x = torch.randn(256, k)
    rows = []
    for ratio in (0.1, 0.3, 1.0):
        ba = torch.randn(n, rank) @ torch.randn(rank, k)
        dw = ba * ratio * w.norm() / ba.norm()
        ref = x @ (w + dw).T

        def err(y):
            return float((y - ref).norm() / ref.norm())

        for fmt, kernel in KERNEL.items():
            spec = QuantSpec.parse(fmt)
            q = quantize_linear_weight(w, spec, kernel, spec.group_size)
            side = quant_linear(x, q["qweight"], q["wscale"], None, None, spec, kernel, n) + x @ dw.T
            codes = requantize_with_scales(dequantize(q["qweight"], q["wscale"], k) + dw, q["qweight"], q["wscale"],
                                           spec)
            merged = quant_linear(x, codes, q["wscale"], None, None, spec, kernel, n)
            f = quantize_linear_weight(w + dw, spec, kernel, spec.group_size)
            fresh = quant_linear(x, f["qweight"], f["wscale"], None, None, spec, kernel, n)
            rows.append({"dW/W": ratio, "format": fmt, "side_branch": err(side), "merge_fixed_scales": err(merged),
                         "fresh_scales": err(fresh)})
    return rows


if __name__ == "__main__":
    print("| ‖dW‖/‖W‖ | format | side branch | merge + requantize (fixed scales) | requantize (fresh scales) |")
    print("|---|---|---|---|---|")
    for r in main():
        print(f"| {r['dW/W']} | {r['format']} | {r['side_branch']:.4f} | {r['merge_fixed_scales']:.4f} | "
              f"{r['fresh_scales']:.4f} |")
