"""The claims ledger: every checkable claim of the four papers, where the course tests it, and its verdict.

Each claim id of the paper specs (``SC-1`` … ``SC-8`` with ``SC-1b``, ``GA-1`` … ``GA-7``, ``RC-a`` … ``RC-g``,
``MPI-a`` … ``MPI-i``) is declared once, by the chapter that tests it (``CLAIMS`` of
``moewidgets.reproduce.chapterN``: statement, metrics, predicted sign, paper reference); :data:`CLAIMS` is
generated from those declarations (plus GA-7, which needs pretrained checkpoints). :func:`ledger` reads the
committed claim runs (``book/results/CHAPTER.jsonl``), renders each chapter's claims table with its own claims
function (``moewidgets.reproduce.CHAPTERS[chapter].claims``), and gives each claim the verdict of
:func:`moewidgets.reproduce.common.claim_verdict` on its rows: the same rows and the same function as the chapter.
Only rows with role "decides" count; "ours" and "context" rows are shown in the chapters and never counted.

Verdicts (:data:`VERDICTS`)::

    holds               every deciding row holds
    partly              some rows hold, some fail
    fails               every deciding row was decided and none holds
    inconclusive        rows on arms not shown to have converged (and none both holds and fails)
    insufficient seeds  rows with fewer seeds than the pass rule needs (10 per MLP arm, 5 per LM arm)
    not run             no committed results for its chapter, or no deciding row for the claim in them
    untestable here     needs what the course cannot run (pretrained checkpoints): the command says how

The claims ledger (book/ledger.ipynb).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import json

from .reproduce import CHAPTERS, ClaimResult, claim_verdict, load_results, results_dir
from .reproduce.common import CLAIM_VERDICTS, MIN_SEEDS_LM, MIN_SEEDS_MLP, PASS_TEST

__all__ = ["PASS_RULE", "VERDICTS", "PAPERS", "Paper", "Claim", "CLAIMS", "LedgerRow", "verdict",
           "ledger_from_results", "ledger", "ledger_table", "ledger_markdown", "ledger_pending", "ledger_models"]

#: The pass rule of one comparison row, in words (moewidgets.reproduce.common.pass_rule implements it).
PASS_RULE = (f"a comparison row holds when at least 80 % of the seeds have the predicted sign of the paired "
             f"difference A − B and a {PASS_TEST} rejects 0; with fewer than {MIN_SEEDS_MLP} seeds per MLP arm "
             f"({MIN_SEEDS_LM} per LM arm) it reads \"insufficient seeds\", and on an arm not shown to have "
             f"converged (final loss within a stated margin of a longer run, in either direction) \"inconclusive\"")
#: The verdicts, best first.
VERDICTS = CLAIM_VERDICTS


@dataclass(frozen=True)
class Paper:
    """One of the four papers behind the course.

    Fields::

        prefix   the claim-id prefix ("SC", "GA", "RC", "MPI")
        short    a short name for tables
        title    the title
        cite     the key in book/references.bib
        spec     where its checkable claims are listed (shared/papers/)
    """

    prefix: str
    short: str
    title: str
    cite: str
    spec: str


#: The papers, by claim-id prefix.
PAPERS: dict[str, Paper] = {p.prefix: p for p in (
    Paper("SC", "Liu, soft clustering",
          "Mixture-of-Experts as Soft Clustering: A Dual Jacobian-PCA Spectral Geometry Perspective",
          "liu2026softclustering", "dual-jacobian-pca-and-grassmann.md §1.6"),
    Paper("GA", "Liu, geometric asymmetry",
          "Geometric Asymmetry in MoE Specialization: Functional Decorrelation and Representational Overlap",
          "liu2026asymmetry", "dual-jacobian-pca-and-grassmann.md §2.6"),
    Paper("RC", "Ahrac et al., router coupling",
          "Routers Learn the Geometry of Their Experts: Geometric Coupling in Sparse Mixture-of-Experts",
          "ahrac2026coupling", "router-coupling-and-mpi.md §1.12"),
    Paper("MPI", "Wu et al., MPI", "Redesign Mixture-of-Experts Routers with Manifold Power Iteration",
          "wu2026mpi", "router-coupling-and-mpi.md §2.10"),
)}


@dataclass(frozen=True)
class Claim:
    """One checkable claim.

    Fields::

        id         the course-wide id ("SC-1", "RC-d", ...)
        paper      the paper's short name (PAPERS[prefix].short)
        statement  the claim in one line, in our words
        chapter    the chapter whose claim runs test it ("chapter1", ...), or None (untestable here)
        metrics    what is compared
        command    what a reader runs to produce the evidence
        sign       the predicted sign of its deciding rows, in words
        reference  where the paper notes define it
    """

    id: str
    paper: str
    statement: str
    chapter: str | None
    metrics: str
    command: str
    sign: str = ""
    reference: str = ""


def _reproduce(chapter: str) -> str:
    return f"python -m moewidgets reproduce {chapter}"


# GA-7 needs the pretrained checkpoints: the moewidgets.hf probes, run by the reader on a large GPU.
_GA7_COMMAND = """\
# pip install "moewidgets[hf]"; Mixtral-8x7B in bf16 needs about 93 GB (one H200, or device_map="auto")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from moewidgets.hf import probe, trace_hf, moe_blocks, expert_bank
from moewidgets.geometry import layer_asymmetry
name = "mistralai/Mixtral-8x7B-v0.1"                  # then again with "Qwen/Qwen1.5-MoE-A2.7B"
model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, device_map="auto")
input_ids = AutoTokenizer.from_pretrained(name)(text, return_tensors="pt").input_ids   # any ~2k tokens of text
for row in probe(model, input_ids).summary():         # GA-1, every layer: alignment vs its null and ceiling
    print(row["layer"], row["alignment_mean_abs"], row["alignment_null_level"], row["alignment_ceiling"])
