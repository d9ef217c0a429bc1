"""Render benchmarks/results/comfyui_h200.md from the JSON files of bench_comfyui_gpu.py (pure Python).

    python benchmarks/report_comfyui.py benchmarks/results/comfyui_h200_partA.json \\
        benchmarks/results/comfyui_h200_partB.json --earlier benchmarks/results/comfyui_h200.json \\
        --earlier benchmarks/results/comfyui_h200_gguf.json --out benchmarks/results/comfyui_h200.md

Files given positionally are the new runs (``--part``/``--only``: records carry a config key); every ratio is taken
against the core model (bf16 FLUX / fp16 SDXL) measured in the SAME file (part); where that part has no core
baseline of the mode, the newest other part's is used and the cell is marked †. ``--earlier`` files (the first
run's sections: GGUF, pre-quantized file, simulated cards, Quantize Model scenarios) keep only the rows the new runs
did not measure again, each table marked with its run.
"""

from __future__ import annotations

import argparse
import json
import os

GB = 1e9
CORE = {"flux": "core bf16", "sdxl": "core fp16"}
TITLE = {"flux": "FLUX.1-schnell 1024² (4096 image + 512 text tokens)", "sdxl": "SDXL UNet 512²"}
CATS = ("gemm", "attention", "quantize", "conv", "other")


