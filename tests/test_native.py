"""ComfyUI-native quantized layers (qsched/quant/native.py) against comfy-kitchen itself: every layout that core's
loader reads is written here the way comfy-kitchen's QuantizedTensor writes it (core's own saver calls that) and must
dequantize to exactly comfy-kitchen's result; the pack's own layers written natively must dequantize (with
comfy-kitchen's eager backend) to the pack's weights, exactly where the mapping is exact."""

from __future__ import annotations

import json

import pytest
import torch

ck = pytest.importorskip("comfy_kitchen")
from comfy_kitchen import tensor as ckt  # noqa: E402

from qsched_pack.qsched.quant import native, qmath  # noqa: E402
from qsched_pack.qsched.quant.layers import dequantize as pack_dequantize  # noqa: E402
from qsched_pack.qsched.quant.spec import QuantSpec  # noqa: E402

N, K = 64, 512

# (layout class, quantize kwargs, the marker core's saver writes for it)
CORE_LAYOUTS = [
    ("float8_e4m3fn", ckt.TensorCoreFP8Layout, {}, {}),
    ("int8_tensorwise", ckt.TensorWiseINT8Layout, {"per_channel": True}, {}),
    ("int8_tensorwise", ckt.TensorWiseINT8Layout, {"per_channel": True, "convrot": True},
     {"convrot": True, "convrot_groupsize": 256}),
    ("asym_w4a8_int8", ckt.AsymW4A8Int8Layout, {}, {"group_size": 16, "convrot_groupsize": 256}),
    ("convrot_w4a4", ckt.TensorCoreConvRotW4A4Layout, {}, {"convrot_groupsize": 256}),
    ("nvfp4", ckt.TensorCoreNVFP4Layout, {}, {}),
    ("mxfp8", ckt.TensorCoreMXFP8Layout, {}, {}),
]


def weight(seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt,layout,kw,extra", CORE_LAYOUTS, ids=[f"{c[0]}{'-convrot' if c[3].get('convrot') else ''}"
                                                                      for c in CORE_LAYOUTS])
def test_every_core_layout_dequantizes_as_comfy_kitchen(fmt, layout, kw, extra):
    q, params = layout.quantize(weight(), **kw)
    qt = ckt.QuantizedTensor(q, layout.__name__, params)
    tensors = dict(qt.state_dict("weight"))
    tensors = {k: v for k, v in tensors.items()}
    conf = {"format": fmt, **extra}
    marker = native.encode_marker(conf)
    assert native.decode_marker(marker) == conf
    got = native.dequantize(native.decode_marker(marker), tensors, (N, K))
    assert torch.equal(got, qt.dequantize().float()), fmt


def test_pack_int8_is_written_exactly_and_read_back_exactly():
    w = weight(1)
    codes, scale = qmath.quantize_weight(w, 8, None, "int")
    ref = pack_dequantize(codes, scale, K)
    tensors, conf = native.encode("int8_tensorwise", ref, codes=codes, scale=scale)
    assert conf == {"format": "int8_tensorwise"}
    assert torch.equal(tensors["weight"], codes) and torch.equal(tensors["weight_scale"], scale)
    assert torch.equal(native.dequantize(conf, tensors, (N, K)), ref)  # comfy-kitchen's eager dequantization
    # comfy-kitchen's own per-row quantizer gives the pack's codes and scales (same absmax/127 rounding)
    t2, _ = native.encode("int8_tensorwise", w)
    assert torch.equal(t2["weight"], codes) and torch.equal(t2["weight_scale"], scale)


