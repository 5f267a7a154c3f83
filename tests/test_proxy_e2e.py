"""The proxy end to end: a real supervisor in front of the real ctl_worker over a real Unix socket."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess

import aiohttp
import pytest

from tests.harness import fast_config, wait_until
from tests.workers.util import big_body


@pytest.fixture
async def sup(supervisor_factory):
    return await supervisor_factory(fast_config(limits={"max_body_bytes": 4 * 1024 * 1024}))


async def test_get_and_headers(sup):
    async with sup.session.get("/echo?a=1", headers={"X-Request-ID": "req-123", "Connection": "keep-alive, X-Drop",
                                                       "X-Drop": "secret", "X-Forwarded-For": "10.1.1.1",
                                                       "Keep-Alive": "timeout=5"}) as r:
        assert r.status == 200
        assert r.headers["X-Request-ID"] == "req-123"
        assert r.headers["X-Supervisor-Attempts"] == "1"
        assert float(r.headers["X-Supervisor-Queue-Ms"]) >= 0
        assert "X-Degraded" not in r.headers
        body = await r.json()
    h = body["headers"]
    assert body["query_string"] == "a=1"
    assert h["x-request-id"] == "req-123"
    assert h["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == f"127.0.0.1:{sup.port}"
    for hop in ("connection", "keep-alive", "x-drop", "transfer-encoding"):
        assert hop not in h, hop


async def test_request_id_made_when_absent(sup):
    async with sup.session.get("/echo") as r:
        rid = r.headers["X-Request-ID"]
        assert len(rid) >= 16
        assert (await r.json())["headers"]["x-request-id"] == rid


async def test_post_bodies_small_and_large(sup):
    for size in (0, 10, 300_000, 3 * 1024 * 1024):
        data = os.urandom(size)
        async with sup.session.post("/echo", data=data) as r:
            assert r.status == 200
            body = await r.json()
        assert body["body_length"] == size
        assert body["body_sha256"] == hashlib.sha256(data).hexdigest()


async def test_chunked_request_body_streams_through(sup):
    async def gen():
        for i in range(50):
            yield bytes([i]) * 10_000

    async with sup.session.post("/echo", data=gen()) as r:
        assert r.status == 200
        body = await r.json()
    expected = b"".join(bytes([i]) * 10_000 for i in range(50))
    assert body["body_sha256"] == hashlib.sha256(expected).hexdigest()


async def test_large_response_body(sup):
    n = 5 * 1024 * 1024 + 7
    async with sup.session.get(f"/big?bytes={n}") as r:
        assert r.status == 200
        assert int(r.headers["Content-Length"]) == n
        assert await r.read() == big_body(n)


async def test_sse_arrives_event_by_event(sup):
    async with sup.session.get("/stream?n=4&interval=0.3") as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await r.content.readline()
        # the first event is here while the worker is still producing the rest
        status = await sup.status()
        assert status["queue"]["inflight"] == 1
        assert first.startswith(b"data: ")
        rest = await r.read()
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_chunked_answer(sup):
    async with sup.session.get("/chunked?n=3&interval=0.05") as r:
        text = await r.text()
    assert text.endswith("done\n") and text.count("line") == 3


async def test_body_over_limit_is_413_json(sup):
    data = b"x" * (4 * 1024 * 1024 + 1)
    async with sup.session.post("/echo", data=data) as r:
        assert r.status == 413
        err = (await r.json())["error"]
    assert err["type"] == "payload_too_large" and "max_body_bytes" in err["message"]
    assert err["request_id"]


async def test_chunked_body_over_limit_is_413(sup):
    async def gen():
        for _ in range(5):
            yield b"y" * (1024 * 1024)

    async with sup.session.post("/echo", data=gen()) as r:
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "payload_too_large"
    async with sup.session.get("/echo") as r:
        assert r.status == 200


async def test_bad_request_id_is_400(sup):
    async with sup.session.get("/echo", headers={"X-Request-ID": "a b"}) as r:
        assert r.status == 400
        assert "X-Request-ID" in (await r.json())["error"]["message"]


def raw_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except TimeoutError:
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


async def test_malformed_http_gets_json_400_and_daemon_survives(sup):
    for payload, status in ((b"GARBAGE\r\n\r\n", b"400"), (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"400"),
                            # a header field over limits.max_header_bytes: 431, as nginx answers
                            (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431")):
        out = await asyncio.to_thread(raw_exchange, sup.port, payload)
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == status, out[:200]
        assert json.loads(body)["error"]["type"] == "bad_request"
    async with sup.session.get("/echo") as r:
        assert r.status == 200


async def test_worker_garbage_and_close_are_502_and_others_unaffected(sup):
    async def normal():
        async with sup.session.get("/sleep?s=0.3") as r:
            return r.status

    other = asyncio.create_task(normal())
    for path in ("/garbage", "/close"):
        async with sup.session.get(path) as r:
            assert r.status == 502, path
            err = (await r.json())["error"]
            assert err["type"] == "worker_error"
    assert await other == 200
    st = await sup.status()
    assert st["worker"]["restarts"] == 0  # a misbehaving answer does not kill the worker


async def test_client_disconnect_mid_request_releases_everything(sup):
    before = await _open_fds(sup)
    for _ in range(5):
        with pytest.raises((asyncio.TimeoutError, aiohttp.ClientError)):
            async with sup.session.get("/sleep?s=5", timeout=aiohttp.ClientTimeout(total=0.2)) as r:
                await r.read()
    await wait_until(lambda: _inflight_zero(sup), 10, "inflight back to 0")
    counter = await _counter(sup)
    await wait_until(lambda: _disconnects(sup, 5), 10, "worker saw 5 disconnects")
    async with sup.session.get("/echo") as r:
        assert r.status == 200
    after = await _open_fds(sup)
    assert after <= before + 3, (before, after, counter)
    # the clients that left are counted, as nginx does, with code 499
    assert 'gpu_supervisor_requests_total{code="499",priority="normal",worker="default"} 5.0' in await sup.metrics()


async def _counter(sup):
    async with sup.session.get("/counter") as r:
        return await r.json()


async def _disconnects(sup, n):
    return (await _counter(sup))["disconnects"] >= n


async def _inflight_zero(sup):
    return (await sup.status())["queue"]["inflight"] == 0


async def _open_fds(sup) -> int:
    return len(os.listdir(f"/proc/{sup.proc.pid}/fd"))


async def test_many_concurrent_requests_no_leak(sup):
    before = await _open_fds(sup)

    async with aiohttp.ClientSession(sup.url) as burst:
        async def one(i):
            async with burst.post("/echo", data=str(i).encode()) as r:
                return r.status, (await r.json())["body"]

        results = await asyncio.gather(*(one(i) for i in range(300)))
        during = await _open_fds(sup)
    assert [b for _, b in results] == [str(i) for i in range(300)]
    assert {s for s, _ in results} == {200}
    assert during > before  # the burst's client connections were really open
    # once the clients are gone, only the kept-alive worker connections (<= concurrency) remain
    await wait_until(lambda: _fds_at_most(sup, before + 4), 10, "client sockets closed")


async def _fds_at_most(sup, n):
    return await _open_fds(sup) <= n


async def test_head_request(sup):
    async with sup.session.head("/big?bytes=1000") as r:
        assert r.status == 200
    async with sup.session.get("/echo") as r:
        assert r.status == 200  # the connection to the worker was not confused by a bodiless answer


async def test_metrics_pass_promtool(sup):
    async with sup.session.get("/echo"):
        pass
    async with sup.session.get("/status/503"):
        pass
    text = await sup.metrics()
    assert 'gpu_supervisor_requests_total{code="200",priority="normal",worker="default"}' in text
    assert 'gpu_supervisor_requests_total{code="503",priority="normal",worker="default"}' in text
    assert 'gpu_supervisor_worker_state{gpu_supervisor_worker_state="ready",replica="0",worker="default"} 1.0' in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by the test setup (Debian package prometheus)"
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_status_fields(sup):
    st = await sup.status()
    for key in ("version", "uptime_s", "ready", "worker", "queue", "breaker", "gpu", "config"):
        assert key in st
    w = st["worker"]
    for key in ("state", "pid", "restarts", "last_exit", "started_at", "degraded"):
        assert key in w
    assert set(st["queue"]["depth"]) == {"critical", "high", "normal", "low"}
    assert st["queue"]["concurrency"] == 4
    assert st["breaker"]["state"] == "closed"
    assert st["gpu"]["available"] in (True, False)


async def test_admin_listener_and_token(supervisor_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    sp = await supervisor_factory(fast_config(admin={"listen": {"host": "127.0.0.1", "port": 0},
                                                     "token_file": str(token)}), wait_ready=False)
    assert sp.admin_port and sp.admin_port != sp.port
    admin = f"http://127.0.0.1:{sp.admin_port}"
    async with aiohttp.ClientSession() as s:
        await wait_until(lambda: _ok(s, admin + "/readyz"), 20, "admin readyz")
        async with s.get(admin + "/status") as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "unauthorized"
        async with s.get(admin + "/metrics", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200
        # on the main listener the admin paths belong to the worker now
        async with s.get(f"http://127.0.0.1:{sp.port}/healthz") as r:
            assert r.status == 200 and "pid" in await r.json()


async def _ok(s, url):
    try:
        async with s.get(url) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False
