"""Chapter 2's live dashboard without Jupyter: run_sync fills every view with the numbers of the geometry library
(checked against ``layer_asymmetry``), the heatmaps are symmetric with the right diagonals, experts without a
subspace are blanked and explained, the widgets build the config, bad configs go to the status line and keep the
plots, a failing geometry pass is reported without stopping the run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("jupyter_bokeh")

from bokeh.models import ColumnDataSource  # noqa: E402

from moewidgets.config import MoEConfig, RunConfig, TaskConfig, TrainConfig  # noqa: E402
from moewidgets.dashboards import chapter2 as ch2  # noqa: E402
from moewidgets.dashboards.chapter2 import Chapter2Dashboard, probe_asymmetry  # noqa: E402
from moewidgets.geometry.asymmetry import layer_asymmetry  # noqa: E402
from moewidgets.train import trace_model  # noqa: E402

SMALL = RunConfig(model=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=16),
                  task=TaskConfig(d_in=16, d_out=16, n_clusters=4, n_train=1024, n_probe=256),
                  train=TrainConfig(steps=40, batch_size=64, device="cpu"))
VIEWS = ("distance", "alignment", "scatter", "loss")


def sources(dash: Chapter2Dashboard) -> dict[str, dict]:
    """Every view's data, column by column, NaN as the string "nan" (NaN ≠ NaN would make two reads of the same
    data unequal: a cell of an expert with too few routed points is NaN)."""
    out = {}
    for name in VIEWS:
        for field, src in vars(getattr(dash.views, name)).items():
            if isinstance(src, ColumnDataSource):
                out[f"{name}.{field}"] = {k: ["nan" if isinstance(x, float) and math.isnan(x) else x for x in v]
                                          for k, v in src.data.items()}
    return out


def cells(dash: Chapter2Dashboard, name: str) -> np.ndarray:
    """The E×E matrix a heatmap shows, rebuilt from its cells (x = column, y = row)."""
    data = getattr(dash.views, name).cells.data
    x, y, v = (np.asarray(data[k], dtype=float) for k in ("x", "y", "value"))
    E = int(round(math.sqrt(len(v))))
    M = np.full((E, E), np.nan)
    M[y.astype(int), x.astype(int)] = v
    return M


def tiny_run(E: int, k: int, n_probe: int) -> RunConfig:
    return RunConfig(model=MoEConfig(n_experts=E, k=k, d_model=16, d_hidden=16),
                     task=TaskConfig(d_in=16, d_out=16, n_clusters=4, n_train=512, n_probe=n_probe),
                     train=TrainConfig(steps=10, batch_size=64, device="cpu"))


@pytest.fixture(scope="module")
def trained() -> Chapter2Dashboard:
    dash = Chapter2Dashboard(SMALL, autostart=False)
    dash.run_sync()
    return dash


def test_run_sync_fills_every_view_with_the_probe_numbers(trained):
    dash = trained
    assert dash.status.endswith("— done"), dash.status
    for name, data in sources(dash).items():
        if name != "loss.ref":                                  # no reference run in chapter 2
            assert all(len(col) > 0 for col in data.values()), name
    assert len(dash.views.loss.ref.data["x"]) == 0
    p = dash.probe
    assert p.step == 40 and p.n_points == 256 and p.rank == ch2.RANK and dash.track.error is None
    assert dash.track.geometry_s and dash.track.geometry_s[-1] == p.wall_s
    D, A = cells(dash, "distance"), cells(dash, "alignment")
    np.testing.assert_allclose(D, p.distance_EE, equal_nan=True)
    np.testing.assert_allclose(A, np.abs(p.alignment.matrix.numpy()), equal_nan=True)
    pp = p.pairs()
    pts = dash.views.scatter.points.data
    ok = np.isfinite(pp.distance) & np.isfinite(pp.alignment)
    np.testing.assert_allclose(pts["x"], pp.distance[ok])
    np.testing.assert_allclose(pts["y_value"], pp.alignment[ok])
    assert list(pts["label"]) == [lab for lab, keep in zip(pp.labels, ok) if keep]
    refs = dash.views.scatter.refs.data
    assert list(refs["label"]) == ["split-half floor (x)", "isotropic (x)", "alignment null (y)",
                                   "split-half ceiling (y)"]
    np.testing.assert_allclose(refs["x0"][:2], [p.comparison.floor_mean, p.comparison.iso_mean])
    np.testing.assert_allclose(dash.views.scatter.band.data["left"], [p.comparison.group_null_lo_mean])
    h = dash.trainer.history
    np.testing.assert_allclose(dash.views.loss.experts.data["ys"][0], np.maximum(h.loss, 1e-6))


def test_heatmaps_are_symmetric_with_zero_and_one_diagonals(trained):
    D, A = cells(trained, "distance"), cells(trained, "alignment")
    for M in (D, A):
        np.testing.assert_allclose(M, M.T, atol=1e-6, equal_nan=True)
    kept = trained.probe.subspaces.kept.numpy()
    live = ~trained.probe.alignment.dead.numpy()
    assert kept.sum() >= 2 and live.all()
    np.testing.assert_allclose(np.diag(D)[kept], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(A)[live], 1.0, atol=1e-5)
    off = ~np.eye(len(D), dtype=bool)
    assert np.all((D[off][np.isfinite(D[off])] > 0) & (D[off][np.isfinite(D[off])] <= 1))
    assert np.all(A[off] < 1)


def test_probe_matches_layer_asymmetry_with_the_same_generator(trained):
    """probe_asymmetry draws in layer_asymmetry's order, so the same seed gives the same numbers."""
    tr = trained.trainer
    x_ND = tr.data.x_probe[:ch2.N_PROBE]
    p = probe_asymmetry(tr.model, x_ND, rank=3, n_draws=5, n_splits=3, seed=7)
    ref = layer_asymmetry(tr.model.layer.experts, trace_model(tr.model, x_ND), rank=3, n_draws=5, n_splits=3,
                          generator=7)
    torch.testing.assert_close(p.alignment.matrix, ref.alignment.matrix, equal_nan=True)
    torch.testing.assert_close(p.comparison.observed, ref.comparison.observed, equal_nan=True)
    assert p.comparison.summary() == pytest.approx(ref.comparison.summary(), nan_ok=True)
    assert p.summary.summary() == pytest.approx(ref.summary.summary(), nan_ok=True)


