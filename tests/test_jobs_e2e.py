"""Async jobs through the real daemon: submit, poll, result; kill -9 of the daemon; two daemons on one Redis.

Real daemons, a real SQLite file in the daemon's state directory, a real redis-server, real ctl workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import tempfile
from pathlib import Path

import aiohttp
import pytest

from tests.harness import SupervisorProcess, fast_config, pid_alive, wait_until
from tests.redis_server import REDIS_SERVER, RedisServer

ASYNC = {"Prefer": "respond-async"}


async def _job(sp: SupervisorProcess, job_id: str) -> dict:
    async with sp.session.get(f"/jobs/{job_id}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _final(sp: SupervisorProcess, job_id: str, timeout: float = 20) -> dict:
    async def done():
        j = await _job(sp, job_id)
        return j if j["status"] in ("succeeded", "failed", "cancelled", "expired") else None
    return await wait_until(done, timeout, f"job {job_id} finished")


async def test_submit_poll_result_and_cancel(supervisor_factory):
    sp = await supervisor_factory(fast_config(queue={"concurrency": 1}))
    body = b'{"model": "x", "n": 7}'
    async with sp.session.post("/echo", data=body, headers={**ASYNC, "Content-Type": "application/json"}) as r:
        assert r.status == 202
        assert r.headers["Preference-Applied"] == "respond-async"
        job = await r.json()
        assert r.headers["Location"] == f"/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["method"] == "POST" and job["path"] == "/echo"
    final = await _final(sp, job["id"])
    assert final["status"] == "succeeded" and final["result"]["status"] == 200 and final["attempts"] == 1
    async with sp.session.get(f"/jobs/{job['id']}/result") as r:
        assert r.status == 200 and r.content_type == "application/json"
        answer = await r.json()
    assert answer["body_sha256"] == hashlib.sha256(body).hexdigest()  # the worker's answer, as it gave it
    # a running job is cancelled: its worker connection is closed
    async with sp.session.get("/sleep?s=30", headers=ASYNC) as r:
        slow = await r.json()
    await wait_until(lambda: _status_is(sp, slow["id"], "running"), 10, "slow job running")
    async with sp.session.delete(f"/jobs/{slow['id']}") as r:
        assert r.status == 200
    assert (await _final(sp, slow["id"]))["status"] == "cancelled"
    await wait_until(lambda: _worker_disconnects(sp, 1), 10, "worker saw the connection close")
    # listing, and an unknown id
    async with sp.session.get("/jobs?limit=1") as r:
        page = await r.json()
    assert len(page["jobs"]) == 1 and page["next_cursor"] is not None
    async with sp.session.get("/jobs/nope") as r:
        assert r.status == 404 and (await r.json())["error"]["type"] == "not_found"
    m = await sp.metrics()
    assert 'gpu_supervisor_jobs_total{status="succeeded"}' in m and "gpu_supervisor_jobs_pending" in m
    assert (await sp.status())["jobs"]["store"] == "sqlite"


async def _status_is(sp, job_id: str, status: str) -> bool:
    return (await _job(sp, job_id))["status"] == status


async def _worker_disconnects(sp, n: int) -> bool:
    async with sp.session.get("/counter") as r:
        return (await r.json()).get("disconnects", 0) >= n


async def test_idempotency_key_same_request_same_job_other_request_422(supervisor_factory):
    sp = await supervisor_factory(fast_config())
    h = {**ASYNC, "Idempotency-Key": "k-1"}
    async with sp.session.post("/echo", data=b"a", headers=h) as r:
        first = await r.json()
    async with sp.session.post("/echo", data=b"a", headers=h) as r:
        assert r.status == 202 and (await r.json())["id"] == first["id"]
    async with sp.session.post("/echo", data=b"other", headers=h) as r:
        assert r.status == 422 and (await r.json())["error"]["type"] == "conflict"


async def test_kill9_of_the_daemon_loses_no_job(supervisor_factory):
    """Queued jobs run after a restart; a running retry-safe job runs again (attempts 2); a running job
    that is not safe to repeat ends failed `interrupted`."""
    d = Path(tempfile.mkdtemp(prefix="gs-"))
    try:
        cfg = fast_config(queue={"concurrency": 2})
        sp = SupervisorProcess(d, cfg)
        await sp.start()
        ids = {}
        async with sp.session.get("/sleep?s=30", headers=ASYNC) as r:
            ids["get_running"] = (await r.json())["id"]
        async with sp.session.post("/echo?delay=30", data=b"x", headers=ASYNC) as r:
            ids["post_running"] = (await r.json())["id"]
        await wait_until(lambda: _status_is(sp, ids["post_running"], "running"), 10, "both running")
        await wait_until(lambda: _status_is(sp, ids["get_running"], "running"), 10, "both running")
        async with sp.session.get("/hello", headers=ASYNC) as r:
            ids["queued"] = (await r.json())["id"]
        assert (await _job(sp, ids["queued"]))["status"] == "queued"
        worker = await sp.worker_pid()
        sp.proc.send_signal(signal.SIGKILL)
        await sp.wait_exit(10)
        await sp.stop()
        # the worker dies with its daemon (PR_SET_PDEATHSIG), so the next one does not start a second copy
        await wait_until(lambda: not pid_alive(worker), 10, "worker died with its daemon")
        again = SupervisorProcess(d, fast_config(queue={"concurrency": 2}))
        await again.start()
        try:
            q = await _final(again, ids["queued"])
            assert q["status"] == "succeeded"
            post = await _final(again, ids["post_running"])
            assert post["status"] == "failed" and post["error"]["type"] == "interrupted"
            get = await _job(again, ids["get_running"])
            assert get["status"] in ("queued", "running") and get["attempts"] == 2
        finally:
            await again.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)")
async def test_two_daemons_on_one_redis_kill9_of_one(supervisor_factory):
    rdir = Path(tempfile.mkdtemp(prefix="gs-r"))
    redis = RedisServer(rdir)
    await redis.start()
    try:
        cfg = fast_config(queue={"concurrency": 1}, jobs={"store": redis.url, "lease_s": 1.0, "max_attempts": 3})
        a = await supervisor_factory(cfg)
        b = await supervisor_factory(cfg)
        ids = []
        for i in range(6):
            async with a.session.get(f"/sleep?s=0.3&i={i}", headers=ASYNC) as r:
                assert r.status == 202
                ids.append((await r.json())["id"])
        # each daemon sees every job's status
        for j in ids:
            assert (await _job(b, j))["id"] == j
        await wait_until(lambda: _any_running_on(a, ids), 10, "a runs a job")
        a.proc.send_signal(signal.SIGKILL)
        await a.wait_exit(10)
        finals = [await _final(b, j, 30) for j in ids]
        assert all(f["status"] == "succeeded" for f in finals), finals
        assert any(f["attempts"] >= 2 for f in finals)  # a's job was delivered again after its lease
        # a store that is down: submissions 503 jobs_unavailable at once, synchronous traffic goes on
        await redis.stop()
        async with b.session.get("/hello", headers=ASYNC) as r:
            assert r.status == 503 and (await r.json())["error"]["type"] == "jobs_unavailable"
            assert int(r.headers["Retry-After"]) >= 1
        async with b.session.get("/hello") as r:
            assert r.status == 200
        await redis.start()

        async def accepted() -> bool:
            async with b.session.get("/hello", headers=ASYNC) as r:
                return r.status == 202
        await wait_until(accepted, 20, "the daemon reconnected by itself")
    finally:
        await redis.stop()
        shutil.rmtree(rdir, ignore_errors=True)


async def _any_running_on(sp, ids) -> bool:
    for j in ids:
        try:
            job = await _job(sp, j)
        except aiohttp.ClientError:
            return False
        if job["status"] == "running":
            return True
    return False


async def test_a_job_that_always_crashes_its_worker_is_dead_lettered(supervisor_factory):
    sp = await supervisor_factory(fast_config(jobs={"max_attempts": 2}))
    async with sp.session.get("/crash", headers=ASYNC) as r:
        job = await r.json()
    final = await _final(sp, job["id"], 30)
    assert final["status"] == "failed" and final["error"]["type"] in ("dead_letter", "worker_crashed")
    assert final["attempts"] >= 2


async def test_a_corrupt_job_store_is_a_clear_startup_error_naming_the_file():
    d = Path(tempfile.mkdtemp(prefix="gs-"))
    try:
        (d / "jobs.db").write_bytes(b"this is not a SQLite database, just junk " * 100)
        sp = SupervisorProcess(d, fast_config())
        with pytest.raises(AssertionError, match="exited"):
            await sp.start(wait_ready=False, timeout=20)
        assert await sp.wait_exit(10) == 1
        ev = sp.events("jobs_store_unusable")
        assert ev and str(d / "jobs.db") in ev[0]["error"]
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_a_job_is_accepted_while_the_queue_is_full_and_runs_later(supervisor_factory):
    sp = await supervisor_factory(fast_config(queue={"concurrency": 1, "max_size": 1}))
    running = asyncio.create_task(sp.session.get("/sleep?s=1"))
    await wait_until(lambda: _inflight(sp), 10, "one running")
    queued = asyncio.create_task(sp.session.get("/sleep?s=0.1"))
    await wait_until(lambda: _queued(sp), 10, "one queued")
    async with sp.session.get("/hello") as r:
        assert r.status == 429  # synchronous: the queue is full
    async with sp.session.get("/hello", headers=ASYNC) as r:
        assert r.status == 202  # a job is stored anyway, and runs when there is room
        job = await r.json()
    assert (await _final(sp, job["id"]))["status"] == "succeeded"
    for t in (running, queued):
        (await t).release()


async def _inflight(sp) -> bool:
    return (await sp.status())["queue"]["inflight"] >= 1


async def _queued(sp) -> bool:
    return (await sp.status())["queue"]["total"] >= 1
