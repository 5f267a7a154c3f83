"""The shared job store: Redis (a stream with one consumer group, job hashes and results with TTLs), so
daemons on several hosts share one queue; a daemon holds each job it runs under a lease it renews."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .model import (
    TERMINAL,
    Decision,
    Job,
    JobError,
    JobRequest,
    JobResult,
    JobStatus,
    ResultMeta,
    after_interruption,
)
from .store import Conflict, Full, StoreUnavailable, Take

log = structlog.get_logger("supervisor.jobs.redis")
T = TypeVar("T")

PREFIX = "gpu-supervisor:"
STREAM = PREFIX + "jobs"
GROUP = "workers"
INDEX = PREFIX + "index"          # sorted set: seq -> job id (listing, newest first)
SEQ = PREFIX + "seq"
RECLAIM_BATCH = 16
LIST_SCAN_BATCH = 200
LIST_SCAN_MAX = 10                # batches per listing call at most

# Store a new job unless its idempotency key names one already, or the stream is full.
CREATE = """
local jobkey_prefix, id, digest, max_pending = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    local d = redis.call('HGET', jobkey_prefix .. existing, 'digest')
    if d then
      if d == digest then return {'existing', existing} end
      return {'conflict', existing}
    end
  end
end
local n = redis.call('XLEN', KEYS[1])
if n >= max_pending then return {'full', tostring(n)} end
local seq = redis.call('INCR', KEYS[3])
local key = jobkey_prefix .. id
redis.call('HSET', key, 'seq', seq, unpack(ARGV, 5))
local entry = redis.call('XADD', KEYS[1], '*', 'id', id)
redis.call('HSET', key, 'entry', entry)
redis.call('ZADD', KEYS[2], seq, id)
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], id) end
return {'created', tostring(seq)}
"""

# Compare-and-set on a job hash: status in ARGV[1] (comma list), attempts == ARGV[2] (or any), then HSET
# the pairs from ARGV[4] on and EXPIRE by ARGV[3] seconds (or none).
CAS = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
if not string.find(',' .. ARGV[1] .. ',', ',' .. st .. ',', 1, true) then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[3] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# Renew leases: reset the idle time of the entries this consumer still holds (JUSTID: the delivery count
# stays); an entry another daemon claimed meanwhile is not taken back.
RENEW = """
local out = {}
for i, eid in ipairs(ARGV) do
  if i > 1 then
    local p = redis.call('XPENDING', KEYS[1], KEYS[2], eid, eid, 1)
    if p[1] and p[1][2] == ARGV[1] then
      redis.call('XCLAIM', KEYS[1], KEYS[2], ARGV[1], 0, eid, 'JUSTID')
      table.insert(out, eid)
    end
  end
end
return out
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


def _f(v: Any) -> float | None:
    s = _s(v)
    return float(s) if s else None


def _job(h: dict[bytes, bytes], with_body: bool = False) -> Job:
    r = json.loads(h[b"req"])
    req = JobRequest(
        id=r["id"], method=r["method"], target=r["target"], headers=tuple((k, v) for k, v in r["headers"]),
        body=bytes(h.get(b"body", b"")) if with_body else b"", priority=r["priority"],
        deadline_at=r["deadline_at"], retry_safe=r["retry_safe"], worker=r["worker"],
        fairness_key=r["fairness_key"], idempotency_key=r["idempotency_key"], created_at=r["created_at"],
    )
    res = json.loads(h[b"result"]) if h.get(b"result") else None
    err = json.loads(h[b"error"]) if h.get(b"error") else None
    return Job(
        request=req, status=JobStatus(_s(h[b"status"])), seq=int(h.get(b"seq", 0)),
        attempts=int(h.get(b"attempts", 0)), started_at=_f(h.get(b"started_at")),
        finished_at=_f(h.get(b"finished_at")), expires_at=_f(h.get(b"expires_at")),
        result=ResultMeta(res["status"], res["content_type"], res["bytes"]) if res else None,
        error=JobError(err["type"], err["message"]) if err else None,
        callback_url=_s(h.get(b"callback_url")) or None, digest=_s(h.get(b"digest")),
    )


