"""moewidgets.figures: static PNG figures for chapter outputs (labelled, small, deterministic, nbval-stable)."""
from __future__ import annotations

import base64
import doctest
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moewidgets import figures
from moewidgets.figures import (StaticFigure, loss_figure, plot_trajectories, render, track_figure, track_series,
                                trajectories)
from moewidgets.train import History

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def seeds_SN(s: int = 4, n: int = 12, offset: float = 0.0) -> np.ndarray:
    g = np.random.default_rng(7)
    x = np.arange(n)
    return 1.0 + offset + np.exp(-x / 4)[None, :] + 0.1 * g.standard_normal((s, n))


def example(**kw) -> StaticFigure:
    x_N = np.arange(12) * 50
    args = dict(xlabel="training step", ylabel="batch MaxVio", title="Load imbalance",
                caption="Mean ± sd over 4 seeds.")
    args.update(kw)
    return trajectories(x_N, {"aux": seeds_SN(), "none": seeds_SN(offset=0.5)}, **args)


def decode(png: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(png))
    im.load()
    return im


def test_png_decodes_with_the_stated_size_and_is_small():
    fig = example()
    assert fig.png.startswith(PNG_MAGIC)
    im = decode(fig.png)
    assert im.size == (fig.width_px, fig.height_px) == (640, 360)
    assert 2_000 < len(fig.png) < 60_000, len(fig.png)
    # three panels side by side, at another dpi
    wide = trajectories([0, 1, 2], {"p": {"a": [1, 2, 3]}, "q": {"a": [3, 2, 1]}, "r": {"a": [1, 1, 1]}},
                        xlabel="step", ylabel=["λ", "|cos|", "σ1/σ2"], title="t", caption="c", dpi=80)
    assert decode(wide.png).size == (wide.width_px, wide.height_px) == (864, 272)


def test_output_bundle_has_png_and_a_short_stable_caption():
    from IPython.core.formatters import DisplayFormatter

    fig = example()
    data, meta = DisplayFormatter().format(fig)          # what the kernel sends, and what nbval compares
    assert set(data) == {"image/png", "text/plain"}
    assert base64.b64decode(data["image/png"]) == fig.png
    assert data["text/plain"] == "Figure: Load imbalance. Mean ± sd over 4 seeds."
    assert meta["image/png"] == {"width": 640, "height": 360}
    assert "bokeh" not in json.dumps(data).lower()       # never BokehJS in a notebook


def test_two_renders_compare_equal_as_nbval_would():
    from IPython.core.formatters import DisplayFormatter

    a, _ = DisplayFormatter().format(example())
    b, _ = DisplayFormatter().format(example())
    assert a["text/plain"] == b["text/plain"]
    assert a["image/png"] == b["image/png"]              # even the bytes (nbval skips them anyway)


def test_a_users_matplotlib_settings_do_not_change_the_bytes():
    import matplotlib

    ref = example().png
    with matplotlib.rc_context({"lines.linewidth": 6, "font.size": 22, "axes.grid": False, "figure.dpi": 200}):
        assert example().png == ref
        assert matplotlib.rcParams["lines.linewidth"] == 6       # the user's settings are restored afterwards


def test_axes_labels_legend_and_log_scale_are_on_the_figure():
    fig = plot_trajectories(np.arange(12), {"aux": seeds_SN(), "none": seeds_SN(offset=0.5)}, xlabel="training step",
                            ylabel="loss (MSE)", title="Loss", logy=True, styles={"none": "--"})
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("training step", "loss (MSE)", "Loss")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["aux", "none"]
    assert ax.get_yscale() == "log"
    assert [ln.get_linestyle() for ln in ax.lines] == ["-", "--"]
    out = render(fig, "Two arms.")
    assert out.caption == "Loss. Two arms." and out.figure is fig


