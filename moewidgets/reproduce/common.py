"""What every chapter's claim runs share: the pass rule, claim declarations and results, their table,
convergence, results files, and the seed groups every MLP arm trains with.

Pass rule (:func:`pass_rule`, the one place it is implemented): a comparison row's verdict, from its paired
per-seed differences ``d_s = A_s − B_s`` and its predicted sign::

    insufficient seeds   fewer seeds than the row's minimum (MIN_SEEDS_MLP = 10 for MLP arms, MIN_SEEDS_LM = 5 for
                         LM arms): never "holds", whatever the signs
    inconclusive         an arm of the row has not converged (convergence rule below)
    holds                ≥ 80 % of the seeds (rounded up) have the predicted sign AND a one-sided one-sample
                         t-test of the mean difference (scipy.stats.ttest_1samp, paired over seeds) rejects 0 in
                         the predicted direction at 5 %
    fails                otherwise

The t-test is not automatically satisfied by unanimous signs: ten positive differences whose mean is small beside
their spread (0.001 nine times and 5.0 once: t ≈ 1.0, p ≈ 0.17) fail, where a sign test or a percentile bootstrap
of five unanimous seeds would pass. (With zero spread, every seed the same non-zero difference, p is 0 in the
predicted direction and 1 otherwise: an exact quantity, no noise to test against.)

Convergence (two-sided): an arm has converged when, for every seed, its probe MSE after N steps differs from the
MSE after 4N steps by at most ``CONVERGENCE_MARGIN`` × Var(y), in either direction (a 4× run that is worse is
not "converged" either).

Roles of a row (``ROLES``): "decides" (the paper's definition and reference: the ledger counts it), "ours"
(a variant or extension of ours, shown and labelled, never decides), "context" (its outcome is fixed by
construction, or it describes rather than tests: shown, never counted).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import RunConfig
from ..sweep import Job, read_jsonl

__all__ = ["RESULTS_DIR", "CONVERGENCE_MARGIN", "PROBE_POINTS", "MIN_SEEDS_MLP", "MIN_SEEDS_LM", "PASS_FRACTION",
           "ALPHA", "PASS_TEST", "ROW_VERDICTS", "CLAIM_VERDICTS", "ROLES", "RuleOutcome", "pass_rule",
           "claim_verdict", "ClaimSpec", "bootstrap_ci", "ClaimResult", "claims_table", "convergence_table",
           "PinnedCheck", "results_dir", "load_results", "seed_group_job", "train_seed_group", "row_config",
           "seed_results", "one_seed", "seed_range", "verdict_counts"]

CONVERGENCE_MARGIN = 0.005      # of Var(y): the 4× run may differ by at most 0.5 % of the variance, either way
PROBE_POINTS = 1024             # probe points per model (spec: 2,000; ours: 1,024 keeps n_eff ≫ D = 32)
MIN_SEEDS_MLP = 10              # seeds an MLP arm needs before a row can hold (seed groups make them cheap)
MIN_SEEDS_LM = 5                # seeds an LM arm needs
PASS_FRACTION = 0.8             # of the seeds, rounded up, must have the predicted sign
ALPHA = 0.05                    # level of the one-sided test
#: The test of the pass rule, in words (tables and the book state it from here).
PASS_TEST = "one-sided one-sample t-test of the paired per-seed differences (scipy.stats.ttest_1samp), 5 %"
#: The verdicts of one comparison row.
ROW_VERDICTS = ("holds", "fails", "inconclusive", "insufficient seeds")
#: The verdicts of a claim (its deciding rows together), best first.
CLAIM_VERDICTS = ("holds", "partly", "fails", "inconclusive", "insufficient seeds", "not run", "untestable here")
ROLES = ("decides", "ours", "context")


# ------------------------------------------------------------------------------------------------ results dir

def _locate_results_dir() -> Path | None:
    env = os.environ.get("MOEWIDGETS_RESULTS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent.parent       # the checkout holding moewidgets/ (a source tree)
    if (repo / "pyproject.toml").is_file() and (repo / "book" / "results").is_dir():
        return repo / "book" / "results"
    return None


def results_dir() -> Path:
    """The folder of the committed claim-run rows the book reads: ``$MOEWIDGETS_RESULTS`` if set, else the
    repository's ``book/results`` next to the package source (a source checkout); never a folder inside an
    installed package. Raises a FileNotFoundError naming both places when neither exists.

    >>> results_dir().name
    'results'
    """
    found = _locate_results_dir()
    if found is None:
        repo = Path(__file__).resolve().parent.parent.parent
        raise FileNotFoundError(
            "no committed results: set MOEWIDGETS_RESULTS to a folder of CHAPTER.jsonl files, or run from a "
            f"source checkout of moewidgets (looked for {repo / 'book' / 'results'} next to a pyproject.toml)")
    return found


_results_dir = results_dir          # load_results' parameter shadows the name

#: The committed rows' folder (:func:`results_dir`), or None when there is none (an installed package).
RESULTS_DIR: Path | None = _locate_results_dir()


def seed_range(seeds: int, seed_start: int = 0) -> tuple[int, ...]:
    """The seeds a claim run trains: ``seed_start … seed_start + seeds − 1`` (validated).

    >>> seed_range(3, 100)
    (100, 101, 102)
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ValueError(f"seeds={seeds!r} must be an integer >= 2 (a paired test needs at least two seeds)")
    if isinstance(seed_start, bool) or not isinstance(seed_start, int) or seed_start < 0:
        raise ValueError(f"seed_start={seed_start!r} must be a non-negative integer")
    return tuple(range(seed_start, seed_start + seeds))


