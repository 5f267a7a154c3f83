"""Client budgets as plain values: the bucket math, the memory store, the estimate and what an answer
used, settlement through the facade, and fairness charging tokens.

No daemon, no clock: the store runs on a clock the test moves; its coroutines never suspend.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, generate_latest

from supervisor.budgets import bucket
from supervisor.budgets.core import Budgets, Charge, go_duration, rate_headers, rate_lines
from supervisor.budgets.metering import DEFAULT_OUTPUT, AnswerMeter, estimate, usage_of
from supervisor.budgets.store import Limits, MemoryBudgetStore, RateState, StoreUnavailable, UsageRecord, _state
from supervisor.config import Queue as QueueSettings
from supervisor.config import parse
from supervisor.errors import Rejected, error_parts
from supervisor.fairness import hash_key
from supervisor.http.call import Call
from supervisor.metrics import ClientMetrics, Metrics, P
from supervisor.request_queue import CANCELLED, GRANTED, WAITING, RequestQueue


def run(coro):
    """Drive a coroutine that never suspends (the memory store's) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the memory store suspended")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- bucket math ---------------------------------------------------------------------------------------
@given(level=st.floats(-1e5, 1e4), cap=st.integers(1, 10**6), dt=st.floats(0, 1e4))
def test_refill_grows_at_the_rate_and_never_past_capacity(level, cap, dt):
    level = min(level, cap)
    r = bucket.refill(level, 0.0, cap, dt)
    assert r <= cap
    assert r == pytest.approx(min(cap, level + dt * cap / 60), rel=1e-9, abs=1e-6)


def test_wait_and_reset_figures():
    assert bucket.wait_s(10.0, 10, 60) == 0
    assert bucket.wait_s(10.0, 13, 60) == pytest.approx(3.0)  # 1 token a second
    assert bucket.wait_s(10.0, 1000, 60) == pytest.approx(50.0)  # never more than a full bucket is needed
    assert bucket.full_in_s(10.0, 60) == pytest.approx(50.0)
    assert bucket.remaining(-5.0) == 0 and bucket.remaining(7.9) == 7


@pytest.mark.parametrize(("s", "text"), [(0, "0s"), (0.25, "250ms"), (0.0004, "1ms"), (1, "1s"), (1.5, "1.5s"),
                                         (360, "6m0s"), (62.5, "1m2.5s"), (3723, "1h2m3s")])
def test_reset_durations_are_written_as_openai_writes_them(s, text):
    assert go_duration(s) == text


# -- the memory store ----------------------------------------------------------------------------------
def test_a_take_is_all_or_nothing_and_says_when_there_is_room():
    clock = Clock()
    store = MemoryBudgetStore(clock)
    lim = Limits(tokens_per_minute=600, requests_per_minute=2)
    t = run(store.take("k", lim, 500))
    assert t.admitted and t.state.remaining_tokens == 100 and t.state.remaining_requests == 1
    refused = run(store.take("k", lim, 500))
    assert not refused.admitted and refused.retry_after_s == pytest.approx(40.0)  # 400 tokens at 10/s
    assert refused.state.remaining_requests == 1  # a refusal takes nothing
    clock.t += refused.retry_after_s
    assert run(store.take("k", lim, 500)).admitted
    assert not run(store.take("k", lim, 1)).admitted  # both requests used: the request bucket says no
    # another key has its own buckets
    assert run(store.take("other", lim, 600)).admitted


@given(tpm=st.integers(0, 10_000), rpm=st.integers(0, 100),
       takes=st.lists(st.tuples(st.floats(0, 10), st.integers(0, 20_000)), min_size=1, max_size=30))
def test_a_take_reports_its_buckets_as_the_bucket_math_says(tpm, rpm, takes):
    clock = Clock()
    store = MemoryBudgetStore(clock)
    lim = Limits(tpm, rpm)
    for dt, tokens in takes:
        clock.t += dt
        before = store._refilled("k", rpm, tpm, clock.t)
        req, tok = before.requests, before.tokens
        wait = max(bucket.wait_s(req, 1, rpm) if req is not None else 0.0,
                   bucket.wait_s(tok, tokens, tpm) if tok is not None else 0.0)
        t = store.take_now("k", lim, tokens)
        assert t.admitted == (wait == 0) and t.retry_after_s == pytest.approx(wait)
        b = store._buckets["k"]
        assert t.state == _state(b.requests, b.tokens, rpm, tpm)


@given(req=st.floats(-1e4, 1e4), tok=st.floats(-1e6, 1e6), rpm=st.integers(1, 1000), tpm=st.integers(1, 10**6),
       at=st.floats(0, 1e4), now=st.floats(0, 1e4))
def test_the_store_refills_as_the_bucket_math_says(req, tok, rpm, tpm, at, now):
    store = MemoryBudgetStore(Clock())
    store._refilled("k", rpm, tpm, at)  # a bucket first seen: full
    b = store._buckets["k"]
    assert (b.requests, b.tokens, b.at) == (rpm, tpm, at)
    b.requests, b.tokens = req, tok
    b = store._refilled("k", rpm, tpm, now)
    assert b.requests == bucket.refill(req, at, rpm, now) and b.tokens == bucket.refill(tok, at, tpm, now)
    assert b.at == now
    assert store._refilled("k", 0, tpm, now).requests is None  # a limit set to 0: its bucket dropped


def test_settlement_gives_back_or_takes_more_and_a_refund_gives_back_the_request():
    clock = Clock()
    store = MemoryBudgetStore(clock)
    lim = Limits(tokens_per_minute=1000, requests_per_minute=10)
    assert run(store.take("k", lim, 400)).admitted
    run(store.adjust("k", lim, -300))  # used 100 of the 400 estimated
    assert run(store.take("k", lim, 0)).state.remaining_tokens == 900
    run(store.adjust("k", lim, 2000))  # an answer far over its estimate: a debt
    t = run(store.take("k", lim, 0))
    assert not t.admitted and t.retry_after_s == pytest.approx(1100 / (1000 / 60))
    run(store.adjust("k", lim, -5000, refund_request=True))  # gives back at most a full bucket
    st_ = run(store.take("k", lim, 0)).state
    assert st_.remaining_tokens == 1000 and st_.remaining_requests == 8  # 10 - 3 taken + 1 refunded


def test_unlimited_dimensions_are_not_kept_and_a_reload_changes_limits():
    clock = Clock()
    store = MemoryBudgetStore(clock)
    t = run(store.take("k", Limits(tokens_per_minute=100), 10**6))  # larger than the budget: on a full bucket
    assert t.admitted and t.state.limit_requests == 0 and t.state.remaining_tokens == 0
    assert not run(store.take("k", Limits(tokens_per_minute=100), 1)).admitted  # in debt
    assert run(store.take("k", Limits(requests_per_minute=5), 10**6)).admitted  # tokens now unlimited


@settings(max_examples=300, deadline=None)
@given(tpm=st.integers(60, 100_000),
       reqs=st.lists(st.tuples(st.floats(0, 30),  # seconds since the previous request
                               st.integers(0, 5000),  # its estimate
                               st.integers(0, 5000),  # what it really used
                               st.booleans()),  # the worker answered (else: refunded)
                     min_size=1, max_size=60))
def test_delivered_tokens_never_exceed_the_budget_plus_one_estimate_error(tpm, reqs):
    clock = Clock()
    start = clock.t
    store = MemoryBudgetStore(clock)
    lim = Limits(tokens_per_minute=tpm)
    delivered = 0
    worst_error = 0
    for gap, est, used, answered in reqs:
        clock.t += gap
        if not run(store.take("k", lim, est)).admitted:
            continue
        if answered:
            run(store.adjust("k", lim, used - est))
            delivered += used
            worst_error = max(worst_error, used - min(est, tpm))
        else:
            run(store.adjust("k", lim, -est, refund_request=True))
    elapsed = clock.t - start
    assert delivered <= tpm + elapsed * tpm / 60 + worst_error + 1e-6


# -- estimate and usage --------------------------------------------------------------------------------
def body(**kw) -> bytes:
    return json.dumps(kw).encode()


@pytest.mark.parametrize(("raw", "path", "want"), [
    (body(model="m", messages=[{"role": "user", "content": "x" * 40}], max_tokens=30), "/v1/chat/completions",
     (10, 30, "m")),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 8}]}], max_completion_tokens=5),
     "/v1/chat/completions", (2, 5, None)),
    (body(prompt="abcde"), "/v1/completions", (2, DEFAULT_OUTPUT, None)),
    (body(prompt=[1, 2, 3]), "/v1/completions", (3, DEFAULT_OUTPUT, None)),  # token ids: one each
    (body(input=["abcd", "efgh"], model="e"), "/v1/embeddings", (2, 0, "e")),
    (body(input="abcd", max_output_tokens=7), "/v1/responses", (1, 7, None)),
    (b"not json at all!", "/x", (4, 0, None)),
    (b"", "/x", (0, 0, None)),
])
def test_the_estimate_of_a_body(raw, path, want):
    e = estimate(raw, len(raw), path)
    assert (e.input, e.output, e.model) == want


