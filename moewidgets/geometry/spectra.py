"""Singular-value spectra of Jacobians: leading singular value, decay, stable rank, spectral effective rank.

Shape legend: N points, D model width, E experts, R = min(D_out, D_in) spectrum length, ``...`` batch dims.

For singular values σ_1 ≥ … ≥ σ_R of a Jacobian J (paper-1 spec §1.4b, §1.4c):

* ``sigma1``       σ_1 = ‖J‖₂ (local Lipschitz constant);
* ``ratios``       the normalised spectrum r_j = σ_j / σ_1 (``r2``, ``r5``, ``r10`` where R ≥ j);
* ``stable_rank``  Σ_j σ_j² / σ_1² = ‖J‖_F² / ‖J‖₂²;
* ``decay_alpha``  α of the least-squares fit log σ_j ≈ c − α log j over the j with σ_j/σ_1 > 1e-6
                   (larger α = faster decay);
* ``erank``        Roy–Vetterli spectral effective rank exp(−Σ p_j log p_j), p_j = σ_j / Σ_k σ_k, on σ.

Per expert, each statistic is aggregated with the routing weights (§1.4b): ``S_i = Σ_n w_ni s(J_i(x_n)) / Σ_n w_ni``.
Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .pca import effective_rank

__all__ = ["SpectrumStats", "WeightedSpectra", "singular_values", "spectrum_stats", "weighted_expert_spectra"]

_STAT_NAMES = ("sigma1", "stable_rank", "decay_alpha", "erank", "r2", "r5", "r10")


def singular_values(J: torch.Tensor) -> torch.Tensor:
    """Singular values of (a batch of) matrices, descending: (..., D_out, D_in) → (..., min(D_out, D_in)).

    One batched ``torch.linalg.svdvals`` call, in J's dtype.

    >>> singular_values(torch.diag(torch.tensor([1., 3., 2.])))
    tensor([3., 2., 1.])

    Chapter 1 (book/chapter1.ipynb).
    """
    if not isinstance(J, torch.Tensor) or J.dim() < 2 or not J.is_floating_point():
        raise ValueError(f"J must be a floating tensor (..., D_out, D_in); got "
                         f"{tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__}")
    return torch.linalg.svdvals(J)


@dataclass
class SpectrumStats:
    """Spectral statistics of one or a batch of singular-value spectra (module docstring for formulas).

    Fields (leading dims ``...`` those of the input): ``sv`` (..., R), ``sigma1`` (...), ``ratios`` (..., R),
    ``r2``/``r5``/``r10`` (...) or None when R < 2/5/10, ``stable_rank`` (...), ``decay_alpha`` (...),
    ``erank`` (...). A zero matrix has sigma1 = 0, stable_rank = erank = 0 and NaN ratios and decay_alpha;
    decay_alpha is NaN when fewer than 2 singular values pass the cutoff.
    """

    sv: torch.Tensor
    sigma1: torch.Tensor
    ratios: torch.Tensor
    r2: torch.Tensor | None
    r5: torch.Tensor | None
    r10: torch.Tensor | None
    stable_rank: torch.Tensor
    decay_alpha: torch.Tensor
    erank: torch.Tensor


def _decay_alpha(ratios: torch.Tensor, sv: torch.Tensor, cutoff: float) -> torch.Tensor:
    R = sv.shape[-1]
    x = torch.log(torch.arange(1, R + 1, dtype=sv.dtype, device=sv.device)).expand_as(sv)
    m = (ratios > cutoff).to(sv.dtype)              # NaN ratios compare False
    cnt = m.sum(-1)
    safe_cnt = cnt.clamp_min(1)
    y = torch.log(torch.where(m > 0, sv, torch.ones_like(sv)))
    xbar = (m * x).sum(-1) / safe_cnt
    ybar = (m * y).sum(-1) / safe_cnt
    dx = (x - xbar[..., None]) * m
    sxx = (dx * dx).sum(-1)
    sxy = (dx * (y - ybar[..., None])).sum(-1)
    slope = sxy / torch.where(sxx > 0, sxx, torch.ones_like(sxx))
    return torch.where(cnt >= 2, -slope, torch.full_like(slope, math.nan))


def spectrum_stats(sv: torch.Tensor, *, cutoff: float = 1e-6) -> SpectrumStats:
    """Statistics of singular-value spectra ``sv`` (..., R) (descending, as :func:`singular_values` gives).

    ``sigma1 = σ_1``, ``ratios = σ/σ_1``, ``stable_rank = Σσ²/σ_1²``, ``decay_alpha``: α in
    ``log σ_j ≈ c − α log j`` (least squares over j with σ_j/σ_1 > cutoff), ``erank = exp(H(σ/Σσ))``.

    >>> sv = torch.arange(1, 11, dtype=torch.float64) ** -1.5
    >>> st = spectrum_stats(sv)
    >>> round(float(st.decay_alpha), 6), float(st.sigma1), round(float(st.r2), 4)
    (1.5, 1.0, 0.3536)

    Chapter 1 (book/chapter1.ipynb).
    """
    if not isinstance(sv, torch.Tensor) or sv.dim() < 1 or not sv.is_floating_point():
        raise ValueError("sv must be a floating tensor (..., R) of singular values")
    if (sv < 0).any():
        raise ValueError(f"sv must be >= 0 (singular values); got min {float(sv[sv < 0].min())}")
    R = sv.shape[-1]
    sigma1 = sv[..., 0]
    zero = sigma1 == 0
    s1safe = torch.where(zero, torch.ones_like(sigma1), sigma1)
    ratios = torch.where(zero[..., None], torch.full_like(sv, math.nan), sv / s1safe[..., None])
    stable = torch.where(zero, torch.zeros_like(sigma1), (ratios * ratios).sum(-1))   # Σ(σ_j/σ_1)², no underflow
    alpha = _decay_alpha(ratios, sv, cutoff)
    er = effective_rank(sv, "entropy")
    pick = {j: (ratios[..., j - 1] if R >= j else None) for j in (2, 5, 10)}
    return SpectrumStats(sv, sigma1, ratios, pick[2], pick[5], pick[10], stable, alpha, er)


@dataclass
class WeightedSpectra:
    """Per-expert routing-weighted spectral statistics (chapter 1, paper-1 spec §1.4b–c).

    Every per-expert statistic is ``S_e = Σ_n w_ne s(J_e(x_n)) / Σ_n w_ne`` over the points with w_ne > 0.

    Fields::

        sigma1, stable_rank, decay_alpha, erank: (E,) weighted means (NaN for dead experts).
        r2, r5, r10: (E,) weighted mean r_j = σ_j/σ_1, or None when R < j.
        ratios:      (E, R) weighted mean normalised spectrum σ_j/σ_1.
        total_weight: (E,) Σ_n w_ne;  n_routed: (E,) number of points with w_ne > 0.
        dead:        (E,) bool, True where total_weight = 0.
        sv:          (E, N, R) singular values, computed only where w_ne > 0 (NaN elsewhere).
    """

    sigma1: torch.Tensor
    stable_rank: torch.Tensor
    decay_alpha: torch.Tensor
    erank: torch.Tensor
    r2: torch.Tensor | None
    r5: torch.Tensor | None
    r10: torch.Tensor | None
    ratios: torch.Tensor
    total_weight: torch.Tensor
    n_routed: torch.Tensor
    dead: torch.Tensor
    sv: torch.Tensor

    def live_mean(self, name: str) -> float:
        """Model-level statistic: the plain mean of field ``name`` over live experts (NaN if none)."""
        allowed = _STAT_NAMES
        if name not in allowed:
            raise ValueError(f"name={name!r} must be one of {allowed}")
        v = getattr(self, name)
        if v is None:
            return math.nan
        live = ~self.dead
        return float(v[live].mean()) if bool(live.any()) else math.nan


def weighted_expert_spectra(J_ENDD: torch.Tensor | None, weights_NE: torch.Tensor, *,
                            sv_ENR: torch.Tensor | None = None, cutoff: float = 1e-6) -> WeightedSpectra:
    """Routing-weighted per-expert spectra: ``S1_e = Σ_n w_ne σ_1(J_e(x_n)) / Σ_n w_ne``, and the same for the
    stable rank, decay α, erank and r_j (module docstring). Experts with zero total weight are ``dead`` (NaN).

    Singular values are computed in ONE batched call, only for the (expert, point) pairs with w_ne > 0. Pass
    ``sv_ENR`` (E, N, R) instead of ``J_ENDD`` if you already have them.

    >>> J = torch.stack([torch.eye(3), 2 * torch.eye(3)])[:, None].expand(2, 4, 3, 3)    # E=2, N=4
    >>> w = torch.tensor([[1., 0.], [1., 0.], [0., 0.], [1., 0.]])                       # expert 1 dead
    >>> ws = weighted_expert_spectra(J, w)
    >>> ws.sigma1.tolist()[0], ws.dead.tolist(), ws.n_routed.tolist()
    (1.0, [False, True], [3, 0])

    Chapter 1 (book/chapter1.ipynb).
    """
    if not isinstance(weights_NE, torch.Tensor) or weights_NE.dim() != 2:
        raise ValueError("weights_NE must be a 2-d tensor (N, E)")
    N, E = weights_NE.shape
    if sv_ENR is None:
        if not isinstance(J_ENDD, torch.Tensor) or J_ENDD.dim() != 4 or tuple(J_ENDD.shape[:2]) != (E, N):
            raise ValueError(f"J_ENDD must be (E={E}, N={N}, D_out, D_in) to match weights_NE (N, E); got "
                             f"{tuple(J_ENDD.shape) if isinstance(J_ENDD, torch.Tensor) else J_ENDD!r}")
        dtype, device = J_ENDD.dtype, J_ENDD.device
        R = min(J_ENDD.shape[-2:])
    else:
        if sv_ENR.dim() != 3 or tuple(sv_ENR.shape[:2]) != (E, N):
            raise ValueError(f"sv_ENR must be (E={E}, N={N}, R); got {tuple(sv_ENR.shape)}")
        dtype, device = sv_ENR.dtype, sv_ENR.device
        R = sv_ENR.shape[-1]
    w_EN = weights_NE.to(device=device, dtype=torch.promote_types(dtype, weights_NE.dtype)
                         if weights_NE.is_floating_point() else dtype).T
    if not torch.isfinite(w_EN).all() or (w_EN < 0).any():
        raise ValueError("weights_NE must be finite and >= 0")
    dtype = w_EN.dtype
    routed_EN = w_EN > 0
    e_P, n_P = routed_EN.nonzero(as_tuple=True)
    if sv_ENR is None:
        sv_PR = singular_values(J_ENDD[e_P, n_P].to(dtype)) if e_P.numel() else J_ENDD.new_zeros(0, R).to(dtype)
    else:
        sv_PR = sv_ENR[e_P, n_P].to(dtype)
    st = spectrum_stats(sv_PR, cutoff=cutoff)
    w_P = w_EN[e_P, n_P]
    W_E = w_EN.sum(-1)
    dead_E = W_E <= 0
    Wsafe_E = torch.where(dead_E, torch.ones_like(W_E), W_E)

    def agg(s_P: torch.Tensor | None) -> torch.Tensor | None:
        if s_P is None:
            return None
        tot = torch.zeros((E,) + tuple(s_P.shape[1:]), dtype=dtype, device=device)
        tot.index_add_(0, e_P, w_P.reshape((-1,) + (1,) * (s_P.dim() - 1)) * s_P)
        out = tot / Wsafe_E.reshape((E,) + (1,) * (s_P.dim() - 1))
        return torch.where(dead_E.reshape((E,) + (1,) * (s_P.dim() - 1)), torch.full_like(out, math.nan), out)

    sv_full = torch.full((E, N, R), math.nan, dtype=dtype, device=device)
    sv_full[e_P, n_P] = sv_PR
    return WeightedSpectra(
        sigma1=agg(st.sigma1), stable_rank=agg(st.stable_rank), decay_alpha=agg(st.decay_alpha),
        erank=agg(st.erank), r2=agg(st.r2), r5=agg(st.r5), r10=agg(st.r10), ratios=agg(st.ratios),
        total_weight=W_E, n_routed=routed_EN.sum(-1), dead=dead_E, sv=sv_full)

