"""Paper 2's asymmetry: decorrelated expert functions on overlapping routed representations, and memory-lean
Jacobian inner products that make the functional side computable at Mixtral sizes.

Shape legend: N points (tokens), D model width (D_out × D_in Jacobians), F expert hidden width, E experts,
K top-k, C a chunk of hidden units, A the expert's terms (1 for GELU, 2 for SwiGLU).

Every expert Jacobian has the form (``moewidgets.geometry.jacobians``)::

    J(x) = O · Σ_a diag(λ_a(x)) S_a                      O = W_out (D_out × F), S_a (F × D_in)
    GELU:    S = [W_in],          λ = [gelu'(W_in x + b_in)]
    SwiGLU:  S = [W_gate, W_up],  λ = [silu'(g) ⊙ u, silu(g)],   g = W_gate x, u = W_up x

so a Frobenius inner product never needs a D×D matrix (paper-2 spec §2.4a)::

    ⟨J_i(x), J_j(y)⟩_F = tr(B_iᵀ O_iᵀ O_j B_j) = Σ_{a,b} λ_{i,a}(x)ᵀ [(O_iᵀ O_j) ∘ (S_{i,a} S_{j,b}ᵀ)] λ_{j,b}(y)

("hidden" path: F×F products, formed in C×C tiles, never held whole). Which side is cheaper depends on the
sizes: forming a mean Jacobian ``J̄ = O Σ_a diag(λ̄_a) S_a`` costs 2·D²·F, the hidden path about
2·F²·D·(1 + A²) per pair, so for mean Jacobians the D×D matrix (64 MiB at D = 4096) is the lean choice unless
F ≪ D; for per-token cosines over many tokens the hidden path wins (its F×F work is shared by all tokens).
``path="auto"`` picks by a FLOP estimate. Arithmetic is float32 at least, whatever the weights' dtype (bf16
weights are converted block by block, never as a whole expert).

Metrics (§2.4b, §2.4e):

* co-selected per-token cosine: ``cos_F(J_i(x), J_j(x))`` at the tokens where both i and j are selected,
  averaged into an E×E matrix;
* the asymmetry summary puts the functional side (alignment of routing-weighted mean Jacobians,
  :class:`~moewidgets.geometry.JacobianAlignment`) and the representational side (Grassmann
  distances, :class:`~moewidgets.geometry.SubspaceComparison`) on one scale: 0 at the unrelated
  reference (iid random matrices; Haar-random subspaces), 1 at the same-expert split-half reference.

Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F_

from .alignment import JacobianAlignment, bank_jacobian_alignment, make_generator
from ..nn.activations import activation as _activation
from .jacobians import bank_tensors as _bank_tensors
from .subspaces import (RoutedSubspaces, SubspaceComparison, compare_subspaces, routing_weights,
                        trace_subspaces)

__all__ = ["PairAlignment", "pair_alignment", "CoselectedCosine", "coselected_jacobian_cosine",
           "AsymmetrySummary", "asymmetry_summary", "LayerAsymmetry", "layer_asymmetry", "ALIGNMENT_PATHS"]

ALIGNMENT_PATHS = ("auto", "model", "hidden")
_COEFFICIENT_ELEMENTS = 1 << 27   # coefficients λ held at once on the hidden path (512 MiB in float32)
_JACOBIAN_ELEMENTS = 1 << 25      # per-token Jacobian elements held at once (128 MiB in float32): 2 tokens at D=4096


# -------------------------------------------------------------------------------------- expert decomposition

@dataclass
class _Expert:
    """One expert as J(x) = O Σ_a diag(λ_a(x)) S_a; tensors in the bank's dtype and device (views, no copies)."""

    activation: str
    out_DF: torch.Tensor          # O = W_out (D_out, F)
    terms: list                   # S_a (F, D_in)
    bias_F: torch.Tensor | None   # GELU b_in

    @property
    def hidden(self) -> int:
        return int(self.out_DF.shape[1])


def _expert(bank, e: int) -> _Expert:
    act, ws = _bank_tensors(bank)
    if not _activation(act).gated:
        w_in_EFD, b_in_EF, w_out_EDF, _ = ws
        return _Expert(act, w_out_EDF[e], [w_in_EFD[e]], b_in_EF[e])
    w_gate_EFD, w_up_EFD, w_out_EDF = ws
    return _Expert(act, w_out_EDF[e], [w_gate_EFD[e], w_up_EFD[e]], None)


