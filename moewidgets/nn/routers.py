"""Routers: which experts each token goes to, and with what gate.

Shape legend: T tokens, D model width, E experts, K top-k.

The router contract (``design.md``): ``router(x_TD, select_bias_E=None) -> RouterOutput`` with ``gates_TK``,
``idx_TK``, ``probs_TE`` (or ``None``), ``logits_TE`` and ``aux_loss`` (a scalar tensor, already weighted).
Stateful routers (the K-Means router of chapter 3) also expose ``update(x_TD, out)``, called by the layer after a
training forward. The layer owns the loss-free selection bias and passes it in as ``select_bias_E``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..balance import switch_aux_loss, z_loss
from .experts import fan_in_uniform_

__all__ = ["RouterOutput", "SoftmaxRouter", "make_router", "select_topk"]


@dataclass
class RouterOutput:
    """What a router decided for a batch of tokens (see module docstring for shapes)."""

    gates_TK: torch.Tensor
    idx_TK: torch.Tensor
    probs_TE: torch.Tensor | None
    logits_TE: torch.Tensor
    aux_loss: torch.Tensor


def select_topk(probs_TE: torch.Tensor, k: int, gate: str, select_bias_E: torch.Tensor | None = None,
                scaled_logits_TE: torch.Tensor | None = None):
    """Top-k selection and gate values, shared by every router that produces probabilities.

    Selection ranks ``probs_TE + select_bias_E`` (the bias never enters a gate value). Gates:
    ``gate="softmax"`` keeps ``p_i`` of the selected experts; ``gate="renorm"`` uses ``p_i / Σ_{j∈top-k} p_j``,
    computed as a softmax over the selected ``scaled_logits_TE = z/τ`` when they are given (same value; then
    unselected logits get exactly zero gradient, and at k = 1 the router gets none at all).
    For ``k == E`` the selection is every expert (fully soft routing, gates = p under "softmax").

    Returns ``(gates_TK, idx_TK)``.
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


class SoftmaxRouter(nn.Module):
    """Linear softmax router with temperature and top-k: ``p = softmax((W_r x + b_r) / τ)``.

    Args:
        d_model, n_experts, k: D, E, K (1 ≤ k ≤ E; k = E is fully soft).
        temperature: τ > 0 (sharpness is 1/τ).
        gate: "softmax" (default; the router gets a gradient even at k = 1) or "renorm" (Mixtral).
        aux_weight, z_weight: weights of the Switch aux loss and the z-loss folded into ``aux_loss``.

    Parameters: ``w_ED`` (E, D) router rows, ``b_E`` (E,).

    >>> r = SoftmaxRouter(8, 4, k=2, generator=torch.Generator().manual_seed(0))
    >>> out = r(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)))
    >>> out.idx_TK.shape, out.gates_TK.shape, out.probs_TE.shape
    (torch.Size([5, 2]), torch.Size([5, 2]), torch.Size([5, 4]))
    """

    def __init__(self, d_model: int, n_experts: int, k: int, temperature: float = 1.0, gate: str = "softmax",
                 aux_weight: float = 0.0, z_weight: float = 0.0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k={k} must be in 1..n_experts={n_experts}")
        self.n_experts, self.k, self.temperature, self.gate = n_experts, k, float(temperature), gate
        self.aux_weight, self.z_weight = float(aux_weight), float(z_weight)
        self.w_ED = nn.Parameter(fan_in_uniform_(torch.empty(n_experts, d_model, dtype=dtype), d_model, generator))
        self.b_E = nn.Parameter(torch.zeros(n_experts, dtype=dtype))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits ``z = W_r x + b_r``, (T, E)."""
        return torch.addmm(self.b_E, x_TD, self.w_ED.T)

    def forward(self, x_TD: torch.Tensor, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        scaled_TE = logits_TE / self.temperature
        probs_TE = torch.softmax(scaled_TE, dim=-1)
        gates_TK, idx_TK = select_topk(probs_TE, self.k, self.gate, select_bias_E, scaled_TE)
        aux = logits_TE.new_zeros(())
        if self.aux_weight > 0:
            aux = aux + self.aux_weight * switch_aux_loss(probs_TE, idx_TK)
        if self.z_weight > 0:
            aux = aux + self.z_weight * z_loss(logits_TE)
        return RouterOutput(gates_TK, idx_TK, probs_TE, logits_TE, aux)


def make_router(cfg, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The router named by ``cfg.router`` for an :class:`~moewidgets.config.MoEConfig`."""
    if cfg.router == "softmax":
        return SoftmaxRouter(cfg.d_model, cfg.n_experts, cfg.k, cfg.temperature, cfg.gate,
                             cfg.aux_weight, cfg.z_weight, generator, dtype)
    raise NotImplementedError(
        f"router={cfg.router!r} is not implemented yet (chapter 3 adds 'kmeans', chapter 4 adds 'mpi'); "
        "use router='softmax'"
    )
