"""Our :class:`~moewidgets.nn.layer.MoELayer` vs transformers' ``MixtralSparseMoeBlock``: forward + backward.

Shape legend: T tokens, D model width, F expert hidden width (F = 2D here), E experts, K top-k.

Both layers hold IDENTICAL weights and route identically: ours is built with SwiGLU experts and the "renorm" gate
(Mixtral's convention), then its weights are copied into a transformers 5 block (fused experts, the "eager" experts
implementation: a Python loop over the experts that got tokens)::

    gate.weight             ← router.w_ED                        (E, D)   (our router bias b_E stays 0)
    experts.gate_up_proj[e] ← [w_gate_EFD[e]; w_up_EFD[e]]         (E, 2F, D)
    experts.down_proj       ← w_out_EDF                          (E, D, F)

Before any timing, outputs and gradients (input and every weight) are checked to agree, and the routing to be the
same. One timed call is ``y = layer(x)`` followed by ``torch.autograd.grad(y, [x, *weights], dy)`` (the input needs
a gradient, as inside a network). Targets (``design.md``): ours ≥ 1.5× faster at T = 512 and not slower at T = 2048,
over the grid T ∈ {512, 2048}, D ∈ {32, 64}, E ∈ {4, 8, 16}, k ∈ {1, 2}.

The floor of a point (:func:`bench.common.floor_s`): FLOPs of the useful work (router 2TDE, experts 2·T·K·3DF
forward; ×3 for forward + backward) at 170 GFLOP/s plus each implementation's own op count at 4 µs.
"""
from __future__ import annotations

import itertools
import math
import statistics

import torch

from moewidgets import MoEConfig, MoELayer
from moewidgets.nn.layer import choose_dispatch

from .common import count_torch_ops, floor_s, fmt_ratio, interleaved, ratio_stats, stats, target_row

GRID_T = (512, 2048)
GRID_D = (32, 64)
GRID_E = (4, 8, 16)
GRID_K = (1, 2)
TARGET_SPEEDUP = {512: 1.5, 2048: 1.0}
INSTALL_HINT = "pip install 'transformers>=5,<6'"


def layer_flops(T: int, D: int, F: int, E: int, K: int, expert: str = "swiglu") -> float:
    """Useful FLOPs of one forward + backward: ``3 × (2·T·D·E + 2·T·K·M·D·F)``, the router plus the routed
    experts' M matrices (M = 3 for SwiGLU: gate, up, down; M = 2 for GELU); the backward costs twice the forward."""
    n_mats = 3 if expert == "swiglu" else 2
    return 3.0 * (2.0 * T * D * E + 2.0 * T * K * n_mats * D * F)


def make_ours(T: int, D: int, E: int, K: int, seed: int = 0, device: str = "cpu") -> MoELayer:
    """Our layer at a grid point: SwiGLU experts, F = 2D, gate "renorm" (Mixtral), automatic dispatch."""
    cfg = MoEConfig(n_experts=E, k=K, d_model=D, d_hidden=2 * D, expert="swiglu", gate="renorm", seed=seed)
    return MoELayer(cfg, torch.Generator().manual_seed(seed)).to(device)


