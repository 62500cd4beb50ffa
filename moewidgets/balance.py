"""Load balancing and load statistics (chapter 1 uses the aux loss; chapter 3 teaches all three knobs and the
imbalance metrics MaxVio and the std of load fractions).

Shape legend: S seeds (the seed axis of moewidgets.multiseed), T tokens, E experts, K top-k, I training steps,
P (token, slot) pairs.

* Switch aux loss  ``L_aux = E · Σ_i f_i P_i``  with ``f_i`` the fraction of (token, slot) assignments that went
  to expert i (so Σ f = 1) and ``P_i`` the mean routing probability of expert i. It equals 1 at perfect balance
  (f = P = 1/E) whatever k is. Hugging Face's ``load_balancing_loss_func`` counts slots per token instead and
  gives k at perfect balance: our number is theirs divided by k.
* Router z-loss    ``L_z = mean_t (logsumexp_i z_ti)²`` (ST-MoE).
* Loss-free bias   ``b_i ← b_i + γ · sign(mean(c) − c_i)``, then centred; added to the scores for top-k selection
  only, never to the gate value (DeepSeek's auxiliary-loss-free balancing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["switch_aux_loss", "z_loss", "expert_counts", "loss_free_update", "max_violation", "load_std", "LoadStats",
           "load_stats", "mean_batch_max_violation"]


def expert_counts(idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Number of (token, slot) assignments per expert, (E,) float."""
    return torch.bincount(idx_TK.reshape(-1), minlength=n_experts).to(torch.float32)


def switch_aux_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_i f_i P_i`` (1 at perfect balance; per batch).

    ``f`` (slot fractions) carries no gradient; the gradient flows through ``P = mean_t probs_TE``.
    With a seed axis (the seed groups of :mod:`moewidgets.multiseed`): probs expert-major (S, E, T), idx (S, T, K)
    → one loss per seed, (S,).

    >>> p = torch.full((4, 2), 0.5); idx = torch.tensor([[0], [1], [0], [1]])
    >>> float(switch_aux_loss(p, idx))
    1.0
    >>> switch_aux_loss(p.T.expand(3, 2, 4), idx.expand(3, 4, 1))
    tensor([1., 1., 1.])
    """
    if idx_TK.dim() == 3:
        S, E = probs_TE.shape[:2]
        ones_SP = torch.ones(idx_TK.shape, dtype=probs_TE.dtype, device=probs_TE.device).view(S, -1)
        f_SE = probs_TE.new_zeros(S, E).scatter_add(1, idx_TK.reshape(S, -1), ones_SP) / idx_TK[0].numel()
        return E * (f_SE * probs_TE.mean(2)).sum(-1)
    T, E = probs_TE.shape
    # scatter_add rather than bincount: same counts, and it works under torch.func.vmap
    ones_P = torch.ones(idx_TK.numel(), dtype=probs_TE.dtype, device=probs_TE.device)
    f_E = probs_TE.new_zeros(E).scatter_add(0, idx_TK.reshape(-1), ones_P) / idx_TK.numel()
    P_E = probs_TE.mean(0)
    return E * torch.dot(f_E, P_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t (logsumexp_i z_ti)²`` (ST-MoE): keeps router logits small. With a seed axis the
    logits are expert-major (S, E, T) → (S,).

    >>> float(z_loss(torch.zeros(3, 4))) == float(torch.log(torch.tensor(4.0)) ** 2)
    True
    """
    if logits_TE.dim() == 3:
        return torch.logsumexp(logits_TE, dim=1).square().mean(-1)
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def loss_free_update(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float,
                     active_S: torch.Tensor | None = None) -> torch.Tensor:
    """One loss-free balancing step, in place: ``b ← b + γ sign(mean(c) − c)``, then centred. Returns ``bias_E``.

    With a seed axis (bias, counts (S, E)) each seed's row is updated; seeds with ``active_S`` False keep theirs.

    >>> loss_free_update(torch.zeros(3), torch.tensor([5., 1., 0.]), 0.1)   # b = 0.1·(-1, 1, 1), minus its mean
    tensor([-0.1333,  0.0667,  0.0667])
    """
    with torch.no_grad():
        counts_E = counts_E.to(bias_E.dtype)
        if bias_E.dim() == 2:
            new_SE = bias_E + rate * torch.sign(counts_E.mean(-1, keepdim=True) - counts_E)
            new_SE = new_SE - new_SE.mean(-1, keepdim=True)
            bias_E.copy_(new_SE if active_S is None else torch.where(active_S.unsqueeze(1), new_SE, bias_E))
            return bias_E
        bias_E.add_(rate * torch.sign(counts_E.mean() - counts_E))
        bias_E.sub_(bias_E.mean())
    return bias_E


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = (max_i c_i − mean c) / mean c (Loss-Free Balancing, Eq. 4): 0 at perfect balance, E − 1 when one
    expert takes everything. Counts or fractions alike; all-zero loads give 0 (nothing to balance).

    >>> max_violation(torch.tensor([3., 1., 0., 0.]))
    2.0
    """
    counts_E = torch.as_tensor(counts_E).to(torch.float64)
    mean = counts_E.mean()
    return float((counts_E.max() - mean) / mean) if mean > 0 else 0.0


def load_std(counts_E: torch.Tensor) -> float:
    """Std of the load fractions ``std_i(c_i / Σ c)`` (population std; 0 at balance; spec §1.8)."""
    counts_E = torch.as_tensor(counts_E).to(torch.float64)
    total = counts_E.sum()
    if total <= 0:
        return 0.0
    return float((counts_E / total).std(unbiased=False))


@dataclass
class LoadStats:
    """Load statistics of one set of routing decisions (chapter 3).

    Fields::

        counts     assignments per expert, (E,)
        fractions  counts / Σ counts (uniform: 1/E)
        maxvio     (max − mean) / mean
        std        std of the fractions
        dead       experts with no assignment (reported, never divided by)
    """

    counts: list[float]
    fractions: list[float]
    maxvio: float
    std: float
    dead: list[int]


def load_stats(counts_E: torch.Tensor) -> LoadStats:
    """MaxVio, the std of load fractions and the dead experts of per-expert assignment counts.

    >>> s = load_stats(torch.tensor([6., 2., 0., 0.]))
    >>> s.maxvio, s.dead, round(s.std, 4)
    (2.0, [2, 3], 0.3062)
    """
    c_E = torch.as_tensor(counts_E).to(torch.float64)
    total = float(c_E.sum())
    frac_E = c_E / total if total > 0 else torch.zeros_like(c_E)
    return LoadStats(c_E.tolist(), frac_E.tolist(), max_violation(c_E), load_std(c_E),
                     [int(i) for i in torch.nonzero(c_E == 0).flatten()])


def mean_batch_max_violation(loads_IE) -> float:
    """``MaxVio_batch``: MaxVio of every training batch (rows of ``loads_IE``, e.g. ``History.load``), averaged.

    >>> mean_batch_max_violation([[0.5, 0.5], [1.0, 0.0]])
    0.5
    """
    rows = [r for r in loads_IE if len(r)]
    if not rows:
        raise ValueError("loads_IE has no non-empty rows (a dense model has no loads)")
    return sum(max_violation(torch.tensor(r)) for r in rows) / len(rows)
