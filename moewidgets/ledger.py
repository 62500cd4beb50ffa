"""The claims ledger: every checkable claim of the four papers, where the course tests it, and its verdict.

Each claim id of the paper specs (``SC-1`` … ``SC-8`` with ``SC-1b``, ``GA-1`` … ``GA-7``, ``RC-a`` … ``RC-g``,
``MPI-a`` … ``MPI-i``) has one entry in :data:`CLAIMS`: the paper, a one-line statement (ours), the chapter whose
claim runs test it, the metrics, and the command that produces the evidence. :func:`ledger` reads the committed
claim runs (``book/results/CHAPTER.jsonl``, written by ``python -m moewidgets reproduce CHAPTER``), renders each
chapter's claims table with its own claims function (``moewidgets.reproduce.CHAPTERS[chapter].claims``), and
counts, per claim id, how many comparison rows hold under the pass rule (:data:`PASS_RULE`).

Verdicts (:data:`VERDICTS`)::

    holds            every comparison row of the claim holds
    partly           some rows hold, some do not
    fails            no row holds
    not run          no committed results for its chapter, or no row for the claim in them
    untestable here  needs what the course cannot run (pretrained checkpoints): the command says how

The claims ledger (book/ledger.ipynb).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .reproduce import CHAPTERS, RESULTS_DIR, ClaimResult, load_results

__all__ = ["PASS_RULE", "VERDICTS", "PAPERS", "Paper", "Claim", "CLAIMS", "LedgerRow", "verdict",
           "ledger_from_results", "ledger", "ledger_table", "ledger_markdown", "ledger_pending"]

#: The pass rule of one comparison row, in words (moewidgets.reproduce.common implements it).
PASS_RULE = ("a comparison row holds when the paired per-seed difference A − B has the predicted sign in at least "
             "80 % of the seeds (4 of 5) and its 95 % bootstrap CI over seeds excludes 0; separately, each row says "
             "whether its arms were shown to have converged (final loss within a stated margin of a run 4× longer, "
             "e.g. probe MSE within 0.5 % of Var(y))")
#: The verdicts, best first.
VERDICTS = ("holds", "partly", "fails", "not run", "untestable here")


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
    """

    id: str
    paper: str
    statement: str
    chapter: str | None
    metrics: str
    command: str


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
    res = layer_asymmetry(expert_bank(block.experts), traces[L], rank=16)     # spec: r in {8, 16, 32}
    print(L, res.summary.summary())"""


def _claim(id_: str, statement: str, chapter: str | None, metrics: str, command: str | None = None) -> Claim:
    paper = PAPERS[id_.split("-")[0]].short
    return Claim(id_, paper, statement, chapter, metrics, command or _reproduce(chapter))


#: Every claim id of the paper specs, in spec order (paper, then id).
CLAIMS: tuple[Claim, ...] = (
    # Liu, soft clustering (spec §1.6): chapter 1 (controlled MLP-MoE); SC-7/SC-8 need the 3-layer transformer.
    _claim("SC-1", "an expert's own Jacobian has a smaller top singular value than a dense net's", "chapter1",
           "gate-weighted mean σ1 of J_i vs dense (param- and active-matched)"),
    _claim("SC-1b", "the whole MoE layer is less sensitive than a dense net", "chapter1",
           "mean σ1 of the layer Jacobian J_f vs dense J_D"),
    _claim("SC-2", "expert Jacobian spectra decay faster than a dense net's", "chapter1",
           "stable rank (lower), power-law decay exponent α (higher)"),
    _claim("SC-3", "expert outputs spread over more directions than a dense net's", "chapter1",
           "entropy effective rank of the gate-weighted PCA of H-out"),
    _claim("SC-4", "the experts' mean Jacobians are nearly orthogonal", "chapter1",
           "mean |A_ij| vs split-half ceiling and dense pseudo-experts"),
    _claim("SC-5", "sharper routing gives lower-rank expert structure", "chapter1",
           "PCA effective rank and stable rank over top-1 → 2 → 4 → soft"),
    _claim("SC-6", "the MoE–dense gaps come from training, not from the architecture", "chapter1",
           "gap to dense after training vs at initialisation"),
    _claim("SC-7", "in a 3-layer transformer, MoE FFN experts are less sensitive than a dense FFN", "chapter2",
           "mean σ1 of expert-FFN Jacobians vs the dense FFN, per layer"),
    _claim("SC-8", "in a 3-layer transformer, top-2 experts are less aligned than fully soft ones", "chapter2",
           "mean |A_ij| per layer, top-2 vs soft"),
    # Liu, geometric asymmetry (spec §2.6): chapter 2; GA-7 needs pretrained checkpoints.
    _claim("GA-1", "trained experts' Jacobians are nearly decorrelated", "chapter2",
           "mean |cos_F| of mean Jacobians, co-selected per-token cosine, vs split-half ceiling"),
    _claim("GA-2", "the experts' routed input subspaces are distinct", "chapter2",
           "between-expert Grassmann distance vs same-expert split-half floor (and random groups)"),
    _claim("GA-3", "… but partially overlapping", "chapter2",
           "between-expert distance vs random-subspace references; overlap ov vs r/D"),
    _claim("GA-4", "decorrelated functions on overlapping inputs: the asymmetry", "chapter2",
           "functional vs representational side on one scale (Fz vs Rz)"),
    _claim("GA-5", "sparser routing separates the experts' functions more", "chapter2",
           "mean |A_ij| over top-1, top-2, top-4, soft (paired over seeds)"),
    _claim("GA-6", "sparser routing separates the experts' subspaces more", "chapter2",
           "mean between-expert geodesic distance, gate-weighted PCA"),
    _claim("GA-7", "GA-1 … GA-4 also hold in Mixtral-8x7B and Qwen1.5-MoE-A2.7B", None,
           "as GA-1 … GA-4, in every layer", _GA7_COMMAND),
    # Ahrac, Hochwald, Geva (spec §1.12): chapter 3.
    _claim("RC-a", "a selected expert's router row and input weights get gradients parallel to the token", "chapter3",
           "1 − |cos(gradient row, x)|; output-side cosine; unselected rows"),
    _claim("RC-b", "under plain SGD those rows stay in the span of their routed tokens", "chapter3",
           "relative residual of the update outside the routed span (SGD vs AdamW)"),
    _claim("RC-c", "an auxiliary balance loss moves every router row, within the batch's span", "chapter3",
           "aux gradient residual outside own routed span vs outside the batch span"),
    _claim("RC-d", "with the aux loss the router rows become more alike (paper ≈ 3×)", "chapter3",
           "row similarity S_abs, S_signed: aux vs no balancing and loss-free"),
    _claim("RC-e", "a higher router score predicts a stronger expert activation", "chapter3",
           "Spearman ρ(score, mean |SiLU(W_g x)|) vs permuted-expert null"),
    _claim("RC-f", "the online K-Means router balances load best, at a modest loss cost", "chapter3",
           "MaxVio (global, batch), load std, probe MSE: K-Means vs loss-free vs aux"),
    _claim("RC-g", "a router row points to the mean of the tokens it routes", "chapter3",
           "cos(r_i, own routed mean) vs other experts' means"),
    # Wu, Lv, Xie, Lin (spec §2.10): chapter 4.
    _claim("MPI-a", "the MPI power step is a retracted Riemannian gradient step", "chapter4",
           "relative error between the two steps (float64)"),
    _claim("MPI-b", "repeated power steps reach the top singular vector at rate (σ2/σ1)²", "chapter4",
           "min |cos(r, v1)| after 200 steps; per-step rate error"),
    _claim("MPI-c", "at initialisation MPI rows align better with the experts than a plain router's", "chapter4",
           "alignment λ(R'), |cos(R'_i, v1)| at init"),
    _claim("MPI-d", "the alignment gap survives training (≥ 0.2 in λ)", "chapter4",
           "λ(R'), |cos(R'_i, v1)| after training"),
    _claim("MPI-e", "equal row norms give better load balance", "chapter4",
           "row-norm error; MaxVio (global, batch) vs the plain router"),
    _claim("MPI-f", "MPI does not cost loss (paper: slightly lower)", "chapter4", "probe MSE vs the plain router"),
    _claim("MPI-g", "one power step per forward is enough; ten cost more and do not help", "chapter4",
           "probe MSE and time per step, 10 steps vs 1"),
    _claim("MPI-h", "the power step is cheap, and precomputing R' makes inference identical", "chapter4",
           "time ratio to the plain router; logit error of precomputed R'"),
    _claim("MPI-i", "detaching W in the power step changes loss and alignment (ours)", "chapter4",
           "probe MSE, λ(R'): detached vs official"),
)

_BY_ID: dict[str, Claim] = {c.id: c for c in CLAIMS}


@dataclass(frozen=True)
class LedgerRow:
    """One claim in the ledger: the :class:`Claim` and how its comparison rows came out.

    Fields::

        claim        the Claim (id, paper, statement, chapter, metrics, command)
        verdict      one of VERDICTS
        n_rows       comparison rows in its chapter's claims table
        n_hold       rows that hold (pass rule)
        n_converged  rows whose compared arms are shown to have converged
        note         why it is not run / untestable ("" when it ran)
        results      its ClaimResult rows, in the chapter's order
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
    """The verdict of one claim from its comparison rows: "holds" (all hold), "partly" (some), "fails" (none),
    "not run" (no rows), "untestable here" (``testable=False``, whatever the rows).

    >>> from moewidgets.reproduce import ClaimResult
    >>> row = lambda ok: ClaimResult("X-1", "", "m", "a", "b", 1.0, 0.1, 0.0, 0.1, 5, 5, (0.5, 1.5), ok, True)
    >>> verdict([row(True), row(True)]), verdict([row(True), row(False)]), verdict([row(False)]), verdict([])
    ('holds', 'partly', 'fails', 'not run')

    The claims ledger (book/ledger.ipynb).
    """
    if not testable:
        return "untestable here"
    if not results:
        return "not run"
    n_hold = sum(bool(r.holds) for r in results)
    return "holds" if n_hold == len(results) else "partly" if n_hold else "fails"


