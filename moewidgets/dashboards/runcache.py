"""A cache of finished live runs shared by every kernel on a machine (classroom mode: ``make app``, app/README.md).

Twenty visitors who open chapter 1 all ask for the same default run. The first kernel trains it; every later one
finds the finished :class:`~moewidgets.train.Trainer` state on disk and only restores it, probes it and draws it.

One *entry* is one finished trainer (a run, or the reference trained beside it), stored as one JSON file
``<key>.json``::

    {"format", "key", "run" (RunConfig.to_dict()), "source" (moewidgets.sweep.source_hash()), "torch",
     "threads", "steps_done", "wall_s", "history" {step, loss, aux, load}, "state" (base64 of torch.save(state_dict))}

The key is ``sha1(format, run.to_dict(), source_hash(), torch version, torch threads)[:16]``: a change to any
config field or to any line of the package's source is a different key, so a stale entry is never used. What a
dashboard draws of a finished run is the model (its ``state_dict``: parameters and buffers such as the loss-free
bias or the K-Means centroids) and its ``history``; the optimiser state is not kept (a finished run never steps
again).

Bound: at most ``max_entries`` files (default 256) and ``max_mb`` MB (default 128) in the folder; after every
store the oldest files (by modification time; a hit refreshes it) are deleted until both hold. A chapter-1 entry
is ≈ 0.3 MB.

Concurrency: an entry is written with :func:`moewidgets.sweep.write_atomic` (a unique temp file, then
``os.replace``), so a reader sees the old file, the new file or none, never half of one, and two writers of one key
leave one valid entry. A kernel that misses can :meth:`RunCache.claim` the key (a ``<key>.lock`` file made with
``O_EXCL``, the sweep's own lock: a lock of a dead process is taken over); another kernel that misses while the
claim is held waits for the entry instead of training the same run again. A missing entry is a silent miss; an
unreadable, truncated or mismatched one is a miss logged with the file name and why.

Where: ``$MOEWIDGETS_RUN_CACHE`` if set, else ``$XDG_CACHE_HOME/moewidgets/runs`` (default
``~/.cache/moewidgets/runs``).

>>> import tempfile
>>> from moewidgets import RunConfig, TaskConfig, TrainConfig
>>> from moewidgets.train import Trainer
>>> cache = RunCache(tempfile.mkdtemp())
>>> run = RunConfig(task=TaskConfig(n_train=256, n_probe=64), train=TrainConfig(steps=3, device="cpu"))
>>> tr = Trainer.from_config(run); _ = tr.step(3)
>>> _ = cache.store(run, tr)
>>> fresh = Trainer.from_config(run)
>>> cache.load(run, fresh), fresh.steps_done, fresh.history.loss == tr.history.loss
(True, 3, True)
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..sweep import ClaimLock, source_hash, write_atomic
from ..train import History, Trainer

__all__ = ["RunCache", "default_folder", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = 1                      # bump when the entry layout changes (old entries become misses)
ENV = "MOEWIDGETS_RUN_CACHE"
HISTORY_FIELDS = ("step", "loss", "aux", "load")


def default_folder() -> Path:
    """``$MOEWIDGETS_RUN_CACHE``, else ``$XDG_CACHE_HOME/moewidgets/runs`` (``~/.cache/moewidgets/runs``)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moewidgets" / "runs"


def _state_to_text(state: dict[str, torch.Tensor]) -> str:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _state_from_text(text: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(base64.b64decode(text, validate=True)), map_location="cpu", weights_only=True)