def _slices(n: int, size: int) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _coefficients(ex: _Expert, X_ND: torch.Tensor, dtype: torch.dtype, token_chunk: int, hidden_chunk: int,
                  w_N: torch.Tensor | None = None) -> list:
    """λ_a(x_n) as (N, F) per term; with ``w_N`` the weighted means Σ_n w_n λ_a(x_n) / Σ_n w_n as (1, F).

    Weights are converted to ``dtype`` one block of hidden units at a time; activations live one
    (token_chunk, hidden_chunk) block at a time.
    """
    N, F = X_ND.shape[0], ex.hidden
    out = [X_ND.new_zeros(1 if w_N is not None else N, F) for _ in ex.terms]
    for c in _slices(F, hidden_chunk):
        S = [s[c].to(dtype) for s in ex.terms]                       # (C, D_in) each
        b = ex.bias_F[c].to(dtype) if ex.bias_F is not None else None
        for t in _slices(N, token_chunk):
            x = X_ND[t]
            act = _activation(ex.activation)
            if not act.gated:
                lam = [act.grad(x @ S[0].T + b)]
            else:
                g_nC, u_nC = x @ S[0].T, x @ S[1].T
                lam = [act.grad(g_nC) * u_nC, act.fn(g_nC)]
            for a, l_nC in enumerate(lam):
                if w_N is None:
                    out[a][t, c] = l_nC
                else:
                    out[a][0, c] += w_N[t] @ l_nC
    if w_N is not None:
        out = [o / w_N.sum() for o in out]
    return out


def _hidden_inner(ex_i: _Expert, lam_i: list, ex_j: _Expert, lam_j: list, dtype: torch.dtype,
                  tile: int) -> torch.Tensor:
    """(n,) ⟨J_i(x_n), J_j(y_n)⟩_F = Σ_ab λ_ia(x_n)ᵀ [(O_iᵀ O_j) ∘ (S_ia S_jbᵀ)] λ_jb(y_n), in C×C tiles."""
    n = lam_i[0].shape[0]
    acc = lam_i[0].new_zeros(n)
    for c1 in _slices(ex_i.hidden, tile):
        Oi = ex_i.out_DF[:, c1].to(dtype)                            # (D_out, C1)
        Si = [s[c1].to(dtype) for s in ex_i.terms]                   # (C1, D_in)
        for c2 in _slices(ex_j.hidden, tile):
            Oj = ex_j.out_DF[:, c2].to(dtype)
            Sj = [s[c2].to(dtype) for s in ex_j.terms]
            M = Oi.T @ Oj                                            # (C1, C2) block of O_iᵀ O_j
            for a, S_ia in enumerate(Si):
                for b, S_jb in enumerate(Sj):
                    Q = M * (S_ia @ S_jb.T)                          # (C1, C2)
                    acc += ((lam_i[a][:, c1] @ Q) * lam_j[b][:, c2]).sum(-1)
    return acc


def _model_jacobians(ex: _Expert, lam: list, dtype: torch.dtype, hidden_chunk: int) -> torch.Tensor:
    """(n, D_out, D_in) J(x_n) = O Σ_a diag(λ_a(x_n)) S_a, accumulated over blocks of hidden units."""
    n = lam[0].shape[0]
    D_out, D_in = ex.out_DF.shape[0], ex.terms[0].shape[1]
    J = lam[0].new_zeros(n, D_out, D_in)
    for c in _slices(ex.hidden, hidden_chunk):
        B_nCD = sum(l[:, c, None] * s[c].to(dtype) for l, s in zip(lam, ex.terms))   # (n, C, D_in)
        J += torch.matmul(ex.out_DF[:, c].to(dtype), B_nCD)
    return J


