"""WikiText-2: finding the files, a word-level tokeniser, and count-based baselines (chapter 2).

Shape legend: N tokens in a split, V vocabulary size.

The data folder is never baked into the package: pass ``data_dir=`` or set the environment variable
``MOEWIDGETS_DATA`` to the folder that holds ``wikitext-2/`` (pointing at ``wikitext-2/`` itself works too).

Splits. With ``train.txt`` present we train on it and evaluate on ``test.txt``. The copy shipped with the course
has no ``train.txt``; then we train on ``valid.txt`` and evaluate on ``test.txt``, and say so (the ``note`` field of
:class:`WikiText` and a one-line message).

Tokens, as in PyTorch's ``word_language_model`` example: every line of a file is ``line.split()`` followed by an
``<eos>`` (blank lines give a lone ``<eos>``); the split is one long stream of ids. The vocabulary is built from
the training split only: ``<eos>`` (id 0), ``<unk>`` (id 1), then the most frequent other words, ties broken by the
words' string order, up to ``vocab_size`` entries; every other word (and every word unseen in training) maps to
``<unk>``.

Held-out scoring: every model (unigram, bigram, the transformer LM of :mod:`moewidgets.lm`) predicts the same
targets, ``eval_ids[1:]``, so their perplexities ``exp(mean NLL)`` compare directly.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ENV_VAR", "EOS", "UNK", "WordTokenizer", "WikiText", "Baselines", "find_wikitext", "load_wikitext",
           "unigram_perplexity", "bigram_perplexity", "baselines", "EXPECTED_COUNTS", "ShortSplitWarning",
           "check_split_size"]

ENV_VAR = "MOEWIDGETS_DATA"
EOS, UNK = "<eos>", "<unk>"
_HOW_TO = (f"set the environment variable {ENV_VAR} to the folder that holds wikitext-2/ "
           "(or pass data_dir=...); WikiText-2 is the word-level release of Merity et al. (2016), e.g. the copy in "
           "PyTorch's examples repository, word_language_model/data/wikitext-2/")


def _lines_to_words(text: str) -> list[str]:
    """``line.split() + ['<eos>']`` for every line (lines end at ``\\n``; a final unterminated line counts)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()               # the text ended with "\n": no extra empty line after it
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    return words


class WordTokenizer:
    """A word-level vocabulary: ``<eos>`` = 0, ``<unk>`` = 1, then words by descending count (ties: string order).

    Build it with :meth:`from_words` (the training split's words) and a cap ``vocab_size``; words outside the
    vocabulary encode to ``<unk>``. ``encode`` adds an ``<eos>`` after every line; ``decode`` writes each ``<eos>``
    as a line end, so ``encode(decode(ids)) == ids`` whenever ``ids`` ends with ``<eos>``.
    Chapter 2 (book/chapter2.ipynb).

    >>> tok = WordTokenizer.from_words("the cat sat on the mat <eos> the end <eos>".split(), vocab_size=5)
    >>> tok.itos
    ['<eos>', '<unk>', 'the', 'cat', 'end']
    >>> tok.encode("the dog sat\\n").tolist()
    [2, 1, 1, 0]
    >>> tok.decode(tok.encode("the cat\\nthe end\\n"))
    'the cat\\nthe end\\n'
    """

    def __init__(self, itos: list[str]):
        if itos[:2] != [EOS, UNK] or len(set(itos)) != len(itos):
            raise ValueError(f"itos must start with {[EOS, UNK]} and hold distinct words; got {itos[:4]}...")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.eos_id, self.unk_id = 0, 1

    @classmethod
    def from_words(cls, words: list[str], vocab_size: int | None = None) -> "WordTokenizer":
        """The ``vocab_size`` most frequent words of ``words`` (specials included in the count; None: all)."""
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 2):
            raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 2 (room for <eos> and <unk>) or None")
        counts = Counter(words)
        counts.pop(EOS, None)
        counts.pop(UNK, None)
        ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))   # deterministic tie-break
        n_words = len(ranked) if vocab_size is None else vocab_size - 2
        return cls([EOS, UNK] + [w for w, _ in ranked[:n_words]])

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def vocab_size(self) -> int:
        """V, the number of ids (``<eos>`` and ``<unk>`` included)."""
        return len(self.itos)

    def encode_words(self, words: list[str]) -> torch.Tensor:
        """Ids of a word list, (N,) int64; out-of-vocabulary words → ``<unk>``."""
        get, unk = self.stoi.get, self.unk_id
        return torch.tensor([get(w, unk) for w in words], dtype=torch.long)

    def encode(self, text: str) -> torch.Tensor:
        """Ids of a text, (N,) int64: each line's words, then ``<eos>``."""
        return self.encode_words(_lines_to_words(text))

    def decode(self, ids) -> str:
        """Text of ids: words joined by spaces, each ``<eos>`` written as ``\\n``."""
        out, line = [], []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)):
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.itos[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)


