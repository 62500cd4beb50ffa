"""Nothing lost, nothing stale: atomic results and cache files (a killed write leaves the old file), corrupt and
wrong-shape cache files are misses, concurrent sweeps compute each job once, a changed job function is a cache miss,
every row records the code that made it, and pool / local-Dask workers die with a killed parent."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import moewidgets.sweep as sw
from moewidgets import data as mdata
from moewidgets.config import TaskConfig
from moewidgets.sweep import Job, ResultsFileError, job_key, read_jsonl, run_jobs, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def _jobs(xs):
    return [Job("sq", "moewidgets.sweep:_square", {"x": x}, seed=0) for x in xs]


# ------------------------------------------------------------------------------------------------ atomic files

def test_failed_replace_leaves_the_old_results_file_and_no_temp_file(tmp_path, monkeypatch):
    path = write_jsonl([{"a": 1}], tmp_path / "r.jsonl")

    def boom(src, dst):
        raise OSError(28, "No space left on device", str(dst))
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        write_jsonl([{"a": 2}] * 1000, path)
    monkeypatch.undo()
    assert read_jsonl(path) == [{"a": 1}] and sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_write_killed_by_the_file_size_limit_leaves_the_old_file(tmp_path):
    """A real kill midway: ``ulimit -f 8`` (8 KiB) makes the kernel kill the writer (SIGXFSZ) in a 1 MB write."""
    path = write_jsonl([{"a": 1}], tmp_path / "r.jsonl")
    code = (f"from moewidgets.sweep import write_jsonl\n"
            f"write_jsonl([{{'x': 'y' * 100}}] * 10000, {str(path)!r})\n")
    proc = subprocess.run(["bash", "-c", f"ulimit -f 8; exec {sys.executable} -c \"$0\"", code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert read_jsonl(path) == [{"a": 1}]           # the old file, whole


def test_read_jsonl_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b": \n')
    with pytest.raises(ResultsFileError, match=rf"{path} line 2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ResultsFileError, match=rf"{path} line 2: a list, expected a JSON object"):
        read_jsonl(path)


# ------------------------------------------------------------------------------------------------ cache files

@pytest.mark.parametrize("content,why", [
    ('{"arm": "sq", "seed": 0, "metr', "line 1 column"),          # truncated by a kill or a full disk
    ("[]", "holds a list, expected one row"),                     # valid JSON of the wrong shape
    ('{"arm": "sq", "seed": 0, "metrics": {"y": 99}, "key": "0000000000000000"}', "is not the job's key"),
    ('{"arm": "sq", "seed": 5, "metrics": {"y": 99}, "key": "KEY"}', "seeds [5] are not the job's [0]"),
])
def test_corrupt_or_wrong_shape_cache_file_is_a_logged_miss(content, why, tmp_path, caplog):
    jobs = _jobs([1, 2, 3])
    run_jobs(jobs, cache_dir=tmp_path, progress=False)
    bad = tmp_path / f"{job_key(jobs[1])}.json"
    bad.write_text(content.replace("KEY", job_key(jobs[1])))
    with caplog.at_level(logging.WARNING, logger="moewidgets.sweep"):
        rows = run_jobs(jobs, cache_dir=tmp_path, progress=False)
    assert [r["metrics"]["y"] for r in rows] == [1, 4, 9] and len(rows) == 3
    assert str(bad) in caplog.text and why in caplog.text
    assert json.loads(bad.read_text())["metrics"] == {"y": 4}      # the re-run replaced the bad file


def test_seed_group_cache_with_the_wrong_row_count_is_a_miss(tmp_path, caplog):
    job = Job("grp", "moewidgets.sweep:_square_seeds", {"x": 3}, seeds=(0, 1, 2))
    run_jobs([job], cache_dir=tmp_path, progress=False)
    path = tmp_path / f"{job_key(job)}.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:2]))
    with caplog.at_level(logging.WARNING, logger="moewidgets.sweep"):
        rows = run_jobs([job], cache_dir=tmp_path, progress=False)
    assert [r["metrics"]["y"] for r in rows] == [9, 10, 11] and "holds 2 rows, the job gives 3" in caplog.text


# ------------------------------------------------------------------------------------------------ concurrency

_COUNTING_JOB = """
import os, time
def job(payload, seed):
    with open(os.environ["JOB_LOG"], "a") as f:
        f.write(f"{payload['x']}/{seed} {os.getpid()}\\n")
    time.sleep(0.3)
    return {"y": payload["x"] * 10 + seed}
"""


def test_concurrent_sweeps_compute_each_job_once(tmp_path):
    """Three sweeps at once on one cache and one output file: all finish with the right rows, each job ran once."""
    (tmp_path / "counting_job.py").write_text(_COUNTING_JOB)
    log = tmp_path / "calls.log"
    code = textwrap.dedent(f"""
        from moewidgets.sweep import Job, run_jobs, write_jsonl
        jobs = [Job(f"x={{x}}", "counting_job:job", {{"x": x}}, seed=s) for x in range(4) for s in range(2)]
        write_jsonl(run_jobs(jobs, cache_dir={str(tmp_path / 'cache')!r}, progress=False),
                    {str(tmp_path / 'out.jsonl')!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "JOB_LOG": str(log), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    calls = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(calls) == sorted(f"{x}/{s}" for x in range(4) for s in range(2))      # each job exactly once
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["arm"], r["seed"], r["metrics"]["y"]) for r in rows] == \
        [(f"x={x}", s, 10 * x + s) for x in range(4) for s in range(2)]
    assert not list((tmp_path / "cache").glob("*.lock")) and not list((tmp_path / "cache").glob(".*tmp"))


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    job = _jobs([5])[0]
    (tmp_path / f"{job_key(job)}.lock").write_text(f"{dead} {os.uname().nodename}")
    assert [r["metrics"]["y"] for r in run_jobs([job], cache_dir=tmp_path, progress=False)] == [25]
    assert not list(tmp_path.glob("*.lock"))


