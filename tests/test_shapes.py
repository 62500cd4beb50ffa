"""One shape alphabet course-wide (moewidgets.shapes): every module's shape legend uses each letter in its one
meaning, and the MoE core's tensor names use only letters their module's legend defines."""
from __future__ import annotations

import pathlib
import re

import pytest

import moewidgets
from moewidgets.shapes import KEYWORDS, SHAPE_LETTERS, clashes, legend_letters

PACKAGE = pathlib.Path(moewidgets.__file__).parent
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if legend_letters(p.read_text()))

# Legends that still give a letter another meaning, in modules another engineer owns (issue 17, item 5): each entry
# is the letter and what the legend says now. The test fails both on a new clash and once one of these is fixed
# without being removed here, so this list can only shrink.
PENDING = {
    "dashboards/chapter2_lm.py": {"S": "positions per window (``seq_len``)"},              # → L positions
    "data.py": {"C": "clusters", "H": "teacher hidden width"},                            # → Q clusters, another H
    "geometry/asymmetry.py": {"A": "the expert's terms (1 for GELU, 2 for SwiGLU)",
                              "C": "a chunk of hidden units"},
    "geometry/subspaces.py": {"S": "random draws"},                                       # → Z draws
    "hf/capture.py": {"S": "sequence"},                                                   # → L positions
    "hf/metrics.py": {"S": "weightings"},                                                 # → U weightings
    "lm.py": {"S": "positions"},                                                          # → L positions
    "static.py": {"S": "recorded steps"},                                                 # → I steps
    "views.py": {"K": "principal components", "S": "steps"},                              # → R, I
}

# modules whose tensor names were checked letter by letter (the MoE core of issue 17)
CORE = ["nn/functional.py", "nn/experts.py", "nn/layer.py", "nn/routers.py", "nn/activations.py", "multiseed.py",
        "balance.py", "models.py", "geometry/jacobians.py", "train.py"]


def test_the_alphabet_gives_every_letter_one_meaning_and_a_keyword():
    assert set(SHAPE_LETTERS) == set(KEYWORDS)
    assert all(re.fullmatch(r"[A-Z]", letter) for letter in SHAPE_LETTERS)
    for letter, words in KEYWORDS.items():       # each letter's own meaning passes its own check
        assert any(w in SHAPE_LETTERS[letter].lower() for w in words), letter


def test_the_checker_can_fail():
    assert clashes("Shape legend: S steps, C clusters, K components, T tokens.") == {
        "S": "steps", "C": "clusters", "K": "components"}
    assert clashes("Shape legend: X something.") == {"X": "something"}        # a letter outside the alphabet


def test_modules_with_legends_are_found():
    names = {p.relative_to(PACKAGE).as_posix() for p in MODULES}
    assert set(CORE) | set(PENDING) <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_every_legend_uses_the_course_wide_meanings(path):
    name = path.relative_to(PACKAGE).as_posix()
    assert clashes(path.read_text()) == PENDING.get(name, {})


@pytest.mark.parametrize("name", CORE)
def test_core_tensor_names_use_only_their_legends_letters(name):
    text = (PACKAGE / name).read_text()
    used = set("".join(re.findall(r"\b[a-z][a-z0-9_]*?_([A-Z]{1,5})\b", text)))
    assert used <= set(legend_letters(text)), sorted(used - set(legend_letters(text)))


def test_notation_page_lists_the_same_alphabet():
    """The book's notation page shows the code's alphabet: same letters, same meanings, nothing extra."""
    from pathlib import Path
    import re
    from moewidgets.shapes import SHAPE_LETTERS
    text = (Path(__file__).resolve().parent.parent / "book" / "notation.md").read_text()
    section = text[text.index("## Shapes in code"):text.index("## Ranks")]
    rows = dict(re.findall(r"^\| `([A-Z])` \| (.+?) \|$", section, flags=re.M))
    assert rows == SHAPE_LETTERS, "book/notation.md's shape table differs from moewidgets.shapes.SHAPE_LETTERS"
