"""A fuzzer for the daemon's worker side: hostile and buggy worker answers through the real daemon.

One real daemon (`python -m supervisor run`) in front of one scripted worker (tests/workers/script_worker.py),
which answers each request with exactly the bytes the request's body tells it to. Each hypothesis example is
one POST through the daemon (not retried: retry.max_attempts 1) whose body is the worker's script: a valid
answer built from parts (1xx interim answers, 204/304, Content-Length, chunked with extensions and trailers,
close-delimited, SSE, hop-by-hop and the daemon's own headers, X-Worker-Error: oom), or such an answer mutated
(byte flips, inserted CR/LF/NUL/SP/obs-text, conflicting Content-Length, CL+TE, truncation, bytes after the
answer, oversized heads), split at random points into separate writes, then the connection kept or closed. An
answer that stops short of its end stalls until the request's deadline (X-Request-Timeout). The breaker is set
never to open (a window the run never fills), so no example is decided by the ones before it.

Properties: whatever the worker sends, the client gets exactly one whole, well-formed HTTP/1.1 answer (read
by h11 from a raw socket), or, only where the answer had already started streaming, a cut one (an SSE stream
ends with `event: error`, any other body is cut by closing, so the client sees it incomplete); a valid answer
is relayed exactly; an invalid one becomes a typed daemon error, never a 500; a HEAD request gets the head alone
whatever body the worker sends; every request's handler finishes (its access line: a crashed one logs none); and
afterwards the daemon is whole: ready, nothing in flight or queued, metrics that parse, no handler crash in its log.

Where llhttp (the daemon's parser) reads a worker's answer more leniently than h11 and the daemon's reading is the
agreed one, `leniency` says so. UFUZZ_SCALE=10 multiplies the examples for a longer hunt by hand.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from supervisor.errors import ERROR_TYPES
from supervisor.http.framing import NOT_PASSED_ON
from tests.harness import PYTHON, SupervisorProcess, fast_config, read_to_eof, wait_until

pytestmark = pytest.mark.e2e

R = TypeVar("R")
SCRIPT_WORKER = Path(__file__).resolve().parent / "workers" / "script_worker.py"
T = 30.0  # the failure bound of any one wait (each is over in milliseconds, or in an example's deadline)
VALID_DEADLINE_S = 20.0  # a valid answer never stalls: its deadline only bounds a daemon that would hang
HOSTILE_DEADLINE_S = 0.6  # an answer that stops short of its end stalls this long, then 504 (or a cut stream)
HEAD_LIMIT = 65536  # limits.worker_head_bytes (the default)
MAX_HEADERS = 100  # the upstream pool's header-line limit
BUFFER_BYTES = 128  # limits.buffer_bytes: a Content-Length answer up to this is gathered, a longer one streamed
SPOOL_BYTES = 32 * 1024  # limits.spool_bytes: past the spool's memory (64 KiB) and this on disk, wait for the client
# what the daemon may answer itself to a request its worker got (or, with the breaker, did not get)
WORKER_FAULTS = frozenset({"worker_error", "worker_crashed", "timeout"})
DAEMON_REFUSALS = frozenset({"circuit_open", "worker_unavailable", "queue_timeout", "overloaded"})
# the headers a relayed answer carries that are the daemon's, not the worker's
DAEMON_HEADERS = frozenset({b"date", b"content-length", b"transfer-encoding", b"connection", b"x-request-id",
                            b"x-supervisor-queue-ms", b"x-supervisor-attempts", b"x-supervisor-replica",
                            b"x-degraded"})


def fuzz(examples: int) -> settings:
    """Hypothesis settings: `examples` times UFUZZ_SCALE (default 1; more for a longer hunt by hand)."""
    scale = float(os.environ.get("UFUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(examples * scale)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# -- the daemon and its worker, run by a loop in a thread of its own --------------------------------------------
class Daemon:
    """A real daemon (tests/harness.py's SupervisorProcess) in front of script_worker, driven from a loop in a
    thread of its own so that the tests themselves read and write plain blocking sockets."""

    def __init__(self, tmp: Path):
        self.control = str(tmp / "ctl.sock")
        cfg = fast_config(
            worker={"command": [PYTHON, str(SCRIPT_WORKER), "--socket", "{socket}", "--control", self.control],
                    "hang_timeout_s": 60,
                    # probes that a loaded box does not fail: a restart would lose the worker's record of scripts
                    "health": {"interval_s": 0.5, "timeout_s": 5, "failures": 3}},
            queue={"concurrency": 2, "timeout_s": 30},
            retry={"max_attempts": 1},
            # answers over this are relayed as they come (with their Content-Length), not gathered first
            limits={"buffer_bytes": BUFFER_BYTES, "spool_bytes": SPOOL_BYTES},
            # a window this run never fills: no verdict, so every example reaches the worker
            breaker={"window": 100000, "min_calls": 100000},
            # an access line per request, logged once its handler is through: one that crashed logs none
            logging={"access": True},
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-daemon", daemon=True)
        self.sp = SupervisorProcess(tmp, cfg)
        self.port = 0
        self.serial = 0

    def __enter__(self) -> Daemon:
        self._thread.start()
        self.call(self.sp.start())
        self.port = self.sp.port
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.sp.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(T)
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run `coro` on the daemon's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(T + 30)

    def next_id(self) -> str:
        self.serial += 1
        return f"ex{self.serial}"

    def handled(self, got: Got) -> dict:
        """The access line of the request `got` answers: its handler finished (a crashed one logs none)."""
        rid = (got.header(b"x-request-id") or b"").decode()
        assert rid, got.raw[:600]
        return self.call(self.sp.wait_log("request", timeout=T, request_id=rid))

    def settled(self, sid: str, timeout_s: float = 15.0) -> bool:
        """Wait until the worker has run script `sid` and every run of it is over (see script_worker)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout_s + 10)
            s.connect(self.control)
            s.sendall(f"GET /settled?id={sid}&timeout_s={timeout_s} HTTP/1.1\r\nHost: w\r\n\r\n".encode())
            data = read_to_eof(s, T)
        return data.startswith(b"HTTP/1.1 200")


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """One daemon and worker for the whole module (the last test checks what the others left of it)."""
    d = Path(tempfile.mkdtemp(prefix="gs-uf-"))  # short: Unix socket paths are limited to 107 bytes
    try:
        with Daemon(d) as dm:
            yield dm
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- the client's side: raw sockets, answers read by h11 ---------------------------------------------------------
@dataclass
class Got:
    """What the client got: `whole` (one complete answer and nothing after it) or a cut one (the connection ended
    inside the body of an answer whose head had come)."""

    whole: bool
    status: int
    headers: list[tuple[bytes, bytes]]  # lowercased names, in order
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def error(self) -> dict | None:
        """The daemon's JSON error, when this answer is one of the daemon's own."""
        if self.header(b"content-type") != b"application/json" or self.header(b"x-supervisor-attempts"):
            return None
        try:
            err = json.loads(self.body)["error"]
        except (ValueError, KeyError, TypeError):
            return None
        return err if isinstance(err, dict) and err.get("type") in ERROR_TYPES else None


