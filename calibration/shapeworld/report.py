"""The shape world's result tables for the docs, computed from an experiment's ``results.json`` (nothing typed by
hand): per family FD and attribute accuracy for every method, the JAQ-gaming view, the guards, and plain
comparisons (Q-Sched vs naive / PTQD / FP, grid vs zoom) that a verdict can be written from.

    python -m qsched_pack.calibration.shapeworld.report RESULTS.json [--out report.md]
    python -m qsched_pack.calibration.shapeworld.report RESULTS.json --into docs/shape_world.md

``--into`` replaces the text between ``<!-- shapeworld-report:begin -->`` and ``<!-- shapeworld-report:end -->``
in that file (the file must hold both markers; nothing else is touched).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ...qsched._io import atomic_write_text
from . import experiment as E

BEGIN, END = "<!-- shapeworld-report:begin -->", "<!-- shapeworld-report:end -->"
QUANT_METHODS = ("naive", "ptqd", "qsched-zoom", "qsched-grid", "qsched-zoom+accept", "qsched-zoom+heldout",
                 "qsched-zoom+trust")
LABEL = {"naive": "naive", "ptqd": "PTQD", "qsched-zoom": "Q-Sched zoom", "qsched-grid": "Q-Sched grid",
         "qsched-zoom+accept": "+accept", "qsched-zoom+heldout": "+heldout", "qsched-zoom+trust": "+trust"}


def _mean_std(vals) -> tuple[float, float]:
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


def _cell(rows, fam, steps, fmt, method, key, digits, gap=False) -> tuple[str, float | None]:
    sel = E.select(rows, fam, steps, fmt, method)
    if not sel:
        return "–", None
    m, s = _mean_std([x[key] for x in sel])
    text = f"{m:.{digits}f} ± {s:.{digits}f}"
    if "accepted" in sel[0]:
        text += f" [{sum(bool(x['accepted']) for x in sel)}/{len(sel)} kept]"
    if gap and method != "naive":
        pct = E.gap_closed(rows, fam, steps, fmt, method)
        text += "" if pct is None else f" ({pct:.0f}%)"
    return text, m


def metric_table(result: dict, family: str, key: str, digits: int, lower_better: bool) -> str:
    rows, cfg = result["rows"], result["config"]
    head = ["steps", "format", "FP", "FP + Q-Sched zoom"] + [LABEL[m] for m in QUANT_METHODS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for steps in cfg["steps"]:
        fp, _ = _cell(rows, family, steps, "fp32", "fp", key, digits)
        fpq, _ = _cell(rows, family, steps, "fp32", "fp+qsched-zoom", key, digits)
        for fmt in cfg["formats"]:
            cells = [_cell(rows, family, steps, fmt, m, key, digits, gap=key == "fd") for m in QUANT_METHODS]
            if all(v is None for _, v in cells):
                continue
            core = [v for (_, v), m in zip(cells, QUANT_METHODS) if v is not None and "+" not in m]
            best = (min if lower_better else max)(core) if core else None
            texts = [f"**{t}**" if v is not None and v == best and "+" not in m else t
                     for (t, v), m in zip(cells, QUANT_METHODS)]
            lines.append(f"| {steps} | {fmt.upper()} | {fp} | {fpq} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def gaming_table(result: dict) -> str:
    """JAQ (the calibration objective, on unseen seeds) vs FD: does the search raise JAQ above FP's while FD stays
    worse? And how often is the best point on the edge of the search range?"""
    rows, cfg = result["rows"], result["config"]
    lines = ["| family | steps | format | JAQ FP | JAQ naive | JAQ zoom | JAQ grid | CLIP-IQA FP / naive / zoom | "
             "FD FP / naive / zoom | best on range edge (zoom, grid) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for fam in cfg["families"]:
        for steps in cfg["steps"]:
            for fmt in cfg["formats"]:
                sel = {m: E.select(rows, fam, steps, fmt if m != "fp" else "fp32", m)
                       for m in ("fp", "naive", "qsched-zoom", "qsched-grid")}
                if not sel["naive"]:
                    continue

                def mean(m, k):
                    return f"{_mean_std([x[k] for x in sel[m]])[0]:.3f}" if sel[m] else "–"

                def fd(m):
                    return f"{_mean_std([x['fd'] for x in sel[m]])[0]:.0f}" if sel[m] else "–"

                def edge(m):
                    n = sum(1 for x in sel[m] if x["c_x"][0] in (0.8, 1.2) or x["c_eps"][0] in (0.8, 1.2))
                    return f"{n}/{len(sel[m])}" if sel[m] else "–"

                lines.append(f"| {fam} | {steps} | {fmt.upper()} | {mean('fp', 'jaq')} | {mean('naive', 'jaq')} | "
                             f"{mean('qsched-zoom', 'jaq')} | {mean('qsched-grid', 'jaq')} | "
                             f"{mean('fp', 'iq')} / {mean('naive', 'iq')} / {mean('qsched-zoom', 'iq')} | "
                             f"{fd('fp')} / {fd('naive')} / {fd('qsched-zoom')} | "
                             f"{edge('qsched-zoom')}, {edge('qsched-grid')} |")
    return "\n".join(lines)


def comparisons(result: dict) -> list[str]:
    """Facts for a verdict, per family and format: in how many step settings a method's mean FD is below
    another's (each over the seeds both have), and the gap it closes."""
    rows, cfg = result["rows"], result["config"]
    out = []

    def fd(fam, steps, fmt, method):
        sel = E.select(rows, fam, steps, fmt, method)
        return _mean_std([x["fd"] for x in sel])[0] if sel else None

    for fam in cfg["families"]:
        for fmt in cfg["formats"]:
            parts = []
            for method in ("qsched-zoom", "qsched-grid"):
                wins = {"naive": [], "PTQD": [], "FP": []}
                gaps = []
                for steps in cfg["steps"]:
                    q = fd(fam, steps, fmt, method)
                    if q is None:
                        continue
                    for name, ref in (("naive", fd(fam, steps, fmt, "naive")), ("PTQD", fd(fam, steps, fmt, "ptqd")),
                                      ("FP", fd(fam, steps, "fp32", "fp"))):
                        if ref is not None:
                            wins[name].append(f"{'<' if q < ref else '>='}{steps}")
                    pct = E.gap_closed(rows, fam, steps, fmt, method)
                    gaps.append(f"{steps} st: " + ("n/a" if pct is None else f"{pct:.0f}%"))
                if gaps:
                    parts.append(f"{LABEL[method]} FD vs naive / PTQD / FP by steps: "
                                 + "; ".join(f"{k} {' '.join(v)}" for k, v in wins.items())
                                 + f"; gap closed {', '.join(gaps)}")
            ptqd = [f"{s} st: " + ("n/a" if (p := E.gap_closed(rows, fam, s, fmt, "ptqd")) is None else f"{p:.0f}%")
                    for s in cfg["steps"] if E.select(rows, fam, s, fmt, "ptqd")]
            if parts:
                out.append(f"- {fam} {fmt.upper()}: " + " | ".join(parts) + f" | PTQD gap closed {', '.join(ptqd)}")
    return out