def test_a_body_streamed_through_unread_is_estimated_from_its_length():
    e = estimate(None, 4000, "/v1/completions")
    assert (e.input, e.output) == (1000, DEFAULT_OUTPUT)


@pytest.mark.parametrize(("obj", "want"), [
    ({"usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}, (3, 5)),
    ({"usage": {"prompt_tokens": 3, "total_tokens": 3}}, (3, 0)),  # embeddings
    ({"usage": {"input_tokens": 2, "output_tokens": 9}}, (2, 9)),  # Responses API
    ({"type": "response.completed", "response": {"usage": {"input_tokens": 1, "output_tokens": 2}}}, (1, 2)),
    ({"usage": None}, None),
    ({"usage": {"prompt_tokens": "3"}}, None),
    ([1], None),
])
def test_usage_of_an_answer(obj, want):
    assert usage_of(obj) == want


def sse(chunks: list[dict], usage: dict | None) -> bytes:
    events = [{"choices": [{"index": 0, "delta": c}]} for c in chunks]
    if usage is not None:
        events.append({"choices": [], "usage": usage})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 30), with_usage=st.booleans(), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_a_stream_is_metered_whatever_its_chunk_boundaries(n, with_usage, cuts):
    raw = sse([{"role": "assistant"}] + [{"content": "tok "}] * n, {"prompt_tokens": 4, "completion_tokens": n}
              if with_usage else None)
    m = AnswerMeter(b"text/event-stream; charset=utf-8")
    edges = sorted({0, len(raw), *(c for c in cuts if c < len(raw))})
    for a, b in zip(edges, edges[1:]):
        m.feed(raw[a:b])
    if with_usage:
        assert m.result() == (4, n)
    else:
        assert m.result() is None and m.chunks == n  # the role-only chunk carries no text


@pytest.mark.parametrize(("answer_obj", "want"), [
    # the generated text quotes a usage object: only the answer's own key counts
    ({"choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 999, "completion_tokens": 9}'}}],
      "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, (3, 4)),
    ({"usage": {"prompt_tokens": 5, "completion_tokens": 6}, "choices": [{"text": "usage"}]}, (5, 6)),
    ({"choices": [{"message": {"content": '"usage": {"prompt_tokens": 1}'}}], "usage": None}, None),
    ({"choices": [{"message": {"content": '"usage": {"prompt_tokens": 1}'}}]}, None),
    ({"object": "response", "usage": {"input_tokens": 2, "output_tokens": 8}}, (2, 8)),
])
def test_a_json_answer_s_usage_is_its_own(answer_obj, want):
    for text in (json.dumps(answer_obj), json.dumps(answer_obj, indent=2)):
        m = AnswerMeter(b"application/json")
        m.feed(text.encode())
        assert m.result() == want


@given(usage=st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens",
                                              "output_tokens", "prompt_tokens_details"]),
                             st.one_of(st.integers(-5, 10**12), st.floats(0, 100), st.none(), st.just({"x": 1}))),
       indent=st.sampled_from([None, 0, 2]), tail=st.booleans())