def parse(raw: bytes, method: str = "POST") -> Got:
    """Read what the daemon wrote on one connection (to one POST) as a strict client does; a malformed answer,
    no answer, or bytes after a whole answer fail the test."""
    assert raw, "the daemon closed the client's connection without an answer"
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method=method, target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    c.send(h11.EndOfMessage())
    resp: h11.Response | None = None
    body: list[bytes] = []

    def drain() -> object:
        nonlocal resp
        while True:
            e = c.next_event()
            if isinstance(e, h11.Response):
                resp = e
            elif isinstance(e, h11.Data):
                body.append(bytes(e.data))
            elif isinstance(e, h11.InformationalResponse):
                raise AssertionError(f"the daemon relayed an interim answer: {raw[:400]!r}")
            else:
                return e

    c.receive_data(raw)
    try:
        e = drain()  # before the end of the connection: any protocol error is the daemon's framing
    except h11.RemoteProtocolError as exc:
        raise AssertionError(f"malformed answer from the daemon ({exc}): {raw[:600]!r}") from None
    if e is h11.NEED_DATA:
        c.receive_data(b"")
        try:
            e = drain()
        except h11.RemoteProtocolError:
            # the connection ended inside the answer: allowed only inside a body whose head came
            assert resp is not None, f"the daemon's connection ended inside an answer's head: {raw[:600]!r}"
            return Got(False, resp.status_code, [(k, v) for k, v in resp.headers], b"".join(body), raw)
    assert isinstance(e, h11.EndOfMessage), f"{e!r} after {raw[:600]!r}"
    assert resp is not None and resp.http_version == b"1.1", raw[:400]
    trailing, _ = c.trailing_data
    assert trailing == b"", f"bytes after the daemon's answer (a second answer?): {trailing[:300]!r}"
    names = {k for k, _ in resp.headers}
    if method != "HEAD" and resp.status_code not in (204, 304):
        # a body ended by closing would look whole however short: the daemon always frames its answers
        assert b"content-length" in names or b"transfer-encoding" in names, f"a close-delimited answer: {raw[:600]!r}"
    return Got(True, resp.status_code, [(k, v) for k, v in resp.headers], b"".join(body), raw)


