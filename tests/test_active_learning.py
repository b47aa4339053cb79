"""model_store.active_learning: the review queue's order (margin sampling, then disagreement)."""

from __future__ import annotations

import math

import pytest

from model_store.active_learning import margin_uncertainty, priority


def test_a_hesitant_photo_comes_before_a_sure_one():
    sure = priority([0.9, 0.05, 0.05])
    hesitant = priority([0.45, 0.44, 0.11])
    assert sorted([sure, hesitant], reverse=True) == [hesitant, sure]
    assert margin_uncertainty([0.45, 0.44, 0.11]) == pytest.approx(0.99)
    assert margin_uncertainty([1.0, 0.0]) == 0.0


def test_order_of_probabilities_does_not_matter_and_one_label_uses_its_own_probability():
    assert margin_uncertainty([0.1, 0.7, 0.2]) == pytest.approx(0.5)
    assert margin_uncertainty([0.8]) == pytest.approx(0.2)
    assert margin_uncertainty([]) == 1.0


def test_unknown_is_maximally_uncertain_and_disagreement_breaks_ties():
    assert margin_uncertainty([0.99, 0.01], unknown=True) == 1.0
    quiet = priority([0.99, 0.01], unknown=True)
    disputed = priority([0.99, 0.01], unknown=True, wrong=2, right=1)
    assert disputed == (1.0, pytest.approx(2 / 3))
    assert sorted([quiet, disputed], reverse=True)[0] is disputed
    # uncertainty first: an unsure photo nobody disputed beats a sure one everybody disputed
    assert priority([0.5, 0.5]) > priority([0.99, 0.01], wrong=5)


@pytest.mark.parametrize("bad", [[1.5, 0.0], [-0.1], [math.nan, 0.2]])
def test_probabilities_outside_the_unit_interval_are_refused(bad):
    with pytest.raises(ValueError, match="probability"):
        margin_uncertainty(bad)


def test_negative_counts_are_refused():
    with pytest.raises(ValueError, match="counts"):
        priority([0.5, 0.5], wrong=-1)
