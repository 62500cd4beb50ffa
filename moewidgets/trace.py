"""Routing traces: what one forward pass of an MoE layer routed where.

Shape legend: T tokens, D model width, E experts, K top-k.

A :class:`RoutingTrace` is the contract between models (ours, or Hugging Face models through ``moewidgets.hf``)
and geometry: geometry functions take an expert bank, plain tensors and a trace, never a whole model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RoutingTrace", "trace_layer"]


@dataclass
class RoutingTrace:
    """The routing of one MoE layer on a batch of tokens (all tensors detached).

    Fields::

        x_TD:        (T, D) layer inputs (what the router and the experts saw).
        probs_TE:    (T, E) routing probabilities ``softmax(z / τ)``, or ``None`` for routers without them.
        idx_TK:      (T, K) selected experts (int64), in descending score order.
        gates_TK:    (T, K) gate values of the selected experts (what multiplies each expert's output).
        expert_out_TKD: optional (T, K, D) ungated outputs of the selected experts.
        layer:       which layer this is (an index or a module name).

    ``gate_matrix()`` scatters the gates into a dense (T, E) matrix, zero off-route: the routing weights
    ``g_i(x)`` used by weighted PCA and by routing-weighted mean Jacobians (chapter 1).
    """

    x_TD: torch.Tensor
    probs_TE: torch.Tensor | None
    idx_TK: torch.Tensor
    gates_TK: torch.Tensor
    expert_out_TKD: torch.Tensor | None = None
    layer: int | str = 0
    n_experts: int | None = None

    def __post_init__(self) -> None:
        T = self.x_TD.shape[0]
        if self.idx_TK.shape != self.gates_TK.shape or self.idx_TK.shape[0] != T:
            raise ValueError(
                f"RoutingTrace: idx_TK {tuple(self.idx_TK.shape)} and gates_TK {tuple(self.gates_TK.shape)} "
                f"must both be (T={T}, K)"
            )
        if self.n_experts is None:
            self.n_experts = int(self.probs_TE.shape[1]) if self.probs_TE is not None else int(self.idx_TK.max()) + 1

    @property
    def n_tokens(self) -> int:
        return int(self.x_TD.shape[0])

    @property
    def k(self) -> int:
        return int(self.idx_TK.shape[1])

    def gate_matrix(self) -> torch.Tensor:
        """Dense gates (T, E): ``g[t, e]`` = gate of expert e for token t, 0 if e was not selected."""
        g_TE = torch.zeros(self.n_tokens, self.n_experts, dtype=self.gates_TK.dtype, device=self.gates_TK.device)
        return g_TE.scatter_add_(1, self.idx_TK, self.gates_TK)

    def membership(self) -> torch.Tensor:
        """Hard membership (T, E): 1 where expert e is among token t's selected experts, else 0."""
        m_TE = torch.zeros(self.n_tokens, self.n_experts, dtype=self.gates_TK.dtype, device=self.gates_TK.device)
        return m_TE.scatter_(1, self.idx_TK, 1.0)

    def loads(self) -> torch.Tensor:
        """Fraction of (token, slot) assignments per expert, (E,), summing to 1."""
        counts_E = torch.bincount(self.idx_TK.reshape(-1), minlength=self.n_experts).to(self.gates_TK.dtype)
        return counts_E / counts_E.sum()


@torch.no_grad()
def trace_layer(layer: torch.nn.Module, x_TD: torch.Tensor, with_expert_outputs: bool = False,
                name: int | str = 0) -> RoutingTrace:
    """Run ``layer``'s router on x_TD and record the routing (no state changes: stateful routers are not updated).

    A layer without a router (a dense baseline) gives a one-expert trace: ``idx_TK = 0``, ``gates_TK = 1``.
    ``with_expert_outputs`` also stores the ungated outputs of the selected experts, (T, K, D).
    """
    T = x_TD.shape[0]
    if not hasattr(layer, "route"):
        idx_TK = torch.zeros(T, 1, dtype=torch.long, device=x_TD.device)
        gates_TK = torch.ones(T, 1, dtype=x_TD.dtype, device=x_TD.device)
        probs_TE = torch.ones(T, 1, dtype=x_TD.dtype, device=x_TD.device)
    else:
        routing = layer.route(x_TD)
        idx_TK, gates_TK, probs_TE = routing.idx_TK, routing.gates_TK.detach(), routing.probs_TE
        probs_TE = probs_TE.detach() if probs_TE is not None else None
    out_TKD = None
    if with_expert_outputs:
        y_TED = layer.experts.all_outputs(x_TD)
        out_TKD = y_TED.gather(1, idx_TK.unsqueeze(-1).expand(-1, -1, y_TED.shape[-1]))
    return RoutingTrace(x_TD.detach(), probs_TE, idx_TK, gates_TK, out_TKD, name, getattr(layer, "n_experts", 1))
