"""CUDA paths of qsched.quant: Triton kernels against the torch definitions in qmath, and the native GEMM kernels
(torch._int_mm, torch._scaled_mm) against the simulated reference. Run on the device machine."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qsched_pack.qsched.quant import QuantSpec, quantize_
from qsched_pack.qsched.quant import qmath

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tk():
    from qsched_pack.qsched.quant import kernels

    if not kernels.available():
        pytest.skip("Triton not available")
    return kernels


def _only_ties_differ(q, rq, x, s, z=None):
    """Codes may differ by one step only where x / s sits on a .5 tie up to one float32 ulp of the scale (torch
    divides by a Python scalar through a reciprocal; the kernel divides exactly)."""
    diff = (q.float() - rq).abs()
    assert diff.max() <= 1
    r = x.float() / s
    frac = (r - r.floor() - 0.5).abs()
    assert (frac[diff > 0] < 1e-3).all()


@pytest.mark.parametrize("k", [64, 3072, 12288, 15360, 100])
@pytest.mark.parametrize("bits,sym", [(8, True), (8, False), (4, True), (6, False)])
def test_int_act_quant_kernel_matches_qmath(tk, k, bits, sym):
    x = torch.randn(37, k, device="cuda", dtype=torch.bfloat16) * 3
    q, s, z = tk.quantize_act_int8(x, bits, sym)
    rq, rs, rz = qmath.quantize_act(x, bits, sym)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    if not sym:
        assert (z - rz).abs().max() <= 1
        _only_ties_differ(q.float() - z, rq - rz, x, rs)
    else:
        _only_ties_differ(q, rq, x, rs)
    fq = tk.fake_quant_act(x, bits, sym, "int")  # the same codes, dequantized in the kernel and rounded to bf16
    deq = (q.float() - (0 if z is None else z)) * s
    assert fq.dtype == x.dtype and _rel(fq, deq) < 4e-3


@pytest.mark.parametrize("k", [3072, 12288, 100])
def test_fp8_act_quant_kernel_matches_qmath(tk, k):
    x = torch.randn(33, k, device="cuda", dtype=torch.bfloat16)
    q, s = tk.quantize_act_fp8(x)
    rq, rs, _ = qmath.quantize_act(x, 8, True, "fp8")
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    # at most one float8 step apart (a step is at most 1/8 of the value), and rarely
    assert ((q.float() - rq).abs() <= rq.abs() / 8 + 2 ** -9).all()
    assert (q.float() != rq).float().mean() < 0.02


def test_activation_cache_is_exact_and_invalidated(tk):
    lin = nn.Linear(512, 256).cuda().to(torch.bfloat16)
    a, b = nn.Sequential(copy.deepcopy(lin)), nn.Sequential(copy.deepcopy(lin))
    quantize_(a, "w8a8-fp8")
    quantize_(b, "w8a8-fp8")
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    from qsched_pack.qsched.quant import layers

    with torch.no_grad():
        ya = a(x)
        yb = b(x)  # served from the cache
        x.mul_(2)  # in place: the next call must requantize
        yb2 = b(x)
        layers._LAST_ACT.clear()
        ref2 = b(x)
        x2 = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
        ya2 = a(x2)
    assert torch.equal(ya, yb) and torch.equal(yb2, ref2) and not torch.equal(yb, yb2)
    assert _rel(ya2, lin(x2)) < 0.06


@pytest.mark.parametrize("n,k,g", [(3072, 3072, 64), (96, 256, 128), (33, 192, 64)])
def test_int4_dequant_kernel_is_exact(tk, n, k, g):
    codes = torch.randint(-7, 8, (n, k), device="cuda", dtype=torch.int8)
    scale = (torch.rand(n, k // g, device="cuda") + 0.1).to(torch.float16)
    out = tk.dequant_int4(qmath.pack_int4(codes), scale, k, torch.float32)
    assert torch.equal(out, qmath.dequantize_weight(codes, scale))


@pytest.mark.parametrize("fmt,kw,kernel", [("w8a8", {}, "int8_mm"), ("w8a8", dict(act_symmetric=False), "int8_mm"),
                                           ("w8a8-fp8", {}, "fp8_mm"), ("w4a8", {}, "dequant"),
                                           ("w4a16", {}, "dequant"), ("w8a16", {}, "dequant")])
@pytest.mark.parametrize("m", [4, 300])
def test_native_cuda_close_to_simulated(fmt, kw, kernel, m):
    lin = nn.Linear(1024, 512).cuda().to(torch.bfloat16)
    q = nn.Sequential(copy.deepcopy(lin))
    quantize_(q, QuantSpec.parse(fmt, **kw), "native")
    assert q[0].kernel == kernel
    sim = copy.deepcopy(q)
    sim[0].kernel = "simulated"
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y, ys, ref = q(x), sim(x), lin.float()(x.float())
    assert y.dtype == torch.bfloat16
    assert _rel(y, ys) < 1.5e-2  # bf16 output and bf16 activations vs the float32 reference computation
    assert _rel(y, ref) < {"w8a8": 0.02, "w8a8-fp8": 0.06}.get(fmt, 0.12)


def test_bnb_cuda_formats():
    pytest.importorskip("bitsandbytes")
    lin = nn.Linear(1024, 512).cuda().to(torch.bfloat16)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    for fmt, bound in (("w8a8", 0.02), ("nf4", 0.12), ("w4a8-nf4", 0.13)):
        q = nn.Sequential(copy.deepcopy(lin))
        quantize_(q, fmt, "bitsandbytes")
        with torch.no_grad():
            assert _rel(q(x), lin(x)) < bound, fmt
