"""The reference objective: Q-Sched coefficients fitted so that the quantized model follows the full-precision one.

With the full-precision (FP) model at hand, the same prompts, seeds and sampler, the quantized run can be compared
with the FP run image by image. Q-Sched's step is the stock step applied to ``x' = c_x·x`` and
``denoised' = c_x·x − c_eps·(x − denoised)`` (``qsched.samplers.precondition``), and every sampler of
``qsched.samplers`` is affine in (x', denoised') for a given noise draw, so the next state is

    x_{i+1}(c_x, c_eps) = u + c_x·v + c_eps·w,
    u = S(0, 0),   v = S(x, x) − u,   w = S(0, denoised − x) − u

where ``S(x', denoised')`` is the stock step i run with the same noise draw (:class:`StepNoise` replays it). No
per-sampler algebra: the three probes run the sampler functions themselves. Per step the least-squares fit of
``u + c_x·v + c_eps·w`` to the FP run's ``x_{i+1}``, pooled over all calibration images, is a 2x2 linear system
(:func:`solve_step`; a small ridge toward (1, 1), the result kept in ``FIT_RANGE``).

Two ways to walk the steps (``mode``):

* ``"free"`` (default): along the quantized run itself, already corrected at the earlier steps, so step i corrects
  what steps < i left over (and what the quantized model does on its own states);
* ``"teacher"``: the quantized model evaluated on the FP run's states (teacher forcing); cheaper to reason about,
  blind to the drift the quantized run accumulates.

docs/calibration.md ("Reference objective") has the measured comparison with a search on the final-output distance.

**Acceptance** (:func:`acceptance_test`): coefficients are kept only if, on held-out prompts *and* seeds, the
paired distance of the images to the FP images drops significantly against identity (naive); otherwise the answer
is identity with the reason in plain words. "Never worse than naive" is the contract.

Generators: the fit needs the :class:`TrajectoryGenerator` protocol (the sampler's parts); the acceptance test only
``generate(coefficients, prompts, seeds) -> images`` (``calibration.generate.Generator``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from ..qsched import samplers
from ..qsched.coefficients import Coefficients

#: Fitted coefficients are kept in this box (the paper searches [0.8, 1.2]; further out a fit is chasing a loss
#: the two scalars cannot correct).
FIT_RANGE = (0.5, 1.5)
#: Ridge toward (1, 1), relative to the mean diagonal of the step's normal matrix (unit-free).
RIDGE = 1e-4
#: Acceptance: one-sided paired sign-flip test on per-image log distance ratios, at this level.
ALPHA = 0.05
MODES = ("free", "teacher")
#: What each step is fitted to (``fit_to_trajectory``'s ``match``); the default is the measured best
#: (docs/shape_world.md): "iv", the FP model's step from the same state with the FP basis as instruments.
MATCHES = ("state", "x0", "state+x0", "iv")
MATCH = "iv"


def fp_pass_at_fit_states(mode: str = "free", match: str = MATCH, recorded: bool = True) -> bool:
    """Whether the fit calls the FP model once more per image and step, at the states it fits: the instrumental fit
    needs the FP model's output there; teacher-forced with the FP run's raw outputs ``recorded``
    (:func:`trajectory` records them), that output serves."""
    return match == "iv" and not (mode == "teacher" and recorded)


def images_per_fit_prompt(mode: str = "free", match: str = MATCH) -> int:
    """Network passes per step and fit prompt, counted in images: the FP run and the quantized run, plus the FP
    model at the fitted states where :func:`fp_pass_at_fit_states`."""
    return 2 + fp_pass_at_fit_states(mode, match)


@runtime_checkable
class TrajectoryGenerator(Protocol):
    """What a generator offers so the quantized run can be fitted to the FP run under the same noise.

    * ``steps``; ``sigmas``: the schedule (``steps + 1`` values, k-diffusion sigma space, last 0);
    * ``sampler``: a name of ``qsched.samplers.SAMPLERS``;
    * ``denoiser(prompts)``: the k-diffusion model for that batch, ``model(x, sigma_batch) -> denoised``;
    * ``start(seeds)``: the initial latent ``x_0`` [B, ...], one image per seed (from that seed alone);
    * ``sampler_kwargs(seeds)``: every other keyword of the sampler function (``parameterization``, ``eta``,
      ``alphas_cumprod``...), with a *fresh* ``noise_sampler`` seeded from ``seeds`` where the sampler draws noise:
      two calls give the same draws, and image j's draws depend on its own seed only;
    * ``fingerprint()``: a JSON dict naming the model and setup (goes into presets and records).

    Optional: ``batch_size`` (images per network call; default all at once).
    Both generators of a fit (quantized and FP) must share steps, sigmas, sampler and ``start``.
    """

    steps: int
    sigmas: torch.Tensor
    sampler: str

    def fingerprint(self) -> dict: ...

    def denoiser(self, prompts: Sequence[str]) -> Callable: ...

    def start(self, seeds: Sequence[int]) -> torch.Tensor: ...

    def sampler_kwargs(self, seeds: Sequence[int]) -> dict: ...


class StepNoise:
    """A noise sampler that replays: the first request at a step (keyed by its sigma) draws from ``inner``; the
    probes and the committed step of that step get the same tensor."""

    def __init__(self, inner):
        self.inner = inner
        self.draws: dict[float, torch.Tensor] = {}

    def __call__(self, sigma, sigma_next):
        key = float(sigma)
        if key not in self.draws:
            self.draws[key] = self.inner(sigma, sigma_next)
        return self.draws[key]


# ---------------------------------------------------------------------------------------------------------
# one step, and its affine decomposition

def stock_step(fn, sigmas: torch.Tensor, i: int, x_in: torch.Tensor, denoised: torch.Tensor, kwargs: dict,
               x0_out: list | None = None):
    """The stock sampler's step i from state ``x_in`` when the model returns ``denoised`` (identity coefficients;
    the sampler function itself runs, on ``sigmas[i:i + 2]``). ``x0_out``: receives the sampler's own estimate of
    the clean image at this step (its callback's ``denoised``: after LCM's boundary condition, for example)."""
    cb = None if x0_out is None else (lambda info: x0_out.append(info["denoised"]))
    return fn(lambda x, sigma, **_: denoised, x_in, sigmas[i:i + 2], None, disable=True, coefficients=None,
              callback=cb, **kwargs)


def qsched_step(fn, sigmas, i, x, denoised, c_x: float, c_eps: float, kwargs):
    """Q-Sched's step i: the stock step on ``precondition(x, denoised, c_x, c_eps)``."""
    x_c, d_c = samplers.precondition(x, denoised, c_x, c_eps)
    return stock_step(fn, sigmas, i, x_c, d_c, kwargs)


