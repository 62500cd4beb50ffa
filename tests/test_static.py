"""The kernel-free figures (moewidgets.static): every grid point's data is in the bokeh document, the sliders carry
the grid's values, the CustomJS callback swaps the plotted sources (run for real in Node.js when it is installed),
the page is self-contained (BokehJS inline, no external script), the chapter-2 page draws what its dashboard draws
from a live probe (tiny retrained runs), and the committed pages and grid data in book/_extra/figures/ (rendered from
the committed grid data) are complete and still reproduce (one retrained grid point per chapter)."""
from __future__ import annotations

import html
import importlib.util
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from bokeh.models import ColumnDataSource, GlyphRenderer
from bokeh.plotting import figure

from moewidgets.config import MoEConfig, RunConfig, TaskConfig, TrainConfig
from moewidgets.dashboards.chapter2 import Chapter2Views, draw_asymmetry, probe_asymmetry
from moewidgets.data import make_task
from moewidgets.static import (STATIC_FIGURES, GridAxis, chapter1_static_figure, chapter2_static_figure,
                               chapter3_static_figure, chapter4_static_figure, static_grid_figure, static_grid_html)
from moewidgets.train import Trainer
from moewidgets.views import LOG_FLOOR

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "book" / "_extra" / "figures"
MAX_BYTES = 2_000_000


# ---------------------------------------------------------------------------------------------------------------
# a synthetic grid: each point's numbers say which point it is, so a swapped-in source names its own key

def toy_grid(n_a: int, n_b: int):
    axes = (GridAxis("a", "slider a", tuple(range(1, n_a + 1))),
            GridAxis("b", "slider b", (0.1, 0.3, 0.9, 2.7, 8.1)[:n_b]))
    grid, captions = {}, {}
    for i, j in product(range(n_a), range(n_b)):
        key = (axes[0].values[i], axes[1].values[j])
        code = 100.0 * i + j
        grid[key] = {"line": dict(x=np.arange(3.0), y=np.full(3, code)),
                     "lines": dict(xs=[np.arange(2.0)] * 2, ys=[np.array([code, -code]), np.array([code + 0.5, 0.0])])}
        captions[key] = f"point {i},{j}"
    return axes, grid, captions


def toy_figure(n_a: int, n_b: int, initial=None, with_titles: bool = False):
    """The toy grid behind two sliders; ``with_titles``: the figure's title also changes with the point."""
    axes, grid, captions = toy_grid(n_a, n_b)
    fig = figure(width=200, height=150)
    line, lines = ColumnDataSource(dict(x=[], y=[])), ColumnDataSource(dict(xs=[], ys=[]))
    fig.line("x", "y", source=line)
    fig.multi_line("xs", "ys", source=lines)
    titles = {k: {"fig": f"title for {k}"} for k in grid} if with_titles else None
    sg = static_grid_figure(grid, axes, fig, {"line": line, "lines": lines}, captions, initial, footer="toy",
                            titles=titles, title_targets={"fig": fig.title} if with_titles else None)
    return sg, grid, captions


def same_columns(got: dict, want: dict) -> bool:
    """Column-by-column equality at float32 precision (the table stores float64 columns as float32)."""
    if got.keys() != want.keys():
        return False
    for name, w in want.items():
        g = got[name]
        rows_g = g if isinstance(w, list) else [g]
        rows_w = w if isinstance(w, list) else [w]
        if len(rows_g) != len(rows_w):
            return False
        for a, b in zip(rows_g, rows_w):
            if not np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-6,
                               equal_nan=True):
                return False
    return True


