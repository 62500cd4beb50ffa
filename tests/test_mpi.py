"""The Manifold Power Iteration router (chapter 4) and the router-to-singular-vector metrics, against numpy and a
per-token loop, in float64."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moewidgets as mw
from moewidgets.geometry import (power_iterate, power_step, random_direction_lambda, riemannian_ascent_step,
                                 row_alignment, top_singular)
from moewidgets.nn import MoELayer, MPIRouter, make_router
from moewidgets.nn.experts import GELUExperts, SwiGLUExperts
from moewidgets.nn.routers import input_side_weights, mpi_rows

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the power step as Riemannian steepest ascent

@pytest.mark.parametrize("D,H,C", [(8, 16, 1.0), (32, 8, 0.3), (64, 128, 2.5)])
def test_power_step_is_the_retracted_riemannian_ascent_step(D, H, C):
    g = _gen(D + H)
    for _ in range(5):
        w = torch.randn(H, D, generator=g, dtype=F64)
        M = w.T @ w
        r = torch.randn(D, generator=g, dtype=F64)
        r = C * r / r.norm()
        a, b = riemannian_ascent_step(r, M, C), power_step(r, M, C)
        assert (a - b).abs().max() < 1e-12 * C
        # the step ascends the Rayleigh quotient
        assert float(b @ M @ b) >= float(r @ M @ r) - 1e-12


def test_power_iteration_converges_to_numpy_top_singular_vector_at_the_predicted_rate():
    g = _gen(0)
    D = 12
    # a spectrum with a clear gap: σ = 1, 0.8, then ≤ 0.5; the error shrinks by (σ2/σ1)² = 0.64 per step
    U, _ = torch.linalg.qr(torch.randn(20, D, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    s = torch.tensor([1.0, 0.8] + list(np.linspace(0.5, 0.1, D - 2)), dtype=F64)
    w = U @ torch.diag(s) @ V.T
    v1 = torch.from_numpy(np.linalg.svd(w.numpy())[2][0])
    r = torch.randn(D, generator=g, dtype=F64)
    it = power_iterate(r, w.T @ w, 1.0, 60)
    cos = (it @ v1).abs()
    assert cos[-1] > 1 - 1e-10
    err = (it - (it @ v1)[:, None] * v1).norm(dim=1) / cos        # tan of the angle to v1 (‖r‖ = 1)
    ratio = err[11:31] / err[10:30]                               # before it reaches float64 round-off
    assert torch.allclose(ratio, torch.full_like(ratio, 0.64), atol=0.01)   # (σ2/σ1)^(2t) after the transient
    # and the metrics agree with numpy
    s_np = np.linalg.svd(w.numpy(), compute_uv=False)
    s_t, v_t = top_singular(w[None])
    assert np.allclose(s_t[0].numpy(), s_np) and abs(abs(float(v_t[0] @ v1)) - 1) < 1e-12


def test_mpi_rows_iterate_the_power_step_per_expert():
    g = _gen(1)
    E, F, D = 3, 10, 6
    w = torch.randn(E, F, D, generator=g, dtype=F64)
    r = torch.randn(E, D, generator=g, dtype=F64)
    for steps in (1, 3):
        out = mpi_rows(r, w, 0.7, steps)
        for i in range(E):
            ref = r[i]
            for _ in range(steps):
                ref = power_step(ref, w[i].T @ w[i], 0.7)
            assert (out[i] - ref).abs().max() < 1e-12


# ---------------------------------------------------------------- metrics

def test_row_alignment_matches_a_loop_and_its_bounds():
    g = _gen(2)
    E, F, D = 4, 16, 8
    w = torch.randn(E, F, D, generator=g, dtype=F64)
    r = torch.randn(E, D, generator=g, dtype=F64)
    a = row_alignment(w, r)
    for i in range(E):
        u, s, vt = np.linalg.svd(w[i].numpy())
        lam = np.linalg.norm(w[i].numpy() @ r[i].numpy()) ** 2 / (np.linalg.norm(r[i].numpy()) ** 2 * s[0] ** 2)
        cos = abs(vt[0] @ r[i].numpy()) / np.linalg.norm(r[i].numpy())
        assert math.isclose(float(a.lam[i]), lam, rel_tol=1e-12)
        assert math.isclose(float(a.cos[i]), cos, rel_tol=1e-10)
        assert math.isclose(float(a.angle_deg[i]), math.degrees(math.acos(cos)), abs_tol=1e-8)
        assert math.isclose(float(a.gap[i]), s[0] / s[1], rel_tol=1e-12)
    assert ((a.lam >= 0) & (a.lam <= 1)).all() and torch.allclose(a.sqrt_lam ** 2, a.lam)
    # v1 itself: λ = 1, cos = 1, angle 0
    _, v1 = top_singular(w)
    b = row_alignment(w, 3 * v1)
    assert torch.allclose(b.lam, torch.ones(E, dtype=F64)) and b.angle_deg.max() < 1e-6
    # the null: mean λ over random directions
    many = torch.randn(20000, D, generator=g, dtype=F64)
    lam0 = (many @ w[0].T).square().sum(1) / (many.square().sum(1) * torch.linalg.matrix_norm(w[0], 2) ** 2)
    assert abs(float(lam0.mean()) - float(random_direction_lambda(w)[0])) < 0.01
    with pytest.raises(ValueError, match="must be \\(E, F, D\\) and \\(E, D\\)"):
        row_alignment(w, r[:, :3])


def test_one_power_step_raises_lambda_on_gaussian_experts():
    """Spec §2.7 / MPI-c: λ(random r) ≈ 0.35, λ(one power step) ≈ 0.65 at D=64, H=128; |cos| stays small."""
    g = _gen(3)
    w = torch.randn(64, 128, 64, generator=g, dtype=F64)
    r = torch.randn(64, 64, generator=g, dtype=F64)
    plain, mpi = row_alignment(w, r), row_alignment(w, mpi_rows(r, w, 1.0))
    assert 0.3 < float(plain.lam.mean()) < 0.4 and 0.6 < float(mpi.lam.mean()) < 0.7
    assert float(mpi.cos.mean()) < 0.4


# ---------------------------------------------------------------- the router

def _layer(expert="gelu", gate="softmax", E=4, k=2, D=6, F=5, steps=1, detach=False, scale=1.5, seed=0):
    cfg = mw.MoEConfig(n_experts=E, k=k, d_model=D, d_hidden=F, expert=expert, gate=gate, router="mpi",
                       mpi_scale=scale, mpi_steps=steps, mpi_detach=detach, aux_weight=0.01, z_weight=0.001)
    return MoELayer(cfg, _gen(seed), dtype=F64)


@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
@pytest.mark.parametrize("steps", [1, 3])
def test_row_norms_equal_C_and_R_is_never_overwritten(expert, steps):
    layer = _layer(expert, steps=steps, E=8)
    router = layer.router
    assert isinstance(router, MPIRouter)
    w = input_side_weights(layer.experts)
    assert w is (layer.experts.w_in_EFD if expert == "gelu" else layer.experts.w_gate_EFD)
    C = 1.5 / math.sqrt(8)
    rows = router.effective_rows_ED()
    assert torch.allclose(rows.norm(dim=1), torch.full((8,), C, dtype=F64), atol=1e-12)
    r_before = router.r_ED.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(32, 6, generator=_gen(4), dtype=F64)
    for _ in range(3):
        opt.zero_grad()
        out = layer(x)
        (out.y_TD.square().mean() + out.aux_loss).backward()
        opt.step()
    # R moved only by its gradient (an SGD step), never replaced by R'
    assert not torch.allclose(router.r_ED, r_before)
    assert not torch.allclose(router.r_ED.norm(dim=1), torch.full((8,), C, dtype=F64))
    assert torch.allclose(router.effective_rows_ED().norm(dim=1), torch.full((8,), C, dtype=F64), atol=1e-12)
    # the bank's parameters are not registered twice
    names = [n for n, _ in layer.named_parameters()]
    assert sum(n.startswith("router.") for n in names) == 1


@pytest.mark.parametrize("gate", ["softmax", "renorm"])
def test_precomputed_rows_give_the_training_logits(gate):
    layer = _layer(gate=gate)
    x = torch.randn(20, 6, generator=_gen(5), dtype=F64)
    train_out = layer.router(x)
    layer.eval()
    frozen = layer.router.precompute()
    assert not frozen.requires_grad
    inf_out = layer.router(x)
    assert torch.allclose(inf_out.logits_TE, train_out.logits_TE, atol=1e-12, rtol=0)
    assert torch.equal(inf_out.idx_TK, train_out.idx_TK)
    assert torch.allclose(inf_out.gates_TK, train_out.gates_TK, atol=1e-12)
    # the precomputed router is exactly a linear router with rows R'
    assert torch.allclose(inf_out.logits_TE, x @ frozen.T, atol=0)
    layer.train()
    with pytest.raises(RuntimeError, match="call router.thaw\\(\\) before training"):
        layer(x)
    layer.router.thaw()
    assert layer(x).y_TD.shape == (20, 6)


@pytest.mark.parametrize("detach", [False, True])
def test_gradients_reach_R_and_unless_detached_W(detach):
    layer = _layer(detach=detach, k=4)     # k = E: the task loss touches every expert through the gates
    x = torch.randn(16, 6, generator=_gen(6), dtype=F64)
    # a loss through the router only (the logits), so any gradient on W came through the power step
    layer.router(x).logits_TE.square().sum().backward()
    assert layer.router.r_ED.grad is not None and layer.router.r_ED.grad.abs().max() > 0
    w_grad = layer.experts.w_in_EFD.grad
    if detach:
        assert w_grad is None or w_grad.abs().max() == 0
    else:
        assert w_grad is not None and w_grad.abs().max() > 0


def test_gradient_into_R_matches_the_closed_form():
    """∂L/∂R_i = (C/‖R̂_i‖) (∂L/∂R'_i)(I − φ_iᵀ φ_i) M_i (spec §2.5)."""
    g = _gen(7)
    E, F, D, C = 3, 7, 5, 0.8
    w = torch.randn(E, F, D, generator=g, dtype=F64)
    r = torch.randn(E, D, generator=g, dtype=F64, requires_grad=True)
    up = torch.randn(E, D, generator=g, dtype=F64)
    (mpi_rows(r, w, C) * up).sum().backward()
    for i in range(E):
        M = w[i].T @ w[i]
        rh = r[i].detach() @ M
        phi = rh / rh.norm()
        expect = C / rh.norm() * up[i] @ (torch.eye(D, dtype=F64) - torch.outer(phi, phi)) @ M
        assert torch.allclose(r.grad[i], expect, atol=1e-12)


@pytest.mark.parametrize("dispatch", ["dense", "gather"])
@pytest.mark.parametrize("expert,gate,k", [("gelu", "softmax", 2), ("swiglu", "renorm", 2), ("gelu", "renorm", 1),
                                           ("swiglu", "softmax", 4)])
def test_mpi_layer_matches_the_per_token_loop(dispatch, expert, gate, k):
    cfg = mw.MoEConfig(n_experts=4, k=k, d_model=6, d_hidden=5, expert=expert, gate=gate, router="mpi",
                       mpi_scale=2.0)
    x = torch.randn(9, 6, generator=_gen(8), dtype=F64)
    fast = MoELayer(cfg, _gen(9), dispatch=dispatch, dtype=F64)
    slow = MoELayer(cfg, _gen(9), dispatch=dispatch, dtype=F64)
    slow.load_state_dict(fast.state_dict())
    y_fast, y_slow = fast(x).y_TD, slow.per_token_reference(x)
    assert torch.allclose(y_fast, y_slow, atol=1e-12)
    up = torch.randn_like(y_fast)
    (y_fast * up).sum().backward()
    (y_slow * up).sum().backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-11), n
    # renorm at k = 1 gives the router no gradient at all (chapter 1); otherwise R learns
    assert (fast.router.r_ED.grad.abs().max() > 0) == (not (gate == "renorm" and k == 1))


