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
import json
import math
import time
from dataclasses import dataclass

import ipywidgets as W
import numpy as np
from bokeh.layouts import column, gridplot
from jupyter_bokeh.widgets import BokehModel

from .. import views as V
from ..config import MoEConfig, RunConfig
from ..geometry import Chapter1Probes, chapter1_probes
from ..train import trace_model
from .runner import LiveRunner, RunState, describe_run

__all__ = ["Chapter1Dashboard", "Chapter1Views", "ProbePair", "dense_baseline", "bokehjs_loader", "AUX_WEIGHTS",
           "N_PROBE"]

AUX_WEIGHTS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # the load-balancing slider: log steps, and 0 (off)
N_PROBE = 512                                      # probe points the geometry views use


_BOKEHJS: W.Output | None = None


def bokehjs_loader() -> W.Output:
    """A hidden Output widget (one per kernel) that loads BokehJS (core + widgets, inline, ≈ 1.6 MB) into the page.

    Why: jupyter_bokeh's ``BokehModel`` view calls ``window.Bokeh.require`` when it is created, and its lab extension
    does not ship BokehJS. ``output_notebook(INLINE)`` would put megabytes of JS into the cell's outputs (and so
    into the committed notebook). Here the script lives in the Output widget's state, sent over the widget comm, and
    a guard skips it when BokehJS is already loaded. It must be displayed *before* the dashboard (two outputs, in
    order) so that the script has run when the BokehModel view is built.
    """
    global _BOKEHJS
    if _BOKEHJS is None:
        from bokeh.embed.bundle import bundle_for_objs_and_resources
        from bokeh.io.notebook import LOAD_MIME_TYPE
        from bokeh.resources import Resources

        bundle = bundle_for_objs_and_resources(None, Resources(mode="inline", components=["bokeh", "bokeh-widgets"]))
        sources = json.dumps(bundle.js_raw).replace("</", "<\\/")    # a JS array literal of the sources
        js = (f"if (typeof window.Bokeh === 'undefined') {{ for (const src of {sources}) {{ "
              "const s = document.createElement('script'); s.textContent = src; document.head.appendChild(s); } }")
        _BOKEHJS = W.Output(layout=W.Layout(display="none"))
        data = {LOAD_MIME_TYPE: js, "application/javascript": js}    # jupyter_bokeh's renderer, else plain JS
        _BOKEHJS.outputs = ({"output_type": "display_data", "metadata": {}, "data": data},)
    return _BOKEHJS


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


