"""The activation table: one entry per expert kind, read by the forward, the closed-form Jacobians and the routers.

Shape legend: E experts, F expert hidden width, D model width.

Two expert forms share every activation ``φ``:

* plain (``gated=False``):  ``E_e(x) = W_out[e] φ(W_in[e] x + b_in[e]) + b_out[e]``
  weights ``w_in_EFD, b_in_EF, w_out_EDF, b_out_ED``;  Jacobian ``W_out diag(φ'(h)) W_in``.
* gated (``gated=True``, GLU):  ``E_e(x) = W_out[e] (φ(W_gate[e] x) ⊙ W_up[e] x)``
  weights ``w_gate_EFD, w_up_EFD, w_out_EDF``;  Jacobian ``W_out [diag(φ'(g) ⊙ u) W_gate + diag(φ(g)) W_up]``.

A new activation is one entry of ``ACTIVATIONS`` (a name, ``φ``, ``φ'`` and the form); the expert banks, the
seed groups (:mod:`moewidgets.multiseed`), the MPI router and ``moewidgets.geometry.jacobians`` all read it.

>>> sorted(ACTIVATIONS)
['gelu', 'relu', 'swiglu']
>>> act = activation("relu"); float(act.grad(torch.tensor(2.0))), act.weights
(1.0, ('w_in_EFD', 'b_in_EF', 'w_out_EDF', 'b_out_ED'))

Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F_

__all__ = ["Activation", "ACTIVATIONS", "activation", "gelu_grad", "silu_grad", "relu_grad", "PLAIN_WEIGHTS",
           "GATED_WEIGHTS"]

PLAIN_WEIGHTS = ("w_in_EFD", "b_in_EF", "w_out_EDF", "b_out_ED")
GATED_WEIGHTS = ("w_gate_EFD", "w_up_EFD", "w_out_EDF")


def gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """Derivative of the exact (erf) GELU: ``gelu'(h) = Φ(h) + h φ(h)`` (Φ, φ the standard normal cdf and pdf).

    >>> float(gelu_grad(torch.tensor(0.0)))
    0.5
    """
    return torch.special.ndtr(h) + h * torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)


def silu_grad(g: torch.Tensor) -> torch.Tensor:
    """Derivative of SiLU: ``silu'(g) = σ(g) (1 + g (1 − σ(g)))``.

    >>> float(silu_grad(torch.tensor(0.0)))
    0.5
    """
    s = torch.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


def relu_grad(h: torch.Tensor) -> torch.Tensor:
    """Derivative of ReLU, ``1[h > 0]`` (0 at h = 0, what autograd through ``torch.relu`` gives).

    >>> relu_grad(torch.tensor([-1.0, 0.0, 2.0]))
    tensor([0., 0., 1.])
    """
    return (h > 0).to(h.dtype)


@dataclass(frozen=True)
class Activation:
    """One table entry: ``name`` (the value of ``MoEConfig.expert``), ``fn`` φ, ``grad`` φ', ``gated`` (the GLU
    form) and the bank's weight names in order (``weights``); ``input_weight`` is the matrix whose rows act on x
    first (what the MPI router aligns with); ``matmuls`` the matmuls of one expert forward (dispatch cost)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor], torch.Tensor]
    gated: bool

    @property
    def weights(self) -> tuple[str, ...]:
        return GATED_WEIGHTS if self.gated else PLAIN_WEIGHTS

    @property
    def input_weight(self) -> str:
        return "w_gate_EFD" if self.gated else "w_in_EFD"

    @property
    def matmuls(self) -> int:
        return 3 if self.gated else 2


ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation("gelu", F_.gelu, gelu_grad, gated=False),        # paper 1's experts
    "relu": Activation("relu", F_.relu, relu_grad, gated=False),        # the classic FFN
    "swiglu": Activation("swiglu", F_.silu, silu_grad, gated=True),     # Mixtral, Qwen-MoE, OLMoE
}


def activation(name) -> Activation:
    """The table entry named ``name``, or a ValueError that names the allowed values.

    >>> activation("swiglu").gated
    True
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation={name!r} must be one of {tuple(ACTIVATIONS)}") from None
