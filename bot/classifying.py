"""Everyone's side of the bot: photos and image files get labels.

Flow of one photo: the largest ``PhotoSize`` (or the image ``Document``) is checked against
``classify.max_file_bytes`` before anything is downloaded -> the bytes are downloaded -> decoded
by :func:`model_store.images.decode_image` in the decode pool (``BotData.decoders``, within the
process-wide decode memory budget; JPEGs DCT-scaled, everything reduced to what the classifier
keeps) -> handed to the micro-batcher, which classifies concurrent photos in one forward pass on
its own thread -> the reply (to that message) lists the top-k labels with percentages, or starts
with "I'm not sure" when the best one is under ``classify.confidence_threshold``, or says the
photo looks like none of the labels when the model's open-set check flags it
(``model_store.openset``; :func:`unknown_text`). The reply carries the feedback buttons and the
answer is recorded for the review queue (:func:`bot.feedback.send_answer`).

Teaching captions and admins' albums never reach :func:`on_image`: :mod:`bot.app` routes them to
:mod:`bot.teaching` (or to a refusal) first.
"""

from __future__ import annotations

import logging
from typing import Any

from telegram import Message, Update
from telegram.constants import ChatAction
from telegram.error import TelegramError
from telegram.ext import BaseHandler, MessageHandler, filters

from bot.context import BotData, Context
from bot.feedback import send_answer
from bot.telegram_io import download_image, image_ref, reply
from bot.wording import error_text
from model_store.classifier import KEEP_SIDE, Predictions, Prepared
from model_store.errors import LabelgramError, NoModelError
from model_store.images import decode_image

__all__ = [
    "classify_message",
    "format_predictions",
    "handlers",
    "on_image",
    "reply_text",
    "still_learning_text",
    "unknown_text",
]

log = logging.getLogger(__name__)


def _decode_and_prepare(data: BotData, raw: bytes) -> Prepared:
    """Decode image bytes (size-limited) and prepare them for the serving model (decode pool).

    The image is decoded no larger than needed: the classifier keeps at most ``KEEP_SIDE`` pixels
    on the longer side, so JPEGs are DCT-scaled and other formats box-reduced towards it.
    """
    rgb = decode_image(raw, max_pixels=data.config.classify.max_pixels, max_side=KEEP_SIDE)
    return data.classifier.prepare(rgb)


async def send_action(context: Context, message: Message, action: str) -> None:
    """Show "sending a photo…"/"typing…", at most every few seconds per chat; failures are ignored."""
    if not context.bot_data.chat_actions.ready(message.chat_id):
        return
    try:
        await context.bot.send_chat_action(message.chat_id, action, message_thread_id=message.message_thread_id)
    except TelegramError as exc:
        log.debug("chat action not sent: %s", exc)


def _percent(p: float) -> str:
    value = p * 100
    if 0 < value < 1:
        return "<1%"
    return f"{value:.0f}%"


def format_predictions(predictions: list[tuple[str, float]], threshold: float) -> str:
    """The reply text for one photo's top-k predictions ((label, probability in [0, 1]) pairs)."""
    if not predictions:
        return "I couldn't find any label for this one."
    lines = [f"{label} — {_percent(p)}" for label, p in predictions]
    if predictions[0][1] < threshold:
        return "I'm not sure what this is. My best guesses:\n" + "\n".join(lines)
    return "\n".join(lines)


#: most labels listed in the reply to an unknown photo (the rest are counted)
UNKNOWN_LIST_LABELS = 12


