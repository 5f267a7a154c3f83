"""The /jobs endpoints and the 202 answer, served by aiohttp over a real job store and a real ctl worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from supervisor.jobs.api import JobsApi, JobTerms, job_request, submit_error_response, submit_response, wants_async
from supervisor.jobs.manager import CallbackRefused, JobManager
from supervisor.jobs.settings import parse_store_url
from supervisor.jobs.store import Conflict, Full, StoreUnavailable, open_store
from supervisor.jobs.store_sqlite import SqliteJobStore
from tests.harness import wait_until
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_jobs_manager import CtlRunner, fast, workdir, worker  # noqa: F401 - fixtures


def test_wants_async() -> None:
    assert wants_async(["respond-async"])
    assert wants_async(["wait=10, Respond-Async"])
    assert wants_async(["return=minimal", "respond-async; foo"])
    assert not wants_async(["return=minimal"])
    assert not wants_async([])


def test_job_request_keeps_end_to_end_headers() -> None:
    r = job_request("post", "/v1/x?a=1", [("Prefer", "respond-async"), ("Connection", "keep-alive"),
                                          ("Idempotency-Key", "k"), ("Content-Length", "3"), ("X-A", "1")],
                    b"abc", now=100.0, terms=JobTerms(timeout_s=5, retry_safe=True))
    assert r.method == "POST" and r.headers == (("Idempotency-Key", "k"), ("X-A", "1"))
    assert r.idempotency_key == "k" and r.deadline_at == 105.0 and r.created_at == 100.0 and r.retry_safe


def make_app(m: JobManager) -> web.Application:
    async def proxied(request: web.Request) -> web.Response:
        rid = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        if not wants_async(request.headers.getall("Prefer", [])):
            return web.Response(text="sync path")
        req = job_request(request.method, request.raw_path, request.headers.items(), await request.read(),
                          now=m.now(), terms=JobTerms(retry_safe=request.method in ("GET", "PUT")))
        try:
            job, _ = await m.submit(req)
        except (CallbackRefused, Conflict, Full, StoreUnavailable) as exc:
            return submit_error_response(exc, rid)
        return submit_response(job, m.now(), rid)

    app = web.Application()
    app.add_routes(JobsApi(m).routes())
    app.router.add_route("*", "/{tail:(?!jobs).*}", proxied)
    return app


@contextlib.asynccontextmanager
async def served(m: JobManager, aiohttp_client):
    await m.store.open()
    loop = asyncio.create_task(m.run())
    try:
        yield await aiohttp_client(make_app(m))
    finally:
        await m.aclose()
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await m.runner.aclose()


@pytest.fixture
async def client(workdir: Path, worker: str, aiohttp_client) -> AsyncIterator:  # noqa: F811
    runner = CtlRunner(worker, slots=0)
    m = JobManager(fast(), SqliteJobStore(str(workdir / "jobs.db")), runner)
    async with served(m, aiohttp_client) as c:
        c.runner = runner
        c.manager = m
        yield c


async def test_submit_poll_result(client) -> None:
    resp = await client.post("/echo?z=9", data=b"payload", headers={"Prefer": "respond-async",
                                                                      "Content-Type": "text/plain"})
    assert resp.status == 202
    job = await resp.json()
    assert resp.headers["Location"] == f"/jobs/{job['id']}"
    assert resp.headers["Preference-Applied"] == "respond-async"
    assert job["status"] == "queued" and job["method"] == "POST" and job["path"] == "/echo"
    pending = await client.get(f"/jobs/{job['id']}/result")
    assert pending.status == 202 and int(pending.headers["Retry-After"]) >= 1
    client.runner.slots = 1
    client.manager.notify_slot_free()

    async def finished():
        r = await client.get(f"/jobs/{job['id']}")
        return (await r.json())["status"] == "succeeded"

    await wait_until(finished, what="job succeeded", timeout=10)
    res = await client.get(f"/jobs/{job['id']}/result")
    assert res.status == 200 and res.headers["Content-Type"].startswith("application/json")
    echo = await res.json()
    assert echo["body"] == "payload" and echo["query"] == {"z": "9"} and "prefer" not in echo["headers"]
    info = await (await client.get(f"/jobs/{job['id']}")).json()
    assert info["attempts"] == 1 and info["result"]["status"] == 200 and info["finished_at"].endswith("Z")
    assert (await client.get("/plain")).status == 200     # without Prefer: the synchronous path


async def test_unknown_and_bad_queries(client) -> None:
    for path in ("/jobs/nope", "/jobs/nope/result"):
        r = await client.get(path)
        assert r.status == 404 and (await r.json())["error"]["type"] == "not_found"
    r = await client.delete("/jobs/nope")
    assert r.status == 404
    for q in ("status=bogus", "limit=0", "limit=x", "cursor=-1"):
        r = await client.get(f"/jobs?{q}")
        body = await r.json()
        assert r.status == 400 and body["error"]["type"] == "bad_request", q
        assert q.split("=")[0] in body["error"]["message"]


async def test_delete_and_list_paging(client) -> None:
    ids = []
    for i in range(5):
        r = await client.post(f"/echo?i={i}", data=b"x", headers={"Prefer": "respond-async"})
        ids.append((await r.json())["id"])
    d = await client.delete(f"/jobs/{ids[0]}")
    assert d.status == 200 and (await d.json())["status"] == "cancelled"
    r = await client.get(f"/jobs/{ids[0]}/result")
    assert r.status == 410 and (await r.json())["error"]["type"] == "cancelled"
    seen, cursor = [], None
    while True:
        url = "/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(url)).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    queued = await (await client.get("/jobs?status=queued")).json()
    assert {j["id"] for j in queued["jobs"]} == set(ids[1:])
    cancelled = await (await client.get("/jobs?status=cancelled&limit=10")).json()
    assert [j["id"] for j in cancelled["jobs"]] == [ids[0]]


async def test_idempotency_key_same_job_or_422(client) -> None:
    h = {"Prefer": "respond-async", "Idempotency-Key": "abc"}
    a = await (await client.post("/echo", data=b"1", headers=h)).json()
    b = await client.post("/echo", data=b"1", headers=h)
    assert b.status == 202 and (await b.json())["id"] == a["id"]
    c = await client.post("/echo", data=b"2", headers=h)
    body = await c.json()
    assert c.status == 422 and body["error"]["type"] == "conflict" and "Idempotency-Key" in body["error"]["message"]


async def test_failed_job_result_answers_its_error(client) -> None:
    r = await client.post("/status/503", data=b"", headers={"Prefer": "respond-async"})  # POST: worker says 405
    job = await r.json()
    crash = await (await client.get("/close", headers={"Prefer": "respond-async"})).json()
    client.runner.slots = 2
    client.manager.notify_slot_free()

    async def status(jid):
        return (await (await client.get(f"/jobs/{jid}")).json())["status"]

    await wait_until(lambda: _eq(status(job["id"]), "failed"), what="answered", timeout=10)  # an error answer
    done = await (await client.get(f"/jobs/{job['id']}")).json()
    assert done["error"]["type"] == "worker_status" and "405" in done["error"]["message"]  # not OpenAI-shaped
    assert done["result"]["status"] == 405
    res = await client.get(f"/jobs/{job['id']}/result")
    assert res.status == 405                                   # the worker's answer, as it gave it
    await wait_until(lambda: _eq(status(crash["id"]), "failed"), what="crash failed", timeout=20)
    res = await client.get(f"/jobs/{crash['id']}/result")
    body = await res.json()
    assert res.status == 502 and body["error"]["type"] == "dead_letter" and body["error"]["job"]["attempts"] == 3


async def _eq(aw, want) -> bool:
    return await aw == want


async def test_full_store_answers_429(workdir: Path, worker: str, aiohttp_client) -> None:  # noqa: F811
    m = JobManager(fast(max_pending=1), SqliteJobStore(str(workdir / "jobs.db")), CtlRunner(worker, slots=0))
    async with served(m, aiohttp_client) as c:
        assert (await c.post("/echo", headers={"Prefer": "respond-async"})).status == 202
        r = await c.post("/echo", headers={"Prefer": "respond-async"})
        assert r.status == 429 and (await r.json())["error"]["type"] == "queue_full" and "Retry-After" in r.headers


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
async def test_store_down_answers_503_and_sync_goes_on(workdir: Path, worker: str, aiohttp_client) -> None:  # noqa: F811
    server = RedisServer(workdir)
    await server.start()
    s = fast()
    store = open_store(parse_store_url(server.url), consumer="api-test", lease_s=s.lease_s)
    m = JobManager(s, store, CtlRunner(worker))
    try:
        async with served(m, aiohttp_client) as c:
            await server.stop()
            r = await c.post("/echo", headers={"Prefer": "respond-async"})
            body = await r.json()
            assert r.status == 503 and body["error"]["type"] == "jobs_unavailable"
            assert int(r.headers["Retry-After"]) >= 1 and body["error"]["retry_after_s"] >= 1
            assert (await c.get("/plain")).status == 200
            assert (await c.get("/jobs/x")).status == 503
            await server.start()

            async def accepted():
                return (await c.post("/hello", headers={"Prefer": "respond-async"})).status == 202

            await wait_until(accepted, what="accepted again", timeout=10)
    finally:
        await server.stop()


def test_job_json_round_trips_as_json() -> None:
    from supervisor.jobs.model import Job, JobStatus
    r = job_request("GET", "/a", [], b"", now=time.time())
    j = Job(request=r, status=JobStatus.QUEUED)
    assert json.loads(json.dumps(j.to_json(time.time())))["status"] == "queued"
