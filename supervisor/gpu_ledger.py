"""The GPU memory ledger: whether a replica may start on a GPU, which idle replicas to evict, when to wait or refuse.

Pure functions of plain values: no clock (callers pass `now`), no I/O, no logging. Sizes are bytes, times seconds
on the caller's monotonic clock. The fleet builds `Resident` records from its replicas and acts on the `Plan`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

MIB = 1024 * 1024
DEFAULT_RETRY_S = 1.0      # re-plan / Retry-After when nothing better is known

Action = Literal["start", "evict", "wait", "refuse"]


@dataclass(frozen=True)
class Resident:
    """One replica as the ledger sees it (the replica about to start is not one of them)."""

    key: Hashable
    gpu: int
    declared_bytes: int = 0     # `gpu_memory_mb` in bytes; 0 = learned only
    learned_bytes: int = 0      # the peak NVML has seen for its process tree
    started: bool = True        # its process is alive (starting, ready, busy, draining)
    busy: bool = False          # requests in flight or streaming
    pinned: bool = False
    last_used: float = 0.0      # end of its last request, or its load time
    loaded_at: float = 0.0
    stopping: bool = False      # marked for eviction / being stopped; held until its memory is seen back
    min_resident_s: float | None = None     # its worker's floor; None: the plan's `min_resident_s`
    can_sleep: bool = False     # its worker has a sleep mode: making room may put it to sleep instead
    asleep: bool = False        # its process sleeps: it holds `asleep_bytes` only
    asleep_bytes: int = 0       # what it holds on its GPU while asleep (declared, else learned)
    sleeping: bool = False      # being put to sleep now: held whole until it is asleep
    host_bytes: int = 0         # host RAM it holds while asleep (declared, else its RSS)

    @property
    def footprint(self) -> int:
        """What it holds on its GPU now (asleep: what sleeping leaves)."""
        return self.asleep_bytes if self.asleep else max(self.declared_bytes, self.learned_bytes)

    @property
    def sleep_frees(self) -> int:
        """What putting it to sleep would give back on its GPU (0: it cannot sleep, or sleeps already)."""
        return max(0, self.footprint - self.asleep_bytes) if self.can_sleep and not self.asleep else 0

    @property
    def holds(self) -> bool:
        return self.started or self.stopping

    def may_go_at(self, default_min_resident_s: float) -> float:
        """When it has been resident long enough to be evicted."""
        floor = default_min_resident_s if self.min_resident_s is None else self.min_resident_s
        return self.loaded_at + floor


@dataclass(frozen=True)
class Plan:
    """What to do about one start. `evict`: stop these (LRU first, reason `evicted`) and put those in `sleep`
    to sleep (the cheaper tier, where host memory allows), then wait for the memory to settle and plan again.
    `drain`: stop routing new requests to these busy replicas (the waiter starved).

    Reasons: start: unknown_capacity, fits; evict: evict; wait: stopping, settling, min_resident, busy, starved;
    refuse: too_large (above the GPU), pinned (above what pinned replicas leave), foreign (with others' use).
    """

    action: Action
    reason: str
    evict: tuple[Hashable, ...] = ()
    drain: tuple[Hashable, ...] = ()
    retry_after_s: float | None = None
    sleep: tuple[Hashable, ...] = ()


def capacity_bytes(nvml_total: int | None, budget_mb: int | None, reserve_mb: int) -> int | None:
    """min(NVML total, budget) - reserve, at least 0; None when neither NVML nor a budget knows the GPU."""
    known = [v for v in (nvml_total, None if budget_mb is None else budget_mb * MIB) if v is not None]
    if not known:
        return None
    return max(0, min(known) - reserve_mb * MIB)


def foreign_bytes(nvml_used: int | None, ours_by_nvml: int) -> int:
    """What processes that are not ours use on a GPU: NVML used minus ours; 0 without NVML."""
    return 0 if nvml_used is None else max(0, nvml_used - ours_by_nvml)


def held_bytes(residents_on_gpu: Iterable[Resident], foreign: int) -> int:
    """max(declared, learned) of every replica that holds memory (started or not yet settled), plus foreign."""
    return foreign + sum(r.footprint for r in residents_on_gpu if r.holds)


def _take(candidates: Sequence[Resident], amount: int) -> tuple[Resident, ...] | None:
    """The shortest prefix that frees at least `amount`, or None when all of them together would not."""
    freed = 0
    for i, r in enumerate(candidates):
        freed += r.footprint
        if freed >= amount:
            return tuple(candidates[: i + 1])
    return None


@dataclass(frozen=True)
class StartAsk:
    """One replica's ask for room: what it needs on which GPU, and what the GPU has."""

    need_bytes: int
    gpu: int
    capacity: int | None  # None: neither NVML nor a budget knows this GPU
    foreign: int = 0  # used by processes not ours
    min_resident_s: float = 0.0
    max_starvation_s: float | None = None
    waiting_since: float | None = None
    settling: bool = False
    retry_hint_s: float | None = None
    host_free: int | None = None  # host RAM sleepers may still fill (available - host_reserve_mb); None: unknown


def host_allows(host_bytes: int, host_free: int | None) -> bool:
    """Whether a replica may sleep with `host_bytes` in host RAM: they fit what is free (unknown: yes)."""
    return host_free is None or host_bytes <= host_free


def _take_tiered(candidates: Sequence[Resident], amount: int,
                 host_free: int | None) -> tuple[tuple[Resident, ...], tuple[Resident, ...]] | None:
    """The shortest LRU prefix that frees `amount`, each one put to sleep where it can and host memory
    allows (else stopped): (to sleep, to stop), or None when the prefix never frees enough."""
    freed = 0
    sleep: list[Resident] = []
    stop: list[Resident] = []
    for r in candidates:
        if r.sleep_frees > 0 and host_allows(r.host_bytes, host_free):
            sleep.append(r)
            freed += r.sleep_frees
            host_free = None if host_free is None else host_free - r.host_bytes
        else:
            stop.append(r)
            freed += r.footprint
        if freed >= amount:
            return tuple(sleep), tuple(stop)
    return None


def plan_start(ask: StartAsk, residents: Iterable[Resident], now: float) -> Plan:
    """Start, evict, wait or refuse: the choice for one replica that needs `ask.need_bytes` on `ask.gpu`.

    `settling`: a stop on this GPU has not shown its memory back in NVML yet (within `settle_timeout_s`); no
    more evictions until it has, since a stale reading would make the shortfall look larger than it is.
    `min_resident_s`: how long a fresh replica stays before it may be evicted, unless its record says.
    `waiting_since`: when the waiter began waiting for room (None: not yet). `max_starvation_s` None: never
    drain. `retry_hint_s` (e.g. the time left to the waiter's deadline) is the Retry-After of a wait on busy
    replicas, whose end nobody knows.
    """
    need_bytes, gpu, capacity, foreign = ask.need_bytes, ask.gpu, ask.capacity, ask.foreign
    min_resident_s, settling, retry_hint_s = ask.min_resident_s, ask.settling, ask.retry_hint_s
    if capacity is None:
        return Plan("start", "unknown_capacity")
    here = [r for r in residents if r.gpu == gpu and r.holds]
    retry = DEFAULT_RETRY_S if retry_hint_s is None else retry_hint_s
    pinned = sum(r.footprint for r in here if r.pinned and not r.stopping)
    if need_bytes > capacity:
        return Plan("refuse", "too_large")
    if need_bytes > capacity - pinned:
        return Plan("refuse", "pinned")
    if need_bytes > capacity - pinned - foreign:
        return Plan("refuse", "foreign", retry_after_s=retry)   # others' use may shrink
    if held_bytes(here, foreign) + need_bytes <= capacity:
        return Plan("start", "fits")

    short = (held_bytes(here, foreign) + need_bytes - capacity - sum(r.footprint for r in here if r.stopping)
             - sum(r.sleep_frees for r in here if r.sleeping))
    if short <= 0:
        return Plan("wait", "stopping", retry_after_s=DEFAULT_RETRY_S)
    if settling:
        return Plan("wait", "settling", retry_after_s=DEFAULT_RETRY_S)

    def free(r: Resident) -> bool:
        return r.started and not (r.pinned or r.stopping or r.sleeping) and r.footprint > 0

    idle = [r for r in here if free(r) and not r.busy]
    ready = sorted((r for r in idle if now >= r.may_go_at(min_resident_s)), key=lambda r: r.last_used)
    tiered = _take_tiered(ready, short, ask.host_free)
    if tiered is not None:
        sleep, stop = tiered
        return Plan("evict", "evict", evict=tuple(r.key for r in stop), sleep=tuple(r.key for r in sleep))
    chosen = _take(ready, short)
    if chosen is not None:
        return Plan("evict", "evict", evict=tuple(r.key for r in chosen))

    short -= sum(r.footprint for r in ready)
    young = sorted((r for r in idle if now < r.may_go_at(min_resident_s)), key=lambda r: r.may_go_at(min_resident_s))
    chosen = _take(young, short)
    if chosen is not None:   # evict nothing yet: all that is needed goes at once, when the last may go
        return Plan("wait", "min_resident", retry_after_s=chosen[-1].may_go_at(min_resident_s) - now)

    short -= sum(r.footprint for r in young)
    starved = (ask.waiting_since is not None and ask.max_starvation_s is not None
               and now - ask.waiting_since >= ask.max_starvation_s)
    if not starved:
        return Plan("wait", "busy", retry_after_s=retry)
    busy = sorted((r for r in here if free(r) and r.busy), key=lambda r: r.last_used)
    chosen = _take(busy, short) or tuple(busy)   # never None: the refusal above leaves enough unpinned memory
    return Plan("wait", "starved", drain=tuple(r.key for r in chosen), retry_after_s=retry)


@dataclass(frozen=True)
class GateStep:
    """What the gate does for one waiting replica now: start it, refuse it for good, or wait (evicting
    and draining others meanwhile) and look again after `retry_after_s`."""

    action: Literal["start", "refuse", "wait"]
    reason: str
    evict: tuple[Hashable, ...] = ()
    drain: tuple[Hashable, ...] = ()
    retry_after_s: float = DEFAULT_RETRY_S
    sleep: tuple[Hashable, ...] = ()


def gate_step(plan: Plan, key: Hashable, first: Hashable | None) -> GateStep:
    """The plan for `key`, given `first`, the longest waiter on its GPU: only the first waiter starts on
    a known GPU (FIFO) or evicts; a refusal that others' use may lift (`foreign`) is waited out."""
    if plan.action == "start" and (first in (None, key) or plan.reason == "unknown_capacity"):
        return GateStep("start", plan.reason)
    if plan.action == "refuse" and plan.reason != "foreign":
        return GateStep("refuse", plan.reason)
    mine = plan.action == "evict" and first == key
    return GateStep("wait", plan.reason, plan.evict if mine else (), plan.drain, plan.retry_after_s or DEFAULT_RETRY_S,
                    plan.sleep if mine else ())


def idle_due(resident: Resident, idle_unload_s: float, now: float) -> bool:
    """Whether a replica has been idle `idle_unload_s` (0 = never) since its last request ended; busy is never
    idle. Pinned replicas may still unload for idleness: pinning only protects against eviction."""
    if idle_unload_s <= 0 or not resident.started or resident.busy or resident.stopping:
        return False
    return now - resident.last_used >= idle_unload_s


def sleep_due(resident: Resident, after_idle_s: float, host_free: int | None, now: float) -> bool:
    """Whether an awake replica that can sleep has been idle `after_idle_s` (0 = never) and host memory takes
    it; busy, asleep, stopping or being put to sleep: never."""
    if after_idle_s <= 0 or not resident.can_sleep or resident.asleep or resident.sleeping:
        return False
    return idle_due(resident, after_idle_s, now) and host_allows(resident.host_bytes, host_free)


def settled(nvml_used: int | None, target_used: int, stopped_at: float, now: float, settle_timeout_s: float) -> bool:
    """Whether a stop's memory counts as back: NVML shows used <= `target_used` (used before the stop minus what
    the stopped process tree held), NVML is absent, or `settle_timeout_s` has passed."""
    return nvml_used is None or nvml_used <= target_used or now - stopped_at >= settle_timeout_s


def first_waiter(waiting_since: Mapping[Hashable, float]) -> Hashable | None:
    """Of the replicas waiting for room on one GPU, the one to plan for: the longest waiting (FIFO, so none
    starves behind a later arrival, and two waiters never evict for each other at once)."""
    return min(waiting_since, key=waiting_since.__getitem__, default=None)


@dataclass(frozen=True)
class WorkerNeed:
    """One worker's declared need, for `check_static_fit`."""

    path: str                   # its config key path, e.g. "workers.chat"
    gpu_memory_mb: int          # 0 = learned (not knowable before it runs)
    gpus: tuple[int, ...]
    pinned: bool = False


def check_static_fit(workers: Iterable[WorkerNeed], budgets_mb: Mapping[int, int], reserve_mb: int) -> list[str]:
    """Needs that can never fit a GPU whose `gpu.budget_mb` is known: check-config's problems, with key paths."""
    workers = list(workers)
    problems: list[str] = []
    for gpu, budget in sorted(budgets_mb.items()):
        cap = budget - reserve_mb
        if cap <= 0:
            problems.append(f"gpu.reserve_mb: {reserve_mb} MiB leaves nothing of gpu.budget_mb.{gpu} ({budget} MiB)")
            continue
        where = f"GPU {gpu} (gpu.budget_mb.{gpu} {budget} MiB - gpu.reserve_mb {reserve_mb} MiB = {cap} MiB)"
        here = [w for w in workers if gpu in w.gpus and w.gpu_memory_mb > 0]
        for w in here:
            if w.gpu_memory_mb > cap:
                problems.append(f"{w.path}.gpu_memory_mb: {w.gpu_memory_mb} MiB does not fit on {where}")
        pinned = [w for w in here if w.pinned and w.gpu_memory_mb <= cap]
        pinned_mb = sum(w.gpu_memory_mb for w in pinned)
        names = ", ".join(w.path for w in pinned)
        if len(pinned) > 1 and pinned_mb > cap:
            problems.append(f"{names}: pinned, {pinned_mb} MiB together, do not fit on {where}")
        elif pinned_mb:
            for w in here:
                if not w.pinned and w.gpu_memory_mb <= cap < w.gpu_memory_mb + pinned_mb:
                    problems.append(
                        f"{w.path}.gpu_memory_mb: {w.gpu_memory_mb} MiB does not fit beside pinned {names}"
                        f" ({pinned_mb} MiB) on {where}"
                    )
    return problems
