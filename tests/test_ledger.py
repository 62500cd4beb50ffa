"""The claims ledger: every spec claim id once, the verdict rule, and agreement with the chapters' claims tables."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest

from moewidgets import ledger as lg
from moewidgets.reproduce import CHAPTERS, RESULTS_DIR, ClaimResult, load_results

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT.parent / "shared" / "papers"          # the paper specs, next to the repository when available
EXPECTED_IDS = (["SC-1", "SC-1b"] + [f"SC-{i}" for i in range(2, 9)] + [f"GA-{i}" for i in range(1, 8)]
                + [f"RC-{c}" for c in "abcdefg"] + [f"MPI-{c}" for c in "abcdefghi"])
# Spec file, the section that lists the claims, and how a claim line starts there.
SPEC_SECTIONS = [("dual-jacobian-pca-and-grassmann.md", "### 1.6", r"^\| (SC-\w+)"),
                 ("dual-jacobian-pca-and-grassmann.md", "### 2.6", r"^\| (GA-\w+)"),
                 ("router-coupling-and-mpi.md", "### 1.12", r"^\* \*\*(RC-\w+)"),
                 ("router-coupling-and-mpi.md", "### 2.10", r"^\* \*\*(MPI-\w+)")]


def _row(claim: str, holds: bool, converged: bool = True, role: str = "decides") -> ClaimResult:
    return ClaimResult(claim, "s", "m", "a", "b", 1.0, 0.1, 0.0, 0.1, 10 if holds else 4, 10,
                       (0.5, 1.5) if holds else (-0.5, 1.5), holds, converged, role=role)


def _expected_verdict(rows) -> str:
    """The claim verdict written out from the rule's words (ledger docstring), from row verdicts of role decides."""
    v = [r.verdict for r in rows if r.role == "decides"]
    if not v:
        return "not run"
    decided = [x for x in v if x in ("holds", "fails")]
    if len(decided) == len(v):
        return "holds" if all(x == "holds" for x in v) else "fails" if "holds" not in v else "partly"
    if "holds" in v and "fails" in v:
        return "partly"
    return "insufficient seeds" if "insufficient seeds" in v else "inconclusive"


@pytest.fixture(scope="module")
def committed():
    """The committed results: each chapter's claims table (by its own function) and the ledger."""
    tables = {ch: CHAPTERS[ch].claims(load_results(ch)) for ch in CHAPTERS
              if (RESULTS_DIR / f"{ch}.jsonl").exists() and load_results(ch)}
    return tables, lg.ledger()


# ----------------------------------------------------------------------------------------------- the claim ids

def test_every_claim_id_exactly_once():
    ids = [c.id for c in lg.CLAIMS]
    assert len(ids) == len(set(ids)), f"duplicate ids: {[i for i in ids if ids.count(i) > 1]}"
    assert ids == EXPECTED_IDS


def _spec_ids(name: str, heading: str, pattern: str) -> list[str]:
    text = (SPECS / name).read_text()
    start = text.index(heading)
    end = text.index("\n### ", start + len(heading))
    return re.findall(pattern, text[start:end], flags=re.M)


@pytest.mark.skipif(not SPECS.is_dir(), reason="the paper specs (../shared/papers) are not next to the repository")
def test_ids_are_those_of_the_spec_sections():
    parsed = [i for section in SPEC_SECTIONS for i in _spec_ids(*section)]
    assert parsed == EXPECTED_IDS
    # the README's id table: each prefix's first and last id
    readme = (SPECS / "README.md").read_text()
    for first, last in re.findall(r"^\| `(\w+-\w+)` … `(\w+-\w+)` \|", readme, flags=re.M):
        prefix = first.split("-")[0]
        ids = [c.id for c in lg.CLAIMS if c.id.startswith(prefix + "-")]
        assert (ids[0], ids[-1]) == (first, last)


