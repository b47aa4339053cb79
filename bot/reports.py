"""Texts the bot sends about trainings: the live progress message and the final report.

Plain text only (no parse mode): labels are typed by admins and may contain any character.

How sure a report is: the test accuracy comes with its 95% Wilson score interval and the number
of test images (:func:`accuracy_text`), and labels with fewer than
:data:`MIN_TEST_IMAGES_PER_LABEL` test images are named as too few to judge
(:func:`too_few_test_images_text`). Both are also shown by ``/status`` (:mod:`bot.models`).

Real-world accuracy (:class:`RealWorld`, :func:`real_world_lines`): how users rated the answers of
the serving model since it was trained (the feedback buttons, :mod:`bot.feedback`), per answered
label (``right / rated``, the precision users observed), next to the test split's precision of the
same label. ``/status`` shows it for the serving model; the training report for the model that
served until that training.

Why this module is long (~460 lines): every text an admin reads about a model's quality is made
here, so that the report, ``/status`` and the real-world figures word accuracy, intervals and
per-label figures the same way (Wilson interval, too-few-test-images hint, users' feedback next to
the test split), plus the sending of the report with its confusion matrix.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image
from telegram import Bot, Message, ReplyParameters
from telegram.error import BadRequest, Forbidden, RetryAfter, TelegramError

from bot.telegram_io import cut_text, retry_after_seconds
from bot.training_runner import TrainingOutcome

if TYPE_CHECKING:
    from model_store.review import ReviewStore

__all__ = [
    "MIN_TEST_IMAGES_PER_LABEL",
    "ProgressMessage",
    "RealWorld",
    "real_world_lines",
    "real_world_of",
    "accuracy_text",
    "fits_as_photo",
    "format_report",
    "notify_admins",
    "send_report",
    "too_few_test_images_text",
    "wilson_interval",
]

log = logging.getLogger(__name__)

MAX_LABEL_LINES = 40
_STAGES = {
    "bottlenecks": "computing image features",
    "training": "training",
    "evaluating": "testing the new model",
    "saving": "saving the new model",
}


def _pct(value: Any, decimals: int = 1) -> str:
    try:
        return f"{float(value) * 100:.{decimals}f}%"
    except (TypeError, ValueError):
        return "n/a"


#: z for a two-sided 95% interval: the 0.975 quantile of the standard normal distribution
Z_95 = 1.959963984540054

#: A label with fewer test images than this is "too few to judge". Below 10, one image moves the
#: label's recall by more than 10 points, and even a perfect score does not tell a good label from
#: a poor one: the 95% Wilson interval of 9/9 is 70–100%, of 5/5 57–100% (of 20/20: 84–100%).
MIN_TEST_IMAGES_PER_LABEL = 10


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (default: 95%).

    Wilson, E. B. (1927), "Probable inference, the law of succession, and statistical inference",
    JASA 22(158): 209-212; recommended over the Wald interval ``p ± z·sqrt(p(1-p)/n)`` for small
    ``n`` and for ``p`` near 0 or 1 by Agresti & Coull (1998), "Approximate is better than 'exact'
    for interval estimation of binomial proportions", The American Statistician 52(2): 119-126.
    With p = successes / n::

        centre = (p + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)

    Args:
        successes: e.g. correctly classified test images, 0 <= successes <= trials.
        trials: e.g. test images, > 0.
        z: the standard normal quantile of the confidence level (1.96 for 95%).

    Returns:
        (low, high) as fractions in [0, 1].

    Raises:
        ValueError: trials <= 0, or successes outside 0..trials.
    """
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _correct_and_total(metrics: dict[str, Any]) -> tuple[int, int] | None:
    """(correct, total) test images of a version's metrics, or None if it does not say."""
    total = metrics.get("test_images")
    matrix = metrics.get("confusion_matrix")
    if isinstance(matrix, list) and all(isinstance(row, list) for row in matrix):
        try:
            cells = [[int(v) for v in row] for row in matrix]
            correct = sum(row[i] for i, row in enumerate(cells) if i < len(row))
            total = sum(map(sum, cells))
        except (TypeError, ValueError):
            cells = []
        if cells and total:
            return correct, total
    accuracy = metrics.get("accuracy")
    if isinstance(total, int) and total > 0 and isinstance(accuracy, int | float) and 0 <= accuracy <= 1:
        return round(accuracy * total), total
    return None


def accuracy_text(metrics: dict[str, Any]) -> str:
    """"85.7% on 35 test images (95% interval 70.6–93.7%)" for a version's metrics.

    The interval is :func:`wilson_interval` of the correctly classified test images (the diagonal
    of ``metrics["confusion_matrix"]``, else ``accuracy`` × ``test_images``). Without a test count,
    only the percentage (or "unknown").
    """
    counts = _correct_and_total(metrics)
    if counts is None:
        accuracy = metrics.get("accuracy")
        return _pct(accuracy) if isinstance(accuracy, int | float) else "unknown"
    correct, total = counts
    low, high = wilson_interval(correct, total)
    noun = "test image" if total == 1 else "test images"
    return f"{_pct(correct / total)} on {total} {noun} (95% interval {_pct(low)}–{_pct(high)})"


