"""The records of one HTTP/1.1 exchange on the front end: the server's limits, a request as parsed (its head, a
read-only headers view and its body reader) and the one answer to it (whole or streamed).

The connection (server.py) fills a `Request` from its parser's callbacks and orders the `Responder`s of
pipelined requests; these records only frame bytes and wait on the connection's flow control.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from multidict import MultiDict

if TYPE_CHECKING:
    from .server import HttpConnection


@dataclass(frozen=True)
class ServerLimits:
    """What one listener accepts from a client (aiohttp's defaults for the line and field limits)."""

    max_line_bytes: int = 8190  # the request line, without its CRLF (414 past it)
    max_field_bytes: int = 8190  # one header field "Name: value", without its CRLF (431 past it)
    max_headers: int = 128  # header fields in one head (431 past it); trailers count too
    header_timeout_s: float = 60.0  # the whole head must arrive within this (408 when part of it came)
    keepalive_timeout_s: float = 60.0  # an idle kept-alive connection is closed after this
    max_body_bytes: int = 16 * 1024 * 1024  # a Content-Length over it: 413 before the body is read
    read_buffer_bytes: int = 1 << 16  # unread body past this pauses reading; half of it resumes
    max_pipelined: int = 16  # requests parsed but not yet answered on one connection; more pauses reading
    linger_s: float = 5.0  # after a final answer sent while the client may still be sending: discard, then close
    send_timeout_s: float = 60.0  # an answer's bytes the client takes none of for this long: connection aborted

    def __post_init__(self) -> None:
        for name in ("max_line_bytes", "max_field_bytes"):
            if getattr(self, name) < 64:
                raise ValueError(f"{name} must be at least 64, got {getattr(self, name)}")
        for name in ("max_headers", "read_buffer_bytes", "max_pipelined"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must not be negative, got {self.max_body_bytes}")
        for name in ("header_timeout_s", "keepalive_timeout_s", "linger_s", "send_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class BodyTooLarge(Exception):
    """`Request.read(limit)`: the body runs past `limit` bytes (its Content-Length says so, or it did)."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"request body over {limit} bytes")


class MalformedBody(Exception):
    """The request's body broke the framing its head announced (a bad chunk size, a bad trailer): the
    connection reads no further. Let through by the handler, it becomes a 400 bad_request."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(detail)


# -- bytes written as they are -------------------------------------------------------------------------------
STATUS_LINES: dict[int, bytes] = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE_10 = b"Connection: keep-alive\r\n"  # HTTP/1.0 keeps a connection only when told so
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_JSON = b"Content-Type: application/json\r\n"
_BIG_BODY = 1 << 16  # a body past this goes in a second write rather than be copied behind its head


_FRAMING_LENS = frozenset((10, 14, 17))  # connection, keep-alive, content-length, transfer-encoding
_CL_CACHED = 1024
_CL_LINES = tuple(b"Content-Length: %d\r\n" % n for n in range(_CL_CACHED))


def _framing_header(k: bytes, v: bytes, keep: bool) -> bool:
    """A handler header that may touch the framing: Connection: close ends keep-alive; Content-Length and
    Transfer-Encoding are the server's to write."""
    lk = k.lower()
    if lk == b"connection":
        return keep and b"close" not in v.lower()
    if lk == b"content-length" or lk == b"transfer-encoding":
        raise ValueError(f"{k.decode('latin-1')} is the server's to write (pass the length to start())")
    return keep


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


def error_body(etype: str, message: str) -> bytes:
    return json.dumps({"error": {"type": etype, "message": message, "request_id": None}}).encode()


def error_answer(status: int, etype: str, message: str, date: bytes) -> bytes:
    """A whole answer the HTTP layer makes itself: the house JSON error shape, and the connection closes."""
    body = error_body(etype, message)
    return b"".join((status_line(status), date, _JSON, b"Content-Length: %d\r\n" % len(body), _CLOSE, b"\r\n",
                     body))


# -- the request ---------------------------------------------------------------------------------------------
_KEYS: dict[str, bytes] = {}  # a looked-up name, encoded and lowercased once


def _key(name: str) -> bytes:
    key = name.encode("latin-1").lower()
    if len(_KEYS) < 256:  # the daemon asks for a handful of names; a bound all the same
        _KEYS[name] = key
    return key


class Headers:
    """Case-insensitive read-only view over a request's raw header list (which must not change once read).
    Names and values are latin-1 decoded."""

    __slots__ = ("_raw", "_first")

    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self._raw = raw
        self._first: dict[bytes, bytes] | None = None  # lowercased name -> its first value, made by the first get

    def get(self, name: str, default: str | None = None) -> str | None:
        first = self._first
        if first is None:  # one pass for all the lookups of a request (a client may send 15 fields)
            first = self._first = {k.lower(): v for k, v in reversed(self._raw)}
        v = first.get(_KEYS.get(name) or _key(name))
        return default if v is None else v.decode("latin-1")

    def getall(self, name: str, default=None) -> list[str]:
        """Every value of `name`, in order; [] (or `default` when given) when there is none."""
        key = _KEYS.get(name) or _key(name)
        n = len(key)
        found = [v.decode("latin-1") for k, v in self._raw if len(k) == n and k.lower() == key]
        return found if found or default is None else default

    def __getitem__(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> Iterator[tuple[str, str]]:
        for k, v in self._raw:
            yield k.decode("latin-1"), v.decode("latin-1")

    def keys(self) -> Iterator[str]:
        for k, _ in self._raw:
            yield k.decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"<Headers {list(self.items())!r}>"


_PCT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def _decode_run(m: re.Match) -> str:
    run = m.group()
    try:
        return bytes.fromhex(run.replace("%", "")).decode("utf-8")
    except UnicodeDecodeError:
        return run  # not UTF-8: left as sent (as yarl, under aiohttp's request.path, does)


def unquote_path(path: str) -> str:
    """Percent-decode a path as aiohttp's request.path does: runs of %XX decoded as UTF-8 ("%2F" too)."""
    return _PCT_RUN.sub(_decode_run, path) if "%" in path else path


class Request:
    """One request's head and its body, filled by the connection's parser.

    The body arrives through `read(limit)` (whole) or `iter_chunks(size)` (as it comes); reading it is what
    lets the connection read on (see ServerLimits.read_buffer_bytes).
    """

    __slots__ = ("method", "raw_path", "path", "query_string", "version", "raw_headers", "headers", "content_length",
                 "chunked", "body_exists", "keep_alive", "remote", "expect_continue", "_conn", "_resp",
                 "_body", "_size", "_done", "_error", "_waiter", "_cache", "_continued")

    scheme = "http"  # the listener speaks plain HTTP (TLS ends in front of it)

    def __init__(self, conn: HttpConnection, method: str, raw_path: str, path: str, query_string: str,
                 version: tuple[int, int], raw_headers: list[tuple[bytes, bytes]], content_length: int | None,
                 chunked: bool, keep_alive: bool, remote: str | None, expect_continue: bool):
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.path = path
        self.query_string = query_string
        self.version = version
        self.raw_headers = raw_headers
        self.headers = Headers(raw_headers)
        self.content_length = content_length
        self.chunked = chunked
        self.body_exists = chunked or (content_length is not None and content_length > 0)
        self.keep_alive = keep_alive
        self.remote = remote
        self.expect_continue = expect_continue
        self._resp: Responder | None = None
        self._body: deque[bytes] | None = None  # made by the first piece
        self._size = 0  # bytes in _body
        self._done = not self.body_exists  # the whole body has arrived
        self._error: Exception | None = None  # the body broke, or the client went away
        self._waiter: asyncio.Future[None] | None = None
        self._cache: bytes | None = None  # what read() returned
        self._continued = False

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_path} HTTP/{self.version[0]}.{self.version[1]}>"

    @property
    def query(self) -> MultiDict[str]:
        """The query's parameters, decoded (built on each call: the daemon's own endpoints only)."""
        return MultiDict(parse_qsl(self.query_string, keep_blank_values=True))

    @property
    def transport_closed(self) -> bool:
        """The client went away (or the connection is closing for good: nothing more can be said on it)."""
        c = self._conn
        return c.closed or c.lingering

    def close(self) -> None:
        """Close the connection now: no answer, or a cut one. The handler calling it is not cancelled for it."""
        r = self._resp
        if r is not None:
            r._finished = True
        self._conn.close_now()

    async def send_continue(self) -> None:
        """Write "HTTP/1.1 100 Continue" once, if the client asked for it and no answer has started."""
        if not self.expect_continue or self._continued:
            return
        r = self._resp
        if r is None or r.started:
            return
        self._continued = True
        await r._wait_turn()
        self._conn.write(CONTINUE)

    # -- the body --------------------------------------------------------------------------------------------
    async def read(self, limit: int) -> bytes:
        """The whole body (b"" when there is none); BodyTooLarge(limit) as soon as it is known to run past."""
        if self._cache is not None:
            return self._cache
        cl = self.content_length
        if cl is not None and cl > limit:
            raise BodyTooLarge(limit)
        parts: list[bytes] = []
        got = 0
        while True:
            b = self._body
            if b:
                got += self._size
                parts.extend(b)
                b.clear()
                self._size = 0
                self._conn.body_drained(self)
                if got > limit:
                    raise BodyTooLarge(limit)
            if self._done:
                break
            if self._error is not None:
                raise self._error
            await self._wait()
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._cache = data
        return data

    async def iter_chunks(self, size: int) -> AsyncIterator[bytes]:
        """The body as it comes, in pieces of at most `size` bytes."""
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        while True:
            if self._body:
                yield self._take(size)
                continue
            if self._done:
                return
            if self._error is not None:
                raise self._error
            await self._wait()

    def _take(self, size: int) -> bytes:
        b = self._body
        assert b is not None
        first = b[0]
        if len(first) >= size:
            if len(first) == size:
                b.popleft()
            else:
                b[0] = first[size:]
                first = first[:size]
            out = first
        else:
            parts = []
            n = 0
            while b and n < size:
                p = b[0]
                room = size - n
                if len(p) <= room:
                    b.popleft()
                else:
                    b[0] = p[room:]
                    p = p[:room]
                parts.append(p)
                n += len(p)
            out = b"".join(parts)
        self._size -= len(out)
        self._conn.body_drained(self)
        return out

    async def _wait(self) -> None:
        w = self._waiter = self._conn.loop.create_future()
        try:
            await w
        finally:
            self._waiter = None

    # -- fed by the connection -------------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._error is None and not self._done:
            self._error = exc
        self._wake()


# -- the answer ----------------------------------------------------------------------------------------------
class Responder:
    """The one answer to one request. Pipelined answers go out in request order: `send()` out of turn is
    held (whole) until the answers before it are out; `start()` and `send_continue()` wait for their turn.

    Framing is the server's: handler headers must not carry Content-Length or Transfer-Encoding (ValueError);
    a `Connection: close` among them closes the connection after the answer (Connection and Keep-Alive
    themselves are the server's to write). Header names are the handler's tokens as given; a value holding
    CR or LF is refused (ValueError), so no answer can be split.
    """

    __slots__ = ("started", "status", "_conn", "_req", "_task", "_finished", "_out", "_turn", "_keep", "_chunked",
                 "_left", "_no_body")

    def __init__(self, conn: HttpConnection, req: Request | None):
        self._conn = conn
        self._req = req
        self.started = False
        self.status = 0
        self._task: asyncio.Task | None = None
        self._finished = False  # the whole answer is made (held in _out when out of turn)
        self._out: bytes | None = None
        self._turn: asyncio.Future[None] | None = None
        self._keep = False  # the connection carries another request after this answer
        self._chunked = False
        self._left = -1  # bytes a streamed answer still owes its Content-Length (-1: not counted)
        self._no_body = False  # HEAD, 1xx, 204, 304: the answer has a head only

    def __repr__(self) -> str:
        return f"<Responder {self.status or 'unstarted'} for {self._req!r}>"

    async def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        """A whole answer: head and body in one write (Content-Length added; HEAD gets the head only). It is
        handed to the transport and not waited on: a slow reader holds the bytes, not the handler."""
        self.send_now(status, headers, body)

    def send_now(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"", lines: bytes = b"") -> None:
        """`send`, for a caller that is not a coroutine (or saves making one): it never waits. `lines`:
        header lines the caller made itself, whole ("Name: value\r\n" each, never framing headers),
        written after `headers` as they are (the request path's own headers, formatted at once)."""
        if self.started:
            raise RuntimeError(f"{self!r} already answered")
        if not 200 <= status <= 999:
            raise ValueError(f"a final answer's status must be 200-999, got {status}")
        req = self._req
        conn = self._conn
        assert req is not None
        parts = [STATUS_LINES.get(status) or status_line(status), conn.server.date_line()]
        keep = self._headers(parts, headers, req)
        if lines:
            parts.append(lines)
        self.started = True
        self.status = status
        no_body = self._no_body = req.method == "HEAD" or status == 204 or status == 304
        if status != 204 and status != 304:  # HEAD too: the length its GET would have
            n = len(body)
            parts.append(_CL_LINES[n] if n < _CL_CACHED else b"Content-Length: %d\r\n" % n)
        if not keep:
            parts.append(_CLOSE)
        elif req.version < (1, 1):
            parts.append(_KEEP_ALIVE_10)
        self._keep = keep
        self._finished = True
        q = conn.queue
        mine = bool(q) and q[0] is self
        if not body or no_body:
            parts.append(b"\r\n")
        elif len(body) <= _BIG_BODY or not mine:
            parts += (b"\r\n", body)
        else:  # no copy of a big body behind its head
            parts.append(b"\r\n")
            conn.write(b"".join(parts))
            conn.write(body)
            conn.answered(self)
            return
        if mine:
            conn.write(b"".join(parts))
            conn.answered(self)
        else:
            self._out = b"".join(parts)  # written once the answers before it are out

    async def start(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None,
                    lines: bytes = b"") -> None:
        """A streamed answer: its head now (after the answers before it). Chunked when `content_length` is None
        on HTTP/1.1; delimited by closing the connection on HTTP/1.0. `lines` as for `send_now`."""
        req = self._check(status)
        if content_length is not None and content_length < 0:
            raise ValueError(f"content_length must not be negative, got {content_length}")
        await self._wait_turn()
        if self.started:
            raise RuntimeError(f"{self!r} already answered")
        parts = [status_line(status), self._conn.server.date_line()]
        keep = self._headers(parts, headers, req)  # (raises before anything is started)
        if lines:
            parts.append(lines)
        self.started = True
        self.status = status
        self._no_body = req.method == "HEAD" or status == 204 or status == 304
        if self._no_body:
            if content_length is not None and req.method == "HEAD" and status != 204 and status != 304:
                parts.append(b"Content-Length: %d\r\n" % content_length)
        elif content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % content_length)
            self._left = content_length
        elif req.version >= (1, 1):
            parts.append(_CHUNKED)
            self._chunked = True
        else:
            keep = False  # HTTP/1.0 knows no chunks: the end of the connection ends the body
        self._keep = self._conn_header(parts, keep, req)
        parts.append(b"\r\n")
        self._conn.write(b"".join(parts))

    async def write(self, data: bytes, timeout_s: float | None = None) -> None:
        """A piece of a streamed answer; waits while the client's socket buffer is full (TimeoutError when
        the client takes nothing for `timeout_s`)."""
        if not self.started or self._finished:
            raise RuntimeError("write() needs a started, unfinished answer (call start() first)")
        conn = self._conn
        if not data or self._no_body:
            if conn.closed or conn.lingering:
                raise ConnectionResetError("the client closed the connection")
            return
        if self._chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            left = self._left
            if left >= 0:
                if len(data) > left:
                    raise RuntimeError(f"answer body over its Content-Length ({len(data)} bytes, {left} left)")
                self._left = left - len(data)
            conn.write(data)
        await conn.drain(timeout_s)

    async def end(self) -> None:
        """The end of a streamed answer: its last chunk; then keep-alive or close, as negotiated. An answer
        shorter than its Content-Length is cut: the connection closes."""
        if not self.started:
            raise RuntimeError("end() needs a started answer (call start() first)")
        if self._finished:
            return
        self._finished = True
        if self._chunked:
            self._conn.write(LAST_CHUNK)
        elif self._left > 0:
            self._keep = False  # the client waits for bytes that will not come: only closing tells it
        self._conn.answered(self)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _check(self, status: int) -> Request:
        if self.started:
            raise RuntimeError(f"{self!r} already answered")
        if not 200 <= status <= 999:
            raise ValueError(f"a final answer's status must be 200-999, got {status}")
        req = self._req
        assert req is not None
        return req

    def _headers(self, parts: list[bytes], headers: list[tuple[bytes, bytes]], req: Request) -> bool:
        """Append the handler's header lines; whether the connection may carry another request after."""
        conn = self._conn
        # a body not all read when the answer starts: the client may still be sending it (or waiting for
        # 100 Continue): only closing keeps the next request from starting inside it
        keep = req.keep_alive and req._done and not conn.closing
        for k, v in headers:
            if len(k) in _FRAMING_LENS:
                keep = _framing_header(k, v, keep)
                lk = k.lower()
                if lk == b"connection" or lk == b"keep-alive":
                    continue
            if b"\n" in v or b"\r" in v:
                raise ValueError(f"header {k!r} holds a line break")
            parts += (k, b": ", v, b"\r\n")
        return keep

    @staticmethod
    def _conn_header(parts: list[bytes], keep: bool, req: Request) -> bool:
        if not keep:
            parts.append(_CLOSE)
        elif req.version < (1, 1):
            parts.append(_KEEP_ALIVE_10)
        return keep

    def _my_turn(self) -> bool:
        q = self._conn.queue
        return bool(q) and q[0] is self

    async def _wait_turn(self) -> None:
        conn = self._conn
        q = conn.queue
        while q and q[0] is not self and not conn.closed:
            w = self._turn = conn.loop.create_future()
            try:
                await w
            finally:
                self._turn = None
        if conn.closed or conn.lingering:
            raise ConnectionResetError("the client closed the connection")
