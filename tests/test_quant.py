"""qsched.quant on CPU: formats, exactness of each backend against an independent formula, error bounds,
size accounting, bad input, atomicity, the bitsandbytes CPU guard, and the ComfyUI clone path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qsched_pack.qsched.quant import BnbLinear, QuantConv2d, QuantLinear, QuantSpec, quantize_, weight_bytes
from qsched_pack.qsched.quant import layers as qlayers
from qsched_pack.qsched.quant import qmath

from quant_fixtures import build_flux, build_unet, flux_inputs, rel_err, run_flux, run_unet, unet_inputs

# (format, backend) pairs that tests sweep; "auto" resolves to native for int/fp8 and bitsandbytes for nf4/fp4.
CASES = [("w8a8", "native"), ("w8a8", "simulated"), ("w8a8", "bitsandbytes"), ("w8a8-fp8", "native"),
         ("w8a8-fp8", "simulated"), ("w4a8", "native"), ("w4a8", "simulated"), ("w4a6", "native"),
         ("w4a5", "native"), ("w4a4", "native"), ("w4a4", "simulated"), ("w8a16", "native"), ("w4a16", "native"),
         ("w4a8-nf4", "bitsandbytes"), ("nf4", "auto"), ("w4a8-fp4", "bitsandbytes")]

# Relative error vs FP32, ||y_q - y|| / ||y||. Per layer: Linear(512 -> 256), default init, N(0, 1) input.
# Whole model: the tiny UNet / FLUX-like models of quant_fixtures. docs/quantization.md has the measured values.
LAYER_BOUND = {"w8a8": 0.01, "w8a8-fp8": 0.05, "w4a8": 0.10, "w4a6": 0.11, "w4a5": 0.13, "w4a4": 0.20,
               "w8a16": 0.006, "w4a16": 0.10, "w4a8-nf4": 0.12, "nf4": 0.12, "w4a8-fp4": 0.15}
MODEL_BOUND = {"w8a8": 0.02, "w8a8-fp8": 0.08, "w4a8": 0.15, "w4a6": 0.15, "w4a5": 0.17, "w4a4": 0.30,
               "w8a16": 0.01, "w4a16": 0.15, "w4a8-nf4": 0.17, "nf4": 0.17, "w4a8-fp4": 0.20}


def _wrap(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(layer)  # quantize_ swaps children; a bare Linear has no parent to swap it in


# ------------------------------------------------------------------------------------------------ spec
def test_parse_defaults():
    s = QuantSpec.parse("w4a8")
    assert (s.w_bits, s.a_bits, s.group_size, s.act_symmetric, s.w_dtype) == (4, 8, 64, True, "int")
    s = QuantSpec.parse("w8a8")
    assert (s.w_bits, s.a_bits, s.group_size) == (8, 8, None)
    s = QuantSpec.parse("w8a8-fp8")
    assert (s.w_dtype, s.a_dtype) == ("fp8", "fp8")
    assert QuantSpec.parse("fp16").is_identity
    assert QuantSpec.parse("nf4") == QuantSpec.parse("w4a16-nf4")
    s = QuantSpec.parse("w4a6", group_size=128, act_symmetric=False)
    assert (s.group_size, s.act_symmetric, s.name) == (128, False, "w4a6")
    for name in ("w8a8", "w4a8", "w4a6", "w4a5", "w4a4", "w8a16", "w4a16", "fp16", "w8a8-fp8", "w4a8-nf4"):
        assert QuantSpec.parse(name).name == QuantSpec.parse(QuantSpec.parse(name).name).name


@pytest.mark.parametrize("bad,field", [
    ("w9a8", "w_bits"), ("w4a1", "a_bits"), ("w4a32", "a_bits"), ("int3", "format"), ("", "format"),
    ("w4a8-fp8", "w_bits"), ("w4a8-nf4:g32", "format")])
def test_parse_rejects(bad, field):
    with pytest.raises(ValueError, match=field) as e:
        QuantSpec.parse(bad)
    assert "allowed" in str(e.value)


@pytest.mark.parametrize("kw,field", [(dict(group_size=63), "group_size"), (dict(group_size=0), "group_size"),
                                      (dict(act_symmetric=1), "act_symmetric")])
def test_spec_rejects_fields(kw, field):
    with pytest.raises(ValueError, match=field):
        QuantSpec.parse("w4a8", **kw)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec.parse("w4a8-nf4", group_size=32)  # bnb blocks are 64..4096


def test_backend_rejects():
    m = _wrap(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="backend"):
        quantize_(m, "w8a8", "cuda")
    with pytest.raises(ValueError, match="bitsandbytes"):
        quantize_(m, "w4a8", "bitsandbytes")  # bnb has no int4
    with pytest.raises(ValueError, match="bitsandbytes"):
        quantize_(m, "nf4", "native")
    assert isinstance(m[0], nn.Linear)


# ------------------------------------------------------------------------------------------------ packing, math
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), half_k=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_int4_pack_roundtrip_bit_exact(n, half_k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, 2 * half_k), generator=g, dtype=torch.int8)
    packed = qmath.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (n, half_k)
    assert torch.equal(qmath.unpack_int4(packed), codes)
    assert torch.equal(qmath.pack_int4(qmath.unpack_int4(packed)), packed)


def test_int4_pack_layout():
    codes = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    assert qmath.pack_int4(codes).tolist() == [[0 | (15 << 4), 8 | (7 << 4)]]


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64), (4, None), (3, 32), (6, 16)])
def test_weight_quant_error_within_half_step(bits, group):
    w = torch.randn(24, 128)
    codes, scale = qmath.quantize_weight(w, bits, group)
    assert codes.abs().max() <= 2 ** (bits - 1) - 1
    err = (qmath.dequantize_weight(codes, scale) - w).abs()
    step = scale.float().repeat_interleave(128 // scale.shape[1], dim=1)
    assert (err <= step / 2 * (1 + 1e-3) + 1e-7).all()


# ------------------------------------------------------------------------------------------------ exactness
def _np_reference(x, w, b, spec):
    """An independent fake-quant in numpy float32: loops over groups, np.rint (half-to-even), no torch."""
    x = x.numpy().astype(np.float32)
    w = w.numpy().astype(np.float32)
    n, k = w.shape
    wd = np.empty_like(w)
    if spec.w_dtype == "fp8":
        s = np.maximum(np.abs(w).max(1, keepdims=True) / np.float32(448), np.float32(1e-12))
        wd = torch.from_numpy(w / s).to(torch.float8_e4m3fn).float().numpy() * s
    else:
        qm = np.float32(2 ** (spec.w_bits - 1) - 1)
        g = spec.group_size or k
        for j in range(0, k, g):
            blk = w[:, j:j + g]
            s = np.abs(blk).max(1, keepdims=True) / qm
            s = np.maximum(s, np.float32(2 ** -14)).astype(np.float16).astype(np.float32) if g < k else \
                np.maximum(s, np.float32(1e-12))
            wd[:, j:j + g] = np.clip(np.rint(blk / s), -qm, qm) * s
    if spec.a_bits < 16:
        if spec.a_dtype == "fp8":
            s = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(448), np.float32(1e-12))
            x = torch.from_numpy(x / s).to(torch.float8_e4m3fn).float().numpy() * s
        elif spec.act_symmetric:
            qm = np.float32(2 ** (spec.a_bits - 1) - 1)
            s = np.maximum(np.abs(x).max(-1, keepdims=True) / qm, np.float32(1e-12))
            x = np.clip(np.rint(x / s), -qm, qm) * s
        else:
            levels = np.float32(2 ** spec.a_bits - 1)
            lo, hi = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
            s = np.maximum((hi - lo) / levels, np.float32(1e-12))
            z = np.rint(-lo / s) - 2 ** (spec.a_bits - 1)
            x = (np.clip(np.rint(x / s) + z, -(2 ** (spec.a_bits - 1)), 2 ** (spec.a_bits - 1) - 1) - z) * s
    y = x.astype(np.float64) @ wd.astype(np.float64).T + b.numpy().astype(np.float64)
    return torch.from_numpy(y)


@pytest.mark.parametrize("fmt,kw", [("w8a8", {}), ("w8a8", dict(act_symmetric=False)), ("w4a8", {}),
                                    ("w4a4", dict(act_symmetric=False)), ("w4a6", dict(group_size=32)),
                                    ("w8a8-fp8", {}), ("w4a16", {}), ("w3a5", {}), ("w6a8", {}), ("w2a16", {})])
def test_simulated_equals_independent_formula(fmt, kw):
    spec = QuantSpec.parse(fmt, **kw)
    lin = nn.Linear(192, 48)
    x = torch.randn(2, 5, 192) * torch.linspace(0.1, 3, 192)
    m = _wrap(copy.deepcopy(lin))
    quantize_(m, spec, "simulated")
    with torch.no_grad():
        y = m(x).double()
    ref = _np_reference(x.reshape(-1, 192), lin.weight.detach(), lin.bias.detach(), spec).reshape(2, 5, 48)
    assert rel_err(y, ref) < 2e-6


@pytest.mark.parametrize("fmt,kw,kernel", [("w8a8", {}, "int8_mm"), ("w8a8", dict(act_symmetric=False), "int8_mm"),
                                           ("w6a4", {}, "int8_mm"), ("w8a8-fp8", {}, "fp8_mm"),
                                           ("w4a8", {}, "dequant"), ("w4a4", dict(act_symmetric=False), "dequant"),
                                           ("w8a16", {}, "dequant")])
def test_native_equals_simulated_on_cpu(fmt, kw, kernel):
    m = _wrap(nn.Linear(256, 96))
    quantize_(m, QuantSpec.parse(fmt, **kw), "native")
    assert m[0].kernel == kernel
    sim = copy.deepcopy(m)
    sim[0].kernel = "simulated"
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        assert rel_err(m(x), sim(x)) < 1e-6


def test_int8_mm_accumulates_exactly():
    """The int32 product of the native path is the exact integer dot product of the codes."""
    m = _wrap(nn.Linear(512, 64))
    quantize_(m, "w8a8", "native")
    x = torch.randn(9, 512)
    q, xs, _ = qmath.quantize_act(x, 8)
    acc = torch._int_mm(q.to(torch.int8), m[0].qweight.t())
    exact = q.double() @ m[0].qweight.double().t()
    assert torch.equal(acc.double(), exact)


# ------------------------------------------------------------------------------------------------ error bounds
@pytest.mark.parametrize("fmt,backend", CASES)
def test_layer_error_bound(fmt, backend):
    lin = nn.Linear(512, 256)
    m = _wrap(copy.deepcopy(lin))
    quantize_(m, fmt, backend)
    x = torch.randn(32, 512)
    with torch.no_grad():
        err = rel_err(m(x), lin(x))
    assert err <= LAYER_BOUND[fmt], err
    assert err > 1e-5  # it really is quantized


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory):
    return build_unet(str(tmp_path_factory.mktemp("unet")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return build_flux(str(tmp_path_factory.mktemp("flux") / "flux.safetensors"))


def _sample(model, kind, steps=4):
    """A 4-step few-step sample through the diffusers schedulers the pipelines use (Euler, trailing spacing for the
    SDXL-like UNet; flow-matching Euler for FLUX), with fixed random conditioning."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(3)
    if kind == "unet":
        sch = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     timestep_spacing="trailing")
        inp = unet_inputs()
        x = torch.randn(1, 4, 8, 8, generator=g) * sch.init_noise_sigma
    else:
        sch = FlowMatchEulerDiscreteScheduler(shift=1.0)
        inp = flux_inputs()
        x = torch.randn(1, 64, 64, generator=g)
    sch.set_timesteps(steps)
    key = "sample" if kind == "unet" else "hidden_states"
    for t in sch.timesteps:
        inp[key] = sch.scale_model_input(x, t) if kind == "unet" else x
        with torch.no_grad():
            out = run_unet(model, t[None], **inp) if kind == "unet" else run_flux(model, t[None] / 1000, **inp)
        x = sch.step(out, t, x).prev_sample
    return x