def _f(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def _gb(v):
    return "–" if v is None else f"{v / GB:.2f}"


def load(path: str, label: str | None = None) -> dict:
    with open(path) as f:
        d = json.load(f)
    d["_label"] = label or d.get("run") and f"part {d.get('part') or '-'}, {d['run']}" or \
        f"{os.path.basename(path)} (earlier run)"
    d["_part"] = d.get("part") or os.path.basename(path)
    return d


def _ratio(v, base):
    return None if v is None or not base else v / base


def _cell(v, ratio, mark=""):
    if v is None:
        return "–"
    return f"{v:.3f} ({ratio:.2f}×{mark})" if ratio is not None else f"{v:.3f}"


def _core_value(runs, fam, field, prefer):
    """The core baseline value of ``field`` in run ``prefer``; else the newest other run's, marked †."""
    def find(run):
        for r in run["configs"]:
            if r.get("family") == fam and r.get("name") == CORE[fam] and r.get(field) is not None:
                return r[field]
        return None

    v = find(prefer)
    if v is not None:
        return v, ""
    for run in reversed(runs):
        if run is not prefer and find(run) is not None:
            return find(run), "†"
    return None, ""


def _captured(rec) -> bool:
    """Whether the CUDA-graph stage replayed graphs (False: every call ran eagerly; graph_stats says why)."""
    st = rec.get("graph_stats")
    return not st or bool(st.get("replays"))


def _unfinished(rec, stage) -> str:
    err = (rec.get("stage_errors") or {}).get(stage)
    if err:
        return "failed: " + str(err)[:80]
    return "not finished (the device call ended during this stage)"


def _breakdown_rows(rec):
    for mode, key in (("eager", "breakdown_eager"), ("compiled", "breakdown_compiled"),
                      ("+ CUDA graph", "breakdown_graph")):
        b = rec.get(key)
        if b:
            yield mode, b


def new_tables(runs: list) -> list:
    """Speed, fast path and kernel-time breakdown tables of the new (per-part) runs."""
    out = []
    any_dagger = False
    for fam in ("flux", "sdxl"):
        recs = [(run, r) for run in runs for r in run["configs"] if r.get("family") == fam and r.get("key")]
        if not recs:
            continue
        out += [f"## {TITLE[fam]}: eager, compiled, CUDA graph", "",
                "× = over core " + ("bf16" if fam == "flux" else "fp16") + " of the same mode in the same part "
                "(compiled and graph columns: over core compiled). Part = the device call the row came from; "
                "measured = the config's mode (every mode measures eager first).", "",
                "| config | measured | part | load s | ComfyUI size GB | VRAM held GB | s/step eager (×) | s/step compiled (×) "
                "| + CUDA graph, eager model (× compiled core) | + CUDA graph, compiled model (× compiled core) "
                "| graph output = without graph |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for run, r in recs:
            be, de = _core_value(runs, fam, "s_per_step", run)
            bc, dc = _core_value(runs, fam, "s_per_step_compiled", run)
            any_dagger = any_dagger or bool(de or dc)
            eq = [r[k] for k in ("graph_equal_eager", "graph_equal_compiled") if k in r]
            err = [r[k] for k in ("graph_vs_eager", "graph_vs_compiled") if k in r]
            same = "–" if not eq else ("bit-exact" if eq[0] else f"rel. err {err[0]:.1e}")
            comp = r.get("s_per_step_compiled")
            if comp is None and r.get("mode", "").startswith("compiled"):
                comp_cell = _unfinished(r, "compile")
            else:
                comp_cell = _cell(comp, _ratio(comp, bc), dc)
            graph_cells = [_cell(r.get(k), _ratio(r.get(k), bc), dc) for k in ("s_per_step_graph",
                                                                              "s_per_step_compiled_graph")]
            if not _captured(r):  # the node fell back to eager calls: the time is not a CUDA-graph time
                graph_cells = [c if c == "–" else f"not captured ({c})" for c in graph_cells]
                same = "–" if same == "–" else "no graph ran"
            out.append(f"| {r['name']} | {r.get('mode')} | {run['_part']} | {_f(r.get('load_s'), 1)} | {_gb(r.get('comfy_size'))} | "
                       f"{_gb(r.get('allocated'))} | "
                       f"{_cell(r.get('s_per_step'), _ratio(r.get('s_per_step'), be), de)} | {comp_cell} | "
                       f"{graph_cells[0]} | {graph_cells[1]} | {same} |")
        out.append("")
        out += attention_rows(fam, recs)
        fast = [(run, r) for run, r in recs if "s_per_step_graph" in r or "s_per_step_compiled_graph" in r]
        if fast:
            out += [f"Fast path ({fam.upper()}): 4-step sampling time (`comfy.sample.sample`, batch 1) vs core "
                    "compiled in the same part; the real-time target for SDXL-Turbo is ≤ 0.50×.", "",
                    "| config | part | 4 steps s | × core compiled | graph captures / replays / eager calls |",
                    "|---|---|---|---|---|"]
            for run, r in fast:
                bc, dc = _core_value(runs, fam, "s_per_step_compiled", run)
                for label, k in (("eager model + CUDA graph", "s_per_step_graph"),
                                 ("compiled + CUDA graph", "s_per_step_compiled_graph")):
                    if r.get(k) is not None:
                        st = r.get("graph_stats") or {}
                        ratio = _ratio(r[k], bc)
                        why = st.get("disabled") or (st.get("eager_reason") if not _captured(r) else None)
                        out.append(f"| {r['name']} {label} | {run['_part']} | {4 * r[k]:.3f} | "
                                   f"{'–' if ratio is None else f'{ratio:.2f}{dc}'} | {st.get('captures')} / "
                                   f"{st.get('replays')} / {st.get('eager_calls')}"
                                   f"{' (no graph: ' + str(why) + ')' if why else ''} |")
            out.append("")
        rows = [(run, r, m, b) for run, r in recs for m, b in _breakdown_rows(r)]
        if rows:
            dev = rows[0][3].get("device")
            out += [f"Kernel-time breakdown ({fam.upper()}, one profiled 4-step sampling run after warm-up, per "
                    f"step; {'CUDA kernel time' if dev == 'cuda' else 'CPU operator self time (smoke test)'}). "
                    "busy = union of kernel intervals; launch overhead = wall s/step − busy.", "",
                    "| config | mode | part | wall ms | GPU busy ms | launch overhead ms | kernel ms | "
                    + " | ".join(f"{c} %" for c in CATS) + " |", "|---" * (7 + len(CATS)) + "|"]
            for run, r, m, b in rows:
                sh = b.get("shares") or {}
                out.append(f"| {r['name']} | {m} | {run['_part']} | {_ms(b.get('wall_per_step_s'))} | "
                           f"{_ms(b.get('gpu_busy_per_step_s'))} | {_ms(b.get('launch_overhead_per_step_s'))} | "
                           f"{_ms(b.get('time_per_step_s'))} | "
                           + " | ".join("–" if sh.get(c) is None else f"{100 * sh[c]:.0f}" for c in CATS) + " |")
            out += ["", "Classification: " + rows[0][3].get("note", ""), ""]
    if any_dagger:
        out += ["† baseline from another part (a different device call): compare with care.", ""]
    return out


def attention_rows(fam: str, recs: list) -> list:
    """The 8-bit attention (``+sage``) configs and every config's error vs core, both eager, from one model load:
    s/step with 16-bit then 8-bit attention, the latent error the 8-bit attention adds, and the format's own error
    (its 16-bit-attention latent vs core's in the same run)."""
    rows = [(run, r) for run, r in recs if "err_attention" in r or "err_vs_core" in r]
    if not rows:
        return []
    out = [f"Error and 8-bit attention ({fam.upper()}, eager, one load per row): relative latent error after 4 "
           "steps; attention = 8-bit (sage) vs 16-bit attention on the same model; format = this format's latent "
           "(16-bit attention) vs core's in the same part.", "",
           "| config | part | s/step 16-bit attention | s/step 8-bit attention (×) | error: attention | error: format |",
           "|---|---|---|---|---|---|"]
    for run, r in rows:
        sage = "s_per_step_16bit_attention" in r
        base = r.get("s_per_step_16bit_attention", r.get("s_per_step"))
        cell = _cell(r.get("s_per_step"), _ratio(r.get("s_per_step"), base)) if sage else "–"
        out.append(f"| {r['name']} | {run['_part']} | {_f(base)} | {cell} | {_f(r.get('err_attention'), 4)} | "
                   f"{_f(r.get('err_vs_core'), 4)} |")
    return out + [""]


def _ms(v):
    return "–" if v is None else f"{1e3 * v:.1f}"


def _old_table(rows, base):
    out = ["| config | load s | ComfyUI size GB | VRAM held GB | load | s/step eager (×) | s/step compiled |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = _ratio(r.get("s_per_step"), base)
        out.append(f"| {r['name']} | {_f(r.get('load_s'), 1)} | {_gb(r.get('comfy_size'))} | "
                   f"{_gb(r.get('allocated'))} | {'partial' if r.get('partial') else 'complete'} | "
                   f"{_cell(r.get('s_per_step'), ratio)} | {_f(r.get('s_per_step_compiled'))} |")
    return out


def earlier_tables(earlier: list, runs: list) -> list:
    """The earlier runs' rows that the new runs did not measure again (same family, name, full card, eager)."""
    fresh = {(r.get("family"), r.get("name")) for run in runs for r in run["configs"] if r.get("s_per_step")}
    out = []
    for run in earlier:
        lab = run["_label"]
        for fam in ("flux", "sdxl"):
            base = next((r.get("s_per_step") for r in run["configs"] if r.get("family") == fam
                         and r.get("name", "").startswith(CORE[fam])), None)
            keep = [r for r in run["configs"] if r.get("family") == fam and (fam, r.get("name")) not in fresh]
            if keep:
                out += [f"## {TITLE[fam]}: rows not measured again (run: {lab}; × over core in that run)", ""]
                out += _old_table(keep, base) + [""]
        for gib in sorted({r.get("card_gib") for r in run.get("cards", [])}):
            rows = [r for r in run["cards"] if r.get("card_gib") == gib]
            fam = rows[0].get("family")
            base = next((r.get("s_per_step") for r in run["configs"] if r.get("family") == fam
                         and r.get("name") == CORE[fam]), None)
            out += [f"## Simulated {gib} GiB card ({fam}; run: {lab}; × = vs core on the full card in that run)", ""]
            out += _old_table(rows, base) + [""]
        sc = run.get("scenarios") or {}
        if sc:
            q = sc.get("quantize_loaded_flux", {})
            c = sc.get("clones_alternating", {})
            out += [f"## Quantize Model scenarios (FLUX, full card; run: {lab})", ""]
            if q:
                hb, ha = q.get("held_before", {}), q.get("held_after_q4", {})
                out.append(f"- Quantize Model (w4a8) on the loaded bf16 FLUX: {q.get('quantize_s', 0):.1f} s. VRAM "
                           f"before: {_gb(hb.get('allocated'))} GB; after the quantized model sampled: "
                           f"{_gb(ha.get('allocated'))} GB, loaded models "
                           f"[{', '.join(_gb(x['loaded']) for x in ha.get('loaded', []))}] GB.")
            if c:
                out += [f"- Every repeat identical to its first run: {c.get('all_repeats_identical')}.", "",
                        "| run | same latent as its first run | s (4 steps, incl. loading) | VRAM GB | loaded models (GB) |",
                        "|---|---|---|---|---|"]
                for s in c.get("sequence", []):
                    out.append(f"| {s['run']} | {s['same_as_first']} | {s['s']:.2f} | {_gb(s.get('allocated'))} | "
                               f"{', '.join(_gb(x['loaded']) for x in s.get('loaded', []))} |")
            out.append("")
        if run.get("files"):
            out += [f"Files written (run: {lab}): " + ", ".join(
                f"{k} {v['bytes'] / GB:.2f} GB ({v['write_s']:.0f} s)" for k, v in run["files"].items()), ""]
    return out


def _measured_since(runs: list) -> set:
    """(family, display name) pairs with a compiled number in any per-part run."""
    return {(r.get("family"), r.get("name")) for run in runs if run.get("part") for r in run.get("configs", [])
            if r.get("s_per_step_compiled") is not None}


def problems(runs: list) -> list:
    out = []
    compiled_later = _measured_since(runs)
    for run in runs:
        for s in run.get("skipped", []):
            words = s.split(" (")[0].split()  # "compile sdxl pack w8a8-fp8 (3 s left, ...)"
            if not run.get("part") and words[:1] == ["compile"] and (words[1], " ".join(words[2:])) in compiled_later:
                continue  # measured by a later run
            out.append(f"- not run ({run['_label']}): {s}")
        done = {r.get("key") for r in run.get("configs", [])}
        for key in run.get("keys") or []:
            if key not in done and not any(key in sk for sk in run.get("skipped", [])):
                out.append(f"- not reached ({run['_label']}): {key} (the device call ended first)")
        for e in run.get("errors", []):
            out.append(f"- error ({run['_label']}): {e['section']}: {e['error'][:300]}")
        for r in run.get("configs", []) + run.get("cards", []):
            for st, msg in (r.get("stage_errors") or {}).items():
                out.append(f"- error ({run['_label']}): {r.get('key') or r['name']}: {st}: {msg[:300]}")
    return ["## Not run / failed", ""] + out + [""] if out else []


def render(runs: list, earlier: list, notes: tuple = ()) -> str:
    allr = runs + earlier
    gpus = sorted({f"{r.get('gpu')}, torch {r.get('torch')}" for r in allr})
    lines = [f"# ComfyUI 0.3.64 in-process on {' / '.join(sorted({str(r.get('gpu')) for r in allr}))}, random "
             "weights, batch 1, 4 euler steps", "",
             f"{'; '.join(gpus)}. New runs: " + ", ".join(f"{r['_label']}" for r in runs) + ". Command: "
             "`scripts/device_comfyui_bench.sh A|B` (= `python benchmarks/bench_comfyui_gpu.py --part A|B`); "
             "tables: `python benchmarks/report_comfyui.py`.",
             "VRAM = `torch.cuda.memory_allocated()` after sampling; size = ComfyUI's `model_size()`; load = the "
             "loader call; compiled = ComfyUI's TorchCompileModel wrapper (inductor); CUDA graph = the Q-Sched CUDA "
             "Graph node (`nodes/fastpath.py`).", ""]
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    lines += new_tables(runs)
    lines += earlier_tables(earlier, runs)
    lines += problems(allr)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="JSON files of --part/--only runs")
    ap.add_argument("--earlier", action="append", default=[], help="JSON of an earlier run (PATH or PATH=LABEL)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", action="append", default=[], help="a sentence printed under the header")
    a = ap.parse_args(argv)
    runs = [load(p) for p in a.runs]
    earlier = [load(*e.split("=", 1)) if "=" in e else load(e) for e in a.earlier]
    text = render(runs, earlier, tuple(a.note))
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {len(runs)} new run(s), {len(earlier)} earlier")


if __name__ == "__main__":
    main()
