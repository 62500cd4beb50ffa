"""Principal angles, Grassmann distances, and per-expert routed subspaces with their references.

Shape legend: N points (tokens), D vector width, E experts, K top-k, R subspace rank (number of principal
angles), M pooled points, S random draws, ``...`` batch dims.

Principal angles (paper-2 spec §2.4d) between span(A) and span(B), A (D, r1), B (D, r2), r = min(r1, r2): with
orthonormal bases Q_A, Q_B (QR inside), ``cos θ_m`` are the singular values of ``Q_Aᵀ Q_B``, and ``sin θ_m`` those
of the residual ``Q_s − Q_l (Q_lᵀ Q_s)`` (Q_s the basis with fewer columns). Angles below π/4 come from the sines
(arcsin), the others from the cosines (arccos), as ``scipy.linalg.subspace_angles`` does: arccos alone loses all
accuracy below ~1e-8. Angles are returned ascending in [0, π/2]. Distances::

    geodesic (arc length)   d_geo  = ‖θ‖₂                              max (π/2)·√r
    chordal = projection    d_proj = ‖sin θ‖₂ = ‖P_A − P_B‖_F / √2      max √r     (P = Q Qᵀ)
    overlap                 ov     = mean cos² θ = ‖Q_Aᵀ Q_B‖_F² / r    in [0, 1]  (a similarity, not a distance)

normalised distances divide by their maxima (r = the smaller rank). For independent uniformly random subspaces
E[ov] = max(r1, r2) / D, so in high dimension random subspaces are nearly maximally distant.

Routed subspaces (§2.4c): for expert e, the points routed to it (w_ne > 0: its inputs, or its outputs) with
weights w_ne (gate values, top-k membership or arg-max membership), the weighted PCA of
:func:`~moewidgets.geometry.expert_pca`; its basis is the leading r_e eigenvectors, r_e fixed (``rank=r``) or
the smallest r reaching a fraction of the variance (``variance=0.9``). Every distance comes with references
(design: every "low" or "high" has a reference):

* random-token-group null: groups drawn at random from the pooled routed points, one per expert with that
  expert's size and (shuffled) weights, fitted with the same rank rule; a distance between two such groups is
  what routing that ignored the geometry would give (groups from one pool estimate one subspace, so this null
  is low: a router that separates the representation puts its experts above it, not below as paper-2 spec
  GA-3 phrases it);
* same-expert split-half floor: each expert's routed points split at random into halves, the distance between
  the halves' subspaces (sampling noise; measured at half the sample size, so it slightly overstates the noise
  of a full-size estimate);
* isotropic reference: Haar-random subspaces of the same ranks in R^D (unrelated directions: the top of the scale).

Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .alignment import make_generator
from .pca import WeightedPCA, effective_rank, expert_pca

__all__ = ["principal_angles", "grassmann_distance", "subspace_overlap", "GRASSMANN_KINDS", "SUBSPACE_METRICS",
           "ROUTING_WEIGHTINGS", "routing_weights", "RoutedSubspaces", "routed_subspaces", "trace_subspaces",
           "subspace_distance_matrix", "SubspaceReferences", "subspace_references", "SubspaceComparison",
           "compare_subspaces", "metric_from_angles"]

GRASSMANN_KINDS = ("geodesic", "chordal", "projection")          # "projection" is an alias of "chordal"
SUBSPACE_METRICS = GRASSMANN_KINDS + ("overlap",)
ROUTING_WEIGHTINGS = ("gates", "membership", "argmax")
PAIR_RANKS = ("min", "full")
_PCA_CHUNK_ELEMENTS = 1 << 26      # (n_max·D + D²) elements per group times groups per batched PCA chunk


# ------------------------------------------------------------------------------------------- principal angles

def _to_torch(A, B) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both inputs as torch tensors of one floating dtype; the flag says whether they came as numpy arrays."""
    a_np, b_np = isinstance(A, np.ndarray), isinstance(B, np.ndarray)
    a_t, b_t = isinstance(A, torch.Tensor), isinstance(B, torch.Tensor)
    if not ((a_np and b_np) or (a_t and b_t)):
        raise ValueError(f"A ({type(A).__name__}) and B ({type(B).__name__}) must both be numpy arrays or both "
                         "torch tensors")
    if a_np:
        if np.iscomplexobj(A) or np.iscomplexobj(B):
            raise ValueError("A and B must be real; complex bases are not supported")
        A, B = torch.from_numpy(np.asarray(A)), torch.from_numpy(np.asarray(B))
        default = torch.float64                                    # numpy's default float
    else:
        if A.is_complex() or B.is_complex():
            raise ValueError("A and B must be real; complex bases are not supported")
        default = torch.get_default_dtype()
    dtype = torch.promote_types(A.dtype if A.is_floating_point() else default,
                                B.dtype if B.is_floating_point() else default)
    dtype = torch.promote_types(dtype, torch.float32)               # QR/SVD need float32 or float64
    return A.to(dtype), B.to(dtype), a_np