def mixtral_from_ours(layer: MoELayer):
    """A transformers ``MixtralSparseMoeBlock`` (eager experts) holding a copy of ``layer``'s weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg, bank, router = layer.cfg, layer.experts, layer.router
    if cfg.expert != "swiglu" or cfg.gate != "renorm" or cfg.temperature != 1.0:
        raise ValueError(f"Mixtral's block is SwiGLU, gate 'renorm', temperature 1; got expert={cfg.expert!r}, "
                         f"gate={cfg.gate!r}, temperature={cfg.temperature}")
    if float(router.b_E.detach().abs().max()) != 0.0:
        raise ValueError("Mixtral's router has no bias: our router.b_E must be zero to copy the layer")
    hf_cfg = MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_hidden, num_local_experts=cfg.n_experts,
                           num_experts_per_tok=cfg.k, hidden_act="silu", router_jitter_noise=0.0,
                           experts_implementation="eager")
    block = MixtralSparseMoeBlock(hf_cfg).to(device=router.w_ED.device, dtype=router.w_ED.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(router.w_ED)
        block.experts.gate_up_proj.copy_(torch.cat([bank.w_gate_EFD, bank.w_up_EFD], dim=1))   # (E, 2F, D)
        block.experts.down_proj.copy_(bank.w_out_EDF)
    return block


def _ours_weights(layer: MoELayer) -> list[torch.Tensor]:
    b = layer.experts
    return [layer.router.w_ED, layer.router.b_E, b.w_gate_EFD, b.w_up_EFD, b.w_out_EDF]


def _fwd_bwd_fns(layer: MoELayer, block, x_TD: torch.Tensor, dy_TD: torch.Tensor):
    T, D = x_TD.shape
    ours_w = _ours_weights(layer)
    hf_w = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]

    def ours():
        y_TD = layer(x_TD).y_TD
        return y_TD, torch.autograd.grad(y_TD, [x_TD, *ours_w], dy_TD)

    def theirs():
        y_TD = block(x_TD.view(1, T, D)).view(T, D)                  # (1, T, D) → (T, D)
        return y_TD, torch.autograd.grad(y_TD, [x_TD, *hf_w], dy_TD)

    return ours, theirs


def check_match(layer: MoELayer, block, x_TD: torch.Tensor, dy_TD: torch.Tensor, rtol: float = 1e-4,
                atol: float = 1e-5) -> dict:
    """Same routing, outputs and gradients (input, router, experts) for both layers; raises if not.

    Returns the largest absolute differences, ``{"routing_equal", "max_abs_dy", "max_abs_dx", "max_abs_dw"}``.
    """
    ours, theirs = _fwd_bwd_fns(layer, block, x_TD, dy_TD)
    y1, (gx1, gwr1, gbr1, gwg1, gwu1, gwo1) = ours()
    y2, (gx2, gwr2, gwgu2, gwo2) = theirs()
    with torch.no_grad():
        idx1 = layer.route(x_TD).idx_TK.sort(-1).values
        idx2 = block.gate(x_TD)[2].sort(-1).values
    pairs = {"y": (y1, y2), "dx": (gx1, gx2), "dw_router": (gwr1, gwr2),
             "dw_gate_up": (torch.cat([gwg1, gwu1], dim=1), gwgu2), "dw_out": (gwo1, gwo2)}
    pairs = {name: (a.detach(), b.detach()) for name, (a, b) in pairs.items()}
    diffs = {name: float((a - b).abs().max()) for name, (a, b) in pairs.items()}
    bad = [name for name, (a, b) in pairs.items() if not torch.allclose(a, b, rtol=rtol, atol=atol)]
    routing_equal = bool(torch.equal(idx1, idx2))
    if bad or not routing_equal:
        raise RuntimeError(f"our layer and MixtralSparseMoeBlock disagree (routing equal: {routing_equal}; "
                           f"mismatched: {bad}; max abs differences {diffs}): the timing would compare different "
                           "computations")
    return {"routing_equal": routing_equal, "max_abs_dy": diffs["y"], "max_abs_dx": diffs["dx"],
            "max_abs_dw": max(diffs["dw_router"], diffs["dw_gate_up"], diffs["dw_out"])}


def bench_point(T: int, D: int, E: int, K: int, repeats: int, min_block_s: float, device: str = "cpu",
                seed: int = 0) -> dict:
    """One grid point: match check, op counts, then interleaved timing of both forward + backward passes."""
    F = 2 * D
    layer = make_ours(T, D, E, K, seed, device).train()
    block = mixtral_from_ours(layer).train()
    g = torch.Generator().manual_seed(seed + 1)
    x_TD = torch.randn(T, D, generator=g).to(device).requires_grad_(True)
    dy_TD = torch.randn(T, D, generator=g).to(device)
    match = check_match(layer, block, x_TD, dy_TD)
    ours, theirs = _fwd_bwd_fns(layer, block, x_TD, dy_TD)
    ops = {"ours": count_torch_ops(ours), "transformers": count_torch_ops(theirs)}
    times, inner = interleaved({"ours": ours, "transformers": theirs}, repeats, min_block_s, device)
    flops = layer_flops(T, D, F, E, K)
    on_cpu = torch.device(device).type == "cpu"
    out = {"T": T, "D": D, "F": F, "E": E, "K": K, "dispatch": choose_dispatch(T, E, K, D, F, "swiglu"), "match": match,
           "ours": stats(times["ours"]), "transformers": stats(times["transformers"]),
           "speedup": ratio_stats(times["transformers"], times["ours"]), "inner": inner, "ops": ops,
           "flops": flops}
    if on_cpu:    # the floor's constants were measured on the 2-core CPU machine; no floor for a GPU
        for name in ("ours", "transformers"):
            fl = floor_s(flops, ops[name])
            out[name]["floor_s"] = fl
            out[name]["x_floor"] = out[name]["median_s"] / fl
    return out


def bench_layer(repeats: int = 7, min_block_s: float = 0.02, device: str = "cpu", grid=None, log=print) -> dict:
    """The whole grid (``GRID_T × GRID_D × GRID_E × GRID_K`` unless ``grid`` lists (T, D, E, K) points).

    Returns ``{"what", "points": [...], "targets": [...]}``, or ``{"skipped": reason}`` without transformers.
    """
    try:
        import transformers
    except ImportError:
        return {"skipped": f"transformers is not installed ({INSTALL_HINT})"}
    points = []
    for T, D, E, K in grid or itertools.product(GRID_T, GRID_D, GRID_E, GRID_K):
        p = bench_point(T, D, E, K, repeats, min_block_s, device)
        log(f"  layer T={T:5d} D={D:3d} E={E:3d} k={K}  ours {p['ours']['median_s'] * 1e3:7.2f} ms  "
            f"transformers {p['transformers']['median_s'] * 1e3:7.2f} ms  speedup {fmt_ratio(p['speedup'])}"
            f"  [{p['dispatch']}]")
        points.append(p)
    targets = []
    for T, need in TARGET_SPEEDUP.items():
        at_T = [p for p in points if p["T"] == T]
        if not at_T:
            continue
        worst = min(at_T, key=lambda p: p["speedup"]["median"])
        geo = math.exp(statistics.fmean(math.log(p["speedup"]["median"]) for p in at_T))
        n_met = sum(p["speedup"]["median"] >= need for p in at_T)
        measured = (f"worst {fmt_ratio(worst['speedup'])} at D={worst['D']}, E={worst['E']}, k={worst['K']}; "
                    f"geometric mean {geo:.2f}×; {n_met}/{len(at_T)} shapes met")
        word = f"≥ {need}× faster" if need > 1 else "not slower (≥ 1.0×)"
        targets.append(target_row("layer", f"MoE layer forward+backward vs transformers MixtralSparseMoeBlock "
                                  f"(eager), T={T}, {len(at_T)} shapes", measured, f"{word} at every shape",
                                  n_met == len(at_T), worst["speedup"]["median"]))
    return {"what": "MoE layer forward+backward, ours vs transformers MixtralSparseMoeBlock (eager experts), "
                    "SwiGLU, F=2D, gate renorm, identical weights and routing",
            "transformers": transformers.__version__, "repeats": repeats, "points": points, "targets": targets}
