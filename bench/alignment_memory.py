"""Peak memory and time of the lean pair alignment at Mixtral sizes (``python -m bench.alignment_memory``).

What it measures: :func:`moewidgets.geometry.asymmetry.pair_alignment` for one SwiGLU expert pair with synthetic
bf16 weights (D = 4096, F = 14336, Mixtral-8x7B's expert) over N = 512 tokens, float32 arithmetic, one thread:

    mean        cos_F(J̄_i, J̄_j) of the routing-weighted mean Jacobians (path "auto" → "model": two D×D matrices)
    per-token   the same plus cos_F(J_i(x), J_j(x)) at all 512 tokens (path "hidden": F×F tiles), run at a reduced
                F = 2048 by default because its exact cost is ≈ 25 TFLOP per pair at F = 14336 (a GPU job; pass
                --full-per-token to run it here anyway: many minutes on two CPU cores)

Each case runs in a fresh subprocess: the weights (and the points) are built first, in row blocks so that their
construction leaves no transient peak; then the baseline is the process's current RSS (``/proc/self/statm``) and the
peak is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the computation. "Extra" = peak − baseline: the
memory the computation needed beyond the weights (tracemalloc cannot see torch's allocations; torch keeps no
CPU allocator statistics). Target: ≤ 2 GiB extra for the mean case at full size.

Timings on the shared development machine are inflated by other jobs: read them as orders of magnitude.
``--json PATH`` also writes the rows. Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024 ** 3
TARGET_GIB = 2.0


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # Linux reports KiB


def child(case: str, D: int, F: int, N: int) -> dict:
    """One measurement (run in a fresh process)."""
    import gc

    import torch

    from moewidgets.geometry.alignment import SwiGLUBankView
    from moewidgets.geometry.asymmetry import pair_alignment

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    E = 2

    def bf16(rows: int, cols: int, fan_in: int) -> torch.Tensor:
        w = torch.empty(E, rows, cols, dtype=torch.bfloat16)
        for e in range(E):
            for s in range(0, rows, 512):              # fill in row blocks: no whole-matrix float32 transient
                blk = w[e, s:s + 512]
                blk.copy_(torch.randn(blk.shape, generator=g) / fan_in ** 0.5)
        return w

    bank = SwiGLUBankView(bf16(F, D, D), bf16(F, D, D), bf16(D, F, F))
    X = torch.randn(N, D, generator=g)
    w = torch.rand(N, E, generator=g) + 0.1                                   # every token routed to both
    gc.collect()
    weights_bytes = sum(t.numel() * t.element_size() for t in (bank.w_gate_EFD, bank.w_up_EFD, bank.w_out_EDF))
    base, peak_before = _current_rss(), _peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    if case == "mean":
        res = pair_alignment(bank, 0, 1, X, w)
    else:
        res = pair_alignment(bank, 0, 1, X, w, per_token=True, path="hidden")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_rss()
    return {"case": case, "D": D, "F": F, "N": N, "path": res.path, "token_path": res.token_path,
            "dtype": res.dtype, "cosine": res.cosine,
            "token_cosine_mean_abs": res.token_cosine_mean_abs if res.token_cosine is not None else None,
            "wall_s": wall, "cpu_s": cpu, "weights_gib": weights_bytes / GIB, "baseline_rss_gib": base / GIB,
            "extra_gib": (peak - base) / GIB, "peak_moved": peak > peak_before,
            "torch": torch.__version__}


def run_case(case: str, D: int, F: int, N: int) -> dict:
    cmd = [sys.executable, "-m", "bench.alignment_memory", "--child", case, str(D), str(F), str(N)]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("CASE", "D", "F", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--full-per-token", action="store_true", help="run the per-token case at F = 14336 too")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.child:
        case, D, F, N = args.child
        print(json.dumps(child(case, int(D), int(F), int(N))))
        return
    cases = [("mean", 4096, 14336, 512), ("per-token", 4096, 2048, 512)]
    if args.full_per_token:
        cases.append(("per-token", 4096, 14336, 512))
    rows = []
    print("lean SwiGLU pair alignment, bf16 weights, float32 arithmetic, 1 thread, fresh process per case")
    for case, D, F, N in cases:
        r = run_case(case, D, F, N)
        rows.append(r)
        bound = "" if r["peak_moved"] else " (upper bound: the peak did not move)"
        ok = "meets" if r["extra_gib"] <= TARGET_GIB else "MISSES"
        print(f"  {case:9s} D={D} F={F} N={N}: path={r['token_path'] or r['path']}, "
              f"{r['wall_s']:.1f} s wall ({r['cpu_s']:.1f} s CPU), peak extra RSS {r['extra_gib']:.2f} GiB{bound} "
              f"beyond {r['baseline_rss_gib']:.2f} GiB (weights {r['weights_gib']:.2f} GiB); "
              f"{ok} the {TARGET_GIB:.0f} GiB target")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
