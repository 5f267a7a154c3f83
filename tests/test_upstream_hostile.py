"""The lean upstream client against a real hostile worker process: malformed answers are refused, counted,
and never desynchronise a kept-alive connection."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from supervisor.upstream import PROTOCOL_ERROR_KINDS, UpstreamConnection, UpstreamError, UpstreamPool
from tests.harness import wait_until

HOSTILE = Path(__file__).resolve().parent / "workers" / "hostile_worker.py"
MIB = 1 << 20


@pytest.fixture(scope="module")
def hostile_socket():
    """A real hostile_worker process on a Unix socket under a short temp dir."""
    d = tempfile.mkdtemp(prefix="gs-")
    path = os.path.join(d, "w.sock")
    proc = subprocess.Popen([sys.executable, str(HOSTILE), "--socket", path])
    deadline = time.monotonic() + 15
    try:
        while True:
            assert proc.poll() is None, f"hostile_worker exited with {proc.returncode}"
            if os.path.exists(path):
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(path)
                        break
                    except OSError:
                        pass
            assert time.monotonic() < deadline, "hostile_worker's socket never accepted a connection"
            time.sleep(0.02)  # polling a condition (the socket) with a deadline
        yield path
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


class Seen:
    """Collects the kinds passed to on_protocol_error."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def __call__(self, kind: str) -> None:
        self.kinds.append(kind)


