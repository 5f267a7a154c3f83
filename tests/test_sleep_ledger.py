"""The ledger's sleep tier, as pure choices: whom to put to sleep and whom to stop to make room (host memory,
pinned, busy, learned sizes), what sleeping replicas hold, when an idle one sleeps."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.gpu_ledger import Resident, StartAsk, held_bytes, host_allows, plan_start, sleep_due


def res(key: str, mb: int, **kw) -> Resident:
    """A started replica of `mb` that can sleep down to 50, holding 10 in host RAM asleep."""
    base = {"declared_bytes": mb, "can_sleep": True, "asleep_bytes": 50, "host_bytes": 10}
    return Resident(key=key, gpu=0, **{**base, **kw})


def ask(need: int, host_free: int | None = 1000, capacity: int = 1000, **kw) -> StartAsk:
    return StartAsk(need, 0, capacity, host_free=host_free, **kw)


def test_an_idle_replica_that_can_sleep_is_put_to_sleep_not_stopped() -> None:
    p = plan_start(ask(600), [res("a", 600)], now=10)
    assert p.action == "evict" and p.sleep == ("a",) and p.evict == ()


def test_without_host_memory_for_it_the_replica_is_stopped() -> None:
    p = plan_start(ask(600, host_free=5), [res("a", 600)], now=10)
    assert p.sleep == () and p.evict == ("a",)


def test_unknown_host_memory_lets_it_sleep() -> None:
    assert plan_start(ask(600, host_free=None), [res("a", 600)], now=10).sleep == ("a",)
    assert host_allows(1 << 40, None) and not host_allows(11, 10) and host_allows(10, 10)


def test_host_memory_is_shared_out_least_recently_used_first() -> None:
    rs = [res("old", 400, last_used=1, host_bytes=30), res("new", 400, last_used=2, host_bytes=30)]
    p = plan_start(ask(900, host_free=40, capacity=1000), rs, now=10)
    assert p.sleep == ("old",) and p.evict == ("new",)   # the second would overfill host memory: stopped


def test_a_busy_or_pinned_replica_is_never_put_to_sleep() -> None:
    p = plan_start(ask(600), [res("a", 600, busy=True)], now=10)
    assert p.action == "wait" and p.reason == "busy" and not p.sleep
    p = plan_start(ask(600), [res("a", 600, pinned=True)], now=10)
    assert p.action == "refuse" and not p.sleep


def test_a_worker_without_sleep_mode_is_stopped() -> None:
    p = plan_start(ask(600), [res("a", 600, can_sleep=False)], now=10)
    assert p.evict == ("a",) and p.sleep == ()


def test_an_asleep_replica_holds_only_what_sleeping_leaves() -> None:
    a = res("a", 600, asleep=True, learned_bytes=700)
    assert a.footprint == 50 and a.sleep_frees == 0
    assert held_bytes([a], foreign=0) == 50
    assert plan_start(ask(900), [a], now=10).action == "start"


def test_learned_sizes_count_awake_and_asleep() -> None:
    a = res("a", 0, learned_bytes=700, asleep_bytes=120)
    assert a.footprint == 700 and a.sleep_frees == 580
    p = plan_start(ask(400), [a], now=10)
    assert p.sleep == ("a",)   # 700 + 400 > 1000; asleep 120 + 400 fits
    p = plan_start(ask(950), [a], now=10)
    assert p.evict == ("a",) and p.sleep == ()   # sleeping would leave 120: only a stop makes room


def test_an_asleep_replica_is_stopped_when_even_its_sleep_is_in_the_way() -> None:
    rs = [res("a", 600, asleep=True, asleep_bytes=300, last_used=1), res("b", 500, can_sleep=False, last_used=5)]
    p = plan_start(ask(500), rs, now=10)   # held 800: a's 300 asleep is the least recently used
    assert p.evict == ("a",) and p.sleep == ()


def test_a_replica_being_put_to_sleep_counts_what_it_frees_and_nothing_more_goes() -> None:
    rs = [res("a", 600, sleeping=True), res("b", 300, last_used=0)]
    p = plan_start(ask(400), rs, now=10)   # held 900 + 400 - 1000 = 300 short; a's sleep frees 550
    assert p.action == "wait" and p.reason == "stopping" and not (p.sleep or p.evict)


def test_min_resident_s_holds_a_young_replica_awake() -> None:
    p = plan_start(ask(600, min_resident_s=30), [res("a", 600, loaded_at=5)], now=10)
    assert p.action == "wait" and p.reason == "min_resident" and not p.sleep


def test_sleep_after_idle() -> None:
    a = res("a", 600, last_used=0)
    assert sleep_due(a, 5, host_free=100, now=6)
    assert not sleep_due(a, 5, host_free=100, now=4)
    assert not sleep_due(a, 0, host_free=100, now=60)           # 0: only to make room
    assert not sleep_due(a, 5, host_free=5, now=6)              # host memory would not take it
    for other in ({"busy": True}, {"asleep": True}, {"sleeping": True}, {"can_sleep": False}, {"started": False},
                  {"stopping": True}):
        assert not sleep_due(dataclasses.replace(a, **other), 5, host_free=100, now=60), other


# ---- properties --------------------------------------------------------------------------------

residents_st = st.lists(
    st.builds(
        Resident,
        key=st.none(),
        gpu=st.sampled_from([0, 0, 0, 1]),
        declared_bytes=st.integers(0, 600),
        learned_bytes=st.integers(0, 600),
        started=st.booleans(),
        busy=st.booleans(),
        pinned=st.booleans(),
        last_used=st.floats(0, 100),
        loaded_at=st.floats(0, 100),
        stopping=st.booleans(),
        can_sleep=st.booleans(),
        asleep=st.booleans(),
        asleep_bytes=st.integers(0, 200),
        sleeping=st.booleans(),
        host_bytes=st.integers(0, 300),
    ),
    max_size=8,
).map(lambda rs: [dataclasses.replace(r, key=i) for i, r in enumerate(rs)])


@settings(max_examples=500, deadline=None)
@given(residents=residents_st, need=st.integers(0, 1200), capacity=st.integers(0, 1500),
       foreign=st.integers(0, 300), now=st.floats(0, 200), min_resident_s=st.sampled_from([0.0, 10.0]),
       host_free=st.none() | st.integers(-100, 800))
def test_the_sleep_tier_respects_the_ledger(residents: list[Resident], need: int, capacity: int, foreign: int,
                                            now: float, min_resident_s: float, host_free: int | None) -> None:
    p = plan_start(StartAsk(need, 0, capacity, foreign, min_resident_s=min_resident_s, host_free=host_free),
                   residents, now)
    by_key = {r.key: r for r in residents}
    here = [r for r in residents if r.gpu == 0 and r.holds]
    assert not set(p.sleep) & set(p.evict)
    assert (p.action == "evict") == bool(p.sleep or p.evict)
    for key in (*p.sleep, *p.evict):
        r = by_key[key]
        assert r.gpu == 0 and r.started and not (r.busy or r.pinned or r.stopping or r.sleeping)
        assert now >= r.may_go_at(min_resident_s)
    for key in p.sleep:
        r = by_key[key]
        assert r.can_sleep and not r.asleep and r.sleep_frees > 0
    if host_free is not None and p.sleep:
        assert sum(by_key[k].host_bytes for k in p.sleep) <= host_free
    if p.action == "evict":
        freed = (sum(by_key[k].sleep_frees for k in p.sleep) + sum(by_key[k].footprint for k in p.evict)
                 + sum(r.footprint for r in here if r.stopping) + sum(r.sleep_frees for r in here if r.sleeping))
        assert held_bytes(here, foreign) - freed + need <= capacity
    if p.action == "start":
        assert held_bytes(here, foreign) + need <= capacity
