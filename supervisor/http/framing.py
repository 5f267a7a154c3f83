"""HTTP framing between the client and a worker: the request head a worker gets, the answer's headers a
client gets, the request body read, streamed or announced (`Expect: 100-continue`), and the answer read
whole, gathered or spooled."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import Rejected
from ..response_spool import ResponseSpool, SpoolFull
from ..upstream import UpstreamConnection
from .wire import BodyTooLarge

if TYPE_CHECKING:
    from aiohttp import web

    from ..fleet.process import InFlight
    from .call import Call
    from .wire import Request, Responder

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"proxy-connection", b"x-request-id",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"prefer",
})
NEVER_STRIPPED = frozenset({b"host"})  # RFC 9110 7.6.1: Connection cannot remove Host
RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"proxy-connection", b"date",
})
# the headers whose values are ours to set on every answer (a worker's own are dropped)
OURS = frozenset({b"x-request-id", b"x-supervisor-queue-ms", b"x-supervisor-attempts", b"x-degraded",
                  b"x-supervisor-replica"})
NOT_PASSED_ON = RESPONSE_DROP | OURS
STREAM_CHUNK = 1 << 16
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_METHOD_BYTES = {m: m.encode() for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")}


# -- the request, to the worker ----------------------------------------------------------------------
def request_head(request: Request, call: Call) -> bytes:
    target = request.raw_path
    if not target.startswith("/") and target != "*":
        # absolute-form (RFC 9112 3.2.2): the worker gets origin-form; Host already names the authority
        target = origin_form(target)
    return head(call, target, request.raw_headers, (request.remote or "").encode(), request.scheme.encode())


def origin_form(target: str) -> str:
    """The path and query of an absolute-form target ("http://host:80/a?b" -> "/a?b"; no path: "/")."""
    rest = target.split("://", 1)[1] if "://" in target else target
    cut = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    if not cut:
        return "/"
    tail = rest[min(cut):]
    return tail if tail.startswith("/") else "/" + tail


def head(call: Call, target: str, raw, peer: bytes, scheme: bytes) -> bytes:
    """The request line and headers a worker gets: end-to-end headers only (hop-by-hop ones and those
    the Connection header names, never Host), X-Forwarded-*, the request id and the body's framing
    (chunked when the body is streamed through, else Content-Length)."""
    conn_tokens: tuple[bytes, ...] = ()
    xff = None
    host = None
    fields: list[bytes] = []
    for k, v in raw:
        lk = k.lower()
        if lk in HOP_BY_HOP:
            if lk == b"connection":
                conn_tokens += tuple(t.strip().lower() for t in v.split(b","))
            elif lk == b"x-forwarded-for":
                xff = v
            continue
        if lk == b"host":
            host = v
        fields += (k, b": ", v, b"\r\n")
    trace = call.trace
    if conn_tokens or trace is not None:
        # (rare) the headers the Connection header names are hop-by-hop too, Host aside; with tracing on,
        # the worker gets the attempt's traceparent in place of the client's
        if trace is not None:
            conn_tokens += (b"traceparent",)
        fields = []
        for k, v in raw:
            lk = k.lower()
            if lk not in HOP_BY_HOP and (lk not in conn_tokens or lk in NEVER_STRIPPED):
                fields += (k, b": ", v, b"\r\n")
        if trace is not None and trace.traceparent is not None:
            fields += (b"traceparent: ", trace.traceparent, b"\r\n")
    parts = [_METHOD_BYTES.get(call.method) or call.method.encode(), b" ",
             target.encode("utf-8", "surrogateescape"), b" HTTP/1.1\r\n", *fields]
    parts += (b"X-Forwarded-For: ", xff + b", " + peer if xff else peer, b"\r\n",
              b"X-Forwarded-Proto: ", scheme, b"\r\n",
              b"X-Request-ID: ", call.rid.encode("latin-1"), b"\r\n")
    if host is not None:
        parts += (b"X-Forwarded-Host: ", host, b"\r\n")
    body = call.body
    if body is None:
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif body or call.method in BODY_METHODS:
        parts += (b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


async def send_continue(request: Request, call: Call) -> None:
    """`Expect: 100-continue`: say go ahead only once the request is admitted, so a request that
    will be refused is refused before its body is sent."""
    if call.continue_sent or not request.expect_continue:
        return
    call.continue_sent = True
    await request.send_continue()


async def read_body(request: Request, limit: int) -> bytes:
    try:
        return await request.read(limit)
    except BodyTooLarge:
        raise Rejected("payload_too_large", f"request body over limits.max_body_bytes ({limit} bytes)") from None


async def stream_body(request: Request, conn: UpstreamConnection, limit: int) -> None:
    """The client's body as it comes, chunked, to the worker (a body too large to hold)."""
    sent = 0
    async for chunk in request.iter_chunks(STREAM_CHUNK):
        sent += len(chunk)
        if sent > limit:
            conn.abort()
            raise Rejected("payload_too_large", f"request body over limits.max_body_bytes ({limit} bytes)")
        conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await conn.drain()
    conn.write(b"0\r\n\r\n")


