"""The live dashboard without Jupyter: views, the LiveRunner loop and Chapter1Dashboard (ipywidgets and bokeh
objects work headless; comm messages go nowhere)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("jupyter_bokeh")

from bokeh.models import ColumnDataSource  # noqa: E402

from moewidgets import views as V  # noqa: E402
from moewidgets.config import MoEConfig, RunConfig, TaskConfig, TrainConfig  # noqa: E402
from moewidgets.dashboards import Chapter1Dashboard, LiveRunner  # noqa: E402

# Small enough that a run takes well under a second on 2 cores; probes at step 50 and at the end.
SMALL = RunConfig(model=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=16),
                  task=TaskConfig(d_in=16, d_out=16, n_clusters=4, n_train=1024, n_probe=256),
                  train=TrainConfig(steps=60, batch_size=64, device="cpu"))


def sources(dash: Chapter1Dashboard) -> dict[str, dict]:
    """Every ColumnDataSource of the dashboard's views, name → a copy of its data."""
    out = {}
    for name in ("loss", "load", "align", "spectra", "sigma1", "erank", "pca"):
        for field, src in vars(getattr(dash.views, name)).items():
            if isinstance(src, ColumnDataSource):
                out[f"{name}.{field}"] = {k: [np.asarray(x).tolist() for x in v] for k, v in src.data.items()}
    return out


def numeric(values) -> np.ndarray:
    """Flatten a column (numbers, or per-expert arrays of a multi_line) to a float array."""
    flat = []
    for v in values:
        flat.extend(np.ravel(v).tolist() if isinstance(v, (list, np.ndarray)) else [v])
    return np.asarray([x for x in flat if not isinstance(x, str)], dtype=float)


@pytest.fixture(scope="module")
def trained() -> Chapter1Dashboard:
    dash = Chapter1Dashboard(SMALL, autostart=False)
    dash.runner.probe_every = 50
    dash.run_sync()
    return dash


def test_run_sync_trains_to_the_end_and_fills_every_source(trained):
    dash = trained
    assert dash.status.endswith("— done"), dash.status
    assert dash.trainer.steps_done == 60
    loss = dash.trainer.history.loss
    assert loss[-1] < loss[0]
    live = ~dash.probes.dead.numpy()
    for name, data in sources(dash).items():
        assert all(len(col) > 0 for col in data.values()), name
        if name in ("spectra.experts", "pca.experts"):    # dead experts (no routed points) are NaN rows
            cols = [np.asarray(y) for y, alive in zip(data["ys"], live) if alive]
            assert cols and all(np.isfinite(c).all() for c in cols), name
        elif name == "align.cells":
            m = np.asarray(data["value"]).reshape(4, 4)[np.ix_(live, live)]
            assert np.isfinite(m).all()
        elif name in ("sigma1.bars", "erank.bars"):
            assert np.isfinite(np.asarray(data["top"])[live]).all(), name
        else:
            assert np.isfinite(numeric(data.get("y", data.get("loss", data.get("top"))))).all(), name
    assert "E=4" in dash.views.caption.text and "step 60/60" in dash.views.caption.text
    assert dash.dense_probes is not None and dash.dense_probes.n_experts == 1
    tm = dash.timings
    assert tm.redraws >= 2 and len(tm.probe_s) == 2 and math.isfinite(tm.fire_to_first_redraw_s)   # steps 50, 60


def test_status_summary_is_rounded(trained):
    text = trained.status_summary()
    assert text.startswith("top-2 of 4 · τ=1 · α=0 · seed 0 — 60/60 steps · final train MSE ")
    assert text.endswith(" · done")
    assert len(text.split("MSE ")[1].split(" ")[0].replace("0.", "").lstrip("0")) <= 3   # 2 significant digits


def test_repr_is_short_and_deterministic():
    a, b = Chapter1Dashboard(autostart=False), Chapter1Dashboard(autostart=False)
    assert repr(a) == repr(b) == "Chapter1Dashboard(top-2 of 8, τ=1.0, α=0, seed=0)"
    bundle = a._repr_mimebundle_()
    assert bundle["text/plain"] == repr(a)
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_changing_E_rebuilds_the_k_range():
    dash = Chapter1Dashboard(SMALL, autostart=False)
    dash.w_k.value = 4
    dash.w_experts.value = 3
    assert dash.w_k.max == 3 and dash.w_k.value == 3
    assert dash.config.model.n_experts == 3 and dash.config.model.k == 3
    dash.w_experts.value = 12
    assert dash.w_k.max == 12 and dash.config.model.k == 3
    dash.w_routing.value = "soft"
    assert dash.w_k.disabled and dash.config.model.k == 12 and dash.config.model.label == "soft (12)"
    dash.w_routing.value = "dense"
    assert dash.w_k.disabled and dash.config.model.arch == "dense"
    dash.w_routing.value = "top-k"
    assert not dash.w_k.disabled and dash.config.model.k == 3
    assert '"n_experts": 12' in dash.w_json.value     # the JSON box follows the widgets