def through_daemon(dm: Daemon, parts: list[bytes], then: str, deadline_s: float,
                   method: str = "POST") -> tuple[Got, str]:
    """One example: the worker's script as one request through the daemon (a POST's body, else its query); what
    the client got, and the script's id (once the worker has finished with it, so that nothing of it is still on
    its way to the daemon)."""
    sid = dm.next_id()
    script = json.dumps({"id": sid, "parts": [base64.b64encode(p).decode() for p in parts],
                         "then": then}).encode()
    if method == "POST":
        request = (b"POST /run HTTP/1.1\r\nHost: d\r\nConnection: close\r\nContent-Type: application/json\r\n"
                   b"X-Request-Timeout: %g\r\nContent-Length: %d\r\n\r\n%s" % (deadline_s, len(script), script))
    else:
        request = (b"%s /run?script=%s HTTP/1.1\r\nHost: d\r\nConnection: close\r\nX-Request-Timeout: %g\r\n\r\n"
                   % (method.encode(), base64.urlsafe_b64encode(script), deadline_s))
    with socket.create_connection(("127.0.0.1", dm.port), timeout=T) as s:
        s.sendall(request)
        raw = read_to_eof(s, T)
    got = parse(raw, method)
    err = got.error
    if err is None or err["type"] not in DAEMON_REFUSALS:  # (a refused request never reached the worker)
        assert dm.settled(sid), f"the worker never finished script {sid}"
    assert dm.handled(got)["status"] == got.status
    return got, sid


# -- worker answers, built from parts ---------------------------------------------------------------------------
TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_BYTES = bytes(range(0x21, 0x7F))
FINAL_STATUSES = (200, 201, 202, 203, 206, 226, 299, 301, 302, 307, 400, 401, 404, 409, 418, 422, 429, 451,
                  500, 501, 502, 503, 504, 599)
# (end-to-end headers a worker may send; hop-by-hop ones and the daemon's own, which must not reach the client)
END_TO_END = ("Content-Type", "Cache-Control", "ETag", "Set-Cookie", "X-A", "x-b", "Vary", "Location",
              "X-Worker-Error", "Retry-After", "Link", "Content-Encoding")
NOT_RELAYED = ("Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Upgrade",
              "Proxy-Authenticate", "X-Request-ID", "X-Supervisor-Attempts", "X-Supervisor-Queue-Ms",
              "X-Supervisor-Replica", "X-Degraded", "Date")
HOP_VALUES = {"Connection": ("keep-alive", "Keep-Alive", "close", "upgrade", "X-A", "close, x-b", "Cache-Control"),
              "Keep-Alive": ("timeout=5, max=100",),
              "TE": ("trailers",), "Trailer": ("X-T",), "Upgrade": ("h2c",)}


