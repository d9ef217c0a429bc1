"""Train the shape world: a rectified-flow UNet (the flow family and the teacher), LCM and TCD students (consistency
distillation on SD's VP schedule), the tiny CLIP (contrastive, with quality captions) and the reference network.

    python -m qsched_pack.calibration.shapeworld.train --out DIR [--reduced] [--parts flow lcm tcd clip ref]

Every part is a function seeded from ``cfg["seed"]`` with explicit generators, writing ``DIR/<part>.pt`` (a plain
state dict) and ``DIR/<part>.steps.json``; ``--parts`` runs a subset (``lcm``/``tcd`` read ``flow.pt``), ``--assemble``
then writes the world's two weight files. Lengths: ``FULL`` with ``--timed`` (each part for ``GPU_SECONDS``, the
shipped weights; the step count is fixed after 30 probe steps and recorded), ``--steps-from DIR`` (exactly the step
counts of an earlier run) or ``REDUCED`` (CPU smoke run for CI, seconds).

Distillation (the paper's few-step families, in miniature; docs/shape_world.md):

* flow: rectified flow (v = noise − x0), trained directly, half of the sigmas from the 2/4/8-step Euler schedules.
* LCM student (init = teacher): consistency distillation on the 50-step grid: the target is the EMA student's
  consistency function ``c_skip(t)·x + c_out(t)·x0`` at t − SKIP, reached from x_t by one DDIM step of the teacher
  (timestep scaling 10, sigma_data 0.5: the ``lcm`` sampler's boundary condition).
* TCD student (init = teacher): trajectory consistency: the student's DDIM jump x_t -> x_s, s ~ U{0..t − SKIP},
  must equal the EMA student's jump from the teacher-stepped x_{t−SKIP} to the same s (the ``tcd`` sampler's steps).
* Teacher and students are read on the VP path through ``nets.vp_from_flow`` (exact change of variables).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from ...qsched._io import atomic_write, atomic_write_text
from ...qsched.schedules import alphas_cumprod_scaled_linear, lcm_timesteps
from . import data as D
from .nets import ClipConfig, ReferenceNet, ShapeUNet, build_clip, vp_from_flow

FULL = dict(seed=0, pool=60000, batch=256, distill_steps=10000, flow_steps=20000,
            clip_steps=20000, clip_batch=512, ref_steps=10000, lr=2e-3, ema=0.999, target_ema=0.95,
            distill_ema=0.995, tf32=True, seconds=None)
REDUCED = dict(seed=0, pool=256, batch=16, distill_steps=4, flow_steps=8, clip_steps=10,
               clip_batch=32, ref_steps=8, lr=2e-3, ema=0.9, target_ema=0.9, distill_ema=0.9,
               tf32=False, seconds=None)
#: the GPU run: seconds of training per part (parts run in parallel processes; steps = as many as fit)
GPU_SECONDS = {"distill": 45, "flow": 120, "clip": 120, "ref": 50}
SKIP = 40  # timesteps between a point and its consistency target (2 cells of the 50-step LCM grid; LCM uses 1)
PARTS = ("flow", "lcm", "tcd", "clip", "ref")
#: per-part seed offsets (fixed: the shipped weights were trained with them; 0 was an eps teacher, now dropped)
SEED_INDEX = {"lcm": 1, "tcd": 2, "flow": 3, "clip": 4, "ref": 5}
POOL_SEED = 1  # training renders (seeds 1..); held-out renders use HELDOUT_SEED (never trained on)
HELDOUT_SEED = 777_000


def pool(cfg, device) -> D.Scenes:
    """The training renders (random factors, ``cfg["pool"]`` images), rendered in chunks on ``device``."""
    chunks, n, i = [], cfg["pool"], 0
    while i < n:
        m = min(4096, n - i)
        chunks.append(D.make_scenes(m, POOL_SEED + i, device))
        i += m
    return D.Scenes(torch.cat([c.images for c in chunks]),
                    {k: torch.cat([c.factors[k] for c in chunks]) for k in chunks[0].factors},
                    [cap for c in chunks for cap in c.captions])


class StepPlan:
    """How many steps a part trains: ``steps`` (fixed, reproducible), or as many as fit in ``seconds`` (at most
    ``steps``; the count is fixed after ``probe`` steps from their measured speed and reported, so a rerun with
    that count reproduces the run). The cosine learning-rate schedule follows the final count."""

    def __init__(self, steps: int, seconds: float | None = None, probe: int = 30):
        self.total, self.seconds, self.probe = int(steps), seconds, probe
        self._t0 = None

    def tick(self, step: int) -> None:
        if self.seconds is None:
            return
        if step == 5:
            self._t0 = time.perf_counter()  # after warm-up (cuDNN autotuning, allocator)
        if step == 5 + self.probe:
            per = (time.perf_counter() - self._t0) / self.probe
            spent = per * step
            self.total = max(step + 1, min(self.total, int((self.seconds - spent) / per) + step))

    def lr(self, s: int) -> float:
        return min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, self.total) / max(self.total, 1)))


def _plan(cfg, key: str) -> StepPlan:
    budget = (cfg.get("seconds") or {}).get(key.replace("_steps", ""))
    return StepPlan(cfg[key], budget)


def _opt(params, cfg, plan: StepPlan):
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr)
    return opt, sched


def _autocast(device):
    """bf16 autocast for the UNets on CUDA (speed); a no-op on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _update(opt, sched, loss, params, clip: float | None = 1.0) -> None:
    """One optimiser step (gradient clipping to ``clip`` unless None) and one scheduler step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()


def _progress(log, name: str, step: int, plan, loss, t0: float, every: int = 1000) -> None:
    if log and (step % every == 0 or step == plan.total - 1):
        log(f"{name} step {step}/{plan.total} loss {loss.item():.5f} ({time.perf_counter() - t0:.0f} s)")
    plan.tick(step)


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def _batch(sc: D.Scenes, g: torch.Generator, n: int, device):
    idx = torch.randint(0, sc.images.shape[0], (n,), generator=g)
    return sc.images[idx.to(sc.images.device)].to(device) * 2 - 1, [sc.captions[i] for i in idx.tolist()]


def _setup(cfg, device, part):
    torch.manual_seed(cfg["seed"] + SEED_INDEX[part])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
        torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    g = torch.Generator().manual_seed(cfg["seed"] * 1000 + SEED_INDEX[part])
    return g


def _randn(shape, g, device):
    return torch.randn(shape, generator=g).to(device)


def _lcm_scalings(t: torch.Tensor, scaling: float = 10.0, sigma_data: float = 0.5):
    ts = t.float() * scaling
    c_skip = sigma_data ** 2 / (ts ** 2 + sigma_data ** 2)
    c_out = ts / (ts ** 2 + sigma_data ** 2).sqrt()
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def distill(cfg, device, teacher_sd: dict, kind: str, log=print, scenes=None) -> dict:
    """LCM (``kind="lcm"``) or TCD (``kind="tcd"``) consistency distillation from the teacher, on SD's VP schedule
    (module doc). The teacher is the rectified-flow UNet read in VP coordinates (``nets.vp_from_flow``), the
    students start from it and keep that parameterization (their samplers see eps models)."""
    g = _setup(cfg, device, kind)
    sc = scenes if scenes is not None else pool(cfg, device)
    teacher = ShapeUNet().to(device)
    teacher.load_state_dict(teacher_sd)
    teacher.requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    target = copy.deepcopy(teacher)  # EMA student (the consistency target)
    ema = copy.deepcopy(teacher)  # slow EMA (the shipped weights)
    ac = alphas_cumprod_scaled_linear().float().to(device)
    grid = torch.tensor(sorted(lcm_timesteps(50)), device=device)  # 19, 39, ..., 999
    plan = _plan(cfg, "distill_steps")
    opt, sched = _opt(student.parameters(), dict(cfg, lr=cfg["lr"] * 0.25), plan)
    t0 = time.perf_counter()
    step = 0
    while step < plan.total:
        x0, caps = _batch(sc, g, cfg["batch"], device)
        n = x0.shape[0]
        idx = torch.randint(0, len(grid), (n,), generator=g).to(device)
        t, t_prev = grid[idx], grid[idx] - SKIP  # < 0 at the bottom: the boundary (alpha_bar = 1)
        bottom = (t_prev < 0)[:, None, None, None]
        eps = _randn(x0.shape, g, device)
        ab = ac[t][:, None, None, None]
        ab_prev = torch.where(t_prev >= 0, ac[t_prev.clamp_min(0)], torch.ones_like(ac[0:1]))[:, None, None, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        with torch.no_grad(), _autocast(device):
            e_t, x0_t = (v.float() for v in vp_from_flow(teacher, xt, ab, teacher.encode(caps)))
            x_prev = ab_prev.sqrt() * x0_t + (1 - ab_prev).sqrt() * e_t  # one teacher DDIM step
            e_p, x0_p = (v.float() for v in vp_from_flow(target, x_prev, ab_prev.clamp(max=ac[0]),
                                                          target.encode(caps)))
            e_p, x0_p = torch.where(bottom, e_t, e_p), torch.where(bottom, x_prev, x0_p)
            if kind == "lcm":
                c_skip, c_out = _lcm_scalings(t_prev.clamp_min(0))
                tgt = torch.where(bottom, x_prev, c_skip * x_prev + c_out * x0_p)
            else:
                s = (torch.rand(n, generator=g).to(device) * (t_prev.clamp_min(0) + 1).float()).long()
                ab_s = ac[s][:, None, None, None]
                tgt = ab_s.sqrt() * x0_p + (1 - ab_s).sqrt() * e_p
        with _autocast(device):
            e_s, x0_s = (v.float() for v in vp_from_flow(student, xt, ab, student.encode(caps)))
        if kind == "lcm":
            c_skip, c_out = _lcm_scalings(t)
            pred = c_skip * xt + c_out * x0_s
        else:
            pred = ab_s.sqrt() * x0_s + (1 - ab_s).sqrt() * e_s
        loss = F.mse_loss(pred, tgt)
        _update(opt, sched, loss, student.parameters())
        _ema_update(target, student, cfg["target_ema"])
        _ema_update(ema, student, cfg["distill_ema"])
        _progress(log, kind, step, plan, loss, t0, every=500)
        step += 1
    return ema.state_dict(), step


def flow_sigmas_train(n: int, g: torch.Generator, device) -> torch.Tensor:
    """Half uniform in (0, 1], half from {1/8, ..., 8/8} (every sigma the 2/4/8-step Euler schedules visit)."""
    u = torch.rand(n, generator=g).clamp_min(1e-3)
    k = (torch.randint(1, 9, (n,), generator=g).float() / 8.0)
    pick = torch.rand(n, generator=g) < 0.5
    return torch.where(pick, k, u).to(device)


def train_flow(cfg, device, log=print, scenes=None) -> dict:
    g = _setup(cfg, device, "flow")
    sc = scenes if scenes is not None else pool(cfg, device)
    net = ShapeUNet().to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    plan = _plan(cfg, "flow_steps")
    opt, sched = _opt(net.parameters(), cfg, plan)
    t0 = time.perf_counter()
    step = 0
    while step < plan.total:
        x0, caps = _batch(sc, g, cfg["batch"], device)
        s = flow_sigmas_train(x0.shape[0], g, device)[:, None, None, None]
        noise = _randn(x0.shape, g, device)
        x = (1 - s) * x0 + s * noise
        with _autocast(device):
            pred = net(x, s.reshape(-1) * 1000.0, net.encode(caps))
        loss = F.mse_loss(pred.float(), noise - x0)
        _update(opt, sched, loss, net.parameters())
        _ema_update(ema, net, cfg["ema"])
        _progress(log, "flow", step, plan, loss, t0)
        step += 1
    return ema.state_dict(), step


ANCHOR = {"good": "Good photo.", "blurry": "Bad photo.", "noisy": "Bad photo."}


def clip_texts(captions: list[str], quality: list[str], g: torch.Generator) -> list[str]:
    """Per image: its caption (45%), ``a <quality> photo of <caption>`` (35%) or CLIP-IQA's anchor (20%)."""
    out = []
    for c, q, u in zip(captions, quality, torch.rand(len(captions), generator=g).tolist()):
        out.append(c if u < 0.45 else f"a {q} photo of {c}" if u < 0.8 else ANCHOR[q])
    return out


