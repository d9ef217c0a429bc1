"""Deterministic training of the whole tiny world: generator + text encoder, the two JAQ stand-in scorers and the
reference feature network. ``python -m qsched_pack.calibration.tinyworld.train --out DIR`` writes ``DIR/tiny_world.safetensors``.

Determinism: every network has its own seed, every random draw comes from an explicit ``torch.Generator``,
``torch.use_deterministic_algorithms(True)`` is on while training, and the CPU thread count is pinned (float
reductions may be split differently with another count). Same seeds + same torch build + same thread count ->
bit-identical weights (tests/test_tiny_world.py checks it on a reduced run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .data import DEGRADATIONS, STYLES, DigitSet, degrade, load_digit_set
from .model import FlowConfig, TextEncoder, TinyFlowNet, to_model_space
from .scorers import ImageQualityNet, JointClassifierNet, ReferenceNet

GRID_SIGMAS = torch.tensor([k / 8 for k in range(1, 9)])  # every sigma of the 2/4/8-step flow schedules


@dataclass
class TrainConfig:
    gen_steps: int = 6000
    gen_batch: int = 256
    gen_lr: float = 1e-3
    ema: float = 0.999
    grid_fraction: float = 0.5  # share of training sigmas drawn from GRID_SIGMAS (the few-step schedules' values)
    tc_epochs: int = 40
    iq_epochs: int = 30
    ref_epochs: int = 40
    scorer_batch: int = 128
    scorer_lr: float = 2e-3
    seed_gen: int = 0
    seed_tc: int = 1
    seed_iq: int = 2
    seed_ref: int = 3
    threads: int = 1
    flow: dict = field(default_factory=lambda: FlowConfig().to_dict())

    @classmethod
    def reduced(cls) -> "TrainConfig":
        """Seconds-long run for tests: same code paths, a smaller network, a few steps."""
        return cls(gen_steps=30, gen_batch=64, tc_epochs=1, iq_epochs=1, ref_epochs=1,
                   flow=FlowConfig(hidden=64, depth=1, cond_dim=64, text_dim=64, word_dim=32).to_dict())


@contextlib.contextmanager
def deterministic(threads: int):
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _cosine(opt, total: int, warmup: int = 100):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ------------------------------------------------------------------------------------------------ generator
def train_generator(data: DigitSet, cfg: TrainConfig, log=print) -> tuple[TinyFlowNet, TextEncoder]:
    """Rectified flow: x = (1 − s)·x0 + s·n, loss ||net(x, s, text) − (n − x0)||². Returns the EMA weights."""
    torch.manual_seed(cfg.seed_gen)  # parameter init
    fc = FlowConfig(**cfg.flow)
    net, enc = TinyFlowNet(fc), TextEncoder(fc.word_dim, fc.text_dim)
    from .data import tokenize

    ids_all = tokenize(data.prompts)
    x0_all = to_model_space(data.images)
    params = list(net.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.gen_lr, weight_decay=0.0)
    sched = _cosine(opt, cfg.gen_steps)
    ema_net, ema_enc = copy.deepcopy(net), copy.deepcopy(enc)
    g = _seeded(cfg.seed_gen + 1000)
    n = len(data)
    t0 = time.perf_counter()
    for step in range(cfg.gen_steps):
        idx = torch.randint(0, n, (cfg.gen_batch,), generator=g)
        x0, ids = x0_all[idx], ids_all[idx]
        u = torch.rand(cfg.gen_batch, generator=g)
        grid = GRID_SIGMAS[torch.randint(0, len(GRID_SIGMAS), (cfg.gen_batch,), generator=g)]
        sigma = torch.where(torch.rand(cfg.gen_batch, generator=g) < cfg.grid_fraction, grid, u)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.reshape(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        loss = F.mse_loss(net(xt, sigma, enc(ids)), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for e, p in zip(list(ema_net.parameters()) + list(ema_enc.parameters()), params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if log and (step % 1000 == 0 or step == cfg.gen_steps - 1):
            log(f"  generator step {step:5d}/{cfg.gen_steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s")
    return ema_net.eval(), ema_enc.eval()


# ------------------------------------------------------------------------------------------------ scorers
def _fit_classifier(model: nn.Module, inputs, targets, epochs: int, cfg: TrainConfig, seed: int, augment=None,
                    log=print, what: str = "classifier") -> nn.Module:
    g = _seeded(seed + 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.scorer_lr, weight_decay=1e-4)
    n = inputs.shape[0]
    steps = epochs * max(1, n // cfg.scorer_batch)
    sched = _cosine(opt, steps, warmup=min(50, steps))
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(max(1, n // cfg.scorer_batch)):
            idx = perm[b * cfg.scorer_batch:(b + 1) * cfg.scorer_batch]
            x, y = inputs[idx], targets[idx]
            if augment is not None:
                x, y = augment(x, y, g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log and (epoch % 10 == 0 or epoch == epochs - 1):
            log(f"  {what} epoch {epoch:3d}/{epochs}  loss {loss.item():.4f}")
    return model.eval()


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels (zero = paper fill)."""
    b = x.shape[0]
    dx = torch.randint(-max_shift, max_shift + 1, (b,), generator=g)
    dy = torch.randint(-max_shift, max_shift + 1, (b,), generator=g)
    out = torch.zeros_like(x)
    for i in range(b):
        out[i] = torch.roll(x[i], shifts=(int(dy[i]), int(dx[i])), dims=(-2, -1))
    return out


