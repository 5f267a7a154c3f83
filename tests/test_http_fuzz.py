"""A fuzzer for the front end's HTTP/1.1 server (supervisor/http/server.py), driven by hypothesis over real sockets
on 127.0.0.1: valid requests built from parts, pipelined, mutated at the byte level and sent in pieces, each
piece read by the server before the next is sent (so incremental parsing is exercised on purpose).

Properties: whatever is sent, the server writes back only whole, well-formed answers (read by h11, a strict client)
with statuses a client may see, and ends every connection within its timeouts; valid input is answered exactly,
in order; the verdicts agree with h11's (an independent strict parser) except where this server's documented
choices differ (DIVERGENCES); and the server is left serving, with nothing leaked and no handler crash.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import re
import select
import socket
import struct
import termios
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import h11
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.http.server import (
    BodyTooLarge,
    HttpConnection,
    HttpServer,
    MalformedBody,
    Request,
    Responder,
    ServerLimits,
)
from tests.harness import read_to_eof, wait_until

R = TypeVar("R")
T = 20.0  # the failure bound of any one wait (each is over in milliseconds, or in a fuzz server's timeouts)


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# what a client may see from the HTTP layer (400 413 414 431 408) and the echo handler (100 200 408 400 413)
FINAL_STATUSES = frozenset((200, 400, 408, 413, 414, 431))
REFUSALS = frozenset((400, 413, 414, 431))


# -- the server under test, in a thread of its own ---------------------------------------------------------
class Echo:
    """The handler: answers 100 Continue when asked, reads the whole body (at most `max_body` bytes, and a body
    that stops coming for `body_timeout_s` gets 408), then answers 200 with what it saw (X-Method, and X-Echo:
    base64 JSON of method, target, path, query, version and body). Records any exception it did not expect."""

    def __init__(self, max_body: int, body_timeout_s: float):
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s
        self.unexpected: list[BaseException] = []

    async def __call__(self, request: Request, responder: Responder) -> None:
        try:
            await request.send_continue()
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    body = await request.read(self.max_body)
            except TimeoutError:
                await responder.send(408, [(b"Connection", b"close")])
                return
            seen = {"method": request.method, "target": request.raw_path, "path": request.path,
                    "query": request.query_string, "version": f"{request.version[0]}.{request.version[1]}",
                    "body": base64.b64encode(body).decode()}
            await responder.send(200, [(b"X-Method", request.method.encode()),
                                       (b"X-Echo", base64.b64encode(json.dumps(seen).encode()))], body)
        except (MalformedBody, BodyTooLarge, ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self.unexpected.append(exc)
            raise


def _queued(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


class Served:
    """An HttpServer with the Echo handler, run by a uvloop loop (as the daemon runs it) in a thread of its own,
    so that hypothesis drives it with plain blocking sockets. Records what the loop reports (a protocol callback
    that raised, a task exception nobody retrieved): none may happen."""

    def __init__(self, limits: ServerLimits, max_body: int, body_timeout_s: float):
        self.handler = Echo(max_body, body_timeout_s)
        self.server = HttpServer(self.handler, limits)
        self.loop_errors: list[str] = []
        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(lambda _, ctx: self.loop_errors.append(f"{ctx.get('message')}: "
                                                                               f"{ctx.get('exception')!r}"))
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.port = 0

    def __enter__(self) -> Served:
        self._thread.start()
        self.port = self.call(self.server.start("127.0.0.1", 0))[0][1]
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.close(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(T)
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run `coro` on the server's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(T + 5)

    def wait(self, pred: Callable[[], bool], what: str) -> None:
        """Wait on the loop's thread (where the server's state may be read) until `pred()` holds."""
        self.call(wait_until(pred, timeout=T, what=what, interval=0.001))

    def _conn(self, sock: socket.socket) -> HttpConnection | None:
        me = sock.getsockname()
        for c in self.server.connections:
            t = c.transport
            if t is not None and t.get_extra_info("peername") == me:
                return c
        return None

    def _consumed(self, sock: socket.socket) -> bool:
        """Every byte sent on `sock` reached the server's parser (or the server is done reading it as HTTP)."""
        c = self._conn(sock)
        if c is None:  # not accepted yet, or already gone: gone once the client sees the end (or an answer)
            p = select.poll()
            p.register(sock.fileno(), select.POLLIN)
            return bool(p.poll(0))
        if c.closed or c.lingering:
            return True
        if _queued(sock.fileno(), termios.TIOCOUTQ) or c.reading_paused:
            return False  # not all of it reached the server's socket, or it waits there for the handlers
        return _queued(c.transport.get_extra_info("socket").fileno(), termios.FIONREAD) == 0

    def consumed(self, sock: socket.socket) -> None:
        self.wait(lambda: self._consumed(sock), "the server to read every byte sent")

    def _settled(self, sock: socket.socket) -> bool:
        """Nothing more will happen on `sock`'s connection without more bytes: all sent is read, every handler is
        done except one that waits for body bytes that have not come, and every answer made is written.
        (White-box: whether a handler waits for body bytes is the request's own future, `_waiter`.)"""
        if not self._consumed(sock):
            return False
        c = self._conn(sock)
        if c is None or c.closed or c.lingering:
            return True
        for r in c.queue:
            t = r._task
            if t is not None and not t.done():
                w = r._req._waiter if r._req is not None else None
                if w is None or w.done():
                    return False
        return c.transport.get_write_buffer_size() == 0

    def ended(self, sock: socket.socket) -> bool:
        """The server ended `sock`'s connection (closed it, or half-closed it after its last answer)."""
        async def ask() -> bool:
            c = self._conn(sock)
            return c is None or c.closed or c.lingering
        return self.call(ask())

    def settled(self, sock: socket.socket) -> None:
        self.wait(lambda: self._settled(sock), "the connection to settle")

    def check_after(self) -> None:
        """Property 4: a fresh request is answered, every connection goes once its client closes (nothing
        leaked), the handler saw no exception it did not expect and the loop reported nothing."""
        sock = connect(self.port)
        try:
            sock.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers, rest = parse_answers(read_to_eof(sock, T))
        finally:
            sock.close()
        assert [a.status for a in answers] == [200] and rest == b""
        assert answers[0].echo["path"] == "/after"
        self.wait(lambda: not self.server.connections, "every connection to close")
        assert self.handler.unexpected == []
        assert self.loop_errors == []


