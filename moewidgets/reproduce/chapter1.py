"""Chapter 1's claim runs (paper 1, SC-1 … SC-6): the arms, one seed group per arm, and the verdicts.

``python -m moewidgets reproduce chapter1`` trains every (arm, seed), probes it at initialisation and after
training, and writes one row per (arm, seed) to ``book/results/chapter1.jsonl`` (config, seed, metrics, wall
time, device, versions). The seeds of an arm train at once, one seed group
(:class:`~moewidgets.multiseed.MultiSeedTrainer`: each seed as its own run would train, to float rounding).
A second set of rows trains each (arm, seed) 4× longer: the convergence check.
Chapter 1 (book/chapter1.ipynb) renders :func:`chapter1_claims` from that file and re-runs seed 0 live.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..config import MoEConfig, RunConfig, TaskConfig, TrainConfig
from ..sweep import Job
from ..train import torch_threads
from .common import (_with_init_views, PROBE_POINTS, ClaimResult, _by_arm, _compare, _converged, bootstrap_ci,
                     one_seed, seed_group_job, seed_results, train_seed_group)

__all__ = ["CHAPTER1_ARMS", "CHAPTER1_TRAIN", "chapter1_run", "chapter1_job", "chapter1_seeds_job", "chapter1_jobs",
           "chapter1_claims", "PINNED_METRICS"]

# The arms of chapter 1 (E = 8, m = 64, D = 32; τ = 1, gate "softmax", no balancing): sizes scaled to a CPU (ours).
CHAPTER1_ARMS: dict[str, dict[str, Any]] = {
    "dense": {"arch": "dense"},                   # parameter-matched: hidden E·m = 512
    "dense_active": {"arch": "dense_active"},     # active-compute-matched: hidden k·m = 128 (k = 2)
    "top-1": {"k": 1},
    "top-2": {"k": 2},
    "top-4": {"k": 4},
    "soft": {"k": 8},
}
CHAPTER1_TRAIN = TrainConfig(steps=2000, batch_size=256, lr=1e-2, schedule="cosine", device="cpu")


def chapter1_run(arm: str, seed: int, steps_factor: int = 1) -> RunConfig:
    """The :class:`~moewidgets.config.RunConfig` of one chapter-1 arm and seed (``steps_factor=4``: convergence)."""
    if arm not in CHAPTER1_ARMS:
        raise ValueError(f"arm={arm!r} must be one of {list(CHAPTER1_ARMS)}")
    model = MoEConfig(n_experts=8, k=2, d_model=32, d_hidden=64, seed=seed).replace(**CHAPTER1_ARMS[arm])
    train = CHAPTER1_TRAIN.replace(steps=CHAPTER1_TRAIN.steps * steps_factor)
    return RunConfig(model=model, task=TaskConfig(), train=train)


def _routing_entropy(trace) -> float:
    g_TE = trace.gate_matrix()
    g_TE = g_TE / g_TE.sum(-1, keepdim=True)
    return float(-(g_TE * torch.log(g_TE.clamp_min(1e-30))).sum(-1).mean())


def _probe_metrics(model, data, n_probe: int) -> dict[str, float]:
    """The chapter-1 metrics of one model on the first ``n_probe`` probe points."""
    from ..geometry import (bank_jacobian_alignment, chapter1_probes, dense_jacobian, dense_pseudo_experts,
                           layer_jacobian, singular_values)
    from ..train import trace_model
    x_ND = data.x_probe[:n_probe]
    trace = trace_model(model, x_ND)
    bank = model.layer.experts
    pr = chapter1_probes(bank, trace, generator=0)
    hard = chapter1_probes(bank, trace, weights="membership", generator=0)
    out = {k: v for k, v in pr.summary().items() if isinstance(v, (int, float))}
    out["pca_entropy_membership"] = hard.pca_entropy_mean
    with torch.no_grad():
        if model.cfg.arch == "moe":
            J_NDD = layer_jacobian(model.layer, x_ND)
        else:
            J_NDD = dense_jacobian(bank, x_ND)
        out["layer_sigma1"] = float(singular_values(J_NDD)[:, 0].mean())
        out["routing_entropy"] = _routing_entropy(trace)
        if model.cfg.arch != "moe":
            # the fair comparator of SC-4: the dense hidden units split into E random groups of m
            pseudo = dense_pseudo_experts(bank, model.cfg.n_experts, generator=0)
            ones_NE = torch.ones(x_ND.shape[0], model.cfg.n_experts, dtype=x_ND.dtype)
            out["pseudo_align_mean_abs"] = bank_jacobian_alignment(pseudo, x_ND, ones_NE, generator=0).mean_abs_offdiag
    return {k: (float(v) if isinstance(v, float) else v) for k, v in out.items()}


def chapter1_seeds_job(payload: dict, seeds: list[int]) -> list[dict[str, Any]]:
    """Seeds ``seeds`` of one chapter-1 arm, trained at once (:func:`~moewidgets.reproduce.common.train_seed_group`):
    each probed at initialisation, trained, probed again; one metrics dict per seed. One torch thread (restored
    afterwards), so the numbers are the same on every machine of a kind."""
    converge_only = payload.get("converge_only", False)
    out: list[dict[str, Any]] = [{} for _ in seeds]

    def probe_init(trainer) -> None:
        for m, model, data in zip(out, trainer.models(), trainer.data):
            m.update({f"init_{k}": v for k, v in _probe_metrics(model, data, payload["probe_points"]).items()})

    with torch_threads(1):
        trainer = train_seed_group(payload, seeds, before=None if converge_only else probe_init)
        for _, m, model, data, _ in seed_results(trainer, payload, seeds, out):
            if not converge_only:
                m.update(_probe_metrics(model, data, payload["probe_points"]))
    return out


def chapter1_job(payload: dict, seed: int) -> dict[str, Any]:
    """One (arm, seed) of chapter 1: :func:`chapter1_seeds_job` with the one seed (the pinned subset's live
    re-run; with the payload's ``dispatch`` it takes the path of the seed group that made the committed row)."""
    return one_seed(chapter1_seeds_job, payload, seed)


def chapter1_jobs(seeds: int = 5, arms: list[str] | None = None, converge: bool = True,
                  probe_points: int = PROBE_POINTS) -> list[Job]:
    """The chapter-1 claim-run jobs: one seed group per arm (every seed trained at once), plus (``converge``) the
    4×-longer convergence runs, one group per arm too."""
    fn = "moewidgets.reproduce:chapter1_seeds_job"
    jobs = []
    for arm in arms or list(CHAPTER1_ARMS):
        jobs.append(seed_group_job(arm, fn, {"run": chapter1_run(arm, 0).to_dict(), "probe_points": probe_points},
                                   seeds))
        if converge:
            jobs.append(seed_group_job(arm + ":4x", fn, {"run": chapter1_run(arm, 0, 4).to_dict(),
                                                         "probe_points": probe_points, "converge_only": True}, seeds))
    return jobs



def chapter1_claims(rows: list[dict]) -> list[ClaimResult]:
    """SC-1 … SC-6 of paper 1 (spec §1.6) from chapter-1 claim-run rows (see module docstring for the rule)."""
    arms = _by_arm(rows)
    # SC-6 compares trained with initial values: expose "arm@init" views whose metrics are the init_ ones
    _with_init_views(arms, CHAPTER1_ARMS)
    moe = ["top-1", "top-2", "top-4", "soft"]
    out: list[ClaimResult] = []
    for a in moe:
        out.append(_compare(arms, "SC-1", "expert-local σ1 < dense (param-matched)", "sigma1", a, "dense", -1))
    for a in moe:
        out.append(_compare(arms, "SC-1", "expert-local σ1 < dense (active-matched)", "sigma1", a, "dense_active", -1))
    for a in moe:
        out.append(_compare(arms, "SC-1b", "whole-layer σ1(J_f) < dense σ1(J_D)", "layer_sigma1", a, "dense", -1))
    for a in moe:
        out.append(_compare(arms, "SC-2", "stable rank of J_i < dense", "stable_rank", a, "dense", -1))
        out.append(_compare(arms, "SC-2", "decay exponent α of J_i > dense", "decay_alpha", a, "dense", +1))
    for a in moe:
        out.append(_compare(arms, "SC-3", "H-out PCA erank (entropy) > dense", "pca_entropy", a, "dense", +1))
    for a in moe:
        out.append(_compare(arms, "SC-4", "alignment mean|A_ij| < split-half ceiling", "align_mean_abs", a, a, -1,
                            metric_b="align_ceiling"))
        out.append(_compare(arms, "SC-4", "alignment < dense pseudo-experts", "align_mean_abs", a, "dense", -1,
                            metric_b="pseudo_align_mean_abs"))
    for lo, hi in (("top-1", "top-2"), ("top-2", "top-4"), ("top-4", "soft")):
        out.append(_compare(arms, "SC-5", "PCA erank grows as routing softens", "pca_entropy", hi, lo, +1))
        out.append(_compare(arms, "SC-5", "stable rank of J_i grows as routing softens", "stable_rank", hi, lo, +1))
    # SC-6: the MoE–dense gap exists after training but not (or less) at init: compare gap(trained) − gap(init)
    for a in ("top-2", "soft"):
        out.append(_gap_change(arms, a, "sigma1", -1))
        out.append(_gap_change(arms, a, "pca_entropy", +1))
    return out


def _gap_change(arms, a: str, metric: str, sign: int) -> ClaimResult:
    """SC-6: gap = metric(a) − metric(dense); the claim 'the effect needs training' predicts the gap moves in the
    claim's direction (``sign``) from init to trained: sign · (gap_trained − gap_init) > 0."""
    seeds = sorted(set(arms[a]) & set(arms["dense"]))
    gap_t = np.array([arms[a][s][metric] - arms["dense"][s][metric] for s in seeds])
    gap_i = np.array([arms[a + "@init"][s][metric] - arms["dense@init"][s][metric] for s in seeds])
    d = gap_t - gap_i
    n_sign = int(np.sum(np.sign(d) == sign))
    lo, hi = bootstrap_ci(d)
    holds = n_sign >= math.ceil(0.8 * len(seeds)) and (hi < 0 if sign < 0 else lo > 0)
    return ClaimResult("SC-6", f"{metric} gap to dense {'widens' if sign < 0 else 'grows'} with training",
                       f"gap in {metric}: trained vs init", a + " gap (trained)", a + " gap (init)",
                       float(gap_t.mean()), float(gap_t.std(ddof=1)), float(gap_i.mean()), float(gap_i.std(ddof=1)),
                       n_sign, len(seeds), (lo, hi), bool(holds), _converged(arms, a) and _converged(arms, "dense"))


PINNED_METRICS = ("probe_mse", "sigma1", "layer_sigma1", "stable_rank", "pca_entropy", "align_mean_abs")