def test_claims_are_consistent():
    for c in lg.CLAIMS:
        prefix = c.id.split("-")[0]
        assert c.paper == lg.PAPERS[prefix].short
        assert c.statement and "\n" not in c.statement and c.metrics and c.command
        assert c.chapter in {"chapter1", "chapter2", "chapter3", "chapter4", None}
    assert [c.id for c in lg.CLAIMS if c.chapter is None] == ["GA-7"]
    assert "moewidgets.hf" in lg.CLAIMS[EXPECTED_IDS.index("GA-7")].command
    for c in lg.CLAIMS:
        if c.chapter is not None:
            assert c.command == f"python -m moewidgets reproduce {c.chapter}"


# ----------------------------------------------------------------------------------------------- verdict logic

@pytest.mark.parametrize("holds, expected", [((True, True, True), "holds"), ((True, False, True), "partly"),
                                             ((False,), "fails"), ((False, False), "fails"), ((), "not run")])
def test_verdict(holds, expected):
    assert lg.verdict([_row("SC-1", h) for h in holds]) == expected
    assert lg.verdict([_row("SC-1", h) for h in holds], testable=False) == "untestable here"


def test_verdict_counts_only_deciding_rows_and_reads_unconverged_rows_as_inconclusive():
    assert lg.verdict([_row("SC-4", False), _row("SC-4", True, role="context")]) == "fails"
    assert lg.verdict([_row("SC-4", True, role="ours")]) == "not run"
    assert lg.verdict([_row("SC-8", True, converged=False)]) == "inconclusive"       # e.g. an unconverged LM
    assert lg.verdict([_row("SC-8", True), _row("SC-8", True, converged=False)]) == "inconclusive"


def test_claims_are_generated_from_the_chapter_declarations():
    for chapter, spec in CHAPTERS.items():
        assert spec.declared, chapter
        for d in spec.declared:
            claim = next(c for c in lg.CLAIMS if c.id == d.id)
            assert (claim.chapter, claim.statement, claim.metrics, claim.sign, claim.reference) == (
                chapter, d.statement, d.metrics, d.sign, d.reference)
            assert d.reference.split(" §")[0] in {"dual-jacobian-pca-and-grassmann.md", "router-coupling-and-mpi.md"}


def test_mpi_h_and_rc_f_test_the_papers_claims(committed):
    tables, _ = committed
    mpi_h = [r for r in tables["chapter4"] if r.claim == "MPI-h" and r.metric == "mpi_over_softmax"]
    assert len(mpi_h) == 1 and mpi_h[0].arm_b == "1.002" and mpi_h[0].role == "decides"   # the paper's 0.2 %
    assert mpi_h[0].mean_a > 1.002                        # measured: well above the paper's overhead at this scale
    rcf = {(r.arm_a, r.arm_b, r.metric): r.role for r in tables["chapter3"] if r.claim == "RC-f"}
    assert rcf[("kmeans+lfb", "aux-0.01", "maxvio_global")] == "decides"
    assert rcf[("kmeans+lfb", "lfb", "maxvio_global")] == "decides"
    assert rcf[("lfb", "aux-0.01", "maxvio_global")] == "ours"


def test_rows_fixed_by_construction_are_context(committed):
    tables, rows = committed
    ceiling = [r for r in tables["chapter1"] if r.claim == "SC-4" and "ceiling" in r.statement]
    output = [r for r in tables["chapter3"] if r.claim == "RC-a" and "output side" in r.statement]
    assert ceiling and output and all(r.role == "context" for r in ceiling + output)
    by_id = {r.id: r for r in rows}
    assert by_id["SC-4"].n_rows == sum(r.role == "decides" for r in tables["chapter1"] if r.claim == "SC-4")


def test_each_model_is_counted_once(committed):
    models = lg.ledger_models()
    per_chapter = {ch: len(load_results(ch)) for ch in CHAPTERS if (RESULTS_DIR / f"{ch}.jsonl").exists()}
    # chapter 2's MLP arms are chapter 1's models (same run config and seed): only its LM rows are new
    lm_rows = sum(r["arm"].startswith("lm-") for r in load_results("chapter2"))
    assert models["chapter2"] == lm_rows < per_chapter["chapter2"]
    assert models["total"] == sum(v for k, v in models.items() if k != "total")


