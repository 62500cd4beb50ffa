"""Chapter 4's live dashboard: the Manifold Power Iteration router against the plain softmax router.

Router (softmax / MPI), power steps, C', top-k, experts, balancing weight and seed retrain an MLP-MoE live; the views
redraw each expert's router-to-singular-vector angle over the steps and now, the alignment score ψ per expert
(chapter 4; the paper calls its alignment metric λ), the experts' spectral gaps σ1/σ2, the batch MaxVio and the
loss. The dashed reference everywhere is the *plain router* run: the same config with
``router="softmax"``, trained in lockstep and cached (an MPI run is compared with it; a softmax run is its own
reference).

Data flows one way: widgets → :class:`~moewidgets.config.RunConfig` → :class:`~.runner.LiveRunner` (trainer) →
:func:`moewidgets.geometry.row_alignment` (on the bank's input-side weights and the router's effective rows) →
:mod:`moewidgets.views`. The alignment of E rows costs E small SVDs (well under a millisecond at widget sizes), so
it is recorded after every chunk of steps, on the loop.

>>> dash = Chapter4Dashboard(autostart=False)
>>> dash
Chapter4Dashboard(mpi, C'=1, 1 power step, top-2 of 8, α=0.01, seed=0)

Chapter 4 (book/chapter4.ipynb).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import ipywidgets as W
import numpy as np
from bokeh.layouts import column, gridplot

from .. import views as V
from ..config import MoEConfig, RunConfig
from ..geometry.mpi import RowAlignment, row_alignment
from ..nn.routers import input_side_weights
from .base import DashboardBase, draw_maxvio_and_loss, extend_maxvio
from .runner import RunState

__all__ = ["Chapter4Dashboard", "Chapter4Views", "AlignmentTrack", "plain_router", "describe_mpi_run",
           "DEFAULT_RUN"]

# The starting run: the chapter-1 default retrain with the MPI router, the official gate convention ("renorm":
# softmax over the selected logits) and a small Switch aux loss (the official MPI code computes one for both
# routers; α = 0.01 as in the claim runs).
DEFAULT_RUN = RunConfig(model=MoEConfig(router="mpi", gate="renorm", aux_weight=0.01))


def describe_mpi_run(run: RunConfig) -> str:
    """'mpi (C'=1, 1 power step) · top-2 of 8 · α=0.01 · seed 0' or 'softmax router · top-2 of 8 · ...'."""
    m = run.model
    if m.router == "mpi":
        steps = f"{m.mpi_steps} power step{'s' if m.mpi_steps != 1 else ''}"
        head = f"mpi (C'={m.mpi_scale:g}, {steps}{', W detached' if m.mpi_detach else ''})"
    else:
        head = f"{m.router} router"
    return " · ".join([head, m.label, f"α={m.aux_weight:g}", f"seed {m.seed}"])


def plain_router(run: RunConfig) -> RunConfig | None:
    """The reference of an MPI run: the same run with the plain softmax router (None for a non-MPI run)."""
    if run.model.router != "mpi":
        return None
    return run.replace(model=run.model.replace(router="softmax"))


def _alignment(trainer) -> RowAlignment:
    layer = trainer.model.layer
    return row_alignment(input_side_weights(layer.experts), layer.router.effective_rows_ED())


@dataclass
class AlignmentTrack:
    """What the views draw over steps, for one run: per step, the model's per-expert angles and the reference's
    mean angle, the batch MaxVio of both, and the latest alignments (``now``, ``ref_now``)."""

    generation: int
    step: list[int] = field(default_factory=list)
    angle_SE: list[list[float]] = field(default_factory=list)
    ref_step: list[int] = field(default_factory=list)
    ref_angle: list[float] = field(default_factory=list)
    now: RowAlignment | None = None
    ref_now: RowAlignment | None = None
    maxvio: list[float] = field(default_factory=list)       # batch MaxVio per step (model)
    ref_maxvio: list[float] = field(default_factory=list)   # batch MaxVio per step (plain router)


