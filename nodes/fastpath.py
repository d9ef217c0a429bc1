"""Q-Sched CUDA Graph: the real-time few-step fast path. A MODEL -> MODEL node that replays each denoiser
call from a CUDA graph (``qsched.cudagraph.StepGraphs``): launch overhead gone, same kernels, same numbers.

It hooks two of ComfyUI's wrapper points (0.3.64 ``comfy.patcher_extension``): APPLY_MODEL (every denoiser call goes
through the graphs) and SAMPLER_SAMPLE (once per sampling run, after ComfyUI has loaded the model: the graphs are
dropped when the weights moved, and not used at all while the model is partially loaded / lowvram, where weights
stream in per call). On the CPU, or with inputs off the GPU, it calls the model unchanged.
"""

from __future__ import annotations

from ..qsched.cudagraph import StepGraphs, weights_state
from . import comfy_compat
from .attention import ATTENTION_16, ATTENTION_CHOICES, apply_attention
from .common import CATEGORY_SAMPLING, NodeInputError

WRAPPER_KEY = "qsched_cuda_graph"


def apply_cuda_graph(model_patcher, max_graphs: int = 2, node: str = "Q-Sched CUDA Graph"):
    """A clone of ``model_patcher`` whose denoiser calls replay from CUDA graphs; returns (clone, StepGraphs)."""
    if not isinstance(max_graphs, int) or not 1 <= max_graphs <= 8:
        raise NodeInputError(node, "max_graphs", f"must be an integer 1..8, got {max_graphs!r}")
    import comfy.patcher_extension as pe

    m = model_patcher.clone()
    m.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY)  # applying the node twice: one set of graphs
    m.remove_wrappers_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)
    graphs = StepGraphs(max_graphs=max_graphs)
    active = [False]

    def sampler_sample(executor, *args, **kwargs):
        guider = args[0] if args else None
        patcher = getattr(guider, "model_patcher", None)
        base = getattr(patcher, "model", None) or m.model
        if getattr(base, "model_lowvram", False) or comfy_compat.is_dynamic(patcher):
            active[0] = False
            graphs.eager_reason = "weights stream in per call (partially loaded / Dynamic VRAM)"
        else:
            active[0] = True
            graphs.reset(weights_state(base))
        try:
            return executor(*args, **kwargs)
        finally:
            active[0] = False

    def apply_model(executor, *args, **kwargs):
        if not active[0]:
            return executor(*args, **kwargs)
        a, k = conds_to_device(args, kwargs)
        return graphs(executor, *a, **k)

    m.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
    return m, graphs


def conds_to_device(args: tuple, kwargs: dict) -> tuple:
    """The arguments of ComfyUI's ``BaseModel._apply_model(x, t, c_concat, c_crossattn, control,
    transformer_options, **extra_conds)`` with every host tensor of the conditioning moved to ``x``'s device.

    ComfyUI hands the conds over on the CPU (the text encoders' intermediate device; ``CONDRegular.process_cond``
    does not move them) and ``_apply_model`` copies them to the GPU itself. A graph cannot replay a host-to-device
    copy of a tensor it did not capture, so the copy happens here, before the graph's inputs are taken: the model
    then gets the same values on the device (``cast_to_device`` leaves them there). ``transformer_options`` (args[5]
    or the keyword) is left as it is: a host tensor there keeps the call eager (StepGraphs says why)."""
    import torch

    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, torch.Tensor) or x.device.type == "cpu":
        return args, kwargs

    def move(v):
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            return v.to(x.device)
        if isinstance(v, (list, tuple)):
            return type(v)(move(e) for e in v)
        return v

    new_args = tuple(a if i == 5 else move(a) for i, a in enumerate(args))
    new_kwargs = {k: (v if k == "transformer_options" else move(v)) for k, v in kwargs.items()}
    return new_args, new_kwargs


class QSchedCudaGraph:
    DISPLAY_NAME = "Q-Sched CUDA Graph"
    DESCRIPTION = ("Real-time few-step fast path: each denoiser step is captured once in a CUDA graph and replayed "
                   "(no per-kernel launch overhead; the same kernels, so the same latent). Best at batch 1 and small "
                   "images (SDXL-Turbo 512²), where the GPU waits for Python. A new image size or batch captures "
                   "again (up to max_graphs kept); a model that cannot be captured, a partially loaded (lowvram) "
                   "model, or the CPU simply run as before. Works after TorchCompileModel too. attention: "
                   "'sage 8-bit' runs the model's attention through ComfyUI's SageAttention path (needs the "
                   "sageattention package).")
    CATEGORY = CATEGORY_SAMPLING
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model; connect it to any sampler (Q-Sched KSampler, KSampler, SamplerCustom).",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to run from CUDA graphs (quantized or not)."}),
            "max_graphs": ("INT", {"default": 2, "min": 1, "max": 8, "tooltip":
                           "How many input shapes (image size / batch / cond-uncond split) keep a captured graph; "
                           "each holds its own activation memory."}),
        }, "optional": {
            "attention": (list(ATTENTION_CHOICES), {"default": ATTENTION_16, "tooltip":
                          "16-bit: the attention ComfyUI chose. sage 8-bit: SageAttention (int8 query x key, "
                          "fp16 softmax x value; package sageattention) for this model only, where it is exact "
                          "enough to promise (no mask, head size 64/96/128, key count a multiple of 64: SDXL's "
                          "77-token text attention stays 16-bit). Meant for large images; changes the image a little "
                          "(speed and error: docs/quantization.md)."}),
        }}

    def patch(self, model, max_graphs=2, attention=ATTENTION_16):
        patched = apply_cuda_graph(apply_attention(model, attention, self.DISPLAY_NAME), max_graphs,
                                   self.DISPLAY_NAME)[0]
        device = getattr(model, "load_device", None)
        if getattr(device, "type", str(device)) != "cuda":
            text = (f"no CUDA GPU: ComfyUI runs this model on {getattr(device, 'type', device)}, so CUDA graphs "
                    "are off and it runs unchanged (they need an NVIDIA GPU)")
        else:
            text = f"CUDA graphs on: each new image size or batch is captured once (up to {max_graphs} kept)"
        return {"ui": {"text": [text]}, "result": (patched,)}


NODE_CLASS_MAPPINGS = {"QSchedCudaGraph": QSchedCudaGraph}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}
