"""Sweep specs and the ``sweep`` command line: validation before any run, executors (serial, Dask process workers)
giving identical numbers, resume after a killed run, cache invalidation, errors with exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import moewidgets.sweep as sw
from moewidgets.__main__ import main
from moewidgets.config import MoEConfig, RunConfig, TaskConfig, TrainConfig
from moewidgets.sweep import Job, JobError, SpecError, SweepSpec, load_spec, run_jobs, run_sweep

REPO = Path(__file__).resolve().parent.parent

# a tiny chapter-1 sweep: 2 grid points × 2 seeds, 20 steps (each job well under a second once warm)
TINY = {
    "name": "tiny",
    "base": {"model": {"n_experts": 4, "d_model": 8, "d_hidden": 16},
             "task": {"d_in": 8, "d_out": 8, "n_train": 256, "n_probe": 64},
             "train": {"steps": 20, "batch_size": 64, "device": "cpu"}},
    "grid": {"model.k": [1, 2]},
    "seeds": 2,
    "probe_points": 64,
}


def _spec(**changes) -> dict:
    d = json.loads(json.dumps(TINY))
    d.update(changes)
    return d


def _write(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _metrics(rows) -> list[str]:
    """Each row's (arm, seed, metrics) as JSON: NaN compares equal to NaN, floats must match bit for bit."""
    return [json.dumps([r["arm"], r["seed"], r["metrics"]], sort_keys=True) for r in rows]


@pytest.fixture(scope="module")
def serial_rows(tmp_path_factory):
    """The reference: the tiny sweep run serially in this process, no cache."""
    out = tmp_path_factory.mktemp("serial")
    return run_sweep(SweepSpec.from_dict(TINY), out_dir=out, cache_dir=None, progress=False).rows


# ------------------------------------------------------------------------------------------------ the spec

def test_spec_expands_grid_times_seeds_over_the_base():
    spec = SweepSpec.from_dict(_spec(grid={"model.k": [1, 2, 4], "model.aux_weight": [0, 0.01]}, seeds=[3, 5]))
    jobs = spec.jobs()
    assert len(jobs) == 3 * 2 * 2
    assert [j.arm for j in jobs[:4]] == ["model.k=1 model.aux_weight=0"] * 2 + ["model.k=1 model.aux_weight=0.01"] * 2
    assert [j.seed for j in jobs[:4]] == [3, 5, 3, 5]
    # the oracle: the same RunConfig written out by hand
    want = RunConfig(model=MoEConfig(n_experts=4, d_model=8, d_hidden=16, k=1, aux_weight=0.01, seed=5),
                     task=TaskConfig(d_in=8, d_out=8, n_train=256, n_probe=64),
                     train=TrainConfig(steps=20, batch_size=64, device="cpu"))
    assert RunConfig.from_dict(jobs[3].payload["run"]) == want
    assert jobs[3].payload["probe_points"] == 64 and jobs[3].fn == "moewidgets.reproduce:chapter1_job"
    assert SweepSpec.from_dict(_spec(metrics="loss")).jobs()[0].payload["converge_only"] is True


def _config_message(cls, d) -> str:
    with pytest.raises(ValueError) as info:
        cls.from_dict(d)
    return str(info.value)


