"""The /jobs endpoints (aiohttp handlers), the 202 answer to an async submission, and turning an
incoming request into a JobRequest."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from ..errors import ERROR_TYPES, error_response
from ..fairness import ANONYMOUS
from .manager import CallbackRefused, JobManager, new_job_id
from .model import Job, JobRequest, JobStatus
from .store import Conflict, Full, StoreUnavailable

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "proxy-connection", "content-length", "prefer",
})
# A job's own error types that are not daemon error types: the status /result answers with.
JOB_ERROR_STATUS = {"cancelled": 410, "interrupted": 502, "dead_letter": 502, "result_too_large": 502}
PENDING_RETRY_AFTER_S = 1


def wants_async(prefer: Iterable[str]) -> bool:
    """Whether the Prefer header values (RFC 7240) ask for `respond-async`."""
    for value in prefer:
        for pref in value.split(","):
            if pref.split(";", 1)[0].split("=", 1)[0].strip().lower() == "respond-async":
                return True
    return False


@dataclass(frozen=True)
class JobTerms:
    """How an accepted submission runs: its priority, its time limit, whether it may be repeated, the
    worker it was routed to and the client (fairness key) it belongs to."""

    priority: str | None = None
    timeout_s: float | None = None
    retry_safe: bool = False
    worker: str | None = None
    fairness_key: str | None = None


def job_request(method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes, *, now: float,
                terms: JobTerms = JobTerms()) -> JobRequest:
    """The JobRequest for an accepted async submission: end-to-end headers only (Prefer is ours),
    the deadline counted from `now` (wall clock), the Idempotency-Key picked out."""
    priority, timeout_s, retry_safe = terms.priority, terms.timeout_s, terms.retry_safe
    worker, fairness_key = terms.worker, terms.fairness_key
    kept = tuple((k, v) for k, v in headers if k.lower() not in HOP_BY_HOP)
    idem = next((v for k, v in kept if k.lower() == "idempotency-key"), None)
    if idem is not None and fairness_key is not None:
        # each client's keys are its own: another client's same key is another job, never a way to its id
        idem = f"{fairness_key}/{idem}"
    return JobRequest(
        id=new_job_id(), method=method.upper(), target=target, headers=kept, body=body, priority=priority,
        deadline_at=None if timeout_s is None else now + timeout_s, retry_safe=retry_safe, worker=worker,
        fairness_key=fairness_key, idempotency_key=idem, created_at=now,
    )


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json",
                        headers=headers)


def submit_response(job: Job, now: float, request_id: str | None = None) -> web.Response:
    """202 Accepted with Location and Preference-Applied, and the job."""
    hdrs = {"Location": f"/jobs/{job.id}", "Preference-Applied": "respond-async"}
    if request_id:
        hdrs["X-Request-ID"] = request_id
    return _json(job.to_json(now), 202, hdrs)


def submit_error_response(exc: Exception, request_id: str | None) -> web.Response:
    """The answer to a submission the manager refused (CallbackRefused, Conflict, Full, StoreUnavailable)."""
    if isinstance(exc, StoreUnavailable):
        return error_response("jobs_unavailable", f"the job store is unavailable: {exc}", request_id, 5)
    if isinstance(exc, Full):
        return error_response("queue_full", str(exc), request_id, 5)
    if isinstance(exc, Conflict):
        return error_response("conflict", str(exc), request_id)
    if isinstance(exc, CallbackRefused):
        return error_response("bad_request", str(exc), request_id)
    raise exc


def _request_id(request: web.Request) -> str:
    return request.headers.get("X-Request-ID") or uuid.uuid4().hex


class _BadQuery(ValueError):
    pass


def _int_param(request: web.Request, name: str, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        v = low - 1
    if not low <= v <= high:
        raise _BadQuery(f"query {name}={raw!r}: must be an integer from {low} to {high}")
    return v


def _job_id(request: web.BaseRequest) -> str:
    mi = getattr(request, "match_info", None)
    if mi is not None and "id" in mi:
        return mi["id"]
    return request.path.split("/")[2]


@dataclass(frozen=True)
class Caller:
    """Who asks the jobs API, as the daemon sees it: the admin token, the client key (queue.fairness.key)."""

    admin: bool = False              # presented the admin token (admin.token_file)
    key: str | None = None           # the caller's hashed client key; None when queue.fairness.key is off
    token_required: bool = False     # admin.token_file is set

    def may_see(self, job: Job) -> bool:
        """A job's id (unguessable) is enough to read or cancel it, unless the job was submitted with a
        client key and the caller has another one: then it is not there for them (404), unless admin."""
        owner = job.request.fairness_key
        return self.admin or self.key is None or owner is None or owner == ANONYMOUS or owner == self.key

    def listing(self) -> tuple[bool, str | None]:
        """(allowed, key) for GET /jobs. With an admin token configured, the listing is the admin's: a
        client key is a claim (whatever header value a caller sends), not a credential, so it never
        lists anything then (401). Without one: the caller's own key's jobs when client keys are on
        (callers without the key's header share the key `anonymous`), else every job."""
        if self.admin:
            return True, None
        if self.token_required:
            return False, None
        return True, self.key


OPEN = Caller()  # no admin token, no client keys: every job is everyone's


class JobsApi:
    """Handlers for GET/DELETE /jobs/{id}, GET /jobs/{id}/result and GET /jobs; `caller` says who asks
    (the daemon's admin token and client key), and so which jobs are theirs to see."""

    def __init__(self, manager: JobManager, caller: Callable[[web.BaseRequest], Caller] | None = None):
        self.manager = manager
        self._caller = caller or (lambda _request: OPEN)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/jobs", self.list_jobs, allow_head=False),
            web.get("/jobs/{id}", self.get_job, allow_head=False),
            web.get("/jobs/{id}/result", self.get_result, allow_head=False),
            web.delete("/jobs/{id}", self.delete_job),
        ]

    async def dispatch(self, request: web.BaseRequest) -> web.Response:
        """Route a request under /jobs by hand (the daemon's server has no router)."""
        parts = request.path.strip("/").split("/")
        m = request.method
        if parts == ["jobs"] and m == "GET":
            return await self.list_jobs(request)
        if len(parts) == 2 and parts[1] and m in ("GET", "DELETE"):
            return await (self.get_job(request) if m == "GET" else self.delete_job(request))
        if len(parts) == 3 and parts[1] and parts[2] == "result" and m == "GET":
            return await self.get_result(request)
        return error_response("bad_request", f"{m} {request.path}: the job API is GET /jobs, GET or DELETE "
                              "/jobs/{id}, GET /jobs/{id}/result", _request_id(request))

    async def get_job(self, request: web.Request) -> web.Response:
        return await self._job_answer(request, cancel=False)

    async def _job_answer(self, request: web.BaseRequest, cancel: bool) -> web.Response:
        """The job's JSON (after cancelling it, for DELETE); 404 unknown or not the caller's; 503 store down."""
        rid = _request_id(request)
        job_id = _job_id(request)
        try:
            job = await self.manager.get(job_id)
            if job is not None and not self._caller(request).may_see(job):
                job = None
            if job is not None and cancel:
                job = await self.manager.cancel(job_id)
        except StoreUnavailable as exc:
            return error_response("jobs_unavailable", f"the job store is unavailable: {exc}", rid, 5)
        if job is None:
            return error_response("not_found", f"no job {_job_id(request)!r}", rid)
        return _json(job.to_json(self.manager.now()))

    async def get_result(self, request: web.Request) -> web.Response:
        """The worker's answer as given (a job failed by the worker's error answer included, with its
        status); 202 + Retry-After while pending; 404 unknown or expired; a job that failed without an
        answer, or was cancelled, answers its error (status from the daemon's error table, 410 cancelled)."""
        rid = _request_id(request)
        job_id = _job_id(request)
        try:
            job, result = await self.manager.result(job_id)
        except StoreUnavailable as exc:
            return error_response("jobs_unavailable", f"the job store is unavailable: {exc}", rid, 5)
        now = self.manager.now()
        if job is None or not self._caller(request).may_see(job):
            return error_response("not_found", f"no job {job_id!r}", rid)
        status = job.view_status(now)
        if status in (JobStatus.QUEUED, JobStatus.RUNNING):
            return _json(job.to_json(now), 202, {"Retry-After": str(PENDING_RETRY_AFTER_S),
                                                  "Location": f"/jobs/{job_id}"})
        if status is JobStatus.EXPIRED or (job.result is not None and result is None):
            return error_response("not_found", f"the result of job {job_id!r} has expired", rid)
        if result is not None:  # succeeded, or failed with the worker's error answer: as the worker gave it
            hdrs = {"X-Request-ID": rid}
            resp = web.Response(status=result.status, body=result.body, headers=hdrs)
            if result.content_type:
                resp.headers["Content-Type"] = result.content_type
            return resp
        etype = job.error.type if job.error else status.value
        msg = job.error.message if job.error else f"the job is {status.value}"
        code = ERROR_TYPES.get(etype, (JOB_ERROR_STATUS.get(etype, 502), False))[0]
        body = {"error": {"type": etype, "message": msg, "request_id": rid, "job": job.to_json(now)}}
        return _json(body, code, {"X-Request-ID": rid})

    async def delete_job(self, request: web.Request) -> web.Response:
        return await self._job_answer(request, cancel=True)

    async def list_jobs(self, request: web.Request) -> web.Response:
        rid = _request_id(request)
        allowed, key = self._caller(request).listing()
        if not allowed:
            return error_response("unauthorized", "GET /jobs lists jobs with Authorization: Bearer "
                                  "<admin.token_file token>; a job's id alone reads that job", rid,
                                  headers={"WWW-Authenticate": "Bearer"})
        raw_status = request.query.get("status") or None
        status = None
        if raw_status is not None:
            try:
                status = JobStatus(raw_status)
            except ValueError:
                return error_response("bad_request", f"query status={raw_status!r}: must be one of "
                                      f"{[s.value for s in JobStatus]}", rid)
        try:
            limit = _int_param(request, "limit", 1, 1000) or 100
            cursor = _int_param(request, "cursor", 1, 2**62)
        except _BadQuery as exc:
            return error_response("bad_request", str(exc), rid)
        try:
            jobs, nxt = await self.manager.list(status, limit, cursor, key)
        except StoreUnavailable as exc:
            return error_response("jobs_unavailable", f"the job store is unavailable: {exc}", rid, 5)
        now = self.manager.now()
        return _json({"jobs": [j.to_json(now) for j in jobs], "next_cursor": None if nxt is None else str(nxt)})
