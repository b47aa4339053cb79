"""The micro-batcher: concurrent requests, one call per batch, on one worker thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bot.batching import MicroBatcher


async def test_concurrent_items_are_batched_and_each_caller_gets_its_own_result() -> None:
    calls: list[list[int]] = []
    threads: set[str] = set()

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        threads.add(threading.current_thread().name)
        return [i * i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(square, window=0.02, max_batch=8, name="test-batch")
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    finally:
        await batcher.aclose()
    assert results == [i * i for i in range(20)]
    assert all(len(c) <= 8 for c in calls)
    assert len(calls) < 20 and batcher.largest_batch > 1
    assert sorted(x for c in calls for x in c) == list(range(20))
    assert threads == {t for t in threads if t.startswith("test-batch")} and len(threads) == 1
    assert threading.current_thread().name not in threads, "never on the event loop's thread"


async def test_an_exception_fails_every_request_of_its_batch_only() -> None:
    def fail_on_negative(items: list[int]) -> list[int]:
        if any(i < 0 for i in items):
            raise ValueError("negative")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(fail_on_negative, window=0.05, max_batch=4)
    try:
        first = await asyncio.gather(batcher.submit(1), batcher.submit(-1), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in first)
        assert await batcher.submit(5) == 5, "the batcher keeps working after a failed batch"
    finally:
        await batcher.aclose()


async def test_close_cancels_waiters_and_refuses_new_work() -> None:
    started = threading.Event()
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        started.set()
        release.wait(5)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(slow, window=0, max_batch=1)
    running = asyncio.ensure_future(batcher.submit(1))
    queued = asyncio.ensure_future(batcher.submit(2))
    await asyncio.to_thread(started.wait, 5)
    await batcher.aclose()
    release.set()
    outcomes = await asyncio.gather(running, queued, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    with pytest.raises(RuntimeError):
        await batcher.submit(3)