# -- the answer, to the client -----------------------------------------------------------------------
def response_headers(raw: list[tuple[bytes, bytes]], call: Call, degraded: str | None,
                     names: list[bytes] | None = None,
                     replica: bytes = b"") -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The worker's end-to-end headers (`raw` itself when none is dropped: not copied; dropped are hop-by-hop ones,
    those the worker's Connection header names, and ours), and ours as whole header lines (Responder.send_now's
    `lines`): the request id, queue time, attempts, the replica that answered ("<worker>/<index>") and X-Degraded.
    Ours replace any the worker sent under those names. `names`: the header names lowercased, when known."""
    if names is None:
        names = [k.lower() for k, _ in raw]
    if NOT_PASSED_ON.isdisjoint(names):
        h = raw
    else:
        drop = NOT_PASSED_ON
        if b"connection" in names:  # (rare) the headers the worker's Connection header names are hop-by-hop too
            drop = drop | {t.strip().lower() for lk, (_, v) in zip(names, raw) if lk == b"connection"
                           for t in v.split(b",")}
        h = [kv for lk, kv in zip(names, raw) if lk not in drop]
    lines = b"X-Request-ID: %b\r\nX-Supervisor-Queue-Ms: %.3f\r\nX-Supervisor-Attempts: %d\r\n" % (
        call.rid.encode(), call.queued_s * 1000, call.attempt)
    if replica:
        lines += b"X-Supervisor-Replica: %b\r\n" % replica
    if degraded:
        lines += b"X-Degraded: %b\r\n" % degraded.encode("latin-1")
    return h, lines


def header_value(raw: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lowercase) in a raw header list."""
    for k, v in raw:
        if k.lower() == name:
            return v
    return None


# -- answers the daemon makes itself ------------------------------------------------------------------
def encode_headers(headers) -> list[tuple[bytes, bytes]]:
    """A mapping (or aiohttp's multidict) of str headers as the raw list a Responder takes; the framing
    headers are the server's to write."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")]


async def send_parts(responder: Responder, status: int, headers: dict[str, str], body: bytes) -> int:
    responder.send_now(status, encode_headers(headers), body)
    return status


async def send_web(responder: Responder, resp: web.Response) -> int:
    """An aiohttp `web.Response` made by the daemon's own endpoints (admin, jobs, ui), as our answer."""
    body = resp.body if isinstance(resp.body, bytes) else (resp.text or "").encode("utf-8")
    return await send_parts(responder, resp.status, resp.headers, body)


def is_oom(raw: list[tuple[bytes, bytes]], names: list[bytes] | None = None) -> bool:
    """The worker says it ran out of memory (`X-Worker-Error: oom`). `names`: lowercased, when known."""
    if names is not None and b"x-worker-error" not in names:
        return False
    for k, v in raw:
        if k.lower() == b"x-worker-error" and v.strip().lower() == b"oom":
            return True
    return False


def sized(content_length: bytes | None, limit: int) -> bool:
    """An answer whose Content-Length is within `limit` (chunked or close-delimited ones are streams)."""
    return content_length is not None and content_length.isdigit() and int(content_length) <= limit


async def gather(conn: UpstreamConnection, limit: int) -> tuple[list[bytes], bool]:
    """Read the answer until it ends or passes `limit` bytes: (what came, whether it ended)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await conn.read()
        if not chunk:
            return chunks, True
        chunks.append(chunk)
        size += len(chunk)
    return chunks, False


async def fill(conn: UpstreamConnection, spool: ResponseSpool, ex: InFlight, first=()) -> None:
    """Read the worker's answer into the spool as fast as it comes; past the spool's limits, wait for
    the client (then the exchange counts as held up by the client, never as a stalled worker). Whatever
    happens, the spool is finished: the client gets all that came, then the error if there was one."""
    piece = spool.memory_limit  # whatever conn.read() gathered, the spool takes it in pieces that fit
    try:
        for data in first:
            for i in range(0, len(data), piece):
                await spool.append(data[i:i + piece])
        while data := await conn.read():
            for i in range(0, len(data), piece):
                chunk = data[i:i + piece] if len(data) > piece else data
                try:
                    await spool.append(chunk)
                except SpoolFull:
                    ex.client_wait = True
                    try:
                        await spool.wait_drained()  # everything sent: a piece fits in memory now
                        await spool.append(chunk)
                    finally:
                        ex.client_wait = False
    finally:
        spool.finish()
