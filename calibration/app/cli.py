"""``qsched`` command line (the console script): demo (docs/shape_world.md), calibrate, sample, score
(docs/calibration.md), quantize (docs/quantization.md, in ``calibration.app.quantize``)."""

from __future__ import annotations

import argparse
import os
import sys

from .args import device_arg, finite_float, int_range, positive_float
from .quantize import add_quantize


def _demo(args) -> int:
    from . import demo

    trained_only = {"--quant": args.quant, "--seeds": args.seeds, "--per-prompt": args.per_prompt,
                    "--points": args.points, "--strategy": args.strategy, "--budget": args.budget,
                    "--no-budget": args.no_budget or None, "--grid-images": args.grid_images,
                    "--weights": args.weights, "--guard": args.guard or None, "--family": args.family,
                    "--objective": args.objective}
    if args.random_models:
        given = [k for k, v in trained_only.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to the trained-model demo, not to --random-models")
        from .random_demo import run_random_models_demo

        run_random_models_demo(out_dir=args.out, steps=args.steps or 4, size=args.size or 64,
                               seed=0 if args.seed is None else args.seed)
        return 0
    given = [k for k, v in {"--size": args.size, "--seed": args.seed}.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply to --random-models (the trained-model demo takes --seeds)")
    kw = {k: getattr(args, k) for k in ("family", "objective", "quant", "seeds", "per_prompt", "points", "strategy",
                                         "budget", "grid_images") if getattr(args, k) is not None}
    if args.no_budget:
        if args.budget is not None:
            raise ValueError("give --budget or --no-budget, not both")
        kw["budget"] = None
    demo.run_demo(out_dir=args.out, steps=args.steps or demo.DEFAULTS["steps"], guard=args.guard,
                  weights=args.weights, **kw)
    return 0


def _add_demo(sub):
    from .demo import DEFAULTS as S

    d = sub.add_parser(
        "demo", help="trained models: quantize, calibrate Q-Sched with JAQ, evaluate; writes a table, the search "
                     "landscape and a sample grid (--random-models: every sampler on tiny random models)",
        description="Trained-model demo (docs/shape_world.md): the shape world's few-step models (flow / LCM / TCD) "
                    "quantized by the pack, calibrated with the pack's real JAQ (CLIPScore + CLIP-IQA on a tiny CLIP "
                    "trained here) and compared with FP, naive and PTQD on an independent reference (Fréchet "
                    "distance, attribute accuracy). Writes table.md, results.json, landscape.png, grid.png, "
                    "preset.json into --out.")
    d.add_argument("--out", default="qsched-demo", help="output folder (default: qsched-demo)")
    d.add_argument("--family", choices=("flow", "lcm", "tcd"), help=f"model family (default {S['family']})")
    d.add_argument("--objective", choices=("reference", "hybrid", "jaq"),
                   help=f"how the coefficients are found (default {S['objective']}, the best measured, "
                        "docs/shape_world.md): reference = fitted to the full-precision model, kept only if a "
                        "held-out test shows a gain; hybrid = JAQ search around that fit; jaq = the paper's search")
    d.add_argument("--steps", type=int_range("--steps", 1, 8), default=None, help="sampling steps, 1-8 (default 4)")
    d.add_argument("--quant", help=f"quantization of the denoiser: w8a8, w4a8, w4a4, w4a6, ... (default "
                                   f"{S['quant']}, a setting with a real loss)")
    d.add_argument("--seeds", type=int_range("--seeds", 0, 10**6), nargs="+",
                   help="seed indices; each one is a fresh set of calibration and evaluation seeds (default "
                        f"{' '.join(map(str, S['seeds']))})")
    d.add_argument("--per-prompt", type=int_range("--per-prompt", 1, 1000),
                   help=f"evaluation images per prompt (default {S['per_prompt']}; x 20 prompts)")
    d.add_argument("--points", type=int_range("--points", 3, 201),
                   help=f"search lattice values per dimension over [0.8, 1.2] (default {S['points']})")
    d.add_argument("--strategy", choices=("zoom", "pattern"), help=f"adaptive search (default {S['strategy']})")
    d.add_argument("--budget", type=int_range("--budget", 1, 10**9),
                   help=f"maximum images the search may spend (default {S['budget']})")
    d.add_argument("--no-budget", action="store_true", help="no image budget for the search")
    d.add_argument("--guard", action="store_true",
                   help="also report the opt-in acceptance guard (calibration.guard): Q-Sched coefficients only "
                        "if the JAQ gain is significant, the quantized model lost JAQ vs FP32 and the best does "
                        "not overshoot FP32; else identity")
    d.add_argument("--grid-images", type=int_range("--grid-images", 1, 16),
                   help=f"images per prompt in each column of grid.png (default {S['grid_images']})")
    d.add_argument("--weights", help="the folder holding shapeworld.safetensors and shapeworld_clip.safetensors "
                                     "(default: the packaged one)")
    d.add_argument("--random-models", action="store_true",
                   help="instead: every sampler with identity and Q-Sched coefficients on tiny random SDXL-like / "
                        "FLUX-like pipelines (the machinery demo)")
    d.add_argument("--size", type=int_range("--size", 16, 512, multiple=16),
                   help="--random-models only: image size in pixels, 16-512, multiple of 16 (default 64)")
    d.add_argument("--seed", type=int, help="--random-models only: seed (default 0)")
    d.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsched", description="Q-Sched: quantization-aware few-step sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_calibrate(sub)
    _add_sample(sub)
    _add_score(sub)
    add_quantize(sub)
    return p


# ---- calibrate / sample / score ------------------------------------------------------------------------


def _add_model_args(p, steps_default):
    from ...qsched.samplers import SAMPLERS
    from ..generate import FAMILIES, MAX_GENERATOR_STEPS

    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder (model_index.json ...) or a single .safetensors checkpoint")
    p.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder of the same "
                                    "architecture (configs, tokenizers, text encoders, VAE); nothing is downloaded")
    p.add_argument("--family", choices=tuple(FAMILIES), help="model family (default: from the pipeline)")
    p.add_argument("--sampler", choices=tuple(SAMPLERS),
                   help="sampler (default: the family's: sdxl_turbo euler_ancestral, flux_schnell euler, lcm lcm, "
                        "tcd/pcm tcd)")
    p.add_argument("--steps", type=int_range("--steps", 1, MAX_GENERATOR_STEPS), default=steps_default,
                   help="sampling steps" + (f" (default {steps_default})" if steps_default else ""))
    p.add_argument("--size", type=int_range("--size", 16, 2048, multiple=16),
                   help="image height and width in pixels (default: the family's)")
    p.add_argument("--quant", help="quantization of the denoiser: w8a8, w4a8, w4a4, ... (qsched.quant formats) "
                                   "or fp16 (none)")
    p.add_argument("--guidance", type=finite_float("--guidance", 0.0, 100.0),
                   help="LCM w-embedding guidance (default: the family's)")
    p.add_argument("--eta", type=finite_float("--eta", 0.0, 1.0),
                   help="TCD gamma / ancestral eta, in [0, 1] (default: the family's)")
    p.add_argument("--batch-size", type=int_range("--batch-size", 1, 256), default=4, help="images per network call")
    p.add_argument("--device", type=device_arg, default=None,
                   help="torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="network dtype (default: float16 on cuda, float32 on cpu)")


def _add_jaq_args(p):
    p.add_argument("--jaq", choices=("clip", "preference"), default="clip",
                   help="JAQ variant: clip = CLIPScore + k*CLIP-IQA (LCM/PCM), preference = AQ-MAP + k*HPSv2 "
                        "(SDXL-Turbo/FLUX) (default clip)")
    p.add_argument("--k", type=finite_float("--k", 0.0, 1000.0), default=2.0,
                   help="JAQ weight k of the image-quality term (default 2)")
    p.add_argument("--jaq-weights", help="folder with the scorer weight files (RN50.pt, ViT-L-14.pt, ViT-B-16.pt, "
                                         "HPS_v2.1_compressed.pt, or .safetensors copies, which are preferred); "
                                         "then $QSCHED_MODELS_DIR. Files are read as data, never run")


def _add_calibrate(sub):
    from ..search import DEFAULT_RANGE, SPACES, STRATEGIES

    c = sub.add_parser("calibrate", help="search Q-Sched coefficients for a (quantized) model; writes a preset")
    _add_model_args(c, 4)
    _add_jaq_args(c)
    c.add_argument("--objective", choices=("reference", "hybrid", "jaq"), default=None,
                   help="reference: fit the coefficients so the quantized model follows the full-precision one on "
                        "the same noise (needs --reference, no scorer files; kept only if it helps on held-out "
                        "prompts); hybrid: the JAQ search kept close to that fit; jaq: the paper's JAQ search "
                        "(default: reference when --reference is given, else jaq)")
    c.add_argument("--reference", help="the full-precision model (diffusers folder or single-file checkpoint, as "
                                       "--model; a single file uses --config too). Usually the same path as --model "
                                       "with --quant: the pipeline is then loaded once and only the denoiser copied")
    c.add_argument("--prompts", help="prompt file (.txt one per line, .yaml mapping like sDCI.yaml, .json list); "
                                     "default: the project's 20 calibration prompts")
    c.add_argument("--limit", type=int_range("--limit", 1, 100000), help="use only the first N prompts")
    c.add_argument("--space", choices=SPACES, default="start",
                   help="start: (c_x, c_eps) ramp starts, ends at 1 (released code); start_end: 4-D (paper "
                        "Algorithm 1); per_step: one value per step (default start)")
    c.add_argument("--range", nargs=2, type=positive_float("--range"), metavar=("MIN", "MAX"),
                   default=list(DEFAULT_RANGE), help="coefficient range (default 0.8 1.2)")
    c.add_argument("--strategy", choices=STRATEGIES, default="pattern",
                   help="pattern: lattice pattern search from identity (default); zoom: coarse grid first, then "
                        "pattern search; grid: exact Algorithm 1")
    c.add_argument("--points", type=int_range("--points", 2, 10000),
                   help="grid values per dimension (default: start 50, start_end 11, per_step 5)")
    c.add_argument("--budget", type=int_range("--budget", 1, 10**12), help="maximum number of images")
    c.add_argument("--seed", type=int_range("--seed", 0, 2**62), default=42,
                   help="seed of prompt 0 (prompt i uses seed+i) (default 42)")
    c.add_argument("--out", default="qsched-calibration",
                   help="output folder: preset.json, record.jsonl, landscape.png, preview.png")
    c.add_argument("--resume", action="store_true", help="continue the record in --out (nothing is recomputed)")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(func=_calibrate)


def _add_sample(sub):
    s = sub.add_parser("sample", help="generate images with a Q-Sched preset")
    _add_model_args(s, None)
    s.add_argument("--preset", required=True, help="preset JSON written by qsched calibrate")
    s.add_argument("--prompt", action="append", help="prompt (repeatable)")
    s.add_argument("--prompts", help="prompt file (.txt / .yaml / .json)")
    s.add_argument("--seed", type=int_range("--seed", 0, 2**62), default=42)
    s.add_argument("--compare", action="store_true", help="also write identity (c = 1) images and a side-by-side")
    s.add_argument("--out", default="qsched-samples", help="output folder")
    s.set_defaults(func=_sample)


def _add_score(sub):
    s = sub.add_parser("score", help="JAQ (and its components) of image files")
    s.add_argument("images", nargs="+", help="image files (PNG/JPEG), all the same size")
    s.add_argument("--prompt", action="append", help="prompt, once for all images or once per image")
    s.add_argument("--prompts", help="prompt file with one prompt per image")
    _add_jaq_args(s)
    s.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cpu)")
    s.add_argument("--json", help="also write the scores to this JSON file")
    s.set_defaults(func=_score)


def _device_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if str(device).startswith("cuda") else "float32")
    return device, getattr(torch, dtype)