def test_a_json_answer_s_usage_is_read_as_a_parser_reads_it(usage, indent, tail):
    obj = {"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": usage}
    if tail:
        obj["system_fingerprint"] = "fp"
    raw = json.dumps(obj, indent=indent).encode()
    m = AnswerMeter(b"application/json")
    m.feed(raw)
    assert m.result() == usage_of(json.loads(raw))


def test_a_json_answer_is_metered_from_its_usage_in_pieces():
    raw = body(choices=[{"message": {"content": "hi"}}], usage={"prompt_tokens": 7, "completion_tokens": 2})
    m = AnswerMeter(b"application/json")
    m.feed(raw[:10])
    m.feed(raw[10:])
    assert m.result() == (7, 2)
    other = AnswerMeter(b"text/plain")
    other.feed(raw)
    assert other.result() is None


# -- the facade ----------------------------------------------------------------------------------------
class Sink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record(self, usage: UsageRecord) -> None:
        self.records.append(usage)


def budgets(clients: str) -> tuple[Budgets, MemoryBudgetStore, Clock, Sink, Metrics]:
    s = parse("queue: {fairness: {key: 'header:X-Client-ID'}}\nclients:\n" + clients)
    clock = Clock()
    store = MemoryBudgetStore(clock)
    m = Metrics()
    b = Budgets(s, m, store)
    sink = b.sink = Sink()
    return b, store, clock, sink, m


