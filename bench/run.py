"""``python -m bench.run``: time the chapter-1 default retrain and probe bundle; write JSON + markdown reports.

Each measurement is repeated; ratios are taken side by side (ours and the reference interleaved in one process, so
machine drift hits both). Results go to ``bench/results/bench-cpu-<threads>t.json`` and ``bench/results/report-cpu-<threads>t.md``.

Targets (``design.md``): chapter-1 default retrain (E=8, k=2, D=32, m=64, batch 256, 400 steps) ≤ 0.5 s, where a
plain dense-masked loop takes ≈ 0.7 s; the probe bundle at 512 probe points ≤ 0.3 s. The floor of a step is its
FLOPs at ≈ 170 GFLOP/s plus its torch ops at ≈ 4 µs each.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch import nn

import moewidgets as mw
from moewidgets.geometry import chapter1_probes

RESULTS = Path(__file__).resolve().parent / "results"
GFLOPS_FLOOR = 170e9        # fp32 matmul throughput measured on the 2-core machine (design.md)
OP_FLOOR_S = 4e-6           # per torch op dispatch


class DenseMaskedLoopMoE(nn.Module):
    """The reference a user would write first: loop over experts, run each on every token, mask by its gate."""

    def __init__(self, model: mw.MLPMoE):
        super().__init__()
        self.model = model

    def forward(self, x_TD):
        layer = self.model.layer
        routing = layer.route(x_TD)
        y_TD = torch.zeros_like(x_TD)
        bank = layer.experts
        for e in range(layer.n_experts):
            g_T = (routing.gates_TK * (routing.idx_TK == e)).sum(-1)          # gate of e per token, 0 off-route
            h_TF = F_.gelu(x_TD @ bank.w_in_EFD[e].T + bank.b_in_EF[e])
            y_TD = y_TD + g_T[:, None] * (h_TF @ bank.w_out_EDF[e].T + bank.b_out_ED[e])
        pred = y_TD @ self.model.w_ro_OD.T + self.model.b_ro_O
        return mw.ModelOutput(pred, routing.aux_loss, routing, y_TD)

    def moe_layers(self):
        return self.model.moe_layers()


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _stats(ts: list[float]) -> dict:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


def count_ops_per_step(trainer: mw.Trainer) -> int:
    """Top-level aten ops in one training step (forward, backward, optimiser), counted with the profiler."""
    from torch.profiler import profile
    with profile() as prof:
        trainer.step(1)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
               or (e.name.startswith("aten::") and e.cpu_parent is not None
                   and not e.cpu_parent.name.startswith("aten::")))


def step_flops(cfg: mw.MoEConfig, batch: int, dispatch_tokens: int) -> float:
    """FLOPs of one step: forward (router, two expert projections on the dispatched tokens, read-out) × 3."""
    D, F, E = cfg.d_model, cfg.d_hidden, cfg.n_experts
    fwd = 2 * batch * D * E + 2 * dispatch_tokens * F * D * 2 + 2 * batch * D * D
    return 3.0 * fwd


def bench_retrain(repeats: int) -> dict:
    run = mw.RunConfig()           # the chapter-1 default retrain
    cfg = run.model

    def fresh(kind):
        model = mw.build_model(cfg)
        if kind == "dense-masked loop":
            model = DenseMaskedLoopMoE(model)
        return mw.Trainer.from_config(run, model=model)

    times = {"ours": [], "dense-masked loop": []}
    for _ in range(repeats):                      # interleaved: drift hits both
        for kind in times:
            tr = fresh(kind)
            t0 = time.perf_counter()
            tr.step(run.train.steps)
            times[kind].append(time.perf_counter() - t0)
    tr = fresh("ours")
    tr.step(5)
    ops = count_ops_per_step(tr)
    disp = mw.nn.choose_dispatch(run.train.batch_size, cfg.n_experts, cfg.k, cfg.d_model, cfg.d_hidden)
    dispatched = run.train.batch_size * (cfg.k if disp == "gather" else cfg.n_experts)
    flops = step_flops(cfg, run.train.batch_size, dispatched) * run.train.steps
    floor = flops / GFLOPS_FLOOR + ops * run.train.steps * OP_FLOOR_S
    ours = _stats(times["ours"])
    ref = _stats(times["dense-masked loop"])
    ratios = [b / a for a, b in zip(times["ours"], times["dense-masked loop"])]
    return {"what": "chapter-1 default retrain (E=8, k=2, D=32, m=64, batch 256, 400 steps)",
            "target_s": 0.5, "ours": ours, "reference": ref, "reference_name": "dense-masked loop",
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "dispatch": disp, "ops_per_step": ops, "flops": flops, "floor_s": floor,
            "ratio_to_floor": ours["median_s"] / floor}


def bench_probes(repeats: int) -> dict:
    run = mw.RunConfig()
    tr = mw.Trainer.from_config(run)
    tr.step(run.train.steps)
    x = tr.data.x_probe[:512]
    trace = mw.trace_model(tr.model, x)
    chapter1_probes(tr.model.layer.experts, trace)             # warm-up
    ts = _time(lambda: chapter1_probes(tr.model.layer.experts, mw.trace_model(tr.model, x)), repeats)
    return {"what": "chapter-1 probe bundle at 512 probe points (trace, Jacobians, spectra, PCA, alignment)",
            "target_s": 0.3, "ours": _stats(ts)}


def environment() -> dict:
    return {"torch": torch.__version__, "moewidgets": mw.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "device": "cpu", "machine": platform.machine(),
            "processor": platform.processor() or "unknown", "date": time.strftime("%Y-%m-%d %H:%M")}


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Benchmarks ({env['date']}, {env['device']}, torch {env['torch']}, {env['threads']} threads)", "",
             "| what | ours median (min–max) | reference | target | verdict |", "|---|---|---|---|---|"]
    r = results["retrain"]
    o, ref = r["ours"], r["reference"]
    lines.append(f"| {r['what']} | {o['median_s']:.3f} s ({o['min_s']:.3f}–{o['max_s']:.3f}) | "
                 f"{r['reference_name']}: {ref['median_s']:.3f} s; ours is {r['speedup_median']:.2f}× faster "
                 f"({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) | ≤ {r['target_s']} s | "
                 f"{'met' if o['median_s'] <= r['target_s'] else 'missed'} |")
    p = results["probes"]
    o = p["ours"]
    lines.append(f"| {p['what']} | {o['median_s']:.3f} s ({o['min_s']:.3f}–{o['max_s']:.3f}) | – | "
                 f"≤ {p['target_s']} s | {'met' if o['median_s'] <= p['target_s'] else 'missed'} |")
    lines += ["", f"Retrain floor: {r['flops'] / 1e9:.2f} GFLOP at 170 GFLOP/s + {r['ops_per_step']} ops/step × 4 µs "
              f"= {r['floor_s']:.3f} s; ours is {r['ratio_to_floor']:.1f}× the floor (dispatch: {r['dispatch']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"environment": environment(), "retrain": bench_retrain(args.repeats),
               "probes": bench_probes(args.repeats)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"cpu-{torch.get_num_threads()}t"       # one report per thread count (the dashboard trains on 1)
    (RESULTS / f"bench-{tag}.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (RESULTS / f"report-{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
