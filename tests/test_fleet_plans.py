"""Plain-value tests of the fleet's decisions: whether a replica admits a request, the GPU room's gate
plans over replica records, and pressure control's plans. No process, no server, no clock."""

from __future__ import annotations

import itertools

import pytest

from supervisor import config as cfg
from supervisor.circuit_breaker import CircuitBreaker
from supervisor.fleet import Replica
from supervisor.fleet.process import ExitInfo, Incarnation, InFlight
from supervisor.fleet.replica import admits
from supervisor.fleet.room import GpuRoom
from supervisor.gpu_ledger import MIB, Plan, gate_step
from supervisor.gpu_watch import DeviceReading, Reading
from supervisor.pressure import Decision, Level
from supervisor.pressure_control import ReplicaFacts, Streak, fallback_plan, plan_reaction
from supervisor.states import SERVING_STATES, ExitReason, WorkerState

GIB = 1024 * MIB


def settings(extra: str = "") -> cfg.Settings:
    return cfg.parse("worker: {command: [python3, w.py]}\n" + extra)


def replica(worker: str = "w", index: int = 0, gpu: int | None = 0, *, state=WorkerState.READY,
            alive: bool = True, s: cfg.Settings | None = None, **spec: object) -> Replica:
    s = s or settings()
    r = Replica(worker, index, gpu, s.worker.model_copy(update=spec), CircuitBreaker(s.breaker))
    r.state = state
    if alive:
        r.current = Incarnation(1, f"/tmp/nowhere-{worker}-{index}.sock")
        r.current.ready_at = r.current.spawned_at = 1.0
    return r


# -- admission ------------------------------------------------------------------------------------
@pytest.mark.parametrize("state", list(WorkerState))
def test_only_a_live_serving_replica_with_nothing_pending_admits(state: WorkerState) -> None:
    for alive, pending, draining, evicting in itertools.product([True, False], repeat=4):
        got = admits(state, alive, pending, draining, evicting)
        assert got == (state in SERVING_STATES and alive and not (pending or draining or evicting))


def test_a_replica_record_admits_by_its_own_facts() -> None:
    r = replica()
    assert r.admits and r.can_take(0.0)
    r.room.draining = True  # the ledger drains it for a waiter
    assert not r.admits
    r.room.clear()
    assert r.admits
    r.current.exited.set()  # its process is gone, whatever the state says yet
    assert not r.admits and not r.serving
    assert not replica(state=WorkerState.STARTING).admits
    assert not replica(alive=False).admits


def test_an_open_breaker_keeps_a_serving_replica_from_taking_requests() -> None:
    r = replica(s=settings("breaker: {window: 4, min_calls: 4, failure_rate: 0.5, open_s: 5}\n"))
    for t in range(4):
        r.breaker.record(False, 0.01, float(t), float(t))
    assert r.admits and not r.can_take(4.0)
    assert r.can_take(10.0)  # open_s passed: the next request is its probe


# -- the GPU room's gate -----------------------------------------------------------------------------
def test_gate_step_starts_only_the_first_waiter_and_only_it_evicts() -> None:
    fits = Plan("start", "fits")
    assert gate_step(fits, "a", None).action == "start"
    assert gate_step(fits, "a", "a").action == "start"
    assert gate_step(fits, "b", "a").action == "wait"  # FIFO: the longer waiter goes first
    assert gate_step(Plan("start", "unknown_capacity"), "b", "a").action == "start"  # nothing to share
    evict = Plan("evict", "evict", evict=("x",))
    assert gate_step(evict, "a", "a").evict == ("x",)
    assert gate_step(evict, "b", "a").evict == ()  # two waiters never evict for each other at once
    assert gate_step(Plan("refuse", "too_large"), "a", "a").action == "refuse"
    foreign = gate_step(Plan("refuse", "foreign", retry_after_s=3.0), "a", "a")
    assert foreign.action == "wait" and foreign.retry_after_s == 3.0  # others' use may shrink
    drain = gate_step(Plan("wait", "starved", drain=("y",), retry_after_s=None), "a", "a")
    assert drain.drain == ("y",) and drain.retry_after_s > 0


