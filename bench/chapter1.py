"""The chapter-1 benchmarks: the default retrain (ours vs a dense-masked loop, side by side) and the probe bundle.

Shape legend: T tokens (the batch), D model width, F expert hidden width (m), E experts, K top-k.

Targets (``design.md``): the chapter-1 default retrain (E=8, k=2, D=32, m=64, batch 256, 400 steps) in ≤ 0.5 s, where
the plain dense-masked loop a user would write first takes ≈ 0.7 s, reported with its ratio to the FLOP + op floor;
the probe bundle at 512 probe points (trace, Jacobians, spectra, PCA, alignment) in ≤ 0.3 s.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F_
from torch import nn

import moewidgets as mw
from moewidgets.geometry import chapter1_probes

from .common import count_torch_ops, floor_s, fmt_ratio, fmt_stats, ratio_stats, stats, sync, target_row

RETRAIN_TARGET_S = 0.5
PROBES_TARGET_S = 0.3
PROBE_POINTS = 512


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


def step_flops(cfg: mw.MoEConfig, batch: int, dispatch_tokens: int) -> float:
    """FLOPs of one step: forward (router, two expert projections on the dispatched tokens, read-out) × 3."""
    D, F, E = cfg.d_model, cfg.d_hidden, cfg.n_experts
    fwd = 2 * batch * D * E + 2 * dispatch_tokens * F * D * 2 + 2 * batch * D * D
    return 3.0 * fwd


def default_run(device: str) -> mw.RunConfig:
    """The chapter-1 default run (``RunConfig()``) on ``device``."""
    run = mw.RunConfig()
    return dataclasses.replace(run, train=dataclasses.replace(run.train, device=device))


def bench_retrain(repeats: int = 5, device: str = "cpu", log=print) -> dict:
    """The default retrain, ours and the dense-masked loop interleaved (construction not timed)."""
    run = default_run(device)
    cfg = run.model

    def fresh(kind):
        model = mw.build_model(cfg)
        if kind == "dense-masked loop":
            model = DenseMaskedLoopMoE(model)
        return mw.Trainer.from_config(run, model=model)

    fresh("ours").step(5)                              # warm-up: first-call allocations, lazy imports
    times = {"ours": [], "dense-masked loop": []}
    for r in range(repeats):                           # interleaved, alternating order: drift hits both
        for kind in (list(times) if r % 2 == 0 else list(times)[::-1]):
            tr = fresh(kind)
            sync(device)
            t0 = time.perf_counter()
            tr.step(run.train.steps)
            sync(device)
            times[kind].append(time.perf_counter() - t0)
    ours, ref = stats(times["ours"]), stats(times["dense-masked loop"])
    speedup = ratio_stats(times["dense-masked loop"], times["ours"])
    disp = mw.nn.choose_dispatch(run.train.batch_size, cfg.n_experts, cfg.k, cfg.d_model, cfg.d_hidden, cfg.expert)
    out = {"what": "chapter-1 default retrain (E=8, k=2, D=32, m=64, batch 256, 400 steps)",
           "target_s": RETRAIN_TARGET_S, "ours": ours, "reference": ref, "reference_name": "dense-masked loop",
           "speedup": speedup, "dispatch": disp, "steps": run.train.steps}
    measured = f"{fmt_stats(ours)}; dense-masked loop {fmt_stats(ref)}, ours {fmt_ratio(speedup)} faster"
    if torch.device(device).type == "cpu":
        tr = fresh("ours")
        tr.step(5)
        ops = count_torch_ops(lambda: tr.step(1))
        dispatched = run.train.batch_size * (cfg.k if disp == "gather" else cfg.n_experts)
        flops = step_flops(cfg, run.train.batch_size, dispatched) * run.train.steps
        fl = floor_s(flops, ops * run.train.steps)
        out.update(ops_per_step=ops, flops=flops, floor_s=fl, x_floor=ours["median_s"] / fl)
        measured += f"; {ours['median_s'] / fl:.1f}× the floor ({fl:.3f} s)"
    log(f"  retrain ours {fmt_stats(ours)}  dense-masked loop {fmt_stats(ref)}  speedup {fmt_ratio(speedup)}")
    out["targets"] = [target_row("retrain", out["what"], measured, f"≤ {RETRAIN_TARGET_S} s",
                                 ours["median_s"] <= RETRAIN_TARGET_S, ours["median_s"])]
    return out


def bench_probes(repeats: int = 5, device: str = "cpu", log=print) -> dict:
    """The chapter-1 probe bundle (trace + :func:`~moewidgets.geometry.chapter1_probes`) at 512 probe points."""
    run = default_run(device)
    tr = mw.Trainer.from_config(run)
    tr.step(run.train.steps)
    x = tr.data.x_probe[:PROBE_POINTS]

    def bundle():
        return chapter1_probes(tr.model.layer.experts, mw.trace_model(tr.model, x))

    bundle()                                            # warm-up
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        bundle()
        sync(device)
        ts.append(time.perf_counter() - t0)
    out = {"what": f"chapter-1 probe bundle at {PROBE_POINTS} probe points (trace, Jacobians, spectra, PCA, "
                   "alignment)", "target_s": PROBES_TARGET_S, "ours": stats(ts)}
    log(f"  probes {fmt_stats(out['ours'])}")
    out["targets"] = [target_row("probes", out["what"], fmt_stats(out["ours"]), f"≤ {PROBES_TARGET_S} s",
                                 out["ours"]["median_s"] <= PROBES_TARGET_S, out["ours"]["median_s"])]
    return out
