"""Exact Jacobians of experts, of a whole MoE layer and of a dense FFN, in closed form (no autograd).

Shape legend: N probe points, D model width (D_out = D_in = D for our square layers), F expert hidden width,
E experts, K top-k, P (expert, point) pairs, T tokens.

Formulas (the exact Jacobians of Liu, arXiv 2601.11616 and arXiv 2605.16349, written out by us; chapter 1,
``book/chapter1.ipynb``):

* GELU expert ``E(x) = W_out gelu(W_in x + b_in) + b_out``::

      J(x) = W_out · diag(gelu'(h)) · W_in,   h = W_in x + b_in,   gelu'(h) = Φ(h) + h φ(h)

  (exact erf GELU, ``torch.nn.functional.gelu``'s default; Φ, φ the standard normal cdf and pdf).
* SwiGLU expert ``E(x) = W_out (silu(g) ⊙ u)``, ``g = W_gate x``, ``u = W_up x``::

      J(x) = W_out · [diag(silu'(g) ⊙ u) · W_gate + diag(silu(g)) · W_up],   silu'(g) = σ(g)(1 + g(1 − σ(g)))

* Any activation φ of the table (:mod:`moewidgets.nn.activations`: "gelu", "relu", "swiglu") takes the plain or
  the gated formula with its own φ and φ' (ReLU: ``φ'(h) = 1[h > 0]``, the a.e. derivative autograd gives).

* Whole layer ``f(x) = Σ_{i∈S(x)} g_i(x) E_i(x)`` with the top-k set S held fixed (the a.e. derivative, what
  autograd through ``torch.topk`` gives)::

      J_f(x) = Σ_{i∈S} g_i J_i(x) + Σ_{i∈S} E_i(x) ∇_x g_i(x)ᵀ

  gate "softmax" (g_i = p_i, p = softmax(z/τ), z = W_r x + b_r):  ∇_x g_i = (p_i/τ) (w_i − Σ_{j≤E} p_j w_j)
  gate "renorm"  (g_i = p_i / Σ_{j∈S} p_j):                        ∇_x g_i = (g_i/τ) (w_i − Σ_{j∈S} g_j w_j)

  with w_j the router rows (``router.w_ED``).

Everything reads the expert bank through its contract attributes (``moewidgets.nn.experts``), so it works for our
banks, for the Hugging Face adapter's views and for :func:`~moewidgets.geometry.alignment.dense_pseudo_experts`.
Computation happens in the promoted dtype of the inputs and the weights, at least float32 (bf16 weights give
float32 Jacobians; never a downcast).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..nn.activations import ACTIVATIONS, activation, gelu_grad, relu_grad, silu_grad
from ..nn.experts import bank_weights

__all__ = ["expert_jacobians", "pair_jacobians", "mean_expert_jacobians", "expert_outputs", "layer_jacobian",
           "dense_jacobian", "gelu_grad", "silu_grad", "relu_grad", "bank_activation", "bank_tensors",
           "prepare_points"]

_AUTO_CHUNK_ELEMENTS = 1 << 25    # intermediate (E, n, D, F) elements per chunk when chunk=None


def bank_activation(bank) -> str:
    """The bank's ``activation`` (a name of :data:`~moewidgets.nn.activations.ACTIVATIONS`: "gelu" | "relu" |
    "swiglu"), or a ValueError that names what is allowed.

    >>> from moewidgets.nn.experts import SwiGLUExperts
    >>> bank_activation(SwiGLUExperts(2, 4, 8))
    'swiglu'

    Chapter 1 (book/chapter1.ipynb).
    """
    act = getattr(bank, "activation", None)
    if act not in ACTIVATIONS:
        raise ValueError(f"experts.activation={act!r} must be one of {tuple(ACTIVATIONS)} "
                         "(a bank with the contract attributes of moewidgets.nn.experts)")
    return act


def bank_tensors(bank) -> tuple[str, list[torch.Tensor]]:
    """The expert-bank contract read as plain tensors: ``(activation, [weights…])``, the weights detached, in the
    table's order (``w_in_EFD, b_in_EF, w_out_EDF, b_out_ED`` for a plain bank; ``w_gate_EFD, w_up_EFD,
    w_out_EDF`` for a gated one; :func:`moewidgets.nn.experts.bank_weights`). Every geometry function reads a bank
    through it, so our banks, the Hugging Face views and the pseudo-expert views all work.

    >>> from moewidgets.nn.experts import ReLUExperts
    >>> act, ws = bank_tensors(ReLUExperts(2, 4, 8))
    >>> act, [tuple(w.shape) for w in ws]
    ('relu', [(2, 8, 4), (2, 8), (2, 4, 8), (2, 4)])

    Chapter 1 (book/chapter1.ipynb).
    """
    act = bank_activation(bank)
    return act, list(bank_weights(bank, detach=True).values())


def prepare_points(bank, X_ND: torch.Tensor, experts_idx=None) -> tuple[str, list[torch.Tensor], torch.Tensor]:
    """A bank's validated weights (:func:`bank_tensors`; the ``experts_idx`` subset, promoted dtype, on the bank's
    device) and the points ``X_ND`` (N, D) in that dtype: what every closed-form geometry function starts from."""
    act, ws = bank_tensors(bank)
    if not isinstance(X_ND, torch.Tensor) or X_ND.dim() != 2:
        shape = tuple(X_ND.shape) if isinstance(X_ND, torch.Tensor) else type(X_ND).__name__
        raise ValueError(f"X_ND={shape} must be a 2-d tensor (N points, D={ws[0].shape[-1]})")
    D = ws[0].shape[-1]
    if X_ND.shape[1] != D:
        raise ValueError(f"X_ND has width {X_ND.shape[1]}, but the experts take D={D} inputs")
    if not X_ND.is_floating_point():
        raise ValueError(f"X_ND.dtype={X_ND.dtype} must be a floating-point dtype")
    E = ws[0].shape[0]
    dtype = torch.promote_types(X_ND.dtype, torch.float32)      # bf16/fp16 weights or points: float32 arithmetic
    for w in ws:
        dtype = torch.promote_types(dtype, w.dtype)
    if experts_idx is not None:
        idx = torch.as_tensor(experts_idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= E):
            raise ValueError(f"experts_idx={idx.tolist()} must hold expert indices in 0..{E - 1}")
        ws = [w[idx.to(w.device)] for w in ws]
    device = ws[0].device
    ws = [w.to(dtype) for w in ws]
    return act, ws, X_ND.detach().to(device=device, dtype=dtype)


def _chunks(N: int, chunk: int | None, per_point: int) -> list[slice]:
    if chunk is None:
        chunk = max(1, _AUTO_CHUNK_ELEMENTS // max(1, per_point))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive integer (points per chunk) or None (automatic)")
    return [slice(s, min(N, s + chunk)) for s in range(0, max(N, 1), chunk)] if N else [slice(0, 0)]


def expert_jacobians(experts, X_ND: torch.Tensor, experts_idx: Sequence[int] | torch.Tensor | None = None,
                     chunk: int | None = None) -> torch.Tensor:
    """Ungated expert-local Jacobians ``J_e(x_n) = ∂E_e/∂x (x_n)`` in closed form, (E', N, D_out, D_in).

    GELU: ``J = W_out diag(gelu'(W_in x + b_in)) W_in``; SwiGLU:
    ``J = W_out [diag(silu'(g) ⊙ u) W_gate + diag(silu(g)) W_up]`` (module docstring). One batched matmul per
    chunk of points, no autograd, no loop over tokens.

    Args:
        experts: an expert bank with the contract attributes (``moewidgets.nn.experts``).
        X_ND: (N, D) probe points.
        experts_idx: optional subset of experts (E' of them, in the given order); default all E.
        chunk: points per chunk (bounds memory, ≈ E'·chunk·D·F intermediate elements); None = automatic.

    >>> from moewidgets.nn.experts import GELUExperts
    >>> bank = GELUExperts(4, 8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> X = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    >>> expert_jacobians(bank, X).shape, expert_jacobians(bank, X, experts_idx=[2]).shape
    (torch.Size([4, 5, 8, 8]), torch.Size([1, 5, 8, 8]))

    Chapter 1 (book/chapter1.ipynb).
    """
    act, ws, X = prepare_points(experts, X_ND, experts_idx)
    N, D = X.shape
    w_out_EDF = ws[2]
    E, D_out, F = w_out_EDF.shape
    out = X.new_empty(E, N, D_out, D)
    a = activation(act)
    width = 2 * F if a.gated else F
    for sl in _chunks(N, chunk, E * D_out * width):
        x = X[sl]
        n = x.shape[0]
        if not a.gated:
            w_in_EFD, b_in_EF = ws[0], ws[1]
            h_EnF = torch.einsum("nd,efd->enf", x, w_in_EFD) + b_in_EF[:, None, :]
            A_EnDF = w_out_EDF[:, None, :, :] * a.grad(h_EnF)[:, :, None, :]
            J = torch.bmm(A_EnDF.reshape(E, n * D_out, F), w_in_EFD)
        else:
            w_gate_EFD, w_up_EFD = ws[0], ws[1]
            g_EnF = torch.einsum("nd,efd->enf", x, w_gate_EFD)
            u_EnF = torch.einsum("nd,efd->enf", x, w_up_EFD)
            coef_En2F = torch.cat([a.grad(g_EnF) * u_EnF, a.fn(g_EnF)], dim=-1)          # (E, n, 2F)
            A_EnD2F = torch.cat([w_out_EDF, w_out_EDF], dim=-1)[:, None] * coef_En2F[:, :, None, :]
            J = torch.bmm(A_EnD2F.reshape(E, n * D_out, 2 * F), torch.cat([w_gate_EFD, w_up_EFD], dim=1))
        out[:, sl] = J.reshape(E, n, D_out, D)
    return out


def pair_jacobians(experts, X_ND: torch.Tensor, expert_P: torch.Tensor, point_P: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """Jacobians at chosen (expert, point) pairs only: ``J_{e_p}(x_{n_p})``, (P, D_out, D_in).

    For top-k routing most (expert, point) pairs carry no weight; this computes only the routed ones (one
    :func:`expert_jacobians` call per expert present, never a loop over tokens).

    >>> from moewidgets.nn.experts import GELUExperts
    >>> bank = GELUExperts(3, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> X = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    >>> e, n = torch.tensor([2, 0, 2]), torch.tensor([1, 4, 3])
    >>> torch.allclose(pair_jacobians(bank, X, e, n), expert_jacobians(bank, X)[e, n])
    True

    Chapter 1 (book/chapter1.ipynb).
    """
    _, ws, X = prepare_points(experts, X_ND, None)
    E, D_out = ws[2].shape[:2]
    expert_P = torch.as_tensor(expert_P, dtype=torch.long, device=X.device).reshape(-1)
    point_P = torch.as_tensor(point_P, dtype=torch.long, device=X.device).reshape(-1)
    if expert_P.shape != point_P.shape:
        raise ValueError(f"expert_P {tuple(expert_P.shape)} and point_P {tuple(point_P.shape)} must have one length")
    if expert_P.numel() and (int(expert_P.min()) < 0 or int(expert_P.max()) >= E):
        raise ValueError(f"expert_P must hold expert indices in 0..{E - 1}")
    if point_P.numel() and (int(point_P.min()) < 0 or int(point_P.max()) >= X.shape[0]):
        raise ValueError(f"point_P must hold point indices in 0..{X.shape[0] - 1}")
    out = X.new_empty(expert_P.shape[0], D_out, X.shape[1])
    for e in torch.unique(expert_P).tolist():
        sel = (expert_P == e).nonzero(as_tuple=True)[0]
        out[sel] = expert_jacobians(experts, X[point_P[sel]], experts_idx=[e], chunk=chunk)[0]
    return out


def mean_expert_jacobians(experts, X_ND: torch.Tensor, weights_NE: torch.Tensor) -> torch.Tensor:
    """Weighted mean Jacobians ``J̄_e = Σ_n w_ne J_e(x_n) / Σ_n w_ne`` without per-point Jacobians, (..., E, D, D).

    The Jacobian is linear in its diagonal factor, so the mean is closed form:
    GELU ``J̄_e = W_out diag(c̄) W_in`` with ``c̄ = Σ_n w_ne gelu'(h_ne) / Σ_n w_ne``; SwiGLU
    ``J̄_e = W_out [diag(mean(silu'(g) ⊙ u)) W_gate + diag(mean(silu(g))) W_up]``. Cost O(N·E·F + E·F·D²), so
    it scales to Mixtral-size experts. ``weights_NE`` may carry leading batch dims (..., N, E) (several weightings
    at once, e.g. split halves). Experts with zero total weight give NaN.

    >>> from moewidgets.nn.experts import SwiGLUExperts
    >>> bank = SwiGLUExperts(3, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> X = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    >>> w = torch.rand(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    >>> slow = torch.einsum("ne,enab->eab", w, expert_jacobians(bank, X)) / w.sum(0)[:, None, None]
    >>> torch.allclose(mean_expert_jacobians(bank, X, w), slow)
    True

    Chapter 1 (book/chapter1.ipynb).
    """
    act, ws, X = prepare_points(experts, X_ND, None)
    N = X.shape[0]
    E = ws[2].shape[0]
    if not isinstance(weights_NE, torch.Tensor) or weights_NE.dim() < 2 or tuple(weights_NE.shape[-2:]) != (N, E):
        raise ValueError(f"weights_NE must be (..., N={N}, E={E}); got "
                         f"{tuple(weights_NE.shape) if isinstance(weights_NE, torch.Tensor) else weights_NE!r}")
    w = weights_NE.to(device=X.device, dtype=X.dtype)
    W = w.sum(-2)                                                            # (..., E)
    live = W > 0
    Wsafe = torch.where(live, W, torch.ones_like(W))
    a_ = activation(act)
    if not a_.gated:
        w_in_EFD, b_in_EF, w_out_EDF = ws[0], ws[1], ws[2]
        d_ENF = a_.grad(torch.einsum("nd,efd->enf", X, w_in_EFD) + b_in_EF[:, None, :])
        c = torch.einsum("...ne,enf->...ef", w, d_ENF) / Wsafe[..., None]
        J = torch.matmul(w_out_EDF * c[..., None, :], w_in_EFD)
    else:
        w_gate_EFD, w_up_EFD, w_out_EDF = ws
        g_ENF = torch.einsum("nd,efd->enf", X, w_gate_EFD)
        u_ENF = torch.einsum("nd,efd->enf", X, w_up_EFD)
        a = torch.einsum("...ne,enf->...ef", w, a_.grad(g_ENF) * u_ENF) / Wsafe[..., None]
        b = torch.einsum("...ne,enf->...ef", w, a_.fn(g_ENF)) / Wsafe[..., None]
        J = torch.matmul(w_out_EDF * a[..., None, :], w_gate_EFD) + torch.matmul(w_out_EDF * b[..., None, :],
                                                                                  w_up_EFD)
    return torch.where(live[..., None, None], J, torch.full_like(J, math.nan))


def expert_outputs(experts, X_ND: torch.Tensor, experts_idx: Sequence[int] | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Every (selected) expert on every point, ungated: ``E_e(x_n)``, (E', N, D_out).

    Reads only the contract attributes, so it works for bank views without methods.

    >>> from moewidgets.nn.experts import SwiGLUExperts
    >>> bank = SwiGLUExperts(3, 4, 6, generator=torch.Generator().manual_seed(0))
    >>> X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    >>> torch.allclose(expert_outputs(bank, X), bank.all_outputs(X).transpose(0, 1), atol=1e-6)
    True

    Chapter 1 (book/chapter1.ipynb).
    """
    act, ws, X = prepare_points(experts, X_ND, experts_idx)
    a = activation(act)
    if not a.gated:
        w_in_EFD, b_in_EF, w_out_EDF, b_out_ED = ws
        a_ENF = a.fn(torch.einsum("nd,efd->enf", X, w_in_EFD) + b_in_EF[:, None, :])
        return torch.bmm(a_ENF, w_out_EDF.transpose(1, 2)) + b_out_ED[:, None, :]
    w_gate_EFD, w_up_EFD, w_out_EDF = ws
    g_ENF = torch.einsum("nd,efd->enf", X, w_gate_EFD)
    u_ENF = torch.einsum("nd,efd->enf", X, w_up_EFD)
    return torch.bmm(a.fn(g_ENF) * u_ENF, w_out_EDF.transpose(1, 2))


def dense_jacobian(dense_layer_or_bank, X_ND: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Jacobian of a dense FFN (a one-expert bank, or a layer holding one as ``.experts``), (N, D_out, D_in).

    ``J_D(x) = V2 diag(φ'(V1 x + c1)) V1`` (module docstring): :func:`expert_jacobians` of the only expert.

    >>> from moewidgets.nn.experts import GELUExperts
    >>> dense = GELUExperts(1, 8, 32, generator=torch.Generator().manual_seed(0))
    >>> dense_jacobian(dense, torch.zeros(3, 8)).shape
    torch.Size([3, 8, 8])

    Chapter 1 (book/chapter1.ipynb).
    """
    bank = dense_layer_or_bank
    if not hasattr(bank, "activation") and hasattr(bank, "experts"):
        bank = bank.experts
    E = bank_tensors(bank)[1][0].shape[0]
    if E != 1:
        raise ValueError(f"dense_jacobian needs a one-expert bank (a dense FFN), got n_experts={E}; "
                         "use expert_jacobians for an MoE bank")
    return expert_jacobians(bank, X_ND, chunk=chunk)[0]


def layer_jacobian(layer, X_ND: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The whole layer's Jacobian ``J_f(x_n)`` with the top-k selection held fixed, (N, D, D).

    ``J_f = Σ_{i∈S} g_i J_i + Σ_{i∈S} E_i(x) ∇_x g_iᵀ`` with the gate gradients of the module docstring
    ("softmax": ``∇g_i = (p_i/τ)(w_i − Σ_j p_j w_j)``, "renorm": ``∇g_i = (g_i/τ)(w_i − Σ_{j∈S} g_j w_j)``).
    The selection S comes from ``layer.route`` (so the loss-free selection bias is honoured; it never enters a
    gate value). A layer without a router (a :class:`~moewidgets.nn.layer.DenseFFN`) gives its dense Jacobian.

    This is the one geometry function that takes a whole layer (it needs the router and the gate convention).

    >>> from moewidgets import MoEConfig, MoELayer
    >>> layer = MoELayer(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16), torch.Generator().manual_seed(0))
    >>> layer_jacobian(layer, torch.randn(5, 8, generator=torch.Generator().manual_seed(1))).shape
    torch.Size([5, 8, 8])

    Chapter 1 (book/chapter1.ipynb).
    """
    if not hasattr(layer, "route"):
        return dense_jacobian(layer, X_ND, chunk=chunk)
    router = layer.router
    for name in ("w_ED", "temperature", "gate"):
        if not hasattr(router, name):
            raise NotImplementedError(
                f"layer_jacobian needs a softmax router (with w_ED, temperature, gate); got "
                f"{type(router).__name__} without {name!r}")
    gate = router.gate
    if gate not in ("softmax", "renorm"):
        raise ValueError(f"router.gate={gate!r} must be 'softmax' or 'renorm'")
    bank = layer.experts
    _, _, X = prepare_points(bank, X_ND, None)
    w_ED = router.w_ED.detach().to(device=X.device, dtype=X.dtype)
    tau = float(router.temperature)
    with torch.no_grad():   # selection only (the layer's own dtype, its loss-free bias included)
        idx_NK = layer.route(X.to(router.w_ED.dtype)).idx_TK.to(X.device)
    # logits recomputed in the working dtype: z = X W_rᵀ + b_r
    b_E = getattr(router, "b_E", None)
    z_NE = X @ w_ED.T
    if isinstance(b_E, torch.Tensor):
        z_NE = z_NE + b_E.detach().to(device=X.device, dtype=X.dtype)
    p_NE = torch.softmax(z_NE / tau, dim=-1)
    p_NK = p_NE.gather(1, idx_NK)
    if gate == "softmax":
        g_NK = p_NK
        wbar_ND = p_NE @ w_ED                                              # Σ_j p_j w_j over all experts
        grad_NKD = (p_NK / tau)[..., None] * (w_ED[idx_NK] - wbar_ND[:, None, :])
    else:
        g_NK = p_NK / p_NK.sum(-1, keepdim=True)
        w_NKD = w_ED[idx_NK]
        wbar_ND = torch.einsum("nk,nkd->nd", g_NK, w_NKD)                  # Σ_{j∈S} g_j w_j
        grad_NKD = (g_NK / tau)[..., None] * (w_NKD - wbar_ND[:, None, :])
    N, K = idx_NK.shape
    e_P = idx_NK.reshape(-1)
    n_P = torch.arange(N, device=X.device).repeat_interleave(K)
    J_NKDD = pair_jacobians(bank, X, e_P, n_P, chunk=chunk)
    J_NKDD = J_NKDD.reshape(N, K, *J_NKDD.shape[1:])
    y_NKD = expert_outputs(bank, X)[e_P, n_P].reshape(N, K, -1)          # ungated E_i(x) of the selected
    return torch.einsum("nk,nkab->nab", g_NK, J_NKDD) + torch.einsum("nka,nkb->nab", y_NKD, grad_NKD)