def test_ledger_from_results_groups_and_counts():
    results = {"chapter1": [_row("SC-1", True), _row("SC-2", False), _row("SC-1", False, converged=False),
                            _row("SC-1b", True), _row("SC-1", False, role="context")]}
    rows = {r.id: r for r in lg.ledger_from_results(results)}
    assert list(rows) == EXPECTED_IDS
    sc1 = rows["SC-1"]
    assert (sc1.verdict, sc1.n_rows, sc1.n_hold, sc1.n_converged, sc1.note) == ("inconclusive", 2, 1, 1, "")
    assert sc1.results == (results["chapter1"][0], results["chapter1"][2], results["chapter1"][4])   # chapter order
    assert (rows["SC-1b"].verdict, rows["SC-2"].verdict) == ("holds", "fails")
    assert rows["SC-3"].verdict == "not run" and "no row for SC-3" in rows["SC-3"].note
    assert rows["RC-a"].verdict == "not run" and "chapter3.jsonl" in rows["RC-a"].note
    assert rows["GA-7"].verdict == "untestable here" and rows["GA-7"].n_rows == 0
    if "chapter2" not in CHAPTERS:
        assert rows["GA-1"].verdict == "not run" and "chapter2 has no claim runs yet" in rows["GA-1"].note
    # results of a chapter count whether or not it is registered yet (the note only explains a missing verdict)
    ga1 = {r.id: r for r in lg.ledger_from_results({"chapter2": [_row("GA-1", False)]})}["GA-1"]
    assert (ga1.verdict, ga1.n_rows, ga1.note) == ("fails", 1, "")


def test_ledger_from_results_rejects_unknown_or_misplaced_ids():
    with pytest.raises(ValueError, match="claim='SC-99'.*not in moewidgets.ledger.CLAIMS"):
        lg.ledger_from_results({"chapter1": [_row("SC-99", True)]})
    with pytest.raises(ValueError, match="claim='RC-a'.*assigns to 'chapter3'"):
        lg.ledger_from_results({"chapter1": [_row("RC-a", True)]})


