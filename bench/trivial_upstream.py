"""A trivial, fast HTTP/1.1 upstream for benchmarks, on a Unix socket and a TCP port: a fake OpenAI server.

`POST /v1/chat/completions` gets a fixed, valid chat.completion JSON; any other request gets "hello".
Every answer is encoded once, at import, and built on uvloop + httptools (the `raw` impl) so that the
upstream is not what limits the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

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


def _response(content_type: bytes, body: bytes) -> tuple[bytes, bytes]:
    """One answer, pre-encoded: (kept-alive, closing)."""
    keep = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (content_type, len(body), body)
    return keep, keep.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


RESPONSE, CLOSE_RESPONSE = _response(b"text/plain", BODY)
CHAT_RESPONSE, CHAT_CLOSE_RESPONSE = _response(b"application/json", CHAT_BODY)
_CHAT_PATH = CHAT_PATH.encode()


class Http(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self):
        self.url = b""

    def on_url(self, url: bytes):
        self.url += url  # may come in pieces

    def on_message_complete(self):
        chat = self.parser.get_method() == b"POST" and self.url.split(b"?", 1)[0] == _CHAT_PATH
        if self.parser.should_keep_alive():
            self.transport.write(CHAT_RESPONSE if chat else RESPONSE)
        else:
            self.transport.write(CHAT_CLOSE_RESPONSE if chat else CLOSE_RESPONSE)
            self.transport.close()


async def main_aiohttp(sock: str | None, port: int | None) -> None:
    """The same answers from an aiohttp server: what a typical Python model service costs per request."""
    from aiohttp import web

    async def answer(request: web.BaseRequest) -> web.Response:
        if request.method == "POST" and request.path == CHAT_PATH:
            await request.read()  # as a real service would; the answer does not depend on it
            return web.Response(body=CHAT_BODY, content_type="application/json")
        return web.Response(body=BODY, content_type="text/plain")

    runner = web.ServerRunner(web.Server(answer), handle_signals=False, access_log=None)
    await runner.setup()
    if sock:
        if os.path.exists(sock):
            os.unlink(sock)
        await web.UnixSite(runner, sock).start()
    if port:
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
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
        servers.append(await loop.create_unix_server(Http, sock))
    if port:
        servers.append(await loop.create_server(Http, "127.0.0.1", port, reuse_address=True))
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
