"""Who may do what: refusals for non-admins, and the per-user limit on incoming updates.

An admin is a numeric Telegram user id listed in ``config.admins`` (never a username: those can
change hands). The one admin check is ``BotData.admins``, a ``filters.User``: :mod:`bot.app`
routes admins' commands, ``/add`` captions and albums with it, and everyone else's to the
refusals here; button presses (which PTB filters do not see) are split the same way by
:class:`ButtonsFrom`. Refused users get a polite sentence, nothing is stored or changed, and one
log line records the refusal with the user id only.

:func:`limit_messages` runs before every other handler and drops the updates of a non-admin who
sends more than ``limits.messages_per_minute`` updates of any kind (commands, files, photos,
``/add`` captions, button presses), after one polite sentence a minute. Without it a stranger
repeating ``/help`` or refused commands would get an answer to each, spending the bot's overall
sending rate that every other chat shares. Photos are also limited on their own
(``limits.photos_per_minute``, :mod:`bot.classifying`), since classifying them costs far more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import (
    ApplicationHandlerStop,
    BaseHandler,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    filters,
)

from bot.context import Context
from bot.telegram_io import ADD_CAPTION, IMAGES, NEW, reply, user_id_of

__all__ = ["SLOW_DOWN", "ButtonsFrom", "handlers", "limit_messages", "refuse"]

log = logging.getLogger(__name__)

SLOW_DOWN = "You're sending messages faster than I can answer them. Please wait a minute and try again."

async def refuse(update: Update, what: str) -> None:
    """Politely refuse a non-admin (``what`` is e.g. "/add") and log it with the user id only."""
    log.info("refused %s from non-admin user %s", what, user_id_of(update))
    message = update.effective_message
    if message is not None:
        await reply(
            message,
            f"Sorry, only the bot's admins can use {what}. Send me a photo and I'll tell you what I see.",
        )


def _command_of(update: Update) -> str:
    """"/retrain" for "/RETRAIN@ThisBot now" (the command word, lower case, without the bot name)."""
    message = update.effective_message
    text = (message.text or "") if message is not None else ""
    word = text.split(None, 1)[0] if text.strip() else "/"
    return word.split("@", 1)[0].lower()


async def on_admin_command(update: Update, context: Context) -> None:
    """An admin command sent by a non-admin: refuse it."""
    await refuse(update, _command_of(update))


async def on_add_caption(update: Update, context: Context) -> None:
    """A photo captioned ``/add`` by a non-admin: refuse it (the photo is not stored)."""
    await refuse(update, "/add")


async def on_button(update: Update, context: Context) -> None:
    """A non-admin pressed an inline button: refuse it (the pending request stays as it was)."""
    query = update.callback_query
    if query is None:
        return
    log.info("refused a button press from non-admin user %s", query.from_user.id)
    await query.answer("Sorry, only the bot's admins can use these buttons.", show_alert=True)


class ButtonsFrom(CallbackQueryHandler[Any, Any]):
    """A ``CallbackQueryHandler`` for presses by admins only (``admins=True``) or non-admins only.

    ``CallbackQueryHandler`` takes no ``filters``; this applies the same ``filters.User`` to
    ``callback_query.from_user`` before the usual ``pattern`` check.

    Args:
        callback: the handler callback.
        users: the admins filter (``BotData.admins``).
        admins: True to handle the presses of ``users``, False those of everyone else.
        pattern: as ``CallbackQueryHandler``'s (a type, callable or regex on the callback data).
    """

    __slots__ = ("_admins", "_users")

    def __init__(
        self,
        callback: Callable[[Update, Context], Coroutine[Any, Any, None]],
        users: filters.User,
        *,
        admins: bool,
        pattern: Any = None,
    ) -> None:
        super().__init__(callback, pattern=pattern)
        self._users = users
        self._admins = admins

    def check_update(self, update: object) -> bool | object | None:
        """Whether this handler takes ``update`` (a press by the right kind of user that matches ``pattern``)."""
        if not isinstance(update, Update) or update.callback_query is None:
            return None
        if (update.callback_query.from_user.id in self._users.user_ids) != self._admins:
            return None
        return super().check_update(update)


def handlers(admins: filters.User, admin_commands: Sequence[str]) -> list[BaseHandler[Any, Any, Any]]:
    """The refusals: admin commands, ``/add`` captions and button presses by non-admins."""
    others = ~admins
    return [
        CommandHandler(list(admin_commands), on_admin_command, filters=NEW & others),
        MessageHandler(NEW & IMAGES & ADD_CAPTION & others, on_add_caption),
        ButtonsFrom(on_button, admins, admins=False),
    ]


async def limit_messages(update: object, context: Context) -> None:
    """Stop a non-admin's update when it is over ``limits.messages_per_minute`` (group -1 handler).

    The first update over the limit in a minute gets :data:`SLOW_DOWN` (a reply, or the answer of a
    button press); the others are dropped without a word. Admins are never limited.

    Raises:
        ApplicationHandlerStop: the update is over the limit; no other handler sees it.
    """
    if not isinstance(update, Update) or update.effective_user is None:
        return
    data = context.bot_data
    user_id = update.effective_user.id
    if data.is_admin(user_id) or data.message_rate.allow(user_id):
        return
    log.info("rate limit: update from user %s dropped", user_id)
    if data.message_rate.should_warn(user_id):
        try:
            if update.callback_query is not None:
                await update.callback_query.answer(SLOW_DOWN, show_alert=True)
            elif update.message is not None:
                await reply(update.message, SLOW_DOWN)
        except TelegramError as exc:
            log.info("could not send the slow-down notice: %s", exc)
    raise ApplicationHandlerStop
