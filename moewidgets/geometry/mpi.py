"""Router-to-singular-vector alignment (chapter 4, the Manifold Power Iteration router).

Shape legend: E experts, F expert hidden width, D model width, J singular-value index.

For router rows ``r_i`` (E, D) and the experts' input-side matrices ``W_i`` (E, F, D) (GELU: ``w_in_EFD``,
SwiGLU: ``w_gate_EFD``; see :func:`moewidgets.nn.routers.input_side_weights`) with singular values
``σ_1 ≥ σ_2 ≥ …`` and top right-singular vector ``v1_i`` (the top eigenvector of ``M_i = W_iᵀ W_i``)::

    λ_i      = ‖W_i r_i‖² / (‖r_i‖² σ_1(W_i)²)      in [0, 1]  (squared normalised Rayleigh quotient, spec §2.7)
    √λ_i
    cos_i    = |r_i · v1_i| / ‖r_i‖                   angle_i = arctan2(‖r_i − (r_i·v1_i) v1_i‖, |r_i · v1_i|)
    gap_i    = σ_1(W_i) / σ_2(W_i)
    norm_i   = ‖r_i‖

``λ`` is the paper's alignment metric as we read it (its Eq. 11 is not available: [PROPOSAL]); a random
direction gives ``E[λ] = ‖W‖_F² / (D σ_1²)``, one power step from it about 0.65 on a Gaussian expert. The functions
take tensors (any router's rows: ``SoftmaxRouter.w_ED``, an ``MPIRouter``'s effective rows ``R'``), never a model.

Also here: the power step as Riemannian steepest ascent (:func:`riemannian_ascent_step`, the retracted tangent
step with ``η = C² / (2 r M rᵀ)`` equals the MPI row ``C · r M / ‖r M‖``) and the plain power method
(:func:`power_iterate`), which converges to ``± C v1`` at the rate ``(σ_2/σ_1)²`` per step.

Chapter 4 (book/chapter4.ipynb).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["RowAlignment", "row_alignment", "top_singular", "riemannian_ascent_step", "power_step",
           "power_iterate", "random_direction_lambda"]


@dataclass
class RowAlignment:
    """Per-expert alignment of router rows with their experts (each field a float64 tensor of shape (E,)).

    Fields::

        lam        λ, the squared normalised Rayleigh quotient
        sqrt_lam   √λ
        cos        absolute cosine between the row and v1
        angle_deg  the angle between the row's line and v1, in degrees (0 = aligned, 90 = orthogonal)
        gap        σ1 / σ2 of the expert matrix (inf when σ2 = 0)
        sigma1     σ1 of the expert matrix
        sigma2     σ2 of the expert matrix
        norm       the row's L2 norm
    """

    lam: torch.Tensor
    sqrt_lam: torch.Tensor
    cos: torch.Tensor
    angle_deg: torch.Tensor
    gap: torch.Tensor
    sigma1: torch.Tensor
    sigma2: torch.Tensor
    norm: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Means over experts (and the row-norm spread): ``lam``, ``sqrt_lam``, ``cos``, ``angle_deg``, ``gap``,
        ``norm``, ``norm_spread`` (max − min)."""
        out = {k: float(getattr(self, k).mean()) for k in ("lam", "sqrt_lam", "cos", "angle_deg", "gap", "norm")}
        out["norm_spread"] = float(self.norm.max() - self.norm.min())
        return out