def test_mpi_and_softmax_models_of_one_seed_start_from_the_same_R_and_experts():
    a = mw.build_model(mw.MoEConfig(seed=3))
    b = mw.build_model(mw.MoEConfig(seed=3, router="mpi"))
    assert torch.equal(a.layer.router.w_ED, b.layer.router.r_ED)
    assert torch.equal(a.layer.experts.w_in_EFD, b.layer.experts.w_in_EFD)
    assert torch.equal(a.w_ro_OD, b.w_ro_OD)


def test_trainer_trains_an_mpi_model_and_deepcopy_keeps_the_bank_reference():
    import copy
    run = mw.RunConfig(model=mw.MoEConfig(router="mpi", d_model=8, d_hidden=8, n_experts=4),
                       task=mw.TaskConfig(d_in=8, d_out=8, n_train=256, n_probe=32),
                       train=mw.TrainConfig(steps=20, batch_size=32, device="cpu"))
    tr = mw.Trainer.from_config(run)
    tr.run()
    assert tr.history.loss[-1] < tr.history.loss[0]
    clone = copy.deepcopy(tr.model)
    assert clone.layer.router.experts is clone.layer.experts


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,message", [
    ("mpi_scale", 0.0, "MoEConfig.mpi_scale=0.0 must be > 0"),
    ("mpi_scale", float("inf"), "MoEConfig.mpi_scale=inf must be a finite number"),
    ("mpi_steps", 0, "MoEConfig.mpi_steps=0 must be in 1..100"),
    ("mpi_steps", 1.5, "MoEConfig.mpi_steps=1.5 must be an integer"),
    ("mpi_detach", "yes", "MoEConfig.mpi_detach='yes' must be True or False"),
])
def test_mpi_config_errors(field, value, message):
    with pytest.raises(ValueError) as err:
        mw.MoEConfig(router="mpi", **{field: value})
    assert str(err.value) == message


