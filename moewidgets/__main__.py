"""Command line.

``python -m moewidgets sweep SPEC.yml [--executor serial|processes|dask] [--scheduler ADDR] [--workers N]
[--out DIR] [--cache DIR] [--allow-local]``: run a sweep spec (format: :mod:`moewidgets.sweep`) and write
``DIR/<name>.jsonl``. A spec's ``metrics: "module:function"`` runs that code; a module of the current folder is
refused unless ``--allow-local`` is given.

``python -m moewidgets reproduce CHAPTER [--seeds N] [--seed-start S] [--commit-results | --out DIR]
[--executor ...] [--scheduler ADDR] [--workers N] [--cache DIR]``: run a chapter's claim runs on seeds
S … S+N−1 (N >= 2) and write ``build/results/CHAPTER.jsonl``; only ``--commit-results`` (what ``make reproduce``
passes) writes the committed ``book/results/CHAPTER.jsonl`` that the book renders.

Both resume from their cache after a kill, and several runs may share a cache and an output folder. ``--executor
dask`` without ``--scheduler`` starts a local Dask cluster (worker processes with 1 thread each, bound to
127.0.0.1) and closes it afterwards; ``--scheduler ADDR`` alone implies ``--executor dask``. Sizes are bounded by
:mod:`moewidgets.budget` (``MOEWIDGETS_BUDGET_GB`` raises the memory budget).

Exit status: 0 done; 1 jobs ran and something failed (a job, a full disk, ...; finished jobs stay cached, run again
to resume); 2 nothing ran: a bad command line, spec or config, or a folder that cannot be written (the message
names the field or file, the value and what to do); 130 interrupted. Errors are one line, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import time
from pathlib import Path

PROG = "python -m moewidgets"


def _int_at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; {what}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is too small; {what}")
        return value
    return parse


def _executor_options(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--executor", choices=["serial", "processes", "dask"], default=None,
                   help=f"serial (this process), a local process pool, or a Dask cluster (default: {default}; "
                        f"dask when --scheduler is given)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: start a local "
                        "cluster on 127.0.0.1)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes of the local pool or local Dask cluster (default: CPU count)")
    p.set_defaults(default_executor=default, subparser=p)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sw = sub.add_parser("sweep", help="run a sweep spec (YAML): a base config, a grid of overrides, seeds",
                        description="Run a sweep spec (YAML: name, base, grid, seeds, metrics, probe_points; see "
                                    "examples/sweep-small.yml) and write OUT/<name>.jsonl.")
    sw.add_argument("spec", help="the YAML spec file")
    _executor_options(sw, "processes")
    sw.add_argument("--out", default="build/sweeps", help="results folder (default: build/sweeps)")
    sw.add_argument("--cache", default="build/cache/sweep",
                    help="cache folder for resuming, shared by all sweeps (default: build/cache/sweep)")
    sw.add_argument("--allow-local", action="store_true",
                    help="let the spec's metrics name a module of the current folder (it runs that code)")

    rep = sub.add_parser("reproduce", help="run a chapter's claim runs and write build/results/<chapter>.jsonl "
                                           "(book/results with --commit-results)")
    from .reproduce import CHAPTERS
    rep.add_argument("chapter", choices=sorted(CHAPTERS))
    rep.add_argument("--seeds", type=_int_at_least(2, "--seeds must be an integer >= 2 (the pass rule needs "
                                                      "several seeds)"), default=None,
                     help="seeds per arm, >= 2 (default: the chapter's, 10 for MLP arms)")
    rep.add_argument("--seed-start", type=_int_at_least(0, "--seed-start must be a non-negative integer"),
                     default=0, metavar="S", help="first seed (default 0): seeds S … S+N−1, e.g. 100 for fresh seeds")
    _executor_options(rep, "processes")
    where = rep.add_mutually_exclusive_group()
    where.add_argument("--commit-results", action="store_true",
                       help="write the committed book/results/<chapter>.jsonl that the book renders (make reproduce)")
    where.add_argument("--out", default=None, help="results folder (default: build/results)")
    rep.add_argument("--cache", default=None, help="cache folder for resuming (default: build/cache/<chapter>)")
    return parser


def _executor_kind(args: argparse.Namespace, sub: argparse.ArgumentParser) -> str:
    """Check the executor options together (argparse exits with status 2 and the usage on a conflict)."""
    kind = args.executor or ("dask" if args.scheduler else args.default_executor)
    if args.scheduler is not None and kind != "dask":
        sub.error(f"--scheduler={args.scheduler} needs --executor dask, not {kind}")
    if args.workers is not None:
        if args.workers < 1:
            sub.error(f"--workers={args.workers} must be >= 1")
        if kind == "serial":
            sub.error(f"--workers={args.workers} needs --executor processes or dask, not serial")
        if args.scheduler is not None:
            sub.error(f"--workers={args.workers} cannot be set with --scheduler: the cluster has its own workers")
    return kind


def _describe(kind: str, args: argparse.Namespace) -> str:
    if kind == "dask":
        return f"dask at {args.scheduler}" if args.scheduler else f"local dask cluster ({args.workers or 'CPU count'} workers)"
    return f"process pool ({args.workers or 'CPU count'} workers)" if kind == "processes" else "serial"


def _writable_folder(folder: str | Path, option: str) -> Path:
    """Create ``folder`` and check a file can be written in it, before anything runs (an error exits 2)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", f"{option}={folder}")
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return folder


