"""qsched.cudagraph.StepGraphs and the Q-Sched CUDA Graph node on the CPU: a no-op fallback with identical output.
The capture/replay itself runs on the GPU (tests/test_quant_gpu.py, marked gpu)."""

from __future__ import annotations

import pytest
import torch

from qsched_pack.qsched.cudagraph import StepGraphs, _flatten, _key, weights_state


def _fn(x, t, c=None, transformer_options=None):
    return x * t.view(-1, 1) + (0 if c is None else c.sum())


def test_cpu_calls_run_eagerly_with_identical_output():
    g = StepGraphs()
    x, t, c = torch.randn(2, 3), torch.tensor([0.5, 2.0]), torch.randn(4)
    for _ in range(3):
        y = g(_fn, x, t, c=c, transformer_options={"uuids": [object()], "sigmas": t})
        assert torch.equal(y, _fn(x, t, c))
    assert g.stats()["eager_calls"] == 3 and g.captures == 0 and g.replays == 0 and g.disabled is None
    # without CUDA: nothing to capture; with CUDA: CPU inputs could be read on the host and baked into a graph
    assert ("not on the GPU" in g.eager_reason) if torch.cuda.is_available() else g.eager_reason == "no CUDA tensors"


def test_key_covers_shapes_and_options_but_not_volatile_uuids():
    t = torch.zeros(1)

    def key(x, opts):
        return _key(*_flatten(((x, t), {"transformer_options": opts})))

    a = torch.zeros(1, 4, 8, 8)
    base = key(a, {"uuids": ["u1"], "cond_or_uncond": [0], "patches": {}})
    assert base == key(torch.ones(1, 4, 8, 8), {"uuids": ["u2"], "cond_or_uncond": [0], "patches": {}})
    assert base != key(torch.zeros(1, 4, 16, 8), {"uuids": ["u1"], "cond_or_uncond": [0], "patches": {}})
    assert base != key(a.half(), {"uuids": ["u1"], "cond_or_uncond": [0], "patches": {}})
    assert base != key(a, {"uuids": ["u1"], "cond_or_uncond": [0, 1], "patches": {}})
    assert base != key(a, {"uuids": ["u1"], "cond_or_uncond": [0], "patches": {"attn1": [len]}})
    assert base != key(a.transpose(2, 3), {"uuids": ["u1"], "cond_or_uncond": [0], "patches": {}})  # strides


def test_reset_drops_graphs_only_when_the_weights_moved():
    g = StepGraphs()
    g.graphs["k"] = ("graph", [], None)
    m = torch.nn.Linear(4, 4)
    g.reset(weights_state(m))
    assert not g.graphs
    g.graphs["k"] = ("graph", [], None)
    g.reset(weights_state(m))
    assert g.graphs  # same addresses: kept
    m.weight.data = m.weight.data.clone()
    g.reset(weights_state(m))
    assert not g.graphs


