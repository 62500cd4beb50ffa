"""Claim runs: each chapter's checkable claims over arms × seeds, their verdicts, and the pinned live subset.

``python -m moewidgets reproduce CHAPTER`` runs the chapter's jobs (:mod:`moewidgets.sweep`: resumable, any
executor; an MLP arm's seeds train at once, one seed group per arm on
:class:`~moewidgets.multiseed.MultiSeedTrainer`) and writes one row per (arm, seed) to ``build/results/CHAPTER.jsonl``
(config, seed, metrics, wall time, device, versions); the committed rows the book reads live in
``book/results`` (:func:`~moewidgets.reproduce.common.results_dir`) and are written there only on request. The chapter renders its claims table from that file and re-runs :func:`pinned_subset` live.

One module per chapter (``chapter1`` … ``chapter4``) holds its arms, its job function and its verdicts;
:data:`CHAPTERS` registers them, so the command line, :func:`reproduce` and :func:`pinned_subset` know every chapter.
What all chapters share (pass rule, :class:`ClaimResult`, :func:`claims_table`, convergence) is in ``common``.

>>> sorted(CHAPTERS)
['chapter1', 'chapter2', 'chapter3', 'chapter4']
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..sweep import Job, run_jobs, write_jsonl
from .chapter1 import (CHAPTER1_ARMS, CHAPTER1_TRAIN, PINNED_METRICS, chapter1_claims, chapter1_job, chapter1_jobs,
                       chapter1_run, chapter1_seeds_job)
from .chapter2 import (CHAPTER2_ARMS, CHAPTER2_PINNED_ARMS, PINNED_METRICS_CH2, chapter2_claims, chapter2_job,
                       chapter2_jobs, chapter2_seeds_job, chapter2_lm_config, chapter2_mlp_run)
from .chapter3 import (CHAPTER3_ARMS, CHAPTER3_TRAIN, PINNED_METRICS_CH3, chapter3_claims, chapter3_job,
                       chapter3_jobs, chapter3_seeds_job, chapter3_run)
from .chapter4 import (CHAPTER4_ARMS, CHAPTER4_TRAIN, PINNED_METRICS_CH4, chapter4_claims, chapter4_job,
                       chapter4_jobs, chapter4_seeds_job, chapter4_run, chapter4_timing_job)
from .chapter1 import CLAIMS as CHAPTER1_CLAIMS
from .chapter2 import CLAIMS as CHAPTER2_CLAIMS
from .chapter3 import CLAIMS as CHAPTER3_CLAIMS
from .chapter4 import CLAIMS as CHAPTER4_CLAIMS
from .common import (CONVERGENCE_MARGIN, MIN_SEEDS_LM, MIN_SEEDS_MLP, PASS_TEST, PROBE_POINTS, RESULTS_DIR,
                     ClaimResult, ClaimSpec, PinnedCheck, bootstrap_ci, claim_verdict, claims_table,
                     convergence_table, load_results, pass_rule, results_dir, verdict_counts)

__all__ = ["CHAPTERS", "Chapter", "reproduce", "pinned_subset", "load_results", "claims_table", "convergence_table",
           "ClaimResult", "ClaimSpec", "pass_rule", "claim_verdict", "verdict_counts", "results_dir", "PASS_TEST",
           "MIN_SEEDS_MLP", "MIN_SEEDS_LM", "DEFAULT_OUT_DIR",
           "PinnedCheck", "bootstrap_ci", "RESULTS_DIR", "CONVERGENCE_MARGIN", "PROBE_POINTS",
           "CHAPTER1_ARMS", "CHAPTER1_TRAIN", "chapter1_run", "chapter1_jobs", "chapter1_job", "chapter1_seeds_job", "chapter1_claims",
           "CHAPTER2_ARMS", "chapter2_mlp_run", "chapter2_lm_config", "chapter2_jobs", "chapter2_job", "chapter2_seeds_job", "chapter2_claims",
           "CHAPTER3_ARMS", "CHAPTER3_TRAIN", "chapter3_run", "chapter3_jobs", "chapter3_job", "chapter3_seeds_job", "chapter3_claims",
           "CHAPTER4_ARMS", "CHAPTER4_TRAIN", "chapter4_run", "chapter4_jobs", "chapter4_job", "chapter4_seeds_job", "chapter4_claims",
           "chapter4_timing_job"]


@dataclass(frozen=True)
class Chapter:
    """What the claim runs of one chapter consist of.

    Fields::

        jobs            (seeds, seed_start=0) -> list of Job (every arm × seed, as seed groups where the arm
                        has a seed axis, plus the convergence runs)
        claims          committed rows -> list of ClaimResult (the chapter's claims table)
        job             (payload, seed) -> metrics: one (arm, seed); the pinned subset re-runs it live
        arms            the arm names (the pinned subset's default)
        pinned_metrics  the metrics a live re-run is compared on
        declared        the claims the chapter tests (ClaimSpec: id, statement, metrics, sign, paper reference),
                        declared once in the chapter module; the ledger is generated from them
    """

    jobs: Callable[..., list[Job]]
    claims: Callable[[list[dict]], list[ClaimResult]]
    job: Callable[[dict, int], dict[str, Any]]
    arms: tuple[str, ...]
    pinned_metrics: tuple[str, ...]
    declared: tuple[ClaimSpec, ...] = ()


#: Every chapter with claim runs, by name (``python -m moewidgets reproduce NAME``).
CHAPTERS: dict[str, Chapter] = {
    "chapter1": Chapter(chapter1_jobs, chapter1_claims, chapter1_job, tuple(CHAPTER1_ARMS), PINNED_METRICS,
                        CHAPTER1_CLAIMS),
    "chapter2": Chapter(chapter2_jobs, chapter2_claims, chapter2_job, CHAPTER2_PINNED_ARMS, PINNED_METRICS_CH2,
                        CHAPTER2_CLAIMS),
    "chapter3": Chapter(chapter3_jobs, chapter3_claims, chapter3_job, tuple(CHAPTER3_ARMS), PINNED_METRICS_CH3,
                        CHAPTER3_CLAIMS),
    "chapter4": Chapter(chapter4_jobs, chapter4_claims, chapter4_job, tuple(CHAPTER4_ARMS), PINNED_METRICS_CH4,
                        CHAPTER4_CLAIMS),
}


def _chapter(chapter: str) -> Chapter:
    if chapter not in CHAPTERS:
        raise ValueError(f"chapter={chapter!r} must be one of {sorted(CHAPTERS)}")
    return CHAPTERS[chapter]


#: Where :func:`reproduce` writes by default: a build folder, never the committed rows.
DEFAULT_OUT_DIR = Path("build") / "results"


def reproduce(chapter: str, seeds: int = 10, seed_start: int = 0, executor=None, out_dir: str | Path | None = None,
              cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Run a chapter's claim runs on seeds ``seed_start`` … ``seed_start + seeds − 1`` (resumable through
    ``cache_dir``, default ``build/cache/CHAPTER``) and write ``<out_dir>/<chapter>.jsonl``.

    ``out_dir`` defaults to :data:`DEFAULT_OUT_DIR` (``build/results``): the committed rows in ``book/results``
    are only written when that folder is passed explicitly (the command line's ``--commit-results``).
    ``chapter``: a key of :data:`CHAPTERS`; ``executor``: any ``concurrent.futures.Executor`` (None: serial).
    Bad ``seeds`` (< 2, not an integer) or ``seed_start`` (negative, not an integer) fail before any run."""
    spec = _chapter(chapter)
    jobs = spec.jobs(seeds, seed_start=seed_start)            # validates seeds and seed_start
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    cache_dir = Path(cache_dir) if cache_dir is not None else Path("build") / "cache" / chapter
    rows = run_jobs(jobs, executor=executor, cache_dir=cache_dir, progress=progress, desc=f"reproduce {chapter}")
    return write_jsonl(rows, out_dir / f"{chapter}.jsonl")


def pinned_subset(rows: list[dict], seed: int = 0, arms: list[str] | None = None, rtol: float = 0.02,
                  chapter: str = "chapter1") -> list[PinnedCheck]:
    """Re-run seed ``seed`` of each arm live and compare with the committed rows (relative tolerance ``rtol``)
    on the chapter's ``pinned_metrics`` that the row has; one :class:`PinnedCheck` per arm (default: every arm of
    the chapter that the rows hold)."""
    spec = _chapter(chapter)
    committed = {(r["arm"], r["seed"]): r for r in rows}
    if arms is None:                       # the chapter's arms that the rows have (older rows lack newer arms)
        arms = [a for a in spec.arms if (a, seed) in committed]
    checks = []
    for arm in arms:
        row = committed[(arm, seed)]
        live = spec.job(dict(row["config"]), seed)
        devs = {m: abs(live[m] - row["metrics"][m]) / max(abs(row["metrics"][m]), 1e-12) for m in spec.pinned_metrics
                if m in row["metrics"]}
        worst = max(devs, key=devs.get)
        checks.append(PinnedCheck(arm, seed, devs[worst], worst, devs[worst] <= rtol))
    return checks