# ------------------------------------------------------------------------------------------------ the pass rule

def bootstrap_ci(values: np.ndarray, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (deterministic: a seeded numpy generator). Shown in the
    claims tables as a description of the spread; the pass rule uses :func:`pass_rule`'s t-test."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class RuleOutcome:
    """What :func:`pass_rule` decided for one row: ``verdict`` (one of ROW_VERDICTS), the seeds with the predicted
    sign ``n_sign`` of ``n_seeds`` (``need`` of them required), and the one-sided t-test's ``t`` and ``p``."""

    verdict: str
    n_sign: int
    n_seeds: int
    need: int
    t: float
    p: float


def _one_sided_t(d: np.ndarray, sign: int) -> tuple[float, float]:
    """t statistic and one-sided p of H1: sign · mean(d) > 0 (scipy.stats.ttest_1samp)."""
    from scipy import stats
    if len(d) < 2:
        return math.nan, math.nan
    if float(np.std(d)) == 0.0:                    # every seed the same: exact, no noise to test against
        return (math.inf if sign * d[0] > 0 else -math.inf), (0.0 if sign * d[0] > 0 else 1.0)
    with warnings.catch_warnings():
        # differences equal to rounding (e.g. 1e-16 apart) make scipy warn of "precision loss"; the test is still
        # the one defined, and the warning would only clutter the chapters' outputs
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_1samp(sign * d, 0.0, alternative="greater")
    return float(res.statistic), float(res.pvalue)


def pass_rule(diffs: Sequence[float], sign: int, *, min_seeds: int = MIN_SEEDS_MLP,
              converged: bool = True) -> RuleOutcome:
    """The pass rule of every claims row (module docstring): ``diffs`` the per-seed differences A − B, ``sign``
    the predicted sign (−1 or +1), ``min_seeds`` the row's minimum, ``converged`` whether its arms converged.

    Order: too few seeds → "insufficient seeds"; not converged → "inconclusive"; then
    ``n_sign ≥ ⌈0.8·n⌉`` and one-sided t-test p < 0.05 → "holds", else "fails". NaN differences count as seeds
    without the predicted sign (and make the t-test NaN: "fails").

    >>> pass_rule([0.2, 0.3, 0.25, 0.2, 0.3], +1, min_seeds=5).verdict
    'holds'
    >>> pass_rule([0.2, 0.3, 0.25, 0.2, 0.3], +1).verdict               # an MLP row needs 10 seeds
    'insufficient seeds'
    >>> pass_rule([0.001] * 9 + [5.0], +1).verdict                       # 10/10 signs, mean small beside the noise
    'fails'
    >>> pass_rule([0.2] * 10, -1).verdict, pass_rule([0.2] * 10, +1, converged=False).verdict
    ('fails', 'inconclusive')
    """
    if sign not in (-1, 1):
        raise ValueError(f"sign={sign!r} must be -1 or +1")
    if isinstance(min_seeds, bool) or not isinstance(min_seeds, int) or min_seeds < 2:
        raise ValueError(f"min_seeds={min_seeds!r} must be an integer >= 2")
    d = np.asarray(diffs, dtype=float).ravel()
    n = len(d)
    n_sign = int(np.sum(np.sign(d) == sign))
    need = math.ceil(PASS_FRACTION * n - 1e-9)
    t, p = _one_sided_t(d, sign) if n >= 2 else (math.nan, math.nan)
    if n < min_seeds:
        verdict = "insufficient seeds"
    elif not converged:
        verdict = "inconclusive"
    elif n_sign >= need and math.isfinite(p) and p < ALPHA:
        verdict = "holds"
    else:
        verdict = "fails"
    return RuleOutcome(verdict, n_sign, n, need, t, p)


def claim_verdict(rows: Sequence["ClaimResult"]) -> str:
    """The verdict of one claim from its comparison rows (what every chapter and the ledger report): only the
    rows with role "decides" count.

    no deciding row → "not run"; all hold → "holds"; all decided (holds/fails) and none holds → "fails"; all
    decided, some hold → "partly"; some rows undecided: "partly" if rows both hold and fail, else
    "insufficient seeds" if any row lacks seeds, else "inconclusive".

    >>> r = lambda v: ClaimResult("X-1", "", "m", "a", "b", 0, 0, 0, 0, 0, 0, (0, 0), v == "holds", True, verdict=v)
    >>> claim_verdict([r("holds"), r("holds")]), claim_verdict([r("holds"), r("fails")]), claim_verdict([r("fails")])
    ('holds', 'partly', 'fails')
    >>> claim_verdict([r("holds"), r("insufficient seeds")]), claim_verdict([r("inconclusive")]), claim_verdict([])
    ('insufficient seeds', 'inconclusive', 'not run')
    """
    deciding = [r for r in rows if r.role == "decides"]
    if not deciding:
        return "not run"
    v = [r.verdict for r in deciding]
    n_hold, n_fail = v.count("holds"), v.count("fails")
    if n_hold + n_fail == len(v):
        return "holds" if n_hold == len(v) else "partly" if n_hold else "fails"
    if n_hold and n_fail:
        return "partly"
    return "insufficient seeds" if "insufficient seeds" in v else "inconclusive"


# ------------------------------------------------------------------------------------------------ declarations

@dataclass(frozen=True)
class ClaimSpec:
    """One checkable claim as a chapter declares it (once; the ledger is generated from these).

    Fields::

        id         the course-wide id ("SC-1", "RC-d", ...)
        statement  the claim in one line, in our words
        metrics    what is compared (the metric names and their references)
        sign       the predicted sign of A − B of its deciding rows, in words ("σ1: MoE − dense < 0")
        reference  where the paper (notes) define it: "dual-jacobian-pca-and-grassmann.md §1.6"
    """

    id: str
    statement: str
    metrics: str
    sign: str
    reference: str


@dataclass
class ClaimResult:
    """One line of a claims table: ``diff = metric(a) − metric(b)`` per seed, predicted ``sign`` (−1 or +1).

    ``holds``: the row passes the pass rule; ``verdict``: one of ROW_VERDICTS (computed by :func:`pass_rule` in
    the chapters; when left empty, derived from ``holds`` and ``converged``); ``role``: one of ROLES; ``p``: the
    one-sided t-test's p-value."""

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
    verdict: str = ""
    role: str = "decides"
    p: float = math.nan
    diffs: tuple[float, ...] = field(default=(), compare=False)   # the per-seed differences d_s (for forest plots)
    sign: int = 0                                                   # the predicted sign of d (0: not recorded)

    def __post_init__(self):
        if not self.verdict:
            self.verdict = "inconclusive" if not self.converged else "holds" if self.holds else "fails"
        if self.verdict not in ROW_VERDICTS:
            raise ValueError(f"verdict={self.verdict!r} must be one of {ROW_VERDICTS}")
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} must be one of {ROLES}")
        self.holds = self.verdict == "holds"


