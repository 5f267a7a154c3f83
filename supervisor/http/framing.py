"""HTTP framing between the client and a worker: the request head a worker gets, the answer's headers a
client gets, the request body read, streamed or announced (`Expect: 100-continue`), and the answer read
whole, gathered or spooled."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from ..errors import Rejected
from ..response_spool import ResponseSpool, SpoolFull
from ..upstream import UpstreamConnection

if TYPE_CHECKING:
    from ..fleet.process import InFlight
    from .call import Call

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"proxy-connection", b"x-request-id",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"prefer",
})
NEVER_STRIPPED = frozenset({b"host"})  # RFC 9110 7.6.1: Connection cannot remove Host
RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "proxy-connection", "date",
})
STREAM_CHUNK = 1 << 16
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# -- the request, to the worker ----------------------------------------------------------------------
def request_head(request: web.BaseRequest, call: Call) -> bytes:
    target = request.raw_path
    if not target.startswith("/") and target != "*":
        # absolute-form (RFC 9112 3.2.2): the worker gets origin-form; Host already names the authority
        target = request.rel_url.raw_path_qs if hasattr(request.rel_url, "raw_path_qs") else request.path_qs
    return head(call, target, request.raw_headers, (request.remote or "").encode(), request.scheme.encode())


def head(call: Call, target: str, raw, peer: bytes, scheme: bytes) -> bytes:
    """The request line and headers a worker gets: end-to-end headers only (hop-by-hop ones and those
    the Connection header names, never Host), X-Forwarded-*, the request id and the body's framing
    (chunked when the body is streamed through, else Content-Length)."""
    parts = [call.method.encode(), b" ", target.encode("utf-8", "surrogateescape"), b" HTTP/1.1\r\n"]
    conn_tokens: tuple[bytes, ...] = ()
    xff = None
    host = None
    for k, v in raw:
        lk = k.lower()
        if lk == b"connection":
            conn_tokens += tuple(t.strip().lower() for t in v.split(b","))
        elif lk == b"x-forwarded-for":
            xff = v
        elif lk == b"host":
            host = v
    for k, v in raw:
        lk = k.lower()
        if lk in HOP_BY_HOP or (conn_tokens and lk in conn_tokens and lk not in NEVER_STRIPPED):
            continue
        parts += (k, b": ", v, b"\r\n")
    parts += (b"X-Forwarded-For: ", xff + b", " + peer if xff else peer, b"\r\n",
              b"X-Forwarded-Proto: ", scheme, b"\r\n",
              b"X-Request-ID: ", call.rid.encode(), b"\r\n")
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


async def send_continue(request: web.BaseRequest, call: Call) -> None:
    """`Expect: 100-continue`: say go ahead only once the request is admitted, so a request that
    will be refused is refused before its body is sent."""
    if call.continue_sent or request.version < (1, 1):
        return
    if request.headers.get("Expect", "").lower() != "100-continue":
        return
    call.continue_sent = True
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Rejected("payload_too_large", f"request body over limits.max_body_bytes ({limit} bytes)") from None


async def stream_body(request: web.BaseRequest, conn: UpstreamConnection, limit: int) -> None:
    """The client's body as it comes, chunked, to the worker (a body too large to hold)."""
    sent = 0
    async for chunk in request.content.iter_chunked(STREAM_CHUNK):
        sent += len(chunk)
        if sent > limit:
            conn.abort()
            raise Rejected("payload_too_large", f"request body over limits.max_body_bytes ({limit} bytes)")
        conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await conn.drain()
    conn.write(b"0\r\n\r\n")


# -- the answer, to the client -----------------------------------------------------------------------
def response_headers(raw: list[tuple[bytes, bytes]], call: Call, degraded: str | None) -> CIMultiDict:
    """The worker's end-to-end headers, with the request id, queue time, attempts and X-Degraded."""
    h: CIMultiDict = CIMultiDict()
    for k, v in raw:
        name = k.decode("latin-1")
        if name.lower() in RESPONSE_DROP:
            continue
        h.add(name, v.decode("latin-1"))
    h["X-Request-ID"] = call.rid
    h["X-Supervisor-Queue-Ms"] = f"{call.queued_s * 1000:.3f}"
    h["X-Supervisor-Attempts"] = str(call.attempt)
    if degraded:
        h["X-Degraded"] = degraded
    return h


def is_oom(raw: list[tuple[bytes, bytes]]) -> bool:
    for k, v in raw:
        if k.lower() == b"x-worker-error" and v.strip().lower() == b"oom":
            return True
    return False


def sized(raw: list[tuple[bytes, bytes]], limit: int) -> bool:
    """An answer with a Content-Length within `limit` (chunked or close-delimited ones are streams)."""
    for k, v in raw:
        if k.lower() == b"content-length":
            try:
                return int(v) <= limit
            except ValueError:
                return False
    return False


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
