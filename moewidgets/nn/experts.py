"""Expert banks: all experts' weights stacked along a leading expert axis.

Shape legend (used in every MoE file):
    T tokens, D model width, F hidden width of one expert, E experts, K top-k, N probe points.

The bank naming is a contract (``design.md``): geometry code reads these attributes from *any* bank, ours or a
view the Hugging Face adapter builds over a transformers model:

    activation    "gelu" | "swiglu"
    GELU bank:    w_in_EFD, b_in_EF, w_out_EDF, b_out_ED      E_e(x) = W_out[e] φ(W_in[e] x + b_in[e]) + b_out[e]
    SwiGLU bank:  w_gate_EFD, w_up_EFD, w_out_EDF             E_e(x) = W_out[e] (silu(W_gate[e] x) ⊙ W_up[e] x)

A dense FFN of hidden width M is a bank with E = 1 and F = M, so the same geometry applies to dense baselines.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from torch import nn

__all__ = ["GELUExperts", "SwiGLUExperts", "make_experts", "fan_in_uniform_", "ragged_available",
           "ragged_expert_outputs"]


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


def ragged_expert_outputs(activation: str, w: dict[str, torch.Tensor], x_PD: torch.Tensor, e_sorted_P: torch.Tensor,
                          offs_E: torch.Tensor) -> torch.Tensor:
    """Slots sorted by expert through their experts with no padding, (P, D) → (P, D).

    ``w``: a bank's weights by their names (``w_in_EFD`` … for "gelu", ``w_gate_EFD`` … for "swiglu");
    ``e_sorted_P``: each slot's expert (non-decreasing); ``offs_E``: int32 end offset of each expert's rows.
    One ``torch.nn.functional.grouped_mm`` per projection over the jagged groups; biases are gathered per slot
    (grouped_mm's own bias gets no gradient). Same sum as padding every group to the largest and one ``bmm``,
    without the padding's copies and wasted rows. Measured once against the padded path in ``bench.layer``'s
    harness (SwiGLU layer forward + backward, 1 thread, 2-core CPU): the speed-up over ``MixtralSparseMoeBlock``
    went from 0.81–1.57× padded to 1.01–1.97× unpadded over six shapes (T = 512, 2048; D = 32, 64; E = 4, 8).
    """
    gmm = F_.grouped_mm
    if activation == "gelu":
        h_PF = gmm(x_PD, w["w_in_EFD"].transpose(1, 2), offs=offs_E) + w["b_in_EF"].index_select(0, e_sorted_P)
        return (gmm(F_.gelu(h_PF), w["w_out_EDF"].transpose(1, 2), offs=offs_E)
                + w["b_out_ED"].index_select(0, e_sorted_P))
    g_PF = gmm(x_PD, w["w_gate_EFD"].transpose(1, 2), offs=offs_E)
    u_PF = gmm(x_PD, w["w_up_EFD"].transpose(1, 2), offs=offs_E)
    return gmm(F_.silu(g_PF) * u_PF, w["w_out_EDF"].transpose(1, 2), offs=offs_E)


class GELUExperts(nn.Module):
    """E two-layer GELU experts, ``E_e(x) = W_out[e] gelu(W_in[e] x + b_in[e]) + b_out[e]`` (paper 1, chapter 1).

    Parameters: ``w_in_EFD`` (E, F, D), ``b_in_EF`` (E, F), ``w_out_EDF`` (E, D, F), ``b_out_ED`` (E, D).

    >>> bank = GELUExperts(n_experts=4, d_model=8, d_hidden=16, generator=torch.Generator().manual_seed(0))
    >>> bank.all_outputs(torch.zeros(3, 8)).shape    # (T, E, D)
    torch.Size([3, 4, 8])
    """

    activation = "gelu"

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        E, D, F = n_experts, d_model, d_hidden
        self.n_experts, self.d_model, self.d_hidden = E, D, F
        self.w_in_EFD = nn.Parameter(fan_in_uniform_(torch.empty(E, F, D, dtype=dtype), D, generator))
        self.b_in_EF = nn.Parameter(fan_in_uniform_(torch.empty(E, F, dtype=dtype), D, generator))
        self.w_out_EDF = nn.Parameter(fan_in_uniform_(torch.empty(E, D, F, dtype=dtype), F, generator))
        self.b_out_ED = nn.Parameter(fan_in_uniform_(torch.empty(E, D, dtype=dtype), F, generator))

    def hidden(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Pre-activations of every expert for every token, (T, E, F)."""
        return torch.einsum("td,efd->tef", x_TD, self.w_in_EFD) + self.b_in_EF

    def all_outputs(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, (T, E, D). The dense-dispatch path and the oracles use it."""
        a_TEF = F_.gelu(self.hidden(x_TD))
        return torch.einsum("tef,edf->ted", a_TEF, self.w_out_EDF) + self.b_out_ED

    def grouped_outputs(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Expert e on its own token group: x_ECD (E, C, D) → (E, C, D). The gather-dispatch path uses it."""
        h_ECF = torch.baddbmm(self.b_in_EF.unsqueeze(1), x_ECD, self.w_in_EFD.transpose(1, 2))
        return torch.baddbmm(self.b_out_ED.unsqueeze(1), F_.gelu(h_ECF), self.w_out_EDF.transpose(1, 2))

    def ragged_outputs(self, x_PD: torch.Tensor, e_sorted_P: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """Slots sorted by expert through their experts, no padding (:func:`ragged_expert_outputs`), (P, D)."""
        return ragged_expert_outputs("gelu", {"w_in_EFD": self.w_in_EFD, "b_in_EF": self.b_in_EF,
                                              "w_out_EDF": self.w_out_EDF, "b_out_ED": self.b_out_ED},
                                     x_PD, e_sorted_P, offs_E)

    def expert_output(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on tokens x_TD, (T, D): the slow, obvious version the tests compare against."""
        h_TF = x_TD @ self.w_in_EFD[e].T + self.b_in_EF[e]
        return F_.gelu(h_TF) @ self.w_out_EDF[e].T + self.b_out_ED[e]


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts, ``E_e(x) = W_out[e] (silu(W_gate[e] x) ⊙ W_up[e] x)`` (Mixtral, Qwen-MoE, OLMoE).

    Parameters: ``w_gate_EFD`` (E, F, D), ``w_up_EFD`` (E, F, D), ``w_out_EDF`` (E, D, F); no biases.
    """

    activation = "swiglu"

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        E, D, F = n_experts, d_model, d_hidden
        self.n_experts, self.d_model, self.d_hidden = E, D, F
        self.w_gate_EFD = nn.Parameter(fan_in_uniform_(torch.empty(E, F, D, dtype=dtype), D, generator))
        self.w_up_EFD = nn.Parameter(fan_in_uniform_(torch.empty(E, F, D, dtype=dtype), D, generator))
        self.w_out_EDF = nn.Parameter(fan_in_uniform_(torch.empty(E, D, F, dtype=dtype), F, generator))

    def all_outputs(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, (T, E, D)."""
        g_TEF = torch.einsum("td,efd->tef", x_TD, self.w_gate_EFD)
        u_TEF = torch.einsum("td,efd->tef", x_TD, self.w_up_EFD)
        return torch.einsum("tef,edf->ted", F_.silu(g_TEF) * u_TEF, self.w_out_EDF)

    def grouped_outputs(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Expert e on its own token group: x_ECD (E, C, D) → (E, C, D)."""
        g_ECF = torch.bmm(x_ECD, self.w_gate_EFD.transpose(1, 2))
        u_ECF = torch.bmm(x_ECD, self.w_up_EFD.transpose(1, 2))
        return torch.bmm(F_.silu(g_ECF) * u_ECF, self.w_out_EDF.transpose(1, 2))

    def ragged_outputs(self, x_PD: torch.Tensor, e_sorted_P: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """Slots sorted by expert through their experts, no padding (:func:`ragged_expert_outputs`), (P, D)."""
        return ragged_expert_outputs("swiglu", {"w_gate_EFD": self.w_gate_EFD, "w_up_EFD": self.w_up_EFD,
                                                "w_out_EDF": self.w_out_EDF}, x_PD, e_sorted_P, offs_E)

    def expert_output(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on tokens x_TD, (T, D)."""
        return (F_.silu(x_TD @ self.w_gate_EFD[e].T) * (x_TD @ self.w_up_EFD[e].T)) @ self.w_out_EDF[e].T


def make_experts(kind: str, n_experts: int, d_model: int, d_hidden: int,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The expert bank named by ``MoEConfig.expert`` ("gelu" | "swiglu")."""
    if kind == "gelu":
        return GELUExperts(n_experts, d_model, d_hidden, generator, dtype)
    if kind == "swiglu":
        return SwiGLUExperts(n_experts, d_model, d_hidden, generator, dtype)
    raise ValueError(f"expert={kind!r} must be one of 'gelu', 'swiglu'")