@dataclass
class Answer:
    """A valid worker answer, and what the client must get from it."""

    interim: list[bytes]  # whole 1xx answers before it
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # as sent, framing headers apart
    framing: str  # "length" | "chunked" | "close" | "none" (204, 304)
    body: bytes
    chunks: list[bytes] = field(default_factory=list)  # the chunked encoding's pieces (whole chunk lines)
    trailer: bytes = b""
    then: str = "keep"
    sse: bool = False

    def encode(self) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason)]
        lines += [k + b": " + v + b"\r\n" for k, v in self.headers]
        if self.framing == "length":
            lines.append(b"Content-Length: %d\r\n" % len(self.body))
        elif self.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked\r\n")
        head = b"".join(self.interim) + b"".join(lines) + b"\r\n"
        if self.framing == "chunked":
            return head + b"".join(self.chunks) + b"0\r\n" + self.trailer + b"\r\n"
        return head + (b"" if self.framing == "none" else self.body)

    @property
    def relayed_headers(self) -> list[tuple[bytes, bytes]]:
        """The worker's headers the client must get, in order (names lowercased as h11 gives them): not the
        hop-by-hop ones, those its Connection header names among them (RFC 9110 7.6.1), nor the daemon's own."""
        named = {t.strip().lower() for k, v in self.headers if k.lower() == b"connection" for t in v.split(b",")}
        return [(k.lower(), v) for k, v in self.headers if k.lower() not in NOT_PASSED_ON and k.lower() not in named]


@st.composite
def header_values(draw) -> bytes:
    inner = draw(st.binary(min_size=0, max_size=20).map(lambda b: bytes(VALUE_BYTES[x % len(VALUE_BYTES)] for x in b)))
    spaced = draw(st.booleans())
    return inner[:5] + b" " + inner[5:] if spaced and len(inner) > 6 else inner or b"v"


@st.composite
def headers(draw, sse: bool) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if sse:
        out.append((b"Content-Type", b"text/event-stream"))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(("e2e", "e2e", "hop", "token", "oom")))
        if kind == "e2e":
            name = draw(st.sampled_from(END_TO_END))
            if name == "Content-Type" and sse:
                continue
            out.append((name.encode(), draw(header_values())))
        elif kind == "hop":
            name = draw(st.sampled_from(NOT_RELAYED))
            value = draw(st.sampled_from(HOP_VALUES[name])).encode() if name in HOP_VALUES else draw(header_values())
            out.append((name.encode(), value))
        elif kind == "token":
            out.append((draw(st.text(TOKEN, min_size=1, max_size=12)).encode(), draw(header_values())))
        else:
            out.append((b"X-Worker-Error", b"oom"))
    return out


def _chunk_line(draw, piece: bytes) -> bytes:
    size = b"%x" % len(piece)
    if draw(st.booleans()):
        size = size.upper()
    if draw(st.integers(0, 4)) == 0:
        size = b"00" + size
    ext = draw(st.sampled_from((b"", b"", b";a=b", b";x", b';q="v"')))
    return size + ext + b"\r\n" + piece + b"\r\n"


@st.composite
def sse_body(draw) -> list[bytes]:
    """An event stream's events, each one piece."""
    return [b"data: %s\n\n" % draw(st.text("abcdefghij {}:\"0123", min_size=0, max_size=60)).encode()
            for _ in range(draw(st.integers(1, 8)))]


@st.composite
def answers(draw, keep_only: bool = False) -> Answer:
    """A valid worker answer."""
    interim = []
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        code = draw(st.sampled_from((100, 102, 103)))
        link = b"Link: </a.css>; rel=preload\r\n" if code == 103 else b""
        interim.append(b"HTTP/1.1 %d Interim\r\n%s\r\n" % (code, link))
    status = draw(st.sampled_from((*FINAL_STATUSES, 204, 304)))
    reason = draw(st.sampled_from((b"OK", b"Whatever It Is", b"", b"X")))
    sse = status == 200 and draw(st.booleans())
    hdrs = draw(headers(sse))
    then = "keep" if keep_only else draw(st.sampled_from(("keep", "close")))
    if status in (204, 304):
        return Answer(interim, status, reason, hdrs, "none", b"", then=then)
    framings = ["length", "chunked"] if then == "keep" else ["length", "chunked", "close"]
    framing = "chunked" if sse and draw(st.booleans()) else draw(st.sampled_from(framings))
    if sse:
        pieces = draw(sse_body())
    elif draw(st.integers(0, 15)) == 0:  # a big one: past the spool's memory, onto its disk and past that too
        pieces = [bytes([65 + i % 26]) * draw(st.integers(1, 96 * 1024)) for i in range(draw(st.integers(1, 3)))]
    else:
        pieces = [draw(st.binary(max_size=300)) for _ in range(draw(st.integers(0, 4)))]
    body = b"".join(pieces)
    chunks = [_chunk_line(draw, p) for p in pieces if p] if framing == "chunked" else []
    trailer = b"".join(b"%s: %s\r\n" % (n, draw(header_values()))
                       for n in draw(st.lists(st.sampled_from((b"X-T", b"Server-Timing", b"x-u")), max_size=2)))
    return Answer(interim, status, reason, hdrs, framing, body, chunks, trailer, then, sse)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a] or [b""]


