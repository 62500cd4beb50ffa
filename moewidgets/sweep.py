"""Sweeps: configs × seeds on any ``concurrent.futures.Executor``, resumable, written as JSON-lines results.

Two levels, the second built on the first.

**Jobs.** A sweep is a list of :class:`Job` s. Each job names a task function (``"module:function"``, so process and
Dask workers can import it), a JSON-able payload and a seed. Results are cached one file per job under
``cache_dir``, keyed by a hash of (function, payload, seed, package version): re-running a killed sweep skips the
finished jobs, and a changed config or a new package version re-runs them.

>>> jobs = [Job("doc", "moewidgets.sweep:_square", {"x": x}, seed=0) for x in (1, 2)]
>>> [r["metrics"]["y"] for r in run_jobs(jobs, progress=False)]
[1, 4]

Executors: ``None`` runs the jobs one after the other in this process; :func:`process_executor` is a local
process pool; a Dask cluster is ``distributed.Client(address).get_executor()`` (or :func:`dask_executor`, which
also starts a local cluster when no address is given). Threads: the job runner sets torch's intra-op threads
*inside the worker* before each job, to 1 by default for every pool (so N workers use N cores and the numbers do not
depend on the machine's core count); Dask's nanny also sets ``OMP_NUM_THREADS=1`` for its worker processes.
Importing this module never imports dask.

**Specs.** A sweep spec is a YAML file (or a dict) that names a base config, a grid of overrides, the seeds, the
metrics function and the output name; :func:`load_spec` validates the whole spec before anything runs and
:func:`run_sweep` runs it (``python -m moewidgets sweep SPEC.yml``). The format (``examples/sweep-small.yml``)::

    name: sweep-small          # output file <out>/<name>.jsonl; default: the spec file's name
    base:                      # a partial RunConfig, merged over the defaults (moewidgets.config)
      model: {n_experts: 4, d_model: 8, d_hidden: 16}
      task: {d_in: 8, d_out: 8, n_train: 512, n_probe: 128}
      train: {steps: 50, device: cpu}
    grid:                      # "section.field": [values, ...]; every combination is one arm (required)
      model.k: [1, 2, 4]
      model.aux_weight: [0.0, 0.01]
    seeds: 2                   # N (seeds 0..N-1) or a list such as [0, 3, 7]; each sets model.seed (default 1)
    metrics: chapter1          # chapter1 (default) | loss | "package.module:function"
    probe_points: 128          # probe points of the chapter-1 probes, <= task.n_probe (default 512)

Metrics: ``chapter1`` trains and reports the loss, the probe MSE and the chapter-1 geometry probes (σ1, stable
rank, PCA effective rank, alignment, ...) at initialisation (``init_*``) and after training
(``moewidgets.reproduce.chapter1_job``); ``loss`` trains and reports the loss and the probe MSE only.
A function of your own is called as ``fn({"run": RunConfig dict, "probe_points": P}, seed) -> dict of numbers``.
Numbers in the YAML follow YAML 1.2 (``1e-3`` is a number, not text); repeated keys are an error.

>>> spec = SweepSpec.from_dict({"name": "doc", "grid": {"model.k": [1, 2]}, "seeds": 2, "metrics": "loss"})
>>> [(job.arm, job.seed) for job in spec.jobs()]
[('model.k=1', 0), ('model.k=1', 1), ('model.k=2', 0), ('model.k=2', 1)]
>>> SweepSpec.from_dict({"name": "doc", "grid": {"model.k": [1, 9]}})
Traceback (most recent call last):
...
moewidgets.sweep.SpecError: sweep spec: grid point model.k=9: MoEConfig.k=9 must be in 1..n_experts=8

Used by every chapter's claim runs (:mod:`moewidgets.reproduce`, ``python -m moewidgets reproduce CHAPTER``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import itertools
import json
import os
import platform
import re
import time
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

__all__ = ["Job", "JobError", "run_jobs", "job_key", "count_cached", "write_jsonl", "read_jsonl",
           "process_executor", "dask_executor", "open_executor", "EXECUTORS", "SpecError", "SweepSpec",
           "SweepResult", "METRICS", "load_spec", "run_sweep"]


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(payload, seed) -> dict of metrics``; ``arm`` labels it in the results.

    A **seed group** (``seeds`` given) trains several seeds of one arm in one call, as
    :class:`~moewidgets.multiseed.MultiSeedTrainer` does: ``fn(payload, list(seeds)) -> list of metric dicts``, one
    per seed in order, and the job gives one result row per seed (``seed`` is then unused). A seed's metrics may
    carry ``"_config"``: its row's config (default: the payload), e.g. the payload with that seed filled in.

    >>> rows = run_jobs([Job("doc", "moewidgets.sweep:_square_seeds", {"x": 3}, seeds=(0, 1))], progress=False)
    >>> [(r["seed"], r["metrics"]["y"], r["group"]["seeds"]) for r in rows]
    [(0, 9, [0, 1]), (1, 10, [0, 1])]
    """

    arm: str
    fn: str                      # "package.module:function"
    payload: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    seeds: tuple[int, ...] = ()  # a seed group: fn(payload, [seeds]) -> one metrics dict per seed

    @property
    def n_rows(self) -> int:
        """How many result rows this job gives (one per seed of a group, else one)."""
        return len(self.seeds) or 1


