"""What a job store is (the operations the manager needs), its errors, and opening the configured one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .model import Job, JobError, JobRequest, JobResult, JobStatus
from .settings import StoreSpec


class StoreUnavailable(Exception):
    """The store cannot be reached or written now (down, disk full); retry later."""


class StoreCorrupt(Exception):
    """The store's data cannot be read (not a job database, newer schema); names the file."""


class Full(Exception):
    """The store already holds `max_pending` queued and running jobs."""


class Conflict(Exception):
    """The Idempotency-Key was used before for a different request."""


@dataclass(frozen=True)
class Take:
    """One dispatch step: the job now running here (if any), and jobs the store closed on the way
    (a re-delivered job that was not safe to repeat, or past its attempts)."""

    job: Job | None = None
    closed: tuple[Job, ...] = ()


class JobStore(Protocol):
    kind: str                      # "sqlite" | "redis"
    available: bool                # the last operation reached the store

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, job: Job, max_pending: int) -> tuple[Job, bool]:
        """Store a new queued job durably; with an idempotency key already used for the same digest,
        the existing job and False. Raises Conflict, Full, StoreUnavailable."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def get_result(self, job_id: str) -> JobResult | None: ...

    async def list(self, status: JobStatus | None, limit: int, cursor: int | None,
                   now: float, key: str | None = None) -> tuple[list[Job], int | None]:
        """Newest first, only the jobs submitted with client key `key` when given; the cursor for the
        next page, or None on the last one."""
        ...

    async def take(self, fits: Callable[[JobRequest], bool], now: float, max_attempts: int,
                   result_ttl_s: float) -> Take:
        """Mark the oldest queued job that `fits` running here (attempts + 1) and return it."""
        ...

    async def renew(self, jobs: list[Job]) -> set[str]:
        """Extend the leases of jobs running here; the ids no longer running here (cancelled elsewhere)."""
        ...

    async def finish(self, job: Job, status: JobStatus, result: JobResult | None, error: JobError | None,
                     now: float, result_ttl_s: float) -> Job | None:
        """Close a job running here; None when it is no longer ours (cancelled meanwhile)."""
        ...

    async def requeue(self, job: Job, error: JobError, available_at: float) -> Job | None:
        """A job running here goes back to queued (to run again after `available_at`)."""
        ...

    async def cancel(self, job_id: str, now: float, result_ttl_s: float) -> Job | None:
        """Queued or running -> cancelled; a finished job is returned as it is; None if unknown."""
        ...

    async def recover(self, now: float, max_attempts: int, result_ttl_s: float) -> list[Job]:
        """At start: settle jobs left `running` by a previous daemon; the jobs that changed."""
        ...

    async def cleanup(self, now: float, result_ttl_s: float) -> int:
        """Drop expired answers and old records; how many records went."""
        ...

    async def pending(self) -> int: ...


def open_store(spec: StoreSpec, *, consumer: str, lease_s: float = 30.0) -> JobStore:
    """The store `spec` names (not yet opened); `consumer` names this daemon in a shared store."""
    if spec.kind == "sqlite":
        from .store_sqlite import SqliteJobStore

        assert spec.path
        return SqliteJobStore(spec.path)
    from .store_redis import RedisJobStore

    assert spec.url
    return RedisJobStore(spec.url, consumer=consumer, lease_s=lease_s)
