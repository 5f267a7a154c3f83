"""A worker that answers each request with exactly the bytes the request tells it to, for fuzzing the daemon's
worker side (tests/test_upstream_fuzz.py).

Run as ``python tests/workers/script_worker.py --socket PATH --control PATH`` (the socket falls back to
``GPU_SUPERVISOR_SOCKET``). A raw asyncio server, standard library only: no HTTP library writes its answers,
so they can be as broken as a test wants. On the worker socket:

- ``GET /healthz``: 200 "ok" (the daemon's health probe); the connection is kept.
- ``POST`` with a JSON body ``{"id": str, "parts": [base64, ...], "then": "keep" | "close", "gap_s": float}``
  (the script), or any method with that JSON, base64url-encoded, in the query argument ``script``: each part
  is written in its own write, ``gap_s`` (default 0.001) apart; then ``keep`` reads the next request on the
  same connection (so an incomplete answer is a stall: nothing more comes until the daemon gives up) and
  ``close`` closes the connection.
- anything else: 404.

On the control socket, ``GET /settled?id=X&timeout_s=T`` answers 200 once the script X has run and every run
of it is over (all its parts written, its connection closed if it said so), else 408 after T seconds: a test
waits on it so that no byte of one example is still on its way when the next example is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import sys
from urllib.parse import parse_qs, urlsplit

from raw_http import read_request  # (a sibling module: this worker runs as a script)

MAX_HEAD = 64 * 1024


class ScriptWorker:
    """The server's state: which scripts ran and how many runs of each are still writing."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.done: set[str] = set()
        self.changed = asyncio.Condition()

    async def _mark(self, sid: str, delta: int) -> None:
        async with self.changed:
            self.running[sid] = self.running.get(sid, 0) + delta
            if delta < 0:
                self.done.add(sid)
            self.changed.notify_all()

    def settled(self, sid: str) -> bool:
        return sid in self.done and self.running.get(sid, 0) == 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    return
                method, target, body = request
                if not await self.answer(method, target, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def answer(self, method: str, target: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False to close the connection after it."""
        if method == "GET" and urlsplit(target).path == "/healthz":
            writer.write(plain(200, b"ok"))
            await writer.drain()
            return True
        query = parse_qs(urlsplit(target).query)
        try:
            if "script" in query:
                script = json.loads(base64.urlsafe_b64decode(query["script"][-1]))
            else:
                script = json.loads(body) if method == "POST" else None
        except ValueError:
            script = None
        if not isinstance(script, dict) or "id" not in script:
            writer.write(plain(404, b"no script"))
            await writer.drain()
            return True
        sid = str(script["id"])
        gap = float(script.get("gap_s", 0.001))
        await self._mark(sid, +1)
        try:
            for i, part in enumerate(script.get("parts", [])):
                if i and gap > 0:
                    await asyncio.sleep(gap)
                writer.write(base64.b64decode(part))
                await writer.drain()
            if script.get("then") == "close":
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                return False
            return True
        finally:
            await self._mark(sid, -1)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            if request is None:
                return
            url = urlsplit(request[1])
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path != "/settled":
                writer.write(plain(404, b"no such path"))
                return
            sid = q.get("id", "")
            try:
                async with self.changed:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self.settled(sid)),
                                           float(q.get("timeout_s", "10")))
                writer.write(plain(200, b"settled"))
            except TimeoutError:
                writer.write(plain(408, json.dumps({"running": self.running.get(sid, 0),
                                                    "ran": sid in self.done}).encode()))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def plain(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


async def serve(path: str, control: str) -> None:
    worker = ScriptWorker()
    for p in (path, control):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    ctl = await asyncio.start_unix_server(worker.control, control)
    server = await asyncio.start_unix_server(worker.handle, path, limit=MAX_HEAD)
    async with ctl, server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", default=os.environ.get("GPU_SUPERVISOR_SOCKET"))
    ap.add_argument("--control", required=True)
    args = ap.parse_args(argv)
    if not args.socket:
        sys.exit("script_worker: give --socket PATH (or GPU_SUPERVISOR_SOCKET)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.socket, args.control))


if __name__ == "__main__":
    main()