cut_points = st.lists(st.integers(0, 1 << 20), max_size=6)


# -- mutations ---------------------------------------------------------------------------------------------------
@dataclass
class Hostile:
    """A mutated worker answer: its bytes, how it was made, and whether it is known to be broken."""

    data: bytes
    how: list[str]
    base: Answer
    then: str


# (weighted by repetition: the byte-level ones and the cuts are the commonest)
MUTATIONS = ("flip", "flip", "insert", "insert", "delete", "truncate", "truncate", "truncate", "extra", "extra",
             "name80", "dup_cl", "cl_te", "te", "bad_status", "bad_chunk", "big_head", "many_headers")
INSERTS = (b"\r", b"\n", b"\x00", b" ", b"\r\n", b"\x80", b"\xff", b"\t", b":")


def _head_end(data: bytes) -> int:
    """The end of the final answer's head in `data` (after any interim answers)."""
    pos = 0
    while data.startswith(b"HTTP/1.1 1", pos) and (end := data.find(b"\r\n\r\n", pos)) >= 0:
        pos = end + 4
    end = data.find(b"\r\n\r\n", pos)
    return end + 4 if end >= 0 else len(data)


@st.composite
def hostile(draw) -> Hostile:
    a = draw(answers())
    data = a.encode()
    how = []
    for _ in range(draw(st.sampled_from((1, 1, 1, 2, 3)))):
        kind = draw(st.sampled_from(MUTATIONS))
        hend = _head_end(data)
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data = data[:i] + draw(st.sampled_from(INSERTS)) + data[i:]
        elif kind == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + data[i + 1:]
        elif kind == "name80":
            data = data[:hend - 2] + b"X-\xc3\xa9t\xe9: v\r\n" + data[hend - 2:]
        elif kind == "dup_cl":
            n = draw(st.integers(0, 40))
            data = data[:hend - 2] + b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n + 1) + data[hend - 2:]
        elif kind == "cl_te":
            data = (data[:hend - 2] + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n"
                    % draw(st.integers(0, 40)) + data[hend - 2:])
        elif kind == "te" and b"Transfer-Encoding: chunked\r\n" in data[:hend]:
            te = draw(st.sampled_from((b"gzip, chunked", b"chunked, chunked", b"Chunked", b"chunked ", b"identity",
                                       b"chunked\r\nTransfer-Encoding: chunked", b"x-y", b"chunked;q=1")))
            data = data[:hend].replace(b"Transfer-Encoding: chunked", b"Transfer-Encoding: " + te, 1) + data[hend:]
        elif kind == "truncate" and data:
            data = data[:draw(st.integers(0, len(data) - 1))]
        elif kind == "extra":
            data += draw(st.sampled_from((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"junk", b"\r\n",
                                          b"0\r\n\r\n", b"x" * 100)))
        elif kind == "big_head":
            data = data[:hend - 2] + b"X-Big: " + b"a" * (HEAD_LIMIT + draw(st.integers(0, 4096))) + b"\r\n" + \
                data[hend - 2:]
        elif kind == "many_headers":
            lines = b"".join(b"X-H-%d: v\r\n" % i for i in range(MAX_HEADERS + draw(st.integers(0, 50))))
            data = data[:hend - 2] + lines + data[hend - 2:]
        elif kind == "bad_status":
            code = draw(st.sampled_from((b"101", b"099", b"600", b"1000", b"abc", b"", b"20")))
            data = data[:9] + code + data[12:] if data.startswith(b"HTTP/1.1 ") and len(data) > 12 else data
        elif kind == "bad_chunk" and a.framing == "chunked":
            i = data.find(b"\r\n", hend)
            data = data[:hend] + draw(st.sampled_from((b"zz", b"-1", b"ffffffffffffffffff", b"1 ;", b""))) + \
                data[i if i >= 0 else len(data):]
        else:
            continue
        how.append(kind)
    then = draw(st.sampled_from(("keep", "close", "close")))
    return Hostile(data, how, a, then)


