"""A worker that answers malformed HTTP on demand: bytes past its answer, endless heads, bad statuses.

Run as ``python tests/workers/hostile_worker.py --socket PATH`` (the socket falls back to
``GPU_SUPERVISOR_SOCKET``, so it also works as a supervisor's ``worker.command``). It speaks raw HTTP/1.1
over asyncio streams, standard library only, so it can break the protocol in ways a framework would not.
Every answer on a connection carries ``X-Conn: <n>`` (the connection's serial number) when it is well
formed. Paths (query arguments in brackets):

- ``/healthz``, ``/ok``: 200 "ok".
- ``/extra``: 200 "first" (Content-Length 5) and, in the same write, a second answer 302 ``Location: /evil``.
- ``/linger``: 200 "ok"; the connection is remembered until ``/poke`` writes an unsolicited answer to it.
- ``/poke``: writes ``HTTP/1.1 200 OK ... junk`` on every lingering connection; answers how many.
- ``/endless-header`` [bytes, tag]: a header line of `bytes` bytes that never ends; the count the kernel
  accepted goes to ``/stats?tag=``.
- ``/many-headers`` [n]: an empty 200 with n header lines (Content-Length among them).
- ``/big`` [bytes]: 200 with a body of `bytes` "x" (head and body in one write).
- ``/status`` [code]: the status line ``HTTP/1.1 <code> Whatever`` (any text), Content-Length 2, "ok".
- ``/garbage``: bytes that are not HTTP.
- ``/interim`` [codes]: each interim answer (e.g. 100,103) in its own write, then 200 "final".
- ``/drip`` [tag]: a chunked 200 with one chunk "a"; ``/drip-send?tag=`` sends one more byte,
  ``/drip-end?tag=`` ends it.
- ``/stats`` [tag]: JSON ``{"sent": n, "done": bool}`` of an endless header.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
from urllib.parse import parse_qs, urlsplit

from raw_http import read_request  # (a sibling module: this worker runs as a script)

MAX_HEAD = 64 * 1024
PIECE = 64 * 1024


class HostileWorker:
    """The server's state: lingering connections, dripping streams, counters of endless heads."""

    def __init__(self) -> None:
        self.serial = itertools.count(1)
        self.lingering: list[asyncio.StreamWriter] = []
        self.drips: dict[str, asyncio.Queue[bytes | None]] = {}
        self.stats: dict[str, dict] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self.serial)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    return
                method, target, _ = request
                keep = await self.answer(method, target, conn, reader, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def answer(self, method: str, target: str, conn: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> bool:
        """Write the answer for one request; False to close the connection after it."""
        url = urlsplit(target)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path in ("/healthz", "/ok"):
            writer.write(plain(200, b"ok", conn))
        elif path == "/extra":
            writer.write(plain(200, b"first", conn)
                         + b"HTTP/1.1 302 Found\r\nLocation: /evil\r\nContent-Length: 6\r\n\r\nsecond")
        elif path == "/linger":
            writer.write(plain(200, b"ok", conn))
            self.lingering.append(writer)
        elif path == "/poke":
            victims, self.lingering = self.lingering, []
            for w in victims:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\njunk")
            writer.write(plain(200, str(len(victims)).encode(), conn))
        elif path == "/endless-header":
            await self.endless_header(q.get("tag", ""), int(q.get("bytes", str(50 << 20))), reader, writer)
            return False
        elif path == "/many-headers":
            lines = b"".join(b"X-H-%d: v\r\n" % i for i in range(int(q.get("n", "1000")) - 1))
            writer.write(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 0\r\n\r\n")
        elif path == "/big":
            writer.write(plain(200, b"x" * int(q.get("bytes", "1048576")), conn))
        elif path == "/status":
            code = q.get("code", "999").encode()
            writer.write(b"HTTP/1.1 " + code + b" Whatever\r\nContent-Length: 2\r\nX-Conn: %d\r\n\r\nok" % conn)
        elif path == "/garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            return False
        elif path == "/interim":
            for code in q.get("codes", "100").split(","):
                link = b"Link: </style.css>; rel=preload\r\n" if code == "103" else b""
                writer.write(b"HTTP/1.1 " + code.encode() + b" Interim\r\n" + link + b"\r\n")
                await writer.drain()
            writer.write(plain(200, b"final", conn))
        elif path == "/drip":
            await self.drip(q.get("tag", ""), conn, writer)
        elif path in ("/drip-send", "/drip-end"):
            drip = self.drips.get(q.get("tag", ""))
            if drip is not None:
                drip.put_nowait(b"b" if path == "/drip-send" else None)
            writer.write(plain(200 if drip is not None else 404, b"ok", conn))
        elif path == "/stats":
            body = json.dumps(self.stats.get(q.get("tag", ""), {"sent": 0, "done": False})).encode()
            writer.write(plain(200, body, conn))
        else:
            writer.write(plain(404, b"no such path", conn))
        await writer.drain()
        return True

    async def endless_header(self, tag: str, total: int, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        st = self.stats[tag] = {"sent": 0, "done": False}
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            piece = b"a" * PIECE
            while st["sent"] < total:
                writer.write(piece)
                await writer.drain()
                st["sent"] += len(piece)
            await reader.read()  # never end the line; wait for the client to give up
        except ConnectionError:
            pass
        finally:
            st["done"] = True

    async def drip(self, tag: str, conn: int, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)
        self.drips[tag] = queue
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Conn: %d\r\n\r\n1\r\na\r\n" % conn)
            await writer.drain()
            while (piece := await queue.get()) is not None:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        finally:
            self.drips.pop(tag, None)


def plain(status: int, body: bytes, conn: int) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nX-Conn: %d\r\n\r\n%s" % (status, len(body), conn, body)


async def serve(path: str) -> None:
    worker = HostileWorker()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(worker.handle, path, limit=MAX_HEAD)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", default=os.environ.get("GPU_SUPERVISOR_SOCKET"))
    args = ap.parse_args(argv)
    if not args.socket:
        sys.exit("hostile_worker: give --socket PATH (or GPU_SUPERVISOR_SOCKET)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.socket))


if __name__ == "__main__":
    main()
