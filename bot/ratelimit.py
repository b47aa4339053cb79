"""Outgoing requests: Telegram's flood limits, with a 429 pausing only the chat it concerns.

python-telegram-bot's ``AIORateLimiter`` answers a ``RetryAfter`` (HTTP 429) by clearing one
``asyncio.Event`` that *every* request of the bot waits on, so a flood-control pause in one chat
stops the whole bot, long polling included, for ``retry_after + 0.1`` seconds. Its docstring says
so ("A RetryAfter exception will halt *all* requests for retry_after + 0.1 seconds. This may be
stricter than necessary"), see ``AIORateLimiter`` in
https://github.com/python-telegram-bot/python-telegram-bot/blob/v22.0/telegram/ext/_aioratelimiter.py
Telegram's limits are mostly per chat (about one message a second in a chat, 20 a minute in a
group), and a busy group would otherwise stall every private chat.

:class:`ChatRetryRateLimiter` implements PTB's public :class:`telegram.ext.BaseRateLimiter` with
the same throttling as ``AIORateLimiter`` (``aiolimiter.AsyncLimiter``: an overall rate for
requests to a chat, a per-group rate for groups and channels, Telegram's paid-broadcast rate) and
its own ``RetryAfter`` handling: a 429 on a request that names a chat delays later requests *to
that chat* until the pause is over, then retries; a 429 on a request without a chat
(``getUpdates``, ``getFile``, ...) pauses everything.

The limit on *incoming* updates per user is :func:`bot.access.limit_messages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiolimiter import AsyncLimiter
from telegram import constants
from telegram.error import RetryAfter
from telegram.ext import BaseRateLimiter

from bot.telegram_io import retry_after_seconds

__all__ = ["ChatRetryRateLimiter"]

log = logging.getLogger(__name__)

_MAX_PAUSED_CHATS = 1024
_MAX_GROUP_LIMITERS = 512
_ALL = object()  # the key of a pause that applies to every request
_Result = bool | dict[str, Any] | list[dict[str, Any]]


class ChatRetryRateLimiter(BaseRateLimiter[int]):
    """Throttling as ``AIORateLimiter``'s; a ``RetryAfter`` pauses the affected chat only.

    Args:
        overall_max_rate: requests to chats per ``overall_time_period`` (0: no limit).
        overall_time_period: seconds (0: no limit).
        group_max_rate: requests to one group or channel per ``group_time_period`` (0: no limit).
        group_time_period: seconds (0: no limit).
        max_retries: retries after a ``RetryAfter`` (a request's ``rate_limit_args`` overrides it).
    """

    def __init__(
        self,
        overall_max_rate: float = constants.FloodLimit.MESSAGES_PER_SECOND,
        overall_time_period: float = 1,
        group_max_rate: float = constants.FloodLimit.MESSAGES_PER_MINUTE_PER_GROUP,
        group_time_period: float = 60,
        max_retries: int = 0,
    ) -> None:
        self.max_retries = max_retries
        self._overall = (
            AsyncLimiter(overall_max_rate, overall_time_period) if overall_max_rate and overall_time_period else None
        )
        self._group_rate = (group_max_rate, group_time_period) if group_max_rate and group_time_period else None
        self._groups: dict[int | str, AsyncLimiter] = {}
        self._paid = AsyncLimiter(constants.FloodLimit.PAID_MESSAGES_PER_SECOND, 1)
        self._paused_until: dict[Any, float] = {}  # chat id (or _ALL) -> event-loop time

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    def _group_limiter(self, group: int | str) -> AsyncLimiter:
        assert self._group_rate is not None
        if len(self._groups) > _MAX_GROUP_LIMITERS:  # forget idle groups (full capacity again)
            self._groups = {k: v for k, v in self._groups.items() if k == group or not v.has_capacity(v.max_rate)}
        if group not in self._groups:
            self._groups[group] = AsyncLimiter(*self._group_rate)
        return self._groups[group]

    async def _throttled(
        self, chat: bool, group: int | str | None, paid: bool, callback: Callable[..., Coroutine[Any, Any, _Result]],
        args: Any, kwargs: dict[str, Any],
    ) -> _Result:
        if paid:
            async with self._paid:
                return await callback(*args, **kwargs)
        async with contextlib.AsyncExitStack() as stack:
            if group is not None and self._group_rate is not None:
                await stack.enter_async_context(self._group_limiter(group))
            if chat and self._overall is not None:
                await stack.enter_async_context(self._overall)
            return await callback(*args, **kwargs)

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
        callback: Callable[..., Coroutine[Any, Any, _Result]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> _Result:
        """Throttle like ``AIORateLimiter``; on ``RetryAfter`` pause only the chat concerned, then retry.

        Raises:
            telegram.error.RetryAfter: still refused after ``max_retries`` retries.
        """
        max_retries = rate_limit_args or self.max_retries
        chat_id = data.get("chat_id")
        chat = chat_id is not None
        with contextlib.suppress(ValueError, TypeError):
            chat_id = int(chat_id)  # type: ignore[arg-type]
        # the same grouping as AIORateLimiter's: negative ids and @usernames are groups and channels
        group: int | str | None = chat_id if (isinstance(chat_id, int) and chat_id < 0) or isinstance(chat_id, str) else None
        key = chat_id if chat else None
        for attempt in range(max_retries + 1):
            await self._wait_if_paused(key)
            try:
                return await self._throttled(
                    chat, group, bool(data.get("allow_paid_broadcast", False)), callback, args, kwargs
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
