"""Chapter 1's probe bundle: everything the chapter and its dashboard show for one model on probe points.

Shape legend: N probe points, D model width, E experts (E = 1 for a dense FFN), R = D spectrum length.

One call, :func:`chapter1_probes`, computes from an expert bank and a routing trace:

* routing: routed point counts and total routing weight per expert, dead experts;
* Jacobian spectra (paper-1 spec §1.4a–c): ungated expert-local Jacobians J_i(x_n) in closed form, their singular
  values in one batched call (only where w_ni > 0), per-expert weighted S1_i, stable rank, decay α, erank(σ),
  r_2/r_5/r_10 and the weighted mean normalised spectrum σ_j/σ_1; model-level means over live experts;
* H-out weighted PCA (§1.4d–e): the expert outputs E_i(x_n) weighted by w_ni (a dense model: its output with
  uniform weights), covariance eigenvalues and effective ranks (entropy, participation, threshold);
* cross-expert alignment (§1.4f) with the random null and the split-half ceiling.

The routing weights are ``trace.gate_matrix()`` (``weights="gates"``, the gate-weighted primary) or
``trace.membership()`` (``weights="membership"``, hard 0/1). Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .alignment import JacobianAlignment, bank_jacobian_alignment, make_generator
from .jacobians import (bank_tensors as _bank_tensors, expert_jacobians, expert_outputs, pair_jacobians,
                        prepare_points as _prepare)
from .pca import WeightedPCA, effective_rank, expert_pca
from .spectra import WeightedSpectra, singular_values, weighted_expert_spectra

__all__ = ["Chapter1Probes", "chapter1_probes", "WEIGHTINGS"]

WEIGHTINGS = ("gates", "membership")


def _live_mean(v_E: torch.Tensor, dead_E: torch.Tensor) -> float:
    live = ~dead_E & ~torch.isnan(v_E)
    return float(v_E[live].mean()) if bool(live.any()) else math.nan


@dataclass
class Chapter1Probes:
    """Chapter 1's geometry of one model on probe points (see the module docstring for the formulas).

    Fields::

        activation, n_experts, n_points, weights: the bank's activation, E, N, "gates" | "membership".
        counts:        (E,) routed points per expert (weight > 0).
        total_weight:  (E,) Σ_n w_ne.
        dead:          (E,) bool, experts with no routed weight (their per-expert numbers are NaN).
        spectra:       per-expert weighted Jacobian spectra (:class:`~.spectra.WeightedSpectra`).
        sigma1, stable_rank, decay_alpha, erank_sv, r2, r5, r10: model-level means over live experts (floats;
                       r_j NaN when D < j). erank_sv is Roy–Vetterli on singular values.
        ratios:        (R,) mean over live experts of the weighted mean normalised spectrum σ_j/σ_1.
        pca:           H-out weighted PCA per expert (:class:`~.pca.WeightedPCA`, leading E).
        pca_entropy, pca_participation, pca_threshold: (E,) effective ranks of the covariance eigenvalues
                       (exp-entropy, participation ratio, k at ``fraction`` of the variance).
        pca_entropy_mean, pca_participation_mean, pca_threshold_mean: their means over live experts.
        fraction:      the threshold fraction (0.9 → k90).
        alignment:     cross-expert alignment with null and ceiling (:class:`~.alignment.JacobianAlignment`).
        jacobians:     (E, N, D, D) the expert Jacobians when ``keep_jacobians=True``, else None.
        wall_s:        seconds this bundle took.
    """

    activation: str
    n_experts: int
    n_points: int
    weights: str
    counts: torch.Tensor
    total_weight: torch.Tensor
    dead: torch.Tensor
    spectra: WeightedSpectra
    sigma1: float
    stable_rank: float
    decay_alpha: float
    erank_sv: float
    r2: float
    r5: float
    r10: float
    ratios: torch.Tensor
    pca: WeightedPCA
    pca_entropy: torch.Tensor
    pca_participation: torch.Tensor
    pca_threshold: torch.Tensor
    pca_entropy_mean: float
    pca_participation_mean: float
    pca_threshold_mean: float
    fraction: float
    alignment: JacobianAlignment
    jacobians: torch.Tensor | None
    wall_s: float

    def summary(self) -> dict[str, float | int | str]:
        """The model-level numbers as a flat dict of plain Python values (a results row, a status table)."""
        a = self.alignment
        return {
            "activation": self.activation, "n_experts": self.n_experts, "n_points": self.n_points,
            "weights": self.weights, "n_dead": int(self.dead.sum()),
            "sigma1": self.sigma1, "stable_rank": self.stable_rank, "decay_alpha": self.decay_alpha,
            "erank_sv": self.erank_sv, "r2": self.r2, "r5": self.r5, "r10": self.r10,
            "pca_entropy": self.pca_entropy_mean, "pca_participation": self.pca_participation_mean,
            "pca_threshold": self.pca_threshold_mean, "fraction": self.fraction,
            "align_mean_abs": a.mean_abs_offdiag, "align_signed_mean": a.signed_mean, "align_max_abs": a.max_abs,
            "align_null_sd": a.null_sd, "align_null_level": a.null_level, "align_ceiling": a.ceiling,
        }


def chapter1_probes(bank, trace, *, weights: str = "gates", generator: torch.Generator | int | None = None,
                    min_points: int = 8, fraction: float = 0.9, keep_jacobians: bool = False) -> Chapter1Probes:
    """Everything chapter 1 shows for one model: spectra, H-out PCA and alignment on the trace's points.

    Args:
        bank: the layer's expert bank (``model.layer.experts``; a dense FFN's is a one-expert bank).
        trace: a :class:`~moewidgets.trace.RoutingTrace` of that layer on the probe points (``trace_model``).
        weights: "gates" (w = ``trace.gate_matrix()``, primary) or "membership" (w = ``trace.membership()``).
        generator: torch.Generator or int seed for the alignment's split-half and null (None = seed 0).
        min_points: experts need ≥ 2·min_points routed points for the split-half ceiling.
        fraction: variance fraction of the "threshold" effective rank (0.9 → k90).
        keep_jacobians: also return the (E, N, D, D) Jacobians.

    Per expert: ``S_i = Σ_n w_ni s(J_i(x_n)) / Σ_n w_ni`` for each spectral statistic s; PCA of E_i(x_n) with
    weights w_ni; alignment of J̄_i = Σ_n w_ni J_i(x_n) / Σ_n w_ni. Model level: plain means over live experts.

    >>> from moewidgets import MoEConfig, build_model, trace_model
    >>> model = build_model(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16))
    >>> X = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    >>> pr = chapter1_probes(model.layer.experts, trace_model(model, X))
    >>> pr.spectra.sigma1.shape, pr.pca.eigenvalues.shape, pr.alignment.matrix.shape
    (torch.Size([4]), torch.Size([4, 8]), torch.Size([4, 4]))

    Chapter 1 (book/chapter1.ipynb).
    """
    t0 = time.perf_counter()
    if weights not in WEIGHTINGS:
        raise ValueError(f"weights={weights!r} must be one of {WEIGHTINGS}")
    act, ws = _bank_tensors(bank)
    E = int(ws[0].shape[0])
    if trace.n_experts != E:
        raise ValueError(f"trace.n_experts={trace.n_experts} must equal the bank's n_experts={E}")
    gen = make_generator(generator)
    X_ND = trace.x_TD
    w_NE = trace.gate_matrix() if weights == "gates" else trace.membership()

    _, _, X_ND = _prepare(bank, X_ND, None)        # working dtype: promoted, on the bank's device
    w_NE = w_NE.to(device=X_ND.device, dtype=X_ND.dtype)
    # Jacobians only where they carry weight, singular values in one batched call
    e_P, n_P = (w_NE.T > 0).nonzero(as_tuple=True)
    sv_PR = singular_values(pair_jacobians(bank, X_ND, e_P, n_P))
    R = sv_PR.shape[-1] if sv_PR.numel() else min(int(ws[2].shape[1]), int(ws[0].shape[-1]))
    sv_ENR = torch.full((E, X_ND.shape[0], R), math.nan, dtype=X_ND.dtype, device=X_ND.device)
    sv_ENR[e_P, n_P] = sv_PR
    spectra = weighted_expert_spectra(None, w_NE, sv_ENR=sv_ENR)
    dead = spectra.dead

    H_NED = expert_outputs(bank, X_ND).transpose(0, 1)
    pca = expert_pca(H_NED, w_NE)
    ent = effective_rank(pca.eigenvalues, "entropy")
    par = effective_rank(pca.eigenvalues, "participation")
    thr = effective_rank(pca.eigenvalues, "threshold", fraction=fraction)

    align = bank_jacobian_alignment(bank, X_ND, w_NE, generator=gen, min_points=min_points)
    live = ~dead
    ratios_R = spectra.ratios[live].mean(0) if bool(live.any()) else torch.full_like(spectra.ratios[0], math.nan)

    def stat(name: str) -> float:
        v = getattr(spectra, name)
        return math.nan if v is None else _live_mean(v, dead)

    return Chapter1Probes(
        activation=act, n_experts=E, n_points=int(X_ND.shape[0]), weights=weights,
        counts=spectra.n_routed, total_weight=spectra.total_weight, dead=dead, spectra=spectra,
        sigma1=stat("sigma1"), stable_rank=stat("stable_rank"), decay_alpha=stat("decay_alpha"),
        erank_sv=stat("erank"), r2=stat("r2"), r5=stat("r5"), r10=stat("r10"), ratios=ratios_R,
        pca=pca, pca_entropy=ent, pca_participation=par, pca_threshold=thr,
        pca_entropy_mean=_live_mean(ent, dead), pca_participation_mean=_live_mean(par, dead),
        pca_threshold_mean=_live_mean(thr, dead), fraction=float(fraction), alignment=align,
        jacobians=expert_jacobians(bank, X_ND) if keep_jacobians else None, wall_s=time.perf_counter() - t0)
