"""Principal angles, Grassmann distances and routed subspaces (moewidgets.geometry.subspaces) against slow obvious
oracles: scipy.linalg.subspace_angles, projector norms, per-expert numpy SVDs, Python loops.

Shape legend: N points, D width, E experts, K top-k, r rank. Float64 unless a test says otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sla
import torch

from moewidgets.geometry.subspaces import (RoutedSubspaces, compare_subspaces, grassmann_distance,
                                           metric_from_angles, principal_angles, routed_subspaces, routing_weights,
                                           subspace_distance_matrix, subspace_overlap, subspace_references,
                                           trace_subspaces)
from moewidgets.nn.experts import make_experts
from moewidgets.trace import RoutingTrace

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def rotation(r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(randn(r, r, seed=seed))[0]


# ------------------------------------------------------------------------------------------ principal angles

@pytest.mark.parametrize("D,r1,r2", [(10, 3, 3), (10, 2, 5), (7, 4, 1), (6, 6, 3), (40, 8, 8)])
def test_principal_angles_match_scipy(D, r1, r2):
    A, B = randn(D, r1, seed=1).numpy(), randn(D, r2, seed=2).numpy()
    ref = np.sort(sla.subspace_angles(A, B))                    # scipy returns them descending
    got = principal_angles(A, B)
    assert isinstance(got, np.ndarray) and got.shape == (min(r1, r2),) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, atol=1e-12, rtol=0)
    assert np.all(np.diff(got) >= 0) and got.min() >= 0 and got.max() <= math.pi / 2
    got_t = principal_angles(torch.from_numpy(A), torch.from_numpy(B))
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == F64
    np.testing.assert_allclose(got_t.numpy(), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("delta", [1e-7, 3e-9, 1e-4])
def test_principal_angles_small_angles_are_accurate(delta):
    # span{e1, e2} vs span{cos δ e1 + sin δ e3, e2}: angles exactly [0, δ]; arccos alone would give 0 below ~1e-8
    D = 5
    I = torch.eye(D, dtype=F64)
    A = I[:, :2] @ rotation(2, 3)                               # any basis of the plane
    B = torch.stack([math.cos(delta) * I[:, 0] + math.sin(delta) * I[:, 2], I[:, 1]], 1)
    got = principal_angles(A, B)
    assert float(got[0]) < 1e-15
    assert abs(float(got[1]) - delta) <= 1e-7 * delta
    ref = np.sort(sla.subspace_angles(A.numpy(), B.numpy()))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-7, atol=1e-16)


def test_principal_angles_near_equal_random_subspaces_match_scipy():
    A = randn(30, 4, seed=5)
    B = A + 1e-7 * randn(30, 4, seed=6)
    got = principal_angles(A.numpy(), B.numpy())
    ref = np.sort(sla.subspace_angles(A.numpy(), B.numpy()))
    assert 1e-9 < ref.max() < 1e-6
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


def test_principal_angles_identical_and_reparametrised_are_zero():
    A = randn(12, 4, seed=7)
    assert float(principal_angles(A, A).max()) < 1e-14
    mix = randn(4, 4, seed=8) + 4 * torch.eye(4, dtype=F64)          # invertible change of basis
    assert float(principal_angles(A, A @ mix).max()) < 1e-12
    assert float(principal_angles(A, torch.eye(12, dtype=F64)).max()) < 1e-14   # inside the whole space


def test_principal_angles_batched_torch_and_numpy_equal_loop():
    A = randn(3, 1, 9, 3, seed=9)
    B = randn(4, 9, 2, seed=10)
    got = principal_angles(A, B)                                 # batch dims broadcast to (3, 4)
    assert got.shape == (3, 4, 2)
    for a in range(3):
        for b in range(4):
            ref = np.sort(sla.subspace_angles(A[a, 0].numpy(), B[b].numpy()))
            np.testing.assert_allclose(got[a, b].numpy(), ref, atol=1e-12, rtol=0)
    got_np = principal_angles(A.numpy(), B.numpy())
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_allclose(got_np, got.numpy(), atol=0, rtol=0)


def test_principal_angles_dtypes():
    A, B = randn(8, 3, seed=11), randn(8, 2, seed=12)
    assert principal_angles(A.float(), B.float()).dtype == torch.float32
    assert principal_angles(A.to(torch.bfloat16), B.to(torch.bfloat16)).dtype == torch.float32
    assert principal_angles(A.float(), B).dtype == F64
    assert principal_angles(A.numpy().astype(np.float32), B.numpy().astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(principal_angles(np.eye(3, dtype=int)[:, :1], np.eye(3, dtype=int)[:, 1:]),
                               [math.pi / 2], atol=1e-15)


def test_principal_angles_errors():
    A = randn(6, 2)
    with pytest.raises(ValueError, match="both be numpy arrays or both torch"):
        principal_angles(A, A.numpy())
    with pytest.raises(ValueError, match="D=6 rows but B has D=5"):
        principal_angles(A, randn(5, 2))
    with pytest.raises(ValueError, match="r=7 columns"):
        principal_angles(A, randn(6, 7))
    with pytest.raises(ValueError, match=r"\(..., D, r\)"):
        principal_angles(randn(6), A)
    with pytest.raises(ValueError, match="linearly dependent"):
        principal_angles(torch.stack([A[:, 0], 2 * A[:, 0]], 1), A)
    with pytest.raises(ValueError, match="finite"):
        principal_angles(A * math.nan, A)
    with pytest.raises(ValueError, match="broadcast"):
        principal_angles(randn(2, 6, 2), randn(3, 6, 2))


# ------------------------------------------------------------------------------------------------- distances

def _projector(A: torch.Tensor) -> torch.Tensor:
    Q = torch.linalg.qr(A)[0]
    return Q @ Q.T


@pytest.mark.parametrize("kind", ["geodesic", "chordal", "projection"])
@pytest.mark.parametrize("D,r", [(8, 3), (20, 5), (4, 2)])
def test_distance_metric_properties(kind, D, r):
    A, B, C = randn(D, r, seed=1), randn(D, r, seed=2), randn(D, r, seed=3)
    top = (math.pi / 2) * math.sqrt(r) if kind == "geodesic" else math.sqrt(r)
    d = lambda X, Y, **kw: float(grassmann_distance(X, Y, kind, **kw))     # noqa: E731
    assert abs(d(A, B) - d(B, A)) < 1e-12                                  # symmetric
    assert d(A, A) < 1e-12 and d(A, A @ rotation(r, 4)) < 1e-12            # zero on equal subspaces
    assert 0 < d(A, B) <= top + 1e-12                                      # bounded by the maximum
    assert abs(d(A, B, normalized=True) - d(A, B) / top) < 1e-12
    assert d(A, C) <= d(A, B) + d(B, C) + 1e-12                            # triangle inequality
    # basis invariance: random rotations (and scalings) of either basis change nothing
    assert abs(d(A @ rotation(r, 5), 3 * B @ rotation(r, 6)) - d(A, B)) < 1e-12
    # the closed forms
    theta = torch.from_numpy(np.sort(sla.subspace_angles(A.numpy(), B.numpy())))
    ref = theta.norm() if kind == "geodesic" else torch.sin(theta).norm()
    assert abs(d(A, B) - float(ref)) < 1e-12
    if kind != "geodesic":                                                 # ‖sin θ‖ = ‖P_A − P_B‖_F / √2
        assert abs(d(A, B) - float(torch.linalg.matrix_norm(_projector(A) - _projector(B))) / math.sqrt(2)) < 1e-12


def test_distance_maximum_on_orthogonal_subspaces_and_numpy_scalars():
    I = np.eye(6)
    for kind in ("geodesic", "chordal"):
        got = grassmann_distance(I[:, :3], I[:, 3:], kind, normalized=True)
        assert isinstance(got, np.floating) and abs(float(got) - 1.0) < 1e-12
    batched = grassmann_distance(randn(5, 6, 2), randn(6, 2, seed=1))
    assert batched.shape == (5,)
    with pytest.raises(ValueError, match="kind='cosine'"):
        grassmann_distance(I[:, :2], I[:, 2:4], "cosine")


def test_different_ranks_use_the_smaller_rank():
    A, B = randn(9, 2, seed=1), randn(9, 5, seed=2)
    theta = np.sort(sla.subspace_angles(A.numpy(), B.numpy()))
    assert theta.shape == (2,)
    geo = float(grassmann_distance(A, B, normalized=True))
    chord = float(grassmann_distance(A, B, "chordal", normalized=True))
    assert abs(geo - np.linalg.norm(theta) / (math.pi / 2 * math.sqrt(2))) < 1e-12
    assert abs(chord - np.linalg.norm(np.sin(theta)) / math.sqrt(2)) < 1e-12


def test_subspace_overlap_equals_projector_product_and_mean_cos2():
    A, B = randn(10, 3, seed=1), randn(10, 4, seed=2)
    ov = float(subspace_overlap(A, B))
    ref = float(torch.linalg.matrix_norm(_projector(A) @ _projector(B)) ** 2) / 3
    assert abs(ov - ref) < 1e-12
    assert abs(ov - float(torch.cos(principal_angles(A, B)).square().mean())) < 1e-12
    assert abs(float(subspace_overlap(A, A @ rotation(3, 3))) - 1.0) < 1e-12
    I = torch.eye(10, dtype=F64)
    assert float(subspace_overlap(I[:, :3], I[:, 3:7])) < 1e-15
    # random r-subspaces of R^D: E[ov] = r/D (here 200 draws at r = 4, D = 40: 0.1 ± 0.005)
    Z1, Z2 = randn(200, 40, 4, seed=4), randn(200, 40, 4, seed=5)
    assert abs(float(subspace_overlap(Z1, Z2).mean()) - 0.1) < 0.01


def test_metric_from_angles_ignores_nan_padding():
    theta = torch.tensor([[0.1, 0.2, math.nan], [math.nan, math.nan, math.nan]], dtype=F64)
    g = metric_from_angles(theta, "geodesic")
    assert abs(float(g[0]) - math.hypot(0.1, 0.2)) < 1e-15 and math.isnan(float(g[1]))
    chord = float(metric_from_angles(theta, "chordal", True)[0])
    assert abs(chord - math.hypot(math.sin(.1), math.sin(.2)) / math.sqrt(2)) < 1e-15
    assert abs(float(metric_from_angles(theta, "overlap")[0]) - (math.cos(.1) ** 2 + math.cos(.2) ** 2) / 2) < 1e-15
    with pytest.raises(ValueError, match="metric='l2'"):
        metric_from_angles(theta, "l2")


# ------------------------------------------------------------------------------------------ routed subspaces

def _routing(N, E, K, seed):
    """Random top-K routing: gates (softmax over the selected) scattered into (N, E)."""
    logits = randn(N, E, seed=seed)
    top, idx = logits.topk(K, dim=1)
    w = torch.zeros(N, E, dtype=F64).scatter_(1, idx, torch.softmax(top, 1))
    return w, idx


def _oracle_basis(H_nD: np.ndarray, w_n: np.ndarray, rank, variance):
    """Numpy SVD of the weighted centred rows √(w/W)(h − μ): right singular vectors, spectrum λ = s²."""
    W = w_n.sum()
    mu = (w_n[:, None] * H_nD).sum(0) / W
    Z = np.sqrt(w_n / W)[:, None] * (H_nD - mu)
    _, s, Vt = np.linalg.svd(Z, full_matrices=False)
    lam = np.zeros(H_nD.shape[1])
    lam[:s.size] = s ** 2
    r = rank if rank is not None else int(np.searchsorted(np.cumsum(lam), variance * lam.sum() * (1 - 1e-12)) + 1)
    return Vt[:r].T, lam, (W ** 2) / (w_n ** 2).sum()


@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("rule", [{"rank": 3}, {"variance": 0.8}])
def test_routed_subspaces_match_numpy_svd_oracle(per_expert, rule):
    N, E, D, K = 300, 4, 7, 2
    w, _ = _routing(N, E, K, seed=1)
    scale = torch.linspace(3, 0.2, D, dtype=F64)
    H = randn(N, E, D, seed=2) * scale if per_expert else randn(N, D, seed=2) * scale
    sub = routed_subspaces(H, w, **rule)
    assert sub.skipped == {} and sub.kept.all()
    for e in range(E):
        rows = (w[:, e] > 0).numpy()
        He = (H[:, e] if per_expert else H).numpy()[rows]
        U, lam, n_eff = _oracle_basis(He, w[:, e].numpy()[rows], **{k: rule.get(k) for k in ("rank", "variance")})
        assert int(sub.n_tokens[e]) == rows.sum() and int(sub.ranks[e]) == U.shape[1]
        assert sub.bases[e].shape == (D, U.shape[1])
        np.testing.assert_allclose(sub.bases[e].T @ sub.bases[e], np.eye(U.shape[1]), atol=1e-12)
        assert float(principal_angles(sub.bases[e].numpy(), U).max()) < 1e-8       # the same subspace
        np.testing.assert_allclose(sub.eigenvalues[e].numpy(), lam, atol=1e-12, rtol=1e-10)
        assert abs(float(sub.n_eff[e]) - n_eff) < 1e-9
        assert abs(float(sub.explained[e]) - lam[:U.shape[1]].sum() / lam.sum()) < 1e-12


@pytest.mark.parametrize("rule", [{"rank": 3}, {"variance": 0.6}])
def test_routed_subspaces_fewer_points_than_dimensions_match_oracle(rule):
    # D = 40 > every expert's point count: the thin-SVD path; the same numbers as the numpy oracle
    N, E, D = 60, 6, 40
    w, _ = _routing(N, E, 2, seed=11)
    H = randn(N, D, seed=12) * torch.linspace(3, 0.2, D, dtype=F64)
    sub = routed_subspaces(H, w, min_tokens=10, **rule)
    assert sub.kept.all() and int(sub.n_tokens.max()) < D
    for e in range(E):
        rows = (w[:, e] > 0).numpy()
        U, lam, n_eff = _oracle_basis(H.numpy()[rows], w[:, e].numpy()[rows],
                                      **{k: rule.get(k) for k in ("rank", "variance")})
        assert int(sub.ranks[e]) == U.shape[1]
        assert float(principal_angles(sub.bases[e].numpy(), U).max()) < 1e-8
        np.testing.assert_allclose(sub.eigenvalues[e].numpy(), lam, atol=1e-12, rtol=1e-10)
        assert abs(float(sub.n_eff[e]) - n_eff) < 1e-9
    ref = subspace_references(sub, generator=0, n_draws=2, n_splits=2)       # runs on the same path
    assert bool(torch.isfinite(ref.group_angles[0, 0, 1, 0]))                 # (variance rule: NaN-padded)


def test_skip_reasons():
    N, D = 60, 5
    H = randn(N, D, seed=1)
    w = torch.zeros(N, 6, dtype=F64)
    w[:, 0] = 1                                              # kept
    w[:2, 1] = 1                                             # 2 tokens
    # expert 2: no tokens
    w[10:40, 3] = 1
    H[10:40] = H[10]                                         # expert 3: 30 identical points (zero variance)
    w[40:60, 4] = 1
    H[40:60] = H[40] + torch.outer(torch.arange(20, dtype=F64), H[41])     # expert 4: points on a line
    w[:12, 5] = 1                                            # 12 tokens: < 5·rank = 15 by default
    sub = routed_subspaces(H, w, rank=3)
    assert sub.kept.tolist() == [True, False, False, False, False, False]
    assert sub.skipped[1] == "expert 1: 2 routed tokens < 5·rank=15 (rank=3; min_tokens=None means 5·rank)"
    assert sub.skipped[2] == "expert 2: no routed tokens"
    assert "span only" in sub.skipped[3] or "zero variance" in sub.skipped[3]
    assert sub.skipped[4] == "expert 4: its 20 routed points span only 1 directions < rank=3"
    assert sub.skipped[5].startswith("expert 5: 12 routed tokens < 5·rank=15")
    sub = routed_subspaces(H, w, rank=3, min_tokens=16)
    assert sub.skipped[1] == "expert 1: 2 routed tokens < min_tokens=16"
    assert sub.skipped[5] == "expert 5: 12 routed tokens < min_tokens=16"
    assert routed_subspaces(H, w, rank=3, min_tokens=4).kept.tolist() == [True, False, False, False, False, True]
    sub = routed_subspaces(H, w, variance=0.9, min_tokens=4)
    assert sub.skipped[3] == "expert 3: zero variance (all 30 routed points are equal)"
    assert bool(sub.kept[4]) and int(sub.ranks[4]) == 1                   # a line: rank 1 holds all variance
    assert sub.ranks[~sub.kept].eq(0).all() and all(sub.bases[e] is None for e in sub.skipped)
    D_mat = sub.distance_matrix()
    assert torch.isnan(D_mat[2]).all() and torch.isnan(D_mat[:, 2]).all()


def test_routed_subspaces_errors():
    H, w = randn(20, 4), torch.ones(20, 2, dtype=F64)
    with pytest.raises(ValueError, match="exactly one of rank"):
        routed_subspaces(H, w)
    with pytest.raises(ValueError, match="exactly one of rank"):
        routed_subspaces(H, w, rank=2, variance=0.9)
    with pytest.raises(ValueError, match="rank=5 must be an integer in 1..D=4"):
        routed_subspaces(H, w, rank=5)
    with pytest.raises(ValueError, match="variance=1.5"):
        routed_subspaces(H, w, variance=1.5)
    with pytest.raises(ValueError, match="min_tokens=0"):
        routed_subspaces(H, w, rank=2, min_tokens=0)
    with pytest.raises(ValueError, match=r"H=\(19, 4\)"):
        routed_subspaces(H[:19], w, rank=2)
    with pytest.raises(ValueError, match="finite and >= 0"):
        routed_subspaces(H, -w, rank=2)


def _trace(N=240, E=4, K=2, D=6, seed=0, outputs=True):
    w, idx = _routing(N, E, K, seed)
    gates = w.gather(1, idx)
    x = randn(N, D, seed=seed + 1) * torch.linspace(2, 0.3, D, dtype=F64)
    bank = make_experts("swiglu", E, D, 8, gen(seed + 2), F64)
    y_TED = bank.all_outputs(x).detach()
    out = y_TED.gather(1, idx[..., None].expand(-1, -1, D)) if outputs else None
    return RoutingTrace(x, torch.softmax(randn(N, E, seed=seed), 1), idx, gates, out, n_experts=E), y_TED


@pytest.mark.parametrize("weighting", ["gates", "membership", "argmax"])
def test_trace_subspaces_inputs_and_outputs_equal_dense_calls(weighting):
    tr, y_TED = _trace()
    w = routing_weights(tr, weighting)
    if weighting == "argmax":
        assert w.sum(1).eq(1).all() and w.argmax(1).equal(tr.idx_TK[:, 0])
    else:
        assert torch.equal(w, tr.gate_matrix() if weighting == "gates" else tr.membership())
    for space, H in (("inputs", tr.x_TD), ("outputs", y_TED)):
        got = trace_subspaces(tr, space=space, weighting=weighting, rank=2)
        ref = routed_subspaces(H, w, rank=2)
        assert got.space == space and got.weighting == weighting
        assert got.n_tokens.equal(ref.n_tokens) and got.kept.equal(ref.kept)
        for a, b in zip(got.bases, ref.bases):
            assert float(principal_angles(a, b).max()) < 1e-9
        torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, atol=1e-12, rtol=1e-9)


def test_trace_subspaces_errors():
    tr, _ = _trace(outputs=False)
    with pytest.raises(ValueError, match="with_expert_outputs=True"):
        trace_subspaces(tr, space="outputs", rank=2)
    with pytest.raises(ValueError, match="space='hidden'"):
        trace_subspaces(tr, space="hidden", rank=2)
    with pytest.raises(ValueError, match="weighting='soft'"):
        trace_subspaces(tr, weighting="soft", rank=2)


@pytest.mark.parametrize("metric", ["geodesic", "chordal", "overlap"])
@pytest.mark.parametrize("pair_rank", ["min", "full"])
def test_distance_matrix_equals_pairwise_loop(metric, pair_rank):
    w, _ = _routing(400, 4, 2, seed=3)
    decay = torch.linspace(3, 0.3, 8, dtype=F64)
    H = randn(400, 4, 8, seed=4) * torch.stack([decay ** (0.5 + e) for e in range(4)])[None]   # (N, E, D)
    sub = routed_subspaces(H, w, variance=0.7)
    assert len(set(sub.ranks.tolist())) > 1                     # different ranks: truncation matters
    M = subspace_distance_matrix(sub, metric, normalized=True, pair_rank=pair_rank)
    assert M.shape == (4, 4) and torch.allclose(M, M.T, equal_nan=True)
    for i in range(4):
        for j in range(4):
            Ui, Uj = sub.bases[i], sub.bases[j]
            if pair_rank == "min":
                r = min(Ui.shape[1], Uj.shape[1])
                Ui, Uj = Ui[:, :r], Uj[:, :r]
            if metric == "overlap":
                ref = float(subspace_overlap(Ui, Uj))
            else:
                ref = float(grassmann_distance(Ui, Uj, metric, normalized=True))
            if i == j:
                ref = 1.0 if metric == "overlap" else 0.0
            assert abs(float(M[i, j]) - ref) < 1e-10


# ------------------------------------------------------------------------------------------------ references

def _clustered(E=4, n=300, D=10, seed=1, tilt=0.3, same=False):
    """E clusters, expert e = cluster e: own means and covariances whose eigenbases are tilted by ``tilt`` from a
    shared one (partially overlapping); ``same=True``: one law for all (routing that ignores the geometry)."""
    g = gen(seed)
    X, Q0 = [], torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))[0]
    for _ in range(E):
        Q = Q0 if same else torch.linalg.qr(Q0 + tilt * torch.randn(D, D, generator=g, dtype=F64))[0]
        mu = torch.zeros(D, dtype=F64) if same else 2 * torch.randn(D, generator=g, dtype=F64)
        X.append(mu + (torch.randn(n, D, generator=g, dtype=F64) * torch.linspace(3, 0.3, D, dtype=F64)) @ Q.T)
    w = torch.zeros(E * n, E, dtype=F64)
    for e in range(E):
        w[e * n:(e + 1) * n, e] = 1
    return torch.cat(X), w


def test_references_are_deterministic_for_a_seed_and_leave_the_global_rng_alone():
    H, w = _clustered(E=3, n=120, D=6)
    sub = routed_subspaces(H, w, variance=0.8)
    state = torch.get_rng_state()
    a = subspace_references(sub, generator=5, n_draws=4, n_splits=3)
    b = subspace_references(sub, generator=torch.Generator().manual_seed(5), n_draws=4, n_splits=3)
    c = subspace_references(sub, generator=6, n_draws=4, n_splits=3)
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("group_angles", "split_angles", "iso_angles"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0, equal_nan=True)
        assert not torch.allclose(getattr(a, name), getattr(c, name), equal_nan=True)
    assert a.group_angles.shape[:3] == (4, 3, 3) and a.split_angles.shape[:2] == (3, 3)
    assert torch.isnan(a.group_angles[:, range(3), range(3)]).all()         # no self-pairs


def test_references_orderings_on_specialised_and_random_routing():
    # specialised: experts see different clusters → between-expert distance above the random-group null and
    # the split-half floor, below unrelated (isotropic) subspaces
    H, w = _clustered()
    cmp = compare_subspaces(routed_subspaces(H, w, rank=3), "geodesic", generator=0, n_draws=10, n_splits=5)
    assert cmp.n_pairs == 6
    assert cmp.between_mean > cmp.floor_hi and cmp.between_mean > cmp.group_null_hi_mean
    assert cmp.floor_mean > 0 and cmp.group_null_mean > 0
    assert cmp.between_mean < cmp.iso_lo                   # partially overlapping: closer than unrelated subspaces
    # routing that ignores the geometry: every expert sees the same law → between ≈ random-group null
    H, w = _clustered(same=True)
    perm = torch.randperm(H.shape[0], generator=gen(1))
    cmp = compare_subspaces(routed_subspaces(H[perm], w, rank=3), "geodesic", generator=0, n_draws=20, n_splits=5)
    assert cmp.group_null_lo_mean <= cmp.between_mean <= cmp.group_null_hi_mean
    assert cmp.between_mean < cmp.iso_lo


def test_floor_is_zero_for_noise_free_subspaces_and_eligibility():
    D, r, n = 8, 2, 60
    basis = torch.linalg.qr(randn(D, r, seed=1))[0]
    H = torch.cat([randn(n, r, seed=2) @ basis.T, randn(n, D, seed=3), randn(24, D, seed=4)])
    w = torch.zeros(2 * n + 24, 3, dtype=F64)
    w[:n, 0] = 1
    w[n:2 * n, 1] = 1
    w[2 * n:, 2] = 1                               # 24 tokens: kept (≥ min_tokens), but halves of 12 are not
    sub = routed_subspaces(H, w, rank=r, min_tokens=20)
    ref = subspace_references(sub, generator=0, n_draws=3, n_splits=4)
    assert ref.floor_eligible.tolist() == [True, True, False]
    assert ref.floor_skipped == {2: "expert 2: halves of 24 routed tokens have 12 < min_tokens=20 (need 20)"}
    cmp = compare_subspaces(sub, "chordal", references=ref)
    assert float(cmp.floor[0]) < 1e-10 and float(cmp.floor[1]) > 0.05 and math.isnan(float(cmp.floor[2]))
    with pytest.raises(ValueError, match="pair_rank"):
        compare_subspaces(sub, references=ref, pair_rank="full")


def test_compare_metrics_share_references_and_overlap_is_a_similarity():
    H, w = _clustered(E=3, n=150, D=8)
    sub = routed_subspaces(H, w, rank=2)
    geo = compare_subspaces(sub, "geodesic", generator=2, n_draws=6, n_splits=3)
    ov = compare_subspaces(sub, "overlap", references=geo.references)
    assert ov.references is geo.references
    assert torch.allclose(ov.observed.diagonal(), torch.ones(3, dtype=F64))
    assert ov.between_mean > ov.iso_mean                      # overlap: larger = closer
    assert abs(ov.iso_mean - 2 / 8) < 0.1                     # random subspaces: E[ov] = r/D
    row = geo.summary()
    assert row["metric"] == "geodesic" and row["n_pairs"] == 3 and isinstance(row["between_mean"], float)
    with pytest.raises(ValueError, match="band=1.5"):
        compare_subspaces(sub, band=1.5, references=geo.references)
    with pytest.raises(ValueError, match="RoutedSubspaces"):
        subspace_references([sub.bases[0]])
    with pytest.raises(ValueError, match="n_draws=0"):
        subspace_references(sub, n_draws=0)


def test_routed_subspaces_dataclass():
    H, w = _clustered(E=2, n=50, D=4)
    sub = routed_subspaces(H, w, rank=1)
    assert isinstance(sub, RoutedSubspaces) and sub.n_experts == 2 and sub.kept_experts == [0, 1]
    assert sub.pool_MD.shape == (100, 4) and [g.numel() for g in sub.groups] == [50, 50]


def test_argmax_weighting_uses_the_largest_gate_not_slot_0():
    """Fully soft routing lists experts in index order (slot 0 is always expert 0): arg-max must read the gates."""
    from moewidgets.geometry.subspaces import routing_weights
    from moewidgets.trace import RoutingTrace
    idx = torch.tensor([[0, 1, 2], [0, 1, 2]])
    gates = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    tr = RoutingTrace(torch.zeros(2, 4), None, idx, gates, n_experts=3)
    assert routing_weights(tr, "argmax").tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
