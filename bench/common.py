"""Timing helpers shared by every benchmark: interleaved repeats, medians with min–max, op counts, the floor,
power-law fits, the environment, and target rows.

How a comparison is timed (:func:`interleaved`): each candidate is calibrated to a block of ``inner`` calls lasting
at least ``min_block_s``; then, for every repeat, each candidate's block runs once, the order alternating between
repeats (A B, B A, ...) so slow drift and "who runs second" effects hit both. A candidate's time for a repeat is its
block time / ``inner``; a ratio is taken per repeat (same moment in time) and summarised by its median and min–max.

The floor of a computation (:func:`floor_s`): its FLOPs at ≈ 170 GFLOP/s (fp32 matmul) plus its torch ops at ≈ 4 µs
each, both measured on the 2-core development machine (``design.md``). A measured time divided by it ("× floor")
says how far a point is from what this machine could do at best.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

GFLOPS_FLOOR = 170e9        # fp32 matmul throughput on the 2-core machine (design.md)
OP_FLOOR_S = 4e-6           # per torch op dispatch on the same machine
REPO = Path(__file__).resolve().parent.parent


def sync(device: str | torch.device) -> None:
    """Wait for queued kernels (CUDA timings are otherwise launch times)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stats(ts: list[float]) -> dict:
    """``{"median_s", "min_s", "max_s", "n"}`` of a list of seconds."""
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """Per-repeat ratios ``num[i] / den[i]`` (taken at the same moment): ``{"median", "min", "max", "n"}``."""
    r = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "n": len(r)}


def time_block(fn: Callable[[], object], inner: int, device: str = "cpu") -> float:
    """Seconds per call of ``fn`` over a block of ``inner`` calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def calibrate(fn: Callable[[], object], min_block_s: float, device: str = "cpu", max_inner: int = 1000) -> int:
    """Calls per block so that a block lasts at least ``min_block_s`` (one warm-up call first)."""
    per_call = time_block(fn, 1, device)            # warm-up (allocator, autograd graph caches)
    if per_call >= min_block_s:                     # already long enough: don't pay for a second slow call
        return 1
    per_call = min(per_call, time_block(fn, 1, device))
    return max(1, min(max_inner, math.ceil(min_block_s / max(per_call, 1e-7))))


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, min_block_s: float = 0.02,
                device: str = "cpu") -> tuple[dict[str, list[float]], dict[str, int]]:
    """Time candidates side by side: ``({name: [seconds per call, one per repeat]}, {name: calls per block})``.

    Each candidate is calibrated to its own block length (≥ ``min_block_s``, so a fast one is not lost in timer
    noise); then every repeat runs one block of each, the order alternating between repeats.
    """
    inner = {n: calibrate(fn, min_block_s, device) for n, fn in fns.items()}
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(time_block(fns[n], inner[n], device))
    return out, inner


def count_torch_ops(fn: Callable[[], object]) -> int:
    """Top-level aten ops one call of ``fn`` dispatches (forward and backward), counted with the profiler.

    An op counts if it is an ``aten::`` op whose parent is not itself an ``aten::`` op (ops called from Python, and
    the ops autograd runs for each backward node); nested aten calls are part of their parent's cost.
    """
    from torch.profiler import profile
    with _quiet_stderr(), profile() as prof:
        fn()
    n = 0
    for e in prof.events():
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
            n += 1
    return n


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (kineto prints "profiler_start/stop" lines from C++ on every profile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def floor_s(flops: float, ops: int) -> float:
    """The floor of a computation: ``flops / 170 GFLOP/s + ops × 4 µs``."""
    return flops / GFLOPS_FLOOR + ops * OP_FLOOR_S


def fit_power_law(xs: list[float], ys: list[float]) -> dict:
    """Least-squares fit of ``log y = log c + b log x``: ``{"exponent": b, "prefactor": c, "r2": R²}``."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    b = sum((a - mx) * (c - my) for a, c in zip(lx, ly)) / sxx
    a0 = my - b * mx
    ss_res = sum((c - (a0 + b * a)) ** 2 for a, c in zip(lx, ly))
    ss_tot = sum((c - my) ** 2 for c in ly)
    return {"exponent": b, "prefactor": math.exp(a0), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    """The short commit the numbers were taken at, with "+dirty" when tracked files differ from it (the measured
    code then is not that commit's)."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:        # not installed (or broken): the report says so instead of failing
        return "not installed"


def environment(device: str) -> dict:
    """Where and with what the numbers were taken (written at the top of every report)."""
    import moewidgets
    env = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "threads": torch.get_num_threads(),
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__, "numpy": _version("numpy"),
           "transformers": _version("transformers"), "moewidgets": moewidgets.__version__, "commit": _git_commit()}
    if hasattr(os, "getloadavg"):
        env["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def target_row(bench: str, what: str, measured: str, target: str, met: bool | None, value: float | None = None
               ) -> dict:
    """One row of the targets table: what was measured, the measured value in words, the target, met/missed."""
    return {"bench": bench, "what": what, "measured": measured, "target": target, "met": met, "value": value}


def fmt_s(s: float) -> str:
    """Seconds in a readable unit: ``0.00042 → '420 µs'``, ``0.0123 → '12.3 ms'``, ``1.5 → '1.50 s'``."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.2f} s"


def fmt_stats(st: Mapping) -> str:
    """``'12.3 ms (11.9–13.0)'``: median (min–max) of a :func:`stats` dict."""
    return f"{fmt_s(st['median_s'])} ({fmt_s(st['min_s'])}–{fmt_s(st['max_s'])})"


def fmt_ratio(r: Mapping) -> str:
    """``'2.31× (2.10–2.52)'``: median (min–max) of a :func:`ratio_stats` dict."""
    return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"
