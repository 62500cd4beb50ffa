"""How our MoE layer's forward + backward time grows with tokens, experts and width.

Shape legend: T tokens, D model width, F expert hidden width (F = 2D), E experts, K top-k.

Base point: the chapter-1 layer kind (GELU experts, gate "softmax", automatic dispatch) at T = 2048, E = 8, k = 2,
D = 64, F = 128. One sweep per axis, the others held at the base:

    tokens  T ∈ {256, 512, 1024, 2048, 4096, 8192}
    experts E ∈ {2, 4, 8, 16, 32}       (k = 2)
    width   D ∈ {16, 32, 64, 128}       (F = 2D)

Each sweep is fitted with a power law ``time ≈ c · x^b`` (least squares in log-log; :func:`bench.common.fit_power_law`)
and the exponent b is recorded next to the exponent of the FLOP + op floor over the same points (1 for tokens, 2 for
width, ≈ 0 for experts at fixed k, once the work dominates the per-op cost). The dispatch path the layer chose at
each point is recorded too: its switch (dense → gather) bends the curves.
"""
from __future__ import annotations

import torch

from moewidgets import MoEConfig, MoELayer
from moewidgets.nn.layer import choose_dispatch

from .common import count_torch_ops, fit_power_law, floor_s, interleaved, stats
from .layer import layer_flops

BASE = {"T": 2048, "E": 8, "K": 2, "D": 64}
SWEEPS = {"tokens": ("T", (256, 512, 1024, 2048, 4096, 8192)),
          "experts": ("E", (2, 4, 8, 16, 32)),
          "width": ("D", (16, 32, 64, 128))}
EXPERT = "gelu"


def fwd_bwd(T: int, E: int, K: int, D: int, device: str = "cpu", seed: int = 0):
    """A closure running one forward + backward of our layer (input gradient included) at this size."""
    cfg = MoEConfig(n_experts=E, k=K, d_model=D, d_hidden=2 * D, expert=EXPERT, seed=seed)
    layer = MoELayer(cfg, torch.Generator().manual_seed(seed)).to(device).train()
    g = torch.Generator().manual_seed(seed + 1)
    x_TD = torch.randn(T, D, generator=g).to(device).requires_grad_(True)
    dy_TD = torch.randn(T, D, generator=g).to(device)
    weights = [x_TD, *layer.parameters()]

    def step():
        return torch.autograd.grad(layer(x_TD).y_TD, weights, dy_TD)

    return step


def bench_scaling(repeats: int = 5, min_block_s: float = 0.02, device: str = "cpu", sweeps=None, log=print) -> dict:
    """Every sweep (or the ``sweeps`` given, same layout as :data:`SWEEPS`); returns ``{"what", "sweeps": {...}}``."""
    on_cpu = torch.device(device).type == "cpu"
    out = {}
    for name, (axis, values) in (sweeps or SWEEPS).items():
        points = []
        for v in values:
            size = {**BASE, axis: v}
            T, E, K, D = size["T"], size["E"], size["K"], size["D"]
            step = fwd_bwd(T, E, K, D, device)
            times, inner = interleaved({"ours": step}, repeats, min_block_s, device)
            p = {**size, "F": 2 * D, "dispatch": choose_dispatch(T, E, K, D, 2 * D), "ours": stats(times["ours"]),
                 "inner": inner["ours"], "flops": layer_flops(T, D, 2 * D, E, K, EXPERT)}
            if on_cpu:
                p["ops"] = count_torch_ops(step)
                p["floor_s"] = floor_s(p["flops"], p["ops"])
            log(f"  scaling {name:7s} {axis}={v:5d}  {p['ours']['median_s'] * 1e3:8.2f} ms  [{p['dispatch']}]")
            points.append(p)
        xs = [p[axis] for p in points]
        sweep = {"axis": axis, "points": points,
                 "fit": fit_power_law(xs, [p["ours"]["median_s"] for p in points])}
        if on_cpu:
            sweep["floor_fit"] = fit_power_law(xs, [p["floor_s"] for p in points])
        log(f"  scaling {name:7s} exponent {sweep['fit']['exponent']:.2f} (R² {sweep['fit']['r2']:.3f})"
            + (f"; floor's {sweep['floor_fit']['exponent']:.2f}" if on_cpu else ""))
        out[name] = sweep
    return {"what": f"our MoE layer forward+backward ({EXPERT} experts, F=2D, automatic dispatch) vs tokens, "
                    f"experts and width; base T={BASE['T']}, E={BASE['E']}, k={BASE['K']}, D={BASE['D']}",
            "expert": EXPERT, "base": BASE, "repeats": repeats, "sweeps": out}
