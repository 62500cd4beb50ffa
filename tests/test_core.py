"""Core: configs, the MoE layer against a per-token loop, routers, balancing, trainer determinism."""
from __future__ import annotations

import json
import math

import pytest
import torch

import moewidgets as mw
from moewidgets.balance import loss_free_update, max_violation, switch_aux_loss, z_loss
from moewidgets.nn import MoELayer, SoftmaxRouter, choose_dispatch, select_topk
from moewidgets.nn.experts import ragged_available


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("field,value,message", [
    ("k", 9, "MoEConfig.k=9 must be in 1..n_experts=8"),
    ("k", 0, "MoEConfig.k=0 must be in 1..n_experts=8"),
    ("temperature", 0.0, "MoEConfig.temperature=0.0 must be > 0"),
    ("temperature", float("nan"), "MoEConfig.temperature=nan must be a finite number"),
    ("aux_weight", -0.1, "MoEConfig.aux_weight=-0.1 must be >= 0"),
    ("lf_rate", -1e-3, "MoEConfig.lf_rate=-0.001 must be >= 0"),
    ("router", "hash", "MoEConfig.router='hash' must be one of 'softmax', 'kmeans', 'mpi'"),
    ("gate", "sum", "MoEConfig.gate='sum' must be one of 'softmax', 'renorm'"),
    ("expert", "tanh", "MoEConfig.expert='tanh' must be one of 'gelu', 'relu', 'swiglu'"),
    ("n_experts", 2.5, "MoEConfig.n_experts=2.5 must be an integer"),
    ("arch", "sparse", "MoEConfig.arch='sparse' must be one of 'moe', 'dense', 'dense_active'"),
])
def test_config_errors_name_field_value_and_range(field, value, message):
    with pytest.raises(ValueError) as err:
        mw.MoEConfig(**{field: value})
    assert str(err.value) == message


def test_train_and_run_config_errors():
    with pytest.raises(ValueError, match=r"TrainConfig.lr=0 must be > 0"):
        mw.TrainConfig(lr=0)
    with pytest.raises(ValueError, match=r"TrainConfig.device='tpu'"):
        mw.TrainConfig(device="tpu")
    with pytest.raises(ValueError, match=r"task.d_in=16 must equal model.d_model=32"):
        mw.RunConfig(task=mw.TaskConfig(d_in=16))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['topk'\]"):
        mw.MoEConfig.from_dict({"topk": 2})


def test_config_json_round_trip():
    run = mw.RunConfig(model=mw.MoEConfig(n_experts=4, k=1, temperature=0.5, gate="renorm", aux_weight=0.01),
                       train=mw.TrainConfig(steps=7))
    assert mw.RunConfig.from_json(run.to_json()) == run
    assert json.loads(run.to_json())["model"]["gate"] == "renorm"
    cfg = mw.MoEConfig(seed=3)
    assert mw.MoEConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(Exception):
        cfg.k = 3  # frozen


def test_dense_capacity_matching():
    assert mw.MoEConfig(arch="dense", n_experts=8, k=2, d_hidden=64).dense_hidden == 512
    assert mw.MoEConfig(arch="dense_active", n_experts=8, k=2, d_hidden=64).dense_hidden == 128
    m = mw.build_model(mw.MoEConfig(arch="dense"))
    assert m.layer.experts.w_in_EFD.shape == (1, 512, 32)


# ---------------------------------------------------------------- layer vs per-token oracle

def _layer(E, k, expert, gate, lf, seed=0, dispatch="auto"):
    cfg = mw.MoEConfig(n_experts=E, k=k, d_model=6, d_hidden=5, expert=expert, gate=gate, temperature=0.7,
                       lf_rate=1e-3 if lf else 0.0, aux_weight=0.1, z_weight=0.01)
    layer = MoELayer(cfg, torch.Generator().manual_seed(seed), dispatch=dispatch, dtype=torch.float64)
    with torch.no_grad():
        layer.router.b_E.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        if lf:
            layer.lf_bias_E.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 2))
    return layer


