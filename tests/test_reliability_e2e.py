"""One client or one misbehaving worker must not hurt everyone: the defects of issue (3/6), end to end.

Real daemons, real ctl and hostile workers over real Unix sockets, raw sockets for what HTTP clients
will not send.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp
import psutil

from tests.harness import SupervisorProcess, ctl_command, fast_config, kill_quiet, pid_alive, wait_until
from tests.workers.ctl_worker import big_pattern

HOSTILE = [sys.executable, os.path.join(os.path.dirname(__file__), "workers", "hostile_worker.py"),
           "--socket", "{socket}"]


async def _raw(port: int, data: bytes, read_until_close: bool = True, timeout: float = 10) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        async with asyncio.timeout(timeout):
            return await r.read() if read_until_close else await r.read(65536)
    finally:
        w.close()


# -- 1. judged by progress, not age -----------------------------------------------------------

async def test_a_slow_reader_of_a_big_answer_never_gets_the_worker_killed(supervisor_factory):
    sp = await supervisor_factory(fast_config(worker={"command": ctl_command(), "hang_timeout_s": 1.0}))
    n = 16 << 20
    reader, writer = await asyncio.open_connection("127.0.0.1", sp.port)
    writer.write(b"GET /big?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
    await writer.drain()
    # read nothing for a while: the worker finished long ago (spooled), it must not be judged hung
    async def worker_done() -> bool:
        st = await sp.status()
        return st["worker"]["inflight"] == 0 and st["queue"]["inflight"] == 0
    await wait_until(worker_done, 10, "the worker's slot freed while the client reads nothing")
    # keep reading nothing for twice the hang timeout: an absence is what is tested, so time must pass
    await asyncio.sleep(2.0)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    body = await reader.readexactly(n)
    writer.close()
    assert body == big_pattern(n)
    st = await sp.status()
    assert st["worker"]["restarts"] == 0 and not sp.events("worker_hang")


async def test_a_worker_that_keeps_streaming_is_never_hung(supervisor_factory):
    sp = await supervisor_factory(fast_config(worker={"command": ctl_command(), "hang_timeout_s": 0.6}))
    async with sp.session.get("/stream?n=6&interval=0.3") as r:
        assert r.status == 200
        text = await r.text()
    assert text.count("data: {") == 6 and text.rstrip().endswith("[DONE]")  # 1.5 s, over hang_timeout_s
    assert (await sp.status())["worker"]["restarts"] == 0


async def test_a_daemon_frozen_past_the_stall_timeout_does_not_judge_a_streaming_worker_hung(supervisor_factory):
    """The daemon stopped (SIGSTOP, a paused VM, a starved host) saw nothing of its worker meanwhile, and
    what the worker sent is still unread when it runs again: no hang is judged from that."""
    sp = await supervisor_factory(fast_config(worker={"command": ctl_command(), "stall_timeout_s": 1.0}))
    pid = await sp.worker_pid()
    async with sp.session.get("/stream?n=20&interval=0.2") as r:
        assert r.status == 200
        await r.content.readline()
        sp.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(2.5)  # frozen for over twice the stall timeout: time must pass
        finally:
            sp.signal(signal.SIGCONT)
        text = (await r.read()).decode()
    assert text.rstrip().endswith("[DONE]") and "event: error" not in text, text[-300:]
    assert await sp.worker_pid() == pid and (await sp.status())["worker"]["restarts"] == 0
    assert not sp.events("worker_hang") and sp.events("worker_judgment_deferred")


async def test_no_byte_on_any_request_for_stall_timeout_is_a_hang_even_with_health_ok(supervisor_factory):
    sp = await supervisor_factory(fast_config(worker={"command": ctl_command(), "stall_timeout_s": 0.8}))
    pid = await sp.worker_pid()
    async with sp.session.get("/hang") as r:  # GET: retried, and the retry hangs the next worker too
        assert r.status == 504
        body = await r.json()
    assert "hung" in body["error"]["message"]
    ev = await sp.wait_log("worker_hang", worker_pid=pid)
    assert ev["why"] == "no progress"
    exited = await sp.wait_log("worker_exited", worker_pid=pid)
    assert exited["reason"] == "hang"
    # 11: in flight on two workers that both hung: 504, not tried a third time, its id logged
    poison = await sp.wait_log("poison_request")
    assert poison["hung_workers"] == 2 and poison["request_id"] == r.headers["X-Request-ID"]
    await sp.wait_ready()
    assert (await sp.status())["worker"]["restarts"] == 2


async def test_progress_counter_flat_with_work_in_flight_is_a_hang(supervisor_factory):
    cfg = fast_config(worker={"command": ctl_command(), "hang_timeout_s": 60,
                              "progress": {"path": "/metrics", "metric": "ctl_chunks", "stall_s": 0.8}})
    sp = await supervisor_factory(cfg)
    pid = await sp.worker_pid()
    # a stream that keeps counting is fine, however long
    async with sp.session.get("/stream?n=8&interval=0.25") as r:
        assert r.status == 200 and (await r.text()).count("data: {") == 8
    assert not sp.events("worker_hang")
    # a request that makes no progress (the engine is stuck while health says 200): hang
    task = asyncio.create_task(sp.session.post("/echo?delay=30", data=b"x"))
    ev = await sp.wait_log("worker_hang", timeout=15, worker_pid=pid)
    assert ev["why"] == "progress counter flat" and ev["metric"] == "ctl_chunks"
    resp = await task
    assert resp.status == 502  # not safe to repeat: worker_crashed
    resp.release()


# -- 2. one client's 500s do not open the breaker for everyone ----------------------------------

async def test_one_clients_500s_do_not_open_the_breaker_but_a_worker_all_500_does(supervisor_factory):
    sp = await supervisor_factory(fast_config(breaker={"window": 10, "min_calls": 5, "failure_rate": 0.5}))
    for _ in range(12):  # a poison client's 500s, interleaved with another client's successes
        async with sp.session.get("/status/500") as r:
            assert r.status == 500
        async with sp.session.get("/hello") as r:
            assert r.status == 200
    assert (await sp.status())["breaker"]["state"] == "closed"
    for _ in range(6):  # now nothing but 500s: the worker is broken
        async with sp.session.get("/status/500") as r:
            assert r.status in (500, 503)
    assert (await sp.status())["breaker"]["state"] == "open"


# -- 3. slow clients do not hold worker slots -----------------------------------------------------

async def test_two_slow_readers_of_16mib_do_not_hold_the_slots(supervisor_factory):
    sp = await supervisor_factory(fast_config(queue={"concurrency": 2, "timeout_s": 5}))
    n = 16 << 20
    conns = []
    for _ in range(2):
        r, w = await asyncio.open_connection("127.0.0.1", sp.port)
        w.write(b"GET /big?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
        await w.drain()
        conns.append((r, w))

    async def freed() -> bool:
        return (await sp.status())["queue"]["inflight"] == 0
    await wait_until(freed, 15, "both slots free while two clients read nothing")
    for _ in range(4):
        async with sp.session.get("/hello") as resp:
            assert resp.status == 200
    for r, w in conns:
        await r.readuntil(b"\r\n\r\n")
        assert await r.readexactly(n) == big_pattern(n)
        w.close()


async def test_a_client_that_reads_nothing_is_dropped_after_client_timeout(supervisor_factory):
    sp = await supervisor_factory(fast_config(limits={"client_timeout_s": 1.0, "buffer_bytes": 65536,
                                                      "spool_bytes": 1 << 20}))
    r, w = await asyncio.open_connection("127.0.0.1", sp.port)
    w.write(b"GET /big?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (64 << 20))
    await w.drain()
    ev = await sp.wait_log("client_stalled", timeout=20)
    assert ev["client_timeout_s"] == 1.0
    w.close()
    async with sp.session.get("/hello") as resp:
        assert resp.status == 200
    assert (await sp.status())["worker"]["restarts"] == 0  # the client's problem, not the worker's


# -- 4, 5, 7. a worker that answers malformed HTTP ---------------------------------------------

async def _admin(sp, path: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{sp.admin_port}{path}") as r:
        return await r.text()


async def test_hostile_worker_answers_become_502_and_are_counted(supervisor_factory):
    # the daemon's own endpoints on their own listener: the main port proxies /status to the worker
    # (a breaker that never opens here: each refused answer is the worker's failure, and would open it)
    sp = await supervisor_factory(fast_config(worker={"command": HOSTILE}, breaker={"window": 50, "min_calls": 50},
                                              admin={"listen": {"host": "127.0.0.1", "port": 0}}), wait_ready=False)
    await wait_until(lambda: _admin_ready(sp), 20, "ready")
    async with sp.session.get("/extra") as r:
        assert r.status == 200 and await r.text() == "first" and "Location" not in r.headers
    async with sp.session.get("/ok") as r:
        assert r.status == 200 and await r.text() == "ok"  # the next answer is the right one
    rss0 = psutil.Process(sp.proc.pid).memory_info().rss
    async with sp.session.get("/endless-header?bytes=50000000") as r:
        assert r.status == 502 and (await r.json())["error"]["type"] == "worker_error"
    assert psutil.Process(sp.proc.pid).memory_info().rss - rss0 < 32 << 20
    for code in (101, 999, 42):
        async with sp.session.get(f"/status?code={code}") as r:
            assert r.status == 502, code
    async with sp.session.get("/many-headers?n=500") as r:
        assert r.status == 502
    m = await _admin(sp, "/metrics")
    assert 'gpu_supervisor_worker_protocol_errors_total{kind="extra_bytes"} 1.0' in m
    assert 'gpu_supervisor_worker_protocol_errors_total{kind="head_too_large"} 1.0' in m
    assert json.loads(await _admin(sp, "/status"))["worker"]["restarts"] == 0


async def _admin_ready(sp) -> bool:
    try:
        return json.loads(await _admin(sp, "/readyz"))["ready"]
    except (aiohttp.ClientError, ValueError):
        return False


# -- 6. Expect: 100-continue ------------------------------------------------------------------------

async def test_expect_100_continue_only_once_admitted(supervisor_factory):
    sp = await supervisor_factory(fast_config(limits={"max_body_bytes": 1000}))
    r, w = await asyncio.open_connection("127.0.0.1", sp.port)
    w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await w.drain()
    interim = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    w.write(b"hello")
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    w.close()
    # refused before the body is sent: no 100, the refusal at once
    r, w = await asyncio.open_connection("127.0.0.1", sp.port)
    w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413")
    w.close()


# -- 9. malformed requests are counted ----------------------------------------------------------

async def test_malformed_http_is_counted_in_requests_and_rejections(supervisor_factory):
    sp = await supervisor_factory(fast_config())
    out = await _raw(sp.port, b"GET /hello HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert out.startswith(b"HTTP/1.") and out[9:12] == b"400"
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "bad_request"
    m = await sp.metrics()
    assert 'gpu_supervisor_requests_total{code="400",priority="normal",worker="none"} 1.0' in m
    assert 'gpu_supervisor_rejected_total{reason="bad_request"} 1.0' in m


# -- 10. what RFC 9110/9112 say a proxy does ------------------------------------------------------

async def test_host_kept_absolute_form_rewritten_connect_and_http09_refused(supervisor_factory):
    sp = await supervisor_factory(fast_config())  # client_timeout_s: the default 60 s
    async with sp.session.get("/echo", headers={"Connection": "keep-alive, Host", "Host": "svc.example"}) as r:
        echoed = await r.json()
    assert echoed["headers"]["host"] == "svc.example"
    out = await _raw(sp.port, b"GET http://svc.example/echo?x=1 HTTP/1.1\r\nHost: svc.example\r\n"
                              b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    echoed = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert echoed["path"] == "/echo" and echoed["query_string"] == "x=1"
    out = await _raw(sp.port, b"CONNECT svc.example:443 HTTP/1.1\r\nHost: svc.example:443\r\n"
                              b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"CONNECT" in out
    # HTTP/0.9 (no version): refused by closing, never answered, never forwarded
    assert await _raw(sp.port, b"GET /hello\r\n\r\n") == b""
    # a bare HTTP/0.9 request line (no headers will ever follow): closed at once, not held until
    # client_timeout_s (60 s here, far past _raw's 10 s)
    assert await _raw(sp.port, b"GET /hello\r\n") == b""
    async with sp.session.get("/counter") as r:
        counter = await r.json()
    assert counter["paths"].get("/hello", 0) == 0
    assert 'gpu_supervisor_rejected_total{reason="bad_request"} 3.0' in await sp.metrics()  # CONNECT, 0.9 x2


# -- 13. a worker never outlives its daemon ---------------------------------------------------------

async def test_kill9_of_the_daemon_takes_its_worker_and_a_successor_reaps_leftovers(supervisor_factory, tmp_path):
    sp = await supervisor_factory(fast_config())
    worker = await sp.worker_pid()
    sp.proc.send_signal(signal.SIGKILL)
    await sp.wait_exit(10)
    await wait_until(lambda: not pid_alive(worker), 10, "the worker died with its daemon")
    # a leftover the death signal could not reach (here: a process that left the worker's group),
    # recorded in the pid file of a daemon that is gone: the next daemon on that config stops it
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        from supervisor import leftovers
        from supervisor.jobs.settings import resolve_state_dir
        path = leftovers.pid_file(resolve_state_dir(None, {"STATE_DIRECTORY": str(sp.tmp)}), str(sp.config_path))
        dead = subprocess.Popen(["true"])
        dead.wait()
        path.write_text(json.dumps({"boot_id": leftovers.boot_id(), "daemon_pid": dead.pid, "daemon_start": 1,
                                    "workers": [{"pid": stray.pid, "start": leftovers.start_time(stray.pid)}]}))
        again = SupervisorProcess(sp.tmp, sp.config)  # the same config file, the same state directory
        await again.start()
        try:
            ev = await again.wait_log("stale_workers_killed")
            assert ev["pids"] == [stray.pid]
            assert stray.wait(10) == -signal.SIGKILL
        finally:
            await again.stop()
    finally:
        kill_quiet(stray.pid)
        stray.wait()


async def test_predecessor_pid_reuse_is_never_killed(tmp_path):
    from supervisor import leftovers
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        path = tmp_path / "w.json"
        path.write_text(json.dumps({"boot_id": leftovers.boot_id(), "daemon_pid": 999999, "daemon_start": 1,
                                    "workers": [{"pid": p.pid, "start": 12345}]}))  # another start time
        assert leftovers.reap(path, os.getpid()) == []
        assert p.poll() is None
        # the very pid and start time, but written before a reboot (another boot id): never touched
        # (start times count clock ticks since boot, so after a reboot they can match another process)
        path.write_text(json.dumps({"boot_id": "another-boot", "daemon_pid": 999999, "daemon_start": 1,
                                    "workers": [{"pid": p.pid, "start": leftovers.start_time(p.pid)}]}))
        assert leftovers.reap(path, os.getpid()) == []
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


async def test_streamed_answers_leak_no_worker_connection(supervisor_factory):
    """Every SSE or chunked answer hands its worker connection back (or closes it): the daemon's open
    files stay flat however many streams it relays."""
    sp = await supervisor_factory(fast_config())
    proc = psutil.Process(sp.proc.pid)
    for path in ("/stream?n=3&interval=0.01", "/chunked?n=3&interval=0.01"):
        async with sp.session.get(path) as r:
            await r.read()
    before = proc.num_fds()
    for _ in range(30):
        for path in ("/stream?n=3&interval=0.01", "/chunked?n=3&interval=0.01", "/big?bytes=300000"):
            async with sp.session.get(path) as r:
                assert r.status == 200
                await r.read()
    assert proc.num_fds() <= before + 4, (before, proc.num_fds())


class DescriptorFlood:
    """Idle client connections that take every file descriptor the daemon has, its limit lowered to what it
    has open plus `room` (prlimit on the running process); undone on exit."""

    def __init__(self, sp: SupervisorProcess, room: int = 8):
        self.sp, self.room = sp, room
        self.writers: list[asyncio.StreamWriter] = []
        self._stop = asyncio.Event()

    async def __aenter__(self) -> DescriptorFlood:
        import resource

        pid = self.sp.proc.pid
        self.limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + self.room,
                                                       self.limits[1]))
        self._task = asyncio.create_task(self._keep_it_full())
        return self

    async def _keep_it_full(self) -> None:  # every descriptor the daemon frees is taken by one more idle client
        while not self._stop.is_set():
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.sp.port)
                self.writers.append(w)
            except OSError:
                pass
            await asyncio.sleep(0.01)  # a pace for the flood, not a wait for a condition

    async def __aexit__(self, *exc: object) -> None:
        import resource

        self._stop.set()
        await self._task
        for w in self.writers:
            w.close()
        resource.prlimit(self.sp.proc.pid, resource.RLIMIT_NOFILE, self.limits)


async def test_a_flood_that_uses_up_the_daemons_file_descriptors_restarts_no_worker(supervisor_factory):
    """Out of file descriptors (a flood of idle connections past `ulimit -n`), the daemon cannot reach its
    worker: its probes say nothing of the worker then (a loaded model is not restarted for the daemon's own
    shortage), a request it cannot forward is 503 overloaded with Retry-After (never the worker's 502),
    and once the flood leaves everything serves again."""
    sp = await supervisor_factory(fast_config())  # probes every 0.2 s, 2 failures restart the worker
    pid = await sp.worker_pid()
    early_r, early_w = await asyncio.open_connection("127.0.0.1", sp.port)  # a client already in, kept alive
    try:
        async with DescriptorFlood(sp):
            # several probe periods pass with no descriptor to probe with (2 failures would restart it, 3 times over)
            await sp.wait_log("worker_probe_skipped", timeout=30, count=6)
            early_w.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(early_r.readuntil(b"\r\n\r\n"), 30)
            status = int(head.split(b" ", 2)[1])
            length = int(next(ln.split(b":", 1)[1] for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length:")))
            body = await asyncio.wait_for(early_r.readexactly(length), 30)
            # (a descriptor the flood had not taken yet may let it through: then it is simply answered)
            assert status in (200, 503), head
            if status == 503:
                assert json.loads(body)["error"]["type"] == "overloaded" and b"retry-after:" in head.lower(), head
    finally:
        early_w.close()

    async def serves() -> bool:
        async with sp.session.get("/hello") as r:
            return r.status == 200
    await wait_until(serves, 20, "the daemon serving again once the flood left")
    st = await sp.status()
    assert await sp.worker_pid() == pid and st["worker"]["restarts"] == 0, st["worker"]
    assert not sp.events("worker_exited") and not sp.events("worker_probe_failed")


async def test_a_worker_that_dies_while_the_daemon_has_no_descriptors_comes_back_after(supervisor_factory):
    """Its respawns fail while the flood holds every descriptor (no pipe for its output): the daemon's own
    shortage, not a crash loop of the worker's, so it is not given up on; it serves again once the flood
    leaves."""
    sp = await supervisor_factory(fast_config())  # 20 restarts in 60 s at most, backoff 0.05-0.2 s
    pid = await sp.worker_pid()
    async with DescriptorFlood(sp):
        await sp.wait_log("worker_probe_skipped", timeout=30)
        kill_quiet(pid)
        # more failed starts than the crash-loop bound allows, every one for want of a descriptor
        await sp.wait_log("worker_spawn_failed", timeout=60, count=25)

    async def serves() -> bool:
        async with sp.session.get("/hello") as r:
            return r.status == 200
    await wait_until(serves, 30, "a new worker serving once the flood left")
    assert await sp.worker_pid() != pid
    assert not sp.events("worker_crash_loop")
