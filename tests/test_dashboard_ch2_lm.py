"""Chapter 2's transformer-LM dashboard without Jupyter, on a tiny LM and a tiny WikiText-shaped corpus: run_sync
draws exactly the numbers of ``layer_asymmetry`` recomputed on the same trace (every layer), the layer selector
redraws without retraining, the status line streams step / loss / perplexity / steps/s / ETA and ends in 'done',
bad configs, a dense config and a missing data folder go to the status line and keep the plots."""
from __future__ import annotations

import asyncio
import math
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("jupyter_bokeh")


from moewidgets.config import MoEConfig, RunConfig  # noqa: E402
from moewidgets.dashboards import chapter2_lm as ch2lm  # noqa: E402
from moewidgets.dashboards.chapter2_lm import Chapter2LMDashboard, LMLiveRunner  # noqa: E402
from moewidgets.geometry.asymmetry import layer_asymmetry  # noqa: E402
from moewidgets.lm import LMConfig, trace_lm  # noqa: E402
from moewidgets.train import torch_threads  # noqa: E402
from moewidgets.wikitext import ENV_VAR, load_wikitext  # noqa: E402
from test_dashboard_ch2 import cells, sources  # noqa: E402  (the same four views: one reader of them)

TINY = LMConfig(moe=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=16), n_layers=2, n_heads=2, seq_len=16,
                vocab_size=256, batch_size=8, steps=20, warmup=2, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def corpus(rng: random.Random, n_lines: int) -> str:
    """Lines of words drawn from a 120-word vocabulary with a preferred successor (something to learn)."""
    words = [f"w{i}" for i in range(120)]
    lines = []
    for _ in range(n_lines):
        w, line = rng.randrange(120), []
        for _ in range(12):
            line.append(words[w])
            w = (w * 7 + 3) % 120 if rng.random() < 0.7 else rng.randrange(120)
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("wikitext") / "wikitext-2"
    d.mkdir()
    rng = random.Random(0)
    (d / "valid.txt").write_text(corpus(rng, 400))       # ≈ 5,200 training tokens
    (d / "test.txt").write_text(corpus(rng, 60))         # ≈ 780 held-out tokens: 32 probe windows of 16
    return load_wikitext(d.parent, vocab_size=TINY.vocab_size, verbose=False)


@pytest.fixture(scope="module")
def trained(data):
    dash = Chapter2LMDashboard(TINY, data=data, autostart=False, probe_every=10)
    # one step per chunk: a status line after every step however fast this machine trains (chunks sized to the
    # default 40 ms could jump from the step-10 probe straight to the end, leaving no line that shows it)
    dash.runner.chunk_s = 0.0
    seen: list[str] = []
    shown = dash.runner.on_status
    dash.runner.on_status = lambda text: (seen.append(text), shown(text))
    with torch_threads(1):
        dash.run_sync()
    dash.seen = seen
    return dash


