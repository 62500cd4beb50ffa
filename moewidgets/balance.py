"""Load balancing and load statistics (chapter 1 uses the aux loss; chapter 3 teaches all three knobs).

Shape legend: T tokens, E experts, K top-k.

* Switch aux loss  ``L_aux = E · Σ_i f_i P_i``  with ``f_i`` the fraction of (token, slot) assignments that went
  to expert i (so Σ f = 1) and ``P_i`` the mean routing probability of expert i. It equals 1 at perfect balance
  (f = P = 1/E) whatever k is. Hugging Face's ``load_balancing_loss_func`` counts slots per token instead and
  gives k at perfect balance: our number is theirs divided by k.
* Router z-loss    ``L_z = mean_t (logsumexp_i z_ti)²`` (ST-MoE).
* Loss-free bias   ``b_i ← b_i + γ · sign(mean(c) − c_i)``, then centred; added to the scores for top-k selection
  only, never to the gate value (DeepSeek's auxiliary-loss-free balancing).
"""
from __future__ import annotations

import torch

__all__ = ["switch_aux_loss", "z_loss", "expert_counts", "loss_free_update", "max_violation"]


def expert_counts(idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Number of (token, slot) assignments per expert, (E,) float."""
    return torch.bincount(idx_TK.reshape(-1), minlength=n_experts).to(torch.float32)


def switch_aux_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_i f_i P_i`` (1 at perfect balance; per batch).

    ``f`` (slot fractions) carries no gradient; the gradient flows through ``P = mean_t probs_TE``.

    >>> p = torch.full((4, 2), 0.5); idx = torch.tensor([[0], [1], [0], [1]])
    >>> float(switch_aux_loss(p, idx))
    1.0
    """
    T, E = probs_TE.shape
    # scatter_add rather than bincount: same counts, and it works under torch.func.vmap (seeds at once)
    ones_S = torch.ones(idx_TK.numel(), dtype=probs_TE.dtype, device=probs_TE.device)
    f_E = probs_TE.new_zeros(E).scatter_add(0, idx_TK.reshape(-1), ones_S) / idx_TK.numel()
    P_E = probs_TE.mean(0)
    return E * torch.dot(f_E, P_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t (logsumexp_i z_ti)²`` (ST-MoE): keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def loss_free_update(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """One loss-free balancing step, in place: ``b ← b + γ sign(mean(c) − c)``, then centred. Returns ``bias_E``."""
    with torch.no_grad():
        counts_E = counts_E.to(bias_E.dtype)
        bias_E.add_(rate * torch.sign(counts_E.mean() - counts_E))
        bias_E.sub_(bias_E.mean())
    return bias_E


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = (max_i c_i − mean c) / mean c: 0 at perfect balance."""
    counts_E = counts_E.to(torch.float64)
    mean = counts_E.mean()
    return float((counts_E.max() - mean) / mean) if mean > 0 else 0.0
