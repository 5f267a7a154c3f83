"""Job records: the seam with the request path (JobRequest, JobResult, JobFailed, Runner), the stored
Job, its JSON view, and the pure decisions about a job's next status."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

CALLBACK_HEADER = "x-callback-url"

# Failures that never reached the worker: running the job again cannot repeat a side effect.
NOT_STARTED_FAILURES = frozenset({
    "queue_full", "overloaded", "circuit_open", "queue_timeout", "worker_unavailable", "shutting_down",
})


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"     # a view: a finished job past expires_at (its answer is gone)


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
PENDING = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


@dataclass(frozen=True)
class JobRequest:
    """A request's own facts, as accepted at submission (end-to-end headers only)."""

    id: str
    method: str
    target: str                                  # raw path + query
    headers: tuple[tuple[str, str], ...]
    body: bytes
    priority: str | None = None
    deadline_at: float | None = None             # wall clock (from X-Request-Timeout at submission)
    retry_safe: bool = False
    worker: str | None = None
    fairness_key: str | None = None
    idempotency_key: str | None = None
    created_at: float = 0.0

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def digest(self) -> str:
        """What makes two submissions "the same request" for an Idempotency-Key."""
        h = hashlib.sha256()
        for part in (self.method.upper().encode(), self.target.encode()):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        h.update(self.body)
        return h.hexdigest()

    def without_header(self, name: str) -> JobRequest:
        name = name.lower()
        return replace(self, headers=tuple((k, v) for k, v in self.headers if k.lower() != name))


@dataclass
class JobResult:
    """The worker's answer as it gave it."""

    status: int
    content_type: str | None
    body: bytes


class JobFailed(Exception):
    """The runner could not get an answer: `type` is an error type of the daemon (queue_full, timeout...)."""

    def __init__(self, type: str, message: str):  # noqa: A002 - the public name of the field
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class Runner(Protocol):
    def has_free_slot(self, req: JobRequest) -> bool: ...

    async def run(self, req: JobRequest, attempt: int, max_result_bytes: int) -> JobResult: ...


@dataclass(frozen=True)
class ResultMeta:
    status: int
    content_type: str | None
    bytes: int


@dataclass(frozen=True)
class JobError:
    type: str
    message: str


@dataclass(frozen=True)
class Job:
    """One job as stored: its request, where it stands, and what came of it."""

    request: JobRequest
    status: JobStatus
    seq: int = 0                                 # store order; the listing cursor
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    result: ResultMeta | None = None
    error: JobError | None = None
    callback_url: str | None = None
    digest: str = ""

    @property
    def id(self) -> str:
        return self.request.id

    def view_status(self, now: float) -> JobStatus:
        """The status shown: a finished job past its expiry is `expired`."""
        if self.status in TERMINAL and self.expires_at is not None and now >= self.expires_at:
            return JobStatus.EXPIRED
        return self.status

    def to_json(self, now: float) -> dict:
        r = self.request
        return {
            "id": r.id,
            "status": self.view_status(now).value,
            "method": r.method,
            "path": r.path,
            "worker": r.worker,
            "priority": r.priority,
            "attempts": self.attempts,
            "created_at": iso(r.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "expires_at": iso(self.expires_at),
            "result": None if self.result is None else {
                "status": self.result.status, "content_type": self.result.content_type, "bytes": self.result.bytes,
            },
            "error": None if self.error is None else {"type": self.error.type, "message": self.error.message},
        }


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


WORKER_STATUS = "worker_status"   # a worker's error answer (>= 400) without an OpenAI-shaped error
_ERROR_TEXT_MAX = 1000            # characters of a worker's error message kept on the job


def worker_error(result: JobResult) -> JobError | None:
    """The error a worker's answer reports, or None for a success (< 400). An OpenAI-shaped error body
    (`{"error": {"type", "message", ...}}`) gives its type and message; any other answer is
    `worker_status`, naming the status and the answer's first characters (the answer itself stays at
    /result). vLLM's older flat shape (`{"object": "error", "type", "message"}`) counts as OpenAI's."""
    if result.status < 400:
        return None
    err = None
    if result.content_type is None or "json" in result.content_type.lower():
        try:
            body = json.loads(result.body)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, absurdly nested
            body = None
        if isinstance(body, dict):
            err = body if body.get("object") == "error" else body.get("error")
    etype = err.get("type") if isinstance(err, dict) else None
    if isinstance(etype, str) and etype:
        msg = err.get("message")
        text = msg if isinstance(msg, str) and msg else f"the worker answered {result.status}"
        return JobError(etype[:100], text[:_ERROR_TEXT_MAX])
    head = result.body[:200].decode("utf-8", "replace").strip()
    return JobError(WORKER_STATUS, f"the worker answered {result.status}" + (f": {head}" if head else ""))


class Decision(enum.StrEnum):
    RETRY = "retry"            # back to queued, run again later
    FAIL = "fail"              # failed with the runner's error
    DEAD_LETTER = "dead_letter"


def after_failure(error_type: str, retry_safe: bool, attempts: int, max_attempts: int,
                  deadline_at: float | None, now: float) -> Decision:
    """What a runner failure means for the job: run it again (it never reached the worker, or it is
    safe to repeat after a crash), give up, or dead-letter it once its attempts are spent."""
    if deadline_at is not None and now >= deadline_at:
        return Decision.FAIL
    repeatable = error_type in NOT_STARTED_FAILURES or (retry_safe and error_type == "worker_crashed")
    if not repeatable:
        return Decision.FAIL
    if attempts >= max_attempts:
        return Decision.DEAD_LETTER
    return Decision.RETRY


def after_interruption(retry_safe: bool, attempts: int, max_attempts: int) -> Decision:
    """A job found `running` by nobody (its daemon died): repeat it if that is safe, else it failed."""
    if not retry_safe:
        return Decision.FAIL
    if attempts >= max_attempts:
        return Decision.DEAD_LETTER
    return Decision.RETRY


def retry_backoff_s(attempts: int, initial: float = 0.5, cap: float = 30.0) -> float:
    """Wait before running a job again after a failure that is worth repeating."""
    return min(cap, initial * (2 ** max(0, attempts - 1)))
