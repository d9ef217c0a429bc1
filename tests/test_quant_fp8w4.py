"""w4a8-fp8: int4 weight codes with power-of-two group scales folded exactly into float8 e4m3. CPU tests of
the packing/rounding math (hypothesis), the simulated and native (CPU) paths, and the layer plumbing; the Triton
kernel is checked against a float64 reference in tests/test_quant_gpu.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qsched_pack.qsched.quant import QuantLinear, QuantSpec, quantize_, weight_bytes
from qsched_pack.qsched.quant import layers as qlayers
from qsched_pack.qsched.quant import qmath

from quant_fixtures import rel_err

EMIN, EMAX = qmath.FP8W4_EMIN, qmath.FP8W4_EMAX


def test_spec():
    s = QuantSpec.parse("w4a8-fp8")
    assert (s.w_bits, s.a_bits, s.w_dtype, s.a_dtype, s.group_size, s.fp8_folded) == (4, 8, "fp8", "fp8", 32, True)
    assert s.name == "w4a8-fp8" and QuantSpec.parse(s.name) == s
    assert not QuantSpec.parse("w8a8-fp8").fp8_folded and not QuantSpec.parse("w4a8").fp8_folded
    assert QuantSpec.parse("w4a8-fp8", group_size=None).group_size is None  # one group per row (fallback layers)
    assert "float8" in s.describe()
    for bad in (16, 256, 48):
        with pytest.raises(ValueError, match="group_size") as e:
            QuantSpec.parse("w4a8-fp8", group_size=bad)
        assert "allowed" in str(e.value)


def test_every_code_times_every_exponent_is_an_exact_float8():
    """The folding is exact: q * 2^e for every code q in [-7, 7] and exponent e in [EMIN, EMAX] survives the
    float8 e4m3 round trip bit for bit (exhaustive: 15 x 16 values)."""
    q = torch.arange(-7, 8, dtype=torch.int8).repeat(EMAX - EMIN + 1, 1)  # [16, 15]
    e = torch.arange(EMIN, EMAX + 1, dtype=torch.int8)[:, None]  # one exponent per row (group = row)
    v = qmath.fp8w4_values(q, e)
    assert v.dtype == torch.float8_e4m3fn
    exact = q.double() * torch.pow(2.0, e.double())
    assert torch.equal(v.double(), exact)
    # one step further in either direction is no longer exact or in range: the range is tight
    assert float(torch.tensor(7 * 2.0 ** (EMAX + 1)).to(torch.float8_e4m3fn).float()) != 7 * 2.0 ** (EMAX + 1)
    assert float(torch.tensor(7 * 2.0 ** (EMIN - 1)).to(torch.float8_e4m3fn).float()) != 7 * 2.0 ** (EMIN - 1)


def _weights(n, groups, g, seed, spread):
    """Heavy-tailed rows whose groups differ in magnitude by up to 2^(2 * spread)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((n, groups * g)) if seed % 2 else torch.randn(n, groups * g,
                                                                                               generator=gen)
    mag = torch.pow(2.0, (torch.rand(n, groups, generator=gen) * 2 - 1) * spread)
    return (w.reshape(n, groups, g) * mag[..., None]).reshape(n, groups * g) * 0.05


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), groups=st.integers(1, 6), g=st.sampled_from([32, 64, 128]), seed=st.integers(0, 10**6),
       spread=st.integers(0, 5))
def test_quantize_bounds_roundtrip_and_error(n, groups, g, seed, spread):
    w = _weights(n, groups, g, seed, spread)
    codes, exps, scale = qmath.quantize_weight_fp8w4(w, g)
    # bounds and dtypes
    assert codes.dtype == torch.int8 and codes.shape == w.shape and int(codes.abs().max()) <= 7
    assert exps.dtype == torch.int8 and exps.shape == (n, groups)
    assert int(exps.min()) >= EMIN and int(exps.max()) <= EMAX
    assert scale.dtype == torch.float32 and scale.shape == (n, 1) and bool((scale > 0).all())
    # round trip: packing is bit exact, and re-rounding the dequantized weight on its own grid gives the same codes
    assert torch.equal(qmath.unpack_int4(qmath.pack_int4(codes)), codes)
    wd = qmath.dequantize_weight_fp8w4(codes, exps, scale)
    assert torch.equal(qmath.requantize_fp8w4(wd, exps, scale), codes)
    # the dequantized weight is scale * (exact float8 value)
    assert torch.equal(wd, qmath.fp8w4_values(codes, exps).float() * scale)
    # error: never worse than the candidate that does not clip (step < 2x the group's ideal int4 step, so each
    # element is off by less than that ideal step): per row, sum of squares <= sum_g g * ideal_g^2
    ideal = w.reshape(n, groups, g).abs().amax(-1) / 7
    err = (wd - w).square().sum(1)
    assert bool((err <= (ideal.square() * g).sum(1) * (1 + 1e-5) + 1e-30).all())


