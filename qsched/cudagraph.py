"""Replay a denoiser step from CUDA graphs: the real-time few-step fast path.

At batch 1 a few-step model is launch-bound (SDXL UNet 512²: 46 ms per step eager, 13.5 ms of GPU time under a CUDA
graph on an H200). ``StepGraphs`` captures one call of a function (the model's ``apply_model``) per input signature
and replays it for later calls with the same shapes:

* the key of a call is its argument tree: every tensor's shape / dtype / device / strides, and every other leaf by
  value (by identity when it cannot be hashed); leaves under ``VOLATILE_KEYS`` (ComfyUI's per-run cond uuids) are
  left out. Tensors are the graph's inputs: they are copied into static buffers before each replay;
* a call with any tensor off CUDA, or with nothing on CUDA, runs eagerly: on the CPU this class is a no-op;
* a new signature is warmed up eagerly on a side stream, captured, then replayed; at most ``max_graphs`` graphs are
  kept (least recently used dropped). If capturing fails (a host synchronisation inside the model, an unsupported
  operation) or signatures keep changing (more captures than replays after ``4 * max_graphs`` captures), the object
  gives up: every later call runs eagerly and ``disabled`` says why;
* the caller must call ``reset(state)`` when the weights may have moved (the graphs read the weights at the
  addresses they had at capture): ``state`` is any hashable description (e.g. the parameters' data pointers);
  a different state drops every graph.

Outputs are cloned (the graph's output buffers are overwritten by the next replay). Results equal the eager call's
bit for bit when the model is deterministic (the same kernels run; tested on the GPU).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.utils import _pytree as pytree

VOLATILE_KEYS = frozenset({"uuids"})


class StepGraphs:
    def __init__(self, max_graphs: int = 2, warmup: int = 2):
        if not (isinstance(max_graphs, int) and max_graphs >= 1):
            raise ValueError(f"invalid max_graphs={max_graphs!r}; allowed: an int >= 1")
        if not (isinstance(warmup, int) and warmup >= 1):
            raise ValueError(f"invalid warmup={warmup!r}; allowed: an int >= 1")
        self.max_graphs, self.warmup = max_graphs, warmup
        self.graphs: OrderedDict = OrderedDict()  # key -> (graph, static tensors, static output tree)
        self.captures = self.replays = self.eager_calls = 0
        self.disabled: str | None = None
        self.eager_reason: str | None = None  # why the last eager call was eager
        self._state = None

    # ------------------------------------------------------------------------------------------------ state
    def reset(self, state=None) -> None:
        """Drop every graph if ``state`` differs from the one they were captured under."""
        if state != self._state:
            self.graphs.clear()
            self._state = state

    def stats(self) -> dict:
        return {"captures": self.captures, "replays": self.replays, "eager_calls": self.eager_calls,
                "graphs": len(self.graphs), "disabled": self.disabled, "eager_reason": self.eager_reason}

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, fn, *args, **kwargs):
        leaves, spec = _flatten((args, kwargs))
        tensors = [leaf for _, leaf in leaves if isinstance(leaf, torch.Tensor)]
        why = self._why_eager(tensors)
        if why is None:
            key = _key(leaves, spec)
            entry = self.graphs.get(key)
            if entry is None:
                entry = self._capture(fn, key, leaves, spec, tensors)
                why = self.disabled
            else:
                self.graphs.move_to_end(key)
        if why is not None:
            self.eager_calls += 1
            self.eager_reason = why
            return fn(*args, **kwargs)
        graph, static, out = entry
        for dst, src in zip(static, tensors):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    def _why_eager(self, tensors) -> str | None:
        if self.disabled:
            return self.disabled
        if not tensors or not torch.cuda.is_available():
            return "no CUDA tensors"
        if not all(t.is_cuda for t in tensors):
            return "a tensor input is not on the GPU (its value could be read on the host and baked into a graph)"
        if self.captures >= 4 * self.max_graphs and self.captures > self.replays:
            self.disabled = (f"input shapes or options changed on most calls ({self.captures} captures, "
                             f"{self.replays} replays): running eagerly")
            return self.disabled
        return None

    def _capture(self, fn, key, leaves, spec, tensors):
        static = [t.clone() for t in tensors]
        it = iter(static)
        tree = pytree.tree_unflatten([next(it) if isinstance(leaf, torch.Tensor) else leaf for _, leaf in leaves],
                                     spec)
        s_args, s_kwargs = tree
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # A host sync (``.item()``, ``nonzero``) inside a capture aborts it and leaves the CUDA generator in
            # capture state (every later ``randn`` then fails): find syncs in the eager warm-up instead.
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        fn(*s_args, **s_kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = fn(*s_args, **s_kwargs)
        except Exception as exc:  # the model cannot be captured: give up on graphs, keep the result correct
            self.disabled = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]}): running eagerly"
            torch.cuda.synchronize()
            return None
        self.captures += 1
        self.graphs[key] = (graph, static, out)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return self.graphs[key]


def _flatten(tree):
    """(path, leaf) pairs without the volatile entries, and the tree spec (volatile leaves stay in the tree)."""
    with_path, spec = pytree.tree_flatten_with_path(tree)
    return with_path, spec


def _volatile(path) -> bool:
    return any(getattr(k, "key", None) in VOLATILE_KEYS for k in path)


def _key(leaves, spec):
    parts = [str(spec)]
    for path, leaf in leaves:
        if _volatile(path):
            continue
        if isinstance(leaf, torch.Tensor):
            parts.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
        else:
            try:
                hash(leaf)
                parts.append(("V", type(leaf).__name__, leaf))
            except TypeError:
                parts.append(("I", id(leaf)))
    return tuple(parts)


def weights_state(module: torch.nn.Module):
    """A hashable description of where a module's weights are: data pointers, shapes and devices of every
    parameter and buffer (the graphs read them at these addresses)."""
    return tuple((t.data_ptr(), t.device.type, tuple(t.shape)) for t in (*module.parameters(), *module.buffers()))
