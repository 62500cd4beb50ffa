"""What every chapter's live dashboard shares: :class:`DashboardBase` (the :class:`~.runner.LiveRunner` wiring,
the widgets every chapter has, the config ⇄ JSON box, the status line, the public accessors and the notebook
display), :func:`bokehjs_loader` and :func:`one_patch`.

A chapter's dashboard subclasses :class:`DashboardBase` and defines only what differs: its own controls
(``_build_controls``, ``_control_rows``, ``_set_controls``, ``_sync_enabled``), ``_config_from_widgets``, the
drawing callbacks, the reference run (``_reference_of``), the run description (``_describe``), the summary's
extra text and its short repr.
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import json
import math
import time
from typing import Any, Callable, ClassVar

import ipywidgets as W
import torch
from jupyter_bokeh.widgets import BokehModel

from .. import views as V
from ..balance import max_violation
from ..config import RunConfig
from .runner import LiveRunner, RunState, describe_run

__all__ = ["DashboardBase", "bokehjs_loader", "one_patch", "patch_message", "AUX_WEIGHTS", "extend_maxvio",
           "draw_maxvio_and_loss", "JS_MIME"]

AUX_WEIGHTS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # the load-balancing slider: log steps, and 0 (off)


JS_MIME = "application/javascript"      # what Voila's pages render (JupyterLab: jupyter_bokeh's own loader type)
_BOKEHJS: dict[tuple[str, ...], W.Output] = {}


def bokehjs_loader(mimes: tuple[str, ...] | None = None) -> W.Output:
    """A hidden Output widget (one per kernel and ``mimes``) that loads BokehJS (core + widgets, inline, ≈ 1.6 MB)
    into the page.

    Why: jupyter_bokeh's ``BokehModel`` view calls ``window.Bokeh.require`` when it is created, and its lab extension
    does not ship BokehJS. ``output_notebook(INLINE)`` would put megabytes of JS into the cell's outputs (and so
    into the committed notebook). Here the script lives in the Output widget's state, sent over the widget comm, and
    a guard skips it when BokehJS is already loaded. It must be displayed *before* the dashboard (two outputs, in
    order) so that the script has run when the BokehModel view is built.

    ``mimes``: the mime types the script is sent under. By default two, because the front ends differ: JupyterLab
    renders jupyter_bokeh's loader type, Voila's pages only ``JS_MIME = "application/javascript"`` (measured: with
    the loader type alone a Voila page had no BokehJS). A page that knows its front end sends one copy, half the
    bytes: the classroom app passes ``(JS_MIME,)``.
    """
    from bokeh.io.notebook import LOAD_MIME_TYPE
    mimes = (LOAD_MIME_TYPE, JS_MIME) if mimes is None else tuple(mimes)
    if mimes not in _BOKEHJS:
        from bokeh.embed.bundle import bundle_for_objs_and_resources
        from bokeh.resources import Resources

        bundle = bundle_for_objs_and_resources(None, Resources(mode="inline", components=["bokeh", "bokeh-widgets"]))
        sources = json.dumps(bundle.js_raw).replace("</", "<\\/")    # a JS array literal of the sources
        js = (f"if (typeof window.Bokeh === 'undefined') {{ for (const src of {sources}) {{ "
              "const s = document.createElement('script'); s.textContent = src; document.head.appendChild(s); } }")
        loader = W.Output(layout=W.Layout(display="none"))
        loader.outputs = ({"output_type": "display_data", "metadata": {}, "data": dict.fromkeys(mimes, js)},)
        _BOKEHJS[mimes] = loader
    return _BOKEHJS[mimes]


def patch_message(events: list):
    """One bokeh ``PATCH-DOC`` message holding ``events`` (all of one document), arrays inline (base64) instead of
    as separate buffers: what ``bokeh.protocol.messages.patch_doc.create`` builds, with a non-deferred serializer."""
    from bokeh.core.serialization import Serializer
    from bokeh.document.json import PatchJson
    from bokeh.protocol.messages.patch_doc import patch_doc
    doc = events[0].document
    serializer = Serializer(references=doc.models.synced_references, deferred=False)
    content = PatchJson(events=serializer.encode(events))
    doc.models.flush_synced(lambda model: not serializer.has_ref(model))
    return patch_doc(patch_doc.create_header(), {}, content)


def _send_patch(bokeh: BokehModel, events: list) -> None:
    """Send ``events`` to the page as one message, framed as jupyter_bokeh frames one (header, metadata, content;
    no buffers): the page's BokehModel view reassembles it and applies every event in order."""
    msg = patch_message(events)
    for part in (msg.header_json, msg.metadata_json, msg.content_json):
        bokeh.send({"msg": "patch", "payload": part})