def test_bad_results_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="results_dir=.*nowhere.*is not a directory"):
        lg.ledger(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------- the committed results

def test_ledger_equals_the_chapters_claims_tables(committed):
    tables, rows = committed
    assert tables, "no committed results under book/results"
    by_id = {r.id: r for r in rows}
    for chapter, table in tables.items():
        ids = {r.claim for r in table}
        assert ids <= {c.id for c in lg.CLAIMS if c.chapter == chapter}, f"{chapter} tests ids the ledger lacks"
        for claim in [c for c in lg.CLAIMS if c.chapter == chapter]:
            mine = [r for r in table if r.claim == claim.id]
            deciding = [r for r in mine if r.role == "decides"]
            row = by_id[claim.id]
            assert [repr(r) for r in row.results] == [repr(r) for r in mine]
            n_hold = sum(r.holds for r in deciding)
            assert (row.verdict, row.n_rows, row.n_hold) == (_expected_verdict(mine), len(deciding), n_hold)
            assert row.n_converged == sum(r.converged for r in deciding)
            # a row on an unconverged arm never holds, in the chapter and so in the ledger
            assert not any(r.holds and not r.converged for r in mine)
    for row in rows:
        if row.claim.chapter not in tables:
            assert row.verdict in ("not run", "untestable here") and row.n_rows == 0


def test_chapters_without_results_are_not_run(tmp_path, committed):
    tables, full = committed
    chapter = sorted(tables)[0]
    shutil.copy(RESULTS_DIR / f"{chapter}.jsonl", tmp_path / f"{chapter}.jsonl")
    empty = next(ch for ch in sorted(CHAPTERS) if ch != chapter)
    (tmp_path / f"{empty}.jsonl").write_text("")                      # an empty file: not run either
    rows = lg.ledger(tmp_path)
    full_by_id = {r.id: r for r in full}
    for row in rows:
        if row.claim.chapter == chapter:
            assert (row.verdict, row.n_hold) == (full_by_id[row.id].verdict, full_by_id[row.id].n_hold)
        elif row.claim.chapter is None:
            assert row.verdict == "untestable here"
        else:
            assert row.verdict == "not run" and row.n_rows == 0 and row.note.startswith("not yet run")


# -------------------------------------------------------------------------------------------------- rendering

def test_table_has_one_line_per_claim_and_is_stable(committed):
    _, rows = committed
    text = lg.ledger_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["claim", "chapter", "held", "conv.", "verdict", "statement"]
    assert [line.split()[0] for line in lines[2:]] == EXPECTED_IDS
    for line, row in zip(lines[2:], rows):
        assert row.verdict in line and row.claim.statement in line
        if row.n_rows:
            assert f" {row.n_hold}/{row.n_rows} " in line
    assert text == lg.ledger_table(lg.ledger())


def test_markdown_and_pending(committed):
    _, rows = committed
    md = lg.ledger_markdown(rows, links={"chapter1": "chapter1.ipynb"})
    assert len(md.splitlines()) == 2 + len(EXPECTED_IDS) and "[chapter1](chapter1.ipynb)" in md
    pending = lg.ledger_pending(rows)
    waiting = [r.id for r in rows if r.verdict in ("not run", "untestable here")]
    listed = [i for line in pending.splitlines() if line and not line.startswith(" ")
              for i in line.split(":")[0].split(", ")]
    assert sorted(listed) == sorted(waiting)
    assert "GA-7" in listed and "probe(model, input_ids)" in pending


def test_notebook_shows_the_current_ledger(committed):
    path = ROOT / "book" / "ledger.ipynb"
    if not path.exists():
        pytest.skip("book/ledger.ipynb missing (source: book/ledger.md; .venv/bin/jupytext --sync book/ledger.md)")
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    cells = [c for c in nb.cells if c.cell_type == "code" and "ledger_table(" in c.source]
    assert len(cells) == 1
    cell = cells[0]
    tags = set(cell.metadata.get("tags", []))
    assert not tags & {"nbval-ignore-output", "nbval-skip"} and "NBVAL" not in cell.source
    assert cell.execution_count is not None
    printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    assert printed.rstrip("\n") == lg.ledger_table(committed[1]), (
        "book/ledger.ipynb is stale: re-run tools/execute_notebook.py book/ledger.ipynb")


@pytest.mark.slow          # imports transformers (about 5 s on a quiet machine; shared with tests/test_hf.py)
def test_ga7_command_runs_on_a_tiny_random_mixtral():
    """The GA-7 snippet, with the checkpoint and tokenizer swapped for a tiny random Mixtral and random ids."""
    pytest.importorskip("transformers")
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    cmd = lg.CLAIMS[EXPECTED_IDS.index("GA-7")].command
    swaps = {'AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, device_map="auto")':
             "MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, "
             "num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4))",
             'AutoTokenizer.from_pretrained(name)(text, return_tensors="pt").input_ids':
             "torch.randint(0, 64, (2, 100), generator=torch.Generator().manual_seed(0))",
             "rank=16": "rank=2, n_draws=4, n_splits=2"}
    for old, new in swaps.items():
        assert old in cmd, f"the GA-7 command changed: {old!r} not found"
        cmd = cmd.replace(old, new)
    printed: list = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exec(cmd, {"MixtralConfig": MixtralConfig, "MixtralForCausalLM": MixtralForCausalLM,
                   "print": lambda *args: printed.append(args)})
    assert len(printed) == 4                          # 2 layers × (probe row, asymmetry summary)
    assert 0 <= printed[0][1] <= 1 and "functional_z" in printed[2][1]
