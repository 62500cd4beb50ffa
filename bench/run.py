"""``python -m bench.run``: every benchmark of the design's speed targets; JSON + markdown reports; the book page.

Benchmarks (``--only`` picks some; see each module's docstring):

    retrain     chapter-1 default retrain, ours vs a dense-masked loop           (bench/chapter1.py)
    probes      chapter-1 probe bundle at 512 probe points                       (bench/chapter1.py)
    layer       MoE layer forward+backward vs transformers MixtralSparseMoeBlock (bench/layer.py)
    jacobians   expert Jacobians vs vmap(jacrev) and a per-token autograd loop   (bench/jacobians.py)
    scaling     our layer's time vs tokens, experts and width; power-law fits    (bench/scaling.py)
    multiseed   8 seeds trained at once vs one seed                              (bench/multiseed.py, if present)
    lm          the transformer LM's training tokens/s vs MixtralForCausalLM     (bench/lm.py)
    dashboards  each chapter's dashboard, slider → new run done, kernel side     (bench/dashboards.py)

The browser side of the same wait (keypress → status ack, keypress → "done" in JupyterLab in headless Chromium) is
measured by ``tests/browser/test_chapter1_browser.py``, which writes ``build/browser/latency.json``; when that file
exists, a run that writes ``bench/results`` copies it to ``bench/results/browser-chapter1.json`` (the Performance page
shows both sides beside their targets).

Every comparison is taken side by side in one process, the candidates interleaved (alternating order) so machine
drift hits all of them; numbers are medians over repeats with their min–max (``bench/common.py``).

For each thread count (``--threads 1,2``: the dashboards train on one thread) the suite writes
``<out>/bench-<device>-<N>t.json`` and ``<out>/report-<device>-<N>t.md`` and prints the report; then
``tools/make_performance_figure.py`` rebuilds the book's Performance page and its offline scaling figure from the
JSON files. ``--quick`` is a smoke test (2 repeats, short blocks) that writes to a temporary folder, never over the
committed results. ``--only`` merges into the existing JSON, keeping the other benchmarks' rows.

JSON layout: ``{"environment": {...}, "quick": bool, "benches": {name: {..., "targets": [row, ...], "date", "wall_s",
"loadavg_1min_after"}}}``; a target row is ``{"bench", "what", "measured", "target", "met", "value"}``
(:func:`bench.common.target_row`); a benchmark that could not run is ``{"skipped": reason}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import common
from .common import fmt_ratio, fmt_s, fmt_stats

RESULTS = Path(__file__).resolve().parent / "results"
BENCHES = ("retrain", "probes", "layer", "jacobians", "scaling", "multiseed", "lm", "dashboards")
BROWSER_JSON = common.REPO / "build" / "browser" / "latency.json"     # written by tests/browser/test_chapter1_browser.py
BROWSER_RESULT = "browser-chapter1.json"
GPU_NOTE = "GPU: not measured in this session."

# (repeats, min_block_s, jacobian loop points): full run vs --quick smoke test
FULL = {"repeats": 5, "layer_repeats": 7, "jac_repeats": 3, "min_block_s": 0.02, "loop_points": 8}
QUICK = {"repeats": 2, "layer_repeats": 2, "jac_repeats": 2, "min_block_s": 0.003, "loop_points": 2}


def run_multiseed(repeats: int, threads: int, log=print) -> dict:
    """``bench.multiseed.bench_multiseed(repeats, threads)`` if that module exists, else a skip note.

    What the report and the book page read from its dict: ``"targets"``, a list of
    :func:`bench.common.target_row` dicts (they join the targets table); every other scalar field goes into a
    details table, and every list of dicts into a table of its own.
    """
    try:
        from .multiseed import bench_multiseed
    except ModuleNotFoundError as err:
        if err.name not in ("bench.multiseed", f"{__package__}.multiseed"):
            raise
        return {"skipped": "bench/multiseed.py is not present (the 8-seeds-at-once benchmark is not in this tree)"}
    out = bench_multiseed(repeats, threads)
    log(f"  multiseed done ({len(out.get('targets', []))} target rows)")
    return out


def run_suite(only: tuple[str, ...], quick: bool, device: str, threads: int, log=print) -> dict:
    """Run the selected benchmarks at the current thread count; ``{name: result dict}``."""
    from . import chapter1, dashboards, jacobians, layer, lm, scaling
    p = QUICK if quick else FULL
    calls = {
        "retrain": lambda: chapter1.bench_retrain(p["repeats"], device, log),
        "probes": lambda: chapter1.bench_probes(p["repeats"], device, log),
        "layer": lambda: layer.bench_layer(p["layer_repeats"], p["min_block_s"], device, log=log),
        "jacobians": lambda: jacobians.bench_jacobians(p["jac_repeats"], max(p["min_block_s"], 0.01),
                                                       p["loop_points"], device, log=log),
        "scaling": lambda: scaling.bench_scaling(p["repeats"], p["min_block_s"], device, log=log),
        "multiseed": lambda: run_multiseed(1 if quick else p["repeats"], threads, log),
        "lm": lambda: lm.bench_lm(p["repeats"], max(p["min_block_s"], 0.05) * (1 if quick else 10), device, log),
        "dashboards": lambda: (dashboards.bench_dashboards(p["repeats"], 1.0 if quick else 8.0, log,
                                                           with_ablation=not quick)
                               if threads == 1 and device == "cpu" else
                               {"skipped": "the dashboards train on one thread on the CPU (run with --threads 1)"}),
    }
    results = {}
    for name in only:
        t0 = time.perf_counter()
        log(f"[{name}] ({device}, {threads} thread{'s' if threads > 1 else ''})")
        res = calls[name]()
        res["wall_s"] = time.perf_counter() - t0
        res["date"] = time.strftime("%Y-%m-%d %H:%M")
        if hasattr(os, "getloadavg"):                  # how busy the machine was (other processes inflate times)
            res["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
        results[name] = res
        log(f"[{name}] {res['wall_s']:.1f} s")
    return results


# ----------------------------------------------------------------------------------------------------------- report
def all_targets(benches: dict) -> list[dict]:
    """Every target row of every benchmark, in suite order (a skipped benchmark gives one row saying so)."""
    rows = []
    for name in BENCHES:
        res = benches.get(name)
        if res is None:
            continue
        if "skipped" in res:
            rows.append(common.target_row(name, name, f"not measured: {res['skipped']}", "–", None))
        rows.extend(res.get("targets", []))
    return rows


def verdict(met) -> str:
    return "met" if met is True else "missed" if met is False else "–"


def _cell(x) -> str:
    return str(x).replace("|", "/").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows])


def environment_lines(env: dict) -> list[str]:
    keys = ("date", "device", "threads", "cpu", "cpu_count", "loadavg_1min_at_start", "torch", "transformers",
            "numpy", "python", "moewidgets", "commit", "gpu", "cuda")
    return _table(["environment", "value"], [[k, env[k]] for k in keys if k in env])


def report(results: dict) -> str:
    """The markdown report of one (device, threads) run."""
    env, benches = results["environment"], results["benches"]
    lines = [f"# Benchmarks: {env['device']}, {env['threads']} thread(s), {env['date']}", ""]
    if results.get("quick"):
        lines += ["**Smoke test (--quick): 2 repeats, short blocks; not a measurement.**", ""]
    lines += environment_lines(env) + ["", GPU_NOTE if env["device"] == "cpu" else "", "", "## Targets", ""]
    lines += _table(["bench", "what", "measured: median (min–max)", "target", "verdict"],
                    [[t["bench"], t["what"], t["measured"], t["target"], verdict(t["met"])]
                     for t in all_targets(benches)])
    lay = benches.get("layer")
    if lay and "points" in lay:
        lines += ["", "## MoE layer forward+backward vs transformers (transformers " + lay["transformers"] + ")", "",
                  lay["what"] + ". Floor = useful FLOPs at 170 GFLOP/s + each implementation's ops × 4 µs.", ""]
        lines += _table(["T", "D", "E", "k", "dispatch", "ours", "transformers", "speedup", "ours × floor",
                         "transformers × floor", "ops ours / transformers", "max abs diff y, dx, dW"],
                        [[p["T"], p["D"], p["E"], p["K"], p["dispatch"], fmt_stats(p["ours"]),
                          fmt_stats(p["transformers"]), fmt_ratio(p["speedup"]),
                          f"{p['ours'].get('x_floor', float('nan')):.1f}",
                          f"{p['transformers'].get('x_floor', float('nan')):.1f}",
                          f"{p['ops']['ours']} / {p['ops']['transformers']}",
                          f"{p['match']['max_abs_dy']:.1e}, {p['match']['max_abs_dx']:.1e}, "
                          f"{p['match']['max_abs_dw']:.1e}"] for p in lay["points"]])
    jac = benches.get("jacobians")
    if jac and "rows" in jac:
        lines += ["", "## Expert Jacobians", "", jac["what"] + ". The loop is timed on a subset of the points and "
                  "scaled to all of them (its cost per token is constant).", ""]
        lines += _table(["expert", "E, N, D, F", "ours", "vmap(jacrev)", "autograd loop (scaled)", "loop points timed",
                         "vs vmap(jacrev)", "vs loop", "max abs err vs vmap / loop"],
                        [[r["activation"], f"{r['E']}, {r['N']}, {r['D']}, {r['F']}", fmt_stats(r["ours"]),
                          fmt_stats(r["vmap(jacrev)"]), fmt_stats(r["autograd loop"]), r["loop_points_timed"],
                          fmt_ratio(r["speedup"]["vmap(jacrev)"]), fmt_ratio(r["speedup"]["autograd loop"]),
                          f"{r['max_abs_err_vs_vmap']:.1e} / {r['max_abs_err_vs_loop']:.1e}"] for r in jac["rows"]])
    sc = benches.get("scaling")
    if sc and "sweeps" in sc:
        lines += ["", "## Scaling of our layer", "", sc["what"] + ". Fit: time ≈ c · x^b (log-log least squares).", ""]
        rows = []
        for name, sw in sc["sweeps"].items():
            pts = sw["points"]
            rows.append([name, sw["axis"], ", ".join(str(p[sw["axis"]]) for p in pts),
                         ", ".join(f"{p['ours']['median_s'] * 1e3:.2f}" for p in pts),
                         ", ".join(p["dispatch"] for p in pts),
                         f"{sw['fit']['exponent']:.2f} (R² {sw['fit']['r2']:.3f})",
                         f"{sw['floor_fit']['exponent']:.2f}" if "floor_fit" in sw else "–"])
        lines += _table(["sweep", "axis", "values", "median ms", "dispatch", "exponent b", "floor's exponent"], rows)
    ret = benches.get("retrain")
    if ret and "floor_s" in ret:
        lines += ["", "## Chapter-1 retrain floor", "",
                  f"{ret['flops'] / 1e9:.2f} GFLOP at 170 GFLOP/s + {ret['ops_per_step']} ops/step × "
                  f"{ret['steps']} steps × 4 µs = {ret['floor_s']:.3f} s; ours is {ret['x_floor']:.1f}× the floor "
                  f"(dispatch: {ret['dispatch']})."]
    ms = benches.get("multiseed")
    if ms and "skipped" not in ms:
        lines += ["", "## 8 seeds at once (bench/multiseed.py)", ""]
        scalars = [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in ms.items()
                   if isinstance(v, (int, float, str)) and k not in ("date", "wall_s", "loadavg_1min_after")]
        lines += _table(["field", "value"], scalars)
        for key, val in ms.items():
            if key != "targets" and isinstance(val, list) and val and isinstance(val[0], dict):
                cols = list(val[0])
                lines += ["", f"{key}:", ""] + _table(cols, [[r.get(c, "") for c in cols] for r in val])
    lmb = benches.get("lm")
    if lmb and "skipped" not in lmb:
        lines += ["", "## The transformer LM vs MixtralForCausalLM (bench/lm.py)", "", lmb["what"] + ".", ""]
        lines += _table(["model", "parameters", "step time: median (min–max)", "tokens/s"],
                        [["ours (moewidgets.lm)", f"{lmb['parameters_ours']:,}", fmt_stats(lmb["ours"]),
                          f"{lmb['tokens_per_s_ours']:,.0f}"],
                         ["MixtralForCausalLM", f"{lmb['parameters_transformers']:,}",
                          fmt_stats(lmb["transformers"]), f"{lmb['tokens_per_s_transformers']:,.0f}"]])
        lines += ["", f"Ours / transformers tokens per second: {fmt_ratio(lmb['speedup'])}."]
    lines += dashboards_lines(benches.get("dashboards"))
    lines += ["", "## Runs", "", "When each benchmark ran (`--only` keeps earlier rows), its wall time, and the "
              "1-minute load average after it (other processes inflate times).", ""]
    lines += _table(["bench", "date", "wall time", "load average after"],
                    [[name, b.get("date", "–"), fmt_s(b["wall_s"]) if "wall_s" in b else "–",
                      b.get("loadavg_1min_after", "–")] for name, b in benches.items()])
    return "\n".join(lines) + "\n"


def dashboards_lines(dash: dict | None) -> list[str]:
    """The dashboards section: per chapter, slider → done and the redraws; chapter 1's E move and lever ablation."""
    if not dash or "chapters" not in dash:
        return []
    lines = ["", "## Dashboards end to end, kernel side (bench/dashboards.py)", "", dash["what"] + ".", ""]
    lines += _table(["dashboard", "steps", "k slider → done", "run started → done",
                     "started → first redraw", "redraws/s", "probes", "CPU s (all threads)"],
                    [[name, c["steps"], fmt_stats(c["change_to_done_s"]), fmt_stats(c["fire_to_done_s"]),
                      f"{c['first_redraw_s']['median_s'] * 1e3:.0f} ms", f"{c['redraws_per_s']['median_s']:.1f}",
                      fmt_s(c["probes_s"]["median_s"]), fmt_s(c["cpu_s"]["median_s"]) if "cpu_s" in c else "–"]
                     for name, c in dash["chapters"].items()])
    e = dash.get("chapter1_E_move")
    if e:
        lines += ["", f"Chapter 1, E 8 → 7 (its dense baseline trained anew too): run started → done "
                      f"{fmt_stats(e['fire_to_done_s'])}."]
    lm = dash.get("chapter2_lm")
    if lm and "skipped" not in lm:
        lines += ["", f"Chapter 2's transformer dashboard ({lm['steps_total']} steps): run started → first redraw "
                      f"{fmt_stats(lm['first_redraw_s'])}; {lm['steps_per_s']['median_s']:.1f} steps/s "
                      f"(min {lm['steps_per_s']['min_s']:.1f}) over {lm['window_s']:g} s of training."]
    elif lm:
        lines += ["", f"Chapter 2's transformer dashboard: not measured ({lm['skipped']})."]
    if dash.get("ablation"):
        lines += ["", "Chapter 1's levers, k slider, interleaved in one process (medians):", ""]
        lines += _table(["levers", "change → done", "started → done", "first redraw", "redraws/s", "probes", "CPU s (all threads)"],
                        [[r["levers"], fmt_s(r["change_to_done_s"]), fmt_s(r["fire_to_done_s"]), f"{r['first_redraw_s'] * 1e3:.0f} ms",
                          f"{r['redraws_per_s']:.1f}", fmt_s(r["probes_s"]),
                          fmt_s(r["cpu_s"]) if "cpu_s" in r else "–"] for r in dash["ablation"]])
    return lines


