"""Cross-expert Jacobian alignment with its references (random null, split-half ceiling, dense pseudo-experts).

Shape legend: N points, D model width (D_out × D_in Jacobians), F hidden width, E experts, P pairs.

Primary metric (paper-1 spec §1.4f, paper-2 spec §2.4b): Frobenius cosines of routing-weighted mean Jacobians::

    J̄_i  = Σ_n w_ni J_i(x_n) / Σ_n w_ni
    A_ij = ⟨J̄_i, J̄_j⟩_F / (‖J̄_i‖_F ‖J̄_j‖_F),   ⟨A, B⟩_F = tr(AᵀB)

summarised by mean_{i<j} |A_ij| (also the signed mean and max |A_ij|). Every "low" needs its references:

* random null: for independent iid matrices of size p×q, cos_F ≈ N(0, 1/(pq)), so SD = 1/√(pq) and
  E|cos_F| ≈ √(2/π)/√(pq); we also measure it (``null_level``) on Gaussian pairs from a seeded generator;
* ceiling: the same expert against itself, J̄_i on two random disjoint halves of its routed points;
* dense pseudo-experts: the dense FFN's hidden units split into E random groups (:func:`dense_pseudo_experts`),
  the fair matched-capacity comparator.

Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..nn.activations import activation as _activation
from .jacobians import bank_tensors as _bank_tensors, expert_outputs, mean_expert_jacobians
from .jacobians import expert_jacobians  # noqa: F401  (the docstring examples use it)

__all__ = ["JacobianAlignment", "jacobian_alignment", "bank_jacobian_alignment", "frobenius_cosine",
           "dense_pseudo_experts", "GELUBankView", "SwiGLUBankView", "make_generator"]

_EXPLICIT_NULL_ELEMENTS = 1 << 23   # above this many Gaussian draws, use the exact one-dimensional representation


def make_generator(generator: torch.Generator | int | None, default_seed: int = 0) -> torch.Generator:
    """A ``torch.Generator``: the one given, one seeded with the given int, or one seeded with ``default_seed``
    (never the global RNG).

    >>> torch.rand(2, generator=make_generator(3)).tolist() == torch.rand(2, generator=make_generator(3)).tolist()
    True

    Chapter 1 (book/chapter1.ipynb).
    """
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        return torch.Generator().manual_seed(default_seed)
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise ValueError(f"generator={generator!r} must be a torch.Generator, an int seed or None")


def frobenius_cosine(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Frobenius cosine ``⟨A, B⟩_F / (‖A‖_F ‖B‖_F)`` over the last two dims (broadcast over leading dims).

    NaN where either matrix is zero.

    >>> I = torch.eye(3, dtype=torch.float64)
    >>> float(frobenius_cosine(I, 5 * I)), float(frobenius_cosine(I, torch.ones(3, 3) - I))
    (1.0, 0.0)

    Chapter 1 (book/chapter1.ipynb).
    """
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must be (..., D_out, D_in) matrices")
    dot = (A * B).sum((-2, -1))
    den = torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B)
    return torch.where(den > 0, dot / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.full_like(dot, math.nan))


@dataclass
class JacobianAlignment:
    """Cross-expert alignment of routing-weighted mean Jacobians, with references (module docstring).

    Fields::

        matrix:            (E, E) A_ij = cos_F(J̄_i, J̄_j); NaN rows/columns for dead experts.
        mean_abs_offdiag:  mean over live pairs i<j of |A_ij| (NaN with fewer than 2 live experts).
        signed_mean:       mean over live pairs i<j of A_ij.
        max_abs:           max over live pairs i<j of |A_ij|.
        null_sd:           1/√(D_out·D_in), the SD of cos_F between iid random matrices.
        null_level:        measured mean |cos_F| between independent Gaussian matrices of the same shape
                           (≈ √(2/π)·null_sd); compare ``mean_abs_offdiag`` with it.
        ceiling:           mean over eligible experts of cos_F(J̄_i^(a), J̄_i^(b)) on two random halves of the
                           expert's routed points (NaN if no expert has ≥ 2·min_points routed points).
        ceiling_per_expert: (E,) the split-half cosine per expert (NaN where not eligible).
        mean_jacobians:    (E, D_out, D_in) J̄_i (NaN for dead experts).
        dead:              (E,) bool, experts with zero total weight.
        n_routed:          (E,) points with weight > 0.
        n_null_pairs:      how many Gaussian pairs ``null_level`` averages.
    """

    matrix: torch.Tensor
    mean_abs_offdiag: float
    signed_mean: float
    max_abs: float
    null_sd: float
    null_level: float
    ceiling: float
    ceiling_per_expert: torch.Tensor
    mean_jacobians: torch.Tensor
    dead: torch.Tensor
    n_routed: torch.Tensor
    n_null_pairs: int = field(default=200)


