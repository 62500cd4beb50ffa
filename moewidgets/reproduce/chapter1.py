"""Chapter 1's claim runs (paper 1, SC-1 … SC-6): the arms, one seed group per arm, and the verdicts.

``python -m moewidgets reproduce chapter1`` trains every (arm, seed), probes it at initialisation and after
training, and writes one row per (arm, seed) to ``book/results/chapter1.jsonl`` (config, seed, metrics, wall
time, device, versions). The seeds of an arm train at once, one seed group
(:class:`~moewidgets.multiseed.MultiSeedTrainer`: each seed as its own run would train, to float rounding).
A second set of rows trains each (arm, seed) 4× longer: the convergence check (two-sided).
Chapter 1 (book/chapter1.ipynb) renders :func:`chapter1_claims` from that file and re-runs seed 0 live.

The paper: F. Liu, "Mixture-of-Experts as Soft Clustering: A Dual Jacobian-PCA Spectral Geometry Perspective"
(arXiv 2601.11616). Only its abstract could be read: the claims SC-1 … SC-6 are the course's small-scale phrasing
of it, and every set-up choice below is ours.

Identified σ1. ``pred = W_ro·f(x) + b`` with a trainable read-out and no weight decay: scaling the experts' output
weights by c and W_ro by 1/c leaves the function unchanged and moves σ1(J_i) by c. So the σ1 claims (SC-1, SC-1b,
SC-6) decide on the end-to-end Jacobians W_ro·J_i and W_ro·J_f (metrics ``e2e_sigma1``, ``e2e_layer_sigma1``),
beside the scale-free shape measures (r_j = σ_j/σ_1, stable rank, decay exponent α) of J_i; the old ``sigma1`` and
``layer_sigma1`` stay in the rows and are shown as context.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..config import MoEConfig, RunConfig, TaskConfig, TrainConfig
from ..sweep import Job
from ..train import torch_threads
from .common import (MIN_SEEDS_MLP, PROBE_POINTS, ClaimResult, ClaimSpec, _by_arm, _compare, _converged, _result,
                     _training_moved, _with_init_views, one_seed, seed_group_job, seed_range, seed_results,
                     train_seed_group)

_REF = "dual-jacobian-pca-and-grassmann.md"

__all__ = ["CHAPTER1_ARMS", "CHAPTER1_TRAIN", "chapter1_run", "chapter1_job", "chapter1_seeds_job", "chapter1_jobs",
           "chapter1_claims", "PINNED_METRICS", "CLAIMS", "PAPER_ARMS"]

# The arms of chapter 1 (E = 8, m = 64, D = 32; gate "softmax"): sizes scaled to a CPU (ours). The first six
# (τ = 1, no balancing) are the paper's; the temperature arms (τ = 0.3 and 3 at top-2 and soft; τ = 1 is "top-2"
# and "soft") test how routing sharpness moves the geometry, and the balanced repeats (Switch aux loss α = 0.01)
# check that a top-k result is not an artefact of dead experts.
CHAPTER1_ARMS: dict[str, dict[str, Any]] = {
    "dense": {"arch": "dense"},                   # parameter-matched: hidden E·m = 512
    "dense_active": {"arch": "dense_active"},     # active-compute-matched: hidden k·m = 128 (k = 2)
    "top-1": {"k": 1},
    "top-2": {"k": 2},
    "top-4": {"k": 4},
    "soft": {"k": 8},
    "top-2-t0.3": {"k": 2, "temperature": 0.3},
    "top-2-t3": {"k": 2, "temperature": 3.0},
    "soft-t0.3": {"k": 8, "temperature": 0.3},
    "soft-t3": {"k": 8, "temperature": 3.0},
    "top-1-aux": {"k": 1, "aux_weight": 0.01},
    "top-2-aux": {"k": 2, "aux_weight": 0.01},
    "top-4-aux": {"k": 4, "aux_weight": 0.01},
}
#: The arms of the paper's claims (τ = 1, no balancing); the others are ours.
PAPER_ARMS = ("dense", "dense_active", "top-1", "top-2", "top-4", "soft")
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
        out.update(_end_to_end(model, trace, x_ND, J_NDD))
        out["routing_entropy"] = _routing_entropy(trace)
        if model.cfg.arch != "moe":
            # the fair comparator of SC-4: the dense hidden units split into E random groups of m
            pseudo = dense_pseudo_experts(bank, model.cfg.n_experts, generator=0)
            ones_NE = torch.ones(x_ND.shape[0], model.cfg.n_experts, dtype=x_ND.dtype)
            out["pseudo_align_mean_abs"] = bank_jacobian_alignment(pseudo, x_ND, ones_NE, generator=0).mean_abs_offdiag
    return {k: (float(v) if isinstance(v, float) else v) for k, v in out.items()}


def _end_to_end(model, trace, x_ND: torch.Tensor, J_NDD: torch.Tensor) -> dict[str, float]:
    """The identified σ1 (no free gauge): spectra of the end-to-end Jacobians ``W_ro · J_i(x)`` (read-out times an
    expert's Jacobian, O × D) and ``W_ro · J_f(x)`` (read-out times the whole layer's). ``pred = W_ro f(x) + b``
    with a trainable read-out and no weight decay: scaling the experts' output weights by c and W_ro by 1/c leaves
    the function, and these, unchanged, while σ1(J_i) scales by c.

    ``e2e_sigma1``, ``e2e_stable_rank``: gate-weighted per-expert means (as ``sigma1``), mean over live experts;
    ``e2e_layer_sigma1``: mean over points of σ1(W_ro J_f(x)). Shapes: x_ND (N, D), J_NDD (N, D, D) the layer
    Jacobian, W_ro (O, D)."""
    from ..geometry import singular_values, weighted_expert_spectra
    from ..geometry.jacobians import pair_jacobians
    from ..geometry.probes import _live_mean
    bank = model.layer.experts
    w_ro_OD = model.w_ro_OD.detach().to(x_ND.dtype)
    w_NE = trace.gate_matrix().to(x_ND.dtype)
    E = w_NE.shape[1]
    e_P, n_P = (w_NE.T > 0).nonzero(as_tuple=True)
    sv_PR = singular_values(w_ro_OD @ pair_jacobians(bank, x_ND, e_P, n_P))     # (P, O, D) → (P, R)
    sv_ENR = torch.full((E, x_ND.shape[0], sv_PR.shape[-1]), math.nan, dtype=sv_PR.dtype)
    sv_ENR[e_P, n_P] = sv_PR
    spectra = weighted_expert_spectra(None, w_NE, sv_ENR=sv_ENR)
    return {"e2e_sigma1": _live_mean(spectra.sigma1, spectra.dead),
            "e2e_stable_rank": _live_mean(spectra.stable_rank, spectra.dead),
            "e2e_layer_sigma1": float(singular_values(w_ro_OD @ J_NDD)[:, 0].mean())}


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


def chapter1_jobs(seeds: int = 10, arms: list[str] | None = None, converge: bool = True,
                  probe_points: int = PROBE_POINTS, seed_start: int = 0) -> list[Job]:
    """The chapter-1 claim-run jobs: one seed group per arm (seeds ``seed_start`` … ``seed_start + seeds − 1``
    trained at once), plus (``converge``) the 4×-longer convergence runs, one group per arm too.

    >>> jobs = chapter1_jobs(10, arms=["top-2"], seed_start=100)
    >>> [(j.arm, j.seeds[0], len(j.seeds)) for j in jobs]
    [('top-2', 100, 10), ('top-2:4x', 100, 10)]
    """
    seed_list = seed_range(seeds, seed_start)
    for arm in arms or []:
        chapter1_run(arm, 0)                       # an unknown arm fails here, before any run
    fn = "moewidgets.reproduce:chapter1_seeds_job"
    jobs = []
    for arm in arms or list(CHAPTER1_ARMS):
        jobs.append(seed_group_job(arm, fn, {"run": chapter1_run(arm, 0).to_dict(), "probe_points": probe_points},
                                   seed_list))
        if converge:
            jobs.append(seed_group_job(arm + ":4x", fn, {"run": chapter1_run(arm, 0, 4).to_dict(),
                                                         "probe_points": probe_points, "converge_only": True},
                                       seed_list))
    return jobs


#: The claims chapter 1 tests, declared once (the ledger is generated from these).
CLAIMS: tuple[ClaimSpec, ...] = (
    ClaimSpec("SC-1", "an expert's own Jacobian has a smaller top singular value than a dense net's",
              "σ1 of the end-to-end Jacobian W_ro·J_i (gate-weighted mean) vs dense W_ro·J_D, param- and "
              "active-matched", "MoE − dense < 0", _REF + " §1.6"),
    ClaimSpec("SC-1b", "the whole MoE layer is less sensitive than a dense net",
              "mean σ1 of W_ro·J_f (layer) vs dense W_ro·J_D", "MoE − dense < 0", _REF + " §1.6"),
    ClaimSpec("SC-2", "expert Jacobian spectra decay faster than a dense net's",
              "normalised spectrum r_2, r_5, r_10 (lower), decay exponent α (higher), stable rank (lower)",
              "r_j, stable rank: MoE − dense < 0; α: > 0", _REF + " §1.6"),
    ClaimSpec("SC-3", "expert outputs spread over more directions than a dense net's",
              "entropy effective rank of the gate-weighted PCA of H-out", "MoE − dense > 0", _REF + " §1.6"),
    ClaimSpec("SC-4", "the experts' mean Jacobians are nearly orthogonal",
              "mean |A_ij| vs dense pseudo-experts (the split-half ceiling ≈ 1 is context)",
              "MoE − pseudo-experts < 0", _REF + " §1.6"),
    ClaimSpec("SC-5", "sharper routing gives lower-rank expert structure",
              "PCA effective rank and stable rank over top-1 → 2 → 4 → soft", "softer − sharper > 0",
              _REF + " §1.6"),
    ClaimSpec("SC-6", "the MoE–dense gaps come from training, not from the architecture",
              "gap to dense (identified σ1, PCA erank) after training vs at initialisation",
              "gap moves in the claim's direction", _REF + " §1.6"),
)


def _has(arms, arm: str, *metrics: str) -> bool:
    """Whether every seed of ``arm`` has every metric (rows from before a metric existed lack it)."""
    return arm in arms and bool(arms[arm]) and all(all(m in v for m in metrics) for v in arms[arm].values())


def chapter1_claims(rows: list[dict]) -> list[ClaimResult]:
    """SC-1 … SC-6 of paper 1 (Liu, arXiv 2601.11616) from chapter-1 claim-run rows (pass rule:
    :func:`~moewidgets.reproduce.common.pass_rule`, ≥ ``MIN_SEEDS_MLP`` = 10 seeds per arm). Rows whose arms or
    metrics are missing are skipped (committed rows from before a metric existed).

    Roles: σ1 claims decide on the identified end-to-end Jacobian (``e2e_*``); the gauge-dependent σ1 of J_i is
    shown as context. SC-4's "< split-half ceiling" rows (a ceiling ≈ 1) and the "training moved it" rows are
    context; the temperature and balanced (aux α = 0.01) arms are ours."""
    arms = _by_arm(rows)
    # SC-6 compares trained with initial values: expose "arm@init" views whose metrics are the init_ ones
    _with_init_views(arms, CHAPTER1_ARMS)
    moe = ["top-1", "top-2", "top-4", "soft"]
    out: list[ClaimResult] = []

    def cmp(claim, statement, metric, a, b, sign, metric_b=None, role="decides"):
        if _has(arms, a, metric) and _has(arms, b, metric_b or metric):
            out.append(_compare(arms, claim, statement, metric, a, b, sign, metric_b, role=role))

    def moved(claim, metric, a):
        if _has(arms, a, metric) and _has(arms, a + "@init", metric):
            out.append(_training_moved(arms, claim, metric, a))

    for a in moe:
        cmp("SC-1", "σ1(W_ro·J_i) < dense (param-matched)", "e2e_sigma1", a, "dense", -1)
    for a in moe:
        cmp("SC-1", "σ1(W_ro·J_i) < dense (active-matched)", "e2e_sigma1", a, "dense_active", -1)
    for a in ("top-1-aux", "top-2-aux", "top-4-aux"):       # balanced: no dead experts (ours)
        cmp("SC-1", "balanced (aux α=0.01): σ1(W_ro·J_i) < dense", "e2e_sigma1", a, "dense", -1, role="ours")
    for a in moe:
        cmp("SC-1", "σ1(J_i) < dense: not identified, the (c, 1/c) gauge moves it", "sigma1", a, "dense", -1,
            role="context")
        moved("SC-1", "e2e_sigma1", a)
    for a in moe:
        cmp("SC-1b", "whole-layer σ1(W_ro·J_f) < dense σ1(W_ro·J_D)", "e2e_layer_sigma1", a, "dense", -1)
    for a in moe:
        cmp("SC-2", "stable rank of J_i < dense", "stable_rank", a, "dense", -1)
        cmp("SC-2", "decay exponent α of J_i > dense", "decay_alpha", a, "dense", +1)
        for j in ("r2", "r5", "r10"):
            cmp("SC-2", f"normalised spectrum {j} = σ_{j[1:]}/σ_1 of J_i < dense", j, a, "dense", -1)
        moved("SC-2", "stable_rank", a)
    for a in moe:
        cmp("SC-3", "H-out PCA erank (entropy) > dense", "pca_entropy", a, "dense", +1)
        moved("SC-3", "pca_entropy", a)
    for a in moe:
        cmp("SC-4", "alignment < dense pseudo-experts", "align_mean_abs", a, "dense", -1,
            metric_b="pseudo_align_mean_abs")
        cmp("SC-4", "alignment mean|A_ij| < split-half ceiling (≈ 1: fixed by construction)", "align_mean_abs", a,
            a, -1, metric_b="align_ceiling", role="context")
        moved("SC-4", "align_mean_abs", a)
    for lo, hi in (("top-1", "top-2"), ("top-2", "top-4"), ("top-4", "soft")):
        cmp("SC-5", "PCA erank grows as routing softens", "pca_entropy", hi, lo, +1)
        cmp("SC-5", "stable rank of J_i grows as routing softens", "stable_rank", hi, lo, +1)
    for k in ("top-2", "soft"):                              # temperature: larger τ is softer routing (ours)
        for lo, hi in ((f"{k}-t0.3", k), (k, f"{k}-t3")):
            cmp("SC-5", f"τ: PCA erank grows with τ ({k})", "pca_entropy", hi, lo, +1, role="ours")
            cmp("SC-5", f"τ: stable rank of J_i grows with τ ({k})", "stable_rank", hi, lo, +1, role="ours")
    # SC-6: the MoE–dense gap exists after training but not (or less) at init: compare gap(trained) − gap(init)
    for a in ("top-2", "soft"):
        for metric, sign, role in (("e2e_sigma1", -1, "decides"), ("pca_entropy", +1, "decides"),
                                   ("sigma1", -1, "context")):
            if all(_has(arms, x, metric) for x in (a, "dense", a + "@init", "dense@init")):
                out.append(_gap_change(arms, a, metric, sign, role))
    return out


def _gap_change(arms, a: str, metric: str, sign: int, role: str = "decides") -> ClaimResult:
    """SC-6: gap = metric(a) − metric(dense); the claim 'the effect needs training' predicts the gap moves in the
    claim's direction (``sign``) from init to trained: sign · (gap_trained − gap_init) > 0."""
    seeds = sorted(set(arms[a]) & set(arms["dense"]))
    gap_t = np.array([arms[a][s][metric] - arms["dense"][s][metric] for s in seeds])
    gap_i = np.array([arms[a + "@init"][s][metric] - arms["dense@init"][s][metric] for s in seeds])
    conv = _converged(arms, a) and _converged(arms, "dense")
    return _result("SC-6", f"{metric} gap to dense {'falls' if sign < 0 else 'grows'} with training",
                   f"gap in {metric}: trained vs init", a + " gap (trained)", a + " gap (init)", gap_t, gap_i,
                   gap_t - gap_i, sign, MIN_SEEDS_MLP, conv, role)


PINNED_METRICS = ("probe_mse", "sigma1", "layer_sigma1", "stable_rank", "pca_entropy", "align_mean_abs", "e2e_sigma1",
                  "e2e_layer_sigma1")
