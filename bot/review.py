"""The admins' review queue: ``/review`` shows one item at a time, and its buttons.

An item is a photo users rated "wrong" / "none of these", or one the model was unsure of (active
learning, ``review.auto_queue``), kept by the review store (``model_store.review``, in
``catalog.sqlite``: it survives restarts, bounded by ``review.max_queue``, expiring after
``review.keep_days``) as a Telegram file id, never as the photo. ``/review`` sends the item the
store ranks first (``model_store.active_learning.priority``: the most uncertain, then the most
disputed) as a photo by its file id, with the model's guess and what users said, and the buttons:

* "Accept as <label>" (the label users suggested most, else the model's guess): the photo is
  downloaded by its file id and stored exactly like ``/add`` (:func:`bot.feedback.add_by_file_id`:
  same size limit, validation, dedupe, atomic write), ``added_by`` = the admin, ``suggested_by`` =
  the user who sent it; then the item is resolved and the next one shown;
* "Another label…": the labels, paged (``review.labels_per_page``), each accepting as that label;
* "Discard": resolved without adding anything; then the next one;
* "Next": the next item, this one left in the queue (skipped for the rest of this review).

Button state: :class:`ReviewButton` through PTB's arbitrary callback data (see
:mod:`bot.feedback`); everything else is read from the store at each press, so a button whose
item another admin resolved meanwhile says so, and a restart only expires the buttons (``/review``
again shows the same queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from telegram import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, ReplyParameters, Update
from telegram.constants import ChatType
from telegram.error import BadRequest, TelegramError
from telegram.ext import BaseHandler, CommandHandler, filters

from bot.access import ButtonsFrom
from bot.context import BotData, Context
from bot.feedback import label_pages, no_longer_text, stored_label
from bot.telegram_io import NEW, FileTooLarge, ImageRef, download_image, images_text, reply
from bot.wording import error_text
from model_store.errors import DuplicateImageError, LabelgramError, ReviewItemGoneError
from model_store.labels import label_key
from model_store.review import ReviewSettings

if TYPE_CHECKING:
    from bot.config import Config
    from model_store.review import ReviewItem

__all__ = ["ReviewButton", "handlers", "item_text", "on_review", "on_review_button", "store_settings"]

log = logging.getLogger(__name__)

#: most items one review skips with "Next" (older skips are forgotten: they may come back)
MAX_SKIPPED = 50

#: Telegram's caption limit is 1,024 characters
MAX_CAPTION = 1000

def store_settings(config: Config) -> ReviewSettings:
    """The review store's settings (:class:`model_store.review.ReviewSettings`) from the ``[review]`` config section."""
    r = config.review
    return ReviewSettings(
        max_queue=r.max_queue, max_answers=r.max_answers, retention_days=r.keep_days, uncertain_margin=r.uncertain_margin
    )


ReviewAction = Literal["accept", "labels", "page", "discard", "next", "back"]


@dataclass(frozen=True, slots=True)
class ReviewButton:
    """The data of one review button: the item, what it does, its argument, the items skipped so far."""

    item_id: int
    action: ReviewAction
    value: str | int | None = None
    skip: tuple[int, ...] = ()


def _pct(p: float) -> str:
    return "<1%" if 0 < p < 0.005 else f"{p * 100:.0f}%"


def _suggested(item: ReviewItem) -> str | None:
    """The label to offer first: the one users suggested most (the store orders them), else the model's guess."""
    for label, votes in item.suggestions.items():
        if votes:
            return label
    if item.predictions and not item.unknown:
        return item.predictions[0][0]
    return None


