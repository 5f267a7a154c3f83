"""A trivial, fast HTTP/1.1 upstream for benchmarks: answers "hello" on a Unix socket and a TCP port.

Built on uvloop + httptools so that the upstream is not what limits the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import httptools

BODY = b"hello"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
CLOSE_RESPONSE = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


class Http(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self):
        if self.parser.should_keep_alive():
            self.transport.write(RESPONSE)
        else:
            self.transport.write(CLOSE_RESPONSE)
            self.transport.close()


async def main_aiohttp(sock: str | None, port: int | None) -> None:
    """The same answer from an aiohttp server: what a typical Python model service costs per request."""
    from aiohttp import web

    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(body=BODY, content_type="text/plain")

    runner = web.ServerRunner(web.Server(hello), handle_signals=False, access_log=None)
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
