"""Claim runs: each chapter's checkable claims over arms × seeds, their verdicts, and the pinned live subset.

``python -m moewidgets reproduce chapter1`` trains every (arm, seed) of chapter 1, probes it at initialisation
and after training, and writes one row per (arm, seed) to ``book/results/chapter1.jsonl`` (config, seed, metrics,
wall time, device, versions). A second set of rows trains each (arm, seed) 4× longer: the convergence check.
The chapter renders :func:`chapter1_claims` from that file and re-runs :func:`pinned_subset` live.
``python -m moewidgets reproduce chapter4`` does the same for the MPI router (:func:`chapter4_jobs`,
:func:`chapter4_claims`, ``book/results/chapter4.jsonl``; chapter 4, book/chapter4.ipynb).

Pass rule (paper-1 spec §1.6): a claim *holds* when the paired per-seed difference has the predicted sign in at
least 4 of 5 seeds (80 %, rounded up) **and** its 95 % bootstrap CI over seeds excludes 0.
Convergence (ours): an arm has converged when, for every seed, its probe MSE after N steps is within
``CONVERGENCE_MARGIN`` × Var(y) of the MSE after 4N steps (the longer run would explain < 0.5 % more variance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import MoEConfig, RunConfig, TaskConfig, TrainConfig
from .sweep import Job, read_jsonl, run_jobs, write_jsonl
from .train import torch_threads

__all__ = ["load_results", "CHAPTER1_ARMS", "chapter1_run", "chapter1_jobs", "chapter1_job", "chapter1_claims", "ClaimResult",
           "claims_table", "pinned_subset", "reproduce", "RESULTS_DIR", "CONVERGENCE_MARGIN", "bootstrap_ci",
           "CHAPTER4_ARMS", "chapter4_run", "chapter4_jobs", "chapter4_job", "chapter4_claims",
           "chapter4_timing_job"]

RESULTS_DIR = Path(__file__).resolve().parent.parent / "book" / "results"
CONVERGENCE_MARGIN = 0.005      # of Var(y): the 4× run may explain at most 0.5 % more variance
PROBE_POINTS = 1024             # probe points per model (spec: 2,000; ours: 1,024 keeps n_eff ≫ D = 32)

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
    from .geometry import (bank_jacobian_alignment, chapter1_probes, dense_jacobian, dense_pseudo_experts,
                           layer_jacobian, singular_values)
    from .train import trace_model
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


def chapter1_job(payload: dict, seed: int) -> dict[str, Any]:
    """One (arm, seed) of chapter 1: probe at init, train, probe again. Runs with 1 torch thread so that the
    numbers are the same on every machine of a kind (restored afterwards)."""
    from .train import Trainer
    with torch_threads(1):
        run = RunConfig.from_dict(payload["run"])
        trainer = Trainer.from_config(run)
        data, model = trainer.data, trainer.model
        metrics: dict[str, Any] = {}
        if not payload.get("converge_only", False):
            metrics.update({f"init_{k}": v for k, v in _probe_metrics(model, data, payload["probe_points"]).items()})
        trainer.run(every=max(1, run.train.steps))
        metrics["probe_mse"] = trainer.evaluate()
        metrics["train_loss_last50"] = trainer.history.last_loss(50)
        metrics["target_var"] = float(data.y_probe.var())
        metrics["steps"] = trainer.steps_done
        if not payload.get("converge_only", False):
            metrics.update(_probe_metrics(model, data, payload["probe_points"]))
        metrics["_device"] = str(trainer.device)
        return metrics


def chapter1_jobs(seeds: int = 5, arms: list[str] | None = None, converge: bool = True,
                  probe_points: int = PROBE_POINTS) -> list[Job]:
    """The chapter-1 claim-run jobs: every arm × seed, plus (``converge``) the 4×-longer convergence runs."""
    jobs = []
    for arm in arms or list(CHAPTER1_ARMS):
        for seed in range(seeds):
            jobs.append(Job(arm, "moewidgets.reproduce:chapter1_job",
                            {"run": chapter1_run(arm, seed).to_dict(), "probe_points": probe_points}, seed))
            if converge:
                jobs.append(Job(arm + ":4x", "moewidgets.reproduce:chapter1_job",
                                {"run": chapter1_run(arm, seed, 4).to_dict(), "probe_points": probe_points,
                                 "converge_only": True}, seed))
    return jobs


# ------------------------------------------------------------------------------------------------ verdicts

def bootstrap_ci(values: np.ndarray, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (deterministic: a seeded numpy generator)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class ClaimResult:
    """One line of a claims table: ``diff = metric(a) − metric(b)`` per seed, predicted ``sign`` (−1 or +1)."""

    claim: str
    statement: str
    metric: str
    arm_a: str
    arm_b: str
    mean_a: float
    sd_a: float
    mean_b: float
    sd_b: float
    n_sign: int
    n_seeds: int
    ci: tuple[float, float]
    holds: bool
    converged: bool


def _by_arm(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r["arm"], {})[r["seed"]] = r["metrics"]
    return out


def _converged(arms: dict[str, dict[int, dict]], arm: str) -> bool:
    long = arms.get(arm + ":4x", {})
    base = arms.get(arm, {})
    if not base or set(long) != set(base):
        return False
    return all(base[s]["probe_mse"] - long[s]["probe_mse"] <= CONVERGENCE_MARGIN * base[s]["target_var"]
               for s in base)


def _compare(arms, claim, statement, metric, a, b, sign, metric_b=None) -> ClaimResult:
    A, B = arms[a], arms[b]
    seeds = sorted(set(A) & set(B))
    va = np.array([A[s][metric] for s in seeds])
    vb = np.array([B[s][metric_b or metric] for s in seeds])
    d = va - vb
    n_sign = int(np.sum(np.sign(d) == sign))
    lo, hi = bootstrap_ci(d)
    need = math.ceil(0.8 * len(seeds))
    holds = n_sign >= need and (hi < 0 if sign < 0 else lo > 0)
    conv = _converged(arms, a.split("@")[0]) and _converged(arms, b.split("@")[0])
    return ClaimResult(claim, statement, metric if metric_b is None else f"{metric} vs {metric_b}", a, b,
                       float(va.mean()), float(va.std(ddof=1)) if len(va) > 1 else 0.0,
                       float(vb.mean()), float(vb.std(ddof=1)) if len(vb) > 1 else 0.0,
                       n_sign, len(seeds), (lo, hi), bool(holds), conv)


def chapter1_claims(rows: list[dict]) -> list[ClaimResult]:
    """SC-1 … SC-6 of paper 1 (spec §1.6) from chapter-1 claim-run rows (see module docstring for the rule)."""
    arms = _by_arm(rows)
    # SC-6 compares trained with initial values: expose "arm@init" views whose metrics are the init_ ones
    for arm in list(CHAPTER1_ARMS):
        if arm in arms:
            arms[arm + "@init"] = {s: {k[5:]: v for k, v in m.items() if k.startswith("init_")}
                                   for s, m in arms[arm].items()}
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


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3g}"


def claims_table(results: list[ClaimResult]) -> str:
    """A fixed-width text table of claim results (3 significant digits; what nbval compares)."""
    head = ("claim", "statement", "A", "B", "mean±sd A", "mean±sd B", "sign", "95% CI of A−B", "holds", "conv.")
    lines = []
    for r in results:
        lines.append((r.claim, r.statement, r.arm_a, r.arm_b, f"{_fmt(r.mean_a)}±{_fmt(r.sd_a)}",
                      f"{_fmt(r.mean_b)}±{_fmt(r.sd_b)}", f"{r.n_sign}/{r.n_seeds}",
                      f"[{_fmt(r.ci[0])}, {_fmt(r.ci[1])}]", "yes" if r.holds else "NO",
                      "yes" if r.converged else "NO"))
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*l) for l in lines])


# ------------------------------------------------------------------------------------------------ pinned subset

@dataclass
class PinnedCheck:
    """A live re-run of one committed row: the largest relative deviation over the checked metrics."""

    arm: str
    seed: int
    max_rel_dev: float
    worst_metric: str
    ok: bool


PINNED_METRICS = ("probe_mse", "sigma1", "layer_sigma1", "stable_rank", "pca_entropy", "align_mean_abs")


def pinned_subset(rows: list[dict], seed: int = 0, arms: list[str] | None = None, rtol: float = 0.02,
                  chapter: str = "chapter1") -> list[PinnedCheck]:
    """Re-run seed ``seed`` of each arm live and compare with the committed rows (relative tolerance ``rtol``).

    ``chapter``: ``"chapter1"`` (metrics ``PINNED_METRICS``) or ``"chapter4"`` (``PINNED_METRICS_CH4``)."""
    if chapter == "chapter1":
        job, default_arms, metrics = chapter1_job, list(CHAPTER1_ARMS), PINNED_METRICS
    elif chapter == "chapter4":
        job, default_arms, metrics = chapter4_job, list(CHAPTER4_ARMS), PINNED_METRICS_CH4
    else:
        raise ValueError(f"chapter={chapter!r} must be 'chapter1' or 'chapter4'")
    committed = {(r["arm"], r["seed"]): r for r in rows}
    checks = []
    for arm in arms or default_arms:
        row = committed[(arm, seed)]
        live = job(dict(row["config"]), seed)
        devs = {m: abs(live[m] - row["metrics"][m]) / max(abs(row["metrics"][m]), 1e-12) for m in metrics}
        worst = max(devs, key=devs.get)
        checks.append(PinnedCheck(arm, seed, devs[worst], worst, devs[worst] <= rtol))
    return checks


def reproduce(chapter: str, seeds: int = 5, executor=None, out_dir: str | Path | None = None,
              cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Run a chapter's claim runs (resumable through ``cache_dir``) and write ``<out_dir>/<chapter>.jsonl``.

    Chapters: ``"chapter1"`` (:func:`chapter1_jobs`), ``"chapter4"`` (:func:`chapter4_jobs`)."""
    jobs_of = {"chapter1": chapter1_jobs, "chapter4": chapter4_jobs}
    if chapter not in jobs_of:
        raise ValueError(f"chapter={chapter!r} must be one of {sorted(jobs_of)} (chapters 2–3 add theirs)")
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    cache_dir = Path(cache_dir) if cache_dir is not None else Path("build") / "cache" / chapter
    rows = run_jobs(jobs_of[chapter](seeds), executor=executor, cache_dir=cache_dir, progress=progress,
                    desc=f"reproduce {chapter}")
    return write_jsonl(rows, out_dir / f"{chapter}.jsonl")


