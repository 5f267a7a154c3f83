"""Traces from the real daemon, received by a real OTLP/HTTP receiver and decoded from protobuf: a client's
traceparent continued, the worker's traceparent naming its attempt, two attempts after a worker kill -9, a
job's spans, and a collector that is down or refusing (requests unharmed, failed exports counted)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys

import pytest

from tests.harness import SupervisorProcess, fast_config, kill_quiet, wait_until
from tests.otlp_receiver import OtlpReceiver, SpanRecord

pytestmark = pytest.mark.e2e

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # the SDK's batch delay (ms): spans arrive soon after


def traced(endpoint: str, **over) -> dict:
    return fast_config(tracing={"endpoint": endpoint}, logging={"format": "json", "level": "info", "access": True},
                       **over)


def worker_parent(echo: dict) -> tuple[str, str]:
    """(trace id, parent span id) of the traceparent the worker received."""
    tp = echo["headers"]["traceparent"]
    assert "," not in tp, f"the worker got more than one traceparent: {tp}"
    _, tid, sid, _ = tp.split("-")
    return tid, sid


def metric_total(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def one_span(rx: OtlpReceiver, name: str, what: str, **where) -> SpanRecord:
    def found():
        spans = [s for s in rx.named(name) if all(getattr(s, k) == v for k, v in where.items())]
        return spans[0] if spans else None
    return await wait_until(found, 20, what)


async def test_a_clients_traceparent_is_continued_and_the_worker_gets_its_attempts(supervisor_factory):
    async with OtlpReceiver() as rx:
        sp = await supervisor_factory(traced(rx.endpoint, queue={"concurrency": 1}), env=FAST_EXPORT)
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc"}
        async with sp.session.get("/echo", headers=headers) as r:
            assert r.status == 200
            echo = await r.json()
        req = await one_span(rx, "request", "the request span", trace_id=CLIENT_TRACE)
        assert req.parent_id == CLIENT_SPAN and req.kind == "server" and req.service == "gpu-supervisor"
        a = req.attributes
        assert a["http.request.method"] == "GET" and a["url.path"] == "/echo"
        assert a["http.response.status_code"] == 200 and a["gpu_supervisor.attempts"] == 1
        assert a["gpu_supervisor.worker"] == "default" and a["gpu_supervisor.replica"] == 0
        assert a["gpu_supervisor.priority"] == "normal" and "gpu_supervisor.queue_ms" in a
        assert "error.type" not in a
        await wait_until(lambda: rx.children(req, "attempt"), 20, "the attempt span")
        assert rx.children(req, "queue.wait") == []  # a slot was free at once: no wait to show
        (attempt,) = rx.children(req, "attempt")
        assert attempt.kind == "client" and attempt.attributes["gpu_supervisor.outcome"] == "answered"
        assert attempt.attributes["http.response.status_code"] == 200
        # the worker got the attempt's context (not the client's), and the client's tracestate untouched
        assert worker_parent(echo) == (CLIENT_TRACE, attempt.span_id)
        assert echo["headers"]["tracestate"] == "vendor=abc"
        access = await sp.wait_log("request", path="/echo")
        assert access["trace_id"] == CLIENT_TRACE

        # no traceparent: a trace of the daemon's own, with the GenAI model of an OpenAI-style body
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        async with sp.session.post("/v1/chat/completions", data=body,
                                   headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            echo = await r.json()
        chat = await one_span(rx, "request", "the chat request span", parent_id="")
        assert chat.trace_id != CLIENT_TRACE
        assert chat.attributes["gen_ai.request.model"] == "tiny"
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        await wait_until(lambda: rx.children(chat, "attempt"), 20, "the chat attempt span")
        assert worker_parent(echo) == (chat.trace_id, rx.children(chat, "attempt")[0].span_id)

        # one that waits for the only slot: its wait is a span of its own
        held = asyncio.create_task(sp.session.get("/echo?delay=1"))

        async def running() -> bool:
            return (await sp.status())["queue"]["pools"]["default"]["inflight"] == 1
        await wait_until(running, 10, "the first request holding the slot")
        async with sp.session.get("/echo", headers={"X-Request-ID": "waited"}) as r:
            assert r.status == 200
        (await held).release()
        (waited,) = await wait_until(lambda: rx.named("request", **{"gpu_supervisor.request_id": "waited"}), 20,
                                     "the waiting request's span")
        assert waited.attributes["gpu_supervisor.queue_ms"] > 0
        (wait,) = await wait_until(lambda: rx.children(waited, "queue.wait"), 20, "the queue.wait span")
        assert wait.attributes["gpu_supervisor.priority"] == "normal" and wait.end_ns > wait.start_ns

        # a request the daemon refuses itself carries its error type
        async with sp.session.get("/echo", headers={"X-Priority": "nope"}) as r:
            assert r.status == 400
        bad = await wait_until(lambda: rx.named("request", **{"http.response.status_code": 400}), 20,
                               "the refused request's span")
        assert bad[0].attributes["error.type"] == "bad_request"


async def test_a_worker_killed_mid_request_gives_two_attempts_under_one_request(supervisor_factory):
    async with OtlpReceiver() as rx:
        sp = await supervisor_factory(traced(rx.endpoint, retry={"max_attempts": 3}), env=FAST_EXPORT)
        pid = await sp.worker_pid()
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        task = asyncio.create_task(sp.session.get("/echo?delay=1.5", headers=headers))

        async def running() -> bool:
            return (await sp.status())["queue"]["pools"]["default"]["inflight"] == 1
        await wait_until(running, 10, "the request in flight on the worker")
        kill_quiet(pid, signal.SIGKILL)
        r = await task
        assert r.status == 200
        echo = await r.json()
        r.release()
        assert echo["pid"] != pid
        req = await one_span(rx, "request", "the request span", trace_id=CLIENT_TRACE)
        assert req.parent_id == CLIENT_SPAN and req.attributes["gpu_supervisor.attempts"] == 2
        await wait_until(lambda: len(rx.children(req, "attempt")) == 2, 20, "two attempt spans")
        first, second = sorted(rx.children(req, "attempt"), key=lambda s: s.start_ns)
        assert first.attributes["gpu_supervisor.outcome"] in ("worker_crashed", "reset")
        assert first.attributes["gpu_supervisor.attempt"] == 1 and first.status_code == 2  # STATUS_CODE_ERROR
        assert second.attributes["gpu_supervisor.outcome"] == "answered"
        assert second.attributes["gpu_supervisor.attempt"] == 2
        assert worker_parent(echo) == (CLIENT_TRACE, second.span_id)


async def test_a_jobs_spans_submit_in_the_request_and_run_linked_to_it(supervisor_factory):
    async with OtlpReceiver() as rx:
        sp = await supervisor_factory(traced(rx.endpoint), env=FAST_EXPORT)
        headers = {"Prefer": "respond-async", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        async with sp.session.post("/echo", data=b'{"model": "m"}', headers=headers) as r:
            assert r.status == 202
            job_id = (await r.json())["id"]

        async def result():
            async with sp.session.get(f"/jobs/{job_id}/result") as r:
                return await r.json() if r.status == 200 else None
        echo = await wait_until(result, 20, "the job's result")
        req = await one_span(rx, "request", "the submitting request's span", trace_id=CLIENT_TRACE)
        assert req.parent_id == CLIENT_SPAN and req.attributes["http.response.status_code"] == 202
        submit = await wait_until(lambda: rx.children(req, "job.submit"), 20, "the job.submit span")
        assert submit[0].attributes["gpu_supervisor.job_id"] == job_id
        run = await wait_until(lambda: rx.named("job.run", **{"gpu_supervisor.job_id": job_id}), 20, "job.run")
        run = run[0]
        # its own trace, linked to the submission
        assert run.parent_id == "" and run.trace_id != CLIENT_TRACE
        assert run.links == [(CLIENT_TRACE, submit[0].span_id)]
        assert run.attributes["http.response.status_code"] == 200
        await wait_until(lambda: rx.children(run, "attempt"), 20, "the job's attempt span")
        assert worker_parent(echo) == (run.trace_id, rx.children(run, "attempt")[0].span_id)


async def test_a_collector_down_or_refusing_never_fails_a_request_and_is_counted(supervisor_factory):
    async with OtlpReceiver() as rx:
        port = rx.port
    # the receiver is gone: nothing listens on its port
    sp = await supervisor_factory(traced(f"http://127.0.0.1:{port}/v1/traces"), env=FAST_EXPORT)
    for _ in range(20):
        async with sp.session.get("/echo") as r:
            assert r.status == 200
    await wait_until(lambda: _errors(sp), 30, "trace_export_errors_total to rise")
    # the SDK's complaints are the daemon's log events, not bare text in its JSON log
    sdk = await sp.wait_log("opentelemetry_sdk")
    assert sdk["logger"].startswith("opentelemetry.") and "export" in sdk["message"]
    assert not [ev for ev in sp.events("_raw") if "export" in ev["line"]]

    # a collector that answers 503, then comes back: counted, then the spans arrive
    async with OtlpReceiver() as rx:
        rx.status = 503
        sp.config["tracing"]["endpoint"] = rx.endpoint
        sp.write_config(sp.config)
        before = metric_total(await sp.metrics(), "gpu_supervisor_trace_export_errors_total")
        sp.signal(signal.SIGHUP)
        await sp.wait_log("tracing", endpoint=rx.endpoint)
        for _ in range(5):
            async with sp.session.get("/echo") as r:
                assert r.status == 200
        await wait_until(lambda: rx.refused > 0, 30, "an export refused")
        await wait_until(lambda: _errors(sp, above=before), 30, "the refused export counted")
        rx.status = 200
        async with sp.session.get("/echo", headers={"X-Request-ID": "after-503"}) as r:
            assert r.status == 200
        await wait_until(lambda: rx.named("request", **{"gpu_supervisor.request_id": "after-503"}), 30,
                         "spans once the collector is back")
        assert rx.headers_seen[-1]["Content-Type"] == "application/x-protobuf"

    # tracing off again by a reload: no tracer, requests as before
    del sp.config["tracing"]
    sp.write_config(sp.config)
    sp.signal(signal.SIGHUP)
    await sp.wait_log("tracing", endpoint=None)
    async with sp.session.get("/echo", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}) as r:
        assert r.status == 200
        echo = await r.json()
    assert worker_parent(echo) == (CLIENT_TRACE, CLIENT_SPAN)  # passed through untouched


async def _errors(sp: SupervisorProcess, above: float = 0.0) -> bool:
    return metric_total(await sp.metrics(), "gpu_supervisor_trace_export_errors_total") > above


def test_a_daemon_with_tracing_off_never_imports_opentelemetry():
    code = ("import sys, supervisor.daemon, supervisor.app, supervisor.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
