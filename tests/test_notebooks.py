"""The committed book notebooks: small, no BokehJS, executed, and the claims cells compared by nbval."""
from __future__ import annotations

import re
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
    if re.fullmatch(r"chapter[1-9]\d*\.ipynb", path.name):   # chapter 0 builds an MoE from scratch: no claims
        assert claims, f"{path.name} has no claims cell"


# --- MyST sources: each book notebook is a jupytext pair (ipynb,md:myst); authors edit the .md ----------------------
ROOT = BOOK.parent
PAIRED = sorted(p for p in NOTEBOOKS if p.with_suffix(".md").exists())
PAGES = sorted(BOOK.glob("*.md")) + NOTEBOOKS
# Things a reader of the book does not have: the maintainers' shared folder and their specification.
FOREIGN = (
    (re.compile(r"(?<![\w.-])(\.\./)*shared/"), "a path into the maintainers' shared/ folder"),
    (re.compile(r"\bspec\s*§"), "a section of the maintainers' spec"),
    (re.compile(r"\[PROPOSAL\]"), "the spec's [PROPOSAL] marker"),
)


def _cells(path: Path) -> list[tuple[str, str]]:
    import jupytext

    return [(c.cell_type, c.source) for c in jupytext.read(path).cells]


def test_the_book_notebooks_are_paired():
    assert PAIRED, "no book/*.ipynb has a paired .md"
    for path in PAIRED:
        formats = nbformat.read(path, as_version=4).metadata.get("jupytext", {}).get("formats", "")
        assert formats == "ipynb,md:myst", (
            f"{path.name}: jupytext formats={formats!r}, expected 'ipynb,md:myst'; "
            f"fix: .venv/bin/jupytext --set-formats ipynb,md:myst book/{path.name}")


@pytest.mark.parametrize("path", PAIRED, ids=lambda p: p.name)
def test_paired_markdown_and_notebook_are_in_sync(path):
    md = path.with_suffix(".md")
    cells_md, cells_nb = _cells(md), _cells(path)
    fix = f"fix: .venv/bin/jupytext --sync book/{md.name}, then re-execute book/{path.name}"
    for i, (a, b) in enumerate(zip(cells_md, cells_nb)):
        assert a == b, (f"book/{md.name} and book/{path.name} differ at cell {i} "
                        f"({a[0]}: {a[1][:80]!r} vs {b[0]}: {b[1][:80]!r}); {fix}")
    assert len(cells_md) == len(cells_nb), (
        f"book/{md.name} has {len(cells_md)} cells, book/{path.name} has {len(cells_nb)}; {fix}")


def test_the_book_build_reads_the_notebook_of_each_pair():
    """Sphinx must see one file per document: every paired .md is in the config's exclude_patterns."""
    import yaml
    from sphinx.util.matching import Matcher

    config = yaml.safe_load((ROOT / "jupyter_book_config.yml").read_text())
    excluded = Matcher(config.get("exclude_patterns", []))
    for path in PAIRED:
        md = path.with_suffix(".md").name
        assert excluded(md), f"book/{md} is paired with book/{path.name}: add {md} to exclude_patterns in jupyter_book_config.yml"
    assert config["execute"]["execute_notebooks"] == "off", "the book renders the committed, nbval-checked outputs"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_no_page_names_a_file_or_document_the_reader_lacks(path):
    texts = [c.source for c in nbformat.read(path, as_version=4).cells] if path.suffix == ".ipynb" else [path.read_text()]
    for text in texts:
        for pattern, what in FOREIGN:
            m = pattern.search(text)
            assert m is None, (f"book/{path.name} names {what}: ...{text[max(0, m.start() - 60):m.end() + 40]!r}...; "
                               "cite the paper ({cite}`key` from book/references.bib) or say it in plain words")


def test_the_patterns_catch_what_they_should():
    """The oracle for the test above: each pattern finds its case and leaves ordinary text alone."""
    found = lambda s: [what for pattern, what in FOREIGN if pattern.search(s)]  # noqa: E731
    assert found("see `shared/papers/x.md`") and found("../shared/data") and found("(spec §1.6)")
    assert found("Ours ([PROPOSAL] in the spec)")
    assert not found("the experts share a subspace; a shared offset; our specification of the arms")