def unknown_text(predictions: list[tuple[str, float]], labels: list[str]) -> str:
    """The reply to a photo that looks like none of the model's labels (open-set check).

    Args:
        predictions: its top-k ``(label, probability)`` pairs, best first (listed as the closest,
            one "label — percent" line each, as in :func:`format_predictions`).
        labels: every label of the serving model (at most :data:`UNKNOWN_LIST_LABELS` are listed).
    """
    shown = labels[:UNKNOWN_LIST_LABELS]
    listed = ", ".join(shown) + (f" and {len(labels) - len(shown)} more" if len(labels) > len(shown) else "")
    text = "This doesn't look like anything I've been taught"
    text += f" (my labels: {listed})." if labels else "."
    if predictions:
        text += " If it is one of them, the closest are:\n" + "\n".join(
            f"{label} — {_percent(p)}" for label, p in predictions
        )
    return text


def reply_text(predictions: list[tuple[str, float]], threshold: float) -> str:
    """The reply for one classified photo: :func:`unknown_text` (naming the labels of the version
    that classified it) when the classifier flagged it as unknown (``Predictions.unknown``), else
    :func:`format_predictions` (which starts with "I'm not sure" under ``threshold``)."""
    if isinstance(predictions, Predictions) and predictions.unknown:
        return unknown_text(predictions, list(predictions.labels))
    return format_predictions(predictions, threshold)


def still_learning_text(is_admin: bool) -> str:
    """The reply to a photo before any model exists (admins are told how to teach)."""
    if is_admin:
        return (
            "I'm still learning: there is no trained model yet. Teach me by sending photos with the "
            "caption /add <label> (at least 2 labels with 5 or more photos each), then send /retrain."
        )
    return (
        "I'm still learning and can't label photos yet. My admins teach me by sending example photos "
        "with /add <label>; once I've been trained, send your photo again."
    )


async def classify_message(context: Context, message: Message, user_id: int | None) -> None:
    """Answer one photo / image document sent by ``user_id`` with its labels (or a polite reason why not)."""
    data = context.bot_data
    ref = image_ref(message)
    if ref is None:
        return
    if user_id is not None and not data.is_admin(user_id) and not data.rate.allow(user_id):
        if data.rate.should_warn(user_id):
            await reply(
                message,
                "You're sending photos faster than I can look at them. "
                f"Please wait a minute (the limit is {data.config.limits.photos_per_minute} per minute).",
            )
        log.info("rate limit: photo from user %s not classified", user_id)
        return
    limit = data.config.classify.max_file_bytes
    try:
        await send_action(context, message, ChatAction.TYPING)
        # The slot is taken before downloading: it bounds the bytes and decoded images in memory,
        # the HTTP requests in flight (httpx's pool gets slow with hundreds queued), and makes a
        # burst of photos go through roughly first come, first served instead of in lockstep.
        # The download budget is weighted by the file's size (the limit when Telegram did not say),
        # held until the decode is done: a burst of large files waits instead of piling up.
        size = ref.file_size if ref.file_size is not None else limit
        async with data.image_slots:
            async with data.download_budget.reserve(size):
                raw = await download_image(context.bot, ref, limit=limit)
                # Decode, crop and resize here, in the decode pool: the model's thread only runs
                # the forward pass (Classifier.prepare).
                prepared = await data.in_decode_pool(_decode_and_prepare, data, raw)
                del raw
            predictions = await data.batcher.submit(prepared)
            del prepared
    except NoModelError:
        await reply(message, still_learning_text(data.is_admin(user_id)))
        return
    except LabelgramError as exc:  # unreadable image, too large, ...
        await reply(message, error_text(exc))
        return
    # with the "right" / "wrong" buttons, and recorded for the review queue (bot.feedback)
    await send_answer(context, message, reply_text(predictions, data.config.classify.confidence_threshold), predictions, ref, user_id)


async def on_image(update: Update, context: Context) -> None:
    """A photo or image document to classify."""
    message = update.effective_message
    if message is None:
        return
    await classify_message(context, message, update.effective_user.id if update.effective_user else None)


def handlers() -> list[BaseHandler[Any, Any, Any]]:
    """Every new photo or image document (route it after the teaching and refusal routes)."""
    return [MessageHandler(filters.UpdateType.MESSAGE & (filters.PHOTO | filters.Document.IMAGE), on_image)]
