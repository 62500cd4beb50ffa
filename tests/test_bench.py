"""The benchmark suite's correctness (never its timings): the baselines compute what ours computes, the helpers
fit and summarise correctly, and a tiny run renders its report, its book page and an offline figure."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common, jacobians, scaling  # noqa: E402
from bench import run as bench_run  # noqa: E402
from moewidgets.geometry.jacobians import expert_jacobians  # noqa: E402
from moewidgets.nn.experts import make_experts  # noqa: E402


@pytest.mark.parametrize("E,K", [(2, 1), (4, 2), (8, 2)])
def test_mixtral_copy_matches_ours(E, K):
    pytest.importorskip("transformers")
    from bench import layer
    ours = layer.make_ours(48, 8, E, K, seed=E + K)
    block = layer.mixtral_from_ours(ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 8, generator=g).requires_grad_(True)
    match = layer.check_match(ours, block, x, torch.randn(48, 8, generator=g))
    assert match["routing_equal"] and match["max_abs_dy"] < 1e-5 and match["max_abs_dw"] < 1e-4


def test_check_match_refuses_different_layers():
    pytest.importorskip("transformers")
    from bench import layer
    ours = layer.make_ours(32, 8, 4, 2)
    block = layer.mixtral_from_ours(ours)
    with torch.no_grad():
        block.experts.down_proj.mul_(1.01)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with pytest.raises(RuntimeError, match="disagree"):
        layer.check_match(ours, block, x, torch.ones(32, 8))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_jacobian_baselines_equal_closed_form(activation):
    g = torch.Generator().manual_seed(0)
    bank = make_experts(activation, 3, 5, 7, g, dtype=torch.float64)
    X = torch.randn(4, 5, generator=g, dtype=torch.float64)
    ours = expert_jacobians(bank, X)
    torch.testing.assert_close(jacobians.vmap_jacrev_jacobians(bank, X), ours)
    torch.testing.assert_close(jacobians.loop_jacobians(bank, X), ours)


def test_fit_power_law_recovers_exponent_and_prefactor():
    xs = [1.0, 2.0, 4.0, 8.0]
    fit = common.fit_power_law(xs, [3.0 * x ** 1.5 for x in xs])
    assert math.isclose(fit["exponent"], 1.5) and math.isclose(fit["prefactor"], 3.0) and fit["r2"] > 0.999999


def test_stats_and_ratios_are_per_repeat():
    assert common.stats([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "n": 3}
    r = common.ratio_stats([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)


def test_interleaved_runs_every_candidate_each_repeat():
    calls = []
    times, inner = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      repeats=3, min_block_s=0.0)
    assert [len(v) for v in times.values()] == [3, 3] and inner == {"a": 1, "b": 1}
    assert calls[-6:] == ["a", "b", "b", "a", "a", "b"]          # order alternates between repeats


def test_count_torch_ops_counts_forward_and_backward():
    w = torch.randn(4, 4, requires_grad=True)
    n_fwd = common.count_torch_ops(lambda: (w @ w).sum())
    n_both = common.count_torch_ops(lambda: (w @ w).sum().backward())
    assert 0 < n_fwd < n_both


def test_tiny_suite_renders_report_page_and_offline_figure(tmp_path):
    quiet = lambda *a, **k: None  # noqa: E731
    benches = {"jacobians": jacobians.bench_jacobians(1, 0.0, 1, size={"E": 2, "N": 3, "D": 4, "F": 8}, log=quiet),
               "scaling": scaling.bench_scaling(1, 0.0, sweeps={"tokens": ("T", (16, 32, 64))}, log=quiet)}
    if pytest.importorskip("transformers"):
        from bench import layer
        benches["layer"] = layer.bench_layer(1, 0.0, grid=[(512, 8, 4, 1), (2048, 8, 4, 2)], log=quiet)
    benches["multiseed"] = {"skipped": "not here"}
    results = {"environment": common.environment("cpu"), "quick": True, "benches": benches}
    text = bench_run.report(results)
    assert "## Targets" in text and "ours vs vmap(jacrev)" in text and "not measured: not here" in text
    (tmp_path / "bench-cpu-1t.json").write_text(json.dumps(results))
    sys.path.insert(0, str(ROOT / "tools"))
    import make_performance_figure as page
    md, html = tmp_path / "performance.md", tmp_path / "fig.html"
    assert page.build(tmp_path, md_path=md, html_path=html) == [html, md]
    body = html.read_text()
    assert "BEGIN bokeh.min.js" in body and "cdn.bokeh.org" not in body          # BokehJS inline: renders offline
    text = md.read_text()
    assert '<iframe src="fig.html"' in text and "| what | target |" in text
    assert "the suite has never been run on a GPU" in text                    # no bench-cuda-*.json given


def test_lm_benchmark_compares_models_of_the_same_size_and_both_train():
    pytest.importorskip("transformers")
    from bench import lm
    cfg = lm.lm_config("cpu").replace(n_layers=1, vocab_size=64, batch_size=2, seq_len=8)
    ours, theirs = lm.build_lm(cfg, 64), lm.mixtral_like(cfg, 64)
    hf = theirs.config
    assert (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.num_local_experts, hf.num_experts_per_tok,
            hf.tie_word_embeddings) == (1, 64, 128, 8, 2, False)
    assert cfg.moe.expert == "swiglu" and cfg.moe.gate == "renorm" and cfg.pos == "rope" and not cfg.tie_embeddings
    # the same architecture up to small extras (our biases, norms' shapes): parameter counts within 1 %
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert abs(n_ours - n_theirs) / n_theirs < 0.01, (n_ours, n_theirs)
    ids = torch.randint(64, (2, 9), generator=torch.Generator().manual_seed(0))
    for model, logits_of in ((ours, lambda x: ours(x).logits_BSV), (theirs, lambda x: theirs(input_ids=x).logits)):
        before = [p.detach().clone() for p in model.parameters()]
        loss = lm._train_step(model, logits_of, ids[:, :-1], ids[:, 1:])()
        assert math.isfinite(float(loss)) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    res = lm.bench_lm(1, 0.0, cfg=cfg, log=lambda *a: None)          # the suite's entry, at the tiny size
    assert res["targets"][0]["bench"] == "lm" and res["speedup"]["n"] == 1 and res["tokens_per_s_ours"] > 0
    text = bench_run.report({"environment": common.environment("cpu"), "quick": True, "benches": {"lm": res}})
    assert "## The transformer LM vs MixtralForCausalLM" in text and "MixtralForCausalLM" in text


def test_dashboard_bench_times_real_runs_and_the_page_shows_kernel_and_browser(tmp_path):
    """bench/dashboards.py drives a real (small) chapter-1 dashboard through its k slider; the report and the
    Performance page put the kernel side and the browser test's timings beside their targets."""
    from bench import dashboards
    from moewidgets import RunConfig, TaskConfig, TrainConfig
    from moewidgets.dashboards import Chapter1Dashboard
    small = RunConfig(task=TaskConfig(n_train=512, n_probe=128), train=TrainConfig(steps=30, device="cpu"))
    res = dashboards.time_k_moves(Chapter1Dashboard, 2, config=small)
    assert res["steps"] == 30
    for key in ("change_to_done_s", "fire_to_done_s", "first_redraw_s", "redraws_per_s", "probes_s"):
        assert res[key]["n"] == 2 and math.isfinite(res[key]["median_s"]) and res[key]["min_s"] > 0, key
    # a single change after a quiet spell starts at once: no debounce (0.25 s) between the change and the work
    assert res["fire_to_done_s"]["min_s"] <= res["change_to_done_s"]["min_s"] < res["fire_to_done_s"]["min_s"] + 0.2
    assert res["first_redraw_s"]["max_s"] <= res["fire_to_done_s"]["max_s"]
    dash = {"what": "x", "chapters": {"chapter1": res}, "targets": []}
    text = "\n".join(bench_run.dashboards_lines(dash))
    assert "| chapter1 | 30 |" in text
    browser = {"keypress_to_status_ms": 90.0, "keypress_to_done_ms": 2500.0, "redraws_per_s_kernel": 6.0,
               "debounce_to_first_redraw_ms_kernel": 40.0, "date": "2026-12-02 18:00",
               "moves": [{"move": "experts E: ArrowLeft", "keypress_to_status_ms": 95.0, "keypress_to_done_ms": 3100.0}]}
    src = tmp_path / "latency.json"
    src.write_text(json.dumps(browser))
    assert bench_run.copy_browser_timings(tmp_path, src) == tmp_path / "browser-chapter1.json"
    results = {"environment": common.environment("cpu"), "quick": True, "benches": {"dashboards": dash}}
    (tmp_path / "bench-cpu-1t.json").write_text(json.dumps(results))
    sys.path.insert(0, str(ROOT / "tools"))
    import make_performance_figure as page
    md = tmp_path / "performance.md"
    page.build(tmp_path, md_path=md, html_path=tmp_path / "fig.html")
    body = md.read_text()
    assert "## What a student waits for" in body
    row = next(line for line in body.splitlines() if line.startswith("| k slider → new run done"))
    assert "2.50 s" in row and row.rstrip(" |").endswith("missed")               # 2.5 s > 2 s: browser missed
    assert "| k slider → status line acknowledges | ≤ 150 ms (browser) | – | 90 ms | met |" in body
    assert "E 8 → 7" in body and "3.10 s" in body