def test_pack_fp8_and_4bit_are_requantized_by_comfy_kitchen_within_their_rounding():
    w = weight(2)
    c8, s8 = qmath.quantize_weight(w, 8, None, "fp8")
    ref8 = pack_dequantize(c8, s8, K)
    t, conf = native.encode("float8_e4m3fn", ref8)
    back = native.dequantize(conf, t, (N, K))
    err8 = float((back - ref8).norm() / ref8.norm())
    assert 0 < err8 < 0.05, err8  # one scale per tensor (core) instead of per row: rounds again
    spec = QuantSpec.parse("w4a8")
    c4, s4 = qmath.quantize_weight(w, 4, spec.group_size, "int")
    ref4 = pack_dequantize(c4, s4, K)
    assert native.target_for(spec, K) == "asym_w4a8_int8"
    t4, conf4 = native.encode("asym_w4a8_int8", ref4)
    back4 = native.dequantize(conf4, t4, (N, K))
    q, s_rel, s_ch, corr, cb = ck.quantize_w4a8_int8_weight(ref4)  # the file holds comfy-kitchen's own result
    assert torch.equal(t4["weight"], q) and torch.equal(back4, ck.dequantize_w4a8_int8_weight(
        q, s_rel, s_ch, cb, corr, group_size=16, convrot_groupsize=256, output_dtype=torch.float32))
    err4 = float((back4 - ref4).norm() / ref4.norm())
    assert err4 < 0.12, err4
    assert native.target_for(spec, 320) == "int8_tensorwise"  # no 256-block rotation possible


def test_file_configs_from_markers_and_header(tmp_path):
    from safetensors.torch import save_file

    t, conf = native.encode("int8_tensorwise", weight())
    sd = {f"model.diffusion_model.a.{k}": v for k, v in t.items()}
    sd["model.diffusion_model.a.comfy_quant"] = native.encode_marker(conf)
    sd["model.diffusion_model.b.weight"] = torch.zeros(2, 2)
    header = {native.HEADER: json.dumps({"layers": {"model.diffusion_model.c": {"format": "nvfp4"}}})}
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p), metadata=header)
    configs = native.read_configs(str(p))
    assert configs == {"model.diffusion_model.a": conf, "model.diffusion_model.c": {"format": "nvfp4"}}
    assert set(native.strip_prefix(configs, sd)) == {"a", "c"}
    assert native.read_configs(str(tmp_path / "x.ckpt")) == {}


def test_bad_native_input_names_the_problem(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "bad.safetensors"
    save_file({"a.comfy_quant": torch.tensor(list(b"not json"), dtype=torch.uint8)}, str(p))
    with pytest.raises(ValueError, match="bad.safetensors.*comfy_quant"):
        native.read_configs(str(p))
    with pytest.raises(ValueError, match="'x'.*awq_w4a16.*cannot be read"):
        native.dequantize({"format": "awq_w4a16"}, {}, (N, K), layer="x")
    with pytest.raises(ValueError, match="'y'.*weight_scale"):
        native.dequantize({"format": "int8_tensorwise"}, {"weight": torch.zeros(N, K, dtype=torch.int8)}, (N, K),
                          layer="y")
    t, conf = native.encode("int8_tensorwise", weight())
    with pytest.raises(ValueError, match="does not fit"):
        native.dequantize(conf, t, (N, K // 2), layer="z")


def test_packed_layers_get_a_float_shaped_placeholder_for_model_detection(tmp_path):
    from safetensors.torch import save_file

    q, params = ckt.AsymW4A8Int8Layout.quantize(weight())
    sd = dict(ckt.QuantizedTensor(q, "AsymW4A8Int8Layout", params).state_dict("m.a.weight"))
    sd["m.b.weight"] = torch.ones(3, 3)
    p = tmp_path / "packed.safetensors"
    save_file(sd, str(p))
    configs = {"m.a": {"format": "asym_w4a8_int8", "group_size": 16}}
    loaded = native.loader_state_dict(str(p), configs)
    assert loaded["m.a.weight"].is_meta and tuple(loaded["m.a.weight"].shape) == (N, K)  # what detection reads
    assert torch.equal(native.layer_tensors(loaded, "m.a.")["weight"], q)  # the codes, for the layer
    assert torch.equal(native.dequantize(configs["m.a"], native.layer_tensors(loaded, "m.a."), (N, K)),
                       ckt.QuantizedTensor(q, "AsymW4A8Int8Layout", params).dequantize().float())
    assert torch.equal(loaded["m.b.weight"], torch.ones(3, 3))
