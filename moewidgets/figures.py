"""Static figures for chapter outputs: a labelled matplotlib plot rendered once to a small PNG.

One mechanism for every picture a chapter shows without a kernel. A :class:`StaticFigure` displays as a PNG in
JupyterLab and in the built HTML book (offline: the image is inside the notebook), and as a short caption in plain
text. nbval skips ``image/png`` and compares ``text/plain``, so a figure cell still compares, on its caption only:
never put claims into a figure cell, print them in their own cell.

Why PNG and not bokeh: a standalone bokeh figure needs BokehJS (1.6 MB inline, or a CDN), a PNG of a line plot at
100 dpi is a few tens of kB and renders everywhere. The interactive, kernel-free figures stay bokeh pages.

Shapes (legend): S seeds, N points along the x axis (training steps), P panels.

* :func:`plot_trajectories` — mean over seeds of each series against x, with a shaded band mean ± sd (sample sd,
  ddof = 1, when S ≥ 2); returns the matplotlib ``Figure`` (inspect it before rendering).
* :func:`render` — ``Figure`` → :class:`StaticFigure` (PNG bytes, caption, pixel size).
* :func:`trajectories` — both in one call; :func:`track_figure` reads the per-seed ``track`` of claim-run rows
  (``book/results/chapterN.jsonl``); :func:`loss_figure` plots training-loss histories on a log axis.

Determinism: a fixed style (matplotlib's defaults plus ``STYLE``, whatever the user's matplotlibrc says), the Agg
canvas (no pyplot, no global figure state), and no ``Software`` chunk in the PNG: the same inputs give the same bytes
with the same matplotlib. ``import moewidgets`` never imports matplotlib; this module imports it on first use.

Example (a chapter cell; the book's chapters 3 and 4 plot their claim-run tracks this way):

>>> import numpy as np
>>> from moewidgets.figures import trajectories
>>> steps_N = np.arange(50, 1001, 50)
>>> maxvio_SN = 0.5 * np.exp(-steps_N / 300) + 0.01 * np.arange(3)[:, None]    # 3 seeds
>>> fig = trajectories(steps_N, {"loss-free": maxvio_SN, "none": maxvio_SN + 0.3},
...                    xlabel="training step", ylabel="batch MaxVio (max/mean load − 1)",
...                    title="Load imbalance during training", caption="Batch MaxVio, mean ± sd over 3 seeds.")
>>> fig
Figure: Load imbalance during training. Batch MaxVio, mean ± sd over 3 seeds.
>>> (fig.width_px, fig.height_px), fig.png[:8] == b"\\x89PNG\\r\\n\\x1a\\n", len(fig.png) < 60_000
((640, 360), True, True)
>>> sorted(fig._repr_mimebundle_()[0])
['image/png', 'text/plain']
"""
from __future__ import annotations

import base64
import io
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

# Fixed look, on top of matplotlib's own defaults (rcdefaults), so a user's matplotlibrc cannot change the bytes.
STYLE: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.family": "DejaVu Sans",      # ships with matplotlib
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "legend.frameon": False,
    "svg.hashsalt": "moewidgets",
}
DEFAULT_SIZE_IN = (6.4, 3.6)          # inches; at 100 dpi a 640 × 360 PNG
BAND_ALPHA = 0.18
MAX_PNG_BYTES = 200_000               # a figure output larger than this is an error, not a silent bloat


@dataclass(frozen=True)
class StaticFigure:
    """A rendered figure: PNG bytes plus a caption. Displays as ``image/png`` + ``text/plain`` (the caption).

    ``figure`` keeps the matplotlib ``Figure`` it was rendered from (not compared, not shown), so a test can read its
    labels.
    """

    png: bytes
    caption: str
    width_px: int
    height_px: int
    figure: Any = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"Figure: {self.caption}"

    def _repr_mimebundle_(self, include=None, exclude=None) -> tuple[dict, dict]:
        data = {"image/png": base64.b64encode(self.png).decode("ascii"), "text/plain": repr(self)}
        meta = {"image/png": {"width": self.width_px, "height": self.height_px}}
        return data, meta


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(STYLE)
        yield


