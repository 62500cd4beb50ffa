"""Writes book/ledger.ipynb, the course-wide claims ledger (the notebook is the artefact; this keeps its source
reviewable). It trains nothing: it reads the committed claim runs in book/results/.

Run: .venv/bin/python tools/make_ledger.py && .venv/bin/python tools/execute_notebook.py book/ledger.ipynb

Chapters are linked only if their notebook exists when this script runs (re-run it when a chapter lands).
"""
import sys
from pathlib import Path

import nbformat as nbf

BOOK = Path(__file__).resolve().parent.parent / "book"
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell


def chapter(n: int, text: str | None = None) -> str:
    """A link to chapter n if its notebook exists now, else plain text."""
    label = text or f"Chapter {n}"
    return f"[{label}](chapter{n}.ipynb)" if (BOOK / f"chapter{n}.ipynb").exists() else label


cells = []

cells.append(md(r"""# The claims ledger

Every checkable claim of the four papers has an id (`SC-…`, `GA-…`, `RC-…`, `MPI-…`, listed in the paper specs
that the chapters build on). This page collects all of them in one table: what the claim says (in our words), which
chapter tests it, how many of its comparisons hold, and a verdict.

**Where the numbers come from.** Nothing on this page is trained. Every count is read from the committed claim runs
of a chapter, `book/results/CHAPTER.jsonl`, written by

```bash
python -m moewidgets reproduce CHAPTER     # e.g. chapter1: every arm × 5 seeds, plus each run 4× longer
```

and rendered with that chapter's own claims function, so this table and the chapter's claims table cannot disagree.

**Pass rule** (the same for every chapter). A claim is tested by one or more *comparison rows* (one pair of arms,
one metric, over seeds). A row **holds** when the paired per-seed difference A − B has the predicted sign in at least
80 % of the seeds (4 of 5) **and** its 95 % bootstrap confidence interval over seeds excludes 0. Each row also says
whether the arms it compares were shown to have **converged** (for every seed, the final loss within a stated margin
of a run 4× longer, e.g. the probe MSE within 0.5 % of Var(y); each chapter states its margin; column `conv.`). A verdict whose `conv.` count is below its row count rests partly on models not
shown to be converged: read it with the chapter's convergence table.

**Verdicts.**

| verdict | meaning |
|---|---|
| holds | every comparison row of the claim holds |
| partly | some rows hold, some do not (the chapter says which) |
| fails | no row holds |
| not run | no committed claim runs for its chapter (yet) |
| untestable here | needs what this course cannot run, e.g. pretrained checkpoints; the command is given below |

A verdict is about our small-scale replication with our definitions (every set-up choice the papers do not state is
ours, and each chapter marks it so), not about the papers' own experiments."""))

cells.append(code(r"""from moewidgets.ledger import ledger, ledger_table

rows = ledger()          # reads book/results/*.jsonl and renders each chapter's claims table
print(ledger_table(rows))"""))

cells.append(code(r"""from collections import Counter
from moewidgets.ledger import PAPERS, VERDICTS

for prefix, paper in PAPERS.items():
    counts = Counter(r.verdict for r in rows if r.id.startswith(prefix + "-"))
    print(f"{paper.short:<30}", ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v]))"""))

cells.append(md(rf"""## The papers

**Liu, soft clustering** {{cite}}`liu2026softclustering` (`SC-1` … `SC-8`). An MoE layer read as a soft partition
of its input space: expert-local Jacobians are flatter and decay faster than a dense network's, the experts' outputs
spread over more directions, and their mean Jacobians are nearly orthogonal, with sharper routing giving lower-rank
structure. {chapter(1)} tests `SC-1` … `SC-6` on a controlled MLP-MoE (6 arms, 5 seeds); `SC-7` and `SC-8`, the
paper's 3-layer transformer, are tested with the transformer runs of {chapter(2)}.

**Liu, geometric asymmetry** {{cite}}`liu2026asymmetry` (`GA-1` … `GA-7`). Experts are decorrelated as functions
(near-zero Jacobian alignment) while the inputs they receive live in distinct but overlapping subspaces, and sparser
routing sharpens both. `GA-1` … `GA-6` are tested in {chapter(2)} (MLP-MoE arms and a small MoE transformer on
WikiText-2). `GA-7` is the same on pretrained Mixtral-8x7B and Qwen1.5-MoE-A2.7B: the probes exist
(`moewidgets.hf`), the checkpoints and the GPU do not, so it is listed below with the code to run.

**Ahrac, Hochwald, Geva, router coupling** {{cite}}`ahrac2026coupling` (`RC-a` … `RC-g`). The router and the
experts' input weights receive gradients along the same token directions, so routers come to mirror their experts;
an auxiliary balance loss makes router rows alike, and a parameter-free online K-Means router balances load.
{chapter(3)} tests all seven: the exact gradient identities on single tokens, the rest over 8 router arms × 5 seeds.

**Wu, Lv, Xie, Lin, Manifold Power Iteration** {{cite}}`wu2026mpi` (`MPI-a` … `MPI-i`). One power-iteration step
through each expert's weights turns a router row toward the expert's top singular direction, with equal row norms.
{chapter(4)} tests the exact identities, the alignment at initialisation and after training, balance, loss, the
number of power steps, the cost, and a detach ablation of ours (`MPI-i`)."""))

cells.append(md(r"""## Not run here, and how to run it

The claims without a verdict, grouped by the command that would produce their evidence. A chapter's command writes
`book/results/CHAPTER.jsonl`; commit it and re-execute this page (`tools/execute_notebook.py book/ledger.ipynb`)."""))

cells.append(code(r"""from moewidgets.ledger import ledger_pending

print(ledger_pending(rows))"""))

nb = nbf.v4.new_notebook()
nb.cells = cells
nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
               "language_info": {"name": "python"}}
nbf.write(nb, sys.argv[1] if len(sys.argv) > 1 else str(BOOK / "ledger.ipynb"))
