"""The lean path to the worker: HTTP/1.1 over kept-alive Unix-socket connections, parsed by httptools.

aiohttp's ClientSession costs too much per request for a sidecar (see DESIGN performance notes), so
this module owns a small pool of asyncio protocol connections, writes the request head itself and
hands the answer back as status, headers and a body reader with flow control.
"""

from __future__ import annotations

import asyncio
from collections import deque

import httptools

HIGH_WATER = 1 << 20  # pause reading from the worker past this much unread body
LOW_WATER = 1 << 18


class UpstreamError(Exception):
    """The worker did not give a whole answer.

    kind: "connect" (no connection), "reset" (closed before or during the answer), "protocol"
    (not HTTP). `started` says whether any of the answer had arrived.
    """

    def __init__(self, kind: str, detail: str, started: bool = False):
        self.kind = kind
        self.detail = detail
        self.started = started
        super().__init__(f"{kind}: {detail}")


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool", "transport", "parser", "status", "headers", "_hdr_future", "_body", "_body_size",
        "_body_waiter", "_complete", "_error", "_got_bytes", "_paused", "_write_paused",
        "_drain_waiter", "closed", "keep_alive", "_length_known", "_head_request", "used",
    )

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = 0
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._hdr_future: asyncio.Future[None] | None = None
        self._body: deque[bytes] = deque()
        self._body_size = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: UpstreamError | None = None
        self._got_bytes = False
        self._paused = False
        self.keep_alive = False
        self._length_known = False
        self._head_request = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._hdr_future is None:  # unsolicited bytes on an idle connection
            self._fail(UpstreamError("protocol", "worker sent bytes with no request outstanding"))
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "worker asked for a protocol upgrade", True))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"worker answered invalid HTTP ({exc})", self._got_bytes))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self._hdr_future is not None and not self._complete and self._error is None:
            if self.status and not self._length_known and self._hdr_future.done():
                self.on_message_complete()  # an answer delimited by the end of the connection
            else:
                self._fail(UpstreamError("reset", "worker closed the connection", self._got_bytes))
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self.status = p.get_status_code()
        if 100 <= self.status < 200:  # interim answer (100 Continue): wait for the real one
            self.headers = []
            self.status = 0
            return
        self.keep_alive = p.should_keep_alive()
        for name, value in self.headers:
            ln = name.lower()
            if ln == b"content-length" or (ln == b"transfer-encoding" and b"chunked" in value.lower()):
                self._length_known = True
        f = self._hdr_future
        if f is not None and not f.done():
            f.set_result(None)
        if self._head_request:
            # some servers send a body even to HEAD: never reuse the connection after one
            self.keep_alive = False
            self.on_message_complete()
        elif self.status in (204, 304):
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._complete:
            return
        self._complete = True
        f = self._hdr_future
        if f is not None and not f.done():
            f.set_result(None)
        self._wake()

    # -- helpers -------------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: UpstreamError) -> None:
        if self._error is None:
            self._error = err
        f = self._hdr_future
        if f is not None and not f.done():
            f.set_exception(err)
        self._wake()
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
            self._drain_waiter = None
        if self.closed and self._error is not None:
            raise self._error

    # -- the exchange --------------------------------------------------------------------------
    def start(self, head: bytes, body: bytes | None, head_request: bool) -> asyncio.Future[None]:
        """Write the head (and a buffered body); the future resolves when the answer's head is in."""
        self._reset()
        self._head_request = head_request
        self.used += 1
        self._hdr_future = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        if body:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
        return self._hdr_future

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    @property
    def complete(self) -> bool:
        return self._complete

    def take_buffered(self) -> bytes:
        data = b"".join(self._body)
        self._body.clear()
        self._body_size = 0
        return data

    async def read(self) -> bytes:
        """Next piece of the body; b"" at its end. Raises UpstreamError if the answer broke."""
        while True:
            if self._body:
                data = self.take_buffered()
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._body_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None

    def reusable(self) -> bool:
        return self._complete and self.keep_alive and not self.closed and self._error is None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Kept-alive connections to one worker incarnation's socket."""

    def __init__(self, path: str, max_idle: int = 64):
        self.path = path
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self.closed = False

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_unix_connection(lambda: UpstreamConnection(self), self.path)
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect to worker socket: {exc.strerror or exc}") from None
        self._all.add(proto)
        return proto

    async def get(self) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused (a reused one may have been closed by the worker)."""
        while self._idle:
            c = self._idle.pop()
            if not c.closed and c.transport is not None and not c.transport.is_closing():
                return c, True
        return await self.connect(), False

    def put(self, c: UpstreamConnection) -> None:
        if c.reusable() and not self.closed and len(self._idle) < self.max_idle:
            self._idle.append(c)
        else:
            c.abort()
            self._all.discard(c)

    def _forget(self, c: UpstreamConnection) -> None:
        self._all.discard(c)

    def close(self) -> None:
        self.closed = True
        for c in list(self._all):
            c.abort()
        self._all.clear()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return len(self._all)