class Chapter1Dashboard:
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

    def __init__(self, config: RunConfig | None = None, autostart: bool = True):
        self._initial = config if config is not None else RunConfig()
        self._config = self._initial
        self._syncing = False               # True while code (not the user) sets widget values
        self._dense_probes: dict[tuple[str, int], Chapter1Probes] = {}   # (dense config, step) → probes
        self.views = Chapter1Views.build()
        self.runner = LiveRunner(on_status=self._show_status, on_chunk=self._draw_chunk,
                                 probe=self._probe, on_probes=self._draw_probes,
                                 reference_of=dense_baseline, describe=describe_run)
        self._build_widgets()
        self._set_widgets(self._initial)
        self._show_status(f"ready: {describe_run(self._initial)}")
        if autostart:
            self.runner.request(self._initial, delay=0.0)

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build_widgets(self) -> None:
        wide = {"description_width": "initial"}
        self.w_routing = W.ToggleButtons(options=["dense", "top-k", "soft"], value="top-k", description="routing",
                                         style={**wide, "button_width": "64px"},
                                         tooltips=["parameter-matched dense FFN (hidden E·m)",
                                                   "softmax top-k routing", "fully soft routing (k = E)"])
        self.w_k = W.IntSlider(value=2, min=1, max=8, description="k", style=wide)
        self.w_tau = W.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="temperature τ",
                                      style=wide, readout_format=".2g")
        self.w_experts = W.IntSlider(value=8, min=2, max=16, description="experts E", style=wide)
        self.w_aux = W.SelectionSlider(options=[(f"{a:g}", a) for a in AUX_WEIGHTS], value=0.0,
                                       description="balance α", style=wide)
        self.w_seed = W.IntText(value=0, description="seed", style=wide, layout=W.Layout(width="120px"))
        self.w_reset = W.Button(description="Reset", tooltip="back to the starting config")
        self.w_stop = W.Button(description="Stop", tooltip="stop training; the plots stay")
        self.w_json = W.Textarea(rows=14, layout=W.Layout(width="520px"))
        self.w_load = W.Button(description="Load", tooltip="train the config in the text box")
        self.w_status = W.HTML(layout=W.Layout(width="100%"))
        for w in (self.w_routing, self.w_k, self.w_tau, self.w_experts, self.w_aux, self.w_seed):
            w.observe(self._on_widget, names="value")
        self.w_reset.on_click(lambda _: self.load(self._initial))
        self.w_stop.on_click(lambda _: self.runner.stop())
        self.w_load.on_click(lambda _: self.load_json(self.w_json.value))
        config_box = W.Accordion(children=[W.VBox([self.w_json, self.w_load])], titles=("config (JSON)",),
                                 selected_index=None)
        self.widget = W.VBox([
            W.HBox([self.w_routing, self.w_k, self.w_tau]),
            W.HBox([self.w_experts, self.w_aux, self.w_seed, self.w_reset, self.w_stop]),
            config_box,
            self.w_status,
            # combine_events: the page echoes every applied patch back to the kernel; combining them while the
            # kernel is busy keeps that backlog from delaying slider messages (measured: 1371 echoes per run).
            BokehModel(self.views.layout, combine_events=True),
        ])

    def _set_widgets(self, run: RunConfig) -> None:
        """Show ``run`` on the widgets (ranges widen for values a slider cannot show) without triggering runs."""
        m = run.model
        self._syncing = True
        try:
            self.w_experts.min = min(2, m.n_experts)
            self.w_experts.max = max(16, m.n_experts)
            self.w_experts.value = m.n_experts
            self.w_k.max = m.n_experts
            self.w_k.value = m.k
            self.w_routing.value = "dense" if m.arch != "moe" else ("soft" if m.is_soft else "top-k")
            log_tau = math.log10(m.temperature)
            self.w_tau.min, self.w_tau.max = min(-1, math.floor(log_tau)), max(1, math.ceil(log_tau))
            self.w_tau.value = m.temperature
            values = sorted(set(AUX_WEIGHTS) | {m.aux_weight})
            self.w_aux.options = [(f"{a:g}", a) for a in values]
            self.w_aux.value = m.aux_weight
            self.w_seed.value = m.seed
            self.w_k.disabled = self.w_routing.value != "top-k"
            self.w_json.value = run.to_json(indent=1)
        finally:
            self._syncing = False

    def _config_from_widgets(self) -> RunConfig:
        """The run the widgets describe: the current config with the widget fields replaced (validated)."""
        m = self._config.model
        E, routing = self.w_experts.value, self.w_routing.value
        k = E if routing == "soft" else min(self.w_k.value, E)
        arch = "moe" if routing != "dense" else (m.arch if m.arch != "moe" else "dense")
        model = m.replace(n_experts=E, k=k, temperature=float(self.w_tau.value), aux_weight=float(self.w_aux.value),
                          seed=self.w_seed.value, arch=arch)
        return self._config.replace(model=model)

    def _on_widget(self, change) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:   # k's range follows E; k only applies to top-k routing
            self.w_k.max = self.w_experts.value
            self.w_k.disabled = self.w_routing.value != "top-k"
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
        """Load a RunConfig from JSON text (the Load button). Bad JSON or values → status line error, nothing
        recomputed, the plots stay. Returns True if it loaded."""
        try:
            run = RunConfig.from_json(text)
        except json.JSONDecodeError as exc:
            self.runner.fail(f"config JSON is not valid JSON: {exc}")
            return False
        except (ValueError, TypeError, AttributeError) as exc:
            self.runner.fail(f"config JSON: {exc}")
            return False
        self.load(run)
        return True

    # -- drawing -------------------------------------------------------------------------------------------------
    def _show_status(self, text: str) -> None:
        color = "#b00020" if text.startswith("error") else "#222"
        st = self.runner.state if hasattr(self, "runner") else None
        timing = ""     # the live loop's own timings, as a tooltip and data attributes (the browser test reads them)
        if st is not None and math.isfinite(st.timings.fire_to_first_redraw_s):
            first_ms, rate = 1e3 * st.timings.fire_to_first_redraw_s, st.timings.redraws_per_s
            timing = (f' data-first-redraw-ms="{first_ms:.0f}" data-redraws-per-s="{rate:.1f}" title="first redraw '
                      f'{first_ms:.0f} ms after the debounce fired · {rate:.1f} redraws/s"')
        self.w_status.value = (f'<div class="moewidgets-status"{timing} style="font-family: monospace; '
                               f'color: {color}">{html.escape(text)}</div>')

    def _draw_chunk(self, st: RunState) -> None:
        """Loss and load after every chunk."""
        h, ref = st.trainer.history, st.reference
        if ref is not None:
            V.update_loss(self.views.loss, h.step, h.loss, ref.history.step, ref.history.loss)
        else:
            V.update_loss(self.views.loss, h.step, h.loss, [], [])
        recent = [load for load in h.load[-20:] if load]
        load_E = np.mean(recent, axis=0) if recent else np.ones(1)
        V.update_bars(self.views.load, load_E, ref=1.0 / len(load_E))

    def _probe(self, st: RunState) -> ProbePair:
        """Probe the model and its dense baseline (the baseline's probes are cached once it has finished)."""
        t0 = time.perf_counter()
        seed, x_TD = st.run.model.seed, st.trainer.data.x_probe[:N_PROBE]
        model = chapter1_probes(st.trainer.model.layer.experts, trace_model(st.trainer.model, x_TD), generator=seed)
        ref, dense = st.reference, None
        if ref is not None:
            key = (dense_baseline(st.run).to_json(), ref.steps_done)
            dense = self._dense_probes.get(key)
            if dense is None:
                dense = chapter1_probes(ref.model.layer.experts, trace_model(ref.model, x_TD), generator=seed)
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
    def config(self) -> RunConfig:
        """The last valid run the widgets asked for."""
        return self._config

    @property
    def trainer(self):
        """The latest run's :class:`~moewidgets.train.Trainer` (None before the first run)."""
        return self.runner.state.trainer if self.runner.state else None

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
    def status(self) -> str:
        """The status line as plain text."""
        return self.runner.status

    @property
    def timings(self):
        """The latest run's :class:`~.runner.RunTimings`."""
        return self.runner.state.timings if self.runner.state else None

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
        """A rounded summary that does not depend on the thread count (for notebook outputs that nbval compares):
        'top-2 of 8 · τ=1 · α=0 · seed 0 — 400/400 steps · final train MSE 0.031 · done'."""
        st = self.runner.state
        if st is None:
            return f"{describe_run(self._config)} — not trained yet"
        tr = st.trainer
        loss = tr.history.loss[-1] if tr.history.loss else math.nan
        text = f"{describe_run(st.run)} — {tr.steps_done}/{tr.cfg.steps} steps · final train MSE {loss:.2g}"
        return f"{text} · {st.phase}" if st.phase != "error" else f"{text} · error: {st.error}"

    # -- display -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        m = self._config.model
        return f"Chapter1Dashboard({m.label}, τ={m.temperature}, α={m.aux_weight:g}, seed={m.seed})"

    def _repr_mimebundle_(self, include=None, exclude=None):
        """The widget view, with this object's short repr as text/plain (the VBox's own repr embeds the
        BokehModel's document, uuids and all, which nbval could never match)."""
        bundle = self.widget._repr_mimebundle_()
        bundle["text/plain"] = repr(self)
        return bundle

    def _ipython_display_(self) -> None:
        """Two outputs: the BokehJS loader (a widget view only, no text), then the dashboard (its short repr as
        text/plain). The loader comes first so BokehJS is in the page before the BokehModel view is built."""
        from IPython.display import display
        loader = bokehjs_loader()._repr_mimebundle_()
        del loader["text/plain"]
        display(loader, raw=True)
        display(self._repr_mimebundle_(), raw=True)