@pytest.mark.parametrize("n_a,n_b", [(2, 2), (4, 5), (3, 4)])
def test_every_grid_point_is_in_the_table_at_its_row_major_index(n_a, n_b):
    sg, grid, captions = toy_figure(n_a, n_b)
    assert sg.keys == list(product(sg.axes[0].values, sg.axes[1].values))
    for name in ("line", "lines"):
        assert len(sg.table[name]) == n_a * n_b
        assert len({id(s) for s in sg.table[name]}) == n_a * n_b          # one source per point, none shared
    for i, j in product(range(n_a), range(n_b)):
        key = (sg.axes[0].values[i], sg.axes[1].values[j])
        # the index the callback computes from the two slider labels (written out here as the oracle)
        n = sg.sliders[0].categories.index(sg.axes[0].labels[i]) * len(sg.sliders[1].categories) \
            + sg.sliders[1].categories.index(sg.axes[1].labels[j])
        assert n == sg.index(key) == i * n_b + j
        for name in ("line", "lines"):
            src = sg.table[name][n]
            assert same_columns(src.data, grid[key][name]), (key, name)
            assert src.name == f"{name}[a={sg.axes[0].labels[i]},b={sg.axes[1].labels[j]}]"
        assert sg.captions[n] == captions[key]


def test_sliders_carry_the_axes_and_start_at_the_initial_point():
    sg, grid, captions = toy_figure(4, 5, initial=(3, 0.9))
    for slider, axis, start in zip(sg.sliders, sg.axes, ("3", "0.9")):
        assert slider.categories == list(axis.labels) == [f"{v:g}" for v in axis.values]
        assert slider.title == axis.title and slider.value == start
        assert slider.js_property_callbacks["change:value"] == [sg.callback]
    assert same_columns(sg.sources["line"].data, grid[(3, 0.9)]["line"])
    assert same_columns(sg.sources["lines"].data, grid[(3, 0.9)]["lines"])
    assert sg.caption.text == captions[(3, 0.9)]
    assert sg.title_targets == {} and sg.titles == {} and sg.callback.args["title_targets"] == {}


def test_per_point_titles_are_set_at_the_initial_point_and_tabled_row_major():
    sg, grid, _ = toy_figure(3, 4, initial=(2, 0.9), with_titles=True)
    fig_title = sg.title_targets["fig"]
    assert fig_title.text == "title for (2, 0.9)"
    assert sg.titles["fig"] == [f"title for {k}" for k in sg.keys]                   # row-major, one per point
    assert sg.callback.args["title_targets"] == {"fig": fig_title}
    assert sg.callback.args["titles"] == sg.titles
    assert "title.text = titles[name][n]" in sg.callback.code


def test_callback_swaps_the_plotted_sources_for_the_table():
    sg, _, _ = toy_figure(3, 4)
    args = sg.callback.args
    plotted = {r.data_source for r in sg.layout.select({"type": GlyphRenderer})}
    assert set(args["targets"].values()) == plotted == set(sg.sources.values())
    assert all(args["targets"][name] is src for name, src in sg.sources.items())
    assert all(args["table"][name] is sg.table[name] for name in sg.sources)
    assert not plotted & {s for srcs in sg.table.values() for s in srcs}    # table sources are never plotted
    assert args["slider_a"] is sg.sliders[0] and args["slider_b"] is sg.sliders[1]
    assert args["caption"] is sg.caption and args["captions"] == sg.captions
    for needle in ("slider_a.categories.indexOf(slider_a.value)", "slider_b.categories.length",
                   "table[name][n].data", "target.data =", "captions[n]"):
        assert needle in sg.callback.code


NODE_HARNESS = """
const [code, spec] = [process.argv[1], JSON.parse(process.argv[2])];
const run = new Function(...spec.argnames, code);
const table = {}; for (const [name, rows] of Object.entries(spec.table)) table[name] = rows.map(d => ({data: d}));
const out = [];
for (const a of spec.a) for (const b of spec.b) {
  const targets = {}; for (const name of Object.keys(spec.table)) targets[name] = {data: null};
  const caption = {text: null};
  const title_targets = {}; for (const name of Object.keys(spec.titles)) title_targets[name] = {text: null};
  const args = {slider_a: {categories: spec.a, value: a}, slider_b: {categories: spec.b, value: b},
                targets, table, captions: spec.captions, caption, titles: spec.titles, title_targets};
  run(...spec.argnames.map(k => args[k]));
  const data = Object.fromEntries(Object.entries(targets).map(([k, t]) => [k, t.data]));
  const titles = Object.fromEntries(Object.entries(title_targets).map(([k, t]) => [k, t.text]));
  out.push({a, b, caption: caption.text, data, titles});
}
console.log(JSON.stringify(out));
"""


