"""Thresholds per group, coupled-mask voting, ties, chunk balance and the per-layer floor."""
import numpy as np
import pytest

from compress.prune.graph import Carrier, Unit
from compress.prune.masks import (Decider, apply_balance, apply_floor, apply_ties, floor_count, quantile_threshold,
                                  vote)


def _unit(size, carriers, **kw):
    return Unit(f"u{size}", "channels", size, [], carriers, **kw)


def _carrier(name, group, scores, roots=None):
    roots = np.arange(len(scores)) if roots is None else np.asarray(roots)
    return Carrier(name, "gamma", roots, [np.array([r]) for r in roots], group=group, score=np.asarray(scores, float))


def test_floor_count_follows_methods_rule():
    assert floor_count(16) == 16, "int(0.01 * 16) = 0 -> keep min(16, C)"
    assert floor_count(8) == 8
    assert floor_count(256) == 2
    assert floor_count(1000, share=0.1) == 100
    assert floor_count(3, minimum=1) == 1


def test_quantile_threshold_keeps_strictly_greater():
    scores = np.arange(10, dtype=float)
    theta = quantile_threshold(scores, 0.3)
    assert (scores > theta).sum() == 7, theta
    assert quantile_threshold(scores, 0.0) == -np.inf, "p = 0 keeps everything, even the smallest"


@pytest.mark.parametrize("mode,expected", [("majority", [1, 1, 0, 1]), ("union", [1, 1, 0, 1]),
                                           ("intersection", [1, 0, 0, 1])])
def test_vote_modes(mode, expected):
    kept = np.array([2, 1, 0, 0])
    covered = np.array([2, 2, 2, 0])  # the last element has no carrier: kept
    assert vote(kept, covered, mode).astype(int).tolist() == expected


def test_majority_needs_half_of_three():
    assert vote(np.array([1, 2]), np.array([3, 3])).tolist() == [False, True], "1 of 3 is not half"


def test_ties_vote_per_class():
    classes = np.array([0, 1, 0, 1])  # grouped conv: position 0 and 1 of two groups
    keep = apply_ties((np.array([1, 0, 0, 0]), np.array([1, 1, 1, 1])), classes, "majority")
    assert keep.tolist() == [True, False, True, False], "1 of 2 votes is half: the whole class stays"


def test_balance_gives_equal_counts_best_first():
    keep = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
    parts = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    importance = np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.8, 0.1, 0.4])
    out = apply_balance(keep, parts, importance)
    assert out[parts[0]].sum() == out[parts[1]].sum() == 2, out
    assert out.tolist() == [False, True, True, False, False, True, False, True]


def test_floor_adds_most_important():
    keep = np.zeros(6, bool)
    out = apply_floor(keep, np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.0]), 2)
    assert np.flatnonzero(out).tolist() == [1, 3]


def test_decider_thresholds_are_per_group():
    # group a has small scores, group b large ones: the same p_g removes the same share of each
    a = _unit(10, [_carrier("bn_a", "a", np.linspace(0.01, 0.1, 10))])
    b = _unit(10, [_carrier("bn_b", "b", np.linspace(1, 10, 10))])
    decider = Decider([a, b], floor_min=1)
    keeps = decider.decide_all({"a": 0.5, "b": 0.2})
    assert [int(k.sum()) for k in keeps] == [5, 8], keeps
    global_keeps = Decider([_unit(20, [_carrier("bn", "g", np.r_[np.linspace(0.01, 0.1, 10), np.linspace(1, 10, 10)])])],
                           floor_min=1).decide_all({"g": 0.5})
    assert global_keeps[0][:10].sum() == 0, "one global threshold would empty the small-gamma group"


def test_decider_votes_across_coupled_carriers_and_floor():
    # two BNs on a residual stream (same 4 channels): channel 0 is small in both, channel 1 in one only
    c1 = _carrier("bn1", "g", [0.0, 0.0, 5, 6])
    c2 = _carrier("bn2", "g", [0.0, 7, 8, 9])
    unit = _unit(4, [c1, c2])
    keep = Decider([unit], floor_min=1).decide_all({"g": 0.4})[0]
    assert keep.tolist() == [False, True, True, True], "majority: 1 of 2 carriers keeping is enough"
    keep = Decider([unit], mode="intersection", floor_min=1).decide_all({"g": 0.4})[0]
    assert keep.tolist() == [False, False, True, True]
    keep = Decider([unit], floor_min=4).decide_all({"g": 0.9})[0]
    assert keep.all(), "the floor keeps min(16, C) = all 4 channels"


def test_a_layer_holding_some_of_the_units_channels_keeps_one():
    """A cut layer that holds only elements 0-1 of an 8-element unit (a concat input, say) must keep one of them,
    even when their scores are the lowest, or removing the unit would leave that layer with no channel."""
    from compress.prune.graph import Member

    scores = [0.01, 0.02, 5, 6, 7, 8, 9, 10]
    part = Member("narrow", "in", np.array([0, 1]), np.array([0, 1]))
    whole = Member("wide", "out", np.arange(8), np.arange(8))
    unit = Unit("u", "channels", 8, [whole, part], [_carrier("bn", "g", scores)])
    keep = Decider([unit], floor_min=1).decide_all({"g": 0.5})[0]
    assert keep[[0, 1]].tolist() == [False, True], keep
    assert keep.sum() == 5  # the four best and the narrow layer's best
