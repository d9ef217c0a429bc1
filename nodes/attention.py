"""8-bit attention for one model: ComfyUI's own SageAttention path (PyPI ``sageattention``), per model.

ComfyUI 0.3.64 runs every attention call through ``wrap_attn`` (``comfy.ldm.modules.attention``), which hands the
call to ``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` when a model sets one; and it
registers its SageAttention function as ``"sage"`` when the ``sageattention`` package imports. The pack sets that
override on a clone of the model (the ``attention`` input of the Q-Sched CUDA Graph node): eligible calls go to
ComfyUI's ``attention_sage`` (int8 Q·K, fp16 P·V, the library's Triton kernels), the rest to the 16-bit function
ComfyUI chose. So ``--use-sage-attention`` is not needed, and other models in the same workflow keep 16-bit attention.

Eligible (``sage_eligible``): CUDA fp16/bf16 inputs, head size 64, 96 or 128, no mask, and a key count that is a
multiple of 64. sageattention 1.0.x ignores masks, and its non-causal kernel does not mask the keys past the end of
the last 64-key block (they enter the softmax with logit 0): SDXL's cross-attention over 77 text tokens would be
wrong, so it stays 16-bit. Measured speed and error: docs/quantization.md ("8-bit attention").
"""

from __future__ import annotations

from .common import NodeInputError

ATTENTION_16 = "16-bit"
ATTENTION_SAGE = "sage 8-bit"
ATTENTION_CHOICES = (ATTENTION_16, ATTENTION_SAGE)
OVERRIDE_KEY = "optimized_attention_override"
SAGE_HEAD_DIMS = (64, 96, 128)
SAGE_KEY_BLOCK = 64


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def sage_eligible(args: tuple, kwargs: dict) -> bool:
    """Whether one call of ComfyUI's attention function ``(q, k, v, heads, mask=None, ..., skip_reshape=False)``
    can run SageAttention with the result it promises: CUDA fp16/bf16 inputs and ``sage_shape_ok``."""
    import torch

    if len(args) < 4:
        return False
    q = args[0]
    return (isinstance(q, torch.Tensor) and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and sage_shape_ok(q.shape, args[1].shape, args[3], _arg(args, kwargs, 4, "mask"),
                              kwargs.get("skip_reshape", False)))


def sage_shape_ok(q_shape, k_shape, heads: int, mask, skip_reshape: bool) -> bool:
    """No mask, head size in SAGE_HEAD_DIMS, key count a multiple of SAGE_KEY_BLOCK. Layouts: ``skip_reshape``
    [batch, heads, tokens, head size], else [batch, tokens, heads * head size]."""
    if mask is not None or len(q_shape) != len(k_shape) or len(q_shape) != (4 if skip_reshape else 3):
        return False
    head_dim = q_shape[-1] if skip_reshape else q_shape[-1] // heads
    keys = k_shape[-2]
    return head_dim in SAGE_HEAD_DIMS and keys > 0 and keys % SAGE_KEY_BLOCK == 0


def sage_function():
    """ComfyUI's registered SageAttention function, or None when ``sageattention`` did not import."""
    from comfy.ldm.modules import attention

    return attention.get_attention_function("sage", None)


def make_override(sage, previous=None):
    """The ``optimized_attention_override``: eligible calls to ``sage``, the rest to ``previous`` (an override that
    was already set, e.g. by another node) or to the function ComfyUI picked."""

    def override(func, *args, **kwargs):
        if sage_eligible(args, kwargs):
            return sage(*args, **kwargs)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    override.qsched_attention = ATTENTION_SAGE
    override.qsched_previous = previous
    return override


def apply_attention(model_patcher, attention: str, node: str, input_name: str = "attention"):
    """A clone of ``model_patcher`` whose attention runs as ``attention`` (ATTENTION_CHOICES); the input model is
    untouched. Applying it again replaces the pack's own override (an override set by something else is kept and
    still gets the calls SageAttention does not take)."""
    if attention not in ATTENTION_CHOICES:
        raise NodeInputError(node, input_name, f"{attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    m = model_patcher.clone()
    opts = m.model_options.setdefault("transformer_options", {})
    current = opts.get(OVERRIDE_KEY)
    previous = getattr(current, "qsched_previous", current) if getattr(current, "qsched_attention", None) else current
    if attention == ATTENTION_16:
        if previous is None:
            opts.pop(OVERRIDE_KEY, None)
        else:
            opts[OVERRIDE_KEY] = previous
        return m
    sage = sage_function()
    if sage is None:
        raise NodeInputError(node, input_name, f"'{ATTENTION_SAGE}' needs the Python package sageattention in "
                             "ComfyUI's environment (python -m pip install sageattention; it needs an NVIDIA GPU and "
                             f"Triton), then restart ComfyUI; or choose '{ATTENTION_16}'")
    opts[OVERRIDE_KEY] = make_override(sage, previous)
    return m
