"""The circuit breaker's decisions with injected time: window, thresholds, open/half-open/closed, forced open.

Also the Retry-After arithmetic the breaker and the error answers share.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.circuit_breaker import CircuitBreaker
from supervisor.config import Breaker, retry_after_seconds
from supervisor.errors import ERROR_TYPES, error_response
from supervisor.states import BreakerState

B = BreakerState
OK, FAIL = True, False


def make(**kw) -> tuple[CircuitBreaker, list[tuple[str, str, str]]]:
    moves: list[tuple[str, str, str]] = []
    br = CircuitBreaker(Breaker(**kw), on_change=lambda old, new, why: moves.append((old.value, new.value, why)))
    return br, moves


def feed(br: CircuitBreaker, outcomes, now: float = 0.0, duration: float = 0.01) -> None:
    for ok in outcomes:
        br.record(ok, duration, now)


def open_it(br: CircuitBreaker, now: float) -> None:
    feed(br, [FAIL] * br.settings.window, now)
    assert br.state is B.OPEN


# ---- closed -----------------------------------------------------------------------------------

def test_not_enough_calls_never_opens():
    br, moves = make(window=10, min_calls=5, failure_rate=0.5)
    feed(br, [FAIL] * 4)
    assert br.state is B.CLOSED and br.failure_rate == 1.0 and moves == []
    br.record(FAIL, 0.01, 1.0)
    assert br.state is B.OPEN
    assert moves == [("closed", "open", "failure rate 1.00 >= 0.5")]


def test_opens_exactly_at_the_failure_rate():
    br, _ = make(window=4, min_calls=4, failure_rate=0.5)
    feed(br, [OK, OK, FAIL])
    assert br.state is B.CLOSED
    br.record(FAIL, 0.01, 0.0)  # 2 of 4 = 0.5 >= 0.5
    assert br.state is B.OPEN


def test_window_counts_the_last_calls_only():
    br, _ = make(window=4, min_calls=4, failure_rate=0.75)
    feed(br, [FAIL, FAIL, OK, OK])  # 0.5
    feed(br, [OK, FAIL])  # window now OK OK OK FAIL: the two old failures slid out
    assert br.state is B.CLOSED and br.failure_rate == 0.25
    feed(br, [FAIL, FAIL])  # OK FAIL FAIL FAIL
    assert br.state is B.OPEN


def test_slow_calls_open_at_the_slow_call_rate():
    br, moves = make(window=4, min_calls=4, failure_rate=1.0, slow_call_s=1.0, slow_call_rate=0.75)
    for d in (0.5, 1.0, 2.0):  # 1.0 counts: "over slow_call_s" includes the limit itself
        br.record(OK, d, 0.0)
    assert br.state is B.CLOSED and br.slow_rate == pytest.approx(2 / 3)
    br.record(OK, 3.0, 0.0)
    assert br.state is B.OPEN
    assert moves[-1][2] == "slow-call rate 0.75 >= 0.75"


def test_slow_calls_are_ignored_without_slow_call_s():
    br, _ = make(window=4, min_calls=4, slow_call_s=None, slow_call_rate=0.1)
    for _ in range(8):
        br.record(OK, 1000.0, 0.0)
    assert br.state is B.CLOSED and br.slow_rate == 0.0


def test_closed_allows_everything_and_says_no_wait():
    br, _ = make()
    assert br.allow(0.0) and br.would_allow(0.0) and br.retry_after(0.0) == 0.0


# ---- open and half-open -------------------------------------------------------------------------

def test_open_refuses_until_open_s_then_lets_probes_through():
    br, moves = make(window=4, min_calls=4, open_s=5.0, half_open_probes=2)
    open_it(br, now=100.0)
    assert not br.would_allow(100.0) and not br.allow(104.99)
    assert br.retry_after(101.0) == pytest.approx(4.0)
    assert br.retry_after(106.0) == 0.0
    assert br.would_allow(105.0) and br.state is B.OPEN  # would_allow reserves and moves nothing
    assert br.allow(105.0) and br.state is B.HALF_OPEN
    assert br.allow(105.1)
    assert not br.allow(105.2) and not br.would_allow(105.2)  # two probes are out
    assert moves[-1] == ("open", "half_open", "open for 5s")


def test_half_open_closes_after_all_probes_succeed():
    br, moves = make(window=4, min_calls=4, open_s=1.0, half_open_probes=2)
    open_it(br, 0.0)
    assert br.allow(1.0) and br.allow(1.0)
    br.record(OK, 0.01, 1.1)
    assert br.state is B.HALF_OPEN
    br.record(OK, 0.01, 1.2)
    assert br.state is B.CLOSED and br.failure_rate == 0.0
    assert [m[1] for m in moves] == ["open", "half_open", "closed"]
    assert moves[-1][2] == "probes succeeded"


def test_failed_probe_reopens_with_open_s_doubling_up_to_the_max():
    br, moves = make(window=4, min_calls=4, open_s=1.0, open_max_s=5.0)
    open_it(br, 0.0)
    now = 0.0
    periods = []
    for _ in range(5):
        # the earliest moment the breaker lets a probe through is how long it stayed open
        left = br.retry_after(now)
        periods.append(left)
        now += left
        assert not br.allow(now - 0.001)
        assert br.allow(now) and br.state is B.HALF_OPEN
        br.record(FAIL, 0.01, now)
        assert br.state is B.OPEN
    assert periods == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert moves[-1] == ("half_open", "open", "probe failed")
    # success resets the period: the next trip opens for open_s again
    now += br.retry_after(now)
    assert br.allow(now)
    br.record(OK, 0.01, now)
    assert br.state is B.CLOSED
    open_it(br, now)
    assert br.retry_after(now) == 1.0


def test_slow_probe_reopens():
    br, moves = make(window=4, min_calls=4, open_s=1.0, slow_call_s=0.5)
    open_it(br, 0.0)
    assert br.allow(1.0)
    br.record(OK, 0.7, 1.7)
    assert br.state is B.OPEN and moves[-1][2] == "probe slow"
    assert br.retry_after(1.7) == 2.0


def test_a_probe_that_ended_without_an_outcome_is_given_back():
    br, _ = make(window=4, min_calls=4, open_s=1.0, half_open_probes=1)
    open_it(br, 0.0)
    assert br.allow(1.0) and not br.allow(1.0)
    br.release_probe()  # the client left before the worker answered
    assert br.would_allow(1.0) and br.allow(1.0)
    br.release_probe()
    br.release_probe()  # never below zero
    assert br.allow(1.0) and not br.allow(1.0)


def test_late_answers_while_open_do_not_move_it():
    br, moves = make(window=4, min_calls=4, open_s=10.0)
    open_it(br, 0.0)
    n = len(moves)
    feed(br, [OK] * 10, now=1.0)
    feed(br, [FAIL] * 10, now=2.0)
    assert br.state is B.OPEN and len(moves) == n and br.retry_after(2.0) == 8.0


def test_window_starts_fresh_after_closing():
    br, _ = make(window=4, min_calls=4, failure_rate=0.5, open_s=1.0)
    open_it(br, 0.0)
    assert br.allow(1.0)
    br.record(OK, 0.01, 1.0)
    assert br.state is B.CLOSED
    feed(br, [FAIL, FAIL, FAIL])  # below min_calls in the new window
    assert br.state is B.CLOSED


# ---- forced open ------------------------------------------------------------------------------

def test_forced_open_refuses_until_released_and_ignores_outcomes():
    br, moves = make(window=4, min_calls=4, open_s=3.0)
    br.force_open("worker crash loop")
    br.force_open("again")  # once only
    assert br.state is B.FORCED_OPEN
    assert not br.allow(1e9) and not br.would_allow(1e9)
    assert br.retry_after(0.0) == 3.0
    feed(br, [OK] * 10)
    assert br.state is B.FORCED_OPEN
    br.release_forced("worker ready")
    assert br.state is B.CLOSED and br.allow(0.0)
    assert moves == [("closed", "forced_open", "worker crash loop"), ("forced_open", "closed", "worker ready")]
    br.release_forced("noop")  # only from forced_open
    assert len(moves) == 2


def test_forced_open_wins_over_half_open_and_resets_the_period():
    br, _ = make(window=4, min_calls=4, open_s=1.0, open_max_s=60.0)
    open_it(br, 0.0)
    assert br.allow(1.0)
    br.record(FAIL, 0.01, 1.0)  # reopened for 2 s
    assert br.retry_after(1.0) == 2.0
    assert br.allow(3.0) and br.state is B.HALF_OPEN
    br.force_open("worker crash loop")
    br.record(OK, 0.01, 3.0)  # the probe's answer no longer closes it
    assert br.state is B.FORCED_OPEN
    br.release_forced("worker ready")
    open_it(br, 10.0)
    assert br.retry_after(10.0) == 1.0


# ---- reconfiguration ----------------------------------------------------------------------------

def test_reconfigure_keeps_state_and_the_recent_window():
    br, _ = make(window=10, min_calls=10, failure_rate=0.5)
    feed(br, [FAIL, OK, FAIL, FAIL])
    br.reconfigure(Breaker(window=3, min_calls=3, failure_rate=0.9))
    assert br.failure_rate == pytest.approx(2 / 3) and br.state is B.CLOSED
    br.record(FAIL, 0.01, 0.0)
    assert br.state is B.OPEN


# ---- properties -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ok", "fail", "slow", "tick", "allow", "release", "force", "unforce"]),
                          st.floats(0, 30)), max_size=60))
def test_any_history_keeps_the_breaker_consistent(steps):
    s = Breaker(window=5, min_calls=3, failure_rate=0.5, slow_call_s=1.0, slow_call_rate=0.6, open_s=2.0,
                open_max_s=9.0, half_open_probes=2)
    moves: list[tuple[BreakerState, BreakerState]] = []
    br = CircuitBreaker(s, on_change=lambda old, new, why: moves.append((old, new)))
    now = 0.0
    for op, x in steps:
        now += x if op == "tick" else 0.0
        if op == "ok":
            br.record(True, 0.1, now)
        elif op == "fail":
            br.record(False, 0.1, now)
        elif op == "slow":
            br.record(True, 2.0, now)
        elif op == "allow":
            if br.would_allow(now):
                assert br.allow(now)
        elif op == "release":
            br.release_probe()
        elif op == "force":
            br.force_open("test")
        else:
            br.release_forced("test")
        assert s.open_s <= br._open_for <= s.open_max_s
        assert 0.0 <= br.retry_after(now) <= s.open_max_s
        assert 0.0 <= br.failure_rate <= 1.0 and 0.0 <= br.slow_rate <= 1.0
        if br.state is B.CLOSED:
            assert br.would_allow(now) and br.retry_after(now) == 0.0
        if br.state is B.HALF_OPEN:
            assert 0 <= br._probes_out <= s.half_open_probes
    # every move is a real change, chained from the previous one, and along an allowed edge
    allowed = {(B.CLOSED, B.OPEN), (B.OPEN, B.HALF_OPEN), (B.HALF_OPEN, B.OPEN), (B.HALF_OPEN, B.CLOSED)}
    prev = B.CLOSED
    for old, new in moves:
        assert old is prev and old is not new
        assert (old, new) in allowed or new is B.FORCED_OPEN or (old, new) == (B.FORCED_OPEN, B.CLOSED)
        prev = new
    assert prev is br.state


# ---- Retry-After ------------------------------------------------------------------------------

@pytest.mark.parametrize(("secs", "header"), [(0.0, 1), (0.001, 1), (1.0, 1), (1.01, 2), (4.2, 5), (59.0, 59),
                                              (math.inf, 60), (math.nan, 60)])
def test_retry_after_is_whole_seconds_at_least_one(secs, header):
    assert retry_after_seconds(secs) == header


def test_every_retryable_error_carries_retry_after_in_header_and_body():
    for etype, (status, with_retry) in ERROR_TYPES.items():
        resp = error_response(etype, "why", "rid-1", 2.5)
        body = json.loads(resp.body)
        assert resp.status == status
        assert body["error"]["type"] == etype and body["error"]["request_id"] == "rid-1"
        if with_retry:
            assert resp.headers["Retry-After"] == "3" and body["error"]["retry_after_s"] == 3
        else:
            assert "Retry-After" not in resp.headers and "retry_after_s" not in body["error"]
    for etype in ("queue_full", "circuit_open", "queue_timeout", "overloaded"):
        assert ERROR_TYPES[etype][1], etype


def test_breaker_retry_after_counts_down_to_the_half_open_moment():
    br, _ = make(window=4, min_calls=4, open_s=5.0)
    open_it(br, 10.0)
    assert [retry_after_seconds(br.retry_after(t)) for t in (10.0, 11.5, 14.2, 14.99, 20.0)] == [5, 4, 1, 1, 1]


def test_half_open_ignores_answers_of_calls_started_before_it():
    b = CircuitBreaker(Breaker(window=4, min_calls=2, failure_rate=0.5, open_s=1, open_max_s=8, half_open_probes=1))
    b.record(False, 0.1, 0.0, started=-0.1)
    b.record(False, 0.1, 0.1, started=0.0)
    assert b.state is BreakerState.OPEN
    assert b.allow(1.2)  # half-open: the probe goes
    assert b.state is BreakerState.HALF_OPEN
    b.record(True, 2.0, 1.3, started=-0.7)  # a slow call from before: neither closes nor reopens
    assert b.state is BreakerState.HALF_OPEN
    b.record(True, 0.05, 1.3, started=1.25)  # the probe
    assert b.state is BreakerState.CLOSED
