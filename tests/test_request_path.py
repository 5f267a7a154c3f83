"""The request path's pure parts with plain values (no server, no clock, no sleeping): a call's plan, the
same for an HTTP request and for a job; the request head a worker gets; the answer's headers a client gets;
one exchange's bookkeeping; a queued call's wait (on a loop, but no clock: its limit is fired by hand)."""

from __future__ import annotations

import asyncio
import json

import pytest

from supervisor import config as cfg
from supervisor.budgets.metering import estimate
from supervisor.errors import Rejected
from supervisor.http.call import NO_WORKER, Call, CallPlanner, body_model
from supervisor.http.exchange import Exchange, Wire
from supervisor.http.framing import head, is_oom, response_headers, sized
from supervisor.jobs.model import JobRequest

POLICY = """
workers:
  a: {command: [python3, w.py], models: [m1, m2]}
  b: {command: [python3, w.py], start: on_demand}
routes:
  - {path: /v1/embed, priority: high, timeout_s: 30, pool: cpu}
  - {path: /v1/chat, model: big, worker: b, retry: true, gpu_memory_mb: 500}
queue:
  pools: {cpu: {concurrency: 2}}
  levels: {low: {timeout_s: 10}}
"""
WALL = 1_000_000.0  # a job's wall clock "now": plain values, no clock


class FakeGroup:
    """What planning reads of a WorkerGroup: its name, spec and models."""

    def __init__(self, name: str, spec, models=None, known: bool = True):
        self.name = name
        self.spec = spec
        self.models = tuple(spec.models if models is None else models)
        self.models_known = known


class FakeFleet:
    def __init__(self, *groups: FakeGroup):
        self.groups = {g.name: g for g in groups}

    def group_for_model(self, model: str):
        return next((g for g in self.groups.values() if model in g.models), None)

    def served_models(self) -> list[str]:
        return [m for g in self.groups.values() for m in g.models]


def planner(policy: str = POLICY, **known) -> CallPlanner:
    s = cfg.parse(policy)
    fleet = FakeFleet(*(FakeGroup(n, spec, known=known.get(n, True)) for n, spec in s.workers.items()))
    return CallPlanner(s, fleet)


def http_call(p: CallPlanner, method: str, path: str, priority: str | None = None, timeout: str | None = None,
              model: str | None = None) -> Call:
    """An HTTP request's plan, the steps admission takes (the model as read from the body)."""
    call = Call("rid", 500.0, method, path, p.header_level(priority))
    call.model = model
    call.route = p.route(method, path, model)
    p.plan(call, timeout=timeout)
    return call


def job(method: str, target: str, model: str | None = None, **kw) -> JobRequest:
    body = json.dumps({"model": model}).encode() if model is not None else b""
    return JobRequest(id="j1", method=method, target=target, headers=(), body=body, **kw)


def facts(call: Call) -> dict:
    return {"level": call.level, "route": call.route, "group": call.group.name, "worker": call.worker_label,
            "pool": call.pool, "gpu_mb": call.gpu_mb, "queue_limit": call.queue_limit,
            "deadline_in": None if call.deadline is None else round(call.deadline - call.t0, 9),
            "retry_ok": call.retry_ok, "max_attempts": call.max_attempts}


def wait_limit(call: Call) -> float:
    """How long the call may wait for a slot (as the dispatcher reads it, at t0)."""
    return call.queue_limit if call.deadline is None else min(call.queue_limit, call.deadline - call.t0)


# -- the plan ------------------------------------------------------------------------------------------
def test_level_from_the_header_by_name_or_index_else_the_route_else_the_default():
    p = planner()
    assert http_call(p, "POST", "/v1/x", priority="low").level == 3
    assert http_call(p, "POST", "/v1/x", priority=" 0 ").level == 0
    assert http_call(p, "POST", "/v1/embed", priority="low").level == 3  # the header wins over the route
    assert http_call(p, "POST", "/v1/embed").level == 1  # the route's
    assert http_call(p, "POST", "/v1/x").level == 2  # the default (normal)
    assert p.header_level(None) == -1  # not asked for: decided once the route is known


def test_a_priority_that_is_not_one_is_refused_with_the_levels_named():
    p = planner()
    for raw in ("urgent", "4", "-1"):
        with pytest.raises(Rejected) as ei:
            p.header_level(raw)
        assert ei.value.etype == "bad_request"
        assert ei.value.message == (f"X-Priority: {raw!r} is not a priority; use one of critical, high, normal, "
                                    "low or an index 0..3 (0 is highest)")


