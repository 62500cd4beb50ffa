"""Command line: ``python -m moewidgets reproduce CHAPTER [--seeds N] [--executor serial|processes] [--out DIR]``."""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moewidgets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run a chapter's claim runs and write book/results/<chapter>.jsonl")
    from .reproduce import CHAPTERS
    rep.add_argument("chapter", choices=sorted(CHAPTERS))
    rep.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5, the pass rule needs ≥ 5)")
    rep.add_argument("--executor", choices=["serial", "processes"], default="processes",
                     help="serial, or a local process pool with one worker per core (default)")
    rep.add_argument("--workers", type=int, default=None, help="process-pool workers (default: CPU count)")
    rep.add_argument("--out", default=None, help="results folder (default: book/results)")
    rep.add_argument("--cache", default=None, help="cache folder for resuming (default: build/cache/<chapter>)")
    args = parser.parse_args(argv)

    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds} must be >= 1")
    from .reproduce import claims_table, load_results, reproduce
    from .sweep import process_executor
    t0 = time.perf_counter()
    executor = process_executor(args.workers) if args.executor == "processes" else None
    try:
        path = reproduce(args.chapter, seeds=args.seeds, executor=executor, out_dir=args.out, cache_dir=args.cache)
    finally:
        if executor is not None:
            executor.shutdown()
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    print(claims_table(CHAPTERS[args.chapter].claims(load_results(args.chapter, path.parent))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
