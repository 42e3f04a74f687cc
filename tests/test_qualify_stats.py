"""Wilson intervals, Cohen's kappa and how annotators' labels combine, against hand computations."""

from __future__ import annotations

import math

import pytest

from qualification.models import Label
from qualification.score import agreement, item_outcome
from qualification.stats import cohen_kappa, wilson_interval


def test_wilson_interval_for_3_in_100_matches_the_hand_computation():
    # p = 0.03, z = 1.96, z^2 = 3.8416, n = 100
    # denominator = 1 + 3.8416/100 = 1.038416
    # centre = (0.03 + 3.8416/200) / 1.038416 = 0.049208 / 1.038416 = 0.047388
    # half = 1.96/1.038416 * sqrt(0.03*0.97/100 + 3.8416/40000)
    #      = 1.887491 * sqrt(0.000291 + 0.00009604) = 1.887491 * 0.019673 = 0.037133
    # -> [0.047388 - 0.037133, 0.047388 + 0.037133] = [0.0103, 0.0845]
    low, high = wilson_interval(3, 100)
    assert round(low, 4) == 0.0103
    assert round(high, 4) == 0.0845


def test_wilson_interval_with_no_failures_is_not_zero_width():
    # p = 0: centre = half = (z^2/2n) / (1 + z^2/n); for n = 100: 0.019208/1.038416 = 0.018497
    low, high = wilson_interval(0, 100)
    assert low == 0.0
    assert round(high, 4) == round(2 * 0.019208 / 1.038416, 4) == 0.037
    # 0 of 8 is eligible by the rate, but the interval says how little 8 items prove.
    assert wilson_interval(0, 8)[1] > 0.3


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="at least one labelled item"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="between 0 and n=5"):
        wilson_interval(6, 5)


def test_cohen_kappa_of_a_two_by_two_table():
    # 50 items:            B ok   B fail
    #            A ok        20       5
    #            A fail      10      15
    # p_o = (20 + 15) / 50 = 0.70
    # p_e = (25/50)(30/50) + (25/50)(20/50) = 0.30 + 0.20 = 0.50
    # kappa = (0.70 - 0.50) / (1 - 0.50) = 0.40
    pairs = [("ok", "ok")] * 20 + [("ok", "fail")] * 5 + [("fail", "ok")] * 10
    pairs += [("fail", "fail")] * 15
    assert math.isclose(cohen_kappa(pairs), 0.40)


def test_cohen_kappa_three_way():
    # 10 items, A/B: ok/ok x4, hard/hard x2, soft/soft x1, ok/soft x2, soft/hard x1
    # p_o = 7/10
    # A: ok 6, hard 2, soft 2; B: ok 4, hard 3, soft 3
    # p_e = (6*4 + 2*3 + 2*3) / 100 = 36/100
    # kappa = (0.70 - 0.36) / 0.64 = 0.53125
    pairs = [("ok", "ok")] * 4 + [("hard", "hard")] * 2 + [("soft", "soft")]
    pairs += [("ok", "soft")] * 2 + [("soft", "hard")]
    assert math.isclose(cohen_kappa(pairs), 0.53125)


def test_cohen_kappa_is_undefined_when_everyone_says_the_same():
    assert cohen_kappa([("ok", "ok")] * 5) is None
    assert cohen_kappa([]) is None


def _label(item: str, annotator: str, label: str) -> Label:
    return Label(item_id=item, annotator=annotator, label=label, created_at="t", source="web")


def test_an_automatic_hard_label_decides_the_item_whatever_reviewers_say():
    labels = [_label("i", "auto", "hard"), _label("i", "alice", "ok")]
    assert item_outcome(labels, "all") == "hard"
    assert item_outcome(labels, "majority") == "hard"


def test_policy_all_fails_an_item_any_annotator_failed_and_majority_needs_half():
    one_of_three = [_label("i", "a", "ok"), _label("i", "b", "ok"), _label("i", "c", "soft")]
    assert item_outcome(one_of_three, "all") == "soft"
    assert item_outcome(one_of_three, "majority") == "ok"
    tie = [_label("i", "a", "ok"), _label("i", "b", "hard")]
    assert item_outcome(tie, "majority") == "hard"  # a tie is a failure: the cautious reading
    assert item_outcome([], "all") is None


def test_agreement_reports_kappa_per_annotator_pair_on_shared_items():
    labels = []
    # alice and bob share 4 items: ok/ok, ok/ok, soft/hard, hard/ok; carol labels one other.
    for item, a, b in [
        ("1", "ok", "ok"),
        ("2", "ok", "ok"),
        ("3", "soft", "hard"),
        ("4", "hard", "ok"),
    ]:
        labels += [_label(item, "alice", a), _label(item, "bob", b)]
    labels += [_label("5", "carol", "ok"), _label("3", "auto", "hard")]
    [pair] = agreement(labels)
    assert pair.annotators == ("alice", "bob") and pair.items == 4
    # binary: ok/ok x2, fail/fail x1, fail/ok x1 -> p_o = 3/4;
    # alice ok 2 fail 2, bob ok 3 fail 1 -> p_e = (2*3 + 2*1)/16 = 1/2 -> kappa = 0.5
    assert math.isclose(pair.ok_vs_failure, 0.5)
    # three-way: agree on 2 -> p_o = 1/2; alice ok2 soft1 hard1, bob ok3 hard1
    # p_e = (2*3 + 1*0 + 1*1)/16 = 7/16 -> kappa = (8/16 - 7/16)/(9/16) = 1/9
    assert math.isclose(pair.three_way, 1 / 9)