def _null_level(p: int, q: int, n_pairs: int, g: torch.Generator, dtype: torch.dtype) -> float:
    """Mean |cos_F| between independent Gaussian p×q matrices. Explicit pairs when small; otherwise the exact
    one-dimensional representation cos = z / √(z² + χ²_{pq−1}) (rotation invariance), drawn from a numpy
    generator seeded from ``g``."""
    if 2 * n_pairs * p * q <= _EXPLICIT_NULL_ELEMENTS:
        A = torch.randn(n_pairs, p, q, generator=g, dtype=dtype)
        B = torch.randn(n_pairs, p, q, generator=g, dtype=dtype)
        return float(frobenius_cosine(A, B).abs().mean())
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
    z = rng.standard_normal(n_pairs)
    rest = rng.chisquare(p * q - 1, n_pairs)
    return float(np.mean(np.abs(z / np.sqrt(z * z + rest))))


def _check_common(weights_NE, min_points, n_null_pairs):
    if not isinstance(weights_NE, torch.Tensor) or weights_NE.dim() != 2:
        raise ValueError("weights_NE must be a 2-d tensor (N, E)")
    if isinstance(min_points, bool) or not isinstance(min_points, int) or min_points < 1:
        raise ValueError(f"min_points={min_points!r} must be a positive integer")
    if isinstance(n_null_pairs, bool) or not isinstance(n_null_pairs, int) or n_null_pairs < 1:
        raise ValueError(f"n_null_pairs={n_null_pairs!r} must be a positive integer")


