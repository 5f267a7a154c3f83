"""Tracing without a daemon: the `tracing` settings, the traceparent header, the sampler, the counted
exporter, a tracer's spans for a request, and the tracer's life (built, replaced, shut down within a bound)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from opentelemetry import trace as otel
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from supervisor import config as cfg
from supervisor.http.call import Call
from supervisor.jobs.model import JobRequest
from supervisor.trace_spans import CountingExporter, Tracer, remote_context, sampler
from supervisor.tracing import Tracing, format_traceparent, parse_traceparent, shut_down
from tests.harness import wait_until
from tests.otlp_receiver import OtlpReceiver

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


# -- settings --------------------------------------------------------------------------------------------
def test_tracing_is_off_by_default_and_its_keys_are_checked():
    s = cfg.parse("{}")
    assert s.tracing.endpoint is None and s.tracing.sample_ratio == 1.0
    assert s.tracing.service_name == "gpu-supervisor" and s.tracing.headers == {}
    t = cfg.parse("tracing:\n  endpoint: http://jaeger:4318/v1/traces\n  sample_ratio: 0\n"
                  "  headers: {Authorization: Bearer x}\n").tracing
    assert t.endpoint == "http://jaeger:4318/v1/traces" and t.sample_ratio == 0 and t.headers == {
        "Authorization": "Bearer x"}
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse("tracing:\n  endpoint: jaeger:4318\n  sample_ratio: 1.5\n  headers: {'bad name': x}\n  sample: 1\n")
    text = "\n".join(e.value.problems)
    assert "tracing.endpoint (line 2): must be an http:// or https:// URL" in text
    assert "tracing.sample_ratio (line 3)" in text
    assert "tracing.headers (line 4): 'bad name' is not an HTTP header name" in text
    assert "tracing.sample (line 5)" in text


# -- the traceparent header ------------------------------------------------------------------------------
@pytest.mark.parametrize("value, want", [
    (f"00-{TID}-{SID}-01", (int(TID, 16), int(SID, 16), 1)),
    (f" 00-{TID}-{SID}-00 ", (int(TID, 16), int(SID, 16), 0)),
    (f"01-{TID}-{SID}-01-later-fields", (int(TID, 16), int(SID, 16), 1)),  # a later version: its prefix
    (f"00-{TID}-{SID}-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{TID}-{SID}-01", None),
    (f"00-{'0' * 32}-{SID}-01", None),
    (f"00-{TID}-{'0' * 16}-01", None),
    (f"00-{TID.upper()}-{SID}-01", None),
    (f"00-{TID[:-1]}-{SID}-01", None),
    ("", None),
    ("garbage", None),
])
def test_traceparent_is_read_as_w3c_says(value, want):
    assert parse_traceparent(value) == want


def test_traceparent_written_and_read_back():
    tp = format_traceparent(int(TID, 16), int(SID, 16), 1)
    assert tp == f"00-{TID}-{SID}-01".encode()
    assert parse_traceparent(tp.decode()) == (int(TID, 16), int(SID, 16), 1)


# -- sampling --------------------------------------------------------------------------------------------
def _sampled(ratio: float, traceparent: str | None) -> bool:
    provider = TracerProvider(sampler=sampler(ratio), shutdown_on_exit=False)
    span = provider.get_tracer("t").start_span("request", remote_context(traceparent), SpanKind.SERVER)
    span.end()
    return span.get_span_context().trace_flags.sampled


def test_the_sampler_keeps_a_clients_decision_and_samples_its_own_traces_at_the_ratio():
    assert _sampled(1.0, None) and not _sampled(0.0, None)
    assert _sampled(0.0, f"00-{TID}-{SID}-01")  # the client sampled it: recorded whatever the ratio
    assert not _sampled(1.0, f"00-{TID}-{SID}-00")  # the client did not: not recorded either
    assert _sampled(0.0, "not a traceparent") is False  # an invalid one starts a trace of our own


# -- the counted exporter --------------------------------------------------------------------------------
class _Fixed(SpanExporter):
    def __init__(self, result: SpanExportResult | Exception):
        self.result = result

    def export(self, spans):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_failed_exports_are_counted_and_good_ones_are_not():
    errors = []
    ok = CountingExporter(_Fixed(SpanExportResult.SUCCESS), lambda: errors.append(1))
    assert ok.export([]) is SpanExportResult.SUCCESS and errors == []
    bad = CountingExporter(_Fixed(SpanExportResult.FAILURE), lambda: errors.append(1))
    assert bad.export([]) is SpanExportResult.FAILURE and errors == [1]
    boom = CountingExporter(_Fixed(ConnectionError("down")), lambda: errors.append(1))
    with pytest.raises(ConnectionError):
        boom.export([])
    assert errors == [1, 1]


async def test_an_export_to_a_collector_that_is_not_there_fails_and_is_counted():
    async with OtlpReceiver() as rx:
        endpoint = rx.endpoint  # closed at once: nothing listens there any more
    errors = []
    exporter = CountingExporter(OTLPSpanExporter(endpoint=endpoint, timeout=0.5), lambda: errors.append(1))
    provider = TracerProvider(shutdown_on_exit=False)
    span = provider.get_tracer("t").start_span("x")
    span.end()
    assert await asyncio.to_thread(exporter.export, [span]) is SpanExportResult.FAILURE
    assert errors == [1]


# -- a request's spans, in memory -------------------------------------------------------------------------
class _Headers:
    def __init__(self, items: dict[str, str]):
        self._d = {k.lower(): v for k, v in items.items()}

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._d.get(name.lower(), default)

    def getall(self, name: str, default=None) -> list[str]:
        v = self._d.get(name.lower())
        return [v] if v is not None else (default if default is not None else [])


class _Request:
    def __init__(self, headers: dict[str, str]):
        self.headers = _Headers(headers)


class _Replica:
    worker = "default"
    index = 1


def _tracer(ratio: float = 1.0) -> tuple[Tracer, InMemorySpanExporter, list]:
    mem = InMemorySpanExporter()
    errors: list = []
    s = cfg.Tracing(endpoint="http://127.0.0.1:1/v1/traces", sample_ratio=ratio, service_name="svc")
    return Tracer(s, lambda: errors.append(1), exporter=mem), mem, errors


def test_a_requests_spans_nest_and_the_worker_gets_the_attempts_context():
    tracer, mem, _ = _tracer()
    call = Call("rid-1", time.monotonic(), "POST", "/v1/chat/completions", 2)
    call.body = b'{"model": "tiny", "messages": []}'
    tr = tracer.request(_Request({"traceparent": f"00-{TID}-{SID}-01"}), call)
    call.attempt = 1
    tr.wait_begins(call, "normal")
    tr.wait_ends()
    tr.attempt_begins(call, _Replica())
    first = tr.traceparent
    tr.attempt_failed("worker_crashed")
    call.attempt = 2
    tr.attempt_begins(call, _Replica())
    assert tr.traceparent != first
    tr.end(call, 200, "normal")
    tracer.shutdown()
    spans = {(s.name, s.attributes.get("gpu_supervisor.attempt")): s for s in mem.get_finished_spans()}
    req = spans[("request", None)]
    assert f"{req.context.trace_id:032x}" == TID and f"{req.parent.span_id:016x}" == SID
    assert req.kind is SpanKind.SERVER and req.resource.attributes["service.name"] == "svc"
    assert req.attributes["gen_ai.request.model"] == "tiny" and req.attributes["gen_ai.operation.name"] == "chat"
    assert req.attributes["gpu_supervisor.attempts"] == 2 and req.attributes["gpu_supervisor.replica"] == 1
    a1, a2 = spans[("attempt", 1)], spans[("attempt", 2)]
    assert a1.parent.span_id == a2.parent.span_id == req.context.span_id
    assert a1.attributes["gpu_supervisor.outcome"] == "worker_crashed" and a1.kind is SpanKind.CLIENT
    assert a2.attributes["gpu_supervisor.outcome"] == "answered"
    assert tr.traceparent == format_traceparent(req.context.trace_id, a2.context.span_id, 1)
    assert spans[("queue.wait", 1)].parent.span_id == req.context.span_id
    assert tr.log_fields() == {"trace_id": TID}


def test_an_error_ends_whatever_is_still_open_with_its_type():
    tracer, mem, _ = _tracer()
    call = Call("rid-2", time.monotonic(), "GET", "/x", 2)
    tr = tracer.request(_Request({}), call)
    call.attempt = 1
    tr.wait_begins(call, "normal")  # the wait times out: it never ends by itself
    tr.error = "queue_timeout"
    tr.end(call, 503, "normal")
    tracer.shutdown()
    by_name = {s.name: s for s in mem.get_finished_spans()}
    assert by_name["request"].attributes["error.type"] == "queue_timeout"
    assert by_name["request"].parent is None
    assert not by_name["request"].status.is_ok
    assert by_name["queue.wait"].attributes["error.type"] == "queue_timeout"


def test_an_unsampled_request_still_sends_the_worker_a_traceparent_and_logs_no_trace_id():
    tracer, mem, _ = _tracer(ratio=0.0)
    call = Call("rid-3", time.monotonic(), "GET", "/x", 2)
    tr = tracer.request(_Request({}), call)
    call.attempt = 1
    tr.attempt_begins(call, _Replica())
    assert tr.traceparent is not None
    assert parse_traceparent(tr.traceparent.decode())[2] & 0x01 == 0  # not sampled: the worker is told so
    tr.end(call, 200, "normal")
    tracer.shutdown()
    assert mem.get_finished_spans() == () and tr.log_fields() == {}


def test_a_job_run_is_a_trace_of_its_own_linked_to_its_submission():
    tracer, mem, _ = _tracer()
    call = Call("rid-4", time.monotonic(), "POST", "/echo", 2)
    tr = tracer.request(_Request({}), call)
    stored = tr.submitting([("Traceparent", f"00-{TID}-{SID}-01"), ("X-A", "b")])
    tr.submitted("job-1")
    tr.end(call, 202, "normal")
    assert [k for k, _ in stored] == ["X-A", "traceparent"]
    req = JobRequest(id="job-1", method="POST", target="/echo?q=1", headers=tuple(stored), body=b"")
    run = tracer.job_run(req, 1)
    run.end(Call("job-job-1-1", time.monotonic(), "POST", "/echo", 2), 200, "normal")
    tracer.shutdown()
    by_name = {s.name: s for s in mem.get_finished_spans()}
    submit, job = by_name["job.submit"], by_name["job.run"]
    assert submit.parent.span_id == by_name["request"].context.span_id
    assert submit.attributes["gpu_supervisor.job_id"] == "job-1"
    assert job.parent is None and job.context.trace_id != submit.context.trace_id
    assert [(ln.context.trace_id, ln.context.span_id) for ln in job.links] == [
        (submit.context.trace_id, submit.context.span_id)]
    assert job.attributes["url.path"] == "/echo" and job.attributes["gpu_supervisor.job_attempt"] == 1


def test_a_job_delivery_that_ends_without_a_status_ends_its_spans_with_the_reason():
    tracer, mem, _ = _tracer()
    req = JobRequest(id="job-2", method="POST", target="/echo", headers=(), body=b"")
    run = tracer.job_run(req, 2)
    call = Call("job-job-2-2", time.monotonic(), "POST", "/echo", 2)
    call.attempt = 1
    run.attempt_begins(call, _Replica())
    run.abandon(call, "result_too_large")
    tracer.shutdown()
    by_name = {s.name: s for s in mem.get_finished_spans()}
    assert by_name["job.run"].attributes["error.type"] == "result_too_large"
    assert not by_name["job.run"].status.is_ok and by_name["job.run"].links == ()
    assert by_name["attempt"].attributes["gpu_supervisor.outcome"] == "result_too_large"


# -- the tracer's life -------------------------------------------------------------------------------------
async def test_tracing_starts_off_is_replaced_on_a_change_and_stops():
    seen: list = []
    tracing = Tracing(seen.append, lambda: None)
    off = cfg.Tracing()
    await tracing.start(off)
    assert tracing.tracer is None and seen == [None]
    async with OtlpReceiver() as rx:
        on = cfg.Tracing(endpoint=rx.endpoint)
        tracing.apply(on)
        await wait_until(lambda: tracing.tracer is not None, 10, "a tracer")
        first = tracing.tracer
        tracing.apply(on)  # unchanged: kept
        assert tracing._swap is not None
        await tracing._swap
        assert tracing.tracer is first
        tracing.apply(cfg.Tracing(endpoint=rx.endpoint, service_name="other"))
        await wait_until(lambda: tracing.tracer is not first and tracing.tracer is not None, 10, "a new tracer")
        span = tracing.tracer._tracer.start_span("x")
        span.end()
        await tracing.aclose()  # flushes what it holds
        assert tracing.tracer is None and seen[-1] is None
        assert [s.service for s in rx.named("x")] == ["other"]


async def test_a_tracer_whose_shutdown_hangs_is_dropped_after_the_bound():
    release = threading.Event()

    class Stuck:
        def shutdown(self) -> None:
            release.wait(10)

    assert await shut_down(Stuck(), bound_s=0.2) is False  # type: ignore[arg-type]
    release.set()


def test_the_span_api_is_not_global():
    # the daemon's tracer is its own: the process-wide OpenTelemetry provider is left as it was
    tracer, _, _ = _tracer()
    tracer.shutdown()
    assert not isinstance(otel.get_tracer_provider(), TracerProvider)
