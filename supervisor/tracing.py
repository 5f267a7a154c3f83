"""Tracing's life: the tracer in force for the `tracing` settings in force (None while tracing is off),
built off the event loop, replaced when a reload changes `tracing`, the old one flushed and shut down off
the loop within a bound; and the W3C `traceparent` header, read and written.

The OpenTelemetry SDK is imported (by `supervisor.trace_spans`) only once tracing is on, so a daemon with
tracing off pays neither its import time nor a check per request beyond `tracer is None`.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from .config import Tracing as TracingSettings
    from .trace_spans import Tracer

log = structlog.get_logger("supervisor.tracing")

SHUTDOWN_S = 5.0  # a tracer being replaced or shut down flushes what it holds within this, then is dropped
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C traceparent; None for one that is not valid (it is then
    ignored: the request starts a trace of its own). A later version's extra fields are allowed."""
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    tid, sid = int(trace_id, 16), int(span_id, 16)
    if tid == 0 or sid == 0:
        return None
    return tid, sid, int(flags, 16)


def format_traceparent(trace_id: int, span_id: int, flags: int) -> bytes:
    """The traceparent header value that names span `span_id` of trace `trace_id`."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags & 0xff:02x}".encode()


class Tracing:
    """Owns the tracer: `use` hears each new one (None: off); `on_error` counts an export that failed
    (it is called from the exporter's thread)."""

    def __init__(self, use: Callable[[Tracer | None], None], on_error: Callable[[], None]):
        self._use = use
        self._on_error = on_error
        self.tracer: Tracer | None = None
        self._wanted: TracingSettings | None = None
        self._swap: asyncio.Task | None = None

    async def start(self, s: TracingSettings) -> None:
        """The first tracer (at startup, before requests come)."""
        self._wanted = s
        await self._apply(s)

    def apply(self, s: TracingSettings) -> None:
        """A reload: a changed `tracing` section replaces the tracer (in a task of ours; swaps run in order)."""
        if s == self._wanted:
            return
        self._wanted = s
        self._swap = asyncio.create_task(self._after(self._swap, s), name="tracing-swap")

    async def _after(self, prev: asyncio.Task | None, s: TracingSettings) -> None:
        if prev is not None:
            await prev
        await self._apply(s)

    async def _apply(self, s: TracingSettings) -> None:
        old = self.tracer
        new = None
        if s.endpoint is not None:
            from .trace_spans import Tracer  # (the SDK's import, on a thread: only when tracing is on)

            new = await asyncio.to_thread(Tracer, s, self._on_error)
        self.tracer = new
        self._use(new)
        log.info("tracing", endpoint=s.endpoint, sample_ratio=s.sample_ratio if new else None,
                 service_name=s.service_name if new else None)
        if old is not None:
            await shut_down(old)

    async def aclose(self) -> None:
        """Stop tracing: what the tracer holds is sent within SHUTDOWN_S, else dropped."""
        if self._swap is not None:
            await self._swap
        old, self.tracer = self.tracer, None
        self._use(None)
        if old is not None:
            await shut_down(old)


async def shut_down(tracer: Tracer, bound_s: float = SHUTDOWN_S) -> bool:
    """Flush and shut down `tracer` on a thread of its own; False when that took longer than `bound_s` (the
    thread is a daemon thread: a collector that does not answer never holds up the daemon's exit)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def run() -> None:
        try:
            tracer.shutdown()
        finally:
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # the loop closed while it waited: nobody is listening any more
                pass

    threading.Thread(target=run, name="trace-shutdown", daemon=True).start()
    try:
        async with asyncio.timeout(bound_s):
            await done.wait()
    except TimeoutError:
        log.warning("tracing_shutdown_slow", bound_s=bound_s, action="spans not yet sent are dropped")
        return False
    return True
