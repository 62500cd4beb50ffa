"""Chapter 4's live dashboard without Jupyter: run_sync fills every view, the plain-router reference trains in
lockstep, bad configs go to the status line and keep the plots."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("jupyter_bokeh")

from bokeh.models import ColumnDataSource  # noqa: E402

from moewidgets.config import MoEConfig, RunConfig, TaskConfig, TrainConfig  # noqa: E402
from moewidgets.dashboards import Chapter4Dashboard  # noqa: E402
from moewidgets.dashboards.chapter4 import describe_mpi_run, plain_router  # noqa: E402

SMALL = RunConfig(model=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=16, router="mpi", gate="renorm",
                                  aux_weight=0.01),
                  task=TaskConfig(d_in=16, d_out=16, n_clusters=4, n_train=1024, n_probe=256),
                  train=TrainConfig(steps=40, batch_size=64, device="cpu"))


def sources(dash: Chapter4Dashboard) -> dict[str, dict]:
    out = {}
    for name in ("angles", "angle_now", "lam", "gap", "maxvio", "loss"):
        for field, src in vars(getattr(dash.views, name)).items():
            if isinstance(src, ColumnDataSource):
                out[f"{name}.{field}"] = {k: list(v) for k, v in src.data.items()}
    return out


@pytest.fixture(scope="module")
def trained() -> Chapter4Dashboard:
    dash = Chapter4Dashboard(SMALL, autostart=False)
    dash.run_sync()
    return dash


def test_run_sync_trains_mpi_and_its_plain_reference_and_fills_every_view(trained):
    dash = trained
    assert dash.status.endswith("— done"), dash.status
    assert dash.trainer.steps_done == 40 and dash.reference.steps_done == 40
    assert dash.reference.model.cfg.router == "softmax"
    for name, data in sources(dash).items():
        assert all(len(col) > 0 for col in data.values()), name
    t = dash.track
    assert t.step[-1] == 40 and len(t.angle_SE[-1]) == 4 and len(t.maxvio) == 40
    assert np.all((np.asarray(t.angle_SE) >= 0) & (np.asarray(t.angle_SE) <= 90))
    # MPI rows have norm C = C'/√E exactly, the plain router's do not
    assert np.allclose(t.now.norm.numpy(), 1 / 2, atol=1e-6)
    assert "E=4" in dash.views.caption.text and "step 40/40" in dash.views.caption.text


def test_status_summary_is_rounded(trained):
    text = trained.status_summary()
    assert text.startswith("mpi (C'=1, 1 power step) · top-2 of 4 · α=0.01 · seed 0 — 40/40 steps · final train MSE ")
    assert "(plain router: ψ " in text and text.endswith(" · done")


def test_plain_router_run_is_its_own_reference():
    run = SMALL.replace(model=SMALL.model.replace(router="softmax"))
    assert plain_router(run) is None and plain_router(SMALL).model.router == "softmax"
    dash = Chapter4Dashboard(run, autostart=False)
    dash.run_sync()
    assert dash.reference is None and dash.status.endswith("— done")
    assert len(sources(dash)["angles.ref"]["y"]) > 0
    assert describe_mpi_run(run).startswith("softmax router · top-2 of 4")


def test_widgets_build_the_config_and_repr_is_short():
    dash = Chapter4Dashboard(SMALL, autostart=False)
    assert repr(dash) == "Chapter4Dashboard(mpi, C'=1, 1 power step, top-2 of 4, α=0.01, seed=0)"
    dash.w_steps.value = 3
    dash.w_scale.value = 2.0
    assert dash.config.model.mpi_steps == 3 and dash.config.model.mpi_scale == pytest.approx(2.0)
    dash.w_router.value = "softmax"
    assert dash.w_steps.disabled and dash.config.model.router == "softmax"
    dash.w_experts.value = 3
    assert dash.w_k.max == 3 and dash.config.model.n_experts == 3
    assert '"mpi_steps": 3' in dash.w_json.value
    assert Chapter4Dashboard(autostart=False)._repr_mimebundle_()["text/plain"].startswith("Chapter4Dashboard(mpi")


def test_bad_config_goes_to_the_status_line_and_keeps_the_plots(trained):
    dash = trained
    before = sources(dash)
    config = dash.config
    assert not dash.load_json("{not json")
    assert dash.status.startswith("error: config JSON is not valid JSON")
    assert not dash.load_json(config.to_json().replace('"mpi_steps": 1', '"mpi_steps": 0'))
    assert "MoEConfig.mpi_steps=0 must be in 1..100" in dash.status
    assert not dash.load_json(config.to_json().replace('"mpi_scale": 1.0', '"mpi_scale": -2.0'))
    assert "MoEConfig.mpi_scale=-2.0 must be > 0" in dash.status
    assert not dash.load_json(config.to_json().replace('"arch": "moe"', '"arch": "dense"'))
    assert "model.arch='dense' must be 'moe' here" in dash.status
    assert sources(dash) == before and dash.config == config


def test_docstring_examples():
    import doctest
    import moewidgets.dashboards.chapter4 as ch4
    assert doctest.testmod(ch4, optionflags=doctest.ELLIPSIS).failed == 0
