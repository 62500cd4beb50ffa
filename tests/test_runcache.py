"""The run cache shared by the classroom kernels (moewidgets/dashboards/runcache.py) and its LiveRunner wiring: a
cached run ends in the same numbers and the same picture as a fresh one; a corrupt or foreign entry is a logged miss;
concurrent writers leave one valid entry; the size bound holds; a kernel that misses a run another kernel is
training waits for it instead of training it again."""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("jupyter_bokeh")


from moewidgets.config import RunConfig, TaskConfig, TrainConfig  # noqa: E402
from moewidgets.dashboards import Chapter1Dashboard, LiveRunner  # noqa: E402
from moewidgets.dashboards import runcache as rc  # noqa: E402
from moewidgets.dashboards.runcache import RunCache  # noqa: E402
from moewidgets.train import Trainer  # noqa: E402

from test_dashboard import SMALL, sources  # noqa: E402  (the dashboard tests' small run and picture)

TINY = RunConfig(task=TaskConfig(n_train=256, n_probe=64), train=TrainConfig(steps=3, device="cpu"))


def dashboard(cache: RunCache | None) -> Chapter1Dashboard:
    dash = Chapter1Dashboard(SMALL, autostart=False)
    dash.runner.probe_every = 50
    dash.runner.cache = cache
    return dash


def trained(run: RunConfig) -> Trainer:
    """The slow obvious run: a Trainer stepped one step at a time to the end."""
    tr = Trainer.from_config(run)
    while not tr.done:
        tr.step(1)
    return tr


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def fresh_and_cached(tmp_path_factory):
    """(an uncached dashboard run, a run that stored its entry, a run restored from that entry)."""
    cache = RunCache(tmp_path_factory.mktemp("runs"))
    plain, first, second = dashboard(None), dashboard(cache), dashboard(cache)
    for dash in (plain, first, second):
        dash.run_sync()
    return plain, first, second, cache


def test_cached_run_ends_in_the_same_numbers_as_a_fresh_one(fresh_and_cached):
    plain, first, second, cache = fresh_and_cached
    assert plain.status.endswith("— done") and first.status.endswith("— done"), (plain.status, first.status)
    assert second.status.endswith("— done (cached)") and "60/60" in second.status, second.status
    assert second.runner.state.cached and not first.runner.state.cached
    oracle = trained(SMALL)
    for dash in (plain, first, second):
        h = dash.trainer.history
        assert (h.step, h.loss, h.aux, h.load) == (oracle.history.step, oracle.history.loss, oracle.history.aux,
                                                   oracle.history.load)
        assert same_state(dash.trainer.model, oracle.model)
        assert same_state(dash.runner.state.reference.model, trained(Chapter1Dashboard._reference_of(SMALL)).model)
    p, q = plain.probes, second.probes
    for a, b in ((p.spectra.ratios, q.spectra.ratios), (p.spectra.sigma1, q.spectra.sigma1),
                 (p.alignment.matrix, q.alignment.matrix), (p.pca.eigenvalues, q.pca.eigenvalues),
                 (plain.dense_probes.erank_sv, second.dense_probes.erank_sv)):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert sources(second) == sources(plain)                      # the same final picture
    assert len(list(cache.folder.glob("*.json"))) == 2            # the run and its dense baseline