def _check_bases(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must be (..., D, r) bases (columns span "
                         "the subspace)")
    D = A.shape[-2]
    if B.shape[-2] != D:
        raise ValueError(f"A has D={D} rows but B has D={B.shape[-2]}; both bases must live in the same R^D")
    for name, M in (("A", A), ("B", B)):
        r = M.shape[-1]
        if not 1 <= r <= D:
            raise ValueError(f"{name} has r={r} columns; a basis of a subspace of R^{D} needs 1 <= r <= D={D}")
    try:
        torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the batch dims of A {tuple(A.shape[:-2])} and B {tuple(B.shape[:-2])} must broadcast")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError("A and B must be finite")


def _orthonormal(M: torch.Tensor, name: str) -> torch.Tensor:
    """Q of the reduced QR; a ValueError if the columns are linearly dependent (no basis)."""
    Q, R = torch.linalg.qr(M)
    diag = R.diagonal(dim1=-2, dim2=-1).abs()
    tol = diag.amax(-1, keepdim=True) * max(M.shape[-2:]) * torch.finfo(M.dtype).eps
    if bool((diag <= tol).any()):
        raise ValueError(f"{name} has linearly dependent columns (rank < r={M.shape[-1]}): pass a basis")
    return Q


def _angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles of validated torch bases, ascending, (..., min(r1, r2))."""
    Qa, Qb = _orthonormal(A, "A"), _orthonormal(B, "B")
    batch = torch.broadcast_shapes(Qa.shape[:-2], Qb.shape[:-2])
    Qa = Qa.expand(*batch, *Qa.shape[-2:])
    Qb = Qb.expand(*batch, *Qb.shape[-2:])
    Qs, Ql = (Qa, Qb) if Qa.shape[-1] <= Qb.shape[-1] else (Qb, Qa)      # s: fewer columns
    C = Ql.transpose(-2, -1) @ Qs                                        # (..., r_l, r_s)
    cos = torch.linalg.svdvals(C).clamp(0.0, 1.0)                        # descending: ascending angles
    sin = torch.linalg.svdvals(Qs - Ql @ C).flip(-1).clamp(0.0, 1.0)     # ascending: ascending angles
    theta = torch.where(cos * cos >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return torch.sort(theta, dim=-1).values       # the arcsin/arccos switch may swap two rounding-close angles


def principal_angles(A, B):
    """Principal angles between span(A) and span(B), ascending, in radians in [0, π/2].

    ``cos θ`` = singular values of ``Q_Aᵀ Q_B``; angles below π/4 come from the sines (singular values of the
    residual of the smaller basis after projecting on the larger), so small angles are accurate (module
    docstring). The columns are orthonormalised inside (QR); they must be linearly independent.

    Args:
        A: (..., D, r1) basis, numpy array or torch tensor.
        B: (..., D, r2) basis of the same kind; leading batch dims broadcast (torch and numpy alike).

    Returns:
        (..., min(r1, r2)) angles, the same kind as the inputs (float64 for numpy, the promoted float dtype for
        torch, at least float32).

    >>> import numpy as np
    >>> A = np.eye(3)[:, :2]                              # the xy-plane
    >>> B = np.array([[1., 0.], [0., 1.], [0., 1.]])      # x and the diagonal y = z
    >>> principal_angles(A, B).round(6).tolist()
    [0.0, 0.785398]
    >>> principal_angles(torch.randn(5, 10, 3), torch.randn(5, 10, 2)).shape    # batched
    torch.Size([5, 2])

    Chapter 2 (book/chapter2.ipynb).
    """
    A, B, as_numpy = _to_torch(A, B)
    _check_bases(A, B)
    theta = _angles(A, B)
    return theta.numpy() if as_numpy else theta


def metric_from_angles(theta: torch.Tensor, metric: str = "geodesic", normalized: bool = False) -> torch.Tensor:
    """A Grassmann distance (or the overlap) from principal angles along the last dim; NaN entries are padding.

    ``geodesic`` ‖θ‖₂ (max (π/2)√r), ``chordal``/``projection`` ‖sin θ‖₂ (max √r), ``overlap`` mean cos² θ
    (``normalized`` does not apply), with r the number of non-NaN angles; NaN where r = 0.

    >>> theta = torch.tensor([0.0, math.pi / 2, float("nan")], dtype=torch.float64)
    >>> [round(float(metric_from_angles(theta, m, normalized=True)), 4) for m in ("geodesic", "chordal", "overlap")]
    [0.7071, 0.7071, 0.5]

    Chapter 2 (book/chapter2.ipynb).
    """
    if metric not in SUBSPACE_METRICS:
        raise ValueError(f"metric={metric!r} must be one of {SUBSPACE_METRICS}")
    valid = ~torch.isnan(theta)
    r = valid.sum(-1).to(theta.dtype)
    t = torch.where(valid, theta, torch.zeros_like(theta))
    if metric == "geodesic":
        value, top = (t * t).sum(-1).sqrt(), (math.pi / 2) * r.sqrt()
    elif metric in ("chordal", "projection"):
        s = torch.sin(t)
        value, top = (s * s).sum(-1).sqrt(), r.sqrt()
    else:
        c = torch.where(valid, torch.cos(t) ** 2, torch.zeros_like(t))
        value, top = c.sum(-1) / torch.where(r > 0, r, torch.ones_like(r)), torch.ones_like(r)
    if normalized:
        value = value / torch.where(r > 0, top, torch.ones_like(top))
    return torch.where(r > 0, value, torch.full_like(value, math.nan))


def _back(value: torch.Tensor, as_numpy: bool):
    if not as_numpy:
        return value
    arr = value.numpy()
    return arr[()] if arr.ndim == 0 else arr


def grassmann_distance(A, B, kind: str = "geodesic", normalized: bool = False):
    """Grassmann distance between span(A) and span(B) from their principal angles θ (:func:`principal_angles`).

    ``kind="geodesic"``: ``‖θ‖₂``, max (π/2)·√r; ``"chordal"`` (alias ``"projection"``): ``‖sin θ‖₂ =
    ‖P_A − P_B‖_F / √2``, max √r; r = min(r1, r2). ``normalized=True`` divides by the maximum, giving [0, 1].

    Args:
        A, B: (..., D, r1) and (..., D, r2) bases, both numpy or both torch; batch dims broadcast.

    Returns:
        (...) distances, the same kind as the inputs (a numpy scalar for one numpy pair).

    >>> import numpy as np
    >>> A, B = np.eye(4)[:, :2], np.eye(4)[:, 2:]                 # orthogonal planes
    >>> round(float(grassmann_distance(A, B)), 6), float(grassmann_distance(A, B, normalized=True))
    (2.221441, 1.0)
    >>> float(grassmann_distance(A, A, "chordal"))
    0.0

    Chapter 2 (book/chapter2.ipynb).
    """
    if kind not in GRASSMANN_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {GRASSMANN_KINDS}")
    A, B, as_numpy = _to_torch(A, B)
    _check_bases(A, B)
    return _back(metric_from_angles(_angles(A, B), kind, normalized), as_numpy)


def subspace_overlap(A, B):
    """Subspace overlap ``ov = ‖Q_Aᵀ Q_B‖_F² / r = ‖P_A P_B‖_F² / r = mean_m cos² θ_m`` in [0, 1].

    Computed as the squared Frobenius norm of ``Q_Aᵀ Q_B`` (orthonormal bases by QR) over r = min(r1, r2): 1 when
    the smaller subspace lies inside the larger, 0 when they are orthogonal, ≈ max(r1, r2)/D for random ones.

    >>> import numpy as np
    >>> A = np.eye(3)[:, :2]
    >>> B = np.array([[1., 0.], [0., 1.], [0., 1.]])
    >>> round(float(subspace_overlap(A, B)), 6)                  # (cos² 0 + cos² π/4) / 2
    0.75

    Chapter 2 (book/chapter2.ipynb).
    """
    A, B, as_numpy = _to_torch(A, B)
    _check_bases(A, B)
    Qa, Qb = _orthonormal(A, "A"), _orthonormal(B, "B")
    r = min(Qa.shape[-1], Qb.shape[-1])
    ov = (Qa.transpose(-2, -1) @ Qb).square().sum((-2, -1)) / r
    return _back(ov, as_numpy)


# --------------------------------------------------------------------------------------------- routing weights

def routing_weights(trace, weighting: str = "gates") -> torch.Tensor:
    """Routing weights (T, E) from a :class:`~moewidgets.trace.RoutingTrace`.

    ``"gates"``: the gate value of each selected expert (``trace.gate_matrix()``, zero off-route);
    ``"membership"``: 1 for each of the k selected experts (``trace.membership()``); ``"argmax"``: 1 for the
    selected expert with the largest gate only, a partition of the tokens, which is what makes per-expert
    subspaces comparable under fully soft routing (k = E, where every expert receives every token).

    >>> from moewidgets.trace import RoutingTrace
    >>> tr = RoutingTrace(torch.zeros(2, 3), None, torch.tensor([[2, 0], [1, 2]]),
    ...                   torch.tensor([[.75, .25], [.5, .5]]), n_experts=3)
    >>> routing_weights(tr, "gates").tolist()
    [[0.25, 0.0, 0.75], [0.0, 0.5, 0.5]]
    >>> routing_weights(tr, "membership").tolist(), routing_weights(tr, "argmax").tolist()
    ([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])

    Chapter 2 (book/chapter2.ipynb).
    """
    if weighting not in ROUTING_WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} must be one of {ROUTING_WEIGHTINGS}")
    if weighting == "gates":
        return trace.gate_matrix()
    if weighting == "membership":
        return trace.membership()
    g = trace.gates_TK
    out_TE = torch.zeros(trace.n_tokens, trace.n_experts, dtype=g.dtype, device=g.device)
    return out_TE.scatter_(1, trace.idx_TK.gather(1, _top_slot(g)), 1.0)


def _top_slot(gates_TK: torch.Tensor) -> torch.Tensor:
    """The slot of each token's largest gate, (T, 1). Not always slot 0: fully soft routing (k = E) lists the
    experts in index order, not by score."""
    return gates_TK.argmax(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------- group fitting

@dataclass
class _Fit:
    """Weighted-PCA fits of G point groups: bases (D, r_g) or None where degenerate."""

    bases: list
    ranks: list            # r_g from the rank rule (0: zero variance)
    numerical_ranks: list  # eigenvalues above the round-off level
    eigenvalues: torch.Tensor   # (G, D)
    n_eff: torch.Tensor         # (G,)


def _thin_pca(H_nGD: torch.Tensor, w_nG: torch.Tensor) -> WeightedPCA:
    """:func:`~moewidgets.geometry.expert_pca`'s numbers through the thin SVD of the weighted centred rows
    ``√(w/W)(h − μ)`` (their right singular vectors are the covariance's eigenvectors, λ = σ²): O(n²·D) instead
    of an O(D³) eigendecomposition, used when a group has fewer points than dimensions (Hugging Face sizes).
    Components: the n leading eigenvectors only; eigenvalues padded with zeros to D."""
    n, G, D = H_nGD.shape
    W_G = w_nG.sum(0)
    dead_G = W_G <= 0
    q_nG = w_nG / torch.where(dead_G, torch.ones_like(W_G), W_G)
    mu_GD = torch.einsum("ng,ngd->gd", q_nG, H_nGD)
    Z_GnD = ((H_nGD - mu_GD) * q_nG.sqrt()[..., None]).transpose(0, 1)
    _, S_Gn, Vh_GnD = torch.linalg.svd(Z_GnD, full_matrices=False)
    lam_GD = H_nGD.new_zeros(G, D)
    lam_GD[:, :S_Gn.shape[1]] = S_Gn.square()
    n_eff = torch.where(dead_G, torch.zeros_like(W_G), W_G.square() / w_nG.square().sum(0).clamp_min(
        torch.finfo(W_G.dtype).tiny))
    nan = torch.full((), math.nan, dtype=H_nGD.dtype, device=H_nGD.device)
    return WeightedPCA(torch.where(dead_G[:, None], nan, lam_GD), Vh_GnD.transpose(1, 2), mu_GD, W_G, n_eff, dead_G)


def _fit_groups(pool_MD: torch.Tensor, groups: list, weights: list, rank: int | None,
                variance: float | None) -> _Fit:
    """Weighted PCA of each group of pool rows (batched, zero-weight padding), then the rank rule. Groups of
    fewer points than dimensions go through the thin SVD (:func:`_thin_pca`), the others through
    :func:`~moewidgets.geometry.expert_pca`."""
    D = pool_MD.shape[1]
    G = len(groups)
    n_max = max([int(ix.numel()) for ix in groups] + [1])
    per_chunk = max(1, _PCA_CHUNK_ELEMENTS // (n_max * D + D * D))
    eps = torch.finfo(pool_MD.dtype).eps
    bases, ranks, nranks, eigs, neffs = [], [], [], [], []
    for start in range(0, G, per_chunk):
        chunk = range(start, min(G, start + per_chunk))
        H_nGD = pool_MD.new_zeros(n_max, len(chunk), D)      # padded rows carry weight 0
        w_nG = pool_MD.new_zeros(n_max, len(chunk))
        for c, g in enumerate(chunk):
            n = int(groups[g].numel())
            H_nGD[:n, c] = pool_MD[groups[g]]
            w_nG[:n, c] = weights[g]
        pca = expert_pca(H_nGD, w_nG) if n_max >= D else _thin_pca(H_nGD, w_nG)
        # round-off level of a centred covariance: identical points leave eigenvalues ~ (eps·|h|)², not 0
        m2_G = (w_nG * H_nGD.square().sum(-1)).sum(0) / w_nG.sum(0).clamp_min(torch.finfo(w_nG.dtype).tiny)
        for c in range(len(chunk)):
            lam = pca.eigenvalues[c]
            floor = float((D * eps) ** 2 * m2_G[c])
            if bool(pca.dead[c]) or not float(lam[0]) > floor:
                r, nr = 0, 0                                   # no routed points, or zero variance
            else:
                r = rank if rank is not None else int(effective_rank(lam, "threshold", fraction=variance))
                nr = int((lam > max(float(lam[0]) * D * eps, floor)).sum())
            ranks.append(r)
            nranks.append(nr)
            bases.append(pca.components[c, :, :r].clone() if 0 < r <= nr else None)
        eigs.append(pca.eigenvalues)
        neffs.append(pca.n_eff)
    eig = torch.cat(eigs) if eigs else pool_MD.new_zeros(0, D)
    neff = torch.cat(neffs) if neffs else pool_MD.new_zeros(0)
    return _Fit(bases, ranks, nranks, eig, neff)


def _check_rule(rank, variance, D: int, min_tokens) -> None:
    if (rank is None) == (variance is None):
        raise ValueError(f"pass exactly one of rank (a fixed subspace rank) or variance (a variance fraction); "
                         f"got rank={rank!r}, variance={variance!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= D):
        raise ValueError(f"rank={rank!r} must be an integer in 1..D={D}")
    if variance is not None and (isinstance(variance, bool) or not isinstance(variance, (int, float))
                                 or not 0 < variance <= 1):
        raise ValueError(f"variance={variance!r} must be a fraction in (0, 1]")
    if min_tokens is not None and (isinstance(min_tokens, bool) or not isinstance(min_tokens, int)
                                   or min_tokens < 1):
        raise ValueError(f"min_tokens={min_tokens!r} must be a positive integer or None (None: 5·rank, spec §2.4c)")


# ------------------------------------------------------------------------------------------ routed subspaces

@dataclass
class RoutedSubspaces:
    """Per-expert weighted-PCA subspaces of routed points (module docstring).

    Fields::

        bases:          list of E entries, (D, r_e) orthonormal leading eigenvectors of the expert's weighted
                        covariance (descending eigenvalue), or None where the expert was skipped.
        ranks:          (E,) int64 r_e (the rank rule's value; 0 where skipped).
        n_tokens:       (E,) int64 routed points (weight > 0).
        n_eff:          (E,) effective sample size (Σw)² / Σw² (0 without routed points).
        explained:      (E,) fraction of the expert's weighted variance inside its basis (NaN where skipped).
        eigenvalues:    (E, D) covariance eigenvalues, descending (NaN without routed points).
        kept:           (E,) bool.
        skipped:        {expert: reason} for every skipped expert, e.g. "expert 3: 2 routed tokens < min_tokens=16".
        rank, variance: the rank rule (one of them is None).
        min_tokens:     the token threshold given (None: n_e >= 5·r_e, spec §2.4c).
        space:          what the points are ("inputs", "outputs" or "points").
        weighting:      "gates" | "membership" | "argmax" when built from a trace, else None.
        pool_MD:        the pooled routed points the references draw from (M, D).
        groups:         per expert, indices into pool_MD of its routed points (n_e,).
        group_weights:  per expert, the weights of those points (n_e,).
    """

    bases: list
    ranks: torch.Tensor
    n_tokens: torch.Tensor
    n_eff: torch.Tensor
    explained: torch.Tensor
    eigenvalues: torch.Tensor
    kept: torch.Tensor
    skipped: dict
    rank: int | None
    variance: float | None
    min_tokens: int | None
    space: str
    weighting: str | None
    pool_MD: torch.Tensor = field(repr=False)
    groups: list = field(repr=False)
    group_weights: list = field(repr=False)

    @property
    def n_experts(self) -> int:
        return len(self.bases)

    @property
    def kept_experts(self) -> list[int]:
        """Indices of the experts with a basis."""
        return [e for e, b in enumerate(self.bases) if b is not None]

    def distance_matrix(self, metric: str = "geodesic", normalized: bool = True, pair_rank: str = "min"
                        ) -> torch.Tensor:
        """:func:`subspace_distance_matrix` of these subspaces."""
        return subspace_distance_matrix(self, metric, normalized, pair_rank)


def _min_tokens_ok(n: int, r: int, min_tokens: int | None) -> bool:
    return n >= (min_tokens if min_tokens is not None else 5 * r)


def _fit_experts(pool_MD, groups, weights, rank, variance, min_tokens, space, weighting) -> RoutedSubspaces:
    D = pool_MD.shape[1]
    E = len(groups)
    fit = _fit_groups(pool_MD, groups, weights, rank, variance)
    bases, skipped = [], {}
    n_E = torch.tensor([int(ix.numel()) for ix in groups], dtype=torch.long)
    explained = torch.full((E,), math.nan, dtype=pool_MD.dtype)
    for e in range(E):
        n, r, nr = int(n_E[e]), fit.ranks[e], fit.numerical_ranks[e]
        if n == 0:
            reason = f"expert {e}: no routed tokens"
        elif min_tokens is not None and n < min_tokens:
            reason = f"expert {e}: {n} routed tokens < min_tokens={min_tokens}"
        elif r == 0:
            reason = f"expert {e}: zero variance (all {n} routed points are equal)"
        elif min_tokens is None and n < 5 * r:
            reason = f"expert {e}: {n} routed tokens < 5·rank={5 * r} (rank={r}; min_tokens=None means 5·rank)"
        elif nr < r:
            reason = f"expert {e}: its {n} routed points span only {nr} directions < rank={r}"
        else:
            reason = None
        if reason is None:
            bases.append(fit.bases[e])
            lam = fit.eigenvalues[e]
            explained[e] = float(lam[:r].sum() / lam.sum())
        else:
            bases.append(None)
            skipped[e] = reason
    kept = torch.tensor([b is not None for b in bases], dtype=torch.bool)
    ranks = torch.tensor([fit.ranks[e] if kept[e] else 0 for e in range(E)], dtype=torch.long)
    eig = fit.eigenvalues.cpu() if E else pool_MD.new_zeros(0, D)
    return RoutedSubspaces(bases=bases, ranks=ranks, n_tokens=n_E, n_eff=fit.n_eff.cpu(), explained=explained,
                           eigenvalues=eig, kept=kept, skipped=skipped, rank=rank,
                           variance=None if variance is None else float(variance), min_tokens=min_tokens,
                           space=space, weighting=weighting, pool_MD=pool_MD, groups=groups, group_weights=weights)


def _work_dtype(*dtypes) -> torch.dtype:
    dtype = torch.float32
    for d in dtypes:
        if d.is_floating_point:
            dtype = torch.promote_types(dtype, d)
    return dtype


def routed_subspaces(H: torch.Tensor, weights_NE: torch.Tensor, *, rank: int | None = None,
                     variance: float | None = None, min_tokens: int | None = None,
                     space: str = "points") -> RoutedSubspaces:
    """Each expert's routed subspace: the leading weighted-PCA directions of the points routed to it.

    Expert e uses the rows n with ``w_ne > 0`` and weights w_ne (gate values, or 0/1 membership, see
    :func:`routing_weights`): ``μ_e = Σ w h / W``, ``C_e = Σ w (h − μ_e)(h − μ_e)ᵀ / W`` (centred; the PCA of
    :func:`~moewidgets.geometry.expert_pca`), basis U_e = the r_e leading eigenvectors. The rank is fixed
    (``rank=r``) or the smallest r with Σ_{j≤r} λ_j ≥ variance·Σλ (``variance=0.9``); exactly one of the two.
    Experts are skipped, with the reason kept in ``skipped``, when they have no routed token, fewer than
    ``min_tokens`` (default None: fewer than 5·r_e, spec §2.4c), zero variance, or fewer than r_e nonzero
    variance directions. Arithmetic in float32 at least (float64 stays float64).

    Args:
        H: (N, D) points shared by all experts (e.g. the layer inputs), or (N, E, D) per expert (e.g. each
            expert's output at each token; only the routed entries are read).
        weights_NE: (N, E) routing weights ≥ 0.
        space: a label for what the points are ("inputs", "outputs", ...).

    >>> g = torch.Generator().manual_seed(0)
    >>> H = torch.randn(200, 4, generator=g, dtype=torch.float64) * torch.tensor([3., 2., .1, .1], dtype=torch.float64)
    >>> H[100:] = H[100:][:, [2, 3, 0, 1]]             # the second hundred vary in the last two coordinates
    >>> w = torch.zeros(200, 3, dtype=torch.float64)
    >>> w[:100, 0] = 1; w[100:, 1] = 1; w[:4, 2] = 1
    >>> sub = routed_subspaces(H, w, rank=2)
    >>> sub.ranks.tolist(), sub.n_tokens.tolist(), sub.skipped
    ([2, 2, 0], [100, 100, 4], {2: 'expert 2: 4 routed tokens < 5·rank=10 (rank=2; min_tokens=None means 5·rank)'})
    >>> D = sub.distance_matrix("geodesic", normalized=True)
    >>> bool(D[0, 1] > 0.95), bool(D[0, 2].isnan())
    (True, True)

    Chapter 2 (book/chapter2.ipynb).
    """
    if not isinstance(weights_NE, torch.Tensor) or weights_NE.dim() != 2:
        got = tuple(weights_NE.shape) if isinstance(weights_NE, torch.Tensor) else type(weights_NE).__name__
        raise ValueError(f"weights_NE must be a 2-d tensor (N, E); got {got}")
    N, E = weights_NE.shape
    if not isinstance(H, torch.Tensor) or not H.is_floating_point() or H.dim() not in (2, 3) or H.shape[0] != N \
            or (H.dim() == 3 and H.shape[1] != E):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"H={shape} must be a floating tensor (N={N}, D) or (N={N}, E={E}, D)")
    D = H.shape[-1]
    _check_rule(rank, variance, D, min_tokens)
    w = weights_NE.detach()
    if not torch.isfinite(w).all() or bool((w < 0).any()):
        raise ValueError("weights_NE must be finite and >= 0")
    dtype = _work_dtype(H.dtype, w.dtype)
    H = H.detach().to(dtype)
    w = w.to(device=H.device, dtype=dtype)
    routed_NE = w > 0
    if H.dim() == 2:                       # pool: the tokens routed to any expert; groups index into it
        any_N = routed_NE.any(1)
        pool_MD = H[any_N]
        row_in_pool = torch.cumsum(any_N.long(), 0) - 1
        groups = [row_in_pool[routed_NE[:, e]] for e in range(E)]
    else:
        rows = [routed_NE[:, e].nonzero(as_tuple=True)[0] for e in range(E)]
        pool_MD = torch.cat([H[r, e] for e, r in enumerate(rows)]) if E else H.new_zeros(0, D)
        offsets = np.cumsum([0] + [int(r.numel()) for r in rows])
        groups = [torch.arange(int(offsets[e]), int(offsets[e + 1]), device=H.device) for e in range(E)]
    weights = [w[routed_NE[:, e], e] for e in range(E)]
    return _fit_experts(pool_MD, groups, weights, rank, variance, min_tokens, space, None)


def trace_subspaces(trace, *, space: str = "inputs", weighting: str = "gates", rank: int | None = None,
                    variance: float | None = None, min_tokens: int | None = None) -> RoutedSubspaces:
    """:func:`routed_subspaces` of a :class:`~moewidgets.trace.RoutingTrace` (ours or a Hugging Face model's).

    ``space="inputs"``: the layer inputs ``x_TD`` routed to each expert (the "routed representations", the
    primary, §2.7.4); ``"outputs"``: each expert's own ungated outputs on its routed tokens (needs
    ``trace.expert_out_TKD``, ``trace_layer(..., with_expert_outputs=True)``). ``weighting``: "gates",
    "membership" or "argmax" (:func:`routing_weights`); under fully soft routing only "gates" or "argmax" give
    distinct subspaces (§2.7.3).

    >>> from moewidgets import MoEConfig, build_model, trace_model
    >>> model = build_model(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16))
    >>> tr = trace_model(model, torch.randn(400, 8, generator=torch.Generator().manual_seed(0)))
    >>> sub = trace_subspaces(tr, rank=3)
    >>> sub.distance_matrix().shape, sub.space, sub.weighting
    (torch.Size([4, 4]), 'inputs', 'gates')

    Chapter 2 (book/chapter2.ipynb).
    """
    if space not in ("inputs", "outputs"):
        raise ValueError(f"space={space!r} must be 'inputs' or 'outputs'")
    if weighting not in ROUTING_WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} must be one of {ROUTING_WEIGHTINGS}")
    D = int(trace.x_TD.shape[1])
    _check_rule(rank, variance, D, min_tokens)
    if space == "inputs":
        res = routed_subspaces(trace.x_TD, routing_weights(trace, weighting), rank=rank, variance=variance,
                               min_tokens=min_tokens, space="inputs")
        res.weighting = weighting
        return res
    out_TKD = trace.expert_out_TKD
    if out_TKD is None:
        raise ValueError("trace.expert_out_TKD is None: space='outputs' needs the experts' outputs; trace the "
                         "layer with trace_layer(..., with_expert_outputs=True)")
    T, K = trace.idx_TK.shape
    E = int(trace.n_experts)
    dtype = _work_dtype(out_TKD.dtype, trace.gates_TK.dtype)
    pool_MD = out_TKD.detach().to(dtype).reshape(T * K, -1)                # (T·K, D), row t·K + k
    idx_P = trace.idx_TK.reshape(-1).to(pool_MD.device)
    if weighting == "gates":
        w_P = trace.gates_TK.detach().to(device=pool_MD.device, dtype=dtype).reshape(-1)
    else:
        w_P = pool_MD.new_ones(T * K)
        if weighting == "argmax":                                           # each token's top-gate slot only
            top_T = _top_slot(trace.gates_TK).reshape(-1).to(pool_MD.device)
            w_P = w_P * (torch.arange(T * K, device=pool_MD.device) % K == top_T.repeat_interleave(K))
    groups = [((idx_P == e) & (w_P > 0)).nonzero(as_tuple=True)[0] for e in range(E)]
    weights = [w_P[g] for g in groups]
    return _fit_experts(pool_MD, groups, weights, rank, variance, min_tokens, "outputs", weighting)


# ----------------------------------------------------------------------------------------- pairwise distances

def _truncate(Ua: torch.Tensor, Ub: torch.Tensor, pair_rank: str) -> tuple[torch.Tensor, torch.Tensor]:
    if pair_rank == "min":
        r = min(Ua.shape[-1], Ub.shape[-1])
        return Ua[:, :r], Ub[:, :r]
    return Ua, Ub


def _pair_angles(pairs: list, pair_rank: str) -> list:
    """Principal angles (a 1-d tensor each) for a list of (U_a, U_b) pairs (None → None), batched by shapes."""
    out = [None] * len(pairs)
    by_shape: dict = {}
    for p, (Ua, Ub) in enumerate(pairs):
        if Ua is None or Ub is None:
            continue
        Ua, Ub = _truncate(Ua, Ub, pair_rank)
        by_shape.setdefault((Ua.shape[-1], Ub.shape[-1]), []).append((p, Ua, Ub))
    for items in by_shape.values():
        theta = _angles(torch.stack([a for _, a, _ in items]), torch.stack([b for _, _, b in items]))
        for (p, _, _), t in zip(items, theta):
            out[p] = t
    return out


def _pad(angle_list: list, shape: tuple, R: int, dtype) -> torch.Tensor:
    """Stack 1-d angle tensors (None = all NaN) into (*shape, R), NaN-padded."""
    out = torch.full((len(angle_list), R), math.nan, dtype=dtype)
    for p, t in enumerate(angle_list):
        if t is not None:
            out[p, :t.shape[0]] = t.cpu().to(dtype)
    return out.reshape(*shape, R)


def _check_metric(metric: str, pair_rank: str) -> None:
    if metric not in SUBSPACE_METRICS:
        raise ValueError(f"metric={metric!r} must be one of {SUBSPACE_METRICS}")
    if pair_rank not in PAIR_RANKS:
        raise ValueError(f"pair_rank={pair_rank!r} must be one of {PAIR_RANKS} ('min': both bases truncated to "
                         "the smaller rank of the pair, spec §2.4c; 'full': as they are)")


def _expert_angles(bases: list, pair_rank: str) -> torch.Tensor:
    """(E, E, R) principal angles between all experts (NaN-padded; the diagonal holds each basis vs itself)."""
    E = len(bases)
    pairs = [(bases[i], bases[j]) for i in range(E) for j in range(E)]
    ang = _pair_angles(pairs, pair_rank)
    R = max([t.shape[0] for t in ang if t is not None] + [1])
    dtype = next((b.dtype for b in bases if b is not None), torch.float64)
    A = _pad(ang, (E, E), R, dtype)
    for e in range(E):                          # a subspace is at angle 0 from itself (no round-off)
        if bases[e] is not None:
            A[e, e] = torch.where(torch.isnan(A[e, e]), A[e, e], torch.zeros_like(A[e, e]))
    return A


def subspace_distance_matrix(subspaces, metric: str = "geodesic", normalized: bool = True,
                             pair_rank: str = "min") -> torch.Tensor:
    """Pairwise (E, E) Grassmann distances (or overlaps) between the experts' subspaces; NaN for skipped experts.

    ``metric``: "geodesic" ‖θ‖₂, "chordal"/"projection" ‖sin θ‖₂, "overlap" mean cos² θ (module docstring);
    ``normalized`` divides distances by their maxima. ``pair_rank="min"`` truncates both bases of a pair to the
    smaller rank (leading directions; spec §2.4c "capped at the minimum across the pair"), ``"full"`` compares
    them as they are (min(r_i, r_j) angles either way). Results are on the CPU.

    Args:
        subspaces: a :class:`RoutedSubspaces`, or a list of (D, r_e) bases (None = skipped).

    >>> I = torch.eye(4, dtype=torch.float64)
    >>> subspace_distance_matrix([I[:, :2], I[:, 2:], None], "chordal", normalized=True)
    tensor([[0., 1., nan],
            [1., 0., nan],
            [nan, nan, nan]], dtype=torch.float64)

    Chapter 2 (book/chapter2.ipynb).
    """
    _check_metric(metric, pair_rank)
    bases = subspaces.bases if isinstance(subspaces, RoutedSubspaces) else list(subspaces)
    return metric_from_angles(_expert_angles(bases, pair_rank), metric, normalized)


# ------------------------------------------------------------------------------------------------ references

@dataclass
class SubspaceReferences:
    """Principal angles of the reference subspaces of a :class:`RoutedSubspaces` (module docstring).

    Fields::

        group_angles:   (S, E, E, R) angles between random token groups sized (and weighted) like experts i and j,
                        draw s; NaN-padded, NaN on the diagonal and for skipped experts.
        split_angles:   (S2, E, R) angles between two random halves of expert e's routed points, split s.
        iso_angles:     (S, E, E, R) angles between Haar-random subspaces with the experts' ranks in R^D (one
                        independent subspace per expert per draw, truncated like the experts' bases).
        floor_eligible: (E,) bool, experts whose halves pass the token rule.
        floor_skipped:  {expert: reason} for kept experts without a split-half floor.
        n_draws, n_splits, pair_rank: the settings.
    """

    group_angles: torch.Tensor
    split_angles: torch.Tensor
    iso_angles: torch.Tensor
    floor_eligible: torch.Tensor
    floor_skipped: dict
    n_draws: int
    n_splits: int
    pair_rank: str


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def subspace_references(subspaces: RoutedSubspaces, *, generator: torch.Generator | int | None = None,
                        n_draws: int = 20, n_splits: int = 10, pair_rank: str = "min") -> SubspaceReferences:
    """The references of every expert-pair distance: random token groups, split halves, isotropic subspaces.

    * Random token groups (draw s = 1..n_draws): for each kept expert e, n_e points drawn without replacement
      from the pooled routed points ``pool_MD`` with e's weights in a random order, fitted with the same rank
      rule; the angles between the groups of i and j (as if routing ignored the geometry, with the same loads).
    * Split halves (s = 1..n_splits): each kept expert's routed points split at random into ⌊n/2⌋ and ⌈n/2⌉,
      both fitted with the same rank rule; eligible when the halves pass the token rule (⌊n/2⌋ ≥ min_tokens, or
      ≥ 5·r_e when min_tokens is None).
    * Isotropic: per draw, one Haar-random subspace per kept expert with its rank (the span of a Gaussian
      matrix), compared pairwise like the experts.

    All randomness comes from ``generator`` (a torch.Generator or int seed; None = seed 0), never the global RNG:
    the same seed gives the same references. Cost: n_draws·E + 2·n_splits·E weighted PCAs
    and n_draws·E·(E − 1) small principal-angle problems.

    >>> g = torch.Generator().manual_seed(0)
    >>> H = torch.randn(300, 6, generator=g, dtype=torch.float64)
    >>> w = torch.rand(300, 3, generator=g, dtype=torch.float64)
    >>> sub = routed_subspaces(H, w, rank=2)
    >>> ref = subspace_references(sub, generator=1, n_draws=4, n_splits=3)
    >>> ref.group_angles.shape, ref.split_angles.shape, ref.floor_eligible.tolist()
    (torch.Size([4, 3, 3, 2]), torch.Size([3, 3, 2]), [True, True, True])

    Chapter 2 (book/chapter2.ipynb).
    """
    if not isinstance(subspaces, RoutedSubspaces):
        raise ValueError(f"subspaces must be a RoutedSubspaces (routed_subspaces / trace_subspaces); got "
                         f"{type(subspaces).__name__}")
    _positive_int(n_draws, "n_draws")
    _positive_int(n_splits, "n_splits")
    _check_metric("geodesic", pair_rank)
    g = make_generator(generator)
    sub = subspaces
    E = sub.n_experts
    pool_MD = sub.pool_MD
    device, dtype = pool_MD.device, pool_MD.dtype
    D = pool_MD.shape[1]
    M = pool_MD.shape[0]
    kept = sub.kept_experts
    upper = [(i, j) for i in kept for j in kept if i < j]

    def on_device(ix: torch.Tensor) -> torch.Tensor:
        return ix.to(device)

    def scatter(angles: list, n_blocks: int) -> list:          # per block: (i, j) angles into a symmetric E×E list
        out = []
        for s in range(n_blocks):
            full = [None] * (E * E)
            for (i, j), t in zip(upper, angles[s * len(upper):(s + 1) * len(upper)]):
                full[i * E + j] = full[j * E + i] = t
            out.append(full)
        return out

    # random token groups: per draw, one group per kept expert (size and shuffled weights of that expert);
    # all draws are fitted in one batched PCA and their angles in one batched call
    idx, wts = [], []
    for _ in range(n_draws):
        for e in kept:
            n = int(sub.n_tokens[e])
            idx.append(on_device(torch.randperm(M, generator=g)[:n]))
            wts.append(sub.group_weights[e][on_device(torch.randperm(n, generator=g))])
    bases = _fit_groups(pool_MD, idx, wts, sub.rank, sub.variance).bases
    pairs = []
    for s in range(n_draws):
        basis = dict(zip(kept, bases[s * len(kept):(s + 1) * len(kept)]))
        pairs += [(basis[i], basis[j]) for i, j in upper]
    group_lists = scatter(_pair_angles(pairs, pair_rank), n_draws)

    # split halves
    floor_skipped, eligible = {}, []
    for e in kept:
        n, r = int(sub.n_tokens[e]), int(sub.ranks[e])
        if _min_tokens_ok(n // 2, r, sub.min_tokens):
            eligible.append(e)
        else:
            need = sub.min_tokens if sub.min_tokens is not None else 5 * r
            rule = f"min_tokens={sub.min_tokens}" if sub.min_tokens is not None else f"5·rank={5 * r}"
            floor_skipped[e] = f"expert {e}: halves of {n} routed tokens have {n // 2} < {rule} (need {need})"
    idx, wts = [], []
    for _ in range(n_splits):
        for e in eligible:
            n = int(sub.n_tokens[e])
            perm = on_device(torch.randperm(n, generator=g))
            for half in (perm[: n // 2], perm[n // 2:]):
                idx.append(sub.groups[e][half])
                wts.append(sub.group_weights[e][half])
    bases = _fit_groups(pool_MD, idx, wts, sub.rank, sub.variance).bases
    angles = _pair_angles([(bases[2 * a], bases[2 * a + 1]) for a in range(len(bases) // 2)], pair_rank)
    split_lists = []
    for s in range(n_splits):
        full = [None] * E
        for e, t in zip(eligible, angles[s * len(eligible):(s + 1) * len(eligible)]):
            full[e] = t
        split_lists.append(full)

    # isotropic: per draw, one Haar-random subspace per kept expert with its rank (columns of a Gaussian matrix)
    pairs = []
    for _ in range(n_draws):
        basis = {e: torch.randn(D, int(sub.ranks[e]), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
                 for e in kept}
        pairs += [(basis[i], basis[j]) for i, j in upper]
    iso_lists = scatter(_pair_angles(pairs, pair_rank), n_draws)

    def stack(lists: list, shape: tuple) -> torch.Tensor:
        R = max([t.shape[0] for lst in lists for t in lst if t is not None] + [1])
        return torch.stack([_pad(lst, shape, R, dtype) for lst in lists])

    return SubspaceReferences(group_angles=stack(group_lists, (E, E)), split_angles=stack(split_lists, (E,)),
                              iso_angles=stack(iso_lists, (E, E)),
                              floor_eligible=torch.tensor([e in eligible for e in range(E)], dtype=torch.bool),
                              floor_skipped=floor_skipped, n_draws=n_draws, n_splits=n_splits, pair_rank=pair_rank)


@dataclass
class SubspaceComparison:
    """Between-expert subspace distances next to their references, for one metric (module docstring).

    Pair-averaged statistics are means over the kept pairs i < j; their reference distributions are taken over
    draws (``*_mean``, ``*_sd`` and the central ``band`` interval ``*_lo``..``*_hi``).

    Fields::

        metric, normalized, pair_rank, band: the settings ("overlap" is a similarity: larger = closer).
        observed:        (E, E) expert-pair values (NaN for skipped experts; diagonal 0, or 1 for overlap).
        between_mean:    mean of ``observed`` over the kept pairs i < j (NaN with fewer than 2 kept experts).
        n_pairs:         number of kept pairs.
        group_null:      (E, E) mean over draws of the random-token-group value for pair (i, j).
        group_null_lo, group_null_hi: (E, E) its band over draws.
        group_null_mean, group_null_sd, group_null_lo_mean, group_null_hi_mean: the pair-averaged random-group
                         value over draws: mean, SD and band.
        floor:           (E,) mean over splits of expert e's split-half value (NaN where not eligible).
        floor_mean, floor_sd, floor_lo, floor_hi: the expert-averaged split-half value over splits.
        iso:             (E, E) mean over draws of the value between Haar-random subspaces of the pair's ranks.
        iso_mean, iso_sd, iso_lo, iso_hi: the pair-averaged isotropic value over draws.
        references:      the :class:`SubspaceReferences` (reuse it for another metric: same draws).
    """

    metric: str
    normalized: bool
    pair_rank: str
    band: float
    observed: torch.Tensor
    between_mean: float
    n_pairs: int
    group_null: torch.Tensor
    group_null_lo: torch.Tensor
    group_null_hi: torch.Tensor
    group_null_mean: float
    group_null_sd: float
    group_null_lo_mean: float
    group_null_hi_mean: float
    floor: torch.Tensor
    floor_mean: float
    floor_sd: float
    floor_lo: float
    floor_hi: float
    iso: torch.Tensor
    iso_mean: float
    iso_sd: float
    iso_lo: float
    iso_hi: float
    references: SubspaceReferences = field(repr=False)

    def summary(self) -> dict[str, float | int | str]:
        """The scalar numbers as a flat dict of plain Python values (a results row)."""
        keys = ("metric", "normalized", "pair_rank", "band", "between_mean", "n_pairs", "group_null_mean",
                "group_null_sd", "group_null_lo_mean", "group_null_hi_mean", "floor_mean", "floor_sd", "floor_lo",
                "floor_hi", "iso_mean", "iso_sd", "iso_lo", "iso_hi")
        return {k: getattr(self, k) for k in keys}


def _dist(samples: torch.Tensor, band: float) -> tuple[float, float, float, float]:
    """Mean, SD and central band of the finite entries of a 1-d sample (NaN when empty)."""
    x = samples[~torch.isnan(samples)].to(torch.float64)
    if x.numel() == 0:
        return (math.nan,) * 4
    sd = float(x.std()) if x.numel() > 1 else 0.0
    q = torch.quantile(x, torch.tensor([(1 - band) / 2, (1 + band) / 2], dtype=torch.float64))
    return float(x.mean()), sd, float(q[0]), float(q[1])


def compare_subspaces(subspaces: RoutedSubspaces, metric: str = "geodesic", normalized: bool = True, *,
                      references: SubspaceReferences | None = None,
                      generator: torch.Generator | int | None = None, n_draws: int = 20, n_splits: int = 10,
                      band: float = 0.95, pair_rank: str = "min") -> SubspaceComparison:
    """Between-expert distances with the random-token-group null, the split-half floor and the isotropic level.

    GA-2 ("distinct"): ``between_mean`` above the floor band; the random-group null tells how far groups of the
    same sizes drawn regardless of the geometry would be (a router that separates the representation sits
    above it). GA-3 ("partially overlapping"): ``between_mean`` well below the isotropic level (unrelated
    directions; for overlap, ov > r/D). References come from :func:`subspace_references` (computed here with
    ``generator``, ``n_draws``, ``n_splits`` unless ``references`` is given; pass the same references to compare
    several metrics on the same draws).

    >>> g = torch.Generator().manual_seed(0)
    >>> H = torch.randn(400, 6, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, 6, dtype=torch.float64)
    >>> w = torch.zeros(400, 2, dtype=torch.float64)
    >>> w[:200, 0] = 1; w[200:, 1] = 1
    >>> cmp = compare_subspaces(routed_subspaces(H, w, rank=2), "chordal", generator=0, n_draws=8, n_splits=4)
    >>> cmp.n_pairs, cmp.observed.shape, cmp.between_mean < cmp.iso_mean
    (1, torch.Size([2, 2]), True)

    Chapter 2 (book/chapter2.ipynb).
    """
    _check_metric(metric, pair_rank)
    if not isinstance(band, (int, float)) or isinstance(band, bool) or not 0 < band < 1:
        raise ValueError(f"band={band!r} must be in (0, 1) (0.95: the central 95% interval)")
    if references is None:
        references = subspace_references(subspaces, generator=generator, n_draws=n_draws, n_splits=n_splits,
                                         pair_rank=pair_rank)
    elif references.pair_rank != pair_rank:
        raise ValueError(f"references.pair_rank={references.pair_rank!r} differs from pair_rank={pair_rank!r}")
    E = subspaces.n_experts
    observed = subspace_distance_matrix(subspaces, metric, normalized, pair_rank)
    kept_E = subspaces.kept.cpu()
    upper = kept_E[:, None] & kept_E[None, :] & torch.ones(E, E, dtype=torch.bool).triu(1)   # kept i < j
    n_pairs = int(upper.sum())

    def pair_mean(V: torch.Tensor) -> torch.Tensor:          # (..., E, E) → (...) nan-mean over kept i < j
        vals = V[..., upper]
        return vals.nanmean(-1) if n_pairs else torch.full(V.shape[:-2], math.nan, dtype=V.dtype)

    between = float(pair_mean(observed)) if n_pairs else math.nan
    lo_q, hi_q = (1 - band) / 2, (1 + band) / 2
    G = metric_from_angles(references.group_angles, metric, normalized)             # (S, E, E)
    I = metric_from_angles(references.iso_angles, metric, normalized)
    Fl = metric_from_angles(references.split_angles, metric, normalized)            # (S2, E)
    g_mean, g_sd, g_lo, g_hi = _dist(pair_mean(G), band)
    i_mean, i_sd, i_lo, i_hi = _dist(pair_mean(I), band)
    elig = references.floor_eligible
    floor_s = Fl[:, elig].nanmean(-1) if bool(elig.any()) else torch.full((Fl.shape[0],), math.nan)
    f_mean, f_sd, f_lo, f_hi = _dist(floor_s, band)
    return SubspaceComparison(
        metric=metric, normalized=bool(normalized), pair_rank=pair_rank, band=float(band), observed=observed,
        between_mean=between, n_pairs=n_pairs, group_null=G.nanmean(0),
        group_null_lo=G.nanquantile(lo_q, dim=0), group_null_hi=G.nanquantile(hi_q, dim=0),
        group_null_mean=g_mean, group_null_sd=g_sd, group_null_lo_mean=g_lo, group_null_hi_mean=g_hi,
        floor=Fl.nanmean(0), floor_mean=f_mean, floor_sd=f_sd, floor_lo=f_lo, floor_hi=f_hi,
        iso=I.nanmean(0), iso_mean=i_mean, iso_sd=i_sd, iso_lo=i_lo, iso_hi=i_hi, references=references)