def _by_arm(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r["arm"], {})[r["seed"]] = r["metrics"]
    return out


def _conv_gaps(base: dict[int, dict], long: dict[int, dict], loss: str, scale: str | None) -> dict[int, float]:
    """Per seed, (loss after N − loss after the longer run), in units of ``scale`` (None: raw)."""
    return {s: (base[s][loss] - long[s][loss]) / (base[s][scale] if scale else 1.0)
            for s in sorted(set(base) & set(long))}


def _converged(arms: dict[str, dict[int, dict]], arm: str) -> bool:
    """Two-sided: every seed's probe MSE after N steps within CONVERGENCE_MARGIN × Var(y) of the 4× run's, either
    way; an arm without 4× rows for every seed has not been shown to converge."""
    long = arms.get(arm + ":4x", {})
    base = arms.get(arm, {})
    if not base or set(long) != set(base):
        return False
    return all(abs(g) <= CONVERGENCE_MARGIN for g in _conv_gaps(base, long, "probe_mse", "target_var").values())


def convergence_table(rows: list[dict], arms) -> str:
    """Each arm's mean probe MSE after N and 4N steps and its worst seed's ``|gap|`` in units of Var(y) (signed:
    + means the 4× run is better), against ``CONVERGENCE_MARGIN`` either way (the convergence rule of every claims
    table); fixed width, 3 significant digits (what nbval compares). Every chapter shows it under its claims
    table. Arms without rows are skipped."""
    by_arm = _by_arm(rows)
    arms = [a for a in arms if a in by_arm]
    n = next(m["steps"] for m in by_arm[arms[0]].values())
    w = max(len(a) for a in arms) + 2
    lines = [f"{'arm':<{w}}{f'MSE {n} steps':>16}{f'MSE {4 * n} steps':>16}{'worst gap / Var(y)':>20}  converged"]
    for arm in arms:
        base, long = by_arm[arm], by_arm.get(arm + ":4x", {})
        gaps = _conv_gaps(base, long, "probe_mse", "target_var")
        if not gaps:
            lines.append(f"{arm:<{w}}{'(no 4× runs)':>16}")
            continue
        gap = max(gaps.values(), key=abs)
        mse = sum(base[s]["probe_mse"] for s in gaps) / len(gaps)
        mse4 = sum(long[s]["probe_mse"] for s in gaps) / len(gaps)
        ok = "yes" if _converged(by_arm, arm) else "NO"
        lines.append(f"{arm:<{w}}{mse:>16.3g}{mse4:>16.3g}{gap:>+20.2%}  {ok}")
    return "\n".join(lines)


