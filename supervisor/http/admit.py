"""Admission: the checks of the request line, its size, priority and route, the refusals that come before
the queue (shutdown, an open circuit, memory pressure, a full queue), the async-job submission that
stores a request instead, the daemon's own /v1/models answers, and how a refusal is answered."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from ..errors import Rejected, error_parts
from ..jobs.api import JobTerms, job_request, submit_error_response, submit_response
from ..jobs.manager import CallbackRefused
from ..jobs.store import Conflict, Full, StoreUnavailable
from ..metrics import REJECT_REASONS
from ..pressure import Level, sheds
from ..request_queue import QueueFull
from .call import model_of
from .framing import read_body, send_continue

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import Settings
    from ..fleet import Fleet, WorkerGroup
    from ..metrics import Metrics
    from ..pressure_control import PressureControl
    from ..runstate import RunState
    from .call import Call, CallPlanner
    from .wire import Headers, Request

JOB_SUBMIT_ERRORS = (CallbackRefused, Conflict, Full, StoreUnavailable)
MODELS_PATH = "/v1/models"  # the daemon answers the list and each card itself (every worker's models)
MODEL_PREFIX = MODELS_PATH + "/"


class Admission:
    """What a request must pass before it may wait for a worker, and the answers of those that do not."""

    def __init__(self, settings: Settings, fleet: Fleet, metrics: Metrics, pressure: PressureControl,
                 run: RunState, planner: CallPlanner):
        self.settings = settings
        self.fleet = fleet
        self.metrics = metrics
        self.pressure = pressure
        self.run = run
        self.planner = planner

    def derive(self, s: Settings) -> None:
        self.settings = s

    @staticmethod
    def check_request_line(request: Request) -> None:
        """What RFC 9110/9112 say a reverse proxy refuses: CONNECT (no tunnels here), asterisk-form."""
        if request.method == "CONNECT":
            raise Rejected("bad_request", "CONNECT: this is a reverse proxy for model services, not a tunnel")
        if request.raw_path == "*" and request.method != "OPTIONS":
            raise Rejected("bad_request", "the asterisk-form request target is for OPTIONS only")

    def reject(self, r: Rejected, rid: str | None) -> tuple[int, dict[str, str], bytes]:
        """The answer to a refusal (status, headers, body), counted by its reason."""
        if r.etype in REJECT_REASONS:
            self.metrics.rejected.labels(r.etype).inc()
        d = self.fleet.degraded()
        return error_parts(r.etype, r.message, rid, r.retry_after_s, {"X-Degraded": d} if d else None)

    # -- parse and route -------------------------------------------------------------------------
    def route(self, request: Request, call: Call) -> bool:
        """The call's priority, client and routing facts from its head. True when the JSON body's `model`
        picks the worker: then `route_by_body` finishes the plan once the body is read."""
        s = self.settings
        planner = self.planner
        if not self.run.accepting:
            raise Rejected("shutting_down", "the supervisor is shutting down", s.drain.timeout_s)
        headers = request.headers
        call.level = planner.header_level(headers.get(planner.priority_header))
        cl = request.content_length
        max_body = s.limits.max_body_bytes
        if cl is not None and cl > max_body:
            raise Rejected("payload_too_large", f"Content-Length {cl} is over limits.max_body_bytes ({max_body})")
        call.peer = request.remote
        call.client = planner.client(headers, request.remote)
        # the JSON body's `model` picks the worker: read it only when it can matter, and only when it
        # is small enough to buffer (model routing reads bodies up to retry.max_body_bytes)
        route = planner.route(call.method, call.path)
        if (planner.wants_model(route) and request.body_exists and cl is not None and cl <= s.retry.max_body_bytes
                and "json" in headers.get("Content-Type", "json")):
            self.precheck(call)  # refuse what is sure to be refused before taking the body
            return True
        call.route = route
        planner.plan(call, timeout=headers.get(planner.timeout_header))
        self._session(call, headers)
        return False

    async def route_by_body(self, request: Request, call: Call) -> None:
        """Read the (small, JSON) body and route by its `model`."""
        planner = self.planner
        await send_continue(request, call)
        call.body = await read_body(request, self.settings.limits.max_body_bytes)
        call.model = model_of(call.document())
        call.route = planner.route(call.method, call.path, call.model)
        planner.plan(call, timeout=request.headers.get(planner.timeout_header))
        self._session(call, request.headers)

    @staticmethod
    def _session(call: Call, headers: Headers) -> None:
        """Session affinity: the session the worker's session header names (the body's `user` is read at
        dispatch, with the body)."""
        routing = call.group.spec.routing  # type: ignore[union-attr]
        if routing.affinity == "session":
            call.session = headers.get(routing.session_header) or None

    async def take_body(self, request: Request, call: Call) -> None:
        """The admitted request's body (it has one), held when small enough to send again; a larger one is
        streamed through and cannot be repeated."""
        s = self.settings
        cl = request.content_length
        if cl is not None and cl <= s.retry.max_body_bytes:
            call.body = await read_body(request, s.limits.max_body_bytes)
        else:
            call.retry_ok = False  # streamed through: it cannot be sent twice
            call.max_attempts = 1

    # -- the refusals before the queue -----------------------------------------------------------
    def precheck(self, call: Call) -> None:
        """Refusals that hold whatever worker the body names (before taking the body)."""
        lvl = call.level if call.level >= 0 else self.planner.default_level
        if sheds(lvl, self.pressure.shed_below):
            call.level = lvl
            raise self.overloaded(lvl)

    def admit(self, call: Call) -> None:
        """The breaker, memory pressure and the queue's bounds, as they stand now."""
        now = time.monotonic()
        g = call.group
        assert g is not None
        if not g.any_breaker_allows(now):
            raise Rejected("circuit_open", f"worker {g.name} keeps failing; the circuit breaker is open",
                           g.breaker_retry_after(now))
        if sheds(call.level, self.pressure.shed_below):
            raise self.overloaded(call.level)
        try:
            g.queue.check_room(call.level, call.client)
        except QueueFull as full:
            raise queue_full(g, full, call, self.planner.level_names[call.level]) from None

    def overloaded(self, level: int) -> Rejected:
        p = self.pressure
        return Rejected("overloaded", f"memory pressure ({Level(p.level).label}): priority "
                        f"{self.planner.level_names[level]} is shed for now", p.retry_after())

    # -- async jobs ------------------------------------------------------------------------------
    async def submit_job(self, request: Request, call: Call) -> web.Response:
        """`Prefer: respond-async`: store the request durably, answer 202; it runs later like any other.
        A job is stored whatever the queue, breaker or pressure say now: it runs when it can."""
        jobs = self.run.jobs
        assert jobs is not None
        await send_continue(request, call)
        if call.body is None:
            # a job keeps its body (up to limits.max_body_bytes)
            call.body = await read_body(request, self.settings.limits.max_body_bytes)
        raw = request.headers.get(self.planner.timeout_header)
        timeout_s = None if raw is None else (call.deadline - call.t0 if call.deadline is not None else None)
        route = call.route
        if timeout_s is None and route is not None and route.timeout_s is not None:
            timeout_s = route.timeout_s
        terms = JobTerms(priority=self.planner.level_names[call.level], timeout_s=timeout_s,
                         retry_safe=call.retry_ok, worker=call.worker_label, fairness_key=call.client)
        trace = call.trace
        headers = request.headers.items() if trace is None else trace.submitting(request.headers.items())
        req = job_request(call.method, request.raw_path, headers, call.body, now=jobs.now(), terms=terms)
        try:
            job, _ = await jobs.submit(req)
        except JOB_SUBMIT_ERRORS as exc:
            if isinstance(exc, StoreUnavailable):
                self.metrics.rejected.labels("jobs_unavailable").inc()
            return submit_error_response(exc, call.rid)
        if trace is not None:
            trace.submitted(job.id)
        return submit_response(job, jobs.now(), call.rid)

    # -- GET /v1/models --------------------------------------------------------------------------
    def asks_models(self, call: Call) -> bool:
        return (call.method == "GET" and (call.path == MODELS_PATH or call.path.startswith(MODEL_PREFIX))
                and bool(self.fleet.served_models()))

    def models(self, call: Call) -> tuple[int, dict[str, str], bytes]:
        """GET /v1/models: every worker's models, as OpenAI lists them, with whether the worker is loaded
        now; GET /v1/models/{id} (an id may hold `/`): one of those cards, or 404 model_not_found."""
        data = []
        for g in self.fleet.groups.values():
            loaded = g.loaded()
            for m in g.models:
                data.append({"id": m, "object": "model", "created": 0, "owned_by": g.name,
                             "status": "loaded" if loaded else "unloaded", "worker": g.name})
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Request-ID": call.rid}
        if call.path == MODELS_PATH:
            return 200, headers, json.dumps({"object": "list", "data": data}).encode()
        wanted = call.path[len(MODEL_PREFIX):]
        for card in data:
            if card["id"] == wanted:
                return 200, headers, json.dumps(card).encode()
        raise Rejected("model_not_found", f"model {wanted!r} is not served here; "
                       f"served models: {', '.join(c['id'] for c in data)}")


def queue_full(g: WorkerGroup, full: QueueFull, call: Call, level_name: str) -> Rejected:
    """The answer to a call its worker's queue has no room for (its client's share, its level, or all)."""
    if full.scope == "key":
        return Rejected("queue_full", f"this client has queue.fairness.max_queued_per_key requests waiting "
                        f"at priority {level_name}", g.queue.estimate_wait_key(call.level, call.pool, call.client))
    what = f"priority {level_name} queue is full" if full.scope == "level" else "the queue is full"
    return Rejected("queue_full", f"worker {g.name}: {what}", g.queue.estimate_wait(call.level, call.pool))
