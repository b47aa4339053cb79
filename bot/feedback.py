"""Everyone's feedback on answers ("right" / "wrong" -> which label / "none of these"), and ``/withdraw``.

Flow: :mod:`bot.classifying` answers a photo through :func:`send_answer`: the reply carries a
"Right" / "Wrong" keyboard, then the answer is recorded in the review store
(``ReviewStore.record_answer``, in a worker thread, after the reply is sent so that it never
waits for the store; if the store fails the keyboard is taken off again and the reply stays).
"Wrong" turns the keyboard into the known labels (:attr:`ReviewConfig.labels_per_page` a page)
plus "None of these"; a verdict edits the message in place to thank the user and keeps "Right" /
"Wrong" so that a second tap changes the answer (``set_feedback`` replaces the earlier one). Only
the sender of the photo can rate its answer (in groups everyone else gets a polite refusal);
every photo of an album has its own answer and keyboard. Users who never tap see nothing more.

Feedback waits in the admins' review queue (:mod:`bot.review`), except a teacher's
(``teachers`` config key): their "right" or "wrong -> label" adds the photo to the training
photos at once, downloaded by its file id and stored exactly like ``/add`` (:func:`add_by_file_id`).

Button state: PTB's arbitrary callback data (``ApplicationBuilder.arbitrary_callback_data``, as
``/delete`` uses). Telegram only sees a random id; the button's :class:`FeedbackButton` lives in
PTB's in-memory LRU cache, sized by ``review.button_cache`` (keyboards; every pressed keyboard is
dropped from it :data:`REPLACED_GRACE_SECONDS` after it is replaced, so one answer holds one entry
once the taps are over, and the second tap of a double tap is not told the button expired). The buttons of one answer
share one mutable :class:`Answer`, which receives the store's ``answer_id`` once it is recorded:
the reply is sent before the store is written, so the id cannot be in the data Telegram sees.
Chosen over compact callback data (an answer id in the 64 bytes Telegram allows, the rest in the
store) because PTB's arbitrary callback data is on for the whole bot and replaces every button's
data anyway, and because the labels offered can be longer than 64 bytes. Its cost: a press on an
answer older than the last ``button_cache`` keyboards, or made after a restart, arrives as
``InvalidCallbackData`` and is answered "this button has expired" (the answer itself is still
in the store, for the admins' queue and its expiry). Forged data gets "not valid".

Why this module is long (~580 lines): it is the whole of a user's side of the loop, the keyboard
states (buttons, label pages, thanks), the recording that must never cost the reply, the press
handler with its refusals, the teachers' shortcut into the training photos (with its undo on a
change of mind) and ``/withdraw``; they share the :class:`Answer` state and its wording, and
splitting them would spread one keyboard's life over several files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from telegram import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.error import BadRequest, TelegramError
from telegram.ext import BaseHandler, CallbackQueryHandler, CommandHandler, InvalidCallbackData, filters

from bot.access import ButtonsFrom
from bot.context import BotData, Context
from bot.telegram_io import NEW, ImageRef, download_image, images_text, issued_by_ptb, reply, user_id_of
from bot.wording import error_text
from model_store.errors import (
    DuplicateImageError,
    LabelgramError,
    NotYourPhotoError,
    ReviewItemGoneError,
    UnknownAnswerError,
)
from model_store.labels import label_key

if TYPE_CHECKING:
    from model_store.review import FeedbackResult

__all__ = [
    "Answer",
    "FeedbackButton",
    "add_by_file_id",
    "feedback_keyboard",
    "handlers",
    "label_pages",
    "no_longer_text",
    "on_feedback_button",
    "on_withdraw",
    "send_answer",
    "stored_label",
    "thanks_text",
]

log = logging.getLogger(__name__)

#: how long a press waits for the store to record its answer (it is written right after the reply)
RECORD_WAIT_SECONDS = 10.0

#: seconds the buttons of a replaced keyboard keep working (a double tap; a slow client)
REPLACED_GRACE_SECONDS = 30.0

#: how long a /withdraw also covers the photos sent before it that are still being answered
WITHDRAW_MEMORY_SECONDS = 3600.0

#: a press whose message edit waits longer than this (flood pacing) is answered meanwhile
ANSWER_WITHIN_SECONDS = 1.0

#: the line that separates the answer from the thanks in an edited reply
THANKS_SEPARATOR = "\n\n✔ "

EXPIRED = "This button has expired: I only remember the buttons of recent answers. Send the photo again to rate it."
NOT_VALID = "This button is not valid."
NOT_YOURS = "Only the person who sent this photo can rate my answer."
NOT_KEPT = "Sorry, I couldn't keep feedback for this photo."
NOT_SAVED = "Sorry, I couldn't save your answer just now. Please tap again later."

Action = Literal["right", "wrong", "page", "label", "none", "back"]


@dataclass(eq=False)
class Answer:
    """One answered photo, shared by every button of its keyboard (mutable: see the module docstring).

    Attributes:
        sender_id: who sent the photo (the only one who may rate the answer).
        chat_id: where.
        file_id: the photo's Telegram file id (what a teacher's feedback downloads).
        guess: the model's best label, None when the answer said the photo looks like none of them.
        answer_id: the review store's id, set once recorded (None before, or if recording failed).
        recorded: set when recording finished (or failed).
        taught: a teacher's feedback: (sha256, label) of the image it added, to undo on a change of mind.
    """

    sender_id: int
    chat_id: int
    file_id: str
    guess: str | None
    answer_id: int | None = None
    recorded: asyncio.Event = field(default_factory=asyncio.Event)
    taught: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class FeedbackButton:
    """The data of one feedback button: its answer, what it does and its argument (a page, a label)."""

    answer: Answer
    action: Action
    value: str | int | None = None


def feedback_keyboard(answer: Answer) -> InlineKeyboardMarkup:
    """The "Right" / "Wrong" keyboard of an answer."""
    return InlineKeyboardMarkup(
        [[
            InlineKeyboardButton("👍 Right", callback_data=FeedbackButton(answer, "right")),
            InlineKeyboardButton("👎 Wrong", callback_data=FeedbackButton(answer, "wrong")),
        ]]
    )


def label_pages(labels: list[str], per_page: int) -> int:
    """How many pages ``labels`` take at ``per_page`` a page (at least 1)."""
    return max(1, math.ceil(len(labels) / per_page))


def labels_keyboard(answer: Answer, labels: list[str], page: int, per_page: int) -> InlineKeyboardMarkup:
    """Page ``page`` (0-based, clamped) of the labels, two a row, with "◀" / "▶", "None of these", "Back"."""
    pages = label_pages(labels, per_page)
    page = min(max(page, 0), pages - 1)
    shown = labels[page * per_page : (page + 1) * per_page]
    rows = [
        [InlineKeyboardButton(name, callback_data=FeedbackButton(answer, "label", name)) for name in shown[i : i + 2]]
        for i in range(0, len(shown), 2)
    ]
    nav = []
    if page > 0:
        nav.append(InlineKeyboardButton("◀ Previous", callback_data=FeedbackButton(answer, "page", page - 1)))
    if page < pages - 1:
        nav.append(InlineKeyboardButton(f"More ({page + 2}/{pages}) ▶", callback_data=FeedbackButton(answer, "page", page + 1)))
    if nav:
        rows.append(nav)
    rows.append([
        InlineKeyboardButton("None of these", callback_data=FeedbackButton(answer, "none")),
        InlineKeyboardButton("Back", callback_data=FeedbackButton(answer, "back")),
    ])
    return InlineKeyboardMarkup(rows)


def thanks_text(verdict: str, label: str | None, *, taught: str | None = None) -> str:
    """The line added to a rated answer (``taught``: what a teacher's feedback did to the training photos)."""
    if verdict == "right" and label is None:
        text = "Thanks! You said it is none of my labels, as I thought."
    elif verdict == "right":
        text = "Thanks! You said my answer is right."
    elif verdict == "none":
        text = "Thanks! You said it is none of my labels."
    else:
        text = f"Thanks! You said it is {label}."
    if taught:
        text += " " + taught
    else:
        text += " Tap again to change your answer."
    return text


def _unique_id(message: Message, file_id: str) -> str:
    """The ``file_unique_id`` of the photo size / document of ``message`` whose id is ``file_id``."""
    for size in message.photo or ():
        if size.file_id == file_id:
            return size.file_unique_id
    if message.document is not None and message.document.file_id == file_id:
        return message.document.file_unique_id
    return file_id


def _wants_feedback(data: BotData, user_id: int | None) -> bool:
    return user_id is not None and data.config.review.feedback and getattr(data, "review", None) is not None


async def send_answer(
    context: Context, message: Message, text: str, predictions: Any, ref: ImageRef, user_id: int | None
) -> Message:
    """Reply to a classified photo with ``text`` and the feedback keyboard, then record the answer.

    Args:
        context: the handler's context.
        message: the photo's message.
        text: the reply (``bot.classifying.reply_text``).
        predictions: the classifier's ``Predictions`` (``[(label, probability), ...]``, ``.unknown``).
        ref: the photo's image (its file id is kept, not the photo).
        user_id: the sender (None: no keyboard).

    Returns:
        The reply sent. Store failures are logged and cost only the keyboard.

    Raises:
        telegram.error.TelegramError: the reply could not be sent.
    """
    data = context.bot_data
    if not _wants_feedback(data, user_id):
        return await reply(message, text)
    assert user_id is not None
    # an "unknown" answer guessed no label: "right" agrees that it is none of them
    guess = predictions[0][0] if predictions and not getattr(predictions, "unknown", None) else None
    answer = Answer(user_id, message.chat_id, ref.file_id, guess)
    sent = await reply(message, text, reply_markup=feedback_keyboard(answer))
    try:
        answer.answer_id = await asyncio.to_thread(
            data.review.record_answer,
            chat_id=message.chat_id,
            chat_type=message.chat.type,
            reply_message_id=sent.message_id,
            sender_id=user_id,
            file_id=ref.file_id,
            file_unique_id=_unique_id(message, ref.file_id),
            predictions=[(str(label), float(p)) for label, p in predictions],
            unknown=getattr(predictions, "unknown", None),
            model_version=data.classifier.version,
            auto_queue=data.config.review.auto_queue,
        )
    except Exception as exc:  # noqa: BLE001 - any store failure costs the keyboard, never the reply
        log.error("could not record the answer to a photo in chat %s: %s", message.chat_id, exc, exc_info=exc)
        await _keyboard_off(sent)
    else:
        withdrawn = data.withdrawn_at.get(user_id)
        if withdrawn is not None and message.date.timestamp() <= withdrawn:
            # the user sent /withdraw after this photo, while it was being answered: keep nothing
            try:
                await asyncio.to_thread(data.review.withdraw, user_id)
            finally:
                answer.answer_id = None
            log.info("user %s withdrew while a photo was being answered: its answer deleted too", user_id)
            await _keyboard_off(sent)
    finally:
        answer.recorded.set()
    return sent


async def _keyboard_off(sent: Message) -> None:
    try:
        await sent.edit_reply_markup(None)
    except TelegramError as exc:
        log.info("could not take the feedback keyboard off: %s", exc)


async def add_by_file_id(
    context: Context, file_id: str, label: str, *, added_by: int, chat_id: int, suggested_by: int | None
) -> Any:
    """Download a photo by its file id and store it under ``label`` exactly like ``/add``.

    Same size limit, download, decode pool and ``ImageStore.add`` (validation, dedupe, atomic
    write) as :func:`bot.teaching.add_images`.

    Returns:
        The store's ``AddResult`` (``.label`` as stored, ``.created`` False if it was already there).

    Raises:
        LabelgramError: too large, unreadable, bad label, already under another label, store full.
        telegram.error.TelegramError: Telegram could not hand the file out (e.g. it is gone).
    """
    data = context.bot_data
    raw = await download_image(context.bot, ImageRef(file_id, None, "photo"), limit=data.config.classify.max_file_bytes)
    return await data.in_decode_pool(
        data.workspace.store.add, raw, label, added_by=added_by, chat_id=chat_id, suggested_by=suggested_by
    )


def _base_text(message: object) -> str:
    """The answer's text without the thanks line of an earlier verdict."""
    text = (message.text if isinstance(message, Message) else None) or ""
    return text.split(THANKS_SEPARATOR, 1)[0]


async def _answer_query(query: CallbackQuery, text: str | None = None, *, alert: bool = False) -> None:
    try:
        await query.answer(text[:200] if text else None, show_alert=alert)
    except TelegramError as exc:
        log.info("could not answer a button press: %s", exc)


async def _answered_meanwhile(query: CallbackQuery, edit: Awaitable[Any], text: str | None) -> None:
    """Run ``edit`` (a change of the pressed message) and answer the press with ``text`` once it is
    done, or after :data:`ANSWER_WITHIN_SECONDS` if it still waits for the chat's turn (a busy group
    paced by :mod:`bot.ratelimit` waits minutes): the tap never spins until Telegram drops it."""
    task = asyncio.ensure_future(edit)
    try:
        await asyncio.wait_for(asyncio.shield(task), ANSWER_WITHIN_SECONDS)
    except TimeoutError:
        await _answer_query(query, text)
        await task
        return
    await _answer_query(query, text)


def _forget_keyboard(context: Context, query: CallbackQuery) -> None:
    """Drop the pressed keyboard from PTB's cache (it has just been replaced), after
    :data:`REPLACED_GRACE_SECONDS`: the second tap of a double tap, or a tap made before the
    client showed the new keyboard, still works instead of being told the button expired."""

    def drop() -> None:
        with contextlib.suppress(KeyError):
            context.drop_callback_data(query)

    asyncio.get_running_loop().call_later(REPLACED_GRACE_SECONDS, drop)


async def _set_markup(context: Context, query: CallbackQuery, markup: InlineKeyboardMarkup | None) -> bool:
    try:
        await query.edit_message_reply_markup(markup)
    except BadRequest as exc:
        if "not modified" not in exc.message:
            log.info("could not change a feedback keyboard: %s", exc.message)
            return False
    except TelegramError as exc:
        log.info("could not change a feedback keyboard: %s", exc)
        return False
    _forget_keyboard(context, query)
    return True


async def stored_label(data: BotData, label: str) -> str | None:
    """The stored label that ``label`` names (any letter case), or None: renamed or deleted since
    its button was shown (adding to it would create it again, with this one photo)."""
    key = label_key(label)
    infos = await asyncio.to_thread(data.workspace.store.labels)
    return next((i.name for i in infos if label_key(i.name) == key), None)


def no_longer_text(label: str) -> str:
    """What a button naming a label that is gone says."""
    return f"“{label}” is no longer one of my labels (renamed or deleted meanwhile)."


async def _labels(data: BotData, answer: Answer) -> list[str]:
    """The labels to offer for "wrong": every stored label but the model's guess."""
    infos = await asyncio.to_thread(data.workspace.store.labels)
    guess = label_key(answer.guess) if answer.guess else None
    return [i.name for i in infos if label_key(i.name) != guess]


async def on_feedback_button(update: Update, context: Context) -> None:
    """A press on a feedback button (see the module docstring)."""
    query = update.callback_query
    if query is None:
        return
    if not isinstance(query.data, FeedbackButton):  # a press without data: PTB's type pattern lets it through
        log.info("ignored a button press without data from user %s", query.from_user.id)
        await _answer_query(query, NOT_VALID, alert=True)
        return
    button: FeedbackButton = query.data
    answer = button.answer
    user_id = query.from_user.id
    data = context.bot_data
    if user_id != answer.sender_id:
        log.info("refused feedback from user %s on another user's photo", user_id)
        await _answer_query(query, NOT_YOURS, alert=True)
        return
    if query.message is None or query.message.chat.id != answer.chat_id:
        await _answer_query(query, NOT_VALID, alert=True)
        return
    if not answer.recorded.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answer.recorded.wait(), RECORD_WAIT_SECONDS)
        if not answer.recorded.is_set():  # the store is slow (busy disk, locked catalog): not lost yet
            await _answer_query(query, "I'm still saving my answer; please tap again in a moment.", alert=True)
            return
    if answer.answer_id is None:
        await _answer_query(query, NOT_KEPT, alert=True)
        await _set_markup(context, query, None)
        return
    per_page = data.config.review.labels_per_page
    if button.action in ("wrong", "page"):
        labels = await _labels(data, answer)
        page = button.value if isinstance(button.value, int) else 0
        await _answered_meanwhile(
            query,
            _set_markup(context, query, labels_keyboard(answer, labels, page, per_page)),
            "Which label is it?" if button.action == "wrong" else None,
        )
        return
    if button.action == "back":
        await _answered_meanwhile(query, _set_markup(context, query, feedback_keyboard(answer)), None)
        return
    verdict: Literal["right", "wrong", "none"]
    label: str | None
    if button.action == "right":
        verdict, label = "right", answer.guess
    elif button.action == "none":
        verdict, label = "none", None
    else:
        label = str(button.value)
        same = answer.guess is not None and label_key(label) == label_key(answer.guess)
        verdict = "right" if same else "wrong"
    await _record_verdict(context, query, answer, verdict, label)


