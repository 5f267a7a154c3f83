"""The spans of one request or job delivery (`Trace`) and the tracer that starts them (`Tracer`): an
OpenTelemetry tracer provider whose batch processor exports over OTLP/HTTP on its own thread, each failed
export counted. Imported only when tracing is on (it loads the OpenTelemetry SDK).

A request's trace: `request` (server) continues a client's traceparent; under it `queue.wait` when it
waited for a slot (a slot free at once costs no span), one `attempt` (client) per try, whose context is the
traceparent the worker gets, and `job.submit` when it submits a job. A job's delivery is `job.run`, the
root of a trace of its own, linked to the context stored with the job (its `job.submit` span): a job may
run long after, and more than once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import structlog
from opentelemetry import trace as otel
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from .errors import Rejected
from .http.call import body_model
from .tracing import format_traceparent, parse_traceparent

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from .config import Tracing as TracingSettings
    from .fleet import Replica
    from .http.call import Call
    from .http.wire import Request
    from .jobs.model import JobRequest

log = structlog.get_logger("supervisor.tracing")

EXPORT_TIMEOUT_S = 5.0  # one export, its retries included: the exporter's thread, never a request, waits
CLIENT_CLOSED = 499
# a body routing did not read is read for gen_ai.request.model up to this size (a parse on the event loop)
MODEL_PARSE_MAX_BYTES = 256 * 1024
_ROOT = otel.set_span_in_context(otel.INVALID_SPAN)  # a parent that is none: a new trace, whatever is current
GEN_AI_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion",
                     "/v1/embeddings": "embeddings"}


class CountingExporter(SpanExporter):
    """An exporter whose failed exports (refused, unreachable, or raising) are counted."""

    def __init__(self, inner: SpanExporter, on_error: Callable[[], None]):
        self._inner = inner
        self._on_error = on_error

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            self._on_error()  # counted, then the batch processor logs it, as it would have
            raise
        if result is not SpanExportResult.SUCCESS:
            self._on_error()
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _SdkLogs(logging.Handler):
    """The SDK's own warnings (an export retried or failed, a full queue) as the daemon's log events, not
    as bare text lines in its JSON log."""

    def emit(self, record: logging.LogRecord) -> None:
        say = log.error if record.levelno >= logging.ERROR else log.warning
        say("opentelemetry_sdk", message=record.getMessage(), logger=record.name)


def route_sdk_logs() -> None:
    """Send the `opentelemetry` loggers' warnings to structlog (once per process)."""
    sdk = logging.getLogger("opentelemetry")
    if not any(isinstance(h, _SdkLogs) for h in sdk.handlers):
        sdk.addHandler(_SdkLogs(logging.WARNING))
        sdk.propagate = False


def sampler(ratio: float) -> ParentBased:
    """A client's sampling decision is kept; a trace the daemon starts is sampled at `ratio`."""
    return ParentBased(TraceIdRatioBased(ratio))


def remote_context(traceparent: str | None, tracestate: Iterable[str] = ()) -> Context | None:
    """The context a client's traceparent names (None without a valid one: a new trace)."""
    ids = parse_traceparent(traceparent) if traceparent is not None else None
    if ids is None:
        return None
    tid, sid, flags = ids
    state = TraceState.from_header(list(tracestate)) if tracestate else None
    return otel.set_span_in_context(NonRecordingSpan(SpanContext(tid, sid, True, TraceFlags(flags & 0x01), state)))


def traceparent_of(span: Span) -> bytes:
    c = span.get_span_context()
    return format_traceparent(c.trace_id, c.span_id, c.trace_flags)


class Tracer:
    """One tracer provider for one `tracing` section; `shutdown` (blocking) flushes and stops it."""

    def __init__(self, s: TracingSettings, on_error: Callable[[], None],
                 exporter: SpanExporter | None = None):
        route_sdk_logs()
        inner = exporter or OTLPSpanExporter(endpoint=s.endpoint, headers=dict(s.headers) or None,
                                             timeout=EXPORT_TIMEOUT_S)
        self.processor = BatchSpanProcessor(CountingExporter(inner, on_error))
        self.provider = TracerProvider(resource=Resource.create({"service.name": s.service_name}),
                                       sampler=sampler(s.sample_ratio), shutdown_on_exit=False)
        self.provider.add_span_processor(self.processor)
        self._tracer = self.provider.get_tracer("gpu-supervisor")

    def request(self, request: Request, call: Call) -> Trace:
        """A request's trace: its `request` span, continuing the client's traceparent if it sent one."""
        h = request.headers
        tp = h.get("traceparent")
        parent = remote_context(tp, h.getall("tracestate")) if tp is not None else None
        span = self._tracer.start_span("request", _ROOT if parent is None else parent, SpanKind.SERVER, {
            "http.request.method": call.method, "url.path": call.path})
        return Trace(self._tracer, span)

    def job_run(self, req: JobRequest, attempt: int) -> Trace:
        """A job delivery's trace: `job.run`, a new trace linked to the context stored with the job."""
        stored = remote_context(req.header("traceparent"))
        links = [Link(otel.get_current_span(stored).get_span_context())] if stored is not None else None
        span = self._tracer.start_span("job.run", _ROOT, SpanKind.INTERNAL, {
            "http.request.method": req.method, "url.path": req.path, "gpu_supervisor.job_id": req.id,
            "gpu_supervisor.job_attempt": attempt}, links)
        return Trace(self._tracer, span)

    def shutdown(self) -> None:
        self.provider.shutdown()


