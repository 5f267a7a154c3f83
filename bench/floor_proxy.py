"""The floor under gpu-supervisor's request path: the daemon's own HTTP server (supervisor.http.server, the
same strict httptools protocol on uvloop) and upstream pool (supervisor.upstream, kept-alive Unix-socket
connections), forwarding each request to the worker's socket with nothing else.

No admission, queue, routing, replica book, breaker, metrics, budgets, request ids or logging: only the
parse, the two writes and the event loop. What gpu-supervisor costs above this column in the same run is
its request path's bookkeeping; what this column costs above nginx is the Python server itself.
Answers are relayed whole (the bench's answers are small); a streamed answer is out of its scope.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.http.framing import HOP_BY_HOP, RESPONSE_DROP, gather  # noqa: E402
from supervisor.http.server import HttpServer  # noqa: E402
from supervisor.http.wire import ServerLimits  # noqa: E402
from supervisor.upstream import UpstreamPool  # noqa: E402

LIMIT = 1 << 20


async def main(sock: str, port: int) -> None:
    pool = UpstreamPool(sock)

    async def forward(request, responder) -> None:
        body = await request.read(LIMIT) if request.body_exists else b""
        fields = [request.method.encode(), b" ", request.raw_path.encode(), b" HTTP/1.1\r\n"]
        for k, v in request.raw_headers:
            if k.lower() not in HOP_BY_HOP:
                fields += (k, b": ", v, b"\r\n")
        fields.append(b"Content-Length: %d\r\n\r\n" % len(body) if body or request.method == "POST" else b"\r\n")
        conn = pool.take() or await pool.connect()
        try:
            await conn.start(b"".join(fields), body, request.method == "HEAD")
            chunks, done = ([], True) if conn.complete else await gather(conn, LIMIT)
            if not done:
                raise RuntimeError("the floor proxy relays small answers only")
        except BaseException:
            conn.abort()
            raise
        data = conn.take_buffered() if conn.complete and not chunks else b"".join(chunks)
        status, headers = conn.status, [kv for kv in conn.headers if kv[0].lower() not in RESPONSE_DROP]
        pool.put(conn)
        responder.send_now(status, headers, data)

    server = HttpServer(forward, ServerLimits())
    await server.start("127.0.0.1", port)
    print(f"floor_proxy ready port={port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    uvloop.run(main(a.socket, a.port))
