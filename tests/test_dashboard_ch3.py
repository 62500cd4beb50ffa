"""Chapter 3's live dashboard without Jupyter: run_sync fills every view, the no-balancing reference trains in
lockstep, the K-Means router works live, bad configs go to the status line and keep the plots."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("jupyter_bokeh")

from bokeh.models import ColumnDataSource  # noqa: E402

from moewidgets.config import MoEConfig, RunConfig, TaskConfig, TrainConfig  # noqa: E402
from moewidgets.dashboards import Chapter3Dashboard  # noqa: E402
from moewidgets.dashboards.chapter3 import describe_balancing_run, no_balancing  # noqa: E402

SMALL = RunConfig(model=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=16, expert="swiglu", gate="renorm",
                                  aux_weight=0.01),
                  task=TaskConfig(d_in=16, d_out=16, n_clusters=4, n_train=1024, n_probe=256, offset=0.5),
                  train=TrainConfig(steps=40, batch_size=64, device="cpu"))


def sources(dash: Chapter3Dashboard) -> dict[str, dict]:
    out = {}
    for name in ("rows", "centroids", "maxvio", "load", "loss"):
        for field, src in vars(getattr(dash.views, name)).items():
            if isinstance(src, ColumnDataSource):
                out[f"{name}.{field}"] = {k: list(v) for k, v in src.data.items()}
    return out


@pytest.fixture(scope="module")
def trained() -> Chapter3Dashboard:
    dash = Chapter3Dashboard(SMALL, autostart=False)
    dash.run_sync()
    return dash


def test_run_sync_trains_model_and_no_balancing_reference_and_fills_every_view(trained):
    dash = trained
    assert dash.status.endswith("— done"), dash.status
    assert dash.trainer.steps_done == 40 and dash.reference.steps_done == 40
    assert dash.reference.model.cfg.aux_weight == 0 and dash.reference.model.cfg.lf_rate == 0
    for name, data in sources(dash).items():
        assert all(len(col) > 0 for col in data.values()), name
    t = dash.track
    assert len(t.maxvio) == 40 and len(t.ref_maxvio) == 40
    cos = np.asarray(sources(dash)["rows.cells"]["value"]).reshape(4, 4)
    assert np.allclose(np.diag(cos), 1.0) and np.allclose(cos, cos.T)
    assert abs(sum(sources(dash)["load.bars"]["top"]) - 1.0) < 1e-9        # load fractions sum to 1
    assert "step 40/40" in dash.views.caption.text and "S_abs" in dash.views.rows.figure.title.text


def test_kmeans_router_live_and_summary():
    run = SMALL.replace(model=SMALL.model.replace(router="kmeans", aux_weight=0.0, lf_rate=1e-3))
    dash = Chapter3Dashboard(run, autostart=False)
    dash.run_sync()
    assert dash.status.endswith("— done") and dash.trainer.model.layer.router.initialized
    text = dash.status_summary()
    assert text.startswith("k-means router (ema β=0.05) · top-2 of 4 · α=0 · γ=0.001 · seed 0 — 40/40 steps")
    assert "S_abs" in text and "K-Means centroids" in dash.views.caption.text


def test_unbalanced_run_is_its_own_reference():
    run = SMALL.replace(model=SMALL.model.replace(aux_weight=0.0))
    assert no_balancing(run) is None and no_balancing(SMALL).model.aux_weight == 0
    dash = Chapter3Dashboard(run, autostart=False)
    dash.run_sync()
    assert dash.reference is None and dash.track.ref_similarity is None
    assert describe_balancing_run(run) == "softmax router · top-2 of 4 · α=0 · γ=0 · seed 0"


def test_widgets_build_the_config_and_repr_is_short():
    dash = Chapter3Dashboard(SMALL, autostart=False)
    assert repr(dash) == "Chapter3Dashboard(softmax, top-2 of 4, α=0.01, γ=0, seed=0)"
    dash.w_router.value = "kmeans"
    dash.w_lf.value = 1e-3
    assert dash.config.model.router == "kmeans" and dash.config.model.lf_rate == 1e-3
    dash.w_experts.value = 3
    assert dash.w_k.max == 3 and dash.config.model.n_experts == 3
    assert '"lf_rate": 0.001' in dash.w_json.value
    assert Chapter3Dashboard(autostart=False)._repr_mimebundle_()["text/plain"].startswith("Chapter3Dashboard(")


def test_bad_config_goes_to_the_status_line_and_keeps_the_plots(trained):
    dash = trained
    before = sources(dash)
    config = dash.config
    assert not dash.load_json(config.to_json().replace('"kmeans_rate": 0.05', '"kmeans_rate": 1.5'))
    assert "MoEConfig.kmeans_rate=1.5 must be in (0, 1]" in dash.status
    assert not dash.load_json(config.to_json().replace('"aux_weight": 0.01', '"aux_weight": -1'))
    assert "MoEConfig.aux_weight=-1 must be >= 0" in dash.status
    assert not dash.load_json(config.to_json().replace('"router": "softmax"', '"router": "mpi"'))
    assert "belongs to chapter 4" in dash.status
    assert sources(dash) == before and dash.config == config


def test_docstring_examples():
    import doctest
    import moewidgets.dashboards.chapter3 as ch3
    assert doctest.testmod(ch3, optionflags=doctest.ELLIPSIS).failed == 0
