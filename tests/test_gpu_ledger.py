"""The GPU memory ledger's choices (start, evict, wait, refuse) with plain numbers: no clock, no NVML."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.gpu_ledger import (
    DEFAULT_RETRY_S,
    MIB,
    Plan,
    Resident,
    StartAsk,
    WorkerNeed,
    capacity_bytes,
    check_static_fit,
    first_waiter,
    foreign_bytes,
    held_bytes,
    idle_due,
    plan_start,
    settled,
)

CAP = 1000 * MIB


def plan(need_mb: int, residents: list[Resident], *, capacity: int | None = CAP, foreign: int = 0, now: float = 100.0,
         min_resident_s: float = 0.0, max_starvation_s: float | None = None, waiting_since: float | None = None,
         settling: bool = False, retry_hint_s: float | None = None) -> Plan:
    ask = StartAsk(need_mb * MIB, 0, capacity, foreign, min_resident_s=min_resident_s,
                   max_starvation_s=max_starvation_s, waiting_since=waiting_since, settling=settling,
                   retry_hint_s=retry_hint_s)
    return plan_start(ask, residents, now)


def res(key: str, mb: int, **kw: object) -> Resident:
    return Resident(key=key, gpu=kw.pop("gpu", 0), declared_bytes=mb * MIB, **kw)  # type: ignore[arg-type]


# ---- the ledger's figures ----------------------------------------------------------------------

def test_capacity_is_the_smaller_of_nvml_and_budget_less_the_reserve() -> None:
    assert capacity_bytes(8000 * MIB, 6000, 500) == 5500 * MIB
    assert capacity_bytes(4000 * MIB, 6000, 500) == 3500 * MIB
    assert capacity_bytes(4000 * MIB, None, 0) == 4000 * MIB


def test_without_nvml_the_budget_alone_gives_capacity() -> None:
    assert capacity_bytes(None, 6000, 1000) == 5000 * MIB
    assert foreign_bytes(None, 123) == 0


def test_unknown_capacity_is_none_and_a_reserve_above_it_leaves_zero() -> None:
    assert capacity_bytes(None, None, 100) is None
    assert capacity_bytes(100 * MIB, None, 200) == 0


def test_foreign_is_nvml_used_minus_ours_never_negative() -> None:
    assert foreign_bytes(700, 500) == 200
    assert foreign_bytes(300, 500) == 0


def test_held_counts_the_larger_of_declared_and_learned_for_replicas_that_hold_memory() -> None:
    residents = [
        Resident("a", 0, declared_bytes=100, learned_bytes=300),
        Resident("b", 0, declared_bytes=200, learned_bytes=50),
        Resident("c", 0, declared_bytes=400, started=False),                  # unloaded: holds nothing
        Resident("d", 0, declared_bytes=800, started=False, stopping=True),   # exited, memory not seen back
    ]
    assert held_bytes(residents, 5) == 300 + 200 + 800 + 5


# ---- start / evict -----------------------------------------------------------------------------

def test_unknown_capacity_starts_whatever_the_need() -> None:
    assert plan(10**6, [res("a", 900)], capacity=None) == Plan("start", "unknown_capacity")


def test_a_need_that_fits_starts_without_evicting() -> None:
    assert plan(400, [res("a", 300), res("b", 300)]) == Plan("start", "fits")


def test_only_the_least_recently_used_idle_replica_is_evicted_when_one_is_enough() -> None:
    residents = [res("new", 400, last_used=50.0), res("old", 400, last_used=20.0)]
    assert plan(500, residents) == Plan("evict", "evict", evict=("old",))


def test_evicts_as_many_as_needed_least_recently_used_first() -> None:
    residents = [res("c", 300, last_used=30.0), res("a", 300, last_used=10.0), res("b", 300, last_used=20.0)]
    assert plan(650, residents).evict == ("a", "b")


def test_replicas_on_other_gpus_neither_count_nor_get_evicted() -> None:
    residents = [res("other", 900, gpu=1, last_used=0.0), res("here", 500, last_used=50.0)]
    assert plan(500, residents) == Plan("start", "fits")
    assert plan(600, residents).evict == ("here",)


def test_a_busy_replica_is_never_evicted() -> None:
    residents = [res("busy", 500, busy=True, last_used=1.0), res("idle", 400, last_used=50.0)]
    assert plan(500, residents) == Plan("evict", "evict", evict=("idle",))
    only_busy = plan(600, residents)
    assert only_busy.action == "wait" and only_busy.reason == "busy"
    assert only_busy.evict == () and only_busy.drain == ()


def test_waiting_on_busy_replicas_uses_the_retry_hint() -> None:
    residents = [res("busy", 800, busy=True)]
    assert plan(500, residents, retry_hint_s=7.5).retry_after_s == 7.5
    assert plan(500, residents).retry_after_s == DEFAULT_RETRY_S


def test_a_pinned_replica_is_never_evicted() -> None:
    residents = [res("pinned", 400, pinned=True, last_used=1.0), res("idle", 400, last_used=50.0)]
    assert plan(500, residents) == Plan("evict", "evict", evict=("idle",))


def test_idle_replicas_with_nothing_learned_are_not_evicted_for_nothing() -> None:
    residents = [res("zero", 0, last_used=1.0), res("idle", 600, last_used=50.0)]
    assert plan(500, residents).evict == ("idle",)


# ---- refuse ------------------------------------------------------------------------------------

def test_a_need_above_the_gpu_is_refused_at_once() -> None:
    assert plan(1001, []) == Plan("refuse", "too_large")
    assert plan(1001, [res("idle", 500)]).action == "refuse"


def test_a_need_above_what_pinned_replicas_leave_is_refused_not_evicted_for() -> None:
    residents = [res("pinned", 600, pinned=True), res("idle", 300)]
    assert plan(500, residents) == Plan("refuse", "pinned")
    assert plan(400, residents) == Plan("evict", "evict", evict=("idle",))


def test_foreign_memory_counts_against_the_gpu() -> None:
    assert plan(800, [], foreign=300 * MIB).action == "refuse"
    assert plan(800, [], foreign=300 * MIB).reason == "foreign"
    assert plan(800, [], foreign=300 * MIB, retry_hint_s=4.0).retry_after_s == 4.0   # others' use may shrink
    assert plan(500, [res("a", 400)], foreign=300 * MIB).evict == ("a",)
    assert plan(500, [res("a", 400)], foreign=0) == Plan("start", "fits")


def test_a_replica_being_stopped_does_not_make_its_pinned_memory_permanent() -> None:
    residents = [res("pinned", 600, pinned=True, stopping=True, started=False)]
    assert plan(500, residents) == Plan("wait", "stopping", retry_after_s=DEFAULT_RETRY_S)


# ---- stopping and settling ---------------------------------------------------------------------

def test_memory_of_a_stopping_replica_is_held_until_seen_back_and_no_more_is_evicted() -> None:
    residents = [res("going", 600, stopping=True, last_used=1.0), res("idle", 300, last_used=2.0)]
    assert plan(500, residents).action == "wait"
    assert plan(500, residents).evict == ()


def test_evicts_only_what_the_stopping_replicas_do_not_already_free() -> None:
    residents = [res("going", 300, stopping=True), res("a", 300, last_used=1.0), res("b", 300, last_used=2.0)]
    assert plan(500, residents).evict == ("a",)


def test_while_a_stop_settles_nothing_more_is_evicted() -> None:
    residents = [res("going", 200, stopping=True, started=False), res("a", 700)]
    assert plan(500, residents, settling=True) == Plan("wait", "settling", retry_after_s=DEFAULT_RETRY_S)
    assert plan(500, residents, settling=False).evict == ("a",)


def test_a_start_that_fits_need_not_wait_for_settling() -> None:
    residents = [res("going", 200, stopping=True, started=False)]
    assert plan(500, residents, settling=True) == Plan("start", "fits")


def test_settled_when_nvml_shows_the_memory_back_or_the_timeout_passes_or_no_nvml() -> None:
    assert not settled(900, 400, stopped_at=10.0, now=12.0, settle_timeout_s=10.0)
    assert settled(400, 400, stopped_at=10.0, now=12.0, settle_timeout_s=10.0)
    assert settled(900, 400, stopped_at=10.0, now=20.0, settle_timeout_s=10.0)
    assert settled(None, 400, stopped_at=10.0, now=10.0, settle_timeout_s=10.0)


# ---- min_resident_s and starvation -------------------------------------------------------------

def test_a_freshly_loaded_replica_stays_min_resident_s() -> None:
    residents = [res("b", 600, loaded_at=95.0, last_used=96.0)]
    young = plan(600, residents, now=100.0, min_resident_s=30.0)
    assert young == Plan("wait", "min_resident", retry_after_s=25.0)
    assert plan(600, residents, now=125.0, min_resident_s=30.0).evict == ("b",)


def test_min_resident_wait_is_until_enough_young_replicas_may_go() -> None:
    residents = [res("a", 300, loaded_at=90.0), res("b", 300, loaded_at=80.0), res("c", 300, loaded_at=99.0)]
    # 500 more is needed: b (free at 110) and a (free at 120); c is not needed
    assert plan(600, residents, now=100.0, min_resident_s=30.0).retry_after_s == 20.0


def test_each_replica_may_carry_its_own_worker_min_resident_s() -> None:
    residents = [res("sticky", 400, loaded_at=95.0, min_resident_s=60.0), res("loose", 400, loaded_at=95.0,
                                                                               min_resident_s=0.0)]
    assert plan(500, residents, now=100.0, min_resident_s=30.0).evict == ("loose",)
    assert plan(1000, residents, now=100.0, min_resident_s=30.0).retry_after_s == 55.0
    later = plan(1000, residents, now=155.0, min_resident_s=30.0)
    assert later.action == "evict" and set(later.evict) == {"sticky", "loose"}


def _alternate(min_resident_s: float, ticks: int = 120) -> int:
    """Requests alternate A, B, A, ... one per second; A and B (600 MiB each) do not fit together. Loads."""
    residents: dict[str, Resident] = {}
    waiting: dict[str, float] = {}
    loads = 0
    for now in range(ticks):
        want = "ab"[now % 2]
        if want in residents:
            residents[want] = dataclasses.replace(residents[want], last_used=float(now))
        else:
            waiting.setdefault(want, float(now))
        for key in list(waiting):
            p = plan(600, list(residents.values()), now=float(now), min_resident_s=min_resident_s,
                     waiting_since=waiting[key], max_starvation_s=60.0)
            for gone in p.evict:
                del residents[gone]
            if p.action == "evict":
                p = plan(600, list(residents.values()), now=float(now), min_resident_s=min_resident_s)
            if p.action == "start":
                residents[key] = res(key, 600, loaded_at=float(now), last_used=float(now))
                del waiting[key]
                loads += 1
    return loads


def test_alternating_traffic_to_two_workers_that_do_not_fit_together_does_not_thrash() -> None:
    assert _alternate(min_resident_s=0.0) > 100           # without the floor: a swap on every request
    assert 2 <= _alternate(min_resident_s=30.0) <= 5      # with it: at most one swap per 30 s


def test_a_waiter_blocked_by_busy_replicas_drains_them_after_max_starvation_s() -> None:
    residents = [res("hot", 700, busy=True, last_used=90.0), res("pinned", 200, pinned=True)]
    early = plan(500, residents, now=100.0, waiting_since=95.0, max_starvation_s=10.0)
    assert early.action == "wait" and early.reason == "busy" and early.drain == ()
    late = plan(500, residents, now=105.0, waiting_since=95.0, max_starvation_s=10.0)
    assert late.action == "wait" and late.reason == "starved"
    assert late.drain == ("hot",) and late.evict == ()
    drained = [dataclasses.replace(residents[0], busy=False), residents[1]]
    assert plan(500, drained, now=106.0, waiting_since=95.0, max_starvation_s=10.0).evict == ("hot",)


def test_starvation_drains_only_the_busy_replicas_needed() -> None:
    residents = [res("x", 400, busy=True, last_used=10.0), res("y", 400, busy=True, last_used=20.0),
                 res("idle", 200, last_used=1.0)]
    late = plan(500, residents, now=100.0, waiting_since=0.0, max_starvation_s=10.0)
    assert late.drain == ("x",)


def test_no_drain_when_starvation_bound_is_off_or_idle_replicas_suffice() -> None:
    residents = [res("hot", 700, busy=True)]
    assert plan(500, residents, now=1e6, waiting_since=0.0, max_starvation_s=None).drain == ()
    residents = [res("hot", 500, busy=True), res("idle", 500)]
    assert plan(500, residents, now=1e6, waiting_since=0.0, max_starvation_s=1.0).evict == ("idle",)


def test_first_waiter_is_the_longest_waiting() -> None:
    assert first_waiter({"a": 5.0, "b": 2.0, "c": 9.0}) == "b"
    assert first_waiter({}) is None


# ---- idle unload -------------------------------------------------------------------------------

def test_idle_counts_from_the_end_of_the_last_request() -> None:
    r = res("a", 100, loaded_at=0.0, last_used=50.0)
    assert not idle_due(r, 60.0, now=100.0)
    assert idle_due(r, 60.0, now=110.0)


def test_busy_stopping_unloaded_or_switched_off_is_never_idle() -> None:
    r = res("a", 100, last_used=0.0)
    assert not idle_due(dataclasses.replace(r, busy=True), 60.0, now=1e6)
    assert not idle_due(dataclasses.replace(r, stopping=True), 60.0, now=1e6)
    assert not idle_due(dataclasses.replace(r, started=False), 60.0, now=1e6)
    assert not idle_due(r, 0.0, now=1e6)


# ---- check-config ------------------------------------------------------------------------------

def test_a_declared_need_above_budget_minus_reserve_is_a_config_problem_naming_the_key() -> None:
    problems = check_static_fit([WorkerNeed("workers.chat", 15000, (0, 1)), WorkerNeed("workers.embed", 900, (0,))],
                                {0: 16000, 1: 24000}, 1500)
    assert len(problems) == 1
    assert problems[0].startswith("workers.chat.gpu_memory_mb: 15000 MiB")
    assert "GPU 0" in problems[0] and "14500 MiB" in problems[0]


def test_no_problem_when_it_fits_or_is_unknowable() -> None:
    assert check_static_fit([WorkerNeed("workers.chat", 14000, (0,))], {0: 16000}, 1500) == []
    assert check_static_fit([WorkerNeed("workers.chat", 99000, (2,))], {0: 16000}, 0) == []   # no budget for 2
    assert check_static_fit([WorkerNeed("workers.chat", 0, (0,))], {0: 100}, 0) == []        # learned


def test_pinned_workers_that_cannot_share_a_gpu_or_leave_no_room_are_problems() -> None:
    both = check_static_fit([WorkerNeed("workers.a", 600, (0,), pinned=True),
                             WorkerNeed("workers.b", 600, (0,), pinned=True)], {0: 1000}, 0)
    assert len(both) == 1 and "workers.a, workers.b" in both[0]
    beside = check_static_fit([WorkerNeed("workers.a", 600, (0,), pinned=True),
                               WorkerNeed("workers.c", 500, (0,))], {0: 1000}, 0)
    assert len(beside) == 1 and beside[0].startswith("workers.c.gpu_memory_mb: 500 MiB does not fit beside pinned")
    unpinned = check_static_fit([WorkerNeed("workers.a", 600, (0,)), WorkerNeed("workers.c", 500, (0,))],
                                {0: 1000}, 0)
    assert unpinned == []


def test_a_reserve_that_swallows_the_budget_is_a_problem() -> None:
    problems = check_static_fit([], {3: 1000}, 1000)
    assert problems == ["gpu.reserve_mb: 1000 MiB leaves nothing of gpu.budget_mb.3 (1000 MiB)"]


# ---- properties --------------------------------------------------------------------------------

residents_st = st.lists(
    st.builds(
        Resident,
        key=st.none(),                      # replaced by a unique index below
        gpu=st.sampled_from([0, 0, 0, 1]),
        declared_bytes=st.integers(0, 600),
        learned_bytes=st.integers(0, 600),
        started=st.booleans(),
        busy=st.booleans(),
        pinned=st.booleans(),
        last_used=st.floats(0, 100),
        loaded_at=st.floats(0, 100),
        stopping=st.booleans(),
        min_resident_s=st.none() | st.sampled_from([0.0, 30.0]),
    ),
    max_size=8,
).map(lambda rs: [dataclasses.replace(r, key=i) for i, r in enumerate(rs)])


@settings(max_examples=400, deadline=None)
@given(
    residents=residents_st,
    need=st.integers(0, 1200),
    capacity=st.integers(0, 1500),
    foreign=st.integers(0, 500),
    now=st.floats(0, 200),
    min_resident_s=st.sampled_from([0.0, 10.0, 60.0]),
    waiting_since=st.none() | st.floats(0, 200),
    max_starvation_s=st.none() | st.floats(0, 100),
    settling=st.booleans(),
)
def test_plans_respect_the_ledger(residents: list[Resident], need: int, capacity: int, foreign: int, now: float,
                                  min_resident_s: float, waiting_since: float | None, max_starvation_s: float | None,
                                  settling: bool) -> None:
    p = plan_start(StartAsk(need, 0, capacity, foreign, min_resident_s=min_resident_s,
                            max_starvation_s=max_starvation_s, waiting_since=waiting_since, settling=settling),
                   residents, now)
    here = [r for r in residents if r.gpu == 0 and r.holds]
    by_key = {r.key: r for r in residents}
    held = held_bytes(here, foreign)
    pinned = sum(r.footprint for r in here if r.pinned and not r.stopping)

    assert (p.action == "refuse") == (need > capacity - pinned - foreign)
    assert bool(p.evict) == (p.action == "evict")
    if p.action == "start":
        assert held + need <= capacity
    for key in p.evict:
        r = by_key[key]
        assert r.gpu == 0 and r.started and not (r.busy or r.pinned or r.stopping)
        assert now >= r.may_go_at(min_resident_s)
    if p.evict:
        evicted = [by_key[k] for k in p.evict]
        assert [r.last_used for r in evicted] == sorted(r.last_used for r in evicted)   # LRU first
        after = held - sum(r.footprint for r in evicted) - sum(r.footprint for r in here if r.stopping)
        assert after + need <= capacity
        assert after + evicted[-1].footprint + need > capacity                         # none more than needed
        assert not settling
    for key in p.drain:
        r = by_key[key]
        assert r.gpu == 0 and r.started and r.busy and not (r.pinned or r.stopping)
    if p.drain:
        assert p.action == "wait" and waiting_since is not None and max_starvation_s is not None
        assert now - waiting_since >= max_starvation_s