def test_a_jobs_level_is_its_stored_name_or_the_default_never_the_routes():
    p = planner()
    assert p.job_call(job("POST", "/v1/embed", priority="low"), "r", WALL).level == 3
    assert p.job_call(job("POST", "/v1/embed"), "r", WALL).level == 2
    assert p.job_call(job("POST", "/v1/embed", priority="gone"), "r", WALL).level == 2


def test_deadline_from_the_header_the_route_or_the_jobs_deadline():
    p = planner()
    assert facts(http_call(p, "POST", "/v1/embed"))["deadline_in"] == 30  # the route's
    c = http_call(p, "POST", "/v1/embed", timeout="2.5")  # the header shortens it, the queue wait too
    assert (c.deadline - c.t0, c.queue_limit) == (2.5, 2.5)
    c = http_call(p, "POST", "/v1/embed", timeout="100")  # ... and never lengthens it
    assert (c.deadline - c.t0, c.queue_limit) == (30, 60)
    c = http_call(p, "POST", "/v1/x", priority="low")
    assert (c.deadline, c.queue_limit) == (None, 10)  # no deadline; the level's queue wait limit
    c = p.job_call(job("POST", "/v1/embed", deadline_at=WALL + 45), "r", WALL)
    assert c.deadline - c.t0 == pytest.approx(45) and c.queue_limit == 45  # fixed at submission: it replaces
    c = p.job_call(job("POST", "/v1/embed"), "r", WALL)
    assert c.deadline - c.t0 == 30 and c.queue_limit == 60


def test_a_timeout_that_is_not_a_positive_number_is_refused():
    p = planner()
    for raw in ("soon", "0", "-1", "inf", "nan"):
        with pytest.raises(Rejected) as ei:
            http_call(p, "GET", "/v1/x", timeout=raw)
        assert ei.value.etype == "bad_request"
        assert ei.value.message == (f"X-Request-Timeout: {raw!r} is not a number of seconds; use a positive number "
                                    "such as 2.5 (it can only shorten the policy's deadline)")


def test_a_job_whose_deadline_passed_is_refused_once_placed():
    p = planner()
    with pytest.raises(Rejected) as ei:
        p.job_call(job("POST", "/v1/x", deadline_at=WALL), "r", WALL)
    assert (ei.value.etype, ei.value.message) == (
        "queue_timeout", "the job's deadline (X-Request-Timeout at submission) passed")


def test_retry_ok_from_the_route_else_the_method_and_a_jobs_own_answer():
    p = planner()
    assert facts(http_call(p, "GET", "/v1/x"))["retry_ok"] is True
    assert facts(http_call(p, "GET", "/v1/x"))["max_attempts"] == 2
    assert (http_call(p, "POST", "/v1/x").retry_ok, http_call(p, "POST", "/v1/x").max_attempts) == (False, 1)
    assert http_call(p, "POST", "/v1/chat", model="big").retry_ok is True  # the route says so
    assert p.job_call(job("GET", "/v1/x"), "r", WALL).retry_ok is False  # stored at submission
    assert p.job_call(job("POST", "/v1/x", retry_safe=True), "r", WALL).max_attempts == 2


def test_placement_by_route_worker_by_model_and_by_a_jobs_pinned_worker():
    p = planner()
    c = http_call(p, "POST", "/v1/chat", model="big")  # the route names worker b, its GPU need and pool
    assert (c.group.name, c.worker_label, c.pool, c.gpu_mb) == ("b", "b", "default", 500)
    assert http_call(p, "POST", "/v1/x", model="m2").group.name == "a"  # the worker that serves the model
    assert http_call(p, "POST", "/v1/x").group.name == "a"  # no model: the first worker
    assert http_call(p, "POST", "/v1/embed").pool == "cpu"
    assert p.job_call(job("POST", "/v1/x", model="m2", worker="b"), "r", WALL).group.name == "b"
    # a route that names a worker wins over the job's
    assert p.job_call(job("POST", "/v1/chat", model="big", worker="a"), "r", WALL).group.name == "b"


def test_a_model_nobody_serves_is_model_not_found_unless_a_worker_does_not_know_its_models_yet():
    p = planner()
    with pytest.raises(Rejected) as ei:
        http_call(p, "POST", "/v1/x", model="nope")
    assert (ei.value.etype, ei.value.message) == (
        "model_not_found", "model 'nope' is not served here; served models: m1, m2")
    with pytest.raises(Rejected) as ei:
        p.job_call(job("POST", "/v1/x", model="nope"), "r", WALL)
    assert ei.value.etype == "model_not_found"
    # eager worker a still starting (its models not known): it may serve it
    assert http_call(planner(a=False), "POST", "/v1/x", model="nope").group.name == "a"


