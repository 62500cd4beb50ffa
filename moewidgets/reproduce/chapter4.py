"""Chapter 4's claim runs (the Manifold Power Iteration router, MPI-a … MPI-i): arms, jobs, verdicts.

``python -m moewidgets reproduce chapter4`` writes ``book/results/chapter4.jsonl`` (the seeds of an arm trained at
once, one seed group, :class:`~moewidgets.multiseed.MultiSeedTrainer`); chapter 4
(book/chapter4.ipynb) renders :func:`chapter4_claims` from it and re-runs seed 0 of every arm live.

The paper: Wu, Lv, Xie, Lin, "Redesign Mixture-of-Experts Routers with Manifold Power Iteration" (arXiv 2606.12397);
only its abstract and official code could be read, so the claims MPI-a … MPI-i are the course's small-scale phrasing
of it. The alignment score ψ (the metric key ``lam``; the paper calls its metric λ) is our reading:
ψ_i = ‖W_i r_i‖² / (‖r_i‖² σ1(W_i)²) ∈ [0, 1] (:func:`moewidgets.geometry.mpi.row_alignment`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import MoEConfig, RunConfig, TaskConfig, TrainConfig
from ..sweep import Job
from ..train import torch_threads
from .common import (_with_init_views, PROBE_POINTS, ClaimResult, ClaimSpec, _by_arm, _compare, _shifted,
                     _training_moved, _versus_constant, one_seed, seed_group_job, seed_range, seed_results,
                     train_seed_group)

_REF = "router-coupling-and-mpi.md §2.10"
#: The paper's training-throughput cost of the power step (0.2 % on an 11B model), the threshold of claim MPI-h.
MPI_H_OVERHEAD = 0.002

__all__ = ["CHAPTER4_ARMS", "CHAPTER4_TRAIN", "chapter4_run", "chapter4_job", "chapter4_seeds_job",
           "chapter4_timing_job",
           "chapter4_jobs", "chapter4_claims", "PINNED_METRICS_CH4", "CLAIMS", "MPI_H_OVERHEAD"]


# The arms of chapter 4 (MLP-MoE of chapter 1: E = 8, k = 2, D = 32, m = 64 GELU experts; gate "renorm" as in the
# official MPI code; Switch aux loss α = 0.01 for every arm, which the official code computes for both routers;
# C' = 1): sizes scaled to a CPU (ours).
CHAPTER4_ARMS: dict[str, dict[str, Any]] = {
    "softmax": {"router": "softmax"},                       # the plain linear router
    "mpi": {"router": "mpi"},                               # official: 1 power step, W not detached
    "mpi-10": {"router": "mpi", "mpi_steps": 10},           # MPI-g: 10 power steps per forward
    "mpi-detach": {"router": "mpi", "mpi_detach": True},    # MPI-i: stop-gradient into W in the power step
}
CHAPTER4_TRAIN = TrainConfig(steps=1000, batch_size=256, lr=1e-2, schedule="cosine", device="cpu")
CHAPTER4_TRACK_EVERY = 100      # alignment recorded every 100 steps (the trajectories in the chapter)


def chapter4_run(arm: str, seed: int, steps_factor: int = 1) -> RunConfig:
    """The :class:`~moewidgets.config.RunConfig` of one chapter-4 arm and seed (``steps_factor=4``: convergence)."""
    if arm not in CHAPTER4_ARMS:
        raise ValueError(f"arm={arm!r} must be one of {list(CHAPTER4_ARMS)}")
    model = MoEConfig(n_experts=8, k=2, d_model=32, d_hidden=64, gate="renorm", aux_weight=0.01,
                      seed=seed).replace(**CHAPTER4_ARMS[arm])
    train = CHAPTER4_TRAIN.replace(steps=CHAPTER4_TRAIN.steps * steps_factor)
    return RunConfig(model=model, task=TaskConfig(), train=train)


def _alignment(model) -> dict[str, float]:
    """ψ, √ψ, cos, angle, σ1/σ2 and row norms of the routing rows (softmax: w_ED; MPI: the effective R')."""
    from ..geometry.mpi import row_alignment
    from ..nn.routers import input_side_weights
    layer = model.layer
    with torch.no_grad():
        return row_alignment(input_side_weights(layer.experts), layer.router.effective_rows_ED()).summary()


def _mpi_exact_checks(model, data, seed: int) -> dict[str, float]:
    """MPI-a, MPI-b, MPI-e (row norms) and MPI-h (precomputed logits) on one trained MPI model (float64 where
    the claim is an identity)."""
    from ..geometry.mpi import power_iterate, riemannian_ascent_step, power_step, top_singular
    from ..nn.routers import input_side_weights
    layer, out = model.layer, {}
    router = layer.router
    w_EFD = input_side_weights(layer.experts).detach().to(torch.float64)
    # MPI-a: the retracted Riemannian step equals the power step, on this model's own experts and rows
    C = router.row_norm
    r_ED = router.r_ED.detach().to(torch.float64)
    errs = []
    for i in range(w_EFD.shape[0]):
        M = w_EFD[i].T @ w_EFD[i]
        r = C * r_ED[i] / r_ED[i].norm()
        errs.append(float((riemannian_ascent_step(r, M, C) - power_step(r, M, C)).abs().max() / C))
    out["identity_err"] = max(errs)
    # MPI-b: 200 power steps reach v1 where σ2/σ1 < 0.9; the per-step error ratio is (σ2/σ1)²
    s_EJ, v1_ED = top_singular(w_EFD)
    cos_min, rate_err, n = 1.0, 0.0, 0
    for i in range(w_EFD.shape[0]):
        ratio = float(s_EJ[i, 1] / s_EJ[i, 0])
        if ratio >= 0.9:
            continue
        n += 1
        it = power_iterate(r_ED[i], w_EFD[i].T @ w_EFD[i], 1.0, 200)
        cos = (it @ v1_ED[i]).abs()
        cos_min = min(cos_min, float(cos[-1]))
        # the coefficient ratio c2/c1 along the top two right-singular vectors shrinks by exactly (σ2/σ1)² per
        # step (normalisation cancels); read it while both are above float64 round-off
        v2_D = torch.linalg.svd(w_EFD[i], full_matrices=False).Vh[1]
        c1_t, c2_t = (it @ v1_ED[i]).abs(), (it @ v2_D).abs()
        ok = c2_t > 1e-12 * c1_t
        step_ratio = (c2_t[1:] / c1_t[1:])[ok[1:] & ok[:-1]] / (c2_t[:-1] / c1_t[:-1])[ok[1:] & ok[:-1]]
        if len(step_ratio) >= 3:
            measured = float(step_ratio.median())
            rate_err = max(rate_err, abs(measured - ratio ** 2) / ratio ** 2)
    out["power_cos_min"], out["power_rate_err"], out["n_gap_experts"] = cos_min, rate_err, n
    # MPI-e: every effective row has norm C; MPI-h: precomputed R' gives the training logits
    with torch.no_grad():
        rows = router.effective_rows_ED()
        out["row_norm_err"] = float((rows.norm(dim=1) - C).abs().max() / C)
        x = data.x_probe[:PROBE_POINTS]
        z_train = router.logits(x)
        router.precompute()
        z_inf = router.logits(x)
        router.thaw()
        out["precompute_logit_err"] = float((z_train - z_inf).abs().max() / z_train.abs().max())
    return out


def _maxvio_global(model, data) -> float:
    from ..balance import expert_counts, max_violation
    from ..train import trace_model
    trace = trace_model(model, data.x_probe[:PROBE_POINTS])
    return max_violation(expert_counts(trace.idx_TK, model.cfg.n_experts))


def chapter4_seeds_job(payload: dict, seeds: list[int]) -> list[dict[str, Any]]:
    """Seeds ``seeds`` of one chapter-4 arm trained at once (:func:`~moewidgets.reproduce.common.train_seed_group`):
    alignment at init, train (alignment every 100 steps), then the metrics; one metrics dict per seed.
    ``step_ms`` is each seed's share of the group's training time per step.

    One torch thread (restored afterwards), so the numbers are machine-independent for a kind of machine."""
    from ..balance import max_violation
    converge_only = payload.get("converge_only", False)
    out: list[dict[str, Any]] = [{} for _ in seeds]
    tracks = [{"step": [], "lam": [], "cos": [], "angle_deg": [], "gap": []} for _ in seeds]

    def record(trainer) -> list[dict[str, float]]:
        alignments = [_alignment(model) for model in trainer.models()]
        for track, a in zip(tracks, alignments):
            track["step"].append(trainer.steps_done)
            for k in ("lam", "cos", "angle_deg", "gap"):
                track[k].append(a[k])
        return alignments

    def at_init(trainer) -> None:
        for m, a, model in zip(out, record(trainer), trainer.models()):
            m.update({f"init_{k}": v for k, v in a.items()})
            if trainer.cfg.router == "mpi":
                from ..geometry.mpi import row_alignment
                from ..nn.routers import input_side_weights
                with torch.no_grad():
                    raw = row_alignment(input_side_weights(model.layer.experts), model.layer.router.r_ED)
                m["init_raw_lam"] = float(raw.lam.mean())     # ψ of the trained parameter R itself

    with torch_threads(1):
        if converge_only:
            trainer = train_seed_group(payload, seeds)
        else:
            trainer = train_seed_group(payload, seeds, before=at_init, every=CHAPTER4_TRACK_EVERY, callback=record)
        for s, m, model, data, hist in seed_results(trainer, payload, seeds, out):
            m["step_ms"] = 1e3 * trainer.wall_s / len(seeds) / max(1, trainer.steps_done)
            if not converge_only:
                m.update(_alignment(model))
                m["maxvio_global"] = _maxvio_global(model, data)
                m["maxvio_batch"] = float(np.mean([max_violation(torch.tensor(ld)) for ld in hist.load]))
                m["track"] = tracks[s]
                if trainer.cfg.router == "mpi":
                    m.update(_mpi_exact_checks(model, data, seeds[s]))
    return out


def chapter4_job(payload: dict, seed: int) -> dict[str, Any]:
    """One (arm, seed) of chapter 4: :func:`chapter4_seeds_job` with the one seed (the pinned subset's re-run)."""
    return one_seed(chapter4_seeds_job, payload, seed)


def chapter4_timing_job(payload: dict, seed: int) -> dict[str, Any]:
    """MPI-g / MPI-h cost: forward + backward time of one training step (batch ``tokens``) of the softmax, MPI and
    MPI-10 models of one seed, **interleaved** (round-robin, ``rounds`` × ``steps`` each) in one process and one
    thread, so machine load hits all three alike. Returns median milliseconds per step and median per-round ratios.
    The cost of the power step does not depend on training, so the models are timed at initialisation."""
    import time
    from ..models import build_model
    with torch_threads(1):
        arms = ("softmax", "mpi", "mpi-10")
        models = {a: build_model(chapter4_run(a, seed).model, 32) for a in arms}
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(payload["tokens"], 32, generator=g) * 3
        y = torch.randn(payload["tokens"], 32, generator=g)

        def step(m):
            out = m(x)
            loss = (out.pred_TO - y).square().mean() + out.aux_loss
            m.zero_grad(set_to_none=True)
            loss.backward()

        for m in models.values():
            for _ in range(10):
                step(m)
        ms: dict[str, list[float]] = {a: [] for a in arms}
        for _ in range(payload["rounds"]):
            for a in arms:
                t0 = time.perf_counter()
                for _ in range(payload["steps"]):
                    step(models[a])
                ms[a].append(1e3 * (time.perf_counter() - t0) / payload["steps"])
        out = {f"{a}_ms": float(np.median(v)) for a, v in ms.items()}
        out["mpi_over_softmax"] = float(np.median(np.array(ms["mpi"]) / np.array(ms["softmax"])))
        out["mpi10_over_mpi"] = float(np.median(np.array(ms["mpi-10"]) / np.array(ms["mpi"])))
        out["_device"] = "cpu"
        return out


def chapter4_jobs(seeds: int = 10, arms: list[str] | None = None, converge: bool = True,
                  timing: bool = True, seed_start: int = 0) -> list[Job]:
    """The chapter-4 claim-run jobs: one seed group per arm (every seed at once), plus (``converge``) the
    4×-longer convergence runs (a group per arm) and
    (``timing``) one interleaved timing job per seed (:func:`chapter4_timing_job`); seeds ``seed_start`` …
    ``seed_start + seeds − 1``."""
    seeds = seed_range(seeds, seed_start)
    fn = "moewidgets.reproduce:chapter4_seeds_job"
    jobs = []
    for arm in arms or list(CHAPTER4_ARMS):
        jobs.append(seed_group_job(arm, fn, {"run": chapter4_run(arm, 0).to_dict()}, seeds))
        if converge:
            jobs.append(seed_group_job(arm + ":4x", fn, {"run": chapter4_run(arm, 0, 4).to_dict(),
                                                         "converge_only": True}, seeds))
    if timing:
        for seed in seeds:
            jobs.append(Job("timing", "moewidgets.reproduce:chapter4_timing_job",
                            {"tokens": 256, "rounds": 30, "steps": 10}, seed))
    return jobs



#: The claims chapter 4 tests, declared once (the ledger is generated from these).
CLAIMS: tuple[ClaimSpec, ...] = (
    ClaimSpec("MPI-a", "the MPI power step is a retracted Riemannian gradient step",
              "relative error between the two steps (float64)", "error − 1e-10 < 0", _REF),
    ClaimSpec("MPI-b", "repeated power steps reach the top singular vector at rate (σ2/σ1)²",
              "min |cos(r, v1)| after 200 steps; per-step rate error", "cos − 0.999 > 0; error − 1e-6 < 0", _REF),
    ClaimSpec("MPI-c", "at initialisation MPI rows align better with the experts than a plain router's",
              "alignment ψ(R'), |cos(R'_i, v1)| at init", "MPI − plain > 0", _REF),
    ClaimSpec("MPI-d", "the alignment gap survives training (≥ 0.2 in ψ)", "ψ(R'), |cos(R'_i, v1)| after training",
              "MPI − (plain + 0.2) > 0", _REF),
    ClaimSpec("MPI-e", "equal row norms give better load balance",
              "row-norm error; MaxVio (global, batch) vs the plain router", "MPI − plain < 0", _REF),
    ClaimSpec("MPI-f", "MPI does not cost loss (paper: slightly lower)", "probe MSE vs the plain router",
              "MPI − plain < 0", _REF),
    ClaimSpec("MPI-g", "one power step per forward is enough; ten cost more and do not help",
              "probe MSE and time per step, 10 steps vs 1", "10 − 1 > 0", _REF),
    ClaimSpec("MPI-h", "the power step is cheap (paper: 0.2 % overhead), and precomputing R' makes inference identical",
              "time ratio to the plain router vs 1.002; logit error of precomputed R'", "ratio − 1.002 < 0", _REF),
    ClaimSpec("MPI-i", "detaching W in the power step changes loss and alignment (ours)",
              "probe MSE, ψ(R'): detached vs official", "detached − official: MSE > 0, ψ < 0", _REF),
)


def chapter4_claims(rows: list[dict]) -> list[ClaimResult]:
    """MPI-a … MPI-i (Wu et al., arXiv 2606.12397) from chapter-4 claim-run rows (pass rule and convergence as
    for chapter 1).

    ``A`` is the arm, ``B`` the comparison arm or a fixed level; ``arm@init`` uses the values at initialisation
    and ``arm@+0.2`` adds a margin of 0.2 to the comparison arm."""
    arms = _by_arm(rows)
    _with_init_views(arms, CHAPTER4_ARMS)
    out = [
        _versus_constant(arms, "MPI-a", "retracted Riemannian step = power step (float64, rel. error)",
                         "identity_err", "mpi", 1e-10, -1),
        _versus_constant(arms, "MPI-b", "200 power steps reach v1 where σ2/σ1 < 0.9: min |cos| > 0.999",
                         "power_cos_min", "mpi", 0.999, +1),
        _versus_constant(arms, "MPI-b", "c2/c1 shrinks by (σ2/σ1)² per step (rel. error < 1e-6)",
                         "power_rate_err", "mpi", 1e-6, -1),
        _compare(arms, "MPI-c", "at init, ψ(R') of MPI > ψ(R) of the plain router", "lam", "mpi@init",
                 "softmax@init", +1),
        _compare(arms, "MPI-c", "at init, |cos(R', v1)| of MPI > plain router's", "cos", "mpi@init",
                 "softmax@init", +1),
        _versus_constant(arms, "MPI-c", "at init, |cos(R', v1)| stays below 0.9 (our prediction)", "init_cos",
                         "mpi", 0.9, -1),
        _compare(arms, "MPI-d", "trained: ψ(R') of MPI ≥ plain ψ(R) + 0.2", "lam", "mpi",
                 _shifted(arms, "softmax", "lam", 0.2), +1),
        _compare(arms, "MPI-d", "trained: |cos(R', v1)| of MPI > plain router's", "cos", "mpi", "softmax", +1),
        _versus_constant(arms, "MPI-d", "trained: rows become v1, |cos(R', v1)| > 0.9 (paper's picture)", "cos",
                         "mpi", 0.9, +1),
        _versus_constant(arms, "MPI-e", "every effective row has norm C (rel. error < 1e-6)", "row_norm_err", "mpi",
                         1e-6, -1),
        _compare(arms, "MPI-e", "MaxVio (global, probe set) lower for MPI", "maxvio_global", "mpi", "softmax", -1),
        _compare(arms, "MPI-e", "MaxVio (batch, mean over steps) lower for MPI", "maxvio_batch", "mpi", "softmax", -1),
        _compare(arms, "MPI-f", "probe MSE of MPI < plain router", "probe_mse", "mpi", "softmax", -1),
        _compare(arms, "MPI-g", "10 power steps: higher probe MSE than 1", "probe_mse", "mpi-10", "mpi", +1),
        _versus_constant(arms, "MPI-g", "10 power steps cost more per step than 1 (time ratio > 1)",
                         "mpi10_over_mpi", "timing", 1.0, +1, converged=True),
        _versus_constant(arms, "MPI-h", f"the power step is cheap: time per training step within the paper's "
                         f"{MPI_H_OVERHEAD:.1%} of softmax (ratio < {1 + MPI_H_OVERHEAD:g})", "mpi_over_softmax",
                         "timing", 1.0 + MPI_H_OVERHEAD, -1, converged=True),
        _versus_constant(arms, "MPI-h", "precomputed R' gives the same logits (rel. error < 1e-6)",
                         "precompute_logit_err", "mpi", 1e-6, -1),
        _compare(arms, "MPI-i", "detached W (ours): probe MSE differs from official (higher)", "probe_mse",
                 "mpi-detach", "mpi", +1),
        _compare(arms, "MPI-i", "detached W (ours): ψ(R') differs from official (lower)", "lam", "mpi-detach", "mpi",
                 -1),
    ]
    # init and training separated (context): did training move the alignment?
    for arm in ("softmax", "mpi"):
        for metric in ("lam", "cos"):
            if arm in arms and all(metric in m and "init_" + metric in m for m in arms[arm].values()):
                out.append(_training_moved(arms, "MPI-d", metric, arm))
    return out


PINNED_METRICS_CH4 = ("probe_mse", "lam", "cos", "gap", "maxvio_global")
