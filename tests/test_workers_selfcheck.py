"""The test workers themselves behave as the supervisor tests assume (fast; real processes)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import aiohttp
import pytest

from tests.workers.util import (
    GUNICORN_COMMAND,
    UVICORN_COMMAND,
    WorkerExited,
    big_body,
    running_ctl_worker,
    running_worker,
    socket_path,
    start_ctl_worker,
    stop_worker,
    unix_session,
    wait_exit,
    wait_for_socket_health,
)


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return socket_path(tmp_path)


async def test_starts_fast_and_answers_health(sock: str) -> None:
    t0 = time.monotonic()
    async with running_ctl_worker(sock) as proc, unix_session(sock) as s:
        took = time.monotonic() - t0
        async with s.get("/healthz") as r:
            assert r.status == 200
            assert (await r.json()) == {"status": "ok", "pid": proc.pid}
            assert r.headers["X-Worker-Pid"] == str(proc.pid)
    assert took < 2.0  # generous for a loaded CI box; typically ~0.2 s


async def test_echo_reports_request(sock: str) -> None:
    body = b"x" * 100_000
    async with running_ctl_worker(sock), unix_session(sock) as s:
        async with s.put("/echo?a=1&b=two", data=body, headers={"X-Test": "yes"}) as r:
            assert r.status == 200
            data = await r.json()
    assert data["method"] == "PUT"
    assert data["path"] == "/echo"
    assert data["query_string"] == "a=1&b=two"
    assert data["headers"]["x-test"] == "yes"
    assert data["body_length"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_stream_events_arrive_one_by_one(sock: str) -> None:
    async with running_ctl_worker(sock), unix_session(sock) as s:
        async with s.get("/stream?n=4&interval=0.1") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events: list[tuple[float, bytes]] = []
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append((time.monotonic(), line[6:].strip()))
    payloads = [e[1] for e in events]
    assert payloads == [b'{"i": 0}', b'{"i": 1}', b'{"i": 2}', b'{"i": 3}', b"[DONE]"]
    # Spread over time, not one lump at the end.
    assert events[3][0] - events[0][0] >= 0.2


async def test_big_body_is_the_known_pattern(sock: str) -> None:
    n = 3 * 1024 * 1024 + 17
    async with running_ctl_worker(sock), unix_session(sock) as s:
        async with s.get(f"/big?bytes={n}") as r:
            assert r.content_length == n
            assert await r.read() == big_body(n)


async def test_counter_and_memory(sock: str) -> None:
    async with running_ctl_worker(sock), unix_session(sock) as s:
        for _ in range(3):
            async with s.get("/hello") as r:
                assert await r.text() == "hello"
        async with s.get("/leak?mb=64") as r:
            leaked = await r.json()
        async with s.post("/cleanup") as r:
            cleaned = await r.json()
        async with s.get("/counter") as r:
            counts = await r.json()
    assert leaked["leaked_bytes"] == 64 << 20
    assert cleaned["freed_bytes"] == 64 << 20
    assert cleaned["rss_bytes"] < leaked["rss_bytes"] - (32 << 20)
    assert counts["paths"]["/hello"] == 3
    assert counts["cleanup_calls"] == 1
    assert "/sleep" not in counts["paths"]


async def test_oom_answer_and_status(sock: str) -> None:
    async with running_ctl_worker(sock), unix_session(sock) as s:
        async with s.get("/oom") as r:
            assert r.status == 503
            assert r.headers["X-Worker-Error"] == "oom"
        async with s.get("/status/502") as r:
            assert r.status == 502


async def test_crash_exits_with_code_3(sock: str) -> None:
    proc = await start_ctl_worker(sock)
    try:
        async with unix_session(sock) as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get("/crash") as r:
                    await r.read()
        assert await wait_exit(proc) == 3
    finally:
        await stop_worker(proc)


async def test_die_oom_prints_cuda_oom(sock: str) -> None:
    proc = await start_ctl_worker(sock, stderr=asyncio.subprocess.PIPE)
    try:
        async with unix_session(sock) as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get("/die-oom") as r:
                    await r.read()
        assert proc.stderr is not None
        err = await asyncio.wait_for(proc.stderr.read(), 5)
        assert await wait_exit(proc) == 1
    finally:
        await stop_worker(proc)
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")


async def test_sigterm_exits_0_after_in_flight_request(sock: str) -> None:
    proc = await start_ctl_worker(sock)
    try:
        async with unix_session(sock) as s:
            async with s.get("/work?ms=1") as r:  # a warm connection before the signal
                assert r.status == 200
            slow = asyncio.create_task(s.get("/sleep?s=0.3"))
            try:
                async with unix_session(sock) as s2:  # wait until the worker holds the request
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline:
                        async with s2.get("/counter") as r:
                            if (await r.json())["in_flight"] == 1:
                                break
                        await asyncio.sleep(0.01)
                proc.terminate()
                resp = await slow
                assert resp.status == 200  # finished, not cut off
                resp.release()
            finally:
                slow.cancel()
        assert await wait_exit(proc) == 0
    finally:
        await stop_worker(proc)
    assert not Path(sock).exists()


async def test_ignore_sigterm_needs_sigkill(sock: str) -> None:
    proc = await start_ctl_worker(sock, "--ignore-sigterm")
    try:
        proc.terminate()
        with pytest.raises(TimeoutError):
            await wait_exit(proc, timeout=0.5)
    finally:
        code = await stop_worker(proc, timeout=0.1)
    assert code == -9


@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (["--exit-before-ready", "7"], {}, 7),
        ([], {"CTL_EXIT_BEFORE_READY": "5"}, 5),
        (["--oom-at-start"], {}, 1),
    ],
)
async def test_dies_before_ready(sock: str, args: list[str], env: dict[str, str], code: int) -> None:
    with pytest.raises(WorkerExited) as info:
        await start_ctl_worker(sock, *args, env=env, timeout=5)
    assert info.value.returncode == code


async def test_never_ready_and_ready_delay(sock: str) -> None:
    proc = await start_ctl_worker(sock, "--never-ready", wait=False)
    try:
        with pytest.raises(TimeoutError):
            await wait_for_socket_health(sock, timeout=0.5, proc=proc)
    finally:
        await stop_worker(proc)
    t0 = time.monotonic()
    async with running_ctl_worker(sock, env={"CTL_READY_DELAY": "0.4"}):
        assert time.monotonic() - t0 >= 0.4


async def test_garbage_and_close_are_client_errors(sock: str) -> None:
    async with running_ctl_worker(sock), unix_session(sock) as s:
        for path in ("/garbage", "/close", "/crash-after-headers"):
            with pytest.raises(aiohttp.ClientError):
                async with s.get(path) as r:
                    await r.read()


# uvicorn (>= 0.29) re-raises the SIGTERM after its graceful shutdown, so it "dies" by the signal we
# sent; gunicorn's arbiter exits 0.
@pytest.mark.parametrize(
    ("command", "stop_code"),
    [(UVICORN_COMMAND, -15), (GUNICORN_COMMAND, 0)],
    ids=["uvicorn", "gunicorn"],
)
async def test_third_party_servers(sock: str, command: tuple[str, ...], stop_code: int) -> None:
    async with running_worker(command, sock, timeout=15) as proc, unix_session(sock) as s:
        async with s.get("/healthz") as r:
            assert r.status == 200
        async with s.post("/v1/echo", json={"q": "hi"}) as r:
            assert (await r.json())["json"] == {"q": "hi"}
        async with s.get("/stream?n=3&interval=0.01") as r:
            body = await r.text()
        events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert [json.loads(e)["i"] for e in events[:-1]] == [0, 1, 2]
        code = await stop_worker(proc)
    assert code == stop_code


async def test_health_fail_after_and_set_health(sock: str) -> None:
    async with running_ctl_worker(sock, env={"CTL_HEALTH_FAIL_AFTER": "3"}), unix_session(sock) as s:
        # The start-up probe was request 1.
        statuses = []
        for _ in range(3):
            async with s.get("/healthz") as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 500]
    async with running_ctl_worker(sock), unix_session(sock) as s:
        async with s.post("/set-health?mode=unready") as r:
            assert r.status == 200
        async with s.get("/healthz") as r:
            assert r.status == 503
        async with s.post("/set-health?mode=hang"):
            pass
        with pytest.raises(TimeoutError):
            async with s.get("/healthz", timeout=aiohttp.ClientTimeout(total=0.2)):
                pass


async def test_client_disconnect_cancels_the_request(sock: str) -> None:
    async with running_ctl_worker(sock), unix_session(sock) as s:
        with pytest.raises(TimeoutError):
            async with s.get("/sleep?s=30", timeout=aiohttp.ClientTimeout(total=0.2)):
                pass
        deadline = time.monotonic() + 5
        while True:
            async with s.get("/counter") as r:
                counts = await r.json()
            if counts["disconnects"] == 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
    assert counts["disconnects"] == 1
    assert counts["in_flight"] == 0