def test_a_corrupt_entry_is_a_logged_miss_and_is_replaced(tmp_path, caplog):
    cache = RunCache(tmp_path)
    tr = trained(TINY)
    path = cache.store(TINY, tr)
    text = path.read_text()
    for bad in (text[: len(text) // 2], "[]", text.replace('"state": "', '"state": "!!')):
        path.write_text(bad)
        with caplog.at_level(logging.WARNING, logger=rc.__name__):
            caplog.clear()
            fresh = Trainer.from_config(TINY)
            assert not cache.load(TINY, fresh)
        assert fresh.steps_done == 0 and not fresh.history.loss       # untouched
        assert any(str(path) in r.getMessage() and "miss" in r.getMessage() for r in caplog.records), bad[:40]
    runner = LiveRunner(cache=cache)
    st = runner.run_sync(TINY)
    assert st.phase == "done" and not st.cached and runner.status.endswith("— done")
    again = Trainer.from_config(TINY)
    assert cache.load(TINY, again) and again.history.loss == tr.history.loss


def test_a_different_config_or_source_is_a_miss(tmp_path, monkeypatch, caplog):
    cache = RunCache(tmp_path)
    cache.store(TINY, trained(TINY))
    assert cache.load(TINY, Trainer.from_config(TINY))
    other = TINY.replace(model=TINY.model.replace(seed=1))
    assert cache.key(other) != cache.key(TINY) and not cache.load(other, Trainer.from_config(other))
    assert not cache.load(TINY, Trainer.from_config(TINY), threads=2)          # another thread count
    monkeypatch.setattr(rc, "source_hash", lambda: "0123456789abcdef")        # the package's code changed
    assert not cache.load(TINY, Trainer.from_config(TINY))
    # an entry under the right key written by other code is a logged miss
    path = cache.path(cache.key(TINY))
    entry = json.loads(next(tmp_path.glob("*.json")).read_text())
    entry["key"] = cache.key(TINY)
    path.write_text(json.dumps(entry))
    with caplog.at_level(logging.WARNING, logger=rc.__name__):
        assert not cache.load(TINY, Trainer.from_config(TINY))
    assert "source hash" in caplog.text


def test_concurrent_writers_leave_one_valid_entry(tmp_path):
    cache = RunCache(tmp_path)
    tr = trained(TINY)
    barrier = threading.Barrier(8)
    errors = []

    def write():
        try:
            barrier.wait()
            for _ in range(5):
                cache.store(TINY, tr)
        except Exception as exc:      # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [p.name for p in tmp_path.iterdir()] == [f"{cache.key(TINY)}.json"]     # no temp file left
    fresh = Trainer.from_config(TINY)
    assert cache.load(TINY, fresh) and same_state(fresh.model, tr.model)


def test_only_one_kernel_claims_a_run(tmp_path):
    cache = RunCache(tmp_path)
    lock = cache.claim(TINY)
    assert lock is not None and cache.claimed(TINY)
    assert cache.claim(TINY) is None                  # a live owner holds it
    lock.release()
    assert not cache.claimed(TINY) and cache.claim(TINY) is not None


def test_a_runner_waits_for_a_run_another_kernel_is_training(tmp_path):
    cache = RunCache(tmp_path, wait_s=60)
    lock = cache.claim(TINY)                          # "another kernel" is training TINY
    tr = trained(TINY)

    def finish():
        time.sleep(0.6)
        cache.store(TINY, tr)
        lock.release()

    seen = []
    runner = LiveRunner(cache=cache, on_status=seen.append)
    threading.Thread(target=finish).start()
    st = runner.run_sync(TINY)
    assert st.cached and runner.status.endswith("— done (cached)"), runner.status
    assert any("waiting for it" in s for s in seen), seen
    assert st.trainer.history.loss == tr.history.loss


def test_eviction_keeps_the_bound(tmp_path):
    cache = RunCache(tmp_path, max_entries=3)
    runs = [TINY.replace(model=TINY.model.replace(seed=s)) for s in range(5)]
    for run in runs:
        cache.store(run, trained(run))
        time.sleep(0.01)              # distinct modification times
    kept = sorted(p.name for p in tmp_path.glob("*.json"))
    assert kept == sorted(f"{cache.key(r)}.json" for r in runs[2:])           # the oldest two went
    size = max(p.stat().st_size for p in tmp_path.glob("*.json"))
    small = RunCache(tmp_path, max_entries=100, max_mb=2.5 * size / 1e6)
    small.evict()
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 2 and sum(p.stat().st_size for p in files) <= small.max_mb * 1e6


def test_caching_is_off_by_default_and_skips_other_trainers():
    assert LiveRunner().cache is None
    assert Chapter1Dashboard(SMALL, autostart=False).runner.cache is None
    runner = LiveRunner(cache=RunCache("/nonexistent-never-created"), make_trainer=lambda run: Trainer.from_config(run))
    assert not runner._cacheable(Trainer.from_config(TINY))        # a custom trainer factory: always trains


def test_a_stopped_run_releases_its_claim_and_stores_nothing(tmp_path):
    import asyncio

    cache = RunCache(tmp_path)
    long_run = TINY.replace(train=TINY.train.replace(steps=5000))
    runner = LiveRunner(cache=cache, debounce_s=0.01)

    async def go():
        runner.request(long_run)
        while runner.state is None or runner.state.trainer.steps_done < 5:
            await asyncio.sleep(0.01)
        assert cache.claimed(long_run)            # training here: claimed for the other kernels
        runner.stop()
        await runner.wait()

    asyncio.run(go())
    assert runner.state.phase == "stopped"
    assert not cache.claimed(long_run) and not cache.has(long_run)