def _light_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild pixel noise so that classifiers do not depend on perfectly clean inputs."""
    amp = 0.05 * torch.rand(x.shape[0], 1, 1, 1, generator=g)
    return (x + amp * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_tc(data: DigitSet, cfg: TrainConfig, log=print) -> JointClassifierNet:
    """Text alignment: a 20-way (digit x style) classifier; light noise augmentation."""
    torch.manual_seed(cfg.seed_tc)
    model = JointClassifierNet(10 * len(STYLES))
    return _fit_classifier(model, data.images, data.joint, cfg.tc_epochs, cfg, cfg.seed_tc,
                           augment=lambda x, y, g: (_light_noise(x, g), y), log=log, what="TC classifier")


def degraded_batch(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random degradation per image, strength U(0.25, 1): the negatives of the quality discriminator."""
    b = x.shape[0]
    kinds = torch.randint(0, len(DEGRADATIONS), (b,), generator=g)
    strength = 0.25 + 0.75 * torch.rand(b, generator=g)
    others = x[torch.randperm(b, generator=g)]
    out = x.clone()
    for k, kind in enumerate(DEGRADATIONS):
        m = kinds == k
        if m.any():
            out[m] = degrade(x[m], kind, strength[m], generator=g, others=others[m])
    return out


def train_iq(data: DigitSet, cfg: TrainConfig, log=print) -> ImageQualityNet:
    """Image quality: real (class 1) vs degraded (class 0); each batch is half real, half degraded."""
    torch.manual_seed(cfg.seed_iq)
    model = ImageQualityNet()

    def augment(x, _y, g):
        half = x.shape[0] // 2
        fake = degraded_batch(x[half:], g)
        x = torch.cat([_light_noise(x[:half], g), fake])
        y = torch.cat([torch.ones(half, dtype=torch.long), torch.zeros(x.shape[0] - half, dtype=torch.long)])
        return x, y

    return _fit_classifier(model, data.images, torch.zeros(len(data), dtype=torch.long), cfg.iq_epochs, cfg,
                           cfg.seed_iq, augment=augment, log=log, what="IQ discriminator")


def train_reference(data: DigitSet, cfg: TrainConfig, log=print) -> ReferenceNet:
    """Reference features (Fréchet distance) and digit accuracy: an MLP (not the TC's CNN), its own seed,
    one-pixel shift augmentation, digit labels only."""
    torch.manual_seed(cfg.seed_ref)
    model = ReferenceNet()
    return _fit_classifier(model, data.images, data.digits, cfg.ref_epochs, cfg, cfg.seed_ref,
                           augment=lambda x, y, g: (_shift(x, g), y), log=log, what="reference net")


# ------------------------------------------------------------------------------------------------ all of it
def train_world(cfg: TrainConfig | None = None, log=print) -> dict:
    """Train every network; returns ``{"config": ..., "generator": net, "text_encoder": enc, "tc": ..., "iq": ...,
    "ref": ..., "seconds": {...}}``."""
    cfg = cfg or TrainConfig()
    train = load_digit_set("train")
    seconds = {}
    with deterministic(cfg.threads):
        t = time.perf_counter()
        gen, enc = train_generator(train, cfg, log)
        seconds["generator"] = time.perf_counter() - t
        nets = {}
        for name, fn in (("tc", train_tc), ("iq", train_iq), ("ref", train_reference)):
            t = time.perf_counter()
            nets[name] = fn(train, cfg, log)
            seconds[name] = time.perf_counter() - t
    return {"config": asdict(cfg), "generator": gen, "text_encoder": enc, **nets,
            "seconds": seconds}


def load_or_train(path=None, log=print):
    """The tiny world from ``path`` / the pack / the cache; if there are no weights, train them into the cache
    first (a few minutes on CPU). What ``qsched demo`` and ``qsched experiment`` use."""
    from .world import TinyWorld

    if path is not None or checkpoint.find() is not None:
        return TinyWorld.load(path)
    target = checkpoint.cached_path()
    if log:
        log(f"training the tiny world into {target} (one time, a few minutes on CPU)")
    save_world(train_world(log=log), target)
    return TinyWorld.from_file(target)


def save_world(world: dict, path) -> str:
    """Write the networks of ``train_world``'s result to ``path`` (``checkpoint`` format, atomically)."""
    return checkpoint.save({part: world[part].state_dict() for part in checkpoint.PARTS}, world["config"], path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched_pack.calibration.tinyworld.train",
                                description="Train the tiny world (generator, text encoder, scorers, reference net).")
    p.add_argument("--out", required=True, help=f"output folder (writes {checkpoint.WEIGHTS_NAME})")
    p.add_argument("--reduced", action="store_true", help="seconds-long run (tests / smoke)")
    p.add_argument("--gen-steps", type=int, default=None, help="generator optimisation steps (default 6000)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1: fixes the float reductions, and a busy 2-core CPU is much slower with 2)")
    args = p.parse_args(argv)
    cfg = TrainConfig.reduced() if args.reduced else TrainConfig()
    if args.gen_steps is not None:
        cfg.gen_steps = args.gen_steps
    if args.threads is not None:
        cfg.threads = args.threads
    t0 = time.perf_counter()
    world = train_world(cfg)
    path = save_world(world, os.path.join(args.out, checkpoint.WEIGHTS_NAME))
    print(f"trained in {time.perf_counter() - t0:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in world['seconds'].items())})"
          f" -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
