"""The functional core (moewidgets.nn.functional, moewidgets.balance, moewidgets.nn.activations) against slow oracles:
autograd for every activation's derivative, torch.func.jacrev for the closed-form Jacobians of every table entry
(ReLU included), and a loop over seeds for every function's seed axis (S replicas at once = S single calls)."""
from __future__ import annotations

import pytest
import torch

from moewidgets import MoEConfig, RunConfig, TaskConfig, TrainConfig, Trainer
from moewidgets.balance import loss_free_update, switch_aux_loss, z_loss
from moewidgets.geometry.jacobians import (bank_tensors, expert_jacobians, expert_outputs, layer_jacobian,
                                           mean_expert_jacobians)
from moewidgets.nn import functional as fn
from moewidgets.nn.activations import ACTIVATIONS, activation
from moewidgets.nn.experts import ExpertBank, bank_weights, make_experts, ragged_available
from moewidgets.nn.layer import MoELayer

ACTS = sorted(ACTIVATIONS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ACTS)
def test_activation_derivative_is_autograds(name):
    a = activation(name)
    h = torch.randn(200, dtype=torch.float64, generator=gen(0)) * 3
    h = h[h.abs() > 1e-3]                                   # ReLU's kink: autograd and 1[h > 0] agree elsewhere
    h.requires_grad_(True)
    (want,) = torch.autograd.grad(a.fn(h).sum(), h)
    assert torch.allclose(a.grad(h.detach()), want, atol=1e-12)


def test_an_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"activation='tanh' must be one of \('gelu', 'relu', 'swiglu'\)"):
        activation("tanh")
    with pytest.raises(ValueError, match=r"MoEConfig.expert='tanh' must be one of 'gelu', 'relu', 'swiglu'"):
        MoEConfig(expert="tanh")


@pytest.mark.parametrize("name", ACTS)
def test_banks_follow_the_contract(name):
    bank = make_experts(name, 3, 4, 8, gen(0))
    assert isinstance(bank, ExpertBank) and bank.activation == name
    assert tuple(bank_weights(bank)) == activation(name).weights
    act, ws = bank_tensors(bank)
    assert act == name and all(not w.requires_grad for w in ws)
    x = torch.randn(5, 4, generator=gen(1))
    slow = torch.stack([bank.expert_output(e, x) for e in range(3)], 1)            # (T, E, D), one expert at a time
    assert torch.allclose(bank.all_outputs(x), slow, atol=1e-6)
    assert torch.allclose(expert_outputs(bank, x).transpose(0, 1), slow, atol=1e-6)


@pytest.mark.parametrize("name", ACTS)
def test_closed_form_jacobians_equal_jacrev(name):
    bank = make_experts(name, 3, 5, 7, gen(0), dtype=torch.float64)
    X = torch.randn(6, 5, dtype=torch.float64, generator=gen(1))
    J = expert_jacobians(bank, X)
    for e in range(3):
        for n in range(6):
            want = torch.func.jacrev(lambda x: bank.expert_output(e, x[None])[0])(X[n])
            assert torch.allclose(J[e, n], want, atol=1e-10), (e, n)
    w = torch.rand(6, 3, dtype=torch.float64, generator=gen(2))
    slow = torch.einsum("ne,enab->eab", w, J) / w.sum(0)[:, None, None]
    assert torch.allclose(mean_expert_jacobians(bank, X, w), slow, atol=1e-10)


@pytest.mark.parametrize("gate", ["softmax", "renorm"])
def test_relu_layer_jacobian_equals_jacrev(gate):
    layer = MoELayer(MoEConfig(n_experts=4, k=2, d_model=5, d_hidden=8, expert="relu", gate=gate), gen(0),
                     dtype=torch.float64)
    X = torch.randn(7, 5, dtype=torch.float64, generator=gen(1))
    J = layer_jacobian(layer, X)
    for n in range(7):
        idx = layer.route(X[n:n + 1]).idx_TK

        def f(x, idx=idx):          # the layer with its top-k selection held fixed
            r = layer.router
            p = torch.softmax(r.logits(x[None]) / r.temperature, -1)
            g = p[0, idx[0]] if gate == "softmax" else p[0, idx[0]] / p[0, idx[0]].sum()
            return sum(g[s] * layer.experts.expert_output(int(idx[0, s]), x[None])[0] for s in range(2))
        assert torch.allclose(J[n], torch.func.jacrev(f)(X[n]), atol=1e-10), n