def too_few_test_images_text(metrics: dict[str, Any]) -> str | None:
    """A hint naming the labels with fewer than :data:`MIN_TEST_IMAGES_PER_LABEL` test images
    (their figures are too uncertain to judge), with how many photos a label needs; None if none."""
    per_label = metrics.get("per_label")
    if not isinstance(per_label, dict):
        return None
    few = [
        (name, figures.get("support"))
        for name, figures in per_label.items()
        if isinstance(figures, dict)
        and isinstance(figures.get("support"), int)
        and figures["support"] < MIN_TEST_IMAGES_PER_LABEL
    ]
    if not few:
        return None
    shown = ", ".join(f"{name} ({n})" for name, n in few[:MAX_LABEL_LINES])
    if len(few) > MAX_LABEL_LINES:
        shown += f" and {len(few) - MAX_LABEL_LINES} more"
    config = metrics.get("config")
    share = config.get("testing_percentage") if isinstance(config, dict) else None
    need = ""
    if isinstance(share, int | float) and 0 < share <= 100:
        need = (
            f" With {share:g}% of the photos set aside for testing, that takes about "
            f"{math.ceil(MIN_TEST_IMAGES_PER_LABEL * 100 / share)} photos per label."
        )
    return (
        f"Too few test images to judge these labels (fewer than {MIN_TEST_IMAGES_PER_LABEL}): {shown}. "
        f"Their figures can be far off; add photos with /add.{need}"
    )


@dataclass(frozen=True)
class RealWorld:
    """Users' feedback on a model's answers since ``since`` (``ReviewStore.real_world_accuracy``).

    Attributes:
        since: unix seconds (the model's training time).
        per_label: answered label -> (right, rated) answers, ``0 <= right <= rated``.
        unknown: answers that said "none of my labels": (users agreed, rated).
        version: the model version the answers came from (None: unknown).
        metrics: that version's metrics (its test split's per-label figures are shown alongside).
    """

    since: float
    per_label: dict[str, tuple[int, int]] = field(default_factory=dict)
    unknown: tuple[int, int] = (0, 0)
    version: str | None = None
    metrics: dict[str, Any] | None = None

    @classmethod
    def read(cls, review: ReviewStore, version: Any) -> RealWorld:
        """Users' feedback on ``version``'s answers (a ``ModelVersion``) since it was trained (only
        its own: after a /rollback, not those of the newer version).

        Blocking (SQLite): call it in a worker thread.
        """
        since = float(version.created_at or 0.0)
        return cls(
            since,
            review.real_world_accuracy(since=since, model_version=version.name),
            review.unknown_feedback(since=since, model_version=version.name),
            version.name,
            version.metrics,
        )

    @property
    def rated(self) -> int:
        """Rated answers with a label (the unknown ones apart)."""
        return sum(rated for _, rated in self.per_label.values())

    @property
    def right(self) -> int:
        return sum(right for right, _ in self.per_label.values())


def real_world_lines(real: RealWorld) -> list[str]:
    """Users' accuracy overall and per label, next to the test split's figures of that model.

    Per label, users' ``right / rated`` for the answers naming that label is a precision, so the
    test split's precision of the label stands next to it (``real.metrics["per_label"]``), and the
    test accuracy next to the overall figure.
    """
    metrics = real.metrics or {}
    per_label_test = metrics.get("per_label") or {}
    what = f"model {real.version}" if real.version else "the model"
    head = f"Real-world accuracy (users' feedback on {what} since it was trained)"
    if not real.rated and not real.unknown[1]:
        return [f"{head}: no rated answers yet."]
    lines = []
    if real.rated:
        low, high = wilson_interval(real.right, real.rated)
        test = f"; its test accuracy: {accuracy_text(metrics)}" if metrics else ""
        lines.append(
            f"{head}: {_pct(real.right / real.rated)} right of {real.rated} rated answers "
            f"(95% interval {_pct(low)}–{_pct(high)}){test}"
        )
        for name, (right, rated) in list(real.per_label.items())[:MAX_LABEL_LINES]:
            figures = per_label_test.get(name) if isinstance(per_label_test, dict) else None
            precision = figures.get("precision") if isinstance(figures, dict) else None
            test_part = f"; test precision {_pct(precision, 0)}" if precision is not None else ""
            lines.append(f"  {name}: users {right}/{rated} right ({_pct(right / rated, 0)}){test_part}")
        if len(real.per_label) > MAX_LABEL_LINES:
            lines.append(f"  … and {len(real.per_label) - MAX_LABEL_LINES} more labels")
    else:
        lines.append(f"{head}: no rated answers naming a label yet.")
    agreed, rated = real.unknown
    if rated:
        lines.append(f"  “none of my labels” answers: users agreed with {agreed} of {rated}")
    return lines


