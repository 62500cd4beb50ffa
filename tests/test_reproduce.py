"""Sweeps (cache, resume, executors) and chapter-1 claim runs (verdict rule, committed rows re-run live)."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import moewidgets
from moewidgets import reproduce as rp
from moewidgets.reproduce import common as rc
from moewidgets.sweep import Job, job_key, read_jsonl, run_jobs, write_jsonl


def _jobs(xs):
    return [Job("sq", "moewidgets.sweep:_square", {"x": x}, seed=0) for x in xs]


def test_run_jobs_serial_and_executor_agree(tmp_path):
    serial = run_jobs(_jobs([1, 2, 3]), progress=False)
    with ThreadPoolExecutor(2) as ex:
        pooled = run_jobs(_jobs([1, 2, 3]), executor=ex, progress=False)
    assert [r["metrics"] for r in serial] == [r["metrics"] for r in pooled] == [{"y": 1}, {"y": 4}, {"y": 9}]
    assert {"arm", "seed", "config", "metrics", "wall_s", "device", "version", "torch"} <= set(serial[0])


def test_cache_resumes_and_invalidates(tmp_path, monkeypatch):
    run_jobs(_jobs([1, 2]), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 2
    calls = []
    import moewidgets.sweep as sw
    real = sw._execute
    monkeypatch.setattr(sw, "_execute", lambda job, threads: calls.append(job.payload["x"]) or real(job, threads))
    rows = run_jobs(_jobs([1, 2, 3]), cache_dir=tmp_path, progress=False)   # resume: only x=3 runs
    assert calls == [3] and [r["metrics"]["y"] for r in rows] == [1, 4, 9]
    key = job_key(_jobs([1])[0])
    monkeypatch.setattr(moewidgets, "__version__", "9.9.9")                  # a new package version re-runs
    assert job_key(_jobs([1])[0]) != key


def _group(x, seeds=(0, 1, 2), fn="moewidgets.sweep:_square_seeds"):
    return Job("grp", fn, {"x": x}, seeds=seeds)


def test_seed_group_gives_one_row_per_seed_and_caches_them_together(tmp_path, monkeypatch):
    jobs = [_jobs([2])[0], _group(3)]
    rows = run_jobs(jobs, cache_dir=tmp_path, progress=False)
    assert [(r["arm"], r["seed"], r["metrics"]["y"]) for r in rows] == [("sq", 0, 4), ("grp", 0, 9), ("grp", 1, 10),
                                                                           ("grp", 2, 11)]
    assert rows[1]["group"] == {"seeds": [0, 1, 2], "wall_s": rows[1]["group"]["wall_s"]} and "group" not in rows[0]
    assert len({r["key"] for r in rows[1:]}) == 1 and len(list(tmp_path.glob("*.json"))) == 2
    import moewidgets.sweep as sw
    calls = []
    real = sw._execute
    monkeypatch.setattr(sw, "_execute", lambda job, threads: calls.append(job.arm) or real(job, threads))
    assert run_jobs(jobs + [_group(3, seeds=(0, 1))], cache_dir=tmp_path, progress=False)[:4] == rows
    assert calls == ["grp"]                  # only the new group (other seeds: another key) ran
    assert job_key(_group(3)) != job_key(_group(3, seeds=(0, 1))) != job_key(Job("grp", _group(3).fn, {"x": 3}))


def test_seed_group_returning_the_wrong_number_of_rows_is_named():
    with pytest.raises(Exception, match="must return a list of 3 metric dicts"):
        run_jobs([_group(1, fn="moewidgets.sweep:_square")], progress=False)


def test_jsonl_round_trip_and_missing_file(tmp_path):
    rows = [{"a": 1}, {"b": [1, 2]}]
    assert read_jsonl(write_jsonl(rows, tmp_path / "r.jsonl")) == rows
    with pytest.raises(FileNotFoundError, match="python -m moewidgets reproduce"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_bad_job_function_is_named():
    with pytest.raises(ValueError, match="Job.fn='nocolon' must look like"):
        run_jobs([Job("x", "nocolon")], progress=False)


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    v = np.array([1.0, 1.2, 0.9, 1.1, 1.05])
    lo, hi = rp.bootstrap_ci(v)
    assert lo < v.mean() < hi and (lo, hi) == rp.bootstrap_ci(v)


def _fake_rows(diffs, arm_a="top-2", metric="e2e_sigma1"):
    rows = []
    for s, d in enumerate(diffs):
        for arm, val in (("dense", 1.0), (arm_a, 1.0 + d)):
            m = {metric: val, "probe_mse": 0.01, "target_var": 1.0}
            rows.append({"arm": arm, "seed": s, "metrics": m})
            rows.append({"arm": arm + ":4x", "seed": s, "metrics": {"probe_mse": 0.0099}})
    return rc._by_arm(rows)


@pytest.mark.parametrize("diffs,verdict", [
    ([-0.1, -0.2, -0.15, -0.1, -0.12] * 2, "holds"),                # 10/10 negative, the t-test rejects 0
    ([-0.1, -0.2, 0.3, 0.25, -0.12] * 2, "fails"),                  # sign in 6/10 only
    ([-0.1, -0.2, -0.15, -0.1, 0.01] * 2, "holds"),                 # 8/10 is enough when the test rejects 0
    ([-0.001] * 9 + [-5.0], "fails"),                               # 10/10 negative, tiny beside the noise
    ([-0.1, -0.2, -0.15, -0.1, -0.12], "insufficient seeds"),       # 5 seeds: an MLP row needs 10
])
def test_pass_rule(diffs, verdict):
    r = rc._compare(_fake_rows(diffs), "SC-1", "", "e2e_sigma1", "top-2", "dense", -1)
    assert r.verdict == verdict and r.holds is (verdict == "holds") and r.n_seeds == len(diffs) and r.converged


def test_convergence_rule_is_two_sided():
    arms = _fake_rows([-0.1] * 10)
    assert rc._converged(arms, "top-2")
    arms["top-2:4x"][0]["probe_mse"] = 0.01 - 2 * rp.CONVERGENCE_MARGIN    # 4× run explains 1 % more variance
    assert not rc._converged(arms, "top-2")
    arms = _fake_rows([-0.1] * 10)
    arms["top-2:4x"][3]["probe_mse"] = 0.01 + 2 * rp.CONVERGENCE_MARGIN    # 4× run WORSE by 1 %: not converged
    assert not rc._converged(arms, "top-2")
    r = rc._compare(arms, "SC-1", "", "e2e_sigma1", "top-2", "dense", -1)
    assert (r.verdict, r.converged) == ("inconclusive", False)


def test_chapter3_loss_free_arm_with_a_worse_4x_run_is_not_converged():
    """The committed chapter-3 loss-free arm: seed 2's 4× run ends worse (0.00506 vs 0.00183)."""
    arms = rc._by_arm(rp.load_results("chapter3"))
    assert arms["lfb:4x"][2]["probe_mse"] > arms["lfb"][2]["probe_mse"] + rp.CONVERGENCE_MARGIN * arms["lfb"][2]["target_var"]
    assert not rc._converged(arms, "lfb") and rc._converged(arms, "none")
    rows = [r for r in rp.chapter3_claims(rp.load_results("chapter3")) if "lfb" in (r.arm_a, r.arm_b)]
    assert rows and all(not r.converged and r.verdict in ("inconclusive", "insufficient seeds") for r in rows)