def _sweep(args: argparse.Namespace, kind: str) -> int:
    from .sweep import count_cached, load_spec, open_executor, run_sweep
    spec = load_spec(args.spec, allow_local=args.allow_local)   # the whole spec is validated here, before anything
    jobs = spec.jobs()
    _writable_folder(args.out, "--out")
    _writable_folder(args.cache, "--cache")
    n_points = len(jobs) // len(spec.seeds)
    print(f"sweep {spec.name}: {len(jobs)} jobs ({n_points} grid points × {len(spec.seeds)} seeds), "
          f"{count_cached(jobs, args.cache)} cached, executor: {_describe(kind, args)}", flush=True)
    with open_executor(kind, args.workers, args.scheduler) as executor:
        res = run_sweep(spec, executor=executor, out_dir=args.out, cache_dir=args.cache)
    print(f"wrote {res.path}: {len(res.rows)} rows in {res.wall_s:.1f} s, {res.cache_hits} cache hits")
    return 0


def reproduce_out_dir(commit_results: bool, out: str | None) -> Path:
    """Where ``reproduce`` writes: ``book/results`` (the committed rows) only with ``commit_results``; else ``out``
    or ``build/results``. An ``out`` that is the committed folder without ``commit_results`` is refused."""
    from .reproduce import DEFAULT_OUT_DIR
    from .reproduce.common import results_dir
    if commit_results:
        return results_dir()
    target = Path(out) if out is not None else DEFAULT_OUT_DIR
    try:
        committed = results_dir().resolve()
    except FileNotFoundError:
        committed = None
    if committed is not None and target.resolve() == committed:
        raise ValueError(f"--out={out} is the committed results folder {committed}: pass --commit-results instead "
                         f"to overwrite the rows the book renders")
    return target


def _reproduce(args: argparse.Namespace, kind: str) -> int:
    import inspect
    from .budget import MAX_SEED
    from .reproduce import CHAPTERS, claims_table, load_results, reproduce
    from .sweep import count_cached, open_executor
    seeds = args.seeds if args.seeds is not None else inspect.signature(reproduce).parameters["seeds"].default
    if args.seed_start + seeds - 1 > MAX_SEED:
        raise ValueError(f"--seed-start={args.seed_start} with --seeds={seeds}: seeds must be <= {MAX_SEED}")
    out_dir = reproduce_out_dir(args.commit_results, args.out)
    cache = Path(args.cache) if args.cache else Path("build") / "cache" / args.chapter   # reproduce()'s default
    jobs = CHAPTERS[args.chapter].jobs(seeds, seed_start=args.seed_start)     # validates, before anything runs
    _writable_folder(out_dir, "--out")
    _writable_folder(cache, "--cache")
    note = "the committed rows the book renders" if args.commit_results else \
        "not the committed book/results; pass --commit-results to replace those"
    print(f"reproduce {args.chapter}: seeds {args.seed_start}..{args.seed_start + seeds - 1}, writing "
          f"{out_dir / (args.chapter + '.jsonl')} ({note}), {count_cached(jobs, cache)} of {len(jobs)} jobs cached",
          flush=True)
    t0 = time.perf_counter()
    with open_executor(kind, args.workers, args.scheduler) as executor:
        path = reproduce(args.chapter, seeds=seeds, seed_start=args.seed_start, executor=executor,
                         out_dir=out_dir, cache_dir=cache)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    print(claims_table(CHAPTERS[args.chapter].claims(load_results(args.chapter, path.parent))))
    return 0


def _explain(exc: BaseException) -> str:
    """One line for a user or environment error: the thing, what went wrong, what to do."""
    if isinstance(exc, MemoryError):
        return ("out of memory: a run needs more memory than this machine has; lower the sizes (train.batch_size, "
                "task.n_train, model.d_model/d_hidden) or --workers")
    if isinstance(exc, OSError) and exc.strerror:
        thing = exc.filename if exc.filename is not None else "a file"
        code = exc.errno
        if code == errno.ENOSPC:
            return f"{thing}: no space left on the disk; free some space or choose another --out/--cache folder"
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{thing}: cannot write there ({exc.strerror}); choose a folder you can write with --out/--cache"
        if code in (errno.EEXIST, errno.ENOTDIR):
            return (f"{thing}: a file is in the way where a folder is expected ({exc.strerror}); give a folder "
                    f"path, or move the file")
        return f"{thing}: {exc.strerror}; check the path, or choose another folder with --out/--cache"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 jobs ran and something failed, 2 nothing ran: bad
    command line, spec, config or folder; 130 interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    kind = _executor_kind(args, args.subparser)
    from .sweep import STARTED, JobError
    started = STARTED["jobs"]
    try:
        return _sweep(args, kind) if args.command == "sweep" else _reproduce(args, kind)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; finished jobs are cached, run again to resume", file=sys.stderr)
        return 130
    except JobError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ImportError, ConnectionError, OSError, MemoryError) as exc:
        # bad input, a missing piece or the environment: the message, no traceback; 2 only when nothing ran
        ran = STARTED["jobs"] > started
        tail = "; finished jobs are cached, run again to resume" if ran else ""
        print(f"{PROG} {args.command}: error: {_explain(exc)}{tail}", file=sys.stderr)
        return 1 if ran else 2


if __name__ == "__main__":
    sys.exit(main())