@pytest.fixture(scope="session")
def fp32_refs(tiny_unet, tiny_flux):
    with torch.no_grad():
        return {"unet": (run_unet(tiny_unet, torch.tensor([999.0]), **unet_inputs()), _sample(tiny_unet, "unet")),
                "flux": (run_flux(tiny_flux, torch.tensor([1.0]), **flux_inputs()), _sample(tiny_flux, "flux"))}


# Every format once through the default backend; the other backends of a format are slow on CPU (bitsandbytes'
# CPU int8 kernels, float32 dequantization) and are checked per layer above and here under the slow marker.
FAST_CASES = [c for c in CASES if c[1] in ("native", "auto") or c[0] in ("w4a8-nf4", "w4a8-fp4")]
MODEL_CASES = FAST_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in CASES if c not in FAST_CASES]


@pytest.mark.parametrize("kind", ["unet", "flux"])
@pytest.mark.parametrize("fmt,backend", MODEL_CASES)
def test_whole_model_error_and_4_step_sample(kind, fmt, backend, tiny_unet, tiny_flux, fp32_refs):
    model = copy.deepcopy(tiny_unet if kind == "unet" else tiny_flux)
    report = quantize_(model, fmt, backend)
    assert report.quantized and not report.fallbacks
    assert all(k not in report.quantized for k in report.skipped)
    with torch.no_grad():
        y = run_unet(model, torch.tensor([999.0]), **unet_inputs()) if kind == "unet" else \
            run_flux(model, torch.tensor([1.0]), **flux_inputs())
    ref, ref_sample = fp32_refs[kind]
    assert rel_err(y, ref) <= MODEL_BOUND[fmt]
    sample = _sample(model, kind)
    assert torch.isfinite(sample).all()
    assert rel_err(sample, ref_sample) <= MODEL_BOUND[fmt]