def step_basis(fn, sigmas, i, x, denoised, kwargs, x0: bool = False):
    """(u, v, w) with ``qsched_step(c_x, c_eps) = u + c_x·v + c_eps·w`` (same noise draw: ``kwargs`` must hold a
    replaying noise sampler where the sampler draws one). ``x0=True``: also the same basis of the step's clean-image
    estimate (``stock_step``'s ``x0_out``), as a second triple."""
    zero = torch.zeros_like(x)
    est: list | None = [] if x0 else None
    u = stock_step(fn, sigmas, i, zero, zero, kwargs, est)
    v = stock_step(fn, sigmas, i, x, x, kwargs, est) - u
    w = stock_step(fn, sigmas, i, zero, denoised - x, kwargs, est) - u
    if not x0:
        return u, v, w
    return (u, v, w), (est[0], est[1] - est[0], est[2] - est[0])


@dataclass
class StepGram:
    """Sufficient statistics of one step's least squares, summed over images (float64)."""

    vv: float = 0.0
    vw: float = 0.0
    ww: float = 0.0
    vr: float = 0.0
    wr: float = 0.0
    rr: float = 0.0
    n: int = 0
    #: instrumental-variable sums (v·v, v·w, w_ref·v, w_ref·w, v·r, w_ref·r), or None (least squares)
    iv: tuple | None = None

    def add(self, u, v, w, target) -> None:
        v, w, r = v.double().reshape(-1), w.double().reshape(-1), (target - u).double().reshape(-1)
        self.vv += float(v @ v)
        self.vw += float(v @ w)
        self.ww += float(w @ w)
        self.vr += float(v @ r)
        self.wr += float(w @ r)
        self.rr += float(r @ r)
        self.n += r.numel()

    def add_iv(self, u, v, w, w_ref, target) -> None:
        """Instrumental-variable statistics (besides the least-squares ones, which :meth:`loss` reports): the
        normal equations with the FP model's basis (v, w_ref) as instruments instead of (v, w), so noise in the
        quantized prediction does not shrink c_eps (least squares regresses the FP result on a noisy predictor:
        its slope is attenuated toward 0 and the images lose contrast)."""
        self.add(u, v, w, target)
        v, w, wf, r = (t.double().reshape(-1) for t in (v, w, w_ref, target - u))
        self.iv = (self.iv or (0.0,) * 6)
        self.iv = tuple(a + float(b) for a, b in zip(self.iv, (v @ v, v @ w, wf @ v, wf @ w, v @ r, wf @ r)))

    def loss(self, a: float, b: float) -> float:
        """Mean squared residual at (c_x, c_eps) = (a, b), without the ridge."""
        s = self.rr - 2 * a * self.vr - 2 * b * self.wr + a * a * self.vv + 2 * a * b * self.vw + b * b * self.ww
        return max(s, 0.0) / max(self.n, 1)