def test_exponents_follow_the_group_magnitude():
    """Groups 2^k apart in magnitude get exponents k apart (the power-of-two scale is the group scale)."""
    base = torch.linspace(-1, 1, 64)
    w = torch.stack([torch.cat([base * 2.0 ** k for k in range(4)])])  # 4 groups of 64, x1, x2, x4, x8
    codes, exps, scale = qmath.quantize_weight_fp8w4(w, 64)
    assert torch.diff(exps.float())[0].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(qmath.dequantize_weight_fp8w4(codes, exps, scale), w, atol=float(w.abs().max()) / 7)


def test_zero_and_tiny_rows_do_not_break():
    w = torch.zeros(3, 64)
    w[1, :32] = 1e-30
    w[2] = torch.randn(64)
    codes, exps, scale = qmath.quantize_weight_fp8w4(w, 32)
    assert torch.isfinite(scale).all() and int(codes[0].abs().max()) == 0
    wd = qmath.dequantize_weight_fp8w4(codes, exps, scale)
    assert torch.isfinite(wd).all() and rel_err(wd[2], w[2]) < 0.2


def test_simulated_equals_independent_float64_formula():
    """The simulated layer is float8 activations (per token) x scale * codes * 2^exps, computed here in numpy
    float64 from the stored tensors."""
    lin = nn.Linear(256, 48)
    m = nn.Sequential(copy.deepcopy(lin))
    quantize_(m, "w4a8-fp8", "simulated", skip=())
    x = torch.randn(5, 256) * torch.linspace(0.1, 3, 256)
    with torch.no_grad():
        y = m(x).double()
    layer = m[0]
    codes = qmath.unpack_int4(layer.qweight).numpy().astype(np.float64)
    e = np.repeat(layer.wexp.numpy().astype(np.float64), 256 // layer.wexp.shape[1], axis=1)
    w = codes * np.exp2(e) * layer.wscale.numpy().astype(np.float64)
    xs = np.maximum(np.abs(x.numpy()).max(-1, keepdims=True) / np.float32(448), np.float32(1e-12)).astype(np.float32)
    xq = torch.from_numpy(np.clip(x.numpy() / xs, -448, 448)).to(torch.float8_e4m3fn).double().numpy() * xs
    ref = xq @ w.T + lin.bias.detach().double().numpy()
    assert rel_err(y, torch.from_numpy(ref)) < 2e-6


def test_error_next_to_w4a8():
    """On a heavy-tailed layer (group magnitudes differ, as in trained weights) w4a8-fp8 with group 32 stays within
    the w4a8 error bound and within 1.25x of w4a8's error (measured: 0.93x of w4a8 with group 64)."""
    torch.manual_seed(0)
    lin = nn.Linear(1024, 256)
    with torch.no_grad():
        lin.weight.copy_(torch.distributions.StudentT(3.0).sample((256, 1024)) * 0.02)
    x = torch.randn(64, 1024)
    errs = {}
    for fmt in ("w4a8", "w4a8-fp8"):
        m = nn.Sequential(copy.deepcopy(lin))
        quantize_(m, fmt, "native", skip=())
        with torch.no_grad():
            errs[fmt] = rel_err(m(x), lin(x))
    assert errs["w4a8-fp8"] <= 1.25 * errs["w4a8"] and errs["w4a8-fp8"] <= 0.25, errs


def test_layer_plumbing_and_sizes():
    m = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 96))
    rep = quantize_(m, "w4a8-fp8", "native", skip=())
    assert set(rep.quantized.values()) == {"fp8w4"} and not rep.fallbacks
    layer = m[0]
    assert isinstance(layer, QuantLinear) and layer.wexp.dtype == torch.int8 and layer.wexp.shape == (256, 16)
    assert all(isinstance(p, nn.Parameter) and not p.requires_grad for p in (layer.qweight, layer.wscale, layer.wexp))
    # codes 0.5 B + exponent 1/32 B per weight + 4 B per row scale + bias
    want = 256 * 256 + 256 * 16 + 256 * 4 + 256 * 4
    assert weight_bytes(nn.Sequential(layer)) == want
    assert torch.equal(layer.dequantized_weight(), qmath.dequantize_weight_fp8w4(
        qmath.unpack_int4(layer.qweight), layer.wexp, layer.wscale))
    with pytest.raises(ValueError, match="wexp"):
        QuantLinear(64, 8, QuantSpec.parse("w4a8-fp8"), "fp8w4", 32, layer.qweight[:8, :32], layer.wscale[:8], None)


