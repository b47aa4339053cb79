"""Active learning: which unlabelled photo would teach the model most if an admin labelled it.

The review queue (admins' ``/review``) and ``benchmarks/bench_active_learning.py`` order photos by
:func:`priority`, highest first:

1. **uncertainty** first: margin sampling (Scheffer, Decomain and Wrobel, "Active Hidden Markov
   Models for Information Extraction", IDA 2001; reviewed in Settles, "Active Learning Literature
   Survey", 2009, section 3.1): ``1 - (p1 - p2)``, one minus the margin between the two most
   probable labels of the softmax, so a photo the model hesitates on between two labels comes
   before one it is sure of. A photo the open-set check flagged as unknown (``model_store.openset``)
   counts as maximally uncertain (1.0);
2. then **feedback disagreement**: the share of users' answers that said the model was wrong.

The order is lexicographic on ``(uncertainty, disagreement)``: disagreement separates photos of
equal uncertainty (for example every unknown photo).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["margin_uncertainty", "priority"]


def margin_uncertainty(probabilities: Sequence[float], *, unknown: bool | None = None) -> float:
    """One minus the margin between the two largest softmax probabilities.

    Args:
        probabilities: softmax probabilities of one photo, each in [0, 1], in any order (all the
            labels' or only the top-k's: only the two largest are used).
        unknown: True when the open-set check flagged the photo as unknown.

    Returns:
        float in [0, 1]: 1.0 for an unknown photo or a tie between the two best labels, 0.0 when
        one label has all the probability; with fewer than two probabilities, ``1 - p1``.

    Raises:
        ValueError: a probability outside [0, 1] or not a number.
    """
    values = [float(p) for p in probabilities]
    for p in values:
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"a probability must be in [0, 1], got {p!r}")
    if unknown:
        return 1.0
    if not values:
        return 1.0
    best = sorted(values, reverse=True)
    second = best[1] if len(best) > 1 else 0.0
    return min(1.0, max(0.0, 1.0 - (best[0] - second)))


def priority(
    probabilities: Sequence[float], *, unknown: bool | None = None, wrong: int = 0, right: int = 0
) -> tuple[float, float]:
    """Sort key of a photo in the review queue: higher teaches more (sort with ``reverse=True``).

    Args:
        probabilities: the photo's softmax probabilities (see :func:`margin_uncertainty`).
        unknown: True when the open-set check flagged the photo as unknown.
        wrong: how many users said the answer was wrong (picked another label or "none of these").
        right: how many users said it was right.

    Returns:
        ``(uncertainty, disagreement)``, both floats in [0, 1]; disagreement is
        ``wrong / (wrong + right)``, 0.0 without feedback.

    Raises:
        ValueError: a probability outside [0, 1], or a negative count.
    """
    if wrong < 0 or right < 0:
        raise ValueError(f"feedback counts must be >= 0, got wrong={wrong}, right={right}")
    votes = wrong + right
    disagreement = wrong / votes if votes else 0.0
    return margin_uncertainty(probabilities, unknown=unknown), disagreement