async def _record_verdict(
    context: Context, query: CallbackQuery, answer: Answer, verdict: Literal["right", "wrong", "none"], label: str | None
) -> None:
    data = context.bot_data
    user_id = query.from_user.id
    assert answer.answer_id is not None
    try:
        result = await asyncio.to_thread(
            data.review.set_feedback,
            answer_id=answer.answer_id,
            user_id=user_id,
            verdict=verdict,
            label=label if verdict == "wrong" else None,
        )
    except NotYourPhotoError:
        await _answer_query(query, NOT_YOURS, alert=True)
        return
    except UnknownAnswerError:
        await _answer_query(query, "This answer is no longer kept (it expired or was withdrawn).", alert=True)
        await _set_markup(context, query, None)
        return
    except sqlite3.Error as exc:  # a read-only, full or locked catalog: nothing recorded, say so
        log.error("could not record feedback in the review store: %s", exc)
        await _answer_query(query, NOT_SAVED, alert=True)
        return
    taught = None
    if user_id in data.config.teachers:
        taught = await _teach(context, answer, verdict, label, result)
    text = _base_text(query.message) + THANKS_SEPARATOR + thanks_text(verdict, label, taught=taught)

    async def thank() -> None:
        try:
            await query.edit_message_text(text, reply_markup=feedback_keyboard(answer))
            _forget_keyboard(context, query)
        except BadRequest as exc:
            if "not modified" not in exc.message:
                log.info("could not thank for feedback: %s", exc.message)
        except TelegramError as exc:
            log.info("could not thank for feedback: %s", exc)

    await _answered_meanwhile(query, thank(), "Thanks!")


