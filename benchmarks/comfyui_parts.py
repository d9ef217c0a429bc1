"""Which configs the real-ComfyUI GPU benchmark runs, in which order (pure Python: no torch, no ComfyUI).

A config key is ``family/format/mode``:

* family: ``flux`` (FLUX.1-schnell 1024²) or ``sdxl`` (SDXL UNet 512²);
* format: ``bf16`` / ``fp16`` (core, the family's own dtype), ``fp8_fast`` (core ``fp8_e4m3fn_fast``), or a pack
  format (``w8a8``, ``w8a8-fp8``, ``w4a8``, ``w4a8-fp8``);
  A format may end in ``+sage``: the same model with 8-bit attention (the pack's ``sage 8-bit`` option,
  ComfyUI's SageAttention path); the config then also measures the model with 16-bit attention, eager, first, and
  records the error the 8-bit attention adds.
* mode: ``eager``; ``graph`` (eager + the Q-Sched CUDA Graph fast path); ``compiled`` (core TorchCompileModel
  wrapper, inductor); ``compiled+graph`` (compiled, then the fast path over the compiled model); ``refcal`` (a
  Q-Sched Calibrate run against the full-precision model: the core model, Quantize Model in ``format``, the node
  with objective "match full precision"); ``refcal-card`` (the same on a simulated small card, where the
  full-precision reference loads partially: FLUX 24 GiB, SDXL 8 GiB).
  Every mode measures (and profiles) eager s/step first on the loaded model and saves it; the compiled modes then
  add the compiled numbers.

The device gives one command at most 10 minutes, so the benchmark runs in parts, each ordered by importance: a
config starts only if its time estimate (``need_s``) fits in what is left of the budget, and every result is saved
as it comes, so a part cut short keeps what it measured.
"""

from __future__ import annotations

FAMILIES = ("flux", "sdxl")
CORE_FORMATS = {"bf16": "core bf16", "fp16": "core fp16", "fp8_fast": "core fp8_e4m3fn_fast"}
PACK_FORMATS = ("w8a8", "w8a8-fp8", "w4a8", "w4a8-fp8")
MODES = ("eager", "graph", "compiled", "compiled+graph", "refcal", "refcal-card")
BASELINE = {"flux": "bf16", "sdxl": "fp16"}  # the core config every ratio of a family is taken against

# Seconds a config needs on an H200 (load + eager + compile + timed runs + one profiled 4-step run per mode), the
# largest per family and mode measured in earlier calls (benchmarks/results/comfyui_h200_part*_bench.log): FLUX
# compiled+graph 75 s (bf16) / 155 s (w8a8-fp8) / 171 s (w4a8-fp8); SDXL compiled+graph 141 s (fp16) / 238 s
# (w8a8-fp8; its compile alone 150 s), and SDXL w4a8-fp8's compile did not finish in the 200 s left. SDXL's UNet
# compiles slower than FLUX (more distinct blocks). Plan two or three SDXL compiles per 10-minute device call.
NEED_S = {("flux", "eager"): 25, ("flux", "graph"): 35, ("flux", "compiled"): 165, ("flux", "compiled+graph"): 175,
          ("sdxl", "eager"): 12, ("sdxl", "graph"): 20, ("sdxl", "compiled"): 230, ("sdxl", "compiled+graph"): 240,
          # estimates before the first measurement: two node runs (cold, warm) of 16 prompts + the random weights
          ("flux", "refcal"): 100, ("flux", "refcal-card"): 120, ("sdxl", "refcal"): 35, ("sdxl", "refcal-card"): 40}
#: Card sizes (GiB) of the refcal-card mode: the full-precision model and the quantized one do not both fit.
REFCAL_CARD = {"flux": 24, "sdxl": 8}
WRITE_S = {"flux": 40, "sdxl": 8}

# Part A: FLUX. The acceptance rows first: core bf16 (the baseline), w8a8-fp8 and w4a8-fp8, each eager (measured and
# profiled first, saved before compiling), compiled, compiled + CUDA graph; then what the last run measured
# already (core fp8_fast, w4a8, w8a8 eager) if time is left. No separate eager rows for the first three: a FLUX load
# + first run costs 10-15 s each, the difference between fitting the third compile in the budget or not.
PART_A = ("flux/bf16/compiled+graph", "flux/w8a8-fp8/compiled+graph", "flux/w4a8-fp8/compiled+graph",
          "flux/fp8_fast/eager", "flux/w4a8/eager", "flux/w8a8/eager")