@dataclass
class WikiText:
    """A loaded WikiText-2: the tokeniser and both splits as id streams.

    Fields::

        tokenizer:   the WordTokenizer built from the training split.
        train_ids:   (N_train,) int64 training stream.
        eval_ids:    (N_eval,) int64 held-out stream (test.txt).
        train_file:  the file trained on (train.txt, or valid.txt when train.txt is absent).
        eval_file:   the held-out file (test.txt).
        note:        one line saying which files are used for what.
    """

    tokenizer: WordTokenizer
    train_ids: torch.Tensor
    eval_ids: torch.Tensor
    train_file: Path
    eval_file: Path
    note: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def unk_rate(self) -> float:
        """Fraction of held-out tokens that are ``<unk>`` (the cap's cost; the original data has some too)."""
        return float((self.eval_ids == self.tokenizer.unk_id).double().mean())


def find_wikitext(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``wikitext-2`` folder: ``data_dir`` (else ``$MOEWIDGETS_DATA``) ``/wikitext-2``, or that folder itself
    when it directly holds ``train.txt``, ``valid.txt`` or ``test.txt``.

    Raises ``FileNotFoundError`` naming every path it looked in and how to get the data.
    Chapter 2 (book/chapter2.ipynb).

    >>> find_wikitext("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: WikiText-2 not found: looked in /nonexistent/wikitext-2 and /nonexistent ...
    """
    if data_dir is None:
        env = os.environ.get(ENV_VAR, "")
        if not env:
            raise FileNotFoundError(f"WikiText-2 not found: no data_dir= given and {ENV_VAR} is not set; {_HOW_TO}")
        root, source = Path(env).expanduser(), f" ({ENV_VAR}={env})"
    else:
        root, source = Path(data_dir).expanduser(), ""
    candidates = [root / "wikitext-2", root]
    for folder in candidates:
        if folder.is_dir() and any((folder / f).is_file() for f in ("train.txt", "valid.txt", "test.txt")):
            return folder
    looked = " and ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"WikiText-2 not found: looked in {looked}{source} for train.txt, valid.txt or "
                            f"test.txt; {_HOW_TO}")


#: The real WikiText-2 splits (the PyTorch word_language_model copy; train.txt as released by Merity et al.):
#: file name -> (lines, words without the end-of-line <eos>), as counted by ``_lines_to_words``. The token counts
#: of the release (words + one <eos> a line) are 2,088,628 / 217,646 / 245,569.
EXPECTED_COUNTS = {"train.txt": (36_718, 2_051_910), "valid.txt": (3_760, 213_886), "test.txt": (4_358, 241_211)}
#: A split with fewer than this fraction of the real file's lines or words is "far smaller": a warning.
SHORT_FRACTION = 0.5


class ShortSplitWarning(UserWarning):
    """A WikiText-2 file is far smaller than the real one (a cut or damaged copy): results will not match."""


def _read_nonempty(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: byte offset {exc.start} is not UTF-8 ({exc.reason}: {data[exc.start:exc.start + 4]!r}); "
                         f"the file is damaged or not WikiText-2: replace it ({_HOW_TO})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty (no words); replace it with the WikiText-2 file ({_HOW_TO})")
    return text


def check_split_size(path: Path, words: list[str]) -> None:
    """Warn (:class:`ShortSplitWarning`) when ``path`` (train/valid/test.txt) holds far fewer lines or words than
    the real WikiText-2 file (:data:`EXPECTED_COUNTS`, below ``SHORT_FRACTION`` of them), with the numbers."""
    import warnings
    expected = EXPECTED_COUNTS.get(Path(path).name)
    if expected is None:
        return
    lines = sum(w == EOS for w in words)
    n_words = len(words) - lines
    if lines < SHORT_FRACTION * expected[0] or n_words < SHORT_FRACTION * expected[1]:
        warnings.warn(f"{path}: {lines:,} lines and {n_words:,} words, far fewer than the real WikiText-2 "
                      f"{Path(path).name} ({expected[0]:,} lines, {expected[1]:,} words): a cut or damaged copy? "
                      f"Perplexities and the book's numbers will not match; replace it ({_HOW_TO})",
                      ShortSplitWarning, stacklevel=3)


def load_wikitext(data_dir: str | os.PathLike | None = None, vocab_size: int | None = 8192,
                  verbose: bool = True) -> WikiText:
    """Load WikiText-2 and tokenise it (a fraction of a second).

    Trains on ``train.txt`` when present, else on ``valid.txt``; always evaluates on ``test.txt``. The choice is
    in the ``note`` field and, with ``verbose``, printed as one line. The vocabulary is the training split's
    ``vocab_size`` most frequent words (:class:`WordTokenizer`; ``None``: every word).

    Raises ``FileNotFoundError`` (folder or file missing; the message lists the paths tried) or ``ValueError``
    (an empty file, a file that is not UTF-8: the message names the file and the byte offset, a bad
    ``vocab_size``). A split far smaller than the real file (:data:`EXPECTED_COUNTS`) gives a
    :class:`ShortSplitWarning` with the numbers. Chapter 2 (book/chapter2.ipynb).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "wikitext-2"; d.mkdir()
    >>> _ = (d / "valid.txt").write_text("a b a\\nc a\\n"); _ = (d / "test.txt").write_text("a c\\n")
    >>> wt = load_wikitext(d.parent)
    WikiText-2: no train.txt in ...; training on valid.txt, evaluating on test.txt
    >>> wt.tokenizer.itos, wt.train_ids.tolist(), wt.eval_ids.tolist()
    (['<eos>', '<unk>', 'a', 'b', 'c'], [2, 3, 2, 0, 4, 2, 0], [2, 4, 0])
    """
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 2):
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 2 (room for <eos> and <unk>) or None")
    folder = find_wikitext(data_dir)
    train_file, valid_file, test_file = (folder / f for f in ("train.txt", "valid.txt", "test.txt"))
    if train_file.is_file():
        note = f"WikiText-2: training on train.txt, evaluating on test.txt (in {folder})"
    elif valid_file.is_file():
        note = f"WikiText-2: no train.txt in {folder}; training on valid.txt, evaluating on test.txt"
        train_file = valid_file
    else:
        raise FileNotFoundError(f"WikiText-2: no training text in {folder}: looked for {folder / 'train.txt'} and "
                                f"{valid_file}; {_HOW_TO}")
    if not test_file.is_file():
        raise FileNotFoundError(f"WikiText-2: no held-out text in {folder}: looked for {test_file}; {_HOW_TO}")
    train_words = _lines_to_words(_read_nonempty(train_file))
    eval_words = _lines_to_words(_read_nonempty(test_file))
    check_split_size(train_file, train_words)
    check_split_size(test_file, eval_words)
    tok = WordTokenizer.from_words(train_words, vocab_size)
    if verbose:
        print(note)
    return WikiText(tok, tok.encode_words(train_words), tok.encode_words(eval_words), train_file, test_file, note)


# ---------------------------------------------------------------------------------------------- baselines


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int, min_len: int) -> np.ndarray:
    a = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    if a.ndim != 1 or a.shape[0] < min_len:
        raise ValueError(f"{name} must be a 1-D id stream of length >= {min_len}, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ValueError(f"{name} holds ids in {a.min()}..{a.max()}, must be in 0..{vocab_size - 1}")
    return a


def unigram_perplexity(train_ids, eval_ids, vocab_size: int, alpha: float = 1.0) -> float:
    """Held-out perplexity of the add-α unigram ``p(w) = (c(w) + α) / (N + α V)`` on targets ``eval_ids[1:]``.

    ``c`` counts the training stream (N tokens); V is the vocabulary size (every id gets mass, α > 0).
    Chapter 2 (book/chapter2.ipynb).

    >>> round(unigram_perplexity(torch.tensor([0, 0, 1]), torch.tensor([1, 0, 1]), vocab_size=2), 4)
    2.0412
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} must be a finite number > 0")
    tr = _check_ids("train_ids", train_ids, vocab_size, 1)
    ev = _check_ids("eval_ids", eval_ids, vocab_size, 2)
    counts_V = np.bincount(tr, minlength=vocab_size).astype(np.float64)
    logp_V = np.log(counts_V + alpha) - math.log(tr.size + alpha * vocab_size)
    return float(np.exp(-logp_V[ev[1:]].mean()))


def bigram_perplexity(train_ids, eval_ids, vocab_size: int, discount: float | None = None) -> float:
    """Held-out perplexity of an interpolated Kneser–Ney bigram on targets ``eval_ids[1:]`` (contexts ``[:-1]``).

    With c(v, w) the training bigram counts, c(v) = Σ_w c(v, w), N1+(v•) the number of distinct followers of v,
    N1+(•w) the number of distinct predecessors of w and B the number of distinct bigrams::

        P(w | v) = max(c(v, w) − d, 0) / c(v)  +  d · N1+(v•) / c(v) · P_cont(w)     if c(v) > 0
        P(w | v) = P_cont(w)                                                           if c(v) = 0
        P_cont(w) = (N1+(•w) + 1) / (B + V)        (continuation unigram, add-one so unseen words keep mass)

    One discount d for all counts; default Ney's estimate ``d = n1 / (n1 + 2 n2)`` (n1, n2: bigram types seen
    once, twice), kept in [0.05, 0.95] (0.75 if no bigram type is seen once or twice). Chapter 2 (book/chapter2.ipynb).

    >>> round(bigram_perplexity(torch.tensor([0, 1, 0, 1, 0, 2]), torch.tensor([0, 1, 0, 2]), 3, discount=0.5), 4)
    1.9192
    """
    tr = _check_ids("train_ids", train_ids, vocab_size, 2)
    ev = _check_ids("eval_ids", eval_ids, vocab_size, 2)
    V = vocab_size
    codes = np.unique(tr[:-1] * V + tr[1:], return_counts=True)
    pair_codes, pair_counts = codes[0], codes[1].astype(np.float64)
    if discount is None:
        n1, n2 = int((pair_counts == 1).sum()), int((pair_counts == 2).sum())
        discount = min(max(n1 / (n1 + 2 * n2), 0.05), 0.95) if n1 + n2 > 0 else 0.75
    if not (isinstance(discount, (int, float)) and 0 < discount < 1):
        raise ValueError(f"discount={discount!r} must be in (0, 1)")
    ctx_of_pair, next_of_pair = pair_codes // V, pair_codes % V
    c_ctx_V = np.bincount(tr[:-1], minlength=V).astype(np.float64)               # c(v)
    n_follow_V = np.bincount(ctx_of_pair, minlength=V).astype(np.float64)        # N1+(v•)
    n_prec_V = np.bincount(next_of_pair, minlength=V).astype(np.float64)         # N1+(•w)
    p_cont_V = (n_prec_V + 1.0) / (pair_codes.size + V)
    v, w = ev[:-1], ev[1:]
    # c(v, w) for each held-out pair: look the pair code up among the sorted training codes
    q = v * V + w
    pos = np.minimum(np.searchsorted(pair_codes, q), pair_codes.size - 1)
    c_vw = np.where(pair_codes[pos] == q, pair_counts[pos], 0.0)
    c_v = c_ctx_V[v]
    seen = c_v > 0
    safe_c = np.where(seen, c_v, 1.0)
    p = np.where(seen, np.maximum(c_vw - discount, 0.0) / safe_c + discount * n_follow_V[v] / safe_c * p_cont_V[w],
                 p_cont_V[w])
    return float(np.exp(-np.log(p).mean()))


@dataclass
class Baselines:
    """Held-out perplexities of the count-based baselines on one split pair (same targets as the LM).

    Fields::

        unigram_ppl:  add-α unigram (alpha below).
        bigram_ppl:   interpolated Kneser–Ney bigram (Ney's discount).
        alpha:        the unigram's α.
        n_targets:    number of held-out targets scored (len(eval_ids) − 1).
    """

    unigram_ppl: float
    bigram_ppl: float
    alpha: float
    n_targets: int


def baselines(data: WikiText, alpha: float = 1.0, max_tokens: int | None = None) -> Baselines:
    """Unigram and bigram baselines of a :class:`WikiText` (train on its training stream, score ``eval_ids``;
    ``max_tokens``: only the first ``max_tokens`` targets, to match a partial LM evaluation).
    Chapter 2 (book/chapter2.ipynb)."""
    ev = data.eval_ids if max_tokens is None else data.eval_ids[:max_tokens + 1]
    return Baselines(unigram_perplexity(data.train_ids, ev, data.vocab_size, alpha),
                     bigram_perplexity(data.train_ids, ev, data.vocab_size), float(alpha), int(ev.shape[0]) - 1)
