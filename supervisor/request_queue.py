"""The bounded priority queue and the concurrency slots (pools) that requests wait for.

One wait line per (pool, level); a higher level is always granted first; counts are global so the level
and total bounds hold across pools. With `queue.fairness` off a line is one FIFO; with it on, a line is
a FairLevel: retried tickets first, then deficit round robin over per-key FIFOs, so one client's flood
cannot push another's requests back. Removal is lazy (a cancelled ticket is skipped when popped, and a
FIFO mostly made of cancelled tickets is compacted), so enqueue, cancel and grant are O(1) amortised
however many requests and keys wait. No clock inside: callers pass `now`.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator

from .config import Queue as QueueSettings
from .fairness import ANONYMOUS, weight_table

WAITING, GRANTED, CANCELLED, DONE = 0, 1, 2, 3


class Ticket:
    __slots__ = ("level", "pool", "gpu_mb", "enqueued_at", "future", "state", "key", "flow", "cost")

    def __init__(self, level: int, pool: Pool, gpu_mb: int, now: float, key: str | None = None, cost: float = 1.0):
        self.level = level
        self.pool = pool
        self.gpu_mb = gpu_mb
        self.enqueued_at = now
        self.future: asyncio.Future[None] | None = None
        self.state = WAITING
        self.key = key  # the client's hashed key (supervisor.fairness), None with fairness off
        self.flow: Flow | None = None  # its key's FIFO while it waits in a FairLevel (None: retried, first)
        self.cost = cost  # what a grant takes from its key's deficit: 1, or its token estimate with budgets on


class Flow:
    """One key's waiting tickets in one (pool, level), and its deficit round robin credit."""

    __slots__ = ("key", "quantum", "tickets", "live", "deficit", "credited", "dead")

    def __init__(self, key: str, quantum: float):
        self.key = key
        self.quantum = quantum  # >= 1: a turn always grants at least one request of cost 1
        self.tickets: deque[Ticket] = deque()
        self.live = 0  # WAITING tickets (the deque also holds cancelled ones)
        self.deficit = 0.0
        self.credited = False  # got its quantum for the turn it is having at the head of the ring
        self.dead = False  # emptied: skipped (and dropped) when the ring reaches it


class FairLevel:
    """A level with fairness on: retried tickets first, then deficit round robin over the keys' FIFOs.

    The ring holds the keys with something queued, in turn order; the head is the key whose turn it
    is. A key that empties leaves the ring and forgets its deficit (a key with nothing queued costs
    nothing); a key that comes back joins at the tail.
    """

    __slots__ = ("front", "front_live", "flows", "ring", "quanta")

    def __init__(self) -> None:
        self.front: deque[Ticket] = deque()
        self.front_live = 0
        self.flows: dict[str, Flow] = {}
        self.ring: deque[Flow] = deque()
        self.quanta = 0.0  # sum of the live flows' quanta (for estimates)

    def __iter__(self) -> Iterator[Ticket]:
        """Every ticket held, cancelled ones included: retried ones, then each key's FIFO."""
        yield from self.front
        for f in self.flows.values():
            yield from f.tickets

    def __len__(self) -> int:
        return len(self.front) + sum(len(f.tickets) for f in self.flows.values())

    def in_order(self) -> Iterator[tuple[Ticket, bool]]:
        """The waiting tickets as (ticket, retried): retried ones first, then the keys merged by arrival."""
        for t in self.front:
            if t.state == WAITING:
                yield t, True
        fifos = [[t for t in f.tickets if t.state == WAITING] for f in self.ring if not f.dead]
        for t in heapq.merge(*fifos, key=lambda t: t.enqueued_at):  # keeps each key's own order
            yield t, False

    def put(self, t: Ticket, quantum: float, front: bool) -> None:
        if front:
            self.front.appendleft(t)
            self.front_live += 1
            return
        f = self.flows.get(t.key)  # type: ignore[arg-type]
        if f is None:
            f = self.flows[t.key] = Flow(t.key, quantum)  # type: ignore[index,arg-type]
            self.ring.append(f)
            self.quanta += quantum
        f.tickets.append(t)
        f.live += 1
        t.flow = f

    def drop(self, t: Ticket) -> None:
        """`t` was cancelled while waiting."""
        f = t.flow
        if f is None:
            self.front_live -= 1
            if not self.front_live:
                self.front.clear()
            elif len(self.front) > 2 * self.front_live + 32:
                self.front = deque(x for x in self.front if x.state == WAITING)
            return
        t.flow = None
        f.live -= 1
        if f.live:
            if len(f.tickets) > 2 * f.live + 32:
                f.tickets = deque(x for x in f.tickets if x.state == WAITING)
            return
        self._retire(f)
        if len(self.ring) > 2 * len(self.flows) + 32:  # keys that keep leaving cannot pile up dead flows
            self.ring = deque(x for x in self.ring if not x.dead)

    def _retire(self, f: Flow) -> None:
        f.dead = True
        f.tickets.clear()
        del self.flows[f.key]
        self.quanta -= f.quantum
        if not self.flows:
            self.quanta = 0.0  # no float drift left behind

    def head(self) -> Ticket | None:
        """The ticket to grant next; repeatable (a head kept waiting for memory stays the head)."""
        if self.front_live:
            front = self.front
            while front[0].state != WAITING:
                front.popleft()
            return front[0]
        ring = self.ring
        while ring:
            f = ring[0]
            if f.dead:
                ring.popleft()
                continue
            if not f.credited:
                f.credited = True
                f.deficit += f.quantum
            dq = f.tickets
            while dq[0].state != WAITING:
                dq.popleft()
            if f.deficit >= dq[0].cost:
                return dq[0]
            f.credited = False  # its turn is over: to the tail
            ring.rotate(-1)
        return None

    def take(self, t: Ticket) -> None:
        """Grant `t`, the ticket head() returned."""
        f = t.flow
        if f is None:
            self.front.popleft()
            self.front_live -= 1
            if not self.front_live:
                self.front.clear()
            return
        t.flow = None
        f.tickets.popleft()
        f.live -= 1
        f.deficit -= t.cost
        if not f.live:
            self._retire(f)
            self.ring.popleft()


