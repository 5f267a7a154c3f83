"""The request path: validate, route, admit, queue, forward to a replica, relay the answer, account for it.

`RequestPath.handle` answers every request it accepts exactly once: the worker's answer, or a typed
error from errors.py. A request's own facts travel together in one `Call` record.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from multidict import CIMultiDict

from .errors import ERROR_TYPES, Rejected, error_event, error_response
from .fairness import client_key
from .fleet.process import Incarnation, InFlight
from .jobs.api import JobTerms, job_request, submit_error_response, submit_response, wants_async
from .jobs.manager import CallbackRefused
from .jobs.model import JobFailed, JobRequest, JobResult
from .jobs.store import Conflict, Full, StoreUnavailable
from .metrics import REJECT_REASONS
from .pressure import Level, sheds
from .request_queue import GRANTED, QueueFull, Ticket
from .response_spool import ResponseSpool, SpoolError, SpoolFull
from .states import ExitReason
from .upstream import UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from .config import Settings
    from .fleet import Fleet, Replica, WorkerGroup
    from .metrics import Metrics
    from .pressure_control import PressureControl
    from .runstate import RunState

log = structlog.get_logger("supervisor.proxy")
access_log = structlog.get_logger("supervisor.access")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"proxy-connection", b"x-request-id",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"prefer",
})
NEVER_STRIPPED = frozenset({b"host"})  # RFC 9110 7.6.1: Connection cannot remove Host
RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "proxy-connection", "date",
})
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
STREAM_CHUNK = 1 << 16
CLIENT_CLOSED = 499  # requests_total code for a client that left before its answer was complete
NO_WORKER = "none"  # the worker label of a request refused before it had one
HANGS_BEFORE_POISON = 2  # a request in flight on this many workers that hung is not tried again
JOB_SUBMIT_ERRORS = (CallbackRefused, Conflict, Full, StoreUnavailable)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MODELS_PATH = "/v1/models"  # the daemon answers the list and each card itself (every worker's models)
MODEL_PREFIX = MODELS_PATH + "/"


class Call:
    """One request's own facts, from arrival to answer."""

    __slots__ = ("rid", "t0", "method", "path", "level", "route", "group", "pool", "gpu_mb", "queue_limit",
                 "deadline", "body", "retry_ok", "max_attempts", "attempt", "queued_s", "hangs", "client",
                 "worker_label", "model", "continue_sent", "peer")

    def __init__(self, rid: str, t0: float, method: str, path: str, level: int):
        self.rid = rid
        self.t0 = t0
        self.method = method
        self.path = path
        self.level = level
        self.route = None
        self.group: WorkerGroup | None = None
        self.pool = "default"
        self.gpu_mb = 0
        self.queue_limit = 0.0
        self.deadline: float | None = None
        self.body: bytes | None = None
        self.retry_ok = False
        self.max_attempts = 1
        self.attempt = 0
        self.queued_s = 0.0
        self.hangs = 0
        self.client: str | None = None
        self.worker_label = NO_WORKER
        self.model: str | None = None
        self.continue_sent = False
        self.peer: str | None = None  # the client's address (who a 500 was for, without a fairness key)


class _WorkerDied(Exception):
    def __init__(self, reason: str, hang: bool):
        self.reason = reason
        self.hang = hang