def reading(used: int, total: int = 8 * GIB, ours: int = 0) -> Reading:
    dev = DeviceReading(index=0, name="fake", memory_used_bytes=used, memory_total_bytes=total, utilization=None,
                        temperature_c=None)
    return Reading(at=0.0, available=True, devices=(dev,), host_used_bytes=None, host_total_bytes=None,
                   worker_rss_bytes=None, worker_gpu_memory_bytes=None, level=Level.OK, ours_by_device={0: ours})


def test_the_room_evicts_the_least_recently_used_idle_replica_for_a_waiter() -> None:
    s = settings()
    old = replica("old", gpu=0, gpu_memory_mb=3000, s=s)
    recent = replica("recent", gpu=0, gpu_memory_mb=3000, s=s)
    waiter = replica("new", gpu=0, state=WorkerState.STARTING, alive=False, gpu_memory_mb=3000, s=s)
    for r, used in ((old, 10.0), (recent, 50.0)):
        r.room.admitted = True
        r.last_used = used
    waiter.room.waiting_since = 60.0
    room = GpuRoom(s, lambda: [old, recent, waiter])
    room.on_reading(reading(used=6000 * MIB, ours=6000 * MIB))
    step = room.gate(waiter, 100.0)
    assert step.action == "wait" and step.evict == (old.key,)
    old.room.evicted_at = 100.0  # being stopped: counted as held until its memory is seen back
    assert room.gate(waiter, 100.5).evict == ()
    assert room.refusal(waiter) is None


def test_the_room_refuses_a_replica_larger_than_its_gpu_and_says_why() -> None:
    s = settings("gpu: {budget_mb: {0: 2000}}\n")
    big = replica("big", gpu=0, state=WorkerState.UNLOADED, alive=False, gpu_memory_mb=4000, s=s)
    room = GpuRoom(s, lambda: [big])
    assert room.refusal(big) == "too_large"
    big.room.waiting_since = 1.0
    assert room.gate(big, 2.0).action == "refuse"
    assert "4000 MiB on GPU 0" in room.waiting(big)


def test_an_idle_replica_is_unloaded_after_its_idle_time_and_a_busy_one_never() -> None:
    idle = replica("idle", idle_unload_s=30.0)
    busy = replica("busy", idle_unload_s=30.0)
    keep = replica("keep", idle_unload_s=0.0)
    for r in (idle, busy, keep):
        r.room.admitted = True
        r.last_used = 0.0
    busy.current.inflight[1] = InFlight(0.0)
    room = GpuRoom(settings(), lambda: [idle, busy, keep])
    assert room.idle_unloads(29.0) == []
    assert room.idle_unloads(31.0) == [idle]


# -- pressure control ------------------------------------------------------------------------------
def facts(*serving: tuple[str, int | None], **recycle: int) -> list[ReplicaFacts]:
    rc = cfg.Recycle(**recycle)
    return [ReplicaFacts((w, 0), gpu, True, rc) for w, gpu in serving]


def pressure_reading(ratio_by_gpu: dict[int, float], replicas=None, stale: bool = False) -> Reading:
    devs = tuple(DeviceReading(index=i, name="fake", memory_used_bytes=int(r * 8 * GIB), memory_total_bytes=8 * GIB,
                               utilization=None, temperature_c=None) for i, r in ratio_by_gpu.items())
    return Reading(at=0.0, available=True, devices=devs, host_used_bytes=None, host_total_bytes=None,
                   worker_rss_bytes=None, worker_gpu_memory_bytes=None, level=Level.OK, stale=stale,
                   replicas=replicas or {})


GPU = settings().gpu


