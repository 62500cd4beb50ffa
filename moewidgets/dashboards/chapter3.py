"""Chapter 3's live dashboard: router–expert coupling, load balancing and the online K-Means router.

Router (learned softmax / K-Means), aux weight α (log steps and 0), loss-free rate γ, top-k, experts and seed
retrain an MLP-MoE live; the views redraw the router-row cosine matrix (the coupling-similarity view), each router
row against every expert's routed centroid, the batch MaxVio over the steps, the per-expert loads and the loss.
When any balancing is on, the dashed reference is the same run with no balancing at all (α = 0, γ = 0), trained
in lockstep: what the knob changed.

Data flows one way: widgets → :class:`~moewidgets.config.RunConfig` → :class:`~.runner.LiveRunner` (trainer) →
:mod:`moewidgets.geometry.coupling` (on the router's effective rows and a fixed probe batch) → :mod:`moewidgets.views`.

>>> dash = Chapter3Dashboard(autostart=False)
>>> dash
Chapter3Dashboard(softmax, top-2 of 8, α=0.01, γ=0, seed=0)

Chapter 3 (book/chapter3.ipynb).
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

import ipywidgets as W
import torch
from bokeh.layouts import column, gridplot

from .. import views as V
from ..balance import expert_counts, load_stats
from ..config import MoEConfig, RunConfig, TaskConfig
from ..geometry.coupling import CentroidMatching, RowSimilarity, centroid_matching, router_row_similarity
from .base import DashboardBase, draw_maxvio_and_loss, extend_maxvio
from .runner import RunState

__all__ = ["Chapter3Dashboard", "Chapter3Views", "CouplingTrack", "no_balancing", "describe_balancing_run",
           "DEFAULT_RUN", "LF_RATES"]

# The chapter-3 setting at live size: SwiGLU experts, gate "renorm", inputs with a shared offset, α = 0.01.
DEFAULT_RUN = RunConfig(model=MoEConfig(expert="swiglu", gate="renorm", aux_weight=0.01),
                        task=TaskConfig(offset=0.5))
LF_RATES = (0.0, 1e-4, 1e-3, 1e-2)      # the loss-free slider (papers: 1e-3)
PROBE_TOKENS = 512                      # the fixed batch the centroid view routes


def describe_balancing_run(run: RunConfig) -> str:
    """'softmax router · top-2 of 8 · α=0.01 · γ=0 · seed 0' (K-Means: 'k-means router (ema β=0.05)')."""
    m = run.model
    head = (f"k-means router ({m.kmeans_mode}{f' β={m.kmeans_rate:g}' if m.kmeans_mode == 'ema' else ''})"
            if m.router == "kmeans" else f"{m.router} router")
    return " · ".join([head, m.label, f"α={m.aux_weight:g}", f"γ={m.lf_rate:g}", f"seed {m.seed}"])


def no_balancing(run: RunConfig) -> RunConfig | None:
    """The reference of a balanced run: the same run with α = 0 and γ = 0 (None when nothing is balanced)."""
    m = run.model
    if m.aux_weight == 0 and m.lf_rate == 0 and m.z_weight == 0:
        return None
    return run.replace(model=m.replace(aux_weight=0.0, lf_rate=0.0, z_weight=0.0))


@dataclass
class CouplingTrack:
    """What the views draw for one run: batch MaxVio per step (model and reference) and the latest geometry."""

    generation: int
    maxvio: list[float] = field(default_factory=list)
    ref_maxvio: list[float] = field(default_factory=list)
    similarity: RowSimilarity | None = None
    ref_similarity: RowSimilarity | None = None
    matching: CentroidMatching | None = None


@dataclass
class Chapter3Views:
    """The bokeh side: every view, the caption Div and the layout."""

    caption: object
    rows: V.HeatmapView
    centroids: V.HeatmapView
    maxvio: V.SeriesView
    load: V.BarsView
    loss: V.SeriesView
    layout: object

    @classmethod
    def build(cls) -> "Chapter3Views":
        caption = V.build_caption("Router–expert coupling: waiting for the first steps")
        rows = V.build_heatmap_view("Router-row cosines", "cos(r_i, r_j)", low=-1.0, high=1.0)
        centroids = V.build_heatmap_view("Router row vs routed centroid", "cos(r_i, mean x→j)", low=-1.0, high=1.0)
        centroids.figure.xaxis.axis_label = "routed centroid of expert j"
        centroids.figure.yaxis.axis_label = "router row i"
        maxvio = V.build_series_view("Load imbalance", "MaxVio (batch) = max load / mean − 1",
                                     ref_label="no balancing", curve_label="model")
        load = V.build_bars_view("Load per expert (probe batch)", "fraction of assignments", ref_label="uniform 1/E")
        loss = V.build_series_view("Training loss", "train MSE (per output)", ref_label="no balancing",
                                   curve_label="model", y_log=True)
        grid = gridplot([[rows.figure, centroids.figure, load.figure],
                         [maxvio.figure, loss.figure, None]], toolbar_location="right")
        return cls(caption, rows, centroids, maxvio, load, loss, column(caption, grid))


def _similarity(trainer) -> RowSimilarity:
    return router_row_similarity(trainer.model.layer.router.effective_rows_ED())


class Chapter3Dashboard(DashboardBase):
    """Retrain an MLP-MoE with a learned or a K-Means router and any balancing, live, and redraw the coupling views.

    Args:
        config: the starting run (default ``DEFAULT_RUN``: E=8, k=2, D=32, m=64 SwiGLU experts, gate "renorm",
            softmax router with α=0.01, inputs with a shared offset, 400 steps); Reset returns to it.
        autostart: start training at once (needs a running event loop, as in a Jupyter kernel).

    Accessors: ``config``, ``trainer``, ``reference`` (the no-balancing trainer or None), ``track`` (the
    :class:`CouplingTrack` drawn), ``status``; ``run_sync()``, ``await wait()``, ``status_summary()``.
    """

    _describe = staticmethod(describe_balancing_run)
    _reference_of = staticmethod(no_balancing)

    def __init__(self, config: RunConfig | None = None, autostart: bool = True):
        self.track: CouplingTrack | None = None
        self.views = Chapter3Views.build()
        super().__init__(config, autostart)

    def _default_config(self) -> RunConfig:
        return DEFAULT_RUN

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build_controls(self, wide: dict) -> list[W.Widget]:
        self.w_router = W.ToggleButtons(options=[("softmax", "softmax"), ("k-means", "kmeans")], value="softmax",
                                        description="router", style={**wide, "button_width": "72px"},
                                        tooltips=["learned linear softmax router",
                                                  "parameter-free online K-Means router (cosine to running means)"])
        self.w_lf = W.SelectionSlider(options=[(f"{g:g}", g) for g in LF_RATES], value=0.0,
                                      description="loss-free γ", style=wide)
        return [self.w_router, self.w_lf]

    def _control_rows(self) -> list[W.Widget]:
        return [W.HBox([self.w_router, self.w_aux, self.w_lf]),
                W.HBox([self.w_k, self.w_experts, self.w_seed]),
                W.HBox([self.w_reset, self.w_stop])]

    def _set_controls(self, run: RunConfig) -> None:
        m = run.model
        self.w_router.value = "kmeans" if m.router == "kmeans" else "softmax"
        values = sorted(set(LF_RATES) | {m.lf_rate})
        self.w_lf.options = [(f"{g:g}", g) for g in values]
        self.w_lf.value = m.lf_rate

    def _sync_enabled(self) -> None:
        self.w_k.max = self.w_experts.value

    def _config_from_widgets(self) -> RunConfig:
        """The run the widgets describe: the current config with the widget fields replaced (validated)."""
        m = self._config.model
        E = self.w_experts.value
        model = m.replace(router=self.w_router.value, n_experts=E, k=min(self.w_k.value, E),
                          aux_weight=float(self.w_aux.value), lf_rate=float(self.w_lf.value), seed=self.w_seed.value)
        return self._config.replace(model=model)

    def _check_loaded(self, run: RunConfig) -> str | None:
        if run.model.arch != "moe":
            return f"config JSON: model.arch={run.model.arch!r} must be 'moe' here (a dense model has no router)"
        if run.model.router == "mpi":
            return "config JSON: model.router='mpi' belongs to chapter 4's dashboard; use 'softmax' or 'kmeans' here"
        return None

    # -- drawing -------------------------------------------------------------------------------------------------
    def _draw_chunk(self, st: RunState) -> None:
        """Record the batch MaxVio of every step; redraw at most every ``redraw_s`` seconds and at the end."""
        tr, ref = st.trainer, st.reference
        if self.track is None or self.track.generation != st.generation:
            self.track = CouplingTrack(st.generation)
        t = self.track
        extend_maxvio(t, tr, ref)
        if not self._redraw_due(st, final=tr.done and (ref is None or ref.done)):
            return
        self._redrawn()
        layer = tr.model.layer
        with torch.no_grad():
            t.similarity = _similarity(tr)
            t.ref_similarity = _similarity(ref) if ref is not None else None
            x_ND = tr.data.x_probe[:PROBE_TOKENS]
            layer.eval()
            try:
                idx_NK = layer.route(x_ND).idx_TK
            finally:
                layer.train()
            loads = load_stats(expert_counts(idx_NK, layer.n_experts))
            live = sum(c > 0 for c in loads.counts)
            t.matching = centroid_matching(layer.router.effective_rows_ED(), x_ND, idx_NK) if live >= 2 else None
        v, m = self.views, st.run.model
        sim = t.similarity
        V.update_heatmap(v.rows, sim.cos_EE, title=f"Router-row cosines: S_abs {sim.abs:.2f}, S_signed "
                                                   f"{sim.signed:+.2f}" + (f" (no balancing: S_abs "
                                                                           f"{t.ref_similarity.abs:.2f})"
                                                                           if t.ref_similarity else ""))
        if t.matching is not None:
            cm = t.matching
            V.update_heatmap(v.centroids, cm.cos_EE.nan_to_num(0.0),
                             title=f"Router row vs routed centroid: matched {cm.matched:.2f}, others "
                                   f"{cm.unmatched:.2f}")
        V.update_bars(v.load, loads.fractions, 1.0 / layer.n_experts)
        draw_maxvio_and_loss(v, t, tr, ref)
        dead = f" · dead experts {loads.dead}" if loads.dead else " · no dead expert"
        ref_text = "dashed = the same run with no balancing" if ref is not None else "no balancing on"
        v.caption.text = (f"{html.escape(describe_balancing_run(st.run))} at step {tr.steps_done}/{tr.cfg.steps} · "
                          f"MaxVio (probe batch) {loads.maxvio:.2f}{dead} · E={m.n_experts} · {ref_text} · "
                          f"rows = {'K-Means centroids' if m.router == 'kmeans' else 'learned router rows'}")

    # -- accessors -----------------------------------------------------------------------------------------------
    @property
    def reference(self):
        """The no-balancing trainer of the latest run (None when no balancing is on)."""
        return self.runner.state.reference if self.runner.state else None

    def _summary_extra(self) -> str:
        """Row similarity and the last batch MaxVio, 2 significant digits."""
        t = self.track
        if t is None or t.similarity is None:
            return ""
        text = f" · S_abs {t.similarity.abs:.2g}"
        if t.ref_similarity is not None:
            text += f" (no balancing {t.ref_similarity.abs:.2g})"
        if t.maxvio:
            text += f" · MaxVio last 50 steps {sum(t.maxvio[-50:]) / len(t.maxvio[-50:]):.2g}"
        return text

    # -- display -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        m = self._config.model
        return f"Chapter3Dashboard({m.router}, {m.label}, α={m.aux_weight:g}, γ={m.lf_rate:g}, seed={m.seed})"
