"""How sure the reports are (issue 11 point 4): the Wilson interval, the test-image count, the
too-few hint, and the "not sure" threshold explained in /help. Fast: no TensorFlow, no server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bot.general import help_text
from bot.reports import (
    MIN_TEST_IMAGES_PER_LABEL,
    accuracy_text,
    format_report,
    too_few_test_images_text,
    wilson_interval,
)
from bot.training_runner import TrainingOutcome
from tests.request_double import offline_bot

# Newcombe, R. G. (1998), "Two-sided confidence intervals for the single proportion: comparison of
# seven methods", Statistics in Medicine 17: 857-872, Table I, method 3 (Wilson score, no
# continuity correction), 95%: published to 4 decimals.
NEWCOMBE_1998 = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
]


@pytest.mark.parametrize(("x", "n", "low", "high"), NEWCOMBE_1998)
def test_wilson_interval_matches_published_values(x: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(x, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def _score_test_bound(x: int, n: int, *, upper: bool, z: float = 1.959963984540054) -> float:
    """The interval by its definition, solved numerically: the p where |x - np| / sqrt(np(1-p)) = z."""
    phat = x / n
    lo, hi = (phat, 1.0) if upper else (0.0, phat)
    if (upper and x == n) or (not upper and x == 0):
        return phat
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = abs(x - n * mid) / math.sqrt(n * mid * (1 - mid)) < z
        if inside == upper:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize(("x", "n"), [(0, 1), (1, 1), (3, 7), (30, 35), (9, 9), (250, 251), (1234, 2646)])
def test_wilson_interval_is_the_inverted_score_test(x: int, n: int) -> None:
    low, high = wilson_interval(x, n)
    assert low == pytest.approx(_score_test_bound(x, n, upper=False), abs=1e-9)
    assert high == pytest.approx(_score_test_bound(x, n, upper=True), abs=1e-9)
    assert 0.0 <= low <= x / n <= high <= 1.0


def test_wilson_interval_rejects_impossible_counts() -> None:
    for x, n in [(1, 0), (0, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(x, n)


def metrics(**extra: object) -> dict:
    """A version's metrics as the pipeline writes them: 30 of 35 test images right."""
    base: dict = {
        "accuracy": 30 / 35,
        "test_images": 35,
        "confusion_matrix": [[18, 2], [3, 12]],
        "labels": ["shoes", "hat"],
        "per_label": {
            "shoes": {"precision": 0.86, "recall": 0.9, "f1": 0.88, "support": 20},
            "hat": {"precision": 0.86, "recall": 0.8, "f1": 0.83, "support": 15},
        },
        "config": {"testing_percentage": 10.0},
    }
    base.update(extra)
    return base


def test_the_report_gives_accuracy_with_interval_and_test_image_count() -> None:
    text = format_report(TrainingOutcome("promoted", "ok", version="v2", metrics=metrics()))
    assert "Test accuracy: 85.7% on 35 test images (95% interval 70.6%–93.7%)" in text
    assert "Too few test images" not in text


def test_the_interval_uses_the_confusion_matrix_count_else_accuracy_times_images() -> None:
    assert accuracy_text(metrics()) == accuracy_text(metrics(confusion_matrix=None))
    assert accuracy_text({"accuracy": 0.9}) == "90.0%"  # an old version without a test count
    assert accuracy_text({}) == "unknown"


def test_labels_with_too_few_test_images_are_named_with_what_they_need() -> None:
    few = metrics(
        per_label={
            "shoes": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": MIN_TEST_IMAGES_PER_LABEL},
            "hat": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3},
            "belt": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 9},
        }
    )
    hint = too_few_test_images_text(few)
    assert hint is not None
    assert f"(fewer than {MIN_TEST_IMAGES_PER_LABEL}): hat (3), belt (9)." in hint
    assert "shoes" not in hint
    assert "about 100 photos per label" in hint  # 10 test images at testing_percentage 10
    report = format_report(TrainingOutcome("refused", "The gate said no.", version="v3", metrics=few))
    assert hint in report
    assert too_few_test_images_text(metrics()) is None
    assert format_report(TrainingOutcome("failed", "boom", metrics=few)).count("Too few") == 0


def test_help_explains_the_not_sure_threshold() -> None:
    user = help_text(False, 0.35)
    assert "under 35%" in user and "I'm not sure" in user
    assert "looks like none of them" in user  # the unknown-photo reply is explained too
    assert "confidence_threshold" not in user
    admin = help_text(True, 0.35)
    assert "classify.confidence_threshold" in admin and "0.35" in admin
    assert "95% interval" in admin


async def test_help_in_the_chat_uses_the_configured_threshold(tmp_path: Path) -> None:
    async with offline_bot(tmp_path / "store", classify={"confidence_threshold": 0.7}) as bot:
        text = bot.reply_to(await bot.text(2002, "/help"))
    assert "When my best guess is under 70%, I say “I'm not sure”" in text


def test_the_report_gives_the_unknown_photo_threshold_and_how_many_test_images_it_rejects() -> None:
    open_set = {"method": "knn", "threshold": 0.4213, "pass_rate": 0.95, "test_images": 35, "test_rejected": 2}
    text = format_report(TrainingOutcome("promoted", "ok", version="v2", metrics=metrics(open_set=open_set)))
    assert "Unknown-photo check: threshold 0.421 (95% of known photos pass); it rejects 2 of 35 test images" in text
    combined = {"method": "knn+msp", "threshold": 1.0, "knn_threshold": 0.3512, "msp_threshold": 0.62,
                "pass_rate": 0.99, "test_images": 251, "test_rejected": 3}
    text = format_report(TrainingOutcome("promoted", "ok", version="v3", metrics=metrics(open_set=combined)))
    assert ("Unknown-photo check: distance threshold 0.351, top probability under 38% (99% of known photos pass); "
            "it rejects 3 of 251 test images") in text
    small = dict(combined, msp_threshold=None)
    text = format_report(TrainingOutcome("promoted", "ok", version="v4", metrics=metrics(open_set=small)))
    assert "distance threshold 0.351, softmax part off (too few validation images)" in text
    # a version trained before the open-set check says nothing about it
    assert "Unknown-photo" not in format_report(TrainingOutcome("promoted", "ok", version="v1", metrics=metrics()))
