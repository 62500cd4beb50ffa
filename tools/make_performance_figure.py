"""Write the book's Performance page and its scaling figure from the recorded benchmark JSON (never re-measures).

    python tools/make_performance_figure.py          # reads bench/results/bench-*.json

Writes:

* ``book/_extra/figures/performance-scaling.html``: the scaling plot, a self-contained bokeh page (BokehJS inline,
  renders offline). The book copies ``book/_extra/`` into its HTML root (``html_extra_path``), and the page shows it
  in an ``<iframe src="figures/performance-scaling.html">``.
* ``book/performance.md``: the appendix page, every table generated from the JSON (do not edit it by hand).

``python -m bench.run`` calls :func:`build` at its end; a ``--quick`` smoke test builds into its temporary folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MD_PATH = ROOT / "book" / "performance.md"
HTML_PATH = ROOT / "book" / "_extra" / "figures" / "performance-scaling.html"
EXTRA_ROOT = ROOT / "book" / "_extra"

SWEEP_LABELS = {"tokens": "tokens T (per forward pass)", "experts": "experts E (top-2)",
                "width": "model width D (expert hidden F = 2D)"}
TAG_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def load_results(results_dir: Path) -> dict[str, dict]:
    """``{tag: results}`` for every ``bench-<device>-<N>t.json`` in the folder, ordered by device, then threads."""
    found = {}
    for path in results_dir.glob("bench-*.json"):
        data = json.loads(path.read_text())
        if "benches" not in data:          # written by an older bench/run.py: nothing this page can show
            print(f"skipping {path}: old format (no 'benches'); rerun `make bench`", file=sys.stderr)
            continue
        found[path.stem[len("bench-"):]] = data
    if not found:
        raise FileNotFoundError(f"no current bench-*.json in {results_dir}: run `make bench` (python -m bench.run) "
                                "first")

    def key(tag):
        device, _, threads = tag.rpartition("-")
        return device, int(threads.rstrip("t")) if threads.rstrip("t").isdigit() else 0
    return {tag: found[tag] for tag in sorted(found, key=key)}


def tag_label(results: dict) -> str:
    env = results["environment"]
    n = env["threads"]
    return f"{env['device']}, {n} thread{'s' if n != 1 else ''}"


# ------------------------------------------------------------------------------------------------------- the figure
def scaling_figure(all_results: dict[str, dict]):
    """A bokeh row of three log-log panels (tokens, experts, width): medians, min–max bars, floor, fitted exponent.

    No bokeh widgets (a ``Div`` would add BokehJS's 380 kB widget bundle): the caption lives on the page.
    """
    from bokeh.layouts import row
    from bokeh.models import (ColumnDataSource, FixedTicker, HoverTool, Legend, NumeralTickFormatter, TeeHead,
                              Whisker)
    from bokeh.plotting import figure

    with_scaling = {t: r for t, r in all_results.items() if "sweeps" in r["benches"].get("scaling", {})}
    if not with_scaling:
        return None
    first = next(iter(with_scaling.values()))["benches"]["scaling"]
    panels = []
    for name, sweep0 in first["sweeps"].items():
        axis = sweep0["axis"]
        fig = figure(title=f"time vs {name}", x_axis_type="log", y_axis_type="log", height=380, min_width=250,
                     sizing_mode="stretch_width", tools="pan,box_zoom,wheel_zoom,reset,save", toolbar_location="above")
        fig.toolbar.autohide = True
        fig.xaxis.ticker = FixedTicker(ticks=[p[axis] for p in sweep0["points"]])   # the measured values only
        fig.add_layout(Legend(location="center", label_text_font_size="8pt", click_policy="hide"), "below")
        fig.xaxis.axis_label = SWEEP_LABELS.get(name, axis)
        fig.yaxis.axis_label = "forward + backward time (ms)"
        renderers, all_ms = [], []
        for i, (tag, res) in enumerate(with_scaling.items()):
            sw = res["benches"]["scaling"]["sweeps"].get(name)
            if sw is None:
                continue
            pts = sw["points"]
            color = TAG_COLORS[i % len(TAG_COLORS)]
            all_ms += [p["ours"]["min_s"] * 1e3 for p in pts] + [p["ours"]["max_s"] * 1e3 for p in pts]
            src = ColumnDataSource({"x": [p[axis] for p in pts],
                                    "ms": [p["ours"]["median_s"] * 1e3 for p in pts],
                                    "lo": [p["ours"]["min_s"] * 1e3 for p in pts],
                                    "hi": [p["ours"]["max_s"] * 1e3 for p in pts],
                                    "dispatch": [p["dispatch"] for p in pts]})
            label = f"{tag_label(res)}: exponent {sw['fit']['exponent']:.2f}"
            fig.line("x", "ms", source=src, color=color, line_width=2, legend_label=label)
            dots = fig.scatter("x", "ms", source=src, color=color, size=7, legend_label=label)
            renderers.append(dots)
            fig.add_layout(Whisker(source=src, base="x", lower="lo", upper="hi", line_color=color,
                                   upper_head=TeeHead(size=8, line_color=color),
                                   lower_head=TeeHead(size=8, line_color=color)))
        # the floor depends on sizes and op counts only: draw it once (the first run that has it)
        for res in with_scaling.values():
            sw = res["benches"]["scaling"]["sweeps"].get(name)
            if sw is not None and "floor_s" in sw["points"][0]:
                floor = ColumnDataSource({"x": [p[axis] for p in sw["points"]],
                                          "ms": [p["floor_s"] * 1e3 for p in sw["points"]]})
                all_ms += floor.data["ms"]
                fig.line("x", "ms", source=floor, color="black", line_dash="dashed", line_width=1.5,
                         legend_label=f"FLOP + op floor: exponent {sw['floor_fit']['exponent']:.2f}")
                break
        lo, hi = min(all_ms), max(all_ms)
        fig.yaxis.ticker = FixedTicker(ticks=[m * 10.0 ** e for e in range(math.floor(math.log10(lo)),
                                                                            math.ceil(math.log10(hi)) + 1)
                                              for m in (1, 3) if lo / 3 <= m * 10.0 ** e <= hi * 3])
        fig.yaxis.formatter = NumeralTickFormatter(format="0.[0]")
        fig.add_tools(HoverTool(renderers=renderers, tooltips=[(axis, "@x"), ("median", "@ms{0.00} ms"),
                                                               ("min–max", "@lo{0.00}–@hi{0.00} ms"),
                                                               ("dispatch", "@dispatch")]))
        panels.append(fig)
    return row(*panels, sizing_mode="stretch_width")


def write_figure(all_results: dict[str, dict], html_path: Path) -> Path | None:
    from bokeh.embed import file_html
    from bokeh.resources import INLINE
    layout = scaling_figure(all_results)
    if layout is None:
        return None
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(file_html(layout, resources=INLINE, title="moewidgets: MoE layer scaling"))
    return html_path


# --------------------------------------------------------------------------------------------------------- the page
def _cell(x) -> str:
    return str(x).replace("|", "/").replace("\n", " ").replace("$", "")


def _table(header, rows) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows])


def _verdict(met) -> str:
    return "**met**" if met is True else "**missed**" if met is False else "–"


def _targets(res: dict) -> list[dict]:
    from bench.run import all_targets
    return all_targets(res["benches"])


def load_browser(results_dir: Path) -> dict | None:
    """The browser test's timings (``browser-chapter1.json``, copied there by ``python -m bench.run``), or None."""
    path = Path(results_dir) / "browser-chapter1.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ms(x) -> str:
    return "–" if x is None else f"{x:.0f} ms" if x < 1000 else f"{x / 1e3:.2f} s"


def waits_section(all_results: dict[str, dict], browser: dict | None) -> list[str]:
    """What a student waits for: chapter 1's slider → done, kernel side (bench/dashboards.py) and in headless
    Chromium (tests/browser/test_chapter1_browser.py), beside the targets."""
    dash = next((r["benches"]["dashboards"] for r in all_results.values()
                 if "chapters" in r["benches"].get("dashboards", {})), None)
    if dash is None and browser is None:
        return []
    c1 = dash["chapters"]["chapter1"] if dash else None

    def kernel(key, scale=1e3, unit=" ms"):
        if c1 is None:
            return "not measured"
        st = c1[key]
        return f"{st['median_s'] * scale:.0f}{unit} ({st['min_s'] * scale:.0f}–{st['max_s'] * scale:.0f})"

    def met(value, limit, below=True):
        if value is None:
            return "–"
        return "met" if (value <= limit if below else value >= limit) else "missed"

    b = browser or {}
    rows = [
        ["k slider → new run done, every view drawn", "≤ 0.8 s kernel; ≤ 2 s browser",
         kernel("change_to_done_s") + " (widget change → done; the run itself " + kernel("fire_to_done_s") + ")",
         _ms(b.get("keypress_to_done_ms")),
         f"{met(c1['change_to_done_s']['median_s'] if c1 else None, 0.8)} / {met(b.get('keypress_to_done_ms'), 2000)}"],
        ["k slider → status line acknowledges", "≤ 150 ms (browser)", "–", _ms(b.get("keypress_to_status_ms")),
         met(b.get("keypress_to_status_ms"), 150)],
        ["run started → first redraw", "≤ 150 ms", kernel("first_redraw_s"),
         _ms(b.get("debounce_to_first_redraw_ms_kernel")) + " (kernel, during the browser run)",
         f"{met(c1['first_redraw_s']['median_s'] * 1e3 if c1 else None, 150)} / "
         f"{met(b.get('debounce_to_first_redraw_ms_kernel'), 150)}"],
        ["loss/load redraws per second while training", "≥ 5",
         f"{c1['redraws_per_s']['median_s']:.1f}" if c1 else "not measured",
         f"{b['redraws_per_s_kernel']:.1f} (kernel, during the browser run)" if "redraws_per_s_kernel" in b else "–",
         f"{met(c1['redraws_per_s']['median_s'] if c1 else None, 5, below=False)} / "
         f"{met(b.get('redraws_per_s_kernel'), 5, below=False)}"],
    ]
    lines = ["", "## What a student waits for", "",
             "Chapter 1's dashboard, default config (E=8, k=2, 400 steps), the k slider moved 2 → 3: the model "
             "retrains (its dense baseline depends on E, not k, and is cached) and every view redraws. Kernel side: "
             "`bench/dashboards.py` drives the dashboard in an asyncio loop exactly as widget messages do (median "
             "(min–max) over repeats). Browser: `tests/browser/test_chapter1_browser.py`, JupyterLab in headless "
             "Chromium on the same machine, keypress → the status line's text (one run of the test"
             + (f", {b['date']}, load average {b.get('loadavg_1min_after', '–')}" if b.get("date") else "")
             + ").", ""]
    lines += _table(["what", "target", "kernel (bench)", "browser (keypress →)", "verdict kernel / browser"], rows)
    moves = b.get("moves", [])
    e_move = next((m for m in moves if m.get("move", "").startswith("experts")), None)
    if e_move is not None:
        lines += ["", f"In the same browser run, E 8 → 7 (a new dense baseline of hidden 7·m trains beside the "
                      f"model): keypress → acknowledged {_ms(e_move['keypress_to_status_ms'])}, → done "
                      f"{_ms(e_move['keypress_to_done_ms'])}."]
    if browser is None:
        lines += ["", "Browser side: not measured here (run `pytest tests/browser/test_chapter1_browser.py`, then "
                      "`python -m bench.run --only dashboards --threads 1` copies its timings)."]
    return lines


def page(all_results: dict[str, dict], iframe_src: str | None, browser: dict | None = None) -> str:
    """The Performance page (MyST markdown); ``browser``: the browser test's timings (:func:`load_browser`)."""
    tags = list(all_results)
    lines = ["# Performance", "",
             "<!-- Generated by tools/make_performance_figure.py from bench/results/bench-*.json: do not edit. -->", "",
             "This appendix shows the speed targets of the design and what the last `make bench` measured "
             "(`python -m bench.run`; the numbers come from the committed files `bench/results/bench-*.json`, this "
             "page does not rerun anything). Each comparison was taken side by side in one process, the "
             "candidates interleaved in alternating order so that machine drift hits all of them; a value is "
             "the median over repeats with its min–max.", ""]
    if any(r.get("quick") for r in all_results.values()):
        lines += ["**These results come from a `--quick` smoke test (2 repeats, short blocks): not measurements.**",
                  ""]
    lines += ["## Where", ""]
    env_keys = ("date", "cpu", "cpu_count", "loadavg_1min_at_start", "torch", "transformers", "numpy", "python",
                "commit")
    lines += _table(["", *[tag_label(all_results[t]) for t in tags]],
                    [[k, *[all_results[t]["environment"].get(k, "–") for t in tags]] for k in env_keys])
    if not any(all_results[t]["environment"]["device"] == "cuda" for t in tags):
        lines += ["", "GPU: no `bench-cuda-*.json` here, so the suite has never been run on a GPU (none was lent to "
                  "the sessions that built this book). On a CUDA machine, `python -m bench.run --device cuda` adds "
                  "its columns, including the transformer GPU preset's tokens/s against `MixtralForCausalLM`."]
    lines += ["", "## Targets", ""]
    rows_by_key: dict[tuple, dict] = {}
    for t in tags:
        for row in _targets(all_results[t]):
            rows_by_key.setdefault((row["bench"], row["what"]), {})[t] = row
    header = ["what", "target"]
    for t in tags:
        header += [f"measured ({tag_label(all_results[t])})", "verdict"]
    body = []
    for (bench, what), per_tag in rows_by_key.items():
        target = next(iter(per_tag.values()))["target"]
        cells = [what, target]
        for t in tags:
            r = per_tag.get(t)
            cells += [r["measured"], _verdict(r["met"])] if r else ["not run", "–"]
        body.append(cells)
    lines += _table(header, body)
    lines += waits_section(all_results, browser)
    lines += ["", "The whole-book nbval time is measured by CI; it is not part of `make bench`."]

    scal = {t: r["benches"]["scaling"] for t, r in all_results.items() if "sweeps" in r["benches"].get("scaling", {})}
    if scal:
        first = next(iter(scal.values()))
        base = first["base"]
        lines += ["", "## How our layer scales", "",
                  f"Time of one forward + backward of our MoE layer ({first['expert']} experts, F = 2D, automatic "
                  f"dispatch), one axis at a time from the base point T={base['T']}, E={base['E']}, k={base['K']}, "
                  f"D={base['D']}. A power law time ≈ c · x^b is fitted by least squares in log-log; the floor's "
                  "exponent is that of the FLOP + op floor over the same points (1 for tokens and 2 for width once "
                  "arithmetic dominates, about 0 for experts at fixed k). In the figure, dots are medians over "
                  "repeats, bars their min–max, the dashed line the floor (170 GFLOP/s fp32, 4 µs per torch op); "
                  "click a legend entry to hide its line.", ""]
        if iframe_src:
            lines += [f'<iframe src="{iframe_src}" title="MoE layer scaling (bokeh)" width="100%" height="420" '
                      'style="border: none;"></iframe>', "",
                      f'<p>(Interactive bokeh figure; <a href="{iframe_src}">open it on its own page</a>.)</p>', ""]
        header = ["sweep", "axis", "values", *[f"exponent ({tag_label(all_results[t])})" for t in scal],
                  "floor's exponent", "dispatch"]
        body = []
        for name, sw in first["sweeps"].items():
            cells = [name, sw["axis"], ", ".join(str(p[sw["axis"]]) for p in sw["points"])]
            for t in scal:
                f = scal[t]["sweeps"].get(name, {}).get("fit")
                cells.append(f"{f['exponent']:.2f} (R² {f['r2']:.2f})" if f else "–")
            cells.append(f"{sw['floor_fit']['exponent']:.2f}" if "floor_fit" in sw else "–")
            cells.append(", ".join(p["dispatch"] for p in sw["points"]))
            body.append(cells)
        lines += _table(header, body)

    for t in tags:
        lay = all_results[t]["benches"].get("layer", {})
        if "points" not in lay:
            continue
        lines += ["", f"## MoE layer vs transformers, every shape ({tag_label(all_results[t])})", "",
                  f"{lay['what']} (transformers {lay['transformers']}). Outputs, input gradients and weight gradients "
                  "were checked to agree before timing. Speedup = transformers' time / ours, per repeat. "
                  "× floor = median time / (useful FLOPs at 170 GFLOP/s + the implementation's torch ops × 4 µs).", ""]
        lines += _table(["T", "D", "E", "k", "our dispatch", "ours (ms)", "transformers (ms)", "speedup (min–max)",
                         "ours × floor", "transformers × floor"],
                        [[p["T"], p["D"], p["E"], p["K"], p["dispatch"], f"{p['ours']['median_s'] * 1e3:.2f}",
                          f"{p['transformers']['median_s'] * 1e3:.2f}",
                          f"{p['speedup']['median']:.2f}× ({p['speedup']['min']:.2f}–{p['speedup']['max']:.2f})",
                          _fmt_floor(p["ours"]), _fmt_floor(p["transformers"])] for p in lay["points"]])
        break                                                   # one thread count is enough here (the first)

    lines += _claim_runs_section()

    lines += ["", "## How the numbers are taken", "",
              "- Each candidate is calibrated to a block of calls lasting at least a few tens of milliseconds; every "
              "repeat then runs one block of each candidate, alternating the order. Ratios are taken per repeat.",
              "- The floor of a computation is its useful FLOPs at 170 GFLOP/s (fp32 matmul) plus its top-level "
              "torch ops at 4 µs each, both measured on the 2-core development machine; ops are counted with the "
              "torch profiler.",
              "- The per-token autograd loop of the Jacobian benchmark is timed on a few points and scaled to all "
              "256 (its cost per point does not depend on the point).",
              "- Regenerate: `make bench` (about 6 minutes on a quiet 2-core machine) rewrites `bench/results/` and "
              "this page; `python -m bench.run --quick` is a smoke test that writes to a temporary folder.", ""]
    return "\n".join(lines)


# CPU seconds of the MLP arms' rows when every (arm, seed) was its own job on moewidgets.train.Trainer: summed
# from the committed rows of commit 5935358 (the last commit before seed groups), same machine, 1 thread per job.
PER_SEED_CPU_S = {"chapter1": 2441, "chapter2": 803, "chapter3": 2942, "chapter4": 681}
# ... and how many MLP rows they were (5 seeds per arm then; the committed runs now have 10 per arm and more arms,
# so the two are compared per row).
PER_SEED_ROWS = {"chapter1": 60, "chapter2": 40, "chapter3": 80, "chapter4": 40}


def _claim_runs_section() -> list[str]:
    """How long the committed claim runs took, from their rows (``book/results/*.jsonl``): seed groups vs the
    per-seed jobs they replaced."""
    from moewidgets.sweep import read_jsonl
    results = ROOT / "book" / "results"
    body = []
    for path in sorted(results.glob("chapter*.jsonl")):
        rows = read_jsonl(path)
        groups = {(r["arm"], r["key"]): r["group"]["wall_s"] for r in rows if "group" in r}
        singles = [r for r in rows if "group" not in r]
        grouped_rows = len(rows) - len(singles)
        before, before_rows = PER_SEED_CPU_S.get(path.stem), PER_SEED_ROWS.get(path.stem)
        group_s = sum(groups.values())
        per_row = group_s / grouped_rows if grouped_rows else 0.0
        before_per_row = before / before_rows if before and before_rows else 0.0
        body.append([path.stem, len(rows), f"{grouped_rows} rows in {len(groups)} groups",
                     f"{group_s:,.0f} s ({per_row:.1f} s per row)",
                     f"{before:,} s for {before_rows} rows ({before_per_row:.1f} s per row)" if before_per_row else "–",
                     f"{before_per_row / per_row:.1f}×" if before_per_row and per_row else "–",
                     f"{len(singles)} ({sum(r['wall_s'] for r in singles):,.0f} s)" if singles else "0"])
    if not body:
        return []
    return ["", "## Claim runs: many seeds at the cost of few", "",
            "Every MLP arm of a claims table trains all its seeds at once, one seed group per arm "
            "(`moewidgets.multiseed.MultiSeedTrainer`, a seed axis on every weight; the tests check it against "
            "separate runs), and the pinned subset re-runs seed 0 through the same code with one seed. CPU seconds "
            "below are summed over jobs (each on 1 thread, two jobs at a time on the 2-core machine), from the "
            "committed rows; \"per-seed jobs\" is the same arms' time when every (arm, seed) was its own "
            "`Trainer` job (summed from the rows of commit 5935358, when every arm had 5 seeds and chapter 1 fewer arms: "
            "so the two are compared per row, \"faster per row\"). The transformer arms of chapter 2 have no seed "
            "axis and still run one job per seed.", ""] + _table(
        ["chapter", "rows", "MLP arms", "seed groups (CPU s)", "per-seed jobs (CPU s)", "faster per row",
         "other rows (CPU s)"],
        body)


def _fmt_floor(st: dict) -> str:
    x = st.get("x_floor")
    return f"{x:.1f}" if isinstance(x, (int, float)) and math.isfinite(x) else "–"


def build(results_dir: Path = RESULTS, md_path: Path = MD_PATH, html_path: Path = HTML_PATH) -> list[Path]:
    """Write the page and the figure from ``results_dir``; returns the paths written."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    all_results = load_results(Path(results_dir))
    written = []
    fig_path = write_figure(all_results, Path(html_path))
    if fig_path is not None:
        written.append(fig_path)
        base = EXTRA_ROOT if Path(html_path).resolve().is_relative_to(EXTRA_ROOT.resolve()) else Path(md_path).parent
        iframe_src = os.path.relpath(Path(html_path).resolve(), base.resolve()).replace(os.sep, "/")
    else:
        iframe_src = None
    text = page(all_results, iframe_src, load_browser(Path(results_dir)))
    tmp = Path(md_path).with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, md_path)
    written.append(Path(md_path))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--md", type=Path, default=MD_PATH)
    ap.add_argument("--html", type=Path, default=HTML_PATH)
    args = ap.parse_args(argv)
    for p in build(args.results, args.md, args.html):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