def top_singular(w_EFD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (E, J) descending and top right-singular vectors (E, D) of each ``w_EFD[i]`` (float64).

    ``v1_i`` is ``torch.linalg.svd(W_i)[2][0]``: the input-space (R^D) direction of the expert (spec §2.3).

    >>> s, v = top_singular(torch.diag(torch.tensor([1.0, 3.0]))[None])
    >>> s.tolist(), v.abs().tolist()
    ([[3.0, 1.0]], [[0.0, 1.0]])
    """
    w = w_EFD.detach().to(torch.float64)
    _, s_EJ, vh_EJD = torch.linalg.svd(w, full_matrices=False)
    return s_EJ, vh_EJD[:, 0, :]


def row_alignment(w_EFD: torch.Tensor, rows_ED: torch.Tensor) -> RowAlignment:
    """λ, √λ, the absolute cosine with v1, the angle, σ1/σ2 and the row norms (module docstring), computed in float64.

    Shapes: ``w_EFD`` (E, F, D) the experts' input-side matrices, ``rows_ED`` (E, D) the router rows.

    >>> w = torch.diag(torch.tensor([2.0, 1.0]))[None]            # one expert, σ = (2, 1), v1 = e1
    >>> a = row_alignment(w, torch.tensor([[1.0, 1.0]]))
    >>> round(float(a.lam[0]), 3), round(float(a.cos[0]), 3), round(float(a.angle_deg[0]), 1), float(a.gap[0])
    (0.625, 0.707, 45.0, 2.0)
    """
    if w_EFD.dim() != 3 or rows_ED.dim() != 2 or w_EFD.shape[0] != rows_ED.shape[0] \
            or w_EFD.shape[2] != rows_ED.shape[1]:
        raise ValueError(f"w_EFD {tuple(w_EFD.shape)} and rows_ED {tuple(rows_ED.shape)} must be (E, F, D) and "
                         "(E, D) with the same E and D")
    w = w_EFD.detach().to(torch.float64)
    r = rows_ED.detach().to(torch.float64)
    s_EJ, v1_ED = top_singular(w)
    norm_E = r.norm(dim=1)
    wr_EF = torch.einsum("efd,ed->ef", w, r)
    lam_E = wr_EF.square().sum(1) / (norm_E.square() * s_EJ[:, 0].square())
    dot_E = (r * v1_ED).sum(1).abs()
    perp_E = (r - (r * v1_ED).sum(1, keepdim=True) * v1_ED).norm(dim=1)
    sigma2_E = s_EJ[:, 1] if s_EJ.shape[1] > 1 else torch.zeros_like(s_EJ[:, 0])
    gap_E = torch.where(sigma2_E > 0, s_EJ[:, 0] / sigma2_E.clamp_min(1e-300), torch.full_like(sigma2_E, math.inf))
    return RowAlignment(lam=lam_E, sqrt_lam=lam_E.sqrt(), cos=dot_E / norm_E,
                        angle_deg=torch.rad2deg(torch.atan2(perp_E, dot_E)), gap=gap_E, sigma1=s_EJ[:, 0],
                        sigma2=sigma2_E, norm=norm_E)


def power_step(r_D: torch.Tensor, m_DD: torch.Tensor, c: float) -> torch.Tensor:
    """One retracted power step on a row: ``C · r M / ‖r M‖`` (``M`` symmetric PSD, D×D)."""
    rm = r_D @ m_DD
    return c * rm / rm.norm()


def riemannian_ascent_step(r_D: torch.Tensor, m_DD: torch.Tensor, c: float) -> torch.Tensor:
    """One Riemannian steepest-ascent step of ``f(r) = r M rᵀ / ‖r‖²`` on the sphere ``‖r‖ = C``, retracted.

    Euclidean gradient ``G = 2 r M``; tangent projection ``G − (G·r / C²) r``; step ``η = C² / (2 r M rᵀ)``; then
    retraction ``C · y / ‖y‖``. For ``‖r‖ = C`` the result equals :func:`power_step` (spec §2.6): the tangent step
    lands on ``(C² / r M rᵀ) · r M``, a positive multiple of ``r M``.

    >>> m = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> r = torch.tensor([0.6, 0.8], dtype=torch.float64)
    >>> bool(torch.allclose(riemannian_ascent_step(r, m, 1.0), power_step(r, m, 1.0)))
    True
    """
    g = 2 * r_D @ m_DD
    tangent = g - (g @ r_D) / c ** 2 * r_D
    eta = c ** 2 / (2 * (r_D @ m_DD @ r_D))
    y = r_D + eta * tangent
    return c * y / y.norm()


def power_iterate(r_D: torch.Tensor, m_DD: torch.Tensor, c: float, steps: int) -> torch.Tensor:
    """``steps`` retracted power steps; returns all iterates, (steps + 1, D) (the first is ``r_D`` rescaled to C)."""
    out = [c * r_D / r_D.norm()]
    for _ in range(steps):
        out.append(power_step(out[-1], m_DD, c))
    return torch.stack(out)


def random_direction_lambda(w_EFD: torch.Tensor) -> torch.Tensor:
    """The null of λ: its mean over uniformly random directions, ``‖W_i‖_F² / (D σ_1(W_i)²)``, (E,).

    >>> float(random_direction_lambda(torch.eye(4)[None]))
    1.0
    """
    w = w_EFD.detach().to(torch.float64)
    s_EJ, _ = top_singular(w)
    return s_EJ.square().sum(1) / (w.shape[2] * s_EJ[:, 0].square())