def _require_text(name: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}={value!r} must be a non-empty string (every figure is labelled)")
    return value.strip()


def _as_SN(name: str, y: Any, n: int) -> np.ndarray:
    """One series as an (S, N) float array: a length-N sequence is one seed."""
    y_SN = np.asarray(y, dtype=float)
    if y_SN.ndim == 1:
        y_SN = y_SN[None, :]
    if y_SN.ndim != 2 or y_SN.shape[1] != n or y_SN.shape[0] == 0:
        raise ValueError(f"series {name!r} has shape {tuple(np.shape(y))}; allowed: ({n},) or (S, {n}) with S ≥ 1 "
                         f"(N={n} points of x)")
    return y_SN


def plot_trajectories(x_N: Sequence[float], series: Mapping[str, Any], *, xlabel: str, ylabel: str | Sequence[str],
                      title: str, logy: bool = False, band: bool = True, size_in: tuple[float, float] | None = None,
                      styles: Mapping[str, str] | None = None, panel_titles: Sequence[str] | None = None):
    """Line plot of each series' mean over seeds against ``x_N``, with a shaded band mean ± sd over seeds.

    ``series`` maps a legend label to an array of shape (N,) (one run) or (S, N) (S seeds): the line is
    ``mean_s y[s, n]``, the band ``mean ± sd`` with ``sd = sqrt(Σ_s (y[s,n] − mean)² / (S − 1))`` (drawn when
    ``band`` and S ≥ 2; on a log axis the band is clipped to positive values). A mapping of mappings,
    ``{panel_key: {label: y}}`` with a list of ``ylabel`` (one per panel), draws P panels side by side sharing x
    (``panel_titles``: one short title per panel, optional).
    ``styles`` maps a label to a matplotlib line style (e.g. ``"--"`` for a reference run). Returns the matplotlib
    ``Figure`` (Agg canvas, fixed style); :func:`render` turns it into a :class:`StaticFigure`.

    >>> fig = plot_trajectories([0, 1, 2], {"a": [1.0, 0.5, 0.2]}, xlabel="step", ylabel="loss", title="t")
    >>> ax = fig.axes[0]; (ax.get_xlabel(), ax.get_ylabel(), ax.get_title())
    ('step', 'loss', 't')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xlabel, title = _require_text("xlabel", xlabel), _require_text("title", title)
    x_N = np.asarray(x_N, dtype=float)
    if x_N.ndim != 1 or x_N.size < 2:
        raise ValueError(f"x_N has shape {x_N.shape}; allowed: (N,) with N ≥ 2 points")
    if not series:
        raise ValueError("series={} must name at least one series")
    nested = all(isinstance(v, Mapping) for v in series.values())
    panels = dict(series) if nested else {"": series}
    ylabels = [ylabel] if isinstance(ylabel, str) else list(ylabel)
    if len(ylabels) != len(panels):
        raise ValueError(f"ylabel has {len(ylabels)} entries; allowed: one per panel ({len(panels)} panels)")
    ylabels = [_require_text("ylabel", y) for y in ylabels]
    styles = dict(styles or {})
    if panel_titles is not None and len(panel_titles) != len(panels):
        raise ValueError(f"panel_titles has {len(panel_titles)} entries; allowed: one per panel ({len(panels)})")
    w, h = size_in or (DEFAULT_SIZE_IN if len(panels) == 1 else (3.6 * len(panels), 3.4))
    with _style():
        fig = Figure(figsize=(w, h), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
        import matplotlib

        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        labels = list(dict.fromkeys(lab for p in panels.values() for lab in p))   # one color per label, all panels
        for j, (ax, (key, group), yl) in enumerate(zip(axes, panels.items(), ylabels)):
            if not group:
                raise ValueError(f"panel {key!r} has no series")
            for label, y in group.items():
                y_SN = _as_SN(label, y, x_N.size)
                mean_N = y_SN.mean(axis=0)
                color = colors[labels.index(label) % len(colors)]
                ax.plot(x_N, mean_N, styles.get(label, "-"), color=color, label=label)
                if band and y_SN.shape[0] >= 2:
                    sd_N = y_SN.std(axis=0, ddof=1)
                    lo_N, hi_N = mean_N - sd_N, mean_N + sd_N
                    if logy:
                        lo_N = np.maximum(lo_N, mean_N * 1e-3)
                    ax.fill_between(x_N, lo_N, hi_N, color=color, alpha=BAND_ALPHA, linewidth=0)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(yl)
            if panel_titles is not None:
                ax.set_title(panel_titles[j])
        axes[0].legend(loc="best")
        fig.suptitle(title) if len(panels) > 1 else axes[0].set_title(title)
    return fig


def _palette_png(png: bytes) -> bytes:
    """Re-encode an RGBA PNG with a 256-colour palette (fast octree, deterministic): a line plot with shaded bands
    shrinks about 3× and looks the same."""
    from PIL import Image      # a dependency of matplotlib

    with Image.open(io.BytesIO(png)) as im:
        pal = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    out = io.BytesIO()
    pal.save(out, format="PNG", optimize=True)
    return out.getvalue()


def render(fig, caption: str, *, dpi: int = 100) -> StaticFigure:
    """Render a matplotlib ``Figure`` to a :class:`StaticFigure` (PNG at ``dpi``, no metadata chunk).

    The caption is the ``text/plain`` that nbval compares: keep it short, deterministic, and free of numbers that
    vary between runs. The figure's title, when it has one, starts the caption.
    """
    caption = _require_text("caption", caption)
    if not 30 <= dpi <= 300:
        raise ValueError(f"dpi={dpi} must be in 30..300")
    title = fig.get_suptitle() or (fig.axes[0].get_title() if fig.axes else "")
    text = f"{title.rstrip('.')}. {caption}" if title else caption
    buf = io.BytesIO()
    with _style():
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    png = _palette_png(buf.getvalue())
    if len(png) > MAX_PNG_BYTES:
        raise ValueError(f"the PNG has {len(png)} bytes; allowed ≤ {MAX_PNG_BYTES} (lower dpi or size_in)")
    w, h = fig.get_size_inches()
    return StaticFigure(png=png, caption=text, width_px=int(round(w * dpi)), height_px=int(round(h * dpi)),
                        figure=fig)


def trajectories(x_N: Sequence[float], series: Mapping[str, Any], *, xlabel: str, ylabel: str | Sequence[str],
                 title: str, caption: str, logy: bool = False, band: bool = True,
                 size_in: tuple[float, float] | None = None, styles: Mapping[str, str] | None = None,
                 dpi: int = 100) -> StaticFigure:
    """:func:`plot_trajectories` then :func:`render`: the one call a chapter cell makes (see the module example)."""
    fig = plot_trajectories(x_N, series, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy, band=band,
                            size_in=size_in, styles=styles)
    return render(fig, caption, dpi=dpi)


def track_series(rows: Sequence[Mapping], arms: Sequence[str], key: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """From claim-run rows (``{"arm", "metrics": {"track": {"step": [...], key: [...]}}}``, one row per seed), the
    steps (N,) and ``{arm: y_SN}``. Every seed of every arm must share the same steps.

    >>> rows = [{"arm": "a", "metrics": {"track": {"step": [1, 2], "m": [s, s + 1]}}} for s in (0, 2)]
    >>> steps_N, by_arm = track_series(rows, ["a"], "m"); steps_N.tolist(), by_arm["a"].tolist()
    ([1.0, 2.0], [[0.0, 1.0], [2.0, 3.0]])
    """
    steps_N: np.ndarray | None = None
    out: dict[str, np.ndarray] = {}
    for arm in arms:
        tracks = [r["metrics"]["track"] for r in rows if r.get("arm") == arm and "track" in r.get("metrics", {})]
        if not tracks:
            raise ValueError(f"arm={arm!r} has no row with a metrics.track; arms with tracks: "
                             f"{sorted({r.get('arm') for r in rows if 'track' in r.get('metrics', {})})}")
        for t in tracks:
            if key not in t:
                raise ValueError(f"key={key!r} is not in arm {arm!r}'s track; allowed: {sorted(set(t) - {'step'})}")
            s_N = np.asarray(t["step"], dtype=float)
            if steps_N is None:
                steps_N = s_N
            elif s_N.shape != steps_N.shape or not np.array_equal(s_N, steps_N):
                raise ValueError(f"arm {arm!r} has a track with other steps than the first arm's "
                                 f"({s_N.size} vs {steps_N.size} points)")
        out[arm] = np.asarray([t[key] for t in tracks], dtype=float)
    return steps_N, out


def track_figure(rows: Sequence[Mapping], arms: Sequence[str], keys: str | Sequence[str], *,
                 ylabel: str | Sequence[str], title: str, caption: str, logy: bool = False,
                 xlabel: str = "training step", dpi: int = 100) -> StaticFigure:
    """Claim-run tracks as a figure: one line per arm (mean over its seeds, band ± sd), one panel per key.

    ``rows`` are the rows of ``moewidgets.reproduce.load_results(chapter)``; ``keys`` names the track fields
    (``"maxvio"`` in chapter 3; ``["lam", "cos", "gap"]`` in chapter 4), ``ylabel`` one label with units per key.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    panels: dict[str, dict[str, np.ndarray]] = {}
    steps_N = None
    for key in keys:
        steps_N, panels[key] = track_series(rows, arms, key)
    series = panels[keys[0]] if len(keys) == 1 else panels
    return trajectories(steps_N, series, xlabel=xlabel, ylabel=ylabel, title=title, caption=caption, logy=logy,
                        dpi=dpi)


