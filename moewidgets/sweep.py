"""Sweeps: configs × seeds on any ``concurrent.futures.Executor``, resumable, written as JSON-lines results.

Two levels, the second built on the first.

**Jobs.** A sweep is a list of :class:`Job` s. Each job names a task function (``"module:function"``, so process and
Dask workers can import it), a JSON-able payload and a seed. Results are cached one file per job under
``cache_dir``, keyed by a hash of (function, payload, seed, package version, a hash of the package's source
files and of the job function's module): re-running a killed sweep skips the finished jobs, and a changed config or
any change to the code re-runs them. Every row records the code that made it (``commit``: the git commit, with
``+dirty`` when the checkout differs from it, else ``source:<hash>``).

Files are never half-written: cache and results files go to a unique temp file in the same folder, are fsync'd and
``os.replace``d. A cache file that is truncated, not JSON, or of the wrong shape, key or row count for its job is a
miss (logged with its name) and the job runs again. Several sweeps may share one cache and one output folder: each
job is claimed with a lock file ``<key>.lock`` (``O_CREAT|O_EXCL``, holding the owner's pid; the lock of a dead
process is taken over), a sweep waits for the jobs another one is computing, and every job is computed once.
Pool and local-Dask workers exit when the sweep's process dies (also on ``kill -9``).

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
    metrics: chapter1          # chapter1 (default) | loss | "package.module:function" (runs that code, see below)
    probe_points: 128          # probe points of the chapter-1 probes, <= task.n_probe (default 512)

Metrics: ``chapter1`` trains and reports the loss, the probe MSE and the chapter-1 geometry probes (σ1, stable
rank, PCA effective rank, alignment, ...) at initialisation (``init_*``) and after training
(``moewidgets.reproduce.chapter1_job``); ``loss`` trains and reports the loss and the probe MSE only.
A function of your own is called as ``fn({"run": RunConfig dict, "probe_points": P}, seed) -> dict of numbers``.
**A spec that names a function runs code**: the module is imported and the function called, in this process and
in every worker, so run only specs you trust. Only a module named explicitly and importable from the installed
packages is accepted; a module found in the current folder is refused unless you pass ``--allow-local``
(``load_spec(path, allow_local=True)``).
Sizes are bounded (:mod:`moewidgets.budget`): at most 10⁴ grid points, 10⁴ seeds, 10⁵ jobs, and every run's
config within the tensor-memory budget (``MOEWIDGETS_BUDGET_GB`` raises it).
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
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

__all__ = ["Job", "JobError", "run_jobs", "job_key", "count_cached", "write_jsonl", "read_jsonl", "write_atomic",
           "ClaimLock", "source_hash", "code_version", "ResultsFileError",
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


_log = logging.getLogger("moewidgets.sweep")
_PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha1 (16 hex digits) of the package's source, ``moewidgets/**/*.py`` (paths and bytes), computed once per
    process: part of every cache key, so a change to the numerics can never reuse a stale cached row."""
    h = hashlib.sha1()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        h.update(path.relative_to(_PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _fn_source_hash(fn: str) -> str:
    """sha1 of the source file of a job function's module (functions outside the package: their own code counts
    too); "" when it has no source file. The module is imported (as :func:`_resolve` does anyway)."""
    module = fn.partition(":")[0]
    try:
        origin = getattr(importlib.import_module(module), "__file__", None)
        return hashlib.sha1(Path(origin).read_bytes()).hexdigest()[:16] if origin else ""
    except Exception:                  # an unimportable function fails with its own message in _resolve
        return ""


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """What code made a row: the git commit of the checkout the package runs from, ``+dirty`` when tracked files
    differ from it, or ``source:<source_hash()>`` outside a git checkout (an installed package)."""
    root = _PACKAGE_DIR.parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                                  check=True).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            raise OSError("the package is not at the top of a git checkout")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"source:{source_hash()}"


def job_key(job: Job) -> str:
    """Cache key: sha1 of (function, payload, seed, package version, :func:`source_hash` of the package, hash of
    the job function's module source), 16 hex digits."""
    key = {"fn": job.fn, "payload": job.payload, "seed": job.seed, "version": _version(),
           "source": source_hash(), "fn_source": _fn_source_hash(job.fn)}
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
    return sum(_read_cached(Path(cache_dir) / f"{job_key(job)}.json", job, job_key(job), quiet=True) is not None
               for job in jobs)


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Exit this (worker) process as soon as its parent ``parent_pid`` is gone (re-parented after a kill -9), so a
    killed sweep leaves no orphan workers. Runs in a daemon thread; ``os._exit`` skips cleanup that could hang."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(interval)
    threading.Thread(target=watch, name="moewidgets-watch-parent", daemon=True).start()


def _worker_init(parent_pid: int) -> None:
    """Process-pool worker initializer: die with the parent (see :func:`_watch_parent`)."""
    if os.getppid() != parent_pid:          # the parent died before this worker got here
        os._exit(1)
    _watch_parent(parent_pid)


def dask_setup(worker=None) -> None:
    """Dask worker preload (``preload=["moewidgets.sweep"]``, used by the local cluster of :func:`dask_executor`):
    the worker process exits when the process that started the cluster is gone."""
    _watch_parent(os.getppid())


def process_executor(workers: int | None = None) -> Executor:
    """A local process pool (one worker per core by default); use it as ``run_jobs(..., executor=...)``.
    Its workers exit when this process dies (also on ``kill -9``): no orphans."""
    import multiprocessing as mp
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r} must be an integer >= 1 (or None: one per core)")
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))


