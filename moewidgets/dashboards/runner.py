"""The live training loop shared by the dashboards (TensorFlow Playground's loop, in Python).

A slider change calls :meth:`LiveRunner.request`: it bumps a *generation counter* and at once says so on the status
line; then ONE asyncio task starts on the kernel's running loop: at once when the change comes after a quiet spell
(no request for ``debounce_s``, ~0.25 s: a keypress, a click, the first message of a drag), else after a debounce
timer (``loop.call_later``, ``debounce_s``) that every further message restarts (leading and trailing edge, as a UI
debounce does). The task trains a chunk of steps sized to ≈ 40 ms, redraws the cheap views (loss, load), yields to
the loop with ``await asyncio.sleep(0)`` (so the next slider message is handled), and stops at its next chunk
boundary once the generation has moved on. A drag across a slider therefore ends in exactly one finished run, for
the value where it stopped (its first message may start a run that the next message stops after a chunk; measured
on chapter 1's default, starting at once takes the 0.25 s debounce off every single change).

The expensive probes (Jacobian spectra, PCA, alignment) run every ``probe_every`` steps (chunks end there, so the
probe steps do not depend on timing) and at the end. At chapter-1 sizes they take ≈ 40–80 ms on one thread, about
one chunk. In an async run the compute (build, train a chunk, probe) runs in ONE worker thread, one after the
other, so the model is never probed while it trains (no snapshots), while the kernel's loop stays free to take
slider messages and send the redraws; every widget or bokeh mutation still happens on the loop (torch releases the
GIL inside its ops). (Probes in a second thread beside the training were tried earlier: their OpenMP threads
fought the training thread for two cores and made both slower.) ``worker=False`` computes on the loop.

Each run may train a *reference* model in lockstep (chapter 1: the parameter-matched dense baseline). References
are cached by their config, finished or not: a later run with the same reference resumes or reuses it.

``cache=`` (off by default; the classroom app turns it on) adds a :class:`~.runcache.RunCache` shared by every
kernel of the machine: a run whose finished trainer (and reference) is on disk is not trained again: both are
restored, the probes run once, the final picture is drawn and the status line ends in "done (cached)". A run that
misses claims its key while it trains (another kernel that misses the same run meanwhile waits for the entry instead
of training it too) and stores the finished trainers at the end. Only :class:`~moewidgets.train.Trainer` runs are
cached (chapter 2's transformer, built by ``make_trainer``, always trains).

:meth:`LiveRunner.run_sync` does the same work synchronously (tests, nbval, scripts); :meth:`LiveRunner.wait`
awaits whatever is queued or running. Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generator

from ..config import RunConfig
from ..data import TaskData, make_task
from ..train import NonFiniteLossError, Trainer, torch_threads
from .runcache import RunCache

__all__ = ["LiveRunner", "RunState", "RunTimings", "describe_run"]

log = logging.getLogger(__name__)

_WORKER: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    """The one training thread of the kernel, shared by every dashboard (their runs never train at once)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moewidgets-train")
    return _WORKER


def describe_run(run: RunConfig) -> str:
    """A short human description of a run: 'top-2 of 8 · τ=1 · α=0 · seed 0', 'dense (E·m=512) · seed 0'."""
    m = run.model
    parts = [m.label]
    if m.arch == "moe":
        parts += [f"τ={m.temperature:g}", f"α={m.aux_weight:g}"]
    parts.append(f"seed {m.seed}")
    return " · ".join(parts)


@dataclass
class RunTimings:
    """What one run took: work started (the request, or the debounce firing) → first redraw drawn, the redraw rate
    while training, the wall time."""

    fire_to_first_redraw_s: float = math.nan
    redraws: int = 0
    redraws_per_s: float = math.nan
    wall_s: float = math.nan
    probe_s: list[float] = field(default_factory=list)   # each probe's compute + draw time