def loss_figure(histories: Mapping[str, Any], *, title: str, caption: str, ylabel: str = "training loss (MSE)",
                smooth: int = 1, dpi: int = 100) -> StaticFigure:
    """Training-loss curves on a log y axis: ``{label: History | [History, ...] | [loss, ...] | [[loss, ...], ...]}``.

    A :class:`~moewidgets.train.History` (``.step``, ``.loss``) or a list of them (one per seed: band ± sd); a plain
    sequence is a per-step loss from step 1. ``smooth`` > 1 takes the mean over non-overlapping windows of that many
    steps (the x value is the window's last step). All curves must have the same length.
    """
    if not (isinstance(smooth, int) and smooth >= 1):
        raise ValueError(f"smooth={smooth!r} must be an int ≥ 1 (steps per window)")
    series: dict[str, np.ndarray] = {}
    n = None
    for label, h in histories.items():
        runs = h if isinstance(h, (list, tuple)) and h and not isinstance(h[0], (int, float)) else [h]
        loss_SN = np.asarray([r.loss if hasattr(r, "loss") else r for r in runs], dtype=float)
        if loss_SN.ndim != 2:
            raise ValueError(f"histories[{label!r}] runs have different lengths; allowed: equal lengths")
        if n is not None and loss_SN.shape[1] != n:
            raise ValueError(f"histories[{label!r}] has {loss_SN.shape[1]} steps; the first curve has {n}")
        n = loss_SN.shape[1]
        m = n // smooth
        if m < 2:
            raise ValueError(f"smooth={smooth} leaves {m} point(s) of {n} steps; allowed: at least 2")
        series[label] = loss_SN[:, : m * smooth].reshape(loss_SN.shape[0], m, smooth).mean(axis=2)
    if not series:
        raise ValueError("histories={} must name at least one run")
    x_N = np.arange(1, m + 1) * smooth
    if not all(np.isfinite(v).all() and (v > 0).all() for v in series.values()):
        raise ValueError("a loss curve has a non-finite or non-positive value; a log axis needs loss > 0")
    return trajectories(x_N, series, xlabel="training step", ylabel=ylabel, title=title, caption=caption, logy=True,
                        dpi=dpi)


