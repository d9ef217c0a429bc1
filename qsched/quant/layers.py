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
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import qmath
from .spec import QuantSpec

KERNELS = ("simulated", "int8_mm", "fp8_mm", "dequant")


def _triton():
    """The Triton kernels module, or None off CUDA / without Triton."""
    from . import kernels

    return kernels if kernels.available() else None


class QuantLinear(nn.Module):
    fused_w4a8 = True  # CUDA: run eligible ``dequant`` layers through the fused W4A8 Triton GEMM
    fused_w4a8_max_m: int | None = None  # token count up to which it is used; None: kernels.W4A8_FUSED_MAX_M

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, kernel: str, group_size: int | None,
                 qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"invalid kernel={kernel!r}; allowed: {KERNELS}")
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.kernel, self.group_size = spec, kernel, group_size
        self.packed = qweight.dtype == torch.uint8
        self.register_buffer("qweight", qweight)
        self.register_buffer("wscale", wscale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        if kernel == "int8_mm" and not spec.act_symmetric:
            self.register_buffer("wsum", qweight.sum(1, dtype=torch.int32))
        else:
            self.wsum = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: QuantSpec, kernel: str, group_size: int | None,
                    device: torch.device | None = None) -> "QuantLinear":
        """Quantize ``lin`` (left unchanged) on ``device`` (default: where its weight lives)."""
        w = lin.weight.detach()
        home = w.device
        codes, scale = qmath.quantize_weight(w.to(device or home), spec.w_bits, group_size, spec.w_dtype)
        if codes.dtype == torch.int8 and spec.w_bits <= 4 and codes.shape[1] % 2 == 0:
            codes = qmath.pack_int4(codes)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        return cls(lin.in_features, lin.out_features, spec, kernel, group_size, codes.to(home), scale.to(home), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.spec.name}, "
                f"group_size={self.group_size}, kernel={self.kernel}")

    def codes(self) -> torch.Tensor:
        return qmath.unpack_int4(self.qweight) if self.packed else self.qweight

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        tk = _triton() if self.qweight.is_cuda else None
        if tk is not None and self.packed:
            return tk.dequant_int4(self.qweight, self.wscale, self.in_features, dtype)
        if self.wscale.shape[1] == 1 and dtype != torch.float32:
            return (self.codes().to(dtype) * self.wscale.to(dtype)).to(dtype)
        return qmath.dequantize_weight(self.codes(), self.wscale, dtype)

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "simulated":
            return self._simulated(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "int8_mm":
            y = self._int8_mm(x2)
        elif self.kernel == "fp8_mm":
            y = self._fp8_mm(x2)
        else:
            tk = _triton() if x2.is_cuda else None
            group = self._fused_group(x2, tk)
            if group:
                y = self._w4a8_fused(x2, tk, group)
            else:
                y = F.linear(self._act(x2), self.dequantized_weight(x.dtype), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def _fused_group(self, x2: torch.Tensor, tk) -> int:
        """The weight group size if this call runs the fused W4A8 GEMM, else 0."""
        s = self.spec
        if (tk is None or not self.fused_w4a8 or not self.packed or s.a_bits > 8 or s.a_dtype != "int"
                or not s.act_symmetric or x2.dtype not in (torch.bfloat16, torch.float16)):
            return 0
        max_m = tk.W4A8_FUSED_MAX_M if self.fused_w4a8_max_m is None else self.fused_w4a8_max_m
        if x2.shape[0] > max_m:
            return 0
        group = self.in_features // self.wscale.shape[1]
        return group if group in tk.W4A8_GROUPS else 0

    def _w4a8_fused(self, x2: torch.Tensor, tk, group: int) -> torch.Tensor:
        s = self.spec
        q, xs, _ = _cached(x2, x2, ("int-perm", s.a_bits, group),
                           lambda: tk.quantize_act_int8(x2, s.a_bits, True, perm=group))
        return tk.w4a8_gemm(q, xs, self.qweight, self.wscale, self.bias, x2.dtype)

    def _simulated(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        xq = qmath.fake_quant_act(x.float(), s.a_bits, s.act_symmetric, s.a_dtype)
        w = qmath.dequantize_weight(self.codes(), self.wscale)
        return F.linear(xq, w, None if self.bias is None else self.bias.float()).to(x.dtype)

    def _act(self, x2: torch.Tensor) -> torch.Tensor:
        """Per-token quantize-dequantize in x's dtype (fused on CUDA)."""
        s = self.spec
        if s.a_bits >= 16:
            return x2
        tk = _triton() if x2.is_cuda else None
        if tk is not None:
            return _cached(x2, x2, ("fake", s.a_bits, s.act_symmetric, s.a_dtype),
                           lambda: tk.fake_quant_act(x2, s.a_bits, s.act_symmetric, s.a_dtype))
        return qmath.fake_quant_act(x2, s.a_bits, s.act_symmetric, s.a_dtype)

    @staticmethod
    def _pad_rows(x2: torch.Tensor) -> torch.Tensor:
        # torch._int_mm on CUDA wants M > 16: pad small batches (the M = 1 modulation layers of a DiT) with zero
        # rows, which quantize to zero codes and are sliced off. Faster than a bf16 GEMV: the weight read is 1 byte.
        m = x2.shape[0]
        return x2 if (x2.is_cpu or m >= 32) else F.pad(x2, (0, 0, 0, 32 - m))

    def _int8_mm(self, x2: torch.Tensor) -> torch.Tensor:
        s = self.spec
        m = x2.shape[0]
        tk = _triton() if x2.is_cuda else None
        if tk is not None:
            xp = self._pad_rows(x2)
            q, xs, xz = _cached(xp, x2, ("int", s.a_bits, s.act_symmetric),
                                lambda: tk.quantize_act_int8(xp, s.a_bits, s.act_symmetric))
            acc = torch._int_mm(q, self.qweight.t())
            return tk.int_mm_epilogue(acc, xs, xz, self.wscale, self.wsum, self.bias, x2.dtype)[:m]
        xp = self._pad_rows(x2)
        q, xs, xz = qmath.quantize_act(xp, s.a_bits, s.act_symmetric)
        acc = torch._int_mm(q.to(torch.int8), self.qweight.t())
        if xz is not None:
            acc = acc - xz.to(torch.int32) * self.wsum
        y = acc.float() * xs * self.wscale.view(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y[:m].to(x2.dtype)

    def _fp8_mm(self, x2: torch.Tensor) -> torch.Tensor:
        m = x2.shape[0]
        xp = self._pad_rows(x2)
        tk = _triton() if x2.is_cuda else None
        if tk is not None:
            q, xs = _cached(xp, x2, ("fp8",), lambda: tk.quantize_act_fp8(xp))
        else:
            # torch's CPU _scaled_mm takes per-tensor scales only (torch 2.11); the same product in float32:
            # float8 values are exact in float32.
            q, xs, _ = qmath.quantize_act(xp, 8, True, "fp8")
            y = F.linear(q, self.qweight.float()) * xs * self.wscale.view(1, -1)
            if self.bias is not None:
                y = y + self.bias.float()
            return y[:m].to(x2.dtype)
        # Row-wise scaled FP8 GEMM on CUDA produces bfloat16 only.
        y = torch._scaled_mm(q, self.qweight.t(), scale_a=xs, scale_b=self.wscale.view(1, -1),
                             out_dtype=torch.bfloat16, bias=None if self.bias is None else self.bias.to(torch.bfloat16))
        return y[:m].to(x2.dtype)


# Attention projections (q, k, v; FLUX single blocks also the MLP-in) read the same input tensor one after another:
# quantize it once. One entry, keyed on the tensor object (weakly held, so a freed tensor whose memory is reused
# can never match) and its version counter (an in-place change invalidates it).
_LAST_ACT: dict = {}


def _layout(xp: torch.Tensor, x2: torch.Tensor) -> tuple:
    return tuple(xp.shape), xp.dtype, x2.data_ptr(), x2.stride()


def _cached(xp: torch.Tensor, x2: torch.Tensor, key: tuple, compute):
    src = x2._base if x2._base is not None else x2
    ref = _LAST_ACT.get("src")
    if (ref is not None and ref() is src and _LAST_ACT["version"] == src._version and _LAST_ACT["key"] == key
            and _LAST_ACT["shape"] == _layout(xp, x2)):
        return _LAST_ACT["value"]
    value = compute()
    _LAST_ACT.update(src=weakref.ref(src), version=src._version, key=key, shape=_layout(xp, x2),
                     value=value)
    return value


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
        self.register_buffer("qweight", codes.to(w.device))
        self.register_buffer("wscale", scale.to(w.device))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

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
        import bitsandbytes as bnb

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
