"""Acceptance rules for the reference objective, replayed on an experiment's logged per-image distances.

A run with ``--reference reference-rules reference+ptqd`` logs, for every (family, steps, seed, format), the held-out
FD of each candidate correction measured without any test (``qsched-reference-unchecked``: the coefficient fit;
``ptqd-fit4``: PTQD's correction fitted on the same 4 prompts; ``qsched-reference+ptqd-unchecked``: the fit on top
of it) and the per-image distances of the 8 test images to their FP images (``distances``). A *rule* picks, from
those test distances alone, one candidate or naive; its FD is then read off the logged rows. So one GPU run scores
every rule, and a rule chosen on some seeds is confirmed on others:

    python -m qsched_pack.calibration.shapeworld.rules RESULTS.json --explore 0 1 2 --confirm 3 4 5
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..reference import acceptance_test
from . import report as Rep

#: candidate -> (row method holding its FD, row method holding its distances, distance set name)
CANDIDATES = {"fit": ("qsched-reference-unchecked", "qsched-reference-unchecked", "fitted"),
              "ptqd": ("ptqd-fit4", "ptqd-fit4", "corrected"),
              "ptqd+fit": ("qsched-reference+ptqd-unchecked", "qsched-reference+ptqd-unchecked", "fitted"),
              "scale": ("ptqd-scale", "ptqd-scale", "scale"),
              "iv": ("qsched-reference-iv-unchecked", "qsched-reference-iv-unchecked", "fitted"),
              "iv-tf": ("qsched-reference-iv-tf-unchecked", "qsched-reference-iv-tf-unchecked", "fitted")}
#: rules: name -> (distance names, candidates, family-wise alpha); a candidate is kept if its distance drops
#: significantly on any listed distance (alpha split over distances x candidates) and the first listed distance
#: does not grow; of the kept candidates the one with the largest drop on the first distance wins.
RULES = {
    "shipped (pixel, fit)": (("pixel",), ("fit",), 0.05),
    "A (pixel|lowpass8, fit)": (("pixel", "lowpass8"), ("fit",), 0.05),
    "stats (fit)": (("stats",), ("fit",), 0.05),
    "stats (ptqd)": (("stats",), ("ptqd",), 0.05),
    "stats (ptqd+fit)": (("stats",), ("ptqd+fit",), 0.05),
    "stats (fit|ptqd|ptqd+fit)": (("stats",), ("fit", "ptqd", "ptqd+fit"), 0.05),
    "stats|pixel (fit|ptqd|ptqd+fit)": (("stats", "pixel"), ("fit", "ptqd", "ptqd+fit"), 0.05),
    "pixel (ptqd+fit)": (("pixel",), ("ptqd+fit",), 0.05),
    "pixel (scale)": (("pixel",), ("scale",), 0.05),
    "pixel (fit|scale)": (("pixel",), ("fit", "scale"), 0.05),
    "stats (scale)": (("stats",), ("scale",), 0.05),
    "no test (scale)": ((), ("scale",), 0.05),
    "pixel (iv)": (("pixel",), ("iv",), 0.05),
    "pixel (iv-tf)": (("pixel",), ("iv-tf",), 0.05),
    "stats (iv)": (("stats",), ("iv",), 0.05),
    "pixel|stats (iv)": (("pixel", "stats"), ("iv",), 0.05),
    "pixel (fit|iv)": (("pixel",), ("fit", "iv"), 0.05),
    "lowpass4 (iv)": (("lowpass4",), ("iv",), 0.05),
    "pixel|lowpass4 (iv)": (("pixel", "lowpass4"), ("iv",), 0.05),
    "lowpass4|pixel (iv)": (("lowpass4", "pixel"), ("iv",), 0.05),
    "lowpass8|lowpass4 (iv)": (("lowpass8", "lowpass4"), ("iv",), 0.05),
    "no test (iv)": ((), ("iv",), 0.05),
    "no test (iv-tf)": ((), ("iv-tf",), 0.05),
    "no test (fit)": ((), ("fit",), 0.05),
    "no test (ptqd+fit)": ((), ("ptqd+fit",), 0.05),
    "no test (ptqd)": ((), ("ptqd",), 0.05),
}


def _row(rows, key, method):
    for x in rows:
        if (x["family"], x["steps"], x["seed"], x.get("format")) == key and x["method"] == method:
            return x
    return None


def choose(rows, key, rule) -> str | None:
    """The candidate ``rule`` keeps for setting ``key`` = (family, steps, seed, format), or None (naive)."""
    dists, cands, alpha = rule
    if not dists:
        return cands[0]
    best, best_drop = None, 0.0
    level = alpha / (len(dists) * len(cands))
    for c in cands:
        _, dmethod, name = CANDIDATES[c]
        row = _row(rows, key, dmethod)
        if row is None or "distances" not in row:
            return None
        tests = [acceptance_test(torch.tensor(row["distances"][d]["identity"]),
                                 torch.tensor(row["distances"][d][name]), alpha=level) for d in dists]
        if tests[0].drop < 0 or not any(t.accepted for t in tests):
            continue
        if tests[0].drop > best_drop or best is None:
            best, best_drop = c, tests[0].drop
    return best


def rule_rows(rows, rule, name, seeds) -> list[dict]:
    out = []
    for x in rows:
        if x["method"] != "naive" or x["seed"] not in seeds:
            continue
        key = (x["family"], x["steps"], x["seed"], x["format"])
        c = choose(rows, key, rule)
        src = x if c is None else _row(rows, key, CANDIDATES[c][0])
        if src is None:
            continue
        out.append(dict(x, method=name, fd_heldout=src["fd_heldout"], kept=c))
    return out


def tally(result, seeds, key="fd_heldout") -> list[str]:
    rows, cfg = result["rows"], result["config"]
    lines = ["| rule | better than naive (4-bit) | worse than naive (all) | better than PTQD (4-bit) | worse than "
             "PTQD (4-bit) | FD gap closed, 4-bit mean (PTQD) | kept (per candidate, then naive) |",
             "|---|---|---|---|---|---|---|"]
    for name, rule in RULES.items():
        extra = rule_rows(rows, rule, "rule", seeds)
        allrows = [x for x in rows if x["seed"] in seeds] + extra
        n4, w, p4, pw4, total = 0, [], 0, [], 0
        for fam in cfg["families"]:
            for steps in cfg["steps"]:
                for fmt in cfg["formats"]:
                    nv = E_mean(allrows, fam, steps, fmt, "naive", key)
                    if nv is None:
                        continue
                    v = Rep.verdict(Rep._paired(allrows, fam, steps, fmt, "rule", "naive", key), 0.01 * nv)
                    if v == "–":
                        continue
                    total += 1
                    if v == "worse":
                        w.append(f"{fam} {fmt} {steps}")
                    if fmt != "w8a8":
                        n4 += v == "better"
                        vp = Rep.verdict(Rep._paired(allrows, fam, steps, fmt, "rule", "ptqd", key), 0.01 * nv)
                        p4 += vp == "better"
                        if vp == "worse":
                            pw4.append(f"{fam} {fmt} {steps}")
        gap = _gap(allrows, extra, key)
        kept = [x["kept"] for x in extra]
        kc = " / ".join(str(sum(k == c for k in kept)) for c in (*CANDIDATES, None))
        lines.append(f"| {name} | {n4} | {len(w)} of {total}{' (' + ', '.join(w) + ')' if w else ''} | {p4} | "
                     f"{len(pw4)} | {gap} | {kc} |")
    return lines


def _gap(rows, rule_rows_, key) -> str:
    """Mean over the 4-bit (setting, seed) rows of the share of the FP -> naive FD gap closed, the rule's and PTQD's."""
    fp = {(x["family"], x["steps"], x["seed"]): x[key] for x in rows if x["method"] == "fp"}
    ptqd = {(x["family"], x["steps"], x["seed"], x["format"]): x[key] for x in rows if x["method"] == "ptqd"}
    ours, theirs = [], []
    for x in rule_rows_:
        k3, k4 = (x["family"], x["steps"], x["seed"]), (x["family"], x["steps"], x["seed"], x["format"])
        naive = next(y[key] for y in rows if y["method"] == "naive" and
                     (y["family"], y["steps"], y["seed"], y["format"]) == k4)
        if x["format"] == "w8a8" or k3 not in fp or k4 not in ptqd or naive - fp[k3] <= 0:
            continue
        ours.append((naive - x[key]) / (naive - fp[k3]))
        theirs.append((naive - ptqd[k4]) / (naive - fp[k3]))
    if not ours:
        return "–"
    return f"{100 * sum(ours) / len(ours):.0f}% ({100 * sum(theirs) / len(theirs):.0f}%)"


TABLE_METHODS = (("naive", "naive"), ("ptqd", "PTQD"), ("qsched-reference", "least squares (tested)"),
                 ("qsched-reference-unchecked", "least squares, unchecked"),
                 ("qsched-reference-iv", "instrumental (tested)"),
                 ("qsched-reference-iv-unchecked", "instrumental, unchecked"))


def setting_table(result, key="fd_heldout") -> str:
    """Held-out FD per setting, mean over the seeds run: naive, PTQD and both fits with and without the shipped
    test, (x%) = share of the FP -> naive gap closed, [k/n kept] = seeds whose test kept the fit."""
    rows, cfg = result["rows"], result["config"]
    head = ["family", "steps", "format", "seeds", "FP"] + [label for _, label in TABLE_METHODS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fam in cfg["families"]:
        for steps in cfg["steps"]:
            fp = E_mean(rows, fam, steps, "fp32", "fp", key)
            for fmt in cfg["formats"]:
                naive = E_mean(rows, fam, steps, fmt, "naive", key)
                if naive is None:
                    continue
                seeds = sorted({x["seed"] for x in rows if (x["family"], x["steps"], x.get("format"), x["method"])
                                == (fam, steps, fmt, "naive")})
                cells = []
                for m, _ in TABLE_METHODS:
                    v = E_mean(rows, fam, steps, fmt, m, key)
                    sel = [x for x in rows if (x["family"], x["steps"], x.get("format"), x["method"]) ==
                           (fam, steps, fmt, m)]
                    text = "–" if v is None else f"{v:.1f}"
                    if v is not None and m != "naive" and fp is not None and naive - fp > 0.05 * fp:
                        text += f" ({100 * (naive - v) / (naive - fp):.0f}%)"
                    if sel and "accepted" in sel[0]:
                        text += f" [{sum(bool(x['accepted']) for x in sel)}/{len(sel)} kept]"
                    cells.append(text)
                lines.append(f"| {fam} | {steps} | {fmt.upper()} | {','.join(map(str, seeds))} | "
                             f"{'–' if fp is None else f'{fp:.1f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def E_mean(rows, fam, steps, fmt, method, key):
    sel = [x[key] for x in rows if (x["family"], x["steps"], x.get("format"), x["method"]) == (fam, steps, fmt, method)]
    return sum(sel) / len(sel) if sel else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsched_pack.calibration.shapeworld.rules", description=__doc__)
    p.add_argument("results")
    p.add_argument("--explore", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--confirm", type=int, nargs="*", default=[3, 4, 5])
    a = p.parse_args(argv)
    with open(a.results, encoding="utf-8") as f:
        result = json.load(f)
    print(setting_table(result))
    for title, seeds in (("explore", a.explore), ("confirm", a.confirm)):
        if seeds:
            print(f"\n### seeds {seeds} ({title})\n")
            print("\n".join(tally(result, set(seeds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
