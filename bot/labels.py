"""Labels (admins only): ``/labels``, ``/rename``, ``/delete`` with its confirmation buttons.

The two buttons of ``/delete`` carry a :class:`DeleteChoice` object through PTB's arbitrary
callback data (``ApplicationBuilder.arbitrary_callback_data``, PTB's
``examples/arbitrarycallbackdatabot.py``): Telegram only sees a random id, PTB keeps the object in
its in-memory cache. A press whose id PTB does not know (after a restart, or dropped from the
cache) arrives as ``InvalidCallbackData``; a choice is honoured once, for the admin who asked, in
the chat where they asked, within :data:`DELETE_CONFIRM_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from telegram import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import TelegramError
from telegram.ext import BaseHandler, CommandHandler, InvalidCallbackData, filters

from bot.access import ButtonsFrom
from bot.context import Context
from bot.telegram_io import ADD_USAGE, NEW, arg_text, cut_text, images_text, issued_by_ptb, reply, user_id_of
from bot.wording import error_text
from model_store.errors import LabelgramError
from model_store.labels import label_key, normalize_label

__all__ = ["DELETE_CONFIRM_SECONDS", "DeleteChoice", "handlers", "on_delete", "on_delete_button", "on_labels", "on_rename"]

log = logging.getLogger(__name__)

#: how long the buttons of one /delete request can be pressed
DELETE_CONFIRM_SECONDS = 600.0

#: the answer to an admin's press on a button the bot no longer remembers (any kind of button)
EXPIRED_BUTTON = (
    "This button has expired: I only remember recent buttons, and none from before a restart. "
    "Send the command (/delete <label>, /review) or the photo again."
)

RENAME_USAGE = 'Use /rename <old> <new>. Put names with spaces in quotes: /rename "t shirt" t-shirt'


async def on_labels(update: Update, context: Context) -> None:
    """``/labels``: every label with its image count."""
    message = update.effective_message
    if message is None:
        return
    infos = await asyncio.to_thread(context.bot_data.workspace.store.labels)
    if not infos:
        await reply(message, "No labels yet. " + ADD_USAGE)
        return
    total = sum(i.count for i in infos)
    lines = [f"{len(infos)} labels, {images_text(total)}:"] + [f"{i.name} — {i.count}" for i in infos]
    await reply(message, cut_text("\n".join(lines)))


def _two_names(text: str) -> tuple[str, str] | None:
    for arrow in ("->", "→"):
        if arrow in text:
            old, _, new = text.partition(arrow)
            return (old.strip(), new.strip()) if old.strip() and new.strip() else None
    parts = text.split()
    if len(parts) == 2:
        return parts[0], parts[1]
    try:
        parts = shlex.split(text)
    except ValueError:
        return None
    return (parts[0], parts[1]) if len(parts) == 2 else None


async def on_rename(update: Update, context: Context) -> None:
    """``/rename <old> <new>`` (quotes or ``->`` for names with spaces)."""
    message = update.effective_message
    if message is None:
        return
    names = _two_names(arg_text(message))
    if names is None:
        await reply(message, RENAME_USAGE)
        return
    data = context.bot_data
    store = data.workspace.store
    try:
        old = await asyncio.to_thread(store.resolve_label, names[0])
        if old is None:
            await reply(message, f"There is no label called “{normalize_label(names[0])}”. /labels lists them.")
            return
        new = await asyncio.to_thread(store.rename_label, old, names[1])
    except LabelgramError as exc:
        await reply(message, error_text(exc))
        return
    count = await asyncio.to_thread(data.label_count, new)
    await reply(
        message,
        f"Renamed {old} to {new} ({images_text(count)}). Answers use the new name after the next training (/retrain).",
    )


@dataclass(frozen=True)
class DeleteChoice:
    """The data of one ``/delete`` button: who asked, where, for which label, and yes or no."""

    admin_id: int
    chat_id: int
    label: str
    confirm: bool
    created: float = field(default_factory=time.monotonic)


async def on_delete(update: Update, context: Context) -> None:
    """``/delete <label>``: asks for confirmation with two buttons (see :func:`on_delete_button`)."""
    message = update.effective_message
    user_id = user_id_of(update)
    if message is None or user_id is None:
        return
    name = arg_text(message)
    if not name:
        await reply(message, "Use /delete <label>. /labels lists them.")
        return
    data = context.bot_data
    try:
        label = await asyncio.to_thread(data.workspace.store.resolve_label, name)
        if label is None:
            await reply(message, f"There is no label called “{normalize_label(name)}”. /labels lists them.")
            return
    except LabelgramError as exc:
        await reply(message, error_text(exc))
        return
    count = await asyncio.to_thread(data.label_count, label)
    now = time.monotonic()
    yes = DeleteChoice(user_id, message.chat_id, label, True, now)
    no = DeleteChoice(user_id, message.chat_id, label, False, now)
    keyboard = InlineKeyboardMarkup(
        [[
            InlineKeyboardButton(f"Delete {images_text(count)}", callback_data=yes),
            InlineKeyboardButton("Cancel", callback_data=no),
        ]]
    )
    await reply(message, f"Delete the label “{label}” and its {images_text(count)}? This cannot be undone.", reply_markup=keyboard)


async def on_delete_button(update: Update, context: Context) -> None:
    """An admin pressed a ``/delete`` button: honoured once, for the admin who asked, in time."""
    query = update.callback_query
    if query is None:
        return
    if not isinstance(query.data, DeleteChoice):  # a press without data: PTB's type pattern lets it through
        await on_unknown_button(update, context)
        return
    choice = query.data
    user_id = query.from_user.id
    if time.monotonic() - choice.created > DELETE_CONFIRM_SECONDS:
        context.drop_callback_data(query)
        await query.answer("This button has expired. Send /delete <label> again.", show_alert=True)
        await _drop_keyboard(query)
        return
    chat_id = query.message.chat.id if query.message is not None else None
    if choice.admin_id != user_id or choice.chat_id != chat_id:
        log.info("refused a delete confirmation from admin %s for another admin's request", user_id)
        await query.answer("Only the admin who asked for this can confirm it.", show_alert=True)
        return
    context.drop_callback_data(query)  # both buttons: a choice is made once
    if not choice.confirm:
        await query.answer("Cancelled.")
        await _edit(query, f"Kept the label “{choice.label}”.")
        return
    store = context.bot_data.workspace.store
    try:
        current = await asyncio.to_thread(store.resolve_label, choice.label)
        if current is None or label_key(current) != label_key(choice.label):
            await query.answer(f"The label “{choice.label}” no longer exists.", show_alert=True)
            await _edit(query, f"The label “{choice.label}” no longer exists; nothing was deleted.")
            return
        count = await asyncio.to_thread(store.delete_label, current)
    except LabelgramError as exc:
        await query.answer(error_text(exc)[:200], show_alert=True)
        return
    log.info("admin %s deleted label %r (%d images)", user_id, current, count)
    await query.answer("Deleted.")
    await _edit(query, f"Deleted the label “{current}” and its {images_text(count)}. The next training leaves it out.")


async def on_unknown_button(update: Update, context: Context) -> None:
    """An admin pressed a button the bot does not know: forgotten (expired) or never issued (not valid)."""
    query = update.callback_query
    if query is None:
        return
    raw = query.data.callback_data if isinstance(query.data, InvalidCallbackData) else None
    if isinstance(raw, str) and issued_by_ptb(raw):
        # any admin button: /delete's, /review's, or the feedback buttons under an answer
        await query.answer(EXPIRED_BUTTON, show_alert=True)
        await _drop_keyboard(query)
        return
    log.info("ignored unknown button data from admin %s", query.from_user.id)
    await query.answer("This button is not valid.", show_alert=True)


async def _edit(query: CallbackQuery, text: str) -> None:
    try:
        await query.edit_message_text(text)
    except TelegramError as exc:
        log.info("could not edit the confirmation message: %s", exc)


async def _drop_keyboard(query: CallbackQuery) -> None:
    try:
        await query.edit_message_reply_markup(None)
    except TelegramError as exc:
        log.debug("could not remove the keyboard: %s", exc)


def handlers(admins: filters.User) -> list[BaseHandler[Any, Any, Any]]:
    """``/labels``, ``/rename``, ``/delete`` and admins' presses of its buttons (any other press is not valid)."""
    mine = NEW & admins
    return [
        CommandHandler("labels", on_labels, filters=mine),
        CommandHandler("rename", on_rename, filters=mine),
        CommandHandler("delete", on_delete, filters=mine),
        ButtonsFrom(on_delete_button, admins, admins=True, pattern=DeleteChoice),
        ButtonsFrom(on_unknown_button, admins, admins=True),
    ]