# ------------------------------------------------------------------------------------------------ staleness

_CONST_JOB = "SCALE = {scale}\ndef job(payload, seed):\n    return {{'y': payload['x'] * SCALE}}\n"


def test_a_changed_numeric_constant_in_the_job_function_is_a_cache_miss(tmp_path):
    """A copy of a job function run twice on one cache, in fresh processes; between the runs its constant changes:
    the second run must not reuse the first one's row."""
    mod = tmp_path / "const_job.py"
    code = textwrap.dedent(f"""
        from moewidgets.sweep import Job, run_jobs
        rows = run_jobs([Job("a", "const_job:job", {{"x": 2}})], cache_dir={str(tmp_path / 'cache')!r},
                        progress=False)
        print(rows[0]["metrics"]["y"], rows[0]["key"], rows[0]["source"])
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    outs = []
    for scale in (1.5, 2.5, 2.5):
        mod.write_text(_CONST_JOB.format(scale=scale))
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.split())
    assert [o[0] for o in outs] == ["3.0", "5.0", "5.0"]
    assert outs[0][1] != outs[1][1]                                # a new key for the changed function
    if outs[1][2] == outs[2][2]:       # the package source did not change between the runs (a shared checkout)
        assert outs[1][1] == outs[2][1]                            # the same code: the same key, a cache hit


def test_key_includes_the_package_source_and_rows_record_the_commit(monkeypatch):
    job = _jobs([1])[0]
    key = job_key(job)
    monkeypatch.setattr(sw, "source_hash", lambda: "0123456789abcdef")    # as if a package file had changed
    assert job_key(job) != key
    monkeypatch.undo()
    row = run_jobs([job], progress=False)[0]
    commit = row["commit"]
    assert commit.startswith("source:") or (len(commit.split("+")[0]) == 40 and commit.split("+")[1:] in ([], ["dirty"]))
    assert row["source"] == sw.source_hash() and len(row["source"]) == 16


# ------------------------------------------------------------------------------------------------ the task draw

def _draw_unchunked(cfg, n, means_CD, teachers, g):
    """The draw as it was: every point's teacher weights gathered at once (an N×H×D tensor)."""
    c_N = torch.randint(cfg.n_clusters, (n,), generator=g)
    x_ND = means_CD[c_N] + cfg.noise * torch.randn(n, cfg.d_in, generator=g)
    B_CHD, beta_CH, A_COH = teachers
    t_N = torch.zeros_like(c_N) if cfg.shared_teacher else c_N
    h_NH = torch.tanh(torch.einsum("nhd,nd->nh", B_CHD[t_N], x_ND) + beta_CH[t_N])
    return x_ND, torch.einsum("noh,nh->no", A_COH[t_N], h_NH), c_N


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cfg", [TaskConfig(n_train=10_000, n_probe=300), TaskConfig(shared_teacher=True, offset=0.5),
                                 TaskConfig(d_in=8, d_out=5, teacher_width=16, n_train=4097, n_probe=1)])
def test_chunked_task_draw_is_bitwise_the_unchunked_draw(cfg, threads, monkeypatch):
    from moewidgets.train import torch_threads
    with torch_threads(threads):
        new = mdata.make_task(cfg, seed=3)
        monkeypatch.setattr(mdata, "_draw", _draw_unchunked)
        old = mdata.make_task(cfg, seed=3)
    for name in ("x_train", "y_train", "c_train", "x_probe", "y_probe", "c_probe"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name


# ------------------------------------------------------------------------------------------------ orphans

def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state                 # a zombie has exited


def _kill_parent_and_check_workers(code: str, timeout: float = 120):
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert pids and all(_alive(p) for p in pids), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        left = [p for p in pids if _alive(p)]
        for p in left:                            # do not leak them if the test fails
            os.kill(p, signal.SIGKILL)
        assert not left, f"workers {left} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_die_with_a_killed_parent():
    _kill_parent_and_check_workers(textwrap.dedent("""
        import os, time
        from moewidgets.sweep import process_executor
        pool = process_executor(2)
        futs = [pool.submit(time.sleep, 0.5) for _ in range(2)]
        [f.result() for f in futs]
        print(*pool._processes, flush=True)
        time.sleep(600)
    """))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_dask_workers_die_with_a_killed_parent():
    pytest.importorskip("distributed")
    _kill_parent_and_check_workers(textwrap.dedent("""
        import os, time
        from moewidgets.sweep import dask_executor
        with dask_executor(workers=1) as ex:
            pid = ex.submit(os.getpid).result()
            print(pid, flush=True)
            time.sleep(600)
    """))
