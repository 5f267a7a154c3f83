"""A trivial, fast HTTP/1.1 upstream for benchmarks, on a Unix socket and a TCP port: a fake OpenAI server.

`POST /v1/chat/completions` gets a fixed, valid chat.completion JSON; any other request gets "hello", except:

- `GET /sse?n=<events>&rate=<per second>&size=<bytes>`: `text/event-stream`, chunked, `n` events
  `data: <payload>\\n\\n` (payload `size` bytes, default 64) paced at `rate` per second from the request on
  (event i is due i/rate s after it), then `data: [DONE]\\n\\n` and the last chunk. One timer tick per event
  loop (every TICK_S) paces every open stream: each gets the events it is due, in one write.
- `GET /big?bytes=<N>`: N bytes (default 4 MiB) with a Content-Length, written as the client takes them.
- `POST /sink`: reads and discards the body, answers its size in bytes (text/plain).

A bad parameter gets a 400. A client that goes away mid-answer only ends its own answer. Every fixed answer
is encoded once, at import, and the server is built on uvloop + httptools (the `raw` impl) so that the
upstream is not what limits the measurement; `--impl aiohttp` answers the same from an aiohttp web.Server.

    python bench/trivial_upstream.py [--socket PATH] [--port N] [--impl raw|aiohttp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from collections import deque
from collections.abc import Callable
from urllib.parse import parse_qs

import httptools

BODY = b"hello"
CHAT_PATH = "/v1/chat/completions"
# what an OpenAI server answers to a non-streamed chat call, field for field; `created` is fixed on purpose
CHAT_BODY = json.dumps({
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "logprobs": None,
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}, separators=(",", ":")).encode()
SSE_PATH = "/sse"
BIG_PATH = "/big"
SINK_PATH = "/sink"
SSE_DEFAULTS = {"n": 100, "rate": 100.0, "size": 64}
BIG_DEFAULT = 4 << 20
TICK_S = 0.01  # the pacing tick shared by every open stream of a loop
DONE_EVENT = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"
PIECE = 1 << 16  # bytes per write of a big answer
BACKLOG = 4096  # hundreds of streams connect at once (the default 100 drops SYNs and refuses Unix connects)
_FILL = b"x" * PIECE


def _response(content_type: bytes, body: bytes) -> tuple[bytes, bytes]:
    """One answer, pre-encoded: (kept-alive, closing)."""
    keep = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (content_type, len(body), body)
    return keep, keep.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


RESPONSE, CLOSE_RESPONSE = _response(b"text/plain", BODY)
CHAT_RESPONSE, CHAT_CLOSE_RESPONSE = _response(b"application/json", CHAT_BODY)
_CHAT_PATH = CHAT_PATH.encode()
_SSE_PATH, _BIG_PATH, _SINK_PATH = SSE_PATH.encode(), BIG_PATH.encode(), SINK_PATH.encode()


class BadParam(ValueError):
    """A query parameter that is not a number in its range: the request gets a 400."""


def _num(params: dict[str, list[str]], name: str, default: float, lo: float, hi: float,
         kind: Callable[[str], float] = int) -> float:
    """The query parameter `name` as `kind` within [lo, hi], else `default` when absent."""
    if name not in params:
        return default
    raw = params[name][-1]
    try:
        v = kind(raw)
    except ValueError:
        raise BadParam(f"{name}={raw!r} is not a number") from None
    if not lo <= v <= hi:
        raise BadParam(f"{name}={raw} is out of range [{lo:g}, {hi:g}]")
    return v


def sse_params(query: str) -> tuple[int, float, int]:
    """(n, rate, size) of a /sse query string."""
    q = parse_qs(query)
    return (int(_num(q, "n", SSE_DEFAULTS["n"], 0, 10**8)),
            _num(q, "rate", SSE_DEFAULTS["rate"], 0.001, 1e6, float),
            int(_num(q, "size", SSE_DEFAULTS["size"], 0, 1 << 20)))


def big_params(query: str) -> int:
    """The size of a /big answer."""
    return int(_num(parse_qs(query), "bytes", BIG_DEFAULT, 0, 1 << 40))


def sse_event(size: int) -> bytes:
    """One event of about `size` payload bytes (the payload never holds a newline)."""
    return b"data: " + b"x" * size + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _plain(status: bytes, text: bytes, keep: bool) -> bytes:
    conn = b"" if keep else b"Connection: close\r\n"
    return (b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, len(text), conn, text))


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n")


class Pacer:
    """One timer for all the open streams of a loop: every TICK_S each stream gets the events it is due."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.streams: set[SseAnswer] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stream: SseAnswer) -> None:
        self.streams.add(stream)
        if self._timer is None:
            self._timer = self.loop.call_later(TICK_S, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        done = [s for s in self.streams if s.step(now)]
        self.streams.difference_update(done)
        self._timer = self.loop.call_later(TICK_S, self._tick) if self.streams else None


_pacers: dict[asyncio.AbstractEventLoop, Pacer] = {}


def pacer() -> Pacer:
    """The running loop's pacer."""
    loop = asyncio.get_running_loop()
    p = _pacers.get(loop)
    if p is None:
        p = _pacers[loop] = Pacer(loop)
    return p


class SseAnswer:
    """One paced event stream on a raw connection; `step` writes what is due, True once it is over."""

    def __init__(self, http: Http, n: int, rate: float, size: int, start: float):
        self.http = http
        self.n = n
        self.rate = rate
        self.event = sse_event(size)
        self.start = start
        self.sent = 0
        self.paused = False  # the transport's buffer is full: catch up once it drains
        self.over = False

    def step(self, now: float) -> bool:
        if self.over:
            return True
        if self.paused:
            return False
        transport = self.http.transport
        if transport is None or transport.is_closing():
            self.over = True
            return True
        due = min(self.n, int((now - self.start) * self.rate) + 1)
        out = b""
        if due > self.sent:
            out = _chunk(self.event * (due - self.sent))
            self.sent = due
        if self.sent >= self.n:
            transport.write(out + _chunk(DONE_EVENT) + LAST_CHUNK)
            self.over = True
            self.http.answered()
            return True
        if out:
            transport.write(out)
        return False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


class BigAnswer:
    """`size` bytes written in pieces as the transport takes them (flow control, no big buffer)."""

    def __init__(self, http: Http, size: int):
        self.http = http
        self.left = size
        self.paused = False
        self.over = False

    def pump(self) -> None:
        transport = self.http.transport
        while self.left > 0 and not self.paused:
            if transport is None or transport.is_closing():
                self.over = True
                return
            n = min(self.left, PIECE)
            transport.write(_FILL[:n])
            self.left -= n
        if self.left <= 0 and not self.over:
            self.over = True
            self.http.answered()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.pump()


class Http(asyncio.Protocol):
    """The raw impl: httptools parsing, pre-encoded answers; a stream or a big answer keeps the connection
    busy, and requests pipelined behind it wait their turn."""

    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.body_bytes = 0
        self.busy: SseAnswer | BigAnswer | None = None  # an answer sent over several writes
        self.waiting: deque[tuple[bytes, bytes, bool, int]] = deque()  # (method, url, keep-alive, body bytes)
        self.keep = True

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def connection_lost(self, exc):
        if self.busy is not None:
            self.busy.over = True  # the pacer drops it at its next tick
            self.busy = None
        self.waiting.clear()

    def pause_writing(self):
        if self.busy is not None:
            self.busy.pause()

    def resume_writing(self):
        if self.busy is not None:
            self.busy.resume()

    def on_message_begin(self):
        self.url = b""
        self.body_bytes = 0

    def on_url(self, url: bytes):
        self.url += url  # may come in pieces

    def on_body(self, body: bytes):
        self.body_bytes += len(body)

    def on_message_complete(self):
        req = (self.parser.get_method(), self.url, self.parser.should_keep_alive(), self.body_bytes)
        if self.busy is not None:
            self.waiting.append(req)
        else:
            self.answer(*req)

    def answer(self, method: bytes, url: bytes, keep: bool, body_bytes: int) -> None:
        path, _, query = url.partition(b"?")
        if method == b"GET" and path == _SSE_PATH:
            self.start_sse(query, keep)
        elif method == b"GET" and path == _BIG_PATH:
            self.start_big(query, keep)
        elif method == b"POST" and path == _SINK_PATH:
            self.reply(_plain(b"200 OK", b"%d" % body_bytes, keep), keep)
        else:
            chat = method == b"POST" and path == _CHAT_PATH
            if keep:
                self.transport.write(CHAT_RESPONSE if chat else RESPONSE)
            else:
                self.transport.write(CHAT_CLOSE_RESPONSE if chat else CLOSE_RESPONSE)
                self.transport.close()

    def reply(self, data: bytes, keep: bool) -> None:
        self.transport.write(data)
        if not keep:
            self.transport.close()

    def start_sse(self, query: bytes, keep: bool) -> None:
        try:
            n, rate, size = sse_params(query.decode("latin-1"))
        except BadParam as exc:
            self.reply(_plain(b"400 Bad Request", str(exc).encode(), keep), keep)
            return
        self.keep = keep
        self.transport.write(SSE_HEAD + (b"\r\n" if keep else b"Connection: close\r\n\r\n"))
        p = pacer()
        stream = self.busy = SseAnswer(self, n, rate, size, p.loop.time())
        if not stream.step(stream.start):  # the first event at once, the rest on the pacer's ticks
            p.add(stream)

    def start_big(self, query: bytes, keep: bool) -> None:
        try:
            size = big_params(query.decode("latin-1"))
        except BadParam as exc:
            self.reply(_plain(b"400 Bad Request", str(exc).encode(), keep), keep)
            return
        self.keep = keep
        conn = b"" if keep else b"Connection: close\r\n"
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
                             b"%s\r\n" % (size, conn))
        self.busy = BigAnswer(self, size)
        self.busy.pump()

    def answered(self) -> None:
        """The multi-write answer is all written: close, or answer what was pipelined behind it."""
        self.busy = None
        if not self.keep:
            self.transport.close()
            return
        while self.waiting and self.busy is None and not self.transport.is_closing():
            self.answer(*self.waiting.popleft())