@dataclass
class Chapter4Views:
    """The bokeh side: every view, the caption Div and the layout."""

    caption: object
    angles: V.SeriesView
    angle_now: V.BarsView
    lam: V.BarsView
    gap: V.BarsView
    maxvio: V.SeriesView
    loss: V.SeriesView
    layout: object

    @classmethod
    def build(cls) -> "Chapter4Views":
        caption = V.build_caption("Router-to-singular-vector alignment: waiting for the first steps")
        angles = V.build_series_view("Angle of router row to v1", "angle(R'_i, v1_i) in degrees",
                                     ref_label="plain router (mean)")
        angle_now = V.build_bars_view("Angle to v1 now", "degrees (0 = aligned, 90 = orthogonal)",
                                      ref_label="plain router (mean)")
        lam = V.build_bars_view("Alignment ψ per expert", "ψ = ‖W r‖² / (‖r‖² σ1²)",
                                ref_label="plain router (mean)")
        gap = V.build_bars_view("Expert spectral gap", "σ1 / σ2 of W_in (GELU) or W_gate (SwiGLU)",
                                ref_label="plain-router model (mean)")
        maxvio = V.build_series_view("Load imbalance", "MaxVio (batch) = max load / mean − 1",
                                     ref_label="plain router", curve_label="model")
        loss = V.build_series_view("Training loss", "train MSE (per output)", ref_label="plain router",
                                   curve_label="model", y_log=True)
        angles.figure.y_range.start, angles.figure.y_range.end = 0, 90
        grid = gridplot([[angles.figure, angle_now.figure, lam.figure],
                         [gap.figure, maxvio.figure, loss.figure]], toolbar_location="right")
        return cls(caption, angles, angle_now, lam, gap, maxvio, loss, column(caption, grid))


