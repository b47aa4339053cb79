"""Rate limits: Telegram's flood control per chat (outgoing), and a per-user limit on what comes in.

Outgoing: :class:`ChatRetryRateLimiter`, Telegram flood control that pauses only the chat it concerns.

python-telegram-bot's ``AIORateLimiter`` answers a ``RetryAfter`` (HTTP 429) by clearing one
``asyncio.Event`` that *every* request of the bot waits on, so a flood-control pause in one chat
stops the whole bot, long polling included, for ``retry_after + 0.1`` seconds. Its docstring says
so ("A RetryAfter exception will halt *all* requests for retry_after + 0.1 seconds. This may be
stricter than necessary"), see ``AIORateLimiter.process_request`` in
https://github.com/python-telegram-bot/python-telegram-bot/blob/v22.0/telegram/ext/_aioratelimiter.py
Telegram's limits are mostly per chat (about one message a second in a chat, 20 a minute in a
group), and a busy group would otherwise stall every private chat.

:class:`ChatRetryRateLimiter` keeps the parent's throttling (overall rate, per-group rate, paid
broadcasts) and replaces only the ``RetryAfter`` handling: a 429 on a request that names a chat
delays later requests *to that chat* until the pause is over, then retries; a 429 on a request
without a chat (``getUpdates``, ``getFile``, ...) pauses everything, as before.

Incoming: :func:`limit_messages` runs before every other handler and drops the updates of a
non-admin who sends more than ``limits.messages_per_minute`` updates of any kind (commands, files,
photos, ``/add`` captions, button presses), after one polite sentence a minute. Without it a
stranger repeating ``/help`` or refused commands would get an answer to each, spending the bot's
overall sending rate (and, under Telegram's per-chat limits, its concurrent-update slots) that
every other chat shares. Photos are also limited on their own (``limits.photos_per_minute``,
:func:`bot.handlers.classify_message`), since classifying them costs far more.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from telegram import Update
from telegram.error import RetryAfter, TelegramError
from telegram.ext import AIORateLimiter, ApplicationHandlerStop, ContextTypes

from bot.handlers import reply
from bot.services import services

__all__ = ["ChatRetryRateLimiter", "limit_messages", "retry_after_seconds"]

log = logging.getLogger(__name__)

_MAX_PAUSED_CHATS = 1024
_ALL = object()  # the key of a pause that applies to every request


def retry_after_seconds(exc: RetryAfter) -> float:
    """Seconds Telegram asked to wait (``RetryAfter.retry_after``: an int, or a timedelta since PTB 22.2)."""
    value = getattr(exc, "_retry_after", None)  # a timedelta since PTB 22.2; avoids the int deprecation warning
    if value is None:
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


class ChatRetryRateLimiter(AIORateLimiter):
    """``AIORateLimiter`` whose ``RetryAfter`` pause applies to the affected chat only.

    Takes the same arguments as :class:`telegram.ext.AIORateLimiter`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._paused_until: dict[Any, float] = {}  # chat id (or _ALL) -> event-loop time

    async def _wait_if_paused(self, key: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            until = max(self._paused_until.get(_ALL, 0.0), self._paused_until.get(key, 0.0) if key is not None else 0.0)
            remaining = until - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(remaining)

    def _pause(self, key: Any, seconds: float) -> None:
        now = asyncio.get_running_loop().time()
        if len(self._paused_until) > _MAX_PAUSED_CHATS:
            self._paused_until = {k: t for k, t in self._paused_until.items() if t > now}
        target = _ALL if key is None else key
        self._paused_until[target] = max(self._paused_until.get(target, 0.0), now + seconds)

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        """Throttle like ``AIORateLimiter``; on ``RetryAfter`` pause only the chat concerned, then retry."""
        max_retries = rate_limit_args or self._max_retries
        chat_id = data.get("chat_id")
        chat = chat_id is not None
        with contextlib.suppress(ValueError, TypeError):
            chat_id = int(chat_id)  # type: ignore[arg-type]
        # the same grouping as the parent: negative ids and @usernames are groups and channels
        group: int | str | bool = chat_id if (isinstance(chat_id, int) and chat_id < 0) or isinstance(chat_id, str) else False
        key = chat_id if chat else None
        for attempt in range(max_retries + 1):
            await self._wait_if_paused(key)
            try:
                return await self._run_request(
                    chat=chat,
                    group=group,
                    allow_paid_broadcast=data.get("allow_paid_broadcast", False),
                    callback=callback,
                    args=args,
                    kwargs=kwargs,
                )
            except RetryAfter as exc:
                seconds = retry_after_seconds(exc) + 0.1
                self._pause(key, seconds)
                where = f"chat {key}" if key is not None else "all requests"
                if attempt == max_retries:
                    log.warning("Telegram flood control (%s): %s failed after %d retries", where, endpoint, max_retries)
                    raise
                log.info("Telegram flood control (%s): retrying %s in %.1f s", where, endpoint, seconds)
        raise AssertionError("unreachable")  # pragma: no cover


SLOW_DOWN = "You're sending messages faster than I can answer them. Please wait a minute and try again."


async def limit_messages(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Stop a non-admin's update when it is over ``limits.messages_per_minute`` (group -1 handler).

    The first update over the limit in a minute gets :data:`SLOW_DOWN` (a reply, or the answer of a
    button press); the others are dropped without a word. Admins are never limited.

    Raises:
        ApplicationHandlerStop: the update is over the limit; no other handler sees it.
    """
    if not isinstance(update, Update) or update.effective_user is None:
        return
    svc = services(context)
    user_id = update.effective_user.id
    if svc.is_admin(user_id) or svc.message_rate.allow(user_id):
        return
    log.info("rate limit: update from user %s dropped", user_id)
    if svc.message_rate.should_warn(user_id):
        try:
            if update.callback_query is not None:
                await update.callback_query.answer(SLOW_DOWN, show_alert=True)
            elif update.message is not None:
                await reply(update.message, SLOW_DOWN)
        except TelegramError as exc:
            log.info("could not send the slow-down notice: %s", exc)
    raise ApplicationHandlerStop
