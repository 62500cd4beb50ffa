"""WikiText-2 loading, the word tokeniser and the count-based baselines, against slow obvious versions."""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moewidgets.train import torch_threads
from moewidgets.wikitext import (ENV_VAR, WordTokenizer, baselines, bigram_perplexity, find_wikitext, load_wikitext,
                                 unigram_perplexity)

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    """$MOEWIDGETS_DATA (what CI sets), else ../shared/data next to the repository, else None."""
    for cand in (os.environ.get(ENV_VAR), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "wikitext-2" / "test.txt").is_file():
            return Path(cand)
    return None


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


pytestmark = pytest.mark.filterwarnings("ignore::moewidgets.wikitext.ShortSplitWarning")   # tiny test files

needs_real_data = pytest.mark.skipif(real_data_dir() is None, reason=f"WikiText-2 not found (set {ENV_VAR})")


def make_folder(root: Path, files: dict[str, str], sub: str = "wikitext-2") -> Path:
    folder = root / sub if sub else root
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


# ------------------------------------------------------------------------------------------- finding the files


def test_missing_folder_names_every_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        load_wikitext(missing)
    msg = str(e.value)
    assert str(missing / "wikitext-2") in msg and str(missing) in msg
    assert ENV_VAR in msg and "data_dir=" in msg


def test_env_var_unset_says_so(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=f"{ENV_VAR} is not set"):
        find_wikitext()


def test_env_var_is_used_and_named_in_errors(tmp_path, monkeypatch):
    make_folder(tmp_path, {"valid.txt": "a b\n", "test.txt": "a\n"})
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert find_wikitext() == tmp_path / "wikitext-2"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=f"{ENV_VAR}="):
        find_wikitext()


def test_folder_with_the_files_directly(tmp_path):
    folder = make_folder(tmp_path, {"valid.txt": "a b\n", "test.txt": "a\n"}, sub="")
    assert find_wikitext(folder) == folder
    assert load_wikitext(folder, verbose=False).train_file == folder / "valid.txt"


def test_empty_wikitext_folder_is_not_found(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        find_wikitext(tmp_path)
    assert str(tmp_path / "wikitext-2") in str(e.value)


def test_missing_training_file_lists_both_candidates(tmp_path):
    folder = make_folder(tmp_path, {"test.txt": "a\n"})
    with pytest.raises(FileNotFoundError) as e:
        load_wikitext(tmp_path, verbose=False)
    assert str(folder / "train.txt") in str(e.value) and str(folder / "valid.txt") in str(e.value)


def test_missing_test_file_is_named(tmp_path):
    folder = make_folder(tmp_path, {"valid.txt": "a b\n"})
    with pytest.raises(FileNotFoundError) as e:
        load_wikitext(tmp_path, verbose=False)
    assert str(folder / "test.txt") in str(e.value)


@pytest.mark.parametrize("empty", ["", " \n \n"])
@pytest.mark.parametrize("which", ["valid.txt", "test.txt"])
def test_empty_file_is_a_value_error_naming_it(tmp_path, which, empty):
    files = {"valid.txt": "a b\n", "test.txt": "a\n"}
    files[which] = empty
    folder = make_folder(tmp_path, files)
    with pytest.raises(ValueError) as e:
        load_wikitext(tmp_path, verbose=False)
    assert str(folder / which) in str(e.value) and "empty" in str(e.value)


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, True, "100"])
def test_bad_vocab_size(tmp_path, bad):
    make_folder(tmp_path, {"valid.txt": "a b\n", "test.txt": "a\n"})
    with pytest.raises(ValueError, match=f"vocab_size={bad!r}"):
        load_wikitext(tmp_path, vocab_size=bad, verbose=False)


def test_train_txt_is_preferred(tmp_path, capsys):
    folder = make_folder(tmp_path, {"train.txt": "x y x\n", "valid.txt": "v w\n", "test.txt": "x v\n"})
    wt = load_wikitext(tmp_path)
    assert wt.train_file == folder / "train.txt" and wt.eval_file == folder / "test.txt"
    assert wt.tokenizer.itos == ["<eos>", "<unk>", "x", "y"]        # vocabulary from train.txt only
    assert wt.eval_ids.tolist() == [2, 1, 0]                          # "v" is unseen in training → <unk>
    assert "training on train.txt" in wt.note and "no train.txt" not in wt.note
    assert capsys.readouterr().out.strip() == wt.note