__all__ = ["STYLE", "StaticFigure", "plot_trajectories", "render", "trajectories", "track_series", "track_figure",
           "loss_figure"]


#: Verdict → colour of a forest-plot row (colour-blind-safe: green, vermilion, grey, orange).
VERDICT_COLOURS = {"holds": "#009E73", "fails": "#D55E00", "inconclusive": "#8C8C8C", "insufficient seeds": "#E69F00"}


def _forest_label(r, width: int = 52) -> str:
    """``SC-2 top-1 vs dense: stable_rank``, cut to ``width`` characters."""
    text = f"{r.claim} {r.arm_a} vs {r.arm_b}: {r.metric.split(' vs ')[0]}"
    return text if len(text) <= width else text[: width - 1] + "…"


def forest_figure(results: Sequence[Any], *, title: str, caption: str, roles: Sequence[str] = ("decides",),
                  width_in: float = 7.6, dpi: int = 90) -> StaticFigure:
    """A forest plot of claims rows: one line per row, the per-seed paired differences as dots, the bootstrap CI
    of their mean as a bar, zero marked, colour by verdict.

    Rows measure different quantities, so each row is put on one scale that reads the same everywhere: the
    difference **in the predicted direction**, relative to the row's level,

        r_s = sign · d_s / ((|mean_a| + |mean_b|) / 2) × 100 %,

    so a point right of zero agrees with the paper's prediction. ``results``: ``ClaimResult`` objects (from a
    chapter's claims function) carrying ``diffs`` and ``sign``; rows with a role outside ``roles`` are left out.

    >>> from moewidgets.reproduce import ClaimResult
    >>> r = ClaimResult("X-1", "A below B", "m", "a", "b", 1.0, 0.1, 1.2, 0.1, 3, 3, (-0.3, -0.1), True, True,
    ...                 verdict="holds", diffs=(-0.2, -0.25, -0.15), sign=-1)
    >>> forest_figure([r], title="Example", caption="One row.").caption
    'Example. One row.'
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    title, caption = _require_text("title", title), _require_text("caption", caption)
    rows = [r for r in results if r.role in roles]
    if not rows:
        raise ValueError(f"results has no row with role in {tuple(roles)} (roles present: "
                         f"{sorted({r.role for r in results})})")
    missing = [f"{r.claim} {r.arm_a} vs {r.arm_b}" for r in rows if not r.diffs or r.sign not in (-1, 1)]
    if missing:
        raise ValueError(f"rows without per-seed differences or predicted sign: {missing[:3]} (make them with the "
                         f"chapter's claims function)")
    with _style():
        # the legend sits below the axes (constrained layout makes room), never over the bottom row
        fig = Figure(figsize=(width_in, 1.2 + 0.26 * len(rows)), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        for y, r in enumerate(reversed(rows)):
            scale = (abs(r.mean_a) + abs(r.mean_b)) / 2 or 1.0
            rel = np.array(r.diffs, dtype=float) * r.sign / scale * 100.0
            ci = sorted(np.array(r.ci, dtype=float) * r.sign / scale * 100.0)
            colour = VERDICT_COLOURS[r.verdict]
            ax.plot(rel, np.full(len(rel), y), "o", ms=3.2, color=colour, alpha=0.55, mec="none")
            if all(np.isfinite(ci)):
                ax.plot(ci, [y, y], "-", lw=2.4, color=colour, solid_capstyle="butt")
            ax.plot([np.nanmean(rel)], [y], "|", ms=10, mew=2, color="black")
        ax.axvline(0.0, color="black", lw=0.9)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([_forest_label(r) for r in reversed(rows)], fontsize=7)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlabel("difference toward the prediction, % of the row's level (symlog)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        present = [v for v in VERDICT_COLOURS if any(r.verdict == v for r in rows)]
        handles = [Line2D([], [], color=VERDICT_COLOURS[v], lw=2.4, label=v) for v in present]
        handles.append(Line2D([], [], color="black", marker="|", ls="none", ms=8, label="mean over seeds"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7)
        del matplotlib
    return render(fig, caption, dpi=dpi)
