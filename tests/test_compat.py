"""nodes/comfy_compat.py without ComfyUI: each branch with a stand-in of the core API it follows (0.3.64's and 0.38.1's
``cast_bias_weight``). The same branches run inside real ComfyUI 0.3.64 in tests/comfy_quant_checks.py
(check_newer_core_contract)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from qsched_pack.nodes import comfy_compat


class Layer:
    def __init__(self):
        self.weight = torch.arange(6, dtype=torch.int8).reshape(2, 3)
        self.bias = torch.ones(2)
        self.weight_function, self.bias_function = [], []


@pytest.fixture
def ops(monkeypatch):
    mod = types.ModuleType("comfy.ops")
    pkg = sys.modules.get("comfy") or types.ModuleType("comfy")
    monkeypatch.setitem(sys.modules, "comfy", pkg)
    monkeypatch.setitem(sys.modules, "comfy.ops", mod)
    monkeypatch.setattr(pkg, "ops", mod, raising=False)
    return mod


def test_cast_0_3_64_signature(ops):
    seen = []

    def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None):
        seen.append((list(s.weight_function), dtype, bias_dtype))
        return s.weight, s.bias.to(bias_dtype)

    ops.cast_bias_weight = cast_bias_weight
    layer, patch = Layer(), (lambda w: w * 2)
    layer.weight_function = [patch]
    x = torch.zeros(1, 3, dtype=torch.bfloat16)
    w, b, handle, patches = comfy_compat.cast_stored(layer, x)
    assert w is layer.weight and b.dtype == torch.bfloat16 and handle is None
    assert seen == [([], torch.int8, torch.bfloat16)]  # core never saw the patch, and asked for the codes' dtype
    assert patches == [patch] and layer.weight_function == [patch]  # handed to the layer, restored on the module
    comfy_compat.release(layer, w, b, handle)  # nothing to release on 0.3.64


def test_cast_0_38_signature_offloadable_and_release(ops):
    calls = []

    def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False,
                         compute_dtype=None, want_requant=False):
        calls.append(("cast", offloadable, getattr(s, "weight_lowvram_function", None), dtype))
        return s.weight, s.bias, "handle"

    def uncast_bias_weight(s, w, b, handle):
        calls.append(("uncast", handle))

    ops.cast_bias_weight, ops.uncast_bias_weight = cast_bias_weight, uncast_bias_weight
    layer, lora, wrap = Layer(), object(), (lambda w: w)
    layer.weight_lowvram_function, layer.weight_function = lora, [wrap]
    w, b, handle, patches = comfy_compat.cast_stored(layer, torch.zeros(1, 3))
    assert patches == [lora, wrap]  # Dynamic VRAM's LoRA first, then the wrappers (core's order)
    assert calls == [("cast", True, None, torch.int8)]
    assert layer.weight_lowvram_function is lora and layer.weight_function == [wrap]
    comfy_compat.release(layer, w, b, handle)
    assert calls[-1] == ("uncast", "handle")


def test_patches_are_restored_when_core_raises(ops):
    def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None):
        raise RuntimeError("out of memory")

    ops.cast_bias_weight = cast_bias_weight
    layer, patch = Layer(), (lambda w: w)
    layer.weight_function = [patch]
    with pytest.raises(RuntimeError):
        comfy_compat.cast_stored(layer, torch.zeros(1, 3))
    assert layer.weight_function == [patch] and "weight_lowvram_function" not in layer.__dict__


def test_float_patches_and_dynamic_flag():
    w = torch.ones(2, 2)
    assert torch.equal(comfy_compat.apply_float_patch(lambda t: t * 3, w), w * 3)  # a weight wrapper: float in, out
    assert comfy_compat.is_dynamic(types.SimpleNamespace(is_dynamic=lambda: True))
    assert not comfy_compat.is_dynamic(types.SimpleNamespace())  # 0.3.64 patchers have no is_dynamic
    assert not comfy_compat.is_dynamic(None)