def solve_step(g: StepGram, ridge: float = RIDGE, box: tuple[float, float] = FIT_RANGE) -> tuple[float, float]:
    """argmin over (a, b) in ``box``² of ``|r − a·v − b·w|² + lam·((a − 1)² + (b − 1)²)``,
    lam = ridge·(vv + ww)/2. The unconstrained 2x2 solution if it lies in the box; otherwise the best of the
    box's edges (one coordinate at a bound, the other solved and clipped)."""
    lam = ridge * (g.vv + g.ww) / 2
    if g.iv is None:
        A = [[g.vv + lam, g.vw], [g.vw, g.ww + lam]]
        rhs = [g.vr + lam, g.wr + lam]
    else:  # the IV equations (not symmetric); at the box's edges the one whose residual is smallest
        vv, vw, fv, fw, vr, fr = g.iv
        A = [[vv + lam, vw], [fv, fw + lam]]
        rhs = [vr + lam, fr + lam]

    def obj(a, b):
        if g.iv is not None:
            e0, e1 = A[0][0] * a + A[0][1] * b - rhs[0], A[1][0] * a + A[1][1] * b - rhs[1]
            return e0 * e0 + e1 * e1
        return g.loss(a, b) * max(g.n, 1) + lam * ((a - 1) ** 2 + (b - 1) ** 2)

    lo, hi = box
    det = A[0][0] * A[1][1] - A[0][1] * A[1][0]
    if abs(det) > 1e-12 * max(abs(A[0][0] * A[1][1]), 1e-300):
        a = (rhs[0] * A[1][1] - A[0][1] * rhs[1]) / det
        b = (A[0][0] * rhs[1] - A[1][0] * rhs[0]) / det
        if lo <= a <= hi and lo <= b <= hi:
            return a, b
    cands = []
    for a in (lo, hi):  # c_x at a bound: best c_eps
        b = (rhs[1] - A[1][0] * a) / A[1][1] if A[1][1] > 0 else 1.0
        cands.append((a, min(hi, max(lo, b))))
    for b in (lo, hi):
        a = (rhs[0] - A[0][1] * b) / A[0][0] if A[0][0] > 0 else 1.0
        cands.append((min(hi, max(lo, a)), b))
    return min(cands, key=lambda c: obj(*c))


# ---------------------------------------------------------------------------------------------------------
# runs

def _chunks(gen, prompts, seeds):
    n = int(getattr(gen, "batch_size", None) or len(prompts))
    return [(list(prompts[s:s + n]), list(seeds[s:s + n])) for s in range(0, len(prompts), n)]