async def real_world_of(review: ReviewStore, version: Any) -> RealWorld | None:
    """:meth:`RealWorld.read` in a worker thread; None without a version or when the review store
    cannot be read (logged: a report goes out anyway)."""
    if version is None:
        return None
    try:
        return await asyncio.to_thread(RealWorld.read, review, version)
    except Exception as exc:  # noqa: BLE001 - a report never fails for this
        log.warning("could not read users' feedback for the report: %s", exc)
        return None


def format_progress(stage: str, done: int, total: int, elapsed: float) -> str:
    """One progress line, e.g. "Retraining… training: epoch 3/60 (12 s)"."""
    what = _STAGES.get(stage, stage or "working")
    if stage == "training" and total:
        detail = f"{what}: epoch {done}/{total}"
    elif total > 1:
        detail = f"{what}: {done}/{total} images"
    else:
        detail = what
    return f"Retraining… {detail} ({elapsed:.0f} s)"


def _open_set_thresholds(open_set: dict[str, Any]) -> str:
    """The thresholds of ``metrics["open_set"]``: the kNN distance's and, for the combined method
    (``model_store.openset``), the top softmax probability under which a photo is unknown."""
    knn = open_set.get("knn_threshold")
    if knn is None:  # the kNN distance alone (versions trained before the combined check)
        return f"threshold {float(open_set['threshold']):.3f}"
    msp = open_set.get("msp_threshold")
    softmax = (
        f"top probability under {1 - float(msp):.0%}" if msp is not None else "softmax part off (too few validation images)"
    )
    return f"distance threshold {float(knn):.3f}, {softmax}"


def format_report(outcome: TrainingOutcome, real_world: RealWorld | None = None) -> str:
    """The report an admin reads after a training: outcome, accuracy, per-label figures.

    ``real_world``: users' feedback on the model that served until this training, next to that
    model's test figures (:func:`real_world_lines`).
    """
    when = {"manual": "", "scheduled": " (scheduled)", "startup": " (missed while the bot was down)"}
    label = when.get(outcome.trigger or "", "")
    m = outcome.metrics
    lines: list[str] = []
    if outcome.status == "promoted":
        lines.append(f"Retraining done{label}: model {outcome.version} is now serving.")
    elif outcome.status == "refused":
        # the pipeline's message names the gate's reasons and says the current model keeps serving
        lines.append(f"Retraining done{label}, but the new model was not promoted.")
        lines.append(outcome.message)
    else:
        lines.append(f"Retraining failed{label}: {outcome.message}")
        if "keeps serving" not in outcome.message:
            lines.append("The current model keeps serving.")
    if outcome.status != "failed" and m:
        lines.append("")
        lines.append(f"Test accuracy: {accuracy_text(m)}")
        if m.get("backbone"):
            lines.append(
                f"Backbone: {(m.get('backbone') or {}).get('name')}, "
                f"engine: {(m.get('engine') or {}).get('serving') or 'TensorFlow'}"
            )
        comparison = (m.get("gate") or {}).get("comparison") or {}
        if comparison.get("current_accuracy") is not None:
            lines.append(
                f"Previous model {comparison.get('version')}: {_pct(comparison.get('current_accuracy'))} "
                f"on the same {comparison.get('images')} images"
            )
        open_set = m.get("open_set") or {}
        if isinstance(open_set, dict) and open_set.get("threshold") is not None:
            lines.append(f"Unknown-photo check: {_open_set_thresholds(open_set)} "
                f"({float(open_set.get('pass_rate') or 0.95):.0%} of known photos pass); "
                f"it rejects {open_set.get('test_rejected')} of {open_set.get('test_images')} test images"
            )
        if outcome.excluded_labels:
            lines.append(f"Left out for having too few images: {', '.join(outcome.excluded_labels)}")
        per_label = m.get("per_label") or {}
        if isinstance(per_label, dict) and per_label:
            lines.append("")
            lines.append("Per label: precision / recall (test images)")
            items = list(per_label.items())
            for name, figures in items[:MAX_LABEL_LINES]:
                figures = figures if isinstance(figures, dict) else {}
                lines.append(
                    f"{name}: {_pct(figures.get('precision'), 0)} / {_pct(figures.get('recall'), 0)} "
                    f"({figures.get('support', '?')})"
                )
            if len(items) > MAX_LABEL_LINES:
                lines.append(f"… and {len(items) - MAX_LABEL_LINES} more labels")
        hint = too_few_test_images_text(m)
        if hint:
            lines.append("")
            lines.append(hint)
    if real_world is not None:
        lines.append("")
        lines += real_world_lines(real_world)
    return cut_text("\n".join(lines))


