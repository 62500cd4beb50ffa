"""Co-selected Jacobian cosines, the lean pair alignment and the asymmetry summary (moewidgets.geometry.asymmetry)
against slow obvious oracles: per-token torch.func.jacrev loops and materialised mean Jacobians.

Shape legend: N points, D model width, F hidden width, E experts, K top-k. Float64 unless a test says otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import jacrev

from moewidgets.geometry import bank_jacobian_alignment, expert_jacobians, frobenius_cosine, mean_expert_jacobians
from moewidgets.geometry.asymmetry import (AsymmetrySummary, asymmetry_summary, coselected_jacobian_cosine,
                                           layer_asymmetry, pair_alignment)
from moewidgets.geometry.subspaces import compare_subspaces, routed_subspaces
from moewidgets.nn.experts import make_experts

from geometry_helpers import F64, bank64, gen, randn  # tests/geometry_helpers.py


def topk_routing(N, E, K, seed):
    logits = randn(N, E, seed=seed)
    top, idx = logits.topk(K, dim=1)
    w = torch.zeros(N, E, dtype=F64).scatter_(1, idx, torch.softmax(top, 1))
    return w, idx


# ------------------------------------------------------------------------------------------ co-selected cosine

@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("method", ["jacobians", "gram"])
@pytest.mark.parametrize("K", [2, 3])
def test_coselected_cosine_matches_per_token_jacrev_loop(kind, method, K):
    N, E, D, F = 14, 4, 5, 7
    bank = bank64(kind, E, D, F)
    X = randn(N, D, seed=1, scale=1.5)
    _, idx = topk_routing(N, E, K, seed=2)
    res = coselected_jacobian_cosine(bank, X, idx, method=method, token_chunk=4, hidden_chunk=3)
    assert res.method == method and res.dtype == "float64"
    sums, abs_sums, counts = np.zeros((E, E)), np.zeros((E, E)), np.zeros((E, E), dtype=int)
    for n in range(N):
        J = [jacrev(lambda x, e=e: bank.expert_output(e, x[None])[0])(X[n]).detach() for e in idx[n].tolist()]
        for k in range(K):
            for m in range(K):
                c = float((J[k] * J[m]).sum() / (J[k].norm() * J[m].norm()))
                assert abs(float(res.cos_NKK[n, k, m]) - c) < 1e-10
                i, j = int(idx[n, k]), int(idx[n, m])
                if k != m:
                    sums[i, j] += c
                    abs_sums[i, j] += abs(c)
                    counts[i, j] += 1
    assert res.counts.tolist() == counts.tolist()
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(res.matrix.numpy(), np.where(counts > 0, sums / counts, np.nan), atol=1e-10)
        np.testing.assert_allclose(res.mean_abs.numpy(), np.where(counts > 0, abs_sums / counts, np.nan), atol=1e-10)
    iu = np.triu_indices(E, 1)
    pair_means = (abs_sums / np.maximum(counts, 1))[iu][counts[iu] > 0]
    assert abs(res.mean_abs_offdiag - pair_means.mean()) < 1e-10
    assert abs(res.pooled_mean_abs - abs_sums[iu].sum() / counts[iu].sum()) < 1e-10
    assert abs(res.signed_mean - sums[iu].sum() / counts[iu].sum()) < 1e-10
    assert res.null_sd == 1 / D


def test_coselected_cosine_auto_k1_and_errors():
    bank = bank64("swiglu", 3, 4, 6)
    X = randn(10, 4, seed=1)
    _, idx = topk_routing(10, 3, 1, seed=2)
    res = coselected_jacobian_cosine(bank, X, idx)                 # k = 1: nothing is co-selected
    assert res.counts.sum() == 0 and torch.isnan(res.matrix).all() and math.isnan(res.mean_abs_offdiag)
    assert res.method in ("jacobians", "gram")
    with pytest.raises(ValueError, match="idx_NK must hold expert indices in 0..2"):
        coselected_jacobian_cosine(bank, X, idx + 3)
    with pytest.raises(ValueError, match="method='exact'"):
        coselected_jacobian_cosine(bank, X, idx, method="exact")
    with pytest.raises(ValueError, match=r"X_ND=\(10, 5\)"):
        coselected_jacobian_cosine(bank, randn(10, 5), idx)
    with pytest.raises(ValueError, match="hidden_chunk=0"):
        coselected_jacobian_cosine(bank, X, idx, hidden_chunk=0)


# ------------------------------------------------------------------------------------------------ pair alignment

@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("path", ["model", "hidden", "auto"])
def test_pair_alignment_equals_materialised_float64(kind, path):
    N, E, D, F = 40, 4, 6, 11
    bank = bank64(kind, E, D, F, seed=3)
    X = randn(N, D, seed=4, scale=1.5)
    w, _ = topk_routing(N, E, 2, seed=5)
    i, j = 1, 3
    # slow oracle: every Jacobian formed (closed form is checked against jacrev in test_geometry), then averaged
    J = expert_jacobians(bank, X)                                               # (E, N, D, D)
    Jbar = torch.einsum("ne,enab->eab", w, J) / w.sum(0)[:, None, None]
    pa = pair_alignment(bank, i, j, X, w, per_token=True, path=path, token_chunk=7, hidden_chunk=4)
    assert pa.dtype == "float64" and pa.experts == (i, j)
    if path != "auto":
        assert pa.path == path and pa.token_path == path
    assert abs(pa.cosine - float(frobenius_cosine(Jbar[i], Jbar[j]))) < 1e-12
    assert abs(pa.inner - float((Jbar[i] * Jbar[j]).sum())) < 1e-10
    assert abs(pa.norm_i - float(Jbar[i].norm())) < 1e-10 and abs(pa.norm_j - float(Jbar[j].norm())) < 1e-10
    assert abs(pa.weight_i - float(w[:, i].sum())) < 1e-12
    # the same number as the bank-level alignment matrix
    ref = bank_jacobian_alignment(bank, X, w, generator=0)
    assert abs(pa.cosine - float(ref.matrix[i, j])) < 1e-12
    # per-token cosines at the co-selected tokens
    both = ((w[:, i] > 0) & (w[:, j] > 0)).nonzero(as_tuple=True)[0]
    assert both.numel() > 0 and torch.equal(pa.token_index, both)
    torch.testing.assert_close(pa.token_cosine, frobenius_cosine(J[i, both], J[j, both]), atol=1e-12, rtol=0)
    assert abs(pa.token_cosine_mean_abs - float(pa.token_cosine.abs().mean())) < 1e-15


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_pair_alignment_bf16_weights_give_float32_results(kind):
    N, E, D, F = 64, 3, 16, 40
    bank16 = make_experts(kind, E, D, F, gen(6), torch.bfloat16)
    bank64_ = make_experts(kind, E, D, F, gen(6), torch.bfloat16).to(F64)   # the same bf16 values, exactly
    X = torch.randn(N, D, generator=gen(7))
    w, _ = topk_routing(N, E, 2, seed=8)
    for path in ("model", "hidden"):
        got = pair_alignment(bank16, 0, 2, X.to(torch.bfloat16), w.float(), per_token=True, path=path,
                             hidden_chunk=16)
        ref = pair_alignment(bank64_, 0, 2, X.to(torch.bfloat16).to(F64), w, per_token=True, path=path)
        assert got.dtype == "float32" and ref.dtype == "float64"
        assert got.token_cosine.dtype == torch.float32
        assert abs(got.cosine - ref.cosine) < 1e-5
        torch.testing.assert_close(got.token_cosine.double(), ref.token_cosine, atol=1e-5, rtol=0)
    # explicit float64 arithmetic on bf16 weights agrees with the upcast bank
    f64 = pair_alignment(bank16, 0, 2, X.to(torch.bfloat16), w, dtype=F64)
    assert f64.dtype == "float64" and abs(f64.cosine - ref.cosine) < 1e-12


def test_expert_jacobians_of_bf16_bank_are_float32():
    bank16 = make_experts("swiglu", 2, 4, 8, gen(0), torch.bfloat16)
    X = torch.randn(3, 4, generator=gen(1)).to(torch.bfloat16)
    J = expert_jacobians(bank16, X)
    assert J.dtype == torch.float32
    J64 = expert_jacobians(make_experts("swiglu", 2, 4, 8, gen(0), torch.bfloat16).to(F64), X.to(F64))
    torch.testing.assert_close(J.double(), J64, atol=1e-5, rtol=1e-5)
    assert mean_expert_jacobians(bank16, X, torch.ones(3, 2)).dtype == torch.float32


def test_pair_alignment_errors():
    bank = bank64("swiglu", 3, 4, 6)
    X, w = randn(10, 4), torch.rand(10, 3, generator=gen(0), dtype=F64)
    with pytest.raises(ValueError, match="j=3 must be an expert index in 0..2"):
        pair_alignment(bank, 0, 3, X, w)
    w0 = w.clone()
    w0[:, 1] = 0
    with pytest.raises(ValueError, match="expert 1 has zero total routing weight"):
        pair_alignment(bank, 0, 1, X, w0)
    with pytest.raises(ValueError, match="path='fast'"):
        pair_alignment(bank, 0, 1, X, w, path="fast")
    with pytest.raises(ValueError, match=r"weights_NE must be \(N=10, E=3\)"):
        pair_alignment(bank, 0, 1, X, w[:, :2])
    with pytest.raises(ValueError, match="dtype=torch.float16"):
        pair_alignment(bank, 0, 1, X, w, dtype=torch.float16)
    with pytest.raises(ValueError, match="finite and >= 0"):
        pair_alignment(bank, 0, 1, X, -w)


# --------------------------------------------------------------------------------------------------- asymmetry

def _layer_geometry(seed=0):
    g = gen(seed)
    bank = make_experts("swiglu", 3, 6, 12, g, F64)
    X = torch.randn(300, 6, generator=g, dtype=F64)
    w = torch.softmax(3 * X[:, :3], dim=1)
    align = bank_jacobian_alignment(bank, X, w, generator=0)
    sub = routed_subspaces(X, w, rank=2)
    cmp = compare_subspaces(sub, "geodesic", generator=0, n_draws=6, n_splits=3)
    return align, sub, cmp


def test_asymmetry_summary_formulas():
    align, _, cmp = _layer_geometry()
    s = asymmetry_summary(align, cmp, generator=1, n_draws=4000)
    assert isinstance(s, AsymmetrySummary) and s.n_pairs_functional == 3
    # the functional null: mean over 3 pairs of |cos_F| of iid Gaussian 6×6 matrices; for large pq,
    # E|cos| → √(2/π)/√(pq) and SD(|cos|) → √(1 − 2/π)/√(pq), the mean of 3 has SD/√3
    pq = 36
    assert abs(s.functional_null - math.sqrt(2 / math.pi / pq)) < 0.01
    assert abs(s.functional_null_sd - math.sqrt((1 - 2 / math.pi) / pq / 3)) < 0.01
    assert abs(s.functional_z - (align.mean_abs_offdiag - s.functional_null) / s.functional_null_sd) < 1e-12
    assert abs(s.functional_fraction - (align.mean_abs_offdiag - s.functional_null)
               / (align.ceiling - s.functional_null)) < 1e-12
    frac = (cmp.iso_mean - cmp.between_mean) / (cmp.iso_mean - cmp.floor_mean)
    assert abs(s.representational_fraction - frac) < 1e-12
    assert abs(s.representational_z - (cmp.iso_mean - cmp.between_mean) / cmp.iso_sd) < 1e-12
    assert abs(s.representational_group_z - (cmp.group_null_mean - cmp.between_mean) / cmp.group_null_sd) < 1e-12
    assert s.gap == s.representational_fraction - s.functional_fraction
    # seeded: same seed, same numbers
    assert asymmetry_summary(align, cmp, generator=1, n_draws=4000) == s
    assert set(s.summary()) >= {"gap", "functional_z", "representational_z"}


def test_asymmetry_summary_overlap_has_the_same_fraction_and_sign():
    align, sub, cmp = _layer_geometry(seed=2)
    ov = compare_subspaces(sub, "overlap", references=cmp.references)
    a, b = asymmetry_summary(align, cmp), asymmetry_summary(align, ov)
    # on the overlap scale the fraction has the same meaning: 0 at unrelated subspaces, 1 at the split-half floor
    assert abs(b.representational_fraction - (ov.between_mean - ov.iso_mean) / (ov.floor_mean - ov.iso_mean)) < 1e-12
    assert abs(b.representational_z - (ov.between_mean - ov.iso_mean) / ov.iso_sd) < 1e-12
    assert a.functional_fraction == b.functional_fraction and b.representational_metric == "overlap"


def test_asymmetry_summary_errors():
    align, _, cmp = _layer_geometry()
    with pytest.raises(ValueError, match="alignment must be a JacobianAlignment"):
        asymmetry_summary(cmp, cmp)
    with pytest.raises(ValueError, match="comparison must be a SubspaceComparison"):
        asymmetry_summary(align, align)
    with pytest.raises(ValueError, match="n_draws=1"):
        asymmetry_summary(align, cmp, n_draws=1)


@pytest.mark.parametrize("k", [1, 2])
def test_layer_asymmetry_equals_its_pieces(k):
    from moewidgets import MoEConfig, build_model, trace_model
    from moewidgets.geometry.subspaces import routing_weights, trace_subspaces

    model = build_model(MoEConfig(n_experts=4, k=k, d_model=6, d_hidden=12, expert="swiglu"))
    tr = trace_model(model, torch.randn(300, 6, generator=gen(0)))
    bank = model.layer.experts
    res = layer_asymmetry(bank, tr, weighting="argmax", rank=2, min_tokens=12, metric="chordal", generator=3,
                          n_draws=4, n_splits=2, min_points=4)
    g = gen(3)                                   # the same draws, in the same order, by hand
    sub = trace_subspaces(tr, weighting="argmax", rank=2, min_tokens=12)
    align = bank_jacobian_alignment(bank, tr.x_TD, routing_weights(tr, "argmax"), generator=g, min_points=4)
    cmp = compare_subspaces(sub, "chordal", generator=g, n_draws=4, n_splits=2)
    assert res.summary == asymmetry_summary(align, cmp, generator=g)
    torch.testing.assert_close(res.comparison.observed, cmp.observed, equal_nan=True)
    assert res.weighting == "argmax" and res.space == "inputs"
    if k == 1:
        assert res.coselected is None
    else:
        ref = coselected_jacobian_cosine(bank, tr.x_TD, tr.idx_TK)
        torch.testing.assert_close(res.coselected.matrix, ref.matrix, equal_nan=True)
    # without the co-selected cosines (the live dashboards): the same draws, so the same everything else
    lean = layer_asymmetry(bank, tr, weighting="argmax", rank=2, min_tokens=12, metric="chordal", generator=3,
                           n_draws=4, n_splits=2, min_points=4, coselected=False)
    assert lean.coselected is None and lean.summary == res.summary


def test_token_chunking_by_memory_budget_changes_nothing(monkeypatch):
    import moewidgets.geometry.asymmetry as asy

    bank = bank64("swiglu", 4, 5, 9, seed=9)
    X = randn(25, 5, seed=10)
    w, idx = topk_routing(25, 4, 3, seed=11)
    ref_co = {m: coselected_jacobian_cosine(bank, X, idx, method=m) for m in ("jacobians", "gram")}
    ref_pa = {p: pair_alignment(bank, 0, 2, X, w, per_token=True, path=p) for p in ("model", "hidden")}
    monkeypatch.setattr(asy, "_COEFFICIENT_ELEMENTS", 3 * 2 * 2 * 9)      # 3 tokens per chunk
    monkeypatch.setattr(asy, "_JACOBIAN_ELEMENTS", 2 * 3 * 25)            # 2 tokens per chunk
    for m, ref in ref_co.items():
        got = coselected_jacobian_cosine(bank, X, idx, method=m)
        torch.testing.assert_close(got.cos_NKK, ref.cos_NKK, atol=1e-12, rtol=0, equal_nan=True)
    for p, ref in ref_pa.items():
        got = pair_alignment(bank, 0, 2, X, w, per_token=True, path=p)
        torch.testing.assert_close(got.token_cosine, ref.token_cosine, atol=1e-12, rtol=0)