@contextlib.contextmanager
def one_patch(bokeh: BokehModel):
    """Within the block, collect the bokeh document's changes and send them to the page as one message at the end.

    Why: jupyter_bokeh sends every document event on its own, as 3 comm messages plus 2 per data array; one redraw
    of chapter 1 changes a dozen properties and arrays, and a k move sent 530 messages of 0.2–0.4 KB, each parsed,
    relayed by the server and applied by the page, on the two cores that also train. Here a redraw is one patch of 3
    messages, its arrays inline (:func:`patch_message`): a chapter-1 k move sends 42. Uses jupyter_bokeh's receiver
    hook (``_document_patched``, the method its document dispatches to); changes the page itself made (``setter`` is
    the widget) are not echoed, as jupyter_bokeh does. Nested blocks send once, at the end of the outermost.

    >>> from bokeh.plotting import figure
    >>> fig = figure(); widget = BokehModel(fig); sent = []
    >>> widget.send = lambda content, buffers=None: sent.append(content)
    >>> with one_patch(widget):
    ...     fig.title.text, fig.width = "a", 300
    >>> len(sent)                                     # header, metadata, content: two events in one patch
    3
    >>> [e["kind"] for e in json.loads(sent[2]["payload"])["events"]]
    ['ModelChanged', 'ModelChanged']
    """
    if "_document_patched" in vars(bokeh):                  # already collecting: the outer block sends
        yield
        return
    events: list = []
    bokeh._document_patched = lambda event: None if event.setter is bokeh else events.append(event)
    try:
        yield
    finally:
        del bokeh._document_patched
        if events:
            _send_patch(bokeh, events)


def extend_maxvio(track, trainer, reference) -> None:
    """Append the batch MaxVio (max load / mean load − 1; 0 for a step without loads) of every step not yet
    recorded: the run's to ``track.maxvio``, its reference's (if any) to ``track.ref_maxvio``. Chapters 3 and 4."""
    runs = [(trainer, track.maxvio)] + ([(reference, track.ref_maxvio)] if reference is not None else [])
    for tr, out in runs:
        out.extend(max_violation(torch.tensor(ld)) if ld else 0.0 for ld in tr.history.load[len(out):])


def draw_maxvio_and_loss(views, track, trainer, reference) -> None:
    """Redraw ``views.maxvio`` (from ``track``, see :func:`extend_maxvio`) and ``views.loss`` over steps: the run
    solid and, when there is one, its reference dashed. Chapters 3 and 4."""
    h = trainer.history
    if reference is None:
        V.update_series(views.maxvio, h.step, [track.maxvio])
        V.update_series(views.loss, h.step, [h.loss])
        return
    rh = reference.history
    V.update_series(views.maxvio, h.step, [track.maxvio], rh.step, track.ref_maxvio)
    V.update_series(views.loss, h.step, [h.loss], rh.step, rh.loss)