def _build_generator(args, steps, family=None, sampler=None, quant=None):
    from ..generate import DiffusersGenerator, load_pipeline, model_hash

    device, dtype = _device_dtype(args)
    pipe = load_pipeline(args.model, config=args.config, dtype=dtype, device=device)
    return DiffusersGenerator(pipe, family=args.family or family, steps=steps, sampler=args.sampler or sampler,
                              height=args.size, width=args.size, quant=args.quant or quant, guidance=args.guidance,
                              eta=args.eta, batch_size=args.batch_size, model_file=args.model,
                              model_hash_value=model_hash(args.model), device=device)


def _build_pair(args):
    """(quantized generator, full-precision reference generator). When --reference is --model, the pipeline is
    loaded once: the reference keeps it in full precision, the quantized generator gets a copy of the denoiser
    (text encoders and VAE shared)."""
    import copy

    from ..generate import DiffusersGenerator, load_pipeline, model_hash

    same = os.path.realpath(args.reference) == os.path.realpath(args.model)
    device, dtype = _device_dtype(args)
    common = dict(family=args.family, steps=args.steps, sampler=args.sampler, height=args.size, width=args.size,
                  guidance=args.guidance, eta=args.eta, batch_size=args.batch_size, device=device)
    ref_pipe = load_pipeline(args.reference, config=args.config, dtype=dtype, device=device)
    ref = DiffusersGenerator(ref_pipe, model_file=args.reference, model_hash_value=model_hash(args.reference),
                             **common)
    if same:
        name = "transformer" if getattr(ref_pipe, "transformer", None) is not None else "unet"
        q_pipe = type(ref_pipe)(**{**ref_pipe.components, name: copy.deepcopy(getattr(ref_pipe, name))})
        q_pipe.set_progress_bar_config(disable=True)
        gen = DiffusersGenerator(q_pipe, quant=args.quant, model_file=args.model, model_hash_value=ref.model_hash,
                                 **common)
    else:
        gen = _build_generator(args, args.steps)
    return gen, ref


