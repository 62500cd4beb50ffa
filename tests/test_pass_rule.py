"""The pass rule (moewidgets.reproduce.common.pass_rule): it can fail, unanimous signs do not pass automatically,
too few seeds never hold, unconverged arms are inconclusive; and the claim verdict built on it."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from moewidgets.reproduce import common as rc


def _oracle(d, sign, min_seeds, converged=True):
    """The rule written out the slow obvious way."""
    d = [float(x) for x in d]
    if len(d) < min_seeds:
        return "insufficient seeds"
    if not converged:
        return "inconclusive"
    agree = sum(1 for x in d if (x > 0 if sign > 0 else x < 0))
    need = math.ceil(0.8 * len(d) - 1e-9)
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    if sd == 0:
        p = 0.0 if sign * mean > 0 else 1.0
    else:
        t = sign * mean / (sd / math.sqrt(len(d)))
        p = 1 - stats.t.cdf(t, len(d) - 1)
    return "holds" if agree >= need and p < 0.05 else "fails"


def test_unanimous_but_tiny_beside_the_noise_fails():
    d = [0.001] * 9 + [5.0]                      # 10 of 10 positive: a sign test would give p = 0.001
    out = rc.pass_rule(d, +1)
    assert out.n_sign == 10 and out.n_seeds == 10 and out.verdict == "fails"
    assert 0.05 < out.p < 0.5
    # the same signs with the noise small beside the mean hold
    assert rc.pass_rule([1.0 + 0.01 * i for i in range(10)], +1).verdict == "holds"


def test_five_unanimous_seeds_are_insufficient_for_an_mlp_row_and_enough_for_an_lm_row():
    d = [0.2, 0.25, 0.3, 0.22, 0.28]
    assert rc.pass_rule(d, +1).verdict == "insufficient seeds"                  # MLP: 10 needed
    assert rc.pass_rule(d, +1, min_seeds=rc.MIN_SEEDS_LM).verdict == "holds"
    assert rc.pass_rule(d[:4], +1, min_seeds=rc.MIN_SEEDS_LM).verdict == "insufficient seeds"
    # five unanimous seeds with a large spread: the t-test does not reject
    assert rc.pass_rule([0.01, 0.02, 0.01, 0.03, 3.0], +1, min_seeds=5).verdict == "fails"


def test_sign_fraction_and_test_are_both_needed():
    rng = np.random.default_rng(0)
    big = 1.0 + 0.1 * rng.standard_normal(10)
    assert rc.pass_rule(big, +1).verdict == "holds"
    assert rc.pass_rule(big, -1).verdict == "fails"                            # wrong direction
    seven = np.array([1.0] * 7 + [-0.01] * 3)                                   # 7/10 < 80 % though p is tiny
    assert rc.pass_rule(seven, +1).p < 0.001 and rc.pass_rule(seven, +1).verdict == "fails"
    eight = np.array([1.0] * 8 + [-0.01] * 2)
    assert rc.pass_rule(eight, +1).verdict == "holds"


def test_unconverged_is_inconclusive_and_never_holds():
    d = [1.0 + 0.01 * i for i in range(10)]
    assert rc.pass_rule(d, +1, converged=False).verdict == "inconclusive"
    assert rc.pass_rule(d[:3], +1, converged=False).verdict == "insufficient seeds"


def test_nan_differences_do_not_pass():
    d = [1.0] * 9 + [math.nan]
    assert rc.pass_rule(d, +1).verdict == "fails"


@pytest.mark.parametrize("seed", range(30))
def test_rule_matches_the_slow_oracle_on_random_differences(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 16))
    d = rng.normal(rng.normal(0, 0.5), rng.uniform(0.05, 2.0), size=n)
    sign = int(rng.choice([-1, 1]))
    min_seeds = int(rng.choice([rc.MIN_SEEDS_LM, rc.MIN_SEEDS_MLP]))
    conv = bool(rng.random() > 0.2)
    assert rc.pass_rule(d, sign, min_seeds=min_seeds, converged=conv).verdict == _oracle(d, sign, min_seeds, conv)


def test_zero_spread_is_exact():
    assert rc.pass_rule([-1e-300] * 10, -1).verdict == "holds"
    assert rc.pass_rule([0.0] * 10, -1).verdict == "fails"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sign=0 must be -1 or"):
        rc.pass_rule([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="min_seeds=1 must be an integer >= 2"):
        rc.pass_rule([1.0, 2.0], 1, min_seeds=1)


def _row(verdict, role="decides"):
    return rc.ClaimResult("X-1", "s", "m", "a", "b", 0.0, 0.0, 0.0, 0.0, 0, 0, (0.0, 0.0), verdict == "holds", True,
                          verdict=verdict, role=role)


@pytest.mark.parametrize("verdicts, expected", [
    (("holds", "holds"), "holds"), (("holds", "fails"), "partly"), (("fails", "fails"), "fails"),
    (("holds", "insufficient seeds"), "insufficient seeds"), (("fails", "inconclusive"), "inconclusive"),
    (("holds", "fails", "inconclusive"), "partly"), (("inconclusive", "insufficient seeds"), "insufficient seeds"),
    ((), "not run"),
])
def test_claim_verdict(verdicts, expected):
    assert rc.claim_verdict([_row(v) for v in verdicts]) == expected


def test_ours_and_context_rows_never_decide():
    rows = [_row("fails"), _row("holds", role="ours"), _row("holds", role="context")]
    assert rc.claim_verdict(rows) == "fails"
    assert rc.claim_verdict(rows[1:]) == "not run"


def test_a_row_built_from_holds_and_converged_gets_a_verdict():
    r = rc.ClaimResult("X", "", "m", "a", "b", 0, 0, 0, 0, 0, 0, (0, 0), True, False)
    assert (r.verdict, r.holds) == ("inconclusive", False)
    with pytest.raises(ValueError, match="verdict='maybe' must be one of"):
        rc.ClaimResult("X", "", "m", "a", "b", 0, 0, 0, 0, 0, 0, (0, 0), True, True, verdict="maybe")