class Chapter4Dashboard(DashboardBase):
    """Retrain an MLP-MoE with the MPI (or plain) router live and redraw the router–expert alignment.

    Args:
        config: the starting run (default ``DEFAULT_RUN``: E=8, k=2, D=32, m=64, MPI with C'=1 and one power
            step, gate "renorm", α=0.01, 400 steps); Reset returns to it.
        autostart: start training at once (needs a running event loop, as in a Jupyter kernel).

    Accessors: ``config``, ``trainer``, ``reference`` (the plain-router trainer or None), ``track`` (the
    :class:`AlignmentTrack` drawn), ``status``; ``run_sync()``, ``await wait()``, ``status_summary()``.
    """

    _describe = staticmethod(describe_mpi_run)
    _reference_of = staticmethod(plain_router)

    def __init__(self, config: RunConfig | None = None, autostart: bool = True):
        self.track: AlignmentTrack | None = None
        self.views = Chapter4Views.build()
        super().__init__(config, autostart)

    def _default_config(self) -> RunConfig:
        return DEFAULT_RUN

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build_controls(self, wide: dict) -> list[W.Widget]:
        self.w_router = W.ToggleButtons(options=["softmax", "mpi"], value="mpi", description="router",
                                        style={**wide, "button_width": "72px"},
                                        tooltips=["plain linear softmax router", "Manifold Power Iteration router"])
        self.w_steps = W.IntSlider(value=1, min=1, max=10, description="power steps", style=wide)
        self.w_scale = W.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="C'",
                                        style=wide, readout_format=".2g")
        return [self.w_router, self.w_steps, self.w_scale]

    def _control_rows(self) -> list[W.Widget]:
        return [W.HBox([self.w_router, self.w_steps, self.w_scale]),
                W.HBox([self.w_k, self.w_experts, self.w_aux]),
                W.HBox([self.w_seed, self.w_reset, self.w_stop])]

    def _set_controls(self, run: RunConfig) -> None:
        m = run.model
        self.w_router.value = "mpi" if m.router == "mpi" else "softmax"
        self.w_steps.max = max(10, m.mpi_steps)
        self.w_steps.value = m.mpi_steps
        log_c = math.log10(m.mpi_scale)
        self.w_scale.min, self.w_scale.max = min(-1, math.floor(log_c)), max(1, math.ceil(log_c))
        self.w_scale.value = m.mpi_scale

    def _sync_enabled(self) -> None:
        mpi = self.w_router.value == "mpi"
        self.w_steps.disabled = self.w_scale.disabled = not mpi
        self.w_k.max = self.w_experts.value

    def _config_from_widgets(self) -> RunConfig:
        """The run the widgets describe: the current config with the widget fields replaced (validated)."""
        m = self._config.model
        E = self.w_experts.value
        model = m.replace(router=self.w_router.value, mpi_steps=int(self.w_steps.value),
                          mpi_scale=float(self.w_scale.value), n_experts=E, k=min(self.w_k.value, E),
                          aux_weight=float(self.w_aux.value), seed=self.w_seed.value)
        return self._config.replace(model=model)

    def _check_loaded(self, run: RunConfig) -> str | None:
        if run.model.arch != "moe":
            return (f"config JSON: model.arch={run.model.arch!r} must be 'moe' here (a dense model "
                    "has no router to align)")
        return None

    # -- drawing -------------------------------------------------------------------------------------------------
    def _draw_chunk(self, st: RunState) -> None:
        """Record the alignment of the model (and of the plain-router reference) after every chunk; redraw the
        views at most every ``redraw_s`` seconds and at the end (serialising growing curves costs more than a
        chunk of training at widget sizes)."""
        tr, ref = st.trainer, st.reference
        if self.track is None or self.track.generation != st.generation:
            self.track = AlignmentTrack(st.generation)
        t = self.track
        t.now = _alignment(tr)
        t.step.append(tr.steps_done)
        t.angle_SE.append(t.now.angle_deg.tolist())
        if ref is not None:
            t.ref_now = _alignment(ref)
            if not t.ref_step or ref.steps_done > t.ref_step[-1]:
                t.ref_step.append(ref.steps_done)
                t.ref_angle.append(float(t.ref_now.angle_deg.mean()))
        extend_maxvio(t, tr, ref)
        if not self._redraw_due(st, final=tr.done and (ref is None or ref.done)):
            return
        self._redrawn()
        v = self.views
        angle_ES = np.asarray(t.angle_SE).T
        r = t.ref_now if ref is not None else t.now            # a plain run is its own reference
        ref_steps, ref_angle = (t.ref_step, t.ref_angle) if ref is not None else (
            t.step, np.asarray(t.angle_SE).mean(1))
        V.update_series(v.angles, t.step, angle_ES, ref_steps, ref_angle)
        V.update_bars(v.angle_now, t.now.angle_deg, float(r.angle_deg.mean()))
        V.update_bars(v.lam, t.now.lam, float(r.lam.mean()))
        V.update_bars(v.gap, t.now.gap, float(r.gap.mean()))
        draw_maxvio_and_loss(v, t, tr, ref)
        m = st.run.model
        ref_text = ("dashed = the same model with the plain softmax router" if ref is not None else
                    "the plain router is its own reference")
        v.caption.text = (f"{html.escape(describe_mpi_run(st.run))} at step {tr.steps_done}/{tr.cfg.steps} · "
                          f"mean angle to v1 {t.now.angle_deg.mean():.0f}° · mean ψ {t.now.lam.mean():.2f}"
                          f" (plain router {r.lam.mean():.2f}) · E={m.n_experts} · {ref_text} · "
                          f"v1 = top right-singular vector of the expert's input-side matrix")

    # -- accessors -----------------------------------------------------------------------------------------------
    @property
    def reference(self):
        """The plain-router trainer of the latest run (None for a plain run)."""
        return self.runner.state.reference if self.runner.state else None

    def _summary_extra(self) -> str:
        """The mean alignment ψ and angle to v1 of the model (and of the plain router), 2 significant digits."""
        text = ""
        t = self.track
        if t is not None and t.now is not None:
            text += f" · mean ψ {float(t.now.lam.mean()):.2g}, mean angle to v1 {float(t.now.angle_deg.mean()):.2g}°"
            if t.ref_now is not None:
                text += (f" (plain router: ψ {float(t.ref_now.lam.mean()):.2g}, "
                         f"{float(t.ref_now.angle_deg.mean()):.2g}°)")
        return text

    # -- display -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        m = self._config.model
        if m.router == "mpi":
            steps = f"{m.mpi_steps} power step{'s' if m.mpi_steps != 1 else ''}"
            head = f"mpi, C'={m.mpi_scale:g}, {steps}"
        else:
            head = m.router
        return f"Chapter4Dashboard({head}, {m.label}, α={m.aux_weight:g}, seed={m.seed})"
