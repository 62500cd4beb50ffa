"""Bokeh figure builders for the dashboards: plain data in, figure + ColumnDataSources out, no widget logic.

Shape legend: E experts, J singular-value index (spectrum length), K principal components, S steps.

Every builder returns a small dataclass holding the figure and its sources; the matching ``update_*`` function
takes plain data (lists, numpy arrays or CPU tensors) and assigns **one new dict per source** (``source.data =
{...}``), so a redraw is one message per source over the widget comm rather than one per column; a source whose
data did not change is not sent again. Columns are numpy arrays (sent as binary buffers: about 2× cheaper than
lists). The number of experts may change between calls (the E slider): per-expert lines are ``multi_line`` glyphs
whose columns simply get a different length, and colours come from :func:`expert_palette`.

    >>> view = build_spectra_view()
    >>> update_spectra(view, [[1.0, 0.5, 0.1], [1.0, 0.2, 0.05]], dense_J=[1.0, 0.6, 0.3])
    >>> len(view.experts.data["xs"]), view.dense.data["y"].tolist()
    (2, [1.0, 0.6, 0.3])

Chapter 1 (book/chapter1.ipynb) shows all of them in its live dashboard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from bokeh.models import (ColorBar, ColumnDataSource, Div, HoverTool, Legend, LinearColorMapper,
                          SingleIntervalTicker)
from bokeh.palettes import Category10_10, Category20_20, Viridis256, turbo
from bokeh.plotting import figure

__all__ = [
    "expert_palette", "SpectraView", "build_spectra_view", "update_spectra", "BarsView", "build_bars_view",
    "update_bars", "HeatmapView", "build_heatmap_view", "update_heatmap", "PCAView", "build_pca_view",
    "update_pca", "LossView", "build_loss_view", "update_loss", "build_caption", "DENSE_STYLE",
]

FIG_W, FIG_H = 310, 250
# The dense baseline is drawn the same way in every view: a thick dashed black reference.
DENSE_STYLE = dict(line_color="black", line_width=3, line_dash="dashed", line_alpha=0.8)
LOG_FLOOR = 1e-6   # values below this are clipped on log axes (a log axis cannot show 0)


def expert_palette(n_experts: int) -> list[str]:
    """``n_experts`` distinct colours: Category10 up to 10, Category20 up to 20, else sampled from Turbo."""
    if n_experts <= 10:
        return list(Category10_10[:n_experts])
    if n_experts <= 20:
        return list(Category20_20[:n_experts])
    return list(turbo(n_experts))


def _array(x) -> np.ndarray:
    """Plain float64 numpy array from a list, numpy array or (CPU/GPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _same(old, new) -> bool:
    """True if two columns hold the same values (numbers, strings, or per-row arrays of a multi_line)."""
    if len(old) != len(new):
        return False
    if len(new) and isinstance(new[0], np.ndarray):
        return all(isinstance(a, np.ndarray) and np.array_equal(a, b) for a, b in zip(old, new))
    return bool(np.array_equal(np.asarray(old), np.asarray(new)))


def _assign(source: ColumnDataSource, data: dict) -> None:
    """``source.data = data`` (one patch message), skipped when nothing changed (a cached baseline, a fixed level)."""
    old = source.data
    if old.keys() == data.keys() and all(_same(old[k], v) for k, v in data.items()):
        return
    source.data = data


def _figure(title: str, x_label: str, y_label: str, y_log: bool = False, **kw):
    fig = figure(title=title, width=FIG_W, height=FIG_H, y_axis_type="log" if y_log else "linear",
                 tools="pan,box_zoom,wheel_zoom,reset,save", toolbar_location="right", **kw)
    fig.xaxis.axis_label, fig.yaxis.axis_label = x_label, y_label
    fig.title.text_font_size = "11pt"
    return fig


def _legend(fig, location: str = "top_right") -> None:
    fig.legend.location = location
    fig.legend.label_text_font_size = "8pt"
    fig.legend.background_fill_alpha = 0.6
    fig.legend.click_policy = "hide"


def _curves(rows: Sequence[Sequence[float]], x0: int, floor: float | None = None) -> dict:
    """multi_line columns for one curve per expert: x = x0, x0+1, ... (curves may differ in length)."""
    rows = [_array(r) for r in rows]
    ys = [np.maximum(r, floor) if floor is not None else r for r in rows]
    xs = [np.arange(x0, x0 + len(r), dtype=np.float64) for r in rows]
    return dict(xs=xs, ys=ys, color=expert_palette(len(rows)), expert=list(range(len(rows))))


def _line(y, x0: int, floor: float | None = None) -> dict:
    if y is None:
        return dict(x=np.zeros(0), y=np.zeros(0))
    y = _array(y)
    y = np.maximum(y, floor) if floor is not None else y
    return dict(x=np.arange(x0, x0 + len(y), dtype=np.float64), y=y)


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SpectraView:
    """Per-expert normalised singular spectra σ_j/σ_1 (one line each) and the dense baseline's (dashed)."""

    figure: object
    experts: ColumnDataSource   # xs, ys, color, expert   (multi_line, one row per expert)
    dense: ColumnDataSource     # x, y


def _expert_lines(fig, legend_at: str) -> tuple[ColumnDataSource, ColumnDataSource]:
    """One line per expert (hover names it) plus the dashed dense baseline on ``fig``; returns their sources
    (experts: xs, ys, color, expert; dense: x, y)."""
    experts = ColumnDataSource(dict(xs=[], ys=[], color=[], expert=[]))
    dense = ColumnDataSource(dict(x=[], y=[]))
    r = fig.multi_line("xs", "ys", source=experts, line_color="color", line_width=1.5, legend_label="experts")
    fig.line("x", "y", source=dense, legend_label="dense baseline", **DENSE_STYLE)
    fig.add_tools(HoverTool(renderers=[r], tooltips=[("expert", "@expert")]))
    _legend(fig, legend_at)
    return experts, dense


def build_spectra_view(title: str = "Expert Jacobian spectra") -> SpectraView:
    """Mean normalised singular spectra of the expert Jacobians, log y (chapter 1)."""
    fig = _figure(title, "singular value index j", "σ_j / σ_1 (mean over routed points)", y_log=True)
    return SpectraView(fig, *_expert_lines(fig, "bottom_left"))


def update_spectra(view: SpectraView, ratios_EJ, dense_J=None) -> None:
    """``ratios_EJ``: per expert the spectrum σ_j/σ_1, j = 1..J (rows may differ in length); ``dense_J``: the
    dense baseline's, or None. Values are clipped at 1e-6 for the log axis."""
    _assign(view.experts, _curves(ratios_EJ, 1, LOG_FLOOR))
    _assign(view.dense, _line(dense_J, 1, LOG_FLOOR))


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BarsView:
    """One bar per expert and a horizontal reference level (the dense baseline, or uniform load 1/E)."""

    figure: object
    bars: ColumnDataSource   # x (expert index), top, color
    ref: ColumnDataSource    # x = [-0.5, E-0.5], y = [level, level]


def build_bars_view(title: str, y_label: str, ref_label: str = "dense baseline") -> BarsView:
    """Per-expert bars (σ_1, effective rank, load, ...) with a horizontal reference line labelled ``ref_label``."""
    fig = _figure(title, "expert", y_label)
    fig.xaxis.ticker = SingleIntervalTicker(interval=1)
    fig.xgrid.grid_line_color = None
    fig.y_range.start = 0
    bars = ColumnDataSource(dict(x=[], top=[], color=[]))
    ref = ColumnDataSource(dict(x=[], y=[]))
    r = fig.vbar(x="x", top="top", width=0.8, color="color", source=bars)
    line = fig.line("x", "y", source=ref, **DENSE_STYLE)
    # the legend goes above the frame: inside it would hide the tallest bars
    fig.add_layout(Legend(items=[(ref_label, [line])], location="top_right", orientation="horizontal",
                          label_text_font_size="8pt", border_line_alpha=0, padding=0, margin=2), "above")
    fig.add_tools(HoverTool(renderers=[r], tooltips=[("expert", "@x"), ("value", "@top{0.000}")]))
    return BarsView(fig, bars, ref)


def update_bars(view: BarsView, values_E, ref: float | None = None) -> None:
    """``values_E``: one value per expert; ``ref``: the reference level (None hides the line)."""
    v_E = _array(values_E)
    E = len(v_E)
    _assign(view.bars, dict(x=np.arange(E, dtype=np.float64), top=v_E, color=expert_palette(E)))
    level = dict(x=np.array([-0.5, E - 0.5]), y=np.full(2, float(ref))) if ref is not None else _line(None, 0)
    _assign(view.ref, level)


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class HeatmapView:
    """An E×E matrix as coloured cells (cross-expert Jacobian alignment)."""

    figure: object
    cells: ColumnDataSource   # x (column expert), y (row expert), value


def build_heatmap_view(title: str = "Jacobian alignment", value_label: str = "|Frobenius cosine|",
                       low: float = 0.0, high: float = 1.0) -> HeatmapView:
    """Cells coloured by value on a fixed [low, high] Viridis scale, so colours compare across redraws."""
    fig = _figure(title, "expert j", "expert i")
    fig.y_range.flipped = True           # row 0 at the top, like a printed matrix
    for ax in (fig.xaxis, fig.yaxis):
        ax.ticker = SingleIntervalTicker(interval=1)
    fig.grid.grid_line_color = None
    mapper = LinearColorMapper(palette=Viridis256, low=low, high=high)
    cells = ColumnDataSource(dict(x=[], y=[], value=[]))
    fig.rect("x", "y", 1, 1, source=cells, fill_color={"field": "value", "transform": mapper}, line_color=None)
    fig.add_layout(ColorBar(color_mapper=mapper, width=8, title=value_label, title_text_font_size="8pt"), "right")
    fig.add_tools(HoverTool(tooltips=[("experts", "@y, @x"), ("value", "@value{0.000}")]))
    return HeatmapView(fig, cells)


def update_heatmap(view: HeatmapView, matrix_EE, title: str | None = None) -> None:
    """``matrix_EE``: the E×E values; ``title`` replaces the figure title (e.g. with the null and ceiling)."""
    m_EE = _array(matrix_EE)
    i_EE, j_EE = np.indices(m_EE.shape)
    _assign(view.cells, dict(x=j_EE.ravel().astype(np.float64), y=i_EE.ravel().astype(np.float64),
                             value=m_EE.ravel()))
    if title is not None:
        view.figure.title.text = title


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PCAView:
    """Cumulative explained variance of each expert's routed outputs (weighted PCA), and the dense baseline's."""

    figure: object
    experts: ColumnDataSource   # xs, ys, color, expert
    dense: ColumnDataSource     # x, y


def build_pca_view(title: str = "PCA of expert outputs") -> PCAView:
    """Cumulative fraction of variance vs number of principal components (chapter 1, weighted PCA of H-out)."""
    fig = _figure(title, "principal components kept", "cumulative fraction of variance")
    fig.y_range.start, fig.y_range.end = 0, 1.02
    return PCAView(fig, *_expert_lines(fig, "bottom_right"))


def _cumulative(eig_K) -> np.ndarray:
    e_K = np.clip(_array(eig_K), 0.0, None)
    total = e_K.sum()
    return np.cumsum(e_K) / total if total > 0 else np.zeros_like(e_K)


def update_pca(view: PCAView, eigvals_EK, dense_K=None) -> None:
    """``eigvals_EK``: per expert the covariance eigenvalues (descending; plotted as cumulative fractions
    Σ_{k'≤k} λ_k' / Σ λ); ``dense_K``: the dense baseline's eigenvalues, or None."""
    _assign(view.experts, _curves([_cumulative(e) for e in eigvals_EK], 1))
    _assign(view.dense, _line(None if dense_K is None else _cumulative(dense_K), 1))


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LossView:
    """Training loss per step of the model and of its dense baseline."""

    figure: object
    model: ColumnDataSource   # step, loss
    dense: ColumnDataSource   # step, loss


def build_loss_view(title: str = "Training loss") -> LossView:
    """Train MSE vs optimiser step, log y."""
    fig = _figure(title, "step", "train MSE (per output)", y_log=True)
    model = ColumnDataSource(dict(step=[], loss=[]))
    dense = ColumnDataSource(dict(step=[], loss=[]))
    fig.line("step", "loss", source=model, line_width=2, color=Category10_10[0], legend_label="model")
    fig.line("step", "loss", source=dense, legend_label="dense baseline", **{**DENSE_STYLE, "line_width": 2})
    _legend(fig, "top_right")
    return LossView(fig, model, dense)


def update_loss(view: LossView, steps_S, loss_S, dense_steps=None, dense_loss=None) -> None:
    """Loss curves: the model's (``steps_S``, ``loss_S``) and optionally the dense baseline's."""
    _assign(view.model, dict(step=_array(steps_S), loss=np.maximum(_array(loss_S), LOG_FLOOR)))
    if dense_steps is not None:
        _assign(view.dense, dict(step=_array(dense_steps), loss=np.maximum(_array(dense_loss), LOG_FLOOR)))


def build_caption(text: str = "") -> Div:
    """A bokeh Div for a caption inside the bokeh layout (its text is DOM text: easy to read and test)."""
    return Div(text=text, width=3 * FIG_W, styles={"font-size": "10pt", "color": "#333"})


# ---------------------------------------------------------------------------------------------------------------
# Chapter 4 (book/chapter4.ipynb): quantities over training steps, per expert, against a reference run.

@dataclass
class SeriesView:
    """Per-expert curves over training steps (one line each, or a single line) and a reference curve (dashed)."""

    figure: object
    experts: ColumnDataSource   # xs (steps), ys, color, expert   (multi_line, one row per curve)
    ref: ColumnDataSource       # x (steps), y


def build_series_view(title: str, y_label: str, ref_label: str = "reference", curve_label: str = "experts",
                      y_log: bool = False) -> SeriesView:
    """Curves of a quantity against the optimiser step (e.g. each expert's router-to-singular-vector angle), with
    a dashed reference curve labelled ``ref_label`` (e.g. the plain softmax router's mean).

    >>> view = build_series_view("Angle to v1", "degrees", ref_label="plain router")
    >>> update_series(view, [10, 20], [[80.0, 60.0], [85.0, 70.0]], [10, 20], [88.0, 87.0])
    >>> len(view.experts.data["xs"]), [float(y) for y in view.ref.data["y"]]
    (2, [88.0, 87.0])
    """
    fig = _figure(title, "step", y_label, y_log=y_log)
    experts = ColumnDataSource(dict(xs=[], ys=[], color=[], expert=[]))
    ref = ColumnDataSource(dict(x=[], y=[]))
    r = fig.multi_line("xs", "ys", source=experts, line_color="color", line_width=1.5, legend_label=curve_label)
    fig.line("x", "y", source=ref, legend_label=ref_label, **{**DENSE_STYLE, "line_width": 2})
    fig.add_tools(HoverTool(renderers=[r], tooltips=[("expert", "@expert")]))
    _legend(fig, "top_right")
    return SeriesView(fig, experts, ref)


def update_series(view: SeriesView, steps_S, values_ES, ref_steps=None, ref_values=None) -> None:
    """``steps_S``: the S steps; ``values_ES``: one row of S values per curve (experts, or a single curve);
    ``ref_steps`` / ``ref_values``: the reference curve, or None. Log axes clip values at 1e-6."""
    floor = LOG_FLOOR if view.figure.y_scale.__class__.__name__ == "LogScale" else None
    x_S = _array(steps_S)
    rows = [_array(v) for v in values_ES]
    _assign(view.experts, dict(xs=[x_S] * len(rows), ys=[np.maximum(r, floor) if floor else r for r in rows],
                               color=expert_palette(len(rows)), expert=list(range(len(rows)))))
    if ref_steps is None or ref_values is None:
        _assign(view.ref, dict(x=[], y=[]))
    else:
        y = _array(ref_values)
        _assign(view.ref, dict(x=_array(ref_steps), y=np.maximum(y, floor) if floor else y))


__all__ += ["SeriesView", "build_series_view", "update_series"]


# ---------------------------------------------------------------------------------------------------------------
# Chapter 2 (book/chapter2.ipynb): one point per expert pair against reference levels.

REF_COLORS = ("black", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")   # reference lines, in order


@dataclass
class ScatterView:
    """Points (e.g. one per expert pair) with labelled reference lines and an optional shaded interval.

    Fields::

        figure: the bokeh figure.
        points: ColumnDataSource with x, y (drawn; clipped to the axis floor on a log axis), x_value, y_value
                (the values given, for the hover) and label.
        refs:   ColumnDataSource with x0, y0, x1, y1, color, label: one segment per reference (vertical for an x
                reference, horizontal for a y reference), spanning the plotted range.
        band:   ColumnDataSource with left, right, bottom, top: a shaded x interval (e.g. a null band), or empty.
        x_span, y_span: the fixed axis ranges (reference lines span them).
    """

    figure: object
    points: ColumnDataSource
    refs: ColumnDataSource
    band: ColumnDataSource
    x_span: tuple
    y_span: tuple


def build_scatter_view(title: str, x_label: str, y_label: str, *, x_span: tuple = (0.0, 1.0),
                       y_span: tuple = (0.0, 1.0), y_log: bool = False, band_label: str = "null band",
                       point_label: str = "expert pairs") -> ScatterView:
    """A scatter plot on fixed axis ranges (``x_span``, ``y_span``: colours and positions compare across
    redraws) with reference lines in the legend and a shaded x interval labelled ``band_label``.

    >>> view = build_scatter_view("Asymmetry", "distance", "|cos|", y_log=True, y_span=(1e-3, 1.0))
    >>> update_scatter(view, [0.8, 0.7], [0.05, 0.0], ["0–1", "0–2"], x_refs=[("floor", 0.6)],
    ...                y_refs=[("null", 0.02)], x_band=(0.2, 0.3))
    >>> view.points.data["y"].tolist(), view.refs.data["label"], view.band.data["left"].tolist()
    ([0.05, 0.001], ['floor', 'null'], [0.2])

    Chapter 2 (book/chapter2.ipynb).
    """
    fig = _figure(title, x_label, y_label, y_log=y_log, x_range=tuple(x_span), y_range=tuple(y_span))
    points = ColumnDataSource(dict(x=[], y=[], x_value=[], y_value=[], label=[]))
    refs = ColumnDataSource(dict(x0=[], y0=[], x1=[], y1=[], color=[], label=[]))
    band = ColumnDataSource(dict(left=[], right=[], bottom=[], top=[]))
    fig.quad(left="left", right="right", bottom="bottom", top="top", source=band, fill_color="gray",
             fill_alpha=0.2, line_color=None, legend_label=band_label)
    fig.segment(x0="x0", y0="y0", x1="x1", y1="y1", source=refs, line_color="color", line_width=2,
                line_dash="dashed", legend_field="label")
    r = fig.scatter("x", "y", source=points, size=7, color=Category10_10[0], alpha=0.8, legend_label=point_label)
    fig.add_tools(HoverTool(renderers=[r], tooltips=[("pair", "@label"), ("x", "@x_value{0.000}"),
                                                     ("y", "@y_value{0.0000}")]))
    _legend(fig, "top_left")
    return ScatterView(fig, points, refs, band, (float(x_span[0]), float(x_span[1])),
                       (float(y_span[0]), float(y_span[1])))


def update_scatter(view: ScatterView, x_P, y_P, labels_P=None, *, x_refs=(), y_refs=(), x_band=None,
                   title: str | None = None) -> None:
    """``x_P``, ``y_P``: the P points (pairs with a non-finite coordinate are dropped); ``labels_P``: their hover
    labels; ``x_refs`` / ``y_refs``: ``(label, value)`` reference levels drawn as vertical / horizontal dashed
    lines (non-finite values are left out); ``x_band``: ``(lo, hi)`` shaded, or None; ``title`` replaces the
    figure title. On a log y axis values below the axis floor are drawn at the floor (the hover shows the value).
    """
    x, y = _array(x_P), _array(y_P)
    if x.shape != y.shape:
        raise ValueError(f"x_P has {x.shape[0]} points but y_P has {y.shape[0]}; one (x, y) per point")
    labels = [str(i) for i in range(len(x))] if labels_P is None else [str(s) for s in labels_P]
    if len(labels) != len(x):
        raise ValueError(f"labels_P has {len(labels)} labels for {len(x)} points")
    keep = np.isfinite(x) & np.isfinite(y)
    (x0, x1), (y0, y1) = view.x_span, view.y_span
    log_y = view.figure.y_scale.__class__.__name__ == "LogScale"
    y_drawn = np.maximum(y[keep], y0) if log_y else y[keep]
    _assign(view.points, dict(x=x[keep], y=y_drawn, x_value=x[keep], y_value=y[keep],
                              label=[s for s, k in zip(labels, keep) if k]))
    segs = [(v, y0, v, y1, lab) for lab, v in x_refs if v is not None and np.isfinite(v)]
    segs += [(x0, max(v, y0) if log_y else v, x1, max(v, y0) if log_y else v, lab)
             for lab, v in y_refs if v is not None and np.isfinite(v)]
    cols = list(zip(*segs)) if segs else [[]] * 5
    _assign(view.refs, dict(x0=np.asarray(cols[0], dtype=np.float64), y0=np.asarray(cols[1], dtype=np.float64),
                            x1=np.asarray(cols[2], dtype=np.float64), y1=np.asarray(cols[3], dtype=np.float64),
                            color=[REF_COLORS[i % len(REF_COLORS)] for i in range(len(segs))],
                            label=list(cols[4])))
    ok = x_band is not None and all(v is not None and np.isfinite(v) for v in x_band)
    _assign(view.band, dict(left=np.array([x_band[0]] if ok else [], dtype=np.float64),
                            right=np.array([x_band[1]] if ok else [], dtype=np.float64),
                            bottom=np.array([y0] if ok else [], dtype=np.float64),
                            top=np.array([y1] if ok else [], dtype=np.float64)))
    if title is not None:
        view.figure.title.text = title


__all__ += ["ScatterView", "build_scatter_view", "update_scatter", "REF_COLORS"]