def _key(job_id: str) -> str:
    return PREFIX + "job:" + job_id


def _result_key(job_id: str) -> str:
    return PREFIX + "result:" + job_id


def _idem_key(key: str) -> str:
    return PREFIX + "idem:" + key


def _ttl(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class RedisJobStore:
    """One client (short timeouts, no silent retries: a down server answers at once); it reconnects on
    the next call by itself, and re-creates the consumer group when the server lost it."""

    kind = "redis"

    def __init__(self, url: str, consumer: str, lease_s: float = 30.0, connect_timeout_s: float = 1.0,
                 op_timeout_s: float = 2.0):
        self.url = url
        self.consumer = consumer
        self.lease_ms = max(1, int(lease_s * 1000))
        self.available = True
        self._r = aioredis.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s,
                                    retry=Retry(NoBackoff(), 0), retry_on_error=[])
        self._create = self._r.register_script(CREATE)
        self._cas = self._r.register_script(CAS)
        self._renew = self._r.register_script(RENEW)
        self._entries: dict[str, str] = {}       # job id -> stream entry id, for jobs running here

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            try:
                out = await fn()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()         # the server restarted empty: start over
                out = await fn()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if self.available:
                log.warning("jobs_store_down", store="redis", url=self._safe_url(), error=str(exc))
            self.available = False
            raise StoreUnavailable(f"redis job store {self._safe_url()}: {exc}") from exc
        except RedisError as exc:
            self.available = False
            log.warning("jobs_store_error", store="redis", url=self._safe_url(), error=str(exc))
            raise StoreUnavailable(f"redis job store {self._safe_url()}: {exc}") from exc
        if not self.available:
            log.info("jobs_store_back", store="redis", url=self._safe_url())
        self.available = True
        return out

    def _safe_url(self) -> str:
        head, sep, tail = self.url.partition("@")
        return ("redis://***@" + tail) if sep else head

    async def _ensure_group(self) -> None:
        try:
            await self._r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def open(self) -> None:
        await self._call(self._ensure_group)
        log.info("jobs_store_opened", store="redis", url=self._safe_url(), consumer=self.consumer)

    async def close(self) -> None:
        await self._r.aclose()

    # -- the API side ---------------------------------------------------------------------------------

    async def create(self, job: Job, max_pending: int) -> tuple[Job, bool]:
        r = job.request
        req = {"id": r.id, "method": r.method, "target": r.target, "headers": [list(h) for h in r.headers],
               "priority": r.priority, "deadline_at": r.deadline_at, "retry_safe": r.retry_safe,
               "worker": r.worker, "fairness_key": r.fairness_key, "idempotency_key": r.idempotency_key,
               "created_at": r.created_at}
        fields = ["req", json.dumps(req), "body", r.body, "status", JobStatus.QUEUED.value, "attempts", 0,
                  "digest", job.digest, "callback_url", job.callback_url or "", "available_at", r.created_at]
        idem = _idem_key(r.idempotency_key) if r.idempotency_key is not None else ""
        out = await self._call(lambda: self._create(
            keys=[STREAM, INDEX, SEQ, idem], args=[PREFIX + "job:", r.id, job.digest, max_pending, *fields]))
        verdict, value = _s(out[0]), _s(out[1])
        if verdict == "conflict":
            raise Conflict("this Idempotency-Key was used for another request")
        if verdict == "full":
            raise Full(f"the job store holds {value} pending jobs (jobs.max_pending {max_pending})")
        if verdict == "existing":
            found = await self.get(value)
            if found is not None:
                return found, False
            raise StoreUnavailable(f"job {value} vanished while being read")
        return replace(job, seq=int(value), status=JobStatus.QUEUED), True

    async def _hash(self, job_id: str) -> dict[bytes, bytes] | None:
        h = await self._call(lambda: self._r.hgetall(_key(job_id)))
        return h or None

    async def get(self, job_id: str) -> Job | None:
        h = await self._hash(job_id)
        return _job(h) if h else None

    async def get_result(self, job_id: str) -> JobResult | None:
        h = await self._call(lambda: self._r.hgetall(_result_key(job_id)))
        if not h:
            return None
        return JobResult(int(h[b"status"]), _s(h.get(b"content_type")) or None, bytes(h.get(b"body", b"")))

    async def list(self, status: JobStatus | None, limit: int, cursor: int | None,
                   now: float, key: str | None = None) -> tuple[list[Job], int | None]:
        out: list[Job] = []
        top = f"({cursor}" if cursor is not None else "+inf"
        for _ in range(LIST_SCAN_MAX):
            ids = await self._call(lambda t=top: self._r.zrevrangebyscore(INDEX, t, "-inf", start=0,
                                                                         num=LIST_SCAN_BATCH, withscores=True))
            if not ids:
                return out, None
            pipe_ids = [_s(i) for i, _ in ids]

            async def fetch(ids_: list[str] = pipe_ids) -> list:
                pipe = self._r.pipeline(transaction=False)
                for i in ids_:
                    pipe.hgetall(_key(i))
                return await pipe.execute()

            hashes = await self._call(fetch)
            for (_jid, score), h in zip(ids, hashes):
                top = f"({int(score)}"
                if not h:
                    continue            # expired record; cleanup drops it from the index
                job = _job(h)
                mine = key is None or job.request.fairness_key == key
                if mine and (status is None or job.view_status(now) is status):
                    out.append(job)
                    if len(out) == limit:
                        return out, job.seq
        return out, (out[-1].seq if out else int(top[1:]))

    async def cancel(self, job_id: str, now: float, result_ttl_s: float) -> Job | None:
        err = json.dumps({"type": "cancelled", "message": "cancelled by request"})
        await self._call(lambda: self._cas(keys=[_key(job_id)], args=[
            "queued,running", "", _ttl(2 * result_ttl_s), "status", "cancelled", "finished_at", now,
            "expires_at", now + result_ttl_s, "error", err, "body", b""]))
        return await self.get(job_id)

    async def pending(self) -> int:
        return int(await self._call(lambda: self._r.xlen(STREAM)))

    # -- the dispatch side ----------------------------------------------------------------------------

    async def take(self, fits: Callable[[JobRequest], bool], now: float, max_attempts: int,
                   result_ttl_s: float) -> Take:
        closed: list[Job] = []
        job = await self._reclaim(fits, now, max_attempts, result_ttl_s, closed)
        if job is None:
            job = await self._read_new(fits, now, closed)
        return Take(job=job, closed=tuple(closed))

    async def _entry_job_id(self, eid: str) -> str | None:
        rows = await self._call(lambda: self._r.xrange(STREAM, eid, eid, count=1))
        return _s(rows[0][1].get(b"id")) if rows else None

    async def _drop(self, eid: str) -> None:
        async def go() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.xack(STREAM, GROUP, eid)
            pipe.xdel(STREAM, eid)
            await pipe.execute()
        await self._call(go)

    async def _reclaim(self, fits: Callable[[JobRequest], bool], now: float, max_attempts: int,
                       ttl: float, closed: list[Job]) -> Job | None:
        """Entries whose lease ran out (their daemon died, or the job waits for another try)."""
        pend = await self._call(lambda: self._r.xpending_range(STREAM, GROUP, min="-", max="+",
                                                               count=RECLAIM_BATCH, idle=self.lease_ms))
        for p in pend:
            eid, deliveries = _s(p["message_id"]), int(p["times_delivered"])
            job_id = await self._entry_job_id(eid)
            h = await self._hash(job_id) if job_id else None
            if h is None or JobStatus(_s(h[b"status"])) in TERMINAL:
                if await self._claim(eid):
                    await self._drop(eid)
                continue
            job = _job(h, with_body=True)
            dead = deliveries >= max_attempts
            if not dead and not fits(job.request):
                continue
            if not await self._claim(eid):
                continue                                  # another daemon was quicker
            if dead:
                done = await self._close(job, eid, JobError(
                    "dead_letter", f"delivered {deliveries} time(s) (jobs.max_attempts {max_attempts})"
                    + (f"; last error {job.error.type}: {job.error.message}" if job.error else "")), now, ttl)
                if done:
                    closed.append(done)
                continue
            if job.status is JobStatus.RUNNING:           # its daemon died while running it
                d = after_interruption(job.request.retry_safe, job.attempts, max_attempts)
                if d is not Decision.RETRY:
                    etype = "interrupted" if d is Decision.FAIL else "dead_letter"
                    done = await self._close(job, eid, JobError(
                        etype, "the daemon running the job stopped; it is not safe to repeat"
                        if d is Decision.FAIL else f"interrupted after {job.attempts} attempt(s)"), now, ttl)
                    if done:
                        closed.append(done)
                    continue
            started = await self._start(job, eid, now, expect=job.status.value)
            if started is not None:
                log.info("job_reclaimed", job_id=job.id, deliveries=deliveries + 1, consumer=self.consumer)
                return started
        return None

    async def _claim(self, eid: str) -> bool:
        """Take over an entry idle past its lease (the delivery count goes up); False when another
        daemon claimed it first (its idle time was reset) or it is gone."""
        got = await self._call(lambda: self._r.xclaim(STREAM, GROUP, self.consumer, self.lease_ms, [eid]))
        return bool(got)

    async def _read_new(self, fits: Callable[[JobRequest], bool], now: float, closed: list[Job]) -> Job | None:
        """The oldest undelivered entry, taken only when it fits here."""
        while True:
            head = await self._peek()
            if head is None:
                return None
            h = await self._hash(head)
            if h is not None and JobStatus(_s(h[b"status"])) is JobStatus.QUEUED and not fits(_job(h).request):
                return None
            got = await self._call(lambda: self._r.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=1))
            if not got or not got[0][1]:
                return None
            eid, fields = got[0][1][0]
            eid, job_id = _s(eid), _s(fields.get(b"id"))
            h = await self._hash(job_id)
            if h is None or JobStatus(_s(h[b"status"])) is not JobStatus.QUEUED:
                await self._drop(eid)                     # cancelled while queued, or gone
                continue
            job = await self._start(_job(h, with_body=True), eid, now, expect="queued")
            if job is not None:
                return job
            await self._drop(eid)

    async def _peek(self) -> str | None:
        groups = await self._call(lambda: self._r.xinfo_groups(STREAM))
        last = next((_s(g.get("last-delivered-id")) for g in groups if _s(g.get("name")) == GROUP), None)
        if last is None:
            await self._call(self._ensure_group)
            last = "0-0"
        rows = await self._call(lambda: self._r.xrange(STREAM, f"({last}", "+", count=1))
        return _s(rows[0][1].get(b"id")) if rows else None

    async def _start(self, job: Job, eid: str, now: float, expect: str) -> Job | None:
        attempts = job.attempts + 1
        ok = await self._call(lambda: self._cas(keys=[_key(job.id)], args=[
            expect, str(job.attempts), "", "status", "running", "attempts", attempts, "started_at", now,
            "owner", self.consumer]))
        if not ok:
            return None
        self._entries[job.id] = eid
        return replace(job, status=JobStatus.RUNNING, attempts=attempts, started_at=now)

    async def _close(self, job: Job, eid: str, err: JobError, now: float, ttl: float) -> Job | None:
        ok = await self._call(lambda: self._cas(keys=[_key(job.id)], args=[
            "queued,running", "", _ttl(2 * ttl), "status", "failed", "finished_at", now, "expires_at", now + ttl,
            "error", json.dumps({"type": err.type, "message": err.message}), "body", b""]))
        await self._drop(eid)
        return await self.get(job.id) if ok else None

    async def renew(self, jobs: list[Job]) -> set[str]:
        if not jobs:
            return set()
        eids = {j.id: self._entries.get(j.id) for j in jobs}
        held = {_s(e) for e in await self._call(lambda: self._renew(
            keys=[STREAM, GROUP], args=[self.consumer, *[e for e in eids.values() if e]]))}

        async def statuses() -> list:
            pipe = self._r.pipeline(transaction=False)
            for j in jobs:
                pipe.hmget(_key(j.id), "status", "attempts")
            return await pipe.execute()

        gone = set()
        for j, (st, att) in zip(jobs, await self._call(statuses)):
            if eids[j.id] not in held or _s(st) != "running" or _s(att) != str(j.attempts):
                gone.add(j.id)
        return gone

    async def finish(self, job: Job, status: JobStatus, result: JobResult | None, error: JobError | None,
                     now: float, result_ttl_s: float) -> Job | None:
        ttl = _ttl(result_ttl_s)
        if result is not None:
            async def put() -> None:
                pipe = self._r.pipeline(transaction=True)
                pipe.hset(_result_key(job.id), mapping={"status": result.status, "body": result.body,
                                                        "content_type": result.content_type or ""})
                pipe.expire(_result_key(job.id), ttl)
                await pipe.execute()
            await self._call(put)
        meta = json.dumps({"status": result.status, "content_type": result.content_type,
                           "bytes": len(result.body)}) if result else ""
        errj = json.dumps({"type": error.type, "message": error.message}) if error else ""
        ok = await self._call(lambda: self._cas(keys=[_key(job.id)], args=[
            "running", str(job.attempts), _ttl(2 * result_ttl_s), "status", status.value, "finished_at", now,
            "expires_at", now + result_ttl_s, "result", meta, "error", errj, "body", b""]))
        eid = self._entries.pop(job.id, None)
        if not ok:
            if result is not None:
                await self._call(lambda: self._r.delete(_result_key(job.id)))
            return None
        if eid:
            await self._drop(eid)
        if job.request.idempotency_key is not None:
            await self._call(lambda: self._r.expire(_idem_key(job.request.idempotency_key), _ttl(2 * result_ttl_s)))
        return await self.get(job.id)

    async def requeue(self, job: Job, error: JobError, available_at: float) -> Job | None:
        """Back to queued; the entry stays pending here unrenewed, so it is claimed again (by any daemon)
        once its lease runs out: lease_s is the wait before the next try."""
        ok = await self._call(lambda: self._cas(keys=[_key(job.id)], args=[
            "running", str(job.attempts), "", "status", "queued", "available_at", available_at,
            "error", json.dumps({"type": error.type, "message": error.message})]))
        self._entries.pop(job.id, None)
        return await self.get(job.id) if ok else None

    async def recover(self, now: float, max_attempts: int, result_ttl_s: float) -> list[Job]:
        """Nothing to do at start: a dead daemon's jobs are claimed again when their leases run out."""
        return []

    async def cleanup(self, now: float, result_ttl_s: float) -> int:
        ids = await self._call(lambda: self._r.zrange(INDEX, 0, 499))
        if ids:
            async def exists() -> list:
                pipe = self._r.pipeline(transaction=False)
                for i in ids:
                    pipe.exists(_key(_s(i)))
                return await pipe.execute()
            gone = [i for i, e in zip(ids, await self._call(exists)) if not e]
            if gone:
                await self._call(lambda: self._r.zrem(INDEX, *gone))
        else:
            gone = []
        # consumers of daemons long gone, with nothing pending
        consumers = await self._call(lambda: self._r.xinfo_consumers(STREAM, GROUP))
        for c in consumers:
            name = _s(c.get("name"))
            if name != self.consumer and int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > 10 * self.lease_ms:
                await self._call(lambda n=name: self._r.xgroup_delconsumer(STREAM, GROUP, n))
        return len(gone)