class JobError(RuntimeError):
    """A job raised; the message names it (arm, seed) and the original exception is the ``__cause__``."""


def _version() -> str:
    from . import __version__
    return __version__


def job_key(job: Job) -> str:
    """Cache key: sha1 of (function, payload, seed, package version), 16 hex digits."""
    key = {"fn": job.fn, "payload": job.payload, "seed": job.seed, "version": _version()}
    if job.seeds:                       # only then: single-seed jobs keep their keys (and caches)
        key["seeds"] = list(job.seeds)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _resolve(fn: str) -> Callable[[dict, int], dict]:
    module, _, name = fn.partition(":")
    if not module or not name:
        raise ValueError(f"Job.fn={fn!r} must look like 'package.module:function'")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"Job.fn={fn!r} cannot be imported ({type(exc).__name__}: {exc})") from exc
    if not callable(target):
        raise ValueError(f"Job.fn={fn!r} must name a function, not a {type(target).__name__}")
    return target


def _execute(job: Job, threads: int | None) -> list[dict[str, Any]]:
    """Run one job in this process (a worker): returns its result rows (one, or one per seed of a group).
    ``threads``: torch threads for the job, restored afterwards (``None``: leave them alone)."""
    import torch
    from .train import torch_threads
    with torch_threads(threads):
        t0 = time.perf_counter()
        if job.seeds:
            per_seed = _resolve(job.fn)(dict(job.payload), list(job.seeds))
            if not isinstance(per_seed, list) or len(per_seed) != len(job.seeds):
                raise ValueError(f"Job.fn={job.fn!r} of a seed group must return a list of {len(job.seeds)} metric "
                                 f"dicts (one per seed), got {type(per_seed).__name__}")
        else:
            per_seed = [_resolve(job.fn)(dict(job.payload), job.seed)]
        wall_s = time.perf_counter() - t0
        n_threads = torch.get_num_threads()
    rows = []
    for seed, metrics in zip(job.seeds or (job.seed,), per_seed):
        row = {"arm": job.arm, "seed": seed, "config": metrics.pop("_config", job.payload), "metrics": metrics,
               # a group's wall time is shared: each seed's row carries its share, the group the whole
               "wall_s": round(wall_s / job.n_rows, 3), "device": metrics.pop("_device", "cpu"),
               "threads": n_threads, "version": _version(), "torch": torch.__version__,
               "python": platform.python_version(), "key": job_key(job)}
        if job.seeds:
            row["group"] = {"seeds": list(job.seeds), "wall_s": round(wall_s, 3)}
        rows.append(row)
    return rows


