"""Pre-quantized files without ComfyUI: `qsched quantize` on a ComfyUI-layout state dict, the header, the
placeholders the loader hands ComfyUI, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qsched_pack.calibration.app.cli import main
from qsched_pack.qsched.quant import prequant, qmath
from qsched_pack.qsched.quant.layers import dequantize


def _flux_like(path, checkpoint=False):
    g = torch.Generator().manual_seed(0)
    sd = {"img_in.weight": torch.randn(64, 16, generator=g), "img_in.bias": torch.zeros(64),
          "double_blocks.0.img_attn.qkv.weight": torch.randn(192, 64, generator=g) / 8,
          "double_blocks.0.img_attn.qkv.bias": torch.randn(192, generator=g),
          "double_blocks.0.img_mlp.0.weight": torch.randn(256, 64, generator=g) / 8,
          "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(16),
          "final_layer.linear.weight": torch.randn(64, 64, generator=g)}
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    if checkpoint:
        sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
        sd["first_stage_model.decoder.conv.weight"] = torch.zeros(4, 4, 3, 3, dtype=torch.bfloat16)
    save_file(sd, str(path))
    return {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}


@pytest.mark.parametrize("fmt", ["w4a8", "w8a8", "w8a8-fp8"])
def test_cli_writes_a_prequantized_file(tmp_path, fmt, capsys):
    src, out = tmp_path / "flux.safetensors", tmp_path / "flux-q.safetensors"
    sd = _flux_like(src)
    assert main(["quantize", str(src), str(out), "--format", fmt, "--device", "cpu"]) == 0
    assert "2 Linear layers" in capsys.readouterr().out
    meta = prequant.read_metadata(str(out))
    assert meta["qsched.spec"] == fmt and len(meta["qsched.source_sha256"]) == 64
    assert sorted(meta["layers"]) == ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0"]
    assert "img_in" in json.loads(meta["qsched.skip"])
    loaded = prequant.comfy_state_dict(str(out), meta)
    for layer, info in meta["layers"].items():
        w = sd[layer + ".weight"].float()
        ph = loaded[layer + ".weight"]
        assert ph.is_meta and list(ph.shape) == info["shape"] and ph.dtype == torch.bfloat16
        deq = dequantize(loaded[layer + ".qweight"], loaded[layer + ".weight_scale"], w.shape[1])
        assert float((deq - w).norm() / w.norm()) < (0.13 if fmt == "w4a8" else 0.05)
    # 16-bit tensors are stored as they were
    assert torch.equal(loaded["img_in.weight"], sd["img_in.weight"])
    assert torch.equal(loaded["double_blocks.0.img_attn.qkv.bias"], sd["double_blocks.0.img_attn.qkv.bias"])


def test_cli_reads_the_diffusion_model_of_a_checkpoint(tmp_path):
    src, out = tmp_path / "ckpt.safetensors", tmp_path / "q.safetensors"
    _flux_like(src, checkpoint=True)
    assert main(["quantize", str(src), str(out), "--device", "cpu"]) == 0
    loaded = prequant.comfy_state_dict(str(out), prequant.read_metadata(str(out)))
    assert not any(k.startswith(("model.", "first_stage_model.")) for k in loaded)
    assert loaded["double_blocks.0.img_attn.qkv.qweight"].dtype == torch.uint8  # packed int4


def test_cli_bad_input_names_the_file(tmp_path, capsys):
    src, out = tmp_path / "flux.safetensors", tmp_path / "q.safetensors"
    _flux_like(src)
    out.write_bytes(b"keep me")
    assert main(["quantize", str(src), str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["quantize", str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(src.read_bytes()[:200])
    assert main(["quantize", str(trunc), str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "trunc.safetensors" in err and "corrupt or truncated" in err
    assert main(["quantize", str(src), str(tmp_path / "z.safetensors"), "--format", "nf4"]) == 2
    assert "nf4" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "z.safetensors").exists()


def test_damaged_header_is_named(tmp_path):
    src, out = tmp_path / "flux.safetensors", tmp_path / "q.safetensors"
    _flux_like(src)
    main(["quantize", str(src), str(out), "--device", "cpu"])
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors["double_blocks.0.img_mlp.0.qweight"]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="bad.safetensors.*img_mlp.0.qweight.*missing"):
        prequant.comfy_state_dict(str(bad), prequant.read_metadata(str(bad)))
    meta["qsched.format_version"] = "99"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="version '99'"):
        prequant.read_metadata(str(bad))


def test_requantize_with_scales_is_exact_on_its_own_dequantization():
    """The LoRA path rounds a patched weight with the layer's scales: with a zero patch it gives the same codes."""
    from qsched_pack.qsched.quant import QuantSpec
    from qsched_pack.qsched.quant.layers import quantize_linear_weight, requantize_with_scales

    w = torch.randn(48, 128)
    for fmt in ("w4a8", "w8a8", "w8a8-fp8"):
        spec = QuantSpec.parse(fmt)
        q = quantize_linear_weight(w, spec, "dequant", spec.group_size)
        back = requantize_with_scales(dequantize(q["qweight"], q["wscale"], 128), q["qweight"], q["wscale"], spec)
        assert torch.equal(back.view(torch.uint8), q["qweight"].view(torch.uint8)), fmt
    assert qmath.FP8 == torch.float8_e4m3fn
