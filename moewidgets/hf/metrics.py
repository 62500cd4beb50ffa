"""The metric registry :func:`~moewidgets.hf.probing.probe` runs on each MoE layer, and the float32 chunked
geometry it needs at Mixtral sizes.

Shape legend: N probe tokens, D model width, F expert hidden width, E routed experts, K top-k, S weightings,
R = D spectrum length.

Each metric of :data:`~moewidgets.hf.metrics.METRICS` takes a layer's
:class:`~moewidgets.hf.metrics.LayerInputs` (the bank view, the block inputs ``x_ND`` in float32, the routing
weights ``w_ne``: the gate of expert e for token n, or 1 if e was selected):

* ``"spectra"``: routing-weighted expert Jacobian spectra ``S_e = Σ_n w_ne s(J_e(x_n)) / Σ_n w_ne``
  (:func:`~moewidgets.geometry.weighted_expert_spectra`) on up to ``max_points`` tokens;
* ``"alignment"``: Frobenius cosines of routing-weighted mean Jacobians with the random null and split-half
  ceiling (:func:`~moewidgets.geometry.bank_jacobian_alignment`'s numbers);
* ``"pca"``: weighted PCA of the routed block inputs per expert (:func:`~moewidgets.geometry.expert_pca`);
* ``"shared_expert"``: Qwen2-MoE's shared expert on its own (spectra weighted by its sigmoid gate, the cosine of
  its mean Jacobian with each routed expert's), None for families without one.

Jacobians are formed in float32 whatever the model's dtype, one expert at a time (a float32 copy of one
expert's weights, never the whole bank) and in chunks of points, so memory stays bounded at Mixtral sizes.
Adding a metric is one entry::

    METRICS["subspaces"] = Metric(compute=my_subspace_metric, summary=lambda r: {"d_proj": r.d_proj_mean})

where ``my_subspace_metric(inputs: LayerInputs, **options)`` returns a result object and ``summary`` maps it to a
flat dict of floats (the columns ``subspaces_<key>`` of :meth:`~moewidgets.hf.probing.LayerProbe.summary`);
options come from ``probe(..., metric_options={"subspaces": {...}})``. Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ..balance import max_violation, switch_aux_loss
from ..geometry.alignment import JacobianAlignment, SwiGLUBankView, _alignment, _check_common
from ..geometry.jacobians import expert_jacobians, mean_expert_jacobians
from ..geometry.pca import WeightedPCA, effective_rank, expert_pca
from ..geometry.spectra import WeightedSpectra, weighted_expert_spectra
from ..geometry.subspaces import SubspaceComparison, compare_subspaces, routed_subspaces
from ..trace import RoutingTrace
from .blocks import HFMoEBlock

__all__ = ["METRICS", "DEFAULT_METRICS", "Metric", "LayerInputs", "RoutingSummary", "routing_summary", "routed_spectra",
           "routed_mean_jacobians", "spectra_metric", "alignment_metric", "pca_metric", "shared_expert_metric",
           "subspaces_metric",
           "InputPCA", "SharedExpertProbe", "WEIGHTINGS"]

WEIGHTINGS = ("gates", "membership")
_JACOBIAN_ELEMENTS = 1 << 26     # D×D Jacobian elements per chunk (256 MiB float32): 4 points at D = 4096
_PCA_ELEMENTS = 1 << 27          # centred (E', N, D) elements per PCA chunk of experts


# ---------------------------------------------------------------------------------------------- routing summary

@dataclass
class RoutingSummary:
    """Load statistics of one layer's routing (chapter 3's balance numbers, on a real model).

    Fields::

        n_tokens, n_experts, k: T, E, K.
        gate:        "renorm" | "softmax", the block's gate convention.
        counts:      (E,) (token, slot) assignments per expert.
        loads:       (E,) counts / (T·K), summing to 1.
        max_vio:     MaxVio = (max c − mean c) / mean c (0 at perfect balance).
        aux_loss:    Switch aux loss E·Σ f_i P_i on these tokens (ours: 1 at perfect balance; HF's is k×).
        entropy:     mean over tokens of the routing entropy −Σ_e p_e log p_e (nats; max log E).
        n_dead:      experts that received no token.
    """

    n_tokens: int
    n_experts: int
    k: int
    gate: str
    counts: torch.Tensor
    loads: torch.Tensor
    max_vio: float
    aux_loss: float
    entropy: float
    n_dead: int


def routing_summary(trace: RoutingTrace, gate: str = "renorm") -> RoutingSummary:
    """Loads, MaxVio, Switch aux loss and mean routing entropy of a trace (``gate`` is recorded as given).

    >>> tr = RoutingTrace(torch.zeros(4, 2), torch.full((4, 2), 0.5), torch.tensor([[0], [1], [0], [0]]),
    ...                   torch.ones(4, 1))
    >>> s = routing_summary(tr)
    >>> s.counts.tolist(), s.max_vio, s.aux_loss, round(s.entropy, 4)
    ([3.0, 1.0], 0.5, 1.0, 0.6931)

    Chapter 2 (book/chapter2.ipynb).
    """
    E = int(trace.n_experts)
    idx_TK = trace.idx_TK
    counts_E = torch.bincount(idx_TK.reshape(-1).cpu(), minlength=E).to(torch.float32)
    probs_TE = trace.probs_TE
    if probs_TE is not None:
        p = probs_TE.float()
        aux = float(switch_aux_loss(p, idx_TK.to(p.device)))
        entropy = float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())
    else:
        aux = entropy = math.nan
    return RoutingSummary(n_tokens=trace.n_tokens, n_experts=E, k=trace.k, gate=gate, counts=counts_E,
                          loads=counts_E / counts_E.sum(), max_vio=max_violation(counts_E), aux_loss=aux,
                          entropy=entropy, n_dead=int((counts_E == 0).sum()))


# ------------------------------------------------------------------------------------- float32 chunked geometry

def _expert_fp32(bank: SwiGLUBankView, e: int) -> SwiGLUBankView:
    """Expert e alone as a one-expert float32 bank (a copy of one expert only)."""
    return SwiGLUBankView(bank.w_gate_EFD[e:e + 1].float(), bank.w_up_EFD[e:e + 1].float(),
                          bank.w_out_EDF[e:e + 1].float())


def routed_spectra(bank: SwiGLUBankView, X_ND: torch.Tensor, weights_NE: torch.Tensor, *,
                   max_elements: int = _JACOBIAN_ELEMENTS) -> WeightedSpectra:
    """:func:`~moewidgets.geometry.weighted_expert_spectra` of the routed (w_ne > 0) expert Jacobians,
    in float32, one expert and at most ``max_elements // D²`` points at a time.

    Same numbers as ``weighted_expert_spectra(expert_jacobians(bank, X), w)`` in float32, without ever holding
    more than one chunk of Jacobians or one expert's float32 weights.

    >>> from moewidgets.nn.experts import SwiGLUExperts
    >>> bank = SwiGLUExperts(3, 4, 8, generator=torch.Generator().manual_seed(0))
    >>> X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    >>> w = torch.rand(6, 3, generator=torch.Generator().manual_seed(2)) * (X[:, :3] > 0)     # some w_ne = 0
    >>> a, b = routed_spectra(bank, X, w, max_elements=32), weighted_expert_spectra(expert_jacobians(bank, X), w)
    >>> torch.allclose(a.sigma1, b.sigma1, equal_nan=True)
    True

    Chapter 2 (book/chapter2.ipynb).
    """
    w_gate_EFD = bank.w_gate_EFD
    E, D_out, D = w_gate_EFD.shape[0], bank.w_out_EDF.shape[1], w_gate_EFD.shape[2]
    device = w_gate_EFD.device
    X = X_ND.to(device=device, dtype=torch.float32)
    w_NE = weights_NE.to(device=device, dtype=torch.float32)
    N = X.shape[0]
    sv_ENR = torch.full((E, N, min(D_out, D)), math.nan, dtype=torch.float32, device=device)
    step = max(1, max_elements // (D_out * D))
    for e in range(E):
        pts = (w_NE[:, e] > 0).nonzero().squeeze(1)
        if pts.numel() == 0:
            continue
        one = _expert_fp32(bank, e)
        for s in range(0, pts.numel(), step):
            p = pts[s:s + step]
            sv_ENR[e, p] = torch.linalg.svdvals(expert_jacobians(one, X[p])[0])        # (n, D, D) → (n, R)
    return weighted_expert_spectra(None, w_NE, sv_ENR=sv_ENR)


def routed_mean_jacobians(bank: SwiGLUBankView, X_ND: torch.Tensor, weights_NE: torch.Tensor) -> torch.Tensor:
    """Routing-weighted mean Jacobians ``J̄_e = Σ_n w_ne J_e(x_n) / Σ_n w_ne`` in float32, one expert at a
    time: :func:`~moewidgets.geometry.mean_expert_jacobians` with leading weighting dims (..., N, E)
    → (..., E, D, D) (NaN for experts without weight).

    >>> from moewidgets.nn.experts import SwiGLUExperts
    >>> bank = SwiGLUExperts(3, 4, 8, generator=torch.Generator().manual_seed(0))
    >>> g = torch.Generator().manual_seed(1)
    >>> X, w = torch.randn(6, 4, generator=g), torch.rand(2, 6, 3, generator=g)      # two weightings
    >>> torch.allclose(routed_mean_jacobians(bank, X, w), mean_expert_jacobians(bank, X, w), atol=1e-6)
    True

    Chapter 2 (book/chapter2.ipynb).
    """
    device = bank.w_gate_EFD.device
    X = X_ND.to(device=device, dtype=torch.float32)
    w = weights_NE.to(device=device, dtype=torch.float32)
    return torch.cat([mean_expert_jacobians(_expert_fp32(bank, e), X, w[..., e:e + 1])
                      for e in range(bank.w_gate_EFD.shape[0])], dim=-3)


# ------------------------------------------------------------------------------------------- metric registry

@dataclass
class LayerInputs:
    """What every metric function receives for one MoE layer.

    Fields::

        layer:      decoder-layer index.
        block:      the HFMoEBlock (router, experts, shared expert, gate).
        bank:       the routed experts as a bank view (model dtype, the experts' device).
        trace:      the layer's RoutingTrace.
        x_ND:       (N, D) block inputs in float32 on the experts' device.
        weights_NE: (N, E) routing weights in float32 (gates or 0/1 membership, as ``probe(weights=...)``).
        weights:    "gates" | "membership".
        seed:       this layer's seed; a metric makes its own ``torch.Generator().manual_seed(seed)``, so its
                    numbers do not depend on which other metrics or layers run.
    """

    layer: int
    block: HFMoEBlock
    bank: SwiGLUBankView
    trace: RoutingTrace
    x_ND: torch.Tensor
    weights_NE: torch.Tensor
    weights: str
    seed: int

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed``."""
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class Metric:
    """A registry entry: ``compute(inputs, **options)`` → result; ``summary(result)`` → flat dict of floats;
    ``check(**options)`` (optional) raises a ValueError for bad options, so that :func:`~moewidgets.hf.probing.probe`
    can refuse them before the forward pass."""

    compute: Callable[..., Any]
    summary: Callable[[Any], dict[str, float]]
    check: Callable[..., None] | None = None


def _positive_int(name: str, v, allow_none: bool = False) -> None:
    if (v is None and allow_none) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return
    raise ValueError(f"{name}={v!r} must be a positive integer" + (" or None" if allow_none else ""))


def _check_points(max_points: int | None = 256, **_) -> None:
    _positive_int("max_points", max_points, allow_none=True)


def _check_alignment(min_points: int = 8, n_null_pairs: int = 200, **_) -> None:
    _positive_int("min_points", min_points)
    _positive_int("n_null_pairs", n_null_pairs)


def _check_pca(n_components: int | None = 32, fraction: float = 0.9, **_) -> None:
    _positive_int("n_components", n_components, allow_none=True)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")


def _live_mean(v_E: torch.Tensor | None, dead_E: torch.Tensor) -> float:
    if v_E is None:
        return math.nan
    live = ~dead_E & ~torch.isnan(v_E)
    return float(v_E[live].mean()) if bool(live.any()) else math.nan


def _spectra_points(n: int, max_points: int | None, seed: int) -> torch.Tensor:
    """The probe tokens the per-token spectra use: all, or a seeded random subset of ``max_points`` (sorted)."""
    if max_points is None or n <= max_points:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].sort().values


def spectra_metric(inputs: LayerInputs, max_points: int | None = 256, keep_sv: bool = False) -> WeightedSpectra:
    """Routing-weighted Jacobian spectra of the routed experts on up to ``max_points`` tokens (seeded subset).

    Cost: one D×D Jacobian and one SVD per routed (token, expert) pair (K·max_points of them). ``sv``, the
    (E, N, R) singular values, is kept only with ``keep_sv=True`` (else None).
    """
    _check_points(max_points)
    pts = _spectra_points(inputs.x_ND.shape[0], max_points, inputs.seed).to(inputs.x_ND.device)
    res = routed_spectra(inputs.bank, inputs.x_ND[pts], inputs.weights_NE[pts])
    return res if keep_sv else replace(res, sv=None)


def _spectra_summary(r: WeightedSpectra) -> dict[str, float]:
    out = {name: _live_mean(getattr(r, name), r.dead) for name in ("sigma1", "stable_rank", "decay_alpha", "erank")}
    out["n_pairs"] = int(r.n_routed.sum())                  # routed (token, expert) pairs: Jacobians formed
    return out


def alignment_metric(inputs: LayerInputs, min_points: int = 8, n_null_pairs: int = 200,
                     keep_mean_jacobians: bool = False) -> JacobianAlignment:
    """Cross-expert alignment of routing-weighted mean Jacobians with its null and split-half ceiling: the
    numbers of :func:`~moewidgets.geometry.bank_jacobian_alignment`, in float32 one expert at a time.
    ``mean_jacobians`` (E, D, D) is kept only with ``keep_mean_jacobians=True`` (else None).
    """
    _check_common(inputs.weights_NE, min_points, n_null_pairs)
    D = inputs.bank.w_gate_EFD.shape[2]
    res = _alignment(lambda w_SNE: routed_mean_jacobians(inputs.bank, inputs.x_ND, w_SNE), inputs.weights_NE,
                     (inputs.bank.w_out_EDF.shape[1], D), inputs.generator(), min_points, n_null_pairs)
    return res if keep_mean_jacobians else replace(res, mean_jacobians=None)


def _alignment_summary(r: JacobianAlignment) -> dict[str, float]:
    return {"mean_abs": r.mean_abs_offdiag, "signed_mean": r.signed_mean, "max_abs": r.max_abs,
            "null_level": r.null_level, "null_sd": r.null_sd, "ceiling": r.ceiling}


@dataclass
class InputPCA:
    """Weighted PCA of the routed block inputs per expert, with its effective ranks (paper-2 spec §2.4c).

    Fields::

        pca:           WeightedPCA with leading E (components truncated).
        entropy, participation, threshold: (E,) effective ranks of the covariance eigenvalues (exp-entropy,
                       participation ratio, smallest k reaching ``fraction`` of the variance); NaN if dead.
        fraction:      the threshold's variance fraction (0.9 → k90).
    """

    pca: WeightedPCA
    entropy: torch.Tensor
    participation: torch.Tensor
    threshold: torch.Tensor
    fraction: float


def pca_metric(inputs: LayerInputs, n_components: int | None = 32, fraction: float = 0.9) -> InputPCA:
    """Weighted PCA of the routed block inputs per expert (H-in), chunked over experts
    (:class:`~moewidgets.hf.metrics.InputPCA`).

    Keeps all eigenvalues (E, D) and the leading ``n_components`` components (E, D, n_components); all when
    None. ``fraction`` is the variance fraction of the threshold effective rank (0.9 → k90).
    """
    _check_pca(n_components, fraction)
    X, w_NE = inputs.x_ND, inputs.weights_NE
    N, D = X.shape
    E = w_NE.shape[1]
    step = max(1, _PCA_ELEMENTS // max(1, N * D))          # experts per chunk: bounds the centred (E', N, D)
    parts = []
    for e0 in range(0, E, step):
        r = expert_pca(X, w_NE[:, e0:e0 + step])
        parts.append(replace(r, components=r.components[..., :n_components]))
    pca = WeightedPCA(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(WeightedPCA)))
    lam_ED = pca.eigenvalues
    return InputPCA(pca=pca, entropy=effective_rank(lam_ED, "entropy"),
                    participation=effective_rank(lam_ED, "participation"),
                    threshold=effective_rank(lam_ED, "threshold", fraction=fraction), fraction=float(fraction))


def _pca_summary(r: InputPCA) -> dict[str, float]:
    dead = r.pca.dead
    n_eff = r.pca.n_eff[~dead]
    return {"erank_entropy": _live_mean(r.entropy, dead), "erank_participation": _live_mean(r.participation, dead),
            f"k{round(100 * r.fraction)}": _live_mean(r.threshold, dead),
            "n_eff_min": float(n_eff.min()) if n_eff.numel() else math.nan}


@dataclass
class SharedExpertProbe:
    """Qwen2-MoE's shared expert, reported apart from the routed bank.

    The block computes ``y = Σ_{i∈S} g_i E_i(x) + s(x) E_shared(x)`` with ``s(x) = sigmoid(w_s · x)``.

    Fields::

        gate_mean:  mean of s(x) over the probe tokens.
        gate_N:     (N,) s(x_n).
        spectra:    the shared expert's Jacobian spectra weighted by s(x_n) (one-expert
                    WeightedSpectra, same tokens as "spectra").
        cos_routed: (E,) cos_F(J̄_shared, J̄_i), J̄_shared weighted by s, J̄_i by the routing weights.
        d_hidden:   the shared expert's hidden width.
    """

    gate_mean: float
    gate_N: torch.Tensor
    spectra: WeightedSpectra
    cos_routed: torch.Tensor
    d_hidden: int


def shared_expert_metric(inputs: LayerInputs, max_points: int | None = 256) -> SharedExpertProbe | None:
    """The shared expert on its own (:class:`~moewidgets.hf.metrics.SharedExpertProbe`), None for a block
    without one. ``max_points``: the tokens of its spectra, the same seeded subset as "spectra" uses."""
    _check_points(max_points)
    block = inputs.block
    if block.shared_expert is None:
        return None
    bank = block.shared_bank()
    X = inputs.x_ND.to(bank.w_gate_EFD.device)
    w_s = block.shared_expert_gate.weight.detach().to(device=X.device, dtype=torch.float32)     # (1, D)
    s_N = torch.sigmoid(X @ w_s.T)[:, 0]
    pts = _spectra_points(X.shape[0], max_points, inputs.seed).to(X.device)
    spectra = routed_spectra(bank, X[pts], s_N[pts, None])
    J_shared = routed_mean_jacobians(bank, X, s_N[:, None])[0]                        # (D, D)
    J_routed = routed_mean_jacobians(inputs.bank, inputs.x_ND, inputs.weights_NE)     # (E, D, D)
    cos = (J_routed * J_shared).sum((-2, -1)) / (J_routed.norm(dim=(-2, -1)) * J_shared.norm())
    return SharedExpertProbe(gate_mean=float(s_N.mean()), gate_N=s_N, spectra=replace(spectra, sv=None),
                             cos_routed=cos, d_hidden=int(bank.w_gate_EFD.shape[1]))


def _shared_summary(r: SharedExpertProbe | None) -> dict[str, float]:
    if r is None:
        return {}
    live = ~torch.isnan(r.cos_routed)
    return {"gate_mean": r.gate_mean, "sigma1": float(r.spectra.sigma1[0]),
            "stable_rank": float(r.spectra.stable_rank[0]), "erank": float(r.spectra.erank[0]),
            "cos_routed_mean_abs": float(r.cos_routed[live].abs().mean()) if bool(live.any()) else math.nan}


def subspaces_metric(inputs: LayerInputs, rank: int = 16, n_draws: int = 20, n_splits: int = 10) -> SubspaceComparison:
    """GA-2/GA-3 on a Hugging Face layer: the experts' routed input subspaces (weighted PCA of the block inputs with
    this probe's routing weights, rank ``rank``; experts with fewer than 5·rank tokens skipped with the reason) and
    their normalised geodesic Grassmann distances with the random-token-group null, the split-half floor and the
    isotropic level (:func:`~moewidgets.geometry.subspaces.compare_subspaces`). The spec suggests r ∈ {8, 16, 32}
    for pretrained models (chapter 2)."""
    subspaces = routed_subspaces(inputs.x_ND.float().cpu(), inputs.weights_NE.float().cpu(), rank=rank,
                                 space="inputs")
    return compare_subspaces(subspaces, generator=inputs.generator(), n_draws=n_draws, n_splits=n_splits)


def _subspaces_summary(r: SubspaceComparison) -> dict[str, float]:
    return {"grassmann_mean": float(r.between_mean), "grassmann_null": float(r.group_null_mean),
            "grassmann_floor": float(r.floor_mean), "grassmann_isotropic": float(r.iso_mean),
            "grassmann_pairs": float(r.n_pairs)}


def _check_subspaces(rank: int = 16, n_draws: int = 20, n_splits: int = 10, **_) -> None:
    _positive_int("rank", rank)
    _positive_int("n_draws", n_draws)
    _positive_int("n_splits", n_splits)


#: The metric registry :func:`~moewidgets.hf.probing.probe` runs: name → :class:`~moewidgets.hf.metrics.Metric`.
METRICS: dict[str, Metric] = {
    "spectra": Metric(spectra_metric, _spectra_summary, _check_points),
    "alignment": Metric(alignment_metric, _alignment_summary, _check_alignment),
    "pca": Metric(pca_metric, _pca_summary, _check_pca),
    "shared_expert": Metric(shared_expert_metric, _shared_summary, _check_points),
    "subspaces": Metric(subspaces_metric, _subspaces_summary, _check_subspaces),
}
#: What ``probe(metrics=None)`` runs: every metric but "subspaces", whose rank needs thousands of tokens per layer
#: (ask for it by name, with ``metric_options={"subspaces": {"rank": ...}}``).
DEFAULT_METRICS = ("spectra", "alignment", "pca", "shared_expert")
