"""What the raw-socket test workers (hostile_worker.py, script_worker.py) share: reading one request off a
connection. Standard library only; imported as a sibling module, since those workers run as scripts."""

from __future__ import annotations

import asyncio


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    """Read one request: (method, target, body, de-chunked); None at a clean end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    except asyncio.LimitOverrunError:
        raise ValueError("request head too long") from None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    body = b""
    if chunked:
        pieces = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            pieces.append((await reader.readexactly(size + 2))[:-2])
            if size == 0:
                break
        body = b"".join(pieces)
    elif length:
        body = await reader.readexactly(length)
    return method, target, body
