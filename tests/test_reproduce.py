"""Sweeps (cache, resume, executors) and chapter-1 claim runs (verdict rule, committed rows re-run live)."""
from __future__ import annotations

import json
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


def _fake_rows(diffs, arm_a="top-2", metric="sigma1"):
    rows = []
    for s, d in enumerate(diffs):
        for arm, val in (("dense", 1.0), (arm_a, 1.0 + d)):
            m = {metric: val, "probe_mse": 0.01, "target_var": 1.0}
            rows.append({"arm": arm, "seed": s, "metrics": m})
            rows.append({"arm": arm + ":4x", "seed": s, "metrics": {"probe_mse": 0.0099}})
    return rc._by_arm(rows)


@pytest.mark.parametrize("diffs,holds", [
    ([-0.1, -0.2, -0.15, -0.1, -0.12], True),     # 5/5 negative, CI excludes 0
    ([-0.1, -0.2, 0.3, 0.25, -0.12], False),       # sign in 3/5 only
    ([-0.1, -0.2, -0.15, -0.1, 0.01], True),       # 4/5 is enough when the CI excludes 0
])
def test_pass_rule(diffs, holds):
    r = rc._compare(_fake_rows(diffs), "SC-1", "", "sigma1", "top-2", "dense", -1)
    assert r.holds is holds and r.n_seeds == 5 and r.converged


def test_convergence_rule_uses_the_stated_margin():
    arms = _fake_rows([-0.1] * 5)
    assert rc._converged(arms, "top-2")
    arms["top-2:4x"][0]["probe_mse"] = 0.01 - 2 * rp.CONVERGENCE_MARGIN    # 4× run explains 1 % more variance
    assert not rc._converged(arms, "top-2")


def test_committed_rows_cover_every_arm_and_seed():
    rows = rp.load_results("chapter1")
    arms = rc._by_arm(rows)
    for arm in rp.CHAPTER1_ARMS:
        assert sorted(arms[arm]) == list(range(5)) and sorted(arms[arm + ":4x"]) == list(range(5))
    assert all(r["version"] and r["device"] and r["wall_s"] > 0 for r in rows)
    assert all(json.loads(json.dumps(r["config"]))["run"]["model"]["seed"] == r["seed"] for r in rows)
    # every arm's seeds were trained at once (one seed group per arm), on the dispatch path the payload names
    assert all(r["group"]["seeds"] == list(range(5)) and r["config"]["dispatch"] in ("dense", "gather") for r in rows)
    claims = rp.chapter1_claims(rows)
    assert {c.claim for c in claims} == {"SC-1", "SC-1b", "SC-2", "SC-3", "SC-4", "SC-5", "SC-6"}


@pytest.mark.parametrize("arm", ["dense", "top-2"])
def test_pinned_subset_matches_committed_rows(arm):
    """Tolerance: 2 % relative on each pinned metric (the runs use 1 thread; same machine kind → identical)."""
    (check,) = rp.pinned_subset(rp.load_results("chapter1"), arms=[arm], rtol=0.02)
    assert check.ok, f"{arm}: {check.worst_metric} deviates by {check.max_rel_dev:.2%} from the committed row"


def test_chapter3_committed_rows_cover_every_arm_and_seed():
    rows = rp.load_results("chapter3")
    arms = rc._by_arm(rows)
    for arm in rp.CHAPTER3_ARMS:
        assert sorted(arms[arm]) == list(range(5)) and sorted(arms[arm + ":4x"]) == list(range(5))
    claims = rp.chapter3_claims(rows)
    assert {c.claim for c in claims} == {"RC-a", "RC-b", "RC-c", "RC-d", "RC-e", "RC-f", "RC-g"}
    assert all(r["metrics"]["steps"] == (8000 if r["arm"].endswith(":4x") else 2000) for r in rows)


@pytest.mark.parametrize("arm", ["aux-0.01", "kmeans+lfb"])
def test_chapter3_pinned_subset_matches_committed_rows(arm):
    (check,) = rp.pinned_subset(rp.load_results("chapter3"), arms=[arm], rtol=0.02, chapter="chapter3")
    assert check.ok, f"{arm}: {check.worst_metric} deviates by {check.max_rel_dev:.2%} from the committed row"