def test_mpi_config_json_round_trip_and_defaults():
    cfg = mw.MoEConfig(router="mpi", mpi_scale=2.0, mpi_steps=3, mpi_detach=True)
    assert mw.MoEConfig.from_json(cfg.to_json()) == cfg
    run = mw.RunConfig(model=cfg)
    assert mw.RunConfig.from_json(run.to_json()) == run
    old = {k: v for k, v in mw.MoEConfig().to_dict().items() if not k.startswith("mpi_")}
    assert mw.MoEConfig.from_dict(old) == mw.MoEConfig()      # configs written before chapter 4 still load
    d = mw.MoEConfig()
    assert (d.mpi_scale, d.mpi_steps, d.mpi_detach) == (1.0, 1, False)


def test_make_router_mpi_needs_the_experts():
    with pytest.raises(ValueError, match="needs experts="):
        make_router(mw.MoEConfig(router="mpi"))
    bank = SwiGLUExperts(4, 6, 5, _gen(0))
    with pytest.raises(ValueError, match="the router needs E=8, D=6"):
        MPIRouter(bank, 6, 8, 2)
    with pytest.raises(ValueError, match="power_steps=0 must be an integer >= 1"):
        MPIRouter(GELUExperts(4, 6, 5, _gen(0)), 6, 4, 2, power_steps=0)