REF_METHODS = ("ptqd", "qsched-zoom", "qsched-reference", "qsched-reference-unchecked", "qsched-reference-tf",
               "qsched-reference-x0", "qsched-reference-search", "qsched-hybrid")
REF_LABEL = {"ptqd": "PTQD", "qsched-zoom": "JAQ zoom", "qsched-reference": "reference",
             "qsched-reference-unchecked": "reference, unchecked", "qsched-reference-tf": "teacher-forced",
             "qsched-reference-x0": "state+x0", "qsched-reference-search": "distance search",
             "qsched-hybrid": "hybrid"}


def _paired(rows, fam, steps, fmt, method, other, key):
    """Paired (by seed) differences method − other of ``key``: list (empty if either is missing)."""
    a = {x["seed"]: x[key] for x in E.select(rows, fam, steps, fmt, method)}
    b = {x["seed"]: x[key] for x in E.select(rows, fam, steps, fmt if other != "fp" else "fp32", other)}
    return [a[k] - b[k] for k in sorted(a) if k in b]


def verdict(diffs, rel: float) -> str:
    """'better' / 'worse' / 'tie' of paired differences (lower is better): beyond noise = the mean exceeds twice
    its standard error over seeds; with one seed (no spread), beyond ``rel`` (an FD change under 1% is a tie)."""
    if not diffs:
        return "–"
    m, s = _mean_std(diffs)
    noise = 2 * s / len(diffs) ** 0.5 if len(diffs) > 1 else rel
    if m < -noise:
        return "better"
    if m > noise:
        return "worse"
    return "tie"


