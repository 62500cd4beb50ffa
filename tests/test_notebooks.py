"""The committed book notebooks: small, no BokehJS, executed, and the claims cells compared by nbval."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
NOTEBOOKS = sorted(p for p in BOOK.glob("*.ipynb"))
EXCUSE_TAGS = {"nbval-ignore-output", "nbval-skip", "raises-exception"}
EXCUSE_COMMENTS = ("# NBVAL_IGNORE_OUTPUT", "# NBVAL_SKIP", "# NBVAL_RAISES_EXCEPTION")
CLAIM_MARKERS = ("claims_table", "pinned_subset", "convergence_table", "ledger_table")


def _excused(cell) -> bool:
    tags = set(cell.get("metadata", {}).get("tags", []))
    return bool(tags & EXCUSE_TAGS) or any(c in cell.source for c in EXCUSE_COMMENTS)


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["chapter1.ipynb"] or "chapter1.ipynb" in [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_small_and_carries_no_bokehjs(path):
    text = path.read_text()
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size} bytes (limit 1 MB)"
    for needle in ("Bokeh.set_log_level", "application/vnd.bokehjs_load", "application/javascript"):
        assert needle not in text, f"{path.name} carries {needle!r}: strip bokeh/JS outputs before committing"
    assert "widgets" not in nbformat.read(path, as_version=4).metadata, "saved widget state embeds bokeh documents"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_claims_cells_are_executed_and_compared(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    excused = [c for c in code if _excused(c)]
    claims = [c for c in code if any(m in c.source for m in CLAIM_MARKERS)]
    assert len(excused) <= 2, f"{path.name}: {len(excused)} cells excused from nbval comparison"
    for cell in claims:
        assert not _excused(cell), f"{path.name}: a claims cell is excused from comparison:\n{cell.source[:200]}"
        assert cell.execution_count is not None and cell.outputs, (
            f"{path.name}: a claims cell is committed without outputs, so nbval would not compare it")
    if path.name.startswith("chapter"):
        assert claims, f"{path.name} has no claims cell"