async def _teach(
    context: Context, answer: Answer, verdict: str, label: str | None, result: FeedbackResult
) -> str | None:
    """A teacher's verdict: store the photo under its label at once (undoing their earlier one).

    Returns the sentence saying what happened to the training photos (None: nothing to say).
    """
    data = context.bot_data
    store = data.workspace.store
    teacher = answer.sender_id
    if answer.taught is not None and (verdict == "none" or label is None or label_key(answer.taught[1]) != label_key(label)):
        sha, old_label = answer.taught
        await asyncio.to_thread(store.remove, sha)
        answer.taught = None
        log.info("teacher %s changed their mind: removed %s from %r", teacher, sha[:12], old_label)
        if verdict == "none" or label is None:
            return f"Taken out of {old_label} again."
    if verdict == "none" or label is None:
        return None
    if await stored_label(data, label) is None:
        return f"I didn't add it to my training photos: {no_longer_text(label)}"
    try:
        added = await add_by_file_id(context, answer.file_id, label, added_by=teacher, chat_id=answer.chat_id, suggested_by=teacher)
    except DuplicateImageError as exc:
        return f"It is already in my training photos as {exc.existing_label}."
    except LabelgramError as exc:
        return f"I couldn't add it to my training photos: {error_text(exc)}"
    except TelegramError as exc:
        log.warning("teacher %s: could not download the photo: %s", teacher, exc)
        return "I couldn't download the photo again to add it; please /add it."
    if added.created:
        answer.taught = (added.sha256, added.label)
    if result.item_id is not None:  # queued by the store: a teacher's word needs no admin
        with contextlib.suppress(ReviewItemGoneError):
            await asyncio.to_thread(data.review.resolve, result.item_id, action="accepted", by=teacher, label=added.label)
    count = await asyncio.to_thread(data.label_count, added.label)
    verb = "Added to" if added.created else "Already in"
    return f"{verb} my training photos of {added.label} ({images_text(count)})."