def count_cached(jobs: Iterable[Job], cache_dir: str | Path | None) -> int:
    """How many of ``jobs`` have a result in ``cache_dir`` already (what a resumed run skips).

    >>> count_cached([Job("a", "m:f")], None)
    0
    """
    if cache_dir is None:
        return 0
    return sum((Path(cache_dir) / f"{job_key(job)}.json").exists() for job in jobs)


def process_executor(workers: int | None = None) -> Executor:
    """A local process pool (one worker per core by default); use it as ``run_jobs(..., executor=...)``."""
    import multiprocessing as mp
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r} must be an integer >= 1 (or None: one per core)")
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=mp.get_context("spawn"))


def _run_jobs(jobs: list[Job], executor: Executor | None, cache_dir: str | Path | None, progress: bool,
              threads: int | None, desc: str) -> tuple[list[dict[str, Any]], int]:
    """:func:`run_jobs`, also returning the number of cache hits."""
    for fn in sorted({job.fn for job in jobs}):          # a typo fails here, before any job runs
        _resolve(fn)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    keys = [job_key(job) for job in jobs]
    rows: dict[int, list[dict]] = {}      # job index -> its rows (a cache file holds a row, or a group's list)
    todo: list[int] = []
    for i, key in enumerate(keys):
        path = cache / f"{key}.json" if cache is not None else None
        if path is not None and path.exists():
            cached = json.loads(path.read_text())
            rows[i] = cached if isinstance(cached, list) else [cached]
        else:
            todo.append(i)
    hits = len(jobs) - len(todo)

    bar = None
    if progress:                      # counted in runs (arm, seed): a seed group of 5 advances it by 5
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(j.n_rows for j in jobs), initial=sum(jobs[i].n_rows for i in rows), desc=desc,
                   unit="run")

    def finish(i: int, job_rows: list[dict]) -> None:
        for row in job_rows:
            row["key"] = keys[i]      # the caller's key: a worker with another version still lands in this cache
        if job_rows[0].get("version") != _version():
            warnings.warn(f"job arm={jobs[i].arm!r} seed={jobs[i].seed} ran on moewidgets "
                          f"{job_rows[0].get('version')}, this process has {_version()}: install the same version "
                          "on every worker", RuntimeWarning, stacklevel=3)
        rows[i] = job_rows
        if cache is not None:
            tmp = cache / f"{keys[i]}.json.tmp"
            tmp.write_text(json.dumps(job_rows if jobs[i].seeds else job_rows[0]))
            tmp.replace(cache / f"{keys[i]}.json")     # atomic: a killed run never leaves half a file
        if bar is not None:
            bar.update(len(job_rows))

    def failure(i: int, exc: BaseException, n_failed: int) -> JobError:
        job = jobs[i]
        err = JobError(f"{n_failed} of {len(todo)} jobs failed; first: arm={job.arm!r} seed={job.seed} fn={job.fn!r} "
                       f"({type(exc).__name__}: {exc}). Finished jobs are cached: run again to resume.")
        err.__cause__ = exc
        return err

    futures: dict = {}
    try:
        if executor is None:
            for i in todo:
                try:
                    row = _execute(jobs[i], threads)
                except Exception as exc:                   # fail fast: later jobs likely fail the same way
                    raise failure(i, exc, 1) from exc
                finish(i, row)
        else:
            # pools: 1 torch thread per job by default (set inside the worker by _execute)
            futures = {executor.submit(_execute, jobs[i], 1 if threads is None else threads): i for i in todo}
            failed: list[tuple[int, BaseException]] = []
            for fut in as_completed(futures):
                try:
                    row = fut.result()
                except Exception as exc:                   # keep collecting: the other jobs still get cached
                    failed.append((futures[fut], exc))
                    continue
                finish(futures[fut], row)
            if failed:
                raise failure(*failed[0], len(failed))
    except BaseException:
        for fut in futures:                                # Ctrl-C or a failure: drop what has not started
            fut.cancel()
        raise
    finally:
        if bar is not None:
            bar.close()
    return [row for i in range(len(jobs)) for row in rows[i]], hits