@pytest.mark.parametrize("dispatch", ["dense", "gather"])
@pytest.mark.parametrize("expert", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("gate", ["softmax", "renorm"])
@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (5, 3), (4, 4)])
@pytest.mark.parametrize("lf", [False, True])
def test_dispatch_matches_per_token_loop_values_and_grads(dispatch, expert, gate, E, k, lf):
    layer = _layer(E, k, expert, gate, lf, dispatch=dispatch)
    x = torch.randn(13, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def grads(fn):
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        out = fn()
        (out * w).sum().backward()
        return out.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                              for p in layer.parameters()], x.grad.clone()

    fast, g_fast, gx_fast = grads(lambda: layer(x).y_TD)
    slow, g_slow, gx_slow = grads(lambda: layer.per_token_reference(x))
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)
    torch.testing.assert_close(gx_fast, gx_slow, atol=1e-10, rtol=0)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.skipif(not ragged_available("cpu", 8, 12), reason="torch.nn.functional.grouped_mm not available")
@pytest.mark.parametrize("expert", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("gate", ["softmax", "renorm"])
@pytest.mark.parametrize("E,k,T", [(4, 2, 13), (6, 1, 5), (4, 4, 9)])          # (6, 1, 5): experts with no token
def test_ragged_gather_matches_padded_and_the_per_token_loop_float32(expert, gate, E, k, T):
    """The CPU float32 gather path (unpadded grouped_mm) against the padded one and the per-token loop."""
    cfg = mw.MoEConfig(n_experts=E, k=k, d_model=8, d_hidden=12, expert=expert, gate=gate, temperature=0.7,
                       aux_weight=0.1)
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    w = torch.randn(T, 8, generator=torch.Generator().manual_seed(6))
    results = []
    for ragged, fn in ((True, "layer"), (False, "layer"), (False, "loop")):
        layer = MoELayer(cfg, torch.Generator().manual_seed(0), dispatch="gather", ragged=ragged)
        x.grad = None
        out = layer(x).y_TD if fn == "layer" else layer.per_token_reference(x)
        (out * w).sum().backward()
        results.append([out.detach(), x.grad.clone()]
                       + [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()])
    assert MoELayer(cfg).ragged is None
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_choose_dispatch_by_size():
    assert choose_dispatch(256, 8, 8, 32, 64) == "dense"      # soft: nothing wasted
    assert choose_dispatch(64, 4, 2, 32, 64) == "dense"       # tiny: op count dominates
    assert choose_dispatch(2048, 16, 1, 64, 128) == "gather"  # big and sparse


def test_trace_contract_and_soft_gate_matrix():
    layer = _layer(4, 4, "gelu", "softmax", False)
    x = torch.randn(9, 6, dtype=torch.float64)
    tr = mw.trace_layer(layer, x, with_expert_outputs=True)
    assert tr.idx_TK.shape == (9, 4) and tr.expert_out_TKD.shape == (9, 4, 6)
    torch.testing.assert_close(tr.gate_matrix(), tr.probs_TE)           # soft + "softmax": gates are p
    torch.testing.assert_close(tr.loads(), torch.full((4,), 0.25, dtype=torch.float64))
    # expert outputs are the ungated outputs of the selected experts
    e = int(tr.idx_TK[2, 1])
    torch.testing.assert_close(tr.expert_out_TKD[2, 1], layer.experts.expert_output(e, x[2:3])[0])
    dense = mw.trace_layer(mw.make_layer(mw.MoEConfig(arch="dense")), torch.randn(5, 32))
    assert dense.n_experts == 1 and bool((dense.gates_TK == 1).all())


# ---------------------------------------------------------------- routers

def test_topk_selection_bias_never_enters_gates():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    bias = torch.tensor([0.0, 0.0, 0.4])
    gates, idx = select_topk(probs, 1, "softmax", bias)
    assert idx.tolist() == [[2], [2]]
    torch.testing.assert_close(gates, torch.tensor([[0.2], [0.7]]))
    gates, idx = select_topk(probs, 2, "renorm")
    torch.testing.assert_close(gates.sum(-1), torch.ones(2))


@pytest.mark.parametrize("gate,expect_grad", [("softmax", True), ("renorm", False)])
def test_router_gradient_at_k1_depends_on_gate_convention(gate, expect_grad):
    cfg = mw.MoEConfig(n_experts=4, k=1, d_model=6, d_hidden=5, gate=gate)
    layer = MoELayer(cfg, torch.Generator().manual_seed(0), dtype=torch.float64)
    layer(torch.randn(8, 6, dtype=torch.float64)).y_TD.sum().backward()
    has = layer.router.w_ED.grad is not None and layer.router.w_ED.grad.abs().sum() > 0   # exactly 0 under renorm
    assert bool(has) == expect_grad


def test_temperature_sharpens():
    r = SoftmaxRouter(6, 4, k=4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    ent = []
    for tau in (0.25, 1.0, 4.0):
        r.temperature = tau
        p = r(x).probs_TE.detach()
        ent.append(float(-(p * p.log()).sum(-1).mean()))
    assert ent[0] < ent[1] < ent[2]


# ---------------------------------------------------------------- balancing

def test_switch_aux_loss_is_one_at_balance_and_matches_loop():
    E, T, k = 4, 8, 2
    probs = torch.full((T, E), 1 / E)
    idx = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    assert float(switch_aux_loss(probs, idx)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(T, E, generator=g), -1)
    idx = torch.topk(probs, k).indices
    f = [sum(int(idx[t, s] == i) for t in range(T) for s in range(k)) / (T * k) for i in range(E)]
    P = [float(probs[:, i].mean()) for i in range(E)]
    assert float(switch_aux_loss(probs, idx)) == pytest.approx(E * sum(a * b for a, b in zip(f, P)))


def test_z_loss_and_loss_free_update_and_maxvio():
    logits = torch.tensor([[0.0, 0.0]])
    assert float(z_loss(logits)) == pytest.approx(math.log(2) ** 2)
    b = torch.zeros(3)
    loss_free_update(b, torch.tensor([10.0, 5.0, 0.0]), 1e-3)
    torch.testing.assert_close(b, torch.tensor([-1e-3, 0.0, 1e-3]))   # overloaded expert pushed down, centred
    assert max_violation(torch.tensor([2.0, 2.0, 2.0])) == 0.0
    assert max_violation(torch.tensor([4.0, 1.0, 1.0])) == pytest.approx(1.0)


def test_aux_weight_reaches_the_loss():
    run = mw.RunConfig(model=mw.MoEConfig(aux_weight=0.1), task=mw.TaskConfig(n_train=512, n_probe=64),
                       train=mw.TrainConfig(steps=3, device="cpu"))
    tr = mw.Trainer.from_config(run)
    tr.step(3)
    assert all(a >= 0.1 * 0.99 for a in tr.history.aux)   # α·(≥1 at any load... ≥ α·1 up to rounding)


# ---------------------------------------------------------------- trainer

def _small_run(**model):
    return mw.RunConfig(model=mw.MoEConfig(**model), task=mw.TaskConfig(n_train=1024, n_probe=128),
                        train=mw.TrainConfig(steps=30, device="cpu"))


def test_same_seed_is_bitwise_identical_and_seeds_differ():
    a = mw.Trainer.from_config(_small_run(seed=1))
    b = mw.Trainer.from_config(_small_run(seed=1))
    c = mw.Trainer.from_config(_small_run(seed=2))
    for t in (a, b, c):
        t.run()
    assert a.history.loss == b.history.loss
    assert a.history.loss != c.history.loss
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_training_reduces_loss_and_records_load():
    tr = mw.Trainer.from_config(_small_run(n_experts=4, k=2, lf_rate=1e-3))
    tr.run()
    assert tr.done and len(tr.history) == 30
    assert tr.history.loss[-1] < 0.7 * tr.history.loss[0]
    assert all(len(l) == 4 and abs(sum(l) - 1) < 1e-6 for l in tr.history.load)
    assert float(tr.model.layer.lf_bias_E.abs().sum()) > 0     # loss-free bias moved
    assert tr.evaluate() < tr.history.loss[0]


def test_non_finite_loss_stops_and_keeps_weights():
    run = _small_run().replace(train=mw.TrainConfig(steps=10, device="cpu", lr=1e-3))
    tr = mw.Trainer.from_config(run)
    tr.step(2)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.data.x_train[:] = float("nan")
    with pytest.raises(mw.NonFiniteLossError, match="loss became nan at step 3"):
        tr.step(1)
    assert tr.steps_done == 2
    assert all(torch.equal(p, q) for p, q in zip(before, tr.model.parameters()))


def test_task_is_seeded_and_clustered():
    a, b = mw.make_task(mw.TaskConfig(n_train=256), 0), mw.make_task(mw.TaskConfig(n_train=256), 0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_probe, b.y_probe)
    assert not torch.equal(a.x_train, mw.make_task(mw.TaskConfig(n_train=256), 1).x_train)
    assert set(a.c_train.tolist()) <= set(range(8))


def test_resolve_device():
    assert mw.resolve_device("cpu").type == "cpu"
    assert mw.resolve_device("auto").type in ("cpu", "cuda", "mps")