def _build_jaq(args):
    import os

    from ..jaq import JAQ, PRESETS
    from ..metrics import resolve
    from ..metrics.weights import weights_digest

    tc, iq = PRESETS[args.jaq]
    weights = {}
    if args.jaq_weights and not os.path.isdir(args.jaq_weights):
        raise FileNotFoundError(f"--jaq-weights folder not found: {args.jaq_weights}")
    for m in (tc, iq):
        # missing file -> error naming it, the folders searched and the source
        weights[m] = str(resolve(m, None, folders=[args.jaq_weights] if args.jaq_weights else None))
    device = getattr(args, "device", None) or "cpu"
    jaq = JAQ(preset=args.jaq, k=args.k, device=device, weights=weights)
    config = {"preset": args.jaq, "tc": tc, "iq": iq, "k": float(args.k), "k_on": jaq.k_on,
              "tc_transform": jaq.tc_transform, "score_rule": jaq.score_rule,
              "weights": {m: os.path.basename(p) for m, p in weights.items()},
              "weights_sha256": {m: weights_digest(p) for m, p in weights.items()}, "device": str(device)}
    return jaq, config


def _calibrate(args) -> int:
    import os

    from ..plots import plot_landscape, preview_grid
    from ..prompts import default_prompts, load_prompts
    from ..runner import ProgressInfo, calibrate
    from ..search import SearchSpace, check_budget, default_points

    prompts = load_prompts(args.prompts, args.limit) if args.prompts else default_prompts()[: args.limit]
    space = SearchSpace(args.space, args.steps, args.range[0], args.range[1])
    points = default_points(args.space) if args.points is None else args.points
    check_budget(space, args.strategy, points, len(prompts), args.budget)  # before loading anything
    objective = args.objective or ("reference" if args.reference else "jaq")
    if objective != "jaq" and not args.reference:
        raise ValueError(f"--objective {objective} fits the quantized model to the full-precision one: give "
                         "--reference PATH (the full-precision model; the same path as --model when --quant "
                         "quantizes it at load)")
    if args.reference and objective == "jaq":
        raise ValueError("--reference is used by --objective reference / hybrid only; drop it, or choose one of "
                         "those objectives")
    if objective != "jaq" and (not args.quant or args.quant in ("fp16", "bf16", "none")):
        raise ValueError(f"--objective {objective} corrects a quantized model: give --quant (w8a8, w4a8, ...)")
    os.makedirs(args.out, exist_ok=True)
    record = os.path.join(args.out, "record.jsonl")
    if os.path.exists(record) and not args.resume:
        raise ValueError(f"{record} exists: pass --resume to continue it, or choose another --out")
    from ...qsched.coefficients import check_replaceable

    check_replaceable(os.path.join(args.out, "preset.json"))  # refused now, not after the search
    gen, ref = _build_pair(args) if objective != "jaq" else (_build_generator(args, args.steps), None)
    jaq, jaq_config = _build_jaq(args) if objective != "reference" else (None, None)

    def progress(info: ProgressInfo) -> None:
        if not args.quiet:
            print(info.line(), file=sys.stderr, flush=True)

    preset = os.path.join(args.out, "preset.json")
    options = {} if ref is None else {"objective": objective, "reference": ref}
    result = calibrate(gen, jaq, prompts, space=space, strategy=args.strategy, points=args.points, seed=args.seed,
                       budget=args.budget, record=record, resume=args.resume, preset=preset, progress=progress,
                       scorer_config=jaq_config, **options)
    plot_landscape(result, os.path.join(args.out, "landscape.png"))
    from ...qsched import Coefficients

    seeds = [args.seed + i for i in range(len(prompts))]
    ident = gen.generate(Coefficients.identity(args.steps), prompts, seeds)
    best = gen.generate(result.best, prompts, seeds)
    fp = None if ref is None else ref.generate(Coefficients.identity(args.steps), prompts, seeds)
    preview_grid(ident, best, os.path.join(args.out, "preview.png"), reference_images=fp)
    print(result.summary())
    written = [preset] + ([record] if os.path.exists(record) else []) + [os.path.join(args.out, "landscape.png"),
                                                                          os.path.join(args.out, "preview.png")]
    rows = "top: identity, bottom: best" if fp is None else "rows: full precision, identity, best"
    print(f"wrote {', '.join(written)} ({rows})")
    return 0