@pytest.mark.parametrize("with_titles", [False, True])
def test_callback_code_runs_in_node_for_every_slider_pair(with_titles):
    """The CustomJS body itself, run by Node.js against plain objects for every pair of slider labels."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (the browser test runs the callback in Chromium)")
    sg, grid, captions = toy_figure(3, 4, with_titles=with_titles)
    assert set(sg.callback.args) == {"slider_a", "slider_b", "targets", "table", "captions", "caption", "titles",
                                     "title_targets"}                    # what the harness passes, all of it
    spec = dict(argnames=sorted(sg.callback.args), a=sg.sliders[0].categories, b=sg.sliders[1].categories,
                captions=sg.captions, titles=sg.titles,
                table={name: [{"y": np.asarray(s.data["y"] if name == "line" else s.data["ys"][0]).tolist()}
                              for s in srcs] for name, srcs in sg.table.items()})
    out = json.loads(subprocess.run([node, "-e", NODE_HARNESS, sg.callback.code, json.dumps(spec)], check=True,
                                    capture_output=True, text=True, timeout=60).stdout)
    assert len(out) == 12
    for row in out:
        i, j = sg.axes[0].labels.index(row["a"]), sg.axes[1].labels.index(row["b"])
        key = (sg.axes[0].values[i], sg.axes[1].values[j])
        assert row["caption"] == captions[key]
        assert row["data"]["line"]["y"] == grid[key]["line"]["y"].tolist()
        assert row["data"]["lines"]["y"] == grid[key]["lines"]["ys"][0].tolist()
        assert row["titles"] == ({"fig": f"title for {key}"} if with_titles else {})


# ---------------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_any_work():
    axes, grid, captions = toy_grid(2, 3)
    src = {"line": ColumnDataSource(), "lines": ColumnDataSource()}
    fig = figure()
    with pytest.raises(ValueError, match="missing"):
        static_grid_figure({k: v for k, v in grid.items() if k != (1, 0.1)}, axes, fig, src)
    with pytest.raises(ValueError, match="unexpected"):
        static_grid_figure({**grid, (9, 0.1): grid[(1, 0.1)]}, axes, fig, src)
    with pytest.raises(ValueError, match="expected"):
        static_grid_figure(grid, axes, fig, {"line": src["line"]})
    with pytest.raises(ValueError, match="captions"):
        static_grid_figure(grid, axes, fig, src, {(1, 0.1): "only one"})
    with pytest.raises(ValueError, match="initial"):
        static_grid_figure(grid, axes, fig, src, initial=(5, 5))
    with pytest.raises(ValueError, match="exactly 2"):
        static_grid_figure(grid, axes[:1], fig, src)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        GridAxis("k", "k", (1,))
    with pytest.raises(ValueError, match="distinct strings"):
        GridAxis("t", "τ", (0.1000001, 0.1))     # both print as "0.1"
    assert GridAxis("t", "τ", (0.1000001, 0.1), ("0.1000001", "0.1")).labels == ("0.1000001", "0.1")
    with pytest.raises(ValueError, match="go together"):
        static_grid_figure(grid, axes, fig, src, titles={k: {"f": "t"} for k in grid})
    with pytest.raises(ValueError, match="wrong at"):
        static_grid_figure(grid, axes, fig, src, titles={(1, 0.1): {"f": "t"}}, title_targets={"f": fig.title})


# ---------------------------------------------------------------------------------------------------------------
class _Tags(HTMLParser):
    """The page's <script> and <link> tags (script bodies are not parsed as tags)."""

    def __init__(self):
        super().__init__()
        self.scripts, self.links = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append(dict(attrs))
        elif tag == "link":
            self.links.append(dict(attrs))