def item_text(item: ReviewItem, pending: int, *, before: str = "") -> str:
    """The caption of one review item: why it is here, the model's guess, what users said, who and when.

    Args:
        item: the review item.
        pending: how many items wait in the queue (this one included).
        before: a line put first (what the previous press did, e.g. "Added to shoes (7 images).").
    """
    if item.reason == "feedback":
        reason = "a user said my answer was wrong"
    elif item.unknown:
        reason = "it looked like none of my labels"
    else:
        reason = "I was unsure"
    lines = [before] if before else []
    lines.append(f"To review ({pending} waiting): {reason}.")
    guesses = ", ".join(f"{label} {_pct(p)}" for label, p in item.predictions[:3])
    lines.append(f"I said: {guesses or 'nothing'}" + (" (but it looked like none of my labels)" if item.unknown else ""))
    said = [f"{label} ({n})" for label, n in item.suggestions.items() if n]
    if item.none_votes:
        said.append(f"none of these ({item.none_votes})")
    lines.append("Users said: " + (", ".join(said) if said else "nothing yet"))
    when = datetime.fromtimestamp(float(item.queued_at), UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"Sent by user {item.sender_id}, queued {when}.")
    text = "\n".join(lines)
    return text if len(text) <= MAX_CAPTION else text[: MAX_CAPTION - 1] + "…"


def item_keyboard(item: ReviewItem, skip: tuple[int, ...]) -> InlineKeyboardMarkup:
    """Accept as <label> / Another label… / Discard / Next."""
    rows = []
    label = _suggested(item)
    if label is not None:
        rows.append([InlineKeyboardButton(f"✅ Accept as {label}", callback_data=ReviewButton(item.item_id, "accept", label, skip))])
    rows.append([InlineKeyboardButton("Another label…", callback_data=ReviewButton(item.item_id, "labels", 0, skip))])
    rows.append([
        InlineKeyboardButton("🗑 Discard", callback_data=ReviewButton(item.item_id, "discard", None, skip)),
        InlineKeyboardButton("Next ▶", callback_data=ReviewButton(item.item_id, "next", None, skip)),
    ])
    return InlineKeyboardMarkup(rows)


def labels_keyboard(item_id: int, labels: list[str], page: int, per_page: int, skip: tuple[int, ...]) -> InlineKeyboardMarkup:
    """Page ``page`` of every label (each accepts as that label), "◀" / "▶", and "Back"."""
    pages = label_pages(labels, per_page)
    page = min(max(page, 0), pages - 1)
    shown = labels[page * per_page : (page + 1) * per_page]
    rows = [
        [InlineKeyboardButton(name, callback_data=ReviewButton(item_id, "accept", name, skip)) for name in shown[i : i + 2]]
        for i in range(0, len(shown), 2)
    ]
    nav = []
    if page > 0:
        nav.append(InlineKeyboardButton("◀ Previous", callback_data=ReviewButton(item_id, "page", page - 1, skip)))
    if page < pages - 1:
        nav.append(InlineKeyboardButton(f"More ({page + 2}/{pages}) ▶", callback_data=ReviewButton(item_id, "page", page + 1, skip)))
    if nav:
        rows.append(nav)
    rows.append([InlineKeyboardButton("Back", callback_data=ReviewButton(item_id, "back", None, skip))])
    return InlineKeyboardMarkup(rows)


def _reply_params(message_id: int | None) -> ReplyParameters | None:
    return ReplyParameters(message_id=message_id, allow_sending_without_reply=True) if message_id else None