class RunCache:
    """Finished trainers on disk, keyed by (run config, package source, torch, threads) (module docstring).

    Args:
        folder: where the entries live (default :func:`default_folder`).
        max_entries, max_mb: the bound kept after every store (oldest entries deleted first).
        wait_s: how long a kernel waits for a run another kernel has claimed before training it itself.
    """

    def __init__(self, folder: str | Path | None = None, max_entries: int = 256, max_mb: float = 128.0,
                 wait_s: float = 120.0):
        if not (isinstance(max_entries, int) and max_entries >= 1):
            raise ValueError(f"RunCache: max_entries={max_entries!r} must be an integer >= 1")
        if not max_mb > 0:
            raise ValueError(f"RunCache: max_mb={max_mb!r} must be > 0")
        self.folder = Path(folder).expanduser() if folder is not None else default_folder()
        self.max_entries, self.max_mb, self.wait_s = max_entries, float(max_mb), float(wait_s)

    def __repr__(self) -> str:
        return f"RunCache({str(self.folder)!r}, max_entries={self.max_entries}, max_mb={self.max_mb:g})"

    # -- keys ----------------------------------------------------------------------------------------------------
    @staticmethod
    def key(run, threads: int | None = 1) -> str:
        """sha1 (16 hex digits) of (format, ``run.to_dict()``, :func:`~moewidgets.sweep.source_hash`, torch
        version, torch threads): the same run trained by the same code gives the same key in every kernel."""
        blob = json.dumps({"format": FORMAT, "run": run.to_dict(), "source": source_hash(),
                           "torch": torch.__version__, "threads": threads}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def has(self, run, threads: int | None = 1) -> bool:
        return self.path(self.key(run, threads)).exists()

    # -- read ----------------------------------------------------------------------------------------------------
    def load(self, run, trainer: Trainer, threads: int | None = 1) -> bool:
        """Restore the finished run ``run`` into ``trainer`` (a freshly built :class:`~moewidgets.train.Trainer`
        of that run): model state, history, steps done. True on a hit; False on a miss (the trainer is then
        untouched; a bad entry is logged)."""
        key = self.key(run, threads)
        path = self.path(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError) as exc:
            return self._miss(path, f"unreadable ({exc})")
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as exc:
            return self._miss(path, f"line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})")
        why = self._mismatch(entry, key, run)
        if why:
            return self._miss(path, why)
        try:
            state = _state_from_text(entry["state"])
            history = History(**{f: list(entry["history"][f]) for f in HISTORY_FIELDS})
            backup = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            try:
                trainer.model.load_state_dict(state, strict=True)
            except Exception:
                trainer.model.load_state_dict(backup)
                raise
        except Exception as exc:           # a bad base64 / pickle / shape: a miss, never a crash
            return self._miss(path, f"model state does not load ({type(exc).__name__}: {exc})")
        trainer.history, trainer.steps_done = history, int(entry["steps_done"])
        trainer.wall_s = float(entry.get("wall_s", 0.0))
        try:
            os.utime(path)                 # recently used: evicted last
        except OSError:
            pass
        return True

    @staticmethod
    def _mismatch(entry: Any, key: str, run) -> str:
        """Why ``entry`` is not the finished run ``run`` under ``key`` ("" when it is)."""
        if not isinstance(entry, dict):
            return f"holds a {type(entry).__name__}, expected an entry mapping"
        if entry.get("format") != FORMAT:
            return f"format {entry.get('format')!r} is not {FORMAT}"
        if entry.get("key") != key:
            return f"key {entry.get('key')!r} is not the run's key {key!r}"
        if entry.get("source") != source_hash():
            return f"source hash {entry.get('source')!r} is not this package's {source_hash()!r}"
        if entry.get("run") != json.loads(json.dumps(run.to_dict())):
            return "its run config is not the requested one"
        steps, hist = entry.get("steps_done"), entry.get("history")
        if steps != run.train.steps:
            return f"steps_done={steps!r} is not the run's {run.train.steps} steps (unfinished)"
        if not isinstance(hist, dict) or any(not isinstance(hist.get(f), list) or len(hist[f]) != steps
                                             for f in HISTORY_FIELDS):
            return f"history is not {steps} records of {', '.join(HISTORY_FIELDS)}"
        if not isinstance(entry.get("state"), str):
            return "no model state"
        return ""

    @staticmethod
    def _miss(path: Path, why: str) -> bool:
        log.warning("run cache entry %s: %s; treating it as a miss (the run trains again and replaces it)",
                    path, why)
        return False

    # -- write ---------------------------------------------------------------------------------------------------
    def store(self, run, trainer: Trainer, threads: int | None = 1) -> Path | None:
        """Write the finished ``trainer`` of ``run`` atomically, then evict down to the bound. Returns the path
        (None when the trainer is not finished: only finished runs are cached)."""
        if not trainer.done or trainer.steps_done != run.train.steps:
            return None
        key = self.key(run, threads)
        h = trainer.history
        entry = {"format": FORMAT, "key": key, "run": run.to_dict(), "source": source_hash(),
                 "torch": torch.__version__, "threads": threads, "steps_done": trainer.steps_done,
                 "wall_s": trainer.wall_s, "history": {f: list(getattr(h, f)) for f in HISTORY_FIELDS},
                 "state": _state_to_text(trainer.model.state_dict())}
        path = write_atomic(self.path(key), json.dumps(entry))
        self.evict()
        return path

    def evict(self) -> list[Path]:
        """Delete the oldest entries until at most ``max_entries`` files and ``max_mb`` MB remain; returns the
        deleted paths. Safe beside other evictors (a file already gone is skipped)."""
        entries = []
        for p in self.folder.glob("*.json"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        entries.sort()                                         # oldest first
        total, limit, gone = sum(e[1] for e in entries), self.max_mb * 1e6, []
        while entries and (len(entries) > self.max_entries or total > limit):
            _, size, p = entries.pop(0)
            try:
                p.unlink()
                gone.append(p)
            except FileNotFoundError:
                pass
            total -= size
        return gone

    # -- claims --------------------------------------------------------------------------------------------------
    def claim(self, run, threads: int | None = 1) -> ClaimLock | None:
        """Claim the training of ``run``: the lock (call ``release()`` when the entry is stored or the run
        stopped), or None when another live process holds it (wait for its entry instead)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = ClaimLock(self.folder / f"{self.key(run, threads)}.lock")
        return lock if lock.acquire() else None

    def claimed(self, run, threads: int | None = 1) -> bool:
        """True while a lock on ``run`` exists (another kernel is training it)."""
        return (self.folder / f"{self.key(run, threads)}.lock").exists()