def assert_self_contained(page: str) -> None:
    tags = _Tags()
    tags.feed(page)
    srcs = [s["src"] for s in tags.scripts if "src" in s]
    assert srcs == [], f"external scripts: {srcs}"
    assert not [ln for ln in tags.links if re.match(r"(https?:)?//", ln.get("href", ""))], tags.links
    assert "BEGIN bokeh.min.js" in page and "BEGIN bokeh-widgets.min.js" in page     # BokehJS inline
    assert len(page.encode()) < MAX_BYTES, f"{len(page.encode()) / 1e6:.2f} MB"


def embedded_source_names(page: str) -> list[str]:
    """Names of the ColumnDataSources in the page's embedded bokeh document."""
    docs = re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', page, re.S)
    assert len(docs) == 1
    names = []

    def walk(o):
        if isinstance(o, dict):
            if o.get("type") == "object" and o.get("name") == "ColumnDataSource":
                names.append(o.get("attributes", {}).get("name"))
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(json.loads(docs[0]))
    return names


def test_html_page_is_self_contained_and_embeds_every_point():
    sg, _, _ = toy_figure(4, 4)
    page = static_grid_html(sg, "toy")
    assert_self_contained(page)
    names = embedded_source_names(page)
    assert sum(n is not None and n.startswith("line[") for n in names) == 16
    assert sum(n is not None and n.startswith("lines[") for n in names) == 16


# ---------------------------------------------------------------------------------------------------------------
# the chapters' builders on small synthetic grid data (3 experts, 4 singular values, 2 × 2 grid)

def ch1_data():
    axes = [GridAxis("k", "top-k", (1, 3)).to_dict(), GridAxis("temperature", "τ", (0.5, 2.0)).to_dict()]
    points = []
    for k, tau in product((1, 3), (0.5, 2.0)):
        ratios = [[1.0, 0.5 / tau, 0.1 * k, 1e-9], [1.0, 0.4, 0.2, 0.1], [None] * 4]    # expert 2 is dead
        points.append(dict(k=k, temperature=tau, label=f"top-{k} of 3", ratios_EJ=ratios,
                           sigma1_E=[k, tau, None], final_loss=0.01 * k, dead=1))
    return dict(axes=axes, initial=[3, 0.5], points=points, runs="4 toy runs",
                dense=dict(ratios_J=[1.0, 0.6, 0.3, 0.1], sigma1=0.8, final_loss=0.02, hidden=12))


def test_chapter1_figure_plots_each_points_spectra_and_sigma1():
    data = ch1_data()
    sg = chapter1_static_figure(data)
    assert [s.categories for s in sg.sliders] == [["1", "3"], ["0.5", "2"]]
    assert [s.value for s in sg.sliders] == ["3", "0.5"]
    for p in data["points"]:
        n = sg.index((p["k"], p["temperature"]))
        ys = sg.table["spectra.experts"][n].data["ys"]
        want = np.maximum(np.array(p["ratios_EJ"], dtype=np.float64), LOG_FLOOR)    # None → NaN, clipped for log
        assert len(ys) == 3 and np.allclose(np.array(ys, dtype=np.float64), want, equal_nan=True)
        assert np.allclose(sg.table["spectra.dense"][n].data["y"], data["dense"]["ratios_J"])
        bars = np.asarray(sg.table["sigma1.bars"][n].data["top"], dtype=np.float64)
        assert np.allclose(bars, np.array(p["sigma1_E"], dtype=np.float64), equal_nan=True)
        assert np.allclose(sg.table["sigma1.ref"][n].data["y"], [0.8, 0.8])
        assert f"top-{p['k']} of 3, τ={p['temperature']:g}" in sg.captions[n] and "1 dead expert " in sg.captions[n]