class DashboardBase:
    """A live dashboard: widgets → :class:`~moewidgets.config.RunConfig` → :class:`~.runner.LiveRunner` → views.

    Args:
        config: the starting run (default: the subclass's ``_default_config()``); Reset returns to it.
        autostart: start training it at once (needs a running event loop, as in a Jupyter kernel).

    Widgets every dashboard has: ``w_experts``, ``w_k``, ``w_aux``, ``w_seed``, ``w_reset``, ``w_stop``,
    ``w_json`` (the config as JSON), ``w_load`` and ``w_status``; ``widget`` is the whole layout.

    Subclasses set ``views`` (an object with a bokeh ``layout``) and their own state before calling
    ``super().__init__``, and define ``_build_controls`` (their own widgets), ``_control_rows`` (the rows above
    the JSON box), ``_set_controls``, ``_sync_enabled``, ``_config_from_widgets``, ``_draw_chunk`` and
    ``__repr__``; optionally ``_runner_hooks`` (probe callbacks), ``_check_loaded`` and ``_summary_extra``.
    """

    _describe: ClassVar[Callable[[RunConfig], str]] = staticmethod(describe_run)
    _reference_of: ClassVar[Callable[[RunConfig], RunConfig | None]] = staticmethod(lambda run: None)
    _status_timings: ClassVar[bool] = False    # the status line carries the live loop's timings as attributes
    _config_class: ClassVar[type] = RunConfig  # what load_json parses (any config with from_json / to_json)
    _runner_class: ClassVar[type[LiveRunner]] = LiveRunner   # a subclass may word the status line its own way
    _loss_label: ClassVar[str] = "train MSE"   # the loss in status_summary

    views: Any

    loader_mimes: tuple[str, ...] | None = None   # BokehJS's mime types (bokehjs_loader); None: every front end
    redraw_s: float = 0.2      # at most 5 redraws per second (plus the final one): serialising growing curves
                               # costs more than a chunk of training at widget sizes

    def __init__(self, config: RunConfig | None = None, autostart: bool = True):
        self.redraws = 0                    # redraws done (all runs)
        self._drawn_at = -math.inf          # when the last redraw finished
        self._drawn_generation = -1         # the run it belonged to
        self._initial = config if config is not None else self._default_config()
        self._config = self._initial
        self._syncing = False               # True while code (not the user) sets widget values
        hooks = self._runner_hooks()
        if "on_probes" in hooks:
            hooks["on_probes"] = self._one_patch(hooks["on_probes"])
        self.runner = self._runner_class(on_status=self._show_status, on_chunk=self._one_patch(self._draw_chunk),
                                         reference_of=self._reference_of, describe=self._describe, **hooks)
        self._build_widgets()
        self._set_widgets(self._initial)
        self._show_status(f"ready: {self._describe(self._initial)}")
        if autostart:
            self.runner.request(self._initial, delay=0.0)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _default_config(self) -> RunConfig:
        return RunConfig()

    def _runner_hooks(self) -> dict[str, Any]:
        """Extra :class:`~.runner.LiveRunner` callbacks (``probe``, ``on_probes``, ``make_trainer``)."""
        return {}

    def _moe_of(self, run):
        """The :class:`~moewidgets.config.MoEConfig` inside a run config (``run.model`` for a RunConfig)."""
        return run.model

    def _build_controls(self, wide: dict) -> list[W.Widget]:
        """Create the chapter's own widgets; return them (each one retrains on change)."""
        return []

    def _control_rows(self) -> list[W.Widget]:
        """The rows of controls above the JSON box."""
        raise NotImplementedError

    def _set_controls(self, run: RunConfig) -> None:
        """Show ``run`` on the chapter's own widgets (called while syncing)."""

    def _sync_enabled(self) -> None:
        """Make ranges and enabled states follow the other widgets (called while syncing)."""

    def _config_from_widgets(self) -> RunConfig:
        raise NotImplementedError

    def _check_loaded(self, run: RunConfig) -> str | None:
        """A status-line error for a valid config the dashboard cannot show (None: fine)."""
        return None

    def _draw_chunk(self, st: RunState) -> None:
        raise NotImplementedError

    def _summary_extra(self) -> str:
        """Text appended to the status summary before the phase."""
        return ""

    def _one_patch(self, draw: Callable[..., Any]) -> Callable[..., Any]:
        """``draw`` sending its bokeh changes to the page as one message (:func:`one_patch`)."""
        def drawn_as_one_patch(*args: Any) -> Any:
            with one_patch(self.widget.children[-1]):
                return draw(*args)
        return drawn_as_one_patch

    def _redraw_due(self, st: RunState, final: bool) -> bool:
        """True when the views should be redrawn now: the first chunk of a new run, ``final``, or ``redraw_s``
        after the last redraw. Counts the redraw; call :meth:`_redrawn` when it is done."""
        if st.generation != self._drawn_generation:
            self._drawn_generation, self._drawn_at = st.generation, -math.inf
        if not final and time.perf_counter() - self._drawn_at < self.redraw_s:
            return False
        self.redraws += 1
        return True

    def _redrawn(self) -> None:
        """Mark the end of a redraw (the next one is due ``redraw_s`` later, so training always gets that time)."""
        self._drawn_at = time.perf_counter()

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build_widgets(self) -> None:
        wide = {"description_width": "initial"}
        controls = self._build_controls(wide)
        self.w_k = W.IntSlider(value=2, min=1, max=8, description="k", style=wide)
        self.w_experts = W.IntSlider(value=8, min=2, max=16, description="experts E", style=wide)
        self.w_aux = W.SelectionSlider(options=[(f"{a:g}", a) for a in AUX_WEIGHTS], value=0.0,
                                       description="balance α", style=wide)
        self.w_seed = W.IntText(value=0, description="seed", style=wide, layout=W.Layout(width="120px"))
        self.w_reset = W.Button(description="Reset", tooltip="back to the starting config")
        self.w_stop = W.Button(description="Stop", tooltip="stop training; the plots stay")
        self.w_json = W.Textarea(rows=14, layout=W.Layout(width="520px"))
        self.w_load = W.Button(description="Load", tooltip="train the config in the text box")
        self.w_status = W.HTML(layout=W.Layout(width="100%"))
        for w in (*controls, self.w_k, self.w_experts, self.w_aux, self.w_seed):
            w.observe(self._on_widget, names="value")
        self.w_reset.on_click(lambda _: self.load(self._initial))
        self.w_stop.on_click(lambda _: self.runner.stop())
        self.w_load.on_click(lambda _: self.load_json(self.w_json.value))
        config_box = W.Accordion(children=[W.VBox([self.w_json, self.w_load])], titles=("config (JSON)",),
                                 selected_index=None)
        self.widget = W.VBox([
            *self._control_rows(),
            config_box,
            self.w_status,
            # combine_events: the page echoes every applied patch back to the kernel; combining them while the
            # kernel is busy keeps that backlog from delaying slider messages (measured: 1371 echoes per run).
            BokehModel(self.views.layout, combine_events=True),
        ])

    def _set_widgets(self, run: RunConfig) -> None:
        """Show ``run`` on the widgets (ranges widen for values a slider cannot show) without triggering runs."""
        m = self._moe_of(run)
        self._syncing = True
        try:
            self.w_experts.min, self.w_experts.max = min(2, m.n_experts), max(16, m.n_experts)
            self.w_experts.value = m.n_experts
            self.w_k.max = m.n_experts
            self.w_k.value = m.k
            self._set_controls(run)
            values = sorted(set(AUX_WEIGHTS) | {m.aux_weight})
            self.w_aux.options = [(f"{a:g}", a) for a in values]
            self.w_aux.value = m.aux_weight
            self.w_seed.value = m.seed
            self._sync_enabled()
            self.w_json.value = run.to_json(indent=1)
        finally:
            self._syncing = False

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
        self._request(run)

    def _request(self, run: RunConfig) -> None:
        """Hand a new run to the runner (a subclass may check more first, e.g. that its data exists)."""
        self.runner.request(run)

    def load(self, run: RunConfig) -> None:
        """Show ``run`` on the widgets and retrain it."""
        self._set_widgets(run)
        self._start(run)

    def load_json(self, text: str) -> bool:
        """Load a run config (a ``_config_class``, by default a RunConfig) from JSON text (the Load button). Bad
        JSON or values → status line error, nothing recomputed, the plots stay. Returns True if it loaded."""
        try:
            run = self._config_class.from_json(text)
        except json.JSONDecodeError as exc:
            self.runner.fail(f"config JSON is not valid JSON: {exc}")
            return False
        except (ValueError, TypeError, AttributeError) as exc:
            self.runner.fail(f"config JSON: {exc}")
            return False
        error = self._check_loaded(run)
        if error is not None:
            self.runner.fail(error)
            return False
        self.load(run)
        return True

    # -- status line ---------------------------------------------------------------------------------------------
    def _show_status(self, text: str) -> None:
        color = "#b00020" if text.startswith("error") else "#222"
        st = self.runner.state if self._status_timings and hasattr(self, "runner") else None
        timing = ""     # the live loop's own timings, as a tooltip and data attributes (the browser test reads them)
        if st is not None and math.isfinite(st.timings.fire_to_first_redraw_s):
            first_ms, rate = 1e3 * st.timings.fire_to_first_redraw_s, st.timings.redraws_per_s
            timing = (f' data-first-redraw-ms="{first_ms:.0f}" data-redraws-per-s="{rate:.1f}" title="first redraw '
                      f'{first_ms:.0f} ms after the run started · {rate:.1f} redraws/s"')
        self.w_status.value = (f'<div class="moewidgets-status"{timing} style="font-family: monospace; '
                               f'color: {color}">{html.escape(text)}</div>')

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
        """A rounded summary that does not depend on the thread count (for notebook outputs that nbval compares),
        e.g. 'top-2 of 8 · τ=1 · α=0 · seed 0 — 400/400 steps · final train MSE 0.031 · done'."""
        st = self.runner.state
        if st is None:
            return f"{self._describe(self._config)} — not trained yet"
        tr = st.trainer
        loss = tr.history.loss[-1] if tr.history.loss else math.nan
        text = (f"{self._describe(st.run)} — {tr.steps_done}/{tr.cfg.steps} steps · final {self._loss_label} "
                f"{loss:.2g}")
        text += self._summary_extra()
        return f"{text} · {st.phase}" if st.phase != "error" else f"{text} · error: {st.error}"

    # -- display -------------------------------------------------------------------------------------------------
    def resync_late_pages(self, delays_s: tuple[float, ...] = (2.0, 8.0)) -> None:
        """Give a page that connects late (Voila's preheated kernels, a run drawn from the run cache) the dashboard
        as it is now.

        Why: ipywidgets hands a new page every widget's state at once (``request_states``) and then builds the
        views; a message arriving in between is dropped, and jupyter_bokeh's ``BokehModel`` answers that request
        with the document it was built with (later changes went out as patches). Measured without this in the
        classroom app: a preheated page showed "done" above empty plots, and one of six visitors kept "(queued)".
        So the bokeh widget answers a state request with the document as it is now, and ``delays_s`` after each
        request the status line is sent again and, if the plots changed since, the whole document. The document is
        serialised ahead, once a second has passed without changes after the first run (what a preheated kernel does
        while it waits for its visitor), and that copy serves every state request until the document changes. Uses
        jupyter_bokeh internals (``_document``, ``_model``, ``_model_to_traits``): checked by the Voila browser test.
        """
        bokeh = self.widget.children[-1]
        changed = [False]        # the document changed since a page last received it whole
        bundle: dict = {}        # "now": the document serialised, while it has not changed since
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        prime_timer: list = [None]   # the pending serialise-ahead; False once a page asked (no more ahead of time)

        def serialised() -> dict:
            """The document as jupyter_bokeh's state holds it, serialised at most once per version (0.2-0.4 s of CPU
            each, measured): ahead of time a second after the first run's last change, or when a page asks."""
            if "now" not in bundle:
                bundle["now"] = bokeh._model_to_traits(bokeh._model)
            return bundle["now"]

        def on_change(event) -> None:
            changed[0] = True
            bundle.clear()
            if prime_timer[0] is not False and loop is not None:
                if prime_timer[0] is not None:
                    prime_timer[0].cancel()
                prime_timer[0] = loop.call_later(1.0, serialised)   # a second without changes: a run ended

        bokeh._document.on_change(on_change)

        def resend() -> None:
            self.w_status.send_state("value")
            if changed[0]:
                changed[0] = False
                bokeh.render_bundle = serialised()

        get_state = bokeh.get_state

        def fresh_state(key=None, drop_defaults=False):
            if key is None:                                  # the whole state: a page is (re)building its views
                changed[0] = False
                if prime_timer[0]:
                    prime_timer[0].cancel()
                prime_timer[0] = False
                bokeh._trait_values["render_bundle"] = serialised()
                if loop is not None:
                    for delay in delays_s:
                        loop.call_later(delay, resend)
            return get_state(key, drop_defaults)

        bokeh.get_state = fresh_state

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
        loader = bokehjs_loader(self.loader_mimes)._repr_mimebundle_()
        del loader["text/plain"]
        display(loader, raw=True)
        display(self._repr_mimebundle_(), raw=True)
