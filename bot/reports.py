"""Texts the bot sends about trainings: the live progress message and the final report.

Plain text only (no parse mode): labels are typed by admins and may contain any character.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from telegram import Bot, Message, ReplyParameters
from telegram.error import BadRequest, Forbidden, RetryAfter, TelegramError

from bot.ratelimit import retry_after_seconds
from bot.training_runner import TrainingOutcome

__all__ = ["ProgressMessage", "format_report", "notify_admins", "send_report"]

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


def format_report(outcome: TrainingOutcome) -> str:
    """The report an admin reads after a training: outcome, accuracy, per-label figures."""
    when = {"manual": "", "scheduled": " (scheduled)", "startup": " (missed while the bot was down)"}
    label = when.get(outcome.trigger, "")
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
        test_images = m.get("test_images")
        lines.append("")
        lines.append(f"Test accuracy: {_pct(m.get('accuracy'))}" + (f" on {test_images} images" if test_images else ""))
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
    text = "\n".join(lines)
    return text if len(text) <= 4000 else text[:3990] + "\n…"


async def send_report(bot: Bot, chat_id: int, outcome: TrainingOutcome, *, reply_to: int | None = None) -> None:
    """Send the report text and, when there is one, the confusion-matrix picture."""
    params = ReplyParameters(message_id=reply_to, allow_sending_without_reply=True) if reply_to else None
    await bot.send_message(chat_id, format_report(outcome), reply_parameters=params)
    png = outcome.confusion_png
    if png is not None and outcome.status != "failed":
        try:
            data = await asyncio.to_thread(png.read_bytes)
        except OSError as exc:
            log.warning("confusion matrix %s unreadable: %s", png, exc)
            return
        await bot.send_photo(chat_id, data, caption=f"Confusion matrix of {outcome.version} (rows: true label)")


async def notify_admins(bot: Bot, admins: Iterable[int], outcome: TrainingOutcome, *, skip: int | None = None) -> None:
    """Send the report to every admin's private chat (an admin who never started the bot is skipped)."""
    for admin in admins:
        if admin == skip:
            continue
        try:
            await send_report(bot, admin, outcome)
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
