"""Routers: which experts each token goes to, and with what gate.

Shape legend: T tokens, D model width, E experts, K top-k, F expert hidden width, S seeds (a seed group's axis).

The router contract (``design.md``): ``router(x_TD, select_bias_E=None) -> RouterOutput`` with ``gates_TK``,
``idx_TK``, ``probs_TE`` (or ``None``), ``logits_TE`` and ``aux_loss`` (a scalar tensor, already weighted).
Stateful routers (the K-Means router of chapter 3) also expose ``update(x_TD, out)``, called by the layer after a
training forward. The layer owns the loss-free selection bias and passes it in as ``select_bias_E``.
Every router exposes ``effective_rows_ED()``: the (E, D) rows its scores use (``SoftmaxRouter``: its weights,
``MPIRouter``: the power-iterated rows, ``KMeansRouter``: the centroids), which the chapter-3 similarity and the
chapter-4 alignment metrics read.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as fn
from .activations import activation
from .experts import fan_in_uniform_
from .functional import RouterOutput, mpi_rows, select_topk

__all__ = ["RouterOutput", "route_logits", "SoftmaxRouter", "MPIRouter", "KMeansRouter", "make_router", "select_topk",
           "mpi_rows", "input_side_weights"]


def route_logits(logits_TE: torch.Tensor, k: int, temperature: float, gate: str, aux_weight: float = 0.0,
                 z_weight: float = 0.0, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
    """From router logits to a :class:`RouterOutput`: :func:`moewidgets.nn.functional.route` (probabilities with
    temperature, top-k with the selection-only bias, gates, weighted aux and z losses)."""
    return fn.route(logits_TE, k, temperature, gate, aux_weight, z_weight, select_bias_E)


class _Router(nn.Module):
    """What every router shares: the routing after the logits, and the logits from given tensors.

    ``logits_with(params, buffers, bank_w, x)`` computes the logits from tensors named as this router's own
    parameters and buffers (and the expert bank's weights, ``bank_w``): the router's ``logits(x)`` passes its own,
    and :class:`~moewidgets.multiseed.MultiSeedTrainer` passes S seeds' stacked copies (x (S, T, D), logits
    expert-major (S, E, T)). Stateful routers add ``prepare_with`` (before the logits) and ``update_with`` (after
    a training forward) on the same terms.
    """

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """This router's own parameters and buffers by name (what ``logits_with`` takes; the module's own dicts,
        read-only by convention: no copy, since this runs in every forward)."""
        return self._parameters, self._buffers

    def bank_weights(self) -> dict[str, torch.Tensor]:
        return {}

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits, (T, E)."""
        params, buffers = self.state()
        return self.logits_with(params, buffers, self.bank_weights(), x_TD)

    def route_with(self, logits_TE: torch.Tensor, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
        """:func:`moewidgets.nn.functional.route` with this router's k, τ, gate convention and loss weights."""
        return fn.route(logits_TE, self.k, self.temperature, self.gate, self.aux_weight, self.z_weight,
                        select_bias_E)

    def forward(self, x_TD: torch.Tensor, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
        return self.route_with(self.logits(x_TD), select_bias_E)


class SoftmaxRouter(_Router):
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

    def logits_with(self, params, buffers, bank_w, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits ``z = W_r x + b_r``, (T, E) (:func:`~moewidgets.nn.functional.linear_logits`)."""
        return fn.linear_logits(params["w_ED"], params["b_E"], x_TD)

    def effective_rows_ED(self) -> torch.Tensor:
        """The rows the logits use, (E, D): ``w_ED`` itself (chapter 4 compares them with the experts)."""
        return self.w_ED



def input_side_weights(experts) -> torch.Tensor:
    """The expert matrices an MPI router aligns with, (E, F, D): ``w_in_EFD`` of a GELU bank (its first layer),
    ``w_gate_EFD`` of a SwiGLU bank (the SiLU-gated projection, as in the official code): the table entry's
    ``input_weight`` (chapter 4)."""
    act = getattr(experts, "activation", None)
    try:
        return getattr(experts, activation(act).input_weight)
    except ValueError:
        raise ValueError(f"experts.activation={act!r} must be one of the activation table's names "
                         "(moewidgets.nn.activations.ACTIVATIONS; an expert bank of moewidgets.nn.experts)") from None


class MPIRouter(_Router):
    """Manifold Power Iteration router (Wu, Lv, Xie, Lin 2026, arXiv 2606.12397; the semantics of its official code).

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

    def bank_weights(self) -> dict[str, torch.Tensor]:
        return {activation(self.experts.activation).input_weight: input_side_weights(self.experts)}

    def logits_with(self, params, buffers, bank_w, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits ``z = R' x`` (no bias, as in the official code), R' recomputed from ``r_ED`` and the bank's
        input-side weights (:func:`~moewidgets.nn.functional.mpi_logits`), (T, E)."""
        return fn.mpi_logits(params["r_ED"], bank_w[activation(self.experts.activation).input_weight], x_TD,
                             self.row_norm, self.power_steps, self.detach)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits ``z = R' x``, (T, E) (the precomputed rows after :meth:`precompute`)."""
        if self.frozen_ED is not None:
            return x_TD @ self.frozen_ED.T
        return super().logits(x_TD)

    def forward(self, x_TD: torch.Tensor, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
        if self.frozen_ED is not None and self.training and torch.is_grad_enabled():
            raise RuntimeError("MPIRouter: the precomputed rows are for inference; call router.thaw() before "
                               "training (or model.eval() / torch.no_grad() to infer)")
        return super().forward(x_TD, select_bias_E)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, k={self.k}, C'={self.scale:g} (C={self.row_norm:.3g}), "
                f"power_steps={self.power_steps}, detach={self.detach}")


class KMeansRouter(_Router):
    """The parameter-free online K-Means router (Ahrac, Hochwald, Geva 2026, arXiv 2605.12476; our reading of it).

    Each expert keeps a running mean ``C_i`` of the token states routed to it (a buffer, never a parameter).
    Scores are cosines, and everything after them is the logit routers' path (:func:`route_logits`)::

        s_ti = cos(x_t, C_i) = x̂_t · Ĉ_i                     (T, E), in [−1, 1]
        p_t  = softmax(s_t / τ);  top-k of p_t (+ the layer's loss-free bias, selection only)
        g_t  = p of the selected ("softmax") or softmax over the selected s/τ ("renorm", our default)

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
        fn.kmeans_init(self.centroids_ED, self.counts_E, x_TD, self.init_seed)
        self.initialized.fill_(True)

    def logits_with(self, params, buffers, bank_w, x_TD: torch.Tensor) -> torch.Tensor:
        """Cosine scores ``s = x̂ Ĉᵀ``, (T, E) (:func:`~moewidgets.nn.functional.cosine_logits`)."""
        return fn.cosine_logits(buffers["centroids_ED"], x_TD, self.detach)

    @torch.no_grad()
    def prepare_with(self, buffers, x_TD: torch.Tensor, training: bool, init_seeds) -> None:
        """Before the scores: initialise the centroids on the first training batch (every replica at once)."""
        flag = buffers["initialized"]
        if not bool(flag if flag.dim() == 0 else flag.all()):
            if not training:
                raise RuntimeError("KMeansRouter: the centroids are not initialised yet; run one training forward "
                                   "(model.train()) or call router.init_centroids(x_TD) first")
            fn.kmeans_init(buffers["centroids_ED"], buffers["counts_E"], x_TD, init_seeds)
            buffers["initialized"].fill_(True)

    @torch.no_grad()
    def update_with(self, buffers, x_TD: torch.Tensor, idx_TK: torch.Tensor, active_S=None) -> None:
        """After a training forward: :func:`~moewidgets.nn.functional.kmeans_update` of the given state."""
        fn.kmeans_update(buffers["centroids_ED"], buffers["counts_E"], x_TD, idx_TK, self.mode, self.rate,
                         self.normalize, active_S)

    def forward(self, x_TD: torch.Tensor, select_bias_E: torch.Tensor | None = None) -> RouterOutput:
        self.prepare_with(self.state()[1], x_TD, self.training, self.init_seed)
        return super().forward(x_TD, select_bias_E)

    @torch.no_grad()
    def update(self, x_TD: torch.Tensor, out: RouterOutput) -> None:
        """Move every centroid towards the mean of this batch's tokens routed to it (see the class docstring)."""
        self.update_with(self.state()[1], x_TD, out.idx_TK)

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