def oracle(dash, layer: int):
    """layer_asymmetry on an independently built trace: the first 512 held-out tokens in windows of 16."""
    tr = dash.trainer
    S = tr.cfg.seq_len
    tokens_WS = tr.data.eval_ids[: (512 // S) * S].view(-1, S)                  # (32·16,) → (32, 16)
    traces = trace_lm(tr.model, tokens_WS)
    return layer_asymmetry(tr.model.moe_layers()[layer].experts, traces[layer], rank=min(ch2lm.RANK, 16),
                           n_draws=dash.n_draws, n_splits=dash.n_splits, generator=tr.cfg.seed)


@pytest.mark.parametrize("layer", [0, 1])
def test_heatmaps_hold_the_numbers_of_layer_asymmetry(trained, layer):
    dash = trained
    assert dash.status.endswith("— done"), dash.status
    assert [p.step for p in dash.probes] == [10, 20] and dash.track.error is None
    p = dash.lm_probe
    assert p.n_layers == 2 and p.n_tokens == 512
    dash.layer = layer
    ref = oracle(dash, layer)
    np.testing.assert_allclose(cells(dash, "distance"), ref.comparison.observed.numpy(), equal_nan=True,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cells(dash, "alignment"), ref.alignment.matrix.abs().numpy(), equal_nan=True,
                               rtol=1e-6, atol=1e-7)
    assert dash.probe.summary.summary() == pytest.approx(ref.summary.summary(), nan_ok=True)
    i_P, j_P = np.triu_indices(4, k=1)
    d_P, a_P = ref.comparison.observed.numpy()[i_P, j_P], ref.alignment.matrix.abs().numpy()[i_P, j_P]
    ok = np.isfinite(d_P) & np.isfinite(a_P)
    pts = dash.views.scatter.points.data
    np.testing.assert_allclose(pts["x"], d_P[ok], rtol=1e-6)
    np.testing.assert_allclose(pts["y_value"], a_P[ok], rtol=1e-6)
    c = ref.comparison
    title = dash.views.distance.figure.title.text
    assert f"split-half floor {c.floor_mean:.2f}" in title and f"isotropic {c.iso_mean:.2f}" in title
    assert "random-group null" in title and "null" in dash.views.alignment.figure.title.text
    assert f"layer {layer} of 2" in dash.views.caption.text and "512 held-out tokens (32 windows)" in \
        dash.views.caption.text


def test_loss_plot_and_held_out_perplexity(trained):
    dash = trained
    tr = dash.trainer
    np.testing.assert_allclose(dash.views.loss.experts.data["ys"][0], tr.history.loss)
    ev = tr.evaluate(max_tokens=2048)                       # the final model: the last probe's evaluation
    assert dash.lm_probe.held_out.n_targets == ev.n_targets == tr.data.eval_ids.numel() - 1
    assert dash.lm_probe.held_out.loss == pytest.approx(ev.loss, rel=1e-6)
    np.testing.assert_allclose(dash.views.loss.ref.data["x"], [10, 20])
    np.testing.assert_allclose(dash.views.loss.ref.data["y"], [p.held_out.loss for p in dash.probes])
    text = dash.status_summary()
    assert text.startswith("top-2 of 4 · τ=1 · α=0 · seed 0 · 2 layers — 20/20 steps · final train CE ")
    assert " · held-out ppl " in text and "d̂_geo" in text and text.endswith(" · done")


def test_layer_selector_redraws_without_retraining(trained):
    dash = trained
    tr, steps, runs, probes = dash.trainer, dash.trainer.steps_done, dash.runner.runs_started, dash.probes
    n_history = len(tr.history.loss)
    for layer in (1, 0, 1):
        dash.w_layer.value = layer
        np.testing.assert_array_equal(cells(dash, "distance"), dash.probe_for(layer).distance_EE)
        np.testing.assert_array_equal(cells(dash, "alignment"), dash.probe_for(layer).alignment_EE)
        assert dash.probe is dash.probes[-1].layers[layer]
    assert dash.trainer is tr and tr.steps_done == steps and len(tr.history.loss) == n_history
    assert dash.runner.runs_started == runs and dash.probes == probes and not dash.runner.busy
    with pytest.raises(ValueError, match=r"layer=2 must be in 0\.\.1"):
        dash.layer = 2


def test_status_line_streams_progress_and_ends_done(trained):
    seen = trained.seen
    training = [s for s in seen if s.endswith("— training")]
    assert len(training) >= 3
    assert " · step 1/20 · " not in training[0] and "step 1/20 · " in training[0] and "ETA" not in training[0]
    training = training[1:]                                     # one sample: no speed, no ETA yet
    pattern = re.compile(r"^top-2 of 4 · τ=1 · α=0 · seed 0 · 2 layers — step (\d+)/20 · train loss [\d.]+ nats "
                         r"\(ppl \d+\)( · held-out ppl \d+ on 779 targets \(step 10\))? · [\d.]+ s · "
                         r"[\d.]+ steps/s · ETA (\d+) s — training$")
    matches = [pattern.match(s) for s in training]
    assert all(matches), [s for s, m in zip(training, matches) if not m]
    steps = [int(m.group(1)) for m in matches]
    assert steps == sorted(steps) and steps[0] >= 2 and steps[-1] < 20
    assert any(m.group(2) for m in matches if int(m.group(1)) > 10)           # the first probe's perplexity
    final = seen[-1]
    assert final.startswith("top-2 of 4 · τ=1 · α=0 · seed 0 · 2 layers — step 20/20 · train loss ")
    assert "held-out ppl" in final and "(step 20)" in final and "ETA" not in final and final.endswith("— done")
    assert final == trained.status and "— done" in trained.w_status.value


@pytest.mark.parametrize("steps, n, probe_s, due", [(400, 150, [0.5, 0.7], 3), (450, 150, [0.5, 0.7], 4),
                                                    (400, 400, [1.0], 0), (400, 0, [], 4)])
def test_eta_counts_the_remaining_steps_and_probes(steps, n, probe_s, due):
    runner = LMLiveRunner(probe=lambda st: None, probe_every=100)
    st = SimpleNamespace(trainer=SimpleNamespace(steps_done=n, cfg=SimpleNamespace(steps=steps)),
                         timings=SimpleNamespace(probe_s=probe_s))
    mean = sum(probe_s) / len(probe_s) if probe_s else 0.0
    assert runner.eta_s(st, rate=10.0) == pytest.approx((steps - n) / 10.0 + due * mean)


def test_steps_per_second_over_the_last_seconds_without_probes():
    runner = LMLiveRunner(probe_every=100)
    st = SimpleNamespace(trainer=SimpleNamespace(steps_done=0), generation=1, timings=SimpleNamespace(probe_s=[]))
    rates = []
    # (steps done, seconds since the run started, probe seconds so far)
    for n, elapsed, probes in [(10, 2.0, []), (20, 3.0, []), (25, 4.0, [0.5]), (80, 9.0, [0.5])]:
        st.trainer.steps_done, st.timings.probe_s = n, probes
        rates.append(runner.steps_per_s(st, elapsed))
    # one sample: no speed yet; then Δsteps / Δ(seconds less probes) over the last 5 s
    assert math.isnan(rates[0]) and rates[1:] == pytest.approx([10 / 1.0, 15 / 1.5, 55 / 5.0])
    st.generation, st.timings.probe_s = 2, []                    # a new run starts a new window
    st.trainer.steps_done = 1
    assert math.isnan(runner.steps_per_s(st, 1.0))
    st.trainer.steps_done = 5
    assert runner.steps_per_s(st, 1.5) == pytest.approx(8.0)


def test_bad_config_goes_to_the_status_line_and_keeps_the_plots(trained):
    dash = trained
    before, caption, config, tr = sources(dash), dash.views.caption.text, dash.config, dash.trainer
    assert not dash.load_json("{not json")
    assert dash.status.startswith("error: config JSON is not valid JSON")
    text = config.to_json()
    assert '"k": 2' in text
    assert not dash.load_json(text.replace('"k": 2', '"k": 5'))
    assert dash.status.startswith("error: config JSON: ")
    assert dash.status.endswith("MoEConfig.k=5 must be in 1..n_experts=4")
    assert not dash.load_json(text.replace('"n_layers": 2', '"n_layers": 0'))
    assert "n_layers=0" in dash.status
    assert not dash.load_json(text.replace('"arch": "moe"', '"arch": "dense"'))
    assert "moe.arch='dense' must be 'moe' here" in dash.status
    assert not dash.load_json('{"model": {}}')                  # a RunConfig-shaped JSON is not an LMConfig
    assert dash.status.startswith("error: config JSON:")
    assert dash.run_sync(config.with_moe(arch="dense")) is dash.runner.state
    assert "moe.arch='dense' must be 'moe' here" in dash.status
    assert sources(dash) == before and dash.views.caption.text == caption and dash.config == config
    assert dash.trainer is tr and dash.w_json.value == config.to_json(indent=1)


def test_a_dense_config_is_explained_not_trained(data):
    dash = Chapter2LMDashboard(TINY.with_moe(arch="dense"), data=data, autostart=True)   # no loop: nothing runs
    assert dash.status.startswith("error: config: moe.arch='dense' must be 'moe' here (a dense FFN has no experts")
    assert "no experts" in dash.views.caption.text and dash.trainer is None
    assert dash.run_sync() is None and dash.trainer is None and dash.status.startswith("error: config: moe.arch")


def test_missing_data_folder_is_reported_on_the_status_line(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    dash = Chapter2LMDashboard(TINY, autostart=False)
    assert dash.run_sync() is None and dash.trainer is None
    assert dash.status.startswith("error: no training data: WikiText-2 not found: looked in "), dash.status
    assert str(tmp_path / "nowhere" / "wikitext-2") in dash.status and f"{ENV_VAR}=" in dash.status
    assert "color: #b00020" in dash.w_status.value
    monkeypatch.delenv(ENV_VAR)

    async def autostart():                                     # the notebook path: a running loop
        d = Chapter2LMDashboard(TINY)
        await d.wait()
        return d

    dash = asyncio.run(autostart())
    assert dash.status.startswith("error: no training data: WikiText-2 not found: no data_dir= given and "
                                  f"{ENV_VAR} is not set"), dash.status
    assert dash.runner.runs_started == 0


def test_live_run_on_the_event_loop_and_a_failing_probe(data, monkeypatch):
    async def live(dash):
        dash.runner.request(dash.config, delay=0.0)
        await dash.wait()

    dash = Chapter2LMDashboard(TINY.replace(steps=6), data=data, autostart=False, probe_every=3)
    asyncio.run(live(dash))
    assert dash.status.endswith("— done") and [p.step for p in dash.probes] == [3, 6]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ch2lm, "probe_lm", broken)
    before = sources(dash)
    dash.run_sync(dash.config.replace(seed=1))
    assert dash.status.endswith("— done") and dash.probes == [] and dash.trainer.steps_done == 6
    assert "probe failed at step 6: RuntimeError: boom (last good geometry kept)" in dash.views.caption.text
    after = sources(dash)
    assert after["distance.cells"] == before["distance.cells"]                 # the last geometry stays


def test_widgets_build_the_config_and_repr_is_short(data):
    dash = Chapter2LMDashboard(TINY, data=data, autostart=False)
    assert repr(dash) == "Chapter2LMDashboard(top-2 of 4, τ=1, α=0, seed=0, 2 layers, 20 steps)"
    assert repr(Chapter2LMDashboard(autostart=False)) == \
        "Chapter2LMDashboard(top-2 of 8, τ=1, α=0.01, seed=0, 3 layers, 400 steps)"
    assert list(dash.w_E.options) == [4, 8, 16] and list(dash.w_steps.options) == [20, 100, 200, 400, 800, 1600]
    dash.w_E.value = 16
    assert dash.w_k.max == 16 and dash.config.moe.n_experts == 16
    dash.w_k.value = 16
    assert dash.config.moe.label == "soft (16)" and "fully soft" in dash.w_k_note.value
    dash.w_tau.value = 0.5
    dash.w_aux.value = 0.01
    dash.w_seed.value = 3
    dash.w_steps.value = 800
    c = dash.config
    assert (c.moe.temperature, c.moe.aux_weight, c.seed, c.moe.seed, c.steps) == (0.5, 0.01, 3, 3, 800)
    assert '"steps": 800' in dash.w_json.value and dash.trainer is None          # no loop: only queued
    dash.w_seed.value = -1
    assert dash.status.startswith("error: LMConfig.seed=-1 must be ") and dash.config == c   # range: config.py
    assert dash.load_json(TINY.with_moe(n_experts=6, k=3).replace(n_layers=3).to_json())
    assert list(dash.w_E.options) == [4, 6, 8, 16] and dash.w_E.value == 6 and dash.w_k.value == 3
    assert [v for _, v in dash.w_layer.options] == [0, 1, 2]
    dash.runner.stop()
    assert dash._repr_mimebundle_()["text/plain"] == repr(dash)
    with pytest.raises(ValueError, match="probe_every=0 must be an integer >= 1"):
        Chapter2LMDashboard(TINY, data=data, autostart=False, probe_every=0)
    with pytest.raises(ValueError, match="config=RunConfig must be a moewidgets.lm.LMConfig"):
        Chapter2LMDashboard(RunConfig(), autostart=False)


def test_docstring_examples():
    import doctest
    assert doctest.testmod(ch2lm, optionflags=doctest.ELLIPSIS).failed == 0
    assert torch.get_num_threads() == 1
