"""Chapter 2's live dashboard: functional decorrelation against representational overlap (paper 2's asymmetry).

Top-k, temperature τ, experts E, balancing α and seed retrain an MLP-MoE live (default: chapter 1's default run,
E=8, k=2, D=32, m=64 GELU experts, gate "softmax", 400 steps; k = E is fully soft routing) and redraw:

1. the E×E normalised geodesic Grassmann distance ``‖θ‖₂ / ((π/2)√r)`` between the experts' routed input subspaces
   (rank-r gate-weighted PCA of the inputs routed to each expert), titled with its references: the random-token-group
   null band, the same-expert split-half floor and the isotropic (Haar-random) level;
2. the E×E cross-expert Jacobian alignment ``|cos_F(J̄_i, J̄_j)|`` of the gate-weighted mean Jacobians, titled with its
   null (independent Gaussian matrices) and its split-half ceiling;
3. the asymmetry on one plot: one point per expert pair, x = its Grassmann distance, y = its alignment, with the
   references as lines (paper-2 spec GA-4: points far from the functional ceiling, low on y, while spread in x);
4. the training loss.

Geometry is computed at redraw time by :func:`probe_asymmetry` on a fixed probe batch (the first ``N_PROBE`` = 512
held-out points of the run's task) at every ``geometry_every``-th redraw (default: every one) and always at the
end, together with the loss (at most one redraw every ``redraw_s`` = 0.2 s). One pass at E=8 (12 random-group and
isotropic draws, 6 split halves; most of it the references' weighted PCAs) measured 0.13–0.14 s on one thread on the
2-core machine under load from other jobs, about 5% of the 400-step default retrain timed side by side (2.4 s there,
against ≈ 0.5 s quiet). Experts with too few routed tokens (fewer than 5·r) have no subspace: their cells are blank
(grey) and the caption says why.

Data flows one way: widgets → :class:`~moewidgets.config.RunConfig` → :class:`~.runner.LiveRunner` (trainer) →
:func:`~moewidgets.train.trace_model` → :mod:`moewidgets.geometry.subspaces`, the alignment of
:mod:`moewidgets.geometry` and :mod:`moewidgets.geometry.asymmetry` → :mod:`moewidgets.views`.

>>> dash = Chapter2Dashboard(autostart=False)
>>> dash
Chapter2Dashboard(top-2 of 8, τ=1, α=0, seed=0)

Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import html
import logging
import math
import time
from dataclasses import dataclass, field

import ipywidgets as W
import numpy as np
import torch
from bokeh.layouts import column, gridplot

from .. import views as V
from ..config import RunConfig
from ..geometry.alignment import JacobianAlignment
from ..geometry.asymmetry import AsymmetrySummary, layer_asymmetry
from ..geometry.subspaces import RoutedSubspaces, SubspaceComparison
from ..train import trace_model
from .base import DashboardBase
from .runner import RunState, describe_run

__all__ = ["Chapter2Dashboard", "Chapter2Views", "AsymmetryTrack", "AsymmetryProbe", "PairPoints",
           "probe_asymmetry", "probe_layer_asymmetry", "draw_asymmetry", "describe_probe", "both_sides",
           "DEFAULT_RUN", "N_PROBE", "RANK"]

log = logging.getLogger(__name__)

DEFAULT_RUN = RunConfig()     # chapter 1's default run: E=8, k=2, D=32, m=64, GELU, gate "softmax", 400 steps
N_PROBE = 512                 # probe points the geometry uses (the first ones of the task's held-out set)
RANK = 4                      # subspace rank r (paper-2 spec §2.7.4: r ∈ {4, 8} for small models)
FIG_W, FIG_H = 420, 330       # two figures per row; titles take two lines


@dataclass
class PairPoints:
    """One entry per expert pair i < j (pairs with a skipped expert hold NaN).

    Fields::

        i, j:       (P,) the experts of each pair, P = E(E − 1)/2.
        distance:   (P,) normalised geodesic Grassmann distance of their routed input subspaces.
        alignment:  (P,) ``|cos_F(J̄_i, J̄_j)|`` of their gate-weighted mean Jacobians.
    """

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray
    alignment: np.ndarray

    @property
    def labels(self) -> list[str]:
        """'i–j' per pair (the scatter's hover)."""
        return [f"{a}–{b}" for a, b in zip(self.i.tolist(), self.j.tolist())]


@dataclass
class AsymmetryProbe:
    """Paper 2's geometry of one model at one step (:func:`probe_asymmetry`).

    Fields::

        step:        the training step probed.
        n_points:    probe points traced.
        rank:        the subspace rank r.
        subspaces:   the experts' routed input subspaces (:class:`~moewidgets.geometry.subspaces.RoutedSubspaces`;
                     ``skipped`` says which experts have none, and why).
        comparison:  normalised geodesic distances with the random-group null, split-half floor and isotropic
                     level (:class:`~moewidgets.geometry.subspaces.SubspaceComparison`).
        alignment:   Frobenius cosines of the mean Jacobians with null and ceiling
                     (:class:`~moewidgets.geometry.JacobianAlignment`).
        summary:     both sides on one scale (:class:`~moewidgets.geometry.asymmetry.AsymmetrySummary`).
        wall_s:      seconds the pass took.
    """

    step: int
    n_points: int
    rank: int
    subspaces: RoutedSubspaces
    comparison: SubspaceComparison
    alignment: JacobianAlignment
    summary: AsymmetrySummary
    wall_s: float

    @property
    def n_experts(self) -> int:
        return self.subspaces.n_experts

    @property
    def skipped(self) -> dict[int, str]:
        """The experts without a subspace (too few routed tokens, ...), each with the reason, as a dict."""
        return dict(self.subspaces.skipped)

    @property
    def distance_EE(self) -> np.ndarray:
        """(E, E) normalised geodesic distances (0 on the diagonal, NaN for skipped experts)."""
        return self.comparison.observed.detach().cpu().numpy().astype(np.float64)

    @property
    def alignment_EE(self) -> np.ndarray:
        """(E, E) ``|cos_F(J̄_i, J̄_j)|`` (1 on the diagonal, NaN for experts without a routed token)."""
        return self.alignment.matrix.detach().abs().cpu().numpy().astype(np.float64)

    def pairs(self) -> PairPoints:
        """The expert pairs i < j with both numbers (:class:`PairPoints`)."""
        i_P, j_P = np.triu_indices(self.n_experts, k=1)
        return PairPoints(i_P, j_P, self.distance_EE[i_P, j_P], self.alignment_EE[i_P, j_P])


def probe_asymmetry(model, x_ND: torch.Tensor, *, rank: int = RANK, n_draws: int = 12, n_splits: int = 6,
                    seed: int = 0, weighting: str = "gates", step: int = 0) -> AsymmetryProbe:
    """Trace ``model`` on ``x_ND`` and compute paper 2's two sides with their references (what the views draw).

    With the routing weights ``w_ne`` (``weighting``, default the gate values: under fully soft routing only gate
    weights give distinct subspaces, spec §2.7.3) and one generator seeded with ``seed`` for every random draw, in
    the order of :func:`~moewidgets.geometry.asymmetry.layer_asymmetry` (so its numbers are the same, less the
    co-selected cosines):

    * :func:`~moewidgets.geometry.bank_jacobian_alignment`: ``A_ij = cos_F(J̄_i, J̄_j)`` with
      ``J̄_e = Σ_n w_ne J_e(x_n) / Σ_n w_ne``, its Gaussian null and split-half ceiling;
    * :func:`~moewidgets.geometry.subspaces.trace_subspaces` (inputs, rank ``min(rank, D)``, experts with fewer than
      5·r routed tokens skipped) and :func:`~moewidgets.geometry.subspaces.compare_subspaces` (normalised geodesic,
      ``n_draws`` random-group and isotropic draws, ``n_splits`` split halves);
    * :func:`~moewidgets.geometry.asymmetry.asymmetry_summary`.

    Args:
        model: an MLP-MoE (one MoE layer, ``model.layer``).
        x_ND: (N, D) probe points.
        step: the training step, recorded in the result.

    >>> from moewidgets import MoEConfig, build_model
    >>> model = build_model(MoEConfig(n_experts=4, k=1, d_model=8, d_hidden=16))
    >>> p = probe_asymmetry(model, torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), rank=2)
    >>> p.distance_EE.shape, len(p.pairs().labels), p.comparison.metric
    ((4, 4), 6, 'geodesic')

    Chapter 2 (book/chapter2.ipynb).
    """
    t0 = time.perf_counter()
    with torch.no_grad():
        trace = trace_model(model, x_ND)
    p = probe_layer_asymmetry(model.layer.experts, trace, rank=rank, n_draws=n_draws, n_splits=n_splits, seed=seed,
                              weighting=weighting, step=step)
    p.wall_s = time.perf_counter() - t0          # tracing included
    return p


def probe_layer_asymmetry(experts, trace, *, rank: int = RANK, n_draws: int = 12, n_splits: int = 6, seed: int = 0,
                          weighting: str = "gates", step: int = 0) -> AsymmetryProbe:
    """Paper 2's two sides of one MoE layer from its routing ``trace`` (what :func:`probe_asymmetry` computes after
    tracing; the transformer dashboard calls it once per layer on the traces of
    :func:`~moewidgets.lm.trace_lm`).

    It is :func:`~moewidgets.geometry.asymmetry.layer_asymmetry` (``generator=seed``, rank ``min(rank, D)``,
    input subspaces, normalised geodesic distance) without the co-selected per-token cosines, timed.

    Args:
        experts: the layer's expert bank (``layer.experts``).
        trace: its :class:`~moewidgets.trace.RoutingTrace`, ``x_TD`` (T, D) with ``idx_TK``, ``gates_TK``.

    >>> from moewidgets import MoEConfig, build_model, trace_model
    >>> model = build_model(MoEConfig(n_experts=4, k=1, d_model=8, d_hidden=16))
    >>> trace = trace_model(model, torch.randn(200, 8, generator=torch.Generator().manual_seed(0)))
    >>> probe_layer_asymmetry(model.layer.experts, trace, rank=2, step=7).alignment_EE.shape
    (4, 4)

    Chapter 2 (book/chapter2.ipynb).
    """
    t0 = time.perf_counter()
    r = min(rank, int(trace.x_TD.shape[1]))
    with torch.no_grad():
        la = layer_asymmetry(experts, trace, weighting=weighting, rank=r, generator=seed, n_draws=n_draws,
                             n_splits=n_splits, coselected=False)
    return AsymmetryProbe(step=step, n_points=trace.n_tokens, rank=r, subspaces=la.subspaces,
                          comparison=la.comparison, alignment=la.alignment, summary=la.summary,
                          wall_s=time.perf_counter() - t0)


@dataclass
class AsymmetryTrack:
    """What the views draw for one run: the latest geometry pass, the cost of each pass, and a geometry error."""

    generation: int
    probe: AsymmetryProbe | None = None
    redraws: int = 0
    geometry_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Chapter2Views:
    """The bokeh side: every view, the caption Div and the layout."""

    caption: object
    distance: V.HeatmapView
    alignment: V.HeatmapView
    scatter: V.ScatterView
    loss: V.SeriesView
    layout: object

    @classmethod
    def build(cls, loss_label: str = "train MSE (per output)", ref_label: str | None = None) -> "Chapter2Views":
        """The views; the loss plot's y axis says ``loss_label``; ``ref_label`` names its dashed curve (None: no
        reference curve, its legend entry dropped)."""
        caption = V.build_caption("Functional vs representational geometry: waiting for the first probe")
        distance = V.build_heatmap_view("Routed input subspaces", "d̂_geo = ‖θ‖₂ / ((π/2)√r)", low=0.0, high=1.0)
        alignment = V.build_heatmap_view("Cross-expert Jacobian alignment", "|cos_F(J̄_i, J̄_j)|", low=0.0,
                                         high=1.0)
        scatter = V.build_scatter_view("Function vs representation, per expert pair",
                                       "Grassmann distance d̂_geo (routed inputs)", "|cos_F(J̄_i, J̄_j)|",
                                       x_span=(0.0, 1.0), y_span=(1e-3, 1.5), y_log=True,
                                       band_label="random-group null (95%)")
        loss = V.build_series_view("Training loss", loss_label, ref_label=ref_label or "reference",
                                   curve_label="model", y_log=True)
        if ref_label is None:
            legend = loss.figure.legend[0]
            legend.items = legend.items[:1]        # no reference run in this chapter: drop its legend entry
        for fig in (distance.figure, alignment.figure, scatter.figure, loss.figure):
            fig.width, fig.height = FIG_W, FIG_H
            fig.title.text_font_size = "10pt"
        caption.width = 2 * FIG_W + 40
        grid = gridplot([[distance.figure, alignment.figure], [scatter.figure, loss.figure]],
                        toolbar_location="right")
        return cls(caption, distance, alignment, scatter, loss, column(caption, grid))


def _fmt(x: float, spec: str = ".2f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _band(lo: float, hi: float) -> str:
    """'0.21–0.30', or '–' when the band is undefined (fewer than two experts with a subspace)."""
    return f"{lo:.2f}–{hi:.2f}" if math.isfinite(lo) and math.isfinite(hi) else "–"


def _short(reason: str) -> str:
    """'expert 3: 12 routed tokens < 5·rank=20 (rank=4; ...)' → 'expert 3: 12 routed tokens < 5·rank=20'."""
    return reason.split(" (")[0]


def draw_asymmetry(views: Chapter2Views, p: AsymmetryProbe) -> None:
    """Draw one :class:`AsymmetryProbe` on the distance and alignment heatmaps and the pair scatter of ``views``
    (fields picked, nothing computed), each titled with its references. Shared by both chapter-2 dashboards.

    >>> from moewidgets import MoEConfig, build_model
    >>> model = build_model(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16))
    >>> p = probe_asymmetry(model, torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), rank=2)
    >>> views = Chapter2Views.build()
    >>> draw_asymmetry(views, p)
    >>> len(views.distance.cells.data["value"]), views.distance.figure.title.text.startswith("Routed input")
    (16, True)

    Chapter 2 (book/chapter2.ipynb).
    """
    c, a, s = p.comparison, p.alignment, p.summary
    V.update_heatmap(views.distance, p.distance_EE,
                     title=f"Routed input subspaces (r={p.rank}): mean d̂_geo {_fmt(c.between_mean)}\n"
                           f"random-group null {_band(c.group_null_lo_mean, c.group_null_hi_mean)} · "
                           f"split-half floor {_fmt(c.floor_mean)} · isotropic {_fmt(c.iso_mean)}")
    V.update_heatmap(views.alignment, p.alignment_EE,
                     title=f"Jacobian alignment: mean |cos_F| {_fmt(a.mean_abs_offdiag, '.3f')}\n"
                           f"null {_fmt(a.null_level, '.3f')} (Gaussian, SD {_fmt(a.null_sd, '.3f')}) · "
                           f"split-half ceiling {_fmt(a.ceiling)}")
    pp = p.pairs()
    V.update_scatter(views.scatter, pp.distance, pp.alignment, pp.labels,
                     x_refs=[("split-half floor (x)", c.floor_mean), ("isotropic (x)", c.iso_mean)],
                     y_refs=[("alignment null (y)", a.null_level), ("split-half ceiling (y)", a.ceiling)],
                     x_band=(c.group_null_lo_mean, c.group_null_hi_mean),
                     title=f"Function vs representation, per expert pair\nfunctional "
                           f"{_fmt(s.functional_fraction)} · representational "
                           f"{_fmt(s.representational_fraction)} of the way to the same expert")


def describe_probe(p: AsymmetryProbe, points: str = "probe points") -> str:
    """The caption's geometry part: where it was probed, how, and which experts have no subspace (grey cells) or
    no routed token. ``points`` names the probed points ("probe points", "held-out tokens").

    >>> from moewidgets import MoEConfig, build_model
    >>> model = build_model(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16))
    >>> p = probe_asymmetry(model, torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), rank=2)
    >>> describe_probe(p)[:40]
    'geometry at step 0 on 200 probe points: '

    Chapter 2 (book/chapter2.ipynb).
    """
    text = (f"geometry at step {p.step} on {p.n_points} {points}: rank-{p.rank} gate-weighted PCA "
            f"of each expert's routed inputs; mean Jacobians weighted by the gates")
    skipped = [_short(r) for _, r in sorted(p.skipped.items())]
    dead = [e for e, d in enumerate(p.alignment.dead.tolist()) if d]
    if skipped:
        text += f" · no subspace (grey cells): {'; '.join(skipped)}"
    if dead:
        text += f" · no routed token, no mean Jacobian: expert{'s' if len(dead) > 1 else ''} " \
                f"{', '.join(map(str, dead))}"
    if not skipped and not dead:
        text += " · every expert has a subspace"
    return text


def both_sides(p: AsymmetryProbe) -> str:
    """The status summary's two sides with their references, 2 significant digits, e.g.
    ``d̂_geo 0.78 (random-group null 0.25, split-half floor 0.7, isotropic 0.81) · mean |cos_F| 0.055 (null 0.026,
    ceiling 0.99)``. Chapter 2 (book/chapter2.ipynb)."""
    c, a = p.comparison, p.alignment
    f2 = lambda x: _fmt(x, ".2g")   # noqa: E731
    return (f"d̂_geo {f2(c.between_mean)} (random-group null {f2(c.group_null_mean)}, split-half floor "
            f"{f2(c.floor_mean)}, isotropic {f2(c.iso_mean)}) · mean |cos_F| {f2(a.mean_abs_offdiag)} "
            f"(null {f2(a.null_level)}, ceiling {f2(a.ceiling)})")


class Chapter2Dashboard(DashboardBase):
    """Retrain an MLP-MoE live and redraw paper 2's functional and representational geometry (module docstring).

    Args:
        config: the starting run (default ``DEFAULT_RUN``: chapter 1's default run); Reset returns to it.
        autostart: start training at once (needs a running event loop, as in a Jupyter kernel).

    Knobs (attributes): ``redraw_s`` (at most one redraw per 0.2 s, plus the final one), ``geometry_every``
    (1: geometry at every redraw; N: every N-th, and always at the end), ``rank`` (4), ``n_draws`` (12
    random-group and isotropic draws) and ``n_splits`` (6 split halves).

    Accessors: ``config``, ``trainer``, ``probe`` (the last drawn :class:`AsymmetryProbe`), ``track`` (the
    :class:`AsymmetryTrack`), ``status``; ``run_sync()``, ``await wait()``, ``status_summary()``.
    """

    _describe = staticmethod(describe_run)

    def __init__(self, config: RunConfig | None = None, autostart: bool = True):
        self.track: AsymmetryTrack | None = None
        self.geometry_every = 1             # geometry at every N-th redraw (≈ 5% of a default retrain) and at the end
        self.rank, self.n_draws, self.n_splits = RANK, 12, 6
        self.views = Chapter2Views.build()
        super().__init__(config, autostart)

    def _default_config(self) -> RunConfig:
        return DEFAULT_RUN

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build_controls(self, wide: dict) -> list[W.Widget]:
        self.w_tau = W.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="temperature τ",
                                      style=wide, readout_format=".2g")
        return [self.w_tau]

    def _control_rows(self) -> list[W.Widget]:
        return [W.HBox([self.w_k, self.w_tau, self.w_experts]),
                W.HBox([self.w_aux, self.w_seed, self.w_reset, self.w_stop])]

    def _set_controls(self, run: RunConfig) -> None:
        log_tau = math.log10(run.model.temperature)
        self.w_tau.min, self.w_tau.max = min(-1, math.floor(log_tau)), max(1, math.ceil(log_tau))
        self.w_tau.value = run.model.temperature

    def _sync_enabled(self) -> None:
        self.w_k.max = self.w_experts.value         # k = E is fully soft routing

    def _config_from_widgets(self) -> RunConfig:
        """The run the widgets describe: the current config with the widget fields replaced (validated)."""
        m = self._config.model
        E = self.w_experts.value
        model = m.replace(n_experts=E, k=min(self.w_k.value, E), temperature=float(self.w_tau.value),
                          aux_weight=float(self.w_aux.value), seed=self.w_seed.value)
        return self._config.replace(model=model)

    def _check_loaded(self, run: RunConfig) -> str | None:
        m = run.model
        if m.arch != "moe":
            return f"config JSON: model.arch={m.arch!r} must be 'moe' here (a dense model has no experts to compare)"
        if m.n_experts < 2:
            return f"config JSON: model.n_experts={m.n_experts} must be >= 2 here (pairs of experts are compared)"
        return None

    # -- drawing -------------------------------------------------------------------------------------------------
    def _draw_chunk(self, st: RunState) -> None:
        """Redraw the loss at most every ``redraw_s`` seconds and at the end; the geometry every
        ``geometry_every``-th redraw and at the end."""
        tr = st.trainer
        if self.track is None or self.track.generation != st.generation:
            self.track = AsymmetryTrack(st.generation)
        t = self.track
        if not self._redraw_due(st, final=tr.done):
            return
        t.redraws += 1
        h = tr.history
        V.update_series(self.views.loss, h.step, [h.loss])
        if tr.done or t.redraws % self.geometry_every == 0:
            self._draw_geometry(st)
        self._write_caption(st)
        self._redrawn()                           # after the geometry: training always gets redraw_s between

    def _draw_geometry(self, st: RunState) -> None:
        """One geometry pass, drawn. A failure is reported in the caption; the last plots and the run go on."""
        tr, t, v = st.trainer, self.track, self.views
        try:
            p = probe_asymmetry(tr.model, tr.data.x_probe[:N_PROBE], rank=self.rank, n_draws=self.n_draws,
                                n_splits=self.n_splits, seed=st.run.model.seed, step=tr.steps_done)
        except Exception as exc:                   # never a traceback in a cell: say it, keep the plots
            log.exception("chapter 2 geometry failed")
            t.error = f"geometry failed at step {tr.steps_done}: {type(exc).__name__}: {exc}"
            return
        t.probe, t.error = p, None
        t.geometry_s.append(p.wall_s)
        draw_asymmetry(v, p)

    def _write_caption(self, st: RunState) -> None:
        tr, t = st.trainer, self.track
        m = st.run.model
        text = f"{describe_run(st.run)} at step {tr.steps_done}/{tr.cfg.steps} (gate {m.gate!r})"
        p = t.probe
        if p is None:
            text += " · geometry: waiting for the first probe (the plots show the previous run until then)"
        else:
            text += " · " + describe_probe(p)
        if t.error is not None:
            text += f" · {t.error} (last good geometry kept)"
        self.views.caption.text = html.escape(text)

    # -- accessors -----------------------------------------------------------------------------------------------
    @property
    def probe(self) -> AsymmetryProbe | None:
        """The latest run's last drawn geometry (None before its first pass)."""
        return self.track.probe if self.track is not None else None

    def _summary_extra(self) -> str:
        """Both sides with their references, 2 significant digits."""
        p = self.probe
        if p is None:
            return ""
        text = " · " + both_sides(p)
        if p.skipped:
            text += f" · {len(p.skipped)} expert{'s' if len(p.skipped) > 1 else ''} without a subspace"
        return text

    # -- display -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        m = self._config.model
        return f"Chapter2Dashboard({m.label}, τ={m.temperature:g}, α={m.aux_weight:g}, seed={m.seed})"