#: Telegram's sendPhoto limits: width + height at most 10000 px, at most 10 MB, ratio at most 20.
PHOTO_MAX_SIDES = 10_000
PHOTO_MAX_BYTES = 10 * 1024 * 1024
PHOTO_MAX_RATIO = 20


def fits_as_photo(data: bytes) -> bool:
    """Whether a PNG/JPEG can be sent with ``sendPhoto`` (else it goes as a document).

    Only the header is read. Unreadable data is "no" (the document path sends it unchanged).
    """
    if len(data) > PHOTO_MAX_BYTES:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - any unreadable header: send it as a file
        return False
    if width <= 0 or height <= 0:
        return False
    return width + height <= PHOTO_MAX_SIDES and max(width, height) <= PHOTO_MAX_RATIO * min(width, height)


async def send_report(
    bot: Bot, chat_id: int, outcome: TrainingOutcome, *, reply_to: int | None = None, real_world: RealWorld | None = None
) -> None:
    """Send the report text and, when there is one, the confusion-matrix picture.

    The picture goes as a photo when Telegram accepts it as one (:func:`fits_as_photo`), else as
    a document; with many labels the picture shows the most confused ones and the full matrix
    (``confusion_matrix.csv`` next to it, written by the training) follows as a document.
    """
    params = ReplyParameters(message_id=reply_to, allow_sending_without_reply=True) if reply_to else None
    await bot.send_message(chat_id, format_report(outcome, real_world), reply_parameters=params)
    png = outcome.confusion_png
    if png is None or outcome.status == "failed":
        return
    try:
        data = await asyncio.to_thread(png.read_bytes)
    except OSError as exc:
        log.warning("confusion matrix %s unreadable: %s", png, exc)
        return
    caption = f"Confusion matrix of {outcome.version} (rows: true label)"
    if await asyncio.to_thread(fits_as_photo, data):
        await bot.send_photo(chat_id, data, caption=caption)
    else:
        await bot.send_document(chat_id, data, filename=png.name, caption=caption)
    table = png.with_suffix(".csv")
    try:
        table_data = await asyncio.to_thread(table.read_bytes)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("confusion matrix table %s unreadable: %s", table, exc)
        return
    await bot.send_document(
        chat_id, table_data, filename=table.name, caption=f"Full confusion matrix of {outcome.version} (CSV, rows: true label)"
    )


async def notify_admins(
    bot: Bot, admins: Iterable[int], outcome: TrainingOutcome, *, skip: int | None = None, real_world: RealWorld | None = None
) -> None:
    """Send the report to every admin's private chat (an admin who never started the bot is skipped)."""
    for admin in admins:
        if admin == skip:
            continue
        try:
            await send_report(bot, admin, outcome, real_world=real_world)
        except (Forbidden, BadRequest) as exc:  # the admin never opened a chat with the bot
            log.warning("could not send the training report to admin %d: %s", admin, exc.message)
        except TelegramError as exc:  # network trouble: the other admins still get theirs
            log.warning("could not send the training report to admin %d: %s", admin, exc)


class ProgressMessage:
    """One message edited in place with the training's progress, at most every ``interval`` s."""

    def __init__(self, message: Message, *, interval: float = 2.0) -> None:
        self.message = message
        self.interval = interval
        self._started = time.monotonic()
        self._last_edit = 0.0
        self._last_text = message.text or ""
        self._last_stage = ""

    async def update(self, stage: str, done: int, total: int) -> None:
        """Show a progress event (throttled: at most every ``interval`` s, sooner on a new stage)."""
        now = time.monotonic()
        stage_changed = stage != self._last_stage
        self._last_stage = stage
        if now - self._last_edit < self.interval and not (stage_changed and now - self._last_edit >= 0.5):
            return
        await self.set_text(format_progress(stage, done, total, now - self._started))

    async def set_text(self, text: str) -> None:
        """Edit the message to ``text`` now; Telegram errors are logged, never raised."""
        if text == self._last_text:
            return
        self._last_edit = time.monotonic()
        try:
            await self.message.edit_text(text)
            self._last_text = text
        except RetryAfter as exc:  # flood control: skip edits for a while, the training goes on
            self._last_edit = time.monotonic() + retry_after_seconds(exc)
        except BadRequest as exc:
            if "not modified" not in exc.message:
                log.info("progress message not edited: %s", exc.message)
        except TelegramError as exc:
            log.info("progress message not edited: %s", exc)

    async def finish(self, text: str) -> None:
        """Show the final line (never raises for Telegram errors)."""
        with contextlib.suppress(TelegramError):
            await self.set_text(text)