@pytest.mark.parametrize("name", ACTS)
@pytest.mark.parametrize("dispatch", ["dense", "gather"])
def test_relu_and_every_activation_match_the_per_token_layer(name, dispatch):
    layer = MoELayer(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16, expert=name), gen(0), dispatch=dispatch)
    x = torch.randn(11, 8, generator=gen(1))
    assert torch.allclose(layer(x).y_TD, layer.per_token_reference(x), atol=1e-5)


def test_relu_trains_in_the_single_model():
    run = RunConfig(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16, expert="relu"),
                    TaskConfig(d_in=8, d_out=8, n_train=256, n_probe=32), TrainConfig(steps=30, device="cpu"))
    tr = Trainer.from_config(run)
    tr.run()
    assert tr.history.loss[-1] < tr.history.loss[0] and tr.model.layer.experts.activation == "relu"
    assert RunConfig.from_json(run.to_json()).model.expert == "relu"       # the dashboards' config box round trip


# ---------------------------------------------------------------------------------------------- the seed axis

S, T, E, D, F, K = 3, 10, 4, 8, 12, 2


def stacked_bank(name):
    banks = [make_experts(name, E, D, F, gen(s)) for s in range(S)]
    return banks, {n: torch.stack([bank_weights(b)[n] for b in banks]) for n in activation(name).weights}


@pytest.mark.parametrize("name", ACTS)
def test_expert_forwards_with_a_seed_axis_equal_a_loop_over_seeds(name):
    banks, w = stacked_bank(name)
    x_STD = torch.randn(S, T, D, generator=gen(9))
    y = fn.expert_all_outputs(name, w, x_STD)
    for s in range(S):
        assert torch.allclose(y[s], banks[s].all_outputs(x_STD[s]), atol=1e-6)
    idx_STK = torch.rand(S, T, E, generator=gen(3)).argsort(-1)[..., :K]          # K distinct experts per token
    gates_STK = torch.rand(S, T, K, generator=gen(4))
    for ragged in [False] + ([True] if ragged_available("cpu", D, F) else []):
        y_gather = fn.combine_gather(name, w, x_STD, gates_STK, idx_STK, ragged)
        y_dense = fn.combine_dense(fn.expert_all_outputs(name, w, x_STD), gates_STK, idx_STK)
        for s in range(S):
            slow = sum(gates_STK[s, :, k, None] * y[s, torch.arange(T), idx_STK[s, :, k]] for k in range(K))
            assert torch.allclose(y_gather[s], slow, atol=1e-5) and torch.allclose(y_dense[s], slow, atol=1e-5)


