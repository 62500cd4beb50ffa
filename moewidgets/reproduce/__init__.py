"""Claim runs: each chapter's checkable claims over arms × seeds, their verdicts, and the pinned live subset.

``python -m moewidgets reproduce CHAPTER`` runs the chapter's jobs (:mod:`moewidgets.sweep`: resumable, any
executor; an MLP arm's seeds train at once, one seed group per arm on
:class:`~moewidgets.multiseed.MultiSeedTrainer`) and writes one row per (arm, seed) to ``book/results/CHAPTER.jsonl`` (config, seed, metrics, wall time,
device, versions). The chapter renders its claims table from that file and re-runs :func:`pinned_subset` live.

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
from .common import (CONVERGENCE_MARGIN, PROBE_POINTS, RESULTS_DIR, ClaimResult, PinnedCheck, bootstrap_ci,
                     claims_table, convergence_table, load_results)

__all__ = ["CHAPTERS", "Chapter", "reproduce", "pinned_subset", "load_results", "claims_table", "convergence_table",
           "ClaimResult",
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

        jobs            seeds -> list of Job (every arm × seed, as seed groups where the arm has a seed axis,
                        plus the convergence runs)
        claims          committed rows -> list of ClaimResult (the chapter's claims table)
        job             (payload, seed) -> metrics: one (arm, seed); the pinned subset re-runs it live
        arms            the arm names (the pinned subset's default)
        pinned_metrics  the metrics a live re-run is compared on
    """

    jobs: Callable[[int], list[Job]]
    claims: Callable[[list[dict]], list[ClaimResult]]
    job: Callable[[dict, int], dict[str, Any]]
    arms: tuple[str, ...]
    pinned_metrics: tuple[str, ...]


#: Every chapter with claim runs, by name (``python -m moewidgets reproduce NAME``).
CHAPTERS: dict[str, Chapter] = {
    "chapter1": Chapter(chapter1_jobs, chapter1_claims, chapter1_job, tuple(CHAPTER1_ARMS), PINNED_METRICS),
    "chapter2": Chapter(chapter2_jobs, chapter2_claims, chapter2_job, CHAPTER2_PINNED_ARMS, PINNED_METRICS_CH2),
    "chapter3": Chapter(chapter3_jobs, chapter3_claims, chapter3_job, tuple(CHAPTER3_ARMS), PINNED_METRICS_CH3),
    "chapter4": Chapter(chapter4_jobs, chapter4_claims, chapter4_job, tuple(CHAPTER4_ARMS), PINNED_METRICS_CH4),
}


def _chapter(chapter: str) -> Chapter:
    if chapter not in CHAPTERS:
        raise ValueError(f"chapter={chapter!r} must be one of {sorted(CHAPTERS)}")
    return CHAPTERS[chapter]


def reproduce(chapter: str, seeds: int = 5, executor=None, out_dir: str | Path | None = None,
              cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Run a chapter's claim runs (resumable through ``cache_dir``) and write ``<out_dir>/<chapter>.jsonl``.

    ``chapter``: a key of :data:`CHAPTERS`; ``executor``: any ``concurrent.futures.Executor`` (None: serial)."""
    spec = _chapter(chapter)
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    cache_dir = Path(cache_dir) if cache_dir is not None else Path("build") / "cache" / chapter
    rows = run_jobs(spec.jobs(seeds), executor=executor, cache_dir=cache_dir, progress=progress,
                    desc=f"reproduce {chapter}")
    return write_jsonl(rows, out_dir / f"{chapter}.jsonl")


def pinned_subset(rows: list[dict], seed: int = 0, arms: list[str] | None = None, rtol: float = 0.02,
                  chapter: str = "chapter1") -> list[PinnedCheck]:
    """Re-run seed ``seed`` of each arm live and compare with the committed rows (relative tolerance ``rtol``)
    on the chapter's ``pinned_metrics``; one :class:`PinnedCheck` per arm."""
    spec = _chapter(chapter)
    committed = {(r["arm"], r["seed"]): r for r in rows}
    checks = []
    for arm in arms or spec.arms:
        row = committed[(arm, seed)]
        live = spec.job(dict(row["config"]), seed)
        devs = {m: abs(live[m] - row["metrics"][m]) / max(abs(row["metrics"][m]), 1e-12) for m in spec.pinned_metrics}
        worst = max(devs, key=devs.get)
        checks.append(PinnedCheck(arm, seed, devs[worst], worst, devs[worst] <= rtol))
    return checks