def head(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: worker\r\n\r\n".encode()


async def exchange(pool: UpstreamPool, path: str) -> tuple[UpstreamConnection, bool, bytes]:
    """One GET through the pool the way the proxy does it; the connection is NOT put back."""
    conn, reused = await pool.get()
    async with asyncio.timeout(30):
        try:
            await conn.start(head(path), b"", False)
            parts = []
            while chunk := await conn.read():
                parts.append(chunk)
        except BaseException:
            conn.abort()
            raise
    return conn, reused, b"".join(parts)


def header(conn: UpstreamConnection, name: bytes) -> bytes | None:
    for k, v in conn.headers:
        if k.lower() == name.lower():
            return v
    return None


async def control(path: str, url: str) -> bytes:
    """A request on a pool of its own (so it never takes a connection under test)."""
    pool = UpstreamPool(path)
    try:
        conn, _, body = await exchange(pool, url)
        assert conn.status == 200, (url, conn.status, body)
        return body
    finally:
        pool.close()


@pytest.fixture
async def pool(hostile_socket):
    seen = Seen()
    p = UpstreamPool(hostile_socket, on_protocol_error=seen)
    p.seen = seen  # type: ignore[attr-defined]
    yield p
    p.close()


async def test_kept_alive_connection_is_reused(pool):
    c1, reused1, body1 = await exchange(pool, "/ok")
    pool.put(c1)
    c2, reused2, body2 = await exchange(pool, "/ok")
    assert (body1, body2, reused1, reused2) == (b"ok", b"ok", False, True)
    assert c1 is c2 and header(c1, b"X-Conn") == header(c2, b"X-Conn")
    assert pool.protocol_errors == {}


async def test_bytes_past_content_length_keep_the_answer_and_close_the_connection(pool):
    conn, _, body = await exchange(pool, "/extra")
    assert conn.status == 200 and body == b"first"
    assert header(conn, b"Location") is None  # nothing of the second answer leaked in
    assert conn.closed and not conn.reusable()
    assert pool.protocol_errors == {"extra_bytes": 1} and pool.seen.kinds == ["extra_bytes"]
    first_conn = header(conn, b"X-Conn")
    pool.put(conn)
    nxt, reused, body = await exchange(pool, "/ok")
    assert not reused and nxt is not conn
    assert nxt.status == 200 and body == b"ok" and header(nxt, b"X-Conn") != first_conn


async def test_unsolicited_bytes_on_an_idle_pooled_connection_close_it(pool, hostile_socket):
    conn, _, body = await exchange(pool, "/linger")
    assert body == b"ok"
    pool.put(conn)
    assert not conn.closed
    assert await control(hostile_socket, "/poke") == b"1"
    await wait_until(lambda: conn.closed, what="the poked idle connection to be closed")
    assert pool.protocol_errors == {"extra_bytes": 1}
    nxt, reused, body = await exchange(pool, "/ok")
    assert not reused and nxt is not conn and body == b"ok"


async def test_endless_header_line_fails_fast_and_stops_reading(pool, hostile_socket):
    with pytest.raises(UpstreamError) as ei:
        await exchange(pool, f"/endless-header?bytes={50 * MIB}&tag=endless1")
    assert ei.value.kind == "protocol" and "65536" in ei.value.detail
    assert pool.protocol_errors == {"head_too_large": 1}
    await wait_until(lambda: pool.open_connections == 0, what="the connection to be closed")
    stats = {}

    async def worker_gave_up() -> bool:
        stats.update(json.loads(await control(hostile_socket, "/stats?tag=endless1")))
        return stats["done"]

    await wait_until(worker_gave_up, timeout=20, what="the worker to see the connection closed")
    # the client stopped reading at the limit: only socket buffers' worth of the 50 MB ever left the worker
    assert stats["sent"] < 8 * MIB, stats


async def test_head_limit_is_a_constructor_parameter_and_spares_the_body(hostile_socket):
    small = UpstreamPool(hostile_socket, max_head_bytes=1024)
    try:
        with pytest.raises(UpstreamError, match="1024"):
            await exchange(small, "/endless-header?bytes=4096&tag=small")
        assert small.protocol_errors == {"head_too_large": 1}
        # a 1 MiB body arrives in the same reads as the head: only the head counts against the limit
        conn, _, body = await exchange(small, f"/big?bytes={MIB}")
        assert conn.status == 200 and body == b"x" * MIB
        small.put(conn)
        conn2, reused, body = await exchange(small, "/ok")
        assert reused and body == b"ok"
    finally:
        small.close()


async def test_too_many_headers_is_a_protocol_error(pool):
    conn, _, _ = await exchange(pool, "/many-headers?n=100")  # the default limit is 100 lines
    assert conn.status == 200 and len(conn.headers) == 100
    with pytest.raises(UpstreamError) as ei:
        await exchange(pool, "/many-headers?n=101")
    assert ei.value.kind == "protocol" and "100 header" in ei.value.detail
    assert pool.protocol_errors == {"too_many_headers": 1}


async def test_status_101_is_refused(pool):
    with pytest.raises(UpstreamError) as ei:
        await exchange(pool, "/status?code=101")
    assert ei.value.kind == "protocol" and "101" in ei.value.detail
    assert pool.protocol_errors == {"upgrade": 1}
    await wait_until(lambda: pool.open_connections == 0, what="the connection to be closed")


@pytest.mark.parametrize("code", ["999", "600", "099"])
async def test_status_outside_100_599_is_refused(pool, code):
    with pytest.raises(UpstreamError) as ei:
        await exchange(pool, f"/status?code={code}")
    assert ei.value.kind == "protocol" and str(int(code)) in ei.value.detail
    assert pool.protocol_errors == {"bad_status": 1}


@pytest.mark.parametrize("url", ["/status?code=0", "/status?code=abc", "/status?code=1000", "/garbage"])
async def test_unparseable_answers_are_protocol_errors(pool, url):
    with pytest.raises(UpstreamError) as ei:
        await exchange(pool, url)
    assert ei.value.kind == "protocol" and ei.value.started
    assert pool.protocol_errors == {"invalid_http": 1}


@pytest.mark.parametrize("codes", ["100", "103", "100,103", "102,100"])
async def test_interim_answers_are_skipped(pool, codes):
    conn, _, body = await exchange(pool, f"/interim?codes={codes}")
    assert conn.status == 200 and body == b"final"
    assert header(conn, b"Link") is None  # the 103's headers are not the answer's
    pool.put(conn)
    again, reused, body = await exchange(pool, "/ok")
    assert reused and again is conn and body == b"ok"
    assert pool.protocol_errors == {}


async def test_last_rx_moves_when_a_slow_stream_sends_a_byte(pool, hostile_socket):
    conn, _ = await pool.get()
    async with asyncio.timeout(30):
        await conn.start(head("/drip?tag=drip1"), b"", False)
        assert await conn.read() == b"a"
        assert conn.outstanding and not conn.complete
        assert pool.in_flight == 1
        before = conn.last_rx
        silent = pool.silent_for(time.monotonic())
        assert silent is not None and silent >= 0
        await control(hostile_socket, "/drip-send?tag=drip1")
        assert await conn.read() == b"b"
        assert conn.last_rx > before
        assert pool.silent_for(conn.last_rx) == 0.0
        await control(hostile_socket, "/drip-end?tag=drip1")
        assert await conn.read() == b""
    assert conn.complete and not conn.outstanding
    assert pool.in_flight == 0 and pool.silent_for(time.monotonic()) is None
    pool.put(conn)


def test_protocol_error_kinds_are_fixed_labels():
    assert len(set(PROTOCOL_ERROR_KINDS)) == len(PROTOCOL_ERROR_KINDS)
    assert {"extra_bytes", "head_too_large", "too_many_headers", "bad_status", "upgrade"} <= set(
        PROTOCOL_ERROR_KINDS)


@pytest.mark.parametrize("kw", [{"max_head_bytes": 10}, {"max_headers": 0}])
def test_pool_refuses_nonsense_limits(kw):
    with pytest.raises(ValueError):
        UpstreamPool("/nonexistent.sock", **kw)


async def test_a_slow_reader_is_progress_not_silence(pool):
    """Reading paused because the client reads slowly: the worker is held back, not hung."""
    conn, _ = await pool.get()
    async with asyncio.timeout(30):
        await conn.start(head(f"/big?bytes={4 * MIB}"), b"", False)
        await wait_until(lambda: conn.reading_paused, what="reading to pause past HIGH_WATER")
        assert conn.outstanding
        assert pool.silent_for(time.monotonic() + 3600) == 0.0
        parts = []
        while chunk := await conn.read():
            parts.append(chunk)
    assert b"".join(parts) == b"x" * (4 * MIB)
    assert not conn.reading_paused and pool.silent_for(time.monotonic()) is None
    pool.put(conn)


async def test_closing_the_pool_fails_the_exchanges_still_waiting(pool):
    """An incarnation's pool is closed once its worker exited, maybe before the kernel's reset of its
    connections reached the event loop: an exchange still waiting (for the head, for the body) fails at
    once as a reset, never waits for an answer that cannot come (a client's request stuck until it gave up)."""
    unanswered, _ = await pool.get()
    head_wait = unanswered.start(b"POST /ok HTTP/1.1\r\nHost: worker\r\nContent-Length: 10\r\n\r\n", None, False)
    streaming, _ = await pool.get()
    await streaming.start(head("/drip?tag=pool-close"), b"", False)
    assert await streaming.read() == b"a"
    body_wait = asyncio.ensure_future(streaming.read())
    pool.close()
    async with asyncio.timeout(10):
        with pytest.raises(UpstreamError) as nothing_came:
            await head_wait
        with pytest.raises(UpstreamError) as cut:
            await body_wait
    assert nothing_came.value.kind == "reset" and not nothing_came.value.started
    assert cut.value.kind == "reset" and cut.value.started