async def _send_next(context: Context, chat_id: int, skip: tuple[int, ...], *, before: str = "", reply_to: int | None = None) -> None:
    """Send the first item of the queue not in ``skip`` (or say the queue is empty), ``before`` on top."""
    data = context.bot_data
    review = data.review
    item = await asyncio.to_thread(review.next_item, skip=skip)
    if item is None:
        pending = await asyncio.to_thread(review.pending_count)
        if pending:
            end = f"No other item waiting ({pending} skipped in this review; send /review to see them again)."
        else:
            end = "The review queue is empty. Thanks!"
        text = f"{before}\n{end}" if before else end
        await context.bot.send_message(chat_id, text, reply_parameters=_reply_params(reply_to))
        return
    pending = await asyncio.to_thread(review.pending_count)
    caption = item_text(item, pending, before=before)
    markup = item_keyboard(item, skip)
    params = _reply_params(reply_to)
    try:
        await context.bot.send_photo(chat_id, item.file_id, caption=caption, reply_markup=markup, reply_parameters=params)
        return
    except BadRequest as exc:  # an image sent as a file has a document's file id
        log.info("review item %s: not sent as a photo by file id: %s", item.item_id, exc.message)
    try:
        await context.bot.send_document(chat_id, item.file_id, caption=caption, reply_markup=markup, reply_parameters=params)
    except BadRequest as exc:  # the file id is no longer valid: still reviewable (discard), say why
        log.info("review item %s: not sent as a file by file id either: %s", item.item_id, exc.message)
        await context.bot.send_message(
            chat_id, caption + "\n(Telegram no longer shows this photo: discard it.)", reply_markup=markup,
            reply_parameters=params,
        )


async def on_review(update: Update, context: Context) -> None:
    """``/review`` (admins, in a private chat: the items are users' photos): the first item of the queue."""
    message = update.effective_message
    if message is None:
        return
    if message.chat.type != ChatType.PRIVATE:  # the queue holds users' photos, sent to the bot privately too
        await reply(message, "The review queue shows users' photos: send /review to me in a private chat.")
        return
    await _send_next(context, message.chat_id, (), reply_to=message.message_id)


async def _answer(query: CallbackQuery, text: str | None = None, *, alert: bool = False) -> None:
    try:
        await query.answer(text[:200] if text else None, show_alert=alert)
    except TelegramError as exc:
        log.info("could not answer a review button: %s", exc)


async def _markup(context: Context, query: CallbackQuery, markup: InlineKeyboardMarkup | None) -> None:
    try:
        await query.edit_message_reply_markup(markup)
    except BadRequest as exc:
        if "not modified" not in exc.message:
            log.info("could not change a review keyboard: %s", exc.message)
    except TelegramError as exc:
        log.info("could not change a review keyboard: %s", exc)
    with contextlib.suppress(KeyError):
        context.drop_callback_data(query)


async def _labels(data: BotData) -> list[str]:
    return [i.name for i in await asyncio.to_thread(data.workspace.store.labels)]


async def on_review_button(update: Update, context: Context) -> None:
    """An admin pressed a review button (see the module docstring)."""
    query = update.callback_query
    if query is None or not isinstance(query.data, ReviewButton) or query.message is None:
        return
    button: ReviewButton = query.data
    data = context.bot_data
    if button.action in ("accept", "discard", "next"):
        # a double tap, or two admins' presses together: the first is handled, the others wait for
        # nothing (each would show the next item again)
        if button.item_id in data.review_busy:
            await _answer(query, "One moment: I'm already on it.")
            return
        data.review_busy.add(button.item_id)
        try:
            await _on_press(context, query, button)
        finally:
            data.review_busy.discard(button.item_id)
        return
    await _on_press(context, query, button)


async def _on_press(context: Context, query: CallbackQuery, button: ReviewButton) -> None:
    data = context.bot_data
    admin = query.from_user.id
    assert query.message is not None
    chat_id = query.message.chat.id
    item = await asyncio.to_thread(data.review.get_item, button.item_id)
    if item is None or item.status != "pending":
        await _answer(query, "Already handled (by another admin), withdrawn or expired.")
        await _markup(context, query, None)
        await _send_next(context, chat_id, button.skip)
        return
    per_page = data.config.review.labels_per_page
    if button.action in ("labels", "page"):
        page = button.value if isinstance(button.value, int) else 0
        await _markup(context, query, labels_keyboard(item.item_id, await _labels(data), page, per_page, button.skip))
        await _answer(query, "Which label?" if button.action == "labels" else None)
        return
    if button.action == "back":
        await _markup(context, query, item_keyboard(item, button.skip))
        await _answer(query)
        return
    if button.action == "next":
        skip = (*button.skip, item.item_id)[-MAX_SKIPPED:]
        await _markup(context, query, None)
        await _answer(query)
        await _send_next(context, chat_id, skip)
        return
    if button.action == "discard":
        try:
            await asyncio.to_thread(data.review.resolve, item.item_id, action="discarded", by=admin)
        except ReviewItemGoneError:
            await _answer(query, "Already handled (by another admin), withdrawn or expired.")
            await _markup(context, query, None)
            await _send_next(context, chat_id, button.skip)
            return
        log.info("admin %s discarded review item %s", admin, item.item_id)
        await _markup(context, query, None)
        await _answer(query, "Discarded.")
        await _send_next(context, chat_id, button.skip, before="Discarded.")
        return
    await _accept(context, query, item, str(button.value), button.skip)


