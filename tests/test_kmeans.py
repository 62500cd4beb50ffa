"""The online K-Means router (chapter 3, spec §1.7): invariants, update maths against a slow loop, config errors."""
from __future__ import annotations

import pytest
import torch

from moewidgets import MoEConfig, RunConfig, TaskConfig, TrainConfig, Trainer
from moewidgets.nn.layer import MoELayer
from moewidgets.nn.routers import KMeansRouter


def _x(T, D, seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _layer(**kw):
    cfg = MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=6, router="kmeans", **kw)
    return MoELayer(cfg, generator=torch.Generator().manual_seed(0))


def _state(router):
    return {k: v.clone() for k, v in router.state_dict().items()}


def test_no_learned_parameters():
    layer = _layer()
    assert list(layer.router.parameters()) == []
    names = [n for n, _ in layer.named_parameters()]
    assert names and all(n.startswith("experts.") for n in names)


def test_first_training_batch_initialises_from_distinct_tokens():
    layer = _layer()
    x = _x(16, 8)
    with pytest.raises(RuntimeError, match="not initialised"):
        layer.eval()(x)
    layer.train()
    route = layer.router(x)            # router alone: initialises, no update yet
    C = layer.router.centroids_ED
    rows = [int(torch.nonzero((x == C[i]).all(1)).flatten()[0]) for i in range(4)]
    assert len(set(rows)) == 4 and C.norm(dim=1).min() > 0
    assert route.idx_TK.shape == (16, 2)


def test_eval_leaves_state_untouched_and_training_moves_it():
    layer = _layer()
    x = _x(32, 8)
    layer.train()(x)
    before = _state(layer.router)
    layer.eval()
    for _ in range(3):
        layer(_x(32, 8, seed=2))
    with torch.no_grad():
        layer(_x(32, 8, seed=3))
    after = _state(layer.router)
    assert all(torch.equal(before[k], after[k]) for k in before)
    layer.train()(_x(32, 8, seed=4))
    assert not torch.equal(before["centroids_ED"], layer.router.centroids_ED)


@pytest.mark.parametrize("mode", ["ema", "cumulative"])
@pytest.mark.parametrize("normalize", [False, True])
def test_update_matches_a_slow_loop(mode, normalize):
    r = KMeansRouter(8, 4, k=2, mode=mode, rate=0.3, normalize=normalize, generator=torch.Generator().manual_seed(0))
    r.train()
    seen = {i: [] for i in range(4)}
    C = None
    for step in range(4):
        x = _x(10, 8, seed=10 + step)
        out = r(x)
        if C is None:
            C = r.centroids_ED.clone()
        r.update(x, out)
        xs = torch.nn.functional.normalize(x, dim=-1) if normalize else x
        for i in range(4):
            pts = [xs[t] for t in range(10) for s in range(2) if out.idx_TK[t, s] == i]
            if not pts:
                continue
            if mode == "ema":
                C[i] = 0.7 * C[i] + 0.3 * torch.stack(pts).mean(0)
            else:
                seen[i] += pts
                C[i] = torch.stack(seen[i]).mean(0)
        torch.testing.assert_close(r.centroids_ED, C, rtol=1e-5, atol=1e-6)


def test_scores_are_cosines_and_gradients_reach_x_unless_detached():
    for detach in (False, True):
        r = KMeansRouter(8, 4, k=2, detach=detach, generator=torch.Generator().manual_seed(0))
        x = _x(12, 8).requires_grad_(True)
        out = r(x)
        z = out.logits_TE.detach()
        expect = torch.nn.functional.normalize(x.detach(), dim=-1) @ torch.nn.functional.normalize(
            r.centroids_ED, dim=-1).T
        torch.testing.assert_close(z, expect)
        if detach:
            assert not out.probs_TE.requires_grad
        else:
            (out.probs_TE[:, 0]).sum().backward()
            assert float(x.grad.abs().max()) > 0


def test_loss_free_bias_only_selects():
    layer = _layer(lf_rate=0.05, gate="softmax")
    layer.train()
    x = _x(64, 8)
    layer(x)
    layer.lf_bias_E.copy_(torch.tensor([1.0, 0.0, 0.0, -1.0]))
    out = layer.route(x)
    assert (out.idx_TK == 0).any(1).all()            # the bias forces expert 0 into every top-2
    p = out.probs_TE.gather(1, out.idx_TK)
    torch.testing.assert_close(out.gates_TK, p)      # gate values never include the bias


def test_state_dict_round_trip_routes_the_same():
    a = _layer()
    a.train()(_x(32, 8))
    b = _layer()
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = _x(20, 8, seed=5)
    assert torch.equal(a.route(x).idx_TK, b.route(x).idx_TK)


def test_trainer_is_seeded_and_reports_no_dead_division():
    run = RunConfig(model=MoEConfig(router="kmeans", gate="renorm", lf_rate=1e-3),
                    task=TaskConfig(n_train=1024, n_probe=128), train=TrainConfig(steps=20, device="cpu"))
    t1, t2 = Trainer.from_config(run), Trainer.from_config(run)
    t1.step(20), t2.step(20)
    assert t1.history.loss == t2.history.loss
    assert t1.evaluate() == t2.evaluate()


@pytest.mark.parametrize("field,value,match", [
    ("kmeans_rate", 0.0, r"kmeans_rate=0.0 must be > 0"),
    ("kmeans_rate", 1.5, r"kmeans_rate=1.5 must be in \(0, 1\]"),
    ("kmeans_rate", -0.1, r"kmeans_rate=-0.1 must be > 0"),
    ("kmeans_mode", "median", r"kmeans_mode='median' must be one of 'ema', 'cumulative'"),
    ("kmeans_normalize", 1, r"kmeans_normalize=1 must be True or False"),
    ("aux_weight", -0.01, r"aux_weight=-0.01 must be >= 0"),
    ("z_weight", -1.0, r"z_weight=-1.0 must be >= 0"),
    ("lf_rate", -1e-3, r"lf_rate=-0.001 must be >= 0"),
    ("router", "knn", r"router='knn' must be one of 'softmax', 'kmeans', 'mpi'"),
])
def test_bad_config_fails_at_config_time(field, value, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{"router": "kmeans", field: value})


def test_too_small_first_batch_is_a_clear_error():
    r = KMeansRouter(8, 4, k=2)
    with pytest.raises(ValueError, match="T=3 tokens"):
        r(_x(3, 8))