def test_fallback_to_valid_says_so(tmp_path, capsys):
    make_folder(tmp_path, {"valid.txt": "v w\n", "test.txt": "v\n"})
    wt = load_wikitext(tmp_path)
    out = capsys.readouterr().out.strip()
    assert "no train.txt" in wt.note and "training on valid.txt" in wt.note and "test.txt" in wt.note
    assert out == wt.note and "\n" not in out                         # one line
    load_wikitext(tmp_path, verbose=False)
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------- tokeniser


def test_tokeniser_cap_ties_and_unk():
    words = "b a c a b d <eos> e <unk> <eos>".split()     # a:2 b:2 c:1 d:1 e:1
    tok = WordTokenizer.from_words(words, vocab_size=5)
    assert tok.itos == ["<eos>", "<unk>", "a", "b", "c"]    # ties broken by string order, specials first
    assert tok.encode("a e d\n").tolist() == [2, 1, 1, 0]
    assert len(WordTokenizer.from_words(words, vocab_size=None)) == 7
    assert WordTokenizer.from_words(list(reversed(words)), 5).itos == tok.itos     # order of the text is irrelevant


def test_tokeniser_eos_per_line_like_pytorch_example():
    tok = WordTokenizer.from_words("a b".split())
    # every line gets an <eos>, blank lines included; a final line without "\n" too
    assert tok.encode(" a b \n \n\nb").tolist() == [2, 3, 0, 0, 0, 3, 0]
    assert tok.encode("").tolist() == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokeniser_round_trip(seed):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]
    tok = WordTokenizer.from_words(words + ["<eos>"])
    ids = torch.tensor(rng.integers(0, len(tok), size=200).tolist() + [0])
    assert torch.equal(tok.encode(tok.decode(ids)), ids)
    text = "w1 w2 w3\nw4\n\nw5 w6\n"
    assert tok.decode(tok.encode(text)) == text


@needs_real_data
def test_real_split_matches_the_obvious_line_loop():
    wt = load_wikitext(real_data_dir(), vocab_size=1000, verbose=False)
    words = []
    with open(wt.train_file, encoding="utf-8") as f:               # PyTorch word_language_model's reading
        for line in f:
            words += line.split() + ["<eos>"]
    counts = Counter(w for w in words if w not in ("<eos>", "<unk>"))
    top = sorted(counts, key=lambda w: (-counts[w], w))[:998]
    stoi = {w: i for i, w in enumerate(["<eos>", "<unk>"] + top)}
    assert wt.tokenizer.stoi == stoi
    assert wt.train_ids.tolist() == [stoi.get(w, 1) for w in words]


# ------------------------------------------------------------------------------------------- baselines


def slow_unigram_ppl(train, ev, V, alpha):
    c = Counter(train)
    nll = [-math.log((c[w] + alpha) / (len(train) + alpha * V)) for w in ev[1:]]
    return math.exp(sum(nll) / len(nll))