def load_results(chapter: str, results_dir: str | Path | None = None) -> list[dict]:
    """The committed claim-run rows of a chapter."""
    return read_jsonl(Path(results_dir or RESULTS_DIR) / f"{chapter}.jsonl")


# ================================================================================================ chapter 4

# The arms of chapter 4 (MLP-MoE of chapter 1: E = 8, k = 2, D = 32, m = 64 GELU experts; gate "renorm" as in the
# official MPI code; Switch aux loss α = 0.01 for every arm, spec §2.11.6; C' = 1): sizes scaled to a CPU (ours).
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
    """λ, √λ, cos, angle, σ1/σ2 and row norms of the routing rows (softmax: w_ED; MPI: the effective R')."""
    from .geometry.mpi import row_alignment
    from .nn.routers import input_side_weights
    layer = model.layer
    with torch.no_grad():
        return row_alignment(input_side_weights(layer.experts), layer.router.effective_rows_ED()).summary()


def _mpi_exact_checks(model, data, seed: int) -> dict[str, float]:
    """MPI-a, MPI-b, MPI-e (row norms) and MPI-h (precomputed logits) on one trained MPI model (float64 where
    the claim is an identity)."""
    from .geometry.mpi import power_iterate, riemannian_ascent_step, power_step, row_alignment, top_singular
    from .nn.routers import input_side_weights
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
    from .balance import expert_counts, max_violation
    from .train import trace_model
    trace = trace_model(model, data.x_probe[:PROBE_POINTS])
    return max_violation(expert_counts(trace.idx_TK, model.cfg.n_experts))