def test_conv_quantization_simulated(tiny_unet, fp32_refs):
    model = copy.deepcopy(tiny_unet)
    report = quantize_(model, QuantSpec.parse("w8a8", quantize_conv=True), "native")
    convs = [n for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    assert convs and all(report.quantized[n] == "simulated" for n in convs)
    assert "conv_in" in report.skipped and "conv_out" in report.skipped
    with torch.no_grad():
        y = run_unet(model, torch.tensor([999.0]), **unet_inputs())
    assert 1e-4 < rel_err(y, fp32_refs["unet"][0]) <= 0.03


# ------------------------------------------------------------------------------------------------ sizes
def _bf16(model):
    return copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("fmt,linear_max", [("w8a8", 0.55), ("w8a8-fp8", 0.55), ("w4a8", 0.30), ("w4a4", 0.30)])
def test_weight_bytes_ratio_unet(tiny_unet, fmt, linear_max):
    ref = _bf16(tiny_unet)
    lin16 = sum(2 * p.numel() for m in ref.modules() if isinstance(m, nn.Linear) for p in m.parameters(False))
    assert weight_bytes(ref, linear_only=True) == lin16
    total16 = weight_bytes(ref)
    q = _bf16(tiny_unet)
    report = quantize_(q, fmt)
    assert report.skipped  # the embedders stay in 16 bit and are counted
    lin_ratio = weight_bytes(q, linear_only=True) / lin16
    assert lin_ratio <= linear_max
    # convolutions stay in 16 bit: the whole-model ratio is higher but still a saving
    assert lin_ratio < weight_bytes(q) / total16 < 1.0


def test_weight_bytes_ratio_flux_whole_model(tiny_flux):
    ref = _bf16(tiny_flux)
    q = _bf16(tiny_flux)
    quantize_(q, "w4a8")
    assert weight_bytes(q) / weight_bytes(ref) <= 0.30
    q8 = _bf16(tiny_flux)
    quantize_(q8, "w8a8")
    assert weight_bytes(q8) / weight_bytes(ref) <= 0.55


def test_weight_bytes_counts_codes_scales_and_bnb_state():
    m = _wrap(nn.Linear(256, 64, bias=True))
    quantize_(m, "w4a8")
    assert weight_bytes(m) == 64 * 128 + 64 * 4 * 2 + 64 * 4  # packed nibbles + fp16 group scales + fp32 bias
    m = _wrap(nn.Linear(256, 64))
    quantize_(m, "w8a8", "bitsandbytes")
    assert weight_bytes(m) == 64 * 256 + 64 * 4 + 64 * 2  # int8 codes + fp32 row scales (SCB) + fp16 bias
    shared = nn.Linear(8, 8)
    assert weight_bytes(nn.Sequential(shared, shared)) == (64 + 8) * 4


# ------------------------------------------------------------------------------------------------ bad input
def test_group_size_fallback_is_reported():
    m = nn.Sequential(nn.Linear(96, 32), nn.Linear(32, 128))
    report = quantize_(m, "w4a8")  # group 64 does not divide 96 (nor 32)
    assert set(report.fallbacks) == {"0", "1"} and "group_size" in report.fallbacks["0"]
    assert m[0].group_size is None and m[0].wscale.shape == (32, 1)
    assert "fallback 0" in str(report)
    x = torch.randn(4, 96)
    with torch.no_grad():
        assert rel_err(m[0](x), _np_reference(x, *_weights_of(m, 0), QuantSpec(w_bits=4, a_bits=8))) < 2e-6


def _weights_of(m, i):
    w = qmath.dequantize_weight(m[i].codes(), m[i].wscale)
    return w, m[i].bias.detach()


def test_no_quantizable_layers_is_an_error():
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize_(nn.Sequential(nn.Conv2d(3, 3, 3), nn.GELU()), "w8a8")
    unet_like = nn.Module()
    unet_like.time_embedding = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="skip list"):
        quantize_(unet_like, "w8a8", family="diffusers_unet")


