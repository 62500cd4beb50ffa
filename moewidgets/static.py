"""Interactive figures without a kernel: results precomputed on a grid of two slider values, drawn by the
dashboards' own views (:mod:`moewidgets.views`), and one self-contained HTML page whose bokeh sliders swap the
plotted data in the browser (a ``CustomJS`` callback, BokehJS inline: it works offline, from ``file://`` too).

How it works. A grid maps each key ``(a, b)`` (a value of the first slider, a value of the second) to one data dict
per plotted source. Every grid point becomes an *unplotted* ``ColumnDataSource`` per plotted source, kept in a table
in row-major order (index ``i·n_b + j`` for the i-th value of the first slider and the j-th of the second). The two
sliders are ``CategoricalSlider`` widgets whose categories are the grid values' labels (so uneven values such as
τ = 0.1, 0.3, 1, 3, 10 sit at even steps); on a change the callback looks the two labels up and assigns a shallow
copy of that grid point's data to each plotted source (its caption to the caption ``Div``, and its figure titles to
the figures whose titles change with the point, such as chapter 2's references). Nothing is interpolated: only the
computed points can be shown, and the live dashboard retrains anything in between.

Shape legend: E experts, J singular-value index, S recorded steps.

Data flows one way: the grid data (JSON, written by ``tools/make_static_figures.py``) → the chapter's figure
(:func:`chapter1_static_figure`, :func:`chapter2_static_figure`, :func:`chapter3_static_figure`,
:func:`chapter4_static_figure`) → :func:`static_grid_html` → the book's ``_extra/figures/chapterN.html``, shown in
the chapter through an ``<iframe>``.

>>> from bokeh.models import ColumnDataSource
>>> from bokeh.plotting import figure
>>> src = ColumnDataSource(dict(x=[], y=[]))
>>> fig = figure(width=200, height=150)
>>> _ = fig.line("x", "y", source=src)
>>> axes = (GridAxis("a", "a", (1, 2)), GridAxis("b", "b", (0.5, 5.0)))
>>> grid = {(a, b): {"line": dict(x=[0, 1], y=[a, b])} for a in (1, 2) for b in (0.5, 5.0)}
>>> sg = static_grid_figure(grid, axes, fig, {"line": src}, initial=(2, 0.5))
>>> [s.categories for s in sg.sliders], src.data["y"], sg.table["line"][3].data["y"]
([['1', '2'], ['0.5', '5']], [2, 0.5], [2, 5.0])

Chapters 1 to 4 (book/chapter1.ipynb, book/chapter2.ipynb, book/chapter3.ipynb, book/chapter4.ipynb) embed the pages
these functions write.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from itertools import product
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
from bokeh.embed import file_html
from bokeh.layouts import column, gridplot, row
from bokeh.models import CategoricalSlider, ColumnDataSource, CustomJS, Div
from bokeh.resources import INLINE

from . import views as V

__all__ = ["GridAxis", "StaticGridFigure", "static_grid_figure", "static_grid_html", "source_data",
           "chapter1_static_figure", "chapter2_static_figure", "chapter3_static_figure", "chapter4_static_figure",
           "STATIC_FIGURES"]

# The callback: the two slider labels → the grid index → one new data dict per plotted source (a shallow copy, so
# a later swap never aliases a table source), the caption and the per-point figure titles. Row-major: index =
# i * n_b + j.
_SWAP_JS = """
const i = slider_a.categories.indexOf(slider_a.value);
const j = slider_b.categories.indexOf(slider_b.value);
if (i < 0 || j < 0) { return; }
const n = i * slider_b.categories.length + j;
for (const [name, target] of Object.entries(targets)) {
  target.data = {...table[name][n].data};
}
if (caption !== null) { caption.text = captions[n]; }
for (const [name, title] of Object.entries(title_targets)) {
  title.text = titles[name][n];
}
"""


@dataclass(frozen=True)
class GridAxis:
    """One slider of a static grid.

    Args:
        name: the config field the slider stands for (``"k"``, ``"temperature"``, ``"mpi_scale"``, ...).
        title: the slider's title.
        values: the grid values, in slider order (at least 2, distinct).
        labels: how each value is shown on the slider (default ``f"{v:g}"``); distinct, one per value.

    >>> GridAxis("temperature", "τ", (0.1, 1.0, 10.0)).labels
    ('0.1', '1', '10')
    """

    name: str
    title: str
    values: tuple
    labels: tuple = ()

    def __post_init__(self) -> None:
        values = tuple(self.values)
        if len(values) < 2 or len(set(values)) != len(values):
            raise ValueError(f"GridAxis {self.name!r}: values={values} must be at least 2 distinct values")
        labels = tuple(self.labels) if self.labels else tuple(f"{v:g}" for v in values)
        if len(labels) != len(values) or len(set(labels)) != len(labels):
            raise ValueError(f"GridAxis {self.name!r}: labels={labels} must be {len(values)} distinct strings, "
                             f"one per value in {values}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "labels", labels)

    def to_dict(self) -> dict:
        """A JSON-ready dict (``GridAxis(**d)`` reads it back)."""
        return dict(name=self.name, title=self.title, values=list(self.values), labels=list(self.labels))


@dataclass
class StaticGridFigure:
    """A grid of precomputed results behind two bokeh sliders (module docstring).

    Fields::

        layout    the bokeh layout: the two sliders, the caption Div, the figures
        axes      the two GridAxis (first slider, second slider)
        sliders   the two CategoricalSlider widgets (categories = the axes' labels)
        sources   the plotted ColumnDataSources, by name (what the callback assigns to)
        table     per name, one unplotted ColumnDataSource per grid point, row-major over keys
        keys      the grid keys (a, b), row-major: keys[i * len(axes[1].values) + j]
        captions  one caption text per grid point (row-major), or [] without a caption
        caption   the caption Div (None without captions)
        callback  the CustomJS run on either slider's change
        title_targets  the figure titles (bokeh Title models) that change with the point, by name ({} if none)
        titles    per name in title_targets, one title text per grid point (row-major)
    """

    layout: Any
    axes: tuple[GridAxis, GridAxis]
    sliders: tuple[CategoricalSlider, CategoricalSlider]
    sources: dict[str, ColumnDataSource]
    table: dict[str, list[ColumnDataSource]]
    keys: list[tuple]
    captions: list[str] = field(default_factory=list)
    caption: Div | None = None
    callback: CustomJS | None = None
    title_targets: dict[str, Any] = field(default_factory=dict)
    titles: dict[str, list[str]] = field(default_factory=dict)

    def index(self, key: tuple) -> int:
        """The row-major table index of a grid key (what the callback computes from the slider labels)."""
        i, j = self.axes[0].values.index(key[0]), self.axes[1].values.index(key[1])
        return i * len(self.axes[1].values) + j


def source_data(source: ColumnDataSource) -> dict:
    """A plain-dict snapshot of a source's columns (each column as stored: a list, an array, a list of arrays).

    >>> source_data(ColumnDataSource(dict(x=[1, 2])))
    {'x': [1, 2]}
    """
    return {name: col for name, col in source.data.items()}


def _compact(columns: Mapping[str, Any]) -> dict:
    """float64 arrays (and lists of them, multi_line rows) → float32: half the bytes in the page, and 7 significant
    digits are more than a plot shows."""
    def f32(col):
        if isinstance(col, np.ndarray) and col.dtype == np.float64:
            return col.astype(np.float32)
        if isinstance(col, list) and col and all(isinstance(c, np.ndarray) for c in col):
            return [f32(c) for c in col]
        return col
    return {name: f32(col) for name, col in columns.items()}


def static_grid_figure(grid: Mapping[tuple, Mapping[str, Mapping[str, Any]]], axes: Sequence[GridAxis], body,
                       sources: Mapping[str, ColumnDataSource], captions: Mapping[tuple, str] | None = None,
                       initial: tuple | None = None, footer: str | None = None, slider_width: int = 310,
                       titles: Mapping[tuple, Mapping[str, str]] | None = None,
                       title_targets: Mapping[str, Any] | None = None) -> StaticGridFigure:
    """Put a grid of precomputed source data behind two sliders.

    Args:
        grid: ``{(a, b): {source name: {column: values}}}`` for every a in ``axes[0].values`` and b in
            ``axes[1].values`` (no key missing, none extra); every point gives data for every name in ``sources``.
        axes: the two sliders (:class:`GridAxis`).
        body: the bokeh figure or layout that plots ``sources``.
        sources: the plotted sources, by name; their data is replaced by the ``initial`` point's.
            float64 arrays are stored as float32 (half the page size).
        captions: one caption text (HTML) per key, shown in a Div above ``body``, or None.
        initial: the key shown first (default: the first key).
        footer: a fixed text (HTML) below ``body`` (what was computed, and how), or None.
        slider_width: each slider's width in pixels; the caption and footer span both sliders.
        titles: ``{(a, b): {name: title text}}`` for every key, one text per name in ``title_targets`` (figure
            titles that change with the point, such as chapter 2's references), or None.
        title_targets: the figure titles to set (``{name: fig.title}``); given together with ``titles``.

    Returns a :class:`StaticGridFigure`; :func:`static_grid_html` writes it as one page. Validation happens before
    any bokeh object is made.
    """
    if len(axes) != 2:
        raise ValueError(f"axes has {len(axes)} entries: a static grid has exactly 2 sliders")
    a_ax, b_ax = axes
    if not sources:
        raise ValueError("sources is empty: give at least one plotted ColumnDataSource")
    keys = list(product(a_ax.values, b_ax.values))
    missing = [k for k in keys if k not in grid]
    extra = [k for k in grid if k not in set(keys)]
    if missing or extra:
        raise ValueError(f"grid keys must be every ({a_ax.name}, {b_ax.name}) pair of {a_ax.values} × {b_ax.values}:"
                         f" missing {missing[:4]}, unexpected {extra[:4]}")
    for k in keys:
        if set(grid[k]) != set(sources):
            raise ValueError(f"grid[{k}] has sources {sorted(grid[k])}; expected {sorted(sources)}")
    if captions is not None and any(k not in captions for k in keys):
        raise ValueError(f"captions must have a text for every grid key: missing "
                         f"{[k for k in keys if k not in captions][:4]}")
    initial = keys[0] if initial is None else tuple(initial)
    if initial not in grid:
        raise ValueError(f"initial={initial} is not a grid key; keys are {keys}")
    if (titles is None) != (title_targets is None):
        raise ValueError("titles and title_targets go together: give both (per-point title texts and the figure "
                         "titles they set) or neither")
    title_targets = dict(title_targets or {})
    if titles is not None:
        bad = [k for k in keys if k not in titles or set(titles[k]) != set(title_targets)]
        if bad:
            raise ValueError(f"titles must give a text for each of {sorted(title_targets)} at every grid key: "
                             f"wrong at {bad[:4]}")

    table = {name: [ColumnDataSource(_compact(grid[k][name]), name=f"{name}[{a_ax.name}={la},{b_ax.name}={lb}]")
                    for k, (la, lb) in zip(keys, product(a_ax.labels, b_ax.labels))] for name in sources}
    for name, src in sources.items():
        src.data = _compact(grid[initial][name])
    sliders = tuple(CategoricalSlider(categories=list(ax.labels), value=ax.labels[ax.values.index(v)],
                                      title=ax.title, width=slider_width, name=f"slider:{ax.name}")
                    for ax, v in zip(axes, initial))
    texts = [captions[k] for k in keys] if captions is not None else []
    caption = V.build_caption(captions[initial]) if captions is not None else None
    title_texts = {name: [titles[k][name] for k in keys] for name in title_targets}
    for name, title in title_targets.items():
        title.text = titles[initial][name]
    notes = V.build_caption(footer) if footer is not None else None
    for div in filter(None, (caption, notes)):
        div.width = 2 * slider_width
    callback = CustomJS(args=dict(slider_a=sliders[0], slider_b=sliders[1], targets=dict(sources), table=table,
                                  captions=texts, caption=caption, title_targets=title_targets, titles=title_texts),
                        code=_SWAP_JS)
    for s in sliders:
        s.js_on_change("value", callback)
    parts = [row(*sliders), *filter(None, (caption, body, notes))]
    return StaticGridFigure(column(*parts), (a_ax, b_ax), sliders, dict(sources), table, keys, texts, caption,
                            callback, title_targets, title_texts)


def static_grid_html(fig: StaticGridFigure, title: str) -> str:
    """The figure as one self-contained HTML page: BokehJS (core + widgets) inline, no external script or style,
    so it renders offline and inside an ``<iframe>`` of the built book (≈ 1.7 MB, almost all of it BokehJS)."""
    return file_html(fig.layout, resources=INLINE, title=title)


# ---------------------------------------------------------------------------------------------------------------
# The chapters' figures, from the grid data that tools/make_static_figures.py writes (JSON-ready dicts).
#
# Common fields: "axes" (two GridAxis dicts), "initial" (the key shown first), "points" (one record per key, with
# the axes' names as fields), "runs" and "config" (what was trained, for the caption).

def _axes(data: Mapping) -> tuple[GridAxis, GridAxis]:
    if len(data.get("axes", ())) != 2:
        raise ValueError(f"data['axes'] must hold 2 axes, got {data.get('axes')!r}")
    return tuple(GridAxis(**{**a, "values": tuple(a["values"]), "labels": tuple(a.get("labels", ()))})
                 for a in data["axes"])


def _points(data: Mapping, axes: tuple[GridAxis, GridAxis]) -> dict[tuple, Mapping]:
    return {(p[axes[0].name], p[axes[1].name]): p for p in data["points"]}


def _nan(x) -> np.ndarray:
    """JSON null → NaN (a dead expert's per-expert numbers), as float64 arrays (nested lists stay rows)."""
    return np.array([math.nan if v is None else v for v in x], dtype=np.float64)


def _fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _footer(data: Mapping) -> str:
    return (f"Precomputed: {html.escape(data['runs'])}. Only these grid points exist in this page; the chapter's "
            "live dashboard retrains any value.")


def _snapshot(*views_and_sources) -> dict[str, dict]:
    return {name: source_data(src) for name, src in views_and_sources}


def chapter1_static_figure(data: Mapping) -> StaticGridFigure:
    """Chapter 1's expert Jacobian spectra and leading singular values over top-k × temperature.

    ``data`` fields (besides the common ones): per point ``ratios_EJ`` (each expert's routing-weighted mean
    normalised spectrum σ_j/σ_1; null for a dead expert), ``sigma1_E``, ``final_loss``, ``dead``; ``dense``: the
    parameter-matched dense baseline's ``ratios_J``, ``sigma1`` and ``final_loss`` (one run: it depends on neither
    slider). Views: :func:`~moewidgets.views.build_spectra_view`, :func:`~moewidgets.views.build_bars_view`.
    """
    axes = _axes(data)
    spectra = V.build_spectra_view("Expert Jacobian spectra")
    sigma1 = V.build_bars_view("Leading singular value", "σ_1 of J (routing-weighted mean)")
    dense = data["dense"]
    grid, captions = {}, {}
    for key, p in _points(data, axes).items():
        V.update_spectra(spectra, [_nan(r) for r in p["ratios_EJ"]], _nan(dense["ratios_J"]))
        V.update_bars(sigma1, _nan(p["sigma1_E"]), dense["sigma1"])
        grid[key] = _snapshot(("spectra.experts", spectra.experts), ("spectra.dense", spectra.dense),
                              ("sigma1.bars", sigma1.bars), ("sigma1.ref", sigma1.ref))
        s1 = _nan(p["sigma1_E"])
        dead = f" · {p['dead']} dead expert{'s' if p['dead'] != 1 else ''}" if p["dead"] else ""
        captions[key] = (f"<b>{html.escape(p['label'])}, τ={p['temperature']:g}</b> · final train MSE "
                         f"{p['final_loss']:.2g} (dense {dense['final_loss']:.2g}) · mean σ<sub>1</sub> "
                         f"{_fmt(float(np.nanmean(s1)) if np.isfinite(s1).any() else math.nan)} (dense "
                         f"{_fmt(dense['sigma1'])}){dead} · dashed = dense baseline, hidden E·m="
                         f"{dense['hidden']}")
    body = gridplot([[spectra.figure, sigma1.figure]], toolbar_location="right")
    sources = {"spectra.experts": spectra.experts, "spectra.dense": spectra.dense, "sigma1.bars": sigma1.bars,
               "sigma1.ref": sigma1.ref}
    return static_grid_figure(grid, axes, body, sources, captions, tuple(data["initial"]), _footer(data))


def _scalars(stored: Mapping) -> SimpleNamespace:
    """A stored dict of reference numbers → attributes (JSON null → NaN, which the chapter-2 titles print as –)."""
    return SimpleNamespace(**{k: math.nan if v is None else float(v) for k, v in stored.items()})


@dataclass
class _StoredAsymmetry:
    """A chapter-2 grid point's geometry read back from its JSON record: exactly the fields of
    :class:`~moewidgets.dashboards.chapter2.AsymmetryProbe` that
    :func:`~moewidgets.dashboards.chapter2.draw_asymmetry` reads, so the page is drawn (titles and references
    included) by the dashboard's own drawing function, not by a copy of it."""

    rank: int
    distance_EE: np.ndarray
    alignment_EE: np.ndarray
    comparison: SimpleNamespace
    alignment: SimpleNamespace
    summary: SimpleNamespace

    @property
    def n_experts(self) -> int:
        return len(self.distance_EE)

    def pairs(self):
        from .dashboards.chapter2 import AsymmetryProbe
        return AsymmetryProbe.pairs(self)        # the dashboard's pair list, on the stored matrices

    @classmethod
    def from_record(cls, p: Mapping) -> "_StoredAsymmetry":
        def matrix(rows):                        # (E, E), JSON null → NaN (skipped / dead experts)
            return np.array([_nan(r) for r in rows], dtype=np.float64).reshape(len(rows), len(rows))
        return cls(int(p["rank"]), matrix(p["distance_EE"]), matrix(p["alignment_EE"]), _scalars(p["comparison"]),
                   _scalars(p["alignment"]), _scalars(p["summary"]))


def chapter2_static_figure(data: Mapping) -> StaticGridFigure:
    """Chapter 2's functional vs representational geometry over top-k × temperature.

    The live dashboard's views (:class:`~moewidgets.dashboards.chapter2.Chapter2Views`), drawn at each grid point
    by :func:`~moewidgets.dashboards.chapter2.draw_asymmetry`: the E×E normalised geodesic Grassmann distance of
    the experts' routed input subspaces, titled with the random-group null band, the split-half floor and the
    isotropic level; the E×E alignment ``|cos_F|`` of the gate-weighted mean Jacobians, titled with its Gaussian
    null and split-half ceiling; the expert pairs' scatter of the two; and the training loss. The figure titles
    change with the point (the references are the point's own).

    ``data`` fields (besides the common ones): per point ``label``, ``final_loss``, ``loss_step_S`` and ``loss_S``
    (the training loss, subsampled), ``rank``, ``distance_EE`` and ``alignment_EE`` (E×E; null where an expert has
    no subspace or no routed token), ``comparison`` (``between_mean``, ``group_null_lo_mean``,
    ``group_null_hi_mean``, ``group_null_mean``, ``floor_mean``, ``iso_mean``), ``alignment``
    (``mean_abs_offdiag``, ``null_level``, ``null_sd``, ``ceiling``), ``summary`` (``functional_fraction``,
    ``representational_fraction``) and ``geometry`` (the dashboard's
    :func:`~moewidgets.dashboards.chapter2.describe_probe` text).
    """
    from .dashboards.chapter2 import FIG_W, Chapter2Views, draw_asymmetry
    axes = _axes(data)
    views = Chapter2Views.build()
    figures = {"distance": views.distance.figure, "alignment": views.alignment.figure,
               "scatter": views.scatter.figure}
    grid, captions, titles = {}, {}, {}
    for key, p in _points(data, axes).items():
        stored = _StoredAsymmetry.from_record(p)
        draw_asymmetry(views, stored)
        V.update_series(views.loss, p["loss_step_S"], [p["loss_S"]])
        grid[key] = _snapshot(("distance.cells", views.distance.cells), ("alignment.cells", views.alignment.cells),
                              ("scatter.points", views.scatter.points), ("scatter.refs", views.scatter.refs),
                              ("scatter.band", views.scatter.band), ("loss.curves", views.loss.experts))
        titles[key] = {name: fig.title.text for name, fig in figures.items()}
        c, a = stored.comparison, stored.alignment
        captions[key] = (f"<b>{html.escape(p['label'])}, τ={p['temperature']:g}</b> · final train MSE "
                         f"{p['final_loss']:.2g} · mean d̂<sub>geo</sub> {_fmt(c.between_mean)} (random-group null "
                         f"{_fmt(c.group_null_lo_mean)}–{_fmt(c.group_null_hi_mean)}, split-half floor "
                         f"{_fmt(c.floor_mean)}, isotropic {_fmt(c.iso_mean)}) · mean |cos<sub>F</sub>| "
                         f"{_fmt(a.mean_abs_offdiag, '.3f')} (null {_fmt(a.null_level, '.3f')}, split-half ceiling "
                         f"{_fmt(a.ceiling)}) · {html.escape(p['geometry'])}")
    body = gridplot([[views.distance.figure, views.alignment.figure], [views.scatter.figure, views.loss.figure]],
                    toolbar_location="right")
    sources = {"distance.cells": views.distance.cells, "alignment.cells": views.alignment.cells,
               "scatter.points": views.scatter.points, "scatter.refs": views.scatter.refs,
               "scatter.band": views.scatter.band, "loss.curves": views.loss.experts}
    return static_grid_figure(grid, axes, body, sources, captions, tuple(data["initial"]), _footer(data),
                              slider_width=FIG_W, titles=titles,
                              title_targets={name: fig.title for name, fig in figures.items()})


def chapter3_static_figure(data: Mapping) -> StaticGridFigure:
    """Chapter 3's router-row cosines and per-expert loads over router / balancing α × loss-free γ.

    The first slider's values are ``"kmeans"`` (the online K-Means router, no aux loss) and the aux weights α of the
    learned softmax router; the second slider is the loss-free rate γ. ``data`` fields (besides the common ones):
    per point ``router``, ``aux_weight``, ``cos_EE`` (the router rows' pairwise cosines, E×E), ``s_abs`` and
    ``s_signed`` (mean over i < j of the absolute and the signed cosine), ``load_E`` (each expert's fraction of
    the assignments on the fixed probe batch), ``maxvio`` (on that batch), ``dead`` (experts with no assignment),
    ``final_loss``; ``probe_tokens``: the probe batch size. The no-balancing reference of a point is the grid's own
    α = 0, γ = 0 point of the same router (named in the caption). Views:
    :func:`~moewidgets.views.build_heatmap_view` (fixed colour scale [-1, 1]),
    :func:`~moewidgets.views.build_bars_view`.
    """
    axes = _axes(data)
    rows = V.build_heatmap_view("Router-row cosines (S_abs, S_signed: caption)", "cos(r_i, r_j)", low=-1.0, high=1.0)
    load = V.build_bars_view("Load per expert (probe batch)", "fraction of assignments", ref_label="uniform 1/E")
    points = _points(data, axes)
    unbalanced = {p["router"]: p for p in points.values() if p["aux_weight"] == 0 and p["lf_rate"] == 0}
    grid, captions = {}, {}
    for key, p in points.items():
        V.update_heatmap(rows, _nan([v for r in p["cos_EE"] for v in r]).reshape(len(p["cos_EE"]), -1))
        V.update_bars(load, _nan(p["load_E"]), 1.0 / len(p["load_E"]))
        grid[key] = _snapshot(("rows.cells", rows.cells), ("load.bars", load.bars), ("load.ref", load.ref))
        ref = unbalanced.get(p["router"])
        ref_text = (f" (no balancing: S<sub>abs</sub> {_fmt(ref['s_abs'])}, MaxVio {_fmt(ref['maxvio'])})"
                    if ref is not None and ref is not p else " · the no-balancing run" if ref is p else "")
        head = ("K-Means router" if p["router"] == "kmeans" else f"{html.escape(p['router'])} router, "
                f"α={p['aux_weight']:g}")
        dead = (f" · dead expert{'s' if len(p['dead']) != 1 else ''} {', '.join(map(str, p['dead']))}"
                if p["dead"] else " · no dead expert")
        captions[key] = (f"<b>{head}, γ={p['lf_rate']:g}</b> · S<sub>abs</sub> {_fmt(p['s_abs'])}, "
                         f"S<sub>signed</sub> {_fmt(p['s_signed'], '+.2f')} · MaxVio (probe batch of "
                         f"{data['probe_tokens']}) {_fmt(p['maxvio'])}{ref_text}{dead} · final train MSE "
                         f"{p['final_loss']:.2g} · rows = "
                         f"{'K-Means centroids' if p['router'] == 'kmeans' else 'learned router rows'}")
    body = gridplot([[rows.figure, load.figure]], toolbar_location="right")
    sources = {"rows.cells": rows.cells, "load.bars": load.bars, "load.ref": load.ref}
    return static_grid_figure(grid, axes, body, sources, captions, tuple(data["initial"]), _footer(data))


def chapter4_static_figure(data: Mapping) -> StaticGridFigure:
    """Chapter 4's router-row alignment over C' (the MPI row scale) × the balancing weight α.

    ``data`` fields (besides the common ones): per point ``lam_E`` (λ per expert at the end), ``steps_S`` and
    ``angle_ES`` (each expert's angle between its router row and v1 over training), ``final_loss``, and the plain
    softmax router's run at the same α: ``ref_lam_E``, ``ref_angle_S`` (mean over experts), ``ref_final_loss``.
    Views: :func:`~moewidgets.views.build_bars_view`, :func:`~moewidgets.views.build_series_view`.
    """
    axes = _axes(data)
    lam = V.build_bars_view("Alignment λ per expert (MPI)", "λ = ‖W r‖² / (‖r‖² σ1²)",
                            ref_label="plain router (mean)")
    angles = V.build_series_view("Angle of router row to v1 (MPI)", "angle(R'_i, v1_i) in degrees",
                                 ref_label="plain router (mean)")
    angles.figure.y_range.start, angles.figure.y_range.end = 0, 90
    lam.figure.y_range.end = 1.0       # λ ∈ [0, 1]: a fixed axis, so bars compare across slider moves
    grid, captions = {}, {}
    for key, p in _points(data, axes).items():
        ref_lam = float(np.mean(p["ref_lam_E"]))
        V.update_bars(lam, p["lam_E"], ref_lam)
        V.update_series(angles, p["steps_S"], p["angle_ES"], p["steps_S"], p["ref_angle_S"])
        grid[key] = _snapshot(("lam.bars", lam.bars), ("lam.ref", lam.ref), ("angles.experts", angles.experts),
                              ("angles.ref", angles.ref))
        mean_angle = float(np.mean(np.asarray(p["angle_ES"])[:, -1]))
        captions[key] = (f"<b>MPI router, C'={p['mpi_scale']:g}, α={p['aux_weight']:g}</b> · mean λ "
                         f"{float(np.mean(p['lam_E'])):.2f} (plain router {ref_lam:.2f}) · mean angle to v1 "
                         f"{mean_angle:.0f}° (plain router {p['ref_angle_S'][-1]:.0f}°) · final train MSE "
                         f"{p['final_loss']:.2g} (plain {p['ref_final_loss']:.2g}) · dashed = the same model with the"
                         f" plain softmax router")
    body = gridplot([[lam.figure, angles.figure]], toolbar_location="right")
    sources = {"lam.bars": lam.bars, "lam.ref": lam.ref, "angles.experts": angles.experts, "angles.ref": angles.ref}
    return static_grid_figure(grid, axes, body, sources, captions, tuple(data["initial"]), _footer(data))


# chapter → (figure builder, page title): what tools/make_static_figures.py renders
STATIC_FIGURES = {
    "chapter1": (chapter1_static_figure, "Chapter 1: expert Jacobian spectra over top-k × temperature"),
    "chapter2": (chapter2_static_figure, "Chapter 2: Grassmann distance vs Jacobian alignment over top-k × "
                                         "temperature"),
    "chapter3": (chapter3_static_figure, "Chapter 3: router-row cosines and expert loads over router / α × γ"),
    "chapter4": (chapter4_static_figure, "Chapter 4: router-row alignment over C' × balancing α"),
}
