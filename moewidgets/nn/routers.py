"""Routers: which experts each token goes to, and with what gate.

Shape legend: T tokens, D model width, E experts, K top-k.

The router contract (``design.md``): ``router(x_TD, select_bias_E=None) -> RouterOutput`` with ``gates_TK``,
``idx_TK``, ``probs_TE`` (or ``None``), ``logits_TE`` and ``aux_loss`` (a scalar tensor, already weighted).
Stateful routers (the K-Means router of chapter 3) also expose ``update(x_TD, out)``, called by the layer after a
training forward. The layer owns the loss-free selection bias and passes it in as ``select_bias_E``.
Every router exposes ``effective_rows_ED()``: the (E, D) rows its scores use (``SoftmaxRouter``: its weights,
``MPIRouter``: the power-iterated rows, ``KMeansRouter``: the centroids), which the chapter-3 similarity and the
chapter-4 alignment metrics read.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F_
from torch import nn

from ..balance import switch_aux_loss, z_loss
from .experts import fan_in_uniform_

__all__ = ["RouterOutput", "route_logits", "SoftmaxRouter", "MPIRouter", "KMeansRouter", "make_router", "select_topk",
           "mpi_rows", "input_side_weights"]


@dataclass
class RouterOutput:
    """What a router decided for a batch of tokens (see module docstring for shapes)."""

    gates_TK: torch.Tensor
    idx_TK: torch.Tensor
    probs_TE: torch.Tensor | None
    logits_TE: torch.Tensor
    aux_loss: torch.Tensor


def select_topk(probs_TE: torch.Tensor, k: int, gate: str, select_bias_E: torch.Tensor | None = None,
                scaled_logits_TE: torch.Tensor | None = None):
    """Top-k selection and gate values, shared by every router that produces probabilities.

    Selection ranks ``probs_TE + select_bias_E`` (the bias never enters a gate value). Gates:
    ``gate="softmax"`` keeps ``p_i`` of the selected experts; ``gate="renorm"`` uses ``p_i / Σ_{j∈top-k} p_j``,
    computed as a softmax over the selected ``scaled_logits_TE = z/τ`` when they are given (same value; then
    unselected logits get exactly zero gradient, and at k = 1 the router gets none at all).
    For ``k == E`` the selection is every expert (fully soft routing, gates = p under "softmax").

    Returns ``(gates_TK, idx_TK)``.
    """
    T, E = probs_TE.shape
    if k == E and select_bias_E is None:
        # fully soft: every expert, in a fixed order (saves a sort; the order of slots carries no meaning here)
        idx_TK = torch.arange(E, device=probs_TE.device).expand(T, E)
        gates_TK = probs_TE
    else:
        scores_TE = probs_TE if select_bias_E is None else probs_TE + select_bias_E
        idx_TK = torch.topk(scores_TE.detach(), k, dim=-1).indices
        gates_TK = probs_TE.gather(1, idx_TK)
    if gate == "renorm":
        if scaled_logits_TE is not None:
            gates_TK = torch.softmax(scaled_logits_TE.gather(1, idx_TK), dim=-1)
        else:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
    return gates_TK, idx_TK


def route_logits(logits_TE: torch.Tensor, k: int, temperature: float, gate: str, aux_weight: float = 0.0,
                 z_weight: float = 0.0, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
    """From router logits to a :class:`RouterOutput`, shared by every logit router (softmax, MPI):
    ``p = softmax(z / τ)``, top-k selection and gates (:func:`select_topk`), and the weighted balancing losses
    ``aux_weight · E Σ f_i P_i + z_weight · mean(logsumexp(z)²)``."""
    scaled_TE = logits_TE / temperature
    probs_TE = torch.softmax(scaled_TE, dim=-1)
    gates_TK, idx_TK = select_topk(probs_TE, k, gate, select_bias_E, scaled_TE)
    aux = logits_TE.new_zeros(())
    if aux_weight > 0:
        aux = aux + aux_weight * switch_aux_loss(probs_TE, idx_TK)
    if z_weight > 0:
        aux = aux + z_weight * z_loss(logits_TE)
    return RouterOutput(gates_TK, idx_TK, probs_TE, logits_TE, aux)


class SoftmaxRouter(nn.Module):
    """Linear softmax router with temperature and top-k: ``p = softmax((W_r x + b_r) / τ)``.

    Args:
        d_model, n_experts, k: D, E, K (1 ≤ k ≤ E; k = E is fully soft).
        temperature: τ > 0 (sharpness is 1/τ).
        gate: "softmax" (default; the router gets a gradient even at k = 1) or "renorm" (Mixtral).
        aux_weight, z_weight: weights of the Switch aux loss and the z-loss folded into ``aux_loss``.

    Parameters: ``w_ED`` (E, D) router rows, ``b_E`` (E,).

    >>> r = SoftmaxRouter(8, 4, k=2, generator=torch.Generator().manual_seed(0))
    >>> out = r(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)))
    >>> out.idx_TK.shape, out.gates_TK.shape, out.probs_TE.shape
    (torch.Size([5, 2]), torch.Size([5, 2]), torch.Size([5, 4]))
    """

    def __init__(self, d_model: int, n_experts: int, k: int, temperature: float = 1.0, gate: str = "softmax",
                 aux_weight: float = 0.0, z_weight: float = 0.0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k={k} must be in 1..n_experts={n_experts}")
        self.n_experts, self.k, self.temperature, self.gate = n_experts, k, float(temperature), gate
        self.aux_weight, self.z_weight = float(aux_weight), float(z_weight)
        self.w_ED = nn.Parameter(fan_in_uniform_(torch.empty(n_experts, d_model, dtype=dtype), d_model, generator))
        self.b_E = nn.Parameter(torch.zeros(n_experts, dtype=dtype))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits ``z = W_r x + b_r``, (T, E)."""
        return torch.addmm(self.b_E, x_TD, self.w_ED.T)

    def effective_rows_ED(self) -> torch.Tensor:
        """The rows the logits use, (E, D): ``w_ED`` itself (chapter 4 compares them with the experts)."""
        return self.w_ED

    def forward(self, x_TD: torch.Tensor, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
        return route_logits(self.logits(x_TD), self.k, self.temperature, self.gate, self.aux_weight,
                            self.z_weight, select_bias_E)


def input_side_weights(experts) -> torch.Tensor:
    """The expert matrices an MPI router aligns with, (E, F, D): ``w_in_EFD`` of a GELU bank (its first layer),
    ``w_gate_EFD`` of a SwiGLU bank (the SiLU-gated projection, as in the official code; spec §2.3)."""
    act = getattr(experts, "activation", None)
    if act == "gelu":
        return experts.w_in_EFD
    if act == "swiglu":
        return experts.w_gate_EFD
    raise ValueError(f"experts.activation={act!r} must be 'gelu' or 'swiglu' (an expert bank of moewidgets.nn.experts)")


def mpi_rows(r_ED: torch.Tensor, w_EFD: torch.Tensor, scale: float, steps: int = 1,
             detach: bool = False) -> torch.Tensor:
    """The Manifold Power Iteration rows ``R'_i = C · normalize(R_i W_iᵀ W_i)``, repeated ``steps`` times.

    One step per row i is a power-iteration step with ``M_i = W_iᵀ W_i`` (D×D) followed by the retraction to the
    sphere of radius ``C = scale``: ``r ← C · r M_i / ‖r M_i‖``. Computed as two batched products (never forming
    ``M_i``), ``2·E·F·D`` multiply-adds per step. ``detach=True`` stops the gradient into ``w_EFD``.

    Shapes: ``r_ED`` (E, D), ``w_EFD`` (E, F, D) → (E, D), every row of norm ``scale``.

    >>> r = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    >>> w = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1))
    >>> mpi_rows(r, w, scale=0.5).norm(dim=1)
    tensor([0.5000, 0.5000, 0.5000, 0.5000])

    Chapter 4 (book/chapter4.ipynb).
    """
    if detach:
        w_EFD = w_EFD.detach()
    phi_ED = r_ED
    for _ in range(steps):   # two bmm's per step (measured ≈ 2× faster than einsum at widget sizes, fwd + bwd)
        h_EF1 = torch.bmm(w_EFD, phi_ED.unsqueeze(2))                                   # W_i r_i
        phi_ED = F_.normalize(torch.bmm(h_EF1.transpose(1, 2), w_EFD).squeeze(1), dim=-1)  # W_iᵀ W_i r_i, retracted
    return scale * phi_ED


class MPIRouter(nn.Module):
    """Manifold Power Iteration router (Wu et al. 2026; the official code's semantics, spec §2.4–§2.5).

    The trained parameter ``r_ED`` (E, D) is never overwritten. Every forward recomputes the effective rows::

        R'_i = C · (R_i W_iᵀ W_i) / ‖R_i W_iᵀ W_i‖,   C = C' / √E

    (``power_steps`` repetitions; ``W_i`` the expert's input-side matrix, see :func:`input_side_weights`), then
    ``z = R' x``, ``p = softmax(z / τ)``, top-k and gates through :func:`select_topk` (both gate conventions) and the
    same aux / z losses as :class:`SoftmaxRouter`. Gradients reach ``r_ED`` through the power step and the
    retraction, and the expert weights too unless ``detach=True``.

    Inference: :meth:`precompute` stores ``R'`` once (the router becomes a plain linear router with the same
    logits); :meth:`thaw` returns to the training behaviour.

    Args:
        experts: the expert bank to align with (held as a reference, not registered as a submodule).
        d_model, n_experts, k, temperature, gate, aux_weight, z_weight: as for :class:`SoftmaxRouter`.
        scale: C' (> 0); the rows have norm ``C = scale / √n_experts``.
        power_steps: power steps per forward (≥ 1; the paper uses 1).
        detach: stop the gradient into the expert weights inside the power step.

    >>> from moewidgets.nn.experts import GELUExperts
    >>> g = torch.Generator().manual_seed(0)
    >>> bank = GELUExperts(4, 8, 16, generator=g)
    >>> r = MPIRouter(bank, 8, 4, k=2, generator=g)
    >>> out = r(torch.randn(5, 8, generator=g))
    >>> out.gates_TK.shape, round(float(r.effective_rows_ED().detach().norm(dim=1)[0]), 4)
    (torch.Size([5, 2]), 0.5)

    Chapter 4 (book/chapter4.ipynb).
    """

    def __init__(self, experts: nn.Module, d_model: int, n_experts: int, k: int, temperature: float = 1.0,
                 gate: str = "softmax", aux_weight: float = 0.0, z_weight: float = 0.0, scale: float = 1.0,
                 power_steps: int = 1, detach: bool = False, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k={k} must be in 1..n_experts={n_experts}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale!r} must be a finite number > 0")
        if isinstance(power_steps, bool) or not isinstance(power_steps, int) or power_steps < 1:
            raise ValueError(f"power_steps={power_steps!r} must be an integer >= 1")
        w_EFD = input_side_weights(experts)
        if tuple(w_EFD.shape[::2]) != (n_experts, d_model):
            raise ValueError(f"experts have (E, F, D)={tuple(w_EFD.shape)}, the router needs E={n_experts}, "
                             f"D={d_model}")
        object.__setattr__(self, "experts", experts)     # a reference: its parameters stay the bank's own
        self.n_experts, self.k, self.temperature, self.gate = n_experts, k, float(temperature), gate
        self.aux_weight, self.z_weight = float(aux_weight), float(z_weight)
        self.scale, self.power_steps, self.detach = float(scale), power_steps, bool(detach)
        self.row_norm = self.scale / math.sqrt(n_experts)          # C = C'/√E
        # same draw as SoftmaxRouter.w_ED: an MPI model and a softmax model of one seed start from the same R
        self.r_ED = nn.Parameter(fan_in_uniform_(torch.empty(n_experts, d_model, dtype=dtype), d_model, generator))
        self.frozen_ED: torch.Tensor | None = None

    def effective_rows_ED(self) -> torch.Tensor:
        """``R'`` (E, D), recomputed from ``r_ED`` and the current expert weights (or the precomputed rows)."""
        if self.frozen_ED is not None:
            return self.frozen_ED
        return mpi_rows(self.r_ED, input_side_weights(self.experts), self.row_norm, self.power_steps, self.detach)

    @torch.no_grad()
    def precompute(self) -> torch.Tensor:
        """Inference: compute ``R'`` once and use it in every later forward (zero power-step cost). Returns it."""
        self.frozen_ED = None
        self.frozen_ED = self.effective_rows_ED().detach().clone()
        return self.frozen_ED

    def thaw(self) -> None:
        """Back to recomputing ``R'`` in every forward (training)."""
        self.frozen_ED = None

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits ``z = R' x``, (T, E) (no bias, as in the official code)."""
        return x_TD @ self.effective_rows_ED().T

    def forward(self, x_TD: torch.Tensor, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
        if self.frozen_ED is not None and self.training and torch.is_grad_enabled():
            raise RuntimeError("MPIRouter: the precomputed rows are for inference; call router.thaw() before "
                               "training (or model.eval() / torch.no_grad() to infer)")
        return route_logits(self.logits(x_TD), self.k, self.temperature, self.gate, self.aux_weight,
                            self.z_weight, select_bias_E)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, k={self.k}, C'={self.scale:g} (C={self.row_norm:.3g}), "
                f"power_steps={self.power_steps}, detach={self.detach}")


class KMeansRouter(nn.Module):
    """The parameter-free online K-Means router (Ahrac, Hochwald, Geva 2026; spec §1.7, our reference algorithm).

    Each expert keeps a running mean ``C_i`` of the token states routed to it (a buffer, never a parameter).
    Scores are cosines, and everything after them is the logit routers' path (:func:`route_logits`)::

        s_ti = cos(x_t, C_i) = x̂_t · Ĉ_i                     (T, E), in [−1, 1]
        p_t  = softmax(s_t / τ);  top-k of p_t (+ the layer's loss-free bias, selection only)
        g_t  = p of the selected ("softmax") or softmax over the selected s/τ ("renorm", the spec's default)

    After a training forward the layer calls :meth:`update` (no gradient), with X_i the batch tokens routed to i::

        mode "ema":         C_i ← (1 − β) C_i + β · mean(X_i)       (experts with no token this batch keep C_i)
        mode "cumulative":  C_i ← (n_i C_i + Σ X_i) / (n_i + |X_i|),  n_i ← n_i + |X_i|

    ``normalize=True`` averages x̂ instead of x (spherical k-means). Centroids are initialised on the first training
    batch with E distinct random tokens of that batch (never zeros: every cosine would be 0 and top-k would send every
    token to the same experts). Evaluation never changes the state; an uninitialised router refuses to evaluate.
    The scores carry gradient into x (so into whatever produced x) unless ``detach=True``; ``C`` gets none.

    Args:
        d_model, n_experts, k, temperature, gate, aux_weight, z_weight: as for :class:`SoftmaxRouter`.
        mode: "ema" | "cumulative";  rate: β in (0, 1] (EMA only);  normalize, detach: see above.
        generator: draws the seed of the initialisation (which tokens become the first centroids).

    Buffers: ``centroids_ED`` (E, D), ``counts_E`` (E,) tokens seen per expert (cumulative mode's n; EMA mode counts
    too, for reporting), ``initialized`` (a 0-d bool).

    >>> r = KMeansRouter(8, 4, k=2, generator=torch.Generator().manual_seed(0))
    >>> x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    >>> out = r(x); r.update(x, out)              # a training forward initialises, then moves the centroids
    >>> out.idx_TK.shape, bool(r.initialized), len(list(r.parameters()))
    (torch.Size([16, 2]), True, 0)

    Chapter 3 (book/chapter3.ipynb).
    """

    def __init__(self, d_model: int, n_experts: int, k: int, temperature: float = 1.0, gate: str = "softmax",
                 aux_weight: float = 0.0, z_weight: float = 0.0, mode: str = "ema", rate: float = 0.05,
                 normalize: bool = False, detach: bool = False, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k={k} must be in 1..n_experts={n_experts}")
        if mode not in ("ema", "cumulative"):
            raise ValueError(f"mode={mode!r} must be 'ema' or 'cumulative'")
        if not (isinstance(rate, (int, float)) and 0 < rate <= 1):
            raise ValueError(f"rate={rate!r} must be in (0, 1] (the EMA rate β)")
        self.n_experts, self.k, self.temperature, self.gate = n_experts, k, float(temperature), gate
        self.aux_weight, self.z_weight = float(aux_weight), float(z_weight)
        self.mode, self.rate, self.normalize, self.detach = mode, float(rate), bool(normalize), bool(detach)
        # one draw from the model's generator now; the initial tokens are picked from it at the first batch
        self.init_seed = 0 if generator is None else int(torch.randint(2 ** 31 - 1, (1,), generator=generator))
        self.register_buffer("centroids_ED", torch.zeros(n_experts, d_model, dtype=dtype))
        self.register_buffer("counts_E", torch.zeros(n_experts, dtype=dtype))
        self.register_buffer("initialized", torch.tensor(False))

    def effective_rows_ED(self) -> torch.Tensor:
        """The centroids ``C`` (E, D): the rows the cosine scores use."""
        return self.centroids_ED

    @torch.no_grad()
    def init_centroids(self, x_TD: torch.Tensor) -> None:
        """``C_i ←`` E distinct random tokens of ``x_TD`` (drawn with the router's own seed); resets the counts."""
        T = x_TD.shape[0]
        if T < self.n_experts:
            raise ValueError(f"KMeansRouter: the first training batch has T={T} tokens, initialising needs at least "
                             f"n_experts={self.n_experts} (one distinct token per centroid)")
        g = torch.Generator().manual_seed(self.init_seed)
        pick_E = torch.randperm(T, generator=g)[: self.n_experts].to(x_TD.device)
        self.centroids_ED.copy_(x_TD.detach()[pick_E])
        self.counts_E.zero_()
        self.initialized.fill_(True)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Cosine scores ``s = x̂ Ĉᵀ``, (T, E)."""
        if self.detach:
            x_TD = x_TD.detach()
        return F_.normalize(x_TD, dim=-1) @ F_.normalize(self.centroids_ED, dim=-1).T

    def forward(self, x_TD: torch.Tensor, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
        if not bool(self.initialized):
            if not self.training:
                raise RuntimeError("KMeansRouter: the centroids are not initialised yet; run one training forward "
                                   "(model.train()) or call router.init_centroids(x_TD) first")
            self.init_centroids(x_TD)
        return route_logits(self.logits(x_TD), self.k, self.temperature, self.gate, self.aux_weight,
                            self.z_weight, select_bias_E)

    @torch.no_grad()
    def update(self, x_TD: torch.Tensor, out: RouterOutput) -> None:
        """Move every centroid towards the mean of this batch's tokens routed to it (see the class docstring)."""
        x_TD = x_TD.detach()
        if self.normalize:
            x_TD = F_.normalize(x_TD, dim=-1)
        T, K = out.idx_TK.shape
        E, D = self.centroids_ED.shape
        flat_e = out.idx_TK.reshape(-1)                                        # (T·K,) expert of each slot
        x_SD = x_TD.unsqueeze(1).expand(T, K, D).reshape(T * K, D)             # (T·K, D) token of each slot
        sum_ED = x_TD.new_zeros(E, D).index_add_(0, flat_e, x_SD)
        n_E = x_TD.new_zeros(E).index_add_(0, flat_e, torch.ones_like(flat_e, dtype=x_TD.dtype))
        hit_E = n_E > 0                                                        # experts with no token keep C_i
        if self.mode == "ema":
            mean_ED = sum_ED / n_E.clamp_min(1).unsqueeze(1)
            new_ED = (1 - self.rate) * self.centroids_ED + self.rate * mean_ED
        else:
            total_E = self.counts_E + n_E
            new_ED = (self.counts_E.unsqueeze(1) * self.centroids_ED + sum_ED) / total_E.clamp_min(1).unsqueeze(1)
        self.centroids_ED.copy_(torch.where(hit_E.unsqueeze(1), new_ED, self.centroids_ED))
        self.counts_E.add_(n_E)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, k={self.k}, mode={self.mode}, rate={self.rate:g}, "
                f"normalize={self.normalize}, detach={self.detach}")


def make_router(cfg, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                experts: nn.Module | None = None) -> nn.Module:
    """The router named by ``cfg.router`` for an :class:`~moewidgets.config.MoEConfig`.

    ``experts``: the layer's expert bank, required by ``router="mpi"`` (the router aligns its rows with it).
    """
    if cfg.router == "softmax":
        return SoftmaxRouter(cfg.d_model, cfg.n_experts, cfg.k, cfg.temperature, cfg.gate,
                             cfg.aux_weight, cfg.z_weight, generator, dtype)
    if cfg.router == "mpi":
        if experts is None:
            raise ValueError("make_router(router='mpi') needs experts= (the bank whose weights it aligns with)")
        return MPIRouter(experts, cfg.d_model, cfg.n_experts, cfg.k, cfg.temperature, cfg.gate, cfg.aux_weight,
                         cfg.z_weight, cfg.mpi_scale, cfg.mpi_steps, cfg.mpi_detach, generator, dtype)
    if cfg.router == "kmeans":
        return KMeansRouter(cfg.d_model, cfg.n_experts, cfg.k, cfg.temperature, cfg.gate, cfg.aux_weight,
                            cfg.z_weight, cfg.kmeans_mode, cfg.kmeans_rate, cfg.kmeans_normalize, cfg.kmeans_detach,
                            generator, dtype)
    raise ValueError(f"router={cfg.router!r} must be one of 'softmax', 'kmeans', 'mpi'")