def _with_init_views(arms: dict[str, dict[int, dict]], names) -> dict[str, dict[int, dict]]:
    """Add an ``arm@init`` view for every arm in ``names``: its metrics are the arm's ``init_*`` ones, renamed (the
    claims that compare a trained model with its initialisation). Returns ``arms``."""
    for arm in list(names):
        if arm in arms:
            arms[arm + "@init"] = {s: {k[5:]: v for k, v in m.items() if k.startswith("init_")}
                                   for s, m in arms[arm].items()}
    return arms


def _base_arm(name: str) -> str:
    """The trained arm behind a view: ``top-2@init`` → ``top-2``, ``none@×1.5`` → ``none``."""
    return name.split("@")[0]


def _summary(va: np.ndarray, vb: np.ndarray):
    sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return float(np.mean(va)), sd(va), float(np.mean(vb)), sd(vb)


def _result(claim, statement, metric_label, a, b, va, vb, d, sign, min_seeds, converged, role) -> ClaimResult:
    out = pass_rule(d, sign, min_seeds=min_seeds, converged=converged)
    lo, hi = bootstrap_ci(d) if len(d) else (math.nan, math.nan)
    return ClaimResult(claim, statement, metric_label, a, b, *_summary(va, vb), out.n_sign, out.n_seeds, (lo, hi),
                       out.verdict == "holds", bool(converged), verdict=out.verdict, role=role, p=out.p,
                       diffs=tuple(float(x) for x in np.asarray(d, dtype=float).ravel()), sign=int(sign))