def _alignment(means_fn, w_NE: torch.Tensor, shape: tuple[int, int], g: torch.Generator, min_points: int,
               n_null_pairs: int) -> JacobianAlignment:
    """Shared core: ``means_fn(weights_SNE) -> (S, E, p, q)`` gives weighted mean Jacobians for S weightings."""
    if not torch.isfinite(w_NE).all() or (w_NE < 0).any():
        raise ValueError("weights_NE must be finite and >= 0")
    N, E = w_NE.shape
    p, q = shape
    device = w_NE.device
    # split-half ceiling: random ranks of each expert's routed points; first half (a) vs the rest (b)
    routed_NE = w_NE > 0
    n_E = routed_NE.sum(0)
    keys_NE = torch.rand(N, E, generator=g, dtype=torch.float64).to(device)
    keys_NE = torch.where(routed_NE, keys_NE, torch.full_like(keys_NE, math.inf))
    order_NE = torch.argsort(keys_NE, dim=0)
    rank_NE = torch.empty_like(order_NE).scatter_(0, order_NE, torch.arange(N, device=device)[:, None].expand(N, E))
    in_a = routed_NE & (rank_NE < (n_E // 2)[None, :])
    in_b = routed_NE & ~in_a
    Jbar_SEPQ = means_fn(torch.stack([w_NE, w_NE * in_a, w_NE * in_b]))
    Jbar_EDD = Jbar_SEPQ[0]
    dead_E = ~(w_NE.sum(0) > 0)

    flat_EP = Jbar_EDD.reshape(E, -1)
    norms_E = flat_EP.norm(dim=-1)
    ok_E = norms_E > 0                                  # NaN norms (dead experts) compare False
    unit_EP = torch.where(ok_E[:, None], flat_EP / torch.where(ok_E, norms_E, torch.ones_like(norms_E))[:, None],
                          torch.zeros_like(flat_EP))
    A_EE = unit_EP @ unit_EP.T
    A_EE = torch.where(ok_E[:, None] & ok_E[None, :], A_EE, torch.full_like(A_EE, math.nan))
    iu = torch.triu_indices(E, E, offset=1, device=device)
    pairs = A_EE[iu[0], iu[1]]
    pairs = pairs[~torch.isnan(pairs)]
    if pairs.numel():
        mean_abs, signed, mx = float(pairs.abs().mean()), float(pairs.mean()), float(pairs.abs().max())
    else:
        mean_abs = signed = mx = math.nan

    ceil_E = frobenius_cosine(Jbar_SEPQ[1], Jbar_SEPQ[2])
    eligible = n_E >= 2 * min_points
    ceil_E = torch.where(eligible, ceil_E, torch.full_like(ceil_E, math.nan))
    okc = ~torch.isnan(ceil_E)
    ceiling = float(ceil_E[okc].mean()) if bool(okc.any()) else math.nan

    null_level = _null_level(p, q, n_null_pairs, g, w_NE.dtype)
    return JacobianAlignment(matrix=A_EE, mean_abs_offdiag=mean_abs, signed_mean=signed, max_abs=mx,
                             null_sd=1.0 / math.sqrt(p * q), null_level=null_level, ceiling=ceiling,
                             ceiling_per_expert=ceil_E, mean_jacobians=Jbar_EDD, dead=dead_E, n_routed=n_E,
                             n_null_pairs=n_null_pairs)


def jacobian_alignment(J_ENDD: torch.Tensor, weights_NE: torch.Tensor, *,
                       generator: torch.Generator | int | None = None, min_points: int = 8,
                       n_null_pairs: int = 200) -> JacobianAlignment:
    """Frobenius-cosine alignment matrix of routing-weighted mean Jacobians, with null and ceiling.

    ``J̄_i = Σ_n w_ni J_i(x_n) / Σ_n w_ni``, ``A_ij = ⟨J̄_i, J̄_j⟩_F / (‖J̄_i‖ ‖J̄_j‖)``; ceiling: for each expert
    with ≥ 2·min_points routed points (w > 0), its routed points are split into two random halves and
    cos_F(J̄_i^(a), J̄_i^(b)) is taken; the ceiling averages it over those experts. ``generator`` (or an int
    seed; None = seed 0) drives the split and the Gaussian null pairs. See :func:`bank_jacobian_alignment` for
    the same numbers straight from a bank, without per-point Jacobians.

    Args:
        J_ENDD: (E, N, D_out, D_in) expert Jacobians at the probe points.
        weights_NE: (N, E) routing weights (``trace.gate_matrix()`` or ``trace.membership()``).

    >>> g = torch.Generator().manual_seed(0)
    >>> J = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64).expand(3, 40, 4, 4)   # constant in x
    >>> res = jacobian_alignment(J, torch.ones(40, 3, dtype=torch.float64), min_points=4)
    >>> res.matrix.shape, round(res.ceiling, 12), res.null_sd
    (torch.Size([3, 3]), 1.0, 0.25)

    Chapter 1 (book/chapter1.ipynb).
    """
    _check_common(weights_NE, min_points, n_null_pairs)
    N, E = weights_NE.shape
    if not isinstance(J_ENDD, torch.Tensor) or J_ENDD.dim() != 4 or tuple(J_ENDD.shape[:2]) != (E, N):
        raise ValueError(f"J_ENDD must be (E={E}, N={N}, D_out, D_in) to match weights_NE (N, E); got "
                         f"{tuple(J_ENDD.shape) if isinstance(J_ENDD, torch.Tensor) else J_ENDD!r}")
    dtype = torch.promote_types(J_ENDD.dtype, weights_NE.dtype) if weights_NE.is_floating_point() \
        else J_ENDD.dtype
    J = J_ENDD.to(dtype)
    w_NE = weights_NE.to(device=J.device, dtype=dtype)

    def means(w_SNE: torch.Tensor) -> torch.Tensor:
        W_SE = w_SNE.sum(1)
        tot = torch.einsum("sne,enab->seab", w_SNE, J)
        out = tot / torch.where(W_SE > 0, W_SE, torch.ones_like(W_SE))[..., None, None]
        return torch.where((W_SE > 0)[..., None, None], out, torch.full_like(out, math.nan))

    return _alignment(means, w_NE, tuple(J.shape[-2:]), make_generator(generator), min_points, n_null_pairs)


def bank_jacobian_alignment(experts, X_ND: torch.Tensor, weights_NE: torch.Tensor, *,
                            generator: torch.Generator | int | None = None, min_points: int = 8,
                            n_null_pairs: int = 200) -> JacobianAlignment:
    """:func:`jacobian_alignment` computed from the bank and the points, never forming per-point Jacobians.

    The mean Jacobians come in closed form (:func:`~moewidgets.geometry.mean_expert_jacobians`), so this costs
    O(N·E·F + E·F·D²) and works at Mixtral sizes. Same numbers (and the same random split for the same
    generator) as ``jacobian_alignment(expert_jacobians(experts, X_ND), weights_NE)``.

    >>> from moewidgets.nn.experts import GELUExperts
    >>> bank = GELUExperts(4, 8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> X = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    >>> w = torch.rand(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    >>> a = bank_jacobian_alignment(bank, X, w, generator=3)
    >>> b = jacobian_alignment(expert_jacobians(bank, X), w, generator=3)
    >>> torch.allclose(a.matrix, b.matrix), abs(a.ceiling - b.ceiling) < 1e-12
    (True, True)

    Chapter 1 (book/chapter1.ipynb).
    """
    _check_common(weights_NE, min_points, n_null_pairs)
    _, ws = _bank_tensors(experts)
    D_out, D_in = int(ws[2].shape[1]), int(ws[0].shape[2])
    dtype = torch.promote_types(torch.promote_types(X_ND.dtype, ws[0].dtype), torch.float32)
    if weights_NE.is_floating_point():
        dtype = torch.promote_types(dtype, weights_NE.dtype)
    w_NE = weights_NE.to(device=ws[0].device, dtype=dtype)
    X = X_ND.to(dtype)
    return _alignment(lambda w_SNE: mean_expert_jacobians(experts, X, w_SNE), w_NE, (D_out, D_in),
                      make_generator(generator), min_points, n_null_pairs)


class _BankViewMixin:
    """Shape properties and output methods shared by the bank views (they hold only contract tensors)."""

    @property
    def n_experts(self) -> int:
        return int(self.w_out_EDF.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.w_out_EDF.shape[1])

    @property
    def d_hidden(self) -> int:
        return int(self.w_out_EDF.shape[2])

    def all_outputs(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, (T, E, D) (as the real banks)."""
        return expert_outputs(self, x_TD).transpose(0, 1)

    def expert_output(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on tokens x_TD, (T, D)."""
        return expert_outputs(self, x_TD, experts_idx=[e])[0]


@dataclass
class GELUBankView(_BankViewMixin):
    """A GELU expert bank as plain tensors (the contract's names): ``E_e(x) = W_out gelu(W_in x + b_in) + b_out``.

    ``groups_EF`` (optional): which hidden unit of a source layer each row came from (−1 = zero padding).
    """

    w_in_EFD: torch.Tensor
    b_in_EF: torch.Tensor
    w_out_EDF: torch.Tensor
    b_out_ED: torch.Tensor
    groups_EF: torch.Tensor | None = None
    activation: str = "gelu"


@dataclass
class SwiGLUBankView(_BankViewMixin):
    """A SwiGLU expert bank as plain tensors: ``E_e(x) = W_out (silu(W_gate x) ⊙ W_up x)``."""

    w_gate_EFD: torch.Tensor
    w_up_EFD: torch.Tensor
    w_out_EDF: torch.Tensor
    groups_EF: torch.Tensor | None = None
    activation: str = "swiglu"


def dense_pseudo_experts(dense_bank, n_groups: int, generator: torch.Generator | int | None = None
                         ) -> GELUBankView | SwiGLUBankView:
    """Split a dense FFN's M hidden units into ``n_groups`` random disjoint groups: a bank view of pseudo-experts.

    ``J_G(x) = V2[:, G] diag(φ'(V1 x + c1)_G) V1[G, :]`` (paper-1 spec §1.4f), the fair matched-capacity
    comparator for cross-expert alignment. Each group has ⌈M/n_groups⌉ rows; when n_groups does not divide M,
    the short groups are padded with zero units (which contribute nothing). The output bias is split evenly
    (c2 / n_groups each), so the pseudo-experts' outputs and Jacobians sum exactly to the dense ones.

    Args:
        dense_bank: a one-expert bank (or a layer with such ``.experts``), GELU or SwiGLU.
        n_groups: number of pseudo-experts (1..M).
        generator: a torch.Generator or int seed for the random split (None = seed 0).

    >>> from moewidgets.nn.experts import GELUExperts
    >>> from moewidgets.geometry.jacobians import expert_jacobians
    >>> dense = GELUExperts(1, 4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> pseudo = dense_pseudo_experts(dense, 3, generator=1)
    >>> X = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    >>> pseudo.w_in_EFD.shape, torch.allclose(expert_jacobians(pseudo, X).sum(0), expert_jacobians(dense, X)[0])
    (torch.Size([3, 4, 4]), True)

    Chapter 1 (book/chapter1.ipynb).
    """
    bank = dense_bank
    if not hasattr(bank, "activation") and hasattr(bank, "experts"):
        bank = bank.experts
    act, ws = _bank_tensors(bank)
    if ws[0].shape[0] != 1:
        raise ValueError(f"dense_bank must be a one-expert bank (a dense FFN); got n_experts={ws[0].shape[0]}")
    M = int(ws[2].shape[2])
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or not 1 <= n_groups <= M:
        raise ValueError(f"n_groups={n_groups!r} must be an integer in 1..M={M} (the dense hidden width)")
    g = make_generator(generator)
    Fg = -(-M // n_groups)
    perm = torch.randperm(M, generator=g)
    groups_EF = torch.full((n_groups * Fg,), -1, dtype=torch.long)
    # deal the permuted units round-robin so group sizes differ by at most one; pads (-1) go last in a group
    slots = torch.arange(M)
    groups_EF[(slots % n_groups) * Fg + slots // n_groups] = perm
    groups_EF = groups_EF.reshape(n_groups, Fg)
    valid = groups_EF >= 0
    safe = groups_EF.clamp_min(0).to(ws[0].device)
    valid_d = valid.to(ws[0].device)

    def rows(w_FD: torch.Tensor) -> torch.Tensor:        # (M, D) → (G, Fg, D), zero where padded
        return torch.where(valid_d[..., None], w_FD[safe], torch.zeros((), dtype=w_FD.dtype, device=w_FD.device))

    w_out_DM = ws[2][0]
    w_out = torch.where(valid_d[:, None, :], w_out_DM[:, safe].permute(1, 0, 2),
                        torch.zeros((), dtype=w_out_DM.dtype, device=w_out_DM.device))
    if not _activation(act).gated:
        w_in_MD, b_in_M, _, b_out_D = (w[0] for w in ws)
        b_in = torch.where(valid_d, b_in_M[safe], torch.zeros((), dtype=b_in_M.dtype, device=b_in_M.device))
        b_out = (b_out_D / n_groups).expand(n_groups, -1).clone()
        return GELUBankView(rows(w_in_MD), b_in, w_out, b_out, groups_EF, activation=act)
    w_gate_MD, w_up_MD = ws[0][0], ws[1][0]
    return SwiGLUBankView(rows(w_gate_MD), rows(w_up_MD), w_out, groups_EF)
