"""A semaphore weighted by bytes, bounding the estimated peak memory of the image decodes running at once.

:func:`model_store.images.decode_image` estimates a decode's peak memory from the image header and
reserves it from :data:`DECODE_BUDGET` (or a given :class:`DecodeBudget`) before any pixel is decoded.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["DECODE_BUDGET", "DEFAULT_DECODE_BUDGET_BYTES", "DecodeBudget"]

#: Default capacity of :data:`DECODE_BUDGET`: the estimated peak bytes of all decodes running at
#: once in this process. One 40-megapixel PNG with alpha (600 MB estimated) fits; two wait for
#: each other, while four 12-megapixel JPEGs (144 MB each) run side by side.
DEFAULT_DECODE_BUDGET_BYTES = 576 * 1024 * 1024


class DecodeBudget:
    """A semaphore weighted by bytes: the estimated peak memory of the decodes running at once.

    Thread-safe (the decodes run in worker threads) and first come, first served: a large
    reservation waiting at the head of the queue is not overtaken by small ones, so it cannot
    starve. A single reservation may not exceed ``capacity`` (``images.decode_image`` refuses such
    images as too large before reserving).

    Args:
        capacity: bytes that may be reserved at once; must be positive.

    Raises:
        ValueError: ``capacity`` is not positive.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self._used = 0
        self._peak = 0
        self._queue: collections.deque[object] = collections.deque()
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        with self._cond:
            return self._used

    @property
    def peak(self) -> int:
        """Largest number of bytes reserved at once since creation (or :meth:`reset_peak`)."""
        with self._cond:
            return self._peak

    def reset_peak(self) -> None:
        """Start measuring :attr:`peak` afresh (from what is reserved now)."""
        with self._cond:
            self._peak = self._used

    @contextlib.contextmanager
    def reserve(self, nbytes: int, *, timeout: float | None = None) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the duration of the ``with`` block (blocks until free).

        Args:
            nbytes: bytes to reserve, 0..capacity.
            timeout: seconds to wait at most; None waits as long as needed.

        Raises:
            ValueError: ``nbytes`` is negative or over ``capacity``.
            TimeoutError: not granted within ``timeout``.
        """
        nbytes = int(nbytes)
        if not 0 <= nbytes <= self.capacity:
            raise ValueError(f"cannot reserve {nbytes} bytes of a budget of {self.capacity}")
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._used + nbytes > self.capacity:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"{nbytes} bytes of the decode budget not free in time")
                    self._cond.wait(remaining)
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._used += nbytes
            self._peak = max(self._peak, self._used)
            self._cond.notify_all()  # the next in the queue may fit as well
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


#: The process-wide budget every :func:`decode_image` call reserves from by default.
DECODE_BUDGET = DecodeBudget(DEFAULT_DECODE_BUDGET_BYTES)