# -- the client ----------------------------------------------------------------------------------------------
def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=T)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def send_in_pieces(srv: Served, sock: socket.socket, data: bytes, cuts: list[int]) -> bool:
    """Send `data` in pieces, each read by the server before the next goes; False if the server closed first."""
    for piece in pieces(data, cuts):
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return False
        srv.consumed(sock)
    return True


def half_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # already reset by the server
        pass


# -- answers, read by h11 ------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    interim: list[int]  # the 1xx answers before it
    headers: dict[bytes, bytes]  # lower-cased names
    body: bytes

    @property
    def closes(self) -> bool:
        return b"close" in self.headers.get(b"connection", b"").lower()

    @property
    def echo(self) -> dict:
        return json.loads(base64.b64decode(self.headers[b"x-echo"]))


def _method_of(data: bytes) -> bytes:
    """HEAD when the next final answer is the echo of a HEAD (whose Content-Length is its GET's: no body)."""
    pos = 0
    while (end := data.find(b"\r\n\r\n", pos)) >= 0 and data.startswith(b"HTTP/1.1 1", pos):
        pos = end + 4
    end = data.find(b"\r\n\r\n", pos)
    return b"HEAD" if b"\r\nX-Method: HEAD\r\n" in data[pos:end + 2] else b"GET"


_ONLY_INTERIM = re.compile(rb"(?:HTTP/1\.1 1\d\d [^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n)+")


def parse_answers(data: bytes) -> tuple[list[Answer], bytes]:
    """The whole answers in `data`, all the server wrote on a connection, read by h11 as a client reads them
    (a malformed one fails the test), and the bytes after the last whole one (a partial answer)."""
    answers: list[Answer] = []
    while data:
        if _ONLY_INTERIM.fullmatch(data):  # a 100 Continue whose request's client left before its body: no answer
            break
        c = h11.Connection(h11.CLIENT)
        c.send(h11.Request(method=_method_of(data), target="/", headers=[("Host", "x")]))
        c.send(h11.EndOfMessage())
        c.receive_data(data)
        c.receive_data(b"")  # the connection ended (a body without a length ends with it)
        interim: list[int] = []
        resp: h11.Response | None = None
        body: list[bytes] = []
        try:
            while True:
                e = c.next_event()
                if isinstance(e, h11.InformationalResponse):
                    interim.append(e.status_code)
                elif isinstance(e, h11.Response):
                    resp = e
                elif isinstance(e, h11.Data):
                    body.append(bytes(e.data))
                elif isinstance(e, h11.EndOfMessage):
                    break
                else:
                    return answers, data  # NEED_DATA or ConnectionClosed: the bytes end inside an answer
        except h11.RemoteProtocolError as exc:
            raise AssertionError(f"malformed answer ({exc}): {data[:400]!r}") from None
        assert resp is not None and resp.http_version == b"1.1", data[:400]
        answers.append(Answer(resp.status_code, interim, {k: v for k, v in resp.headers}, b"".join(body)))
        data = c.trailing_data[0]
    return answers, b""


def check_answers(raw_answers: bytes) -> list[Answer]:
    """Property 1 on what came back: whole well-formed answers, statuses a client may see, none after a close."""
    answers, partial = parse_answers(raw_answers)
    assert partial == b"", f"a partial answer: {partial[:400]!r}"
    for i, a in enumerate(answers):
        assert a.status in FINAL_STATUSES, f"status {a.status}: {a}"
        assert all(s == 100 for s in a.interim), a
        if a.status != 200:
            assert a.closes, f"an error answer that keeps the connection: {a}"
        if a.closes:
            assert i == len(answers) - 1, f"answers after one that closes: {answers}"
    return answers


# -- valid requests, built from parts ------------------------------------------------------------------------
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE")
HOSTS = (b"x", b"example.com", b"127.0.0.1:8080", b"[::1]:80", b"a-b.example.org:443")
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
RESERVED_NAMES = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade",
                            b"keep-alive", b"te", b"trailer", b"http2-settings"))
