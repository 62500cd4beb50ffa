"""What every chapter's claim runs share: the pass rule, claim results and their table, convergence, results files,
and the seed groups every MLP arm trains with.

Pass rule (paper-1 spec §1.6): a claim *holds* when the paired per-seed difference has the predicted sign in at
least 4 of 5 seeds (80 %, rounded up) **and** its 95 % bootstrap CI over seeds excludes 0.
Convergence (ours): an arm has converged when, for every seed, its probe MSE after N steps is within
``CONVERGENCE_MARGIN`` × Var(y) of the MSE after 4N steps (the longer run would explain < 0.5 % more variance).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig
from ..sweep import Job, read_jsonl

__all__ = ["RESULTS_DIR", "CONVERGENCE_MARGIN", "PROBE_POINTS", "bootstrap_ci", "ClaimResult", "claims_table",
           "convergence_table",
           "PinnedCheck", "load_results", "seed_group_job", "train_seed_group", "row_config",
           "seed_results", "one_seed"]

RESULTS_DIR = Path(__file__).resolve().parent.parent.parent / "book" / "results"
CONVERGENCE_MARGIN = 0.005      # of Var(y): the 4× run may explain at most 0.5 % more variance
PROBE_POINTS = 1024             # probe points per model (spec: 2,000; ours: 1,024 keeps n_eff ≫ D = 32)

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


def convergence_table(rows: list[dict], arms) -> str:
    """Each arm's mean probe MSE after N and 4N steps and its worst seed's gap in units of Var(y), against
    ``CONVERGENCE_MARGIN`` (the convergence rule of every claims table); fixed width, 3 significant digits (what
    nbval compares). Every chapter shows it under its claims table."""
    by_arm = _by_arm(rows)
    n = next(m["steps"] for m in by_arm[next(iter(arms))].values())
    w = max(len(a) for a in arms) + 2
    lines = [f"{'arm':<{w}}{f'MSE {n} steps':>16}{f'MSE {4 * n} steps':>16}{'worst gap / Var(y)':>20}  converged"]
    for arm in arms:
        base, long = by_arm[arm], by_arm.get(arm + ":4x", {})
        seeds = sorted(set(base) & set(long))
        gap = max((base[s]["probe_mse"] - long[s]["probe_mse"]) / base[s]["target_var"] for s in seeds)
        mse = sum(base[s]["probe_mse"] for s in seeds) / len(seeds)
        mse4 = sum(long[s]["probe_mse"] for s in seeds) / len(seeds)
        ok = "yes" if _converged(by_arm, arm) else "NO"
        lines.append(f"{arm:<{w}}{mse:>16.3g}{mse4:>16.3g}{gap:>20.2%}  {ok}")
    return "\n".join(lines)


def _with_init_views(arms: dict[str, dict[int, dict]], names) -> dict[str, dict[int, dict]]:
    """Add an ``arm@init`` view for every arm in ``names``: its metrics are the arm's ``init_*`` ones, renamed (the
    claims that compare a trained model with its initialisation). Returns ``arms``."""
    for arm in list(names):
        if arm in arms:
            arms[arm + "@init"] = {s: {k[5:]: v for k, v in m.items() if k.startswith("init_")}
                                   for s, m in arms[arm].items()}
    return arms


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



def load_results(chapter: str, results_dir: str | Path | None = None) -> list[dict]:
    """The committed claim-run rows of a chapter."""
    return read_jsonl(Path(results_dir or RESULTS_DIR) / f"{chapter}.jsonl")



# ------------------------------------------------------------------------------------------------ seed groups

def seed_group_job(arm: str, fn: str, payload: dict[str, Any], seeds: int) -> Job:
    """One job that trains seeds 0 … ``seeds``−1 of an MLP arm at once (:class:`~moewidgets.multiseed.MultiSeedTrainer`)
    and gives one row per seed. ``payload["run"]`` is the arm's RunConfig dict (its seed is replaced per seed); the
    payload gains ``"dispatch"``: the path the group's S·B tokens take, so that a live re-run of one seed
    (:func:`train_seed_group` with ``[seed]``, the pinned subset) takes the same one.

    >>> from moewidgets.reproduce import chapter1_run
    >>> job = seed_group_job("top-2", "moewidgets.reproduce:chapter1_seeds_job", {"run": chapter1_run("top-2", 0).to_dict()}, 5)
    >>> job.seeds, job.payload["dispatch"], job.n_rows
    ((0, 1, 2, 3, 4), 'gather', 5)
    """
    from ..nn.layer import choose_dispatch
    run = RunConfig.from_dict(payload["run"])
    m = run.model
    dispatch = choose_dispatch(seeds * run.train.batch_size, m.n_experts, m.k, m.d_model, m.d_hidden, m.expert)
    return Job(arm, fn, {**payload, "dispatch": dispatch}, seed=0, seeds=tuple(range(seeds)))


def train_seed_group(payload: dict[str, Any], seeds: list[int], before=None, every: int | None = None, callback=None):
    """Build the :class:`~moewidgets.multiseed.MultiSeedTrainer` of ``payload["run"]`` over ``seeds`` (dispatch
    ``payload["dispatch"]``, default "auto"), call ``before(trainer)`` (probes at initialisation), train to the end
    with ``callback(trainer)`` every ``every`` steps, and return the trainer. A seed whose loss went non-finite
    fails the job, as its own ``Trainer`` run would have."""
    from ..multiseed import MultiSeedTrainer
    run = RunConfig.from_dict(payload["run"])
    trainer = MultiSeedTrainer(run, seeds, dispatch=payload.get("dispatch", "auto"))
    if before is not None:
        before(trainer)
    trainer.run(callback, every or max(1, run.train.steps))
    if trainer.errors:
        seed, err = next(iter(trainer.errors.items()))
        raise RuntimeError(f"seed {seed} of {list(seeds)}: {err}") from err
    return trainer


def row_config(payload: dict[str, Any], seed: int) -> dict[str, Any]:
    """The config of one seed's row of a seed group: the payload with ``run.model.seed`` set to that seed."""
    out = copy.deepcopy(payload)
    out["run"]["model"]["seed"] = seed
    return out


def seed_results(trainer, payload: dict[str, Any], seeds: list[int], out: list[dict[str, Any]]):
    """After :func:`train_seed_group`: fill what every seed's row holds (``probe_mse``, ``train_loss_last50``,
    ``target_var``, ``steps``, ``_device``, ``_config``) into ``out[s]`` and yield ``(s, out[s], model, data,
    history)`` per seed, for the chapter's own metrics."""
    mse = trainer.evaluate()
    for s, (m, model, data, hist) in enumerate(zip(out, trainer.models(), trainer.data, trainer.histories)):
        m.update(probe_mse=mse[s], train_loss_last50=hist.last_loss(50), target_var=float(data.y_probe.var()),
                 steps=trainer.steps_done, _device=str(trainer.device), _config=row_config(payload, seeds[s]))
        yield s, m, model, data, hist


def one_seed(seeds_job, payload: dict[str, Any], seed: int) -> dict[str, Any]:
    """A chapter's one-(arm, seed) job from its seed-group job: the group of that one seed (the pinned subset's
    live re-run; with the payload's ``dispatch`` it takes the path of the group that made the committed row)."""
    metrics = seeds_job(payload, [seed])[0]
    metrics.pop("_config")
    return metrics