@pytest.mark.parametrize("change,message", [
    ({"grd": {}}, "unknown field(s) ['grd']; allowed fields are ['base', 'grid', 'metrics', 'name', 'probe_points', "
                  "'seeds']"),
    ({"base": {"model": {"kk": 1}}}, "base: " + _config_message(MoEConfig, {"kk": 1})),
    ({"base": {"modle": {}}}, "base: RunConfig: unknown field(s) ['modle']"),
    ({"base": {"train": {"lr": -1}}}, "base: TrainConfig.lr=-1 must be > 0"),
    ({"base": {"model": 3}}, "base.model=3 must be a mapping of MoEConfig fields"),
    ({"base": {"model": {"seed": 1}}}, "base.model.seed is not allowed: the seeds come from the 'seeds' field"),
    ({"grid": {"model.kk": [1]}}, "grid key 'model.kk': " + _config_message(MoEConfig, {"kk": 1})),
    ({"grid": {"k": [1]}}, "grid key 'k' must be 'section.field' with section one of model, task, train"),
    ({"grid": {"optim.lr": [1]}}, "grid key 'optim.lr' must be 'section.field'"),
    ({"grid": {"model.seed": [1]}}, "grid key 'model.seed' is not allowed"),
    ({"grid": {"model.k": [1, 9]}}, "grid point model.k=9: MoEConfig.k=9 must be in 1..n_experts=4"),
    ({"grid": {"model.router": ["softmax", "topk"]}},
     "grid point model.router=topk: MoEConfig.router='topk' must be one of 'softmax', 'kmeans', 'mpi'"),
    ({"grid": {"model.d_model": [8, 16]}}, "grid point model.d_model=16: RunConfig: task.d_in=8 must equal"),
    ({"grid": {}}, "grid={} must map at least one 'section.field' to a non-empty list of values"),
    ({"grid": None}, "grid=None must map at least one"),
    ({"grid": {"model.k": []}}, "grid['model.k']=[] must be a non-empty list of values"),
    ({"grid": {"model.k": 2}}, "grid['model.k']=2 must be a non-empty list of values"),
    ({"grid": {"model.k": [1, 1]}}, "grid['model.k']=[1, 1] repeats a value"),
    ({"seeds": 0}, "seeds=0 must be a number of seeds N >= 1"),
    ({"seeds": [0, 0]}, "seeds=[0, 0] must be"),
    ({"seeds": [-1]}, "seeds=[-1] must be"),
    ({"seeds": "3"}, "seeds='3' must be"),
    ({"metrics": "fast"}, "metrics='fast' must be one of 'chapter1', 'loss' or 'package.module:function'"),
    ({"metrics": "no_such_module:f"}, "metrics='no_such_module:f' must be one of"),
    ({"probe_points": 65}, "probe_points=65 must be <= task.n_probe=64 (grid point model.k=1)"),
    ({"probe_points": 0}, "probe_points=0 must be an integer >= 1"),
    ({"name": "a/b"}, "name='a/b' must be a file name"),
])
def test_spec_errors_name_field_value_and_what_is_allowed(change, message):
    with pytest.raises(SpecError) as info:
        SweepSpec.from_dict(_spec(**change), source="s.yml")
    assert str(info.value).startswith("s.yml: ") and message in str(info.value)


def test_spec_requires_grid_and_name():
    d = _spec()
    del d["grid"]
    with pytest.raises(SpecError, match="grid is missing"):
        SweepSpec.from_dict(d)
    del d["name"]
    d["grid"] = TINY["grid"]
    assert SweepSpec.from_dict(d, name="fallback").name == "fallback"
    with pytest.raises(SpecError, match="name is missing"):
        SweepSpec.from_dict(d)


