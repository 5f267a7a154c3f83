"""The job stores (SQLite file and a real redis-server) round trip jobs the same way; settings and pure rules."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from supervisor.jobs.model import (
    Decision,
    Job,
    JobError,
    JobRequest,
    JobResult,
    JobStatus,
    after_failure,
    after_interruption,
    iso,
    worker_error,
)
from supervisor.jobs.settings import (
    JobsSettings,
    callback_allowed,
    parse_store_url,
    resolve_state_dir,
    store_spec,
)
from supervisor.jobs.store import Conflict, Full, StoreCorrupt, open_store
from supervisor.jobs.store_sqlite import SqliteJobStore
from tests.redis_server import REDIS_SERVER, RedisServer

T0 = 1_700_000_000.0
TTL = 60.0


def req(method: str = "POST", target: str = "/v1/x?a=1", body: bytes = b'{"n": 1}', key: str | None = None,
        retry_safe: bool = False, created_at: float = T0, client: str | None = None) -> JobRequest:
    return JobRequest(id=uuid.uuid4().hex, method=method, target=target, headers=(("Content-Type", "application/json"),
                      ("X-Trace", "t1")), body=body, priority="high", deadline_at=None, retry_safe=retry_safe,
                      worker="chat", fairness_key=client, idempotency_key=key, created_at=created_at)


def new_job(r: JobRequest) -> Job:
    return Job(request=r, status=JobStatus.QUEUED, digest=r.digest())


def always(_r: JobRequest) -> bool:
    return True


# -- settings ---------------------------------------------------------------------------------------------

def test_store_urls_accepted_and_split() -> None:
    assert parse_store_url("sqlite:///var/lib/x/jobs.db").path == "/var/lib/x/jobs.db"
    assert parse_store_url("redis://127.0.0.1:6379/2").kind == "redis"
    assert parse_store_url("rediss://cache.example:6380/0").kind == "redis"
    assert parse_store_url("unix:///run/redis.sock?db=3").url == "unix:///run/redis.sock?db=3"


@pytest.mark.parametrize("url, words", [
    ("sqlite://relative.db", "three slashes"),
    ("redis://:6379/0", "needs a host"),
    ("redis://h:99999/0", "bad port"),
    ("redis://h:6379/zero", "must be a number"),
    ("unix:///s.sock?db=x", "db must be one number"),
    ("unix:///s.sock?foo=1", "unknown query key"),
    ("mysql://h/db", "unknown store scheme"),
])
def test_bad_store_urls_say_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_store_url(url)
    with pytest.raises(ValidationError, match=words):
        JobsSettings(store=url)


def test_settings_are_frozen_and_strict() -> None:
    s = JobsSettings()
    assert (s.store, s.result_ttl_s, s.max_pending, s.max_result_bytes, s.lease_s, s.max_attempts) == (
        None, 1800.0, 10000, 16777216, 30.0, 3)
    assert s.callbacks.allow == ()
    with pytest.raises(ValidationError, match="extra"):
        JobsSettings(stor="sqlite:///x")
    with pytest.raises(ValidationError):
        JobsSettings(lease_s=0)
    with pytest.raises(ValidationError, match="http"):
        JobsSettings(callbacks={"allow": ["ftp://x/"]})
    with pytest.raises(ValidationError, match="regular expression"):
        JobsSettings(callbacks={"allow": ["re:([a-"]})
    with pytest.raises(ValidationError):
        s.model_copy().__setattr__("lease_s", 1)


def test_state_dir_resolution() -> None:
    assert resolve_state_dir("/srv/state", {"STATE_DIRECTORY": "/var/lib/a"}) == "/srv/state"
    assert resolve_state_dir(None, {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == "/var/lib/a"
    assert resolve_state_dir(None, {}) == os.path.expanduser("~/.local/state/gpu-supervisor")
    assert store_spec(None, "/var/lib/a").path == "/var/lib/a/jobs.db"
    assert store_spec("redis://h:1/0", "/var/lib/a").kind == "redis"


def test_callback_allow_list() -> None:
    allow = ("https://hooks.example.com/", r"re:http://127\.0\.0\.1:\d+/cb")
    assert callback_allowed("https://hooks.example.com/a/b", allow)
    assert callback_allowed("http://127.0.0.1:8080/cb", allow)
    assert not callback_allowed("http://127.0.0.1:8080/cb/more", allow)
    assert not callback_allowed("https://hooks.example.com.evil/", ("https://hooks.example.com",))
    assert callback_allowed("https://hooks.example.com/x", ("https://hooks.example.com",))
    assert not callback_allowed("https://evil.example/", allow)
    assert not callback_allowed("https://hooks.example.com/", ())


# -- pure rules -------------------------------------------------------------------------------------------

def test_after_failure_decisions() -> None:
    assert after_failure("worker_crashed", True, 1, 3, None, T0) is Decision.RETRY
    assert after_failure("worker_crashed", False, 1, 3, None, T0) is Decision.FAIL
    assert after_failure("queue_full", False, 1, 3, None, T0) is Decision.RETRY
    assert after_failure("worker_crashed", True, 3, 3, None, T0) is Decision.DEAD_LETTER
    assert after_failure("timeout", True, 1, 3, None, T0) is Decision.FAIL
    assert after_failure("queue_full", True, 1, 3, T0 - 1, T0) is Decision.FAIL


def test_after_interruption_decisions() -> None:
    assert after_interruption(True, 1, 3) is Decision.RETRY
    assert after_interruption(False, 1, 3) is Decision.FAIL
    assert after_interruption(True, 3, 3) is Decision.DEAD_LETTER


def test_worker_error_of_an_answer() -> None:
    """An answer >= 400 is the job's error: OpenAI's error type and message, else `worker_status`."""
    openai = b'{"error": {"message": "too long", "type": "invalid_request_error", "param": "prompt", ' \
             b'"code": "context_length_exceeded"}}'
    assert worker_error(JobResult(200, "application/json", openai)) is None
    assert worker_error(JobResult(302, None, b"")) is None
    assert worker_error(JobResult(400, "application/json", openai)) == JobError("invalid_request_error", "too long")
    vllm = b'{"object": "error", "type": "BadRequestError", "message": "m", "code": 400}'
    assert worker_error(JobResult(400, "application/json; charset=utf-8", vllm)) == JobError("BadRequestError", "m")
    assert worker_error(JobResult(404, "application/json", b'{"detail": "Not Found"}')) == JobError(
        "worker_status", 'the worker answered 404: {"detail": "Not Found"}')
    assert worker_error(JobResult(500, "text/plain", b"")) == JobError("worker_status", "the worker answered 500")
    assert worker_error(JobResult(503, "application/json", b"\xff[")).type == "worker_status"
    assert worker_error(JobResult(422, "application/json", b'{"error": {"type": 5}}')).type == "worker_status"


def test_job_json_and_expired_view() -> None:
    r = req(target="/v1/x?secret=1")
    job = Job(request=r, status=JobStatus.SUCCEEDED, attempts=1, started_at=T0 + 1, finished_at=T0 + 2,
              expires_at=T0 + 62)
    j = job.to_json(T0 + 3)
    assert j["status"] == "succeeded" and j["path"] == "/v1/x" and j["created_at"] == "2023-11-14T22:13:20.000Z"
    assert j["worker"] == "chat" and j["priority"] == "high" and j["result"] is None and j["error"] is None
    assert job.to_json(T0 + 62)["status"] == "expired"
    assert iso(None) is None
    assert req(body=b"a").digest() != req(body=b"b").digest()
    assert req(method="POST").digest() != req(method="PUT").digest()
    assert req().digest() == req().digest()


# -- stores -----------------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "redis"])
async def store(request):
    d = Path(tempfile.mkdtemp(prefix="jst-"))
    server = None
    if request.param == "sqlite":
        s = SqliteJobStore(str(d / "jobs.db"))
    else:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        server = RedisServer(d)
        await server.start()
        s = open_store(parse_store_url(server.url), consumer="test-" + uuid.uuid4().hex[:6], lease_s=0.2)
    await s.open()
    yield s
    await s.close()
    if server is not None:
        await server.stop()
    shutil.rmtree(d, ignore_errors=True)


async def test_round_trip(store) -> None:
    r = req()
    job, created = await store.create(new_job(r), max_pending=10)
    assert created and job.status is JobStatus.QUEUED and job.seq > 0
    got = await store.get(r.id)
    assert got.request.target == r.target and got.request.headers == r.headers and got.request.worker == "chat"
    assert got.status is JobStatus.QUEUED and got.attempts == 0 and got.digest == r.digest()
    assert await store.get("nope") is None
    assert await store.pending() == 1

    take = await store.take(always, T0 + 1, 3, TTL)
    running = take.job
    assert running.id == r.id and running.status is JobStatus.RUNNING and running.attempts == 1
    assert running.request.body == r.body                       # the body comes back to run it
    assert (await store.take(always, T0 + 1, 3, TTL)).job is None
    assert await store.renew([running]) == set()

    done = await store.finish(running, JobStatus.SUCCEEDED, JobResult(201, "text/plain", b"made"), None,
                              T0 + 2, TTL)
    assert done.status is JobStatus.SUCCEEDED and done.result.bytes == 4 and done.result.status == 201
    assert done.expires_at == pytest.approx(T0 + 2 + TTL) and done.finished_at == pytest.approx(T0 + 2)
    res = await store.get_result(r.id)
    assert (res.status, res.content_type, res.body) == (201, "text/plain", b"made")
    assert await store.pending() == 0
    # a second finish of the same run changes nothing
    assert await store.finish(running, JobStatus.FAILED, None, JobError("x", "y"), T0 + 3, TTL) is None


async def test_take_only_what_fits(store) -> None:
    a, b = req(target="/a"), req(target="/b")
    await store.create(new_job(a), 10)
    await store.create(new_job(b), 10)
    assert (await store.take(lambda r: False, T0, 3, TTL)).job is None
    assert (await store.get(a.id)).status is JobStatus.QUEUED
    first = (await store.take(always, T0, 3, TTL)).job
    assert first.id == a.id                                      # oldest first


async def test_idempotency_and_full(store) -> None:
    r1 = req(key="k1")
    j1, c1 = await store.create(new_job(r1), 10)
    r2 = req(key="k1")                                           # same request, new id
    j2, c2 = await store.create(new_job(r2), 10)
    assert c1 and not c2 and j2.id == j1.id
    with pytest.raises(Conflict, match="Idempotency-Key was used for another request"):
        await store.create(new_job(req(key="k1", body=b"other")), 10)
    await store.create(new_job(req()), 2)
    with pytest.raises(Full, match="max_pending"):
        await store.create(new_job(req()), 2)


async def test_cancel_queued_and_running(store) -> None:
    q, r = req(), req()
    await store.create(new_job(q), 10)
    await store.create(new_job(r), 10)
    running = (await store.take(lambda x: x.id == q.id, T0, 3, TTL)).job
    assert running.id == q.id
    c = await store.cancel(r.id, T0 + 1, TTL)
    assert c.status is JobStatus.CANCELLED and c.error.type == "cancelled"
    assert (await store.take(always, T0 + 1, 3, TTL)).job is None   # a cancelled job is never taken
    c = await store.cancel(q.id, T0 + 1, TTL)
    assert c.status is JobStatus.CANCELLED
    assert await store.renew([running]) == {q.id}                    # its runner learns it is gone
    assert await store.finish(running, JobStatus.SUCCEEDED, JobResult(200, None, b""), None, T0 + 2, TTL) is None
    assert (await store.get(q.id)).status is JobStatus.CANCELLED
    assert await store.get_result(q.id) is None
    assert await store.cancel("unknown", T0, TTL) is None


async def test_list_pages_newest_first_and_filters(store) -> None:
    ids = []
    for i in range(7):
        r = req(target=f"/p{i}")
        await store.create(new_job(r), 100)
        ids.append(r.id)
    run = (await store.take(always, T0, 3, TTL)).job
    await store.finish(run, JobStatus.FAILED, None, JobError("worker_error", "x"), T0, TTL)
    seen, cursor = [], None
    while True:
        page, cursor = await store.list(None, 3, cursor, T0)
        assert len(page) <= 3
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    failed, nxt = await store.list(JobStatus.FAILED, 10, None, T0)
    assert [j.id for j in failed] == [ids[0]] and nxt is None
    queued, _ = await store.list(JobStatus.QUEUED, 10, None, T0)
    assert len(queued) == 6
    expired, _ = await store.list(JobStatus.EXPIRED, 10, None, T0 + TTL + 1)
    assert [j.id for j in expired] == [ids[0]]


async def test_failed_by_an_error_answer_keeps_the_answer(store) -> None:
    r = req()
    await store.create(new_job(r), 10)
    run = (await store.take(always, T0, 3, TTL)).job
    answer = JobResult(400, "application/json", b'{"error": {"type": "invalid_request_error", "message": "m"}}')
    done = await store.finish(run, JobStatus.FAILED, answer, worker_error(answer), T0 + 1, TTL)
    assert done.status is JobStatus.FAILED and done.error == JobError("invalid_request_error", "m")
    assert done.result.status == 400 and done.result.bytes == len(answer.body)
    got = await store.get_result(r.id)
    assert (got.status, got.content_type, got.body) == (400, "application/json", answer.body)
    assert [j.id for j in (await store.list(JobStatus.FAILED, 10, None, T0 + 2))[0]] == [r.id]


async def test_list_by_client_key(store) -> None:
    mine = [req(client="k-a") for _ in range(3)]
    theirs = [req(client="k-b"), req(), req(client="anonymous")]
    for r in (*mine, *theirs):
        await store.create(new_job(r), 100)
    seen, cursor = [], None
    while True:
        page, cursor = await store.list(None, 2, cursor, T0, "k-a")
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == [r.id for r in reversed(mine)]
    assert [j.id for j in (await store.list(JobStatus.QUEUED, 10, None, T0, "k-b"))[0]] == [theirs[0].id]
    assert len((await store.list(None, 10, None, T0))[0]) == 6            # no key: every job


async def test_requeue_runs_again_with_attempts_counted(store) -> None:
    r = req(retry_safe=True)
    await store.create(new_job(r), 10)
    first = (await store.take(always, T0, 3, TTL)).job
    back = await store.requeue(first, JobError("worker_crashed", "boom"), T0)
    assert back.status is JobStatus.QUEUED and back.error.type == "worker_crashed"
    from tests.harness import wait_until

    async def retaken():
        return (await store.take(always, T0 + 1, 3, TTL)).job

    again = await wait_until(retaken, timeout=10, what="the job taken again")   # redis: after the lease
    assert again.id == r.id and again.attempts == 2


async def test_cleanup_expires_results_then_records(store) -> None:
    r = req()
    await store.create(new_job(r), 10)
    run = (await store.take(always, T0, 3, TTL)).job
    await store.finish(run, JobStatus.SUCCEEDED, JobResult(200, "text/plain", b"x"), None, T0, TTL)
    await store.cleanup(T0 + 1, TTL)
    assert (await store.get_result(r.id)).body == b"x"
    if store.kind == "sqlite":                 # redis: the TTLs do it (tested through the manager)
        await store.cleanup(T0 + TTL + 1, TTL)
        assert await store.get_result(r.id) is None
        assert (await store.get(r.id)).view_status(T0 + TTL + 1) is JobStatus.EXPIRED
        assert await store.cleanup(T0 + 2 * TTL + 1, TTL) == 1
        assert await store.get(r.id) is None


async def test_sqlite_recover_three_outcomes(tmp_path: Path) -> None:
    s = SqliteJobStore(str(tmp_path / "jobs.db"))
    await s.open()
    queued, safe, unsafe = req(), req(retry_safe=True), req(retry_safe=False)
    for r in (queued, safe, unsafe):
        await s.create(new_job(r), 10)
    await s.take(lambda x: x.id == safe.id, T0, 3, TTL)
    await s.take(lambda x: x.id == unsafe.id, T0, 3, TTL)
    await s.close()

    s2 = SqliteJobStore(str(tmp_path / "jobs.db"))
    await s2.open()
    changed = {j.id: j for j in await s2.recover(T0 + 5, 3, TTL)}
    assert set(changed) == {safe.id, unsafe.id}
    assert changed[safe.id].status is JobStatus.QUEUED and changed[safe.id].attempts == 1
    assert changed[unsafe.id].status is JobStatus.FAILED and changed[unsafe.id].error.type == "interrupted"
    assert (await s2.get(queued.id)).status is JobStatus.QUEUED
    await s2.close()


async def test_sqlite_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(b"this is not a database" * 100)
    s = SqliteJobStore(str(path))
    with pytest.raises(StoreCorrupt, match=str(path)):
        await s.open()
    await s.close()