class Trace:
    """One request's spans (or one job delivery's): its own, the queue wait and the attempt now open, the
    traceparent that attempt sends the worker, and the error type the request ended with."""

    __slots__ = ("_tracer", "span", "_ctx", "_wait", "_attempt", "_submit", "traceparent", "error")

    def __init__(self, tracer: otel.Tracer, span: Span):
        self._tracer = tracer
        self.span = span
        self._ctx = otel.set_span_in_context(span)
        self._wait: Span | None = None
        self._attempt: Span | None = None
        self._submit: Span | None = None
        self.traceparent: bytes | None = None  # the current attempt's, for the worker
        self.error: str | None = None  # the error type the daemon answered with

    def log_fields(self) -> dict[str, str]:
        """`trace_id` for the access log, when this trace is recorded (sampled)."""
        c = self.span.get_span_context()
        return {"trace_id": f"{c.trace_id:032x}"} if c.trace_flags.sampled else {}

    # -- waiting and trying --------------------------------------------------------------------------
    def wait_begins(self, call: Call, priority: str) -> None:
        self._wait = self._tracer.start_span("queue.wait", self._ctx, SpanKind.INTERNAL, {
            "gpu_supervisor.priority": priority, "gpu_supervisor.pool": call.pool,
            "gpu_supervisor.worker": call.worker_label, "gpu_supervisor.attempt": call.attempt})

    def wait_ends(self) -> None:
        if self._wait is not None:
            self._wait.end()
            self._wait = None

    def attempt_begins(self, call: Call, replica: Replica) -> None:
        """A try on `replica`: its span, whose context the worker gets."""
        span = self._attempt = self._tracer.start_span("attempt", self._ctx, SpanKind.CLIENT, {
            "http.request.method": call.method, "url.path": call.path, "gpu_supervisor.worker": replica.worker,
            "gpu_supervisor.replica": replica.index, "gpu_supervisor.attempt": call.attempt})
        self.traceparent = traceparent_of(span)
        self.span.set_attribute("gpu_supervisor.replica", replica.index)

    def attempt_failed(self, reason: str) -> None:
        """The worker died under this try (it may go again on another one)."""
        span = self._attempt
        if span is not None:
            span.set_attributes({"gpu_supervisor.outcome": reason, "error.type": reason})
            span.set_status(Status(StatusCode.ERROR, reason))
            span.end()
            self._attempt = None

    # -- a job's submission ----------------------------------------------------------------------------
    def submitting(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The headers a job is stored with: the client's traceparent replaced by its `job.submit` span's,
        which its runs link to."""
        span = self._submit = self._tracer.start_span("job.submit", self._ctx, SpanKind.INTERNAL)
        out = [(k, v) for k, v in headers if k.lower() != "traceparent"]
        out.append(("traceparent", traceparent_of(span).decode()))
        return out

    def submitted(self, job_id: str) -> None:
        if self._submit is not None:
            self._submit.set_attribute("gpu_supervisor.job_id", job_id)
            self._submit.end()
            self._submit = None

    # -- the end -----------------------------------------------------------------------------------------
    def end(self, call: Call, code: int, priority: str) -> None:
        """The request's answer (its status as counted): its span and any child still open end."""
        error = self.error
        if error is None and code == CLIENT_CLOSED:
            error = "client_closed"
        self._close_children(error, code)
        span = self.span
        if not span.is_recording():
            span.end()
            return
        attrs: dict[str, str | int | float] = {
            "http.response.status_code": code, "gpu_supervisor.request_id": call.rid,
            "gpu_supervisor.priority": priority, "gpu_supervisor.worker": call.worker_label,
            "gpu_supervisor.attempts": call.attempt, "gpu_supervisor.queue_ms": round(call.queued_s * 1000, 3)}
        model = call.model
        if model is None and call.body and len(call.body) <= MODEL_PARSE_MAX_BYTES:
            try:
                model = body_model(call.body)
            except Rejected:
                model = None
        if model is not None:
            attrs["gen_ai.request.model"] = model
        op = GEN_AI_OPERATIONS.get(call.path)
        if op is not None:
            attrs["gen_ai.operation.name"] = op
        if error is None and code >= 500:
            error = str(code)
        if error is not None:
            attrs["error.type"] = error
        span.set_attributes(attrs)
        if code >= 500:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def abandon(self, call: Call, error: str) -> None:
        """A job's delivery ended with no status to count (cancelled, or its answer too large)."""
        self.error = error
        self._close_children(error, None)
        self.span.set_attributes({"error.type": error, "gpu_supervisor.attempts": call.attempt})
        self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()

    def _close_children(self, error: str | None, code: int | None) -> None:
        for child in (self._wait, self._submit):
            if child is not None:
                child.set_attributes({"error.type": error or "abandoned"})
                child.end()
        self._wait = self._submit = None
        if self._attempt is not None:
            attrs: dict[str, str | int] = {"gpu_supervisor.outcome": error or "answered"}
            if error is None and code is not None:
                attrs["http.response.status_code"] = code
            else:
                attrs["error.type"] = error or "abandoned"
            self._attempt.set_attributes(attrs)
            self._attempt.end()
            self._attempt = None