# Part B: SDXL. Every format eager (core fp16 with the fast path), then compiled (+ fast path on core fp16 and the
# fp8 formats: the real-time target is the fast path vs core compiled fp16), then FLUX compiled leftovers
# (their ratios are taken against part A's core bf16: the report marks them).
PART_B = ("sdxl/fp16/graph", "sdxl/fp8_fast/eager", "sdxl/w8a8-fp8/eager", "sdxl/w4a8-fp8/eager", "sdxl/w4a8/eager",
          "sdxl/w8a8/eager",
          "sdxl/fp16/compiled+graph", "sdxl/w8a8-fp8/compiled+graph", "sdxl/w4a8-fp8/compiled+graph",
          "sdxl/w4a8/compiled", "sdxl/w8a8/compiled", "sdxl/fp8_fast/compiled",
          "flux/w8a8/compiled", "flux/w4a8/compiled", "flux/fp8_fast/compiled")
# A CPU smoke test of the same code paths (tiny models): one config of each mode per family.
PART_TINY = ("flux/bf16/eager", "flux/w8a8/compiled", "sdxl/fp16/graph", "sdxl/w8a8/eager",
             "sdxl/fp16/compiled+graph")
# Part R: calibration against the full-precision model (the issue-21 targets: FLUX w4a8-fp8 <= 60 s, SDXL w8a8-fp8
# <= 15 s on the H200), then the small-card runs if time is left.
PART_R = ("flux/w4a8-fp8/refcal", "sdxl/w8a8-fp8/refcal", "sdxl/w8a8-fp8/refcal-card", "flux/w4a8-fp8/refcal-card")
PART_RTINY = ("sdxl/w8a8/refcal", "flux/w8a8/refcal")
PARTS = {"A": PART_A, "B": PART_B, "tiny": PART_TINY, "R": PART_R, "Rtiny": PART_RTINY}


class ConfigError(ValueError):
    pass


def parse(key: str) -> tuple[str, str, str]:
    """``family/format/mode`` -> (family, format, mode), checked."""
    parts = key.strip().split("/")
    if len(parts) != 3:
        raise ConfigError(f"--only: config {key!r} must be family/format/mode, e.g. flux/w8a8-fp8/compiled")
    fam, fmt, mode = parts
    fmt_base, _ = split_attention(fmt)
    if fam not in FAMILIES:
        raise ConfigError(f"--only: config {key!r}: family must be one of {', '.join(FAMILIES)}")
    if fmt_base not in CORE_FORMATS and fmt_base not in PACK_FORMATS:
        raise ConfigError(f"--only: config {key!r}: format must be one of "
                          f"{', '.join(list(CORE_FORMATS) + list(PACK_FORMATS))}, optionally followed by "
                          f"{SAGE_SUFFIX}")
    if fmt_base in ("bf16", "fp16") and fmt_base != BASELINE[fam]:
        raise ConfigError(f"--only: config {key!r}: the core {fam} model is {BASELINE[fam]}")
    if mode not in MODES:
        raise ConfigError(f"--only: config {key!r}: mode must be one of {', '.join(MODES)}")
    return fam, fmt, mode


SAGE_SUFFIX = "+sage"


def split_attention(fmt: str) -> tuple[str, bool]:
    """``w8a8-fp8+sage`` -> (``w8a8-fp8``, True): the weight format and whether attention runs 8-bit (sage)."""
    if fmt.endswith(SAGE_SUFFIX):
        return fmt[:-len(SAGE_SUFFIX)], True
    return fmt, False


def display_name(fmt: str) -> str:
    """The row name of a format in the tables (the names the stored results use)."""
    base, sage = split_attention(fmt)
    return (CORE_FORMATS.get(base) or f"pack {base}") + (" + sage attention" if sage else "")


def need_s(key: str, written: set) -> float:
    fam, fmt, mode = parse(key)
    extra = NEED_S[(fam, "eager")] if split_attention(fmt)[1] else 0  # the 16-bit attention runs first
    return NEED_S[(fam, mode)] + extra + (0 if fam in written else WRITE_S[fam])


def select(part: str | None, only: str | None, skip: set) -> list[str]:
    """The ordered config keys of ``--part`` or ``--only`` (comma-separated keys), less those ``--skip`` names:
    a family (``flux``), a mode (``compiled``), a format (``w4a8``) or a whole key."""
    if part and only:
        raise ConfigError("--part and --only: give one of them")
    if part:
        if part not in PARTS:
            raise ConfigError(f"--part {part!r}: must be one of {', '.join(PARTS)}")
        keys = list(PARTS[part])
    elif only:
        keys = [k.strip() for k in only.split(",") if k.strip()]
    else:
        return []
    out = []
    for key in keys:
        fam, fmt, mode = parse(key)
        if skip & {fam, fmt, mode, key} or ("compile" in skip and mode.startswith("compiled")) or (
                "fastpath" in skip and mode.endswith("graph")):
            continue
        if key not in out:
            out.append(key)
    return out