@dataclass
class Verdict:
    """h11's reading of the worker's bytes (an independent strict parser, as a client of the worker)."""

    kind: str  # "whole" (a complete answer), "short" (the bytes end inside it), "bad" (not HTTP)
    status: int = 0
    body: bytes = b""
    detail: str = ""


def oracle(data: bytes, closes: bool, method: str = "POST") -> Verdict:
    """What a strict client makes of `data` (`closes`: the worker closes the connection after it), the answer to
    a `method` request."""
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method=method, target="/", headers=[("Host", "w"), ("Content-Length", "0")]))
    c.send(h11.EndOfMessage())
    c.receive_data(data)
    if closes:
        c.receive_data(b"")
    status, body = 0, []
    try:
        while True:
            e = c.next_event()
            if isinstance(e, h11.Response):
                status = e.status_code
            elif isinstance(e, h11.Data):
                body.append(bytes(e.data))
            elif isinstance(e, h11.EndOfMessage):
                return Verdict("whole", status, b"".join(body))
            elif e is h11.NEED_DATA or isinstance(e, h11.ConnectionClosed):
                return Verdict("short", status, b"".join(body))
    except h11.RemoteProtocolError as exc:
        return Verdict("bad" if "peer closed" not in str(exc) else "short", status, b"".join(body), str(exc))


def leniency(data: bytes, closes: bool, method: str = "POST") -> Verdict | None:
    """Where llhttp (the daemon's parser) is more lenient than h11 on a worker's answer and the daemon's reading is
    the agreed one: h11's verdict on the bytes as llhttp reads them, or None when no leniency applies.

    - empty lines (CR, LF) before the status line are skipped, as RFC 9112 2.2 allows a recipient to;
    - control bytes in the reason phrase are let through: the reason phrase is ignored (RFC 9112 4) and the
      daemon writes a status line of its own, so none of it reaches the client.
    """
    fixed = _STATUS_LINE.sub(lambda m: m[1] + bytes(b for b in m[2] if b >= 0x20 and b != 0x7F),
                             data.lstrip(b"\r\n"))
    return oracle(fixed, closes, method) if fixed != data else None


_STATUS_LINE = re.compile(rb"(?m)^(HTTP/1\.[01] \d{3} )([^\r\n]*)")  # (interim answers' status lines too)


# -- the properties ---------------------------------------------------------------------------------------------
def check_daemon_error(got: Got, allowed: frozenset[str]) -> str:
    """`got` is one of the daemon's own answers, whole, typed, with its JSON error body; its type."""
    err = got.error
    assert err is not None, f"not a daemon error: {got.raw[:600]!r}"
    assert got.whole, got.raw[:600]
    etype = err["type"]
    assert etype in allowed, f"daemon error {etype!r}: {err}"
    assert got.status == ERROR_TYPES[etype][0], got.raw[:600]
    assert err["request_id"] and err["request_id"] == (got.header(b"x-request-id") or b"").decode(), err
    assert isinstance(err["message"], str) and err["message"], err
    return etype


def check_relayed(got: Got, a: Answer) -> None:
    """The worker's valid answer `a`, relayed exactly."""
    assert got.error is None or a.status == got.status, f"a daemon error for a valid answer: {got.raw[:600]!r}"
    assert got.whole, f"a valid answer cut: {got.raw[:600]!r}"
    assert got.status == a.status, (got.status, a.status, got.raw[:600])
    theirs = [(k, v) for k, v in got.headers if k not in DAEMON_HEADERS]
    assert theirs == a.relayed_headers, (theirs, a.relayed_headers)
    assert got.header(b"x-request-id") and got.header(b"x-supervisor-attempts") == b"1", got.headers
    assert got.body == a.body, (got.body[:300], a.body[:300])


