"""The 8-bit attention option (nodes/attention.py): which calls go to SageAttention, the override's routing and
chaining, the node input. No ComfyUI needed (a stand-in patcher); the real-ComfyUI wiring is
tests/comfy_quant_checks.check_attention; speed and error are GPU measurements (benchmarks/bench_attention_gpu.py)."""

from __future__ import annotations

import copy

import pytest

from qsched_pack.nodes import attention as A
from qsched_pack.nodes.common import NodeInputError


@pytest.mark.parametrize("q, k, heads, mask, skip, ok", [
    ((1, 24, 4608, 128), (1, 24, 4608, 128), 24, None, True, True),      # FLUX: [b, h, tokens, d]
    ((1, 4096, 640), (1, 4096, 640), 10, None, False, True),             # SDXL self-attention, d = 64
    ((1, 4096, 640), (1, 77, 640), 10, None, False, False),              # SDXL text attention: 77 keys
    ((1, 4096, 640), (1, 154, 640), 10, None, False, False),             # two 77-token chunks
    ((1, 1024, 1280), (1, 1024, 1280), 20, "mask", False, False),        # a mask: sage ignores it
    ((1, 256, 320), (1, 256, 320), 8, None, False, False),               # head size 40
    ((1, 8, 256, 96), (1, 8, 256, 96), 8, None, True, True),             # head size 96
    ((1, 8, 256, 80), (1, 8, 256, 80), 8, None, True, False),
    ((1, 8, 256, 64), (1, 8, 256, 64), 8, None, False, False),           # 4-d without skip_reshape
    ((1, 256, 512), (1, 256, 512), 8, None, True, False),                # 3-d with skip_reshape
    ((1, 8, 0, 64), (1, 8, 0, 64), 8, None, True, False),
])
def test_sage_shape_rule(q, k, heads, mask, skip, ok):
    assert A.sage_shape_ok(q, k, heads, mask, skip) is ok


def test_cpu_and_float32_calls_are_not_eligible():
    import torch

    q = torch.zeros(1, 2, 64, 64, dtype=torch.bfloat16)
    assert not A.sage_eligible((q, q, q, 2), {"skip_reshape": True})  # on the CPU
    assert not A.sage_eligible((q, q), {})


def test_override_routes_eligible_calls_to_sage_and_the_rest_onwards(monkeypatch):
    calls = []
    monkeypatch.setattr(A, "sage_eligible", lambda args, kwargs: args[0] == "big")
    sage = lambda *a, **k: calls.append(("sage", a, k)) or "S"  # noqa: E731
    func = lambda *a, **k: calls.append(("func", a, k)) or "F"  # noqa: E731
    ov = A.make_override(sage)
    assert ov(func, "big", 1, mask=None) == "S" and ov(func, "small", 2) == "F"
    assert [c[0] for c in calls] == ["sage", "func"] and calls[0][1] == ("big", 1) and calls[0][2] == {"mask": None}
    prev = lambda f, *a, **k: calls.append(("prev", a, k)) or "P"  # noqa: E731
    chained = A.make_override(sage, prev)
    assert chained(func, "small") == "P" and chained(func, "big") == "S"


class _Patcher:
    """The part of ComfyUI's ModelPatcher the option touches: clone() deep-copies model_options."""

    def __init__(self, opts=None):
        self.model_options = opts if opts is not None else {"transformer_options": {}}

    def clone(self):
        return _Patcher(copy.deepcopy(self.model_options))


def _override(m):
    return m.model_options["transformer_options"].get(A.OVERRIDE_KEY)


def test_apply_sets_removes_and_keeps_foreign_overrides(monkeypatch):
    sage = object()
    monkeypatch.setattr(A, "sage_function", lambda: sage)
    base = _Patcher()
    m = A.apply_attention(base, A.ATTENTION_SAGE, "Node")
    assert _override(m).qsched_attention == A.ATTENTION_SAGE and _override(base) is None  # input untouched
    again = A.apply_attention(m, A.ATTENTION_SAGE, "Node")
    assert _override(again).qsched_previous is None  # not stacked on itself
    assert _override(A.apply_attention(m, A.ATTENTION_16, "Node")) is None
    foreign = lambda func, *a, **k: func(*a, **k)  # noqa: E731
    other = _Patcher({"transformer_options": {A.OVERRIDE_KEY: foreign}})
    s = A.apply_attention(other, A.ATTENTION_SAGE, "Node")
    assert _override(s).qsched_previous is foreign
    assert _override(A.apply_attention(s, A.ATTENTION_16, "Node")) is foreign
    assert _override(A.apply_attention(other, A.ATTENTION_16, "Node")) is foreign


def test_bad_choice_and_missing_package_name_the_input(monkeypatch):
    with pytest.raises(NodeInputError, match="input 'attention'.*one of 16-bit, sage 8-bit"):
        A.apply_attention(_Patcher(), "fp8", "Node")
    monkeypatch.setattr(A, "sage_function", lambda: None)
    with pytest.raises(NodeInputError, match="input 'attention'.*pip install sageattention"):
        A.apply_attention(_Patcher(), A.ATTENTION_SAGE, "Node")


def test_fast_path_node_offers_the_option_defaulting_to_16_bit():
    from qsched_pack.nodes.fastpath import QSchedCudaGraph

    spec = QSchedCudaGraph.INPUT_TYPES()["optional"]["attention"]
    assert tuple(spec[0]) == A.ATTENTION_CHOICES and spec[1]["default"] == A.ATTENTION_16


def _sageattn():
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from sageattention import sageattn
    except ImportError:
        return None
    return sageattn


@pytest.mark.skipif(_sageattn() is None, reason="needs CUDA and the sageattention package")
def test_key_count_rule_on_the_gpu():
    """The reason for the key rule: sageattention's non-causal kernel is close to SDPA when the key count is a
    multiple of 64 and off when it is not (77 text tokens: padded keys enter the softmax). If a sageattention
    release fixes this, this test fails and the rule can go."""
    import torch
    import torch.nn.functional as F

    sageattn = _sageattn()
    errs = {}
    for keys in (128, 77):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.float16, generator=g)
        k, v = (torch.randn(1, 4, keys, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(2))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        out = sageattn(q, k.clone(), v, tensor_layout="HND", is_causal=False)
        errs[keys] = float((out.float() - ref).norm() / ref.norm())
    assert errs[128] < 0.05 < errs[77], errs