def _sample(args) -> int:
    import os

    from ...qsched import Coefficients
    from ..plots import preview_grid, save_images
    from ..prompts import load_prompts

    preset = Coefficients.load(args.preset)
    steps = preset.steps if args.steps is None else args.steps
    if steps != preset.steps:
        raise ValueError(f"steps mismatch: the preset {args.preset} has {preset.steps} steps but --steps is "
                         f"{steps}; allowed: --steps {preset.steps} (or calibrate a preset for {steps} steps)")
    meta = preset.metadata
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += load_prompts(args.prompts)
    if not prompts:
        raise ValueError("prompts is empty: give --prompt TEXT (repeatable) or --prompts FILE")
    family, sampler = meta.get("family"), meta.get("sampler")
    if args.family and family and args.family != family:
        print(f"qsched sample: warning: preset calibrated for family {family!r}, running {args.family!r}",
              file=sys.stderr)
    from ...qsched.samplers import SAMPLERS
    from ..generate import FAMILIES

    gen = _build_generator(args, steps, family=family if family in FAMILIES else None,
                           sampler=sampler if sampler in SAMPLERS else None,
                           quant=meta.get("quant"))
    if meta.get("model_hash") and gen.model_hash != meta["model_hash"]:
        print(f"qsched sample: warning: preset calibrated on model hash {meta['model_hash'][:12]}, this model is "
              f"{gen.model_hash[:12]}", file=sys.stderr)
    seeds = [args.seed + i for i in range(len(prompts))]
    images = gen.generate(preset, prompts, seeds)
    paths = save_images(images, args.out, "qsched")
    if args.compare:
        ident = gen.generate(Coefficients.identity(steps), prompts, seeds)
        paths += save_images(ident, args.out, "identity")
        paths.append(preview_grid(ident, images, os.path.join(args.out, "compare.png")))
    print("\n".join(paths))
    return 0


