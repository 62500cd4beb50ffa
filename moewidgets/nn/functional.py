"""The MoE maths as pure functions: expert forwards, the two combines, router logits, routing, the K-Means update.

Shape legend: S seeds (replicas), T tokens, D model width, F expert hidden width, E experts, K top-k,
G groups (experts, or S·E (seed, expert) pairs), C capacity: token rows per group (padded), P (token, slot) pairs,
M = S·T tokens of all seeds pooled.

One set of functions serves the single model the book teaches (``moewidgets.nn``, tensors ``x_TD``, weights
``w_in_EFD``) and a group of S seeds trained at once (:mod:`moewidgets.multiseed`, one more leading axis:
``x_STD``, ``w_in_SEFD``). A function tells the two apart by the rank of ``x``. With a seed axis the router logits
and probabilities are laid out expert-major, ``(S, E, T)``: a softmax over E is then a reduction across rows that
torch vectorises along T (over a last dim of E = 8 it costs ≈ 6× more per row). Where the two cases keep different
op sequences (a ``bmm`` instead of an ``addmm``), it is to keep each path's numbers exactly what they were: the
committed claim rows and notebook outputs are bitwise checks.

The balancing losses and the loss-free update live in :mod:`moewidgets.balance` (same convention);
:mod:`moewidgets.nn.activations` holds the activation table every expert function reads.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> w = {"w_in_EFD": torch.randn(4, 16, 8, generator=g), "b_in_EF": torch.zeros(4, 16),
...      "w_out_EDF": torch.randn(4, 8, 16, generator=g), "b_out_ED": torch.zeros(4, 8)}
>>> expert_all_outputs("relu", w, torch.randn(5, 8, generator=g)).shape                 # (T, E, D)
torch.Size([5, 4, 8])
>>> ws = {n: t.expand(3, *t.shape) for n, t in w.items()}                              # 3 seeds, same weights
>>> expert_all_outputs("relu", ws, torch.randn(3, 5, 8, generator=g)).shape             # (S, T, E, D)
torch.Size([3, 5, 4, 8])

Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F_

from ..balance import switch_aux_loss, z_loss
from .activations import activation

__all__ = ["RouterOutput", "expert_all_outputs", "expert_grouped_outputs", "ragged_expert_outputs", "expert_output",
           "combine_dense", "gather_combine", "combine_gather", "linear_logits", "cosine_logits", "mpi_rows",
           "mpi_logits", "select_topk", "route", "kmeans_init", "kmeans_update"]

Weights = Mapping[str, torch.Tensor]


@dataclass
class RouterOutput:
    """What a router decided: ``gates_TK``, ``idx_TK``, ``probs_TE`` (or ``None``), ``logits_TE`` and the weighted
    ``aux_loss``. With a seed axis (:func:`~moewidgets.nn.functional.route` on expert-major logits): gates, idx (S, T, K), probs and logits
    (S, E, T), aux_loss (S,)."""

    gates_TK: torch.Tensor
    idx_TK: torch.Tensor
    probs_TE: torch.Tensor | None
    logits_TE: torch.Tensor
    aux_loss: torch.Tensor


# ---------------------------------------------------------------------------------------------- experts

def expert_all_outputs(act: str, w: Weights, x_TD: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: ``E_e(x_t)``, (T, E, D); with a seed axis x (S, T, D), w (S, E, …) → (S, T, E, D).

    Plain: ``W_out φ(W_in x + b_in) + b_out``; gated: ``W_out (φ(W_gate x) ⊙ W_up x)`` (:mod:`.activations`).
    The dense-dispatch path and the oracles use it.
    """
    a = activation(act)
    s = "s" if x_TD.dim() == 3 else ""
    if a.gated:
        g_TEF = torch.einsum(f"{s}td,{s}efd->{s}tef", x_TD, w["w_gate_EFD"])
        u_TEF = torch.einsum(f"{s}td,{s}efd->{s}tef", x_TD, w["w_up_EFD"])
        return torch.einsum(f"{s}tef,{s}edf->{s}ted", a.fn(g_TEF) * u_TEF, w["w_out_EDF"])
    h_TEF = torch.einsum(f"{s}td,{s}efd->{s}tef", x_TD, w["w_in_EFD"]) + w["b_in_EF"].unsqueeze(-3)
    return torch.einsum(f"{s}tef,{s}edf->{s}ted", a.fn(h_TEF), w["w_out_EDF"]) + w["b_out_ED"].unsqueeze(-3)


