"""Expert banks: all experts' weights stacked along a leading expert axis.

Shape legend (used in every MoE file):
    T tokens, D model width, F hidden width of one expert, E experts, K top-k, N probe points,
    C capacity: token rows per expert group (padded), P (token, slot) pairs.

The bank naming is a contract (``design.md``): geometry code reads these attributes from *any* bank, ours or a
view the Hugging Face adapter builds over a transformers model:

    activation    a name in moewidgets.nn.activations.ACTIVATIONS ("gelu" | "relu" | "swiglu")
    plain bank:   w_in_EFD, b_in_EF, w_out_EDF, b_out_ED      E_e(x) = W_out[e] φ(W_in[e] x + b_in[e]) + b_out[e]
    gated bank:   w_gate_EFD, w_up_EFD, w_out_EDF             E_e(x) = W_out[e] (φ(W_gate[e] x) ⊙ W_up[e] x)

The contract is code: :class:`ExpertBank` and :func:`bank_weights`; the forwards are the pure functions of
:mod:`moewidgets.nn.functional`, which the seed groups of :mod:`moewidgets.multiseed` call too.

A dense FFN of hidden width M is a bank with E = 1 and F = M, so the same geometry applies to dense baselines.
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F_
from torch import nn

from . import functional as fn
from . import activations as acts
from .functional import ragged_expert_outputs

__all__ = ["ExpertBank", "bank_weights", "PlainExperts", "GatedExperts", "GELUExperts", "ReLUExperts",
           "SwiGLUExperts", "make_experts", "fan_in_uniform_", "ragged_available", "ragged_expert_outputs"]


def fan_in_uniform_(t: torch.Tensor, fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    """PyTorch's ``nn.Linear`` default init, U(-1/√fan_in, 1/√fan_in), drawn from ``generator``."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=generator)
    return t


def ragged_available(device: str | torch.device, d_model: int, d_hidden: int,
                     dtype: torch.dtype = torch.float32) -> bool:
    """Whether the unpadded ("ragged") gather path can run: ``torch.nn.functional.grouped_mm`` exists, the device
    is a CPU (on CUDA it wants bfloat16), the dtype float32, and rows are 16-byte multiples (D, F multiples of 4).

    >>> ragged_available("cpu", d_model=6, d_hidden=16)
    False

    Chapter 1 (book/chapter1.ipynb).
    """
    return (hasattr(F_, "grouped_mm") and torch.device(device).type == "cpu" and dtype == torch.float32
            and d_model % 4 == 0 and d_hidden % 4 == 0)


@runtime_checkable
class ExpertBank(Protocol):
    """The expert-bank contract (design card): what geometry code, the MPI router and the seed groups read.

    ``activation`` names an entry of ``moewidgets.nn.activations.ACTIVATIONS``; the bank holds that entry's
    weights (``Activation.weights``) as attributes with the leading expert axis E. Our banks and the views the
    Hugging Face adapter builds over a transformers model (``moewidgets.geometry.alignment``) both satisfy it; read
    the weights through :func:`bank_weights`.
    """

    activation: str


def bank_weights(bank, detach: bool = False) -> dict[str, torch.Tensor]:
    """A bank's weights by their contract names, in the table's order (``w_in_EFD, b_in_EF, w_out_EDF, b_out_ED``
    plain; ``w_gate_EFD, w_up_EFD, w_out_EDF`` gated); ValueError naming what is missing.

    >>> sorted(bank_weights(ReLUExperts(2, 4, 8)))
    ['b_in_EF', 'b_out_ED', 'w_in_EFD', 'w_out_EDF']
    """
    act = acts.activation(getattr(bank, "activation", None))
    out = {}
    for name in act.weights:
        w = getattr(bank, name, None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"experts.{name} is missing (got {type(w).__name__}); a {act.name!r} bank must expose "
                             f"{', '.join(act.weights)}")
        out[name] = w.detach() if detach else w
    return out


