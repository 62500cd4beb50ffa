"""The shape alphabet: one meaning per letter, course-wide.

Tensor names carry their shape as a suffix (``x_TD``, ``idx_TK``, ``w_in_EFD``) and every module opens with a
legend of the letters it uses. ``SHAPE_LETTERS`` is the one list those legends must agree with (the book's
notation page shows the same table); ``tests/test_shapes.py`` parses every module's legend and checks it.

A product or a part of another axis is written with ``=``: ``G = S·E``, ``T = B·L``, ``R = D``.

>>> SHAPE_LETTERS["S"], SHAPE_LETTERS["C"], SHAPE_LETTERS["K"]
('seeds (replicas trained at once)', 'capacity: token rows per expert group (padded)', 'top-k slots')
>>> legend_letters("Shape legend: T tokens, G = S·E (seed, expert) groups, ``...`` batch dims.\\n\\nMore.")
{'T': 'tokens', 'G': '(seed, expert) groups'}
>>> clashes("Shape legend: S recorded steps, E experts.")
{'S': 'recorded steps'}
"""
from __future__ import annotations

import re

__all__ = ["SHAPE_LETTERS", "KEYWORDS", "legend_letters", "clashes"]

SHAPE_LETTERS: dict[str, str] = {
    "A": "attention head width (D / H)",
    "B": "batch (sequences or tokens of one training batch)",
    "C": "capacity: token rows per expert group (padded)",
    "D": "model width (D_out, D_in for the two sides of a Jacobian)",
    "E": "experts",
    "F": "expert hidden width",
    "G": "groups (experts, or S·E (seed, expert) pairs)",
    "H": "attention heads",
    "I": "training steps (iterations)",
    "J": "singular-value or spectrum index",
    "K": "top-k slots",
    "L": "sequence positions",
    "M": "pooled points",
    "N": "points (probe or training points, tokens as points)",
    "O": "output width",
    "P": "pairs ((token, slot) or (expert, point))",
    "Q": "clusters of the teacher task",
    "R": "rank: spectrum or subspace length",
    "S": "seeds (replicas trained at once)",
    "T": "tokens",
    "U": "weightings",
    "V": "vocabulary size",
    "W": "windows",
    "Z": "random draws",
}

# words one of which a legend's description of the letter must contain (lower case)
KEYWORDS: dict[str, tuple[str, ...]] = {
    "A": ("head width",), "B": ("batch",), "C": ("capacity", "per expert", "per group"), "D": ("width",),
    "E": ("expert",), "F": ("hidden",), "G": ("group",), "H": ("head",), "I": ("step",),
    "J": ("singular", "spectrum index"), "K": ("top-k",), "L": ("position",), "M": ("pooled",),
    "N": ("point", "token", "row"), "O": ("output",), "P": ("pair",), "Q": ("cluster",),
    "R": ("spectrum", "rank", "subspace"), "S": ("seed", "replica"), "T": ("token",), "U": ("weighting",),
    "V": ("vocabulary",), "W": ("window",), "Z": ("draw",),
}

_ITEM = re.compile(r"^([A-Z])(?:\s*=\s*[^\s,]+)?\s+(.+)$", re.S)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def legend_letters(text: str) -> dict[str, str]:
    """The letters a module's shape legend defines, letter → its description. The legend runs from
    "legend" (after the colon) to the first blank line; items are comma-separated ``X meaning`` or
    ``X = product meaning``; items that do not start with a single capital letter (``...`` batch dims) are skipped."""
    m = re.search(r"[Ss]hape legend[^:\n]*:(.*?)(?:\n\s*\n|$)", text, re.S)
    if not m:
        return {}
    out = {}
    for item in _split_top_level(" ".join(m.group(1).split()).rstrip(".")):
        hit = _ITEM.match(item.strip())
        if hit:
            out[hit.group(1)] = hit.group(2).strip()
    return out


def clashes(text: str) -> dict[str, str]:
    """The letters of ``text``'s legend whose description is not their course-wide meaning (letter → description)."""
    return {letter: desc for letter, desc in legend_letters(text).items()
            if letter not in KEYWORDS or not any(k in desc.lower() for k in KEYWORDS[letter])}
