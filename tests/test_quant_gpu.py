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


@pytest.mark.parametrize("fmt", ["w8a8", "w8a8-fp8", "w4a8", "w4a16", "w4a8-fp8"])
def test_quantized_layers_compile_without_graph_breaks(tk, fmt):
    """Each quantized Linear traces under torch.compile (torch ops + triton_ops, no graph break): fullgraph works and
    the compiled output equals eager (no Python cache keyed on tensor identity inside forward)."""
    lin = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 512)).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(lin)
    quantize_(lin, fmt, skip=())
    x = torch.randn(2, 64, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        exact = ref.float()(x.float())
        eager = lin(x)
        compiled = torch.compile(lin, fullgraph=True)(x)
    if fmt.endswith("fp8"):
        # compiled: activation quantization traced as torch ops; eager: the Triton kernel, which may round a code
        # one float8 step the other way (test_fp8_act_quant_kernel_matches_qmath). Both must be as accurate.
        err = {name: ((out.float() - exact).norm() / exact.norm()).item()
               for name, out in (("eager", eager), ("compiled", compiled))}
        assert err["compiled"] <= 1.1 * err["eager"] + 1e-3, err
        assert ((compiled.float() - eager.float()).norm() / exact.norm()).item() < 0.5 * err["eager"], err
    else:
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt", ["w8a8-fp8", "w4a8-fp8"])
def test_wide_fp8_inputs_quantize_in_one_pass_under_compile(tk, fmt):
    """Inputs of at least COMPILE_ONE_PASS_MIN_K columns: the compiled graph quantizes them with the one-pass
    kernel (the triton_op qsched::act_quant_fp8, the kernel eager runs); narrower inputs keep the torch ops inductor
    fuses. Compiled output as accurate as eager."""
    k = tk.COMPILE_ONE_PASS_MIN_K
    lin = nn.Sequential(nn.Linear(256, k), nn.GELU(), nn.Linear(k, 256)).cuda().to(torch.bfloat16)
    quantize_(lin, fmt, skip=())
    x = torch.randn(96, 256, device="cuda", dtype=torch.bfloat16)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = lin(x)
        torch.compile(lin, backend=backend, fullgraph=True)(x)
        torch._dynamo.reset()
        compiled = torch.compile(lin, fullgraph=True)(x)
    assert sum("act_quant_fp8" in t for t in seen) == 1, seen  # the wide layer only
    assert compiled.shape == eager.shape
    err = ((compiled.float() - eager.float()).norm() / eager.float().norm()).item()
    assert err < 1e-2, err  # the narrow first layer's torch-op codes may differ from the kernel's by a float8 step


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


# ------------------------------------------------------------------------------------------ fused W4A8 GEMM
def _w4_case(m, n, k, g, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 2
    w = torch.randn(n, k, device="cuda", generator=gen)
    codes, ws = qmath.quantize_weight(w, 4, g)
    return x, codes, ws


def _w4_exact(q, xs, codes, ws, bias=None):
    """float64 reference from the same codes: exact int64 per-group dots, then the scales."""
    m, k = q.shape
    n, groups = ws.shape
    g = k // groups
    qd, cd, wd = q.double(), codes.double(), ws.double()
    ref = torch.zeros(m, n, device=q.device, dtype=torch.float64)
    for i in range(groups):
        ref += (qd[:, i * g:(i + 1) * g] @ cd[:, i * g:(i + 1) * g].t()) * wd[:, i]
    ref *= xs.double()
    return ref if bias is None else ref + bias.double()


@pytest.mark.parametrize("k,g", [(3072, 64), (12288, 64), (256, 128), (512, 256)])
def test_act_quant_perm_layout(tk, k, g):
    x = torch.randn(45, k, device="cuda", dtype=torch.bfloat16)
    q, s, _ = tk.quantize_act_int8(x, 8, True)
    qp, sp, _ = tk.quantize_act_int8(x, 8, True, perm=g)
    qq = q.reshape(45, k // g, g)
    assert torch.equal(qp, torch.cat([qq[..., 0::2], qq[..., 1::2]], -1).reshape(45, k)) and torch.equal(s, sp)


@pytest.mark.parametrize("m,n,k,g", [(4608, 3072, 3072, 64), (300, 512, 12288, 64), (77, 640, 640, 64),
                                     (1, 18432, 3072, 64), (33, 96, 256, 128), (5, 64, 512, 256)])
def test_w4a8_gemm_int32_partials_exact(tk, m, n, k, g):
    """Unit scales: every group's int8 x int4 dot and their float32 sum are exact (|sum| < 2^24)."""
    x, codes, _ = _w4_case(m, n, k, g)
    q, xs, _ = tk.quantize_act_int8(x, 8, True, perm=g)
    ones = torch.ones(n, k // g, device="cuda", dtype=torch.float16)
    y = tk.w4a8_gemm(q, torch.ones_like(xs), qmath.pack_int4(codes), ones, None, torch.float32)
    q0, _, _ = tk.quantize_act_int8(x, 8, True)
    ref = q0.double() @ codes.double().t()  # exact: integers below 2^53
    assert torch.equal(y.double(), ref)


@pytest.mark.parametrize("m,n,k,g", [(4608, 3072, 3072, 64), (4608, 3072, 12288, 64), (300, 640, 640, 64),
                                     (1, 9216, 3072, 64), (40, 96, 256, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_w4a8_gemm_matches_exact_reference(tk, m, n, k, g, bias):
    x, codes, ws = _w4_case(m, n, k, g)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    q, xs, _ = tk.quantize_act_int8(x, 8, True, perm=g)
    q0, _, _ = tk.quantize_act_int8(x, 8, True)
    packed = qmath.pack_int4(codes)
    ref = _w4_exact(q0, xs, codes, ws, b)
    y32 = tk.w4a8_gemm(q, xs, packed, ws, b, torch.float32)
    y16 = tk.w4a8_gemm(q, xs, packed, ws, b, torch.bfloat16)
    assert _rel(y32, ref) < 1e-6  # float32 sums of exact int32 group dots
    assert torch.equal(y16, y32.to(torch.bfloat16))  # the bf16 output is that float32 result, rounded once
    assert _rel(y16, ref) < 2.5e-3  # = the bf16 rounding of the exact result (measured 1.66e-3)


@pytest.mark.parametrize("fmt,kw", [("w4a8", {}), ("w4a4", {}), ("w4a6", {}), ("w4a8", dict(group_size=128))])
@pytest.mark.parametrize("m", [1, 77, 128, 4096])
def test_w4a8_layer_fused_vs_dequant_path(fmt, kw, m):
    """The layer routes through the fused GEMM; it equals that kernel called directly, and the previous dequantize +
    cuBLAS path up to that path's own bf16 roundings (activations, weights, output: ~1.6e-3 each)."""
    from qsched_pack.qsched.quant import kernels

    lin = nn.Linear(3072, 1024).cuda().to(torch.bfloat16)
    q = nn.Sequential(copy.deepcopy(lin))
    quantize_(q, QuantSpec.parse(fmt, **kw), "native")
    layer = q[0]
    layer.fused_w4a8_max_m = 1 << 30  # also run the fused kernel at large M
    x = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16)
    g = layer.in_features // layer.wscale.shape[1]
    with torch.no_grad():
        y = layer(x)
        layer.fused_w4a8 = False
        y_old = layer(x)
    xq, xs, _ = kernels.quantize_act_int8(x, layer.spec.a_bits, True, perm=g)
    direct = kernels.w4a8_gemm(xq, xs, layer.qweight, layer.wscale, layer.bias, torch.bfloat16)
    q0, _, _ = kernels.quantize_act_int8(x, layer.spec.a_bits, True)
    ref = _w4_exact(q0, xs, layer.codes(), layer.wscale, layer.bias)
    assert torch.equal(y, direct)
    assert _rel(y, ref) < 2.5e-3  # measured 1.66e-3: the output's bf16 rounding
    assert _rel(y, y_old) < 4e-3 and _rel(y_old, ref) < 4e-3  # measured 2.5e-3 / 2.3e-3


@pytest.mark.parametrize("m,fused", [(1, True), (16, True), (17, False), (4096, False)])
def test_w4a8_routing_by_token_count(m, fused):
    from qsched_pack.qsched.quant import kernels

    assert kernels.W4A8_FUSED_MAX_M == 16
    lin = nn.Linear(1024, 512).cuda().to(torch.bfloat16)
    q = nn.Sequential(copy.deepcopy(lin))
    quantize_(q, "w4a8", "native")
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        q[0].fused_w4a8 = False
        y_old = q(x)
    assert torch.equal(y, y_old) != fused


@pytest.mark.parametrize("fmt,kw", [("w4a8", dict(act_symmetric=False)), ("w4a16", {}), ("w4a8", dict(group_size=32))])
def test_w4a8_ineligible_layers_keep_dequant_path(fmt, kw):
    lin = nn.Linear(512, 256).cuda().to(torch.bfloat16)
    q = nn.Sequential(copy.deepcopy(lin))
    quantize_(q, QuantSpec.parse(fmt, **kw), "native")
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        q[0].fused_w4a8 = False
        assert torch.equal(y, q(x))


@pytest.mark.parametrize("fmt", ["w4a8", "w4a8-fp8"])
def test_fused_gemm_under_cuda_graph(tk, fmt):
    """The fused W4A8 / W4A8-FP8 GEMMs are capturable: a replayed graph gives the eager result exactly."""
    q = nn.Sequential(nn.Linear(3072, 3072)).cuda().to(torch.bfloat16)
    quantize_(q, fmt, "native")
    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = q(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = q(x)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ w4a8-fp8
def _blockperm(x, block=128):
    """Columns of each block stored even first, then odd (the layout fp8w4_gemm reads)."""
    m, k = x.shape
    return x.reshape(m, k // block, block // 2, 2).transpose(-1, -2).reshape(m, k)


def _fp8w4_case(m, n, k, g, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.distributions.StudentT(3.0).sample((n, k)).cuda() * 0.02
    codes, exps, scale = qmath.quantize_weight_fp8w4(w, g)
    return x, codes, exps, scale


def _fp8w4_ref(xq0, xs, codes, exps, scale, bias):
    ref = (xq0.double() @ qmath.fp8w4_values(codes, exps).double().t()) * xs.double() * scale.double().view(1, -1)
    return ref if bias is None else ref + bias.double()


CONFIGS = [None, (16, 64, 8, 4, 4, True), (64, 128, 8, 4, 4, True), (128, 128, 8, 8, 3, False),
           (128, 64, 8, 4, 3, False)]


def test_fp8_act_quant_perm_layout(tk):
    x = torch.randn(45, 3072, device="cuda", dtype=torch.bfloat16)
    q, s = tk.quantize_act_fp8(x)
    qp, sp = tk.quantize_act_fp8(x, perm=tk.FP8W4_BLOCK_K)
    assert torch.equal(qp.view(torch.uint8), _blockperm(q.view(torch.uint8))) and torch.equal(s, sp)


@pytest.mark.parametrize("m,n,k,g", [(4608, 3072, 3072, 32), (1, 18432, 3072, 32), (77, 640, 2048, 64),
                                     (300, 96, 1280, 128), (33, 3072, 12288, 32)])
@pytest.mark.parametrize("config", CONFIGS)
def test_fp8w4_gemm_small_integers_exact(tk, m, n, k, g, config):
    """Activation codes in {-1, 0, 1}, unit scales, exponents 0..3: every partial sum is an integer below 2^13, so
    even Hopper's reduced-precision float8 accumulation is exact and the float32 output equals the integer product
    bit for bit (checks unpacking, exponent folding, the column permutation and the tiling)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randint(-1, 2, (m, k), device="cuda", generator=gen).float()
    codes = torch.randint(-7, 8, (n, k), device="cuda", generator=gen, dtype=torch.int8)
    exps = torch.randint(0, 4, (n, k // g), device="cuda", generator=gen, dtype=torch.int8)
    xq = _blockperm(a).to(torch.float8_e4m3fn)
    ones_m, ones_n = torch.ones(m, 1, device="cuda"), torch.ones(n, 1, device="cuda")
    y = tk.fp8w4_gemm(xq, ones_m, qmath.pack_int4(codes), exps, ones_n, None, torch.float32, config=config)
    ref = a.double() @ qmath.fp8w4_values(codes, exps).double().t()
    assert torch.equal(y.double(), ref)


@pytest.mark.parametrize("m,n,k,g", [(4608, 3072, 3072, 32), (4608, 3072, 12288, 32), (1, 18432, 3072, 32),
                                     (77, 1280, 2048, 32), (300, 640, 640, 64), (40, 96, 256, 128)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("promote", [True, False])
def test_fp8w4_gemm_matches_float64_reference(tk, m, n, k, g, bias, promote):
    """Real data against a float64 reference built from the same float8 codes. With promote (the default) each
    128-column block's float8 dot is added to a float32 accumulator; without it Triton keeps Hopper's
    reduced-precision float8 accumulation for the whole K. The bf16 output is the float32 result rounded once."""
    x, codes, exps, scale = _fp8w4_case(m, n, k, g)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    xq, xs = tk.quantize_act_fp8(x, perm=tk.FP8W4_BLOCK_K)
    xq0, _ = tk.quantize_act_fp8(x)
    packed = qmath.pack_int4(codes)
    ref = _fp8w4_ref(xq0, xs, codes, exps, scale, b)
    y32 = tk.fp8w4_gemm(xq, xs, packed, exps, scale, b, torch.float32, promote=promote)
    y16 = tk.fp8w4_gemm(xq, xs, packed, exps, scale, b, torch.bfloat16, promote=promote)
    err32 = _rel(y32, ref)
    print(f"fp8w4 {m}x{n}x{k} g{g} bias={bias} promote={promote}: float32 vs float64 {err32:.2e}, "
          f"bf16 vs float64 {_rel(y16, ref):.2e}")
    # Hopper's float8 MMA accumulates with fewer bits than float32: bounded by one 128-column block with promote
    assert err32 < (1e-3 if promote else 2e-2)
    assert _rel(y16, y32) < 2.5e-3 and _rel(y16, ref) < err32 + 3e-3  # + the bf16 rounding (~1.7e-3)


@pytest.mark.parametrize("shape", [(3072, 1024), (96, 48), (80, 40)])
@pytest.mark.parametrize("m", [1, 77, 4096])
def test_w4a8_fp8_layer_close_to_simulated(shape, m):
    """The layer (fused kernel when in_features % 128 == 0, else float8 weights materialised + torch._scaled_mm)
    against the simulated float32 path of the same codes."""
    k, n = shape
    lin = nn.Linear(k, n).cuda().to(torch.bfloat16)
    q = nn.Sequential(copy.deepcopy(lin))
    rep = quantize_(q, "w4a8-fp8", "native", skip=())
    assert rep.quantized == {"0": "fp8w4"} and (("0" in rep.fallbacks) == (k % 128 != 0))
    sim = copy.deepcopy(q)
    sim[0].kernel = "simulated"
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y, ys = q(x), sim(x)
        assert _rel(y, ys) < 5e-3
        assert _rel(y, lin(x)) < 0.12


@pytest.mark.parametrize("n,k,g", [(3072, 3072, 32), (18432, 3072, 32), (640, 2048, 64), (96, 256, 128),
                                   (7, 4096, 32)])
def test_fp8w4_expand_is_bit_exact(tk, n, k, g):
    """The one-pass expansion of the packed codes equals qmath's float8 values code * 2^e bit for bit (every code,
    exponents over the whole range)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    codes = torch.randint(-7, 8, (n, k), device="cuda", generator=gen, dtype=torch.int8)
    exps = torch.randint(qmath.FP8W4_EMIN, qmath.FP8W4_EMAX + 1, (n, k // g), device="cuda", generator=gen,
                         dtype=torch.int8)
    out = tk.fp8w4_expand(qmath.pack_int4(codes), exps)
    ref = qmath.fp8w4_values(codes, exps)
    assert out.dtype == torch.float8_e4m3fn and torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("m", [1, 16, 17, 4608])
def test_w4a8_fp8_routing_by_token_count(tk, m, monkeypatch):
    """Up to FP8W4_FUSED_MAX_M tokens the fused GEMM runs, above it the float8 expansion + torch._scaled_mm; both
    against the float64 reference of the same codes (eager and traced forms give the same numbers)."""
    from qsched_pack.qsched.quant import layers as qlayers

    calls = []
    for name in ("fp8w4_gemm", "fp8w4_expand"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _r=real, _n=name, **kw: (calls.append(_n), _r(*a, **kw))[1])
    x, codes, exps, scale = _fp8w4_case(m, 3072, 3072, 32)
    packed = qmath.pack_int4(codes)
    b = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = qlayers._fp8w4_mm(x, packed, scale, exps, b)
        yt = qlayers._fp8w4_mm(x, packed, scale, exps, b, traceable=True)
    fused = m <= tk.FP8W4_FUSED_MAX_M
    assert calls[0] == ("fp8w4_gemm" if fused else "fp8w4_expand"), calls
    xq0, xs = tk.quantize_act_fp8(x)
    ref = _fp8w4_ref(xq0, xs, codes, exps, scale, b)
    assert _rel(y, ref) < 4e-3 and _rel(yt, ref) < 4e-3