def test_docstring_examples_of_the_mpi_metrics():
    import doctest
    import importlib
    for name in ("moewidgets.geometry.mpi", "moewidgets.nn.routers"):
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        result = doctest.testmod(importlib.import_module(name), optionflags=flags)
        assert result.failed == 0, name


def test_chapter4_claim_run_definitions():
    from moewidgets import reproduce as rp
    jobs = rp.chapter4_jobs(5)
    assert len(jobs) == 4 * 2 + 5 and sum(j.n_rows for j in jobs) == 4 * 5 * 2 + 5   # seed groups + timing jobs
    assert all(j.seeds == tuple(range(5)) for j in jobs if j.arm != "timing")
    assert {j.arm for j in jobs} == {"softmax", "mpi", "mpi-10", "mpi-detach", "softmax:4x", "mpi:4x", "mpi-10:4x",
                                     "mpi-detach:4x", "timing"}
    run = rp.chapter4_run("mpi-10", 3, steps_factor=4)
    assert (run.model.router, run.model.mpi_steps, run.model.seed, run.train.steps) == ("mpi", 10, 3, 4000)
    assert rp.chapter4_run("softmax", 0).model.replace(router="mpi") == rp.chapter4_run("mpi", 0).model
    with pytest.raises(ValueError, match="arm='x' must be one of"):
        rp.chapter4_run("x", 0)
    with pytest.raises(ValueError, match="chapter='chapter9' must be one of"):
        rp.reproduce("chapter9")


def test_chapter4_claims_render_from_the_committed_rows():
    from moewidgets import reproduce as rp
    try:
        rows = rp.load_results("chapter4")
    except FileNotFoundError:
        pytest.skip("book/results/chapter4.jsonl not written yet")
    claims = rp.chapter4_claims(rows)
    assert {c.claim for c in claims} == {f"MPI-{c}" for c in "abcdefghi"}
    assert all(c.n_seeds == rp.MIN_SEEDS_MLP for c in claims)          # make reproduce: SEEDS=10
    table = rp.claims_table(claims)
    assert table.count("\n") == len(claims) + 1


def test_chapter4_pinned_subset_matches_committed_rows():
    """Seed 0 of the MPI arm re-run live within 2 % of the committed row (1 thread; same machine kind → identical)."""
    from moewidgets import reproduce as rp
    try:
        rows = rp.load_results("chapter4")
    except FileNotFoundError:
        pytest.skip("book/results/chapter4.jsonl not written yet")
    (check,) = rp.pinned_subset(rows, arms=["mpi"], chapter="chapter4")
    assert check.ok, f"{check.worst_metric} deviates by {check.max_rel_dev:.2%} from the committed row"