def test_status_summary_and_caption(trained):
    text = trained.status_summary()
    assert text.startswith("top-2 of 4 · τ=1 · α=0 · seed 0 — 40/40 steps · final train MSE ")
    assert " · d̂_geo " in text and "random-group null" in text and "(null " in text and text.endswith(" · done")
    cap = trained.views.caption.text
    assert "step 40/40" in cap and "256 probe points" in cap and "rank-4" in cap
    title = trained.views.distance.figure.title.text
    assert "random-group null" in title and "split-half floor" in title and "isotropic" in title
    assert "null" in trained.views.alignment.figure.title.text


@pytest.mark.parametrize("E,k,n_probe", [(8, 1, 64), (4, 1, 16), (2, 1, 8), (4, 4, 64)])
def test_experts_without_a_subspace_are_blank_and_explained(E, k, n_probe):
    dash = Chapter2Dashboard(tiny_run(E, k, n_probe), autostart=False)
    dash.run_sync()
    assert dash.status.endswith("— done") and dash.track.error is None
    p = dash.probe
    D = cells(dash, "distance")
    assert D.shape == (E, E)
    for e in range(E):
        blank = bool(np.isnan(D[e]).all())
        assert blank == (e in p.skipped), (e, p.skipped)
    if p.skipped:
        assert "no subspace (grey cells)" in dash.views.caption.text
        assert "without a subspace" in dash.status_summary()
        assert all(f"expert {e}:" in dash.views.caption.text for e in p.skipped)
    else:
        assert "every expert has a subspace" in dash.views.caption.text
    n_pairs = int((np.isfinite(p.pairs().distance) & np.isfinite(p.pairs().alignment)).sum())
    assert len(dash.views.scatter.points.data["x"]) == n_pairs
    if len(p.subspaces.kept_experts) < 2:                       # no pair: no null band, titles say "–"
        assert len(dash.views.scatter.band.data["left"]) == 0
        assert "mean d̂_geo –" in dash.views.distance.figure.title.text


def test_geometry_every_and_always_at_the_end():
    dash = Chapter2Dashboard(tiny_run(4, 2, 128), autostart=False)
    dash.redraw_s, dash.geometry_every = 0.0, 1000            # every chunk redraws the loss; geometry only at the end
    dash.run_sync()
    assert dash.track.redraws > 1 and len(dash.track.geometry_s) == 1 and dash.probe.step == 10


def test_a_failing_geometry_pass_is_reported_and_the_run_goes_on(monkeypatch):
    dash = Chapter2Dashboard(tiny_run(4, 2, 128), autostart=False)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ch2, "probe_asymmetry", broken)
    dash.run_sync()
    assert dash.status.endswith("— done") and dash.probe is None
    assert "geometry failed at step 10: RuntimeError: boom" in dash.views.caption.text


def test_widgets_build_the_config_and_repr_is_short():
    dash = Chapter2Dashboard(SMALL, autostart=False)
    assert repr(dash) == "Chapter2Dashboard(top-2 of 4, τ=1, α=0, seed=0)"
    assert repr(Chapter2Dashboard(autostart=False)) == "Chapter2Dashboard(top-2 of 8, τ=1, α=0, seed=0)"
    dash.w_tau.value = 0.5
    dash.w_aux.value = 0.01
    dash.w_seed.value = 3
    m = dash.config.model
    assert (m.temperature, m.aux_weight, m.seed) == (0.5, 0.01, 3)
    dash.w_experts.value = 3
    assert dash.w_k.max == 3 and dash.config.model.n_experts == 3
    dash.w_k.value = 3
    assert dash.config.model.label == "soft (3)"
    assert '"temperature": 0.5' in dash.w_json.value
    assert repr(dash) == "Chapter2Dashboard(soft (3), τ=0.5, α=0.01, seed=3)"
    dash.runner.stop()
    assert dash._repr_mimebundle_()["text/plain"] == repr(dash)


def test_bad_config_goes_to_the_status_line_and_keeps_the_plots(trained):
    dash = trained
    before, caption = sources(dash), dash.views.caption.text
    config = dash.config
    assert not dash.load_json("{not json")
    assert dash.status.startswith("error: config JSON is not valid JSON")
    assert not dash.load_json(config.to_json().replace('"temperature": 1.0', '"temperature": -1'))
    assert "MoEConfig.temperature=-1 must be > 0" in dash.status
    assert not dash.load_json(config.to_json().replace('"arch": "moe"', '"arch": "dense"'))
    assert "must be 'moe' here" in dash.status
    one = config.replace(model=config.model.replace(n_experts=1, k=1))
    assert not dash.load_json(one.to_json())
    assert "n_experts=1 must be >= 2" in dash.status
    assert sources(dash) == before and dash.views.caption.text == caption and dash.config == config


def test_docstring_examples():
    import doctest
    import moewidgets.views as views
    assert doctest.testmod(ch2, optionflags=doctest.ELLIPSIS).failed == 0
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(views.build_scatter_view, "build_scatter_view", globs=vars(views).copy()):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
