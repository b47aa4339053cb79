"""Limits on what requests cost: byte budgets, per-user rate limits, throttles, the decode pool.

Plain asyncio and threading, nothing Telegram-specific; :class:`bot.context.BotData` holds one
of each per Application.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = [
    "DECODE_THREADS",
    "DOWNLOAD_BUDGET_BYTES",
    "ByteBudget",
    "RateLimiter",
    "Throttle",
    "decode_pool",
]

#: Threads decoding images (users' photos and admins' uploads). Their memory is bounded anyway by
#: ``model_store.images.DECODE_BUDGET``; the pool being their own keeps asyncio's default executor
#: (store and registry calls of admin commands) free. Cores + 1, at most 3: on 2 busy cores a
#: 2-thread pool answered the 50-chat load test slower than the old 6-thread default executor,
#: while 4 threads raised the bot's peak RSS under hostile files by ~80 MB (more malloc arenas).
DECODE_THREADS = max(1, min(3, (os.cpu_count() or 1) + 1))

#: Bytes of downloaded image files held at once by users' photos (from the download until the
#: decode is done). With the decode budget (``model_store.images.DECODE_BUDGET``) this bounds
#: what a burst of large files costs: without it, 16 slots x 20 MB files were 320 MB.
DOWNLOAD_BUDGET_BYTES = 64 * 1024 * 1024


class ByteBudget:
    """An asyncio semaphore weighted by bytes, first come, first served (one event loop only).

    A reservation larger than ``capacity`` is clamped to it (it then runs alone).

    Args:
        capacity: bytes that may be reserved at once; must be positive.

    Raises:
        ValueError: ``capacity`` is not positive.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _wake(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            nbytes, future = self._waiters.popleft()
            if not future.done():
                self.in_use += nbytes
                future.set_result(None)

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``min(nbytes, capacity)`` bytes for the ``async with`` block (waits until free)."""
        nbytes = max(0, min(int(nbytes), self.capacity))
        if not self._waiters and self.in_use + nbytes <= self.capacity:
            self.in_use += nbytes
        else:
            entry = (nbytes, asyncio.get_running_loop().create_future())
            self._waiters.append(entry)
            try:
                await entry[1]
            except asyncio.CancelledError:
                if entry[1].done() and not entry[1].cancelled():
                    self.in_use -= nbytes  # granted just as it was cancelled
                else:
                    self._waiters.remove(entry)
                self._wake()
                raise
        try:
            yield
        finally:
            self.in_use -= nbytes
            self._wake()


def decode_pool() -> ThreadPoolExecutor:
    """A new pool of :data:`DECODE_THREADS` threads named ``decode-N`` (one per Application)."""
    return ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")


class RateLimiter:
    """Sliding-window limit of events per key (a user id) per ``period`` seconds.

    ``limit == 0`` allows everything. Memory stays bounded: idle keys are dropped.
    """

    def __init__(self, limit: int, period: float = 60.0, *, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.period = period
        self.max_keys = max_keys
        self._events: dict[int, deque[float]] = {}
        self._warned: dict[int, float] = {}

    def allow(self, key: int, now: float | None = None) -> bool:
        """Record one event for ``key``; False if it is over the limit (then nothing is recorded)."""
        if self.limit <= 0:
            return True
        now = time.monotonic() if now is None else now
        events = self._events.setdefault(key, deque())
        while events and now - events[0] >= self.period:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        if len(self._events) > self.max_keys:
            self._prune(now)
        return True

    def should_warn(self, key: int, now: float | None = None) -> bool:
        """True at most once per period per key: whether to tell the user to slow down."""
        now = time.monotonic() if now is None else now
        last = self._warned.get(key)
        if last is not None and now - last < self.period:
            return False
        self._warned[key] = now
        return True

    def _prune(self, now: float) -> None:
        for key in [k for k, ev in self._events.items() if not ev or now - ev[-1] >= self.period]:
            del self._events[key]
        for key in [k for k, t in self._warned.items() if now - t >= self.period]:
            del self._warned[key]


class Throttle:
    """At most one event per key every ``interval`` seconds (used for chat actions)."""

    def __init__(self, interval: float, *, max_keys: int = 100_000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[Any, float] = {}

    def ready(self, key: Any, now: float | None = None) -> bool:
        """True (and recorded) if ``key`` had no event in the last ``interval`` seconds."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        if len(self._last) > self.max_keys:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        return True
