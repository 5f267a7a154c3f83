"""The job manager against real stores (a SQLite file, a real redis-server) and a real ctl worker process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from supervisor.jobs.api import JobTerms, job_request
from supervisor.jobs.manager import CallbackRefused, JobManager
from supervisor.jobs.metrics import job_metrics
from supervisor.jobs.model import JobFailed, JobRequest, JobResult, JobStatus
from supervisor.jobs.settings import JobsSettings, parse_store_url
from supervisor.jobs.store import Conflict, StoreUnavailable, open_store
from supervisor.jobs.store_sqlite import SqliteJobStore
from tests.harness import wait_until
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.workers.util import running_ctl_worker, unix_session

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


class CtlRunner:
    """A small real runner: forwards a job to a ctl worker over its Unix socket, `slots` at a time.
    With `gate`, each run waits for it first (a job held `running`)."""

    def __init__(self, socket: str, slots: int = 4, gate: asyncio.Event | None = None):
        self.socket = socket
        self.slots = slots
        self.inflight = 0
        self.gate = gate
        self.runs: list[tuple[str, int]] = []
        self._session: aiohttp.ClientSession | None = None

    def has_free_slot(self, req: JobRequest) -> bool:
        return self.inflight < self.slots

    async def run(self, req: JobRequest, attempt: int, max_result_bytes: int) -> JobResult:
        self.inflight += 1          # before the first await: the slot is taken at once
        self.runs.append((req.id, attempt))
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self._session is None:
                # a fresh connection per job: aiohttp would silently resend an idempotent request once
                # on a reused connection that broke, and hide a worker crash
                self._session = aiohttp.ClientSession(
                    base_url="http://worker", connector=aiohttp.UnixConnector(path=self.socket, force_close=True))
            try:
                async with self._session.request(req.method, req.target, headers=list(req.headers),
                                                 data=req.body) as resp:
                    body = await resp.content.read(max_result_bytes + 1)
                    return JobResult(resp.status, resp.headers.get("Content-Type"), body)
            except aiohttp.ClientConnectionError as exc:
                raise JobFailed("worker_crashed", f"the worker connection broke: {exc!r}") from exc
        finally:
            self.inflight -= 1

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def fast(**kw) -> JobsSettings:
    base = {"result_ttl_s": 60, "lease_s": 0.3, "poll_interval_s": 0.05, "cleanup_interval_s": 0.1,
            "max_attempts": 3}
    base.update(kw)
    return JobsSettings(**base)


def jreq(target: str = "/echo", method: str = "POST", body: bytes = b'{"q": 1}', retry_safe: bool = False,
         headers: tuple = (), timeout_s: float | None = None) -> JobRequest:
    return job_request(method, target, (("Content-Type", "application/json"), ("X-Trace", "abc"), *headers),
                       body, now=time.time(), terms=JobTerms(priority="normal", timeout_s=timeout_s,
                                                             retry_safe=retry_safe, worker="default"))


@pytest.fixture
async def workdir() -> AsyncIterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="jm-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def worker(workdir: Path) -> AsyncIterator[str]:
    sock = str(workdir / "w.sock")
    async with running_ctl_worker(sock):
        yield sock


@contextlib.asynccontextmanager
async def manager(settings: JobsSettings, store, runner: CtlRunner, registry: CollectorRegistry | None = None):
    await store.open()
    m = JobManager(settings, store, runner)
    if registry is not None:
        m.hooks = job_metrics(registry, lambda: m.pending)
    loop = asyncio.create_task(m.run())
    try:
        yield m
    finally:
        await m.aclose()
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await runner.aclose()


async def worker_counter(sock: str) -> dict:
    async with unix_session(sock) as s, s.get("/counter") as r:
        return await r.json()


async def status_of(m: JobManager, job_id: str) -> str:
    job = await m.get(job_id)
    return job.view_status(m.now()).value


def sqlite_store(d: Path):
    return SqliteJobStore(str(d / "jobs.db"))


# -- SQLite -----------------------------------------------------------------------------------------------

async def test_submit_run_result(workdir: Path, worker: str) -> None:
    reg = CollectorRegistry()
    async with manager(fast(), sqlite_store(workdir), CtlRunner(worker), reg) as m:
        job, created = await m.submit(jreq("/echo?x=1", body=b"hello"))
        assert created and job.status is JobStatus.QUEUED
        await wait_until(lambda: status_of(m, job.id), what="job done", timeout=10)
        await wait_until(lambda: _is(m, job.id, "succeeded"), what="succeeded", timeout=10)
        done, res = await m.result(job.id)
        echo = json.loads(res.body)
        assert res.status == 200 and res.content_type.startswith("application/json")
        assert echo["method"] == "POST" and echo["path"] == "/echo" and echo["query"] == {"x": "1"}
        assert echo["body"] == "hello" and echo["headers"]["x-trace"] == "abc"
        assert done.attempts == 1 and done.result.bytes == len(res.body) and done.started_at is not None
        assert reg.get_sample_value("gpu_supervisor_jobs_total", {"status": "succeeded"}) == 1
        assert reg.get_sample_value("gpu_supervisor_jobs_total", {"status": "queued"}) == 1
        assert reg.get_sample_value("gpu_supervisor_jobs_total", {"status": "running"}) == 1
        await wait_until(lambda: m.pending == 0, what="pending back to 0")
        assert reg.get_sample_value("gpu_supervisor_jobs_pending") == 0
        st = m.status()
        assert st["store"] == "sqlite" and st["available"] is True and st["running_here"] == 0


async def _is(m: JobManager, job_id: str, status: str) -> bool:
    return await status_of(m, job_id) == status


async def test_takes_jobs_only_with_a_free_slot(workdir: Path, worker: str) -> None:
    runner = CtlRunner(worker, slots=1)
    async with manager(fast(), sqlite_store(workdir), runner) as m:
        jobs = [(await m.submit(jreq("/sleep?s=0.2", method="GET", body=b"")))[0] for _ in range(3)]
        for j in jobs:
            await wait_until(lambda j=j: _is(m, j.id, "succeeded"), what="all done", timeout=20)
        c = await worker_counter(worker)
        assert c["paths"]["/sleep"] == 3 and c["max_in_flight"] == 1


async def test_cancel_queued_never_reaches_the_worker(workdir: Path, worker: str) -> None:
    runner = CtlRunner(worker, slots=0)
    async with manager(fast(), sqlite_store(workdir), runner) as m:
        job, _ = await m.submit(jreq("/echo"))
        c = await m.cancel(job.id)
        assert c.status is JobStatus.CANCELLED and c.error.type == "cancelled"
        assert (await m.cancel(job.id)).status is JobStatus.CANCELLED       # cancelling again: no change
        assert await m.cancel("nope") is None
        runner.slots = 5
        other, _ = await m.submit(jreq("/hello", method="GET", body=b""))
        await wait_until(lambda: _is(m, other.id, "succeeded"), what="the later job ran", timeout=10)
        assert "/echo" not in (await worker_counter(worker))["paths"]
        assert await m.result(job.id) == (await m.get(job.id), None)


async def test_cancel_running_closes_the_worker_connection(workdir: Path, worker: str) -> None:
    async with manager(fast(), sqlite_store(workdir), CtlRunner(worker)) as m:
        job, _ = await m.submit(jreq("/hang", method="GET", body=b""))
        await wait_until(lambda: _in_flight(worker, 1), what="the worker holds the request", timeout=10)
        c = await m.cancel(job.id)
        assert c.status is JobStatus.CANCELLED
        await wait_until(lambda: _in_flight(worker, 0), what="the worker connection closed", timeout=10)
        await wait_until(lambda: m.status()["running_here"] == 0, what="task gone")
        assert (await m.get(job.id)).status is JobStatus.CANCELLED


async def _in_flight(sock: str, n: int) -> bool:
    return (await worker_counter(sock))["in_flight"] == n


async def test_idempotency_key(workdir: Path, worker: str) -> None:
    async with manager(fast(), sqlite_store(workdir), CtlRunner(worker, slots=0)) as m:
        a, ca = await m.submit(jreq(headers=(("Idempotency-Key", "order-7"),)))
        b, cb = await m.submit(jreq(headers=(("Idempotency-Key", "order-7"),)))
        assert ca and not cb and a.id == b.id
        with pytest.raises(Conflict, match="Idempotency-Key was used for another request"):
            await m.submit(jreq(body=b"different", headers=(("Idempotency-Key", "order-7"),)))


async def test_results_expire_and_records_go(workdir: Path, worker: str) -> None:
    async with manager(fast(result_ttl_s=0.3), sqlite_store(workdir), CtlRunner(worker)) as m:
        job, _ = await m.submit(jreq("/hello", method="GET", body=b""))
        await wait_until(lambda: _is(m, job.id, "succeeded"), what="succeeded", timeout=10)
        await wait_until(lambda: _is(m, job.id, "expired"), what="expired", timeout=10)
        assert (await m.result(job.id))[1] is None
        await wait_until(lambda: _gone(m, job.id), what="record deleted by cleanup", timeout=10)


async def _gone(m: JobManager, job_id: str) -> bool:
    return await m.get(job_id) is None


async def test_list_pages(workdir: Path, worker: str) -> None:
    async with manager(fast(), sqlite_store(workdir), CtlRunner(worker, slots=0)) as m:
        ids = [(await m.submit(jreq()))[0].id for _ in range(5)]
        page1, cur = await m.list(limit=2)
        page2, cur2 = await m.list(limit=2, cursor=cur)
        page3, cur3 = await m.list(limit=2, cursor=cur2)
        assert [j.id for j in page1 + page2 + page3] == ids[::-1] and cur3 is None
        assert len((await m.list(JobStatus.QUEUED, 100))[0]) == 5
        assert (await m.list(JobStatus.SUCCEEDED, 100))[0] == []


async def test_restart_recovery_three_outcomes(workdir: Path, worker: str) -> None:
    gate = asyncio.Event()              # never set: the first daemon's jobs stay running
    store = sqlite_store(workdir)
    await store.open()
    first = JobManager(fast(), store, CtlRunner(worker, slots=2, gate=gate))
    loop = asyncio.create_task(first.run())
    safe, _ = await first.submit(jreq("/echo", method="PUT", retry_safe=True))
    unsafe, _ = await first.submit(jreq("/echo", method="POST", retry_safe=False))
    queued, _ = await first.submit(jreq("/hello", method="GET", body=b""))
    await wait_until(lambda: first.status()["running_here"] == 2, what="two running")
    loop.cancel()
    await first.aclose(settle=False)    # as a crash leaves them: running in the file
    with contextlib.suppress(asyncio.CancelledError):
        await loop

    async with manager(fast(), sqlite_store(workdir), CtlRunner(worker)) as m:
        await wait_until(lambda: _is(m, safe.id, "succeeded"), what="safe job re-run", timeout=10)
        await wait_until(lambda: _is(m, queued.id, "succeeded"), what="queued job ran", timeout=10)
        s, u, q = await m.get(safe.id), await m.get(unsafe.id), await m.get(queued.id)
        assert s.attempts == 2 and q.attempts == 1
        assert u.status is JobStatus.FAILED and u.error.type == "interrupted" and u.attempts == 1


async def test_worker_crash_retries_then_dead_letter(workdir: Path, worker: str) -> None:
    runner = CtlRunner(worker)
    async with manager(fast(max_attempts=3), sqlite_store(workdir), runner) as m:
        job, _ = await m.submit(jreq("/close", method="GET", body=b"", retry_safe=True))
        await wait_until(lambda: _is(m, job.id, "failed"), what="dead-lettered", timeout=20)
        done = await m.get(job.id)
        assert done.error.type == "dead_letter" and "worker_crashed" in done.error.message
        assert done.attempts == 3 and runner.runs == [(job.id, 1), (job.id, 2), (job.id, 3)]
        # (aiohttp itself resends an idempotent GET once on a broken connection: >= 3, not == 3)
        assert (await worker_counter(worker))["paths"]["/close"] >= 3
        unsafe, _ = await m.submit(jreq("/close", method="GET", body=b"", retry_safe=False))
        await wait_until(lambda: _is(m, unsafe.id, "failed"), what="failed", timeout=20)
        assert (await m.get(unsafe.id)).error.type == "worker_crashed"


async def test_a_503_answer_is_tried_again_when_safe_then_failed_with_the_answer(workdir: Path, worker: str) -> None:
    """A worker's 503 (a CUDA OOM it recovered from, asleep) is "not now": a retry-safe job runs again
    while it has attempts; the last answer stays with the failed job. Other errors are final at once."""
    runner = CtlRunner(worker)
    async with manager(fast(max_attempts=3), sqlite_store(workdir), runner) as m:
        safe, _ = await m.submit(jreq("/status/503", method="GET", body=b"", retry_safe=True))
        unsafe, _ = await m.submit(jreq("/status/503", method="GET", body=b"", retry_safe=False))
        bad, _ = await m.submit(jreq("/status/400", method="GET", body=b"", retry_safe=True))
        for j in (safe, unsafe, bad):
            await wait_until(lambda j=j: _is(m, j.id, "failed"), what="failed", timeout=20)
        runs = collections.Counter(jid for jid, _ in runner.runs)
        assert (runs[safe.id], runs[unsafe.id], runs[bad.id]) == (3, 1, 1)
        for j, status in ((safe, 503), (unsafe, 503), (bad, 400)):
            done, result = await m.result(j.id)
            assert done.error.type == "worker_status" and result is not None and result.status == status


async def test_deadline_and_result_size(workdir: Path, worker: str) -> None:
    async with manager(fast(max_result_bytes=1000), sqlite_store(workdir), CtlRunner(worker, slots=0)) as m:
        late, _ = await m.submit(jreq("/hello", method="GET", body=b"", timeout_s=0.05))
        big, _ = await m.submit(jreq("/big?bytes=5000", method="GET", body=b""))
        await wait_until(lambda: time.time() > late.request.deadline_at, what="deadline passed")
        m.runner.slots = 4
        m.notify_slot_free()
        await wait_until(lambda: _is(m, late.id, "failed"), what="late failed", timeout=10)
        await wait_until(lambda: _is(m, big.id, "failed"), what="big failed", timeout=10)
        assert (await m.get(late.id)).error.type == "queue_timeout"
        assert (await m.get(big.id)).error.type == "result_too_large"
        assert "/hello" not in (await worker_counter(worker))["paths"]


async def test_callbacks_allowed_retried_and_refused(workdir: Path, worker: str) -> None:
    got: list[dict] = []
    calls = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=500)        # the first try fails; it is retried
        got.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/cb", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    settings = fast(callbacks={"allow": [r"re:http://127\.0\.0\.1:\d+/cb"], "backoff_initial_s": 0.05})
    try:
        async with manager(settings, sqlite_store(workdir), CtlRunner(worker)) as m:
            with pytest.raises(CallbackRefused, match="not allowed"):
                await m.submit(jreq(headers=(("X-Callback-URL", "http://127.0.0.1:1/elsewhere"),)))
            job, _ = await m.submit(jreq("/hello", method="GET", body=b"",
                                         headers=(("X-Callback-URL", f"http://127.0.0.1:{port}/cb"),)))
            assert all(k.lower() != "x-callback-url" for k, _ in job.request.headers)
            await wait_until(lambda: got, what="callback delivered", timeout=10)
            assert got[0]["id"] == job.id and got[0]["status"] == "succeeded" and calls == 2
            assert got[0]["result"]["bytes"] == 5
    finally:
        await runner.cleanup()


# -- Redis: several daemons ---------------------------------------------------------------------------------

@pytest.fixture
async def redis(workdir: Path) -> AsyncIterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(workdir)
    await server.start()
    yield server
    await server.stop()


def redis_store(server: RedisServer, settings: JobsSettings):
    return open_store(parse_store_url(server.url), consumer="d-" + uuid.uuid4().hex[:8], lease_s=settings.lease_s)


@needs_redis
async def test_two_daemons_share_jobs(redis: RedisServer, worker: str) -> None:
    s = fast()
    ra, rb = CtlRunner(worker, slots=0), CtlRunner(worker, slots=2)
    async with manager(s, redis_store(redis, s), ra) as a, manager(s, redis_store(redis, s), rb) as b:
        job, _ = await a.submit(jreq("/echo", body=b"shared"))
        assert (await b.get(job.id)).id == job.id
        await wait_until(lambda: _is(a, job.id, "succeeded"), what="done, seen from A", timeout=10)
        assert ra.runs == [] and rb.runs == [(job.id, 1)]       # only B had a free slot
        _, res = await a.result(job.id)
        assert json.loads(res.body)["body"] == "shared"
        assert [j.id for j in (await b.list(JobStatus.SUCCEEDED, 10))[0]] == [job.id]
        assert a.status()["store"] == "redis"


@needs_redis
async def test_dead_daemon_job_is_redelivered_after_lease(redis: RedisServer, worker: str) -> None:
    s = fast(lease_s=0.5)
    gate = asyncio.Event()
    store_a = redis_store(redis, s)
    await store_a.open()
    a = JobManager(s, store_a, CtlRunner(worker, gate=gate))
    loop_a = asyncio.create_task(a.run())
    job, _ = await a.submit(jreq("/echo", method="PUT", retry_safe=True))
    await wait_until(lambda: _is(a, job.id, "running"), what="A runs it")
    loop_a.cancel()                        # A dies: no ack, no renewal
    await a.aclose(settle=False)
    with contextlib.suppress(asyncio.CancelledError):
        await loop_a
    rb = CtlRunner(worker)
    async with manager(s, redis_store(redis, s), rb) as b:
        await wait_until(lambda: _is(b, job.id, "succeeded"), what="B finishes it", timeout=15)
        assert (await b.get(job.id)).attempts == 2 and rb.runs == [(job.id, 2)]


@needs_redis
async def test_redis_dead_letter_after_max_attempts(redis: RedisServer, worker: str) -> None:
    s = fast(lease_s=0.2, max_attempts=3)
    runner = CtlRunner(worker)
    async with manager(s, redis_store(redis, s), runner) as m:
        job, _ = await m.submit(jreq("/close", method="GET", body=b"", retry_safe=True))
        await wait_until(lambda: _is(m, job.id, "failed"), what="dead-lettered", timeout=20)
        done = await m.get(job.id)
        assert done.error.type == "dead_letter" and done.attempts == 3
        assert runner.runs == [(job.id, 1), (job.id, 2), (job.id, 3)]


@needs_redis
async def test_redis_cancel_running_on_another_daemon(redis: RedisServer, worker: str) -> None:
    s = fast(lease_s=0.3)
    async with manager(s, redis_store(redis, s), CtlRunner(worker, slots=0)) as a, \
            manager(s, redis_store(redis, s), CtlRunner(worker)) as b:
        job, _ = await a.submit(jreq("/hang", method="GET", body=b""))
        await wait_until(lambda: _in_flight(worker, 1), what="B's worker holds it", timeout=10)
        assert (await a.cancel(job.id)).status is JobStatus.CANCELLED
        await wait_until(lambda: _in_flight(worker, 0), what="B closed the worker connection", timeout=10)
        await wait_until(lambda: b.status()["running_here"] == 0, what="B's task gone")


@needs_redis
async def test_redis_down_then_back(redis: RedisServer, worker: str) -> None:
    s = fast()
    reg = CollectorRegistry()
    async with manager(s, redis_store(redis, s), CtlRunner(worker), reg) as m:
        await redis.stop()
        with pytest.raises(StoreUnavailable):
            await m.submit(jreq())
        assert m.status()["available"] is False
        assert reg.get_sample_value("gpu_supervisor_jobs_store_errors_total") >= 1
        await redis.start()

        async def submitted():
            with contextlib.suppress(StoreUnavailable):
                return (await m.submit(jreq("/hello", method="GET", body=b"")))[0]

        job = await wait_until(submitted, what="submissions work again", timeout=10)
        await wait_until(lambda: _is(m, job.id, "succeeded"), what="the job ran", timeout=10)
        assert m.status()["available"] is True