class Pool:
    __slots__ = ("name", "size", "cap", "in_use", "waiting", "levels", "live", "svc_ewma")

    def __init__(self, name: str, size: int, n_levels: int):
        self.name = name
        self.size = size
        self.cap: int | None = None
        self.in_use = 0
        self.waiting = 0
        self.levels: list = [deque() for _ in range(n_levels)]  # deque[Ticket] or FairLevel per level
        self.live = [0] * n_levels  # WAITING tickets per level (the lines also hold cancelled ones)
        self.svc_ewma = 0.0  # seconds per request, smoothed

    @property
    def slots(self) -> int:
        return self.size if self.cap is None else max(1, min(self.size, self.cap))


class QueueFull(Exception):
    def __init__(self, scope: str):
        self.scope = scope  # "key" (max_queued_per_key), "level" or "total"
        super().__init__(scope)


class RequestQueue:
    def __init__(self, settings: QueueSettings, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self.open = False  # dispatch allowed (worker ready, not paused)
        self.fits: Callable[[int], bool] | None = None  # gpu_memory_mb gate
        self.pools: dict[str, Pool] = {}
        self.depth: list[int] = []
        self.total = 0
        self.reserved_mb = 0  # GPU memory that granted requests declared (route gpu_memory_mb)
        self.key_depth: dict[str, int] = {}  # waiting tickets per key, kept only for max_queued_per_key
        self.configure(settings)

    # -- configuration -------------------------------------------------------------------------
    def configure(self, settings: QueueSettings) -> None:
        """(Re)build levels and pools; waiting tickets keep their place (by level name).

        Turning fairness on or off keeps every waiting ticket: each key keeps its own order, retried
        tickets stay first; keys start a fresh round (deficits are not carried over).
        """
        old_names = getattr(self, "names", ())
        self.settings = settings
        fair = settings.fairness
        self._fair = fair.key is not None
        self._max_per_key = fair.max_queued_per_key if self._fair else 0
        weights = weight_table(fair)
        unit = min(1.0, *weights.values()) if weights else 1.0  # the lightest key gets a quantum of 1
        self._quanta = {k: w / unit for k, w in weights.items()}
        self._quantum = 1.0 / unit  # a key not named in weights
        self.names: tuple[str, ...] = settings.priorities
        self.index = {n: i for i, n in enumerate(self.names)}
        self.max_level = [settings.level_max_size(n) for n in self.names]
        new_pools: dict[str, Pool] = {}
        for name, size in settings.pool_sizes().items():
            p = self.pools.get(name) or Pool(name, size, len(self.names))
            p.size = size
            new_pools[name] = p
        default_idx = self.index[settings.default_priority]
        moving: list[tuple[Pool, int, Ticket, bool]] = []
        for name, p in self.pools.items():
            target = new_pools.get(name) or new_pools["default"]
            for i, line in enumerate(p.levels):
                lname = old_names[i] if i < len(old_names) else None
                ni = self.index.get(lname, default_idx) if lname else default_idx
                waiting = line.in_order() if isinstance(line, FairLevel) else (
                    (t, False) for t in line if t.state == WAITING)
                moving.extend((target, ni, t, front) for t, front in waiting)
        for p in new_pools.values():
            p.levels = [FairLevel() if self._fair else deque() for _ in self.names]
            p.live = [0] * len(self.names)
            p.waiting = 0
        self.depth = [0] * len(self.names)
        self.key_depth = {}
        for target, ni, t, front in moving:
            t.level, t.pool, t.flow = ni, target, None
            line = target.levels[ni]
            if self._fair:
                if t.key is None:
                    t.key = ANONYMOUS
                if front:  # already in service order: keep it
                    line.front.append(t)
                    line.front_live += 1
                else:
                    line.put(t, self._quanta.get(t.key, self._quantum), False)
                if self._max_per_key:
                    self.key_depth[t.key] = self.key_depth.get(t.key, 0) + 1
            else:
                line.append(t)
            target.live[ni] += 1
            target.waiting += 1
            self.depth[ni] += 1
        self.total = len(moving)
        self.pools = new_pools
        self.pump()

    # -- admission -----------------------------------------------------------------------------
    def check_room(self, level: int, key: str | None = None) -> None:
        """QueueFull when a request of `key` at `level` may not wait: its key's, its level's or the total bound."""
        if self._max_per_key and self.key_depth.get(key or ANONYMOUS, 0) >= self._max_per_key:
            raise QueueFull("key")
        if self.depth[level] >= self.max_level[level]:
            raise QueueFull("level")
        if self.total >= self.settings.max_size:
            raise QueueFull("total")

    def acquire(self, level: int, pool: str, now: float, gpu_mb: int = 0, front: bool = False,
                key: str | None = None, cost: float = 1.0) -> Ticket:
        """A ticket that is GRANTED at once when a slot is free, else WAITING with a future.

        `front` puts a retried request at the head of its level and skips the bounds: it was
        admitted already. `key` is the client's hashed key (supervisor.fairness.client_key); with
        fairness on, None counts as the anonymous key.
        """
        p = self.pools[pool]
        if key is None and self._fair:
            key = ANONYMOUS
        t = Ticket(level, p, gpu_mb, now, key, cost)
        if self.open and p.waiting == 0 and p.in_use < p.slots and self._fits(gpu_mb):
            t.state = GRANTED
            p.in_use += 1
            self.reserved_mb += gpu_mb
            return t
        if not front:
            self.check_room(level, key)
        loop = self._loop or asyncio.get_running_loop()
        t.future = loop.create_future()
        if self._fair:
            p.levels[level].put(t, self._quanta.get(key, self._quantum), front)
            if self._max_per_key:
                self.key_depth[key] = self.key_depth.get(key, 0) + 1  # type: ignore[index]
        elif front:
            p.levels[level].appendleft(t)
        else:
            p.levels[level].append(t)
        p.live[level] += 1
        p.waiting += 1
        self.depth[level] += 1
        self.total += 1
        return t

    def cancel(self, t: Ticket) -> None:
        """The request left (timeout, disconnect): drop its place or give back its slot."""
        if t.state == WAITING:
            t.state = CANCELLED
            p = t.pool
            p.waiting -= 1
            live = p.live[t.level] = p.live[t.level] - 1
            self.depth[t.level] -= 1
            self.total -= 1
            if self._fair:
                p.levels[t.level].drop(t)
                if self._max_per_key:
                    self._uncount(t.key)
                return
            dq = p.levels[t.level]
            if not live:
                dq.clear()
            elif len(dq) > 2 * live + 32:
                # mostly cancelled: rebuild, so a slot held for long cannot pile up dead tickets
                p.levels[t.level] = deque(x for x in dq if x.state == WAITING)
        elif t.state == GRANTED:
            self.release(t, None)

    def _uncount(self, key: str | None) -> None:
        n = self.key_depth.get(key, 0) - 1  # type: ignore[arg-type]
        if n > 0:
            self.key_depth[key] = n  # type: ignore[index]
        else:
            self.key_depth.pop(key, None)  # type: ignore[arg-type]

    def release(self, t: Ticket, service_s: float | None) -> None:
        if t.state != GRANTED:
            return
        t.state = DONE
        p = t.pool
        p.in_use -= 1
        self.reserved_mb -= t.gpu_mb
        if service_s is not None:
            p.svc_ewma = service_s if p.svc_ewma == 0.0 else 0.8 * p.svc_ewma + 0.2 * service_s
        if p.waiting:
            self._pump_pool(p)

    def fail_waiting(self, error: Callable[[], BaseException]) -> None:
        """Wake every waiting request with `error()` (shutdown gave up); each then cancels its ticket."""
        for p in self.pools.values():
            for line in p.levels:
                for t in list(line):
                    if t.state == WAITING and t.future is not None and not t.future.done():
                        t.future.set_exception(error())

    # -- dispatch ------------------------------------------------------------------------------
    def pump(self) -> None:
        for p in self.pools.values():
            if p.waiting:
                self._pump_pool(p)

    def _fits(self, gpu_mb: int) -> bool:
        return gpu_mb <= 0 or self.fits is None or self.fits(gpu_mb)

    def _pump_pool(self, p: Pool) -> None:
        if not self.open:
            return
        if self._fair:
            self._pump_fair(p)
            return
        levels = p.levels
        while p.waiting and p.in_use < p.slots:
            for i, dq in enumerate(levels):  # noqa: B007 - `i` is the level found, used below
                while dq and dq[0].state != WAITING:
                    dq.popleft()
                if dq:
                    break
            else:  # only cancelled tickets were left
                return
            t = dq[0]
            if not self._fits(t.gpu_mb):
                return  # wait for memory; keep order rather than let smaller ones overtake
            dq.popleft()
            p.waiting -= 1
            p.live[i] -= 1
            if not p.live[i]:
                dq.clear()  # only cancelled tickets are left behind it
            self.depth[i] -= 1
            self.total -= 1
            p.in_use += 1
            self.reserved_mb += t.gpu_mb
            t.state = GRANTED
            fut = t.future
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _pump_fair(self, p: Pool) -> None:
        levels, live = p.levels, p.live
        while p.waiting and p.in_use < p.slots:
            for i, line in enumerate(levels):  # noqa: B007 - `i` is the level found, used below
                if live[i]:
                    t = line.head()
                    break
            else:
                return
            if not self._fits(t.gpu_mb):
                return  # wait for memory; the head stays the head
            line.take(t)
            p.waiting -= 1
            live[i] -= 1
            self.depth[i] -= 1
            self.total -= 1
            if self._max_per_key:
                self._uncount(t.key)
            p.in_use += 1
            self.reserved_mb += t.gpu_mb
            t.state = GRANTED
            fut = t.future
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- estimates -----------------------------------------------------------------------------
    def ahead_of(self, level: int, pool: str) -> int:
        """Requests waiting in `pool` that a new request at `level` would queue behind."""
        return sum(self.pools[pool].live[: level + 1])

    def estimate_wait(self, level: int, pool: str) -> float:
        """Seconds a request entering now at `level` would wait: its position over the service rate."""
        p = self.pools[pool]
        return (self.ahead_of(level, pool) + 1) * (p.svc_ewma or 1.0) / p.slots

    def ahead_of_key(self, level: int, pool: str, key: str | None) -> int:
        """Requests a new request of `key` at `level` would wait for under deficit round robin.

        Its own backlog, plus for each round it needs (one per quantum of its own backlog) a quantum
        of each other key's backlog, plus retried tickets and higher levels. Without fairness: ahead_of.
        """
        if not self._fair:
            return self.ahead_of(level, pool)
        p = self.pools[pool]
        line: FairLevel = p.levels[level]
        key = key or ANONYMOUS
        f = line.flows.get(key)
        mine = f.live if f is not None else 0
        quantum = f.quantum if f is not None else self._quanta.get(key, self._quantum)
        others_quanta = line.quanta - (quantum if f is not None else 0.0)
        others_live = p.live[level] - line.front_live - mine
        rounds = math.ceil((mine + 1) / quantum)
        return sum(p.live[:level]) + line.front_live + mine + min(others_live, math.ceil(rounds * others_quanta))

    def estimate_wait_key(self, level: int, pool: str, key: str | None) -> float:
        """Seconds a request of `key` entering now at `level` would wait, from that key's own backlog."""
        p = self.pools[pool]
        return (self.ahead_of_key(level, pool, key) + 1) * (p.svc_ewma or 1.0) / p.slots

    def inflight(self) -> int:
        return sum(p.in_use for p in self.pools.values())

    def depth_by_name(self) -> dict[str, int]:
        return dict(zip(self.names, self.depth))

    def fairness_status(self) -> dict[str, dict[str, int]]:
        """Per level: how many keys wait and the largest one key's backlog (never the key values); {} when off."""
        if not self._fair:
            return {}
        out = {}
        for i, name in enumerate(self.names):
            backlog: dict[str, int] = {}
            for p in self.pools.values():
                line: FairLevel = p.levels[i]
                for k, f in line.flows.items():
                    backlog[k] = backlog.get(k, 0) + f.live
                if line.front_live:
                    for t in line.front:
                        if t.state == WAITING:
                            backlog[t.key] = backlog.get(t.key, 0) + 1  # type: ignore[index]
            out[name] = {"keys": len(backlog), "largest_backlog": max(backlog.values(), default=0)}
        return out

    def drained(self) -> bool:
        return self.total == 0 and self.inflight() == 0
