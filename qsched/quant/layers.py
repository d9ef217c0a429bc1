"""Quantized layers. One storage layout (int8 codes, 4-bit codes packed two per byte, or float8 codes, plus
scales) and four ways to run it, chosen per layer when the model is quantized:

* ``simulated``: dequantize everything and compute in float32: the reference for every format and bit width.
* ``int8_mm``: integer activations x integer weights through ``torch._int_mm`` (int32 accumulation, exact),
  then one rescale. Weights of 5..8 bits with one scale per output channel.
* ``fp8_mm``: float8 e4m3 activations x weights through ``torch._scaled_mm`` with per-token / per-channel scales.
* ``dequant``: group-wise (4-bit) or weight-only formats: the weight is dequantized to the input dtype right before a
  float GEMM and activations are quantize-dequantized per token (one fused Triton kernel each on CUDA). On CUDA,
  packed 4-bit (or narrower) group-wise weights with symmetric int activations of at most 8 bits (w4a8, w4a6, w4a4;
  groups of 64/128/256) run instead as one fused Triton W4A8 GEMM (``kernels.w4a8_gemm``: int8 activation codes x
  int4 weight codes, exact int32 per group, float32 group scales) after one activation-quantize kernel, when the
  call has at most ``fused_w4a8_max_m`` tokens (the GEMV-like calls where it is faster; above that cuBLAS bf16 on
  the dequantized weight wins, see kernels.W4A8_FUSED_MAX_M). Set ``QuantLinear.fused_w4a8 = False`` (class or
  instance) to force the dequantize + float GEMM path.
* ``fp8w4``: ``w4a8-fp8``: packed int4 codes with power-of-two group exponents (int8 ``wexp``) and a float32
  per-channel scale. CUDA: float8 per-token activations x ``kernels.fp8w4_gemm`` (codes -> exact float8 inside the
  K loop, FP8 tensor cores) for calls of at most ``kernels.FP8W4_FUSED_MAX_M`` tokens; larger calls (and layers the
  kernel does not take) expand the weights to their exact float8 values in one pass (``kernels.fp8w4_expand``, a
  transient buffer of the layer's size) for cuBLASLt's ``torch._scaled_mm``. CPU: the same product in float32
  (exact for float8 values).

The auxiliary weight tensor ``waux`` of ``quant_linear`` is the int32 weight-row sums (asymmetric int8 activations)
or the int8 group exponents (``w4a8-fp8``), else None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import qmath
from .spec import QuantSpec

KERNELS = ("simulated", "int8_mm", "fp8_mm", "dequant", "fp8w4")


def _triton():
    """The Triton kernels module, or None off CUDA / without Triton."""
    from . import kernels

    return kernels if kernels.available() else None


def frozen_param(t: torch.Tensor) -> nn.Parameter:
    # Quantized data are (frozen) parameters, not buffers: ComfyUI's memory manager counts, moves and offloads a
    # module's parameters (partial / lowvram loading skips modules that only hold buffers).
    return nn.Parameter(t, requires_grad=False)


# ------------------------------------------------------------------------------------------------ the layer math
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, waux: torch.Tensor | None,
                 bias: torch.Tensor | None, spec: QuantSpec, kernel: str, out_features: int,
                 fused_max_m: int = -1) -> torch.Tensor:
    """``y = x @ W^T + b`` for quantized weights (codes ``qweight`` + scales ``wscale`` [+ ``waux``: weight sums or
    w4a8-fp8 group exponents, see the module docstring]). The only entry point of
    every quantized Linear (the diffusers swap and ComfyUI's load-time ops). ``fused_max_m``: token count up to
    which the fused W4A8 GEMM runs (-1: kernels.W4A8_FUSED_MAX_M, 0: never).

    Under torch.compile the kernel-backed formats are traced as torch ops (``_traceable``); the simulated ones are
    one registered custom op (``torch.ops.qsched.quant_linear``), so Dynamo neither traces into Triton launches nor
    breaks the graph; eager calls skip the dispatcher overhead."""
    args = (x, qweight, wscale, waux, bias, kernel, spec.w_bits, spec.a_bits, spec.a_dtype, spec.act_symmetric,
            out_features, fused_max_m)
    if torch.compiler.is_compiling():
        if COMPILE_FUSE_ACT_QUANT and kernel in TRACEABLE_KERNELS:
            return _traceable(x, qweight, wscale, waux, bias, kernel, spec, out_features)
        return torch.ops.qsched.quant_linear(*args)
    return _quant_linear_impl(*args)


# Under torch.compile, the kernel-backed formats are traced as plain torch ops: the per-token activation
# quantization (inductor fuses it into the op that produced the activations: the norm / modulation / GELU before the
# Linear), then the GEMM: torch._scaled_mm (w8a8-fp8, w4a8-fp8: row-wise scales, bias and bf16 output in
# cuBLASLt's epilogue), torch._int_mm with its rescale epilogue in torch ops inductor fuses (w8a8), or the float
# GEMM on the dequantized weight (w4a8 and the other ``dequant`` formats). 4-bit weights are unpacked by the one-pass
# Triton kernel as a ``torch.library.triton_op`` (inductor writes the launch). No host synchronisation anywhere.
# False: one opaque custom op per layer (measured slower: SDXL w8a8 compiled 3.96x core fp16, slower than eager).
COMPILE_FUSE_ACT_QUANT = True
TRACEABLE_KERNELS = ("fp8_mm", "fp8w4", "int8_mm", "dequant")


def _traceable(x, qweight, wscale, waux, bias, kernel, spec, out_features) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if kernel == "fp8_mm":
        y = _fp8_mm(x2, qweight, wscale, bias, triton_quant=False)
    elif kernel == "fp8w4":
        y = _fp8w4_mm(x2, qweight, wscale, waux, bias, traceable=True)
    elif kernel == "int8_mm":
        y = _int8_mm(x2, qweight, wscale, waux, bias, spec.a_bits, spec.act_symmetric, triton=False)
    else:
        w = dequantize(qweight, wscale, shape[-1], x.dtype)
        xq = x2 if spec.a_bits >= 16 else qmath.fake_quant_act(x2, spec.a_bits, spec.act_symmetric, spec.a_dtype)
        y = F.linear(xq, w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*shape[:-1], out_features)


def _quant_linear_impl(x, qweight, wscale, waux, bias, kernel: str, w_bits: int, a_bits: int, a_dtype: str,
                       act_symmetric: bool, out_features: int, fused_max_m: int) -> torch.Tensor:
    in_features = x.shape[-1]
    packed = qweight.dtype == torch.uint8
    if kernel == "simulated":
        return _simulated(x, qweight, wscale, waux, bias, packed, a_bits, act_symmetric, a_dtype)
    shape = x.shape
    x2 = x.reshape(-1, in_features)
    if kernel == "int8_mm":
        y = _int8_mm(x2, qweight, wscale, waux, bias, a_bits, act_symmetric)
    elif kernel == "fp8_mm":
        y = _fp8_mm(x2, qweight, wscale, bias)
    elif kernel == "fp8w4":
        y = _fp8w4_mm(x2, qweight, wscale, waux, bias)
    else:
        tk = _triton() if x2.is_cuda else None
        group = _fused_group(x2, tk, packed, wscale, a_bits, a_dtype, act_symmetric, fused_max_m)
        if group:
            q, xs, _ = tk.quantize_act_int8(x2, a_bits, True, perm=group)
            y = tk.w4a8_gemm(q, xs, qweight, wscale, bias, x2.dtype)
        else:
            w = dequantize(qweight, wscale, in_features, x.dtype)
            y = F.linear(_act(x2, a_bits, act_symmetric, a_dtype), w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*shape[:-1], out_features)


if hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("qsched::quant_linear", mutates_args=())
    def _quant_linear_op(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, waux: torch.Tensor | None,
                         bias: torch.Tensor | None, kernel: str, w_bits: int, a_bits: int, a_dtype: str,
                         act_symmetric: bool, out_features: int, fused_max_m: int) -> torch.Tensor:
        return _quant_linear_impl(x, qweight, wscale, waux, bias, kernel, w_bits, a_bits, a_dtype, act_symmetric,
                                  out_features, fused_max_m)

    @_quant_linear_op.register_fake
    def _(x, qweight, wscale, waux, bias, kernel, w_bits, a_bits, a_dtype, act_symmetric, out_features,
          fused_max_m):
        return x.new_empty((*x.shape[:-1], out_features))


def dequantize(qweight: torch.Tensor, wscale: torch.Tensor, in_features: int, dtype=torch.float32,
               wexp: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight [N, K] of stored codes (int8, packed 4-bit uint8 or float8) and scales (``wexp``: the
    group exponents of w4a8-fp8)."""
    packed = qweight.dtype == torch.uint8
    if _is_exps(wexp):
        codes = qmath.unpack_int4(qweight) if packed else qweight
        return qmath.dequantize_weight_fp8w4(codes, wexp, wscale, dtype)
    tk = _triton() if qweight.is_cuda else None
    if tk is not None and packed:
        return tk.dequant_int4(qweight, wscale, in_features, dtype)
    codes = qmath.unpack_int4(qweight) if packed else qweight
    if wscale.shape[1] == 1 and dtype != torch.float32:
        return (codes.to(dtype) * wscale.to(dtype)).to(dtype)
    return qmath.dequantize_weight(codes, wscale, dtype)


def _fused_group(x2, tk, packed, wscale, a_bits, a_dtype, act_symmetric, fused_max_m) -> int:
    """The weight group size if this call runs the fused W4A8 GEMM, else 0."""
    if (tk is None or fused_max_m == 0 or not packed or a_bits > 8 or a_dtype != "int" or not act_symmetric
            or x2.dtype not in (torch.bfloat16, torch.float16)):
        return 0
    max_m = tk.W4A8_FUSED_MAX_M if fused_max_m < 0 else fused_max_m
    if x2.shape[0] > max_m:
        return 0
    group = x2.shape[1] // wscale.shape[1]
    return group if group in tk.W4A8_GROUPS else 0


def _is_exps(waux) -> bool:
    return waux is not None and waux.dtype == torch.int8  # w4a8-fp8 group exponents (weight sums are int32)


def _simulated(x, qweight, wscale, waux, bias, packed, a_bits, act_symmetric, a_dtype) -> torch.Tensor:
    xq = qmath.fake_quant_act(x.float(), a_bits, act_symmetric, a_dtype)
    codes = qmath.unpack_int4(qweight) if packed else qweight
    if _is_exps(waux):
        w = qmath.dequantize_weight_fp8w4(codes, waux, wscale)
    else:
        w = qmath.dequantize_weight(codes, wscale)
    return F.linear(xq, w, None if bias is None else bias.float()).to(x.dtype)


def _act(x2: torch.Tensor, a_bits, act_symmetric, a_dtype) -> torch.Tensor:
    """Per-token quantize-dequantize in x's dtype (fused on CUDA)."""
    if a_bits >= 16:
        return x2
    tk = _triton() if x2.is_cuda else None
    if tk is not None:
        return tk.fake_quant_act(x2, a_bits, act_symmetric, a_dtype)
    return qmath.fake_quant_act(x2, a_bits, act_symmetric, a_dtype)


def _pad_rows(x2: torch.Tensor) -> torch.Tensor:
    # torch._int_mm on CUDA wants M > 16: pad small batches (the M = 1 modulation layers of a DiT) with zero
    # rows, which quantize to zero codes and are sliced off. Faster than a bf16 GEMV: the weight read is 1 byte.
    m = x2.shape[0]
    return x2 if (x2.is_cpu or m >= 32) else F.pad(x2, (0, 0, 0, 32 - m))


def _int8_mm(x2, qweight, wscale, wsum, bias, a_bits, act_symmetric, triton: bool = True) -> torch.Tensor:
    """int8 per-token activations x int8 weights through torch._int_mm. ``triton=False`` (under torch.compile): the
    activation quantization and the rescale epilogue in torch ops (fused by inductor) instead of Triton kernels."""
    m = x2.shape[0]
    tk = _triton() if x2.is_cuda and triton else None
    xp = _pad_rows(x2)
    if tk is not None:
        q, xs, xz = tk.quantize_act_int8(xp, a_bits, act_symmetric)
        acc = torch._int_mm(q, qweight.t())
        return tk.int_mm_epilogue(acc, xs, xz, wscale, wsum, bias, x2.dtype)[:m]
    q, xs, xz = qmath.quantize_act(xp, a_bits, act_symmetric)
    acc = torch._int_mm(q.to(torch.int8), qweight.t())
    if xz is not None:
        acc = acc - xz.to(torch.int32) * wsum
    y = acc.float() * xs * wscale.view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y[:m].to(x2.dtype)


def _fp8_mm(x2, qweight, wscale, bias, triton_quant: bool = True) -> torch.Tensor:
    """float8 per-token activations x float8 weights [N, K] (per-channel ``wscale``). ``triton_quant=False`` (under
    torch.compile): the activation quantization in torch ops inductor fuses into the producer, or for wide inputs
    (``kernels.COMPILE_ONE_PASS_MIN_K``) the one-pass kernel as a triton_op."""
    m = x2.shape[0]
    xp = _pad_rows(x2)
    # torch._scaled_mm wants both matrix sizes multiples of 16; other shapes take the float32 product
    scaled_mm = x2.is_cuda and x2.shape[1] % 16 == 0 and qweight.shape[0] % 16 == 0
    tk = _triton() if scaled_mm else None
    if tk is not None and triton_quant:
        q, xs = tk.quantize_act_fp8(xp)
    elif tk is not None and tk.one_pass_traced(x2.shape[1]):
        q, xs = tk.quantize_act_fp8_traced(xp)
    else:
        q, xs = qmath.quantize_act_fp8(xp)
    if not scaled_mm:
        # torch's CPU _scaled_mm takes per-tensor scales only (torch 2.11); the same product in float32:
        # float8 values are exact in float32.
        y = F.linear(q.float(), qweight.float()) * xs * wscale.view(1, -1)
        if bias is not None:
            y = y + bias.float()
        return y[:m].to(x2.dtype)
    # Row-wise scaled FP8 GEMM on CUDA produces bfloat16 only.
    y = torch._scaled_mm(q, qweight.t(), scale_a=xs, scale_b=wscale.view(1, -1), out_dtype=torch.bfloat16,
                         bias=None if bias is None else bias.to(torch.bfloat16))
    return y[:m].to(x2.dtype)


def _fp8w4_mm(x2, packed, wscale, wexp, bias, traceable: bool = False) -> torch.Tensor:
    """w4a8-fp8: float8 per-token activations x (codes * 2^wexp) on the FP8 tensor cores, per-channel scale after.
    Eager on CUDA, up to ``kernels.FP8W4_FUSED_MAX_M`` tokens: the fused W4A8-FP8 GEMM (4-bit weights read once);
    more tokens: the weights expanded to float8 in one pass (``kernels.fp8w4_expand``), then torch._scaled_mm
    (``_fp8_mm``). ``traceable`` (under torch.compile): always the expansion (a ``torch.library.triton_op`` whose
    launch inductor writes into its own code: no Python-side call per layer, which cost ~20 ms of host time per
    FLUX step when measured), the activation quantization as torch ops inductor fuses into the preceding kernel,
    then torch._scaled_mm."""
    m, k = x2.shape
    tk = _triton() if x2.is_cuda else None
    if traceable:
        w8 = tk.fp8w4_expand(packed, wexp) if tk is not None else qmath.fp8w4_values(qmath.unpack_int4(packed), wexp)
        return _fp8_mm(x2, w8, wscale, bias, triton_quant=False)
    if tk is not None and m <= tk.FP8W4_FUSED_MAX_M and tk.fp8w4_eligible(k, k // wexp.shape[1], x2.dtype):
        q, xs = tk.quantize_act_fp8(x2, perm=tk.FP8W4_BLOCK_K)
        return tk.fp8w4_gemm(q, xs, packed, wexp, wscale, None if bias is None else bias.to(x2.dtype), x2.dtype)
    if tk is not None:
        w8 = tk.fp8w4_expand(packed, wexp)
    else:  # the CPU: the same float8 values in torch ops, then the exact float32 product of _fp8_mm
        w8 = qmath.fp8w4_values(qmath.unpack_int4(packed), wexp)
    return _fp8_mm(x2, w8, wscale, bias)


def quantize_linear_weight(w: torch.Tensor, spec: QuantSpec, kernel: str, group_size: int | None,
                           device: torch.device | None = None) -> dict:
    """Codes and scales of one Linear weight [N, K], computed on ``device`` (default: where ``w`` is) and returned
    where ``w`` lives: {"qweight", "wscale"[, "wsum"]}. 4-bit (and narrower) int codes are packed two per byte."""
    home = w.device
    if spec.fp8_folded:
        codes, exps, scale = qmath.quantize_weight_fp8w4(w.detach().to(device or home), group_size)
        if codes.shape[1] % 2:
            raise ValueError(f"w4a8-fp8 needs an even in_features, got {codes.shape[1]}")
        return {"qweight": qmath.pack_int4(codes).to(home), "wscale": scale.to(home), "wexp": exps.to(home)}
    codes, scale = qmath.quantize_weight(w.detach().to(device or home), spec.w_bits, group_size, spec.w_dtype)
    if codes.dtype == torch.int8 and spec.w_bits <= 4 and codes.shape[1] % 2 == 0:
        codes = qmath.pack_int4(codes)
    out = {"qweight": codes.to(home), "wscale": scale.to(home)}
    if kernel == "int8_mm" and not spec.act_symmetric:
        out["wsum"] = codes.sum(1, dtype=torch.int32).to(home)
    return out


def requantize_with_scales(w: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, spec: QuantSpec,
                           wexp: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of a float weight ``w`` [N, K] rounded with the existing scales (a LoRA merged into a quantized layer:
    the scales stay, so restoring the old codes restores the layer exactly). Values beyond the range are clamped.
    ``wexp``: the group exponents of w4a8-fp8 (kept too)."""
    if _is_exps(wexp):
        codes = qmath.requantize_fp8w4(w, wexp, wscale)
        return qmath.pack_int4(codes) if qweight.dtype == torch.uint8 else codes
    scale = wscale.to(w.device).float()
    n, k = w.shape
    wg = w.float().reshape(n, scale.shape[1], k // scale.shape[1]) / scale[..., None]
    if qweight.dtype == qmath.FP8:
        return wg.clamp(-qmath.FP8_MAX, qmath.FP8_MAX).reshape(n, k).to(qmath.FP8)
    qm = qmath.qmax(spec.w_bits)
    codes = torch.round(wg).clamp_(-qm, qm).to(torch.int8).reshape(n, k)
    return qmath.pack_int4(codes) if qweight.dtype == torch.uint8 else codes


class QuantLinear(nn.Module):
    fused_w4a8 = True  # CUDA: run eligible ``dequant`` layers through the fused W4A8 Triton GEMM
    fused_w4a8_max_m: int | None = None  # token count up to which it is used; None: kernels.W4A8_FUSED_MAX_M

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, kernel: str, group_size: int | None,
                 qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
                 wsum: torch.Tensor | None = None, wexp: torch.Tensor | None = None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"invalid kernel={kernel!r}; allowed: {KERNELS}")
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.kernel, self.group_size = spec, kernel, group_size
        self.packed = qweight.dtype == torch.uint8
        self.qweight = frozen_param(qweight)
        self.wscale = frozen_param(wscale)
        self.bias = None if bias is None else frozen_param(bias)
        if kernel == "int8_mm" and not spec.act_symmetric:
            self.wsum = frozen_param(qweight.sum(1, dtype=torch.int32) if wsum is None else wsum)
        else:
            self.wsum = None
        if spec.fp8_folded and wexp is None:
            raise ValueError("w4a8-fp8 layers need their group exponents (wexp)")
        self.wexp = frozen_param(wexp) if spec.fp8_folded else None  # int8 [N, K / group], w4a8-fp8 only

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: QuantSpec, kernel: str, group_size: int | None,
                    device: torch.device | None = None) -> "QuantLinear":
        """Quantize ``lin`` (left unchanged) on ``device`` (default: where its weight lives)."""
        q = quantize_linear_weight(lin.weight, spec, kernel, group_size, device)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        return cls(lin.in_features, lin.out_features, spec, kernel, group_size, q["qweight"], q["wscale"], bias,
                   q.get("wsum"), q.get("wexp"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.spec.name}, "
                f"group_size={self.group_size}, kernel={self.kernel}")

    def codes(self) -> torch.Tensor:
        return qmath.unpack_int4(self.qweight) if self.packed else self.qweight

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.wscale, self.in_features, dtype, self.wexp)

    def _fused_max_m(self) -> int:
        if not self.fused_w4a8:
            return 0
        return -1 if self.fused_w4a8_max_m is None else int(self.fused_w4a8_max_m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight, self.wscale, self.wsum if self.wexp is None else self.wexp, self.bias,
                            self.spec, self.kernel, self.out_features, self._fused_max_m())


class QuantConv2d(nn.Module):
    """Conv2d with fake-quantized weights (per output channel, or per group of the flattened C·kh·kw input) and
    per-pixel activations (one scale per position across channels). Simulated only: there is no fast kernel."""

    def __init__(self, conv: nn.Conv2d, spec: QuantSpec, group_size: int | None, device=None):
        super().__init__()
        self.spec, self.group_size = spec, group_size
        self.weight_shape = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        w = conv.weight.detach()
        codes, scale = qmath.quantize_weight(w.reshape(w.shape[0], -1).to(device or w.device), spec.w_bits,
                                             group_size, spec.w_dtype)
        self.packed = codes.dtype == torch.int8 and spec.w_bits <= 4 and codes.shape[1] % 2 == 0
        if self.packed:
            codes = qmath.pack_int4(codes)
        self.qweight = frozen_param(codes.to(w.device))
        self.wscale = frozen_param(scale.to(w.device))
        self.bias = None if conv.bias is None else frozen_param(conv.bias.detach().clone())

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, format={self.spec.name}, group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        xq = x.float()
        if s.a_bits < 16:
            xq = qmath.fake_quant_act(xq.movedim(1, -1), s.a_bits, s.act_symmetric, s.a_dtype).movedim(-1, 1)
        codes = qmath.unpack_int4(self.qweight) if self.packed else self.qweight
        w = qmath.dequantize_weight(codes, self.wscale).reshape(self.weight_shape)
        y = F.conv2d(xq, w, None if self.bias is None else self.bias.float(), self.stride, self.padding,
                     self.dilation, self.groups)
        return y.to(x.dtype)


class BnbLinear(nn.Module):
    """A bitsandbytes layer with the activation side of the format in front of it.

    8 bit: ``Linear8bitLt(threshold=0)`` is LLM.int8 without outlier columns, i.e. per-token int8 activations x
    per-channel int8 weights with int32 accumulation (inputs go through float16, as bnb requires).
    4 bit: ``Linear4bit`` nf4/fp4 weights (blockwise absmax, block = group size); bnb has no 4-bit x 8-bit GEMM, so
    activations are quantize-dequantized per token before it."""

    def __init__(self, inner: nn.Module, spec: QuantSpec):
        super().__init__()
        self.inner, self.spec = inner.eval(), spec

    def train(self, mode: bool = True) -> "BnbLinear":
        # Inference only. In training mode bnb's CPU int8 path is MatMul8bitFp, which dequantizes the weight and
        # leaves activations unquantized (W8A16), so the inner layer always stays in eval mode.
        super().train(mode)
        self.inner.train(False)
        return self

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: QuantSpec, group_size: int, device=None) -> "BnbLinear":
        from .._compat import require

        bnb = require("bitsandbytes", "bitsandbytes>=0.45", f"format {spec.name!r} (backend 'bitsandbytes')")

        home = lin.weight.device
        work = torch.device(device) if device is not None else home
        has_bias = lin.bias is not None
        w = lin.weight.detach()
        if spec.w_bits == 8:
            inner = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                        threshold=0.0, device="meta")
            inner.weight = bnb.nn.Int8Params(w.to(work, torch.float16, copy=True), requires_grad=False,
                                             has_fp16_weights=False)._quantize(work)
            bias_dtype = torch.float16
        else:
            inner = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=w.dtype,
                                      quant_type=spec.w_dtype, quant_storage=torch.uint8, device="meta")
            inner.weight = bnb.nn.Params4bit(w.to(work, copy=True), requires_grad=False, quant_type=spec.w_dtype,
                                             blocksize=group_size, module=inner)._quantize(work)
            # bitsandbytes 0.50 CPU bug: the AVX512-bf16 packed 4-bit path is wrong for non-contiguous inputs.
            inner.support_avx512bf16_for_cpu = False
            bias_dtype = w.dtype
        if has_bias:
            inner.bias = nn.Parameter(lin.bias.detach().to(work, bias_dtype, copy=True), requires_grad=False)
        else:
            inner.bias = None
        return cls(inner.to(home), spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.w_bits == 8:
            return self.inner(x.to(torch.float16)).to(x.dtype)
        if s.a_bits < 16:
            tk = _triton() if x.is_cuda else None
            if tk is not None:
                x = tk.fake_quant_act(x.reshape(-1, x.shape[-1]), s.a_bits, s.act_symmetric, s.a_dtype
                                      ).reshape(x.shape)
            else:
                x = qmath.fake_quant_act(x, s.a_bits, s.act_symmetric, s.a_dtype)
        return self.inner(x)