def test_invalid_json_or_config_keeps_the_plots(trained):
    dash = trained
    before = sources(dash)
    config = dash.config
    assert not dash.load_json("{not json")
    assert dash.status.startswith("error: config JSON is not valid JSON")
    assert not dash.load_json(config.to_json().replace('"k": 2', '"k": 9'))
    assert "MoEConfig.k=9 must be in 1..n_experts=4" in dash.status
    assert not dash.load_json('{"train": {"stepz": 3}}')
    assert "TrainConfig: unknown field(s) ['stepz']" in dash.status
    assert not dash.load_json('{"model": 3}')
    assert dash.status.startswith("error: config JSON")
    dash.w_seed.value = -1                      # a widget value the config rejects
    assert dash.status.startswith("error: MoEConfig.seed=-1 must be ")   # the allowed range follows config.py
    assert dash.config == config                # nothing recomputed or changed
    assert sources(dash) == before
    dash._set_widgets(config)


def test_non_finite_loss_stops_with_a_message_and_keeps_the_plots():
    dash = Chapter1Dashboard(SMALL, autostart=False)
    dash.run_sync()
    before = {k: v for k, v in sources(dash).items() if not k.startswith(("loss", "load"))}
    exploding = SMALL.replace(train=SMALL.train.replace(lr=1e6))
    st = dash.run_sync(exploding)
    assert st.phase == "error"
    assert dash.status.startswith("error: top-2 of 4") and "loss became" in dash.status
    assert dash.status.endswith("last good plots kept")
    assert "error: loss became" in dash.status_summary()
    assert {k: v for k, v in sources(dash).items() if not k.startswith(("loss", "load"))} == before
    assert all(bool(p.isfinite().all()) for p in dash.trainer.model.parameters())   # last good weights


def test_rapid_requests_end_in_one_run_for_the_final_values():
    async def drag():
        dash = Chapter1Dashboard(SMALL, autostart=False)
        dash.runner.debounce_s = 0.1
        values = [2 + (i * 5) % 15 for i in range(29)] + [7]
        for e in values:                      # 30 slider messages within ~60 ms
            dash.w_experts.value = e
            await asyncio.sleep(0.002)
        # acknowledged at once, before the debounce has fired
        assert dash.status.startswith("retraining with top-2 of 7") and dash.status.endswith("(queued)")
        await dash.wait()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return dash, others

    dash, others = asyncio.run(drag())
    assert others == []
    # the first message starts a run at once (a quiet spell before it; the 2 ms sleep lets it start), the 29 others
    # fall within the debounce: one more run, for the final values, and only that one finishes
    assert dash.runner.runs_started == 2 and dash.runner.runs_completed == 1
    assert dash.runner.state.run.model.n_experts == 7 and dash.status.endswith("done")
    assert dash.trainer.steps_done == 60
    dash.runner.close()


def test_a_single_change_starts_at_once_and_a_burst_waits_for_the_debounce():
    """Leading and trailing edge: after a quiet spell a change starts its run with no debounce; a change within
    ``debounce_s`` of the previous one waits for it (the request's timer)."""
    async def go():
        dash = Chapter1Dashboard(SMALL, autostart=False)
        runner = dash.runner
        runner.debounce_s = 5.0                     # long: a change that waited for it could not pass below
        t0 = time.perf_counter()
        dash.w_k.value = 1                          # quiet before: starts at once
        await dash.wait()
        single = time.perf_counter() - t0
        dash.w_k.value = 2                          # long after the last request? no: within 5 s → debounced
        pending = runner._timer is not None and runner._timer.when() - asyncio.get_running_loop().time() > 4.0
        runner.stop()
        runner.leading = False                      # the switch: every change waits for the debounce
        runner._last_request = -math.inf
        dash.w_k.value = 3
        waits = runner._timer is not None and runner._timer.when() - asyncio.get_running_loop().time() > 4.0
        runner.stop()
        return dash, single, pending, waits

    dash, single, pending, waits = asyncio.run(go())
    assert single < 5.0 and dash.runner.runs_completed == 1 and dash.status.startswith("stopped")
    assert pending and waits
    dash.runner.close()


def test_a_new_request_stops_the_running_task_at_a_step_boundary():
    async def interrupt():
        dash = Chapter1Dashboard(SMALL.replace(train=SMALL.train.replace(steps=200)))   # autostart
        while dash.trainer is None or dash.trainer.steps_done < 10:
            await asyncio.sleep(0.01)
        first = dash.trainer
        dash.w_seed.value = 3
        dash.w_seed.value = 4
        await dash.wait()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return dash, first, others

    dash, first, others = asyncio.run(interrupt())
    assert others == []
    assert first.steps_done < 200                                # the first run stopped early
    assert dash.runner.runs_started == 2 and dash.runner.runs_completed == 1
    assert dash.trainer.steps_done == 200 and dash.runner.state.run.model.seed == 4
    dash.runner.close()


