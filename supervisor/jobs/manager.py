"""The job manager: accepts async jobs into the store, dispatches them to the runner when it has a
free slot, renews leases, records outcomes, expires results and sends completion callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ..aio import wait_quietly
from .callbacks import CallbackSender
from .model import (
    CALLBACK_HEADER,
    TERMINAL,
    Decision,
    Job,
    JobError,
    JobFailed,
    JobRequest,
    JobResult,
    JobStatus,
    Runner,
    after_failure,
    after_interruption,
    retry_backoff_s,
    worker_error,
)
from .settings import JobsSettings
from .store import JobStore, StoreUnavailable

log = structlog.get_logger("supervisor.jobs")

MAX_LIST_LIMIT = 1000
TRANSIENT_ANSWERS = frozenset({503})  # the worker's own "not now": a retry-safe job runs again


class CallbackRefused(ValueError):
    """X-Callback-URL names a URL that jobs.callbacks.allow does not allow (400)."""


def _noop(*_a: object) -> None:
    return None


@dataclass
class JobHooks:
    """How the manager reports to metrics: a job entered `status`; a store operation failed."""

    on_status: Callable[[str], None] = field(default=_noop)
    on_store_error: Callable[[], None] = field(default=_noop)


@dataclass
class _Running:
    job: Job
    task: asyncio.Task
    cancel_requested: bool = False


def new_job_id() -> str:
    """128 bits from the OS's CSPRNG, as 32 hex digits: the id alone lets its holder read and cancel
    the job, so it must be unguessable (not a counter, not a time)."""
    return secrets.token_hex(16)


class JobManager:
    def __init__(self, settings: JobsSettings, store: JobStore, runner: Runner, hooks: JobHooks | None = None,
                 *, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.store = store
        self.runner = runner
        self.hooks = hooks or JobHooks()
        self._clock = clock                       # wall clock: job times outlive this process
        self._wake = asyncio.Event()
        self._running: dict[str, _Running] = {}
        self._callbacks = CallbackSender(settings.callbacks)
        self._pending = 0
        self._recovered = False
        self._closing = False
        self._errors = 0

    # -- the API side ---------------------------------------------------------------------------------

    async def submit(self, req: JobRequest) -> tuple[Job, bool]:
        """Store the job durably (before the 202); (the job, False) when its Idempotency-Key already
        names the same request. Raises CallbackRefused, Conflict, Full, StoreUnavailable."""
        cb = req.header(CALLBACK_HEADER)
        if cb is not None:
            if not self._callbacks.allowed(cb):
                raise CallbackRefused(f"X-Callback-URL {cb!r} is not allowed by jobs.callbacks.allow")
            req = req.without_header(CALLBACK_HEADER)
        job = Job(request=req, status=JobStatus.QUEUED, digest=req.digest(), callback_url=cb)
        job, created = await self._store(self.store.create(job, self.settings.max_pending))
        if created:
            self._pending += 1
            self.hooks.on_status(JobStatus.QUEUED.value)
            log.info("job_submitted", job_id=job.id, method=req.method, path=req.path, worker=req.worker)
            self._wake.set()
        return job, created

    async def get(self, job_id: str) -> Job | None:
        return await self._store(self.store.get(job_id))

    async def result(self, job_id: str) -> tuple[Job | None, JobResult | None]:
        """The job and the worker's answer: a succeeded job's, or a failed one's when the worker answered
        (an error status); None while pending, after expiry, or when it failed without an answer."""
        job = await self._store(self.store.get(job_id))
        if job is None or job.result is None or job.view_status(self._clock()) not in (JobStatus.SUCCEEDED,
                                                                                      JobStatus.FAILED):
            return job, None
        return job, await self._store(self.store.get_result(job_id))

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job (a running one here has its worker connection closed);
        a finished job is returned unchanged; None when unknown."""
        before = await self._store(self.store.get(job_id))
        if before is None or before.status in TERMINAL:
            return before
        job = await self._store(self.store.cancel(job_id, self._clock(), self.settings.result_ttl_s))
        if job is not None and job.status is JobStatus.CANCELLED:
            self._closed(job)
            self._stop_local(job_id)
        return job

    async def list(self, status: JobStatus | None = None, limit: int = 100,
                   cursor: int | None = None, key: str | None = None) -> tuple[list[Job], int | None]:
        """Newest first; with `key`, only the jobs submitted with that (hashed) client key."""
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        return await self._store(self.store.list(status, limit, cursor, self._clock(), key))

    def now(self) -> float:
        return self._clock()

    def notify_slot_free(self) -> None:
        """The runner freed a slot: look for a job to take at once."""
        self._wake.set()

    @property
    def pending(self) -> int:
        """Queued + running jobs in the store, as last read (for the jobs_pending gauge)."""
        return self._pending

    def status(self) -> dict:
        return {
            "store": self.store.kind,
            "available": self.store.available,
            "pending": self._pending,
            "running_here": len(self._running),
            "store_errors": self._errors,
            "callbacks_pending": self._callbacks.pending,
        }

    async def _store(self, aw):  # type: ignore[no-untyped-def]
        try:
            return await aw
        except StoreUnavailable:
            self._errors += 1
            self.hooks.on_store_error()
            raise

    # -- the dispatch side ----------------------------------------------------------------------------

    async def recover(self) -> list[Job]:
        """At start: jobs a previous daemon left running are queued again (safe to repeat) or fail
        `interrupted`; queued ones simply run."""
        changed = await self._store(self.store.recover(self._clock(), self.settings.max_attempts,
                                                       self.settings.result_ttl_s))
        for job in changed:
            log.info("job_recovered", job_id=job.id, status=job.status.value, attempts=job.attempts,
                     error=job.error.type if job.error else None)
            if job.status in TERMINAL:
                self._closed(job)
        self._recovered = True
        return changed

    async def run(self) -> None:
        """The dispatch loop; runs until cancelled or `aclose()`. Store outages are waited out."""
        s = self.settings
        renew_every = max(0.05, s.lease_s / 3)
        next_renew = next_cleanup = time.monotonic()
        next_count = 0.0
        delay = 0.0
        while not self._closing:
            try:
                if not self._recovered:
                    await self.recover()
                now = time.monotonic()
                if now >= next_renew:
                    await self._renew()
                    next_renew = now + renew_every
                if now >= next_cleanup:
                    n = await self._store(self.store.cleanup(self._clock(), s.result_ttl_s))
                    if n:
                        log.info("jobs_cleaned", removed=n)
                    next_cleanup = now + s.cleanup_interval_s
                self._wake.clear()
                await self._dispatch()
                if now >= next_count:
                    self._pending = await self._store(self.store.pending())
                    next_count = now + min(1.0, s.poll_interval_s)
                delay = 0.0
                wait = min(s.poll_interval_s, max(0.0, next_renew - time.monotonic()))
            except StoreUnavailable as exc:
                delay = min(5.0, max(0.1, delay * 2))
                log.warning("jobs_store_unavailable", error=str(exc), retry_in_s=delay)
                wait = delay
            await wait_quietly(self._wake.wait(), wait)

    async def _dispatch(self) -> None:
        s = self.settings
        while not self._closing:
            take = await self._store(self.store.take(self.runner.has_free_slot, self._clock(), s.max_attempts,
                                                     s.result_ttl_s))
            for job in take.closed:
                log.info("job_closed_on_delivery", job_id=job.id, error=job.error.type if job.error else None)
                self._closed(job)
            if take.job is None:
                return
            self._start(take.job)
            # let the job's task take its slot before the next has_free_slot() question
            await asyncio.sleep(0)

    def _start(self, job: Job) -> None:
        task = asyncio.create_task(self._run_job(job), name=f"job-{job.id}")
        self._running[job.id] = _Running(job, task)
        task.add_done_callback(lambda _t, jid=job.id: self._running.pop(jid, None))
        self.hooks.on_status(JobStatus.RUNNING.value)
        log.info("job_started", job_id=job.id, attempt=job.attempts)

    async def _run_job(self, job: Job) -> None:
        s = self.settings
        req = job.request
        try:
            if req.deadline_at is not None and self._clock() >= req.deadline_at:
                raise JobFailed("queue_timeout", "the job's deadline (X-Request-Timeout) passed while it was queued")
            result = await self.runner.run(req, job.attempts, s.max_result_bytes)
            if len(result.body) > s.max_result_bytes:
                raise JobFailed("result_too_large", f"the answer has {len(result.body)} bytes; "
                                f"jobs.max_result_bytes is {s.max_result_bytes}")
            # an error answer (>= 400) ends the job `failed` with the worker's error; the answer is kept.
            # A 503 is the worker's "not now" (a CUDA OOM it recovered from, asleep, overloaded): a job
            # that is safe to repeat runs again while it has attempts left
            err = worker_error(result)
            if (err is not None and result.status in TRANSIENT_ANSWERS and after_failure(
                    "worker_crashed", req.retry_safe, job.attempts, s.max_attempts, req.deadline_at,
                    self._clock()) is Decision.RETRY):
                await self._requeue(job, err)
                return
            await self._finish(job, JobStatus.SUCCEEDED if err is None else JobStatus.FAILED, result, err)
        except JobFailed as exc:
            await self._failed(job, exc)
        except asyncio.CancelledError:
            entry = self._running.get(job.id)
            if entry is not None and entry.cancel_requested:
                log.info("job_cancelled", job_id=job.id)
                return
            raise
        except StoreUnavailable as exc:
            # the outcome could not be recorded; the job stays `running` and is settled by recovery
            # (or, in a shared store, by its lease running out)
            log.warning("job_outcome_lost", job_id=job.id, error=str(exc))
        finally:
            self._wake.set()

    async def _failed(self, job: Job, exc: JobFailed) -> None:
        s = self.settings
        req = job.request
        err = JobError(exc.type, exc.message)
        d = after_failure(exc.type, req.retry_safe, job.attempts, s.max_attempts, req.deadline_at, self._clock())
        if d is Decision.RETRY:
            await self._requeue(job, err)
            return
        if d is Decision.DEAD_LETTER:
            err = JobError("dead_letter", f"gave up after {job.attempts} attempt(s) (jobs.max_attempts); "
                           f"last error {exc.type}: {exc.message}")
        await self._finish(job, JobStatus.FAILED, None, err)

    async def _requeue(self, job: Job, err: JobError) -> None:
        again = self._clock() + retry_backoff_s(job.attempts)
        if await self._store(self.store.requeue(job, err, again)) is not None:
            self.hooks.on_status(JobStatus.QUEUED.value)
            log.info("job_requeued", job_id=job.id, attempts=job.attempts, error=err.type)

    async def _finish(self, job: Job, status: JobStatus, result: JobResult | None, err: JobError | None) -> None:
        done = await self._store(self.store.finish(job, status, result, err, self._clock(),
                                                   self.settings.result_ttl_s))
        if done is None:
            log.info("job_outcome_dropped", job_id=job.id, reason="no longer running here (cancelled)")
            return
        log.info("job_finished", job_id=job.id, status=done.status.value, attempts=done.attempts,
                 error=err.type if err else None, result_status=result.status if result else None)
        self._closed(done)

    def _closed(self, job: Job) -> None:
        self._pending = max(0, self._pending - 1)
        self.hooks.on_status(job.status.value)
        if job.callback_url:
            self._callbacks.send(job.callback_url, job.to_json(self._clock()))

    def _stop_local(self, job_id: str) -> None:
        entry = self._running.get(job_id)
        if entry is not None:
            entry.cancel_requested = True
            entry.task.cancel()

    async def _renew(self) -> None:
        jobs = [e.job for e in self._running.values()]
        gone = await self._store(self.store.renew(jobs))
        for job_id in gone:
            log.info("job_lost", job_id=job_id, reason="cancelled or taken elsewhere")
            self._stop_local(job_id)

    # -- shutdown -------------------------------------------------------------------------------------

    async def aclose(self, grace_s: float = 0.0, settle: bool = True) -> None:
        """Stop taking jobs; wait up to `grace_s` for running ones, then cancel them. With `settle`,
        a cancelled job goes back to queued when it is safe to repeat, else fails `interrupted`;
        without, it stays `running` in the store, as a crash would leave it. Closes the store."""
        self._closing = True
        self._wake.set()
        tasks = [e.task for e in self._running.values()]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        left = [e for e in self._running.values() if not e.task.done()]
        for e in left:
            e.task.cancel()
        if left:
            await asyncio.gather(*(e.task for e in left), return_exceptions=True)
        if settle:
            for e in left:
                await self._settle_interrupted(e.job)
        await self._callbacks.aclose()
        await self.store.close()

    async def _settle_interrupted(self, job: Job) -> None:
        s = self.settings
        d = after_interruption(job.request.retry_safe, job.attempts, s.max_attempts)
        with contextlib.suppress(StoreUnavailable):
            if d is Decision.RETRY:
                await self.store.requeue(job, JobError("interrupted", "the daemon stopped while it ran"), self._clock())
                return
            err = (JobError("interrupted", "the daemon stopped while the job ran; it is not safe to repeat")
                   if d is Decision.FAIL else
                   JobError("dead_letter", f"interrupted after {job.attempts} attempt(s) (jobs.max_attempts)"))
            await self.store.finish(job, JobStatus.FAILED, None, err, self._clock(), s.result_ttl_s)