def test_line_is_the_mean_and_band_is_mean_pm_sample_sd():
    y_SN = seeds_SN(s=5, n=9)
    x_N = np.arange(9) * 10.0
    fig = plot_trajectories(x_N, {"a": y_SN}, xlabel="x", ylabel="y", title="t")
    (ax,) = fig.axes
    mean = [statistics.mean(y_SN[:, n]) for n in range(9)]           # slow, obvious oracle
    sd = [statistics.stdev(y_SN[:, n]) for n in range(9)]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), mean, rtol=1e-12)
    (band,) = ax.collections
    verts = band.get_paths()[0].vertices
    for n, x in enumerate(x_N):
        ys = verts[np.isclose(verts[:, 0], x), 1]
        assert np.isclose(ys, mean[n] + sd[n]).any() and np.isclose(ys, mean[n] - sd[n]).any(), (n, ys)
    # one seed: no band; band=False: no band
    assert not plot_trajectories(x_N, {"a": y_SN[0]}, xlabel="x", ylabel="y", title="t").axes[0].collections
    assert not plot_trajectories(x_N, {"a": y_SN}, xlabel="x", ylabel="y", title="t", band=False).axes[0].collections


def rows_with_tracks() -> list[dict]:
    g = np.random.default_rng(3)
    rows = []
    for arm in ("none", "lfb"):
        for seed in range(3):
            rows.append({"arm": arm, "seed": seed, "metrics": {"track": {
                "step": [50, 100, 150], "maxvio": g.uniform(0, 2, 3).tolist(), "lam": g.uniform(0, 1, 3).tolist()}}})
    rows.append({"arm": "timing", "seed": 0, "metrics": {"mpi_ms": 1.0}})
    return rows


def test_track_series_against_a_loop_and_its_errors():
    rows = rows_with_tracks()
    steps_N, by_arm = track_series(rows, ["none", "lfb"], "maxvio")
    assert steps_N.tolist() == [50, 100, 150]
    for arm in ("none", "lfb"):
        expect = [r["metrics"]["track"]["maxvio"] for r in rows if r["arm"] == arm]
        assert by_arm[arm].tolist() == expect
    with pytest.raises(ValueError, match="arm='kmeans' has no row"):
        track_series(rows, ["kmeans"], "maxvio")
    with pytest.raises(ValueError, match="key='cos' is not in arm 'none'"):
        track_series(rows, ["none"], "cos")
    rows[3]["metrics"]["track"]["step"] = [50, 100, 200]
    with pytest.raises(ValueError, match="other steps"):
        track_series(rows, ["none", "lfb"], "maxvio")


def test_track_figure_one_panel_per_key_on_the_committed_results():
    rows = [json.loads(line) for line in (ROOT / "book" / "results" / "chapter4.jsonl").read_text().splitlines()]
    arms = sorted({r["arm"] for r in rows if "track" in r.get("metrics", {})})
    fig = track_figure(rows, arms, ["lam", "cos"], ylabel=["alignment λ", "|cos(r, v₁)|"],
                       title="Alignment during training", caption="Mean over seeds, band ± sd.")
    assert [ax.get_ylabel() for ax in fig.figure.axes] == ["alignment λ", "|cos(r, v₁)|"]
    assert [t.get_text() for t in fig.figure.axes[0].get_legend().get_texts()] == arms
    assert len(fig.figure.axes[1].lines) == len(arms)
    assert repr(fig) == "Figure: Alignment during training. Mean over seeds, band ± sd."


def test_loss_figure_from_histories_with_window_means():
    def hist(scale: float) -> History:
        h = History()
        for t in range(1, 41):
            h.step.append(t)
            h.loss.append(scale / t)
            h.aux.append(0.0)
            h.load.append([])
        return h

    fig = loss_figure({"top-1": [hist(1.0), hist(1.2)], "top-2": hist(0.5)}, title="Training loss",
                      caption="Window means of 10 steps.", smooth=10)
    ax = fig.figure.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "training step"
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [10, 20, 30, 40])
    expect = [statistics.mean(statistics.mean(s / t for t in range(w * 10 + 1, w * 10 + 11)) for s in (1.0, 1.2))
              for w in range(4)]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), expect, rtol=1e-12)
    with pytest.raises(ValueError, match="smooth=0"):
        loss_figure({"a": [1.0, 0.5]}, title="t", caption="c", smooth=0)
    with pytest.raises(ValueError, match="non-positive"):
        loss_figure({"a": [1.0, 0.0, 0.5]}, title="t", caption="c")


