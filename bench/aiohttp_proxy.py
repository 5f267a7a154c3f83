"""The baseline the issue names: a bare-bones reverse proxy on aiohttp's ClientSession over a Unix socket.

No queue, no breaker, no metrics: only what it costs to forward with aiohttp's client.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer"}


async def main(sock: str, port: int) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock, limit=256), auto_decompress=False)

    async def forward(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        async with session.request(request.method, "http://worker" + request.raw_path, data=body or None,
                                   headers={k: v for k, v in request.headers.items() if k.lower() not in HOP}) as r:
            data = await r.read()
            return web.Response(status=r.status, body=data,
                                headers={k: v for k, v in r.headers.items() if k.lower() not in HOP})

    runner = web.ServerRunner(web.Server(forward), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"aiohttp_proxy ready port={port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    uvloop.run(main(a.socket, a.port))