class TickClock:
    """The aiohttp impl's pacing: one timer per loop wakes every stream waiting for the next tick."""

    def __init__(self):
        self._waiters: list[asyncio.Future[None]] = []

    def next_tick(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if not self._waiters:
            loop.call_later(TICK_S, self._fire)
        fut = loop.create_future()  # one per waiter: a cancelled stream cancels its own only
        self._waiters.append(fut)
        return fut

    def _fire(self) -> None:
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)


async def main_aiohttp(sock: str | None, port: int | None) -> None:
    """The same answers from an aiohttp server: what a typical Python model service costs per request."""
    from aiohttp import web

    clock = TickClock()

    def bad(exc: BadParam) -> web.Response:
        return web.Response(status=400, text=str(exc))

    async def sse(request: web.BaseRequest) -> web.StreamResponse:
        try:
            n, rate, size = sse_params(request.query_string)
        except BadParam as exc:
            return bad(exc)
        loop = asyncio.get_running_loop()
        event = sse_event(size)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        start, sent = loop.time(), 0
        try:
            while True:
                due = min(n, int((loop.time() - start) * rate) + 1)
                if due > sent:
                    await resp.write(event * (due - sent))
                    sent = due
                if sent >= n:
                    break
                await clock.next_tick()
            await resp.write(DONE_EVENT)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away: this answer ends here
        return resp

    async def big(request: web.BaseRequest) -> web.StreamResponse:
        try:
            size = big_params(request.query_string)
        except BadParam as exc:
            return bad(exc)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        try:
            while size > 0:
                n = min(size, PIECE)
                await resp.write(_FILL[:n])
                size -= n
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == SSE_PATH:
            return await sse(request)
        if request.method == "GET" and request.path == BIG_PATH:
            return await big(request)
        if request.method == "POST" and request.path == SINK_PATH:
            size = 0
            async for data in request.content.iter_any():
                size += len(data)
            return web.Response(text=str(size))
        if request.method == "POST" and request.path == CHAT_PATH:
            await request.read()  # as a real service would; the answer does not depend on it
            return web.Response(body=CHAT_BODY, content_type="application/json")
        return web.Response(body=BODY, content_type="text/plain")

    runner = web.ServerRunner(web.Server(answer), handle_signals=False, access_log=None)
    await runner.setup()
    if sock:
        if os.path.exists(sock):
            os.unlink(sock)
        await web.UnixSite(runner, sock, backlog=BACKLOG).start()
    if port:
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=BACKLOG).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"trivial_upstream (aiohttp) ready socket={sock} port={port}", flush=True)
    await stop.wait()
    await runner.cleanup()


async def main(sock: str | None, port: int | None) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    if sock:
        if os.path.exists(sock):
            os.unlink(sock)
        servers.append(await loop.create_unix_server(Http, sock, backlog=BACKLOG))
    if port:
        servers.append(await loop.create_server(Http, "127.0.0.1", port, reuse_address=True, backlog=BACKLOG))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"trivial_upstream ready socket={sock} port={port}", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket")
    ap.add_argument("--port", type=int)
    ap.add_argument("--impl", choices=("raw", "aiohttp"), default="raw",
                    help="raw: uvloop + httptools protocol (as fast as Python gets); aiohttp: a web.Server")
    a = ap.parse_args()
    import uvloop
    entry = main if a.impl == "raw" else main_aiohttp
    uvloop.run(entry(a.socket or os.environ.get("GPU_SUPERVISOR_SOCKET"), a.port))