@dataclass
class RunState:
    """One run: its config, generation, trainer, reference trainer (or None) and how it is going."""

    run: RunConfig
    generation: int
    trainer: Trainer
    reference: Trainer | None
    t_fire: float                  # perf_counter when the work started (at once, or the debounce fired)
    phase: str = "training"        # "training" | "done" | "stopped" | "error"
    error: str | None = None
    timings: RunTimings = field(default_factory=RunTimings)
    probes: Any = None             # the last probe result drawn (whatever the dashboard's probe returns)
    cached: bool = False           # the trainer was restored from the run cache (not trained here)
    reference_missed: bool = False  # the run cache had no valid entry for the unfinished reference


class LiveRunner:
    """Debounced, cancellable, chunked training with redraw callbacks (see the module docstring).

    Callbacks (all called on the loop's thread)::

        on_status(text):            the status line.
        on_chunk(state):            redraw the cheap views (after every chunk, ≥ 5 per second); returning False
                                    says the redraw was skipped (throttled): it is not counted, and the status
                                    line waits for the next drawn chunk too.
        probe(state) -> result:     compute the expensive probes (every ``probe_every`` steps and at the end).
        on_probes(state, result):   redraw the expensive views.
        reference_of(run) -> RunConfig | None: the reference model to train alongside (None: none).
        make_trainer(run) -> trainer: build a run's trainer (default: a Trainer on the cached task).

    Any trainer with ``step(n)``, ``done``, ``steps_done``, ``cfg.steps`` and ``history.loss`` works: chapter 2's
    transformer dashboard passes :meth:`LMTrainer.from_config <moewidgets.lm.LMTrainer.from_config>`.

    Knobs: ``debounce_s`` (the quiet spell after which a request starts at once; within a burst, request → start;
    ``leading = False`` makes every request wait for it),
    ``chunk_s`` (target seconds per chunk), ``probe_every`` (steps between
    probes), ``threads`` (torch intra-op threads while training, default 1; None leaves the setting alone),
    ``worker`` (async runs build, train and probe in one worker thread while the loop stays free; default True),
    ``cache`` (a :class:`~.runcache.RunCache`, or True for one in its default folder; default None: every run
    trains).

    >>> import asyncio
    >>> from moewidgets import RunConfig, TaskConfig, TrainConfig
    >>> seen = []
    >>> r = LiveRunner(on_status=seen.append, debounce_s=0.01)
    >>> run = RunConfig(task=TaskConfig(n_train=256, n_probe=64), train=TrainConfig(steps=3, device="cpu"))
    >>> async def drag():
    ...     for _ in range(5):
    ...         r.request(run)
    ...     await r.wait()
    >>> asyncio.run(drag()); r.runs_started, seen[-1].endswith("done")
    (1, True)
    """

    def __init__(self, *, on_status: Callable[[str], None] = lambda text: None,
                 on_chunk: Callable[[RunState], None] = lambda state: None,
                 probe: Callable[[RunState], Any] | None = None,
                 on_probes: Callable[[RunState, Any], None] = lambda state, result: None,
                 reference_of: Callable[[RunConfig], RunConfig | None] = lambda run: None,
                 describe: Callable[[RunConfig], str] = describe_run,
                 make_trainer: Callable[[Any], Any] | None = None,
                 debounce_s: float = 0.25, chunk_s: float = 0.04, probe_every: int = 100,
                 threads: int | None = 1, worker: bool = True, cache: RunCache | bool | None = None):
        self.on_status, self.on_chunk, self.probe, self.on_probes = on_status, on_chunk, probe, on_probes
        self.reference_of, self.describe = reference_of, describe
        self.make_trainer = make_trainer
        self.debounce_s, self.chunk_s, self.probe_every = debounce_s, chunk_s, probe_every
        self.leading = True                       # a request after a quiet spell starts at once (module docstring)
        self.threads = threads                    # torch threads while training (None: leave as is)
        self.worker = worker                      # async runs compute in the worker thread (False: on the loop)
        self.cache: RunCache | None = RunCache() if cache is True else (cache or None)   # shared finished runs
        self.generation = 0
        self.state: RunState | None = None        # the latest run that started (its trainer, timings, probes)
        self.runs_started = 0
        self.runs_completed = 0
        self.status = ""
        self._pending: RunConfig | None = None    # requested, debounce not yet fired
        self._timer: asyncio.TimerHandle | None = None
        self._last_request = -math.inf            # perf_counter of the last request (leading-edge start)
        self._task: asyncio.Task | None = None
        self._data: OrderedDict[str, TaskData] = OrderedDict()        # (task, seed) → drawn task
        self._references: OrderedDict[str, Trainer] = OrderedDict()  # reference config → its trainer

    # -- requests ------------------------------------------------------------------------------------------------
    def request(self, run: RunConfig, delay: float | None = None) -> None:
        """Ask for a run of ``run``: supersede whatever runs or waits, say so now, and start it at once after a
        quiet spell of ``debounce_s``, else ``debounce_s`` after this request (``delay``: exactly this many seconds).

        Outside a running asyncio loop the request is only recorded (call :meth:`run_sync`)."""
        now = time.perf_counter()
        quiet = now - self._last_request >= self.debounce_s and self._timer is None
        self._last_request = now
        self._supersede()
        self._pending = run
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._set_status(f"queued: {self.describe(run)} (no running event loop: call run_sync())")
            return
        self._set_status(f"retraining with {self.describe(run)} … (queued)")
        if delay is None:
            delay = 0.0 if quiet and self.leading else self.debounce_s
        self._timer = loop.call_later(delay, self._fire, self.generation)

    def stop(self) -> None:
        """Stop the current run at its next step boundary (and drop a queued one); its plots stay."""
        st, queued = self._halt()
        if st is not None:
            self._set_status(self.status_text(st))
        elif queued is not None:
            self._set_status(f"stopped: {self.describe(queued)} was not started")

    def fail(self, message: str) -> None:
        """Show an error (e.g. an invalid config) and stop: nothing is recomputed, the last plots stay."""
        self._halt()
        self._set_status(f"error: {message}")

    def _halt(self) -> tuple[RunState | None, RunConfig | None]:
        """Supersede everything; return the run that was training (now marked stopped) and the dropped request."""
        queued = self._pending if self._timer is not None else None
        st = self.state
        running = st is not None and st.phase == "training" and self._task is not None and not self._task.done()
        self._supersede()
        self._pending = None
        if running:
            st.phase = "stopped"
        return (st if running else None), queued

    @property
    def busy(self) -> bool:
        """True while a run is queued or training."""
        return self._timer is not None or (self._task is not None and not self._task.done())

    def _supersede(self) -> None:
        # A new generation makes the running task return at its next chunk boundary; a queued start is dropped.
        self.generation += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, generation: int) -> None:
        self._timer = None
        if generation != self.generation or self._pending is None:
            return
        run, self._pending = self._pending, None
        previous = self._task
        self._task = asyncio.get_running_loop().create_task(self._drive(run, generation, previous))

    async def wait(self) -> RunState | None:
        """Wait until nothing is queued or training (new requests meanwhile are waited for too)."""
        while self.busy:
            if self._timer is not None:
                await asyncio.sleep(self.debounce_s / 4)
            else:
                await asyncio.wait({self._task})    # never raises the task's error, never cancels it
        return self.state

    def close(self) -> None:
        """Stop (kept for symmetry with other resources; the runner holds no threads)."""
        self.stop()

    # -- running -------------------------------------------------------------------------------------------------
    def run_sync(self, run: RunConfig | None = None) -> RunState:
        """Do a whole run now, synchronously, superseding any async run. ``run=None``: the pending request, else
        the last run's config."""
        run = run or self._pending or (self.state.run if self.state else None)
        if run is None:
            raise ValueError("run_sync() needs a RunConfig: nothing was requested yet")
        self._supersede()
        self._pending = None
        work, result = self._work(run, self.generation), None
        while True:
            try:
                job = work.send(result)
            except StopIteration:
                return self.state
            result = None if job is None else self._run_job(job)

    def _run_job(self, job: Callable[[], Any]) -> Any:
        """Run one compute job of :meth:`_work` (build, train a chunk, probe) under ``threads`` torch threads."""
        with torch_threads(self.threads):
            return job()

    async def _drive(self, run: RunConfig, generation: int, previous: asyncio.Task | None) -> None:
        """The asyncio task: iterate :meth:`_work`, running its compute jobs in the worker thread (``worker=True``)
        or inline, and yielding to the loop between chunks. Callbacks always run here, on the loop."""
        if previous is not None and not previous.done():
            await asyncio.wait({previous})          # it returns at its next boundary: never two runs at once
        loop = asyncio.get_running_loop()
        work, result = self._work(run, generation), None
        try:
            while True:
                try:
                    job = work.send(result)
                except StopIteration:
                    return
                if job is None:
                    result = None
                    await asyncio.sleep(0)          # let slider messages in
                elif self.worker:                   # the loop stays free: acks and comm traffic go on meanwhile
                    result = await loop.run_in_executor(_worker(), self._run_job, job)
                else:
                    result = self._run_job(job)
                if generation != self.generation:
                    return                          # superseded: stop at this step boundary, draw nothing more
        except Exception as exc:                    # a bug: say it on the status line, not as a traceback in a cell
            log.exception("live run failed")
            if generation == self.generation:
                self._set_status(f"error: {type(exc).__name__}: {exc}")
        finally:
            work.close()

    @staticmethod
    def _train_chunk(trainer, reference, n: int) -> NonFiniteLossError | None:
        """Train ``n`` steps of the model and its reference in lockstep (a compute job: no callbacks)."""
        try:
            trainer.step(n)
            if reference is not None and not reference.done:
                reference.step(n)
        except NonFiniteLossError as exc:
            return exc
        return None

    def _probe_job(self, st: RunState) -> tuple[Any, Exception | None]:
        """Compute the probes (a compute job: the dashboard's ``probe`` must not touch widgets or bokeh)."""
        try:
            return self.probe(st), None
        except Exception as exc:
            log.exception("probes failed")
            return None, exc

    def _work(self, run: RunConfig, generation: int) -> Generator[Callable[[], Any] | None, Any, None]:
        """One run as a generator: build, then per chunk train (model and reference in lockstep), redraw, probe
        when due. It yields either a compute job (a callable: build, train a chunk, probe; the driver runs it,
        in the worker thread or inline, under :func:`~moewidgets.train.torch_threads`, and sends its result
        back) or None (a point where the loop may handle messages). Everything between yields (the callbacks,
        the status line) runs on the caller's thread, so :meth:`run_sync` and :meth:`_drive` share it.

        With a run cache, finished trainers found there are restored first (then every chunk is empty: the loop
        below only probes and draws, once), and the cache is written at the end (:meth:`_cached_start`)."""
        t_fire = time.perf_counter()
        self.runs_started += 1
        trainer, reference = yield (lambda: (self._build(run), self._reference(run)))
        st = RunState(run, generation, trainer, reference, t_fire)
        self.state = st
        lock = None
        try:
            if self._cacheable(trainer):
                lock = yield from self._cached_start(st)
            yield from self._train_and_draw(st)
            if st.phase == "done" and self._cacheable(trainer):
                yield functools.partial(self._store_job, st)
        finally:
            if lock is not None:
                lock.release()

    def _train_and_draw(self, st: RunState) -> Generator[Callable[[], Any] | None, Any, None]:
        """The chunk loop of :meth:`_work`: train a chunk (model and reference in lockstep), redraw, probe when
        due, until both are done (or a step fails)."""
        trainer, reference, t_fire = st.trainer, st.reference, st.t_fire
        chunk, next_probe = 1, self.probe_every      # a one-step first chunk: the first redraw comes quickly
        while True:
            t0 = time.perf_counter()
            error = yield functools.partial(self._train_chunk, trainer, reference, chunk)
            if error is not None:
                if reference is not None:    # drop a broken reference from the cache
                    self._references = OrderedDict((k, v) for k, v in self._references.items() if v is not reference)
                st.phase, st.error = "error", str(error)
                self._set_status(self.status_text(st))
                return
            per_step = (time.perf_counter() - t0) / max(chunk, 1)
            # steps per chunk so that a chunk takes ≈ chunk_s: redraws stay frequent whatever the model size
            chunk = max(1, min(200, round(self.chunk_s / max(per_step, 1e-5))))
            final = trainer.done and (reference is None or reference.done)
            drawn = self.on_chunk(st)        # False: the dashboard skipped this redraw (throttled)
            tm = st.timings
            tm.wall_s = time.perf_counter() - t_fire
            if drawn is not False:
                tm.redraws += 1
                if tm.redraws == 1:
                    tm.fire_to_first_redraw_s = tm.wall_s
            tm.redraws_per_s = tm.redraws / tm.wall_s
            if self.probe is not None:
                if final or trainer.steps_done >= next_probe:
                    t0 = time.perf_counter()
                    result, exc = yield functools.partial(self._probe_job, st)
                    if exc is not None:
                        st.phase, st.error = "error", f"probes failed at step {trainer.steps_done}: {exc}"
                        self._set_status(self.status_text(st))
                        return
                    st.probes = result
                    self.on_probes(st, result)
                    tm.probe_s.append(time.perf_counter() - t0)
                    next_probe = (trainer.steps_done // self.probe_every + 1) * self.probe_every
                # chunks end at probe steps, so probes land on steps 100, 200, ... whatever the timing
                chunk = max(1, min(chunk, next_probe - trainer.steps_done))
            if final:
                st.phase, tm.wall_s = "done", time.perf_counter() - t_fire
                self.runs_completed += 1
            if drawn is not False or final:  # the status line (a widget message too) moves with the redraws
                self._set_status(self.status_text(st))
            if final:
                return
            yield None

    # -- the run cache (shared by kernels) -----------------------------------------------------------------------
    def _cacheable(self, trainer) -> bool:
        """True when this runner has a run cache and ``trainer`` is a plain :class:`~moewidgets.train.Trainer`."""
        return self.cache is not None and self.make_trainer is None and isinstance(trainer, Trainer)

    def _cached_start(self, st: RunState) -> Generator[Callable[[], Any] | None, Any, Any]:
        """Restore what the run cache holds of ``st``'s run (a compute job). On a miss, claim the run; when another
        kernel holds the claim, wait for its entry (polling, the status line says so) for up to ``cache.wait_s``
        seconds, then train anyway. Returns the claim to release at the end (None: none held).

        The claim is taken here, between jobs (on the caller's thread), never inside a job: a run superseded while
        a job runs is closed at that yield, and :meth:`_work`'s ``finally`` releases whatever claim it holds."""
        t0 = time.perf_counter()
        poll = False
        while True:
            if (yield functools.partial(self._restore_job, st, poll)):
                return None                                     # a hit: nothing to claim
            try:
                lock = self.cache.claim(st.run, self.threads)
            except OSError as exc:                              # an unwritable cache folder: train, uncached
                log.warning("run cache %s unusable (%s); training without it", self.cache.folder, exc)
                return None
            if lock is not None:
                return lock
            waited = time.perf_counter() - t0
            if waited > self.cache.wait_s:
                log.warning("run cache: waited %.0f s for another kernel's %s; training it here", waited,
                            self.describe(st.run))
                return None
            self._set_status(f"{self.describe(st.run)} — the same run is training for another visitor: waiting "
                             f"for it · {waited:.0f} s")
            poll = True

    def _restore_job(self, st: RunState, poll: bool) -> bool:
        """A compute job: load a finished reference (if its trainer is not done) and the run's trainer from the
        cache (``poll``: after a short sleep, waiting for another kernel). True on a hit of the run."""
        if poll:
            time.sleep(0.25)
        cache, threads, ref = self.cache, self.threads, st.reference
        if ref is not None and ref is not st.trainer and not ref.done and isinstance(ref, Trainer):
            st.reference_missed = not cache.load(self.reference_of(st.run), ref, threads)
        st.cached = cache.load(st.run, st.trainer, threads)
        return st.cached

    def _store_job(self, st: RunState) -> None:
        """A compute job: store the finished trainers of ``st`` that were trained here (not restored, not yet
        stored). A failure (full disk, read-only folder) is logged; the run stays done."""
        cache, threads = self.cache, self.threads
        items = [] if st.cached else [(st.run, st.trainer)]     # trained here: its entry was missing or bad
        ref = st.reference
        if ref is not None and ref is not st.trainer and isinstance(ref, Trainer):
            ref_run = self.reference_of(st.run)
            if ref_run is not None and (st.reference_missed or not cache.has(ref_run, threads)):
                items.append((ref_run, ref))
        for run, trainer in items:
            try:
                if trainer.done:
                    cache.store(run, trainer, threads)
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("run cache: could not store %s (%s)", self.describe(run), exc)

    # -- caches --------------------------------------------------------------------------------------------------
    def _build(self, run) -> Any:
        """A fresh trainer for ``run``: ``make_trainer(run)``, or a Trainer on the cached task."""
        if self.make_trainer is not None:
            return self.make_trainer(run)
        return Trainer.from_config(run, data=self._task_data(run))

    def _task_data(self, run: RunConfig) -> TaskData:
        """The drawn task for (task config, seed), cached: drawing 16k points costs more than a chunk."""
        key = f"{run.task.to_json()}|{run.model.seed}"
        if key not in self._data:
            self._data[key] = make_task(run.task, run.model.seed)
            while len(self._data) > 4:
                self._data.popitem(last=False)
        self._data.move_to_end(key)
        return self._data[key]

    def _reference(self, run: RunConfig) -> Trainer | None:
        """The reference trainer for ``run`` (cached by its config, resumed where an earlier run left it)."""
        ref_run = self.reference_of(run)
        if ref_run is None:
            return None
        key = ref_run.to_json()
        if key not in self._references:
            self._references[key] = self._build(ref_run)
            while len(self._references) > 8:
                self._references.popitem(last=False)
        self._references.move_to_end(key)
        return self._references[key]

    # -- status --------------------------------------------------------------------------------------------------
    def status_text(self, st: RunState) -> str:
        """'top-2 of 8 · τ=1 · α=0 · seed 0 — step 400/400 · loss 0.882 → 0.0312 · 0.84 s — done'."""
        tr, desc = st.trainer, self.describe(st.run)
        if st.phase == "error":
            return f"error: {desc} — {st.error} — last good plots kept"
        text = f"{desc} — step {tr.steps_done}/{tr.cfg.steps}"
        loss = tr.history.loss
        if loss:
            text += f" · loss {loss[0]:.3g} → {loss[-1]:.3g}"
        ref = st.reference
        if ref is not None and ref is not tr and not ref.done:
            text += f" · dense baseline {ref.steps_done}/{ref.cfg.steps}"
        wall = st.timings.wall_s if math.isfinite(st.timings.wall_s) else 0.0
        cached = " (cached)" if st.cached and st.phase == "done" else ""
        return f"{text} · {wall:.2f} s — {st.phase}{cached}"

    def _set_status(self, text: str) -> None:
        self.status = text
        self.on_status(text)
