"""Chapter 3's coupling metrics against slow obvious oracles (spec §1.4, RC-a … RC-g), and the load statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from moewidgets.balance import load_stats, load_std, max_violation, mean_batch_max_violation
from moewidgets.config import MoEConfig
from moewidgets.geometry.coupling import (centroid_matching, coupling_exactness, expert_activation, gradient_spans,
                                          router_row_similarity, routed_means, score_activation_correlation,
                                          sgd_span_residual, span_residual, spearman)
from moewidgets.nn.layer import MoELayer

F64 = torch.float64


def _layer(expert="swiglu", gate="renorm", k=2, E=4, D=8, F=6, seed=0, dtype=F64, **kw):
    cfg = MoEConfig(n_experts=E, k=k, d_model=D, d_hidden=F, expert=expert, gate=gate, **kw)
    return MoELayer(cfg, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _x(T, D, seed=1, dtype=F64):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
@pytest.mark.parametrize("gate", ["renorm", "softmax"])
def test_coupling_exact_in_float64(expert, gate):
    """RC-a: every selected router row and every input-side expert row is parallel to x (1e-10)."""
    ce = coupling_exactness(_layer(expert, gate), _x(12, 8), generator=0)
    assert ce.min_selected_cos >= 1 - 1e-10
    assert ce.median_output_cos < 0.99          # the output side is not coupled
    if gate == "renorm":
        assert ce.max_unselected_norm == 0.0     # exactly: unselected logits get no gradient
    else:
        assert ce.router_norm_TE[~ce.selected_TE].min() > 0
        assert ce.min_unselected_cos >= 1 - 1e-10


def test_renorm_top1_router_gets_no_gradient():
    ce = coupling_exactness(_layer(gate="renorm", k=1), _x(6, 8), generator=0)
    assert float(ce.router_norm_TE.abs().max()) == 0.0


@pytest.mark.parametrize("gate", ["renorm", "softmax"])
def test_router_gradient_equals_closed_form(gate):
    """Oracle: ∂L/∂r_i = α_i x with α_i from spec §1.4(a), for L = ⟨δ, y(x)⟩."""
    layer = _layer("swiglu", gate)
    x_TD, d_TD = _x(5, 8, seed=2), _x(5, 8, seed=3)
    ce = coupling_exactness(layer, x_TD, d_TD)
    for t in range(5):
        layer.zero_grad()
        out = layer(x_TD[t:t + 1])
        (out.y_TD * d_TD[t:t + 1]).sum().backward()
        p_E = out.routing.probs_TE[0].detach()
        S = out.routing.idx_TK[0].tolist()
        y = out.y_TD[0].detach()
        E_out = {i: layer.experts.expert_output(i, x_TD[t:t + 1])[0].detach() for i in S}
        for i in range(4):
            if gate == "renorm":
                g_i = p_E[i] / p_E[S].sum() if i in S else 0.0
                alpha = g_i * (d_TD[t] @ E_out[i] - d_TD[t] @ y) if i in S else 0.0
            else:
                alpha = p_E[i] * ((d_TD[t] @ E_out[i]) if i in S else 0.0) - p_E[i] * (d_TD[t] @ y)
            torch.testing.assert_close(layer.router.w_ED.grad[i], alpha * x_TD[t], rtol=1e-10, atol=1e-12)
        assert ce.selected_TE[t].sum() == 2


def test_span_residual_oracle():
    tokens = _x(3, 6, seed=4)
    delta = _x(4, 6, seed=5)
    res = span_residual(delta, tokens)
    Q, _ = np.linalg.qr(tokens.numpy().T)                     # (6, 3) orthonormal basis of the span
    for n in range(4):
        d = delta[n].numpy()
        expect = np.linalg.norm(d - Q @ (Q.T @ d)) / np.linalg.norm(d)
        assert abs(float(res[n]) - expect) < 1e-12
    assert math.isnan(float(span_residual(torch.zeros(1, 6), tokens)[0]))


def test_sgd_keeps_changes_in_routed_span_adam_does_not():
    """RC-b: plain SGD (renorm gate, no aux loss) moves r_i and W_in[i] only inside span{tokens routed to i}."""
    layer = _layer("swiglu", "renorm", E=4, D=16, F=8, dtype=torch.float32)
    x, y = _x(6, 16, seed=6, dtype=torch.float32), _x(6, 16, seed=7, dtype=torch.float32)
    sgd = sgd_span_residual(layer, x, y, steps=30, lr=0.05)
    assert sgd.max < 1e-5
    # every expert that got a token moved (a NaN row would be skipped by max: it must not hide a diverged run)
    got = sgd.n_tokens_E > 0
    assert got.any() and not sgd.router_E[got].isnan().any() and not sgd.input_E[got].isnan().any()
    adam = sgd_span_residual(layer, x, y, steps=30, lr=0.01, optimizer="adamw")
    assert adam.max > 1e-3


def test_sgd_span_residual_names_a_diverged_run():
    """Large inputs with a large step blow up; the check says so instead of skipping the NaN rows."""
    layer = _layer("swiglu", "renorm", E=4, D=16, F=8, dtype=torch.float64)
    x, y = 20 * _x(6, 16, seed=6), _x(6, 16, seed=7)
    with pytest.raises(ValueError, match=r"sgd run diverged .* with lr=0.5: use a smaller lr"):
        sgd_span_residual(layer, x, y, steps=30, lr=0.5)


def test_aux_loss_spreads_gradients_over_the_batch():
    """RC-c: the aux-loss gradient of each row lies in span{all batch tokens}, not span{own routed tokens}."""
    layer = _layer("gelu", "renorm", E=4, D=16, F=8, aux_weight=0.1)
    x, y = _x(6, 16, seed=8), _x(6, 16, seed=9)
    gs = gradient_spans(layer, x, y)
    assert float(gs.aux_all_E.max()) < 1e-10
    assert float(gs.aux_own_E.max()) > 1e-2
    assert float(gs.aux_norm_E.min()) > 0
    assert float(gs.task_own_E[~torch.isnan(gs.task_own_E)].max()) < 1e-10
    with pytest.raises(ValueError, match="aux_weight"):
        gradient_spans(_layer(), x[:, :8], y[:, :8])


def test_coupling_rejects_routers_without_learned_rows():
    with pytest.raises(ValueError, match="learned linear router"):
        coupling_exactness(_layer(router="kmeans"), _x(3, 8))


def test_row_similarity_oracle():
    rows = _x(5, 7, seed=10)
    s = router_row_similarity(rows)
    cos = [float(rows[i] @ rows[j] / (rows[i].norm() * rows[j].norm())) for i in range(5) for j in range(i + 1, 5)]
    assert abs(s.signed - np.mean(cos)) < 1e-12 and abs(s.abs - np.mean(np.abs(cos))) < 1e-12
    with pytest.raises(ValueError, match="E=1"):
        router_row_similarity(rows[:1])


def test_spearman_matches_scipy():
    a, b = _x(50, 3, seed=11), _x(50, 3, seed=12) + _x(50, 3, seed=11)
    ours = spearman(a, b)
    for i in range(3):
        assert abs(float(ours[i]) - scipy.stats.spearmanr(a[:, i], b[:, i]).statistic) < 1e-12


@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
def test_expert_activation_oracle(expert):
    bank = _layer(expert).experts
    x = _x(7, 8, seed=13)
    act = expert_activation(bank, x)
    for i in range(4):
        if expert == "gelu":
            h = torch.nn.functional.gelu(x @ bank.w_in_EFD[i].T + bank.b_in_EF[i])
        else:
            h = torch.nn.functional.silu(x @ bank.w_gate_EFD[i].T)
        torch.testing.assert_close(act[:, i], h.abs().mean(-1).detach())


def test_score_activation_null_is_near_zero_for_unrelated_experts():
    g = torch.Generator().manual_seed(14)
    z = torch.randn(2000, 6, generator=g, dtype=F64)
    sa = score_activation_correlation(z, z + 0.5 * torch.randn(2000, 6, generator=g, dtype=F64))
    assert sa.rho > 0.85 and abs(sa.null) < 0.05
    assert sa.decile_mean_activation == sorted(sa.decile_mean_activation)
    with pytest.raises(ValueError, match="same"):
        score_activation_correlation(z, z[:, :3])


def test_centroid_matching_oracle_and_dead_experts():
    x = _x(20, 5, seed=15)
    idx = torch.randint(3, (20, 2), generator=torch.Generator().manual_seed(16))   # expert 3 never used: dead
    rows = _x(4, 5, seed=17)
    cm = centroid_matching(rows, x, idx)
    assert cm.dead == [3]
    means = [x[(idx == j).any(1) | False].sum(0) for j in range(3)]
    # oracle means with every slot counted
    means = []
    for j in range(3):
        pts = [x[t] for t in range(20) for s in range(2) if idx[t, s] == j]
        means.append(torch.stack(pts).mean(0))
    m, n = routed_means(x, idx, 4)
    for j in range(3):
        torch.testing.assert_close(m[j], means[j])
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    matched = np.mean([cos(rows[i], means[i]) for i in range(3)])
    unmatched = np.mean([cos(rows[i], means[j]) for i in range(3) for j in range(3) if i != j])
    assert abs(cm.matched - matched) < 1e-12 and abs(cm.unmatched - unmatched) < 1e-12
    assert math.isnan(float(cm.cos_EE[3, 0])) and n[3] == 0


def test_load_statistics_on_hand_made_loads():
    assert max_violation(torch.tensor([5., 5., 5., 5.])) == 0.0
    assert max_violation(torch.tensor([8., 0., 0., 0.])) == 3.0
    assert max_violation(torch.zeros(4)) == 0.0              # nothing routed: no division by zero
    assert abs(max_violation(torch.tensor([3., 1., 1., 1.])) - 1.0) < 1e-12
    assert load_std(torch.tensor([1., 1.])) == 0.0
    assert abs(load_std(torch.tensor([3., 1.])) - 0.25) < 1e-12
    s = load_stats(torch.tensor([4., 0., 4., 0.]))
    assert s.dead == [1, 3] and s.maxvio == 1.0 and s.fractions == [0.5, 0.0, 0.5, 0.0]
    assert load_stats(torch.zeros(3)).dead == [0, 1, 2]
    assert abs(mean_batch_max_violation([[0.25] * 4, [1.0, 0, 0, 0]]) - 1.5) < 1e-12
    with pytest.raises(ValueError, match="no non-empty"):
        mean_batch_max_violation([[], []])
