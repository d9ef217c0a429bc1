"""Benchmark: Algorithm 1's full grid on the shape world, one point at a time vs many points per network call
(``calibration.shapeworld.world.PointBatched``, the runner's ``generate_many`` hook), side by side in one run.

For each (family, steps): the same grid search (``experiment._search``, W4A8, seed 0, 20 calibration prompts,
``--points`` per axis) unbatched and batched; checks that both pick the same point with the same scores, and
reports wall time and the UNet calls per grid point. One call of the quantized UNet is ~670 torch operators,
each at least one kernel launch on a GPU (~5-10 µs of CPU, more when processes share the GPU): that is what
bounds these tiny models there, and what batching divides by the number of points per call (each point still
runs its own sampler update, a few operators per step). The CPU is compute-bound instead: per image the UNet
even gets slower in large batches (cache), so batching gains little there apart from scoring.

    PYTHONPATH=<shim> .venv/bin/python benchmarks/bench_shapeworld_batch.py   # CPU, 9x9 grid, 2 steps, flow + tcd
    .venv/bin/python benchmarks/bench_shapeworld_batch.py --points 21 --steps 2 4 8 --device cuda
Prints a markdown table; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from qsched_pack.calibration.shapeworld import experiment as E
from qsched_pack.calibration.shapeworld.world import ShapeWorld


def count_calls(net) -> list:
    """A counter of ``net``'s forward calls (a module hook: it sees the calls of every thread)."""
    calls = [0]
    net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=["flow", "tcd"])
    p.add_argument("--steps", type=int, nargs="+", default=[2])
    p.add_argument("--points", type=int, default=9)
    p.add_argument("--batch", type=int, nargs="+", default=[80, 1280], help="images per network call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    world = ShapeWorld.load(device=a.device)
    jaq = world.jaq()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    lines = [f"Grid of {a.points}x{a.points} points (+ identity) x 20 prompts, W4A8, seed 0, device {a.device}, "
             f"{a.threads} thread(s), torch {torch.__version__}.", "",
             "| family | steps | images per call | wall s | s per point | UNet calls per point | speed-up | "
             "same best point and scores |", "|---|---|---|---|---|---|---|---|"]
    for fam in a.families:
        net = world.quantized(fam, "w4a8")[0]
        calls = count_calls(net)
        for steps in a.steps:
            gen = world.generator(fam, steps, net=net, quant="w4a8")
            E._search(gen, jaq, 0, 2, "grid", None, batch=0)  # warm-up (kernels, caches, text encodings)
            base = None
            for batch in [0] + a.batch:
                sync()
                calls[0] = 0
                t0 = time.perf_counter()
                res, _ = E._search(gen, jaq, 0, a.points, "grid", None, batch=batch)
                sync()
                wall = time.perf_counter() - t0
                n = len(res.points)
                if base is None:
                    base = (wall, res)
                    same = "(reference)"
                else:
                    scores = [x.score for x in res.points]
                    ref = [x.score for x in base[1].points]
                    dev = max(abs(x - y) for x, y in zip(scores, ref))
                    same = f"{'yes' if res.best_point == base[1].best_point else 'NO'} (max score diff {dev:.1e})"
                lines.append(f"| {fam} | {steps} | {batch or 20} | {wall:.2f} | {wall / n * 1e3:.1f} ms | "
                             f"{calls[0] / n:.3f} | {base[0] / wall:.2f}x | {same} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