def test_already_quantized_is_an_error():
    m = _wrap(nn.Linear(64, 64))
    quantize_(m, "w8a8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(m, "w4a8")


@pytest.mark.parametrize("backend", ["native", "bitsandbytes"])
def test_failure_half_way_leaves_model_unchanged(tiny_unet, monkeypatch, backend):
    model = copy.deepcopy(tiny_unet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    target = QuantLinear if backend == "native" else BnbLinear
    real = target.from_linear.__func__
    calls = {"n": 0}

    def flaky(cls, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("injected failure")
        return real(cls, *a, **k)

    monkeypatch.setattr(target, "from_linear", classmethod(flaky))
    with pytest.raises(RuntimeError, match="injected"):
        quantize_(model, "w8a8", backend)
    assert calls["n"] == 7
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_skip_list_default_override_and_extra(tiny_flux):
    m = copy.deepcopy(tiny_flux)
    r = quantize_(m, "w8a8")
    assert r.family == "diffusers_flux"
    assert {"x_embedder", "context_embedder", "proj_out", "norm_out.linear"} <= set(r.skipped)
    assert isinstance(m.x_embedder, nn.Linear)
    m = copy.deepcopy(tiny_flux)
    r = quantize_(m, "w8a8", skip=(), extra_skip=("single_transformer_blocks.*.proj_mlp",))
    assert isinstance(m.x_embedder, QuantLinear)
    assert set(r.skipped) == {f"single_transformer_blocks.{i}.proj_mlp" for i in range(6)}


def test_fp16_format_is_a_no_op():
    m = _wrap(nn.Linear(64, 64))
    r = quantize_(m, "fp16")
    assert not r.quantized and isinstance(m[0], nn.Linear)


# ------------------------------------------------------------------------------------------------ bitsandbytes
def test_bnb_4bit_cpu_guard_and_noncontiguous_input():
    """bnb 0.50 on AVX512-bf16 CPUs returns wrong numbers for non-contiguous inputs unless the packed path is off
    (docs/quantization.md, traps). With the guard, a transposed input gives the contiguous result."""
    import bitsandbytes as bnb

    m = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 64))
    quantize_(m, "nf4")
    inner = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert len(inner) == 2 and all(x.support_avx512bf16_for_cpu is False for x in inner)
    x = torch.randn(128, 16)
    with torch.no_grad():
        y_nc = m[0](x.t())
        y_c = m[0](x.t().contiguous())
    assert torch.allclose(y_nc, y_c, rtol=1e-5, atol=1e-6)


def test_bnb_int8_agrees_with_native_w8a8():
    lin = nn.Linear(256, 128)
    a, b = _wrap(copy.deepcopy(lin)), _wrap(copy.deepcopy(lin))
    quantize_(a, "w8a8", "bitsandbytes")
    quantize_(b, "w8a8", "native")
    x = torch.randn(16, 256)
    with torch.no_grad():
        assert rel_err(a(x), b(x)) < 5e-3  # same math; bnb rounds through float16


def test_quantize_does_not_touch_the_original_layers():
    lin = nn.Linear(128, 64)
    w = lin.weight.detach().clone()
    for fmt in ("w8a8", "w4a8", "nf4", "w8a8-fp8"):
        m = _wrap(lin)
        quantize_(m, fmt)
        assert m[0] is not lin and torch.equal(lin.weight, w)


# ComfyUI: quantize_comfy_model / load_quantized need ComfyUI; tests/test_comfyui_quant.py runs them in a real one.


def test_layer_kernels_have_a_known_name():
    with pytest.raises(ValueError, match="kernel"):
        QuantLinear(4, 4, QuantSpec.parse("w8a8"), "magic", None, torch.zeros(4, 4, dtype=torch.int8),
                    torch.ones(4, 1), None)
    assert "dequant" in qlayers.KERNELS


@pytest.mark.parametrize("fmt", ["w8a8", "w8a8-fp8", "w4a8", "w4a16"])
def test_quantized_layers_trace_as_one_custom_op(fmt):
    """Dynamo sees each quantized Linear as the registered op torch.ops.qsched.quant_linear: fullgraph tracing
    (aot_eager: no C++ compiler needed) works and equals eager."""
    lin = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 64))
    quantize_(lin, fmt, skip=())
    x = torch.randn(2, 8, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = lin(x)
        compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    assert all(isinstance(p, nn.Parameter) for m in lin if hasattr(m, "qweight") for p in (m.qweight, m.wscale))