class _Bank(nn.Module):
    """Methods every bank shares: the forwards of :mod:`moewidgets.nn.functional` on the bank's own weights."""

    activation: str

    def weights(self) -> dict[str, torch.Tensor]:
        """The bank's weights by name: its own parameter dict (registered in the table's order, the names of
        :func:`bank_weights`; no copy, since this runs in every forward)."""
        return self._parameters

    def all_outputs(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, (T, E, D). The dense-dispatch path and the oracles use it."""
        return fn.expert_all_outputs(self.activation, self.weights(), x_TD)

    def grouped_outputs(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Expert e on its own (padded) token group: x_ECD (E, C, D) → (E, C, D). The gather-dispatch path."""
        return fn.expert_grouped_outputs(self.activation, self.weights(), x_ECD)

    def ragged_outputs(self, x_PD: torch.Tensor, e_sorted_P: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """Slots sorted by expert through their experts, no padding (:func:`ragged_expert_outputs`), (P, D)."""
        return fn.ragged_expert_outputs(self.activation, self.weights(), x_PD, e_sorted_P, offs_E)

    def expert_output(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on tokens x_TD, (T, D): the slow, obvious version the tests compare against."""
        return fn.expert_output(self.activation, self.weights(), e, x_TD)


class PlainExperts(_Bank):
    """E two-layer experts ``E_e(x) = W_out[e] φ(W_in[e] x + b_in[e]) + b_out[e]`` with φ = ``activation``
    (a plain entry of ``moewidgets.nn.activations.ACTIVATIONS``: "gelu", "relu").

    Parameters: ``w_in_EFD`` (E, F, D), ``b_in_EF`` (E, F), ``w_out_EDF`` (E, D, F), ``b_out_ED`` (E, D).

    >>> bank = PlainExperts(4, 8, 16, generator=torch.Generator().manual_seed(0), activation="relu")
    >>> bank.all_outputs(torch.zeros(3, 8)).shape    # (T, E, D)
    torch.Size([3, 4, 8])
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, activation: str = "gelu"):
        super().__init__()
        if acts.activation(activation).gated:
            raise ValueError(f"activation={activation!r} is a gated (GLU) activation; use GatedExperts")
        self.activation = activation
        E, D, F = n_experts, d_model, d_hidden
        self.n_experts, self.d_model, self.d_hidden = E, D, F
        self.w_in_EFD = nn.Parameter(fan_in_uniform_(torch.empty(E, F, D, dtype=dtype), D, generator))
        self.b_in_EF = nn.Parameter(fan_in_uniform_(torch.empty(E, F, dtype=dtype), D, generator))
        self.w_out_EDF = nn.Parameter(fan_in_uniform_(torch.empty(E, D, F, dtype=dtype), F, generator))
        self.b_out_ED = nn.Parameter(fan_in_uniform_(torch.empty(E, D, dtype=dtype), F, generator))

    def hidden(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Pre-activations of every expert for every token, (T, E, F)."""
        return torch.einsum("td,efd->tef", x_TD, self.w_in_EFD) + self.b_in_EF


class GatedExperts(_Bank):
    """E gated (GLU) experts ``E_e(x) = W_out[e] (φ(W_gate[e] x) ⊙ W_up[e] x)``, φ = silu for "swiglu" (Mixtral,
    Qwen-MoE, OLMoE).

    Parameters: ``w_gate_EFD`` (E, F, D), ``w_up_EFD`` (E, F, D), ``w_out_EDF`` (E, D, F); no biases.
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, activation: str = "swiglu"):
        super().__init__()
        if not acts.activation(activation).gated:
            raise ValueError(f"activation={activation!r} is not a gated (GLU) activation; use PlainExperts")
        self.activation = activation
        E, D, F = n_experts, d_model, d_hidden
        self.n_experts, self.d_model, self.d_hidden = E, D, F
        self.w_gate_EFD = nn.Parameter(fan_in_uniform_(torch.empty(E, F, D, dtype=dtype), D, generator))
        self.w_up_EFD = nn.Parameter(fan_in_uniform_(torch.empty(E, F, D, dtype=dtype), D, generator))
        self.w_out_EDF = nn.Parameter(fan_in_uniform_(torch.empty(E, D, F, dtype=dtype), F, generator))


class GELUExperts(PlainExperts):
    """E two-layer GELU experts, ``E_e(x) = W_out[e] gelu(W_in[e] x + b_in[e]) + b_out[e]`` (paper 1, chapter 1).

    >>> bank = GELUExperts(n_experts=4, d_model=8, d_hidden=16, generator=torch.Generator().manual_seed(0))
    >>> bank.all_outputs(torch.zeros(3, 8)).shape    # (T, E, D)
    torch.Size([3, 4, 8])
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(n_experts, d_model, d_hidden, generator, dtype, "gelu")


class ReLUExperts(PlainExperts):
    """E two-layer ReLU experts, ``E_e(x) = W_out[e] relu(W_in[e] x + b_in[e]) + b_out[e]``."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(n_experts, d_model, d_hidden, generator, dtype, "relu")


class SwiGLUExperts(GatedExperts):
    """E SwiGLU experts, ``E_e(x) = W_out[e] (silu(W_gate[e] x) ⊙ W_up[e] x)`` (Mixtral, Qwen-MoE, OLMoE)."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(n_experts, d_model, d_hidden, generator, dtype, "swiglu")


def make_experts(kind: str, n_experts: int, d_model: int, d_hidden: int,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The expert bank named by ``MoEConfig.expert`` (an entry of ``moewidgets.nn.activations.ACTIVATIONS``).

    >>> make_experts("relu", 2, 4, 8).activation
    'relu'
    """
    if kind not in acts.ACTIVATIONS:
        raise ValueError(f"expert={kind!r} must be one of {', '.join(repr(a) for a in acts.ACTIVATIONS)}")
    cls = GatedExperts if acts.activation(kind).gated else PlainExperts
    return cls(n_experts, d_model, d_hidden, generator, dtype, kind)
