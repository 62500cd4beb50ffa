"""Chapter 1's live dashboard: routing, k, temperature, E, load balancing and seed retrain an MLP-MoE live, and the
expert Jacobian spectra, σ_1 and effective-rank bars, H-out PCA, cross-expert alignment, loss and load redraw.

Data flows one way: widgets → :class:`~moewidgets.config.RunConfig` → :class:`~.runner.LiveRunner` (trainer) →
``trace_model`` → :func:`moewidgets.geometry.chapter1_probes` → :mod:`moewidgets.views`. This module computes no
geometry itself; it only picks fields of the probe results for the views.

The dashed reference in every geometry view is the parameter-matched dense baseline (one FFN of hidden width E·m,
same task, seed and schedule), trained in lockstep with the first run that needs it and cached by its config.

>>> dash = Chapter1Dashboard(autostart=False)
>>> dash
Chapter1Dashboard(top-2 of 8, τ=1.0, α=0, seed=0)

Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass

import ipywidgets as W
import numpy as np
from bokeh.layouts import column, gridplot

from .. import views as V
from ..config import MoEConfig, RunConfig
from ..geometry import Chapter1Probes, chapter1_probes
from ..train import trace_model
from .base import AUX_WEIGHTS, DashboardBase, bokehjs_loader
from .runner import RunState, describe_run

__all__ = ["Chapter1Dashboard", "Chapter1Views", "ProbePair", "dense_baseline", "bokehjs_loader", "AUX_WEIGHTS",
           "N_PROBE", "N_PROBE_LIVE"]

N_PROBE = 512                                      # probe points of the final probes (what the views end on)
N_PROBE_LIVE = 128                                 # probe points of the probes while training (steps 100, 200, …)


def dense_baseline(run: RunConfig) -> RunConfig | None:
    """The parameter-matched dense baseline of an MoE run (hidden width E·m, same task, seed and schedule);
    None when the run is itself dense."""
    m = run.model
    if m.arch != "moe":
        return None
    dense = MoEConfig(n_experts=m.n_experts, k=1, d_model=m.d_model, d_hidden=m.d_hidden, expert=m.expert,
                      seed=m.seed, arch="dense")
    return run.replace(model=dense)


@dataclass
class ProbePair:
    """Probes of the model and of its dense baseline (None: the model is dense) at one step."""

    model: Chapter1Probes
    dense: Chapter1Probes | None
    step: int
    dense_step: int
    wall_s: float


@dataclass
class Chapter1Views:
    """The bokeh side of the dashboard: every view, the caption Div and the one layout they sit in."""

    caption: object
    loss: V.LossView
    load: V.BarsView
    align: V.HeatmapView
    spectra: V.SpectraView
    sigma1: V.BarsView
    erank: V.BarsView
    pca: V.PCAView
    layout: object

    @classmethod
    def build(cls) -> "Chapter1Views":
        caption = V.build_caption("Geometry: waiting for the first probes (every 100 steps and at the end)")
        loss = V.build_loss_view("Training loss")
        load = V.build_bars_view("Expert load (last chunk)", "fraction of (token, slot) assignments",
                                 ref_label="uniform 1/E")
        align = V.build_heatmap_view("Jacobian alignment", "cos_F(J̄_i, J̄_j)", low=-1.0, high=1.0)
        spectra = V.build_spectra_view("Expert Jacobian spectra")
        sigma1 = V.build_bars_view("Leading singular value", "σ_1 of J (routing-weighted mean)")
        erank = V.build_bars_view("Jacobian effective rank", "erank(σ) = exp(−Σ p log p), p = σ/Σσ")
        pca = V.build_pca_view("PCA of expert outputs")
        grid = gridplot([[loss.figure, load.figure, align.figure],
                         [spectra.figure, sigma1.figure, erank.figure],
                         [pca.figure, None, None]], toolbar_location="right")
        return cls(caption, loss, load, align, spectra, sigma1, erank, pca, column(caption, grid))


def _fmt(x: float, spec: str = ".2f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


class Chapter1Dashboard(DashboardBase):
    """Retrain chapter 1's MLP-MoE live from sliders and redraw its geometry (module docstring).

    Args:
        config: the starting run (default: the chapter-1 default retrain, E=8, k=2, D=32, m=64, batch 256,
            400 steps); Reset returns to it.
        autostart: start training it at once (needs a running event loop, as in a Jupyter kernel).

    Accessors: ``config`` (the run the widgets describe), ``trainer``, ``probes`` / ``dense_probes`` (the last
    drawn :class:`~moewidgets.geometry.Chapter1Probes`), ``status`` (the status line as text), ``timings``.
    ``run_sync()`` trains synchronously, ``await wait()`` awaits the live run, ``status_summary()`` is a
    rounded summary for notebooks.
    """

    _describe = staticmethod(describe_run)
    _reference_of = staticmethod(dense_baseline)
    _status_timings = True
    redraw_s = 0.1      # loss, load and status line ≈ 7 times a second (each is a comm message the page applies)

    def __init__(self, config: RunConfig | None = None, autostart: bool = True):
        self._dense_probes: dict[tuple[str, int, int], Chapter1Probes] = {}   # (dense config, step, points) →
        self.n_probe_live = N_PROBE_LIVE     # probe points while training (N_PROBE: always all of them)
        self.views = Chapter1Views.build()
        super().__init__(config, autostart)

    def _runner_hooks(self) -> dict:
        return {"probe": self._probe, "on_probes": self._draw_probes}

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build_controls(self, wide: dict) -> list[W.Widget]:
        self.w_routing = W.ToggleButtons(options=["dense", "top-k", "soft"], value="top-k", description="routing",
                                         style={**wide, "button_width": "64px"},
                                         tooltips=["parameter-matched dense FFN (hidden E·m)",
                                                   "softmax top-k routing", "fully soft routing (k = E)"])
        self.w_tau = W.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="temperature τ",
                                      style=wide, readout_format=".2g")
        return [self.w_routing, self.w_tau]

    def _control_rows(self) -> list[W.Widget]:
        return [W.HBox([self.w_routing, self.w_k, self.w_tau]),
                W.HBox([self.w_experts, self.w_aux, self.w_seed, self.w_reset, self.w_stop])]

    def _set_controls(self, run: RunConfig) -> None:
        m = run.model
        self.w_routing.value = "dense" if m.arch != "moe" else ("soft" if m.is_soft else "top-k")
        log_tau = math.log10(m.temperature)
        self.w_tau.min, self.w_tau.max = min(-1, math.floor(log_tau)), max(1, math.ceil(log_tau))
        self.w_tau.value = m.temperature

    def _sync_enabled(self) -> None:
        """k's range follows E; k only applies to top-k routing."""
        self.w_k.max = self.w_experts.value
        self.w_k.disabled = self.w_routing.value != "top-k"

    def _config_from_widgets(self) -> RunConfig:
        """The run the widgets describe: the current config with the widget fields replaced (validated)."""
        m = self._config.model
        E, routing = self.w_experts.value, self.w_routing.value
        k = E if routing == "soft" else min(self.w_k.value, E)
        arch = "moe" if routing != "dense" else (m.arch if m.arch != "moe" else "dense")
        model = m.replace(n_experts=E, k=k, temperature=float(self.w_tau.value), aux_weight=float(self.w_aux.value),
                          seed=self.w_seed.value, arch=arch)
        return self._config.replace(model=model)

    # -- drawing -------------------------------------------------------------------------------------------------
    def _draw_chunk(self, st: RunState) -> bool:
        """Loss and load: the first chunk of a run, then at most every ``redraw_s`` seconds, and at the end.
        Returns False when the redraw was skipped (the runner counts only real redraws)."""
        ref = st.reference
        if not self._redraw_due(st, final=st.trainer.done and (ref is None or ref.done)):
            return False
        h = st.trainer.history
        if ref is not None:
            V.update_loss(self.views.loss, h.step, h.loss, ref.history.step, ref.history.loss)
        else:
            V.update_loss(self.views.loss, h.step, h.loss, [], [])
        recent = [load for load in h.load[-20:] if load]
        load_E = np.mean(recent, axis=0) if recent else np.ones(1)
        V.update_bars(self.views.load, load_E, ref=1.0 / len(load_E))
        self._redrawn()
        return True

    def _probe(self, st: RunState) -> ProbePair:
        """Probe the model and its dense baseline (the baseline's probes are cached once it has finished).

        While training the probes use the first ``n_probe_live`` (``N_PROBE_LIVE`` = 128) probe points (about a
        third of the cost, and the picture moves anyway); the final probes, and a finished baseline's, use all
        ``N_PROBE`` = 512. Computes only (it runs in the runner's worker thread): no widget or bokeh object is
        touched here."""
        t0 = time.perf_counter()
        seed, x_all = st.run.model.seed, st.trainer.data.x_probe
        n = N_PROBE if st.trainer.done else self.n_probe_live
        x_TD = x_all[:n]
        model = chapter1_probes(st.trainer.model.layer.experts, trace_model(st.trainer.model, x_TD), generator=seed)
        ref, dense = st.reference, None
        if ref is not None:
            n_ref = N_PROBE if ref.done else n
            key = (dense_baseline(st.run).to_json(), ref.steps_done, n_ref)
            dense = self._dense_probes.get(key)
            if dense is None:
                dense = chapter1_probes(ref.model.layer.experts, trace_model(ref.model, x_all[:n_ref]),
                                        generator=seed)
                if ref.done:
                    self._dense_probes[key] = dense
        return ProbePair(model, dense, st.trainer.steps_done, ref.steps_done if ref else st.trainer.steps_done,
                         time.perf_counter() - t0)

    def _draw_probes(self, st: RunState, pp: ProbePair) -> None:
        """Spectra, σ_1 and erank bars, PCA and alignment from one :class:`ProbePair` (fields picked, nothing
        computed)."""
        p = pp.model
        d = pp.dense if pp.dense is not None else p     # a dense run is its own reference
        v = self.views
        V.update_spectra(v.spectra, p.spectra.ratios, d.spectra.ratios[0])
        V.update_bars(v.sigma1, p.spectra.sigma1, d.sigma1)
        V.update_bars(v.erank, p.spectra.erank, d.erank_sv)
        V.update_pca(v.pca, p.pca.eigenvalues, d.pca.eigenvalues[0])
        a = p.alignment
        V.update_heatmap(v.align, a.matrix, f"alignment {_fmt(a.mean_abs_offdiag)} "
                                            f"(null {_fmt(a.null_level)}, ceiling {_fmt(a.ceiling)})")
        m = st.run.model
        dense_text = ("the model is dense: it is its own reference" if pp.dense is None else
                      f"dashed = dense baseline, hidden E·m={m.n_experts * m.d_hidden} (step {pp.dense_step})")
        v.caption.text = (
            f"Geometry of {html.escape(m.label)} (E={p.n_experts}) at step {pp.step}/{st.trainer.cfg.steps}"
            f" on {p.n_points} probe points · {dense_text} · alignment = mean |cos_F(J̄_i, J̄_j)| over i&lt;j, "
            f"null = independent Gaussian matrices, ceiling = same expert on split halves")

    # -- accessors -----------------------------------------------------------------------------------------------
    @property
    def probes(self) -> Chapter1Probes | None:
        """The model's last drawn probes."""
        st = self.runner.state
        return st.probes.model if st is not None and st.probes is not None else None

    @property
    def dense_probes(self) -> Chapter1Probes | None:
        """The dense baseline's last drawn probes (None for a dense run)."""
        st = self.runner.state
        return st.probes.dense if st is not None and st.probes is not None else None

    @property
    def timings(self):
        """The latest run's :class:`~.runner.RunTimings`."""
        return self.runner.state.timings if self.runner.state else None

    # -- display -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        m = self._config.model
        return f"Chapter1Dashboard({m.label}, τ={m.temperature}, α={m.aux_weight:g}, seed={m.seed})"