async def on_stale_button(update: Update, context: Context) -> None:
    """A non-admin pressed a button the bot does not know: forgotten (expired) or never issued."""
    query = update.callback_query
    if query is None:
        return
    raw = query.data.callback_data if isinstance(query.data, InvalidCallbackData) else None
    if isinstance(raw, str) and issued_by_ptb(raw):
        await _answer_query(query, EXPIRED, alert=True)
        try:
            await query.edit_message_reply_markup(None)
        except TelegramError as exc:
            log.debug("could not remove the keyboard: %s", exc)
        return
    log.info("ignored unknown button data from user %s", query.from_user.id)
    await _answer_query(query, NOT_VALID, alert=True)


async def on_withdraw(update: Update, context: Context) -> None:
    """``/withdraw``: delete everything kept about the user's photos and feedback."""
    message = update.effective_message
    user_id = user_id_of(update)
    if message is None or user_id is None:
        return
    data = context.bot_data
    if getattr(data, "review", None) is None:
        await reply(message, "I keep nothing about your photos.")
        return
    # photos sent before this (Telegram's clock) and still being answered are withdrawn by send_answer
    now = message.date.timestamp()
    data.withdrawn_at = {u: t for u, t in data.withdrawn_at.items() if t > now - WITHDRAW_MEMORY_SECONDS}
    data.withdrawn_at[user_id] = now
    try:
        count = await asyncio.to_thread(data.review.withdraw, user_id)
    except sqlite3.Error as exc:
        log.error("could not withdraw user %s's answers: %s", user_id, exc)
        await reply(message, "Sorry, I couldn't delete anything just now (my storage is not writable). Please send /withdraw again later.")
        return
    log.info("user %s withdrew %d kept answers", user_id, count)
    if not count:
        await reply(message, "I keep nothing about your photos or feedback: there was nothing to delete.")
        return
    what = "answer" if count == 1 else "answers"
    await reply(
        message,
        f"Done: I deleted what I kept about {count} {what} to your photos (the photos' file ids, my answers, "
        "your feedback, and anything of yours waiting for an admin's review). Photos an admin already added "
        "to my training photos stay there; ask an admin to remove them.",
    )


def handlers(admins: filters.User) -> list[BaseHandler[Any, Any, Any]]:
    """``/withdraw`` (everyone), feedback buttons (everyone), and non-admins' unknown buttons."""
    return [
        CommandHandler("withdraw", on_withdraw, filters=NEW),
        CallbackQueryHandler(on_feedback_button, pattern=FeedbackButton),
        ButtonsFrom(on_stale_button, admins, admins=False, pattern=InvalidCallbackData),
    ]