def test_stop_keeps_the_plots_and_says_so():
    async def stop():
        dash = Chapter1Dashboard(SMALL.replace(train=SMALL.train.replace(steps=5000)))
        while dash.trainer is None or dash.trainer.steps_done < 5:
            await asyncio.sleep(0.01)
        dash.w_stop.click()
        await dash.wait()
        return dash

    dash = asyncio.run(stop())
    assert dash.status.endswith("— stopped") and dash.trainer.steps_done < 5000
    dash.runner.close()


def test_runner_without_a_loop_only_queues():
    seen = []
    runner = LiveRunner(on_status=seen.append)
    runner.request(SMALL)
    assert "no running event loop" in seen[-1]
    st = runner.run_sync()
    assert st.phase == "done" and runner.runs_completed == 1


def test_views_accept_a_changing_number_of_experts():
    spectra = V.build_spectra_view()
    V.update_spectra(spectra, np.ones((8, 5)) * 0.5, dense_J=[1.0, 0.5])
    assert len(spectra.experts.data["xs"]) == 8 and len(set(spectra.experts.data["color"])) == 8
    V.update_spectra(spectra, [[1.0, 0.0], [1.0, 0.1, 0.01]])     # E = 2, ragged, a zero (log floor)
    assert len(spectra.experts.data["ys"]) == 2 and min(spectra.experts.data["ys"][0]) == V.LOG_FLOOR
    assert len(spectra.dense.data["x"]) == len(spectra.dense.data["y"]) == 0
    bars = V.build_bars_view("σ_1", "σ_1")
    V.update_bars(bars, [1.0, 2.0, 3.0], ref=2.5)
    assert bars.ref.data["x"].tolist() == [-0.5, 2.5] and bars.ref.data["y"].tolist() == [2.5, 2.5]
    before = bars.ref.data
    V.update_bars(bars, [1.0, 2.0, 4.0], ref=2.5)          # an unchanged level is not sent again
    assert bars.ref.data is before and bars.bars.data["top"].tolist() == [1.0, 2.0, 4.0]
    heat = V.build_heatmap_view()
    V.update_heatmap(heat, np.eye(3), title="t")
    assert len(heat.cells.data["value"]) == 9 and heat.figure.title.text == "t"
    pca = V.build_pca_view()
    V.update_pca(pca, [[3.0, 1.0], [1.0, 1.0]], dense_K=[2.0, 2.0])
    assert np.allclose(pca.experts.data["ys"][0], [0.75, 1.0]) and pca.dense.data["y"].tolist() == [0.5, 1.0]
    assert len(V.expert_palette(16)) == 16 and len(V.expert_palette(40)) == 40
    for view in (spectra, bars, heat, pca):
        assert view.figure.xaxis[0].axis_label and view.figure.yaxis[0].axis_label


def test_a_failing_probe_stops_the_run_with_a_message():
    dash = Chapter1Dashboard(SMALL, autostart=False)

    def boom(state):
        raise RuntimeError("svd did not converge")

    dash.runner.probe = boom
    st = dash.run_sync()
    assert st.phase == "error" and dash.probes is None
    assert dash.status.startswith("error: top-2 of 4")
    assert "probes failed at step 60: svd did not converge" in dash.status


def test_stop_while_only_queued_says_nothing_started():
    async def queue_then_stop():
        dash = Chapter1Dashboard(SMALL, autostart=False)
        dash.w_experts.value = 3
        dash.stop()
        await dash.wait()
        return dash

    dash = asyncio.run(queue_then_stop())
    assert dash.status == "stopped: top-2 of 3 · τ=1 · α=0 · seed 0 was not started"
    assert dash.runner.runs_started == 0


