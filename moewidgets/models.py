"""Models: the controlled MLP-MoE of chapter 1 (a square MoE layer D → D and a linear read-out).

Shape legend: S seeds (a seed group's leading axis), T tokens (points), D model width, O output width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MoEConfig
from .nn.experts import fan_in_uniform_
from .nn.layer import MoELayer, MoEOutput, make_layer
from .nn.routers import RouterOutput

__all__ = ["ModelOutput", "MLPMoE", "build_model", "readout"]


@dataclass
class ModelOutput:
    """``pred_TO`` (T, O) predictions, ``aux_loss`` (weighted, scalar), ``routing`` of the MoE layer (or None)
    and ``h_TD`` (T, D), the MoE layer's output (the "routed hidden state" chapter 1 runs PCA on)."""

    pred_TO: torch.Tensor
    aux_loss: torch.Tensor
    routing: RouterOutput | None
    h_TD: torch.Tensor


def readout(w_ro_OD: torch.Tensor, b_ro_O: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
    """The linear read-out ``pred = W_ro y + b_ro``, (T, O); with a seed axis (S, T, D) → (S, T, O).

    >>> readout(torch.eye(2), torch.ones(2), torch.zeros(3, 2)).tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    if y_TD.dim() == 3:
        return torch.baddbmm(b_ro_O.unsqueeze(1), y_TD, w_ro_OD.transpose(1, 2))
    return torch.addmm(b_ro_O, y_TD, w_ro_OD.T)


class MLPMoE(nn.Module):
    """``pred = W_ro · f(x) + b_ro`` with ``f`` an MoE layer D → D (or its dense baseline) (paper 1, §1.3.2).

    The layer is square so that expert Jacobians are D×D and spectra compare across architectures.

    >>> m = MLPMoE(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16), d_out=3)
    >>> m(torch.randn(5, 8)).pred_TO.shape
    torch.Size([5, 3])
    """

    def __init__(self, cfg: MoEConfig, d_out: int | None = None, generator: torch.Generator | None = None,
                 dispatch: str = "auto", dtype: torch.dtype = torch.float32):
        super().__init__()
        d_out = cfg.d_model if d_out is None else d_out
        self.cfg = cfg
        self.layer = make_layer(cfg, generator, dtype, dispatch)
        self.w_ro_OD = nn.Parameter(fan_in_uniform_(torch.empty(d_out, cfg.d_model, dtype=dtype), cfg.d_model,
                                                    generator))
        self.b_ro_O = nn.Parameter(fan_in_uniform_(torch.empty(d_out, dtype=dtype), cfg.d_model, generator))

    def forward(self, x_TD: torch.Tensor) -> ModelOutput:
        out: MoEOutput = self.layer(x_TD)
        pred_TO = readout(self.w_ro_OD, self.b_ro_O, out.y_TD)
        return ModelOutput(pred_TO, out.aux_loss, out.routing, out.y_TD)

    def moe_layers(self) -> list[nn.Module]:
        """The MoE (or dense) layers of this model, in order (one here)."""
        return [self.layer]


def build_model(cfg: MoEConfig, d_out: int | None = None, device: str | torch.device = "cpu",
                dispatch: str = "auto", dtype: torch.dtype = torch.float32) -> MLPMoE:
    """An :class:`MLPMoE` initialised from ``cfg.seed`` with its own generator (never the global RNG)."""
    g = torch.Generator().manual_seed(10_007 * cfg.seed + 1)
    return MLPMoE(cfg, d_out, g, dispatch, dtype).to(device)
