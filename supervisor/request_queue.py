"""The bounded priority queue and the concurrency slots (pools) that requests wait for.

One FIFO per (pool, level); a higher level is always granted first; counts are global so the level
and total bounds hold across pools. Removal is lazy (a cancelled ticket is skipped when popped, and a
FIFO mostly made of cancelled tickets is compacted), so enqueue, cancel and grant are O(1) amortised
however many requests wait. No clock inside: callers pass `now`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .config import Queue as QueueSettings

WAITING, GRANTED, CANCELLED, DONE = 0, 1, 2, 3


class Ticket:
    __slots__ = ("level", "pool", "gpu_mb", "enqueued_at", "future", "state")

    def __init__(self, level: int, pool: Pool, gpu_mb: int, now: float):
        self.level = level
        self.pool = pool
        self.gpu_mb = gpu_mb
        self.enqueued_at = now
        self.future: asyncio.Future[None] | None = None
        self.state = WAITING


class Pool:
    __slots__ = ("name", "size", "cap", "in_use", "waiting", "levels", "live", "svc_ewma")

    def __init__(self, name: str, size: int, n_levels: int):
        self.name = name
        self.size = size
        self.cap: int | None = None
        self.in_use = 0
        self.waiting = 0
        self.levels: list[deque[Ticket]] = [deque() for _ in range(n_levels)]
        self.live = [0] * n_levels  # WAITING tickets per level (the deques also hold cancelled ones)
        self.svc_ewma = 0.0  # seconds per request, smoothed

    @property
    def slots(self) -> int:
        return self.size if self.cap is None else max(1, min(self.size, self.cap))


class QueueFull(Exception):
    def __init__(self, scope: str):
        self.scope = scope  # "level" or "total"
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
        self.configure(settings)

    # -- configuration -------------------------------------------------------------------------
    def configure(self, settings: QueueSettings) -> None:
        """(Re)build levels and pools; waiting tickets keep their place (by level name)."""
        old_names = getattr(self, "names", ())
        self.settings = settings
        self.names: tuple[str, ...] = settings.priorities
        self.index = {n: i for i, n in enumerate(self.names)}
        self.max_level = [settings.level_max_size(n) for n in self.names]
        new_pools: dict[str, Pool] = {}
        for name, size in settings.pool_sizes().items():
            p = self.pools.get(name) or Pool(name, size, len(self.names))
            p.size = size
            new_pools[name] = p
        default_idx = self.index[settings.default_priority]
        for name, p in self.pools.items():
            old_levels = p.levels
            target = new_pools.get(name) or new_pools["default"]
            if target is p:
                p.levels = [deque() for _ in self.names]
                p.live = [0] * len(self.names)
                p.waiting = 0
            for i, dq in enumerate(old_levels):
                lname = old_names[i] if i < len(old_names) else None
                ni = self.index.get(lname, default_idx) if lname else default_idx
                for t in dq:
                    if t.state == WAITING:
                        t.level = ni
                        t.pool = target
                        target.levels[ni].append(t)
                        target.live[ni] += 1
                        target.waiting += 1
        self.pools = new_pools
        self.depth = [0] * len(self.names)
        self.total = 0
        for p in self.pools.values():
            for i, dq in enumerate(p.levels):
                n = sum(1 for t in dq if t.state == WAITING)
                self.depth[i] += n
                self.total += n
        self.pump()

    # -- admission -----------------------------------------------------------------------------
    def check_room(self, level: int) -> None:
        if self.depth[level] >= self.max_level[level]:
            raise QueueFull("level")
        if self.total >= self.settings.max_size:
            raise QueueFull("total")

    def acquire(self, level: int, pool: str, now: float, gpu_mb: int = 0, front: bool = False) -> Ticket:
        """A ticket that is GRANTED at once when a slot is free, else WAITING with a future.

        `front` puts a retried request at the head of its level and skips the bounds: it was
        admitted already.
        """
        p = self.pools[pool]
        t = Ticket(level, p, gpu_mb, now)
        if self.open and p.waiting == 0 and p.in_use < p.slots and self._fits(gpu_mb):
            t.state = GRANTED
            p.in_use += 1
            self.reserved_mb += gpu_mb
            return t
        if not front:
            self.check_room(level)
        loop = self._loop or asyncio.get_running_loop()
        t.future = loop.create_future()
        if front:
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
            dq = p.levels[t.level]
            if not live:
                dq.clear()
            elif len(dq) > 2 * live + 32:
                # mostly cancelled: rebuild, so a slot held for long cannot pile up dead tickets
                p.levels[t.level] = deque(x for x in dq if x.state == WAITING)
        elif t.state == GRANTED:
            self.release(t, None)

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
            for dq in p.levels:
                for t in dq:
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

    # -- estimates -----------------------------------------------------------------------------
    def ahead_of(self, level: int, pool: str) -> int:
        """Requests waiting in `pool` that a new request at `level` would queue behind."""
        return sum(self.pools[pool].live[: level + 1])

    def estimate_wait(self, level: int, pool: str) -> float:
        """Seconds a request entering now at `level` would wait: its position over the service rate."""
        p = self.pools[pool]
        return (self.ahead_of(level, pool) + 1) * (p.svc_ewma or 1.0) / p.slots

    def inflight(self) -> int:
        return sum(p.in_use for p in self.pools.values())

    def depth_by_name(self) -> dict[str, int]:
        return dict(zip(self.names, self.depth))

    def drained(self) -> bool:
        return self.total == 0 and self.inflight() == 0