VALUE_BYTES = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))  # VCHAR / obs-text


@dataclass
class Msg:
    """One valid request and what its handler must see."""

    method: str
    target: bytes
    path: str
    query: str
    version: str
    head: list[tuple[bytes, bytes]]  # header fields in order, as written (framing ones included)
    body: bytes
    wire_body: bytes  # the body as framed on the wire
    keep_alive: bool
    expect_100: bool
    ows: list[bytes]  # the whitespace before each field's value

    def encode(self) -> bytes:
        lines = [b"%s %s HTTP/%s" % (self.method.encode(), self.target, self.version.encode())]
        for (k, v), pad in zip(self.head, self.ows):
            lines.append(k + b":" + pad + v)
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.wire_body


def _cased(name: bytes, how: int) -> bytes:
    return (name, name.lower(), name.upper())[how]


@st.composite
def targets(draw, method: str) -> tuple[bytes, str, str]:
    """(target, the path the handler sees, its query) in origin, absolute or asterisk form."""
    if method == "OPTIONS" and draw(st.integers(0, 4)) == 0:
        return b"*", "*", ""
    text = draw(st.text(st.sampled_from("abcXYZ019-._~ %/?#é€\u00a0+=&;:@!$'()*,"), max_size=12))
    path = "/" + text
    target = quote(path, safe="/").encode()
    query = ""
    if draw(st.booleans()):
        query = quote(draw(st.text(st.sampled_from("ab01=&+%é/?:@"), max_size=10)), safe="=&+/?:@")
        target += b"?" + query.encode()
    if draw(st.integers(0, 3)) == 0:
        target = b"http://" + draw(st.sampled_from(HOSTS)) + target
    elif draw(st.integers(0, 5)) == 0:
        target += b"#" + quote(draw(st.text(st.sampled_from("ab1/?"), max_size=4)), safe="/?").encode()
    return target, path, query