def ch3_data():
    axes = [GridAxis("router_alpha", "router / α", ("kmeans", 0.0, 0.1), ("k-means", "0", "0.1")).to_dict(),
            GridAxis("lf_rate", "γ", (0.0, 1e-3)).to_dict()]
    points = []
    for ra, g in product(("kmeans", 0.0, 0.1), (0.0, 1e-3)):
        a = 0.0 if ra == "kmeans" else ra
        cos = [[1.0, a - 0.5, g], [a - 0.5, 1.0, -0.25], [g, -0.25, 1.0]]
        points.append(dict(router_alpha=ra, lf_rate=g, router="kmeans" if ra == "kmeans" else "softmax",
                           aux_weight=a, cos_EE=cos, s_abs=0.3 + a, s_signed=-0.1 + g, load_E=[0.5 - a, 0.5 + a, 0.0],
                           maxvio=0.5 + 3 * a, dead=[2], final_loss=0.01))
    return dict(axes=axes, initial=[0.1, 0.0], points=points, probe_tokens=64, runs="6 toy runs")


def test_chapter3_figure_plots_each_points_cosines_and_loads():
    data = ch3_data()
    sg = chapter3_static_figure(data)
    assert [s.categories for s in sg.sliders] == [["k-means", "0", "0.1"], ["0", "0.001"]]
    assert [s.value for s in sg.sliders] == ["0.1", "0"]
    for p in data["points"]:
        n = sg.index((p["router_alpha"], p["lf_rate"]))
        cells = sg.table["rows.cells"][n].data
        # the oracle: cell (row i, column j) holds cos_EE[i][j], written out as a loop
        for x, y, v in zip(cells["x"], cells["y"], cells["value"]):
            assert v == pytest.approx(p["cos_EE"][int(y)][int(x)], rel=1e-6)
        assert len(cells["value"]) == 9
        assert np.allclose(sg.table["load.bars"][n].data["top"], p["load_E"])
        assert np.allclose(sg.table["load.ref"][n].data["y"], [1 / 3, 1 / 3])
        head = "K-Means router" if p["router"] == "kmeans" else f"softmax router, α={p['aux_weight']:g}"
        assert f"<b>{head}, γ={p['lf_rate']:g}</b>" in sg.captions[n]
        assert f"S<sub>abs</sub> {p['s_abs']:.2f}, S<sub>signed</sub> {p['s_signed']:+.2f}" in sg.captions[n]
        assert f"MaxVio (probe batch of 64) {p['maxvio']:.2f}" in sg.captions[n] and "dead expert 2" in sg.captions[n]
        unbalanced = p["aux_weight"] == 0 and p["lf_rate"] == 0
        # the no-balancing reference is the same router's α = 0, γ = 0 grid point
        assert ("no balancing: S<sub>abs</sub> 0.30" in sg.captions[n]) == (not unbalanced)


def ch4_data():
    axes = [GridAxis("mpi_scale", "C'", (0.5, 1.0)).to_dict(), GridAxis("aux_weight", "α", (0.0, 0.1)).to_dict()]
    points = []
    for c, a in product((0.5, 1.0), (0.0, 0.1)):
        points.append(dict(mpi_scale=c, aux_weight=a, lam_E=[c, a, 0.5], steps_S=[0, 10, 20],
                           angle_ES=[[80, 60, 40 * c], [70, 50, 30], [60, 45, 30 + a]], final_loss=0.01,
                           ref_lam_E=[0.3, 0.4, 0.2 + a], ref_angle_S=[70, 70, 65 + a], ref_final_loss=0.02))
    return dict(axes=axes, initial=[1.0, 0.0], points=points, runs="4 toy runs")