def run_jobs(jobs: Iterable[Job], executor: Executor | None = None, cache_dir: str | Path | None = None,
             progress: bool = True, threads: int | None = None, desc: str = "jobs") -> list[dict[str, Any]]:
    """Run ``jobs`` (serially when ``executor`` is None) and return their result rows, in job order (a seed
    group's rows in its seeds' order).

    ``executor``: any ``concurrent.futures.Executor``: :func:`process_executor`, a thread pool, or a Dask
    cluster's ``distributed.Client(...).get_executor()``; every job's function must be importable there.
    ``cache_dir``: finished jobs are stored there as ``<key>.json`` and not run again (resume after a kill).
    ``threads``: torch threads per job, set inside the worker (default: 1 in pool workers, unchanged when serial).
    Each job's function is imported here first, so a typo fails before any job runs. A job that raises gives a
    :class:`JobError` (serial: at once; pools: after the other jobs finished and were cached).
    """
    return _run_jobs(list(jobs), executor, cache_dir, progress, threads, desc)[0]


# ------------------------------------------------------------------------------------------------ executors

#: The executor kinds of :func:`open_executor` and of the command line's ``--executor``.
EXECUTORS = ("serial", "processes", "dask")


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError("the Dask executor needs dask and distributed: pip install 'moewidgets[dist]'") from exc
    return distributed