def test_the_script_worker_is_answered_at_all(daemon: Daemon) -> None:
    """The fuzzers' ground: a plain answer through the daemon, relayed."""
    a = Answer([], 200, b"OK", [(b"X-A", b"1")], "length", b"hello")
    got, sid = through_daemon(daemon, [a.encode()], "keep", VALID_DEADLINE_S)
    check_relayed(got, a)
    assert os.path.exists(daemon.control) and sid


# (found by the fuzzer: the daemon read such a body as chunked or close-delimited, dropped the hop-by-hop
# Transfer-Encoding and relayed the still-encoded bytes as a plain body)
@pytest.mark.parametrize("te", [b"bhunked", b"gzip, chunked", b"chunked, chunked", b"identity", b"chunked\r\n"
                                b"Transfer-Encoding: chunked"])
@pytest.mark.parametrize("then", ["keep", "close"])
def test_a_transfer_coding_other_than_one_chunked_is_a_worker_error(daemon: Daemon, te: bytes, then: str) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % te
    got, _ = through_daemon(daemon, [answer], then, VALID_DEADLINE_S)
    assert check_daemon_error(got, WORKER_FAULTS) == "worker_error", got.raw
    assert "Transfer-Encoding" in got.error["message"] or "transfer" in got.error["message"].lower(), got.error


# (found by the fuzzer: the daemon wrote its SSE error event into a body of a set Content-Length; when the event did
# not fit, a RuntimeError in the handler (http_handler_failed), and when it did, an error event inside a body the
# client sees cut anyway)
@pytest.mark.parametrize("then", ["keep", "close"])
def test_an_sse_answer_of_a_set_length_broken_off_is_cut(daemon: Daemon, then: str) -> None:
    event = b"data: " + b"x" * 40 + b"\n\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % (5 * len(event))
    got, _ = through_daemon(daemon, [head, event * 3], then, 2.0)
    assert not got.whole and got.status == 200 and got.body == event * 3, got.raw
    assert int(got.header(b"content-length") or 0) == 5 * len(event), got.headers
    assert _sse_error_end(got.body) is None, got.body  # (through_daemon saw its handler finish: no crash)


@fuzz(100)
@given(a=answers(), cuts=cut_points)
def test_a_valid_worker_answer_is_relayed_exactly(daemon: Daemon, a: Answer, cuts: list[int]) -> None:
    got, _ = through_daemon(daemon, split(a.encode(), cuts), a.then, VALID_DEADLINE_S)
    check_relayed(got, a)