def expert_grouped_outputs(act: str, w: Weights, x_GCD: torch.Tensor) -> torch.Tensor:
    """Group g through expert g on its own (padded) rows: x_GCD (G, C, D) → (G, C, D), one ``bmm`` per
    projection. The G groups are a bank's E experts, or the S·E (seed, expert) pairs of stacked banks flattened."""
    a = activation(act)
    if a.gated:
        g_GCF = torch.bmm(x_GCD, w["w_gate_EFD"].transpose(1, 2))
        u_GCF = torch.bmm(x_GCD, w["w_up_EFD"].transpose(1, 2))
        return torch.bmm(a.fn(g_GCF) * u_GCF, w["w_out_EDF"].transpose(1, 2))
    h_GCF = torch.baddbmm(w["b_in_EF"].unsqueeze(1), x_GCD, w["w_in_EFD"].transpose(1, 2))
    return torch.baddbmm(w["b_out_ED"].unsqueeze(1), a.fn(h_GCF), w["w_out_EDF"].transpose(1, 2))


def ragged_expert_outputs(act: str, w: Weights, x_PD: torch.Tensor, e_sorted_P: torch.Tensor,
                          offs_G: torch.Tensor) -> torch.Tensor:
    """Slots sorted by group through their experts with no padding, (P, D) → (P, D).

    ``w``: a bank's weights by their names (G leading); ``e_sorted_P``: each slot's group (non-decreasing);
    ``offs_G``: int32 end offset of each group's rows. One ``torch.nn.functional.grouped_mm`` per projection over
    the jagged groups; biases are gathered per slot (grouped_mm's own bias gets no gradient). Same sum as padding
    every group to the largest and one ``bmm``, without the padding's copies and wasted rows. Measured once against
    the padded path in ``bench.layer``'s harness (SwiGLU layer forward + backward, 1 thread, 2-core CPU): the
    speed-up over ``MixtralSparseMoeBlock`` went from 0.81–1.57× padded to 1.01–1.97× unpadded over six shapes
    (T = 512, 2048; D = 32, 64; E = 4, 8).
    """
    a = activation(act)
    gmm = F_.grouped_mm
    if a.gated:
        g_PF = gmm(x_PD, w["w_gate_EFD"].transpose(1, 2), offs=offs_G)
        u_PF = gmm(x_PD, w["w_up_EFD"].transpose(1, 2), offs=offs_G)
        return gmm(a.fn(g_PF) * u_PF, w["w_out_EDF"].transpose(1, 2), offs=offs_G)
    h_PF = gmm(x_PD, w["w_in_EFD"].transpose(1, 2), offs=offs_G) + w["b_in_EF"].index_select(0, e_sorted_P)
    return (gmm(a.fn(h_PF), w["w_out_EDF"].transpose(1, 2), offs=offs_G)
            + w["b_out_ED"].index_select(0, e_sorted_P))