traces = trace_hf(model, input_ids)                   # GA-2 … GA-4: distances vs split-half floor, random null
for L, block in moe_blocks(model).items():
    res = layer_asymmetry(expert_bank(block.experts), traces[L], rank=16)     # the paper's r in {8, 16, 32}
    print(L, res.summary.summary())"""


_PREFIX_ORDER = ("SC", "GA", "RC", "MPI")


def _claims() -> tuple[Claim, ...]:
    """Every claim, generated from the chapters' declarations (plus GA-7), in spec order: paper, then the order
    the chapters declare them (chapter 1 before chapter 2)."""
    out = []
    for chapter in sorted(CHAPTERS):
        for spec in CHAPTERS[chapter].declared:
            out.append(Claim(spec.id, PAPERS[spec.id.split("-")[0]].short, spec.statement, chapter, spec.metrics,
                             _reproduce(chapter), spec.sign, spec.reference))
    out.append(Claim("GA-7", PAPERS["GA"].short, "GA-1 … GA-4 also hold in Mixtral-8x7B and Qwen1.5-MoE-A2.7B", None,
                     "as GA-1 … GA-4, in every layer", _GA7_COMMAND, "as GA-1 … GA-4",
                     "dual-jacobian-pca-and-grassmann.md §2.6"))
    return tuple(sorted(out, key=lambda c: _PREFIX_ORDER.index(c.id.split("-")[0])))


#: Every claim id of the paper specs, in spec order (paper, then id), generated from the chapters' declarations.
CLAIMS: tuple[Claim, ...] = _claims()

_BY_ID: dict[str, Claim] = {c.id: c for c in CLAIMS}


@dataclass(frozen=True)
class LedgerRow:
    """One claim in the ledger: the :class:`Claim` and how its comparison rows came out.

    Fields::

        claim        the Claim (id, paper, statement, chapter, metrics, command)
        verdict      one of VERDICTS
        n_rows       deciding comparison rows in its chapter's claims table (role "decides")
        n_hold       deciding rows that hold (pass rule)
        n_converged  deciding rows whose compared arms are shown to have converged
        note         why it is not run / untestable ("" when it ran)
        results      all its ClaimResult rows (deciding, ours, context), in the chapter's order
    """

    claim: Claim
    verdict: str
    n_rows: int
    n_hold: int
    n_converged: int
    note: str
    results: tuple[ClaimResult, ...] = field(default=(), repr=False)

    @property
    def id(self) -> str:
        """The claim id."""
        return self.claim.id


def verdict(results: Sequence[ClaimResult], testable: bool = True) -> str:
    """The verdict of one claim from its comparison rows: :func:`moewidgets.reproduce.common.claim_verdict` (the
    chapters' rule: only rows with role "decides" count), or "untestable here" (``testable=False``).

    >>> from moewidgets.reproduce import ClaimResult
    >>> row = lambda ok: ClaimResult("X-1", "", "m", "a", "b", 1.0, 0.1, 0.0, 0.1, 10, 10, (0.5, 1.5), ok, True)
    >>> verdict([row(True), row(True)]), verdict([row(True), row(False)]), verdict([row(False)]), verdict([])
    ('holds', 'partly', 'fails', 'not run')

    The claims ledger (book/ledger.ipynb).
    """
    if not testable:
        return "untestable here"
    return claim_verdict(results)


def ledger_from_results(results: Mapping[str, Sequence[ClaimResult]]) -> list[LedgerRow]:
    """The ledger from each chapter's claims-table rows (``results[chapter]``; a missing chapter: not run).

    Rows are grouped by their ``claim`` id; a row whose id is not in :data:`CLAIMS`, or belongs to another chapter,
    raises a ValueError (the ledger must list every claim a chapter tests).

    >>> from moewidgets.reproduce import ClaimResult
    >>> ok = ClaimResult("MPI-a", "", "m", "a", "1e-10", 1e-13, 0.0, 1e-10, 0.0, 10, 10, (-1e-10, -1e-10), True, True)
    >>> rows = {r.id: r for r in ledger_from_results({"chapter4": [ok]})}
    >>> rows["MPI-a"].verdict, rows["MPI-b"].verdict, rows["RC-a"].verdict, rows["GA-7"].verdict
    ('holds', 'not run', 'not run', 'untestable here')

    The claims ledger (book/ledger.ipynb).
    """
    by_id: dict[str, list[ClaimResult]] = {}
    for chapter, rows in results.items():
        for r in rows:
            claim = _BY_ID.get(r.claim)
            if claim is None:
                raise ValueError(f"results[{chapter!r}] has claim={r.claim!r}, which is not in moewidgets.ledger."
                                 f"CLAIMS: add it there (ids: {', '.join(_BY_ID)})")
            if claim.chapter != chapter:
                raise ValueError(f"results[{chapter!r}] has claim={r.claim!r}, which CLAIMS assigns to "
                                 f"{claim.chapter!r}")
            by_id.setdefault(r.claim, []).append(r)
    out = []
    for claim in CLAIMS:
        rows = tuple(by_id.get(claim.id, ()))
        deciding = [r for r in rows if r.role == "decides"]
        if claim.chapter is None:
            note = "needs pretrained checkpoints and a large GPU"
        elif deciding:
            note = ""
        elif rows:
            note = f"{claim.chapter}'s claims table has only ours/context rows for {claim.id} (its metrics are new)"
        elif claim.chapter in results:
            note = f"{claim.chapter}'s claims table has no row for {claim.id}"
        elif claim.chapter not in CHAPTERS:
            note = f"not yet run: {claim.chapter} has no claim runs yet"
        else:
            note = f"not yet run: book/results/{claim.chapter}.jsonl is not committed"
        out.append(LedgerRow(claim, verdict(rows, testable=claim.chapter is not None), len(deciding),
                             sum(bool(r.holds) for r in deciding), sum(bool(r.converged) for r in deciding), note,
                             rows))
    return out


def ledger(results_dir: str | Path | None = None) -> list[LedgerRow]:
    """The course-wide ledger from the committed claim runs in ``results_dir`` (default: book/results).

    For each chapter with a registered claims function (``moewidgets.reproduce.CHAPTERS``) and a non-empty
    ``CHAPTER.jsonl``, its claims table is rendered with that function; then :func:`ledger_from_results`.
    A chapter without a results file is "not run" (the claims of unregistered chapters too).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...     rows = ledger(empty)
    >>> len(rows), sorted({r.verdict for r in rows})
    (32, ['not run', 'untestable here'])

    The claims ledger (book/ledger.ipynb).
    """
    folder = Path(results_dir) if results_dir is not None else _default_results_dir()
    if not folder.is_dir():
        raise ValueError(f"results_dir={str(results_dir)!r} is not a directory: pass the folder holding "
                         f"CHAPTER.jsonl files (default: $MOEWIDGETS_RESULTS or the repository's book/results)")
    results: dict[str, list[ClaimResult]] = {}
    for chapter in sorted({c.chapter for c in CLAIMS if c.chapter in CHAPTERS}):
        if not (folder / f"{chapter}.jsonl").exists():
            continue
        rows = load_results(chapter, folder)
        if rows:
            results[chapter] = CHAPTERS[chapter].claims(rows)
    return ledger_from_results(results)


def _default_results_dir() -> Path:
    return results_dir()


def ledger_models(results_dir: str | Path | None = None) -> dict[str, int]:
    """How many distinct trained models the committed claim runs hold, each model counted once: a model is its
    run config and seed (chapter 2's MLP arms are chapter 1's models, trained again with other probes: counted
    once). Returns ``{chapter: models first seen there, ..., "total": all distinct}``; convergence runs included.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...     ledger_models(empty)
    {'total': 0}
    """
    folder = Path(results_dir) if results_dir is not None else _default_results_dir()
    seen: set[str] = set()
    out: dict[str, int] = {}
    for chapter in sorted(CHAPTERS):
        if not (folder / f"{chapter}.jsonl").exists():
            continue
        n = 0
        for r in load_results(chapter, folder):
            cfg = r.get("config", {})
            key = json.dumps(cfg.get("run") or cfg.get("lm") or cfg, sort_keys=True) + f"|{r.get('seed')}"
            if key not in seen:
                seen.add(key)
                n += 1
        out[chapter] = n
    out["total"] = len(seen)
    return out


def _count(n: int, total: int, ran: bool) -> str:
    return f"{n}/{total}" if ran else "-"


def ledger_table(rows: Sequence[LedgerRow]) -> str:
    """A fixed-width text table of the ledger (what nbval compares): claim, chapter, rows held, rows converged,
    verdict, statement.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...     print(ledger_table(ledger(empty)[14:16]))
    claim  chapter   held  conv.  verdict          statement
    -----  --------  ----  -----  ---------------  -----------------------------------------------------------
    GA-6   chapter2  -     -      not run          sparser routing separates the experts' subspaces more
    GA-7   -         -     -      untestable here  GA-1 … GA-4 also hold in Mixtral-8x7B and Qwen1.5-MoE-A2.7B

    The claims ledger (book/ledger.ipynb).
    """
    head = ("claim", "chapter", "held", "conv.", "verdict", "statement")
    lines = [(r.id, r.claim.chapter or "-", _count(r.n_hold, r.n_rows, r.n_rows > 0),
              _count(r.n_converged, r.n_rows, r.n_rows > 0), r.verdict, r.claim.statement) for r in rows]
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*line) for line in lines]
    return "\n".join(line.rstrip() for line in out)


def ledger_markdown(rows: Sequence[LedgerRow], links: Mapping[str, str] | None = None) -> str:
    """The ledger as a markdown table (claim, paper, statement, tested in, metrics, held, verdict); ``links`` maps
    a chapter name to a link target (e.g. ``{"chapter1": "chapter1.ipynb"}``).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...     rows = [r for r in ledger(empty) if r.id == "MPI-f"]
    >>> print(ledger_markdown(rows, links={"chapter4": "chapter4.ipynb"}))
    | claim | paper | statement | tested in | metrics | held | verdict |
    |---|---|---|---|---|---|---|
    | MPI-f | Wu et al., MPI | MPI does not cost loss (paper: slightly lower) | [chapter4](chapter4.ipynb)
      | probe MSE vs the plain router | - | not run |

    The claims ledger (book/ledger.ipynb).
    """
    links = links or {}

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| claim | paper | statement | tested in | metrics | held | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ch = r.claim.chapter
        where = "-" if ch is None else f"[{ch}]({links[ch]})" if ch in links else ch
        out.append(f"| {r.id} | {r.claim.paper} | {cell(r.claim.statement)} | {where} | {cell(r.claim.metrics)} | "
                   f"{_count(r.n_hold, r.n_rows, r.n_rows > 0)} | {r.verdict} |")
    return "\n".join(out)


def ledger_pending(rows: Sequence[LedgerRow]) -> str:
    """The claims without a verdict ("not run", "untestable here"), grouped by the command that would produce
    their evidence, with the reason.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...     print(ledger_pending(ledger(empty)[7:9]))
    SC-7, SC-8: not yet run: book/results/chapter2.jsonl is not committed
        python -m moewidgets reproduce chapter2

    The claims ledger (book/ledger.ipynb).
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.verdict in ("not run", "untestable here"):
            groups.setdefault((r.claim.command, r.note), []).append(r.id)
    blocks = []
    for (command, note), ids in groups.items():
        body = "\n".join("    " + line for line in command.splitlines())
        blocks.append(f"{', '.join(ids)}: {note}\n{body}")
    return "\n\n".join(blocks)