def chapter4_job(payload: dict, seed: int) -> dict[str, Any]:
    """One (arm, seed) of chapter 4: alignment at init, train (alignment every 100 steps), then the metrics.

    One torch thread (restored afterwards), so the numbers are machine-independent for a kind of machine."""
    from .balance import max_violation
    from .train import Trainer
    with torch_threads(1):
        run = RunConfig.from_dict(payload["run"])
        trainer = Trainer.from_config(run)
        data, model = trainer.data, trainer.model
        converge_only = payload.get("converge_only", False)
        metrics: dict[str, Any] = {}
        track = {"step": [], "lam": [], "cos": [], "angle_deg": [], "gap": []}

        def record():
            a = _alignment(model)
            track["step"].append(trainer.steps_done)
            for k in ("lam", "cos", "angle_deg", "gap"):
                track[k].append(a[k])
            return a

        if not converge_only:
            metrics.update({f"init_{k}": v for k, v in record().items()})
            if run.model.router == "mpi":
                from .geometry.mpi import row_alignment
                from .nn.routers import input_side_weights
                with torch.no_grad():
                    raw = row_alignment(input_side_weights(model.layer.experts), model.layer.router.r_ED)
                metrics["init_raw_lam"] = float(raw.lam.mean())     # λ of the trained parameter R itself
        every = CHAPTER4_TRACK_EVERY if not converge_only else run.train.steps
        while not trainer.done:
            trainer.step(every)
            if not converge_only:
                record()
        metrics["probe_mse"] = trainer.evaluate()
        metrics["train_loss_last50"] = trainer.history.last_loss(50)
        metrics["target_var"] = float(data.y_probe.var())
        metrics["steps"] = trainer.steps_done
        metrics["step_ms"] = 1e3 * trainer.wall_s / max(1, trainer.steps_done)
        if not converge_only:
            metrics.update(_alignment(model))
            metrics["maxvio_global"] = _maxvio_global(model, data)
            metrics["maxvio_batch"] = float(np.mean([max_violation(torch.tensor(ld)) for ld in trainer.history.load]))
            metrics["track"] = track
            if run.model.router == "mpi":
                metrics.update(_mpi_exact_checks(model, data, seed))
        metrics["_device"] = str(trainer.device)
        return metrics