def call_of(client: str, raw: bytes) -> Call:
    c = Call("rid", 0.0, "POST", "/v1/chat/completions", 0)
    c.client = hash_key(client)
    c.body = raw
    return c


def chat(prompt_chars: int, max_tokens: int) -> bytes:
    return body(model="m", messages=[{"role": "user", "content": "x" * prompt_chars}], max_tokens=max_tokens)


def answer(ch: Charge, status: int, usage: tuple[int, int] | None) -> None:
    raw = {"choices": []}
    if usage is not None:
        raw["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
    ch.answered(status, b"application/json", json.dumps(raw).encode())


def sample(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value("gpu_supervisor_" + name, labels) or 0.0


def remaining(store: MemoryBudgetStore, key: str, lim: Limits) -> tuple[int, int]:
    """What a client has left (requests, tokens), read by a take of nothing that is refunded at once."""
    st_ = run(store.take(key, lim, 0)).state
    run(store.adjust(key, lim, 0, refund_request=True))
    return st_.remaining_requests + 1, st_.remaining_tokens


def test_estimate_above_and_below_the_truth_is_settled_to_the_truth():
    b, store, clock, sink, m = budgets("  keys: {team-a: {tokens_per_minute: 1000, requests_per_minute: 100}}\n")
    lim = Limits(1000, 100)
    key = hash_key("team-a")
    c = call_of("team-a", chat(400, 200))  # estimate 100 + 200
    run(b.charge(c, None))
    assert c.charge.state.remaining_tokens == 700 and c.cost == pytest.approx(300 / 256)
    answer(c.charge, 200, (100, 20))  # used 120: 180 back
    run(b.settle(c.charge))
    assert remaining(store, key, lim)[1] == 880
    c2 = call_of("team-a", chat(4, 10))  # estimate 11, used 500: 489 more
    run(b.charge(c2, None))
    answer(c2.charge, 200, (1, 499))
    run(b.settle(c2.charge))
    assert remaining(store, key, lim)[1] == 380
    assert [(r.name, r.model, r.input_tokens, r.output_tokens) for r in sink.records] == [
        ("team-a", "m", 100, 20), ("team-a", "m", 1, 499)]
    assert sample(m, "client_tokens_total", client="team-a", kind="output") == 519
    assert sample(m, "client_tokens_total", client="team-a", kind="input") == 101


def test_no_worker_answer_is_a_full_refund_and_settling_twice_counts_once():
    b, store, clock, sink, m = budgets(
        "  default: {tokens_per_minute: 1000, requests_per_minute: 10, max_parallel: 1}\n")
    lim = Limits(1000, 10)
    c = call_of("anyone", chat(40, 90))
    run(b.charge(c, None))
    assert b.parallel == {c.client: 1}
    with pytest.raises(Rejected) as refused:  # max_parallel 1: a second at once is refused
        run(b.charge(call_of("anyone", chat(4, 1)), None))
    assert refused.value.etype == "rate_limited"
    run(b.settle(c.charge))  # never answered (the worker died first): refunded
    run(b.settle(c.charge))
    assert b.parallel == {}
    assert remaining(store, c.client, lim) == (10, 1000)
    assert sink.records == []
    assert sample(m, "client_rate_limited_total", client="other") == 1


def test_over_budget_is_a_429_with_retry_after_from_the_refill_and_the_headers():
    b, store, clock, sink, m = budgets("  default: {tokens_per_minute: 600}\n")
    run(b.charge(call_of("c", chat(0, 590)), None))
    c = call_of("c", chat(0, 100))
    with pytest.raises(Rejected) as refused:
        run(b.charge(c, None))
    r = refused.value
    assert r.etype == "rate_limited" and r.retry_after_s == pytest.approx(9.0)  # 90 tokens at 10 a second
    status, headers, raw = error_parts(r.etype, r.message, "rid", r.retry_after_s)
    c.charge.error_headers(headers)
    assert status == 429 and headers["Retry-After"] == "9" and headers["retry-after-ms"] == "9000"
    assert headers["x-ratelimit-limit-tokens"] == "600" and headers["x-ratelimit-remaining-tokens"] == "10"
    assert "x-ratelimit-limit-requests" not in headers  # requests are unlimited
    assert json.loads(raw)["error"]["retry_after_s"] == 9
    assert b.parallel == {} and c.charge.settled


def test_the_worker_s_own_rate_headers_are_replaced():
    b, *_ = budgets("  default: {requests_per_minute: 60}\n")
    c = call_of("c", b"")
    run(b.charge(c, 0))
    h = [(b"X-RateLimit-Limit-Requests", b"9999"), (b"content-type", b"application/json")]
    h, lines = c.charge.add_headers(h, [k.lower() for k, _ in h])
    assert h == [(b"content-type", b"application/json")]
    assert lines == (b"x-ratelimit-limit-requests: 60\r\nx-ratelimit-remaining-requests: 59\r\n"
                     b"x-ratelimit-reset-requests: 1s\r\n")
    assert rate_headers(c.charge.state)[2] == (b"x-ratelimit-reset-requests", b"1s")


@given(st.tuples(st.integers(0, 10**9), st.integers(0, 10**9), st.floats(0, 120), st.integers(0, 10**9),
                 st.integers(0, 10**9), st.floats(0, 120)))
def test_rate_lines_are_the_rate_headers_written_out(figures):
    state = RateState(*figures)
    assert rate_lines(state) == b"".join(k + b": " + v + b"\r\n" for k, v in rate_headers(state))


@pytest.mark.parametrize(("count", "want"), [("total", 15), ("output", 10), ("input", 5)])
def test_count_says_which_tokens_a_budget_counts(count, want):
    b, store, *_ = budgets(f"  default: {{tokens_per_minute: 1000}}\n  count: {count}\n")
    c = call_of("c", chat(0, 50))
    run(b.charge(c, None))
    answer(c.charge, 200, (5, 10))
    run(b.settle(c.charge))
    assert remaining(store, c.client, Limits(1000))[1] == 1000 - want


def test_a_stream_without_usage_is_settled_with_its_chunks_and_an_error_without_usage_with_nothing():
    b, store, clock, sink, m = budgets("  default: {tokens_per_minute: 1000}\n  count: output\n")
    c = call_of("c", chat(0, 100))
    run(b.charge(c, None))
    c.charge.begin(200, b"text/event-stream").feed(sse([{"content": "a"}] * 7, None))
    run(b.settle(c.charge))
    w = call_of("c", chat(0, 100))  # a short stream answered whole: metered the same way
    run(b.charge(w, None))
    w.charge.answered(200, b"text/event-stream; charset=utf-8", sse([{"content": "a"}] * 3, None))
    run(b.settle(w.charge))
    e = call_of("c", chat(0, 100))
    run(b.charge(e, None))
    answer(e.charge, 400, None)
    run(b.settle(e.charge))
    assert remaining(store, c.client, Limits(1000))[1] == 990
    assert [(r.input_tokens, r.output_tokens) for r in sink.records] == [(0, 7), (0, 3), (0, 0)]


def test_a_store_that_is_down_fails_open_and_is_counted():
    class Down(MemoryBudgetStore):
        sync = False  # a store reached over the network (as Redis is)

        async def take(self, key, limits, tokens):
            raise StoreUnavailable("down")

    s = parse("queue: {fairness: {key: 'header:X-Client-ID'}}\nclients: {default: {tokens_per_minute: 1}}")
    m = Metrics()
    b = Budgets(s, m, Down())
    c = call_of("c", chat(400, 400))
    run(b.charge(c, None))  # admitted
    assert c.charge.state is None and not c.charge.taken
    assert sample(m, "budget_store_errors_total") == 1


def test_a_listed_client_may_be_named_for_metrics():
    b, *_ = budgets("  keys: {'Bearer sk-secret': {name: team-b, tokens_per_minute: 10}}\n")
    c = call_of("Bearer sk-secret", b"")
    run(b.charge(c, 0))
    assert c.charge.client.label == "team-b"


# -- fairness charges tokens ---------------------------------------------------------------------------
def test_with_costs_deficit_round_robin_shares_tokens_not_requests():
    loop = asyncio.new_event_loop()
    try:
        q = RequestQueue(QueueSettings(concurrency=1, fairness={"key": "header:X-Client-ID"}), loop)
        q.open = True
        holder = q.acquire(0, "default", 0.0, key="x")
        assert holder.state == GRANTED
        big = [q.acquire(0, "default", 0.0, key="big", cost=4.0) for _ in range(40)]
        small = [q.acquire(0, "default", 0.0, key="small", cost=1.0) for _ in range(40)]
        assert all(t.state == WAITING for t in big + small)
        order = []
        for _ in range(40):
            q.release(holder, None)
            holder = next(t for t in big + small if t.state == GRANTED and t not in order)
            order.append(holder)
        grants_big = sum(t in big for t in order)
        grants_small = sum(t in small for t in order)
        # equal tokens: the small client is granted four requests for each of the big one's
        assert abs(grants_small - 4 * grants_big) <= 4, (grants_big, grants_small)
        assert all(t.state != CANCELLED for t in order)
    finally:
        loop.close()


def test_client_metrics_read_as_prometheus_client_s_counters():
    ours, ref = CollectorRegistry(), CollectorRegistry()
    m = ClientMetrics()
    ours.register(m)
    tokens = Counter(P + "client_tokens", "Tokens of answered requests by client (a name listed under "
                     "clients.keys, else other) and kind (input, output).", ["client", "kind"], registry=ref)
    limited = Counter(P + "client_rate_limited", "Requests refused 429 rate_limited, by client (a name listed "
                      "under clients.keys, else other).", ["client"], registry=ref)
    for client, kind, n in (("team-a", "input", 7), ("team-a", "output", 5), ("other", "output", 2)):
        m.count(client, kind).n += n
        tokens.labels(client, kind).inc(n)
    m.count("other", None).n += 1
    limited.labels("other").inc()

    def lines(reg) -> list[str]:
        return sorted(x for x in generate_latest(reg).decode().splitlines() if "_created" not in x)

    assert lines(ours) == lines(ref)


def test_a_reload_changes_limits_and_names_from_the_next_request():
    b, store, clock, sink, m = budgets("  keys: {a: {tokens_per_minute: 100}}\n")
    c = call_of("a", chat(0, 90))
    run(b.charge(c, None))
    assert c.charge.state.limit_tokens == 100 and c.charge.client.label == "a"
    b.derive(parse("queue: {fairness: {key: 'header:X-Client-ID'}}\n"
                   "clients: {keys: {a: {name: team-a, tokens_per_minute: 1000, requests_per_minute: 5}}}"))
    with pytest.raises(Rejected) as refused:  # 10 tokens left in the bucket, refilled at the new rate
        run(b.charge(call_of("a", chat(0, 90)), None))
    assert refused.value.retry_after_s == pytest.approx(80 / (1000 / 60))  # not the old rate's 48 s
    clock.t += refused.value.retry_after_s + 0.001  # (retry-after-ms rounds up, as here)
    c2 = call_of("a", chat(0, 90))
    run(b.charge(c2, None))
    st_ = c2.charge.state
    assert (st_.limit_tokens, st_.limit_requests, c2.charge.client.label) == (1000, 5, "team-a")


def test_check_config_refuses_bad_clients_sections():
    from supervisor.config import ConfigError

    for text, where in (("clients: {}\n", "clients"),
                        ("queue: {fairness: {key: ip}}\nclients: {store: 'postgres://x'}\n", "clients.store"),
                        ("queue: {fairness: {key: ip}}\nclients: {store: 'redis://h:1/x'}\n", "clients.store"),
                        ("queue: {fairness: {key: ip}}\nclients: {count: all}\n", "clients.count"),
                        ("queue: {fairness: {key: ip}}\nclients: {default: {name: x}}\n", "clients.default.name"),
                        ("queue: {fairness: {key: ip}}\nclients: {keys: {a: {tokens_per_minute: -1}}}\n",
                         "clients.keys.a.tokens_per_minute")):
        with pytest.raises(ConfigError) as bad:
            parse(text)
        assert any(p.startswith(where) for p in map(str, bad.value.problems)), (text, bad.value.problems)
