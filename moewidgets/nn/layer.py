"""The MoE layer and its dense baselines.

Shape legend: T tokens, D model width, F expert hidden width, E experts, K top-k, C capacity: tokens per expert (padded).

The maths are the pure functions of :mod:`moewidgets.nn.functional` (the seed groups of
:mod:`moewidgets.multiseed` call the same ones); this module holds the parameters and the order of the steps.

    y(x) = Σ_{i ∈ top-k(x)} g_i(x) E_i(x)

Two exact dispatch paths compute the same sum (tests check both against a per-token loop, values and grads):

* ``"dense"``  — run every expert on every token as two batched matmuls, weight by the (T, E) gate matrix
  (zero off-route). Few ops, E/K times the FLOPs: the fastest path at widget sizes, where each torch op costs
  more (≈ 4 µs) than its arithmetic.
* ``"gather"`` — sort the (token, slot) pairs by expert, run each expert's group through it, scatter-add back.
  K/E of the FLOPs, ~10 more ops: wins for large T·F·D or E/K. On a CPU in float32 the groups go unpadded
  through ``grouped_mm`` ("ragged", :func:`~moewidgets.nn.experts.ragged_expert_outputs`); elsewhere every group
  is padded to C = max count and each projection is one batched matmul. Same sum either way.

``dispatch="auto"`` picks by size (see :func:`choose_dispatch`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..balance import loss_free_update
from ..config import MoEConfig
from . import functional as fn
from .activations import activation
from .experts import make_experts, ragged_available
from .functional import gather_combine
from .routers import RouterOutput, make_router

__all__ = ["MoEOutput", "MoELayer", "DenseFFN", "make_layer", "choose_dispatch", "gather_combine", "DISPATCHES"]

DISPATCHES = ("auto", "dense", "gather")


@dataclass
class MoEOutput:
    """A layer's output: ``y_TD`` (T, D), its weighted ``aux_loss`` (scalar) and the ``routing`` (or None)."""

    y_TD: torch.Tensor
    aux_loss: torch.Tensor
    routing: RouterOutput | None


def choose_dispatch(n_tokens: int, n_experts: int, k: int, d_model: int, d_hidden: int, expert: str = "gelu") -> str:
    """``"dense"`` while the wasted FLOPs of running every expert cost less than the gather path's extra ops.

    Dense costs ≈ 3·m·T·E·F·D multiply-adds (fwd + bwd, m = 2 matmuls per GELU expert, 3 per SwiGLU expert); gather
    costs ≈ 3·m·T·K·F·D plus ~20 extra ops (≈ 4 µs each on a CPU). With ≈ 170 GFLOP/s the break-even waste is
    ≈ 80 µs ≈ 14 MFLOP (measured in ``bench/``: a SwiGLU layer at T=512, E=4, k=2, D=32 ran 2× slower dense).
    """
    if k == n_experts:
        return "dense"
    matmuls = activation(expert).matmuls
    wasted_flops = 3.0 * matmuls * n_tokens * (n_experts - k) * d_hidden * d_model
    return "dense" if wasted_flops < 14e6 else "gather"


