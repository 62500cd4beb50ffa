"""Command line.

``python -m moewidgets sweep SPEC.yml [--executor serial|processes|dask] [--scheduler ADDR] [--workers N]
[--out DIR] [--cache DIR]``: run a sweep spec (format: :mod:`moewidgets.sweep`) and write ``DIR/<name>.jsonl``.

``python -m moewidgets reproduce CHAPTER [--seeds N] [--executor serial|processes|dask] [--scheduler ADDR]
[--workers N] [--out DIR] [--cache DIR]``: run a chapter's claim runs and write ``book/results/CHAPTER.jsonl``.

Both resume from their cache after a kill. ``--executor dask`` without ``--scheduler`` starts a local Dask cluster
(worker processes with 1 thread each, bound to 127.0.0.1) and closes it afterwards; ``--scheduler ADDR`` alone
implies ``--executor dask``. Exit status: 0 done, 1 a job failed (finished jobs stay cached), 2 bad command line
or spec (the message names the field, the value and what is allowed; nothing has run).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROG = "python -m moewidgets"


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

    rep = sub.add_parser("reproduce", help="run a chapter's claim runs and write book/results/<chapter>.jsonl")
    from .reproduce import CHAPTERS
    rep.add_argument("chapter", choices=sorted(CHAPTERS))
    rep.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5, the pass rule needs ≥ 5)")
    _executor_options(rep, "processes")
    rep.add_argument("--out", default=None, help="results folder (default: book/results)")
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


def _sweep(args: argparse.Namespace, kind: str) -> int:
    from .sweep import count_cached, load_spec, open_executor, run_sweep
    spec = load_spec(args.spec)                         # the whole spec is validated here, before anything starts
    jobs = spec.jobs()
    n_points = len(jobs) // len(spec.seeds)
    print(f"sweep {spec.name}: {len(jobs)} jobs ({n_points} grid points × {len(spec.seeds)} seeds), "
          f"{count_cached(jobs, args.cache)} cached, executor: {_describe(kind, args)}", flush=True)
    with open_executor(kind, args.workers, args.scheduler) as executor:
        res = run_sweep(spec, executor=executor, out_dir=args.out, cache_dir=args.cache)
    print(f"wrote {res.path}: {len(res.rows)} rows in {res.wall_s:.1f} s, {res.cache_hits} cache hits")
    return 0


def _reproduce(args: argparse.Namespace, kind: str) -> int:
    from .reproduce import CHAPTERS, claims_table, load_results, reproduce
    from .sweep import count_cached, open_executor
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds} must be >= 1")
    cache = Path(args.cache) if args.cache else Path("build") / "cache" / args.chapter   # reproduce()'s default
    hits = count_cached(CHAPTERS[args.chapter].jobs(args.seeds), cache)
    t0 = time.perf_counter()
    with open_executor(kind, args.workers, args.scheduler) as executor:
        path = reproduce(args.chapter, seeds=args.seeds, executor=executor, out_dir=args.out, cache_dir=cache)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s, {hits} cache hits")
    print(claims_table(CHAPTERS[args.chapter].claims(load_results(args.chapter, path.parent))))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 a job failed, 2 bad command line or spec)."""
    parser = _parser()
    args = parser.parse_args(argv)
    kind = _executor_kind(args, args.subparser)
    from .sweep import JobError, SpecError
    try:
        return _sweep(args, kind) if args.command == "sweep" else _reproduce(args, kind)
    except (SpecError, FileNotFoundError, ImportError, ConnectionError, ValueError) as exc:
        # bad input or a missing piece, found before any job ran: the message, no traceback
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; finished jobs are cached, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
