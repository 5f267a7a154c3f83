"""Worker lifecycle end to end: real signals (SIGKILL, SIGSTOP), real crashes, real third-party servers."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest

from tests.harness import ctl_command, fast_config, kill_quiet, pid_alive, wait_until
from tests.workers.util import GUNICORN_COMMAND, UVICORN_COMMAND


async def _get_json(sp, path):
    async with sp.session.get(path) as r:
        return r.status, await r.json()


async def test_kill9_while_idle_respawns(supervisor_factory):
    sp = await supervisor_factory(fast_config())
    old = await sp.worker_pid()
    os.kill(old, signal.SIGKILL)
    w = await sp.wait_worker(lambda w: w["restarts"] == 1 and w["state"] == "ready", what="respawned worker")
    assert w["pid"] != old and not pid_alive(old)
    # a SIGKILL we did not send, with no sign of OOM (no OOM text or answer, the kernel's oom_kill
    # counter unmoved): `killed`, not a guess at `oom`
    assert w["last_exit"]["reason"] == "killed"
    assert w["last_exit"]["signal"] == "SIGKILL" and w["last_exit"]["pid"] == old
    status, body = await _get_json(sp, "/pid")
    assert status == 200 and body["pid"] == w["pid"]
    assert sp.proc.returncode is None
    ev = await sp.wait_log("worker_exited", reason="killed")
    assert ev["perhaps"] is None
    series = 'gpu_supervisor_worker_restarts_total{reason="killed",replica="0",worker="default"} 1.0'
    assert series in await sp.metrics()


async def test_sigkill_after_an_oom_answer_is_oom(supervisor_factory):
    """The evidence that makes a SIGKILL `oom`: an OOM answer just before it."""
    sp = await supervisor_factory(fast_config())
    old = await sp.worker_pid()
    async with sp.session.get("/oom") as r:
        assert r.status == 503 and r.headers.get("X-Worker-Error") == "oom"
    os.kill(old, signal.SIGKILL)
    w = await sp.wait_worker(lambda w: w["restarts"] == 1 and w["state"] == "ready", what="respawned worker")
    assert w["last_exit"]["reason"] == "oom"


async def test_kill9_mid_request_retries_safe_and_fails_unsafe(supervisor_factory):
    sp = await supervisor_factory(fast_config())
    old = await sp.worker_pid()
    get = asyncio.create_task(sp.session.get("/sleep?s=2"))
    post = asyncio.create_task(sp.session.post("/echo?delay=2", data=b"payload"))
    await wait_until(lambda: _inflight(sp, 2), 10, "both requests at the worker")
    os.kill(old, signal.SIGKILL)
    r_get, r_post = await get, await post
    async with r_get, r_post:
        assert r_get.status == 200
        assert r_get.headers["X-Supervisor-Attempts"] == "2"
        assert (await r_get.json())["pid"] != old
        assert r_post.status == 502
        err = (await r_post.json())["error"]
        assert err["type"] == "worker_crashed" and int(r_post.headers["Retry-After"]) >= 1
    text = await sp.metrics()
    assert 'gpu_supervisor_retries_total{reason="worker_crashed"} 1.0' in text


async def _inflight(sp, n):
    return (await sp.status())["queue"]["inflight"] >= n


async def test_stream_broken_by_death_ends_with_error_event(supervisor_factory):
    sp = await supervisor_factory(fast_config())
    async with sp.session.get("/crash-after-headers") as r:
        assert r.status == 200
        text = (await r.read()).decode()
    assert "event: error" in text and "worker_crashed" in text
    await sp.wait_worker(lambda w: w["restarts"] == 1 and w["state"] == "ready")


async def test_chunked_broken_by_death_is_aborted(supervisor_factory):
    sp = await supervisor_factory(fast_config())
    pid = await sp.worker_pid()
    async with sp.session.get("/chunked?n=50&interval=0.1") as r:
        first = await r.content.readline()
        assert first.startswith(b"line")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # a truncated chunked body, never a silent clean end


async def test_repeated_crash_answers_502_after_max_attempts(supervisor_factory):
    sp = await supervisor_factory(fast_config(retry={"max_attempts": 2}))
    async with sp.session.get("/crash") as r:
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "worker_crashed"
    w = await sp.wait_worker(lambda w: w["restarts"] == 2 and w["state"] == "ready")
    assert w["last_exit"]["reason"] == "crash" and w["last_exit"]["code"] == 3


async def test_oom_traceback_death_is_oom(supervisor_factory):
    sp = await supervisor_factory(fast_config(retry={"max_attempts": 1}))
    async with sp.session.get("/die-oom") as r:
        assert r.status == 502
    w = await sp.wait_worker(lambda w: w["restarts"] == 1)
    assert w["last_exit"]["reason"] == "oom" and w["last_exit"]["code"] == 1


async def test_sigstop_is_detected_as_hang_and_replaced(supervisor_factory):
    sp = await supervisor_factory(fast_config())
    old = await sp.worker_pid()
    os.kill(old, signal.SIGSTOP)
    try:
        w = await sp.wait_worker(lambda w: w["restarts"] == 1 and w["state"] == "ready", 20, "replaced worker")
    finally:
        kill_quiet(old)
    assert w["last_exit"]["reason"] == "hang" and w["pid"] != old
    await wait_until(lambda: not pid_alive(old), 10, "stopped worker gone")
    status, body = await _get_json(sp, "/pid")
    assert status == 200 and body["pid"] == w["pid"]
    assert len(sp.events("worker_probe_failed")) >= 2


async def test_request_outstanding_past_hang_timeout_kills_worker(supervisor_factory):
    sp = await supervisor_factory(fast_config(worker={"hang_timeout_s": 1}, retry={"max_attempts": 1}))
    old = await sp.worker_pid()
    async with sp.session.get("/hang") as r:
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "worker_crashed"
    w = await sp.wait_worker(lambda w: w["restarts"] == 1 and w["state"] == "ready")
    assert w["last_exit"]["reason"] == "hang" and w["pid"] != old
    assert sp.events("worker_hang")


async def test_never_ready_worker_backs_off_then_fails(supervisor_factory):
    cfg = fast_config(worker={"command": ctl_command("--never-ready"), "startup_timeout_s": 0.5,
                              "restart": {"max_restarts": 2, "window_s": 60}})
    sp = await supervisor_factory(cfg, wait_ready=False)
    w = await sp.wait_worker(lambda w: w["state"] == "failed", 30, "crash loop -> failed")
    assert w["last_exit"]["reason"] == "start_failure"
    assert w["restarts"] == 3
    assert sp.events("worker_state", new="backoff")
    st = await sp.status()
    assert st["breaker"]["state"] == "forced_open" and st["ready"] is False
    async with sp.session.get("/readyz") as r:
        assert r.status == 503
    async with sp.session.get("/echo") as r:
        assert r.status == 503
        err = (await r.json())["error"]
        assert err["type"] == "circuit_open" and int(r.headers["Retry-After"]) >= 1
    assert sp.proc.returncode is None  # the daemon stays up, telling the truth


async def test_exit_before_ready_is_start_failure(supervisor_factory):
    cfg = fast_config(worker={"command": ctl_command("--exit-before-ready", "2"),
                              "restart": {"max_restarts": 1}})
    sp = await supervisor_factory(cfg, wait_ready=False)
    w = await sp.wait_worker(lambda w: w["state"] == "failed", 30)
    assert w["last_exit"]["reason"] == "start_failure" and w["last_exit"]["code"] == 2


async def test_oom_at_start_is_oom(supervisor_factory):
    cfg = fast_config(worker={"command": ctl_command("--oom-at-start"), "restart": {"max_restarts": 0}})
    sp = await supervisor_factory(cfg, wait_ready=False)
    w = await sp.wait_worker(lambda w: w["state"] == "failed", 30)
    assert w["last_exit"]["reason"] == "oom"
    ev = await sp.wait_log("worker_exited", reason="oom")
    assert any("CUDA out of memory" in line for line in ev["tail"])


async def test_missing_program_is_a_start_failure_not_a_crash_of_the_daemon(supervisor_factory):
    cfg = fast_config(worker={"command": ["/nonexistent/worker-binary", "{socket}"], "restart": {"max_restarts": 1}})
    sp = await supervisor_factory(cfg, wait_ready=False)
    w = await sp.wait_worker(lambda w: w["state"] == "failed", 30)
    assert w["last_exit"]["reason"] == "start_failure"
    assert sp.events("worker_spawn_failed")


async def test_worker_output_is_logged_with_its_pid(supervisor_factory):
    sp = await supervisor_factory(fast_config())
    pid = await sp.worker_pid()
    async with sp.session.get("/log?msg=hello-from-worker&stream=stderr") as r:
        assert r.status == 200
    ev = await sp.wait_log("worker_output", worker_pid=pid, stream="stderr")
    assert ev["source"] == "worker"
    await wait_until(lambda: any("hello-from-worker" in e.get("line", "") for e in sp.events("worker_output")),
                     5, "worker line in the log")


async def test_stop_kills_worker_ignoring_sigterm_and_its_children(supervisor_factory):
    cfg = fast_config(worker={"command": ctl_command("--ignore-sigterm"), "stop_grace_s": 0.5})
    sp = await supervisor_factory(cfg)
    pid = await sp.worker_pid()
    await sp.session.close()
    sp.session = None
    sp.signal(signal.SIGTERM)
    assert await sp.wait_exit(30) == 0
    assert not pid_alive(pid)
    assert sp.events("worker_kill")


@pytest.mark.parametrize("command", [UVICORN_COMMAND, GUNICORN_COMMAND], ids=["uvicorn-fastapi", "gunicorn-flask"])
async def test_drop_in_third_party_servers(supervisor_factory, command):
    sp = await supervisor_factory(fast_config(worker={"command": list(command), "stop_grace_s": 5}))
    async with sp.session.post("/v1/echo", json={"q": "hi"}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["json"] == {"q": "hi"}
    async with sp.session.get("/stream?n=3&interval=0.05") as r:
        text = await r.text()
    assert text.count("data:") == 4 and "[DONE]" in text
    # kill -9 the unchanged service: the supervisor brings it back
    os.kill(body["pid"], signal.SIGKILL) if command is UVICORN_COMMAND else os.killpg(
        (await sp.worker_pid()), signal.SIGKILL)
    await sp.wait_worker(lambda w: w["restarts"] == 1 and w["state"] == "ready", 30)
    async with sp.session.post("/v1/echo", json={"q": "again"}) as r:
        assert r.status == 200
    pid = await sp.worker_pid()
    assert await sp.stop() == 0
    assert not pid_alive(pid)
    assert sp.events("worker_exited", reason="shutdown")


async def test_runtime_dir_too_long_for_a_socket_is_refused_at_start(tmp_path):
    from tests.harness import SupervisorProcess

    long_dir = tmp_path / ("d" * 100)
    sp = SupervisorProcess(tmp_path, fast_config(runtime_dir=str(long_dir)))
    with pytest.raises(AssertionError, match="exited"):
        await sp.start(timeout=20)
    assert await sp.wait_exit(20) == 1
    ev = sp.events("runtime_dir_too_long")
    assert ev and ev[0]["limit_bytes"] == 107


async def test_a_sized_answer_cut_by_death_is_retried_whole(supervisor_factory, tmp_path):
    """A retry-safe request whose answer has a Content-Length: its head is held until the answer is
    all in, so a worker that dies mid-answer means a retry and a whole body, not a cut one."""
    from tests.workers.ctl_worker import big_pattern

    sp = await supervisor_factory(fast_config())
    marker = tmp_path / "crashed"
    async with sp.session.get(f"/crash-mid-body?bytes=100000&marker={marker}") as r:
        assert r.status == 200
        body = await r.read()
        assert r.headers["X-Supervisor-Attempts"] == "2"
    assert marker.exists() and body == big_pattern(100000)


async def test_a_sized_answer_cut_by_death_not_safe_to_repeat_is_a_typed_502(supervisor_factory, tmp_path):
    sp = await supervisor_factory(fast_config(retry={"methods": []}))  # nothing is safe to repeat here
    async with sp.session.get(f"/crash-mid-body?bytes=100000&marker={tmp_path / 'm'}") as r:
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "worker_crashed"


async def test_a_worker_started_again_is_never_logged_with_the_pid_of_the_one_before(supervisor_factory):
    """The `unloaded -> starting` line names no process (none runs yet), not the one stopped before."""
    cfg = fast_config(worker={"start": "on_demand", "models": ["m"], "idle_unload_s": 0.3})
    sp = await supervisor_factory(cfg, wait_ready=False)
    pids = []
    for _ in range(2):
        status, body = await _get_json(sp, "/pid")
        assert status == 200
        pids.append(body["pid"])
        await sp.wait_worker(lambda w: w["state"] == "unloaded", what="unloaded when idle")
    assert pids[0] != pids[1]
    starts = sp.events("worker_state", old="unloaded", new="starting")
    assert len(starts) == 2 and [e["worker_pid"] for e in starts] == [None, None]


async def test_a_worker_that_floods_its_output_gets_a_bounded_log_and_keeps_its_last_lines(supervisor_factory):
    """A worker printing in a loop must not take the daemon (its event loop, its log's disk) with it: past a
    burst and a rate its lines are counted, not logged; every line is either logged or counted, and the
    last ones still tell why it exited."""
    import time

    from supervisor.fleet.proc import OUTPUT_BURST, OUTPUT_PER_S

    n = 50_000
    sp = await supervisor_factory(fast_config())
    pid = await sp.worker_pid()
    began = time.monotonic()
    async with sp.session.get(f"/log?msg=flood&lines={n}&stream=stdout") as r:
        assert r.status == 200
    await sp.wait_log("worker_output_dropped", timeout=30, stream="stdout")
    async with sp.session.get("/hello") as r:  # the daemon still serves
        assert r.status == 200
    kill_quiet(pid)
    exited = await sp.wait_log("worker_exited", worker_pid=pid, timeout=30)
    assert exited["tail"][-1] == f"flood {n - 1}", exited["tail"]

    def logged() -> int:
        return sum(1 for e in sp.events("worker_output", worker_pid=pid) if e.get("line", "").startswith("flood"))

    def accounted() -> bool:  # (the last count is said when the worker's output ends)
        return logged() + sum(e["lines"] for e in sp.events("worker_output_dropped", worker_pid=pid,
                                                             stream="stdout")) == n
    await wait_until(accounted, 10, "every flood line logged or counted")
    assert logged() <= OUTPUT_BURST + OUTPUT_PER_S * (time.monotonic() - began) + 1