def _sse_error_end(body: bytes) -> str | None:
    """The type of the `event: error` that ends an SSE body, if one does."""
    i = body.rfind(b"event: error\ndata: ")
    if i < 0 or not body.endswith(b"\n\n"):
        return None
    try:
        return json.loads(body[i + len(b"event: error\ndata: "):-2])["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


@fuzz(200)
@given(h=hostile(), cuts=cut_points)
def test_whatever_the_worker_sends_the_client_gets_one_whole_answer_or_a_cut_stream(
        daemon: Daemon, h: Hostile, cuts: list[int]) -> None:
    # a mutation that undid itself (or did nothing) leaves a valid answer: relayed exactly, given time
    unchanged = h.data == h.base.encode() and h.then in (h.base.then, "close") and h.base.framing != "close"
    got, _ = through_daemon(daemon, split(h.data, cuts), h.then, VALID_DEADLINE_S if unchanged else HOSTILE_DEADLINE_S)
    v = oracle(h.data, h.then == "close")
    err = got.error
    event(f"h11 {v.kind}; daemon {err['type'] if err else 'relayed whole' if got.whole else 'relayed cut'}")
    if unchanged:
        check_relayed(got, h.base)
        return
    if err is not None:
        check_daemon_error(got, WORKER_FAULTS | DAEMON_REFUSALS)
        return
    # relayed: a status the worker's bytes carry, never the daemon's 500 (a worker's own 500 comes relayed)
    assert got.header(b"x-supervisor-attempts") == b"1", got.raw[:600]
    assert re.search(rb"HTTP/1\.[01] %d" % got.status, h.data), (got.status, h.data[:300])
    sse = (got.header(b"content-type") or b"").startswith(b"text/event-stream")
    if not got.whole:
        # cut: only a stream whose head had gone out (never a gathered answer), and never a chunked SSE one (that
        # ends with an error event); the client saw it cut (h11 found the body short of its chunked end or its
        # Content-Length)
        cl = got.header(b"content-length")
        assert not sse or cl is not None, f"a chunked SSE stream cut without an error event: {got.raw[-300:]!r}"
        assert got.header(b"transfer-encoding") == b"chunked" or int(cl or 0) > BUFFER_BYTES, got.raw[:600]
        return
    etype = _sse_error_end(got.body) if sse else None
    if etype is not None:  # an SSE stream the worker broke off after it had started: ended by an error event
        assert etype in WORKER_FAULTS, etype
        before = got.body[:got.body.rfind(b"event: error\n")]  # (what the worker sent before it broke off)
        assert v.kind == "bad" or v.body.startswith(before), (before[-200:], v.body[-200:])
        return
    # a whole answer relayed as whole: what a strict client reads in the worker's bytes, status and body
    if v.kind == "bad" and (lenient := leniency(h.data, h.then == "close")) is not None:
        v = lenient
    assert v.kind == "whole", (f"the daemon relayed as whole ({got.status}, {len(got.body)} bytes) an answer a strict "
                               f"client reads as {v.kind} ({v.detail}): {h.data[:600]!r}")
    assert (got.status, got.body) == (v.status, v.body), (got.status, got.body[:200], v.status, v.body[:200])


@fuzz(60)
@given(h=hostile().filter(lambda h: len(h.data) < 2500), cuts=cut_points)  # (the script goes in the query)
def test_a_head_request_gets_the_head_alone_whatever_the_worker_sends(
        daemon: Daemon, h: Hostile, cuts: list[int]) -> None:
    """HEAD: the worker's answer has a body anyway (as some servers send); the client gets the head alone."""
    unchanged = h.data == h.base.encode() and h.then in (h.base.then, "close") and h.base.framing != "close"
    got, _ = through_daemon(daemon, split(h.data, cuts), h.then,
                            VALID_DEADLINE_S if unchanged else HOSTILE_DEADLINE_S, "HEAD")
    err = None if unchanged else got.error  # (a HEAD answer has no body to read an error from)
    if err is None and not unchanged and got.header(b"x-supervisor-attempts") is None:
        err = {"type": "?"}  # the daemon's own answer to HEAD: its status says which
        assert got.status in {ERROR_TYPES[t][0] for t in WORKER_FAULTS | DAEMON_REFUSALS}, got.raw[:600]
    assert got.whole and got.body == b"", got.raw[:600]
    if unchanged:
        assert got.status == h.base.status, (got.status, h.base.status)
        theirs = [(k, v) for k, v in got.headers if k not in DAEMON_HEADERS]
        assert theirs == h.base.relayed_headers, (theirs, h.base.relayed_headers)
        return
    if err is not None:
        return
    v = oracle(h.data, h.then == "close", "HEAD")
    if v.kind == "bad" and (lenient := leniency(h.data, h.then == "close", "HEAD")) is not None:
        v = lenient
    assert v.kind == "whole" and got.status == v.status, (got.status, v, h.data[:600])


def test_after_the_examples_the_daemon_is_whole(daemon: Daemon) -> None:
    """Run last (after the fuzzers, on the same daemon): ready, idle, metrics parse, no crash logged."""
    sp = daemon.sp

    async def check() -> None:
        await sp.wait_ready(T)

        async def idle() -> bool:
            st_ = await sp.status()
            return st_["queue"]["inflight"] == 0 and st_["queue"]["total"] == 0 and st_["worker"]["inflight"] == 0
        await wait_until(idle, T, "nothing in flight or queued")
        st_ = await sp.status()
        assert st_["worker"]["restarts"] == 0 and st_["breaker"]["state"] == "closed", st_  # hostile != dead
        families = list(text_string_to_metric_families(await sp.metrics()))
        assert families
        assert sp.proc is not None and sp.proc.returncode is None

    daemon.call(check())
    assert not daemon.sp.events("http_handler_failed")
    bad = [line for line in daemon.sp.raw_lines if "Traceback" in line or '"exception"' in line]
    assert not bad, bad[:5]