def test_a_critical_reading_restarts_the_replicas_on_the_critical_gpu_and_spaces_repeats() -> None:
    d = Decision(level=Level.CRITICAL, restart=True)
    reps = facts(("a", 0), ("b", 1))
    plan = plan_reaction(d, pressure_reading({0: 0.99, 1: 0.5}), reps, Streak(), GPU, now=100.0)
    assert plan.restart == (("a", 0),) and plan.streak == Streak(1, 100.0)
    # memory held by someone else: the next restart waits twice as long as the last, and so on
    base = max(1.0, GPU.actions.critical.restart_after_s or 0)
    soon = plan_reaction(d, pressure_reading({0: 0.99, 1: 0.5}), reps, plan.streak, GPU, now=100.0 + base * 2 - 0.1)
    assert soon.restart == () and soon.streak == plan.streak
    later = plan_reaction(d, pressure_reading({0: 0.99, 1: 0.5}), reps, plan.streak, GPU, now=100.0 + base * 2)
    assert later.restart == (("a", 0),) and later.streak.count == 2
    # relief resets the streak
    calm = plan_reaction(Decision(), pressure_reading({0: 0.2}), reps, later.streak, GPU, now=500.0)
    assert calm.restart == () and calm.streak.count == 0


def test_with_no_gpu_named_critical_every_serving_replica_is_restarted() -> None:
    d = Decision(level=Level.CRITICAL, restart=True)
    reps = facts(("a", None), ("b", None)) + [ReplicaFacts(("c", 0), None, False, cfg.Recycle())]
    plan = plan_reaction(d, pressure_reading({}), reps, Streak(), GPU, now=1.0)
    assert plan.restart == (("a", 0), ("b", 0))  # not the one that does not serve


def test_readings_and_leaks_are_planned_from_the_reading_and_a_stale_one_recycles_nothing() -> None:
    reps = facts(("a", 0), ("b", 0), max_rss_mb=100)
    mem = {("a", 0): (200 * MIB, 5 * MIB), ("b", 0): (50 * MIB, None)}
    plan = plan_reaction(Decision(), pressure_reading({0: 0.1}, mem), reps, Streak(), GPU, now=1.0)
    assert plan.readings == {("a", 0): (200 * MIB, 5 * MIB), ("b", 0): (50 * MIB, 0)}
    assert plan.recycle == ((("a", 0), "rss"),)
    stale = plan_reaction(Decision(), pressure_reading({0: 0.1}, mem, stale=True), reps, Streak(), GPU, now=1.0)
    assert stale.recycle == ()


def test_shedding_pausing_caps_and_cleanup_come_from_the_decision() -> None:
    d = Decision(level=Level.HARD, shed_below="normal", shed_below_index=1, concurrency_cap=1, pause=True,
                 cleanup=True)
    reps = facts(("a", 0)) + [ReplicaFacts(("b", 0), 0, False, cfg.Recycle())]
    plan = plan_reaction(d, pressure_reading({0: 0.9}), reps, Streak(), GPU, now=1.0)
    assert (plan.shed_below, plan.pause, plan.cap, plan.cleanup) == (1, True, 1, (("a", 0),))


def test_the_cpu_fallback_engages_after_enough_oom_restarts_and_once() -> None:
    fb = settings("fallback: {cpu_after_oom_restarts: 2, env: {CUDA_VISIBLE_DEVICES: ''}}\n").fallback
    oom = ExitInfo(ExitReason.OOM, None, 9, 0.0, 1, 1.0)
    assert fallback_plan(oom, 1, None, fb) is None
    assert fallback_plan(oom, 2, None, fb) == {"CUDA_VISIBLE_DEVICES": ""}
    assert fallback_plan(oom, 3, "cpu-fallback", fb) is None  # already degraded
    crash = ExitInfo(ExitReason.CRASH, 1, None, 0.0, 1, 1.0)
    assert fallback_plan(crash, 5, None, fb) is None