@contextmanager
def dask_executor(scheduler: str | None = None, workers: int | None = None) -> Iterator[Executor]:
    """A Dask cluster as an ``Executor`` for :func:`run_jobs`; the client (and a cluster it started) close on exit.

    ``scheduler``: the address of a running scheduler (``"tcp://host:8786"``; its workers must have moewidgets
    installed at the same version). ``None``: start a ``distributed.LocalCluster`` of ``workers`` (default: one per
    core) worker processes with 1 thread each, bound to 127.0.0.1, dashboard off, and close it afterwards.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r} must be an integer >= 1 (or None: one per core)")
    if scheduler is not None and workers is not None:
        raise ValueError(f"workers={workers} cannot be set with scheduler={scheduler!r}: the cluster has its workers")
    distributed = _distributed()
    cluster = None
    if scheduler is None:
        import dask
        # Dask spawns workers with MALLOC_TRIM_THRESHOLD_=65536 (hand freed memory back to the OS at once); torch
        # allocates and frees the same small tensors every step, so each job then page-faults ~20× more and spends
        # ~25 % more CPU in the kernel (measured on a chapter-1 job). Keep Dask's other variables, drop that one.
        environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
                   if k != "MALLOC_TRIM_THRESHOLD_"}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = distributed.LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                                               processes=True, host="127.0.0.1", dashboard_address=None)
    try:
        try:
            client = distributed.Client(cluster if cluster is not None else scheduler)
        except OSError as exc:
            raise ConnectionError(f"scheduler={scheduler!r}: cannot connect ({exc}); start one with "
                                  f"`dask scheduler`, or leave the address out for a local cluster") from exc
        try:
            yield client.get_executor()
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


@contextmanager
def open_executor(kind: str = "serial", workers: int | None = None,
                  scheduler: str | None = None) -> Iterator[Executor | None]:
    """The executor ``kind`` names (one of :data:`EXECUTORS`), shut down on exit: ``"serial"`` gives ``None``
    (:func:`run_jobs` runs in this process), ``"processes"`` :func:`process_executor`, ``"dask"``
    :func:`dask_executor`. On an error or Ctrl-C, jobs that have not started are cancelled.

    >>> with open_executor("serial") as ex:
    ...     print(ex)
    None
    """
    if kind not in EXECUTORS:
        raise ValueError(f"executor={kind!r} must be one of {', '.join(map(repr, EXECUTORS))}")
    if scheduler is not None and kind != "dask":
        raise ValueError(f"scheduler={scheduler!r} needs executor='dask', not {kind!r}")
    if workers is not None and kind == "serial":
        raise ValueError(f"workers={workers} needs executor='processes' or 'dask', not 'serial'")
    if kind == "serial":
        yield None
    elif kind == "processes":
        pool = process_executor(workers)
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    else:
        with dask_executor(scheduler, workers) as ex:
            yield ex


# ------------------------------------------------------------------------------------------------ sweep specs

class SpecError(ValueError):
    """A sweep spec is invalid: the message names the field, the value and what is allowed."""


#: Built-in metrics of a sweep spec, by name, each a pair (job function, extra payload). ``chapter1`` gives loss,
#: probe MSE and the chapter-1 probes at init and after training; ``loss`` gives loss and probe MSE only (fast).
METRICS: dict[str, tuple[str, dict[str, Any]]] = {
    "chapter1": ("moewidgets.reproduce:chapter1_job", {}),                       # loss, probe MSE, chapter-1 probes
    "loss": ("moewidgets.reproduce:chapter1_job", {"converge_only": True}),      # loss and probe MSE only
}
_SPEC_FIELDS = ("name", "base", "grid", "seeds", "metrics", "probe_points")
_SECTIONS = ("model", "task", "train")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: every grid point × every seed is one :class:`Job`. See the module docstring for the
    YAML format; construct it with :meth:`from_dict` or :func:`load_spec`, which raise :class:`SpecError`.

    Fields::

        name          output name (<out>/<name>.jsonl)
        base          partial RunConfig dict merged over the defaults
        grid          "section.field" -> tuple of values (the arms are their cartesian product)
        seeds         tuple of seeds; each sets model.seed
        metrics       "chapter1", "loss" or "package.module:function"
        probe_points  probe points passed to the metrics function
        source        where the spec came from (prefixes every error)
    """

    name: str
    grid: dict[str, tuple]
    base: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | int = (0,)
    metrics: str = "chapter1"
    probe_points: int = 512
    source: str = field(default="sweep spec", compare=False)

    def _fail(self, msg: str) -> None:
        raise SpecError(f"{self.source}: {msg}")

    def __post_init__(self) -> None:
        from .config import MoEConfig, RunConfig, TaskConfig, TrainConfig
        classes = {"model": MoEConfig, "task": TaskConfig, "train": TrainConfig}
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            self._fail(f"name={self.name!r} must be a file name made of letters, digits, '.', '_' and '-'")
        # base: a partial RunConfig, each section a mapping; the config classes validate names and values
        if not isinstance(self.base, dict):
            self._fail(f"base={self.base!r} must be a mapping of model/task/train settings, e.g. {{'model': {{'k': 2}}}}")
        for sec, val in self.base.items():
            if sec in classes and not isinstance(val, dict):
                self._fail(f"base.{sec}={val!r} must be a mapping of {classes[sec].__name__} fields")
        if "seed" in self.base.get("model", {}):
            self._fail("base.model.seed is not allowed: the seeds come from the 'seeds' field")
        try:
            RunConfig.from_dict(self.base)
        except ValueError as exc:
            self._fail(f"base: {exc}")
        # grid: "section.field" -> non-empty list of distinct values
        if not isinstance(self.grid, dict) or not self.grid:
            self._fail(f"grid={self.grid!r} must map at least one 'section.field' to a non-empty list of values, "
                       f"e.g. {{'model.k': [1, 2]}}")
        for key, values in self.grid.items():
            sec, dot, name = key.partition(".") if isinstance(key, str) else ("", "", "")
            if not dot or sec not in classes or not name or "." in name:
                self._fail(f"grid key {key!r} must be 'section.field' with section one of {', '.join(_SECTIONS)}")
            if name not in {f.name for f in dataclasses.fields(classes[sec])}:
                try:
                    classes[sec].from_dict({name: None})      # raises with the config class's own message
                except ValueError as exc:
                    self._fail(f"grid key {key!r}: {exc}")
            if key == "model.seed":
                self._fail("grid key 'model.seed' is not allowed: the seeds come from the 'seeds' field")
            if not isinstance(values, (list, tuple)) or not values:
                self._fail(f"grid[{key!r}]={values!r} must be a non-empty list of values")
            if any(a == b for a, b in itertools.combinations(values, 2)):
                self._fail(f"grid[{key!r}]={list(values)!r} repeats a value; each value must appear once")
        object.__setattr__(self, "grid", {k: tuple(v) for k, v in self.grid.items()})
        # seeds: N means 0..N-1
        seeds = tuple(range(self.seeds)) if _is_int(self.seeds) and self.seeds >= 1 else self.seeds
        if not isinstance(seeds, (list, tuple)) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds) \
                or len(set(seeds)) != len(seeds):
            self._fail(f"seeds={seeds!r} must be a number of seeds N >= 1 (seeds 0..N-1) or a non-empty list of "
                       f"distinct integers >= 0")
        object.__setattr__(self, "seeds", tuple(seeds))
        # metrics and probe points
        fn, _ = self._metrics_fn()
        try:
            _resolve(fn)
        except ValueError as exc:
            self._fail(f"metrics={self.metrics!r} must be one of {', '.join(map(repr, METRICS))} or "
                       f"'package.module:function' ({exc})")
        if not _is_int(self.probe_points) or self.probe_points < 1:
            self._fail(f"probe_points={self.probe_points!r} must be an integer >= 1")
        # every grid point is a valid RunConfig (checked now, before any job runs)
        for point in self.points():
            try:
                run = self.run_config(point, self.seeds[0])
            except ValueError as exc:
                self._fail(f"grid point {_point_label(point)}: {exc}")
            if self.metrics == "chapter1" and self.probe_points > run.task.n_probe:
                self._fail(f"probe_points={self.probe_points} must be <= task.n_probe={run.task.n_probe} "
                           f"(grid point {_point_label(point)}): lower probe_points or raise task.n_probe")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "sweep spec", name: str | None = None) -> "SweepSpec":
        """A spec from a dict (a parsed YAML file); ``name``: the default when ``d`` has none. ``seeds: N`` means
        seeds 0..N-1. Raises :class:`SpecError` naming the first invalid field."""
        if not isinstance(d, dict):
            raise SpecError(f"{source}: the spec must be a mapping with fields {list(_SPEC_FIELDS)}, not {d!r}")
        unknown = sorted(set(d) - set(_SPEC_FIELDS), key=str)
        if unknown:
            raise SpecError(f"{source}: unknown field(s) {unknown}; allowed fields are {sorted(_SPEC_FIELDS)}")
        if "grid" not in d:
            raise SpecError(f"{source}: grid is missing: map at least one 'section.field' to a list of values, "
                            f"e.g. {{'model.k': [1, 2]}}")
        kw = dict(d)
        if "name" not in kw:
            if name is None:
                raise SpecError(f"{source}: name is missing: the output file is <out>/<name>.jsonl")
            kw["name"] = name
        if kw.get("base") is None:
            kw["base"] = {}
        return cls(source=source, **kw)

    def _metrics_fn(self) -> tuple[str, dict[str, Any]]:
        if not isinstance(self.metrics, str):
            self._fail(f"metrics={self.metrics!r} must be one of {', '.join(map(repr, METRICS))} or "
                       f"'package.module:function'")
        return METRICS.get(self.metrics, (self.metrics, {}))

    def points(self) -> list[dict[str, Any]]:
        """The grid points (``{"section.field": value}``), the cartesian product in the grid's order."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]

    def run_config(self, point: dict[str, Any], seed: int):
        """The :class:`~moewidgets.config.RunConfig` of one grid point and seed: base, then the point, then
        ``model.seed = seed``."""
        from .config import RunConfig
        d = copy.deepcopy(self.base)
        for key, value in point.items():
            sec, _, name = key.partition(".")
            d.setdefault(sec, {})[name] = value
        d.setdefault("model", {})["seed"] = seed
        return RunConfig.from_dict(d)

    def jobs(self) -> list[Job]:
        """One :class:`Job` per grid point × seed (seeds innermost); the arm is the point, e.g. ``"model.k=2"``."""
        fn, extra = self._metrics_fn()
        return [Job(_point_label(point), fn,
                    {"run": self.run_config(point, seed).to_dict(), "probe_points": self.probe_points, **extra}, seed)
                for point in self.points() for seed in self.seeds]


@functools.lru_cache(maxsize=None)
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """Safe loading, YAML 1.2 exponent numbers, and an error on a repeated key."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"repeated key {key!r}", key_node.start_mark)
                if isinstance(key, (str, int, float, bool)):
                    seen.add(key)
            return super().construct_mapping(node, deep)

    # PyYAML follows YAML 1.1, where a float needs a dot: without this "1e-3" would be the text '1e-3'
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML sweep spec (format: the module docstring); the name defaults to the file's stem.

    Raises ``FileNotFoundError`` saying where it looked, or :class:`SpecError` naming the first invalid field."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep spec at {path} (looked at {path.resolve()}): give the path of a YAML "
                                f"file such as examples/sweep-small.yml")
    try:
        data = yaml.load(path.read_text(), Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    return SweepSpec.from_dict(data, source=str(path), name=path.stem)


@dataclass
class SweepResult:
    """What :func:`run_sweep` did.

    Fields::

        path        the results file written (one JSON row per job)
        rows        the rows, in job order (arm, seed, config, overrides, metrics, wall_s, device, versions, key)
        cache_hits  jobs whose result came from the cache (not run again)
        wall_s      wall time of the whole sweep, seconds
    """

    path: Path
    rows: list[dict[str, Any]]
    cache_hits: int
    wall_s: float


def run_sweep(spec: SweepSpec, executor: Executor | None = None, out_dir: str | Path = "build/sweeps",
              cache_dir: str | Path | None = "build/cache/sweep", progress: bool = True,
              threads: int | None = 1) -> SweepResult:
    """Run every job of ``spec`` on ``executor`` (see :func:`run_jobs`) and write ``<out_dir>/<name>.jsonl``.

    ``cache_dir``: shared by all sweeps (a job's key is its function, payload, seed and version, so sweeps that
    overlap reuse each other's runs); ``threads``: torch threads per job, also when serial (restored afterwards).
    Each row also gets ``overrides``, its grid point as a dict.

    >>> import tempfile
    >>> spec = SweepSpec.from_dict({"name": "doc", "grid": {"train.steps": [2]}, "metrics": "loss",
    ...                             "base": {"task": {"n_train": 64, "n_probe": 16}, "train": {"device": "cpu"}}})
    >>> with tempfile.TemporaryDirectory() as out:
    ...     res = run_sweep(spec, out_dir=out, cache_dir=None, progress=False)
    ...     print(res.path.name, len(res.rows), res.rows[0]["overrides"], res.rows[0]["metrics"]["steps"])
    doc.jsonl 1 {'train.steps': 2} 2
    """
    t0 = time.perf_counter()
    jobs = spec.jobs()
    rows, hits = _run_jobs(jobs, executor, cache_dir, progress, threads, f"sweep {spec.name}")
    points = [point for point in spec.points() for _ in spec.seeds]          # same order as spec.jobs()
    for row, point in zip(rows, points):
        row["overrides"] = point
    path = write_jsonl(rows, Path(out_dir) / f"{spec.name}.jsonl")
    return SweepResult(path, rows, hits, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ results files

def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON lines (sorted keys, one row per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON-lines results; a missing file says where it looked and how to make it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}: run `python -m moewidgets reproduce <chapter>` to make them")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _square_seeds(payload: dict, seeds: list[int]) -> list[dict]:   # the doctest's seed group
    return [{"y": payload["x"] ** 2 + s} for s in seeds]


def _square(payload: dict, seed: int) -> dict:   # the doctest's job
    return {"y": payload["x"] ** 2}
