"""Expert Jacobians: our closed form vs ``torch.func.vmap(jacrev)`` vs a per-token autograd loop.

Shape legend: E experts, N probe points, D model width, F expert hidden width.

Size (``design.md``): N = 256 points, D = 64, F = 128, E = 8 experts, float32, for both expert kinds (GELU, the
chapter-1 experts; SwiGLU, Mixtral's). Every method returns all experts' Jacobians at all points, (E, N, D, D):

* ours: :func:`moewidgets.geometry.jacobians.expert_jacobians` (closed form, one batched matmul per chunk);
* ``vmap(jacrev)``: ``jacrev`` of one expert at one point with respect to the point, ``vmap``-ed over the points and
  over the experts' stacked weights (the strongest generic autograd version);
* the loop: ``torch.autograd.functional.jacobian`` of ``x ↦ all experts' outputs`` (E·D outputs, default
  ``vectorize=False``: one backward pass per output) for one token at a time. It is timed on a subset of the
  points and scaled by N / subset (its cost is the same for every token); the report says so.

Values are checked before timing: ours against ``vmap(jacrev)`` on all points and against the loop on the subset.
Targets: ours ≥ 2× faster than ``vmap(jacrev)``, ≥ 100× faster than the loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_
from torch.func import jacrev, vmap

from moewidgets.geometry.jacobians import expert_jacobians
from moewidgets.nn.experts import make_experts

from .common import fmt_ratio, interleaved, ratio_stats, stats, target_row

SIZE = {"E": 8, "N": 256, "D": 64, "F": 128}
TARGETS = {"vmap(jacrev)": 2.0, "autograd loop": 100.0}


def _gelu_expert(w_in_FD, b_in_F, w_out_DF, b_out_D, x_D):
    return w_out_DF @ F_.gelu(w_in_FD @ x_D + b_in_F) + b_out_D


def _swiglu_expert(w_gate_FD, w_up_FD, w_out_DF, x_D):
    return w_out_DF @ (F_.silu(w_gate_FD @ x_D) * (w_up_FD @ x_D))


def vmap_jacrev_jacobians(bank, X_ND: torch.Tensor) -> torch.Tensor:
    """``vmap`` over experts of ``vmap`` over points of ``jacrev(expert, wrt x)``: (E, N, D, D)."""
    if bank.activation == "gelu":
        fn, ws = _gelu_expert, [bank.w_in_EFD, bank.b_in_EF, bank.w_out_EDF, bank.b_out_ED]
    else:
        fn, ws = _swiglu_expert, [bank.w_gate_EFD, bank.w_up_EFD, bank.w_out_EDF]
    ws = [w.detach() for w in ws]
    n_w = len(ws)
    per_point = vmap(jacrev(fn, argnums=n_w), in_dims=(None,) * n_w + (0,))     # over the N points
    per_expert = vmap(per_point, in_dims=(0,) * n_w + (None,))                   # over the E experts' weights
    return per_expert(*ws, X_ND)


def loop_jacobians(bank, X_ND: torch.Tensor) -> torch.Tensor:
    """One ``torch.autograd.functional.jacobian`` call per token of ``x ↦ all experts' outputs``: (E, N, D, D)."""
    per_token = [torch.autograd.functional.jacobian(lambda x_D: bank.all_outputs(x_D[None])[0], x_D)   # (E, D, D)
                 for x_D in X_ND]
    return torch.stack(per_token, dim=1)


def bench_activation(activation: str, repeats: int, min_block_s: float, loop_points: int, device: str = "cpu",
                     seed: int = 0, size: dict | None = None) -> dict:
    """One expert kind: value checks, then the three methods timed side by side (``size`` overrides :data:`SIZE`)."""
    size = {**SIZE, **(size or {})}
    E, N, D, F = size["E"], size["N"], size["D"], size["F"]
    if not 1 <= loop_points <= N:
        raise ValueError(f"loop_points={loop_points} must be in 1..N={N}")
    g = torch.Generator().manual_seed(seed)
    bank = make_experts(activation, E, D, F, g).to(device)
    X_ND = torch.randn(N, D, generator=g).to(device)
    X_sub = X_ND[:loop_points]
    ours = expert_jacobians(bank, X_ND)
    err_vmap = float((ours - vmap_jacrev_jacobians(bank, X_ND)).abs().max())
    err_loop = float((ours[:, :loop_points] - loop_jacobians(bank, X_sub)).abs().max())
    scale = float(ours.abs().max())
    if max(err_vmap, err_loop) > 1e-5 * max(1.0, scale):
        raise RuntimeError(f"{activation} Jacobians disagree: max |ours − vmap(jacrev)| = {err_vmap:.3g}, "
                           f"max |ours − loop| = {err_loop:.3g} (entries up to {scale:.3g})")
    times, inner = interleaved({"ours": lambda: expert_jacobians(bank, X_ND),
                                "vmap(jacrev)": lambda: vmap_jacrev_jacobians(bank, X_ND),
                                "autograd loop": lambda: loop_jacobians(bank, X_sub)},
                               repeats, min_block_s, device)
    times["autograd loop"] = [t * N / loop_points for t in times["autograd loop"]]   # scaled to all N points
    return {"activation": activation, **size, "loop_points_timed": loop_points,
            "max_abs_err_vs_vmap": err_vmap, "max_abs_err_vs_loop": err_loop, "max_abs_entry": scale,
            "ours": stats(times["ours"]), "vmap(jacrev)": stats(times["vmap(jacrev)"]),
            "autograd loop": stats(times["autograd loop"]), "inner": inner,
            "speedup": {ref: ratio_stats(times[ref], times["ours"]) for ref in TARGETS}}


def bench_jacobians(repeats: int = 3, min_block_s: float = 0.05, loop_points: int = 8, device: str = "cpu",
                    activations=("gelu", "swiglu"), size: dict | None = None, log=print) -> dict:
    """Both expert kinds; returns ``{"what", "rows": [...], "targets": [...]}`` (``size`` overrides :data:`SIZE`)."""
    rows, targets = [], []
    for act in activations:
        r = bench_activation(act, repeats, min_block_s, loop_points, device, size=size)
        log(f"  jacobians {act:6s} ours {r['ours']['median_s'] * 1e3:7.1f} ms  vmap(jacrev) "
            f"{r['vmap(jacrev)']['median_s'] * 1e3:7.1f} ms  loop (scaled) {r['autograd loop']['median_s']:6.2f} s  "
            f"speedups {fmt_ratio(r['speedup']['vmap(jacrev)'])}, {fmt_ratio(r['speedup']['autograd loop'])}")
        rows.append(r)
        for ref, need in TARGETS.items():
            sp = r["speedup"][ref]
            note = (f" (loop timed on {loop_points} of {r['N']} points, scaled ×{r['N'] / loop_points:g})"
                    if ref == "autograd loop" else "")
            targets.append(target_row(
                "jacobians", f"{act} expert Jacobians (E={r['E']}, N={r['N']}, D={r['D']}, F={r['F']}): "
                f"ours vs {ref}{note}", f"{fmt_ratio(sp)} faster", f"≥ {need:g}× faster", sp["median"] >= need,
                sp["median"]))
    return {"what": "expert Jacobians, closed form vs torch.func.vmap(jacrev) vs per-token "
                    "torch.autograd.functional.jacobian loop", "repeats": repeats, "rows": rows, "targets": targets}