class MoELayer(nn.Module):
    """A routed mixture of experts, D → D: ``y(x) = Σ_{i∈top-k(x)} g_i(x) E_i(x)`` (chapter 1).

    Holds ``experts`` (a bank, ``moewidgets.nn.experts``), ``router`` (``moewidgets.nn.routers``) and the
    loss-free selection bias ``lf_bias_E`` (a buffer, zero unless ``cfg.lf_rate > 0``).

    >>> layer = MoELayer(MoEConfig(n_experts=4, k=1, d_model=8, d_hidden=16))
    >>> out = layer(torch.randn(10, 8))
    >>> out.y_TD.shape, out.routing.idx_TK.shape
    (torch.Size([10, 8]), torch.Size([10, 1]))
    """

    def __init__(self, cfg: MoEConfig, generator: torch.Generator | None = None, dispatch: str = "auto",
                 dtype: torch.dtype = torch.float32, ragged: bool | None = None):
        super().__init__()
        if cfg.arch != "moe":
            raise ValueError(f"MoELayer needs arch='moe', got arch={cfg.arch!r}; use DenseFFN for dense baselines")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch={dispatch!r} must be one of {DISPATCHES}")
        if ragged not in (None, True, False):
            raise ValueError(f"ragged={ragged!r} must be None (whenever available), True or False (pad the groups)")
        self.cfg, self.dispatch, self.ragged = cfg, dispatch, ragged
        self.experts = make_experts(cfg.expert, cfg.n_experts, cfg.d_model, cfg.d_hidden, generator, dtype)
        self.router = make_router(cfg, generator, dtype, experts=self.experts)
        self.register_buffer("lf_bias_E", torch.zeros(cfg.n_experts, dtype=dtype))

    @property
    def n_experts(self) -> int:
        return self.cfg.n_experts

    def route(self, x_TD: torch.Tensor) -> RouterOutput:
        """Run the router (with the loss-free selection bias when it is on)."""
        bias = self.lf_bias_E if self.cfg.lf_rate > 0 else None
        return self.router(x_TD, bias)

    def forward(self, x_TD: torch.Tensor) -> MoEOutput:
        routing = self.route(x_TD)
        path = self.dispatch
        if path == "auto":
            path = choose_dispatch(x_TD.shape[0], self.cfg.n_experts, self.cfg.k, self.cfg.d_model,
                                   self.cfg.d_hidden, self.cfg.expert)
        combine = self._combine_dense if path == "dense" else self._combine_gather
        y_TD = combine(x_TD, routing.gates_TK, routing.idx_TK)
        if self.training and hasattr(self.router, "update"):
            self.router.update(x_TD, routing)
        return MoEOutput(y_TD, routing.aux_loss, routing)

    def _combine_dense(self, x_TD, gates_TK, idx_TK):
        soft = idx_TK.shape[-1] == self.cfg.n_experts and self.cfg.lf_rate == 0   # slots = experts in order
        return fn.combine_dense(self.experts.all_outputs(x_TD), gates_TK, idx_TK, soft)

    def _combine_gather(self, x_TD, gates_TK, idx_TK):
        ragged = self.ragged
        if ragged is None:
            ragged = ragged_available(x_TD.device, x_TD.shape[1], self.cfg.d_hidden, x_TD.dtype)
        return fn.combine_gather(self.experts.activation, self.experts.weights(), x_TD, gates_TK, idx_TK, ragged)

    @torch.no_grad()
    def after_step(self, loads_E: torch.Tensor) -> None:
        """Loss-free balancing after an optimiser step: ``b ← b + γ sign(mean(c) − c)``, centred (no-op if γ=0).

        ``loads_E`` are the per-expert assignment counts (or fractions) of the step's batch.
        """
        if self.cfg.lf_rate > 0:
            loss_free_update(self.lf_bias_E, loads_E, self.cfg.lf_rate)

    def per_token_reference(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The slow obvious layer: a Python loop over tokens and their selected experts (tests' oracle)."""
        routing = self.route(x_TD)
        rows = []
        for t in range(x_TD.shape[0]):
            y = x_TD.new_zeros(x_TD.shape[1])
            for s in range(routing.idx_TK.shape[1]):
                e = int(routing.idx_TK[t, s])
                y = y + routing.gates_TK[t, s] * self.experts.expert_output(e, x_TD[t:t + 1])[0]
            rows.append(y)
        return torch.stack(rows)


class DenseFFN(nn.Module):
    """A dense FFN baseline at matched capacity: one expert of width E·m (``arch="dense"``) or k·m
    (``arch="dense_active"``). Its ``experts`` is a bank with E = 1, so every geometry function applies.
    """

    def __init__(self, cfg: MoEConfig, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if cfg.arch not in ("dense", "dense_active"):
            raise ValueError(f"DenseFFN needs arch='dense' or 'dense_active', got arch={cfg.arch!r}")
        self.cfg = cfg
        self.experts = make_experts(cfg.expert, 1, cfg.d_model, cfg.dense_hidden, generator, dtype)

    n_experts = 1

    def forward(self, x_TD: torch.Tensor) -> MoEOutput:
        y_TD = self.experts.all_outputs(x_TD)[:, 0]
        return MoEOutput(y_TD, x_TD.new_zeros(()), None)

    def after_step(self, loads_E: torch.Tensor) -> None:  # nothing to balance
        return None


def make_layer(cfg: MoEConfig, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               dispatch: str = "auto") -> nn.Module:
    """An :class:`MoELayer` for ``arch="moe"``, else the matching :class:`DenseFFN`."""
    if cfg.arch == "moe":
        return MoELayer(cfg, generator, dispatch, dtype)
    return DenseFFN(cfg, generator, dtype)
