"""Chapter 4's live dashboard: the Manifold Power Iteration router against the plain softmax router.

Router (softmax / MPI), power steps, C', top-k, experts, balancing weight and seed retrain an MLP-MoE live; the views
redraw each expert's router-to-singular-vector angle over the steps and now, λ per expert, the experts' spectral gaps
σ1/σ2, the batch MaxVio and the loss. The dashed reference everywhere is the *plain router* run: the same config with
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
import json
import math
import time
from dataclasses import dataclass, field

import ipywidgets as W
import numpy as np
import torch
from bokeh.layouts import column, gridplot
from jupyter_bokeh.widgets import BokehModel

from .. import views as V
from ..balance import max_violation
from ..config import MoEConfig, RunConfig
from ..geometry.mpi import RowAlignment, row_alignment
from ..nn.routers import input_side_weights
from .chapter1 import AUX_WEIGHTS, bokehjs_loader
from .runner import LiveRunner, RunState

__all__ = ["Chapter4Dashboard", "Chapter4Views", "AlignmentTrack", "plain_router", "describe_mpi_run",
           "DEFAULT_RUN"]

# The starting run: the chapter-1 default retrain with the MPI router, the official gate convention ("renorm":
# softmax over the selected logits) and a small Switch aux loss (spec §2.11.6).
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
        lam = V.build_bars_view("Alignment λ per expert", "λ = ‖W r‖² / (‖r‖² σ1²)",
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


class Chapter4Dashboard:
    """Retrain an MLP-MoE with the MPI (or plain) router live and redraw the router–expert alignment.

    Args:
        config: the starting run (default :data:`DEFAULT_RUN`: E=8, k=2, D=32, m=64, MPI with C'=1 and one power
            step, gate "renorm", α=0.01, 400 steps); Reset returns to it.
        autostart: start training at once (needs a running event loop, as in a Jupyter kernel).

    Accessors: ``config``, ``trainer``, ``reference`` (the plain-router trainer or None), ``track`` (the
    :class:`AlignmentTrack` drawn), ``status``; ``run_sync()``, ``await wait()``, ``status_summary()``.
    """

    def __init__(self, config: RunConfig | None = None, autostart: bool = True):
        self._initial = config if config is not None else DEFAULT_RUN
        self._config = self._initial
        self._syncing = False
        self.track: AlignmentTrack | None = None
        self.redraw_s = 0.2                 # at most 5 redraws per second (plus the final one)
        self.redraws = 0
        self._drawn_at = -math.inf
        self.views = Chapter4Views.build()
        self.runner = LiveRunner(on_status=self._show_status, on_chunk=self._draw_chunk,
                                 reference_of=plain_router, describe=describe_mpi_run)
        self._build_widgets()
        self._set_widgets(self._initial)
        self._show_status(f"ready: {describe_mpi_run(self._initial)}")
        if autostart:
            self.runner.request(self._initial, delay=0.0)

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build_widgets(self) -> None:
        wide = {"description_width": "initial"}
        self.w_router = W.ToggleButtons(options=["softmax", "mpi"], value="mpi", description="router",
                                        style={**wide, "button_width": "72px"},
                                        tooltips=["plain linear softmax router", "Manifold Power Iteration router"])
        self.w_steps = W.IntSlider(value=1, min=1, max=10, description="power steps", style=wide)
        self.w_scale = W.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="C'",
                                        style=wide, readout_format=".2g")
        self.w_k = W.IntSlider(value=2, min=1, max=8, description="k", style=wide)
        self.w_experts = W.IntSlider(value=8, min=2, max=16, description="experts E", style=wide)
        self.w_aux = W.SelectionSlider(options=[(f"{a:g}", a) for a in AUX_WEIGHTS], value=0.01,
                                       description="balance α", style=wide)
        self.w_seed = W.IntText(value=0, description="seed", style=wide, layout=W.Layout(width="120px"))
        self.w_reset = W.Button(description="Reset", tooltip="back to the starting config")
        self.w_stop = W.Button(description="Stop", tooltip="stop training; the plots stay")
        self.w_json = W.Textarea(rows=14, layout=W.Layout(width="520px"))
        self.w_load = W.Button(description="Load", tooltip="train the config in the text box")
        self.w_status = W.HTML(layout=W.Layout(width="100%"))
        for w in (self.w_router, self.w_steps, self.w_scale, self.w_k, self.w_experts, self.w_aux, self.w_seed):
            w.observe(self._on_widget, names="value")
        self.w_reset.on_click(lambda _: self.load(self._initial))
        self.w_stop.on_click(lambda _: self.runner.stop())
        self.w_load.on_click(lambda _: self.load_json(self.w_json.value))
        config_box = W.Accordion(children=[W.VBox([self.w_json, self.w_load])], titles=("config (JSON)",),
                                 selected_index=None)
        self.widget = W.VBox([
            W.HBox([self.w_router, self.w_steps, self.w_scale]),
            W.HBox([self.w_k, self.w_experts, self.w_aux]),
            W.HBox([self.w_seed, self.w_reset, self.w_stop]),
            config_box,
            self.w_status,
            BokehModel(self.views.layout, combine_events=True),
        ])

    def _set_widgets(self, run: RunConfig) -> None:
        """Show ``run`` on the widgets without triggering runs (ranges widen for values a slider cannot show)."""
        m = run.model
        self._syncing = True
        try:
            self.w_experts.min, self.w_experts.max = min(2, m.n_experts), max(16, m.n_experts)
            self.w_experts.value = m.n_experts
            self.w_k.max = m.n_experts
            self.w_k.value = m.k
            self.w_router.value = "mpi" if m.router == "mpi" else "softmax"
            self.w_steps.max = max(10, m.mpi_steps)
            self.w_steps.value = m.mpi_steps
            log_c = math.log10(m.mpi_scale)
            self.w_scale.min, self.w_scale.max = min(-1, math.floor(log_c)), max(1, math.ceil(log_c))
            self.w_scale.value = m.mpi_scale
            values = sorted(set(AUX_WEIGHTS) | {m.aux_weight})
            self.w_aux.options = [(f"{a:g}", a) for a in values]
            self.w_aux.value = m.aux_weight
            self.w_seed.value = m.seed
            self._sync_enabled()
            self.w_json.value = run.to_json(indent=1)
        finally:
            self._syncing = False

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

    def _on_widget(self, change) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self._sync_enabled()
        finally:
            self._syncing = False
        try:
            run = self._config_from_widgets()
        except ValueError as exc:
            self.runner.fail(str(exc))
            return
        self._start(run)

    def _start(self, run: RunConfig) -> None:
        self._config = run
        self._syncing = True
        try:
            self.w_json.value = run.to_json(indent=1)
        finally:
            self._syncing = False
        self.runner.request(run)

    def load(self, run: RunConfig) -> None:
        """Show ``run`` on the widgets and retrain it."""
        self._set_widgets(run)
        self._start(run)

    def load_json(self, text: str) -> bool:
        """Load a RunConfig from JSON (the Load button). Bad JSON or values → status-line error, plots kept."""
        try:
            run = RunConfig.from_json(text)
        except json.JSONDecodeError as exc:
            self.runner.fail(f"config JSON is not valid JSON: {exc}")
            return False
        except (ValueError, TypeError, AttributeError) as exc:
            self.runner.fail(f"config JSON: {exc}")
            return False
        if run.model.arch != "moe":
            self.runner.fail(f"config JSON: model.arch={run.model.arch!r} must be 'moe' here (a dense model "
                             "has no router to align)")
            return False
        self.load(run)
        return True

    # -- drawing -------------------------------------------------------------------------------------------------
    def _show_status(self, text: str) -> None:
        color = "#b00020" if text.startswith("error") else "#222"
        self.w_status.value = (f'<div class="moewidgets-status" style="font-family: monospace; color: {color}">'
                               f"{html.escape(text)}</div>")

    def _draw_chunk(self, st: RunState) -> None:
        """Record the alignment of the model (and of the plain-router reference) after every chunk; redraw the
        views at most every ``redraw_s`` seconds and at the end (serialising growing curves costs more than a
        chunk of training at widget sizes)."""
        tr, ref = st.trainer, st.reference
        if self.track is None or self.track.generation != st.generation:
            self.track = AlignmentTrack(st.generation)
            self._drawn_at = -math.inf
        t = self.track
        t.now = _alignment(tr)
        t.step.append(tr.steps_done)
        t.angle_SE.append(t.now.angle_deg.tolist())
        if ref is not None:
            t.ref_now = _alignment(ref)
            if not t.ref_step or ref.steps_done > t.ref_step[-1]:
                t.ref_step.append(ref.steps_done)
                t.ref_angle.append(float(t.ref_now.angle_deg.mean()))
        t.maxvio.extend(max_violation(torch.tensor(ld)) if ld else 0.0 for ld in tr.history.load[len(t.maxvio):])
        if ref is not None:
            t.ref_maxvio.extend(max_violation(torch.tensor(ld)) for ld in ref.history.load[len(t.ref_maxvio):])
        now = time.perf_counter()
        if now - self._drawn_at < self.redraw_s and not (tr.done and (ref is None or ref.done)):
            return
        self._drawn_at = now
        self.redraws += 1
        v = self.views
        angle_ES = np.asarray(t.angle_SE).T
        r = t.ref_now if ref is not None else t.now            # a plain run is its own reference
        ref_steps, ref_angle = (t.ref_step, t.ref_angle) if ref is not None else (
            t.step, np.asarray(t.angle_SE).mean(1))
        V.update_series(v.angles, t.step, angle_ES, ref_steps, ref_angle)
        V.update_bars(v.angle_now, t.now.angle_deg, float(r.angle_deg.mean()))
        V.update_bars(v.lam, t.now.lam, float(r.lam.mean()))
        V.update_bars(v.gap, t.now.gap, float(r.gap.mean()))
        h = tr.history
        if ref is not None:
            rh = ref.history
            V.update_series(v.maxvio, h.step, [t.maxvio], rh.step, t.ref_maxvio)
            V.update_series(v.loss, h.step, [h.loss], rh.step, rh.loss)
        else:
            V.update_series(v.maxvio, h.step, [t.maxvio])
            V.update_series(v.loss, h.step, [h.loss])
        m = st.run.model
        ref_text = ("dashed = the same model with the plain softmax router" if ref is not None else
                    "the plain router is its own reference")
        v.caption.text = (f"{html.escape(describe_mpi_run(st.run))} at step {tr.steps_done}/{tr.cfg.steps} · "
                          f"mean angle to v1 {t.now.angle_deg.mean():.0f}° · mean λ {t.now.lam.mean():.2f}"
                          f" (plain router {r.lam.mean():.2f}) · E={m.n_experts} · {ref_text} · "
                          f"v1 = top right-singular vector of the expert's input-side matrix")

    # -- accessors -----------------------------------------------------------------------------------------------
    @property
    def config(self) -> RunConfig:
        """The last valid run the widgets asked for."""
        return self._config

    @property
    def trainer(self):
        """The latest run's :class:`~moewidgets.train.Trainer` (None before the first run)."""
        return self.runner.state.trainer if self.runner.state else None

    @property
    def reference(self):
        """The plain-router trainer of the latest run (None for a plain run)."""
        return self.runner.state.reference if self.runner.state else None

    @property
    def status(self) -> str:
        """The status line as plain text."""
        return self.runner.status

    def run_sync(self, config: RunConfig | None = None) -> RunState:
        """Train ``config`` (default: the widgets' run) to the end now, drawing as it goes (tests, scripts)."""
        if config is not None:
            self._set_widgets(config)
            self._config = config
        return self.runner.run_sync(self._config)

    async def wait(self) -> RunState | None:
        """Await the live run (and anything queued)."""
        return await self.runner.wait()

    def stop(self) -> None:
        """Stop training (the Stop button)."""
        self.runner.stop()

    def status_summary(self) -> str:
        """A rounded summary for notebook outputs (2 significant digits, independent of the thread count)."""
        st = self.runner.state
        if st is None:
            return f"{describe_mpi_run(self._config)} — not trained yet"
        tr = st.trainer
        loss = tr.history.loss[-1] if tr.history.loss else math.nan
        text = f"{describe_mpi_run(st.run)} — {tr.steps_done}/{tr.cfg.steps} steps · final train MSE {loss:.2g}"
        t = self.track
        if t is not None and t.now is not None:
            text += f" · mean λ {float(t.now.lam.mean()):.2g}, mean angle to v1 {float(t.now.angle_deg.mean()):.2g}°"
            if t.ref_now is not None:
                text += (f" (plain router: λ {float(t.ref_now.lam.mean()):.2g}, "
                         f"{float(t.ref_now.angle_deg.mean()):.2g}°)")
        return f"{text} · {st.phase}" if st.phase != "error" else f"{text} · error: {st.error}"

    # -- display -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        m = self._config.model
        if m.router == "mpi":
            steps = f"{m.mpi_steps} power step{'s' if m.mpi_steps != 1 else ''}"
            head = f"mpi, C'={m.mpi_scale:g}, {steps}"
        else:
            head = m.router
        return f"Chapter4Dashboard({head}, {m.label}, α={m.aux_weight:g}, seed={m.seed})"

    def _repr_mimebundle_(self, include=None, exclude=None):
        """The widget view, with this object's short repr as text/plain."""
        bundle = self.widget._repr_mimebundle_()
        bundle["text/plain"] = repr(self)
        return bundle

    def _ipython_display_(self) -> None:
        """Two outputs: the BokehJS loader (widget view only), then the dashboard (short repr as text/plain)."""
        from IPython.display import display
        loader = bokehjs_loader()._repr_mimebundle_()
        del loader["text/plain"]
        display(loader, raw=True)
        display(self._repr_mimebundle_(), raw=True)
