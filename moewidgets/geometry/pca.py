"""Weighted PCA of routed hidden states and effective ranks of a spectrum.

Shape legend: N points, D vector width, E experts, R spectrum length.

Weighted PCA (paper-1 spec §1.4d), vectors h_n with weights w_n ≥ 0::

    W = Σ_n w_n,   μ = Σ_n w_n h_n / W,   C = Σ_n w_n (h_n − μ)(h_n − μ)ᵀ / W,   n_eff = W² / Σ_n w_n²

eigenvalues λ_1 ≥ … ≥ λ_D ≥ 0 of C, components its unit eigenvectors (columns).

Effective rank of a nonnegative spectrum λ (paper-1 spec §1.4e; always name the spectrum *and* the formula):

* ``"entropy"``       exp(−Σ_j p_j log p_j), p_j = λ_j / Σ_k λ_k (Roy & Vetterli 2007),
* ``"participation"`` (Σ_j λ_j)² / Σ_j λ_j²,
* ``"threshold"``     the smallest k with Σ_{j≤k} λ_j ≥ fraction · Σ_j λ_j (k90 at fraction = 0.9),

all equal to 0 for an all-zero spectrum (nothing to span) and to NaN for a spectrum containing NaN (e.g. a dead
expert). Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WeightedPCA", "weighted_pca", "expert_pca", "effective_rank", "EFFECTIVE_RANK_KINDS"]

EFFECTIVE_RANK_KINDS = ("entropy", "participation", "threshold")


@dataclass
class WeightedPCA:
    """Result of a weighted PCA (leading batch dims ``...`` = () for one set, (E,) per expert).

    Fields::

        eigenvalues:  (..., D) covariance eigenvalues, descending, ≥ 0 (NaN where ``dead``).
        components:   (..., D, D) unit eigenvectors as columns, in the same order; each column's largest-|·|
                      entry is positive (a deterministic sign). NaN where ``dead``.
        mean:         (..., D) weighted mean μ (NaN where ``dead``).
        total_weight: (...) W = Σ w.
        n_eff:        (...) effective sample size W² / Σ w² (0 where ``dead``); want n_eff ≫ D.
        dead:         (...) bool, True where W = 0 (no routed weight).
    """

    eigenvalues: torch.Tensor
    components: torch.Tensor
    mean: torch.Tensor
    total_weight: torch.Tensor
    n_eff: torch.Tensor
    dead: torch.Tensor

    def effective_rank(self, kind: str, fraction: float = 0.9) -> torch.Tensor:
        """:func:`effective_rank` of the covariance eigenvalues (NaN where dead)."""
        return effective_rank(self.eigenvalues, kind, fraction=fraction)


def _check_weights(w: torch.Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} must be finite; got non-finite entries")
    if (w < 0).any():
        raise ValueError(f"{name} must be >= 0; got min {float(w.min())}")


def _pca_batched(H_END: torch.Tensor, w_EN: torch.Tensor) -> WeightedPCA:
    """Weighted PCA of each row set H_END[e] with weights w_EN[e] (core of both public functions)."""
    W_E = w_EN.sum(-1)
    dead_E = W_E <= 0
    Wsafe_E = torch.where(dead_E, torch.ones_like(W_E), W_E)
    q_EN = w_EN / Wsafe_E[:, None]
    mu_ED = torch.einsum("en,end->ed", q_EN, H_END)
    Hc_END = H_END - mu_ED[:, None, :]
    C_EDD = torch.bmm((Hc_END * q_EN[..., None]).transpose(1, 2), Hc_END)
    C_EDD = 0.5 * (C_EDD + C_EDD.transpose(1, 2))
    C_EDD = torch.where(dead_E[:, None, None], torch.zeros_like(C_EDD), C_EDD)
    lam_ED, V_EDD = torch.linalg.eigh(C_EDD)
    lam_ED = lam_ED.flip(-1).clamp_min(0)
    V_EDD = V_EDD.flip(-1)
    # deterministic sign: the largest-|.| entry of each column is positive
    pick = V_EDD.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(V_EDD.gather(1, pick))
    V_EDD = V_EDD * torch.where(sign == 0, torch.ones_like(sign), sign)
    sumsq_E = (w_EN * w_EN).sum(-1)
    n_eff_E = torch.where(dead_E, torch.zeros_like(W_E), W_E * W_E / torch.where(dead_E, torch.ones_like(W_E),
                                                                                  sumsq_E))
    nan = torch.tensor(float("nan"), dtype=H_END.dtype, device=H_END.device)
    lam_ED = torch.where(dead_E[:, None], nan, lam_ED)
    V_EDD = torch.where(dead_E[:, None, None], nan, V_EDD)
    mu_ED = torch.where(dead_E[:, None], nan, mu_ED)
    return WeightedPCA(lam_ED, V_EDD, mu_ED, W_E, n_eff_E, dead_E)


def weighted_pca(H_ND: torch.Tensor, weights_N: torch.Tensor | None = None) -> WeightedPCA:
    """Weighted PCA of the rows of H_ND with weights w_n ≥ 0 (uniform if None): see the module docstring.

    ``μ = Σ w h / W``, ``C = Σ w (h − μ)(h − μ)ᵀ / W`` (the 1/W "population" normalisation: integer weights
    give the PCA of the data with each row repeated w_n times), ``n_eff = W² / Σ w²``.

    >>> H = torch.tensor([[0., 0.], [2., 0.], [0., 1.], [2., 1.]], dtype=torch.float64)
    >>> pca = weighted_pca(H)
    >>> pca.eigenvalues.tolist(), pca.mean.tolist(), float(pca.n_eff)
    ([1.0, 0.25], [1.0, 0.5], 4.0)

    Chapter 1 (book/chapter1.ipynb).
    """
    if not isinstance(H_ND, torch.Tensor) or H_ND.dim() != 2 or not H_ND.is_floating_point():
        raise ValueError(f"H_ND must be a 2-d floating tensor (N, D); got "
                         f"{tuple(H_ND.shape) if isinstance(H_ND, torch.Tensor) else type(H_ND).__name__}")
    N = H_ND.shape[0]
    if weights_N is None:
        weights_N = H_ND.new_ones(N)
    weights_N = torch.as_tensor(weights_N).to(device=H_ND.device)
    if weights_N.shape != (N,):
        raise ValueError(f"weights_N has shape {tuple(weights_N.shape)}, must be (N={N},)")
    dtype = torch.promote_types(H_ND.dtype, weights_N.dtype) if weights_N.is_floating_point() else H_ND.dtype
    w = weights_N.to(dtype)
    _check_weights(w, "weights_N")
    r = _pca_batched(H_ND.to(dtype)[None], w[None])
    return WeightedPCA(r.eigenvalues[0], r.components[0], r.mean[0], r.total_weight[0], r.n_eff[0], r.dead[0])


def expert_pca(H: torch.Tensor, weights_NE: torch.Tensor) -> WeightedPCA:
    """Per-expert weighted PCA, batched: expert e uses weights ``weights_NE[:, e]``; results have a leading E.

    ``H`` is either shared by all experts, (N, D) (e.g. the routed inputs, H-in), or per expert, (N, E, D)
    (e.g. the expert outputs E_e(x_n), H-out). Experts with zero total weight are ``dead`` (NaN spectra).

    >>> H = torch.randn(100, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> w = torch.rand(100, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    >>> w[:, 2] = 0
    >>> res = expert_pca(H, w)
    >>> res.eigenvalues.shape, res.dead.tolist()
    (torch.Size([3, 4]), [False, False, True])

    Chapter 1 (book/chapter1.ipynb).
    """
    if not isinstance(weights_NE, torch.Tensor) or weights_NE.dim() != 2:
        raise ValueError("weights_NE must be a 2-d tensor (N, E)")
    N, E = weights_NE.shape
    if not isinstance(H, torch.Tensor) or not H.is_floating_point() or H.dim() not in (2, 3) or H.shape[0] != N \
            or (H.dim() == 3 and H.shape[1] != E):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"H={shape} must be a floating tensor (N={N}, D) or (N={N}, E={E}, D)")
    dtype = torch.promote_types(H.dtype, weights_NE.dtype) if weights_NE.is_floating_point() else H.dtype
    w_EN = weights_NE.to(device=H.device, dtype=dtype).T
    _check_weights(w_EN, "weights_NE")
    H = H.to(dtype)
    H_END = H.unsqueeze(0).expand(E, -1, -1) if H.dim() == 2 else H.transpose(0, 1)
    return _pca_batched(H_END, w_EN.contiguous())


def effective_rank(values: torch.Tensor, kind: str, *, fraction: float = 0.9) -> torch.Tensor:
    """Effective rank of a nonnegative spectrum along the last dim (batched over leading dims).

    ``kind``: "entropy" = exp(−Σ p log p), p = λ/Σλ; "participation" = (Σλ)²/Σλ²; "threshold" = smallest k
    with Σ_{j≤k} λ_(j) ≥ fraction·Σλ (values sorted descending inside). An all-zero spectrum gives 0; a
    spectrum with NaN gives NaN. Returns a floating tensor of the leading shape.

    >>> effective_rank(torch.ones(4), "entropy"), effective_rank(torch.ones(4), "participation")
    (tensor(4.), tensor(4.))
    >>> effective_rank(torch.tensor([5., 3., 1., 1.]), "threshold", fraction=0.8)
    tensor(2.)
    >>> effective_rank(torch.zeros(3), "entropy")
    tensor(0.)

    Chapter 1 (book/chapter1.ipynb).
    """
    if kind not in EFFECTIVE_RANK_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {EFFECTIVE_RANK_KINDS}")
    lam = torch.as_tensor(values)
    if not lam.is_floating_point():
        lam = lam.to(torch.get_default_dtype())
    if lam.dim() == 0:
        raise ValueError("values must have at least one dimension (the spectrum)")
    if (lam < 0).any():
        raise ValueError(f"values must be >= 0 (a spectrum); got min {float(lam[lam < 0].min())}")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    total = lam.sum(-1)
    zero = total == 0
    safe = torch.where(zero, torch.ones_like(total), total)
    if kind == "entropy":
        p = lam / safe[..., None]
        ent = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        out = torch.exp(ent.sum(-1))
    elif kind == "participation":
        p = lam / safe[..., None]                    # normalise first: no under/overflow of λ² for tiny/huge λ
        out = 1.0 / torch.where(zero, torch.ones_like(total), (p * p).sum(-1))
    else:
        R = lam.shape[-1]
        csum = torch.sort(lam, dim=-1, descending=True).values.cumsum(-1)
        tol = torch.finfo(lam.dtype).eps * R * safe
        reached = csum >= (fraction * safe - tol)[..., None]
        out = (~reached).sum(-1).to(lam.dtype) + 1.0
        out = torch.minimum(out, torch.full_like(out, float(R)))
    out = torch.where(zero, torch.zeros_like(out), out)
    return torch.where(torch.isnan(total), torch.full_like(out, float("nan")), out)