def copy_browser_timings(out: Path, source: Path = BROWSER_JSON) -> Path | None:
    """Copy the browser test's latency JSON into the results folder (None when the test has not run here)."""
    if not source.exists():
        return None
    data = json.loads(source.read_text())
    data.setdefault("source", "tests/browser/test_chapter1_browser.py")
    dest = out / BROWSER_RESULT
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, dest)
    return dest


# ------------------------------------------------------------------------------------------------------------- main
def _parse_only(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in BENCHES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--only {text!r}: unknown benchmark(s) {bad}; allowed: {', '.join(BENCHES)}")
    return names


def _parse_threads(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"--threads {text!r} must be positive integers separated by commas, e.g. 1,2")
    return vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=_parse_threads, default=(1, 2),
                    help="torch thread counts, comma separated (default 1,2); one report per count")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 repeats, short blocks, temporary output")
    ap.add_argument("--only", type=_parse_only, default=BENCHES,
                    help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default bench/results; with --quick a temporary folder)")
    ap.add_argument("--no-book", action="store_true", help="do not rebuild the book's Performance page and figure")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False on this machine (torch "
                 f"{torch.__version__}); use --device cpu")
    out = args.out or (Path(tempfile.gettempdir()) / "moewidgets-bench-quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    t_all = time.perf_counter()
    try:
        for n in args.threads:
            torch.set_num_threads(n)
            tag = f"{args.device}-{n}t"
            path = out / f"bench-{tag}.json"
            old = json.loads(path.read_text()) if path.exists() and set(args.only) != set(BENCHES) else {}
            env = common.environment(args.device)
            benches = run_suite(args.only, args.quick, args.device, n)
            merged = {**old.get("benches", {}), **benches}
            results = {"environment": env, "quick": args.quick, "benches": {k: merged[k] for k in BENCHES
                                                                            if k in merged}}
            path.write_text(json.dumps(results, indent=1) + "\n")
            text = report(results)
            (out / f"report-{tag}.md").write_text(text)
            print(text, flush=True)
    finally:
        torch.set_num_threads(before)
    print(f"total {time.perf_counter() - t_all:.1f} s; results in {out}")
    if "dashboards" in args.only and not args.quick:
        copied = copy_browser_timings(out)
        print(f"copied {BROWSER_JSON} → {copied}" if copied else
              f"no {BROWSER_JSON}: run tests/browser/test_chapter1_browser.py for the browser side")
    if not args.no_book:
        sys.path.insert(0, str(common.REPO / "tools"))
        import make_performance_figure as page
        if out.resolve() == RESULTS.resolve():
            written = page.build(RESULTS)
        else:                       # a smoke test builds its page next to its results, never into book/
            written = page.build(out, md_path=out / "performance.md", html_path=out / "performance-scaling.html")
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