# ------------------------------------------------------------------------------------------------ cache files

#: How often a sweep waiting for a job that another sweep is computing looks for its result (seconds).
POLL_S = 0.2
#: Jobs this process has started (run or submitted); the command line reads it to tell "nothing ran" (exit 2)
#: from "jobs ran and something failed" (exit 1).
STARTED = {"jobs": 0}


def _read_cached(path: Path, job: Job, key: str, quiet: bool = False) -> list[dict] | None:
    """The rows cached for ``job`` in ``path``, or None (a miss): a missing, unreadable, truncated or wrong-shape
    file (not the job's key, not a dict / a list of ``job.n_rows`` dicts with metrics) is a miss, logged with the
    file name, and the job runs again (its result then replaces the file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = f"unreadable ({exc})"
    else:
        try:
            data = json.loads(text)
            why = ""
        except json.JSONDecodeError as exc:
            why = f"line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"
        if not why:
            rows = data if job.seeds else [data]
            expected = list(job.seeds) if job.seeds else [job.seed]
            if (job.seeds and not isinstance(data, list)) or (not job.seeds and not isinstance(data, dict)):
                why = f"holds a {type(data).__name__}, expected {'a list of rows' if job.seeds else 'one row'}"
            elif len(rows) != len(expected):
                why = f"holds {len(rows)} rows, the job gives {len(expected)}"
            elif not all(isinstance(r, dict) and isinstance(r.get("metrics"), dict) for r in rows):
                why = "a row is not a mapping with 'metrics'"
            elif [r.get("key") for r in rows] != [key] * len(rows):
                why = f"key {rows[0].get('key')!r} is not the job's key {key!r}"
            elif [r.get("seed") for r in rows] != expected:
                why = f"seeds {[r.get('seed') for r in rows]} are not the job's {expected}"
            else:
                return rows
    if not quiet:
        _log.warning("cache file %s: %s; treating it as a miss and running arm=%r seed=%s again",
                     path, why, job.arm, job.seed)
    return None


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a unique temp file in the same folder (``tempfile.mkstemp``), flushed
    and fsync'd, then ``os.replace``d over ``path``. A kill, a full disk or any error midway leaves the previous
    file intact (and no temp file behind, except after a kill -9)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


class ClaimLock:
    """A claim on one job in a shared cache (the sweep cache, and the dashboards' run cache): ``<key>.lock`` created
    with ``O_CREAT | O_EXCL`` holding ``"<pid> <host>"``. A lock whose owner (on this host) is dead is stale and taken
    over."""

    def __init__(self, path: Path):
        self.path = path
        self.me = f"{os.getpid()} {socket.gethostname()}"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.me)
        return True

    def _owner_dead(self, text: str) -> bool:
        pid, _, host = text.partition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return not text and self._old(5.0)     # an empty lock: its owner died between create and write
        return not _pid_alive(int(pid))

    def _old(self, seconds: float) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > seconds
        except OSError:
            return False

    def acquire(self) -> bool:
        """True when this process now holds the claim; False when a live owner holds it."""
        if self._create():
            return True
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return self._create()
        if not self._owner_dead(text):
            return False
        # stale: move it aside under a private name (only one taker succeeds), check it was the stale one
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()
        try:
            taken = aside.read_text()
        except OSError:
            taken = text
        if taken != text and not self._owner_dead(taken):   # we moved a fresh live lock: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        _log.warning("lock %s of a dead process (%s) taken over", self.path, text)
        return self._create()

    def release(self) -> None:
        try:
            if self.path.read_text() == self.me:
                self.path.unlink()
        except FileNotFoundError:
            pass


def _run_jobs(jobs: list[Job], executor: Executor | None, cache_dir: str | Path | None, progress: bool,
              threads: int | None, desc: str) -> tuple[list[dict[str, Any]], int]:
    """:func:`run_jobs`, also returning the number of cache hits."""
    for fn in sorted({job.fn for job in jobs}):          # a typo fails here, before any job runs
        _resolve(fn)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    keys = [job_key(job) for job in jobs]
    paths = [cache / f"{key}.json" if cache is not None else None for key in keys]
    rows: dict[int, list[dict]] = {}      # job index -> its rows (a cache file holds a row, or a group's list)
    todo: list[int] = []
    for i, key in enumerate(keys):
        cached = _read_cached(paths[i], jobs[i], key) if paths[i] is not None else None
        if cached is not None:
            rows[i] = cached
        else:
            todo.append(i)
    executed = [0]                    # jobs this process ran; the rest came from the cache (or another sweep)

    bar = None
    if progress:                      # counted in runs (arm, seed): a seed group of 5 advances it by 5
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(j.n_rows for j in jobs), initial=sum(jobs[i].n_rows for i in rows), desc=desc,
                   unit="run")

    locks: dict[int, ClaimLock] = {}  # jobs this process has claimed in the shared cache
    claimed: set[int] = set()         # jobs this process runs

    def claim(i: int) -> bool:
        """Claim job i (True), or False when another live sweep computes it. A claimed job whose result appeared
        meanwhile is taken from the cache instead (and True is not returned)."""
        if cache is None:
            claimed.add(i)
            return True
        lock = ClaimLock(cache / f"{keys[i]}.lock")
        if not lock.acquire():
            return False
        cached = _read_cached(paths[i], jobs[i], keys[i], quiet=True)
        if cached is not None:            # another sweep finished it between our read and our claim
            lock.release()
            done_from_cache(i, cached)
            return False
        locks[i] = lock
        claimed.add(i)
        return True

    def done_from_cache(i: int, cached: list[dict]) -> None:
        rows[i] = cached
        if bar is not None:
            bar.update(len(cached))

    def finish(i: int, job_rows: list[dict]) -> None:
        for row in job_rows:
            row["key"] = keys[i]      # the caller's key: a worker with another version still lands in this cache
            row["commit"] = code_version()
            row["source"] = source_hash()
        if job_rows[0].get("version") != _version():
            warnings.warn(f"job arm={jobs[i].arm!r} seed={jobs[i].seed} ran on moewidgets "
                          f"{job_rows[0].get('version')}, this process has {_version()}: install the same version "
                          "on every worker", RuntimeWarning, stacklevel=3)
        rows[i] = job_rows
        executed[0] += 1
        if cache is not None:
            write_atomic(paths[i], json.dumps(job_rows if jobs[i].seeds else job_rows[0]))
        release(i)
        if bar is not None:
            bar.update(len(job_rows))

    def release(i: int) -> None:
        lock = locks.pop(i, None)
        if lock is not None:
            lock.release()

    def failure(i: int, exc: BaseException, n_failed: int) -> JobError:
        job = jobs[i]
        err = JobError(f"{n_failed} of {len(todo)} jobs failed; first: arm={job.arm!r} seed={job.seed} fn={job.fn!r} "
                       f"({type(exc).__name__}: {exc}). Finished jobs are cached: run again to resume.")
        err.__cause__ = exc
        return err

    futures: dict = {}

    def run_batch(batch: list[int]) -> None:
        """Run the claimed jobs ``batch`` (serially: fail fast; pools: collect, then raise the first failure)."""
        nonlocal futures
        if executor is None:
            for i in batch:
                STARTED["jobs"] += 1
                try:
                    row = _execute(jobs[i], threads)
                except Exception as exc:                   # fail fast: later jobs likely fail the same way
                    release(i)
                    raise failure(i, exc, 1) from exc
                finish(i, row)
            return
        # pools: 1 torch thread per job by default (set inside the worker by _execute)
        futures = {executor.submit(_execute, jobs[i], 1 if threads is None else threads): i for i in batch}
        STARTED["jobs"] += len(futures)
        failed: list[tuple[int, BaseException]] = []
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:                   # keep collecting: the other jobs still get cached
                failed.append((futures[fut], exc))
                release(futures[fut])
                continue
            finish(futures[fut], row)
        futures = {}
        if failed:
            raise failure(*failed[0], len(failed))

    try:
        waiting = [i for i in todo if not claim(i) and i not in rows]
        run_batch([i for i in todo if i in claimed])
        announced = False
        while waiting:                 # jobs another sweep holds: wait for their results (or take over)
            if not announced:
                _log.info("%d job(s) are being computed by another sweep on %s; waiting for them", len(waiting),
                          cache)
                announced = True
            time.sleep(POLL_S)
            still = []
            for i in waiting:
                cached = _read_cached(paths[i], jobs[i], keys[i], quiet=True)
                if cached is not None:
                    done_from_cache(i, cached)
                elif not claim(i) and i not in rows:
                    still.append(i)
            run_batch([i for i in waiting if i in claimed and i not in rows])
            waiting = still
    except BaseException:
        for fut in futures:                                # Ctrl-C or a failure: drop what has not started
            fut.cancel()
        raise
    finally:
        for i in list(locks):                              # never leave a claim behind
            release(i)
        if bar is not None:
            bar.close()
    return [row for i in range(len(jobs)) for row in rows[i]], len(jobs) - executed[0]


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
                                               processes=True, host="127.0.0.1", dashboard_address=None,
                                               preload=["moewidgets.sweep"])   # dask_setup: die with us
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


def _short(x: Any, n: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n] + "..."


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
    allow_local: bool = field(default=False, compare=False)   # metrics from modules in the current folder

    def _fail(self, msg: str) -> None:
        raise SpecError(f"{self.source}: {msg}")

    def _check_metrics_module(self, fn: str) -> None:
        """``metrics: "module:function"`` imports and calls that function, i.e. runs code. Allowed: a module named
        explicitly that is importable from the installed packages; a module found in the current folder (or a
        sys.path entry inside it) only with ``allow_local`` (``--allow-local``). Checked before importing it."""
        module = fn.partition(":")[0]
        top = module.split(".")[0]
        if not top or top == "moewidgets" or self.allow_local:
            return
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            found = None
        origin = getattr(found, "origin", None) or next(iter(getattr(found, "submodule_search_locations", None)
                                                             or []), None)
        if found is None or origin is None:
            return                       # not importable: _resolve says so
        cwd = Path.cwd().resolve()
        path = Path(origin).resolve()
        if path == cwd or cwd in path.parents:
            self._fail(f"metrics={self.metrics!r}: module {top!r} comes from the current folder ({path}); a spec's "
                       f"metrics function runs code, so only installed modules are allowed: install it, or pass "
                       f"--allow-local (allow_local=True) if you trust it")

    def __post_init__(self) -> None:
        from .config import MoEConfig, RunConfig, TaskConfig, TrainConfig
        from .budget import MAX_SEED, check_count, current
        budget = current()
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
            if len(values) > budget.max_grid:      # before the pairwise check below (quadratic)
                self._fail(f"grid[{key!r}] has {len(values)} values: more than {budget.label} of "
                           f"{budget.max_grid} grid points")
            if any(a == b for a, b in itertools.combinations(values, 2)):
                self._fail(f"grid[{key!r}]={list(values)!r} repeats a value; each value must appear once")
        object.__setattr__(self, "grid", {k: tuple(v) for k, v in self.grid.items()})
        n_points = math.prod(len(v) for v in self.grid.values())
        try:
            check_count(f"grid ({' × '.join(str(len(v)) for v in self.grid.values())} = {n_points} grid points)",
                        n_points, "max_grid", budget)
        except ValueError as exc:
            self._fail(str(exc))
        # seeds: N means 0..N-1
        if _is_int(self.seeds) and self.seeds > budget.max_seeds:
            self._fail(f"seeds={self.seeds} exceeds {budget.label} of {budget.max_seeds} seeds per sweep")
        seeds = tuple(range(self.seeds)) if _is_int(self.seeds) and self.seeds >= 1 else self.seeds
        if not isinstance(seeds, (list, tuple)) or not seeds or not all(_is_int(s) and 0 <= s <= MAX_SEED
                                                                         for s in seeds) \
                or len(set(seeds)) != len(seeds):
            self._fail(f"seeds={_short(seeds)} must be a number of seeds N >= 1 (seeds 0..N-1) or a non-empty list "
                       f"of distinct integers in 0..{MAX_SEED}")
        try:
            check_count("seeds", len(seeds), "max_seeds", budget)
            check_count(f"jobs ({n_points} grid points × {len(seeds)} seeds)", n_points * len(seeds), "max_jobs",
                        budget)
        except ValueError as exc:
            self._fail(str(exc))
        object.__setattr__(self, "seeds", tuple(seeds))
        # metrics (code that runs: only named functions of installed modules, see _check_metrics_module) and
        # probe points
        fn, _ = self._metrics_fn()
        if self.metrics not in METRICS:
            self._check_metrics_module(fn)
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
    def from_dict(cls, d: dict[str, Any], source: str = "sweep spec", name: str | None = None,
                  allow_local: bool = False) -> "SweepSpec":
        """A spec from a dict (a parsed YAML file); ``name``: the default when ``d`` has none. ``seeds: N`` means
        seeds 0..N-1. ``allow_local``: let ``metrics`` name a module of the current folder. Raises
        :class:`SpecError` naming the first invalid field."""
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
        return cls(source=source, allow_local=allow_local, **kw)

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


def load_spec(path: str | Path, allow_local: bool = False) -> SweepSpec:
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
    return SweepSpec.from_dict(data, source=str(path), name=path.stem, allow_local=allow_local)


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

    ``cache_dir``: shared by all sweeps, also running at the same time (a job's key is its function, payload, seed,
    version and source hashes, so sweeps that overlap reuse each other's runs, and each job is computed once); ``threads``: torch threads per job, also when serial (restored afterwards).
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

class ResultsFileError(ValueError):
    """A results file cannot be read: the message names the file and the line."""


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON lines (sorted keys, one row per line), atomically (:func:`write_atomic`): a kill or a
    full disk during the write leaves the previous file as it was."""
    return write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON-lines results; a missing file says where it looked and how to make it, a line that is not a JSON
    object raises :class:`ResultsFileError` naming the file and the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}: run `python -m moewidgets reproduce <chapter>` to make them")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ResultsFileError(f"{path}: byte {exc.start} is not UTF-8 ({exc.reason}); the file is damaged: "
                               f"restore it (git checkout) or make it again") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsFileError(f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno}); the file is "
                                   f"damaged: restore it (git checkout) or make it again") from None
        if not isinstance(row, dict):
            raise ResultsFileError(f"{path} line {n}: a {type(row).__name__}, expected a JSON object (one row)")
        rows.append(row)
    return rows


def _square_seeds(payload: dict, seeds: list[int]) -> list[dict]:   # the doctest's seed group
    return [{"y": payload["x"] ** 2 + s} for s in seeds]


def _square(payload: dict, seed: int) -> dict:   # the doctest's job
    return {"y": payload["x"] ** 2}