class RequestPath:
    """Everything between a client's request and its one answer."""

    def __init__(self, settings: Settings, fleet: Fleet, metrics: Metrics, pressure: PressureControl,
                 run: RunState):
        self.fleet = fleet
        self.metrics = metrics
        self.pressure = pressure
        self.run = run
        self._rid_prefix = os.urandom(11).hex()
        self._rid_seq = itertools.count()
        self.derive(settings)

    def derive(self, s: Settings) -> None:
        self.settings = s
        self._prio_header = s.queue.priority_header
        self._timeout_header = s.queue.timeout_header
        self._retry_methods = frozenset(s.retry.methods)
        self._level_names = s.queue.priorities
        self._level_index = {n: i for i, n in enumerate(self._level_names)}
        self._default_level = self._level_index[s.queue.default_priority]
        self._level_timeouts = [s.queue.level_timeout(n) for n in self._level_names]
        self._allowed_levels = ", ".join(self._level_names)
        self._model_routes = any(r.model is not None for r in s.routes)
        self._fairness = s.queue.fairness if s.queue.fairness.key is not None else None
        self.models_changed()

    def models_changed(self) -> None:
        """Whether routing reads the JSON body's `model`: a route names one, a worker declares models, or
        several workers serve models (declared or discovered: with one worker, every request goes to it
        anyway, and the worker answers a name it does not know itself). Kept in step by the fleet when
        discovery changes what is served, never asked per request."""
        groups = self.fleet.groups.values()
        self._by_model = (self._model_routes or any(g.spec.models for g in groups)
                          or (len(groups) > 1 and bool(self.fleet.served_models())))

    def new_request_id(self) -> str:
        # unique per process start (random prefix) and cheap: no syscall per request
        return f"{self._rid_prefix}{next(self._rid_seq):010x}"

    # -- the one entry point -------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.monotonic()
        rid = request.headers.get("X-Request-ID")
        call = Call(rid or "", t0, request.method, request.path, self._default_level)
        try:
            if rid is None:
                call.rid = self.new_request_id()
            elif not REQUEST_ID_RE.match(rid):
                call.rid = self.new_request_id()
                raise Rejected("bad_request", "X-Request-ID: must be 1-200 visible ASCII characters")
            if request.version < (1, 0):
                # HTTP/0.9 has no status line or headers to answer with: refuse it by closing
                self.reject(Rejected("bad_request", "HTTP/0.9 is not supported"), call.rid)
                self._observe(call, 400)
                request.transport.close()
                raise asyncio.CancelledError
            self._check_request_line(request)
            if call.method == "GET" and (call.path == MODELS_PATH or call.path.startswith(MODEL_PREFIX)) \
                    and self.fleet.served_models():
                resp = self._models(call)
            else:
                resp = await self._serve(request, call)
        except Rejected as r:
            resp = self.reject(r, call.rid)
        except asyncio.CancelledError:
            # the client went away (queued, running or mid-stream): counted as nginx does, 499
            self._observe(call, CLIENT_CLOSED)
            raise
        self._observe(call, resp.status)
        if self.settings.logging.access:
            access_log.info("request", request_id=call.rid, method=call.method, path=call.path, status=resp.status,
                            priority=self._level_names[max(call.level, 0)], worker=call.worker_label,
                            attempts=call.attempt, duration_ms=round((time.monotonic() - t0) * 1000, 3))
        return resp

    def _models(self, call: Call) -> web.Response:
        """GET /v1/models: every worker's models, as OpenAI lists them, with whether the worker is loaded
        now; GET /v1/models/{id} (an id may hold `/`): one of those cards, or 404 model_not_found."""
        data = []
        for g in self.fleet.groups.values():
            loaded = g.loaded()
            for m in g.models:
                data.append({"id": m, "object": "model", "created": 0, "owned_by": g.name,
                             "status": "loaded" if loaded else "unloaded", "worker": g.name})
        headers = {"X-Request-ID": call.rid}
        if call.path == MODELS_PATH:
            return web.json_response({"object": "list", "data": data}, headers=headers)
        wanted = call.path[len(MODEL_PREFIX):]
        for card in data:
            if card["id"] == wanted:
                return web.json_response(card, headers=headers)
        raise Rejected("model_not_found", f"model {wanted!r} is not served here; "
                       f"served models: {', '.join(c['id'] for c in data)}")

    def _observe(self, call: Call, code: int) -> None:
        level = call.level if call.level >= 0 else self._default_level
        self.metrics.observe_request(self._level_names[level], code, time.monotonic() - call.t0,
                                         call.worker_label)

    def reject(self, r: Rejected, rid: str | None) -> web.Response:
        if r.etype in REJECT_REASONS:
            self.metrics.rejected.labels(r.etype).inc()
        return error_response(r.etype, r.message, rid, r.retry_after_s, _degraded(self.fleet))

    @staticmethod
    def _check_request_line(request: web.BaseRequest) -> None:
        """What RFC 9110/9112 say a reverse proxy refuses: CONNECT (no tunnels here), asterisk-form."""
        if request.method == "CONNECT":
            raise Rejected("bad_request", "CONNECT: this is a reverse proxy for model services, not a tunnel")
        if request.raw_path == "*" and request.method != "OPTIONS":
            raise Rejected("bad_request", "the asterisk-form request target is for OPTIONS only")

    # -- parse, route, admit -------------------------------------------------------------------
    async def _serve(self, request: web.BaseRequest, call: Call) -> web.StreamResponse:
        s = self.settings
        if not self.run.accepting:
            raise Rejected("shutting_down", "the supervisor is shutting down", s.drain.timeout_s)
        call.level = self._parse_priority(request)
        cl = request.content_length
        max_body = s.limits.max_body_bytes
        if cl is not None and cl > max_body:
            raise Rejected("payload_too_large", f"Content-Length {cl} is over limits.max_body_bytes ({max_body})")
        call.peer = request.remote
        if self._fairness is not None:
            call.client = client_key(self._fairness, request.headers, request.remote)
        # the JSON body's `model` picks the worker: read it only when it can matter, and only when it
        # is small enough to buffer (model routing reads bodies up to retry.max_body_bytes)
        route = s.route_for(call.method, call.path) if s.routes else None
        if (self._by_model and request.body_exists and cl is not None and cl <= s.retry.max_body_bytes
                and (route is None or route.worker is None or self._model_routes)
                and "json" in request.headers.get("Content-Type", "json")):
            self._precheck(call)  # refuse what is sure to be refused before taking the body
            await self._send_continue(request, call)
            call.body = await self._read_body(request)
            call.model = _body_model(call.body)
            route = s.route_for(call.method, call.path, call.model) if s.routes else None
        call.route = route
        self._place(call)
        self._parse_deadline(request, call)
        call.retry_ok = route.retry if route is not None and route.retry is not None \
            else call.method in self._retry_methods
        if self.run.jobs is not None and wants_async(request.headers.getall("Prefer", ())):
            # a job is stored whatever the queue, breaker or pressure say now: it runs when it can
            await self._send_continue(request, call)
            return await self._submit_job(request, call)
        self._admission(call)
        await self._send_continue(request, call)
        if call.body is None:
            if not request.body_exists:
                call.body = b""
            elif cl is not None and cl <= s.retry.max_body_bytes:
                call.body = await self._read_body(request)
        if call.body is None:
            call.retry_ok = False  # streamed through: it cannot be sent twice
        call.max_attempts = s.retry.max_attempts if call.retry_ok else 1
        return await self._dispatch(call, lambda replica, ticket: self._exchange(request, call, replica, ticket))

    # -- async jobs ----------------------------------------------------------------------------
    async def _submit_job(self, request: web.BaseRequest, call: Call) -> web.Response:
        """`Prefer: respond-async`: store the request durably, answer 202; it runs later like any other."""
        jobs = self.run.jobs
        if call.body is None:
            call.body = await self._read_body(request)  # a job keeps its body (up to limits.max_body_bytes)
        raw = request.headers.get(self._timeout_header)
        timeout_s = None if raw is None else (call.deadline - call.t0 if call.deadline is not None else None)
        route = call.route
        if timeout_s is None and route is not None and route.timeout_s is not None:
            timeout_s = route.timeout_s
        terms = JobTerms(priority=self._level_names[call.level], timeout_s=timeout_s, retry_safe=call.retry_ok,
                         worker=call.worker_label, fairness_key=call.client)
        req = job_request(call.method, request.raw_path, request.headers.items(), call.body, now=jobs.now(),
                          terms=terms)
        try:
            job, _ = await jobs.submit(req)
        except JOB_SUBMIT_ERRORS as exc:
            if isinstance(exc, StoreUnavailable):
                self.metrics.rejected.labels("jobs_unavailable").inc()
            return submit_error_response(exc, call.rid)
        return submit_response(job, jobs.now(), call.rid)

    def has_free_slot(self, req: JobRequest) -> bool:
        """Whether a job could start now without waiting: its worker serves and has a free slot."""
        try:
            call = self._job_call(req)
        except Rejected:
            return True  # it will fail at once: let it, so it ends
        g = call.group
        p = g.queue.pools.get(call.pool)
        return p is not None and g.queue.open and p.waiting == 0 and p.in_use < p.slots

    def _job_call(self, req: JobRequest) -> Call:
        path = req.target.split("?", 1)[0]
        call = Call(self.new_request_id(), time.monotonic(), req.method, path, self._default_level)
        if req.priority in self._level_index:
            call.level = self._level_index[req.priority]
        call.body = req.body
        call.client = req.fairness_key
        call.model = _body_model(req.body) if self._by_model else None
        s = self.settings
        call.route = s.route_for(call.method, path, call.model) if s.routes else None
        if req.worker in self.fleet.groups and (call.route is None or call.route.worker is None):
            call.group = self.fleet.groups[req.worker]
            call.worker_label = req.worker
            if call.route is not None:
                call.pool, call.gpu_mb = call.route.pool, call.route.gpu_memory_mb
        else:
            self._place(call)
        call.queue_limit = self._level_timeouts[call.level]
        if req.deadline_at is not None:
            left = req.deadline_at - time.time()
            if left <= 0:
                raise Rejected("queue_timeout", "the job's deadline (X-Request-Timeout at submission) passed")
            call.deadline = call.t0 + left
            call.queue_limit = min(call.queue_limit, left)
        elif call.route is not None and call.route.timeout_s is not None:
            call.deadline = call.t0 + call.route.timeout_s
        call.retry_ok = req.retry_safe
        call.max_attempts = s.retry.max_attempts if call.retry_ok else 1
        return call

    async def run_job(self, req: JobRequest, attempt: int, max_result_bytes: int) -> JobResult:
        """One delivery of a job through the same routes, queue, replicas and retries as a request.
        Takes its queue slot before its first await (the job manager counts on it)."""
        call = Call(f"job-{req.id}-{attempt}", time.monotonic(), req.method, "", self._default_level)
        try:
            call = self._job_call(req)
            call.rid = f"job-{req.id}-{attempt}"
            self._admission(call)
            result = await self._dispatch(call, lambda replica, ticket: self._collect(
                req, call, replica, ticket, max_result_bytes))
        except Rejected as r:
            self._observe(call, ERROR_TYPES[r.etype][0])
            raise JobFailed(r.etype, r.message) from None
        self._observe(call, result.status)
        return result

    async def _collect(self, req: JobRequest, call: Call, replica: Replica, ticket: Ticket,
                       max_bytes: int) -> JobResult:
        """One exchange whose whole answer is kept (an SSE answer included), up to `max_bytes`."""
        ex = InFlight(time.monotonic())
        inc = replica.begin(ex)
        outcome = _Outcome(replica, call, ex.started, inc, ex, self.run.slot_free)
        head = self._head(call, req.target, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
                          b"", b"http")
        conn = None
        try:
            async with asyncio.timeout(None if call.deadline is None else max(0.0, call.deadline - time.monotonic())):
                conn, _ = await inc.pool.get()
                ex.conn = conn
                await conn.start(head, call.body, call.method == "HEAD")
                outcome.status = conn.status
                outcome.oom = _is_oom(conn.headers)
                ctype = next((v.decode("latin-1") for k, v in conn.headers if k.lower() == b"content-type"), None)
                chunks, size = [], 0
                while chunk := await conn.read():
                    size += len(chunk)
                    if size > max_bytes:
                        raise JobFailed("result_too_large", f"the answer is over jobs.max_result_bytes ({max_bytes})")
                    chunks.append(chunk)
            inc.pool.put(conn)
            conn = None
            outcome.record()
            return JobResult(status=outcome.status, content_type=ctype, body=b"".join(chunks))
        except TimeoutError:
            outcome.fail()
            raise Rejected("timeout", "the job ran past its deadline") from None
        except UpstreamError as exc:
            died = await _died(inc, exc)
            if died or (_unanswered(exc) and call.attempt < call.max_attempts):
                replica.breaker.release_probe()  # (as for a request: see _exchange)
                raise _WorkerDied("worker_crashed" if died else "reset", inc.requested is ExitReason.HANG) from None
            outcome.fail()
            raise Rejected("worker_error", f"the worker gave no valid answer: {exc.detail}") from None
        except BaseException:
            replica.breaker.release_probe()
            raise
        finally:
            if conn is not None:
                conn.abort()  # cancelled (DELETE /jobs/{id}) or failed: closing tells the worker to stop
            outcome.finish(ticket)

    def _place(self, call: Call) -> None:
        """The worker group and the route's policy for this call."""
        fleet = self.fleet
        route = call.route
        group = None
        if route is not None and route.worker is not None:
            group = fleet.groups.get(route.worker)
        elif call.model is not None:
            group = fleet.group_for_model(call.model)
            if group is None:
                # a worker whose models are not known yet (still starting) may serve this one; an on-demand
                # one that declares none is started by its route alone, never by a name it may not know
                unknown = [g for g in fleet.groups.values() if not g.models_known and g.spec.start == "eager"]
                if unknown:
                    group = unknown[0]
                else:
                    served = fleet.served_models()
                    raise Rejected("model_not_found", f"model {call.model!r} is not served here; "
                                   f"served models: {', '.join(served)}")
        if group is None:
            group = next(iter(fleet.groups.values()))
        call.group = group
        call.worker_label = group.name
        if route is not None:
            call.pool = route.pool
            call.gpu_mb = route.gpu_memory_mb

    def _parse_priority(self, request: web.BaseRequest) -> int:
        raw = request.headers.get(self._prio_header)
        if raw is None:
            return -1  # decided by the route, once known
        v = raw.strip()
        idx = self._level_index.get(v)
        if idx is None and v.isdigit() and int(v) < len(self._level_names):
            idx = int(v)
        if idx is None:
            raise Rejected("bad_request", f"{self._prio_header}: {raw[:64]!r} is not a priority; use one of "
                           f"{self._allowed_levels} or an index 0..{len(self._level_names) - 1} (0 is highest)")
        return idx

    def _parse_deadline(self, request: web.BaseRequest, call: Call) -> None:
        route = call.route
        if call.level < 0:
            call.level = (self._level_index[route.priority] if route is not None and route.priority is not None
                          else self._default_level)
        call.queue_limit = self._level_timeouts[call.level]
        total = route.timeout_s if route is not None else None
        raw = request.headers.get(self._timeout_header)
        if raw is not None:
            try:
                t = float(raw)
            except ValueError:
                t = math.nan
            if not (t > 0) or not math.isfinite(t):
                raise Rejected("bad_request", f"{self._timeout_header}: {raw[:64]!r} is not a number of seconds; "
                               "use a positive number such as 2.5 (it can only shorten the policy's deadline)")
            call.queue_limit = min(call.queue_limit, t)
            total = t if total is None else min(total, t)
        call.deadline = call.t0 + total if total is not None else None

    def _precheck(self, call: Call) -> None:
        """Refusals that hold whatever worker the body names (before taking the body)."""
        lvl = call.level if call.level >= 0 else self._default_level
        if sheds(lvl, self.pressure.shed_below):
            call.level = lvl
            raise self._overloaded(lvl)

    async def _send_continue(self, request: web.BaseRequest, call: Call) -> None:
        """`Expect: 100-continue`: say go ahead only once the request is admitted, so a request that
        will be refused is refused before its body is sent."""
        if call.continue_sent or request.version < (1, 1):
            return
        if request.headers.get("Expect", "").lower() != "100-continue":
            return
        call.continue_sent = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _overloaded(self, level: int) -> Rejected:
        p = self.pressure
        return Rejected("overloaded", f"memory pressure ({Level(p.level).label}): priority "
                        f"{self._level_names[level]} is shed for now", p.retry_after())

    def _admission(self, call: Call) -> None:
        now = time.monotonic()
        g = call.group
        assert g is not None
        if not g.any_breaker_allows(now):
            raise Rejected("circuit_open", f"worker {g.name} keeps failing; the circuit breaker is open",
                           g.breaker_retry_after(now))
        if sheds(call.level, self.pressure.shed_below):
            raise self._overloaded(call.level)
        try:
            g.queue.check_room(call.level, call.client)
        except QueueFull as full:
            raise self._queue_full(g, full, call) from None

    def _queue_full(self, g: WorkerGroup, full: QueueFull, call: Call) -> Rejected:
        name = self._level_names[call.level]
        if full.scope == "key":
            return Rejected("queue_full", f"this client has queue.fairness.max_queued_per_key requests waiting "
                            f"at priority {name}", g.queue.estimate_wait_key(call.level, call.pool, call.client))
        what = f"priority {name} queue is full" if full.scope == "level" else "the queue is full"
        return Rejected("queue_full", f"worker {g.name}: {what}", g.queue.estimate_wait(call.level, call.pool))

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Rejected("payload_too_large", f"request body over limits.max_body_bytes "
                           f"({self.settings.limits.max_body_bytes} bytes)") from None

    # -- queue and replicas --------------------------------------------------------------------
    async def _dispatch(self, call: Call, run):
        g = call.group
        assert g is not None
        state = self.run
        requeued = False
        while True:
            if state.abandoned:
                raise state.shutting_down()
            call.attempt += 1
            ticket = await self._wait_slot(call, call.attempt > 1 or requeued)
            replica = None
            try:
                now = time.monotonic()
                replica = g.pick(now)
                if replica is None or not replica.breaker.allow(now):
                    if not g.any_breaker_allows(now):
                        raise Rejected("circuit_open", f"worker {g.name} keeps failing; the circuit breaker is open",
                                       g.breaker_retry_after(now) or 1.0)
                    # granted, then the replica died or began to drain before this task ran: nothing
                    # reached it; back to the front, to wait for a serving replica
                    call.attempt -= 1
                    requeued = True
                    continue
                return await run(replica, ticket)
            except _WorkerDied as died:
                if state.abandoned:
                    raise state.shutting_down() from None
                call.hangs += died.hang
                if call.hangs >= HANGS_BEFORE_POISON:
                    log.error("poison_request", request_id=call.rid, worker=g.name, hung_workers=call.hangs,
                              action="not tried again")
                    raise Rejected("timeout", f"this request was in flight on {call.hangs} workers that hung; "
                                   "it is not tried again") from None
                if call.attempt < call.max_attempts and (call.deadline is None or call.deadline > time.monotonic()):
                    self.metrics.retries.labels(died.reason).inc()
                    log.info("request_retry", request_id=call.rid, attempt=call.attempt + 1, reason=died.reason,
                             worker=g.name, replica=replica.index if replica else None)
                    continue
                raise Rejected("worker_crashed", f"the worker died while serving this request ({died.reason}); "
                               "it was not retried" + ("" if call.retry_ok else " because it is not safe to repeat"),
                               g.expected_ready_in()) from None
            finally:
                g.queue.release(ticket, None)

    async def _wait_slot(self, call: Call, front: bool) -> Ticket:
        g = call.group
        assert g is not None
        name = self._level_names[call.level]
        now = time.monotonic()
        if not g.started():
            self.fleet.wake(g)  # on demand: the first request starts it
        try:
            ticket = g.queue.acquire(call.level, call.pool, now, call.gpu_mb, front, key=call.client)
        except QueueFull as full:
            raise self._queue_full(g, full, call) from None
        if ticket.state == GRANTED:
            self.metrics.observe_wait(name, 0.0)
            return ticket
        limit = call.queue_limit if call.deadline is None else min(call.queue_limit, call.deadline - now)
        try:
            async with asyncio.timeout(max(0.0, limit)):
                await ticket.future
        except TimeoutError:
            g.queue.cancel(ticket)
            waited = time.monotonic() - now
            self.metrics.observe_wait(name, waited)
            if not g.serving():
                room = self.fleet.waiting_for_room(g)
                what = (f"worker {g.name} is waiting for GPU room: {room}; it did not start" if room is not None
                        else f"worker {g.name} is {g.state_summary()} and did not come back")
                raise Rejected("worker_unavailable", f"{what} within this request's wait limit ({limit:.3g}s)",
                               self.fleet.unavailable_retry_after(g)) from None
            if g.paused:
                raise Rejected("overloaded", "memory pressure has paused dispatch",
                               self.pressure.retry_after()) from None
            raise Rejected("queue_timeout", f"waited {waited:.3g}s in the queue, the limit for priority "
                           f"{name}", g.queue.estimate_wait(call.level, call.pool)) from None
        except BaseException:
            g.queue.cancel(ticket)  # the client left while queued: the worker never sees it
            raise
        waited = time.monotonic() - now
        call.queued_s += waited
        self.metrics.observe_wait(name, waited)
        return ticket

    # -- one exchange with one replica ---------------------------------------------------------
    async def _exchange(self, request, call: Call, replica: Replica, ticket: Ticket) -> web.StreamResponse:
        ex = InFlight(time.monotonic())
        inc = replica.begin(ex)
        t_start = ex.started
        outcome = _Outcome(replica, call, t_start, inc, ex, self.run.slot_free)
        try:
            if call.deadline is None:  # the common case: no timer on the hot path
                return await self._forward(request, call, replica, inc, ex, outcome, ticket, None)
            async with asyncio.timeout(max(0.0, call.deadline - t_start)) as tm:
                return await self._forward(request, call, replica, inc, ex, outcome, ticket, tm)
        except TimeoutError:
            outcome.fail()
            raise Rejected("timeout", "the request ran past its deadline (route timeout_s or "
                           f"{self._timeout_header})") from None
        except UpstreamError as exc:
            died = await _died(inc, exc)
            if died or (_unanswered(exc) and call.attempt < call.max_attempts):
                # a worker death belongs to the lifecycle, not the breaker; so does a connection closed
                # before any answer byte by a worker whose process lives on (its model process died under
                # a master that lives on): tried again, counted once by its final outcome
                replica.breaker.release_probe()
                raise _WorkerDied("worker_crashed" if died else "reset", inc.requested is ExitReason.HANG) from None
            outcome.fail()
            raise Rejected("worker_error", f"the worker gave no valid answer: {exc.detail}") from None
        except BaseException:
            replica.breaker.release_probe()  # the client left, or a rejection: no outcome to count
            raise
        finally:
            outcome.finish(ticket)

    async def _forward(self, request, call, replica, inc, ex, outcome, ticket, tm):
        conn = await self._send(request, call, inc)
        ex.conn = conn
        try:
            outcome.oom = _is_oom(conn.headers)
            outcome.status = conn.status
            headers = self._response_headers(conn.headers, call, replica)
            first: list[bytes] = []
            if not conn.complete and call.method != "HEAD" and _sized(conn.headers, self.settings.limits.buffer_bytes):
                # an answer of a known size (not a stream): hold its head until it is all in, so a worker
                # that dies mid-answer means a retry (or a typed 502 worker_crashed), never a cut body
                first, done = await _gather(conn, self.settings.limits.buffer_bytes)
                if done:
                    inc.pool.put(conn)
                    outcome.record()
                    return web.Response(status=conn.status, body=b"".join(first), headers=headers)
            if not conn.complete:
                return await self._relay(request, call, conn, inc, ex, headers, outcome, ticket, tm, first)
            status, data, raw = conn.status, conn.take_buffered(), conn.headers
            inc.pool.put(conn)
        except BaseException:
            if not outcome.finished:  # (once finished, the connection is back in the pool: not ours)
                conn.abort()  # the client left or time ran out: closing tells the worker to stop
            raise
        outcome.record()
        if call.method == "HEAD":
            for k, v in raw:
                if k.lower() == b"content-length":
                    headers["Content-Length"] = v.decode("latin-1")
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, body=data, headers=headers)

    async def _send(self, request, call: Call, inc: Incarnation) -> UpstreamConnection:
        head = self._request_head(request, call)
        body = call.body
        for _ in range(2):
            conn, reused = await inc.pool.get()
            try:
                fut = conn.start(head, body, call.method == "HEAD")
                if body is None:
                    await self._stream_body(request, conn)
                await fut
            except UpstreamError as exc:
                conn.abort()
                # a kept-alive connection the worker had closed: try once on a fresh one
                if reused and body is not None and exc.kind == "reset" and not exc.started:
                    continue
                raise
            except BaseException:
                conn.abort()  # timeout or the client left: closing tells the worker to stop
                raise
            return conn
        raise UpstreamError("reset", "worker closed the connection")

    async def _stream_body(self, request, conn: UpstreamConnection) -> None:
        limit = self.settings.limits.max_body_bytes
        sent = 0
        async for chunk in request.content.iter_chunked(STREAM_CHUNK):
            sent += len(chunk)
            if sent > limit:
                conn.abort()
                raise Rejected("payload_too_large", f"request body over limits.max_body_bytes ({limit} bytes)")
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await conn.drain()
        conn.write(b"0\r\n\r\n")

    def _request_head(self, request, call: Call) -> bytes:
        target = request.raw_path
        if not target.startswith("/") and target != "*":
            # absolute-form (RFC 9112 3.2.2): the worker gets origin-form; Host already names the authority
            target = request.rel_url.raw_path_qs if hasattr(request.rel_url, "raw_path_qs") else request.path_qs
        return self._head(call, target, request.raw_headers, (request.remote or "").encode(),
                          request.scheme.encode())

    def _head(self, call: Call, target: str, raw, peer: bytes, scheme: bytes) -> bytes:
        parts = [call.method.encode(), b" ", target.encode("utf-8", "surrogateescape"), b" HTTP/1.1\r\n"]
        conn_tokens: tuple[bytes, ...] = ()
        xff = None
        host = None
        for k, v in raw:
            lk = k.lower()
            if lk == b"connection":
                conn_tokens += tuple(t.strip().lower() for t in v.split(b","))
            elif lk == b"x-forwarded-for":
                xff = v
            elif lk == b"host":
                host = v
        for k, v in raw:
            lk = k.lower()
            if lk in HOP_BY_HOP or (conn_tokens and lk in conn_tokens and lk not in NEVER_STRIPPED):
                continue
            parts += (k, b": ", v, b"\r\n")
        parts += (b"X-Forwarded-For: ", xff + b", " + peer if xff else peer, b"\r\n",
                  b"X-Forwarded-Proto: ", scheme, b"\r\n",
                  b"X-Request-ID: ", call.rid.encode(), b"\r\n")
        if host is not None:
            parts += (b"X-Forwarded-Host: ", host, b"\r\n")
        body = call.body
        if body is None:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif body or call.method in BODY_METHODS:
            parts += (b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def _response_headers(self, raw: list[tuple[bytes, bytes]], call: Call, replica: Replica) -> CIMultiDict:
        h: CIMultiDict = CIMultiDict()
        for k, v in raw:
            name = k.decode("latin-1")
            if name.lower() in RESPONSE_DROP:
                continue
            h.add(name, v.decode("latin-1"))
        h["X-Request-ID"] = call.rid
        h["X-Supervisor-Queue-Ms"] = f"{call.queued_s * 1000:.3f}"
        h["X-Supervisor-Attempts"] = str(call.attempt)
        if replica.degraded:
            h["X-Degraded"] = replica.degraded
        return h

    async def _relay(self, request, call, conn, inc, ex, headers, outcome, ticket, tm, first=()):
        """Stream the answer to the client while reading the worker as fast as it sends (nginx-style
        buffering, memory then disk), so a finished worker answer frees its slot whatever the client's
        speed; SSE still goes out event by event."""
        resp = web.StreamResponse(status=conn.status, headers=headers)
        for k, v in conn.headers:
            if k.lower() == b"content-length":
                resp.content_length = int(v)
        sse = headers.get("Content-Type", "").startswith("text/event-stream")
        await resp.prepare(request)
        lim = self.settings.limits
        spool = ResponseSpool(max(lim.buffer_bytes, STREAM_CHUNK), lim.spool_dir or tempfile.gettempdir(),
                              lim.spool_bytes)
        reader = asyncio.ensure_future(_fill(conn, spool, ex, first))
        handed_back = False

        def worker_done(t: asyncio.Future) -> None:
            """The worker's answer is all in: its connection back to the pool and its slot free now,
            whatever the client still has to read. Once, from whichever comes first."""
            nonlocal handed_back
            if handed_back or t.cancelled() or t.exception() is not None:
                return
            handed_back = True
            inc.pool.put(conn)
            outcome.record()
            outcome.finish(ticket)
            if tm is not None and not tm.expired():
                tm.reschedule(None)  # the deadline is the worker's; the client's pace is bounded separately

        reader.add_done_callback(worker_done)
        client_timeout = lim.client_timeout_s
        try:
            async for chunk in spool.chunks():
                try:
                    async with asyncio.timeout(client_timeout):
                        await resp.write(chunk)
                except TimeoutError:
                    # the client reads nothing: drop it, never hold the worker for it
                    log.warning("client_stalled", request_id=call.rid, client_timeout_s=client_timeout)
                    request.transport.close()
                    raise asyncio.CancelledError from None
            await reader  # all that came is sent; the worker's failure, if any, is raised here
            worker_done(reader)
        except (UpstreamError, TimeoutError, asyncio.CancelledError, SpoolError) as exc:
            expired = tm is not None and tm.expired()
            if not reader.done():
                reader.cancel()
            if isinstance(exc, asyncio.CancelledError) and not expired:
                raise  # the client left: _forward closes the worker's connection
            # past the deadline the cancellation is the timeout's: the answer has started, so it
            # cannot become a 504 any more; end it here (the timeout then exits quietly)
            timed_out = not isinstance(exc, UpstreamError | SpoolError)
            if not handed_back:
                conn.abort()
            if tm is not None and not expired:
                tm.reschedule(None)  # the deadline must not cut the error event short
            died = False if timed_out or isinstance(exc, SpoolError) else await _died(inc, exc)
            why = "timeout" if timed_out else "worker_crashed" if died else "worker_error"
            msg = ("the request ran past its deadline" if timed_out
                   else f"the worker broke off the answer: {getattr(exc, 'detail', exc)}")
            log.warning("stream_broken", request_id=call.rid, reason=why, worker=call.worker_label,
                        worker_pid=inc.pid)
            if died:
                outcome.replica.breaker.release_probe()
            else:
                outcome.fail()
            if sse:
                await resp.write(error_event(why, msg, call.rid))
                await resp.write_eof()
            else:
                request.transport.close()  # no terminating chunk: the client sees a broken body
            return resp
        finally:
            spool.close()
        await resp.write_eof()
        return resp



def _sized(raw: list[tuple[bytes, bytes]], limit: int) -> bool:
    """An answer with a Content-Length within `limit` (chunked or close-delimited ones are streams)."""
    for k, v in raw:
        if k.lower() == b"content-length":
            try:
                return int(v) <= limit
            except ValueError:
                return False
    return False


async def _gather(conn: UpstreamConnection, limit: int) -> tuple[list[bytes], bool]:
    """Read the answer until it ends or passes `limit` bytes: (what came, whether it ended)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await conn.read()
        if not chunk:
            return chunks, True
        chunks.append(chunk)
        size += len(chunk)
    return chunks, False


async def _fill(conn: UpstreamConnection, spool: ResponseSpool, ex, first=()) -> None:
    """Read the worker's answer into the spool as fast as it comes; past the spool's limits, wait for
    the client (then the exchange counts as held up by the client, never as a stalled worker). Whatever
    happens, the spool is finished: the client gets all that came, then the error if there was one."""
    piece = spool.memory_limit  # whatever conn.read() gathered, the spool takes it in pieces that fit
    try:
        for data in first:
            for i in range(0, len(data), piece):
                await spool.append(data[i:i + piece])
        while data := await conn.read():
            for i in range(0, len(data), piece):
                chunk = data[i:i + piece] if len(data) > piece else data
                try:
                    await spool.append(chunk)
                except SpoolFull:
                    ex.client_wait = True
                    try:
                        await spool.wait_drained()  # everything sent: a piece fits in memory now
                        await spool.append(chunk)
                    finally:
                        ex.client_wait = False
    finally:
        spool.finish()


class _Outcome:
    """What one exchange tells the replica's breaker and the queue, told once."""

    __slots__ = ("replica", "call", "t_start", "inc", "ex", "status", "oom", "recorded", "finished", "freed")

    def __init__(self, replica: Replica, call: Call, t_start: float, inc: Incarnation, ex: InFlight,
                 freed: Callable[[], None]):
        self.replica = replica
        self.freed = freed  # a slot is free: queued async jobs may take it
        self.inc = inc
        self.ex = ex
        self.call = call
        self.t_start = t_start
        self.status = 0
        self.oom = False
        self.recorded = False
        self.finished = False

    def record(self) -> None:
        if self.recorded:
            return
        self.recorded = True
        now = time.monotonic()
        b = self.replica.breaker
        if self.status == 500 and not self.oom:
            b.record_server_error(now - self.t_start, now, self.t_start, self.call.client or self.call.peer,
                                  self.replica.probe_failures > 0)
            return
        b.record(self.status < 500 and not self.oom, now - self.t_start, now, self.t_start)

    def fail(self) -> None:
        if self.recorded:
            return
        self.recorded = True
        now = time.monotonic()
        self.replica.breaker.record(False, now - self.t_start, now, self.t_start)

    def finish(self, ticket: Ticket) -> None:
        if self.finished:
            return
        self.finished = True
        self.call.group.queue.release(ticket, time.monotonic() - self.t_start)
        self.replica.end(self.inc, self.ex, self.oom)
        self.freed()


async def _died(inc: Incarnation, exc: UpstreamError) -> bool:
    """Did the worker die (retry elsewhere) or merely misbehave?"""
    if exc.kind == "protocol":
        return False
    try:
        async with asyncio.timeout(0.5):
            await inc.exited.wait()
    except TimeoutError:
        return False
    return True


def _unanswered(exc: UpstreamError) -> bool:
    """The worker closed the connection before any byte of the answer: the process that held it died
    (a gunicorn worker under its master), or the worker refused the request without a word. Either
    way nothing of it was answered: a retry-safe request may go again on a fresh connection."""
    return exc.kind == "reset" and not exc.started


def _is_oom(raw: list[tuple[bytes, bytes]]) -> bool:
    for k, v in raw:
        if k.lower() == b"x-worker-error" and v.strip().lower() == b"oom":
            return True
    return False


def _body_model(body: bytes) -> str | None:
    """The JSON body's `model`, if it is a JSON object that names one. A body that is not JSON, or
    names none, routes by path; a `model` that is not a string is the client's error."""
    if not body or body.lstrip()[:1] != b"{":
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or "model" not in data or data["model"] is None:
        return None
    m = data["model"]
    if not isinstance(m, str):
        raise Rejected("bad_request", f"model: must be a string naming a served model, not {type(m).__name__}")
    return m


def _degraded(fleet: Fleet) -> dict[str, str] | None:
    d = fleet.degraded()
    return {"X-Degraded": d} if d else None
