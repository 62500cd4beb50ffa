"""Geometry probes (moewidgets.geometry) against slow obvious oracles: torch.func.jacrev, numpy SVD / covariance,
Python loops. Shape legend: N points, D model width, F hidden width, E experts, K top-k. All in float64.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import jacrev

import moewidgets.geometry as geo
from moewidgets import MoEConfig, RunConfig, TaskConfig, Trainer, TrainConfig, trace_model
from moewidgets.geometry import (bank_jacobian_alignment, chapter1_probes, dense_jacobian, dense_pseudo_experts,
                                 effective_rank, expert_jacobians, expert_outputs, expert_pca, frobenius_cosine,
                                 jacobian_alignment, layer_jacobian, mean_expert_jacobians, pair_jacobians,
                                 singular_values, spectrum_stats, weighted_expert_spectra, weighted_pca)
from moewidgets.geometry.alignment import _null_level
from moewidgets.nn import DenseFFN, MoELayer
from moewidgets.nn.experts import make_experts

from geometry_helpers import F64, bank64, gen, randn  # tests/geometry_helpers.py


# ---------------------------------------------------------------- jacobians

@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("E,D,F", [(3, 5, 7), (2, 8, 4), (1, 4, 16)])
def test_expert_jacobians_match_jacrev(kind, E, D, F):
    bank = bank64(kind, E, D, F)
    X = randn(6, D, seed=1, scale=2.0)
    J = expert_jacobians(bank, X)
    assert J.shape == (E, 6, D, D) and J.dtype == F64
    for e in range(E):
        for n in range(X.shape[0]):
            ref = jacrev(lambda x: bank.expert_output(e, x[None])[0])(X[n])
            torch.testing.assert_close(J[e, n], ref, atol=1e-10, rtol=0)
    # subset, chunking and pairs agree with the full computation
    torch.testing.assert_close(expert_jacobians(bank, X, experts_idx=[E - 1, 0], chunk=2), J[[E - 1, 0]],
                               atol=1e-12, rtol=0)
    e_P, n_P = torch.tensor([0, E - 1, 0]), torch.tensor([5, 2, 1])
    torch.testing.assert_close(pair_jacobians(bank, X, e_P, n_P), J[e_P, n_P], atol=1e-12, rtol=0)
    # outputs match the bank's own
    torch.testing.assert_close(expert_outputs(bank, X), bank.all_outputs(X).transpose(0, 1).detach())


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_mean_expert_jacobians_closed_form(kind):
    E, D, F, N = 4, 6, 9, 30
    bank = bank64(kind, E, D, F)
    X = randn(N, D, seed=2, scale=2.0)
    w = torch.rand(2, N, E, generator=gen(3), dtype=F64)
    w[0, :, 1] = 0                                                   # a dead expert in the first weighting
    J = expert_jacobians(bank, X)
    M = mean_expert_jacobians(bank, X, w)
    for s in range(2):
        for e in range(E):
            W = w[s, :, e].sum()
            if W == 0:
                assert torch.isnan(M[s, e]).all()
                continue
            slow = sum(w[s, n, e] * J[e, n] for n in range(N)) / W
            torch.testing.assert_close(M[s, e], slow, atol=1e-12, rtol=0)


def test_expert_jacobians_dtype_and_errors():
    bank32 = make_experts("gelu", 2, 4, 8, gen(0), torch.float32)
    J = expert_jacobians(bank32, randn(3, 4))
    assert J.dtype == F64                      # float64 probe points: never downcast
    with pytest.raises(ValueError, match="X_ND has width 5"):
        expert_jacobians(bank32, randn(3, 5))
    with pytest.raises(ValueError, match="experts_idx"):
        expert_jacobians(bank32, randn(3, 4), experts_idx=[2])
    with pytest.raises(ValueError, match="chunk"):
        expert_jacobians(bank32, randn(3, 4), chunk=0)

    class Odd:
        activation = "tanh"
    with pytest.raises(ValueError, match="activation='tanh'"):
        expert_jacobians(Odd(), randn(3, 4))


def _layer(kind, gate, k, lf, E=4, D=6, F=8, tau=0.7, seed=0):
    cfg = MoEConfig(n_experts=E, k=k, d_model=D, d_hidden=F, expert=kind, gate=gate, temperature=tau,
                    lf_rate=1e-3 if lf else 0.0)
    layer = MoELayer(cfg, gen(seed), dtype=F64)
    with torch.no_grad():
        layer.router.b_E.copy_(randn(E, seed=seed + 10, scale=0.3))
        if lf:
            layer.lf_bias_E.copy_(randn(E, seed=seed + 11, scale=0.2))
    return layer


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("gate", ["softmax", "renorm"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("lf", [False, True])
def test_layer_jacobian_matches_jacrev(kind, gate, k, lf):
    layer = _layer(kind, gate, k, lf)
    X = randn(5, 6, seed=3, scale=2.0)
    J = layer_jacobian(layer, X)
    assert J.shape == (5, 6, 6)
    for n in range(X.shape[0]):
        ref = jacrev(lambda x: layer(x[None]).y_TD[0])(X[n])     # autograd through topk: selection held fixed
        torch.testing.assert_close(J[n], ref, atol=1e-10, rtol=0)


def test_layer_jacobian_honours_selection_bias():
    """With a large loss-free bias the selection (and so J_f) follows the bias, not the probabilities."""
    layer = _layer("gelu", "softmax", 1, True)
    with torch.no_grad():
        layer.lf_bias_E.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0], dtype=F64))   # expert 2 always selected
    X = randn(4, 6, seed=4)
    assert (layer.route(X).idx_TK[:, 0] == 2).all()
    J = layer_jacobian(layer, X)
    for n in range(4):
        torch.testing.assert_close(J[n], jacrev(lambda x: layer(x[None]).y_TD[0])(X[n]), atol=1e-10, rtol=0)


def test_dense_jacobian_and_layer_jacobian_for_dense_ffn():
    cfg = MoEConfig(n_experts=4, k=2, d_model=5, d_hidden=3, arch="dense")
    dense = DenseFFN(cfg, gen(0), dtype=F64)
    X = randn(4, 5, seed=1)
    J = layer_jacobian(dense, X)
    torch.testing.assert_close(J, dense_jacobian(dense, X))
    torch.testing.assert_close(J, dense_jacobian(dense.experts, X))
    for n in range(4):
        torch.testing.assert_close(J[n], jacrev(lambda x: dense(x[None]).y_TD[0])(X[n]), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="n_experts=3"):
        dense_jacobian(bank64("gelu", 3, 5, 4), X)


# ---------------------------------------------------------------- spectra

def _np_stats(M: np.ndarray, cutoff=1e-6):
    s = np.linalg.svd(M, compute_uv=False)
    s1 = s[0]
    r = s / s1
    keep = r > cutoff
    j = np.arange(1, len(s) + 1)[keep]
    alpha = -np.polyfit(np.log(j), np.log(s[keep]), 1)[0] if keep.sum() >= 2 else np.nan
    p = s / s.sum()
    p = p[p > 0]
    return dict(sv=s, sigma1=s1, ratios=r, stable_rank=(M ** 2).sum() / s1 ** 2, decay_alpha=alpha,
                erank=np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(4, 6, 5), (3, 5, 5), (2, 12, 12)])
def test_spectrum_stats_vs_numpy(shape):
    J = randn(*shape, seed=5)
    st = spectrum_stats(singular_values(J))
    R = min(shape[1:])
    assert st.sv.shape == (shape[0], R)
    for b in range(shape[0]):
        ref = _np_stats(J[b].numpy())
        np.testing.assert_allclose(st.sv[b].numpy(), ref["sv"], rtol=1e-12)
        for name in ("sigma1", "stable_rank", "decay_alpha", "erank"):
            np.testing.assert_allclose(float(getattr(st, name)[b]), ref[name], rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(st.ratios[b].numpy(), ref["ratios"], rtol=1e-12)
        for j in (2, 5, 10):
            v = getattr(st, f"r{j}")
            assert (v is None) == (R < j)
            if v is not None:
                np.testing.assert_allclose(float(v[b]), ref["ratios"][j - 1], rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.7])
def test_decay_alpha_recovers_power_law(alpha):
    D = 16
    U, _ = torch.linalg.qr(randn(D, D, seed=6))
    V, _ = torch.linalg.qr(randn(D, D, seed=7))
    s = 3.0 * torch.arange(1, D + 1, dtype=F64) ** (-alpha)
    st = spectrum_stats(singular_values(U @ torch.diag(s) @ V.T))
    assert abs(float(st.decay_alpha) - alpha) < 1e-8
    # a cutoff drops the tail: spectrum with zeros beyond rank 6 fits only the first 6
    s2 = s.clone()
    s2[6:] = 0
    st2 = spectrum_stats(singular_values(U @ torch.diag(s2) @ V.T))
    assert abs(float(st2.decay_alpha) - alpha) < 1e-6


def test_spectrum_stats_zero_matrix():
    st = spectrum_stats(torch.zeros(2, 4, dtype=F64))
    assert st.sigma1.tolist() == [0.0, 0.0] and st.stable_rank.tolist() == [0.0, 0.0]
    assert st.erank.tolist() == [0.0, 0.0]
    assert torch.isnan(st.decay_alpha).all() and torch.isnan(st.ratios).all()
    with pytest.raises(ValueError, match="sv must be >= 0"):
        spectrum_stats(torch.tensor([1.0, -0.5], dtype=F64))


def test_weighted_expert_spectra_vs_loop():
    E, N, D = 3, 10, 4
    J = randn(E, N, D, D, seed=8)
    w = torch.rand(N, E, generator=gen(9), dtype=F64)
    w[w < 0.3] = 0
    w[:, 2] = 0                                        # dead expert
    res = weighted_expert_spectra(J, w)
    assert res.dead.tolist() == [False, False, True]
    assert res.n_routed.tolist() == [int((w[:, e] > 0).sum()) for e in range(E)]
    for e in range(2):
        W = w[:, e].sum().item()
        stats = [_np_stats(J[e, n].numpy()) for n in range(N)]
        for name in ("sigma1", "stable_rank", "decay_alpha", "erank"):
            ref = sum(w[n, e].item() * stats[n][name] for n in range(N)) / W
            np.testing.assert_allclose(float(getattr(res, name)[e]), ref, rtol=1e-10, err_msg=name)
        ref_r = sum(w[n, e].item() * stats[n]["ratios"] for n in range(N)) / W
        np.testing.assert_allclose(res.ratios[e].numpy(), ref_r, rtol=1e-10)
        np.testing.assert_allclose(float(res.r2[e]), ref_r[1], rtol=1e-10)
        routed = w[:, e] > 0
        assert torch.isnan(res.sv[e, ~routed]).all() and not torch.isnan(res.sv[e, routed]).any()
    assert torch.isnan(res.sigma1[2]) and torch.isnan(res.ratios[2]).all()
    assert res.r5 is None                              # D = 4 < 5
    assert math.isclose(res.live_mean("sigma1"), float(res.sigma1[:2].mean()))
    # from precomputed singular values: same numbers
    res2 = weighted_expert_spectra(None, w, sv_ENR=singular_values(J))
    torch.testing.assert_close(res2.sigma1, res.sigma1, equal_nan=True)


# ---------------------------------------------------------------- PCA and effective rank

def test_weighted_pca_integer_weights_equal_replicated_rows():
    N, D = 25, 4
    H = randn(N, D, seed=10) @ randn(D, D, seed=11)
    counts = torch.randint(0, 4, (N,), generator=gen(12))
    counts[0] = 2
    res = weighted_pca(H, counts.to(F64))
    rep = np.repeat(H.numpy(), counts.numpy(), axis=0)
    mu = rep.mean(0)
    C = np.cov(rep, rowvar=False, bias=True)
    lam = np.sort(np.linalg.eigvalsh(C))[::-1]
    np.testing.assert_allclose(res.mean.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(res.eigenvalues.numpy(), np.clip(lam, 0, None), rtol=1e-10, atol=1e-13)
    assert float(res.total_weight) == counts.sum().item()
    c = counts.numpy().astype(float)
    np.testing.assert_allclose(float(res.n_eff), c.sum() ** 2 / (c ** 2).sum(), rtol=1e-12)
    # components: orthonormal eigenvectors of C, in eigenvalue order
    V = res.components.numpy()
    np.testing.assert_allclose(V.T @ V, np.eye(D), atol=1e-12)
    np.testing.assert_allclose(C @ V, V * res.eigenvalues.numpy(), atol=1e-10)


def test_weighted_pca_vs_np_cov_aweights():
    N, D = 40, 5
    H = randn(N, D, seed=13)
    w = torch.rand(N, generator=gen(14), dtype=F64)
    res = weighted_pca(H, w)
    C = np.cov(H.numpy(), rowvar=False, aweights=w.numpy(), bias=True)
    np.testing.assert_allclose(res.eigenvalues.numpy(), np.sort(np.linalg.eigvalsh(C))[::-1], rtol=1e-10)
    uni = weighted_pca(H)
    np.testing.assert_allclose(float(uni.n_eff), N)
    with pytest.raises(ValueError, match="weights_N must be >= 0"):
        weighted_pca(H, -w)
    with pytest.raises(ValueError, match=r"weights_N has shape \(3,\)"):
        weighted_pca(H, w[:3])


@pytest.mark.parametrize("per_expert", [False, True])
def test_expert_pca_matches_per_expert_loop(per_expert):
    N, E, D = 30, 3, 4
    H = randn(N, E, D, seed=15) if per_expert else randn(N, D, seed=15)
    w = torch.rand(N, E, generator=gen(16), dtype=F64)
    w[:, 1] = 0
    res = expert_pca(H, w)
    assert res.dead.tolist() == [False, True, False]
    assert torch.isnan(res.eigenvalues[1]).all() and float(res.n_eff[1]) == 0.0
    for e in (0, 2):
        ref = weighted_pca(H[:, e] if per_expert else H, w[:, e])
        torch.testing.assert_close(res.eigenvalues[e], ref.eigenvalues)
        torch.testing.assert_close(res.mean[e], ref.mean)
        torch.testing.assert_close(res.n_eff[e], ref.n_eff)
    ent = res.effective_rank("entropy")
    assert torch.isnan(ent[1]) and torch.isfinite(ent[[0, 2]]).all()


@pytest.mark.parametrize("D", [1, 3, 10])
def test_effective_rank_hand_made(D):
    uni = torch.ones(D, dtype=F64)
    one = torch.zeros(D, dtype=F64)
    one[0] = 2.5
    for kind in ("entropy", "participation"):
        assert math.isclose(float(effective_rank(uni, kind)), D, rel_tol=1e-12)
        assert math.isclose(float(effective_rank(one, kind)), 1.0, rel_tol=1e-12)
    assert float(effective_rank(one, "threshold")) == 1.0
    assert float(effective_rank(uni, "threshold")) == math.ceil(0.9 * D - 1e-9)
    assert float(effective_rank(uni, "threshold", fraction=1.0)) == D
    for kind in geo.EFFECTIVE_RANK_KINDS:
        assert float(effective_rank(torch.zeros(D, dtype=F64), kind)) == 0.0


def test_effective_rank_threshold_batched_and_errors():
    lam = torch.tensor([[1.0, 6.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 0.0]], dtype=F64)   # unsorted is fine
    assert effective_rank(lam, "threshold", fraction=0.9).tolist() == [2.0, 0.0, 2.0]
    assert effective_rank(lam, "threshold", fraction=0.95).tolist() == [3.0, 0.0, 2.0]
    assert effective_rank(lam, "threshold", fraction=0.6).tolist() == [1.0, 0.0, 2.0]
    assert effective_rank(lam, "threshold", fraction=0.5).tolist() == [1.0, 0.0, 1.0]
    p = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    assert math.isclose(float(effective_rank(p, "entropy")), math.exp(-(p * p.log()).sum().item()))
    assert math.isclose(float(effective_rank(p, "participation")), 1 / (p * p).sum().item())
    with pytest.raises(ValueError, match=r"kind='erank' must be one of \('entropy', 'participation', 'threshold'\)"):
        effective_rank(p, "erank")
    with pytest.raises(ValueError, match="values must be >= 0"):
        effective_rank(torch.tensor([1.0, -1e-3]), "entropy")
    with pytest.raises(ValueError, match="fraction=1.5"):
        effective_rank(p, "threshold", fraction=1.5)


# ---------------------------------------------------------------- alignment

def test_frobenius_cosine_cases():
    A = randn(5, 4, seed=17)
    assert math.isclose(float(frobenius_cosine(A, A)), 1.0, rel_tol=1e-14)
    assert math.isclose(float(frobenius_cosine(A, 3.7 * A)), 1.0, rel_tol=1e-14)
    assert math.isclose(float(frobenius_cosine(A, -A)), -1.0, rel_tol=1e-14)
    B = randn(5, 4, seed=18)
    B = B - (A * B).sum() / (A * A).sum() * A          # Gram–Schmidt: orthogonal in the Frobenius inner product
    assert abs(float(frobenius_cosine(A, B))) < 1e-14
    assert torch.isnan(frobenius_cosine(A, torch.zeros_like(A)))


def test_alignment_matrix_equals_slow_loop_and_summaries():
    E, N, D = 4, 20, 3
    J = randn(E, N, D, D, seed=19)
    w = torch.rand(N, E, generator=gen(20), dtype=F64)
    w[w < 0.4] = 0
    res = jacobian_alignment(J, w, generator=0, min_points=2)
    Jbar = [sum(w[n, e] * J[e, n] for n in range(N)) / w[:, e].sum() for e in range(E)]
    slow = torch.tensor([[float((Jbar[i] * Jbar[j]).sum() / (Jbar[i].norm() * Jbar[j].norm())) for j in range(E)]
                         for i in range(E)], dtype=F64)
    torch.testing.assert_close(res.matrix, slow, atol=1e-12, rtol=0)
    off = [slow[i, j].item() for i in range(E) for j in range(i + 1, E)]
    assert math.isclose(res.mean_abs_offdiag, np.mean(np.abs(off)), rel_tol=1e-12)
    assert math.isclose(res.signed_mean, np.mean(off), rel_tol=1e-12)
    assert math.isclose(res.max_abs, np.max(np.abs(off)), rel_tol=1e-12)
    assert res.null_sd == 1 / 3
    # split-half ceiling by hand, reproducing the random split: it must be one of the partitions' cosines
    assert torch.isfinite(res.ceiling_per_expert).all() and math.isfinite(res.ceiling)
    assert math.isclose(res.ceiling, float(res.ceiling_per_expert.mean()), rel_tol=1e-12)


def test_alignment_identical_scaled_orthogonal():
    N, D = 12, 4
    A = randn(D, D, seed=21)
    B = randn(D, D, seed=22)
    B = B - (A * B).sum() / (A * A).sum() * A
    J = torch.stack([A, 2.5 * A, B])[:, None].expand(3, N, D, D)
    res = jacobian_alignment(J, torch.ones(N, 3, dtype=F64), min_points=3)
    assert math.isclose(float(res.matrix[0, 1]), 1.0, rel_tol=1e-12)          # identical up to scale
    assert abs(float(res.matrix[0, 2])) < 1e-12 and abs(float(res.matrix[1, 2])) < 1e-12
    torch.testing.assert_close(res.matrix.diagonal(), torch.ones(3, dtype=F64))
    assert math.isclose(res.ceiling, 1.0, rel_tol=1e-12)                       # constant Jacobian: ceiling 1
    assert res.ceiling_per_expert.shape == (3,)


def test_alignment_dead_expert_and_eligibility():
    E, N, D = 3, 30, 3
    J = randn(E, N, D, D, seed=23)
    w = torch.ones(N, E, dtype=F64)
    w[:, 1] = 0
    w[5:, 2] = 0                                        # expert 2: only 5 routed points
    res = jacobian_alignment(J, w, min_points=4)
    assert res.dead.tolist() == [False, True, False]
    assert torch.isnan(res.matrix[1]).all() and torch.isnan(res.matrix[:, 1]).all()
    assert math.isclose(res.mean_abs_offdiag, abs(float(res.matrix[0, 2])), rel_tol=1e-12)
    assert res.n_routed.tolist() == [30, 0, 5]
    assert math.isfinite(float(res.ceiling_per_expert[0]))
    assert torch.isnan(res.ceiling_per_expert[1:]).all()                       # dead, and 5 < 2·4
    assert math.isclose(res.ceiling, float(res.ceiling_per_expert[0]))


@pytest.mark.parametrize("p,q", [(8, 8), (5, 12), (200, 200)])
def test_null_level_matches_gaussian_theory(p, q):
    theory = math.sqrt(2 / math.pi) / math.sqrt(p * q)
    level = _null_level(p, q, 2000 if p * q > 1000 else 200, gen(0), F64)   # (200, 200) uses the 1-d path
    assert abs(level - theory) < 0.15 * theory


def test_alignment_null_level_reported():
    J = randn(2, 10, 6, 6, seed=24)
    res = jacobian_alignment(J, torch.ones(10, 2, dtype=F64), generator=gen(5))
    theory = math.sqrt(2 / math.pi) / 6
    assert abs(res.null_level - theory) < 0.2 * theory and res.n_null_pairs == 200
    again = jacobian_alignment(J, torch.ones(10, 2, dtype=F64), generator=gen(5))
    assert again.null_level == res.null_level                                  # seeded, reproducible


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_bank_alignment_equals_jacobian_alignment(kind):
    bank = bank64(kind, 4, 5, 6)
    X = randn(40, 5, seed=25, scale=2.0)
    w = torch.rand(40, 4, generator=gen(26), dtype=F64)
    w[w < 0.5] = 0
    a = bank_jacobian_alignment(bank, X, w, generator=7, min_points=3)
    b = jacobian_alignment(expert_jacobians(bank, X), w, generator=7, min_points=3)
    torch.testing.assert_close(a.matrix, b.matrix, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.ceiling_per_expert, b.ceiling_per_expert, atol=1e-12, rtol=0, equal_nan=True)
    assert math.isclose(a.mean_abs_offdiag, b.mean_abs_offdiag, rel_tol=1e-10)


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("M,G", [(12, 3), (12, 5), (7, 7), (9, 1)])
def test_dense_pseudo_experts_sum_to_dense(kind, M, G):
    dense = bank64(kind, 1, 4, M)
    pseudo = dense_pseudo_experts(dense, G, generator=gen(1))
    assert pseudo.activation == kind and pseudo.n_experts == G and pseudo.d_hidden == math.ceil(M / G)
    units = pseudo.groups_EF[pseudo.groups_EF >= 0]
    assert sorted(units.tolist()) == list(range(M))                            # a partition of the hidden units
    sizes = (pseudo.groups_EF >= 0).sum(1)
    assert int(sizes.max() - sizes.min()) <= 1
    X = randn(6, 4, seed=2, scale=2.0)
    torch.testing.assert_close(expert_jacobians(pseudo, X).sum(0), expert_jacobians(dense, X)[0], atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(expert_outputs(pseudo, X).sum(0), expert_outputs(dense, X)[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(pseudo.all_outputs(X).sum(1), dense.all_outputs(X)[:, 0].detach(), atol=1e-12,
                               rtol=0)
    with pytest.raises(ValueError, match=f"n_groups={M + 1} must be an integer in 1..M={M}"):
        dense_pseudo_experts(dense, M + 1)


# ---------------------------------------------------------------- chapter-1 probe bundle

def _trained(arch="moe", k=2, expert="gelu", E=4):
    run = RunConfig(model=MoEConfig(n_experts=E, k=k, d_model=8, d_hidden=16, expert=expert, arch=arch),
                    task=TaskConfig(d_in=8, d_out=8, n_train=512, n_probe=256),
                    train=TrainConfig(steps=20, batch_size=64, device="cpu"))
    tr = Trainer.from_config(run)
    tr.step(20)
    return tr


def _finite(d):
    """Every float in a summary is finite, except r_j where D < j (D = 8 here: r10 does not exist, NaN)."""
    return all(math.isfinite(v) for name, v in d.items() if isinstance(v, float) and name != "r10")


@pytest.mark.parametrize("k,expert", [(1, "gelu"), (2, "swiglu"), (4, "gelu")])
def test_chapter1_probes_trained_moe(k, expert):
    tr = _trained(k=k, expert=expert)
    bank = tr.model.layer.experts
    trace = trace_model(tr.model, tr.data.x_probe)
    pr = chapter1_probes(bank, trace, generator=0, min_points=4)
    s = pr.summary()
    assert _finite(s), s
    assert pr.n_experts == 4 and pr.n_points == 256 and pr.activation == expert
    assert int(pr.counts.sum()) == 256 * k
    assert pr.spectra.sigma1.shape == (4,) and pr.ratios.shape == (8,) and pr.pca.eigenvalues.shape == (4, 8)
    assert pr.alignment.matrix.shape == (4, 4)
    # the bundle's per-expert S1 equals the slow route: full Jacobians, full spectra
    w = trace.gate_matrix()
    ref = weighted_expert_spectra(expert_jacobians(bank, trace.x_TD), w)
    torch.testing.assert_close(pr.spectra.sigma1, ref.sigma1, equal_nan=True)
    torch.testing.assert_close(pr.alignment.matrix,
                               jacobian_alignment(expert_jacobians(bank, trace.x_TD), w, generator=0,
                                                  min_points=4).matrix, atol=1e-5, rtol=0, equal_nan=True)
    hard = chapter1_probes(bank, trace, weights="membership", keep_jacobians=True)
    assert hard.weights == "membership" and hard.jacobians.shape == (4, 256, 8, 8)
    torch.testing.assert_close(hard.total_weight, hard.counts.to(hard.total_weight.dtype))
    with pytest.raises(ValueError, match="weights='hard' must be one of"):
        chapter1_probes(bank, trace, weights="hard")


@pytest.mark.parametrize("arch", ["dense", "dense_active"])
def test_chapter1_probes_dense(arch):
    tr = _trained(arch=arch)
    trace = trace_model(tr.model, tr.data.x_probe)
    pr = chapter1_probes(tr.model.layer.experts, trace)
    assert pr.n_experts == 1 and not bool(pr.dead.any())
    s = pr.summary()
    for name in ("sigma1", "stable_rank", "decay_alpha", "erank_sv", "pca_entropy", "pca_participation",
                 "pca_threshold", "align_ceiling", "align_null_level"):
        assert math.isfinite(s[name]), name
    assert math.isnan(s["align_mean_abs"])                                    # no pairs in a one-expert model
    # dense: uniform weights, so S1 is the plain mean of σ1 over the probe points
    J = dense_jacobian(tr.model.layer, trace.x_TD)
    assert math.isclose(pr.sigma1, float(singular_values(J)[:, 0].mean()), rel_tol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_chapter1_probes_dead_expert(k):
    tr = _trained(k=k)
    with torch.no_grad():
        tr.model.layer.router.b_E[1] = -1e4
    trace = trace_model(tr.model, tr.data.x_probe)
    pr = chapter1_probes(tr.model.layer.experts, trace, min_points=4)
    assert pr.dead.tolist() == [False, True, False, False]
    assert int(pr.counts[1]) == 0
    assert torch.isnan(pr.spectra.sigma1[1]) and torch.isnan(pr.pca_entropy[1])
    assert torch.isnan(pr.alignment.matrix[1]).all()
    s = pr.summary()
    assert s["n_dead"] == 1 and _finite(s), s


# ---------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1, max_size=12))
def test_effective_rank_orderings(vals):
    lam = torch.tensor(vals, dtype=F64)
    ent, par, thr = (float(effective_rank(lam, k)) for k in ("entropy", "participation", "threshold"))
    if float(lam.sum()) == 0:
        assert ent == par == thr == 0.0
        return
    R = len(vals)
    # Rényi entropies do not increase with order: exp(H_1) ≥ exp(H_2) = participation ratio
    assert 1 - 1e-9 <= par <= ent * (1 + 1e-9) and ent <= R * (1 + 1e-9)
    assert 1 <= thr <= int((lam > 0).sum())