def chapter4_timing_job(payload: dict, seed: int) -> dict[str, Any]:
    """MPI-g / MPI-h cost: forward + backward time of one training step (batch ``tokens``) of the softmax, MPI and
    MPI-10 models of one seed, **interleaved** (round-robin, ``rounds`` × ``steps`` each) in one process and one
    thread, so machine load hits all three alike. Returns median milliseconds per step and median per-round ratios.
    The cost of the power step does not depend on training, so the models are timed at initialisation."""
    import time
    from .models import build_model
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


def chapter4_jobs(seeds: int = 5, arms: list[str] | None = None, converge: bool = True,
                  timing: bool = True) -> list[Job]:
    """The chapter-4 claim-run jobs: every arm × seed, plus (``converge``) the 4×-longer convergence runs and
    (``timing``) one interleaved timing job per seed (:func:`chapter4_timing_job`)."""
    jobs = []
    for arm in arms or list(CHAPTER4_ARMS):
        for seed in range(seeds):
            jobs.append(Job(arm, "moewidgets.reproduce:chapter4_job", {"run": chapter4_run(arm, seed).to_dict()},
                            seed))
            if converge:
                jobs.append(Job(arm + ":4x", "moewidgets.reproduce:chapter4_job",
                                {"run": chapter4_run(arm, seed, 4).to_dict(), "converge_only": True}, seed))
    if timing:
        for seed in range(seeds):
            jobs.append(Job("timing", "moewidgets.reproduce:chapter4_timing_job",
                            {"tokens": 256, "rounds": 30, "steps": 10}, seed))
    return jobs


