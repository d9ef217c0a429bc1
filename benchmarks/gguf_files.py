"""Write GGUF Q8_0 / Q4_0 diffusion-model files (the layout city96/ComfyUI-GGUF loads) from a state dict.

Block formats as in ggml / the ``gguf`` package (gguf.quants): blocks of 32 weights along the input dimension.
Q8_0: float16 scale d = amax / 127, int8 codes round(x / d). Q4_0: d = (value of largest magnitude) / -8, codes
trunc(x / d + 8.5) clipped to 0..15, two per byte (element j low nibble, j + 16 high nibble). Encoded with torch (on
the GPU when the tensors are there), written with ``gguf.GGUFWriter``. 1-D and small tensors stay float32, other
tensors whose input size is not a multiple of 32 stay float16, like city96's convert tool.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    b = w.float().reshape(-1, BLOCK)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(b * inv).to(torch.int8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)


def _q4_0(w: torch.Tensor) -> torch.Tensor:
    b = w.float().reshape(-1, BLOCK)
    imax = b.abs().argmax(-1, keepdim=True)
    d = torch.gather(b, -1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(b * inv + 8.5).clamp(0, 15).to(torch.uint8).reshape(-1, 2, BLOCK // 2)
    q = q[:, 0, :] | (q[:, 1, :] << 4)
    return torch.cat([d.to(torch.float16).view(torch.uint8), q], dim=-1)


def write_gguf(path: str, sd: dict, qtype: str, arch: str, device=None) -> int:
    """``sd``: ComfyUI diffusion-model keys -> tensors. Returns the file size in bytes."""
    import os

    import gguf

    kinds = {"Q8_0": (_q8_0, gguf.GGMLQuantizationType.Q8_0), "Q4_0": (_q4_0, gguf.GGMLQuantizationType.Q4_0)}
    encode, gtype = kinds[qtype]
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type({"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    for key, t in sd.items():
        if t.ndim <= 1 or t.numel() <= 1024:
            writer.add_tensor(key, t.float().cpu().numpy())
        elif t.shape[-1] % BLOCK:
            writer.add_tensor(key, t.to(torch.float16).cpu().numpy())
        else:
            w = t.to(device) if device is not None else t
            blocks = encode(w).cpu().numpy()
            raw = blocks.reshape(*t.shape[:-1], t.shape[-1] // BLOCK * blocks.shape[-1])
            writer.add_tensor(key, np.ascontiguousarray(raw), raw_dtype=gtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.getsize(path)