def test_every_redraw_reaches_the_page_as_one_patch_that_rebuilds_the_document():
    """``one_patch``: a run's redraws go out as bokeh PATCH-DOC messages of exactly 3 comm messages each (header,
    metadata, content; arrays inline, no buffers), and applying them in order to a copy of the page's document (as
    the page does) gives the kernel's document after the run: nothing lost by batching (oracle: bokeh's own
    document model)."""
    from bokeh.document import Document
    from bokeh.protocol.messages.patch_doc import patch_doc

    dash = Chapter1Dashboard(SMALL, autostart=False)
    bokeh = dash.widget.children[-1]
    page = Document.from_json(bokeh._document.to_json())              # what the page holds before the run
    sent = []
    bokeh.send = lambda content, buffers=None: sent.append((content, buffers))
    dash.run_sync()
    assert sent and len(sent) % 3 == 0 and all(buffers is None for _, buffers in sent)
    patches = [sent[i:i + 3] for i in range(0, len(sent), 3)]
    for parts in patches:
        header, metadata, content = (json.loads(c["payload"]) for c, _ in parts)
        assert header["msgtype"] == "PATCH-DOC" and content["events"]
        patch_doc(header, metadata, content).apply_to_document(page)
    assert len(patches) <= dash.redraws + len(dash.runner.state.timings.probe_s)     # one per redraw at most

    kernel = {m.id: m for m in bokeh._document.models}
    assert {m.id for m in page.models} == set(kernel)
    for m in page.models:                                    # every property of every model, arrays by value
        ours, theirs = kernel[m.id].properties_with_values(), m.properties_with_values()
        assert ours.keys() == theirs.keys() and all(_same_value(ours[k], theirs[k]) for k in ours), m
    dash.runner.close()


def _same_value(a, b) -> bool:
    """Equal bokeh property values: arrays by value, models by id, containers element by element."""
    from bokeh.model import Model
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, Model) or isinstance(b, Model):
        return isinstance(a, Model) and isinstance(b, Model) and a.id == b.id
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is type(b) and dataclasses.is_dataclass(a):          # bokeh's Field / Value specs
        return all(_same_value(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def test_bokehjs_goes_once_per_mime_type_asked():
    """The BokehJS loader: by default under both mime types (JupyterLab renders jupyter_bokeh's, Voila plain JS);
    the classroom app asks for Voila's alone (half a page load); one widget per kernel and choice."""
    from bokeh.io.notebook import LOAD_MIME_TYPE

    from moewidgets.dashboards.base import JS_MIME, bokehjs_loader
    both, js = bokehjs_loader(), bokehjs_loader((JS_MIME,))
    assert set(both.outputs[0]["data"]) == {LOAD_MIME_TYPE, JS_MIME} and set(js.outputs[0]["data"]) == {JS_MIME}
    assert js.outputs[0]["data"][JS_MIME] == both.outputs[0]["data"][JS_MIME]
    assert len(js.outputs[0]["data"][JS_MIME]) > 1_000_000 and "window.Bokeh" in js.outputs[0]["data"][JS_MIME]
    assert bokehjs_loader((JS_MIME,)) is js and bokehjs_loader() is both
    dash = Chapter1Dashboard(SMALL, autostart=False)
    dash.loader_mimes = (JS_MIME,)
    shown = []
    import IPython.display
    original = IPython.display.display
    IPython.display.display = lambda *objs, **kw: shown.extend(objs)
    try:
        dash._ipython_display_()
    finally:
        IPython.display.display = original
    assert js.model_id in json.dumps(shown[0], default=str)        # the app's dashboard shows the one-copy loader
    dash.runner.close()


def test_a_late_page_gets_the_document_as_it_is_now_serialised_while_the_kernel_waited():
    """``resync_late_pages``: a page's state request gets the bokeh document as it is now (oracle: jupyter_bokeh's
    own serialisation of the current model); once the document has been quiet for a second after the run it is
    serialised ahead (what a preheated kernel does before its visitor comes), and the request uses that copy; a
    later change makes the next request serialise again."""
    async def go():
        dash = Chapter1Dashboard(SMALL, autostart=False)
        dash.resync_late_pages(delays_s=())
        bokeh = dash.widget.children[-1]
        serialise = bokeh._model_to_traits
        calls = []
        bokeh._model_to_traits = lambda model: calls.append(model) or serialise(model)
        dash.runner.request(dash.config, delay=0.0)
        await dash.wait()
        for _ in range(100):                       # the run is over: a quiet second later it is serialised ahead
            if calls:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)                   # ... once (nothing changes any more)
        ahead = len(calls)
        first = bokeh.get_state()["render_bundle"]
        after_request = len(calls)
        dash.views.caption.text = "a change after the page came"
        second = bokeh.get_state()["render_bundle"]
        return dash, serialise, ahead, after_request, len(calls), first, second

    def roots(bundle) -> list:     # the document's models (each serialisation names the document anew)
        bundle = json.loads(bundle) if isinstance(bundle, str) else bundle
        (doc,) = bundle["docs_json"].values()
        return json.loads(json.dumps(doc["roots"]))     # as the page receives it (tuples become lists)

    dash, serialise, ahead, after_request, final, first, second = asyncio.run(go())
    assert ahead >= 1, "the quiet document was never serialised ahead"
    assert after_request == ahead                                   # the request used that copy ...
    assert "a change after the page came" not in json.dumps(roots(first))
    assert final == ahead + 1 and "a change after the page came" in json.dumps(roots(second))  # ... until a change
    assert roots(second) == roots(serialise(dash.widget.children[-1]._model))   # the document as it is now
    dash.runner.close()