def test_chapter4_figure_plots_each_points_lambda_and_angles():
    data = ch4_data()
    sg = chapter4_static_figure(data)
    assert [s.value for s in sg.sliders] == ["1", "0"]
    for p in data["points"]:
        n = sg.index((p["mpi_scale"], p["aux_weight"]))
        assert np.allclose(sg.table["lam.bars"][n].data["top"], p["lam_E"])
        assert np.allclose(sg.table["lam.ref"][n].data["y"], [np.mean(p["ref_lam_E"])] * 2)
        assert np.allclose(np.array(sg.table["angles.experts"][n].data["ys"], dtype=np.float64), p["angle_ES"])
        assert np.allclose(sg.table["angles.ref"][n].data["y"], p["ref_angle_S"])
        assert np.allclose(sg.table["angles.ref"][n].data["x"], p["steps_S"])
        assert f"C'={p['mpi_scale']:g}, α={p['aux_weight']:g}" in sg.captions[n]


# chapter 2 on a 2 × 2 grid of tiny retrained runs: the page must show what the dashboard draws from the live probe

CH2_TINY = RunConfig(model=MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16),
                     task=TaskConfig(d_in=8, d_out=8, n_clusters=4, teacher_width=16, n_train=1024, n_probe=256),
                     train=TrainConfig(steps=30, batch_size=64))
CH2_TINY_PROBE = dict(rank=2, n_draws=3, n_splits=2)


@pytest.fixture(scope="module")
def ch2_tiny():
    """Grid data from the tool's record of tiny runs (E=4, D=8, 30 steps), and each point's live probe."""
    tool = _tool()
    data = make_task(CH2_TINY.task, 0)
    points, probes = [], {}
    with tool.torch_threads(1):
        for k, tau in product((1, 2), (0.5, 2.0)):
            run = CH2_TINY.replace(model=CH2_TINY.model.replace(k=k, temperature=tau))
            tr = Trainer.from_config(run, data=data)
            tr.step(run.train.steps)
            probes[(k, tau)] = probe = probe_asymmetry(tr.model, tr.data.x_probe[:200], **CH2_TINY_PROBE, seed=0,
                                                       step=tr.steps_done)
            points.append(dict(k=k, temperature=tau, **tool.chapter2_record(probe, run.model.label,
                                                                            tr.history.loss)))
    axes = [GridAxis("k", "top-k", (1, 2)).to_dict(), GridAxis("temperature", "τ", (0.5, 2.0)).to_dict()]
    return dict(axes=axes, initial=[2, 2.0], points=points, runs="4 tiny runs"), probes