def test_committed_rows_cover_every_arm_and_seed():
    rows = rp.load_results("chapter1")
    arms = rc._by_arm(rows)
    seeds = list(range(rp.MIN_SEEDS_MLP))                     # make reproduce: SEEDS=10, the rule's MLP minimum
    for arm in rp.CHAPTER1_ARMS:
        assert sorted(arms[arm]) == seeds and sorted(arms[arm + ":4x"]) == seeds, arm
    assert all(r["version"] and r["device"] and r["wall_s"] > 0 for r in rows)
    assert all(json.loads(json.dumps(r["config"]))["run"]["model"]["seed"] == r["seed"] for r in rows)
    # every arm's seeds were trained at once (one seed group per arm), on the dispatch path the payload names
    assert all(r["group"]["seeds"] == seeds and r["config"]["dispatch"] in ("dense", "gather") for r in rows)
    claims = rp.chapter1_claims(rows)
    assert {c.claim for c in claims} == {"SC-1", "SC-1b", "SC-2", "SC-3", "SC-4", "SC-5", "SC-6"}
    assert not any(c.verdict == "insufficient seeds" for c in claims)      # 10 seeds: every row is decided


@pytest.mark.parametrize("arm", ["dense", "top-2"])
def test_pinned_subset_matches_committed_rows(arm):
    """Tolerance: 2 % relative on each pinned metric (the runs use 1 thread; same machine kind → identical)."""
    (check,) = rp.pinned_subset(rp.load_results("chapter1"), arms=[arm], rtol=0.02)
    assert check.ok, f"{arm}: {check.worst_metric} deviates by {check.max_rel_dev:.2%} from the committed row"