def _versus_constant(arms, claim: str, statement: str, metric: str, a: str, const: float, sign: int,
                     converged: bool | None = None) -> ClaimResult:
    """A claim about one arm against a fixed level: ``diff = metric(a) − const`` per seed, same pass rule.
    ``converged``: override the convergence check (timings of untrained models: not applicable, shown as yes)."""
    seeds = sorted(arms[a])
    va = np.array([arms[a][s][metric] for s in seeds], dtype=float)
    d = va - const
    n_sign = int(np.sum(np.sign(d) == sign))
    lo, hi = bootstrap_ci(d)
    holds = n_sign >= math.ceil(0.8 * len(seeds)) and (hi < 0 if sign < 0 else lo > 0)
    return ClaimResult(claim, statement, metric, a, f"{const:g}", float(va.mean()),
                       float(va.std(ddof=1)) if len(va) > 1 else 0.0, const, 0.0, n_sign, len(seeds), (lo, hi),
                       bool(holds), _converged(arms, a) if converged is None else converged)


def _shifted(arms, arm: str, metric: str, offset: float) -> str:
    """An ``arm@+offset`` view whose ``metric`` is the arm's plus ``offset`` (a margin in a paired claim)."""
    name = f"{arm}@{offset:+g}"
    arms[name] = {s: {metric: m[metric] + offset} for s, m in arms[arm].items()}
    return name


def chapter4_claims(rows: list[dict]) -> list[ClaimResult]:
    """MPI-a … MPI-i (spec §2.10) from chapter-4 claim-run rows (pass rule and convergence as for chapter 1).

    ``A`` is the arm, ``B`` the comparison arm or a fixed level; ``arm@init`` uses the values at initialisation
    and ``arm@+0.2`` adds a margin of 0.2 to the comparison arm."""
    arms = _by_arm(rows)
    for arm in list(CHAPTER4_ARMS):
        if arm in arms:
            arms[arm + "@init"] = {s: {k[5:]: v for k, v in m.items() if k.startswith("init_")}
                                   for s, m in arms[arm].items()}
    out = [
        _versus_constant(arms, "MPI-a", "retracted Riemannian step = power step (float64, rel. error)",
                         "identity_err", "mpi", 1e-10, -1),
        _versus_constant(arms, "MPI-b", "200 power steps reach v1 where σ2/σ1 < 0.9: min |cos| > 0.999",
                         "power_cos_min", "mpi", 0.999, +1),
        _versus_constant(arms, "MPI-b", "c2/c1 shrinks by (σ2/σ1)² per step (rel. error < 1e-6)",
                         "power_rate_err", "mpi", 1e-6, -1),
        _compare(arms, "MPI-c", "at init, λ(R') of MPI > λ(R) of the plain router", "lam", "mpi@init",
                 "softmax@init", +1),
        _compare(arms, "MPI-c", "at init, |cos(R', v1)| of MPI > plain router's", "cos", "mpi@init",
                 "softmax@init", +1),
        _versus_constant(arms, "MPI-c", "at init, |cos(R', v1)| stays below 0.9 (spec's prediction)", "init_cos",
                         "mpi", 0.9, -1),
        _compare(arms, "MPI-d", "trained: λ(R') of MPI ≥ plain λ(R) + 0.2", "lam", "mpi",
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
        _versus_constant(arms, "MPI-h", "the power step costs time per training step (ratio to softmax > 1)",
                         "mpi_over_softmax", "timing", 1.0, +1, converged=True),
        _versus_constant(arms, "MPI-h", "precomputed R' gives the same logits (rel. error < 1e-6)",
                         "precompute_logit_err", "mpi", 1e-6, -1),
        _compare(arms, "MPI-i", "detached W (ours): probe MSE differs from official (higher)", "probe_mse",
                 "mpi-detach", "mpi", +1),
        _compare(arms, "MPI-i", "detached W (ours): λ(R') differs from official (lower)", "lam", "mpi-detach", "mpi",
                 -1),
    ]
    return out


PINNED_METRICS_CH4 = ("probe_mse", "lam", "cos", "gap", "maxvio_global")