@pytest.mark.parametrize("gate", ["softmax", "renorm"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_route_with_a_seed_axis_equals_a_loop_over_seeds(gate, k, bias):
    z_SET = torch.randn(S, E, T, generator=gen(0))
    b_SE = torch.randn(S, E, generator=gen(1)) * 0.1 if bias else None
    out = fn.route(z_SET, k, 0.7, gate, aux_weight=0.1, z_weight=0.01, select_bias_E=b_SE)
    for s in range(S):
        one = fn.route(z_SET[s].T.contiguous(), k, 0.7, gate, 0.1, 0.01, None if b_SE is None else b_SE[s])
        assert torch.equal(out.idx_TK[s], one.idx_TK)
        assert torch.allclose(out.gates_TK[s], one.gates_TK, atol=1e-6)
        assert torch.allclose(out.probs_TE[s].T, one.probs_TE, atol=1e-6)
        assert torch.allclose(out.aux_loss[s], one.aux_loss, atol=1e-6)
        assert torch.allclose(switch_aux_loss(out.probs_TE, out.idx_TK)[s], switch_aux_loss(one.probs_TE, one.idx_TK))
        assert torch.allclose(z_loss(z_SET)[s], z_loss(z_SET[s].T))


def test_logits_with_a_seed_axis_equal_a_loop_over_seeds():
    x_STD = torch.randn(S, T, D, generator=gen(0))
    w_SED, b_SE = torch.randn(S, E, D, generator=gen(1)), torch.randn(S, E, generator=gen(2))
    w_SEFD = torch.randn(S, E, F, D, generator=gen(3))
    for s in range(S):
        assert torch.allclose(fn.linear_logits(w_SED, b_SE, x_STD)[s].T, fn.linear_logits(w_SED[s], b_SE[s], x_STD[s]),
                              atol=1e-5)
        assert torch.allclose(fn.cosine_logits(w_SED, x_STD)[s].T, fn.cosine_logits(w_SED[s], x_STD[s]), atol=1e-6)
        assert torch.allclose(fn.mpi_logits(w_SED, w_SEFD, x_STD, 0.5, 2)[s].T,
                              fn.mpi_logits(w_SED[s], w_SEFD[s], x_STD[s], 0.5, 2), atol=1e-5)


@pytest.mark.parametrize("mode,normalize", [("ema", False), ("cumulative", True)])
def test_kmeans_update_with_a_seed_axis_equals_a_loop_over_seeds(mode, normalize):
    x_STD = torch.randn(S, T, D, generator=gen(0))
    idx_STK = torch.randint(E, (S, T, K), generator=gen(1))
    C_SED, n_SE = torch.randn(S, E, D, generator=gen(2)), torch.rand(S, E, generator=gen(3)) * 5
    active_S = torch.tensor([True, False, True])
    C_all, n_all = C_SED.clone(), n_SE.clone()
    fn.kmeans_update(C_all, n_all, x_STD, idx_STK, mode, 0.3, normalize, active_S)
    for s in range(S):
        C_one, n_one = C_SED[s].clone(), n_SE[s].clone()
        if active_S[s]:
            fn.kmeans_update(C_one, n_one, x_STD[s], idx_STK[s], mode, 0.3, normalize)
        assert torch.allclose(C_all[s], C_one, atol=1e-6) and torch.allclose(n_all[s], n_one)
    # oracle of the single update: a loop over experts
    C, n = C_SED[0].clone(), n_SE[0].clone()
    fn.kmeans_update(C, n, x_STD[0], idx_STK[0], "ema", 0.3, False)
    for e in range(E):
        rows = x_STD[0][(idx_STK[0] == e).any(1).nonzero().flatten().repeat_interleave(
            (idx_STK[0] == e).sum(1)[(idx_STK[0] == e).any(1)])]
        want = C_SED[0, e] if len(rows) == 0 else 0.7 * C_SED[0, e] + 0.3 * rows.mean(0)
        assert torch.allclose(C[e], want, atol=1e-6), e


def test_loss_free_update_with_a_seed_axis_equals_a_loop_over_seeds():
    b_SE, c_SE = torch.randn(S, E, generator=gen(0)), torch.randint(0, 9, (S, E), generator=gen(1)).float()
    active_S = torch.tensor([True, True, False])
    b_all = loss_free_update(b_SE.clone(), c_SE, 0.01, active_S)
    for s in range(S):
        want = loss_free_update(b_SE[s].clone(), c_SE[s], 0.01) if active_S[s] else b_SE[s]
        assert torch.allclose(b_all[s], want, atol=1e-7)
        # the formula, by hand: b + γ sign(mean(c) − c), centred
        slow = b_SE[s] + 0.01 * torch.sign(c_SE[s].mean() - c_SE[s])
        assert torch.allclose(loss_free_update(b_SE[s].clone(), c_SE[s], 0.01), slow - slow.mean(), atol=1e-7)


def test_trainers_follow_the_declared_protocols():
    from moewidgets.multiseed import MultiSeedTrainer
    from moewidgets.train import LiveTrainer, SteppedTrainer
    run = RunConfig(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16, expert="relu"),
                    TaskConfig(d_in=8, d_out=8, n_train=64, n_probe=8), TrainConfig(steps=2, device="cpu"))
    assert isinstance(Trainer.from_config(run), LiveTrainer)
    ms = MultiSeedTrainer(run, [0, 1])
    assert isinstance(ms, SteppedTrainer) and not isinstance(ms, LiveTrainer)      # histories, not one history
    with pytest.raises(ValueError, match=r"expert='tanh' must be one of 'gelu', 'relu', 'swiglu'"):
        make_experts("tanh", 2, 4, 8)


def test_relu_through_the_geometry_and_the_chapter1_dashboard():
    from moewidgets.dashboards.chapter1 import Chapter1Dashboard
    from moewidgets.geometry.alignment import dense_pseudo_experts
    dense = make_experts("relu", 1, 4, 12, gen(0), dtype=torch.float64)
    pseudo = dense_pseudo_experts(dense, 3, generator=1)
    X = torch.randn(5, 4, dtype=torch.float64, generator=gen(2))
    assert pseudo.activation == "relu"
    assert torch.allclose(expert_jacobians(pseudo, X).sum(0), expert_jacobians(dense, X)[0])
    run = RunConfig(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16, expert="relu"),
                    TaskConfig(d_in=8, d_out=8, n_train=256, n_probe=64), TrainConfig(steps=20, device="cpu"))
    dash = Chapter1Dashboard(run, autostart=False)
    state = dash.run_sync()
    assert state.phase == "done" and state.error is None and state.probes is not None, dash.status
    assert state.trainer.model.layer.experts.activation == "relu"