def test_group_fallback_and_odd_shapes():
    """in_features not a multiple of the group: one group per row (reported); the result is still the float8
    product."""
    m = nn.Sequential(nn.Linear(96, 40))
    rep = quantize_(m, "w4a8-fp8", "native", skip=())
    assert "0" not in rep.fallbacks and m[0].wexp.shape == (40, 3)  # 96 = 3 groups of 32 (the CPU has no K-block
    # constraint; on CUDA, in_features % 128 != 0 is reported: the float8 weights are materialised per call)
    m = nn.Sequential(nn.Linear(80, 40))
    lin = copy.deepcopy(m[0])
    rep = quantize_(m, QuantSpec.parse("w4a8-fp8", group_size=64), "native", skip=())
    assert "0" in rep.fallbacks and m[0].wexp.shape == (40, 1)
    x = torch.randn(3, 80)
    with torch.no_grad():
        assert rel_err(m(x), lin(x)) < 0.15


def test_lora_requantize_keeps_grid():
    """A weight merged into the layer is rounded on the layer's own grid (scales and exponents kept): restoring
    the original weight restores the codes exactly."""
    m = nn.Sequential(nn.Linear(128, 64))
    quantize_(m, "w4a8-fp8", "native", skip=())
    layer = m[0]
    w = layer.dequantized_weight()
    same = qlayers.requantize_with_scales(w, layer.qweight, layer.wscale, layer.spec, layer.wexp)
    assert torch.equal(same, layer.qweight)
    moved = qlayers.requantize_with_scales(w + 0.01, layer.qweight, layer.wscale, layer.spec, layer.wexp)
    assert moved.dtype == torch.uint8 and not torch.equal(moved, layer.qweight)


def _traced_targets(model, x):
    """The call targets of the FX graph Dynamo hands to the backend (fullgraph: no breaks)."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, backend=backend, fullgraph=True)(x)
    return targets, y


# the GEMM the traced graph holds on the CPU (float8 values in a float32 linear; CUDA: torch._scaled_mm)
@pytest.mark.parametrize("fmt,gemm", [("w8a8-fp8", "linear"), ("w4a8-fp8", "linear"), ("w4a8", "linear"),
                                      ("w8a8", "_int_mm"), ("w8a8-asym", "_int_mm")])
def test_kernel_formats_trace_as_plain_ops_for_inductor(fmt, gemm, monkeypatch):
    """Under torch.compile the kernel-backed formats are not an opaque custom op: the per-token activation
    quantization is traced as torch ops (amax, div, clamp, cast) so inductor can fuse it into the op before the
    Linear, then the GEMM (torch._scaled_mm / torch._int_mm / a float linear) and its rescale in torch ops. Same
    numbers as eager; with the switch off, one custom op per layer again."""
    opaque = False
    if fmt == "w8a8-asym":  # zero points: the int32 weight-row sums enter the traced epilogue
        from qsched_pack.qsched.quant import QuantSpec

        fmt = QuantSpec.parse("w8a8", act_symmetric=False)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 128))
    quantize_(model, fmt, skip=())
    x = torch.randn(2, 8, 128)
    with torch.no_grad():
        eager = model(x)
    targets, y = _traced_targets(model, x)
    custom = [t for t in targets if "qsched.quant_linear" in t]
    assert bool(custom) == opaque, targets
    if not opaque:
        assert any("amax" in t for t in targets) and not any(".item" in t or "_local_scalar" in t for t in targets)
        assert any(gemm in t for t in targets), targets
    torch.testing.assert_close(y, eager, rtol=0, atol=0)
    monkeypatch.setattr(qlayers, "COMPILE_FUSE_ACT_QUANT", False)
    targets, y = _traced_targets(model, x)
    assert sum("qsched.quant_linear" in t for t in targets) == 2
    torch.testing.assert_close(y, eager, rtol=0, atol=0)


def test_fp8_activation_codes_in_torch_ops_match_the_reference():
    """qmath.quantize_act_fp8 (the traced form) equals the reference fake quantization, and its block permutation
    is the layout the W4A8-FP8 GEMM reads (even columns of each 128-column block first)."""
    x = torch.randn(3, 5, 256) * 4
    q, s = qmath.quantize_act_fp8(x)
    ref, rs, _ = qmath.quantize_act(x, 8, True, "fp8")
    assert torch.equal(q.float(), ref) and torch.equal(s, rs)
    qp, _ = qmath.quantize_act_fp8(x, block_perm=128)
    blocks = q.float().reshape(3, 5, 2, 128)
    want = torch.cat([blocks[..., 0::2], blocks[..., 1::2]], -1).reshape(3, 5, 256)
    assert torch.equal(qp.float(), want)