def reference_tables(result: dict, key: str = "fd_heldout") -> tuple[str, list[str]]:
    """Held-out FD of the reference-anchored methods beside naive / PTQD / JAQ zoom, per setting, and the issue's
    targets counted from it."""
    rows, cfg = result["rows"], result["config"]
    head = ["family", "steps", "format", "FP", "naive"] + [REF_LABEL[m] for m in REF_METHODS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    count = {"vs_naive_4bit": [], "worse_any": [], "vs_ptqd_4bit": [], "hybrid_vs_ref": [], "cost": []}
    for fam in cfg["families"]:
        for steps in cfg["steps"]:
            fp, _ = _cell(rows, fam, steps, "fp32", "fp", key, 1)
            for fmt in cfg["formats"]:
                naive, nv = _cell(rows, fam, steps, fmt, "naive", key, 1)
                if nv is None:
                    continue
                cells = []
                for m in REF_METHODS:
                    text, v = _cell(rows, fam, steps, fmt, m, key, 1)
                    pct = None if v is None else E.gap_closed(rows, fam, steps, fmt, m, key=key)
                    text += "" if pct is None else f" ({pct:.0f}%)"
                    cells.append(text)
                lines.append(f"| {fam} | {steps} | {fmt.upper()} | {fp} | {naive} | " + " | ".join(cells) + " |")
                rel = 0.01 * nv
                v_naive = verdict(_paired(rows, fam, steps, fmt, "qsched-reference", "naive", key), rel)
                if v_naive == "–":
                    continue
                tag = f"{fam} {fmt.upper()} {steps} st"
                count["worse_any"].append((tag, v_naive))
                if fmt != "w8a8":
                    count["vs_naive_4bit"].append((tag, v_naive))
                    count["vs_ptqd_4bit"].append(
                        (tag, verdict(_paired(rows, fam, steps, fmt, "qsched-reference", "ptqd", key), rel)))
                hyb = [x for x in E.select(rows, fam, steps, fmt, "qsched-hybrid") if x.get("accepted")]
                if hyb:
                    count["hybrid_vs_ref"].append(
                        (tag, verdict(_paired(rows, fam, steps, fmt, "qsched-hybrid", "qsched-reference", key), rel)))
    images = {}
    for x in rows:
        if "images" in x:
            images.setdefault(x["method"], []).append(x["images"])
    facts = []
    for name, what in (("vs_naive_4bit", "reference vs naive, 4-bit settings"),
                       ("worse_any", "reference vs naive, every quantized setting"),
                       ("vs_ptqd_4bit", "reference vs PTQD, 4-bit settings"),
                       ("hybrid_vs_ref", "hybrid vs reference where the hybrid was kept")):
        v = count[name]
        tally = {k: [t for t, r in v if r == k] for k in ("better", "tie", "worse")}
        facts.append(f"- {what}: better in {len(tally['better'])} of {len(v)}, tie in {len(tally['tie'])}, worse "
                     f"in {len(tally['worse'])}" + (f" ({', '.join(tally['worse'])})" if tally["worse"] else ""))
    if "qsched-reference" in images and "qsched-zoom" in images:
        r, z = (sum(images[m]) / len(images[m]) for m in ("qsched-reference", "qsched-zoom"))
        facts.append(f"- cost: reference {r:.0f} images per calibration, JAQ zoom {z:.0f}: {100 * r / z:.1f}%")
    elif "qsched-reference" in images:
        facts.append(f"- cost: reference {sum(images['qsched-reference']) / len(images['qsched-reference']):.0f} "
                     "images per calibration (no JAQ zoom in this run)")
    return "\n".join(lines), facts


def report(result: dict) -> str:
    cfg = result["config"]
    n = len(cfg["seeds"])
    parts = [f"Computed by `calibration/shapeworld/report.py` from the experiment's results.json: {n} seed(s), "
             f"{cfg['per_prompt']} images per prompt x 20 calibration prompts per row, {cfg['points']}-point "
             f"lattice, device {cfg.get('device')}, model {str(cfg['model_hash'])[:12]}. Cells: mean ± std over "
             "seeds; (x%) = share of the FP -> naive FD gap closed, paired by seed, where the gap exceeds twice its "
             "spread and 5% of FP's FD; bold = best of naive / PTQD / Q-Sched zoom / grid; [k/n kept] = seeds whose "
             "coefficients the guard kept (else the row is naive's)."]
    missing, skipped = cfg.get("missing", []), cfg.get("grid_skipped", [])
    if missing or skipped:
        parts.append(f"Not computed (time limit): {len(missing)} settings {missing}; {len(skipped)} grid searches "
                     f"{skipped}.")
    for fam in cfg["families"]:
        parts.append(f"### {fam.upper()} family: FD ↓ (reference network, vs held-out renders)\n\n"
                     + metric_table(result, fam, "fd", 1, True))
        parts.append(f"### {fam.upper()} family: attribute accuracy ↑\n\n"
                     + metric_table(result, fam, "accuracy", 3, False))
    if any(x["method"].startswith("qsched-reference") for x in result["rows"]):
        table, facts = reference_tables(result)
        parts.append("### Reference-anchored calibration: FD on the 20 held-out prompts ↓ (mean ± std over seeds, "
                     "(x%) = FD gap closed, [k/n kept] = seeds whose held-out test kept the coefficients)\n\n"
                     + table + "\n\n" + "\n".join(facts))
    parts.append("### JAQ gaming: the objective vs the reference\n\n" + gaming_table(result))
    parts.append("### Comparisons (mean FD per step count: `<4` = lower than the other at 4 steps)\n\n"
                 + "\n".join(comparisons(result)))
    spent = {}
    for x in result["rows"]:
        if "images" in x:
            spent.setdefault(x["method"], []).append(x["images"])
    parts.append("Images spent per calibration (mean): " + ", ".join(
        f"{m} {sum(v) / len(v):.0f}" for m, v in spent.items()) + ".")
    return "\n\n".join(parts) + "\n"


def insert(path: str, text: str) -> None:
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"{path}: needs exactly one {BEGIN} followed by one {END} (where the report goes)")
    a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    atomic_write_text(path, doc[:a] + "\n" + text + doc[b:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched_pack.calibration.shapeworld.report",
                                description="Shape world: docs tables from an experiment's results.json.")
    p.add_argument("results")
    p.add_argument("--out", default=None, help="write the report to this file (default: print it)")
    p.add_argument("--into", default=None, help="replace the marked block of this markdown file")
    a = p.parse_args(argv)
    with open(a.results, encoding="utf-8") as f:
        text = report(json.load(f))
    if a.out:
        atomic_write_text(a.out, text)
    if a.into:
        insert(a.into, text)
    if not (a.out or a.into):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