def test_a_request_and_the_job_it_is_submitted_as_plan_alike():
    """What submission stores (priority name, deadline, retry safety, worker) plans the same call."""
    p = planner()
    cases = [("POST", "/v1/embed", None, None, None), ("POST", "/v1/embed", "low", "2.5", None),
             ("GET", "/v1/x", "critical", None, "m1"), ("POST", "/v1/chat", None, "7", "big"),
             ("PUT", "/v1/x", "1", None, None)]
    for method, path, prio, timeout, model in cases:
        h = http_call(p, method, path, priority=prio, timeout=timeout, model=model)
        left = None if h.deadline is None else h.deadline - h.t0
        j = p.job_call(job(method, path + "?q=1", model=model, priority=p.level_names[h.level],
                           deadline_at=None if left is None else WALL + left, retry_safe=h.retry_ok,
                           worker=h.worker_label), "r", WALL)
        assert facts(j) | {"queue_limit": None} == facts(h) | {"queue_limit": None}, (method, path, prio, model)
        # a job's deadline, fixed at submission, also bounds its queue limit: the wait is the same
        assert wait_limit(j) == wait_limit(h)
        assert (j.path, j.model) == (path, model)


def test_body_model():
    assert body_model(b'{"model": "m1", "input": "x"}') == "m1"
    assert body_model(b'{"model": null}') is None
    assert body_model(b"[1, 2]") is None and body_model(b"{not json") is None and body_model(b"") is None
    with pytest.raises(Rejected) as ei:
        body_model(b'{"model": 3}')
    assert ei.value.message == "model: must be a string naming a served model, not int"


def test_a_call_s_body_is_parsed_once_for_all_its_readers():
    call = Call("r", 0.0, "POST", "/v1/chat/completions", 0)
    assert call.document() is None  # no body held yet: nothing kept as read
    call.body = b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}], "user": "u"}'
    doc = call.document()
    assert doc == json.loads(call.body) and call.document() is doc  # the same object: parsed once
    assert estimate(call.body, None, call.path, doc) == estimate(call.body, None, call.path)
    call.forget_document()  # its readers are done: not held any longer (parsed again if asked)
    assert call.document() is not doc and call.document() == doc
    for body in (b"", b"{not json", b"[1]", '{"model": "\u00e9"}'.encode("utf-16")):  # UTF-8 only (RFC 8259)
        c = Call("r", 0.0, "POST", "/", 0)
        c.body = body
        assert (c.document() is None) == (body != b"[1]")
        assert estimate(body, len(body), "/", c.document()) == estimate(body, len(body), "/")


def test_models_changed_says_whether_routing_reads_the_body():
    assert planner().by_model  # worker a declares models
    s = cfg.parse("worker: {command: [python3, w.py]}")
    fleet = FakeFleet(FakeGroup("default", s.worker, models=()))
    p = CallPlanner(s, fleet)
    assert not p.by_model
    fleet.groups["x"] = FakeGroup("x", s.worker, models=("m",))  # a second worker discovered a model
    p.models_changed()
    assert p.by_model


# -- the request head --------------------------------------------------------------------------------
def framed(method: str, raw, body: bytes | None, peer: bytes = b"10.0.0.1") -> bytes:
    call = Call("req-1", 0.0, method, "/v1/x", 2)
    call.body = body
    return head(call, "/v1/x?a=1", raw, peer, b"http")


def test_the_head_keeps_end_to_end_headers_and_adds_forwarding_ones():
    raw = [(b"Host", b"api.example"), (b"Content-Type", b"application/json"), (b"X-Forwarded-For", b"1.2.3.4"),
           (b"Content-Length", b"2"), (b"X-Request-ID", b"client-id"), (b"Accept", b"*/*")]
    assert framed("POST", raw, b"{}") == (
        b"POST /v1/x?a=1 HTTP/1.1\r\nHost: api.example\r\nContent-Type: application/json\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Request-ID: req-1\r\n"
        b"X-Forwarded-Host: api.example\r\nContent-Length: 2\r\n\r\n")