async def _accept(context: Context, query: CallbackQuery, item: ReviewItem, label: str, skip: tuple[int, ...]) -> None:
    """Store the item's photo under ``label`` like ``/add``, resolve the item, show the next one.

    The photo is downloaded by its file id (same size limit as ``/add``) and handed to
    ``ReviewStore.accept`` in the decode pool, which adds it with ``ImageStore.add`` (the same
    validation, dedupe and atomic write as ``/add``; ``added_by`` the admin, ``suggested_by`` the
    user who suggested ``label``) and resolves the item.
    """
    data = context.bot_data
    admin = query.from_user.id
    assert query.message is not None
    chat_id = query.message.chat.id
    if await stored_label(data, label) is None:  # adding would create it again, with this one photo
        await _answer(query, no_longer_text(label) + " Choose another label.", alert=True)
        return
    try:
        raw = await download_image(context.bot, ImageRef(item.file_id, None, "photo"), limit=data.config.classify.max_file_bytes)
    except FileTooLarge as exc:
        await _answer(query, error_text(exc), alert=True)
        return
    except TelegramError as exc:
        log.info("review item %s: could not download the photo: %s", item.item_id, exc)
        with contextlib.suppress(ReviewItemGoneError):
            await asyncio.to_thread(data.review.resolve, item.item_id, action="discarded", by=admin)
        await _markup(context, query, None)
        await _answer(query, "Telegram no longer has this photo; I discarded it.", alert=True)
        await _send_next(context, chat_id, skip, before="Discarded: Telegram no longer has that photo.")
        return
    try:
        added = await data.in_decode_pool(data.review.accept, item.item_id, raw, label=label, by=admin)
    except ReviewItemGoneError:
        await _answer(query, "Already handled (by another admin), withdrawn or expired.")
        await _markup(context, query, None)
        await _send_next(context, chat_id, skip)
        return
    except DuplicateImageError as exc:
        if exc.existing_label is None or label_key(exc.existing_label) != label_key(label):
            await _answer(
                query,
                f"This photo is already in my training photos as {exc.existing_label}: nothing changed. "
                "Discard it, or accept it as that label.",
                alert=True,
            )
            return
        with contextlib.suppress(ReviewItemGoneError):
            await asyncio.to_thread(data.review.resolve, item.item_id, action="accepted", by=admin, label=exc.existing_label)
        done = f"Already in {exc.existing_label}."
    except LabelgramError as exc:  # bad label, unreadable, too large, store full: the item stays
        await _answer(query, error_text(exc), alert=True)
        return
    else:
        count = await asyncio.to_thread(data.label_count, added.label)
        done = f"Added to {added.label} ({images_text(count)})." if added.created else f"Already in {added.label}."
    log.info("admin %s accepted review item %s as %r", admin, item.item_id, label)
    await _markup(context, query, None)
    await _answer(query, done)
    await _send_next(context, chat_id, skip, before=done)


def handlers(admins: filters.User) -> list[BaseHandler[Any, Any, Any]]:
    """``/review`` and its buttons, for admins (everyone else is refused by :mod:`bot.access`)."""
    return [
        CommandHandler("review", on_review, filters=NEW & admins),
        ButtonsFrom(on_review_button, admins, admins=True, pattern=ReviewButton),
    ]

