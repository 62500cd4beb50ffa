"""Claim runs: each chapter's checkable claims over arms × seeds, their verdicts, and the pinned live subset.

``python -m moewidgets reproduce chapter1`` trains every (arm, seed) of chapter 1, probes it at initialisation
and after training, and writes one row per (arm, seed) to ``book/results/chapter1.jsonl`` (config, seed, metrics,
wall time, device, versions). A second set of rows trains each (arm, seed) 4× longer: the convergence check.
The chapter renders :func:`chapter1_claims` from that file and re-runs :func:`pinned_subset` live.

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

__all__ = ["CHAPTER1_ARMS", "chapter1_run", "chapter1_jobs", "chapter1_job", "chapter1_claims", "ClaimResult",
           "claims_table", "pinned_subset", "reproduce", "RESULTS_DIR", "CONVERGENCE_MARGIN", "bootstrap_ci"]

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
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
    finally:
        torch.set_num_threads(threads)


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


def pinned_subset(rows: list[dict], seed: int = 0, arms: list[str] | None = None, rtol: float = 0.02
                  ) -> list[PinnedCheck]:
    """Re-run seed ``seed`` of each arm live and compare with the committed rows (relative tolerance ``rtol``)."""
    committed = {(r["arm"], r["seed"]): r for r in rows}
    checks = []
    for arm in arms or list(CHAPTER1_ARMS):
        row = committed[(arm, seed)]
        live = chapter1_job(dict(row["config"]), seed)
        devs = {m: abs(live[m] - row["metrics"][m]) / max(abs(row["metrics"][m]), 1e-12) for m in PINNED_METRICS}
        worst = max(devs, key=devs.get)
        checks.append(PinnedCheck(arm, seed, devs[worst], worst, devs[worst] <= rtol))
    return checks


def reproduce(chapter: str, seeds: int = 5, executor=None, out_dir: str | Path | None = None,
              cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Run a chapter's claim runs (resumable through ``cache_dir``) and write ``<out_dir>/<chapter>.jsonl``."""
    if chapter != "chapter1":
        raise ValueError(f"chapter={chapter!r} must be one of ['chapter1'] (chapters 2–4 add theirs)")
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    cache_dir = Path(cache_dir) if cache_dir is not None else Path("build") / "cache" / chapter
    rows = run_jobs(chapter1_jobs(seeds), executor=executor, cache_dir=cache_dir, progress=progress,
                    desc=f"reproduce {chapter}")
    return write_jsonl(rows, out_dir / f"{chapter}.jsonl")


def load_results(chapter: str, results_dir: str | Path | None = None) -> list[dict]:
    """The committed claim-run rows of a chapter."""
    return read_jsonl(Path(results_dir or RESULTS_DIR) / f"{chapter}.jsonl")