def test_the_head_strips_hop_by_hop_headers_and_those_connection_names_but_never_host():
    raw = [(b"Host", b"h"), (b"Connection", b"keep-alive, X-Secret, Host"), (b"Keep-Alive", b"timeout=5"),
           (b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"Proxy-Connection", b"x"), (b"Expect", b"100-continue"),
           (b"Prefer", b"respond-async"), (b"Transfer-Encoding", b"chunked"), (b"X-Secret", b"s"),
           (b"x-secret", b"s2"), (b"Trailer", b"x"), (b"Proxy-Authorization", b"p"), (b"X-Kept", b"k")]
    out = framed("GET", raw, b"")
    names = [line.split(b":")[0].lower() for line in out.split(b"\r\n")[1:] if line]
    assert names == [b"host", b"x-kept", b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id",
                     b"x-forwarded-host"]
    assert b"X-Forwarded-For: 10.0.0.1\r\n" in out  # none came: the peer alone
    assert out.endswith(b"X-Forwarded-Host: h\r\n\r\n")  # a GET without a body: no framing header


def test_the_head_frames_the_body_chunked_when_streamed_else_by_its_length():
    assert framed("POST", [], None).endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    assert framed("POST", [], b"abc").endswith(b"Content-Length: 3\r\n\r\n")
    assert framed("POST", [], b"").endswith(b"Content-Length: 0\r\n\r\n")  # a body method says so
    assert framed("DELETE", [], b"").endswith(b"X-Request-ID: req-1\r\n\r\n")
    assert framed("DELETE", [], b"x").endswith(b"Content-Length: 1\r\n\r\n")