def expert_output(act: str, w: Weights, e: int, x_TD: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` alone on tokens x_TD, (T, D): the slow, obvious version the tests compare against."""
    a = activation(act)
    if a.gated:
        return (a.fn(x_TD @ w["w_gate_EFD"][e].T) * (x_TD @ w["w_up_EFD"][e].T)) @ w["w_out_EDF"][e].T
    h_TF = x_TD @ w["w_in_EFD"][e].T + w["b_in_EF"][e]
    return a.fn(h_TF) @ w["w_out_EDF"][e].T + w["b_out_ED"][e]


# ---------------------------------------------------------------------------------------------- combines

def combine_dense(y_TED: torch.Tensor, gates_TK: torch.Tensor, idx_TK: torch.Tensor, soft_in_order: bool = False
                  ) -> torch.Tensor:
    """``y_t = Σ_k gate_tk · E_{idx_tk}(x_t)`` from every expert's output y_TED (T, E, D) (or (S, T, E, D)), via a
    (T, E) gate matrix that is zero off-route. ``soft_in_order``: the slots already are the E experts in index
    order (fully soft routing without a selection bias, :func:`select_topk`), so the gates are that matrix."""
    s = "s" if y_TED.dim() == 4 else ""
    if soft_in_order:
        g_TE = gates_TK
    else:
        g_TE = gates_TK.new_zeros(*gates_TK.shape[:-1], y_TED.shape[-2]).scatter(-1, idx_TK, gates_TK)
    return torch.einsum(f"{s}te,{s}ted->{s}td", g_TE, y_TED)


def gather_combine(x_TD: torch.Tensor, gates_TK: torch.Tensor, group_TK: torch.Tensor, n_groups: int,
                   grouped_outputs: Callable[[torch.Tensor], torch.Tensor],
                   ragged_outputs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """The gather path: ``y_t = Σ_slots gate · E_group(x_t)``, (T, D), each slot's group (expert) run only on the
    tokens routed to it. The P = T·K (token, slot) pairs are sorted by group once; then either
    ``ragged_outputs(x_PD, group_sorted_P, offs_G)`` runs the jagged groups unpadded (``offs_G``: int32 end offset
    of each group), or (``ragged_outputs=None``) every group is padded to C = the largest and
    ``grouped_outputs(x_GCD) → (G, C, D)`` runs them as one batched matmul; the gated outputs are scatter-added back.
    """
    T, K = group_TK.shape
    D = x_TD.shape[1]
    flat_g = group_TK.reshape(-1)                                  # (P,) group of each slot
    order = torch.argsort(flat_g, stable=True)                     # slots grouped by group
    g_sorted = flat_g[order]
    tok_sorted = torch.div(order, K, rounding_mode="floor")        # token of each sorted slot
    counts_G = torch.bincount(flat_g, minlength=n_groups)
    if ragged_outputs is not None:                                 # no padding: grouped_mm over the jagged groups
        offs_G = torch.cumsum(counts_G, 0).to(torch.int32)
        y_PD = ragged_outputs(x_TD.index_select(0, tok_sorted), g_sorted, offs_G)
    else:                                                          # pad every group to C, one bmm per projection
        starts_G = torch.cumsum(counts_G, 0) - counts_G
        pos = torch.arange(T * K, device=x_TD.device) - starts_G[g_sorted]        # slot's row inside its group
        C = int(counts_G.max())
        x_GCD = x_TD.new_zeros(n_groups, C, D).index_put((g_sorted, pos), x_TD[tok_sorted])
        y_PD = grouped_outputs(x_GCD)[g_sorted, pos]
    y_PD = y_PD * gates_TK.reshape(-1).index_select(0, order).unsqueeze(1)         # (P, D), gated
    return x_TD.new_zeros(T, D).index_add(0, tok_sorted, y_PD)


def combine_gather(act: str, w: Weights, x_TD: torch.Tensor, gates_TK: torch.Tensor, idx_TK: torch.Tensor,
                   ragged: bool) -> torch.Tensor:
    """:func:`gather_combine` through the experts of weights ``w``; with a seed axis (x (S, T, D), idx (S, T, K),
    w (S, E, …)) the G = S·E (seed, expert) pairs are the groups (group s·E + e is expert e of seed s): the slots
    of all seeds sorted by group once, each group through its expert. Returns (T, D) or (S, T, D)."""
    if x_TD.dim() == 3:
        S, T, K = idx_TK.shape
        E, D = w["w_out_EDF"].shape[1], x_TD.shape[2]
        gid_STK = idx_TK + E * torch.arange(S, device=x_TD.device).view(S, 1, 1)
        w_G = {n: t.flatten(0, 1) for n, t in w.items()}
        return combine_gather(act, w_G, x_TD.reshape(S * T, D), gates_TK.reshape(S * T, K),
                              gid_STK.reshape(S * T, K), ragged).view(S, T, D)
    n_groups = w["w_out_EDF"].shape[0]
    ragged_fn = (lambda x, g, offs: ragged_expert_outputs(act, w, x, g, offs)) if ragged else None
    return gather_combine(x_TD, gates_TK, idx_TK, n_groups, lambda x: expert_grouped_outputs(act, w, x), ragged_fn)


# ---------------------------------------------------------------------------------------------- router logits

def linear_logits(w_ED: torch.Tensor, b_E: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    """Softmax-router logits ``z = W_r x + b_r``: (T, E), or expert-major (S, E, T) with a seed axis."""
    if x_TD.dim() == 3:
        return torch.baddbmm(b_E.unsqueeze(2), w_ED, x_TD.transpose(1, 2))
    return torch.addmm(b_E, x_TD, w_ED.T)


def cosine_logits(centroids_ED: torch.Tensor, x_TD: torch.Tensor, detach: bool = False) -> torch.Tensor:
    """K-Means router scores ``s = x̂ Ĉᵀ`` (cosines): (T, E), or expert-major (S, E, T) with a seed axis.
    ``detach``: no gradient into x."""
    if detach:
        x_TD = x_TD.detach()
    if x_TD.dim() == 3:
        return torch.bmm(F_.normalize(centroids_ED, dim=-1), F_.normalize(x_TD, dim=-1).transpose(1, 2))
    return F_.normalize(x_TD, dim=-1) @ F_.normalize(centroids_ED, dim=-1).T


def mpi_rows(r_ED: torch.Tensor, w_EFD: torch.Tensor, scale: float, steps: int = 1,
             detach: bool = False) -> torch.Tensor:
    """The Manifold Power Iteration rows ``R'_i = C · normalize(R_i W_iᵀ W_i)``, repeated ``steps`` times.

    One step per row i is a power-iteration step with ``M_i = W_iᵀ W_i`` (D×D) followed by the retraction to the
    sphere of radius ``C = scale``: ``r ← C · r M_i / ‖r M_i‖``. Computed as two batched products (never forming
    ``M_i``), ``2·E·F·D`` multiply-adds per step. ``detach=True`` stops the gradient into ``w_EFD``.

    Shapes: ``r_ED`` (E, D), ``w_EFD`` (E, F, D) → (E, D), every row of norm ``scale`` (any leading E: the seed
    groups pass their S·E rows at once).

    >>> r = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    >>> w = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1))
    >>> mpi_rows(r, w, scale=0.5).norm(dim=1)
    tensor([0.5000, 0.5000, 0.5000, 0.5000])

    Chapter 4 (book/chapter4.ipynb).
    """
    if detach:
        w_EFD = w_EFD.detach()
    phi_ED = r_ED
    for _ in range(steps):   # two bmm's per step (measured ≈ 2× faster than einsum at widget sizes, fwd + bwd)
        h_EF1 = torch.bmm(w_EFD, phi_ED.unsqueeze(2))                                   # W_i r_i
        phi_ED = F_.normalize(torch.bmm(h_EF1.transpose(1, 2), w_EFD).squeeze(1), dim=-1)  # W_iᵀ W_i r_i, retracted
    return scale * phi_ED


def mpi_logits(r_ED: torch.Tensor, w_EFD: torch.Tensor, x_TD: torch.Tensor, scale: float, steps: int = 1,
               detach: bool = False) -> torch.Tensor:
    """MPI-router logits ``z = R' x`` with ``R'`` from :func:`mpi_rows`: (T, E), or expert-major (S, E, T) with a
    seed axis (r (S, E, D), w (S, E, F, D); the S·E rows take their power steps at once)."""
    if x_TD.dim() == 3:
        S, E, D = r_ED.shape
        rows_GD = mpi_rows(r_ED.reshape(S * E, D), w_EFD.flatten(0, 1), scale, steps, detach)
        return torch.bmm(rows_GD.view(S, E, D), x_TD.transpose(1, 2))
    return x_TD @ mpi_rows(r_ED, w_EFD, scale, steps, detach).T


# ---------------------------------------------------------------------------------------------- routing

def select_topk(probs_TE: torch.Tensor, k: int, gate: str, select_bias_E: torch.Tensor | None = None,
                scaled_logits_TE: torch.Tensor | None = None):
    """Top-k selection and gate values, shared by every router that produces probabilities.

    Selection ranks ``probs_TE + select_bias_E`` (the bias never enters a gate value). Gates:
    ``gate="softmax"`` keeps ``p_i`` of the selected experts; ``gate="renorm"`` uses ``p_i / Σ_{j∈top-k} p_j``,
    computed as a softmax over the selected ``scaled_logits_TE = z/τ`` when they are given (same value; then
    unselected logits get exactly zero gradient, and at k = 1 the router gets none at all).
    For ``k == E`` the selection is every expert (fully soft routing, gates = p under "softmax").

    Returns ``(gates_TK, idx_TK)``.

    >>> p = torch.tensor([[0.5, 0.3, 0.2]])
    >>> select_topk(p, 2, "renorm")[0], select_topk(p, 1, "softmax", torch.tensor([0.0, 0.3, 0.0]))[1]
    (tensor([[0.6250, 0.3750]]), tensor([[1]]))
    """
    T, E = probs_TE.shape
    if k == E and select_bias_E is None:
        # fully soft: every expert, in a fixed order (saves a sort; the order of slots carries no meaning here)
        idx_TK = torch.arange(E, device=probs_TE.device).expand(T, E)
        gates_TK = probs_TE
    else:
        scores_TE = probs_TE if select_bias_E is None else probs_TE + select_bias_E
        idx_TK = torch.topk(scores_TE.detach(), k, dim=-1).indices
        gates_TK = probs_TE.gather(1, idx_TK)
    if gate == "renorm":
        if scaled_logits_TE is not None:
            gates_TK = torch.softmax(scaled_logits_TE.gather(1, idx_TK), dim=-1)
        else:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
    return gates_TK, idx_TK


def route(logits_TE: torch.Tensor, k: int, temperature: float, gate: str, aux_weight: float = 0.0,
          z_weight: float = 0.0, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
    """From router logits to a :class:`RouterOutput`, shared by every router: ``p = softmax(z / τ)``, top-k
    selection (plus ``select_bias_E``, selection only) and gates (:func:`select_topk`, "softmax" or "renorm"),
    and the weighted balancing losses ``aux_weight · E Σ f_i P_i + z_weight · mean(logsumexp(z)²)``
    (:mod:`moewidgets.balance`).

    With a seed axis the logits are expert-major (S, E, T), ``select_bias_E`` is (S, E) (seed s's bias on its
    rows) and the output has gates, idx (S, T, K), probs (S, E, T) and one aux loss per seed (S,).

    >>> z = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0))              # S=2, E=4, T=6
    >>> out = route(z, 2, 1.0, "softmax", aux_weight=0.01)
    >>> out.gates_TK.shape, out.aux_loss.shape
    (torch.Size([2, 6, 2]), torch.Size([2]))
    """
    if logits_TE.dim() == 2:
        scaled_TE = logits_TE / temperature
        probs_TE = torch.softmax(scaled_TE, dim=-1)
        gates_TK, idx_TK = select_topk(probs_TE, k, gate, select_bias_E, scaled_TE)
    else:
        S, E, T = logits_TE.shape
        scaled_SET = logits_TE / temperature
        probs_TE = torch.softmax(scaled_SET, dim=1)
        bias_TE = (select_bias_E.unsqueeze(1).expand(S, T, E).reshape(S * T, E)
                   if select_bias_E is not None else None)
        scaled_TE = scaled_SET.transpose(1, 2).reshape(S * T, E) if gate == "renorm" else None
        gates_TK, idx_TK = select_topk(probs_TE.transpose(1, 2).reshape(S * T, E), k, gate, bias_TE, scaled_TE)
        gates_TK, idx_TK = gates_TK.view(S, T, -1), idx_TK.view(S, T, -1)
    aux = logits_TE.new_zeros(logits_TE.shape[:-2])
    if aux_weight > 0:
        aux = aux + aux_weight * switch_aux_loss(probs_TE, idx_TK)
    if z_weight > 0:
        aux = aux + z_weight * z_loss(logits_TE)
    return RouterOutput(gates_TK, idx_TK, probs_TE, logits_TE, aux)


# ---------------------------------------------------------------------------------------------- K-Means state

@torch.no_grad()
def kmeans_init(centroids_ED: torch.Tensor, counts_E: torch.Tensor, x_TD: torch.Tensor, init_seeds) -> None:
    """``C_i ←`` E distinct random tokens of ``x_TD`` (drawn with ``torch.Generator().manual_seed(init_seed)``),
    counts reset, in place. With a seed axis (C (S, E, D), x (S, T, D)) ``init_seeds`` holds one seed per replica."""
    if x_TD.dim() == 2:
        centroids_ED, counts_E, x_TD, init_seeds = centroids_ED[None], counts_E[None], x_TD[None], [init_seeds]
    E, T = centroids_ED.shape[1], x_TD.shape[1]
    if T < E:
        raise ValueError(f"K-Means router: the first training batch has T={T} tokens, initialising needs at least "
                         f"n_experts={E} (one distinct token per centroid)")
    for s, seed in enumerate(init_seeds):
        pick_E = torch.randperm(T, generator=torch.Generator().manual_seed(int(seed)))[:E].to(x_TD.device)
        centroids_ED[s].copy_(x_TD[s].detach()[pick_E])
    counts_E.zero_()


@torch.no_grad()
def kmeans_update(centroids_ED: torch.Tensor, counts_E: torch.Tensor, x_TD: torch.Tensor, idx_TK: torch.Tensor,
                  mode: str, rate: float, normalize: bool, active_S: torch.Tensor | None = None) -> None:
    """Move every centroid towards the mean of the batch tokens routed to it, in place (X_i: tokens routed to i)::

        mode "ema":         C_i ← (1 − β) C_i + β · mean(X_i)       (experts with no token this batch keep C_i)
        mode "cumulative":  C_i ← (n_i C_i + Σ X_i) / (n_i + |X_i|),  n_i ← n_i + |X_i|

    ``normalize``: average x̂ instead of x. With a seed axis (C (S, E, D), counts (S, E), x (S, T, D), idx (S, T, K))
    the sums run over the S·E (seed, expert) groups at once; seeds with ``active_S`` False keep their state.
    """
    K, D = idx_TK.shape[-1], x_TD.shape[-1]
    E = centroids_ED.shape[-2]
    if x_TD.dim() == 3:                 # the S·E (seed, expert) pairs are the groups: group s·E + e
        S = x_TD.shape[0]
        x_MD = x_TD.reshape(-1, D)                                             # M = S·T tokens, pooled
        gid_P = (idx_TK + E * torch.arange(S, device=x_MD.device).view(S, 1, 1)).reshape(-1)
    else:
        S, x_MD, gid_P = 1, x_TD, idx_TK.reshape(-1)                           # group of each slot
    x_MD = x_MD.detach()
    if normalize:
        x_MD = F_.normalize(x_MD, dim=-1)
    x_PD = x_MD.unsqueeze(1).expand(x_MD.shape[0], K, D).reshape(-1, D)        # token of each slot
    sum_SED = x_MD.new_zeros(S * E, D).index_add_(0, gid_P, x_PD)
    n_SE = x_MD.new_zeros(S * E).index_add_(0, gid_P, torch.ones_like(gid_P, dtype=x_MD.dtype))
    if x_TD.dim() == 3:
        sum_SED, n_SE = sum_SED.view(S, E, D), n_SE.view(S, E)
    if mode == "ema":
        mean_SED = sum_SED / n_SE.clamp_min(1).unsqueeze(-1)
        new_SED = (1 - rate) * centroids_ED + rate * mean_SED
    else:
        total_SE = counts_E + n_SE
        new_SED = (counts_E.unsqueeze(-1) * centroids_ED + sum_SED) / total_SE.clamp_min(1).unsqueeze(-1)
    hit_SE = n_SE > 0                                                          # experts with no token keep C_i
    if active_S is not None:
        active_S1 = active_S.to(x_MD.device).unsqueeze(1)
        hit_SE = hit_SE & active_S1
        n_SE = torch.where(active_S1, n_SE, 0.0)
    centroids_ED.copy_(torch.where(hit_SE.unsqueeze(-1), new_SED, centroids_ED))
    counts_E.add_(n_SE)