def _score(args) -> int:
    import json

    from ...qsched._io import atomic_write_text
    from ..plots import load_images
    from ..prompts import load_prompts
    from ..runner import point_score, score_images

    images = load_images(args.images)
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += load_prompts(args.prompts)
    if len(prompts) == 1:
        prompts = prompts * len(args.images)
    if len(prompts) != len(args.images):
        raise ValueError(f"give one prompt for all images or one per image: {len(args.images)} images, "
                         f"{len(prompts)} prompts")
    jaq, config = _build_jaq(args)
    values, comps = score_images(jaq, images, prompts)
    rows = [{"image": path, "jaq": v, **{k: comps[k][i] for k in sorted(comps)}}
            for i, (path, v) in enumerate(zip(args.images, values))]
    for r in rows:
        print("\t".join([r["image"]] + [f"{k}={r[k]:.6g}" for k in r if k != "image"]))
    print(f"set jaq={point_score(jaq, values, comps):.6g} ({jaq.score_rule})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"jaq": config, "images": rows}, indent=2) + "\n")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. ``kill``, a job scheduler): ends the command like Ctrl-C, with the same resume hint."""


_SIGNALLED: list[int] = []


def _on_signal(signum, frame):
    _SIGNALLED.append(signum)
    import signal

    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _interrupted(command: str, out, exc: BaseException) -> int:
    import signal

    term = signal.SIGTERM in _SIGNALLED or isinstance(exc, Terminated)
    hint = (f": every finished point is in {os.path.join(out, 'record.jsonl')}; resume with the same command plus "
            "--resume" if command == "calibrate" and out else "")
    print(f"qsched {command}: {'terminated' if term else 'interrupted'}{hint}".replace("qsched :", "qsched:"),
          file=sys.stderr)
    return 143 if term else 130


def main(argv: list[str] | None = None) -> int:
    import signal

    given = sys.argv[1:] if argv is None else list(argv)
    command = given[0] if given and not given[0].startswith("-") else ""  # until argparse has run
    out = None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    del _SIGNALLED[:]
    try:
        for s, handler in previous.items():
            if handler in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(s, _on_signal)
        from ...qsched._compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        args = build_parser().parse_args(argv)
        command, out = args.command, getattr(args, "out", None)
        return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM at any moment, imports included
        return _interrupted(command, out, exc)
    except (ValueError, TypeError, FileNotFoundError, UnicodeError) as exc:
        if _SIGNALLED:
            return _interrupted(command, out, exc)
        print(f"qsched {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only folder, permissions: name the file, never a traceback
        if _SIGNALLED:
            return _interrupted(command, out, exc)
        target = getattr(exc, "filename", None)
        print(f"qsched {command}: error: {exc.strerror or exc}" + (f": {target}" if target else ""),
              file=sys.stderr)
        return 2
    except Exception as exc:  # a library that wrapped the interrupt (e.g. diffusers' lazy imports); else a bug
        if _SIGNALLED:
            return _interrupted(command, out, exc)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
