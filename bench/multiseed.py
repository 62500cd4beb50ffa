"""``python -m bench.multiseed``: 8 seeds of the chapter-1 default retrain at once vs one seed vs 8 separate runs.

Target (``design.md``): 8 seeds trained at once take ≤ 3× one seed's time, or are within 1.5× of the 8-seed floor.
The floor is :func:`bench.common.floor_s` of the step's FLOPs (:func:`bench.chapter1.step_flops`, 8 seeds' worth,
on the dispatch path the multi-seed trainer takes) and the op count of one seed's step (the ideal: S seeds cost no
more ops than one).

Each repeat times, interleaved (alternating order) so that machine drift hits all three: one seed via
:class:`~moewidgets.train.Trainer`, 8 seeds via :class:`~moewidgets.multiseed.MultiSeedTrainer`, and 8 separate
``Trainer`` runs one after another. Construction (data, init) is outside the clock, as in :mod:`bench.chapter1`.
On a machine shared with other jobs the absolute times are inflated; the ratios, taken side by side, less so.
"""
from __future__ import annotations

import argparse
import time

import moewidgets as mw
from moewidgets.multiseed import MultiSeedTrainer
from moewidgets.train import torch_threads

from .chapter1 import step_flops
from .common import count_torch_ops, floor_s, fmt_ratio, fmt_s, fmt_stats, ratio_stats, stats, target_row

__all__ = ["bench_multiseed", "report_multiseed"]

N_SEEDS = 8
RATIO_TARGET = 3.0          # × one seed's time
FLOOR_TARGET = 1.5          # × the n-seed floor


def _max_rel_dev(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / abs(x) for x, y in zip(a, b) if x != 0), default=0.0)


