"""Small asyncio helpers the daemon's loops share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable


async def wait_quietly(aw: Awaitable[object], timeout: float | None) -> bool:
    """Await `aw` for at most `timeout` seconds; False when time ran out (`aw` is then cancelled).

    Unlike `asyncio.wait_for` on Python 3.11, a cancellation that arrives as `aw` completes is never
    swallowed, so a loop built on this always stops when its task is cancelled.
    """
    try:
        async with asyncio.timeout(timeout):
            await aw
        return True
    except TimeoutError:
        return False


async def cancel_and_wait(tasks) -> None:
    """Cancel tasks and wait until each has ended (what they raise on the way out is theirs)."""
    tasks = [t for t in tasks if t is not None]
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


class TaskSet:
    """Background one-shot tasks with an owner: kept until done, cancelled and awaited on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def aclose(self) -> None:
        await cancel_and_wait(list(self._tasks))
        self._tasks.clear()