def _jacobian_chunk(token_chunk: int, elements_per_token: int) -> int:
    """Tokens per chunk when whole Jacobians are held: at most token_chunk, and ≤ _JACOBIAN_ELEMENTS elements."""
    return max(1, min(token_chunk, _JACOBIAN_ELEMENTS // max(1, elements_per_token)))


def _coefficient_chunk(elements_per_token: int) -> int:
    """Tokens whose coefficients λ (all terms, both experts or all slots) fit in _COEFFICIENT_ELEMENTS."""
    return max(1, _COEFFICIENT_ELEMENTS // max(1, elements_per_token))


def _flops(ex: _Expert, n: int) -> tuple[float, float]:
    """(model, hidden) FLOP estimates for the three inner products of one pair at n points."""
    D_out, D_in, F, A = ex.out_DF.shape[0], ex.terms[0].shape[1], ex.hidden, len(ex.terms)
    model = 2 * n * 2.0 * D_out * F * D_in + 3 * n * D_out * D_in
    hidden = 3 * (2.0 * F * F * D_out + A * A * (2.0 * F * F * D_in + 2.0 * n * F * F))
    return model, hidden


def _check_chunks(**chunks) -> None:
    for name, v in chunks.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")


def _compute_dtype(dtype, *dtypes) -> torch.dtype:
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype!r} must be torch.float32, torch.float64 or None (automatic)")
        return dtype
    out = torch.float32
    for d in dtypes:
        if d.is_floating_point:
            out = torch.promote_types(out, d)
    return out


def _check_bank_points(experts, X_ND) -> tuple[str, list]:
    act, ws = _bank_tensors(experts)
    D = int(ws[0].shape[-1])
    if not isinstance(X_ND, torch.Tensor) or X_ND.dim() != 2 or not X_ND.is_floating_point() or X_ND.shape[1] != D:
        shape = tuple(X_ND.shape) if isinstance(X_ND, torch.Tensor) else type(X_ND).__name__
        raise ValueError(f"X_ND={shape} must be a 2-d floating tensor (N, D={D})")
    return act, ws


# ---------------------------------------------------------------------------------------------- pair alignment

@dataclass
class PairAlignment:
    """Alignment of two experts' Jacobians, computed without per-expert D×D work where it does not pay.

    Fields::

        experts:        (i, j).
        cosine:         cos_F(J̄_i, J̄_j) of the routing-weighted mean Jacobians J̄_e = Σ_n w_ne J_e(x_n) / Σ_n w_ne.
        inner:          ⟨J̄_i, J̄_j⟩_F.
        norm_i, norm_j: ‖J̄_i‖_F, ‖J̄_j‖_F.
        weight_i, weight_j: Σ_n w_ni, Σ_n w_nj.
        path:           "model" (J̄ formed, D×D) or "hidden" (F×F tiles), for the mean Jacobians.
        token_path:     the same for the per-token cosines (None without per_token).
        dtype:          the arithmetic dtype ("float32" or "float64").
        token_index:    (P,) co-selected tokens (w_ni > 0 and w_nj > 0) when per_token, else None.
        token_cosine:   (P,) cos_F(J_i(x_n), J_j(x_n)) at those tokens, else None (NaN where a Jacobian is 0).
    """

    experts: tuple
    cosine: float
    inner: float
    norm_i: float
    norm_j: float
    weight_i: float
    weight_j: float
    path: str
    token_path: str | None
    dtype: str
    token_index: torch.Tensor | None = None
    token_cosine: torch.Tensor | None = None

    @property
    def token_cosine_mean_abs(self) -> float:
        """Mean absolute value of ``cos_F(J_i(x), J_j(x))`` over the co-selected tokens (NaN without any)."""
        if self.token_cosine is None:
            return math.nan
        c = self.token_cosine[~torch.isnan(self.token_cosine)]
        return float(c.abs().mean()) if c.numel() else math.nan


def _cosine(inner: torch.Tensor, sq_i: torch.Tensor, sq_j: torch.Tensor) -> torch.Tensor:
    den = (sq_i * sq_j).clamp_min(0).sqrt()
    return torch.where(den > 0, inner / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.full_like(inner, math.nan))


def _pair_inner(ex_i, lam_i, ex_j, lam_j, path, dtype, hidden_chunk, tile):
    """(inner, sq_i, sq_j), each (n,), on the chosen path."""
    if path == "model":
        Ji = _model_jacobians(ex_i, lam_i, dtype, hidden_chunk).flatten(1)
        Jj = _model_jacobians(ex_j, lam_j, dtype, hidden_chunk).flatten(1)
        return (Ji * Jj).sum(-1), (Ji * Ji).sum(-1), (Jj * Jj).sum(-1)
    return (_hidden_inner(ex_i, lam_i, ex_j, lam_j, dtype, tile), _hidden_inner(ex_i, lam_i, ex_i, lam_i, dtype, tile),
            _hidden_inner(ex_j, lam_j, ex_j, lam_j, dtype, tile))


def pair_alignment(experts, i: int, j: int, X_ND: torch.Tensor, weights_NE: torch.Tensor, *,
                   per_token: bool = False, dtype: torch.dtype | None = None, path: str = "auto",
                   token_chunk: int = 256, hidden_chunk: int = 2048) -> PairAlignment:
    """Frobenius cosine of two experts' routing-weighted mean Jacobians (and optionally per-token cosines), lean.

    ``J̄_e = O_e Σ_a diag(λ̄_ea) S_ea`` with ``λ̄_ea = Σ_n w_ne λ_ea(x_n) / Σ_n w_ne`` (closed form, module
    docstring), ``cos = ⟨J̄_i, J̄_j⟩_F / (‖J̄_i‖ ‖J̄_j‖)``; the same number as
    :func:`~moewidgets.geometry.bank_jacobian_alignment`'s ``matrix[i, j]``. With ``per_token=True``
    also ``cos_F(J_i(x_n), J_j(x_n))`` at the co-selected tokens (both weights > 0). Memory beyond the weights:
    O(token_chunk·hidden_chunk + N·F·A) for the coefficients, plus either two D×D matrices ("model") or a few
    hidden_chunk² tiles ("hidden"); weights are converted to the arithmetic dtype one block of hidden units at a
    time (bf16 weights → float32 arithmetic). ``bench/alignment_memory.py`` measures it at Mixtral sizes.

    Args:
        experts: a bank with the contract attributes (GELU or SwiGLU).
        i, j: the two experts.
        X_ND: (N, D) points; weights_NE: (N, E) routing weights ≥ 0 (``trace.gate_matrix()``).
        dtype: arithmetic dtype, float32 or float64 (None: float32, or float64 if the inputs are).
        path: "model", "hidden" or "auto" (the cheaper by a FLOP estimate), for both computations.
        token_chunk, hidden_chunk: block sizes (tokens; hidden units, also the tile of the hidden path).

    >>> from moewidgets.nn.experts import SwiGLUExperts
    >>> bank = SwiGLUExperts(3, 8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    >>> X = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    >>> w = torch.rand(50, 3, generator=torch.Generator().manual_seed(2))
    >>> pa = pair_alignment(bank, 0, 2, X, w, per_token=True)
    >>> pa.dtype, pa.token_cosine.shape, abs(pa.cosine) <= 1
    ('float32', torch.Size([50]), True)

    Chapter 2 (book/chapter2.ipynb).
    """
    act, ws = _check_bank_points(experts, X_ND)
    E = int(ws[0].shape[0])
    for name, v in (("i", i), ("j", j)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < E:
            raise ValueError(f"{name}={v!r} must be an expert index in 0..{E - 1}")
    N = X_ND.shape[0]
    if not isinstance(weights_NE, torch.Tensor) or tuple(weights_NE.shape) != (N, E):
        raise ValueError(f"weights_NE must be (N={N}, E={E}); got "
                         f"{tuple(weights_NE.shape) if isinstance(weights_NE, torch.Tensor) else weights_NE!r}")
    if path not in ALIGNMENT_PATHS:
        raise ValueError(f"path={path!r} must be one of {ALIGNMENT_PATHS}")
    _check_chunks(token_chunk=token_chunk, hidden_chunk=hidden_chunk)
    dt = _compute_dtype(dtype, X_ND.dtype, ws[0].dtype)
    device = ws[0].device
    X = X_ND.detach().to(device=device, dtype=dt)
    w = weights_NE.detach().to(device=device, dtype=dt)
    if not torch.isfinite(w).all() or bool((w < 0).any()):
        raise ValueError("weights_NE must be finite and >= 0")
    i, j = int(i), int(j)
    W_i, W_j = float(w[:, i].sum()), float(w[:, j].sum())
    for e, W in ((i, W_i), (j, W_j)):
        if not W > 0:
            raise ValueError(f"expert {e} has zero total routing weight: no mean Jacobian to align")
    ex_i, ex_j = _expert(experts, i), _expert(experts, j)

    rows_i, rows_j = w[:, i] > 0, w[:, j] > 0
    lam_i = _coefficients(ex_i, X[rows_i], dt, token_chunk, hidden_chunk, w[rows_i, i])
    lam_j = _coefficients(ex_j, X[rows_j], dt, token_chunk, hidden_chunk, w[rows_j, j])
    model, hidden = _flops(ex_i, 1)
    mean_path = path if path != "auto" else ("model" if model <= hidden else "hidden")
    inner, sq_i, sq_j = _pair_inner(ex_i, lam_i, ex_j, lam_j, mean_path, dt, hidden_chunk, hidden_chunk)

    token_index = token_cosine = token_path = None
    if per_token:
        token_index = (rows_i & rows_j).nonzero(as_tuple=True)[0]
        P = int(token_index.numel())
        model, hidden = _flops(ex_i, P)
        token_path = path if path != "auto" else ("model" if model <= hidden else "hidden")
        tok_inner, tok_i, tok_j = [], [], []
        # the model path holds (chunk, D, D) Jacobians; the hidden path forms its F×F tiles once per chunk, so
        # its chunks are as large as the coefficients allow
        D_out, D_in = ex_i.out_DF.shape[0], ex_i.terms[0].shape[1]
        if token_path == "model":
            step = _jacobian_chunk(token_chunk, D_out * D_in)
        else:
            step = _coefficient_chunk(2 * len(ex_i.terms) * ex_i.hidden)
        for t in _slices(P, step):
            Xp = X[token_index[t]]
            li = _coefficients(ex_i, Xp, dt, token_chunk, hidden_chunk)
            lj = _coefficients(ex_j, Xp, dt, token_chunk, hidden_chunk)
            a, b, c = _pair_inner(ex_i, li, ex_j, lj, token_path, dt, hidden_chunk, hidden_chunk)
            tok_inner.append(a), tok_i.append(b), tok_j.append(c)
        if P:
            token_cosine = _cosine(torch.cat(tok_inner), torch.cat(tok_i), torch.cat(tok_j)).cpu()
        else:
            token_cosine = torch.zeros(0, dtype=dt)
        token_index = token_index.cpu()

    cos = _cosine(inner, sq_i, sq_j)
    return PairAlignment(experts=(i, j), cosine=float(cos[0]), inner=float(inner[0]), norm_i=float(sq_i[0].sqrt()),
                         norm_j=float(sq_j[0].sqrt()), weight_i=W_i, weight_j=W_j, path=mean_path,
                         token_path=token_path, dtype=str(dt).replace("torch.", ""), token_index=token_index,
                         token_cosine=token_cosine)


# ------------------------------------------------------------------------------------ co-selected cosines

@dataclass
class CoselectedCosine:
    """Per-token Frobenius cosines between the Jacobians of experts selected together, aggregated per pair.

    Fields::

        matrix:           (E, E) mean over the tokens where i and j are both selected of cos_F(J_i(x), J_j(x));
                          NaN where the pair is never co-selected and on the diagonal.
        mean_abs:         (E, E) the same for |cos_F|.
        counts:           (E, E) int64 co-selection counts (0 on the diagonal).
        cos_NKK:          (N, K, K) per token, the cosine between the experts in slots k and l (1 on the diagonal).
        mean_abs_offdiag: mean over co-selected pairs i < j of ``mean_abs[i, j]`` (each pair counts once).
        pooled_mean_abs:  mean |cos_F| over all (token, pair) instances (frequent pairs count more).
        signed_mean:      mean cos_F over all instances.
        null_sd:          1/√(D_out·D_in): the SD of cos_F between iid random matrices (E|cos| ≈ 0.8·null_sd).
        method:           "jacobians" (per-token Jacobians formed) or "gram" (hidden-side inner products).
        dtype:            the arithmetic dtype.
    """

    matrix: torch.Tensor
    mean_abs: torch.Tensor
    counts: torch.Tensor
    cos_NKK: torch.Tensor
    mean_abs_offdiag: float
    pooled_mean_abs: float
    signed_mean: float
    null_sd: float
    method: str
    dtype: str


def _gram_coselected(experts_: list, X_nD: torch.Tensor, idx_nK: torch.Tensor, dt: torch.dtype, token_chunk: int,
                     hidden_chunk: int) -> torch.Tensor:
    """(n, K, K) Gram of the selected experts' Jacobians at each token, on the hidden path: one F×F pass per
    expert present (norms) and per co-selected pair (cross terms)."""
    n, K = idx_nK.shape
    G_nKK = X_nD.new_zeros(n, K, K)
    lam_E, pos_E = {}, {}
    for e in torch.unique(idx_nK).tolist():
        rows, slots = (idx_nK == e).nonzero(as_tuple=True)
        lam_E[e] = _coefficients(experts_[e], X_nD[rows], dt, token_chunk, hidden_chunk)
        G_nKK[rows, slots, slots] = _hidden_inner(experts_[e], lam_E[e], experts_[e], lam_E[e], dt, hidden_chunk)
        pos = torch.full((n,), -1, dtype=torch.long, device=X_nD.device)
        pos[rows] = torch.arange(rows.numel(), device=X_nD.device)         # token → row of lam_E[e]
        pos_E[e] = (pos, slots)
    pairs = sorted({(min(a, b), max(a, b)) for row in idx_nK.tolist() for a in row for b in row if a != b})
    for a, b in pairs:
        (pa, sa), (pb, sb) = pos_E[a], pos_E[b]
        tok = ((pa >= 0) & (pb >= 0)).nonzero(as_tuple=True)[0]
        ia, ib = pa[tok], pb[tok]
        inner = _hidden_inner(experts_[a], [l[ia] for l in lam_E[a]], experts_[b], [l[ib] for l in lam_E[b]],
                              dt, hidden_chunk)
        G_nKK[tok, sa[ia], sb[ib]] = inner
        G_nKK[tok, sb[ib], sa[ia]] = inner
    return G_nKK


def coselected_jacobian_cosine(experts, X_ND: torch.Tensor, idx_NK: torch.Tensor, *, method: str = "auto",
                               dtype: torch.dtype | None = None, token_chunk: int = 64,
                               hidden_chunk: int = 2048) -> CoselectedCosine:
    """``cos_F(J_i(x), J_j(x))`` for every token x and every pair of its selected experts, averaged per pair.

    Ungated expert Jacobians (closed form), ``cos_F(A, B) = ⟨A, B⟩_F / (‖A‖_F ‖B‖_F)``: the "same input,
    different expert" comparison of §2.4b. ``method="jacobians"`` forms J for every (token, slot) in chunks of
    tokens (small models); ``"gram"`` uses the hidden-side formula (module docstring) with one F×F pass per
    expert (norms) and per co-selected pair (big models, many tokens); ``"auto"`` picks by FLOP estimate.

    Args:
        experts: a bank with the contract attributes.
        X_ND: (N, D) points; idx_NK: (N, K) selected experts (``trace.idx_TK``).

    >>> from moewidgets.nn.experts import GELUExperts
    >>> bank = GELUExperts(4, 6, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> X = torch.randn(30, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    >>> idx = torch.stack([torch.arange(30) % 4, (torch.arange(30) + 1) % 4], 1)      # pairs (0,1) (1,2) (2,3) (3,0)
    >>> a = coselected_jacobian_cosine(bank, X, idx, method="jacobians")
    >>> b = coselected_jacobian_cosine(bank, X, idx, method="gram")
    >>> a.counts[0].tolist(), torch.allclose(a.matrix, b.matrix, equal_nan=True)
    ([0, 8, 0, 7], True)

    Chapter 2 (book/chapter2.ipynb).
    """
    act, ws = _check_bank_points(experts, X_ND)
    E = int(ws[0].shape[0])
    N = X_ND.shape[0]
    if not isinstance(idx_NK, torch.Tensor) or idx_NK.dim() != 2 or idx_NK.shape[0] != N \
            or idx_NK.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx_NK must be an integer tensor (N={N}, K); got "
                         f"{tuple(idx_NK.shape) if isinstance(idx_NK, torch.Tensor) else type(idx_NK).__name__}")
    if idx_NK.numel() and (int(idx_NK.min()) < 0 or int(idx_NK.max()) >= E):
        raise ValueError(f"idx_NK must hold expert indices in 0..{E - 1}")
    if method not in ("auto", "jacobians", "gram"):
        raise ValueError(f"method={method!r} must be 'auto', 'jacobians' or 'gram'")
    _check_chunks(token_chunk=token_chunk, hidden_chunk=hidden_chunk)
    dt = _compute_dtype(dtype, X_ND.dtype, ws[0].dtype)
    device = ws[0].device
    X = X_ND.detach().to(device=device, dtype=dt)
    idx = idx_NK.to(device=device, dtype=torch.long)
    K = idx.shape[1]
    experts_ = [_expert(experts, e) for e in range(E)]
    D_out, D_in = int(ws[2].shape[1]), int(ws[0].shape[2])

    if method == "auto":
        pairs = {(min(a, b), max(a, b)) for row in idx.tolist() for a in row for b in row if a != b}
        ex = experts_[0]
        jac = N * K * 2.0 * D_out * ex.hidden * D_in
        A = len(ex.terms)
        gram = (E + len(pairs)) * 2.0 * ex.hidden ** 2 * (D_out + A * A * D_in)
        method = "jacobians" if jac <= gram else "gram"

    G_NKK = X.new_zeros(N, K, K)                 # Gram of the selected experts' Jacobians at each token
    if method == "jacobians":
        for t in _slices(N, _jacobian_chunk(token_chunk, K * D_out * D_in)):
            n = t.stop - t.start
            J_nKP = X.new_zeros(n, K, D_out * D_in)
            for e in torch.unique(idx[t]).tolist():
                rows, slots = (idx[t] == e).nonzero(as_tuple=True)
                lam = _coefficients(experts_[e], X[t][rows], dt, token_chunk, hidden_chunk)
                J_nKP[rows, slots] = _model_jacobians(experts_[e], lam, dt, hidden_chunk).flatten(1)
            G_NKK[t] = J_nKP @ J_nKP.transpose(1, 2)
    else:
        # coefficients of every (token, slot) of a token chunk are held at once; the F×F tiles are formed once
        # per chunk (one chunk up to ~2000 tokens at Mixtral sizes)
        ex0 = experts_[0]
        for t in _slices(N, _coefficient_chunk(K * len(ex0.terms) * ex0.hidden)):
            G_NKK[t] = _gram_coselected(experts_, X[t], idx[t], dt, token_chunk, hidden_chunk)
    diag_NK = G_NKK.diagonal(dim1=1, dim2=2)
    cos_NKK = _cosine(G_NKK, diag_NK[:, :, None], diag_NK[:, None, :])
    # aggregate the slot pairs k < l into expert pairs (symmetric)
    k1, k2 = torch.triu_indices(K, K, offset=1, device=device)
    ei, ej = idx[:, k1].reshape(-1), idx[:, k2].reshape(-1)
    c = cos_NKK[:, k1, k2].reshape(-1)
    ok = ~torch.isnan(c) & (ei != ej)
    flat = torch.cat([ei * E + ej, ej * E + ei])[torch.cat([ok, ok])]
    cc = torch.cat([c, c])[torch.cat([ok, ok])]
    sums = X.new_zeros(E * E).index_add_(0, flat, cc)
    abs_sums = X.new_zeros(E * E).index_add_(0, flat, cc.abs())
    counts = torch.zeros(E * E, dtype=torch.long, device=device).index_add_(0, flat, torch.ones_like(flat))
    den = counts.clamp_min(1).to(dt)
    matrix = torch.where(counts > 0, sums / den, torch.full_like(sums, math.nan)).reshape(E, E)
    mean_abs = torch.where(counts > 0, abs_sums / den, torch.full_like(sums, math.nan)).reshape(E, E)
    upper = torch.ones(E, E, dtype=torch.bool, device=device).triu(1) & (counts.reshape(E, E) > 0)
    inst = c[ok]
    return CoselectedCosine(
        matrix=matrix.cpu(), mean_abs=mean_abs.cpu(), counts=counts.reshape(E, E).cpu(), cos_NKK=cos_NKK.cpu(),
        mean_abs_offdiag=float(mean_abs[upper].mean()) if bool(upper.any()) else math.nan,
        pooled_mean_abs=float(inst.abs().mean()) if inst.numel() else math.nan,
        signed_mean=float(inst.mean()) if inst.numel() else math.nan,
        null_sd=1.0 / math.sqrt(D_out * D_in), method=method, dtype=str(dt).replace("torch.", ""))


# ------------------------------------------------------------------------------------------------ asymmetry

@dataclass
class AsymmetrySummary:
    """Functional and representational geometry of one layer on one scale (paper-2 spec §2.4e; GA-4).

    Both sides are placed between an *unrelated* reference (0) and a *same-expert* reference (1)::

        functional_fraction       = (mean|A_ij| − null) / (ceiling − null)
                                    null: E[mean over P pairs of |cos_F|] of iid Gaussian D_out×D_in matrices;
                                    ceiling: the split-half same-expert cosine
        representational_fraction = (observed − iso) / (floor − iso)
                                    iso: Haar-random subspaces of the same ranks; floor: split-half same expert
        gap = representational_fraction − functional_fraction

    and as z-scores against the unrelated reference (SD of the pair-averaged statistic over draws):
    ``functional_z = (mean|A_ij| − null) / null_sd`` (the spec's Fz), ``representational_z`` = how far the
    observed distance sits below the isotropic level in its SDs (above, for overlap). ``representational_group_z
    = (group_null − observed) / group_sd`` is the spec's Rz with the random-token-group null; it is negative when
    routing separates the experts' representations more than random groups of the same sizes (which is what a
    specialised router does). "Asymmetry" (GA-4): functional side near 0, representational side well above 0.

    Fields::

        functional_observed, functional_null, functional_null_sd, functional_ceiling, functional_z,
        functional_fraction, n_pairs_functional,
        representational_metric, representational_observed, representational_iso, representational_iso_sd,
        representational_floor, representational_group_null, representational_group_sd, representational_z,
        representational_group_z, representational_fraction, gap.
    """

    functional_observed: float
    functional_null: float
    functional_null_sd: float
    functional_ceiling: float
    functional_z: float
    functional_fraction: float
    n_pairs_functional: int
    representational_metric: str
    representational_observed: float
    representational_iso: float
    representational_iso_sd: float
    representational_floor: float
    representational_group_null: float
    representational_group_sd: float
    representational_z: float
    representational_group_z: float
    representational_fraction: float
    gap: float

    def summary(self) -> dict[str, float | int | str]:
        """All fields as a flat dict of plain Python values (a results row)."""
        return dict(vars(self))


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and math.isfinite(den) and math.isfinite(num) else math.nan


def _pair_mean_abs_cos_null(p: int, q: int, n_pairs: int, n_draws: int, g: torch.Generator) -> tuple[float, float]:
    """Mean and SD of the mean over n_pairs iid pairs of |cos_F| of Gaussian p×q matrices (exact one-dimensional
    representation cos = z / √(z² + χ²_{pq−1}), by rotation invariance), from a numpy generator seeded by g."""
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
    z = rng.standard_normal((n_draws, n_pairs))
    rest = rng.chisquare(p * q - 1, (n_draws, n_pairs))
    stat = np.abs(z / np.sqrt(z * z + rest)).mean(1)
    return float(stat.mean()), float(stat.std(ddof=1))


def asymmetry_summary(alignment: JacobianAlignment, comparison: SubspaceComparison, *,
                      generator: torch.Generator | int | None = None, n_draws: int = 2000) -> AsymmetrySummary:
    """Put the functional and the representational side of one layer on one scale (:class:`AsymmetrySummary`).

    Args:
        alignment: cross-expert alignment of mean Jacobians with its ceiling
            (:func:`~moewidgets.geometry.bank_jacobian_alignment`).
        comparison: between-expert subspace distances with references
            (:func:`~moewidgets.geometry.compare_subspaces`; a distance metric or "overlap").
        generator: torch.Generator or int seed for the functional null draws (None = seed 0).
        n_draws: draws of the functional null.

    >>> from moewidgets.nn.experts import SwiGLUExperts
    >>> from moewidgets.geometry import bank_jacobian_alignment
    >>> from moewidgets.geometry.subspaces import compare_subspaces, routed_subspaces
    >>> g = torch.Generator().manual_seed(0)
    >>> bank = SwiGLUExperts(3, 6, 12, generator=g, dtype=torch.float64)
    >>> X = torch.randn(300, 6, generator=g, dtype=torch.float64)
    >>> w = torch.softmax(X[:, :3] * 3, dim=1)
    >>> align = bank_jacobian_alignment(bank, X, w, generator=0)
    >>> cmp = compare_subspaces(routed_subspaces(X, w, rank=2), "geodesic", generator=0, n_draws=5, n_splits=3)
    >>> s = asymmetry_summary(align, cmp)
    >>> s.n_pairs_functional, s.representational_metric, s.gap == s.representational_fraction - s.functional_fraction
    (3, 'geodesic', True)

    Chapter 2 (book/chapter2.ipynb).
    """
    if not isinstance(alignment, JacobianAlignment):
        raise ValueError(f"alignment must be a JacobianAlignment; got {type(alignment).__name__}")
    if not isinstance(comparison, SubspaceComparison):
        raise ValueError(f"comparison must be a SubspaceComparison; got {type(comparison).__name__}")
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 2:
        raise ValueError(f"n_draws={n_draws!r} must be an integer >= 2")
    g = make_generator(generator)
    A = alignment.matrix
    E = A.shape[0]
    iu = torch.triu_indices(E, E, offset=1)
    n_pairs = int((~torch.isnan(A[iu[0], iu[1]])).sum())
    p, q = (int(s) for s in alignment.mean_jacobians.shape[-2:])
    if n_pairs:
        null, null_sd = _pair_mean_abs_cos_null(p, q, n_pairs, n_draws, g)
    else:
        null, null_sd = math.nan, math.nan
    f_obs, ceiling = alignment.mean_abs_offdiag, alignment.ceiling
    f_z = _ratio(f_obs - null, null_sd)
    f_frac = _ratio(f_obs - null, ceiling - null)

    c = comparison
    sign = 1.0 if c.metric == "overlap" else -1.0        # +1: larger = closer (overlap); −1: a distance
    r_obs = c.between_mean
    r_z = _ratio(sign * (r_obs - c.iso_mean), c.iso_sd)
    r_group_z = _ratio(sign * (r_obs - c.group_null_mean), c.group_null_sd)
    r_frac = _ratio(r_obs - c.iso_mean, c.floor_mean - c.iso_mean)
    return AsymmetrySummary(
        functional_observed=f_obs, functional_null=null, functional_null_sd=null_sd, functional_ceiling=ceiling,
        functional_z=f_z, functional_fraction=f_frac, n_pairs_functional=n_pairs,
        representational_metric=c.metric, representational_observed=r_obs, representational_iso=c.iso_mean,
        representational_iso_sd=c.iso_sd, representational_floor=c.floor_mean,
        representational_group_null=c.group_null_mean, representational_group_sd=c.group_null_sd,
        representational_z=r_z, representational_group_z=r_group_z, representational_fraction=r_frac,
        gap=r_frac - f_frac)


# --------------------------------------------------------------------------------------------- one layer, all

@dataclass
class LayerAsymmetry:
    """Paper 2's numbers for one MoE layer on one routing trace (:func:`layer_asymmetry`).

    Fields::

        alignment:   cross-expert alignment of routing-weighted mean Jacobians, null and split-half ceiling
                     (:class:`~moewidgets.geometry.JacobianAlignment`).
        coselected:  per-token cosines of co-selected experts (:class:`CoselectedCosine`; None when k = 1 or
                     when not asked for).
        subspaces:   the experts' routed subspaces (:class:`~moewidgets.geometry.RoutedSubspaces`).
        comparison:  between-expert distances with their references
                     (:class:`~moewidgets.geometry.SubspaceComparison`).
        summary:     both sides on one scale (:class:`AsymmetrySummary`).
        weighting, space: the routing weights and the points the subspaces use.
    """

    alignment: JacobianAlignment
    coselected: CoselectedCosine | None
    subspaces: RoutedSubspaces
    comparison: SubspaceComparison
    summary: AsymmetrySummary
    weighting: str
    space: str


def layer_asymmetry(experts, trace, *, weighting: str = "gates", space: str = "inputs", rank: int | None = None,
                    variance: float | None = None, min_tokens: int | None = None, metric: str = "geodesic",
                    generator: torch.Generator | int | None = None, n_draws: int = 20, n_splits: int = 10,
                    min_points: int = 8, coselected: bool = True) -> LayerAsymmetry:
    """Functional and representational geometry of one layer in one call (chapter 2's probe of a layer).

    Runs, with the same routing weights (``weighting``: "gates", "membership" or "argmax",
    :func:`~moewidgets.geometry.routing_weights`) and one generator (None = seed 0) for every random draw:
    :func:`~moewidgets.geometry.bank_jacobian_alignment`, :func:`coselected_jacobian_cosine` (when k ≥ 2 and
    ``coselected``; the live dashboards skip it: it costs more than the rest),
    :func:`~moewidgets.geometry.trace_subspaces` (``space``, ``rank`` or ``variance``, ``min_tokens``),
    :func:`~moewidgets.geometry.compare_subspaces` (``metric``, normalised) and :func:`asymmetry_summary`.

    >>> from moewidgets import MoEConfig, build_model, trace_model
    >>> model = build_model(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16, expert="swiglu"))
    >>> tr = trace_model(model, torch.randn(400, 8, generator=torch.Generator().manual_seed(0)))
    >>> res = layer_asymmetry(model.layer.experts, tr, rank=2, n_draws=4, n_splits=2)
    >>> res.alignment.matrix.shape, res.coselected.counts.shape, res.summary.representational_metric
    (torch.Size([4, 4]), torch.Size([4, 4]), 'geodesic')

    Chapter 2 (book/chapter2.ipynb).
    """
    g = make_generator(generator)
    w_NE = routing_weights(trace, weighting)
    subspaces = trace_subspaces(trace, space=space, weighting=weighting, rank=rank, variance=variance,
                                min_tokens=min_tokens)
    alignment = bank_jacobian_alignment(experts, trace.x_TD, w_NE, generator=g, min_points=min_points)
    cosel = coselected_jacobian_cosine(experts, trace.x_TD, trace.idx_TK) if coselected and trace.k >= 2 else None
    comparison = compare_subspaces(subspaces, metric, True, generator=g, n_draws=n_draws, n_splits=n_splits)
    return LayerAsymmetry(alignment=alignment, coselected=cosel, subspaces=subspaces, comparison=comparison,
                          summary=asymmetry_summary(alignment, comparison, generator=g), weighting=weighting,
                          space=space)