@pytest.mark.parametrize("kw, match", [
    ({"xlabel": ""}, "xlabel=''"),
    ({"ylabel": "  "}, "ylabel="),
    ({"caption": ""}, "caption=''"),
    ({"title": None}, "title=None"),
    ({"dpi": 1000}, "dpi=1000 must be in 30..300"),
])
def test_unlabelled_or_bad_figures_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        example(**kw)


def test_bad_series_shapes_name_the_series():
    with pytest.raises(ValueError, match=r"series 'a' has shape \(3,\); allowed: \(4,\)"):
        trajectories(np.arange(4), {"a": [1, 2, 3]}, xlabel="x", ylabel="y", title="t", caption="c")
    with pytest.raises(ValueError, match="ylabel has 1 entries; allowed: one per panel"):
        trajectories([0, 1], {"p": {"a": [1, 2]}, "q": {"a": [1, 2]}}, xlabel="x", ylabel="y", title="t", caption="c")


def test_import_moewidgets_does_not_import_matplotlib():
    code = ("import sys, moewidgets, moewidgets.figures; "
            "assert 'matplotlib' not in sys.modules, sorted(m for m in sys.modules if 'matplotlib' in m)[:3]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_docstring_examples_run():
    result = doctest.testmod(figures, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


def _claim(verdict, diffs, sign, mean_a=1.0, mean_b=2.0, role="decides"):
    from moewidgets.reproduce import ClaimResult
    d = np.array(diffs, dtype=float)
    return ClaimResult("X-1", "a below b", "m", "a", "b", mean_a, 0.1, mean_b, 0.1, int(np.sum(np.sign(d) == sign)),
                       len(d), (float(d.min()), float(d.max())), verdict == "holds", True, verdict=verdict, role=role,
                       diffs=tuple(d), sign=sign)


def test_forest_figure_puts_agreement_right_of_zero_and_colours_by_verdict():
    from moewidgets.figures import VERDICT_COLOURS, forest_figure
    agree = _claim("holds", [-0.3, -0.2, -0.25], -1)            # below, as predicted → right of zero
    disagree = _claim("fails", [0.3, 0.2, 0.25], -1)            # above, against the prediction → left of zero
    context = _claim("holds", [1.0, 1.0], +1, role="context")    # left out by default
    fig = forest_figure([agree, disagree, context], title="T", caption="C.").figure
    ax = fig.axes[0]
    dots = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert len(dots) == 2                                        # the context row is not drawn
    by_colour = {ln.get_color(): ln.get_xdata() for ln in dots}
    scale = (1.0 + 2.0) / 2
    np.testing.assert_allclose(by_colour[VERDICT_COLOURS["holds"]], np.array([0.3, 0.2, 0.25]) / scale * 100)
    np.testing.assert_allclose(by_colour[VERDICT_COLOURS["fails"]], -np.array([0.3, 0.2, 0.25]) / scale * 100)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["X-1 a vs b: m", "X-1 a vs b: m"]
    assert ax.get_xlabel() and len(fig.legends) == 1                # the legend sits below the axes, not on a row
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["holds", "fails", "mean over seeds"]


def test_forest_figure_refuses_rows_without_differences():
    from moewidgets.figures import forest_figure
    bare = _claim("holds", [-0.3, -0.2], -1)
    bare = type(bare)(**{**bare.__dict__, "diffs": ()})
    with pytest.raises(ValueError, match="per-seed differences"):
        forest_figure([bare], title="T", caption="C.")
    with pytest.raises(ValueError, match="no row with role"):
        forest_figure([_claim("holds", [1.0], 1, role="ours")], title="T", caption="C.")
