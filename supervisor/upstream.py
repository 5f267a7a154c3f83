"""The lean path to the worker: HTTP/1.1 over kept-alive Unix-socket connections, parsed by httptools.

aiohttp's ClientSession costs too much per request for a sidecar (see DESIGN performance notes), so
this module owns a small pool of asyncio protocol connections, writes the request head itself and
hands the answer back as status, headers and a body reader with flow control. A worker that answers
malformed HTTP (bytes past its answer, an endless head, a status it may not send) gets an
`UpstreamError("protocol", ...)` and a closed connection, never a desynchronised one; each such event is
counted on the pool.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import deque
from collections.abc import Callable

import httptools
import structlog

log = structlog.get_logger("supervisor.upstream")

HIGH_WATER = 1 << 20  # pause reading from the worker past this much unread body
LOW_WATER = 1 << 18
DEFAULT_MAX_HEAD_BYTES = 64 * 1024  # bytes of the worker's answer before the end of its headers
DEFAULT_MAX_HEADERS = 100  # header lines in one answer
# Every kind a pool counts in `protocol_errors` (fixed, so they can be metric label values).
PROTOCOL_ERROR_KINDS = (
    "extra_bytes",  # bytes past a complete answer, or on an idle kept-alive connection
    "unsolicited",  # bytes on a connection before any request was written
    "head_too_large",  # the answer's head ran past max_head_bytes
    "too_many_headers",  # more than max_headers header lines
    "bad_status",  # a status outside 100-599
    "upgrade",  # 101 Switching Protocols, which the supervisor never asks for
    "invalid_http",  # anything else the parser refused
)

# what socket() or connect() fail with when the supervisor's own process (or the host) is out of resources
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_monotonic = time.monotonic


class UpstreamError(Exception):
    """The worker did not give a whole answer.

    kind: "connect" (no connection), "reset" (closed before or during the answer), "protocol"
    (not HTTP), "local" (the supervisor itself had no file descriptor or memory to open a connection with:
    the worker is not to blame). `started` says whether any of the answer had arrived.
    """

    def __init__(self, kind: str, detail: str, started: bool = False):
        self.kind = kind
        self.detail = detail
        self.started = started
        super().__init__(f"{kind}: {detail}")


class _Violation(Exception):
    """Raised inside a parser callback to stop parsing where the worker broke the protocol."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        self.detail = detail
        super().__init__(detail)