def test_yaml_reads_exponent_numbers_and_rejects_repeated_keys(tmp_path):
    path = tmp_path / "s.yml"
    path.write_text("base: {model: {n_experts: 4}}\ngrid:\n  model.lf_rate: [0, 1e-3, 2.5E+1]\n")
    spec = load_spec(path)
    assert spec.name == "s" and spec.grid["model.lf_rate"] == (0, 0.001, 25.0)
    path.write_text("grid:\n  model.k: [1]\n  model.k: [2]\n")
    with pytest.raises(SpecError, match="repeated key 'model.k'"):
        load_spec(path)
    path.write_text("grid: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_example_spec_is_valid():
    spec = load_spec(REPO / "examples" / "sweep-small.yml")
    assert spec.name == "sweep-small" and len(spec.jobs()) == 12


# ------------------------------------------------------------------------------------------------ jobs and cache

def test_failing_job_names_itself_and_pool_caches_the_others(tmp_path):
    jobs = [Job("ok", "moewidgets.sweep:_square", {"x": 2}), Job("bad", "moewidgets.sweep:_square", {"x": "a"}),
            Job("ok3", "moewidgets.sweep:_square", {"x": 3})]
    with pytest.raises(JobError, match=r"arm='bad' seed=0 .*TypeError") as info:
        run_jobs(jobs, progress=False)
    assert isinstance(info.value.__cause__, TypeError)
    with ThreadPoolExecutor(2) as ex, pytest.raises(JobError, match="1 of 3 jobs failed"):
        run_jobs(jobs, executor=ex, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_unimportable_function_fails_before_any_job_runs(tmp_path):
    jobs = [Job("ok", "moewidgets.sweep:_square", {"x": 2}), Job("typo", "moewidgets.sweep:_sqare")]
    with pytest.raises(ValueError, match="Job.fn='moewidgets.sweep:_sqare' cannot be imported"):
        run_jobs(jobs, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.json"))


def test_cache_invalidated_by_config_and_by_package_version(tmp_path, monkeypatch):
    spec = SweepSpec.from_dict(_spec(metrics="loss"))
    first = run_sweep(spec, out_dir=tmp_path, cache_dir=tmp_path / "c", progress=False)
    again = run_sweep(spec, out_dir=tmp_path, cache_dir=tmp_path / "c", progress=False)
    assert (first.cache_hits, again.cache_hits) == (0, 4) and _metrics(first.rows) == _metrics(again.rows)
    longer = SweepSpec.from_dict(_spec(metrics="loss", base={**TINY["base"], "train": {"steps": 21, "device": "cpu"}}))
    assert run_sweep(longer, out_dir=tmp_path, cache_dir=tmp_path / "c", progress=False).cache_hits == 0
    partly = SweepSpec.from_dict(_spec(metrics="loss", grid={"model.k": [2, 4]}))     # k=2 is shared
    assert run_sweep(partly, out_dir=tmp_path, cache_dir=tmp_path / "c", progress=False).cache_hits == 2
    monkeypatch.setattr(sw, "_version", lambda: "9.9.9")
    new = run_sweep(spec, out_dir=tmp_path, cache_dir=tmp_path / "c", progress=False)
    assert new.cache_hits == 0 and {r["version"] for r in new.rows} == {"9.9.9"}


# ------------------------------------------------------------------------------------------------ executors

def test_dask_process_workers_equal_serial(serial_rows, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in client.scheduler_info()["workers"])
        res = run_sweep(SweepSpec.from_dict(TINY), executor=client.get_executor(), out_dir=tmp_path,
                        cache_dir=tmp_path / "c", progress=False)
        assert _metrics(res.rows) == _metrics(serial_rows)
        assert {r["threads"] for r in res.rows} == {1} and res.cache_hits == 0
        assert [r["overrides"] for r in res.rows] == [{"model.k": 1}] * 2 + [{"model.k": 2}] * 2
        # the command line against the same scheduler (--scheduler implies --executor dask), a fresh cache
        spec = _write(tmp_path / "tiny.yml", TINY)
        argv = ["sweep", str(spec), "--scheduler", cluster.scheduler_address, "--out", str(tmp_path / "cli"),
                "--cache", str(tmp_path / "c2")]
        assert main(argv) == 0
        assert _metrics(sw.read_jsonl(tmp_path / "cli" / "tiny.jsonl")) == _metrics(serial_rows)


def test_resume_after_killed_run(serial_rows, tmp_path, monkeypatch):
    """A serial sweep killed (SIGKILL) in its third job; the re-run takes the first two from the cache."""
    (tmp_path / "killer_metrics.py").write_text(
        "import os, signal\n"
        "from moewidgets.reproduce import chapter1_job\n"
        "def job(payload, seed):\n"
        "    if os.environ.get('KILL_AT') == f\"{payload['run']['model']['k']}/{seed}\":\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return chapter1_job(payload, seed)\n")
    spec_path = _write(tmp_path / "tiny.yml", _spec(metrics="killer_metrics:job"))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "KILL_AT": "2/0"}
    proc = subprocess.run([sys.executable, "-m", "moewidgets", "sweep", str(spec_path), "--executor", "serial",
                           "--out", str(tmp_path / "out"), "--cache", str(cache)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len(list(cache.glob("*.json"))) == 2 and not (tmp_path / "out" / "tiny.jsonl").exists()

    monkeypatch.syspath_prepend(str(tmp_path))
    # the cache key holds a hash of the package source taken once per process; pin this process's to the one the
    # killed run used, so that an edit of the checkout between the two processes does not turn the resume into misses
    used = {json.loads(p.read_text())["source"] for p in cache.glob("*.json")}
    assert len(used) == 1
    monkeypatch.setattr(sw, "source_hash", lambda: next(iter(used)))
    calls = []
    real = sw._execute
    monkeypatch.setattr(sw, "_execute", lambda job, threads: calls.append((job.arm, job.seed)) or real(job, threads))
    res = run_sweep(load_spec(spec_path), out_dir=tmp_path / "out", cache_dir=cache, progress=False)
    assert res.cache_hits == 2 and calls == [("model.k=2", 0), ("model.k=2", 1)]
    assert _metrics(res.rows) == _metrics(serial_rows)


# ------------------------------------------------------------------------------------------------ command line

def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:          # argparse: usage errors exit with status 2
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("change,message", [
    ({"seedz": 2}, "unknown field(s) ['seedz']"),
    ({"base": {"model": {"kk": 1}}}, "MoEConfig: unknown field(s) ['kk']"),
    ({"grid": {"model.k": [1, 9]}}, "grid point model.k=9: MoEConfig.k=9 must be in 1..n_experts=4"),
    ({"grid": {"model.k": []}}, "grid['model.k']=[] must be a non-empty list of values"),
])
def test_cli_spec_errors_exit_2_with_the_message(change, message, tmp_path, capsys):
    spec = _write(tmp_path / "bad.yml", _spec(**change))
    code, out, err = _cli(["sweep", str(spec), "--executor", "serial", "--cache", str(tmp_path / "c")], capsys)
    assert code == 2 and message in err and f"{spec}: " in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()                 # nothing ran


@pytest.mark.parametrize("argv,message", [
    (["--executor", "serial", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler=tcp://127.0.0.1:1 needs --executor dask"),
    (["--executor", "serial", "--workers", "2"], "--workers=2 needs --executor processes or dask"),
    (["--workers", "0"], "--workers=0 must be >= 1"),
    (["--executor", "threads"], "invalid choice: 'threads'"),
])
def test_cli_option_errors_exit_2(argv, message, tmp_path, capsys):
    spec = _write(tmp_path / "tiny.yml", TINY)
    code, _, err = _cli(["sweep", str(spec), *argv], capsys)
    assert code == 2 and message in err


def test_cli_serial_sweep_and_resume(serial_rows, tmp_path, capsys):
    spec = _write(tmp_path / "tiny.yml", TINY)
    argv = ["sweep", str(spec), "--executor", "serial", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")]
    code, out, _ = _cli(argv, capsys)
    assert code == 0 and "4 jobs (2 grid points × 2 seeds), 0 cached" in out and ": 4 rows in " in out
    assert _metrics(sw.read_jsonl(tmp_path / "out" / "tiny.jsonl")) == _metrics(serial_rows)
    code, out, _ = _cli(argv, capsys)
    assert code == 0 and out.rstrip().endswith("4 cache hits")


def test_cli_missing_file_exit_2_and_sweep_does_not_import_dask(tmp_path):
    """A real process (its exit status and stderr, as ``python -m moewidgets`` runs ``sys.exit(main())``), which
    first checks that importing moewidgets.sweep pulled in neither dask nor distributed."""
    code = ("import sys, moewidgets.sweep\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed'}))\n"
            "from moewidgets.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "sweep", str(tmp_path / "nope.yml")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout == "[]\n" and proc.returncode == 2, proc.stderr
    assert f"no sweep spec at {tmp_path / 'nope.yml'}" in proc.stderr and "Traceback" not in proc.stderr