def bench_multiseed(repeats: int = 3, threads: int | None = 1, n_seeds: int = N_SEEDS,
                    run: mw.RunConfig | None = None, log=print) -> dict:
    """Time ``n_seeds`` seeds of ``run`` (default: the chapter-1 default retrain on the CPU) at once, one seed,
    and ``n_seeds`` separate runs, interleaved with alternating order; ``threads`` torch threads (``None``:
    torch's setting). Returns a JSON-able dict: ``"targets"`` (one :func:`bench.common.target_row`), the times
    (:func:`bench.common.stats` dicts and a ``"runs"`` table), the ratios, the floor's parts, and how far the seeds
    trained at once are from their separate runs (max relative loss deviation, first 100 steps and all)."""
    run = run or mw.RunConfig(train=mw.TrainConfig(device="cpu"))
    seeds = list(range(n_seeds))
    steps, B, cfg = run.train.steps, run.train.batch_size, run.model
    names = ("one seed", "at once", "separate")

    def fresh(kind):
        if kind == "one seed":
            return [mw.Trainer.from_config(run)]
        if kind == "at once":
            return [MultiSeedTrainer(run, seeds)]
        return [mw.Trainer.from_config(run.replace(model=cfg.replace(seed=s))) for s in seeds]

    with torch_threads(threads):
        fresh("at once")[0].step(5)                    # warm-up: first-call allocations, lazy imports
        fresh("one seed")[0].step(5)
        times: dict[str, list[float]] = {n: [] for n in names}
        last: dict[str, list] = {}
        for r in range(repeats):                       # interleaved, alternating order: drift hits all three
            for kind in (names if r % 2 == 0 else names[::-1]):
                trainers = fresh(kind)                 # construction (data, init) is not timed
                t0 = time.perf_counter()
                for tr in trainers:
                    tr.step(steps)
                times[kind].append(time.perf_counter() - t0)
                last[kind] = trainers
        # the floor: n seeds' FLOPs on the path the multi-seed trainer takes + one seed's ops per step
        multi = last["at once"][0]
        path = multi.dispatch_path(n_seeds * B) if cfg.arch == "moe" else "dense"
        dispatched = B * (cfg.k if path == "gather" else cfg.n_experts)
        flops = n_seeds * step_flops(cfg, B, dispatched) * steps
        one = fresh("one seed")[0]
        one.step(5)
        ops_one = count_torch_ops(lambda: one.step(1))
        probe = fresh("at once")[0]
        probe.step(5)
        ops_multi = count_torch_ops(lambda: probe.step(1))
    fl = floor_s(flops, ops_one * steps)

    st = {n: stats(times[n]) for n in names}
    to_one = ratio_stats(times["at once"], times["one seed"])
    speedup = ratio_stats(times["separate"], times["at once"])
    x_floor = st["at once"]["median_s"] / fl
    met = to_one["median"] <= RATIO_TARGET or x_floor <= FLOOR_TARGET
    separate = last["separate"]
    dev_100 = max(_max_rel_dev(tr.history.loss[:100], h.loss[:100]) for tr, h in zip(separate, multi.histories))
    dev_all = max(_max_rel_dev(tr.history.loss, h.loss) for tr, h in zip(separate, multi.histories))
    what = (f"{n_seeds} seeds of the chapter-1 default retrain (E={cfg.n_experts}, k={cfg.k}, D={cfg.d_model}, "
            f"m={cfg.d_hidden}, batch {B}, {steps} steps) at once")
    path_name = path + (" (ragged)" if path == "gather" and multi.ragged else "")
    measured = (f"{fmt_stats(st['at once'])}; one seed {fmt_stats(st['one seed'])}: {fmt_ratio(to_one)}; "
                f"{x_floor:.2f}× the floor ({fmt_s(fl)}); {n_seeds} separate runs {fmt_stats(st['separate'])}")
    log(f"  multiseed: {measured}")
    return {
        "what": what, "threads": threads if threads is not None else -1, "n_seeds": n_seeds, "repeats": repeats,
        "one_seed": st["one seed"], "at_once": st["at once"], "separate": st["separate"],
        "ratio_to_one_seed": to_one, "speedup_vs_separate": speedup,
        "ratio_to_one_seed_median": to_one["median"], "speedup_vs_separate_median": speedup["median"],
        "dispatch": path_name, "flops": flops, "ops_per_step_one_seed": ops_one, "ops_per_step_at_once": ops_multi,
        "floor_s": fl, "x_floor": x_floor,
        "max_rel_loss_dev_first_100_steps": dev_100, "max_rel_loss_dev_all_steps": dev_all,
        "runs": [{"run": "one seed (Trainer)", "median": fmt_s(st["one seed"]["median_s"]),
                  "min–max": f"{fmt_s(st['one seed']['min_s'])}–{fmt_s(st['one seed']['max_s'])}"},
                 {"run": f"{n_seeds} seeds at once (MultiSeedTrainer, {path_name})",
                  "median": fmt_s(st["at once"]["median_s"]),
                  "min–max": f"{fmt_s(st['at once']['min_s'])}–{fmt_s(st['at once']['max_s'])}"},
                 {"run": f"{n_seeds} separate Trainer runs", "median": fmt_s(st["separate"]["median_s"]),
                  "min–max": f"{fmt_s(st['separate']['min_s'])}–{fmt_s(st['separate']['max_s'])}"},
                 {"run": f"{n_seeds}-seed floor ({flops / 1e9:.1f} GFLOP at 170 GFLOP/s + {ops_one} ops/step × 4 µs)",
                  "median": fmt_s(fl), "min–max": "–"}],
        "targets": [target_row("multiseed", what, measured, f"≤ {RATIO_TARGET:g}× one seed, or ≤ "
                               f"{FLOOR_TARGET:g}× the {n_seeds}-seed floor", met, to_one["median"])],
    }


def report_multiseed(r: dict) -> str:
    """A markdown table of :func:`bench_multiseed`'s result."""
    lines = [f"## {r['what']} ({r['threads']} thread(s), {r['repeats']} repeats)", "",
             "| run | wall median | min–max |", "|---|---|---|"]
    lines += [f"| {row['run']} | {row['median']} | {row['min–max']} |" for row in r["runs"]]
    t = r["targets"][0]
    lines += ["", f"At once: {fmt_ratio(r['ratio_to_one_seed'])} one seed's time, {r['x_floor']:.2f}× the floor, "
              f"{fmt_ratio(r['speedup_vs_separate'])} faster than separate runs. Target {t['target']}: "
              f"{'met' if t['met'] else 'missed'}. Ops per step: {r['ops_per_step_at_once']} at once, "
              f"{r['ops_per_step_one_seed']} for one seed.",
              "Same numbers as the separate runs: max relative loss deviation "
              f"{r['max_rel_loss_dev_first_100_steps']:.1e} over the first 100 steps, "
              f"{r['max_rel_loss_dev_all_steps']:.1e} over all (float rounding, which "
              "top-k selections amplify late in training, as they do between our own two dispatch paths)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's setting)")
    ap.add_argument("--seeds", type=int, default=N_SEEDS)
    args = ap.parse_args(argv)
    print(report_multiseed(bench_multiseed(args.repeats, args.threads or None, args.seeds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