def test_chapter3_committed_rows_cover_every_arm_and_seed():
    rows = rp.load_results("chapter3")
    arms = rc._by_arm(rows)
    for arm in rp.CHAPTER3_ARMS:
        seeds = list(range(rp.MIN_SEEDS_MLP))                 # make reproduce: SEEDS=10
        assert sorted(arms[arm]) == seeds and sorted(arms[arm + ":4x"]) == seeds, arm
    claims = rp.chapter3_claims(rows)
    assert {c.claim for c in claims} == {"RC-a", "RC-b", "RC-c", "RC-d", "RC-e", "RC-f", "RC-g"}
    assert all(r["metrics"]["steps"] == (8000 if r["arm"].endswith(":4x") else 2000) for r in rows)


@pytest.mark.parametrize("arm", ["aux-0.01", "kmeans+lfb"])
def test_chapter3_pinned_subset_matches_committed_rows(arm):
    (check,) = rp.pinned_subset(rp.load_results("chapter3"), arms=[arm], rtol=0.02, chapter="chapter3")
    assert check.ok, f"{arm}: {check.worst_metric} deviates by {check.max_rel_dev:.2%} from the committed row"


# ------------------------------------------------------------------------------ identified σ1: the (c, 1/c) gauge

def _claim_metrics(results) -> set[str]:
    """The metric names the claims rows that are reported as tests (roles decides / ours) compare."""
    names = set()
    for r in results:
        if r.role == "context":
            continue
        label = r.metric.removeprefix("gap in ").split(":")[0]
        names.update(part.strip() for part in label.split(" vs "))
    return names


@pytest.mark.parametrize("arm", ["top-2", "dense"])
def test_every_reported_claim_metric_is_invariant_under_the_readout_gauge(arm):
    """Scale the experts' output weights (and biases) by c and W_ro by 1/c: the function is unchanged, and so must
    be every metric a chapter-1 claim reports (while the gauge-dependent σ1 of J_i moves by c: the test can fail)."""
    import torch
    from moewidgets.config import TaskConfig
    from moewidgets.data import make_task
    from moewidgets.models import build_model
    from moewidgets.reproduce.chapter1 import _probe_metrics
    run = rp.chapter1_run(arm, 0)
    model = build_model(run.model, 32).double()
    data = make_task(TaskConfig(n_train=256, n_probe=256), seed=0)
    data.x_probe = data.x_probe.double()
    before = _probe_metrics(model, data, 256)
    pred = model(data.x_probe).pred_TO.detach()
    c = 3.0
    with torch.no_grad():
        model.layer.experts.w_out_EDF.mul_(c)
        model.layer.experts.b_out_ED.mul_(c)
        model.w_ro_OD.div_(c)
    assert torch.allclose(model(data.x_probe).pred_TO, pred, atol=1e-10)          # the function is unchanged
    after = _probe_metrics(model, data, 256)
    # the metrics the claims report: from the claims function itself, on rows carrying these metrics
    rows = []
    for a in rp.CHAPTER1_ARMS:
        for s in range(10):
            m = {**before, **{f"init_{k}": v for k, v in before.items()}, "probe_mse": 0.01, "target_var": 1.0}
            m.setdefault("pseudo_align_mean_abs", 0.1)
            rows += [{"arm": a, "seed": s, "metrics": m}, {"arm": a + ":4x", "seed": s, "metrics": m}]
    reported = _claim_metrics(rp.chapter1_claims(rows))
    assert {"e2e_sigma1", "e2e_layer_sigma1", "stable_rank", "pca_entropy", "align_mean_abs"} <= reported
    assert "sigma1" not in reported and "layer_sigma1" not in reported
    for name in sorted(reported & set(before)):
        if math.isnan(before[name]):
            assert math.isnan(after[name]), name
            continue
        assert after[name] == pytest.approx(before[name], rel=1e-6, abs=1e-9), name
    assert after["sigma1"] == pytest.approx(c * before["sigma1"], rel=1e-6)           # the gauge moves σ1(J_i)
    assert after["layer_sigma1"] == pytest.approx(c * before["layer_sigma1"], rel=1e-6)


