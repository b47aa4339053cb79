"""Outgoing requests paced to Telegram's flood limits, per chat; a 429 waited out, never a traceback.

Telegram limits a bot per chat, not only overall (Bot FAQ, "My bot is hitting limits, how do I
avoid this?"): about one message a second in a chat (short bursts tolerated), 20 messages a minute
in a group, about 30 messages a second in all. The exact thresholds are not published, and edits
count as well. python-telegram-bot's ``AIORateLimiter`` only has the overall and the group limit,
and its ``RetryAfter`` handling stops *every* request of the bot for ``retry_after`` seconds (its
docstring: "A RetryAfter exception will halt *all* requests for retry_after + 0.1 seconds").

:class:`ChatPacedRateLimiter` implements PTB's public :class:`telegram.ext.BaseRateLimiter`:

* **Pacing before Telegram refuses.** Every request that creates or edits a message in a chat
  (``send*`` except ``sendChatAction``, ``edit*``, ``copy*``, ``forward*``) first takes a token
  from that chat's bucket: an ``aiolimiter.AsyncLimiter`` (a leaky bucket) of ``chat_burst``
  messages refilled at ``chat_per_second`` in private chats, of ``group_burst`` refilled at
  ``group_per_minute`` in groups and channels (negative ids, ``@usernames``); then every request
  to a chat takes one from the overall bucket (``overall_per_second``). Waiting requests of one
  chat go in the order they came (aiolimiter's waiters are a FIFO heap); other chats do not wait.
* **A 429 is waited out.** ``RetryAfter`` pauses the chat it concerns (or everything, for a
  request without a chat: ``getUpdates``, ``getFile``) for ``retry_after`` seconds, after which
  that chat's bucket starts full but one token, so the requests queued behind it leave one by one
  at the chat's rate instead of together (PTB's limiter fired them all at once, each got a 429 again).
  The request is retried for as long as it is still worth sending: until ``deadline`` seconds
  after it was made (``limits.reply_deadline_seconds``; a request's ``rate_limit_args`` overrides
  it). Only then is it given up: logged once, one line, no traceback, and
  :class:`bot.telegram_io.ReplyDropped` is raised, which :func:`on_flood_error` (an error
  handler registered before the general one) stops without a traceback or an apology (an
  apology would be flood-limited as well).
* ``sendChatAction`` ("typing…") is best effort: not paced, never retried.

The limit on *incoming* updates per user is :func:`bot.access.limit_messages`; the tests'
Bot API stand-in enforces the same kind of limits (``tests/botapi_standin.py``, ``FloodLimits``).
Figures: docs/flood_control.md.
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
from telegram.ext import ApplicationHandlerStop, BaseRateLimiter

from bot.telegram_io import ReplyDropped, retry_after_seconds

__all__ = ["ChatPacedRateLimiter", "is_paced", "on_flood_error"]

log = logging.getLogger(__name__)

_MAX_PAUSED_CHATS = 1024
_MAX_CHAT_BUCKETS = 4096
_ALL = object()  # the key of a pause that applies to every request
_Result = bool | dict[str, Any] | list[dict[str, Any]]
_PACED_PREFIXES = ("send", "edit", "copy", "forward")
_BEST_EFFORT = frozenset({"sendchataction"})


def is_paced(endpoint: str) -> bool:
    """Whether a Bot API method creates or edits a message (and so counts against a chat's limit).

    ``sendMessage``, ``sendPhoto``, ``editMessageText``, ``copyMessage``, ``forwardMessage`` ...:
    True; ``sendChatAction``, ``getFile``, ``answerCallbackQuery``, ``deleteMessage``: False.
    """
    name = endpoint.lower()
    return name.startswith(_PACED_PREFIXES) and name not in _BEST_EFFORT


class ChatPacedRateLimiter(BaseRateLimiter[float]):
    """Per-chat token buckets, the overall limit on top, 429s waited out until a deadline.

    Args:
        overall_per_second: requests to chats per second, all chats together (0: no limit;
            Telegram's ~30, ``telegram.max_requests_per_second``).
        chat_burst: messages a private chat may get at once (``limits.chat_messages_burst``).
        chat_per_second: then this many per second (``limits.chat_messages_per_second``; 0: no
            per-chat limit).
        group_burst: messages a group or channel may get at once (``limits.group_messages_burst``).
        group_per_minute: then this many per minute (``limits.group_messages_per_minute``; 0: no
            group limit).
        deadline: seconds a request may wait (queued, paused, retried) before it is given up
            (``limits.reply_deadline_seconds``). ``rate_limit_args`` of a request overrides it.

    Attributes:
        refusals: 429 answers received (for the benchmark and the logs).
        dropped: requests given up after ``deadline``.
    """

    def __init__(
        self,
        *,
        overall_per_second: float = constants.FloodLimit.MESSAGES_PER_SECOND,
        chat_burst: int = 20,
        chat_per_second: float = 1.0,
        group_burst: int = 20,
        group_per_minute: float = constants.FloodLimit.MESSAGES_PER_MINUTE_PER_GROUP,
        deadline: float = 600.0,
    ) -> None:
        self.deadline = deadline
        self._overall = AsyncLimiter(overall_per_second, 1) if overall_per_second > 0 else None
        # AsyncLimiter(max_rate, time_period): a bucket of max_rate tokens, refilled at max_rate / time_period
        self._private = (chat_burst, chat_burst / chat_per_second) if chat_burst > 0 and chat_per_second > 0 else None
        self._group = (
            (group_burst, group_burst * 60.0 / group_per_minute) if group_burst > 0 and group_per_minute > 0 else None
        )
        self._buckets: dict[int | str, AsyncLimiter] = {}
        self._paused_until: dict[Any, float] = {}  # chat id (or _ALL) -> event-loop time
        self._refill_due: dict[int | str, bool] = {}  # chats whose bucket is full once their pause is over
        self.refusals = 0
        self.dropped = 0

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    # ------------------------------------------------------------------ buckets and pauses

    @staticmethod
    def _is_group(chat: int | str) -> bool:
        # the same grouping as AIORateLimiter's: negative ids and @usernames are groups and channels
        return isinstance(chat, str) or chat < 0

    def _shape(self, chat: int | str) -> tuple[float, float] | None:
        return self._group if self._is_group(chat) else self._private

    def _bucket(self, chat: int | str) -> AsyncLimiter | None:
        shape = self._shape(chat)
        if shape is None:
            return None
        bucket = self._buckets.get(chat)
        if bucket is None:
            if len(self._buckets) >= _MAX_CHAT_BUCKETS:  # forget idle chats (an empty bucket is a new one)
                self._buckets = {k: v for k, v in self._buckets.items() if not v.has_capacity(v.max_rate)}
            bucket = self._buckets[chat] = AsyncLimiter(*shape)
        return bucket

    async def _refill_if_due(self, chat: int | str) -> None:
        """After a 429's pause: the chat's bucket starts full but one token (Telegram said it was
        full), so the requests queued behind the 429 leave one by one at the chat's rate."""
        if self._refill_due.pop(chat, None) is None:
            return
        shape = self._shape(chat)
        if shape is None:
            return
        bucket = self._buckets[chat] = AsyncLimiter(*shape)  # the old bucket's waiters re-queue here
        if bucket.max_rate > 1:
            await bucket.acquire(bucket.max_rate - 1)  # an empty new bucket: returns at once

    def _remaining_pause(self, key: Any) -> float:
        now = asyncio.get_running_loop().time()
        until = self._paused_until.get(_ALL, 0.0)
        if key is not None:
            until = max(until, self._paused_until.get(key, 0.0))
        return until - now

    def _pause(self, key: Any, seconds: float) -> None:
        now = asyncio.get_running_loop().time()
        if len(self._paused_until) > _MAX_PAUSED_CHATS:
            self._paused_until = {k: t for k, t in self._paused_until.items() if t > now}
        target = _ALL if key is None else key
        self._paused_until[target] = max(self._paused_until.get(target, 0.0), now + seconds)

    async def _wait_turn(self, key: int | str | None, paced: bool) -> None:
        """Until no pause applies and the chat's and the overall bucket gave a token."""
        while True:
            while (remaining := self._remaining_pause(key)) > 0:
                await asyncio.sleep(remaining)
            if paced and key is not None:
                await self._refill_if_due(key)
                if (bucket := self._bucket(key)) is not None:
                    await bucket.acquire()
                    if self._remaining_pause(key) > 0 or self._buckets.get(key) is not bucket:
                        continue  # a 429 came while this one queued: wait for the pause, queue again
            if key is not None and self._overall is not None:
                await self._overall.acquire()
            return

    # ------------------------------------------------------------------ BaseRateLimiter

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, _Result]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: float | None,
    ) -> _Result:
        """Wait for the chat's turn, send; on ``RetryAfter`` pause the chat, retry until the deadline.

        Args:
            rate_limit_args: seconds this request may wait before it is given up (None: ``deadline``).

        Raises:
            bot.telegram_io.ReplyDropped: still not sent ``deadline`` seconds after the request.
            telegram.error.RetryAfter: a refused ``sendChatAction`` (best effort, never retried).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + (self.deadline if rate_limit_args is None else float(rate_limit_args))
        chat_id = data.get("chat_id")
        with contextlib.suppress(ValueError, TypeError):
            chat_id = int(chat_id)  # type: ignore[arg-type]
        key: int | str | None = chat_id if isinstance(chat_id, int | str) else None
        best_effort = endpoint.lower() in _BEST_EFFORT
        paced = is_paced(endpoint)
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wait_turn(key, paced and not best_effort)
            except TimeoutError:
                raise self._drop(endpoint, key, loop.time() - started, None) from None
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as exc:
                self.refusals += 1
                seconds = retry_after_seconds(exc)
                self._pause(key, seconds + 0.1)
                if paced and key is not None:
                    self._refill_due[key] = True
                if best_effort:
                    raise
                if loop.time() + seconds > deadline:
                    raise self._drop(endpoint, key, loop.time() - started, seconds) from None
                where = f"chat {key}" if key is not None else "all requests"
                log.info("Telegram flood control (%s): %s waits %.0f s, then is sent again", where, endpoint, seconds)

    def _drop(self, endpoint: str, key: int | str | None, waited: float, retry_after: float | None) -> ReplyDropped:
        self.dropped += 1
        where = f"chat {key}" if key is not None else "a request without a chat"
        why = f"Telegram asked to wait {retry_after:.0f} s more" if retry_after is not None else "still queued"
        log.warning(
            "dropped %s to %s: waited %.0f s for Telegram's flood limits, %s, past limits.reply_deadline_seconds (%.0f s)",
            endpoint, where, waited, why, self.deadline,
        )
        return ReplyDropped(endpoint=endpoint, chat_id=key, waited=waited)


async def on_flood_error(update: object, context: Any) -> None:
    """Error handler (before the general one): a flood-control failure is neither a traceback nor an apology.

    :class:`bot.telegram_io.ReplyDropped` was logged once by the limiter; a bare ``RetryAfter``
    (a request that bypassed the limiter) is logged here in one line. Both stop further error
    handlers (``ApplicationHandlerStop``): the apology would be flood-limited too.
    """
    error = context.error
    if isinstance(error, ReplyDropped):
        raise ApplicationHandlerStop
    if isinstance(error, RetryAfter):
        log.warning("Telegram flood control: a reply was refused (retry after %.0f s)", retry_after_seconds(error))
        raise ApplicationHandlerStop
