"""Chapter 3's claim runs (router–expert coupling and the online K-Means router, RC-a … RC-g): arms, jobs, verdicts.

``python -m moewidgets reproduce chapter3`` writes ``book/results/chapter3.jsonl`` (the seeds of an arm trained at
once, one seed group, :class:`~moewidgets.multiseed.MultiSeedTrainer`); chapter 3
(book/chapter3.ipynb) renders :func:`chapter3_claims` from it and re-runs seed 0 of every arm live.

The paper: Ahrac, Hochwald, Geva, "Routers Learn the Geometry of Their Experts: Geometric Coupling in Sparse
Mixture-of-Experts" (arXiv 2605.12476). Only its abstract could be read: the claims RC-a … RC-g are the course's
small-scale phrasing of it.

The setting (ours, scaled to a CPU instead of the paper's 1B language model): the MLP-MoE of chapter 1 with
SwiGLU experts (E = 8, k = 2, D = 32, m = 64), gate "renorm" (top-k then softmax, our primary convention), inputs
with a shared offset ‖μ‖ = 0.5·s·√D (``TaskConfig.offset``; the "3×" needs anisotropic inputs), AdamW with weight decay 0.1
and a cosine schedule over 2,000 steps. The arms differ only in the router and the balancing knob.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from ..config import MoEConfig, RunConfig, TaskConfig, TrainConfig
from ..sweep import Job
from ..train import torch_threads
from .common import (_with_init_views, PROBE_POINTS, ClaimResult, ClaimSpec, _by_arm, _compare, _training_moved,
                     _versus_constant, one_seed, seed_group_job, seed_range, seed_results, train_seed_group)

_REF = "router-coupling-and-mpi.md §1.12"

__all__ = ["CHAPTER3_ARMS", "CHAPTER3_TRAIN", "CHAPTER3_MODEL", "CHAPTER3_TASK", "chapter3_run", "chapter3_job",
           "chapter3_seeds_job", "chapter3_jobs", "chapter3_claims", "PINNED_METRICS_CH3", "CLAIMS"]

CHAPTER3_MODEL = MoEConfig(n_experts=8, k=2, d_model=32, d_hidden=64, expert="swiglu", gate="renorm")
# An offset ‖μ‖ = 2‖μ_c‖ (offset=2) collapses the routing of this un-normalised model at initialisation (6 of 8
# experts dead without balancing, 5 with α = 0.01): ours is ‖μ‖ = 0.5·s·√D, one direction carrying 18 % of the
# input energy (an isotropic direction carries 3 %).
CHAPTER3_TASK = TaskConfig(offset=0.5)
# The arms: a learned linear router with no balancing, with the Switch aux loss at three α (0.001, 0.01, 0.1), with
# loss-free balancing (γ = 1e-3, the best rate of Wang et al. 2024, arXiv 2408.15664), and the K-Means router without
# and with the sign bias (our reading of the algorithm: EMA β = 0.05, raw x averaged, τ = 1), plus its
# cumulative-mean ablation.
CHAPTER3_ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "aux-0.001": {"aux_weight": 0.001},
    "aux-0.01": {"aux_weight": 0.01},
    "aux-0.1": {"aux_weight": 0.1},
    "lfb": {"lf_rate": 1e-3},
    "kmeans": {"router": "kmeans"},
    "kmeans+lfb": {"router": "kmeans", "lf_rate": 1e-3},
    "kmeans-cum+lfb": {"router": "kmeans", "kmeans_mode": "cumulative", "lf_rate": 1e-3},
}
CHAPTER3_TRAIN = TrainConfig(steps=2000, batch_size=256, lr=1e-2, weight_decay=0.1, schedule="cosine", device="cpu")
EXACT_TOKENS = 16           # tokens for the per-token gradient checks (RC-a)
SPAN_TOKENS = 6             # tokens for the SGD span check (RC-b) and the aux-spread check (RC-c): fewer than D
SPAN_LR = 0.01              # the RC-b runs' step (plain SGD and AdamW, 30 steps): stable at mean ‖x‖² ≈ 400


def chapter3_run(arm: str, seed: int, steps_factor: int = 1) -> RunConfig:
    """The :class:`~moewidgets.config.RunConfig` of one chapter-3 arm and seed (``steps_factor=4``: convergence)."""
    if arm not in CHAPTER3_ARMS:
        raise ValueError(f"arm={arm!r} must be one of {list(CHAPTER3_ARMS)}")
    model = CHAPTER3_MODEL.replace(seed=seed, **CHAPTER3_ARMS[arm])
    train = CHAPTER3_TRAIN.replace(steps=CHAPTER3_TRAIN.steps * steps_factor)
    return RunConfig(model=model, task=CHAPTER3_TASK, train=train)


def _geometry(model, data) -> dict[str, float]:
    """Row similarity (RC-d), score → activation ρ (RC-e), centroid matching (RC-g) and loads (RC-f) on the probe
    set; the routing rows are ``router.effective_rows_ED()`` (learned rows or K-Means centroids)."""
    from ..balance import expert_counts, load_stats
    from ..geometry.coupling import (centroid_matching, expert_activation, router_row_similarity,
                                     score_activation_correlation)
    from ..train import trace_model
    layer = model.layer
    x_ND = data.x_probe[:PROBE_POINTS]
    with torch.no_grad():
        trace = trace_model(model, x_ND)
        rows_ED = layer.router.effective_rows_ED()
        logits_NE = layer.router.logits(x_ND)
        sim = router_row_similarity(rows_ED)
        sa = score_activation_correlation(logits_NE, expert_activation(layer.experts, x_ND))
        sa_prod = score_activation_correlation(logits_NE, expert_activation(layer.experts, x_ND, kind="product"))
        cm = centroid_matching(rows_ED, x_ND, trace.idx_TK)
        cmc = centroid_matching(rows_ED, x_ND, trace.idx_TK, centre=True)
        loads = load_stats(expert_counts(trace.idx_TK, layer.n_experts))
    return {"sim_signed": sim.signed, "sim_abs": sim.abs, "rho": sa.rho, "rho_null": sa.null,
            "rho_pooled": sa.pooled, "rho_product": sa_prod.rho, "cm_matched": cm.matched,
            "cm_unmatched": cm.unmatched, "cm_margin": cm.margin, "cm_margin_centred": cmc.margin,
            "maxvio_global": loads.maxvio, "load_std_global": loads.std, "n_dead": len(loads.dead)}


def _exactness(model, data, seed: int) -> dict[str, float]:
    """RC-a, RC-b, RC-c on the trained layer (learned routers only): per-token gradient directions in float64
    under both gate conventions, the SGD / AdamW span residuals in float32, and where the aux gradient points."""
    from ..geometry.coupling import coupling_exactness, gradient_spans, sgd_span_residual
    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(data.x_probe.shape[0], generator=g)
    x64 = data.x_probe[pick[:EXACT_TOKENS]].to(torch.float64)
    layer64 = copy.deepcopy(model.layer).to(torch.float64)
    for gate in ("renorm", "softmax"):
        layer64.router.gate = gate
        ce = coupling_exactness(layer64, x64, generator=seed)
        out[f"coupling_err_{gate}"] = 1.0 - ce.min_selected_cos
        out[f"unselected_norm_{gate}"] = ce.max_unselected_norm
        out[f"output_cos_{gate}"] = ce.median_output_cos
    out["unselected_err_softmax"] = 1.0 - ce.min_unselected_cos
    x6 = data.x_probe[pick[EXACT_TOKENS:EXACT_TOKENS + SPAN_TOKENS]].to(torch.float64)
    y6 = layer64(x6).y_TD.detach() + 0.5 * torch.randn(x6.shape, generator=g, dtype=torch.float64)  # near the output
    # RC-b in float64: the claim is about the update's direction, and the float32 rounding of w + Δ would dominate
    # the relative residual of an expert that barely moves. lr = 0.01: these inputs have mean ‖x‖² ≈ 400, and the
    # first version's lr = 0.05 diverged within 5 SGD steps on every model (NaN rows, which the max skipped: its
    # "holds" was measured on the few rows that stayed finite). sgd_span_residual now raises on divergence.
    layer64.router.gate = "renorm"
    layer64.router.aux_weight = 0.0           # RC-b is about the task loss alone
    out["sgd_residual"] = sgd_span_residual(layer64, x6, y6, steps=30, lr=SPAN_LR).max
    out["adamw_residual"] = sgd_span_residual(layer64, x6, y6, steps=30, lr=SPAN_LR, optimizer="adamw").max
    if model.cfg.aux_weight > 0:
        gs = gradient_spans(copy.deepcopy(model.layer).to(torch.float64), x6, y6)
        out["aux_own_mean"] = float(gs.aux_own_E[~torch.isnan(gs.aux_own_E)].mean())
        out["aux_all_max"] = float(gs.aux_all_E.nan_to_num(0.0).max())
        out["task_own_max"] = float(gs.task_own_E.nan_to_num(0.0).max())
    return out


def chapter3_seeds_job(payload: dict, seeds: list[int]) -> list[dict[str, Any]]:
    """Seeds ``seeds`` of one chapter-3 arm trained at once (:func:`~moewidgets.reproduce.common.train_seed_group`):
    geometry at init, train (loads every step), geometry and exactness after; one metrics dict per seed.

    One torch thread (restored afterwards), so the numbers are the same on every machine of a kind."""
    from ..balance import mean_batch_max_violation, load_std
    converge_only = payload.get("converge_only", False)
    out: list[dict[str, Any]] = [{} for _ in seeds]

    def geometry_init(trainer) -> None:
        if trainer.cfg.router == "kmeans":      # centroids exist after the first training batch only
            trainer.step(1)
        for m, model, data in zip(out, trainer.models(), trainer.data):
            m.update({f"init_{k}": v for k, v in _geometry(model, data).items()})

    with torch_threads(1):
        trainer = train_seed_group(payload, seeds, before=None if converge_only else geometry_init)
        for s, m, model, data, hist in seed_results(trainer, payload, seeds, out):
            if not converge_only:
                m.update(_geometry(model, data))
                loads = hist.load
                m["maxvio_batch"] = mean_batch_max_violation(loads)
                m["load_std_batch"] = float(np.mean([load_std(torch.tensor(ld)) for ld in loads]))
                m["maxvio_batch_last100"] = mean_batch_max_violation(loads[-100:])
                # the MaxVio trajectory, smoothed over 50 steps (the chapter's plot)
                mv = np.array([mean_batch_max_violation([ld]) for ld in loads])
                m["track"] = {"step": list(range(50, len(mv) + 1, 50)),
                              "maxvio": [float(mv[i - 50:i].mean()) for i in range(50, len(mv) + 1, 50)]}
                if trainer.cfg.router == "softmax":
                    m.update(_exactness(model, data, seeds[s]))
    return out


def chapter3_job(payload: dict, seed: int) -> dict[str, Any]:
    """One (arm, seed) of chapter 3: :func:`chapter3_seeds_job` with the one seed (the pinned subset's re-run)."""
    return one_seed(chapter3_seeds_job, payload, seed)


def chapter3_jobs(seeds: int = 10, arms: list[str] | None = None, converge: bool = True,
                  seed_start: int = 0) -> list[Job]:
    """The chapter-3 claim-run jobs: one seed group per arm (seeds ``seed_start`` … ``seed_start + seeds − 1``
    trained at once), plus (``converge``) the 4×-longer convergence runs, one group per arm too."""
    seeds = seed_range(seeds, seed_start)
    fn = "moewidgets.reproduce:chapter3_seeds_job"
    jobs = []
    for arm in arms or list(CHAPTER3_ARMS):
        jobs.append(seed_group_job(arm, fn, {"run": chapter3_run(arm, 0).to_dict()}, seeds))
        if converge:
            jobs.append(seed_group_job(arm + ":4x", fn, {"run": chapter3_run(arm, 0, 4).to_dict(),
                                                         "converge_only": True}, seeds))
    return jobs


#: The claims chapter 3 tests, declared once (the ledger is generated from these).
CLAIMS: tuple[ClaimSpec, ...] = (
    ClaimSpec("RC-a", "a selected expert's router row and input weights get gradients parallel to the token",
              "1 − |cos(gradient row, x)|; unselected rows (the output-side cosine is context)",
              "error − 1e-10 < 0", _REF),
    ClaimSpec("RC-b", "under plain SGD those rows stay in the span of their routed tokens",
              "relative residual of the update outside the routed span (SGD vs AdamW)",
              "SGD residual < 1e-10; AdamW > 1e-3", _REF),
    ClaimSpec("RC-c", "an auxiliary balance loss moves every router row, within the batch's span",
              "aux gradient residual outside own routed span vs outside the batch span", "own − batch > 0", _REF),
    ClaimSpec("RC-d", "with the aux loss the router rows become more alike (paper ≈ 3×)",
              "row similarity S_abs, S_signed: aux vs no balancing and loss-free", "aux − other > 0", _REF),
    ClaimSpec("RC-e", "a higher router score predicts a stronger expert activation",
              "Spearman ρ(score, mean |SiLU(W_g x)|) vs permuted-expert null", "ρ − null > 0", _REF),
    ClaimSpec("RC-f", "the online K-Means router balances load best, at a modest loss cost",
              "MaxVio_global: K-Means (+bias) vs loss-free and vs aux (α = 0.01); load std, MaxVio_batch, probe MSE "
              "(loss-free vs aux is ours)", "K-Means − other < 0", _REF),
    ClaimSpec("RC-g", "a router row points to the mean of the tokens it routes",
              "cos(r_i, own routed mean) vs other experts' means", "matched − unmatched > 0", _REF),
)


def _scaled(arms, arm: str, metric: str, factor: float) -> str:
    """An ``arm@×factor`` view whose ``metric`` is the arm's times ``factor`` (a ratio claim as a paired one)."""
    name = f"{arm}@×{factor:g}"
    arms[name] = {s: {metric: m[metric] * factor} for s, m in arms[arm].items()}
    return name


def chapter3_claims(rows: list[dict]) -> list[ClaimResult]:
    """RC-a … RC-g (Ahrac et al., arXiv 2605.12476) from chapter-3 claim-run rows (pass rule and convergence as
    for chapter 1).

    ``A`` is the arm, ``B`` the comparison arm or a fixed level; ``arm@init`` uses the values at initialisation
    and ``arm@×1.5`` multiplies the comparison arm's metric by 1.5 (a ratio claim)."""
    arms = _by_arm(rows)
    _with_init_views(arms, CHAPTER3_ARMS)
    out = [
        _versus_constant(arms, "RC-a", "selected rows ∥ x, 'renorm' gate (1 − min |cos| < 1e-10, float64)",
                         "coupling_err_renorm", "none", 1e-10, -1),
        _versus_constant(arms, "RC-a", "selected rows ∥ x, 'softmax' gate (1 − min |cos| < 1e-10)",
                         "coupling_err_softmax", "none", 1e-10, -1),
        _versus_constant(arms, "RC-a", "'softmax' gate: unselected rows move, still ∥ x (1 − |cos| < 1e-10)",
                         "unselected_err_softmax", "none", 1e-10, -1),
        _versus_constant(arms, "RC-a", "'renorm' gate: unselected rows get exactly 0", "unselected_norm_renorm",
                         "none", 1e-300, -1),
        _versus_constant(arms, "RC-a", "output side not coupled (median |cos| < 0.5; a random δ: context)",
                         "output_cos_renorm", "none", 0.5, -1, role="context"),
        _versus_constant(arms, "RC-b", "plain SGD: Δr, ΔW_in stay in the routed span (residual < 1e-10, float64)",
                         "sgd_residual", "none", 1e-10, -1),
        _versus_constant(arms, "RC-b", "AdamW: they leave it (residual > 1e-3)", "adamw_residual", "none", 1e-3, +1),
        _compare(arms, "RC-c", "aux grad: outside own span > outside batch span", "aux_own_mean", "aux-0.01",
                 "aux-0.01", +1, metric_b="aux_all_max"),
    ]
    for metric, label in (("sim_abs", "S_abs"), ("sim_signed", "S_signed")):
        for base in ("none", "lfb"):
            out.append(_compare(arms, "RC-d", f"{label}: aux (α=0.01) > {base}", metric, "aux-0.01", base, +1))
        out.append(_compare(arms, "RC-d", f"{label}: aux (α=0.01) ≥ 1.5 × none", metric, "aux-0.01",
                            _scaled(arms, "none", metric, 1.5), +1))
        out.append(_compare(arms, "RC-d", f"{label}: aux (α=0.1) > none", metric, "aux-0.1", "none", +1))
    for arm in ("none", "lfb", "aux-0.01"):
        out.append(_compare(arms, "RC-e", "score→activation ρ > permuted-expert null", "rho", arm, arm, +1,
                            metric_b="rho_null"))
    out.append(_compare(arms, "RC-e", "ρ grows with training", "rho", "none", "none@init", +1))
    out.append(_compare(arms, "RC-e", "ρ weaker with the aux loss (ours, not the paper's)", "rho", "aux-0.01", "none",
                        -1, role="ours"))
    out += [
        _compare(arms, "RC-f", "MaxVio_global: K-Means (+bias) < loss-free", "maxvio_global", "kmeans+lfb", "lfb", -1),
        _compare(arms, "RC-f", "MaxVio_global: K-Means (+bias) < aux (α=0.01)", "maxvio_global", "kmeans+lfb",
                 "aux-0.01", -1),
        _compare(arms, "RC-f", "MaxVio_global: loss-free < aux (α=0.01) (ours)", "maxvio_global", "lfb", "aux-0.01",
                 -1, role="ours"),
        _compare(arms, "RC-f", "MaxVio_global: K-Means (no bias) < loss-free (ours)", "maxvio_global", "kmeans",
                 "lfb", -1, role="ours"),
        _compare(arms, "RC-f", "MaxVio_global: K-Means (no bias) < aux (α=0.01) (ours)", "maxvio_global", "kmeans",
                 "aux-0.01", -1, role="ours"),
        _compare(arms, "RC-f", "load std: K-Means (+bias) < loss-free", "load_std_global", "kmeans+lfb", "lfb", -1),
        _compare(arms, "RC-f", "MaxVio_batch: K-Means (+bias) < loss-free", "maxvio_batch", "kmeans+lfb", "lfb", -1),
        _compare(arms, "RC-f", "probe MSE: K-Means (+bias) within 5 % of loss-free", "probe_mse", "kmeans+lfb",
                 _scaled(arms, "lfb", "probe_mse", 1.05), -1),
        _compare(arms, "RC-f", "probe MSE: K-Means (+bias) within 5 % of aux (α=0.01)", "probe_mse", "kmeans+lfb",
                 _scaled(arms, "aux-0.01", "probe_mse", 1.05), -1),
        _compare(arms, "RC-g", "cos(r_i, own routed mean) > other experts' means", "cm_matched", "none", "none", +1,
                 metric_b="cm_unmatched"),
        _versus_constant(arms, "RC-g", "the same after centring the tokens (margin > 0)", "cm_margin_centred", "none",
                         0.0, +1),
    ]
    # init and training separated (context): did training move the routing geometry?
    for metric, claim in (("sim_abs", "RC-d"), ("cm_margin", "RC-g")):
        for arm in ("none", "aux-0.01", "lfb"):
            if arm in arms and all(metric in m and "init_" + metric in arms[arm][s] for s, m in arms[arm].items()):
                out.append(_training_moved(arms, claim, metric, arm))
    return out


PINNED_METRICS_CH3 = ("probe_mse", "sim_abs", "rho", "maxvio_global", "cm_margin")
