"""Sweeps: configs × seeds on any ``concurrent.futures.Executor``, resumable, written as JSON-lines results.

A sweep is a list of :class:`Job` s. Each job names a task function (``"module:function"``, so process and
Dask workers can import it), a JSON-able payload and a seed. Results are cached one file per job under
``cache_dir``, keyed by a hash of (function, payload, seed, package version): re-running a killed sweep skips the
finished jobs, and a changed config or a new package version re-runs them.

>>> jobs = [Job("doc", "moewidgets.sweep:_square", {"x": x}, seed=0) for x in (1, 2)]
>>> [r["metrics"]["y"] for r in run_jobs(jobs, progress=False)]
[1, 4]
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["Job", "run_jobs", "job_key", "write_jsonl", "read_jsonl", "process_executor"]


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(payload, seed) -> dict of metrics``; ``arm`` labels it in the results."""

    arm: str
    fn: str                      # "package.module:function"
    payload: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def _version() -> str:
    from . import __version__
    return __version__


def job_key(job: Job) -> str:
    """Cache key: sha1 of (function, payload, seed, package version), 16 hex digits."""
    blob = json.dumps({"fn": job.fn, "payload": job.payload, "seed": job.seed, "version": _version()},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _resolve(fn: str) -> Callable[[dict, int], dict]:
    module, _, name = fn.partition(":")
    if not name:
        raise ValueError(f"Job.fn={fn!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def _execute(job: Job, threads: int | None) -> dict[str, Any]:
    """Run one job in this process (a worker): returns the result row."""
    import torch
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    metrics = _resolve(job.fn)(dict(job.payload), job.seed)
    device = metrics.pop("_device", "cpu")
    return {
        "arm": job.arm, "seed": job.seed, "config": job.payload, "metrics": metrics,
        "wall_s": round(time.perf_counter() - t0, 3), "device": device, "threads": torch.get_num_threads(),
        "version": _version(), "torch": torch.__version__, "python": platform.python_version(),
        "key": job_key(job),
    }


def process_executor(workers: int | None = None) -> Executor:
    """A local process pool (one worker per core by default); use it as ``run_jobs(..., executor=...)``."""
    import multiprocessing as mp
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=mp.get_context("spawn"))


def run_jobs(jobs: Iterable[Job], executor: Executor | None = None, cache_dir: str | Path | None = None,
             progress: bool = True, threads: int | None = None, desc: str = "jobs") -> list[dict[str, Any]]:
    """Run ``jobs`` (serially when ``executor`` is None) and return their result rows, in job order.

    ``cache_dir``: finished jobs are stored there as ``<key>.json`` and not run again (resume after a kill).
    ``threads``: torch threads per job (default: 1 in pool workers, unchanged when serial).
    """
    jobs = list(jobs)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    todo: list[int] = []
    for i, job in enumerate(jobs):
        path = cache / f"{job_key(job)}.json" if cache is not None else None
        if path is not None and path.exists():
            rows[i] = json.loads(path.read_text())
        else:
            todo.append(i)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run")

    def finish(i: int, row: dict) -> None:
        rows[i] = row
        if cache is not None:
            tmp = cache / f"{row['key']}.json.tmp"
            tmp.write_text(json.dumps(row))
            tmp.replace(cache / f"{row['key']}.json")     # atomic: a killed run never leaves half a file
        if bar is not None:
            bar.update(1)

    try:
        if executor is None:
            for i in todo:
                finish(i, _execute(jobs[i], threads))
        else:
            futures = {executor.submit(_execute, jobs[i], 1 if threads is None else threads): i for i in todo}
            from concurrent.futures import as_completed
            for fut in as_completed(futures):
                finish(futures[fut], fut.result())
    finally:
        if bar is not None:
            bar.close()
    return [rows[i] for i in range(len(jobs))]


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


def _square(payload: dict, seed: int) -> dict:   # the doctest's job
    return {"y": payload["x"] ** 2}