# -- the answer's headers ----------------------------------------------------------------------------
def test_response_headers_drop_hop_by_hop_and_add_the_supervisors_own():
    call = Call("req-1", 0.0, "GET", "/", 2)
    call.queued_s = 0.0125
    call.attempt = 2
    raw = [(b"Content-Type", b"text/plain"), (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
           (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5"), (b"Date", b"x"), (b"Set-Cookie", b"a=1"),
           (b"Set-Cookie", b"b=2"), (b"X-Request-ID", b"worker-id"), (b"Trailer", b"t"), (b"Upgrade", b"u")]
    h, lines = response_headers(raw, call, None)
    assert response_headers(raw, call, None, [k.lower() for k, _ in raw]) == (h, lines)
    assert h == [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]
    assert lines == b"X-Request-ID: req-1\r\nX-Supervisor-Queue-Ms: 12.500\r\nX-Supervisor-Attempts: 2\r\n"
    h, lines = response_headers([(b"X-Degraded", b"no")], call, "fallback: cpu", replica=b"w/0")
    assert h == [] and lines.endswith(b"X-Supervisor-Replica: w/0\r\nX-Degraded: fallback: cpu\r\n")
    kept = [(b"Content-Type", b"text/plain")]
    assert response_headers(kept, call, None)[0] is kept  # nothing dropped: not copied


def test_response_headers_drop_the_ones_the_workers_connection_header_names():
    # (found by tests/test_upstream_fuzz.py: `Connection: Cache-Control` and the worker's Cache-Control reached
    # the client; RFC 9110 7.6.1: a proxy removes the fields Connection names)
    call = Call("req-1", 0.0, "GET", "/", 2)
    raw = [(b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"connection", b" cache-control "),
           (b"Cache-Control", b"no-store"), (b"Content-Type", b"text/plain")]
    assert response_headers(raw, call, None)[0] == [(b"Content-Type", b"text/plain")]


def test_sized_and_oom_answers():
    assert sized(b"10", 10) and not sized(b"11", 10)
    assert not sized(None, 10) and not sized(b"x", 10) and not sized(b"", 10)
    assert is_oom([(b"X-Worker-Error", b" OOM ")]) and not is_oom([(b"X-Worker-Error", b"other")])
    raw = [(b"Content-Type", b"text/plain"), (b"x-worker-error", b"oom")]
    assert is_oom(raw, [b"content-type", b"x-worker-error"]) and not is_oom(raw[:1], [b"content-type"])


# -- one exchange's bookkeeping ----------------------------------------------------------------------
class FakeBreaker:
    def __init__(self):
        self.told: list = []

    def record(self, ok, *_):
        self.told.append(("record", ok))

    def record_server_error(self, *_):
        self.told.append(("server_error",))

    def release_probe(self):
        self.told.append(("release_probe",))


class FakeQueue:
    def __init__(self):
        self.released: list = []

    def release(self, ticket, service_s):
        self.released.append(ticket)


class FakeReplica:
    def __init__(self):
        self.breaker = FakeBreaker()
        self.probe_failures = 0
        self.degraded = None
        self.inflight: dict = {}
        self.ended: list = []

    def begin(self, ex):
        self.inflight[id(ex)] = ex
        return "inc-1"

    def end(self, inc, ex, oom):
        self.ended.append((inc, self.inflight.pop(id(ex)) is ex, oom))


def exchange_on_a_fake_replica():
    """An Exchange of a call on FakeReplica, its queue a FakeQueue: (exchange, replica, call, freed slots)."""
    freed: list = []
    call = Call("r", 0.0, "GET", "/", 2)
    call.group = type("G", (), {"queue": FakeQueue()})()
    replica = FakeReplica()
    return Exchange(Wire(cfg.parse(""), lambda: freed.append(1)), call, replica, "ticket-1"), replica, call, freed


def test_an_exchange_is_the_replicas_in_flight_record_and_tells_each_thing_once():
    ex, replica, call, freed = exchange_on_a_fake_replica()
    assert replica.inflight == {id(ex): ex} and ex.inc == "inc-1"
    assert ex.last_activity(ex.started + 5) == ex.started  # hang detection reads it (no connection yet)
    ex.status, ex.oom = 503, True
    ex.record()
    ex.fail()
    ex.finish()
    ex.finish()
    assert replica.breaker.told == [("record", False)]
    assert call.group.queue.released == ["ticket-1"] and freed == [1]
    assert replica.ended == [("inc-1", True, True)]
    assert call.worker_label == NO_WORKER  # (placement is the planner's, not the exchange's)


class WaitingGroup:
    """What waiting for a slot reads of a WorkerGroup: its queue, and whether it serves."""

    def __init__(self, queue):
        self.name = "w"
        self.queue = queue
        self.paused = False

    def serving(self) -> bool:
        return True


async def until_waiting(fut) -> None:
    """Let the waiting task run until it waits on its ticket's future (a few turns of the loop at most)."""
    for _ in range(100):
        if fut._callbacks:
            return
        await asyncio.sleep(0)
    raise AssertionError("the call never waited on its ticket")


async def queued_behind_one():
    """A queue of one slot, held; a call queued behind it, waiting in Dispatcher.wait_slot (its limit an
    hour: only fired by hand). (queue, the holder's ticket, the call's ticket, the waiting task)"""
    from supervisor.http import dispatch
    from supervisor.metrics import Metrics
    from supervisor.request_queue import GRANTED, WAITING, RequestQueue

    s = cfg.parse("queue: {concurrency: 1}")
    q = RequestQueue(s.queue)
    q.configure(s.queue)
    q.open = True
    p = planner("")
    holder = q.acquire(p.default_level, "default", now=0.0)
    call = Call("r", 0.0, "GET", "/", p.default_level)
    call.group, call.queue_limit = WaitingGroup(q), 3600.0
    ticket = q.acquire(call.level, "default", now=0.0)
    assert holder.state == GRANTED and ticket.state == WAITING
    d = dispatch.Dispatcher(None, Metrics(), None, None, p, None)
    waiting = asyncio.ensure_future(d.wait_slot(call, ticket))
    await until_waiting(ticket.future)
    return q, holder, ticket, waiting


async def test_a_call_whose_wait_limit_passes_as_a_slot_frees_answers_queue_timeout_and_gives_the_slot_back():
    from supervisor.http import dispatch
    from supervisor.request_queue import GRANTED

    q, holder, ticket, waiting = await queued_behind_one()
    dispatch._expire(ticket.future)  # its wait limit passes, and before it runs again
    q.release(holder, None)  # the slot frees and goes to it (its future, already done, is left alone)
    assert ticket.state == GRANTED
    with pytest.raises(Rejected) as r:
        await waiting
    assert r.value.etype == "queue_timeout"
    assert q.inflight() == 0 and q.total == 0  # the slot it was granted too late is back


async def test_a_queued_call_granted_in_time_holds_its_slot():
    from supervisor.http import dispatch
    from supervisor.request_queue import GRANTED

    q, holder, ticket, waiting = await queued_behind_one()
    q.release(holder, None)
    assert await waiting is ticket and ticket.state == GRANTED
    assert q.inflight() == 1
    dispatch._expire(ticket.future)  # a limit that fires after the grant changes nothing
    assert ticket.future.exception() is None


async def test_an_attempt_the_supervisor_had_no_descriptor_for_is_overloaded_and_not_the_workers_failure():
    from supervisor.upstream import UpstreamError

    ex, replica, call, freed = exchange_on_a_fake_replica()

    async def no_descriptor():
        raise UpstreamError("local", "the supervisor has no resources to connect to its worker now "
                            "(Too many open files)")

    with pytest.raises(Rejected) as r:
        await ex._guarded(no_descriptor(), "late")
    assert r.value.etype == "overloaded" and r.value.retry_after_s and "Too many open files" in r.value.message
    assert replica.breaker.told == [("release_probe",)]  # no failure recorded against the worker
    assert replica.ended == [("inc-1", True, False)] and freed == [1]  # its slot and place are given back