def slow_kn_bigram_ppl(train, ev, V, d=None):
    pairs = Counter(zip(train[:-1], train[1:]))
    if d is None:
        n1 = sum(1 for c in pairs.values() if c == 1)
        n2 = sum(1 for c in pairs.values() if c == 2)
        d = min(max(n1 / (n1 + 2 * n2), 0.05), 0.95) if n1 + n2 else 0.75
    nll = []
    for v, w in zip(ev[:-1], ev[1:]):
        preceders_w = len({a for (a, b) in pairs if b == w})
        p_cont = (preceders_w + 1) / (len(pairs) + V)
        c_v = sum(c for (a, b), c in pairs.items() if a == v)
        if c_v == 0:
            p = p_cont
        else:
            followers_v = len({b for (a, b) in pairs if a == v})
            p = max(pairs.get((v, w), 0) - d, 0) / c_v + d * followers_v / c_v * p_cont
        nll.append(-math.log(p))
    return math.exp(sum(nll) / len(nll))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_unigram_matches_counting(seed, alpha):
    rng = np.random.default_rng(seed)
    V = 9
    train = rng.integers(0, V - 1, size=300).tolist()             # id V-1 never seen in training
    ev = rng.integers(0, V, size=80).tolist()
    got = unigram_perplexity(torch.tensor(train), torch.tensor(ev), V, alpha)
    assert got == pytest.approx(slow_unigram_ppl(train, ev, V, alpha), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("discount", [None, 0.3, 0.9])
def test_kn_bigram_matches_counting(seed, discount):
    rng = np.random.default_rng(seed)
    V = 10
    # a skewed Markov chain so some pairs repeat (n2 > 0) and some contexts/words are unseen in training
    train = [0]
    for _ in range(120):
        train.append(int((train[-1] * 3 + rng.integers(0, 5)) % (V - 2)))
    pair_counts = Counter(zip(train[:-1], train[1:])).values()
    assert 1 in pair_counts and 2 in pair_counts                    # Ney's discount is defined
    ev = rng.integers(0, V, size=60).tolist()
    got = bigram_perplexity(torch.tensor(train), torch.tensor(ev), V, discount)
    assert got == pytest.approx(slow_kn_bigram_ppl(train, ev, V, discount), rel=1e-10)


@pytest.mark.parametrize("size", [6, 100])       # Ney's discount from mostly-singleton / mostly-repeated pairs
def test_bigram_probabilities_sum_to_one(size):
    rng = np.random.default_rng(3)
    V = 6
    train = torch.tensor(rng.integers(0, V - 1, size=size))
    for v in range(V):                                              # seen contexts and the unseen one (V-1)
        total = sum(bigram_perplexity(train, torch.tensor([v, w]), V) ** -1 for w in range(V))
        assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha=0.0"), (dict(alpha=float("nan")), "alpha=nan"),
])
def test_unigram_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        unigram_perplexity(torch.tensor([0, 1]), torch.tensor([0, 1]), 2, **kwargs)


def test_baselines_bad_input():
    with pytest.raises(ValueError, match="discount=1.5"):
        bigram_perplexity(torch.tensor([0, 1, 0]), torch.tensor([0, 1]), 2, discount=1.5)
    with pytest.raises(ValueError, match="must be in 0..1"):
        unigram_perplexity(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="length >= 2"):
        bigram_perplexity(torch.tensor([0, 1, 0]), torch.tensor([1]), 2)


@needs_real_data
def test_real_baselines_are_ordered():
    wt = load_wikitext(real_data_dir(), vocab_size=4096, verbose=False)
    b = baselines(wt)
    assert b.n_targets == wt.eval_ids.numel() - 1
    # a bigram beats a unigram by a wide margin on WikiText (≈ 0.45× here); both far below the uniform V
    assert b.bigram_ppl < 0.6 * b.unigram_ppl < 0.6 * wt.vocab_size
    part = baselines(wt, max_tokens=1000)
    assert part.n_targets == 1000 and part.unigram_ppl != b.unigram_ppl


# ------------------------------------------------------------------------------------------------ damaged files

@needs_real_data
def test_a_cut_split_warns_with_the_numbers_and_the_real_one_does_not(tmp_path):
    import warnings
    from moewidgets.wikitext import EXPECTED_COUNTS, ShortSplitWarning, _lines_to_words
    real = real_data_dir() / "wikitext-2"
    for name in ("valid.txt", "test.txt"):     # the stored counts are the real files' counts
        words = _lines_to_words((real / name).read_text(encoding="utf-8"))
        lines = words.count("<eos>")
        assert EXPECTED_COUNTS[name] == (lines, len(words) - lines)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortSplitWarning)
        load_wikitext(real_data_dir(), verbose=False)
    cut = "".join((real / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:300])
    folder = make_folder(tmp_path, {"valid.txt": (real / "valid.txt").read_text(encoding="utf-8"), "test.txt": cut})
    with pytest.warns(ShortSplitWarning, match=r"test.txt: 300 lines and [\d,]+ words, far fewer than the real "
                                               r"WikiText-2 test.txt \(4,358 lines, 241,211 words\)"):
        load_wikitext(folder.parent, verbose=False)


def test_non_utf8_file_names_the_file_and_the_byte_offset(tmp_path):
    folder = make_folder(tmp_path, {"valid.txt": "a b\n", "test.txt": "a\n"})
    (folder / "test.txt").write_bytes(b"a b c\nd \xff e\n")
    with pytest.raises(ValueError, match=rf"{folder / 'test.txt'}: byte offset 8 is not UTF-8"):
        load_wikitext(folder.parent, verbose=False)