@st.composite
def chunked(draw, body: bytes) -> bytes:
    """`body` as chunks of drawn sizes (hex in either case, leading zeros), extensions and trailers."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=4))) | {0, len(body)})
    parts = [body[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    out = []
    for p in parts + [b""]:
        size = b"%0*x" % (draw(st.integers(1, 3)), len(p))
        if draw(st.booleans()):
            size = size.upper()
        ext = b""
        for _ in range(draw(st.integers(0, 2))):
            name = draw(st.text(st.sampled_from(TCHAR), min_size=1, max_size=5)).encode()
            value = draw(st.one_of(st.none(), st.text(st.sampled_from(TCHAR), min_size=1, max_size=5).map(str.encode),
                                   st.sampled_from([b'"q"', b'"a b;c"', b'""'])))
            ext += b";" + name + (b"=" + value if value is not None else b"")
        out.append(size + ext + b"\r\n" + p + (b"\r\n" if p else b""))
    trailers = draw(st.lists(st.tuples(st.sampled_from([b"X-Trailer", b"X-Sum", b"Expires"]),
                                       st.binary(max_size=6).map(lambda b: bytes(VALUE_BYTES[c % len(VALUE_BYTES)]
                                                                                 for c in b) or b"v")), max_size=2))
    return b"".join(out) + b"".join(k + b": " + v + b"\r\n" for k, v in trailers) + b"\r\n"


@st.composite
def messages(draw, may_close: bool = True, long_fields: bool = False, connect: bool = False) -> Msg:
    """A valid request: any method and target form, HTTP/1.1 or 1.0, Host, other fields, a body framed by
    Content-Length or chunks (with extensions and trailers), Connection close/keep-alive/Upgrade, Expect."""
    version = draw(st.sampled_from(["1.1", "1.1", "1.1", "1.0"]))
    if connect and draw(st.integers(0, 7)) == 0:
        host = draw(st.sampled_from([b"example.com:443", b"127.0.0.1:8080"]))
        return Msg("CONNECT", host, "", "", version, [(b"Host", host)], b"", b"", False, False, [b" "])
    method = draw(st.sampled_from(METHODS))
    target, path, query = draw(targets(method))
    head: list[tuple[bytes, bytes]] = []
    if version == "1.1" or draw(st.booleans()):
        head.append((_cased(b"Host", draw(st.integers(0, 2))), draw(st.sampled_from(HOSTS))))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.text(st.sampled_from(TCHAR), min_size=1, max_size=14)).encode()
        size = 300 if long_fields else 24
        value = draw(st.binary(max_size=size)).translate(bytes(VALUE_BYTES[i % len(VALUE_BYTES)] for i in range(256)))
        if len(value) > 2 and draw(st.booleans()):  # whitespace inside a value
            value = value[:1] + draw(st.sampled_from([b" ", b"\t", b"  "])) + value[1:]
        if name.lower() not in RESERVED_NAMES:
            head.append((name, value))
    body = draw(st.binary(max_size=draw(st.sampled_from([0, 8, 64, 200]))))
    frame = draw(st.sampled_from(["cl", "chunked"] if version == "1.1" else ["cl"])) if body or draw(
        st.booleans()) else "none"
    wire = body
    if frame == "cl":
        head.append((_cased(b"Content-Length", draw(st.integers(0, 2))), b"%d" % len(body)))
    elif frame == "chunked":
        head.append((_cased(b"Transfer-Encoding", draw(st.integers(0, 2))),
                     draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED"]))))
        wire = draw(chunked(body))
    keep = version == "1.1"
    conn = draw(st.sampled_from([None, b"keep-alive", b"close", b"upgrade"] if version == "1.1"
                                else [None, b"keep-alive", b"close"]))
    if conn == b"close" and not may_close:
        conn = None
    if conn is not None:
        head.append((_cased(b"Connection", draw(st.integers(0, 2))), b"Upgrade" if conn == b"upgrade" else conn))
        if conn == b"upgrade":
            head.append((b"Upgrade", draw(st.sampled_from([b"websocket", b"h2c", b"foo/2"]))))
        keep = conn != b"close" and (version == "1.1" or conn == b"keep-alive")
    if not may_close and not keep:
        head.append((b"Connection", b"keep-alive"))
        keep = True
    expect = version == "1.1" and draw(st.integers(0, 3)) == 0
    if expect:
        head.append((b"Expect", draw(st.sampled_from([b"100-continue", b"100-Continue"]))))
    head = draw(st.permutations(head))
    # OWS around a value: none, spaces, a tab before (a trailing tab on Transfer-Encoding: see DIVERGENCES)
    ows = [draw(st.sampled_from([b" ", b"", b"  ", b"\t", b" \t"])) for _ in head]
    head = [(k, v + draw(st.sampled_from([b"", b"", b" "]))) if k.lower() != b"host" else (k, v) for k, v in head]
    return Msg(method, target, path, query, version, head, body, wire, keep, expect, ows)


@st.composite
def pipelines(draw, may_close: bool = True, long_fields: bool = False) -> list[Msg]:
    """1-5 requests on one connection; the sequence ends at the first that closes it (those after it are sent
    all the same: nothing may answer them)."""
    n = draw(st.integers(1, 5))
    return [draw(messages(may_close=may_close, long_fields=long_fields, connect=i == n - 1)) for i in range(n)]


# -- mutations -------------------------------------------------------------------------------------------------
SPECIALS = (b"\r", b"\n", b"\0", b" ", b"\t", b":", b"\r\n", b"\x80", b"\xff", b"\xc3\xa9", b"\x7f", b"\x0b",
            b";", b",", b"-", b"0", b"\r\n\r\n", b"\r\n ", b"HTTP/1.1", b"Host: y\r\n", b"Content-Length: 1\r\n",
            b"Transfer-Encoding: chunked\r\n")


def _number_spans(data: bytes) -> list[tuple[int, int]]:
    """Where the Content-Length values and the chunk sizes are (any run of hex digits that begins a line or
    follows a colon)."""
    spans = []
    i = 0
    n = len(data)
    while i < n:
        if data[i] in b"0123456789abcdefABCDEF" and (i == 0 or data[i - 1] in b"\n: "):
            j = i
            while j < n and data[j] in b"0123456789abcdefABCDEF":
                j += 1
            spans.append((i, j))
            i = j
        i += 1
    return spans


@st.composite
def mutated(draw, data: bytes, most: int = 3) -> bytes:
    """`data` with up to `most` mutations: byte flips, inserted CR/LF/NUL/SP/HTAB/':'/bytes >= 0x80 (and a few
    longer pieces), deleted or replaced bytes, duplicated or dropped lines, truncation, changed numbers."""
    for _ in range(draw(st.integers(0, most))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "insert", "delete", "replace", "dup_line", "drop_line", "truncate",
                                   "number", "number"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
        elif op == "insert":
            data = data[:i] + draw(st.sampled_from(SPECIALS)) + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + draw(st.integers(1, 3)):]
        elif op == "replace":
            data = data[:i] + draw(st.sampled_from(SPECIALS)) + data[i + 1:]
        elif op in ("dup_line", "drop_line"):
            lines = data.split(b"\r\n")
            j = draw(st.integers(0, len(lines) - 1))
            lines[j:j + 1] = [lines[j]] * (2 if op == "dup_line" else 0)
            data = b"\r\n".join(lines)
        elif op == "truncate":
            data = data[:i]
        else:
            spans = _number_spans(data)
            if spans:
                a, b = draw(st.sampled_from(spans))
                v = int(data[a:b], 16) if b - a < 30 else 0
                new = draw(st.sampled_from([b"%d" % (v + 1), b"%d" % max(v - 1, 0), b"0", b"00" + data[a:b],
                                            b"%x" % (v + 16), b"-1", b"99999999999999999999", b"+" + data[a:b],
                                            data[a:b] + b" ", b"1_0", b"FFFFFFFF"]))
                data = data[:a] + new + data[b:]
    return data


cut_points = st.lists(st.integers(0, 4000), max_size=5)


# -- property 1: whatever comes in, whole well-formed answers, and the connection ends -----------------------
FUZZ_LIMITS = ServerLimits(max_line_bytes=160, max_field_bytes=160, max_headers=10, max_body_bytes=240,
                           read_buffer_bytes=32, max_pipelined=3, header_timeout_s=0.1, keepalive_timeout_s=0.05,
                           linger_s=0.1, send_timeout_s=5.0)


@st.composite
def hostile_streams(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=300))
    raw = b"".join(m.encode() for m in draw(pipelines(long_fields=kind == 1)))
    return draw(mutated(raw, most=4))


def test_whatever_is_sent_only_whole_answers_come_back_and_the_connection_ends():
    with Served(FUZZ_LIMITS, max_body=200, body_timeout_s=0.1) as srv:

        @fuzz(300)
        @given(raw=hostile_streams(), cuts=cut_points, leave=st.booleans())
        def prop(raw: bytes, cuts: list[int], leave: bool) -> None:
            sock = connect(srv.port)
            try:
                send_in_pieces(srv, sock, raw, cuts)
                if leave:  # the client leaves once all is read: what was answered by then must be whole
                    half_close(sock)
                check_answers(read_to_eof(sock, T))  # else the server's timeouts end it: read_to_eof bounds that
            finally:
                sock.close()

        prop()
        srv.check_after()


# -- property 2: valid input is answered exactly -------------------------------------------------------------
def test_valid_pipelines_are_answered_exactly_in_order():
    limits = ServerLimits(read_buffer_bytes=16, max_pipelined=2, header_timeout_s=T * 3, keepalive_timeout_s=T * 3)
    with Served(limits, max_body=1 << 20, body_timeout_s=T * 3) as srv:

        @fuzz(200)
        @given(msgs=pipelines(long_fields=True), cuts=cut_points)
        def prop(msgs: list[Msg], cuts: list[int]) -> None:
            upto = next((i + 1 for i, m in enumerate(msgs) if not m.keep_alive), len(msgs))
            answered = msgs[:upto]
            sock = connect(srv.port)
            try:
                send_in_pieces(srv, sock, b"".join(m.encode() for m in msgs), cuts)
                keep = answered[-1].keep_alive
                if keep:  # a kept connection: one more request proves it, then the client closes
                    sock.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answers = check_answers(read_to_eof(sock, T))
            finally:
                sock.close()
            assert len(answers) == len(answered) + keep, [a.status for a in answers]
            for m, a in zip(answered, answers):
                assert a.status == 200, a
                assert a.interim == ([100] if m.expect_100 else [])
                assert a.echo == {"method": m.method, "target": m.target.decode("latin-1"), "path": m.path,
                                  "query": m.query, "version": m.version,
                                  "body": base64.b64encode(m.body).decode()}, m.encode()
                assert a.body == (b"" if m.method == "HEAD" else m.body)
                assert a.closes == (not m.keep_alive), m.encode()
                if m.keep_alive and m.version == "1.0":
                    assert a.headers[b"connection"].lower() == b"keep-alive"
            if keep:
                assert answers[-1].status == 200 and answers[-1].echo["path"] == "/after"

        prop()
        srv.check_after()


# -- property 3: the verdicts agree with h11's, but where this server chose otherwise --------------------------
@dataclass
class H11Request:
    method: bytes
    target: bytes
    version: bytes
    body: bytes
    start: int  # where it begins in the bytes sent
    end: int


@dataclass
class H11View:
    """How h11, as a server, reads the bytes: the whole requests, then how it ends: "done" (all read; or the
    framing ends the connection: Connection: close, HTTP/1.0, CONNECT), "partial" (inside a request) or "error";
    `at`: where the request it did not finish begins."""

    requests: list[H11Request]
    end: str
    at: int
    error: str = ""


def _keeps_10(req: h11.Request) -> bool:
    tokens = {t.strip().lower() for k, v in req.headers if k == b"connection" for t in v.split(b",")}
    return b"keep-alive" in tokens and b"close" not in tokens


def h11_view(raw: bytes) -> H11View:
    """h11's reading of `raw`, fed a byte at a time (so where each request begins is known). HTTP/1.0 keep-alive,
    which h11 does not implement (it closes after any HTTP/1.0 request), is taken as RFC 9112 9.3 allows."""
    conn = h11.Connection(h11.SERVER)
    done: list[H11Request] = []
    start = 0
    head: h11.Request | None = None
    body: list[bytes] = []
    for i in range(len(raw)):
        conn.receive_data(raw[i:i + 1])
        while True:
            try:
                e = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return H11View(done, "error", start, str(exc))
            if e is h11.NEED_DATA:
                break
            if isinstance(e, h11.Request):
                head, body = e, []
            elif isinstance(e, h11.Data):
                body.append(bytes(e.data))
            elif isinstance(e, h11.EndOfMessage):
                assert head is not None
                done.append(H11Request(head.method, head.target, head.http_version, b"".join(body), start, i + 1))
                start = i + 1
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                if conn.our_state is h11.SWITCHED_PROTOCOL:  # a 2xx to CONNECT: a tunnel from here
                    return H11View(done, "done", start)
                conn.send(h11.EndOfMessage())
                if conn.their_state is h11.MUST_CLOSE:
                    if head.http_version != b"1.0" or not _keeps_10(head):
                        return H11View(done, "done", start)
                    conn = h11.Connection(h11.SERVER)
                else:
                    conn.start_next_cycle()
    partial = conn.their_state is not h11.IDLE or conn.trailing_data[0].strip(b"\r\n")
    return H11View(done, "partial" if partial else "done", start)


def ours_view(srv: Served, raw: bytes, cuts: list[int]) -> tuple[list[Answer], bool]:
    """How this server answers `raw` sent in pieces: every answer it makes before it waits for more bytes (the
    client then leaves: its leaving cancels only a handler still waiting for its body), and whether it had ended
    the connection by then."""
    sock = connect(srv.port)
    try:
        ended = True
        if send_in_pieces(srv, sock, raw, cuts):
            srv.settled(sock)
            ended = srv.ended(sock)
        half_close(sock)
        return check_answers(read_to_eof(sock, T)), ended
    finally:
        sock.close()


@dataclass
class Disagreement:
    kind: str  # ours_refuses (h11 took it whole), ours_accepts (h11 refused it), ours_waits, framing, ...
    segment: bytes  # the request they disagree on, from where it begins
    h11_error: str
    answer: Answer | None  # ours (None: no answer)

    @property
    def status(self) -> int | None:
        return self.answer.status if self.answer is not None else None

    @property
    def detail(self) -> str:
        """Why this server refused it, as its error answer says."""
        if self.answer is None or self.answer.status == 200:
            return ""
        return json.loads(self.answer.body)["error"]["message"].removeprefix("malformed HTTP request: ")

    def __str__(self) -> str:
        return (f"{self.kind}: ours {self.status} {self.detail!r}, h11 {self.h11_error or 'ok'}: "
                f"{self.segment[:300]!r}")


def _same_request(a: Answer, r: H11Request) -> bool:
    e = a.echo
    return (e["method"].encode(), e["target"].encode("latin-1"), e["version"].encode(),
            base64.b64decode(e["body"])) == (r.method, r.target, r.version, r.body)


def compare(raw: bytes, h: H11View, answers: list[Answer], ended: bool) -> Disagreement | None:
    """The first request on which this server and h11 disagree, if any."""
    k = len(h.requests)
    for i, a in enumerate(answers[:k]):
        r = h.requests[i]
        seg = raw[r.start:r.end]
        if a.status != 200:
            return Disagreement("ours_refuses", seg, "", a)
        if not _same_request(a, r):
            return Disagreement("framing", seg, f"h11 read {r}", a)
    if len(answers) < k:
        r = h.requests[len(answers)]
        return Disagreement("ours_refuses", raw[r.start:r.end], "", None)
    if len(answers) == k:
        if h.end == "error":  # ours: no answer (closed, as for HTTP/0.9; or waits)
            return Disagreement("ours_closes" if ended else "ours_waits", raw[h.at:], h.error, None)
        return None
    a = answers[k]
    if a.status == 200:
        return Disagreement("ours_accepts", raw[h.at:], h.error or h.end, a)
    if h.end == "error":
        return None  # both refuse
    # ours refused what h11 has not finished reading: would h11 refuse it once its head is whole?
    more = h11_view(raw + b"\r\n\r\n")
    if more.end == "error" and len(more.requests) == k:
        return None
    return Disagreement("ours_refuses_early", raw[h.at:], h.end, a)


def _head_lines(seg: bytes) -> list[bytes]:
    """The head `seg` begins with, in lines (split at CRLF only: a bare CR or LF stays inside its line)."""
    end = seg.find(b"\r\n\r\n")
    return seg[:end if end >= 0 else len(seg)].split(b"\r\n")


def _fields(seg: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in _head_lines(seg)[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            out.append((name.lower(), value.strip(b" \t")))
    return out


_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXT = re.compile(rb"(?:;%b(?:=(?:%b|%b))?)*" % (_TOKEN, _TOKEN, _QUOTED))


def _bws_in_chunk_ext(seg: bytes) -> bool:
    for m in re.finditer(rb"\r\n[0-9A-Fa-f]+([ \t]*;[^\r\n]*)\r\n", seg):
        if re.search(rb"[ \t]", re.sub(rb'"(?:[^"\\]|\\.)*"', b"", m.group(1))):
            return True
    return False


# the methods llhttp knows (HTTP and WebDAV, CalDAV, UPnP ...): any other is refused, as an unknown method
LLHTTP_METHODS = frozenset(b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
                           b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
                           b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK QUERY".split())


@dataclass(frozen=True)
class Divergence:
    """A class of input on which this server and h11 differ, decided: this server's behaviour is the agreed one.
    It explains a disagreement of one of `kinds` when this server's refusal says `detail` (a regex; "" for an
    answer) and `holds(segment)`, a check of the bytes themselves."""

    name: str
    kinds: tuple[str, ...]
    detail: str
    holds: Callable[[bytes], bool]
    why: str


DIVERGENCES: tuple[Divergence, ...] = (
    Divergence("unknown_method", ("ours_refuses", "ours_refuses_early"),
               r"^Invalid method|^Expected space after method",
               lambda seg: seg.split(b" ", 1)[0] not in LLHTTP_METHODS,
               "RFC 9110 9.1: a server SHOULD answer 501 to a method it does not know; llhttp refuses any method it "
               "does not know (400, at its first byte): h11 takes any token"),
    Divergence("bare_lf", ("ours_refuses", "ours_refuses_early"),
               r"Missing expected CR|Missing expected LF|^Invalid header field char|^Expected CRLF after version",
               lambda seg: re.search(rb"(?<!\r)\n", seg) is not None,
               "RFC 9112 2.2: a recipient MAY take a bare LF as a line end (h11 does); this server refuses a bare CR "
               "or LF, as documented"),
    Divergence("bare_cr", ("ours_refuses", "ours_refuses_early"), r"^Expected LF after|Missing expected LF",
               lambda seg: re.search(rb"\r(?!\n)", seg) is not None,
               "RFC 9112 2.2: a bare CR MUST be taken as invalid (or as SP); h11 takes one inside a chunk extension "
               "as part of it"),
    Divergence("obs_fold", ("ours_refuses", "ours_refuses_early"), r"^Unexpected whitespace after header value",
               lambda seg: re.search(rb"\r\n[ \t]", seg) is not None,
               "RFC 9112 5.2: a server MUST refuse obs-fold (400) or unfold it; h11 unfolds (in trailers too), this "
               "server refuses"),
    Divergence("control_in_field_value", ("ours_refuses", "ours_refuses_early"), r"^Invalid header value char",
               lambda seg: re.search(rb"\r\n[^\r\n:]+:[^\r\n]*[\x01-\x08\x0b-\x1f\x7f]", seg) is not None,
               "RFC 9110 5.5: a field value holding CTLs is invalid (a recipient MAY keep them, as h11 does); this "
               "server refuses"),
    Divergence("http_uri_without_host", ("ours_refuses", "ours_refuses_early"), r"url schema|url",
               lambda seg: re.match(rb"[A-Z]+ [A-Za-z][A-Za-z0-9+.-]*:(?!//[^/?# ])", seg) is not None,
               "RFC 9110 4.2.1: an http URI without a host MUST be refused as invalid; h11 takes any target"),
    Divergence("empty_line_before_request", ("ours_accepts", "ours_waits"), "",
               lambda seg: seg[:1] in (b"\r", b"\n"),
               "RFC 9112 2.2: a server SHOULD ignore an empty line before a request line (h11 refuses it); llhttp "
               "skips any CR and LF between requests (a bare one too): no framing is in question there, the "
               "request before has ended by its own framing and the one after is parsed strictly"),
    Divergence("http09_request_line", ("ours_closes",), "",
               lambda seg: re.fullmatch(rb"[^ \r\n]+ [^ \r\n]+", _head_lines(seg)[0].split(b"\n")[0]) is not None,
               "a request line with no version is HTTP/0.9, which has no status line to answer with: closed "
               "unanswered, as documented (h11 refuses it as an illegal request line)"),
    Divergence("repeated_content_length", ("ours_refuses", "ours_refuses_early"), r"^Duplicate Content-Length",
               lambda seg: sum(k == b"content-length" for k, _ in _fields(seg)) > 1,
               "RFC 9110 8.6: a recipient MAY refuse a repeated Content-Length (or take one of equal values, as h11 "
               "does); this server refuses it, as documented (a smuggling shape)"),
    Divergence("content_length_list", ("ours_refuses", "ours_refuses_early"), r"Content-Length",
               lambda seg: any(k == b"content-length" and b"," in v for k, v in _fields(seg)),
               "RFC 9110 8.6: a list of equal Content-Length values MAY be refused (h11 takes one); refused here"),
    Divergence("te_and_cl", ("ours_refuses", "ours_refuses_early"), r"Content-Length|Transfer-Encoding",
               lambda seg: {b"content-length", b"transfer-encoding"} <= {k for k, _ in _fields(seg)},
               "RFC 9112 6.1: a server MAY refuse a request with both Transfer-Encoding and Content-Length (h11 "
               "reads it by Transfer-Encoding); refused here, as documented (the classic smuggling shape)"),
    Divergence("te_on_http10", ("ours_refuses", "ours_refuses_early"), r"Transfer-Encoding in an HTTP/1.0",
               lambda seg: _head_lines(seg)[0].endswith(b" HTTP/1.0") and any(
                   k == b"transfer-encoding" for k, _ in _fields(seg)),
               "RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message MUST be taken as faulty framing (h11 reads "
               "it chunked); refused here, as documented"),
    Divergence("version_not_1x", ("ours_refuses", "ours_refuses_early"), r"is not served here|Invalid HTTP version",
               lambda seg: re.search(rb" HTTP/(?!1\.[01]$)\d\.\d$", _head_lines(seg)[0]) is not None,
               "HTTP/1.0 and HTTP/1.1 only, as documented (RFC 9110 2.5 lets a server refuse other versions; h11 "
               "takes any HTTP/d.d)"),
    Divergence("target_in_no_form", ("ours_refuses", "ours_refuses_early"), r"url",
               lambda seg: re.match(rb"[A-Z]+ (?![/*]|[A-Za-z][A-Za-z0-9+.-]*://)", seg) is not None,
               "RFC 9112 3.2: a target is origin-form (\"/...\"), absolute-form, authority-form (CONNECT) or \"*\"; "
               "h11 takes any run of visible characters"),
    Divergence("chunk_size_overflow", ("ours_refuses_early",), r"^Chunk size overflow",
               lambda seg: re.search(rb"\r\n0*[0-9A-Fa-f]{17,}", seg) is not None,
               "a chunk over 2^64 bytes can be no real body: refused at once (h11 waits for it)"),
    Divergence("spaces_in_request_line", ("ours_accepts",), "",
               lambda seg: re.match(rb"[^ \r\n]+  +[^ \r\n]+ +HTTP/|[^ \r\n]+ +[^ \r\n]+  +HTTP/", seg) is not None,
               "RFC 9112 3: a recipient MAY split a request line on runs of whitespace (llhttp takes more than one "
               "SP between its parts; h11 refuses): the line still ends at its CRLF, no framing is in question"),
    Divergence("space_after_chunk_size", ("ours_refuses", "ours_refuses_early"), r"^Invalid character in chunk size",
               lambda seg: re.search(rb"\r\n[0-9A-Fa-f]+[ \t]+\r\n", seg) is not None,
               "RFC 9112 7.1: chunk = chunk-size [ chunk-ext ] CRLF: whitespace after a size with no extension is "
               "no chunk line (h11 takes it)"),
    Divergence("bws_in_chunk_extension", ("ours_refuses", "ours_refuses_early"), r"^Invalid character in chunk",
               _bws_in_chunk_ext,
               "RFC 9112 7.1.1 allows BWS around a chunk extension's ';' and '=' (a sender MUST NOT make it, a "
               "recipient MUST parse it); llhttp refuses it, and its only way to take it (a 'dangerous leniency') "
               "also takes whitespace after a bare size: kept refused, a clear 400 only a non-conforming sender meets "
               "(h11 refuses some of these shapes and takes others)"),
    Divergence("chunk_extension_grammar", ("ours_refuses", "ours_refuses_early"), r"^Invalid character in chunk",
               lambda seg: any(not _CHUNK_EXT.fullmatch(m.group(1))
                               for m in re.finditer(rb"\r\n[0-9A-Fa-f]+(;[^\r\n]*)\r\n", seg)),
               "RFC 9112 7.1.1: a chunk extension is ;token[=token/quoted-string]: llhttp refuses other bytes there "
               "(h11 takes anything up to the line end)"),
    Divergence("absolute_target_other_scheme", ("ours_refuses", "ours_refuses_early"), r"url schema",
               lambda seg: (m := re.match(rb"[A-Z]+ ([A-Za-z][A-Za-z0-9+.-]*)://", seg)) is not None
               and m.group(1).lower() not in (b"http", b"https"),
               "an absolute-form target names http or https here (llhttp refuses any other scheme, and this origin "
               "serves no other); h11 takes any target"),
    Divergence("te_trailing_htab", ("ours_refuses", "ours_refuses_early"), r"Transfer-Encoding",
               lambda seg: re.search(rb"(?i)\r\ntransfer-encoding:[ \t]*chunked *\t[ \t]*\r\n", seg) is not None,
               "a tab after 'chunked' is OWS (RFC 9112 5.1) but llhttp takes it for another coding: refused, as the "
               "corpus's te_trailing_tab says (h11 strips it)"),
    Divergence("content_length_overflow", ("ours_refuses_early",), r"Content-Length",
               lambda seg: any(k == b"content-length" and len(v) > 18 for k, v in _fields(seg)),
               "a Content-Length past 2^63 can be no real body (RFC 9110 8.6: guard against overflow): refused at "
               "once; h11 waits for the body"),
)


def explained(d: Disagreement) -> Divergence | None:
    """The decided divergence that explains `d`, if one does."""
    for v in DIVERGENCES:
        if d.kind in v.kinds and re.search(v.detail, d.detail) and v.holds(d.segment):
            return v
    return None


@st.composite
def near_valid_streams(draw) -> bytes:
    """Pipelined valid requests with up to two mutations (often none): near enough to valid HTTP that the two
    parsers have something to disagree on."""
    return draw(mutated(b"".join(m.encode() for m in draw(pipelines())), most=2))


def test_verdicts_agree_with_h11_but_where_decided_otherwise():
    """Property 3: sent in pieces, the same bytes get the same verdicts here as from h11 (each request h11 reads
    whole is answered 200 with the same method, target, version and body; where h11 refuses, this server
    refuses too), except for the decided DIVERGENCES."""
    limits = ServerLimits(header_timeout_s=T * 3, keepalive_timeout_s=T * 3)
    seen: set[str] = set()
    with Served(limits, max_body=1 << 20, body_timeout_s=T * 3) as srv:

        @fuzz(400)
        @given(raw=near_valid_streams(), cuts=cut_points)
        def prop(raw: bytes, cuts: list[int]) -> None:
            d = compare(raw, h11_view(raw), *ours_view(srv, raw, cuts))
            if d is not None:
                v = explained(d)
                assert v is not None, f"an undecided disagreement with h11: {d}"
                seen.add(v.name)

        prop()
        srv.check_after()
    assert seen, "no divergence met: the mutations no longer reach what the two parsers differ on"
