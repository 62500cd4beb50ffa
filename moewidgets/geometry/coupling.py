"""Router–expert geometric coupling (Ahrac, Hochwald, Geva 2026; chapter 3, book/chapter3.ipynb).

Shape legend: T tokens, D model width, F expert hidden width, E experts, K top-k, N rows of a gradient matrix.

For one token x routed through ``y = Σ_{i∈S} g_i(x) E_i(x)`` with upstream gradient δ = ∂L/∂y (spec §1.4)::

    ∂L/∂r_i        = α_i · x          α_i = ∂L/∂z_i   (every router row, selected or not)
    ∂L/∂W_in[i, n] = β_in · x         (GELU: the rows of w_in; SwiGLU: the rows of w_gate and w_up; i ∈ S only)
    ∂L/∂W_out[i]   = g_i · δ h_iᵀ     (along δ and h_i, not along x: the output side is not coupled)

Under the "renorm" gate an unselected row gets α_i = 0 exactly; under "softmax" it gets ``−p_i ⟨δ, y⟩ ≠ 0``, still
along x. With plain SGD the change of r_i and of every input row of expert i therefore stays in the span of the
tokens routed to i (:func:`sgd_span_residual`); a Switch aux loss adds batch-wide terms to every row
(:func:`gradient_spans`). The remaining functions measure what the coupling predicts after training: router rows
that stay dissimilar (:func:`router_row_similarity`), router scores that predict expert activations
(:func:`score_activation_correlation`) and router rows that point at their routed centroids
(:func:`centroid_matching`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F_

from ..nn.activations import activation as _activation
from .alignment import make_generator

__all__ = ["CouplingExactness", "coupling_exactness", "span_residual", "SpanResidual", "sgd_span_residual",
           "GradientSpans", "gradient_spans", "RowSimilarity", "router_row_similarity", "spearman",
           "ScoreActivation", "expert_activation", "score_activation_correlation", "CentroidMatching",
           "centroid_matching", "routed_means"]


def _abs_cos(A_ND: torch.Tensor, x_D: torch.Tensor) -> torch.Tensor:
    """``|cos(row, x)|`` for every row of A (NaN for an all-zero row: no direction to compare)."""
    norms_N = A_ND.norm(dim=-1) * x_D.norm()
    cos_N = (A_ND @ x_D).abs() / norms_N
    return torch.where(norms_N > 0, cos_N, torch.full_like(cos_N, float("nan")))


def _input_side(bank) -> dict[str, torch.Tensor]:
    """The expert matrices whose rows act on x: ``{"w_in_EFD": ...}`` (GELU) or gate and up (SwiGLU)."""
    if not _activation(bank.activation).gated:
        return {"w_in_EFD": bank.w_in_EFD}
    return {"w_gate_EFD": bank.w_gate_EFD, "w_up_EFD": bank.w_up_EFD}


def _learned_rows(layer) -> torch.Tensor:
    rows = getattr(layer.router, "w_ED", None)
    if not isinstance(rows, torch.nn.Parameter):
        raise ValueError(f"coupling needs a learned linear router (router='softmax'); got "
                         f"{type(layer.router).__name__}, whose routing rows are not trained parameters")
    return rows


@dataclass
class CouplingExactness:
    """Per-token gradient directions of one layer (:func:`coupling_exactness`).

    Fields::

        router_cos_TE    |cos(∂L/∂r_i, x_t)| for every token and router row (NaN where the gradient is exactly 0)
        router_norm_TE   ‖∂L/∂r_i‖
        selected_TE      True where expert i is in token t's top-k
        input_cos_TE     min over the expert's input-side rows (every input matrix) of |cos(∂L/∂W[i, n], x_t)|,
                         NaN for unselected experts (their gradient is exactly 0)
        output_cos_TE    median over the columns n of |cos(∂L/∂W_out[i, :, n], x_t)| (not coupled: < 1)
    """

    router_cos_TE: torch.Tensor
    router_norm_TE: torch.Tensor
    selected_TE: torch.Tensor
    input_cos_TE: torch.Tensor
    output_cos_TE: torch.Tensor

    @property
    def min_selected_cos(self) -> float:
        """Worst ``|cos|`` of any selected router row or expert input row with its token (1 = exact coupling)."""
        sel = self.selected_TE
        return float(torch.minimum(self.router_cos_TE[sel].min(), self.input_cos_TE[sel].min()))

    @property
    def min_unselected_cos(self) -> float:
        """Worst ``|cos|`` of an unselected router row with a non-zero gradient (NaN if all are exactly 0)."""
        c = self.router_cos_TE[~self.selected_TE]
        c = c[~torch.isnan(c)]
        return float(c.min()) if c.numel() else float("nan")

    @property
    def max_unselected_norm(self) -> float:
        """Largest router-row gradient norm among unselected experts (exactly 0 under the "renorm" gate)."""
        n = self.router_norm_TE[~self.selected_TE]
        return float(n.max()) if n.numel() else 0.0

    @property
    def median_output_cos(self) -> float:
        """Median ``|cos|`` between output-side gradient columns and the token (well below 1)."""
        c = self.output_cos_TE[self.selected_TE]
        return float(c[~torch.isnan(c)].median())


def coupling_exactness(layer, x_TD: torch.Tensor, delta_TD: torch.Tensor | None = None,
                       generator: torch.Generator | int | None = None) -> CouplingExactness:
    """RC-a: the gradient of ``L_t = ⟨δ_t, y(x_t)⟩`` for each token alone, against the token's direction.

    ``layer``: an :class:`~moewidgets.nn.layer.MoELayer` with a learned linear router; ``x_TD`` (T, D) tokens
    (a few dozen: one backward per token, the slow obvious way, on purpose); ``delta_TD`` upstream gradients
    (default: standard normal from ``generator``). The layer's parameters are not changed; their ``.grad`` is
    restored afterwards. Use float64 layers to see the identity to 1e-12.

    >>> from moewidgets.config import MoEConfig
    >>> from moewidgets.nn.layer import MoELayer
    >>> layer = MoELayer(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=6, gate="renorm"),
    ...                  generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> ce = coupling_exactness(layer, torch.randn(5, 8, dtype=torch.float64), generator=0)
    >>> ce.min_selected_cos > 1 - 1e-12, ce.max_unselected_norm
    (True, 0.0)

    Chapter 3 (book/chapter3.ipynb).
    """
    rows_ED = _learned_rows(layer)
    T, D = x_TD.shape
    if delta_TD is None:
        g = make_generator(generator)
        delta_TD = torch.randn(T, D, generator=g, dtype=torch.float64).to(x_TD.dtype)
    if delta_TD.shape != x_TD.shape:
        raise ValueError(f"delta_TD has shape {tuple(delta_TD.shape)}, expected the shape of x_TD {tuple(x_TD.shape)}")
    bank = layer.experts
    inputs = _input_side(bank)
    w_out_EDF = bank.w_out_EDF
    params = [rows_ED, *inputs.values(), w_out_EDF]
    saved = {name: p.grad for name, p in layer.named_parameters()}      # every parameter's .grad, restored below
    was_training = layer.training
    layer.eval()                         # no K-Means / loss-free state changes; gradients still flow
    E = rows_ED.shape[0]
    router_cos, router_norm, selected, input_cos, output_cos = [], [], [], [], []
    try:
        for t in range(T):
            x_1D = x_TD[t:t + 1].detach()
            for p in params:
                p.grad = None
            out = layer(x_1D)
            (out.y_TD * delta_TD[t:t + 1]).sum().backward()
            x_D = x_1D[0]
            sel_E = torch.zeros(E, dtype=torch.bool)
            sel_E[out.routing.idx_TK[0].cpu()] = True
            selected.append(sel_E)
            g_ED = rows_ED.grad if rows_ED.grad is not None else torch.zeros_like(rows_ED)
            router_cos.append(_abs_cos(g_ED, x_D))
            router_norm.append(g_ED.norm(dim=-1))
            worst_E = torch.full((E,), float("nan"), dtype=x_TD.dtype)
            out_E = torch.full((E,), float("nan"), dtype=x_TD.dtype)
            for i in range(E):
                if not sel_E[i]:
                    continue
                coss = [_abs_cos(w.grad[i], x_D) for w in inputs.values()]        # (F,) per input matrix
                worst_E[i] = torch.cat(coss).nan_to_num(nan=1.0).min()
                out_cols_FD = w_out_EDF.grad[i].T                                 # (F, D): one column per unit
                out_E[i] = _abs_cos(out_cols_FD, x_D).nanmedian()
            input_cos.append(worst_E)
            output_cos.append(out_E)
    finally:
        for name, p in layer.named_parameters():
            p.grad = saved[name]
        layer.train(was_training)
    return CouplingExactness(torch.stack(router_cos), torch.stack(router_norm), torch.stack(selected),
                             torch.stack(input_cos), torch.stack(output_cos))


@dataclass
class SpanResidual:
    """Relative residuals ``‖Δ − P Δ‖ / ‖Δ‖`` of weight changes outside a token span, per expert.

    Fields::

        router_E   residual of Δr_i outside span{tokens routed to i}   (NaN for an expert that never moved)
        input_E    residual of the whole input side of expert i (all its input rows, Frobenius)
        n_tokens_E how many distinct tokens were routed to i (the span's size)
    """

    router_E: torch.Tensor
    input_E: torch.Tensor
    n_tokens_E: torch.Tensor

    @property
    def max(self) -> float:
        """The largest residual over experts that moved (router rows and input rows)."""
        v = torch.cat([self.router_E, self.input_E])
        return float(v[~torch.isnan(v)].max())


def span_residual(delta_ND: torch.Tensor, tokens_MD: torch.Tensor, frobenius: bool = False) -> torch.Tensor:
    """Relative residual of each row of ``delta_ND`` outside the row span of ``tokens_MD``, (N,), in float64.

    ``‖δ − P δ‖ / ‖δ‖`` with P the orthogonal projector onto span{tokens} (an SVD with a relative rank cut of
    1e-10). NaN for an all-zero δ; 1 for an empty token set. ``frobenius=True`` treats ``delta_ND`` as one matrix
    and returns ``[‖Δ − Δ P‖_F / ‖Δ‖_F]`` (shape (1,)).

    >>> t = torch.tensor([[1., 0., 0.], [0., 1., 0.]])
    >>> span_residual(torch.tensor([[3., 4., 0.], [0., 0., 2.]]), t)
    tensor([0., 1.], dtype=torch.float64)
    """
    d_ND = delta_ND.detach().to(torch.float64)
    if tokens_MD.shape[0] == 0:
        out_ND = d_ND
    else:
        U, S, Vh = torch.linalg.svd(tokens_MD.detach().to(torch.float64), full_matrices=False)
        basis_RD = Vh[S > S[0] * 1e-10]                                  # (R, D) orthonormal rows
        out_ND = d_ND - (d_ND @ basis_RD.T) @ basis_RD                   # the part outside the span
    if frobenius:
        d_ND, out_ND = d_ND.reshape(1, -1), out_ND.reshape(1, -1)       # one flattened matrix
    norms_N = d_ND.norm(dim=-1)
    res_N = out_ND.norm(dim=-1) / norms_N
    return torch.where(norms_N > 0, res_N, torch.full_like(res_N, float("nan")))


def sgd_span_residual(layer, x_TD: torch.Tensor, target_TD: torch.Tensor, steps: int = 30, lr: float = 0.05,
                      optimizer: str = "sgd") -> SpanResidual:
    """RC-b: train a copy of ``layer`` on the fixed tokens ``x_TD`` (plain SGD, no momentum, no weight decay, or
    ``optimizer="adamw"``) with ``L = ½ mean_t ‖y_t − target_t‖²`` plus the layer's aux loss, and measure how far
    Δr_i and every ΔW_in[i, n] leave span{tokens ever routed to i} (:func:`span_residual`).

    With the "renorm" gate and no aux loss the residual is round-off; with AdamW it is not (Adam's per-coordinate
    scaling breaks the direction). ``layer`` itself is left untouched. For SGD, Δ is the sum of the updates
    ``−lr·∇`` it applies (accumulated apart from the weights), not ``w_end − w_start``: the rounding of ``w + Δ``
    would otherwise set a floor of ≈ ε‖w‖/‖Δ‖ on the relative residual of an expert that barely moves (1e-9 in
    float64 on one of five trained chapter-3 models). For AdamW, Δ is ``w_end − w_start``.
    A run whose loss turns non-finite raises (its NaN rows would read as "did not move").

    Chapter 3 (book/chapter3.ipynb).
    """
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r} must be 'sgd' or 'adamw'")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    work = copy.deepcopy(layer).train()
    rows_ED = _learned_rows(work)
    inputs = _input_side(work.experts)
    watched = [rows_ED, *inputs.values()]                        # router rows, then the input-side matrices
    start = [w.detach().clone() for w in watched]
    applied = [torch.zeros_like(w) for w in watched]             # SGD: Σ −lr·∇, free of the rounding of w + Δ
    params = list(work.parameters())
    opt = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    E = rows_ED.shape[0]
    routed_TE = torch.zeros(x_TD.shape[0], E, dtype=torch.bool)
    for step in range(steps):
        out = work(x_TD)
        routed_TE |= torch.zeros_like(routed_TE).scatter(1, out.routing.idx_TK.cpu(), True)
        loss = 0.5 * (out.y_TD - target_TD).square().sum(-1).mean() + out.aux_loss
        if not torch.isfinite(loss):
            # a diverged run has NaN weights: its rows would read as "did not move" and be skipped by ``max``
            raise ValueError(f"sgd_span_residual: the {optimizer} run diverged (loss {float(loss.detach())} at step "
                             f"{step + 1} of {steps}) with lr={lr}: use a smaller lr (the stable step scales as "
                             f"1 / mean‖x‖², here {float(x_TD.square().sum(-1).mean()):.3g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer == "sgd":
            for acc, w in zip(applied, watched):
                if w.grad is not None:
                    acc.add_(w.grad, alpha=-lr)
        opt.step()
    delta = applied if optimizer == "sgd" else [w.detach() - w0 for w, w0 in zip(watched, start)]
    router_E = torch.full((E,), float("nan"), dtype=torch.float64)
    input_E = torch.full((E,), float("nan"), dtype=torch.float64)
    for i in range(E):
        tokens_MD = x_TD[routed_TE[:, i]]
        router_E[i] = span_residual(delta[0][i:i + 1], tokens_MD)[0]
        # the whole input side of expert i as one matrix (Frobenius), as the spec states it
        dW_ND = torch.cat([d[i] for d in delta[1:]])                                     # (m·F, D)
        input_E[i] = span_residual(dW_ND, tokens_MD, frobenius=True)[0]
    return SpanResidual(router_E, input_E, routed_TE.sum(0))


@dataclass
class GradientSpans:
    """RC-c: where one batch's router-row gradients point (:func:`gradient_spans`).

    Fields::

        task_own_E   residual of the task-loss gradient of r_i outside span{tokens routed to i}   (≈ 0)
        aux_own_E    residual of the aux-loss gradient of r_i outside span{tokens routed to i}    (> 0)
        aux_all_E    residual of the aux-loss gradient of r_i outside span{all batch tokens}      (≈ 0)
        aux_norm_E   ‖∂L_aux/∂r_i‖ (non-zero for every row: the aux loss touches them all)
    """

    task_own_E: torch.Tensor
    aux_own_E: torch.Tensor
    aux_all_E: torch.Tensor
    aux_norm_E: torch.Tensor


def gradient_spans(layer, x_TD: torch.Tensor, target_TD: torch.Tensor) -> GradientSpans:
    """RC-c: split one batch's router-row gradient into the task part and the aux-loss part and locate each.

    The task loss ``½ mean_t ‖y_t − target_t‖²`` moves r_i only along tokens routed to i (under "renorm"); the
    layer's aux loss (``aux_weight > 0``) moves every row along a mix of all the batch's tokens. Use fewer tokens
    than D, or every span is the whole space.

    Chapter 3 (book/chapter3.ipynb).
    """
    rows_ED = _learned_rows(layer)
    if layer.cfg.aux_weight <= 0:
        raise ValueError(f"gradient_spans needs aux_weight > 0 (got aux_weight={layer.cfg.aux_weight}): it measures "
                         f"where the aux loss's gradient points")
    was_training = layer.training
    layer.eval()
    try:
        out = layer(x_TD)
        task = 0.5 * (out.y_TD - target_TD).square().sum(-1).mean()
        g_task_ED, = torch.autograd.grad(task, rows_ED, retain_graph=True)
        g_aux_ED, = torch.autograd.grad(out.aux_loss, rows_ED)
    finally:
        layer.train(was_training)
    E = rows_ED.shape[0]
    routed_TE = torch.zeros(x_TD.shape[0], E, dtype=torch.bool).scatter(1, out.routing.idx_TK.cpu(), True)
    own = [x_TD[routed_TE[:, i]] for i in range(E)]
    task_own = torch.stack([span_residual(g_task_ED[i:i + 1], own[i])[0] for i in range(E)])
    aux_own = torch.stack([span_residual(g_aux_ED[i:i + 1], own[i])[0] for i in range(E)])
    aux_all = span_residual(g_aux_ED, x_TD)
    return GradientSpans(task_own, aux_own, aux_all, g_aux_ED.detach().norm(dim=-1).to(torch.float64))


@dataclass
class RowSimilarity:
    """Pairwise cosines of routing rows (:func:`router_row_similarity`).

    Fields::

        cos_EE   cos(r_i, r_j), (E, E), 1 on the diagonal
        signed   mean over i < j of cos(r_i, r_j)
        abs      mean over i < j of |cos(r_i, r_j)|   (Gaussian rows: about √(2/(π D)))
    """

    cos_EE: torch.Tensor
    signed: float
    abs: float


def router_row_similarity(rows_ED: torch.Tensor) -> RowSimilarity:
    """RC-d's metric: how similar distinct routing rows are (spec §1.6), ``S_signed`` and ``S_abs``.

    ``rows_ED``: the rows a router scores with (``router.effective_rows_ED()``: learned rows, MPI rows or K-Means
    centroids), (E, D).

    >>> s = router_row_similarity(torch.tensor([[1., 0.], [1., 1.], [0., -1.]]))
    >>> round(s.signed, 4) == 0, round(s.abs, 4)
    (True, 0.4714)

    Chapter 3 (book/chapter3.ipynb).
    """
    E = rows_ED.shape[0]
    if E < 2:
        raise ValueError(f"rows_ED has E={E} rows; a similarity needs at least 2")
    r_ED = F_.normalize(rows_ED.detach().to(torch.float64), dim=-1)
    cos_EE = r_ED @ r_ED.T
    iu = torch.triu_indices(E, E, offset=1)
    off = cos_EE[iu[0], iu[1]]
    return RowSimilarity(cos_EE, float(off.mean()), float(off.abs().mean()))


def spearman(a_TE: torch.Tensor, b_TE: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of every column pair ``(a[:, i], b[:, i])``, (E,) (ties broken by order: the
    inputs are continuous). Pearson correlation of the ranks.

    >>> spearman(torch.tensor([[1.], [2.], [3.]]), torch.tensor([[10.], [30.], [20.]]))
    tensor([0.5000], dtype=torch.float64)
    """
    def ranks(v):
        return torch.argsort(torch.argsort(v, dim=0), dim=0).to(torch.float64)
    ra, rb = ranks(a_TE), ranks(b_TE)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    return (ra * rb).sum(0) / (ra.norm(dim=0) * rb.norm(dim=0))


def expert_activation(bank, x_TD: torch.Tensor, kind: str = "gate") -> torch.Tensor:
    """Mean absolute hidden activation of every expert at every token, (T, E) (spec §1.5).

    ``kind="gate"`` (primary): SwiGLU ``mean_n |SiLU(W_g x)|``, GELU ``mean_n |GELU(W_in x + b_in)|``;
    ``kind="product"`` (SwiGLU only): ``‖SiLU(W_g x) ⊙ W_u x‖₂``.
    """
    with torch.no_grad():
        act = _activation(bank.activation)
        if not act.gated:
            if kind != "gate":
                raise ValueError(f"kind={kind!r}: a GELU bank has only kind='gate'")
            h_TEF = act.fn(torch.einsum("efd,td->tef", bank.w_in_EFD, x_TD) + bank.b_in_EF)
            return h_TEF.abs().mean(-1)
        a_TEF = F_.silu(torch.einsum("efd,td->tef", bank.w_gate_EFD, x_TD))
        if kind == "gate":
            return a_TEF.abs().mean(-1)
        if kind == "product":
            return (a_TEF * torch.einsum("efd,td->tef", bank.w_up_EFD, x_TD)).norm(dim=-1)
        raise ValueError(f"kind={kind!r} must be 'gate' or 'product'")


@dataclass
class ScoreActivation:
    """RC-e: do router scores predict expert activations? (:func:`score_activation_correlation`)

    Fields::

        rho_E      Spearman ρ over tokens between z_i(x) and expert i's activation, per expert
        rho        mean of rho_E
        null       the same statistic with experts permuted (score of i vs activation of π(i)), mean over
                   every non-trivial cyclic shift π: the ≈ 0 reference
        pooled     one ρ over all (token, expert) pairs
        decile_mean_activation  mean activation in each decile of the pooled scores (rises if the claim holds)
    """

    rho_E: torch.Tensor
    rho: float
    null: float
    pooled: float
    decile_mean_activation: list[float]


def score_activation_correlation(scores_TE: torch.Tensor, activation_TE: torch.Tensor) -> ScoreActivation:
    """Spearman ρ between router scores (logits ``z``, the spec's primary) and expert activations
    (:func:`expert_activation`) over held-out tokens, per expert, with the permuted-expert null.

    >>> z = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    >>> sa = score_activation_correlation(z, 2 * z + 1)
    >>> round(sa.rho, 3), abs(sa.null) < 0.2
    (1.0, True)

    Chapter 3 (book/chapter3.ipynb).
    """
    if scores_TE.shape != activation_TE.shape:
        raise ValueError(f"scores_TE {tuple(scores_TE.shape)} and activation_TE {tuple(activation_TE.shape)} must "
                         f"have the same (T, E) shape")
    T, E = scores_TE.shape
    if T < 3:
        raise ValueError(f"T={T} tokens: a rank correlation needs at least 3")
    s_TE, a_TE = scores_TE.detach().to(torch.float64), activation_TE.detach().to(torch.float64)
    rho_E = spearman(s_TE, a_TE)
    nulls = [float(spearman(s_TE, a_TE.roll(shift, dims=1)).mean()) for shift in range(1, E)]
    pooled = float(spearman(s_TE.reshape(-1, 1), a_TE.reshape(-1, 1))[0])
    order = torch.argsort(s_TE.reshape(-1))
    deciles = [float(chunk.mean()) for chunk in a_TE.reshape(-1)[order].chunk(10)]
    return ScoreActivation(rho_E, float(rho_E.mean()), sum(nulls) / len(nulls) if nulls else float("nan"), pooled,
                           deciles)


def routed_means(x_TD: torch.Tensor, idx_TK: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the tokens routed to each expert (every slot counts), (E, D), and the counts (E,).
    An expert with no token gets a zero row and count 0 (a dead expert, never a division by zero)."""
    T, K = idx_TK.shape
    D = x_TD.shape[1]
    flat_e = idx_TK.reshape(-1)
    x_SD = x_TD.unsqueeze(1).expand(T, K, D).reshape(T * K, D)      # (T·K, D) token of each slot
    sum_ED = x_TD.new_zeros(n_experts, D).index_add_(0, flat_e, x_SD)
    n_E = x_TD.new_zeros(n_experts).index_add_(0, flat_e, torch.ones(T * K, dtype=x_TD.dtype, device=x_TD.device))
    return sum_ED / n_E.clamp_min(1).unsqueeze(1), n_E


@dataclass
class CentroidMatching:
    """RC-g: router rows against the means of the tokens routed to each expert (:func:`centroid_matching`).

    Fields::

        cos_EE     cos(r_i, mean of x routed to j), (E, E) (rows and columns of dead experts are NaN)
        matched    mean over live i of cos(r_i, m_i)
        unmatched  mean over live i ≠ j of cos(r_i, m_j)
        dead       experts that received no token (excluded)
    """

    cos_EE: torch.Tensor
    matched: float
    unmatched: float
    dead: list[int]

    @property
    def margin(self) -> float:
        """``matched − unmatched`` (> 0: each row points at its own routed centroid)."""
        return self.matched - self.unmatched


def centroid_matching(rows_ED: torch.Tensor, x_TD: torch.Tensor, idx_TK: torch.Tensor,
                      centre: bool = False) -> CentroidMatching:
    """Cosine of every routing row with every expert's routed centroid; matched (i = j) vs unmatched (i ≠ j).

    ``centre=True`` subtracts the mean token first (removes a shared offset that makes every cosine large).

    >>> rows = torch.tensor([[1., 0.], [0., 1.]])
    >>> x = torch.tensor([[2., 0.1], [0.1, 3.]]); idx = torch.tensor([[0], [1]])
    >>> cm = centroid_matching(rows, x, idx)
    >>> round(cm.matched, 3), round(cm.unmatched, 3), cm.dead
    (0.999, 0.042, [])

    Chapter 3 (book/chapter3.ipynb).
    """
    E = rows_ED.shape[0]
    x = x_TD.detach().to(torch.float64)
    if centre:
        x = x - x.mean(0)
    m_ED, n_E = routed_means(x, idx_TK, E)
    live_E = n_E > 0
    if int(live_E.sum()) < 2:
        raise ValueError(f"only {int(live_E.sum())} expert(s) received tokens; matching needs at least 2")
    cos_EE = F_.normalize(rows_ED.detach().to(torch.float64), dim=-1) @ F_.normalize(m_ED, dim=-1).T
    cos_EE[:, ~live_E] = float("nan")
    cos_EE[~live_E, :] = float("nan")
    eye = torch.eye(E, dtype=torch.bool)
    live2 = live_E.unsqueeze(0) & live_E.unsqueeze(1)
    return CentroidMatching(cos_EE, float(cos_EE[eye & live2].mean()), float(cos_EE[~eye & live2].mean()),
                            [int(i) for i in torch.nonzero(~live_E).flatten()])