def _sigmas(gen, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(gen.sigmas).to(device=x.device, dtype=torch.float32)


def trajectory(gen: TrajectoryGenerator, prompts: Sequence[str], seeds: Sequence[int],
               coefficients: Coefficients | None = None) -> "Trajectory":
    """The states ``[x_0, x_1, ..., x_N]`` of ``gen``'s sampler run (x_N: the final latent), the stock sampler
    function run once per batch with a callback; ``[steps + 1]`` tensors of [len(prompts), ...], plus ``.x0``."""
    fn = samplers.SAMPLERS[gen.sampler]
    parts = []
    for ps, ss in _chunks(gen, prompts, seeds):
        states, est, raw = [], [], []

        def record(info):
            states.append(info["x"])
            est.append(info["denoised"])
        model = gen.denoiser(ps)

        def recorded(x, sigma, **kw):
            raw.append(model(x, sigma, **kw))
            return raw[-1]
        x0 = gen.start(ss)
        out = fn(recorded, x0, _sigmas(gen, x0), None, disable=True, coefficients=coefficients,
                 callback=record, **gen.sampler_kwargs(ss))
        parts.append(states + [out] + est + raw)
    n = len(parts[0])
    full = [torch.cat([p[i] for p in parts]) for i in range(n)]
    steps = (n - 1) // 3
    return Trajectory(full[:steps + 1], full[steps + 1:2 * steps + 1], full[2 * steps + 1:])


class Trajectory(list):
    """The states ``[x_0, ..., x_N]`` of a run (a list), with ``x0``: the sampler's clean-image estimate at every
    step (``[steps]`` tensors; what its callback reports as ``denoised``) and ``raw``: the model's own output at
    every step's state (before coefficients or boundary conditions; empty if not recorded)."""

    def __init__(self, states, x0=(), raw=()):
        super().__init__(states)
        self.x0 = list(x0)
        self.raw = list(raw)


@dataclass
class ReferenceFit:
    """What :func:`fit_to_trajectory` returns: the fitted coefficients and the per-step residuals."""

    coefficients: Coefficients
    mode: str
    #: per step: mean squared distance of the quantized step's result to the FP state, at identity and fitted
    #: (free mode: from the same corrected state; the fitted value is what the next step starts from)
    residual_identity: list = field(default_factory=list)
    residual_fitted: list = field(default_factory=list)
    images: int = 0  # quantized images run (network passes of the fit, in images)


def check_pair(quantized, reference, prompts, seeds) -> None:
    """The two generators of a fit must run the same sampler on the same schedule from the same start."""
    for name in ("steps", "sampler"):
        a, b = getattr(quantized, name, None), getattr(reference, name, None)
        if a != b:
            raise ValueError(f"reference model: its {name} ({b!r}) differs from the quantized model's ({a!r}); "
                             "connect the full-precision version of the same model with the same sampler")
    sq, sr = torch.as_tensor(quantized.sigmas).float().cpu(), torch.as_tensor(reference.sigmas).float().cpu()
    if sq.shape != sr.shape or not torch.allclose(sq, sr):
        raise ValueError("reference model: its sigma schedule differs from the quantized model's; use the same "
                         "model type and scheduler for both")
    xq, xr = quantized.start(seeds[:1]), reference.start(seeds[:1])
    if xq.shape != xr.shape:
        raise ValueError(f"reference model: its latent shape {tuple(xr.shape[1:])} differs from the quantized "
                         f"model's {tuple(xq.shape[1:])} (another architecture or latent format?); connect the "
                         "full-precision version of the quantized model")


def fit_to_trajectory(quantized: TrajectoryGenerator, prompts: Sequence[str], seeds: Sequence[int],
                      target: Sequence[torch.Tensor], *, mode: str = "free", ridge: float = RIDGE,
                      box: tuple[float, float] = FIT_RANGE, interrupt: Callable[[], None] | None = None,
                      match: str = MATCH, reference: TrajectoryGenerator | None = None) -> ReferenceFit:
    """Per-step closed-form least squares of the quantized run's steps to ``target`` (``[x_0..x_N]`` of the FP
    run on the same prompts/seeds, e.g. :func:`trajectory` of the FP generator), pooled over all images.
    ``mode``: ``"free"`` (along the corrected quantized run) or ``"teacher"`` (on the FP states). ``match``: what
    each step is fitted to: ``"state"`` (the next state x_{i+1}), ``"x0"`` (the step's clean-image estimate,
    ``target.x0[i]``), ``"state+x0"`` (both, summed) or ``"iv"``: each step matches the FP model's step *from
    the same state* (``reference``'s denoiser evaluated there: one more FP pass per image), solved with the FP
    basis as instruments (:meth:`StepGram.add_iv`), which undoes the correlated error without least squares'
    attenuation (for ``eps_q = k·eps_fp + noise``: c_x = 1, c_eps = 1/k, PTQD's slope)."""
    if match == "iv" and reference is None:
        raise ValueError("match 'iv' needs the reference (full-precision) generator")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}; got {match!r}")
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"give one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds)")
    steps = quantized.steps
    if len(target) != steps + 1:
        raise ValueError(f"target trajectory has {len(target)} states, the sampler runs {steps} steps "
                         f"({steps + 1} states)")
    fn = samplers.SAMPLERS[quantized.sampler]
    chunks = _chunks(quantized, prompts, seeds)
    offsets, o = [], 0
    for ps, _ in chunks:
        offsets.append(o)
        o += len(ps)
    models = [quantized.denoiser(ps) for ps, _ in chunks]
    fp_pass = fp_pass_at_fit_states(mode, match, recorded=len(getattr(target, "raw", ())) == steps)
    ref_models = [reference.denoiser(ps) for ps, _ in chunks] if fp_pass else None
    kwargs = []
    for _, ss in chunks:
        kw = quantized.sampler_kwargs(ss)
        if "noise_sampler" in kw:
            kw["noise_sampler"] = StepNoise(kw["noise_sampler"])
        kwargs.append(kw)
    xs = [quantized.start(ss) for _, ss in chunks]
    for k, x in enumerate(xs):
        t0 = target[0][offsets[k]:offsets[k] + x.shape[0]].to(x.device, x.dtype)
        if not torch.equal(x, t0):
            raise ValueError("the quantized and the reference run do not start from the same noise: both must "
                             "use the same seeds and latent size")
    sig = _sigmas(quantized, xs[0])
    c_x, c_eps, res_id, res_fit = [], [], [], []
    for i in range(steps):
        if interrupt is not None:
            interrupt()
        g = StepGram()
        saved = []
        for k, ((ps, _), model) in enumerate(zip(chunks, models)):
            tgt = target[i + 1][offsets[k]:offsets[k] + len(ps)].to(xs[k].device, xs[k].dtype)
            x = xs[k] if mode == "free" else target[i][offsets[k]:offsets[k] + len(ps)].to(xs[k].device,
                                                                                          xs[k].dtype)
            d = model(x, sig[i] * x.new_ones([x.shape[0]]))
            state, est = step_basis(fn, sig, i, x, d, kwargs[k], x0=True)
            if match == "iv":
                if fp_pass:
                    d_ref = ref_models[k](x, sig[i] * x.new_ones([x.shape[0]]))
                else:  # teacher-forced: the FP run's own output at its own state
                    d_ref = target.raw[i][offsets[k]:offsets[k] + len(ps)].to(x.device, x.dtype)
                u, v, w = state
                w_ref = stock_step(fn, sig, i, torch.zeros_like(x), d_ref - x, kwargs[k]) - u
                g.add_iv(u, v, w, w_ref, u + v + w_ref)
            elif match != "x0":
                g.add(*state, tgt)
            if match in ("x0", "state+x0"):
                g.add(*est, target.x0[i][offsets[k]:offsets[k] + len(ps)].to(x.device, x.dtype))
            saved.append((x, d))
        a, b = solve_step(g, ridge, box)
        c_x.append(a)
        c_eps.append(b)
        res_id.append(g.loss(1.0, 1.0))
        res_fit.append(g.loss(a, b))
        for k, (x, d) in enumerate(saved):
            xs[k] = qsched_step(fn, sig, i, x, d, a, b, kwargs[k])
    return ReferenceFit(Coefficients(c_x, c_eps), mode, res_id, res_fit, images=len(prompts) * (1 + fp_pass))


