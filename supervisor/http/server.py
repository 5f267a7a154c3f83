"""The front end's HTTP/1.1 listener: one asyncio protocol per connection over httptools (llhttp, no leniency
flags), each request handed to the handler as a task of its own with its `Request` and `Responder` (wire.py).

llhttp refuses bad framing by itself: a second Content-Length (even an equal one), a Content-Length that is
not digits or overflows, Content-Length with Transfer-Encoding, a Transfer-Encoding whose last coding is not
chunked, obs-fold, bare CR or LF line ends, NUL and other controls in the head, unknown methods, bad targets
and versions, bad chunk sizes. This module adds what llhttp does not check (aiohttp did, or should have):
the request line and header field limits (414/431) and the header count (431), a second Host or
Transfer-Encoding header, no Host on HTTP/1.1, any Transfer-Encoding but a lone `chunked` (400, as aiohttp;
nginx says 501), Transfer-Encoding on HTTP/1.0, protocols llhttp also parses (RTSP/x.y, ICE/x.y), HTTP/2.0 (400) and
HTTP/0.9 (closed with no answer), and a Content-Length over max_body_bytes (413 before the body is read).
A head has a deadline (slowloris), an idle kept-alive connection a timeout, a body flow control, and
pipelined requests are answered in order. Upgrade is never taken (no 101): such a request, its body and the
requests after it are plain HTTP/1.1; CONNECT's handler runs, and its connection closes after the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate

import httptools
import structlog

from .wire import (
    BodyTooLarge,
    MalformedBody,
    Request,
    Responder,
    ServerLimits,
    error_answer,
    error_body,
    status_line,
    unquote_path,
)

__all__ = ["BodyTooLarge", "HttpConnection", "HttpServer", "MalformedBody", "Request", "Responder",
           "ServerLimits"]

log = structlog.get_logger("supervisor.http.server")

Handler = Callable[[Request, Responder], Awaitable[None]]
OnError = Callable[[int, "str | None"], None]

_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE")}
_BODY, _PIPELINE = 1, 2  # why reading is paused: unread body, too many unanswered requests
_HTTP_TOKEN = b" HTTP/"
_WATCHED_LENS = frozenset((4, 6, 14, 17))  # host, expect, content-length, transfer-encoding: looked at closer
_time = time.time


class _Refusal(Exception):
    """Raised inside a parser callback: the HTTP layer refuses the request (`status` 0: closed, no answer)."""

    def __init__(self, status: int, etype: str, detail: str):
        self.status = status
        self.etype = etype
        self.detail = detail
        super().__init__(detail)


class _Stop(Exception):
    """Raised inside a parser callback: the server is closing, this connection takes no new request."""


def _llhttp_detail(exc: httptools.HttpParserError) -> str:
    msg = str(exc)
    if msg.startswith("Pause on PRI"):
        return "HTTP/2 connection preface (this listener speaks HTTP/1.1)"
    return msg


def _split_target(raw: str, url: bytes) -> tuple[str, str]:
    """(path, query) of a request target: origin-form "/a?b", absolute-form "http://h/a?b", "*", or the
    authority-form of CONNECT (path "")."""
    if raw[0] == "/":
        if "#" in raw:
            raw = raw[:raw.index("#")]
        q = raw.find("?")
        if q < 0:
            return unquote_path(raw), ""
        return unquote_path(raw[:q]), raw[q + 1:]
    if raw == "*":
        return "*", ""
    try:
        u = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return "", ""  # authority-form (host:port)
    path = u.path.decode("latin-1") if u.path else "/"
    return unquote_path(path), u.query.decode("latin-1") if u.query else ""


class _AfterUpgrade:
    """The callbacks of the parser that takes over after an ignored Upgrade: the connection's own, except
    while the head that restarts the upgraded request's body framing is replayed into it."""

    __slots__ = ("conn", "replay")

    def __init__(self, conn: HttpConnection):
        self.conn = conn
        self.replay = True

    def on_message_begin(self) -> None:
        if not self.replay:
            self.conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.replay:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.replay:
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.replay:
            self.replay = False
        else:
            self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


