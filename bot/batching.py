"""Micro-batching: many concurrent ``await batcher.submit(x)`` calls, one batched call in a worker thread.

Photos that arrive together (an album, a busy group, a benchmark with 20 users) are classified in
one forward pass instead of one pass each. A single consumer task takes the first waiting item,
waits at most ``window`` seconds for more (not at all if a backlog is already queued, i.e. when
the previous batch kept the worker busy), takes up to ``max_batch`` items and runs
``fn(items)`` on a dedicated single-thread executor, so the event loop never blocks and the model
is only ever called from one thread. Every caller gets its own result, or the exception the batch
raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["MicroBatcher"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Item(Generic[T, R]):
    value: T
    future: asyncio.Future[R]


class MicroBatcher(Generic[T, R]):
    """Collect concurrent requests into batches for ``fn``.

    Args:
        fn: called in the worker thread with a list of items; must return one result per item, in
            order. An exception fails every request of that batch.
        window: seconds to wait for more items after the first one of a batch.
        max_batch: most items per call.
        name: thread name prefix (for logs and profilers).

    The worker task starts on the first :meth:`submit` (it needs the running loop); :meth:`aclose`
    stops it and the thread.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        window: float = 0.01,
        max_batch: int = 32,
        name: str = "batch",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._fn = fn
        self._window = max(0.0, window)
        self._max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: asyncio.Queue[_Item[T, R]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0
        self.items = 0
        self.largest_batch = 0

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The single worker thread; submit other model work here to keep it on that thread."""
        return self._executor

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _ensure_started(self) -> asyncio.Queue[_Item[T, R]]:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._consume(self._queue), name="micro-batcher")
        return self._queue

    async def submit(self, value: T) -> R:
        """Queue one item and wait for its result (raises what the batch call raised)."""
        queue = self._ensure_started()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Item(value, future))
        return await future

    async def _consume(self, queue: asyncio.Queue[_Item[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            if queue.empty() and self._window > 0 and self._max_batch > 1:
                await asyncio.sleep(self._window)
            batch = [first]
            while len(batch) < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [item for item in batch if not item.future.done()]  # callers that gave up
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._fn, [i.value for i in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                for item in batch:
                    item.future.cancel()
                raise
            except Exception as exc:  # handed to every waiting caller
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)

    async def aclose(self) -> None:
        """Stop the worker; waiting callers are cancelled. Idempotent."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait().future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