def train_clip(cfg, device, log=print, scenes=None):
    """Contrastive (symmetric InfoNCE with soft targets over identical texts) on renders, a third of them blurred
    and a third noised, with quality captions. The attention pool's positional embedding stays zero, so the
    CLIP-IQA path (which drops it) sees the same features as CLIPScore."""
    from open_clip.tokenizer import tokenize

    g = _setup(cfg, device, "clip")
    sc = scenes if scenes is not None else pool(cfg, device)
    ccfg = ClipConfig()
    model = build_clip(ccfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    plan = _plan(cfg, "clip_steps")
    opt, sched = _opt(params, dict(cfg, lr=cfg["lr"] * 0.5), plan)
    mean = torch.tensor(D_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(D_STD, device=device).view(1, 3, 1, 1)
    tok_cache: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    step = 0
    while step < plan.total:
        x, caps = _batch(sc, g, cfg["clip_batch"], device)
        x, quality = D.degrade((x + 1) / 2, g)
        texts = clip_texts(caps, quality, g)
        missing = [t for t in dict.fromkeys(texts) if t not in tok_cache]
        if missing:
            for t, ids in zip(missing, tokenize(missing, context_length=ccfg.context_length)):
                tok_cache[t] = ids
        ids = torch.stack([tok_cache[t] for t in texts]).to(device)
        fi = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        ft = F.normalize(model.encode_text(ids), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * fi @ ft.t()
        codes = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        c = torch.tensor([codes[t] for t in texts], device=device)
        same = (c[:, None] == c[None]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.t().log_softmax(1), 1).mean())
        _update(opt, sched, loss, params)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        _progress(log, "clip", step, plan, loss, t0)
        step += 1
    model.eval()
    used = set()
    for ids in tok_cache.values():
        used.update(ids.tolist())
    with torch.no_grad():  # rows of tokens no caption uses never trained: zero them (smaller, deterministic file)
        keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
        keep[list(used)] = True
        model.token_embedding.weight[~keep.to(device)] = 0
    return model, step


D_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation (calibration.metrics.common.OPENAI_MEAN)
D_STD = (0.26862954, 0.26130258, 0.27577711)


def train_ref(cfg, device, log=print, scenes=None) -> dict:
    """Reference network: all factor heads, clean renders only (its own seed and architecture)."""
    g = _setup(cfg, device, "ref")
    sc = scenes if scenes is not None else pool(cfg, device)
    net = ReferenceNet().to(device).train()
    plan = _plan(cfg, "ref_steps")
    opt, sched = _opt(net.parameters(), cfg, plan)
    t0 = time.perf_counter()
    step = 0
    while step < plan.total:
        idx = torch.randint(0, sc.images.shape[0], (cfg["batch"],), generator=g)
        x = sc.images[idx.to(sc.images.device)].to(device)
        out = net(x)
        loss = sum(F.cross_entropy(out[k], sc.factors[k][idx].to(device)) for k in out)
        _update(opt, sched, loss, net.parameters(), clip=None)
        _progress(log, "ref", step, plan, loss, t0)
        step += 1
    return net.eval().state_dict(), step


# ------------------------------------------------------------------------------------------ driver
def run_parts(out_dir: str, parts, cfg: dict, device, log=print) -> None:
    """Train ``parts`` and write each as ``out_dir/<part>.pt`` (a plain state dict; ``clip`` as the OpenAI-format
    state dict). ``lcm``/``tcd`` read ``teacher.pt`` from ``out_dir``."""
    from .nets import clip_state_dict

    os.makedirs(out_dir, exist_ok=True)
    sc = pool(cfg, device)
    for part in parts:
        t0 = time.perf_counter()
        if part in ("lcm", "tcd"):
            teacher = torch.load(os.path.join(out_dir, "flow.pt"), map_location=device, weights_only=True)
            teacher = {k: v.float() for k, v in teacher.items()}
            sd, steps = distill(cfg, device, teacher, part, log, sc)
        elif part == "flow":  # the teacher of lcm / tcd
            sd, steps = train_flow(cfg, device, log, sc)
        elif part == "clip":
            model, steps = train_clip(cfg, device, log, sc)
            sd = clip_state_dict(model)
        elif part == "ref":
            sd, steps = train_ref(cfg, device, log, sc)
        else:
            raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
        atomic_write_text(os.path.join(out_dir, f"{part}.steps.json"),
                          json.dumps({"part": part, "steps": steps, "seconds": time.perf_counter() - t0}) + "\n")
        sd = {k: v.detach().cpu() for k, v in sd.items()}
        atomic_write(os.path.join(out_dir, f"{part}.pt"), lambda tmp: torch.save(sd, tmp))
        if log:
            log(f"{part}: {time.perf_counter() - t0:.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched_pack.calibration.shapeworld.train")
    p.add_argument("--out", required=True)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--reduced", action="store_true", help="CPU smoke setting (seconds)")
    p.add_argument("--device", default=None)
    p.add_argument("--timed", action="store_true", help="train each part for GPU_SECONDS (the GPU run)")
    p.add_argument("--steps-from", default=None, help="folder of <part>.steps.json: train exactly those step counts")
    p.add_argument("--assemble", action="store_true", help="then write the world's weight files into --out")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = dict(REDUCED if a.reduced else FULL)
    if a.timed:
        cfg["seconds"] = GPU_SECONDS
    if a.steps_from:
        for part in a.parts:
            with open(os.path.join(a.steps_from, f"{part}.steps.json"), encoding="utf-8") as f:
                key = "distill_steps" if part in ("lcm", "tcd") else f"{part}_steps"
                cfg[key] = json.load(f)["steps"]
    run_parts(a.out, a.parts, cfg, device)
    if a.assemble:
        from .world import assemble

        assemble(a.out, a.out, dict(cfg, reduced=a.reduced))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