def ledger_from_results(results: Mapping[str, Sequence[ClaimResult]]) -> list[LedgerRow]:
    """The ledger from each chapter's claims-table rows (``results[chapter]``; a missing chapter: not run).

    Rows are grouped by their ``claim`` id; a row whose id is not in :data:`CLAIMS`, or belongs to another chapter,
    raises a ValueError (the ledger must list every claim a chapter tests).

    >>> from moewidgets.reproduce import ClaimResult
    >>> ok = ClaimResult("MPI-a", "", "m", "a", "1e-10", 1e-13, 0.0, 1e-10, 0.0, 5, 5, (-1e-10, -1e-10), True, True)
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
        if claim.chapter is None:
            note = "needs pretrained checkpoints and a large GPU"
        elif rows:
            note = ""
        elif claim.chapter in results:
            note = f"{claim.chapter}'s claims table has no row for {claim.id}"
        elif claim.chapter not in CHAPTERS:
            note = f"not yet run: {claim.chapter} has no claim runs yet"
        else:
            note = f"not yet run: book/results/{claim.chapter}.jsonl is not committed"
        out.append(LedgerRow(claim, verdict(rows, testable=claim.chapter is not None), len(rows),
                             sum(bool(r.holds) for r in rows), sum(bool(r.converged) for r in rows), note, rows))
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
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    if not folder.is_dir():
        raise ValueError(f"results_dir={str(results_dir)!r} is not a directory: pass the folder holding "
                         f"CHAPTER.jsonl files (default: {RESULTS_DIR})")
    results: dict[str, list[ClaimResult]] = {}
    for chapter in sorted({c.chapter for c in CLAIMS if c.chapter in CHAPTERS}):
        if not (folder / f"{chapter}.jsonl").exists():
            continue
        rows = load_results(chapter, folder)
        if rows:
            results[chapter] = CHAPTERS[chapter].claims(rows)
    return ledger_from_results(results)


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