@pytest.mark.parametrize("kw", [dict(max_graphs=0), dict(warmup=0), dict(max_graphs="2")])
def test_bad_settings_name_the_field(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        StepGraphs(**kw)


def test_node_is_registered_and_checks_its_input():
    from qsched_pack.nodes import NODE_CLASS_MAPPINGS
    from qsched_pack.nodes.common import NodeInputError
    from qsched_pack.nodes.fastpath import QSchedCudaGraph, apply_cuda_graph

    assert NODE_CLASS_MAPPINGS["QSchedCudaGraph"] is QSchedCudaGraph
    assert QSchedCudaGraph.RETURN_TYPES == ("MODEL",)
    with pytest.raises(NodeInputError, match="max_graphs"):
        apply_cuda_graph(object(), 0)


def test_host_conds_move_to_the_latent_device_options_stay():
    """ComfyUI passes the conds on the CPU and moves them inside _apply_model; the fast path moves them first (a
    graph cannot replay that copy). 'meta' stands in for the GPU: every host tensor of the conditioning (positional
    and extra conds, lists of them) goes to x's device with its values' dtype/shape; transformer_options (positional
    or keyword) is untouched; a CPU latent changes nothing."""
    from qsched_pack.nodes.fastpath import conds_to_device

    x, t = torch.zeros(1, 4, 8, 8, device="meta"), torch.zeros(1, device="meta")
    ctx, y, g = torch.randn(1, 7, 16), torch.randn(1, 32), torch.tensor([3.5])
    opts = {"sample_sigmas": torch.ones(5), "cond_or_uncond": [0]}
    args, kwargs = conds_to_device((x, t, None, ctx, None, opts), {"y": y, "guidance": g, "ref": [ctx, 2],
                                                                  "transformer_options": opts})
    assert args[0] is x and args[1] is t and args[2] is None and args[5] is opts
    assert args[3].device.type == "meta" and args[3].shape == ctx.shape and args[3].dtype == ctx.dtype
    assert all(kwargs[k].device.type == "meta" for k in ("y", "guidance"))
    assert kwargs["ref"][0].device.type == "meta" and kwargs["ref"][1] == 2
    assert kwargs["transformer_options"] is opts and opts["sample_sigmas"].device.type == "cpu"
    cpu_args = (torch.zeros(1), t, None, ctx, None, opts)
    assert conds_to_device(cpu_args, {"y": y}) == (cpu_args, {"y": y})


# ------------------------------------------------------------------------------------------------ GPU (device script)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Flatten(2),
                               torch.nn.Linear(64, 64)).cuda().to(torch.bfloat16).eval()


@pytest.mark.gpu
@cuda
def test_replay_equals_eager_bit_for_bit():
    net, g = _net(), StepGraphs()
    with torch.inference_mode():
        for i in range(4):
            x = torch.randn(1, 4, 8, 8, device="cuda", dtype=torch.bfloat16) * (i + 1)
            y = g(net, x)
            assert torch.equal(y, net(x))
    assert (g.captures, g.replays, g.eager_calls) == (1, 4, 0), g.stats()


@pytest.mark.gpu
@cuda
def test_new_shapes_capture_again_and_old_graphs_are_dropped():
    net, g = _net(), StepGraphs(max_graphs=2)
    with torch.inference_mode():
        for b in (1, 2, 3, 1):
            x = torch.randn(b, 4, 8, 8, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(g(net, x), net(x))
    assert g.captures == 4 and len(g.graphs) == 2  # batch 1 was dropped for batch 3 and captured again


@pytest.mark.gpu
@cuda
def test_host_sync_inside_falls_back_to_eager():
    g = StepGraphs()

    def syncing(x):
        return x * float(x.abs().max().item())  # a host read: not capturable

    x = torch.randn(8, device="cuda")
    with torch.inference_mode():
        y = g(syncing, x)
        assert torch.equal(y, syncing(x)) and g.disabled and "capture failed" in g.disabled
        assert torch.equal(g(syncing, x * 2), syncing(x * 2)) and g.eager_calls == 2
    torch.randn(8, device="cuda")  # the failed attempt left the CUDA generator usable (no aborted capture)


@pytest.mark.gpu
@cuda
def test_cpu_tensor_input_runs_eagerly():
    g = StepGraphs()
    x, s = torch.randn(8, device="cuda"), torch.tensor(3.0)
    with torch.inference_mode():
        assert torch.equal(g(lambda a, b: a * b.item(), x, s), x * 3.0)
    assert g.captures == 0 and "not on the GPU" in g.eager_reason


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", ["w4a8-fp8", "w8a8-fp8", "w4a8"])
def test_quantized_model_under_graphs(fmt):
    from qsched_pack.qsched.quant import quantize_

    net = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).cuda()
    net = net.to(torch.bfloat16).eval()
    quantize_(net, fmt, skip=())
    g = StepGraphs()
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(77, 1024, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(g(net, x), net(x))
    assert g.replays == 3