class UpstreamConnection(asyncio.Protocol):
    """One kept-alive connection to the worker; one exchange at a time.

    Progress, for hang detection: `outstanding` is True from `start()` until the answer is complete or
    broken; `last_rx` is the monotonic time of the last byte received (set to the start time by `start()`),
    `last_tx` that of the last request bytes written (`start()` or `write()`).
    """

    __slots__ = (
        "pool", "transport", "parser", "status", "headers", "_hdr_future", "_body", "_body_size",
        "_body_waiter", "_complete", "_error", "_got_bytes", "_paused", "_write_paused",
        "_drain_waiter", "closed", "keep_alive", "_length_known", "_head_request", "used",
        "last_rx", "last_tx", "outstanding", "_in_head", "_head_bytes", "_interim", "_max_head", "_max_headers",
        "names", "content_length", "loop",
    )

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop):
        self.pool = pool
        # (kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call)
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = 0
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._max_head = pool.max_head_bytes
        self._max_headers = pool.max_headers
        self.last_rx = self.last_tx = _monotonic()
        self.outstanding = False
        self.parser = httptools.HttpResponseParser(self)
        self._complete = False
        self._reset()

    def _reset(self) -> None:
        # after a whole kept-alive answer llhttp stands at the start of the next message: keep the parser
        if self.used and not (self._complete and self.keep_alive and self._error is None):
            self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.names: list[bytes] = []  # the answer's header names, lowercased, in step with `headers`
        self.content_length: bytes | None = None  # the answer's Content-Length as sent (digits, llhttp checked)
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
        self._in_head = True
        self._head_bytes = 0
        self._interim = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_rx = _monotonic()
        if not self.outstanding:  # no request, or its answer is whole: these bytes belong to nothing
            self._stray(data)
            return
        self._got_bytes = True
        if self._in_head:
            n = self._head_bytes + len(data)
            if n > self._max_head:
                self._feed_past_head_limit(data)
                return
            self._head_bytes = n
        self._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.outstanding and self._error is None:
            if self.status and not self._length_known:
                self.on_message_complete()  # an answer delimited by the end of the connection
            else:
                self._fail(UpstreamError("reset", "worker closed the connection", self._got_bytes))
        self.outstanding = False
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
    def on_message_begin(self) -> None:
        if self._complete:
            raise _Violation("extra_bytes", "worker sent bytes after its complete answer (a second answer?)")

    def on_header(self, name: bytes, value: bytes) -> None:
        h = self.headers
        if len(h) >= self._max_headers:
            raise _Violation("too_many_headers", f"worker's answer has over {self._max_headers} header lines")
        h.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        status = p.get_status_code()
        if status < 200:
            if status == 101:
                raise _Violation("upgrade", "worker answered 101 Switching Protocols to a request that asked "
                                            "for no upgrade")
            if status < 100:
                raise _Violation("bad_status", f"worker answered invalid status {status}")
            self.headers = []  # an interim answer (100 Continue, 103 Early Hints): wait for the final one
            self._interim = True
            return
        if status > 599:
            raise _Violation("bad_status", f"worker answered invalid status {status}")
        self.status = status
        self._in_head = False
        self.keep_alive = p.should_keep_alive()
        names = self.names
        for name, value in self.headers:
            ln = name.lower()
            names.append(ln)
            if ln == b"content-length":
                self._length_known = True
                self.content_length = value
            elif ln == b"transfer-encoding":
                # only chunked is decoded here: a body in any other transfer coding (gzip, an unknown one,
                # chunked twice) would reach the client still encoded once the hop-by-hop header is dropped
                if self._length_known or value.strip().lower() != b"chunked":
                    te = value[:80].decode("latin-1")
                    raise _Violation("invalid_http", f"worker answered Transfer-Encoding {te!r} (only a single "
                                                     "chunked coding can be relayed)")
                self._length_known = True
        f = self._hdr_future
        if f is not None and not f.done():
            f.set_result(None)
        if self._head_request:
            # some servers send a body even to HEAD: never reuse the connection after one
            self.keep_alive = False
            self.on_message_complete()
        elif status in (204, 304):
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
        if self._interim:  # the end of a 1xx answer
            self._interim = False
            return
        if self._complete:
            return
        self._complete = True
        self.outstanding = False
        f = self._hdr_future
        if f is not None and not f.done():
            f.set_result(None)
        self._wake()

    # -- parsing and its failures ---------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            v = exc.__context__
            if isinstance(v, _Violation):
                self._violation(v.kind, v.detail)
            else:
                self._violation("invalid_http", f"worker answered invalid HTTP ({v or exc})")
        except httptools.HttpParserUpgrade:
            self._violation("upgrade", "worker switched protocols though no upgrade was asked for")
        except httptools.HttpParserError as exc:
            self._violation("invalid_http", f"worker answered invalid HTTP ({exc})")

    def _feed_past_head_limit(self, data: bytes) -> None:
        """The slow path: only the bytes up to the head limit may finish the head; then the rest."""
        room = self._max_head - self._head_bytes
        self._head_bytes = self._max_head
        self._feed(data[:room])
        if self.closed:
            return
        if self._in_head:
            self._violation("head_too_large", f"worker's answer head ran over {self._max_head} bytes "
                                              "without ending")
            return
        self._feed(data[room:])

    def _stray(self, data: bytes) -> None:
        if self.closed:
            return
        if self._complete and self._head_request:
            self._close()  # the body some servers send to HEAD: not reused anyway
            return
        kind = "unsolicited" if self._hdr_future is None else "extra_bytes"
        self._violation(kind, f"worker sent {len(data)} bytes with no request outstanding")

    def _violation(self, kind: str, detail: str) -> None:
        self.pool._protocol_error(kind, detail)
        if self._complete:  # the answer was whole before the worker misbehaved: it stands
            self._close()
        else:
            self._fail(UpstreamError("protocol", detail, self._got_bytes))

    # -- helpers -------------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _close(self) -> None:
        self.closed = True
        self.outstanding = False
        if self.transport is not None:
            self.transport.close()

    def _fail(self, err: UpstreamError) -> None:
        if self._error is None:
            self._error = err
        f = self._hdr_future
        if f is not None and not f.done():
            f.set_exception(err)
        self._wake()
        self._close()

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
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
        self._hdr_future = self.loop.create_future()
        self.outstanding = True
        self.last_rx = self.last_tx = _monotonic()
        assert self.transport is not None
        if body:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
        return self._hdr_future

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.last_tx = _monotonic()
            self.transport.write(data)

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def reading_paused(self) -> bool:
        """True while unread body past HIGH_WATER holds the worker back (the client reads slowly)."""
        return self._paused

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
            self._body_waiter = self.loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None

    def reusable(self) -> bool:
        return self._complete and self.keep_alive and not self.closed and self._error is None

    def abort(self) -> None:
        self.closed = True
        self.outstanding = False
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Kept-alive connections to one worker incarnation's socket, and the count of its protocol errors.

    `protocol_errors` maps a kind of `PROTOCOL_ERROR_KINDS` to how often it happened on this pool;
    `on_protocol_error(kind)`, when given, is called on each (e.g. to increment a metric that outlives
    the incarnation).
    """

    def __init__(self, path: str, max_idle: int = 64, *, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
                 max_headers: int = DEFAULT_MAX_HEADERS,
                 on_protocol_error: Callable[[str], None] | None = None):
        if max_head_bytes < 64:
            raise ValueError(f"max_head_bytes must be at least 64, got {max_head_bytes}")
        if max_headers < 1:
            raise ValueError(f"max_headers must be at least 1, got {max_headers}")
        self.path = path
        self.max_idle = max_idle
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.on_protocol_error = on_protocol_error
        self.protocol_errors: dict[str, int] = {}
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self.closed = False

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_unix_connection(lambda: UpstreamConnection(self, loop), self.path)
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:
                raise UpstreamError("local", f"the supervisor has no resources to connect to its worker now "
                                    f"({exc.strerror or exc})") from None
            raise UpstreamError("connect", f"cannot connect to worker socket: {exc.strerror or exc}") from None
        self._all.add(proto)
        return proto

    def take(self) -> UpstreamConnection | None:
        """An idle kept-alive connection, if one is open (the worker may still have closed it)."""
        idle = self._idle
        while idle:
            c = idle.pop()
            if not c.closed and c.transport is not None and not c.transport.is_closing():
                return c
        return None

    async def get(self) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused (a reused one may have been closed by the worker)."""
        c = self.take()
        if c is not None:
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

    def _protocol_error(self, kind: str, detail: str) -> None:
        self.protocol_errors[kind] = self.protocol_errors.get(kind, 0) + 1
        log.warning("upstream_protocol_error", kind=kind, detail=detail, socket=self.path)
        if self.on_protocol_error is not None:
            self.on_protocol_error(kind)

    def silent_for(self, now: float) -> float | None:
        """Seconds since the worker last made progress on any exchange in flight; None with none in flight.

        Progress is a byte received or request bytes written (a slow upload is not a hung worker); an
        exchange whose reading we paused because the client reads slowly counts as progressing now.
        """
        latest = None
        for c in self._all:
            if not c.outstanding:
                continue
            if c._paused:
                return 0.0
            t = c.last_rx if c.last_rx > c.last_tx else c.last_tx
            if latest is None or t > latest:
                latest = t
        return None if latest is None else max(0.0, now - latest)

    def close(self) -> None:
        """The incarnation is gone. An exchange still waiting for its answer fails as a reset (its worker
        died): closed here before the kernel's reset of that connection reached the event loop, it
        would otherwise wait for an answer that cannot come until its client gave up."""
        self.closed = True
        for c in list(self._all):
            if c.outstanding and c._error is None:
                c._fail(UpstreamError("reset", "the worker exited", c._got_bytes))
            c.abort()
        self._all.clear()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return len(self._all)

    @property
    def in_flight(self) -> int:
        """Exchanges whose answer is still outstanding."""
        return sum(1 for c in self._all if c.outstanding)


async def fetch(pool: UpstreamPool, target: str, max_bytes: int | None = None) -> tuple[int, bytes]:
    """One GET the daemon makes itself (health and progress probes, model lists) on a connection of its
    own, closed after: (status, body). `max_bytes` 0 reads no body; a body past `max_bytes` is an
    UpstreamError("protocol"), as is any other broken answer. The caller bounds it in time."""
    head = f"GET {target} HTTP/1.1\r\nHost: worker\r\nUser-Agent: gpu-supervisor\r\n\r\n".encode()
    conn = None
    try:
        conn = await pool.connect()
        await conn.start(head, None, False)
        chunks, size = [], 0
        while max_bytes != 0 and (chunk := await conn.read()):
            chunks.append(chunk)
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise UpstreamError("protocol", f"answer over {max_bytes} bytes", True)
        return conn.status, b"".join(chunks)
    finally:
        if conn is not None:
            conn.abort()