class _Answering:
    """The answering side of a connection, mixed into HttpConnection (whose slots hold the state): the queue
    of Responders in request order, the handler tasks, how the connection ends (closed, or half-closed while
    what the client still sends is dropped), and its one timer (head deadline, keep-alive, linger)."""

    __slots__ = ()

    # -- the handler's task ----------------------------------------------------------------------------------
    async def _run(self, req: Request, resp: Responder) -> None:
        """The handler's task: what it leaves unanswered, or fails with, is answered (or cut) here."""
        try:
            await self._handler(req, resp)
        except asyncio.CancelledError:
            if not resp._finished and not self.closed:
                self.close_now()  # cancelled by someone else than a leaving client: nothing will answer
            raise
        except Exception as exc:  # the top of the handler's task: anything it lets through is logged here
            self._handler_failed(req, resp, exc)
        else:
            if not resp._finished and not self.closed and not self.lingering:
                log.error("http_handler_unanswered", method=req.method, path=req.path, started=resp.started)
                self._handler_failed(req, resp, None)

    def _handler_failed(self, req: Request, resp: Responder, exc: Exception | None) -> None:
        gone = self.closed or self.lingering
        if gone and (exc is None or isinstance(exc, ConnectionError)):
            return  # the client left under it
        if resp._finished:  # failed after its whole answer: the connection is fine
            log.error("http_handler_failed", method=req.method, path=req.path, answered=True, exc_info=exc)
            return
        known = isinstance(exc, MalformedBody | BodyTooLarge)
        if exc is not None and (resp.started or not known):
            log.error("http_handler_failed", method=req.method, path=req.path, exc_info=exc)
        if gone:
            return
        if resp.started:
            self.close_now()  # an answer cut short: only closing tells the client
            return
        if known:
            status, etype = (400, "bad_request") if isinstance(exc, MalformedBody) else (413, "payload_too_large")
            data = error_answer(status, etype, f"malformed HTTP request: {exc}", self.server.date_line())
        else:
            status, etype = 500, None
            body = error_body("internal_error", "internal error in gpu-supervisor")
            data = b"".join((status_line(500), self.server.date_line(), b"Content-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body), body))
        self.server.count_error(status, etype)
        self._answer_for(resp, status, data)

    def _answer_for(self, resp: Responder, status: int, data: bytes) -> None:
        """An answer the server makes for a handler that made none (it failed), closing the connection."""
        resp.started = resp._finished = True
        resp.status = status
        resp._keep = False
        if self.queue and self.queue[0] is resp:
            self.write(data)
            self._advance()
        else:
            resp._out = data

    # -- answers in order ------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed or self.lingering:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)  # type: ignore[union-attr]

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait while the client's socket buffer is full (TimeoutError past `timeout_s` of waiting). A timer
        only while it waits: a write that does not block, as most stream chunks, arms none."""
        if self._write_paused and not self.closed:
            w = self._drain_waiter
            if w is None or w.done():
                w = self._drain_waiter = self.loop.create_future()
            if timeout_s is None:
                await w
            else:
                async with asyncio.timeout(timeout_s):
                    await w
        if self.closed or self.lingering:
            raise ConnectionResetError("the client closed the connection")

    def answered(self, resp: Responder) -> None:
        """`resp`, first in the queue, made its whole answer (and wrote it)."""
        q = self.queue
        if len(q) != 1 or not resp._keep or self._paused or self._in_head or self.closing or self.closed:
            self._advance()
            return
        q.popleft()  # the usual case: nothing behind it, kept alive, idle from now
        req = resp._req
        if req is not None:
            req._resp = None  # (each referred to the other: a cycle left to the GC on every request)
        self._idle = True
        when = self._deadline = self.loop.time() + self._idle_s
        if self._timer is None or when < self._timer_at:
            self._arm(when)
        if self._transport.get_write_buffer_size():  # type: ignore[union-attr]
            self._watch_send()

    def _watch_send(self) -> None:
        """Answer bytes wait in the transport for a client that is not reading: it must take some every
        send_timeout_s, else the connection is aborted (nginx's send_timeout). A closing connection flushes
        with no deadline of its own, so this is what bounds what a client that reads nothing holds."""
        t = self._transport
        if self._send_watch is None and t is not None:
            left = t.get_write_buffer_size()
            if left:
                self._send_watch = self.loop.call_later(self._send_s, self._check_send, left)

    def _check_send(self, before: int) -> None:
        self._send_watch = None
        t = self._transport  # (connection_lost cancels this check: the transport is live)
        assert t is not None
        left = t.get_write_buffer_size()
        if left >= before:  # nothing taken for send_timeout_s
            log.info("client_not_reading", remote=self._remote, unsent_bytes=left, send_timeout_s=self._send_s)
            self.abort()
        elif left:
            self._send_watch = self.loop.call_later(self._send_s, self._check_send, left)

    def _advance(self) -> None:
        """Pop the finished answers at the head of the queue (writing those held), then let the next one go."""
        q = self.queue
        while q:
            r = q[0]
            if not r._finished:
                w = r._turn
                if w is not None and not w.done():
                    w.set_result(None)
                break
            q.popleft()
            req = r._req
            if req is not None:
                req._resp = None  # (each referred to the other: a cycle left to the GC on every request)
            out = r._out
            if out is not None:
                r._out = None
                if not self.closed and not self.lingering:
                    self._transport.write(out)  # type: ignore[union-attr]
            if self._pauser is not None and self._pauser is r._req:
                self._pauser = None
                self._resume(_BODY)
            if not r._keep:
                self._end(r)
                self._watch_send()
                return
        if self._paused & _PIPELINE and len(q) < self._lim_pipe:
            self._resume(_PIPELINE)
        if not q and not self.closed:
            if self.closing:
                self.close_now()
            elif self._in_head:  # the next head is on its way: due from now
                self._idle = False
                self._arm(self.loop.time() + self._head_s)
            else:
                self._idle = True
                self._arm(self.loop.time() + self._idle_s)
            self._watch_send()

    def _final(self, data: bytes) -> None:
        """The HTTP layer's own last answer on this connection (b"": none), after the answers before it."""
        r = Responder(self, None)
        r.started = r._finished = True
        r._out = data or None
        self.queue.append(r)
        if len(self.queue) == 1:
            self._advance()

    # -- the end of a connection -----------------------------------------------------------------------------
    def _end(self, last: Responder) -> None:
        """`last` was the connection's last answer: requests parsed after it go unanswered (their handlers
        are cancelled; the close tells their client), then close, or linger while the client may send."""
        more = bool(self.queue)
        for r in self.queue:
            r._finished = True  # (no answer will be written for it)
            t = r._task
            if t is not None and not t.done():
                t.cancel()
        self.queue.clear()
        req = last._req
        if self.closed:
            return
        if req is not None and req._done and not more and not self._in_head and not self._discard:
            self.close_now()
        else:
            self._linger()

    def _linger(self) -> None:
        """Half-close after the last answer and drop what the client still sends (a body it was uploading)
        until it closes or linger_s passes: closing at once with unread bytes would reset the connection,
        and a reset can destroy the answer before the client reads it."""
        self._discard = True
        self.lingering = True
        t = self._transport
        assert t is not None
        if self._paused:
            self._paused = 0
            t.resume_reading()
        if t.can_write_eof():
            t.write_eof()
            self._idle = False
            self._arm(self.loop.time() + self.server.limits.linger_s)
        else:
            self.close_now()

    def close_now(self) -> None:
        if not self.closed:
            self.closed = True
            self._discard = True
            if self._transport is not None:
                self._transport.close()
                self._watch_send()

    def abort(self) -> None:
        self.closed = True
        self._discard = True
        if self._transport is not None:
            self._transport.abort()

    def shutdown(self) -> None:
        """The server is closing: no new request; close now unless answers are still owed."""
        self.closing = True
        if not self.queue:
            self.close_now()

    # -- the one timer ---------------------------------------------------------------------------------------
    def _arm(self, when: float) -> None:
        """Set the deadline; the timer is re-armed only when it would fire too late (a later deadline is
        found when it fires), so a request costs no timer of its own."""
        self._deadline = when
        h = self._timer
        if h is None or when < self._timer_at:
            if h is not None:
                h.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        when = self._deadline
        if when is None or self.closed:
            return
        if self.loop.time() < when:
            self._arm(when)
            return
        self._deadline = None
        if self.lingering:
            self.abort()
        elif self._in_head and not self.queue:  # part of a head came, not all of it in time
            self.server.count_error(408, None)
            self._final(error_answer(408, "request_timeout",
                                     f"the request head did not arrive within {self._head_s:g} s",
                                     self.server.date_line()))
        elif not self.queue:
            self.close_now()  # idle past keepalive_timeout_s, or no request at all within header_timeout_s


class HttpConnection(_Answering, asyncio.Protocol):
    """One client connection: one llhttp parser and the checks it does not make, the requests parsed and not
    yet answered (`queue`, in order; answered through _Answering), read and write flow control, and one
    lazily re-armed timer for the head deadline, the keep-alive timeout and the linger.

    `closed`: the transport is closed or closing (by either side); `closing`: the server is shutting down
    (no new request); `lingering`: the last answer is out and what the client still sends is discarded.
    """

    __slots__ = (
        "server", "loop", "queue", "closed", "closing", "lingering", "_transport", "_parser", "_handler", "_remote",
        "_lim_line", "_lim_url", "_lim_field", "_lim_headers", "_lim_body", "_lim_buf", "_lim_pipe", "_head_s",
        "_idle_s", "_url", "_headers", "_host", "_te", "_cl", "_expect", "_trailers", "_in_head", "_fresh",
        "_partial", "_line_buf", "_chunk", "_scan", "_receiving", "_eof_wanted", "_discard", "_paused", "_pauser",
        "_write_paused", "_drain_waiter", "_deadline", "_timer", "_timer_at", "_idle", "_send_s", "_send_watch",
    )

    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop):
        lim = server.limits
        self.server = server
        self.loop = loop
        self.queue: deque[Responder] = deque()
        self.closed = False
        self.closing = False
        self.lingering = False
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._handler = server.handler
        self._remote: str | None = None
        self._lim_line = lim.max_line_bytes
        # a target past this may make the line too long, depending on its method (llhttp's longest, UNSUBSCRIBE,
        # has 11 letters): "METHOD SP target SP HTTP/1.1"
        self._lim_url = lim.max_line_bytes - 32
        self._lim_field = lim.max_field_bytes - 2  # name + value, without ": "
        self._lim_headers = lim.max_headers
        self._lim_body = lim.max_body_bytes
        self._lim_buf = lim.read_buffer_bytes
        self._lim_pipe = lim.max_pipelined
        self._head_s = lim.header_timeout_s
        self._idle_s = lim.keepalive_timeout_s
        self._send_s = lim.send_timeout_s
        self._send_watch: asyncio.TimerHandle | None = None  # see _watch_send
        # the head being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._host = False
        self._te: bytes | None = None
        self._cl: int | None = None
        self._expect = False
        self._trailers = 0
        self._in_head = False  # from a message's first byte to the end of its head
        self._fresh = False  # the head began in the chunk being parsed
        self._partial = 0  # bytes of the unfinished head line (a lower bound), between chunks
        self._line_buf = b""  # the chunks of a head that spans chunks, up to its request line
        self._chunk = b""  # the chunk being parsed
        self._scan = 0  # where in _chunk the next request line can start, for the protocol check
        # the connection
        self._receiving: Request | None = None  # the request whose body is being parsed
        self._eof_wanted = False  # a request that closes the connection is complete: nothing more is read
        self._discard = False  # the parser is done with (an error, an upgrade, a close): bytes are dropped
        self._paused = 0
        self._pauser: Request | None = None  # the request whose unread body paused reading
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None  # head deadline or keep-alive expiry; None while requests are out
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle = False  # the deadline is the keep-alive one

    def __repr__(self) -> str:
        return f"<HttpConnection {self._remote} queue={len(self.queue)} paused={self._paused}>"

    @property
    def reading_paused(self) -> bool:
        """Reading is paused (unread body past read_buffer_bytes, or max_pipelined requests unanswered)."""
        return bool(self._paused)

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    # -- asyncio.Protocol ------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self.server._adopt(self)
        if self.server.closing:
            self.close_now()
            return
        self._arm(self.loop.time() + self._head_s)  # the first head is due from the start

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return
        while True:
            self._chunk = data
            self._scan = 0
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                v = exc.__context__
                if isinstance(v, _Refusal):
                    self._refused(v)
                elif isinstance(v, _Stop):
                    self._discard = True
                else:
                    raise
                return
            except httptools.HttpParserUpgrade as exc:
                rest = self._upgrade_ignored(data, exc.args[0])
                if not rest:
                    return
                data = rest  # plain HTTP/1.1 goes on, through a parser that never saw the Upgrade
                continue
            except httptools.HttpParserError as exc:
                if self._eof_wanted:  # bytes after a request that closes the connection: never read as HTTP
                    self._discard = True
                    return
                self._refused(_Refusal(400, "bad_request", _llhttp_detail(exc)))
                return
            finally:
                self._chunk = b""  # an idle connection holds no read buffer
            break
        if self._in_head:
            self._unfinished_head(data)

    def eof_received(self) -> bool | None:
        # the client closed its side: gone, as far as its handlers are concerned (aiohttp's reading too)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._discard = True
        self._deadline = None
        h = self._timer
        if h is not None:
            h.cancel()
            self._timer = None
        if self._send_watch is not None:
            self._send_watch.cancel()
            self._send_watch = None
        for r in self.queue:
            t = r._task
            if t is not None and not r._finished and not t.done():
                t.cancel()  # the client went away before its answer: the handler sees CancelledError
        self.queue.clear()
        req = self._receiving
        if req is not None:
            self._receiving = None
            req._fail(ConnectionResetError("the client closed the connection"))
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        self.server._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop()
        self._url = b""
        self._headers = []
        self._host = False
        self._te = None
        self._cl = None
        self._expect = False
        self._trailers = 0
        self._in_head = True
        self._fresh = True
        if self._idle:  # the first byte after an idle spell: now the head is due
            self._idle = False
            self._arm(self.loop.time() + self._head_s)

    def on_url(self, url: bytes) -> None:
        if self._url:
            url = self._url + url
        if len(url) > self._lim_url and len(self._parser.get_method()) + len(url) + 10 > self._lim_line:
            raise _Refusal(414, "bad_request", f"request line over {self._lim_line} bytes")
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        h = self._headers
        if len(h) >= self._lim_headers or len(name) + len(value) > self._lim_field or not self._in_head:
            self._odd_header(name, value)
            return
        if len(name) in _WATCHED_LENS:  # host, expect, content-length, transfer-encoding (any case)
            lk = name.lower()
            if lk == b"host":
                if self._host:
                    raise _Refusal(400, "bad_request", "duplicate Host header")
                self._host = True
            elif lk == b"content-length":
                self._cl = int(value)  # llhttp checked it is digits, without overflow, and the only one
            elif lk == b"transfer-encoding":
                if self._te is not None:
                    raise _Refusal(400, "bad_request", "duplicate Transfer-Encoding header")
                self._te = value
            elif lk == b"expect":  # (llhttp keeps a value's trailing whitespace: OWS, not part of it)
                self._expect = value.rstrip(b" \t").lower() == b"100-continue"
        h.append((name, value))

    def _odd_header(self, name: bytes, value: bytes) -> None:
        """A field past a limit, or a trailer of a chunked body (counted and bounded, not kept)."""
        if len(name) + len(value) > self._lim_field:
            raise _Refusal(431, "bad_request", f"header field {name[:40].decode('latin-1')!r} over "
                                               f"{self._lim_field + 2} bytes")
        n = len(self._headers)
        if not self._in_head:
            self._trailers += 1
            n += self._trailers - 1
        if n >= self._lim_headers:
            raise _Refusal(431, "bad_request", f"over {self._lim_headers} header fields")

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        url = self._url
        ver = p.get_http_version()
        version = _VERSIONS.get(ver)
        # the request line names HTTP after its target (the usual case: found where the last one ended)
        hay = self._chunk
        i = -1 if self._line_buf else hay.find(url, self._scan)
        if i >= 0 and hay.startswith(_HTTP_TOKEN, i + len(url)):
            self._scan = i + len(url)
        elif not self._http_token(url):  # no version at all, or RTSP/ICE (which llhttp also parses)
            if ver == "0.9":
                raise _Refusal(0, "bad_request", "HTTP/0.9 request line (no version)")
            raise _Refusal(400, "bad_request", "not an HTTP request line (HTTP/1.0 and HTTP/1.1 only)")
        if version is None:
            raise _Refusal(400, "bad_request", f"HTTP/{ver} is not served here (HTTP/1.0 and HTTP/1.1 only)")
        if not self._host and version == (1, 1):  # RFC 9112 3.2: MUST be refused
            raise _Refusal(400, "bad_request", "no Host header in an HTTP/1.1 request")
        chunked = False
        te = self._te
        if te is not None:
            if version != (1, 1):
                raise _Refusal(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
            if te.strip(b" \t").lower() != b"chunked":
                raise _Refusal(400, "bad_request", f"Transfer-Encoding {te.decode('latin-1')!r} (only a lone "
                                                   "chunked is accepted)")
            chunked = True
        cl = self._cl
        if cl is not None and cl > self._lim_body:
            raise _Refusal(413, "payload_too_large", f"Content-Length {cl} over the limit of {self._lim_body} bytes")
        mb = p.get_method()
        method = _METHODS.get(mb) or mb.decode("ascii")
        raw = url.decode("latin-1")
        if raw[0] == "/" and "?" not in raw and "%" not in raw and "#" not in raw:
            path, query = raw, ""
        else:
            path, query = _split_target(raw, url)
        req = Request(self, method, raw, path, query, version, self._headers, cl, chunked, p.should_keep_alive(),
                      self._remote, self._expect and version == (1, 1))
        resp = Responder(self, req)
        req._resp = resp
        q = self.queue
        q.append(resp)
        self._receiving = req
        self._deadline = None  # no clock while a request is out: its handler takes the time it takes
        self._idle = False
        if len(q) >= self._lim_pipe:
            self._pause(_PIPELINE)
        resp._task = self.loop.create_task(self._run(req, resp))

    def on_body(self, body: bytes) -> None:
        r = self._receiving
        assert r is not None
        b = r._body
        if b is None:
            b = r._body = deque()
        b.append(body)
        r._size += len(body)
        if r._size > self._lim_buf and not self._paused & _BODY:
            self._pauser = r
            self._pause(_BODY)
        w = r._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_message_complete(self) -> None:
        r = self._receiving
        if r is None:
            return
        if r.body_exists and r.method != "CONNECT" and self._parser.should_upgrade():
            return  # llhttp ends an Upgrade request at its head: its body comes after (see _upgrade_ignored)
        self._receiving = None
        r._done = True
        r._wake()
        if not r.keep_alive:
            self._eof_wanted = True

    def _upgrade_ignored(self, data: bytes, offset: int) -> bytes | None:
        """llhttp stopped after the head of a CONNECT or Upgrade request (at `offset` in `data`). CONNECT's
        bytes after its head are a tunnel's: dropped, and the connection closes after the answer. An Upgrade
        is not taken (RFC 9110 7.8 lets a server ignore it; only its handler could answer 101): the request
        and what follows it stay HTTP/1.1, parsed by a fresh parser that is first told the request's framing
        so its body reaches it. The bytes still to parse are returned."""
        req = self.queue[-1]._req if self.queue else None
        if req is None or req.method == "CONNECT" or not req.keep_alive and req._done:
            if req is not None:
                req.keep_alive = False
            self._discard = True
            return None
        relay = _AfterUpgrade(self)
        self._parser = httptools.HttpRequestParser(relay)
        if req._done:
            relay.replay = False
        else:
            framing = (b"Content-Length: %d\r\n" % req.content_length if req.content_length is not None
                       else b"Transfer-Encoding: chunked\r\n")
            if not req.keep_alive:
                framing += b"Connection: close\r\n"
            elif req.version < (1, 1):
                framing += b"Connection: keep-alive\r\n"
            self._parser.feed_data(b"POST / HTTP/%d.%d\r\n%b\r\n" % (*req.version, framing))
        return data[offset:]

    # -- checks llhttp does not make -------------------------------------------------------------------------
    def _http_token(self, url: bytes) -> bool:
        """Whether the request line names HTTP/x.y after its target (llhttp also takes RTSP/ and ICE/, and
        a line with no version at all, HTTP/0.9)."""
        hay = self._chunk
        start = self._scan
        base = 0
        if self._line_buf:  # the line began in earlier chunks
            base = len(self._line_buf)
            hay = self._line_buf + hay
            self._line_buf = b""
            start = 0
        n = len(url)
        i = hay.find(url, start)
        while i >= 0:
            if hay.startswith(_HTTP_TOKEN, i + n):
                self._scan = max(0, i + n - base)
                return True
            i = hay.find(url, i + 1)
        return False

    def _unfinished_head(self, data: bytes) -> None:
        """The chunk ended inside a head (a slow client, or a big head): llhttp holds an unfinished line
        itself, so bound it here; keep the request line for the protocol check; spot a bare HTTP/0.9 line."""
        i = data.rfind(b"\n")
        if self._fresh:  # the head began in this chunk, where is unknown: count from the next one
            self._fresh = False
            self._partial = 0
            self._line_buf = data
        else:
            self._partial = len(data) - i - 1 if i >= 0 else self._partial + len(data)
            if len(self._line_buf) <= self._lim_line + 16:
                self._line_buf += data
        if self._partial > self._lim_field + 4:
            if self._headers or b"\n" in self._line_buf:
                self._refused(_Refusal(431, "bad_request", f"header field over {self._lim_field + 2} bytes"))
            else:
                self._refused(_Refusal(414, "bad_request", f"request line over {self._lim_line} bytes"))
            return
        if not self._headers and self._url and data.endswith(b"\n"):
            buf = self._line_buf
            j = buf.rfind(b"\n", 0, len(buf) - 1)
            if buf[j + 1:].rstrip(b"\r\n") == self._parser.get_method() + b" " + self._url:
                # method SP target and the line ends: HTTP/0.9, which has no status line to answer with
                self._refused(_Refusal(0, "bad_request", "HTTP/0.9 request line (no version)"))

    # -- refusals --------------------------------------------------------------------------------------------
    def _refused(self, v: _Refusal) -> None:
        self._discard = True  # the parser is in error: nothing more is read as HTTP
        self._in_head = False
        req = self._receiving
        if req is not None:  # the body broke under a request its handler already has: it answers
            self._receiving = None
            req._fail(MalformedBody(v.detail))
            return
        status = v.status or 400
        self.server.count_error(status, v.etype)
        log.debug("http_refused", status=status, detail=v.detail, peer=self._remote, answered=bool(v.status))
        data = error_answer(status, v.etype, f"malformed HTTP request: {v.detail}", self.server.date_line()) \
            if v.status else b""
        self._final(data)

    # -- flow control ----------------------------------------------------------------------------------------
    def body_drained(self, req: Request) -> None:
        if self._pauser is req and req._size <= self._lim_buf >> 1:
            self._pauser = None
            self._resume(_BODY)

    def _pause(self, why: int) -> None:
        if not self._paused and not self.closed:
            self._transport.pause_reading()  # type: ignore[union-attr]
        self._paused |= why

    def _resume(self, why: int) -> None:
        if self._paused & why:
            self._paused &= ~why
            if not self._paused and not self.closed:
                self._transport.resume_reading()  # type: ignore[union-attr]


class HttpServer:
    """One listener. `handler(request, responder)` runs as a task per request and answers it exactly once;
    `on_error(status, etype)` counts each request the HTTP layer refuses itself (etype None for 408/500)."""

    def __init__(self, handler: Handler, limits: ServerLimits, on_error: OnError | None = None):
        self.handler = handler
        self.limits = limits
        self.on_error = on_error
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._date = b""
        self._date_until = 0.0
        self._all_gone: asyncio.Event | None = None

    async def start(self, host: str, port: int, backlog: int = 1024) -> list[tuple[str, int]]:
        """Listen on host:port (port 0: any free one); the addresses bound."""
        if self._server is not None:
            raise RuntimeError("HttpServer already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpConnection(self, loop), host, port, backlog=backlog,
                                                reuse_address=True)
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._server.sockets]

    async def close(self, grace_s: float) -> None:
        """Stop listening; close idle connections; let in-flight handlers finish and their answers go out
        within `grace_s`; then cancel what is left and close every connection."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.shutdown()
        tasks = self._handler_tasks()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        if self.connections and loop.time() < deadline:
            self._all_gone = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_gone.wait(), deadline - loop.time())
            except TimeoutError:
                pass
        late = self._handler_tasks()
        for t in late:
            t.cancel()
        if late:
            _, stuck = await asyncio.wait(late, timeout=5.0)
            if stuck:
                log.error("http_handlers_ignore_cancel", count=len(stuck))
        if self.connections:
            self._all_gone = asyncio.Event()
            for c in list(self.connections):
                c.abort()
            with contextlib.suppress(TimeoutError):  # connection_lost comes on the loop's next turn
                await asyncio.wait_for(self._all_gone.wait(), 1.0)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def _handler_tasks(self) -> list[asyncio.Task]:
        return [r._task for c in self.connections for r in c.queue if r._task is not None and not r._task.done()]

    # -- for the connections ---------------------------------------------------------------------------------
    def date_line(self) -> bytes:
        """The Date header line, formatted once a second."""
        now = _time()
        if now >= self._date_until:
            sec = int(now)
            self._date_until = sec + 1
            self._date = b"Date: %s\r\n" % formatdate(sec, usegmt=True).encode()
        return self._date

    def count_error(self, status: int, etype: str | None) -> None:
        if self.on_error is not None:
            self.on_error(status, etype)

    def _adopt(self, c: HttpConnection) -> None:
        self.connections.add(c)

    def _forget(self, c: HttpConnection) -> None:
        self.connections.discard(c)
        if not self.connections and self._all_gone is not None:
            self._all_gone.set()