def _compare(arms, claim, statement, metric, a, b, sign, metric_b=None, *, min_seeds: int = MIN_SEEDS_MLP,
             role: str = "decides", converged: bool | None = None) -> ClaimResult:
    """A paired row: ``d_s = metric(a)_s − metric_b(b)_s`` over the seeds both arms have, judged by
    :func:`pass_rule`; ``converged`` (None: both arms' convergence rule) decides "inconclusive"."""
    A, B = arms[a], arms[b]
    seeds = sorted(set(A) & set(B))
    va = np.array([A[s][metric] for s in seeds], dtype=float)
    vb = np.array([B[s][metric_b or metric] for s in seeds], dtype=float)
    conv = (_converged(arms, _base_arm(a)) and _converged(arms, _base_arm(b))) if converged is None else converged
    return _result(claim, statement, metric if metric_b is None else f"{metric} vs {metric_b}", a, b, va, vb,
                   va - vb, sign, min_seeds, conv, role)


def _versus_constant(arms, claim: str, statement: str, metric: str, a: str, const: float, sign: int,
                     converged: bool | None = None, *, min_seeds: int = MIN_SEEDS_MLP,
                     role: str = "decides") -> ClaimResult:
    """A claim about one arm against a fixed level: ``diff = metric(a) − const`` per seed, same pass rule.
    ``converged``: override the convergence check (timings of untrained models: not applicable, shown as yes)."""
    seeds = sorted(arms[a])
    va = np.array([arms[a][s][metric] for s in seeds], dtype=float)
    conv = _converged(arms, _base_arm(a)) if converged is None else converged
    return _result(claim, statement, metric, a, f"{const:g}", va, np.full(len(va), float(const)), va - const, sign,
                   min_seeds, conv, role)


def _training_moved(arms, claim: str, metric: str, a: str, *, min_seeds: int = MIN_SEEDS_MLP,
                    converged: bool | None = None) -> ClaimResult:
    """A context row: did training move ``metric`` of arm ``a`` from its value at initialisation (``a@init``)?
    Paired over seeds with :func:`pass_rule`, tested in the direction the mean moved (the row says which): a
    description of where training took the metric, not a test of a prediction, hence context."""
    A, I = arms[a], arms[a + "@init"]
    seeds = sorted(s for s in set(A) & set(I) if metric in A[s] and metric in I[s])
    va = np.array([A[s][metric] for s in seeds], dtype=float)
    vi = np.array([I[s][metric] for s in seeds], dtype=float)
    d = va - vi
    finite = d[~np.isnan(d)]
    sign = 1 if (finite.mean() if len(finite) else 0.0) >= 0 else -1
    conv = _converged(arms, a) if converged is None else converged
    return _result(claim, f"training {'raised' if sign > 0 else 'lowered'} {metric} (trained vs init; context)",
                   metric, a, a + "@init", va, vi, d, sign, min_seeds, conv, "context")


def _shifted(arms, arm: str, metric: str, offset: float) -> str:
    """An ``arm@+offset`` view whose ``metric`` is the arm's plus ``offset`` (a margin in a paired claim)."""
    name = f"{arm}@{offset:+g}"
    arms[name] = {s: {metric: m[metric] + offset} for s, m in arms[arm].items()}
    return name


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3g}"


def claims_table(results: list[ClaimResult]) -> str:
    """A fixed-width text table of claim results (3 significant digits; what nbval compares): the row's verdict
    under :func:`pass_rule` (its t-test's one-sided p beside it), its role ("ours" and "context" rows never
    decide a claim) and whether its arms converged."""
    head = ("claim", "statement", "A", "B", "mean±sd A", "mean±sd B", "sign", "95% CI of A−B", "p", "verdict",
            "role", "conv.")
    lines = []
    for r in results:
        lines.append((r.claim, r.statement, r.arm_a, r.arm_b, f"{_fmt(r.mean_a)}±{_fmt(r.sd_a)}",
                      f"{_fmt(r.mean_b)}±{_fmt(r.sd_b)}", f"{r.n_sign}/{r.n_seeds}",
                      f"[{_fmt(r.ci[0])}, {_fmt(r.ci[1])}]", _fmt(r.p) if math.isfinite(r.p) else "-", r.verdict,
                      r.role, "yes" if r.converged else "NO"))
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*l) for l in lines]
    return "\n".join(line.rstrip() for line in out)


