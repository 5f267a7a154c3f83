"""The embedded job store: one SQLite file (WAL, synced on every commit), used from one dedicated thread."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import structlog

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
from .store import Conflict, Full, StoreCorrupt, StoreUnavailable, Take

log = structlog.get_logger("supervisor.jobs.sqlite")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    priority TEXT,
    deadline_at REAL,
    retry_safe INTEGER NOT NULL,
    worker TEXT,
    fairness_key TEXT,
    idempotency_key TEXT UNIQUE,
    digest TEXT NOT NULL,
    callback_url TEXT,
    created_at REAL NOT NULL,
    available_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result_status INTEGER,
    result_content_type TEXT,
    result_bytes INTEGER,
    result_body BLOB,
    error_type TEXT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires_at);
CREATE INDEX IF NOT EXISTS jobs_key_seq ON jobs (fairness_key, seq);
"""
COLUMNS = ("seq, id, status, method, target, headers, priority, deadline_at, retry_safe, worker, fairness_key, "
           "idempotency_key, digest, callback_url, created_at, started_at, finished_at, expires_at, attempts, "
           "result_status, result_content_type, result_bytes, error_type, error_message")
CANDIDATES = 64          # queued jobs looked at per dispatch step


def _job(row: sqlite3.Row) -> Job:
    req = JobRequest(
        id=row["id"], method=row["method"], target=row["target"],
        headers=tuple((k, v) for k, v in json.loads(row["headers"])), body=b"",
        priority=row["priority"], deadline_at=row["deadline_at"], retry_safe=bool(row["retry_safe"]),
        worker=row["worker"], fairness_key=row["fairness_key"], idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
    )
    result = None
    if row["result_status"] is not None:
        result = ResultMeta(row["result_status"], row["result_content_type"], row["result_bytes"] or 0)
    error = JobError(row["error_type"], row["error_message"] or "") if row["error_type"] else None
    return Job(request=req, status=JobStatus(row["status"]), seq=row["seq"], attempts=row["attempts"],
               started_at=row["started_at"], finished_at=row["finished_at"], expires_at=row["expires_at"],
               result=result, error=error, callback_url=row["callback_url"], digest=row["digest"])


