"""A real redis-server on a Unix socket in a temp dir, for the job store tests; stop/start to test outages."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """`redis-server --port 0 --unixsocket PATH --save "" --appendonly no`; the socket survives restarts.
    With `port`, it listens on 127.0.0.1:port too (for configs that take redis://HOST:PORT/DB only)."""

    def __init__(self, directory: Path, port: int = 0):
        self.dir = directory
        self.socket = str(directory / "redis.sock")
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    @property
    def tcp_url(self) -> str:
        assert self.port, "started without a TCP port"
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                r, w = await asyncio.open_unix_connection(self.socket)
                w.write(b"PING\r\n")
                await w.drain()
                line = await asyncio.wait_for(r.readline(), 2)
                w.close()
                if line.startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer PING")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            Path(self.socket).unlink()


@contextlib.asynccontextmanager
async def running_redis(port: int = 0):
    """A started RedisServer in a temp dir, stopped and removed after."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    d = Path(tempfile.mkdtemp(prefix="rds-"))
    server = RedisServer(d, port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def redis_server():
    async with running_redis() as server:
        yield server