def verdict_counts(results: Sequence[ClaimResult], role: str | None = "decides") -> dict[str, int]:
    """How many rows (of ``role``; None: all) have each row verdict.

    >>> verdict_counts([ClaimResult("X", "", "m", "a", "b", 0, 0, 0, 0, 0, 0, (0, 0), True, True)])
    {'holds': 1, 'fails': 0, 'inconclusive': 0, 'insufficient seeds': 0}
    """
    rows = [r for r in results if role is None or r.role == role]
    return {v: sum(r.verdict == v for r in rows) for v in ROW_VERDICTS}


# ------------------------------------------------------------------------------------------------ pinned subset

@dataclass
class PinnedCheck:
    """A live re-run of one committed row: the largest relative deviation over the checked metrics."""

    arm: str
    seed: int
    max_rel_dev: float
    worst_metric: str
    ok: bool


def _check_one_version(rows: list[dict], path: Path) -> None:
    """Refuse rows from more than one commit / package version (a missing ``commit`` field is one group)."""
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        groups.setdefault((r.get("commit"), r.get("version")), []).append(f"{r.get('arm')}/{r.get('seed')}")
    if len(groups) > 1:
        parts = [f"commit={c!r} version={v!r}: {len(names)} rows ({', '.join(names[:4])}"
                 f"{', …' if len(names) > 4 else ''})" for (c, v), names in groups.items()]
        raise ValueError(f"{path} mixes rows from {len(groups)} commits/versions; re-run the chapter so every row "
                         f"comes from one: " + "; ".join(parts))


def load_results(chapter: str, results_dir: str | Path | None = None) -> list[dict]:
    """The committed claim-run rows of a chapter (``results_dir`` default: :func:`results_dir`). A file whose rows
    come from two commits (``commit`` field) or package versions is refused, naming the rows of each."""
    folder = Path(results_dir) if results_dir is not None else _results_dir()
    path = folder / f"{chapter}.jsonl"
    rows = read_jsonl(path)
    _check_one_version(rows, path)
    return rows


# ------------------------------------------------------------------------------------------------ seed groups

def seed_group_job(arm: str, fn: str, payload: dict[str, Any], seeds: int | Sequence[int],
                   seed_start: int = 0) -> Job:
    """One job that trains the seeds of an MLP arm at once (:class:`~moewidgets.multiseed.MultiSeedTrainer`) and
    gives one row per seed: ``seeds`` an int (seeds ``seed_start`` … ``seed_start + seeds − 1``) or the seeds.
    ``payload["run"]`` is the arm's RunConfig dict (its seed is replaced per seed); the payload gains
    ``"dispatch"``: the path the group's S·B tokens take, so that a live re-run of one seed
    (:func:`train_seed_group` with ``[seed]``, the pinned subset) takes the same one.

    >>> from moewidgets.reproduce import chapter1_run
    >>> job = seed_group_job("top-2", "moewidgets.reproduce:chapter1_seeds_job", {"run": chapter1_run("top-2", 0).to_dict()}, 5)
    >>> job.seeds, job.payload["dispatch"], job.n_rows
    ((0, 1, 2, 3, 4), 'gather', 5)
    """
    from ..nn.layer import choose_dispatch
    seed_list = tuple(range(seed_start, seed_start + seeds)) if isinstance(seeds, int) else tuple(seeds)
    run = RunConfig.from_dict(payload["run"])
    m = run.model
    dispatch = choose_dispatch(len(seed_list) * run.train.batch_size, m.n_experts, m.k, m.d_model, m.d_hidden,
                               m.expert)
    return Job(arm, fn, {**payload, "dispatch": dispatch}, seed=seed_list[0], seeds=seed_list)


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