class SqliteJobStore:
    """Every call runs in one thread that owns the connection; the event loop only awaits it."""

    kind = "sqlite"

    def __init__(self, path: str):
        self.path = path
        self.available = True
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs-sqlite")
        self._db: sqlite3.Connection | None = None

    # -- plumbing ---------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self._exec, fn, *args)
        except (Conflict, Full, StoreCorrupt):
            self.available = True
            raise
        except sqlite3.Error as exc:
            self.available = False
            log.warning("jobs_store_error", store="sqlite", path=self.path, error=str(exc))
            raise StoreUnavailable(f"job store {self.path}: {exc}") from exc
        self.available = True
        return out

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable(f"job store {self.path} is not open")
        return self._db

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._exec, self._open)

    def _open(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreCorrupt(f"job store {self.path}: cannot create its directory ({exc})") from exc
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        except sqlite3.Error as exc:
            raise StoreCorrupt(f"job store {self.path}: cannot open ({exc})") from exc
        try:
            db.row_factory = sqlite3.Row
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreCorrupt(f"job store {self.path}: schema version {version} is newer than this daemon's "
                                   f"({SCHEMA_VERSION}); use a newer gpu-supervisor or another file")
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")   # takes effect on a new file only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")       # a job is on disk before its 202
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            row = db.execute("PRAGMA quick_check").fetchone()
            if row[0] != "ok":
                raise StoreCorrupt(f"job store {self.path}: integrity check failed ({row[0]}); "
                                   "move the file aside to start with an empty store")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreCorrupt(f"job store {self.path} is not a usable SQLite database ({exc}); "
                               "move the file aside to start with an empty store") from exc
        except StoreCorrupt:
            db.close()
            raise
        self._db = db
        log.info("jobs_store_opened", store="sqlite", path=self.path, schema=SCHEMA_VERSION)

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await asyncio.get_running_loop().run_in_executor(self._exec, _close)
        self._exec.shutdown(wait=True)

    # -- operations (each `_x` runs in the store thread) -------------------------------------------------

    async def create(self, job: Job, max_pending: int) -> tuple[Job, bool]:
        return await self._call(self._create, job, max_pending)

    def _create(self, job: Job, max_pending: int) -> tuple[Job, bool]:
        db = self._conn()
        r = job.request
        db.execute("BEGIN IMMEDIATE")
        try:
            if r.idempotency_key is not None:
                row = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE idempotency_key = ?",
                                 (r.idempotency_key,)).fetchone()
                if row is not None:
                    if row["digest"] != job.digest:
                        raise Conflict("this Idempotency-Key was used for another request")
                    db.execute("ROLLBACK")
                    return _job(row), False
            n = db.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]
            if n >= max_pending:
                raise Full(f"the job store holds {n} pending jobs (jobs.max_pending {max_pending})")
            cur = db.execute(
                "INSERT INTO jobs (id, status, method, target, headers, body, priority, deadline_at, retry_safe, "
                "worker, fairness_key, idempotency_key, digest, callback_url, created_at, available_at, attempts) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (r.id, r.method, r.target, json.dumps([list(h) for h in r.headers]), r.body, r.priority,
                 r.deadline_at, int(r.retry_safe), r.worker, r.fairness_key, r.idempotency_key, job.digest,
                 job.callback_url, r.created_at, r.created_at),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return _with(job, seq=cur.lastrowid, status=JobStatus.QUEUED), True

    async def get(self, job_id: str) -> Job | None:
        return await self._call(self._get, job_id)

    def _get(self, job_id: str) -> Job | None:
        row = self._conn().execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def _get_full(self, job_id: str) -> Job | None:
        """The job with its request body (to run it)."""
        row = self._conn().execute(f"SELECT {COLUMNS}, body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = _job(row)
        return _with(job, request=_replace_body(job.request, row["body"]))

    async def get_result(self, job_id: str) -> JobResult | None:
        return await self._call(self._get_result, job_id)

    def _get_result(self, job_id: str) -> JobResult | None:
        row = self._conn().execute(
            "SELECT result_status, result_content_type, result_body FROM jobs WHERE id = ? "
            "AND status IN ('succeeded', 'failed') AND result_body IS NOT NULL", (job_id,)).fetchone()
        if row is None:
            return None
        return JobResult(row["result_status"], row["result_content_type"], bytes(row["result_body"]))

    async def list(self, status: JobStatus | None, limit: int, cursor: int | None,
                   now: float, key: str | None = None) -> tuple[list[Job], int | None]:
        return await self._call(self._list, status, limit, cursor, now, key)

    def _list(self, status: JobStatus | None, limit: int, cursor: int | None,
              now: float, key: str | None) -> tuple[list[Job], int | None]:
        where, args = ["seq < ?"], [cursor if cursor is not None else 2**62]
        if key is not None:
            where.append("fairness_key = ?")
            args.append(key)
        if status is JobStatus.EXPIRED:
            where.append("status IN ('succeeded', 'failed', 'cancelled') AND expires_at <= ?")
            args.append(now)
        elif status in TERMINAL:
            where.append("status = ? AND (expires_at IS NULL OR expires_at > ?)")
            args += [status.value, now]
        elif status is not None:
            where.append("status = ?")
            args.append(status.value)
        rows = self._conn().execute(
            f"SELECT {COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*args, limit + 1)).fetchall()
        jobs = [_job(r) for r in rows[:limit]]
        return jobs, (jobs[-1].seq if len(rows) > limit else None)

    async def take(self, fits: Callable[[JobRequest], bool], now: float, max_attempts: int,
                   result_ttl_s: float) -> Take:
        rows = await self._call(self._candidates, now)
        for job in rows:
            if not fits(job.request):
                continue
            taken = await self._call(self._take_one, job.id, now)
            if taken is not None:
                return Take(job=taken)
        return Take()

    def _candidates(self, now: float) -> list[Job]:
        rows = self._conn().execute(
            f"SELECT {COLUMNS} FROM jobs WHERE status = 'queued' AND available_at <= ? ORDER BY seq LIMIT ?",
            (now, CANDIDATES)).fetchall()
        return [_job(r) for r in rows]

    def _take_one(self, job_id: str, now: float) -> Job | None:
        cur = self._conn().execute(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ? "
            "WHERE id = ? AND status = 'queued'", (now, job_id))
        return self._get_full(job_id) if cur.rowcount == 1 else None

    async def renew(self, jobs: list[Job]) -> set[str]:
        return await self._call(self._renew, [j.id for j in jobs])

    def _renew(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        running = {r[0] for r in self._conn().execute(
            f"SELECT id FROM jobs WHERE id IN ({marks}) AND status = 'running'", ids)}
        return set(ids) - running

    async def finish(self, job: Job, status: JobStatus, result: JobResult | None, error: JobError | None,
                     now: float, result_ttl_s: float) -> Job | None:
        return await self._call(self._finish, job, status, result, error, now, result_ttl_s)

    def _finish(self, job: Job, status: JobStatus, result: JobResult | None, error: JobError | None, now: float,
                ttl: float) -> Job | None:
        job_id, attempts = job.id, job.attempts
        cur = self._conn().execute(
            "UPDATE jobs SET status = ?, finished_at = ?, expires_at = ?, result_status = ?, "
            "result_content_type = ?, result_bytes = ?, result_body = ?, error_type = ?, error_message = ?, "
            "body = x'' WHERE id = ? AND status = 'running' AND attempts = ?",
            (status.value, now, now + ttl, result.status if result else None,
             result.content_type if result else None, len(result.body) if result else None,
             result.body if result else None, error.type if error else None, error.message if error else None,
             job_id, attempts))
        return self._get(job_id) if cur.rowcount == 1 else None

    async def requeue(self, job: Job, error: JobError, available_at: float) -> Job | None:
        return await self._call(self._requeue, job.id, job.attempts, error, available_at)

    def _requeue(self, job_id: str, attempts: int, error: JobError, available_at: float) -> Job | None:
        cur = self._conn().execute(
            "UPDATE jobs SET status = 'queued', available_at = ?, error_type = ?, error_message = ? "
            "WHERE id = ? AND status = 'running' AND attempts = ?",
            (available_at, error.type, error.message, job_id, attempts))
        return self._get(job_id) if cur.rowcount == 1 else None

    async def cancel(self, job_id: str, now: float, result_ttl_s: float) -> Job | None:
        return await self._call(self._cancel, job_id, now, result_ttl_s)

    def _cancel(self, job_id: str, now: float, ttl: float) -> Job | None:
        self._conn().execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?, expires_at = ?, body = x'', "
            "error_type = 'cancelled', error_message = 'cancelled by request' "
            "WHERE id = ? AND status IN ('queued', 'running')", (now, now + ttl, job_id))
        return self._get(job_id)

    async def recover(self, now: float, max_attempts: int, result_ttl_s: float) -> list[Job]:
        return await self._call(self._recover, now, max_attempts, result_ttl_s)

    def _recover(self, now: float, max_attempts: int, ttl: float) -> list[Job]:
        db = self._conn()
        rows = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE status = 'running'").fetchall()
        changed = []
        for job in map(_job, rows):
            d = after_interruption(job.request.retry_safe, job.attempts, max_attempts)
            if d is Decision.RETRY:
                db.execute("UPDATE jobs SET status = 'queued', available_at = ? WHERE id = ?", (now, job.id))
            else:
                etype, msg = (("interrupted", "the daemon stopped while the job ran; it is not safe to repeat")
                              if d is Decision.FAIL else
                              ("dead_letter", f"interrupted after {job.attempts} attempt(s) (jobs.max_attempts)"))
                db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, expires_at = ?, body = x'', "
                           "error_type = ?, error_message = ? WHERE id = ?", (now, now + ttl, etype, msg, job.id))
            changed.append(self._get(job.id))
        return changed

    async def cleanup(self, now: float, result_ttl_s: float) -> int:
        return await self._call(self._cleanup, now, result_ttl_s)

    def _cleanup(self, now: float, ttl: float) -> int:
        db = self._conn()
        # answers go at expiry; the record (status `expired`) stays one more TTL, then goes too
        db.execute("UPDATE jobs SET result_body = NULL WHERE expires_at <= ? AND result_body IS NOT NULL", (now,))
        cur = db.execute("DELETE FROM jobs WHERE expires_at <= ?", (now - ttl,))
        if cur.rowcount:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("PRAGMA incremental_vacuum")
        return cur.rowcount

    async def pending(self) -> int:
        return await self._call(self._pending)

    def _pending(self) -> int:
        return self._conn().execute(
            "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]


def _with(job: Job, **kw: Any) -> Job:
    return replace(job, **kw)


def _replace_body(req: JobRequest, body: bytes) -> JobRequest:
    return replace(req, body=bytes(body))
