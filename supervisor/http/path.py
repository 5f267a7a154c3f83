"""The request path's front (`RequestPath`): each request and each job delivery in, exactly one answer
out, counted and logged; the work itself is admission's, the dispatcher's and an exchange's."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from typing import TYPE_CHECKING

import structlog

from ..budgets.core import Budgets
from ..errors import ERROR_TYPES, Rejected
from ..jobs.api import wants_async
from ..jobs.model import JobFailed, JobRequest, JobResult
from .admit import Admission
from .call import Call, CallPlanner
from .dispatch import Dispatcher
from .exchange import Wire
from .framing import send_continue, send_parts, send_web

if TYPE_CHECKING:
    from ..config import Settings
    from ..fleet import Fleet
    from ..metrics import Metrics
    from ..pressure_control import PressureControl
    from ..runstate import RunState
    from ..trace_spans import Tracer
    from .wire import Request, Responder

access_log = structlog.get_logger("supervisor.access")

REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
CLIENT_CLOSED = 499  # requests_total code for a client that left before its answer was complete


class RequestPath:
    """Everything between a client's request and its one answer."""

    def __init__(self, settings: Settings, fleet: Fleet, metrics: Metrics, pressure: PressureControl,
                 run: RunState):
        self.fleet = fleet
        self.metrics = metrics
        self.run = run
        self._rid_prefix = os.urandom(11).hex()
        self._rid_seq = itertools.count()
        self.planner = CallPlanner(settings, fleet)
        self.wire = Wire(settings, run.slot_free)
        self.admission = Admission(settings, fleet, metrics, pressure, run, self.planner)
        self.dispatcher = Dispatcher(fleet, metrics, pressure, run, self.planner, self.wire)
        self.budgets = Budgets(settings, metrics)
        self.settings = settings
        self.tracer: Tracer | None = None  # set by the supervisor's Tracing while tracing is on

    def derive(self, s: Settings) -> None:
        self.settings = s
        self.planner.derive(s)
        self.wire.derive(s)
        self.admission.derive(s)
        self.budgets.derive(s)

    def models_changed(self) -> None:
        """What the fleet serves changed (discovery): whether routing reads the body's `model`."""
        self.planner.models_changed()

    def new_request_id(self) -> str:
        # unique per process start (random prefix) and cheap: no syscall per request
        return f"{self._rid_prefix}{next(self._rid_seq):010x}"

    # -- a request -------------------------------------------------------------------------------
    async def handle(self, request: Request, responder: Responder) -> int:
        """Answer one request exactly once (through `responder`); its status, as counted."""
        t0 = time.monotonic()
        run = self.run
        run.active += 1
        rid = request.headers.get("X-Request-ID")
        call = Call(rid or "", t0, request.method, request.path, self.planner.default_level)
        if self.tracer is not None:
            call.trace = self.tracer.request(request, call)
        admission = self.admission
        try:
            try:
                if rid is None:
                    call.rid = self.new_request_id()
                elif not REQUEST_ID_RE.match(rid):
                    call.rid = self.new_request_id()
                    raise Rejected("bad_request", "X-Request-ID: must be 1-200 visible ASCII characters")
                admission.check_request_line(request)
                if admission.asks_models(call):
                    status = await send_parts(responder, *admission.models(call))
                else:
                    status = await self._serve(request, responder, call)
            except Rejected as r:
                if call.trace is not None:
                    call.trace.error = r.etype
                parts = admission.reject(r, call.rid)
                if call.charge is not None:
                    call.charge.error_headers(parts[1])
                if responder.started:  # (an answer under way cannot become an error any more: cut it)
                    request.close()
                    status = parts[0]
                else:
                    status = await send_parts(responder, *parts)
            except asyncio.CancelledError:
                # the client went away (queued, running or mid-stream): counted as nginx does, 499
                self._observe(call, CLIENT_CLOSED)
                raise
            self._observe(call, status)
            if self.settings.logging.access:
                access_log.info("request", request_id=call.rid, method=call.method, path=call.path, status=status,
                                priority=self.planner.level_names[max(call.level, 0)], worker=call.worker_label,
                                attempts=call.attempt, duration_ms=round((time.monotonic() - t0) * 1000, 3),
                                **(call.trace.log_fields() if call.trace is not None else {}))
            return status
        finally:
            try:
                if call.charge is not None:  # settled (or refunded) once, whatever happened
                    pending = self.budgets.settle_now(call.charge, call.model)
                    if pending is not None:
                        await pending
            finally:
                run.request_done()

    async def _serve(self, request: Request, responder: Responder, call: Call) -> int:
        """Route, admit, take the body (what does not need to wait is done without awaiting), dispatch."""
        admission = self.admission
        if admission.route(request, call):
            await admission.route_by_body(request, call)  # the body's `model` picks the worker
        headers = request.headers
        if self.run.jobs is not None and headers.get("Prefer") is not None and wants_async(headers.getall("Prefer")):
            return await send_web(responder, await admission.submit_job(request, call))
        admission.admit(call)
        if request.expect_continue and not call.continue_sent:
            await send_continue(request, call)
        if call.body is None:
            if request.body_exists:
                await admission.take_body(request, call)
            else:
                call.body = b""
        if self.budgets.active:
            pending = self.budgets.charge_now(call, request.content_length)
            if pending is not None:
                await pending
        return await self.dispatcher.dispatch(call, lambda ex: ex.answer(request, responder))

    def _observe(self, call: Call, code: int) -> None:
        level = call.level if call.level >= 0 else self.planner.default_level
        self.metrics.observe_request(self.planner.level_names[level], code, time.monotonic() - call.t0,
                                     call.worker_label)
        if call.trace is not None:
            call.trace.end(call, code, self.planner.level_names[level])

    # -- a job -----------------------------------------------------------------------------------
    def has_free_slot(self, req: JobRequest) -> bool:
        """Whether a job could start now without waiting: its worker serves and has a free slot."""
        try:
            call = self.planner.job_call(req, "", time.time())
        except Rejected:
            return True  # it will fail at once: let it, so it ends
        g = call.group
        p = g.queue.pools.get(call.pool)
        return p is not None and g.queue.open and p.waiting == 0 and p.in_use < p.slots

    async def run_job(self, req: JobRequest, attempt: int, max_result_bytes: int) -> JobResult:
        """One delivery of a job through the same routes, queue, replicas and retries as a request.
        Takes its queue slot before its first await (the job manager counts on it)."""
        rid = f"job-{req.id}-{attempt}"
        call = Call(rid, time.monotonic(), req.method, "", self.planner.default_level)
        trace = call.trace = self.tracer.job_run(req, attempt) if self.tracer is not None else None
        try:
            call = self.planner.job_call(req, rid, time.time())
            call.trace = trace
            if self.budgets.active:
                self.budgets.charge_job(call)
            self.admission.admit(call)
            result = await self.dispatcher.dispatch(call, lambda ex: ex.result(req, max_result_bytes))
        except Rejected as r:
            if trace is not None:
                trace.error = r.etype
            self._observe(call, ERROR_TYPES[r.etype][0])
            raise JobFailed(r.etype, r.message) from None
        except (JobFailed, asyncio.CancelledError) as exc:
            if trace is not None:
                trace.abandon(call, exc.type if isinstance(exc, JobFailed) else "cancelled")
            raise
        finally:
            if call.charge is not None:
                await self.budgets.settle(call.charge, call.model)
        self._observe(call, result.status)
        return result