def close_columns(got: dict, want: dict, rtol: float = 1e-3) -> None:
    """Column-by-column: numbers within ``rtol`` (the JSON keeps 4 significant digits), strings equal."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if len(w) and isinstance(w[0], str):
            assert list(g) == list(w), name
            continue
        rows_g, rows_w = (g, w) if len(w) and isinstance(w[0], (list, np.ndarray)) else ([g], [w])
        assert len(rows_g) == len(rows_w), name
        for a, b in zip(rows_g, rows_w):
            assert np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol,
                               atol=1e-9, equal_nan=True), name


def test_chapter2_figure_draws_what_the_dashboard_draws_from_the_live_probe(ch2_tiny):
    data, probes = ch2_tiny
    sg = chapter2_static_figure(data)
    assert [s.categories for s in sg.sliders] == [["1", "2"], ["0.5", "2"]]
    assert [s.value for s in sg.sliders] == ["2", "2"]
    assert set(sg.title_targets) == {"distance", "alignment", "scatter"}
    for p in data["points"]:
        key = (p["k"], p["temperature"])
        n, probe = sg.index(key), probes[key]
        oracle = Chapter2Views.build()                 # the dashboard's views, drawn from the live probe
        draw_asymmetry(oracle, probe)
        for name, src in (("distance.cells", oracle.distance.cells), ("alignment.cells", oracle.alignment.cells),
                          ("scatter.points", oracle.scatter.points), ("scatter.refs", oracle.scatter.refs),
                          ("scatter.band", oracle.scatter.band)):
            close_columns(sg.table[name][n].data, dict(src.data))
        assert len(sg.table["distance.cells"][n].data["value"]) == 16
        for name, fig in (("distance", oracle.distance.figure), ("alignment", oracle.alignment.figure),
                          ("scatter", oracle.scatter.figure)):
            assert sg.titles[name][n] == fig.title.text          # the references, as the dashboard titles them
        loss = sg.table["loss.curves"][n].data
        assert np.allclose(loss["xs"][0], [5, 10, 15, 20, 25, 30])
        c, a = probe.comparison, probe.alignment
        assert f"split-half floor {c.floor_mean:.2f}, isotropic {c.iso_mean:.2f}" in sg.captions[n]
        assert f"(null {a.null_level:.3f}, split-half ceiling {a.ceiling:.2f})" in sg.captions[n]
        assert html.escape(p["geometry"]) in sg.captions[n]
        assert f"top-{p['k']} of 4, τ={p['temperature']:g}" in sg.captions[n]
    n0 = sg.index((2, 2.0))
    assert all(sg.title_targets[name].text == sg.titles[name][n0] for name in sg.titles)   # initial point shown


def test_chapter2_record_keeps_the_probe_numbers(ch2_tiny):
    data, probes = ch2_tiny
    for p in data["points"]:
        probe = probes[(p["k"], p["temperature"])]
        got = np.array([[math.nan if v is None else v for v in r] for r in p["distance_EE"]])
        assert np.allclose(got, probe.distance_EE, rtol=1e-3, equal_nan=True)
        got = np.array([[math.nan if v is None else v for v in r] for r in p["alignment_EE"]])
        assert np.allclose(got, probe.alignment_EE, rtol=1e-3, equal_nan=True)
        assert p["comparison"]["floor_mean"] == pytest.approx(probe.comparison.floor_mean, rel=1e-5, nan_ok=True)
        assert p["alignment"]["ceiling"] == pytest.approx(probe.alignment.ceiling, rel=1e-5, nan_ok=True)
        assert p["skipped"] == sorted(probe.skipped) and p["rank"] == 2 and p["step"] == 30
        assert json.loads(json.dumps(p)) == p                                      # JSON-ready (no NaN)


# ---------------------------------------------------------------------------------------------------------------
# the rendered pages and the committed grid data

@pytest.mark.parametrize("chapter", sorted(STATIC_FIGURES))
def test_committed_page_is_complete_and_self_contained(chapter, tmp_path):
    """The page `make figures-html` renders from the committed grid data (the pages are build outputs)."""
    data_path = FIGURES / f"{chapter}.json"
    assert data_path.exists(), f"{data_path} is missing: run `python tools/make_static_figures.py`"
    data = json.loads(data_path.read_text())
    page_path = _tool().render(chapter, data, tmp_path)
    assert page_path.exists()
    sizes = [len(a["values"]) for a in data["axes"]]
    assert len(sizes) == 2 and min(sizes) >= 3, sizes
    keys = {(p[data["axes"][0]["name"]], p[data["axes"][1]["name"]]) for p in data["points"]}
    assert keys == set(product(*(a["values"] for a in data["axes"])))
    assert all(math.isfinite(p["final_loss"]) for p in data["points"])
    page = page_path.read_text(encoding="utf-8")
    assert_self_contained(page)
    # the page holds exactly the table the committed data gives
    build, _ = STATIC_FIGURES[chapter]
    expected = sorted(s.name for srcs in build(data).table.values() for s in srcs)
    assert sorted(n for n in embedded_source_names(page) if n and "[" in n) == expected
    assert len(expected) == len(keys) * len(build(data).sources)


def _tool():
    spec = importlib.util.spec_from_file_location("make_static_figures", ROOT / "tools" / "make_static_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_grid_data_still_reproduces():
    """One grid point per chapter (the dashboard's default), retrained now, matches the committed record within
    2 % (bitwise on the machine that wrote it; the tolerance covers other CPUs and library versions)."""
    tool = _tool()
    ch1 = json.loads((FIGURES / "chapter1.json").read_text())
    ch2 = json.loads((FIGURES / "chapter2.json").read_text())
    ch3 = json.loads((FIGURES / "chapter3.json").read_text())
    ch4 = json.loads((FIGURES / "chapter4.json").read_text())
    with tool.torch_threads(1):
        now1 = tool.chapter1_point(*ch1["initial"])
        now2 = tool.chapter2_point(*ch2["initial"], settings=ch2["settings"])
        now3 = tool.chapter3_point(*ch3["initial"])
        now4 = tool.chapter4_point(*ch4["initial"], reference={})
    then1 = next(p for p in ch1["points"] if [p["k"], p["temperature"]] == ch1["initial"])
    then4 = next(p for p in ch4["points"] if [p["mpi_scale"], p["aux_weight"]] == ch4["initial"])
    assert now1["final_loss"] == pytest.approx(then1["final_loss"], rel=0.02)
    assert np.nanmean(np.array(now1["sigma1_E"], dtype=float)) == \
        pytest.approx(np.nanmean(np.array(then1["sigma1_E"], dtype=float)), rel=0.02)
    then2 = next(p for p in ch2["points"] if [p["k"], p["temperature"]] == ch2["initial"])
    assert now2["final_loss"] == pytest.approx(then2["final_loss"], rel=0.02)
    for side, field in (("comparison", "between_mean"), ("comparison", "floor_mean"),
                        ("alignment", "mean_abs_offdiag"), ("alignment", "ceiling")):
        assert now2[side][field] == pytest.approx(then2[side][field], rel=0.02), (side, field)
    then3 = next(p for p in ch3["points"] if [p["router_alpha"], p["lf_rate"]] == ch3["initial"])
    assert now3["final_loss"] == pytest.approx(then3["final_loss"], rel=0.02)
    assert now3["s_abs"] == pytest.approx(then3["s_abs"], rel=0.02)
    assert np.allclose(now3["load_E"], then3["load_E"], atol=0.01)
    assert now4["final_loss"] == pytest.approx(then4["final_loss"], rel=0.02)
    assert np.mean(now4["lam_E"]) == pytest.approx(np.mean(then4["lam_E"]), rel=0.02)
    assert now4["steps_S"] == then4["steps_S"]


def test_committed_chapter2_grid_is_the_dashboards_default_over_k_and_tau():
    """The committed chapter-2 data: the grid the page promises, the dashboard's settings, small enough to commit,
    and each point's page data equal to its JSON record."""
    from moewidgets.dashboards.chapter2 import DEFAULT_RUN, N_PROBE, RANK
    tool = _tool()
    path = FIGURES / "chapter2.json"
    data = json.loads(path.read_text())
    assert path.stat().st_size < 200_000
    assert data["settings"] == tool.chapter2_settings() and data["settings"]["rank"] == RANK
    assert data["n_probe"] == N_PROBE and data["config"] == json.loads(DEFAULT_RUN.to_json())
    sg = chapter2_static_figure(data)
    assert [s.categories for s in sg.sliders] == [["1", "2", "4", "8"], ["0.3", "1", "3"]]
    assert [s.value for s in sg.sliders] == ["2", "1"]                   # the dashboard's default point first
    assert len(sg.keys) == 12 and all(len(t) == 12 for t in sg.titles.values())
    for p in data["points"]:
        n = sg.index((p["k"], p["temperature"]))
        assert p["step"] == DEFAULT_RUN.train.steps and p["n_points"] == N_PROBE
        for name, field in (("distance.cells", "distance_EE"), ("alignment.cells", "alignment_EE")):
            cells = sg.table[name][n].data
            want = [math.nan if p[field][int(y)][int(x)] is None else p[field][int(y)][int(x)]
                    for x, y in zip(cells["x"], cells["y"])]
            assert np.allclose(np.asarray(cells["value"], dtype=np.float64), want, rtol=1e-6, equal_nan=True)
        c = p["comparison"]
        assert f"split-half floor {c['floor_mean']:.2f} · isotropic {c['iso_mean']:.2f}" in sg.titles["distance"][n]
        assert f"split-half ceiling {p['alignment']['ceiling']:.2f}" in sg.titles["alignment"][n]