def fit_reference(quantized: TrajectoryGenerator, reference: TrajectoryGenerator, prompts: Sequence[str],
                  seeds: Sequence[int], *, mode: str = "free", ridge: float = RIDGE,
                  box: tuple[float, float] = FIT_RANGE, interrupt: Callable[[], None] | None = None,
                  match: str = MATCH) -> ReferenceFit:
    """Fit per-step (c_x, c_eps) so ``quantized`` follows ``reference`` (the FP model) on these prompts/seeds: the
    FP run once, then :func:`fit_to_trajectory`. Images spent: :func:`images_per_fit_prompt` per prompt."""
    prompts, seeds = list(prompts), list(seeds)
    check_pair(quantized, reference, prompts, seeds)
    target = trajectory(reference, prompts, seeds)
    fit = fit_to_trajectory(quantized, prompts, seeds, target, mode=mode, ridge=ridge, box=box,
                            interrupt=interrupt, match=match, reference=reference)
    fit.images += len(prompts)
    return fit


# ---------------------------------------------------------------------------------------------------------
# paired distance and the acceptance test

def paired_distance(images: torch.Tensor, reference_images: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared difference to the FP image of the same prompt and seed: [B] float64. ``images`` may
    hold several sets of B images one after another (image j pairs with reference image j mod B)."""
    n = reference_images.shape[0]
    if images.shape[0] % n or images.shape[1:] != reference_images.shape[1:]:
        raise ValueError(f"images {tuple(images.shape)} do not pair with the reference images "
                         f"{tuple(reference_images.shape)}")
    ref = reference_images.double().reshape(n, -1).repeat(images.shape[0] // n, 1)
    return ((images.double().reshape(images.shape[0], -1) - ref) ** 2).mean(1)


@dataclass
class Acceptance:
    accepted: bool
    text: str  # plain words: why kept or why identity
    pairs: int
    drop: float  # mean relative drop of the distance to FP (geometric mean ratio), e.g. 0.25 = 25% closer
    p_value: float
    distance_identity: float  # mean paired distance of naive to FP on the held-out images
    distance_fitted: float

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "text": self.text, "pairs": self.pairs, "drop": self.drop,
                "p_value": self.p_value, "distance_identity": self.distance_identity,
                "distance_fitted": self.distance_fitted}


def sign_flip_p(values: torch.Tensor, samples: int = 20000) -> float:
    """One-sided p-value of mean(values) > 0 under a symmetric null (paired sign-flip test): exact up to 16 pairs,
    else ``samples`` random flips (fixed seed: the same answer every run)."""
    v = values.double().reshape(-1)
    n = v.numel()
    obs = float(v.mean())
    if n <= 16:
        idx = torch.arange(2 ** n).unsqueeze(1)
        signs = 1.0 - 2.0 * ((idx >> torch.arange(n)) & 1).double()
    else:
        g = torch.Generator().manual_seed(0)
        signs = 1.0 - 2.0 * torch.randint(0, 2, (samples, n), generator=g).double()
    means = (signs * v).mean(1)
    return float((means >= obs - 1e-12 * max(abs(obs), 1e-300)).double().mean())


def acceptance_test(d_identity: torch.Tensor, d_fitted: torch.Tensor, *, alpha: float = ALPHA,
                    what: str = "the fitted coefficients") -> Acceptance:
    """Keep ``what`` only if its per-image distances to FP are significantly below identity's on held-out
    prompts/seeds: one-sided paired sign-flip test on log(d_identity / d_fitted) at level ``alpha``."""
    di, df = d_identity.double().reshape(-1), d_fitted.double().reshape(-1)
    n = di.numel()
    if n != df.numel() or n == 0:
        raise ValueError(f"acceptance needs paired distances, got {di.numel()} and {df.numel()}")
    mi, mf = float(di.mean()), float(df.mean())
    tiny = 1e-12 * max(float(di.max()), 1e-30)
    if float(di.max()) <= 1e-20:
        return Acceptance(False, f"identity kept: the quantized model already matches the full-precision model on "
                                 f"the {n} held-out images (nothing to correct)", n, 0.0, 1.0, mi, mf)
    lr = torch.log((di + tiny) / (df + tiny))
    drop = 1.0 - math.exp(-float(lr.mean()))
    p = sign_flip_p(lr)
    min_p = 2.0 ** -n if n <= 16 else 0.0
    if drop > 0 and p <= alpha:
        text = (f"kept: on {n} held-out images (prompts and seeds the fit never saw) {what} bring the output "
                f"{100 * drop:.1f}% closer to the full-precision model than no correction (paired test, "
                f"p = {p:.3g} <= {alpha:g})")
        return Acceptance(True, text, n, drop, p, mi, mf)
    if drop <= 0:
        why = f"{what} moved the output {100 * -drop:.1f}% further from the full-precision model"
    else:
        why = (f"{what} brought the output only {100 * drop:.1f}% closer, not significant (paired test, p = {p:.3g} "
               f"> {alpha:g})")
        if min_p > alpha:
            why += f"; {n} held-out images can never show it (use at least {math.ceil(math.log2(1 / alpha))})"
    return Acceptance(False, f"identity kept (no correction): on {n} held-out images {why}", n, drop, p, mi, mf)


def split_heldout(prompts: Sequence[str], seeds: Sequence[int]):
    """Default held-out split: the first half (rounded up) fits, the rest tests (disjoint prompts and seeds)."""
    k = (len(prompts) + 1) // 2
    return list(prompts[:k]), list(seeds[:k]), list(prompts[k:]), list(seeds[k:])


@dataclass
class ReferenceResult:
    """What :func:`calibrate_to_reference` returns."""

    coefficients: Coefficients  # the fit if accepted, else identity
    fit: ReferenceFit
    acceptance: Acceptance
    images: int  # every image generated (FP + quantized, fit + held-out)
    #: the held-out images: "reference" (FP), "identity" (naive) and "fitted"
    heldout_images: dict = field(default_factory=dict)


def calibrate_to_reference(quantized, reference, prompts, seeds, heldout_prompts, heldout_seeds, *,
                           mode: str = "free", ridge: float = RIDGE, alpha: float = ALPHA,
                           interrupt: Callable[[], None] | None = None, fit: ReferenceFit | None = None,
                           match: str = MATCH) -> ReferenceResult:
    """Fit on (prompts, seeds), then the acceptance test on (heldout_prompts, heldout_seeds): FP, naive and fitted
    images of the held-out set (3 images per held-out prompt). ``fit``: an existing fit to test instead."""
    if set(heldout_seeds) & set(seeds) or set(heldout_prompts) & set(prompts):
        raise ValueError("held-out prompts and seeds must be disjoint from the calibration prompts and seeds")
    if not heldout_prompts:
        raise ValueError("the acceptance test needs held-out prompts (at least 5 to be able to pass)")
    if fit is None:
        fit = fit_reference(quantized, reference, prompts, seeds, mode=mode, ridge=ridge, interrupt=interrupt,
                            match=match)
    if fit.coefficients.is_identity:
        acc = Acceptance(False, "identity kept: the fit is identity (nothing to correct)", len(heldout_prompts),
                         0.0, 1.0, 0.0, 0.0)  # nothing was measured; finite, so presets stay valid JSON
        return ReferenceResult(fit.coefficients, fit, acc, fit.images, {})
    images = {"reference": reference.generate(None, heldout_prompts, heldout_seeds),
              "identity": quantized.generate(None, heldout_prompts, heldout_seeds),
              "fitted": quantized.generate(fit.coefficients, heldout_prompts, heldout_seeds)}
    acc = acceptance_test(paired_distance(images["identity"], images["reference"]),
                          paired_distance(images["fitted"], images["reference"]), alpha=alpha)
    best = fit.coefficients if acc.accepted else Coefficients.identity(quantized.steps)
    return ReferenceResult(best, fit, acc, fit.images + 3 * len(heldout_prompts), images)


class DistanceScorer:
    """The final-output distance as a search objective (``runner`` scorer protocol): the score of image j is minus
    its mean squared difference to the FP image of the same prompt and seed (``reference_images``, in the order
    the runner generates them: the prompts, repeated once per point of a batch)."""

    def __init__(self, reference_images: torch.Tensor, fingerprint: dict | None = None):
        self.reference_images = reference_images
        self.config = {"class": "DistanceScorer", "reference": fingerprint,
                       "images": int(reference_images.shape[0])}

    def components(self, images, prompts) -> dict:
        return {"distance": paired_distance(images, self.reference_images)}

    def score(self, images, prompts) -> torch.Tensor:
        return -paired_distance(images, self.reference_images)