# ---------------------------------------------------------------------------------- seeds, folders, stale files

def test_seed_start_threads_through_every_chapter():
    for name, spec in rp.CHAPTERS.items():
        jobs = spec.jobs(10, seed_start=100)
        seeds = {s for j in jobs for s in (j.seeds or (j.seed,))}
        assert seeds == set(range(100, 110)), name
    assert rp.chapter1_jobs(2, arms=["top-2"])[0].seeds == (0, 1)


@pytest.mark.parametrize("kw, match", [({"seeds": 1}, "seeds=1 must be an integer >= 2"),
                                       ({"seeds": 2.5}, "seeds=2.5 must be an integer"),
                                       ({"seeds": 10, "seed_start": -1}, "seed_start=-1 must be a non-negative"),
                                       ({"seeds": 10, "seed_start": 1.5}, "seed_start=1.5 must be")])
def test_bad_seeds_fail_before_any_run(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        rp.reproduce("chapter1", out_dir=tmp_path, cache_dir=tmp_path, progress=False, **kw)
    assert not list(tmp_path.iterdir())


def test_reproduce_writes_to_a_build_folder_by_default():
    import inspect
    assert rp.DEFAULT_OUT_DIR == rp.DEFAULT_OUT_DIR.__class__("build") / "results"
    assert inspect.signature(rp.reproduce).parameters["out_dir"].default is None
    src = inspect.getsource(rp.reproduce)
    assert "DEFAULT_OUT_DIR" in src and "RESULTS_DIR" not in src


def test_results_dir_comes_from_the_environment_or_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEWIDGETS_RESULTS", str(tmp_path))
    assert rc._locate_results_dir() == tmp_path and rc.results_dir() == tmp_path
    monkeypatch.delenv("MOEWIDGETS_RESULTS")
    assert rc.results_dir().parts[-2:] == ("book", "results")
    monkeypatch.setattr(rc, "_locate_results_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="MOEWIDGETS_RESULTS.*book/results"):
        rc.results_dir()


def test_load_results_refuses_rows_from_two_commits(tmp_path):
    rows = [{"arm": "top-2", "seed": s, "metrics": {}, "version": "0.1.0", "commit": "aaa"} for s in range(3)]
    rows.append({"arm": "dense", "seed": 0, "metrics": {}, "version": "0.1.0", "commit": "bbb"})
    write_jsonl(rows, tmp_path / "chapter1.jsonl")
    with pytest.raises(ValueError, match=r"2 commits/versions.*commit='aaa'.*top-2/0.*commit='bbb'.*dense/0"):
        rp.load_results("chapter1", tmp_path)
    write_jsonl([{k: v for k, v in r.items() if k != "commit"} for r in rows], tmp_path / "chapter1.jsonl")
    assert len(rp.load_results("chapter1", tmp_path)) == 4          # no commit field: one group


@pytest.mark.parametrize("chapter", sorted(rp.CHAPTERS))
def test_claims_render_on_the_committed_rows(chapter):
    rows = rp.load_results(chapter)
    claims = rp.CHAPTERS[chapter].claims(rows)
    table = rp.claims_table(claims)
    assert table.count("\n") == len(claims) + 1
    assert all(c.verdict in ("insufficient seeds", "inconclusive", "holds", "fails") for c in claims)
    # a row holds only with enough seeds, converged arms and the predicted sign on most seeds
    assert all(c.n_seeds >= rp.MIN_SEEDS_LM and c.converged and c.n_sign >= 0.8 * c.n_seeds
               for c in claims if c.verdict == "holds")
