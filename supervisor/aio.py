"""Small asyncio helpers the daemon's loops share."""

from __future__ import annotations

import asyncio
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
