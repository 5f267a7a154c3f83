"""A worker's sleep mode, the calls: put to sleep, wake, ask whether it sleeps (vLLM's endpoints by default),
each an HTTP request of the daemon's own on the replica's Unix socket, bounded in time. No decisions here:
the lifecycle decides when, the GPU room's plans decide whom."""

from __future__ import annotations

import asyncio
import json

from ..config import Sleep
from ..upstream import UpstreamError
from .process import Incarnation

WOKEN = "woken"  # the reason of the move starting -> ready that ends a wake (its time is worker_wake_seconds)
ANSWER_MAX_BYTES = 1 << 16


async def call(inc: Incarnation, endpoint: str, timeout: float) -> tuple[int | None, bytes, str]:
    """`endpoint` ("POST /sleep?level=1") on its own connection: (status, body, why-not); status None when
    no answer came within `timeout` or the worker broke the exchange."""
    method, _, target = endpoint.partition(" ")
    head = (f"{method} {target} HTTP/1.1\r\nHost: worker\r\nUser-Agent: gpu-supervisor\r\n"
            "Content-Length: 0\r\n\r\n").encode()
    conn = None
    try:
        async with asyncio.timeout(timeout):
            conn = await inc.pool.connect()
            await conn.start(head, None, False)
            chunks, size = [], 0
            while chunk := await conn.read():
                size += len(chunk)
                if size <= ANSWER_MAX_BYTES:
                    chunks.append(chunk)
            return conn.status, b"".join(chunks), ""
    except TimeoutError:
        return None, b"", f"no answer within {timeout:g}s"
    except UpstreamError as exc:
        return None, b"", f"{exc.kind}: {exc}"
    finally:
        if conn is not None:
            conn.abort()


def sleeping_answer(body: bytes) -> bool | None:
    """`{"is_sleeping": true|false}` read; None when the body says neither."""
    try:
        v = json.loads(body).get("is_sleeping")
    except (ValueError, AttributeError):
        return None
    return v if isinstance(v, bool) else None


async def switch(inc: Incarnation, spec: Sleep, asleep: bool, timeout: float) -> str | None:
    """Put the worker to sleep (`asleep`) or wake it, then confirm with `is_sleeping` when configured; None
    when done, else why not (a non-2xx, no answer in time, or a confirmation that says otherwise)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    status, _, why = await call(inc, spec.sleep if asleep else spec.wake, timeout)
    if status is None:
        return why
    if not 200 <= status < 300:
        return f"status {status}"
    if spec.is_sleeping is None:
        return None
    status, body, why = await call(inc, spec.is_sleeping, max(0.01, deadline - loop.time()))
    if status is None or not 200 <= status < 300:
        return f"is_sleeping: {why or f'status {status}'}"
    said = sleeping_answer(body)
    if said is not asleep:
        return f"is_sleeping says {body[:100]!r}"
    return None
