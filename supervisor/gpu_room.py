"""The GPU memory ledger at run time: what each GPU holds, and whether a replica may start there now.

Each replica's lifecycle awaits `admit(replica)` before it spawns. The choice itself (start, evict,
wait, refuse) is pure, in gpu_ledger.py; this module feeds it the fleet's records and NVML's figures,
carries out evictions, waits for their memory to come back, and unloads replicas left idle.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from . import gpu_ledger as gl
from .aio import cancel_and_wait, wait_quietly
from .states import ExitReason, WorkerState

if TYPE_CHECKING:
    from .app import Supervisor
    from .fleet import Replica
    from .gpu_watch import Reading

log = structlog.get_logger("supervisor.ledger")
IDLE_CHECK_S = 0.5


class _Stop:
    """An eviction whose memory has not been seen back yet."""

    __slots__ = ("key", "gpu", "at", "target_used")

    def __init__(self, key, gpu: int, at: float, target_used: int):
        self.key = key
        self.gpu = gpu
        self.at = at
        self.target_used = target_used


class GpuRoom:
    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.admitted: set[tuple[str, int]] = set()  # replicas that passed the gate and hold their room
        self.waiting_since: dict[tuple[str, int], float] = {}
        self.refused: dict[tuple[str, int], str] = {}
        self.retry_after: dict[tuple[str, int], float] = {}
        self.stops: list[_Stop] = []
        self._changed = asyncio.Event()
        self._reading: Reading | None = None
        self._task: asyncio.Task | None = None

    # -- figures -------------------------------------------------------------------------------
    def _device(self, gpu: int):
        r = self._reading
        if r is None or not r.available:
            return None
        for d in r.devices:
            if d.index == gpu:
                return d
        return None

    def capacity(self, gpu: int) -> int | None:
        s = self.sup.settings.gpu
        d = self._device(gpu)
        return gl.capacity_bytes(d.memory_total_bytes if d else None, s.budget_mb.get(gpu), s.reserve_mb)

    def foreign(self, gpu: int) -> int:
        """What NVML shows used on `gpu` by processes not ours. A replica being stopped is still ours
        until its memory is seen back (the ledger counts it as held meanwhile, not twice)."""
        d = self._device(gpu)
        if d is None or self._reading is None:
            return 0
        settling = sum(self._replica(st.key).gpu_peak_bytes for st in self.stops
                       if st.gpu == gpu and self._replica(st.key) is not None)
        return gl.foreign_bytes(d.memory_used_bytes, self._reading.ours_by_device.get(gpu, 0) + settling)

    def resident(self, r: Replica, now: float) -> gl.Resident:
        m = r.manager
        inc = m.current
        key = (r.worker, r.index)
        stopping = any(st.key == key for st in self.stops)
        return gl.Resident(
            key=key, gpu=r.gpu if r.gpu is not None else -1,
            declared_bytes=m.spec.gpu_memory_mb * gl.MIB, learned_bytes=r.gpu_peak_bytes,
            started=key in self.admitted or stopping, busy=m.inflight > 0 or (key in self.admitted and not m.serving
                                                                              and m.state is WorkerState.STARTING),
            pinned=m.spec.pinned, last_used=m.last_used,
            loaded_at=inc.ready_at or inc.spawned_at if inc is not None else now,
            stopping=stopping, min_resident_s=m.spec.min_resident_s)

    def need_bytes(self, r: Replica) -> int:
        return max(r.manager.spec.gpu_memory_mb * gl.MIB, r.gpu_peak_bytes)

    def held(self, gpu: int) -> int:
        now = time.monotonic()
        res = [self.resident(r, now) for r in self.sup.fleet.replicas() if r.gpu == gpu]
        return gl.held_bytes(res, self.foreign(gpu))

    def gpus(self) -> list[int]:
        seen = {r.gpu for r in self.sup.fleet.replicas() if r.gpu is not None}
        seen |= set(self.sup.settings.gpu.budget_mb)
        return sorted(seen)

    def status(self) -> list[dict]:
        out = []
        for gpu in self.gpus():
            cap = self.capacity(gpu)
            held = self.held(gpu)
            out.append({"gpu": gpu, "capacity_bytes": cap, "held_bytes": held,
                        "free_bytes": max(0, cap - held) if cap is not None else None,
                        "foreign_bytes": self.foreign(gpu)})
        return out

    def held_by_gpu(self) -> dict[int, int]:
        return {gpu: self.held(gpu) for gpu in self.gpus()}

    def waiting(self, r: Replica) -> str | None:
        """What `r` waits for while the ledger holds its start (words for a 503), else None."""
        if (r.worker, r.index) not in self.waiting_since or r.gpu is None:
            return None
        text = f"it needs {self.need_bytes(r) >> 20} MiB on GPU {r.gpu}"
        cap = self.capacity(r.gpu)
        if cap is not None:
            text += f", {max(0, cap - self.held(r.gpu)) >> 20} of {cap >> 20} MiB are free"
        busy = [f"{x.worker}/{x.index}" for x in self.sup.fleet.replicas()
                if x.gpu == r.gpu and x is not r and (x.worker, x.index) in self.admitted and x.manager.inflight > 0]
        if busy:
            text += f"; held by {', '.join(busy)}, busy (never stopped mid-request)"
        return text

    # -- events --------------------------------------------------------------------------------
    def changed(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def on_reading(self, r: Reading) -> None:
        self._reading = r
        self.changed()

    def on_state(self, r: Replica, new: WorkerState) -> None:
        key = (r.worker, r.index)
        if new in (WorkerState.UNLOADED, WorkerState.STOPPED, WorkerState.FAILED, WorkerState.BACKOFF):
            self.admitted.discard(key)
            r.evict_mark = False
            r.draining_for_room = False
        self.changed()

    # -- the gate each replica passes before it starts ------------------------------------------
    def refusal(self, r: Replica) -> str | None:
        """Why this replica can never start here (need larger than the GPU), else None."""
        if r.gpu is None:
            return None
        now = time.monotonic()
        cap = self.capacity(r.gpu)
        if cap is None:
            return None
        others = [self.resident(x, now) for x in self.sup.fleet.replicas() if x.gpu == r.gpu and x is not r]
        plan = gl.plan_start(self.need_bytes(r), r.gpu, cap, others, self.foreign(r.gpu), now,
                             max_starvation_s=None, waiting_since=None, settling=False)
        return plan.reason if plan.action == "refuse" and plan.reason in ("too_large", "pinned") else None

    async def admit(self, r: Replica) -> bool:
        """Wait until `r` fits on its GPU (evicting idle replicas to make room). False: never fits."""
        key = (r.worker, r.index)
        if r.gpu is None:
            self.admitted.add(key)
            return True
        since = self.waiting_since.setdefault(key, time.monotonic())
        try:
            while True:
                now = time.monotonic()
                self._settle(now)
                cap = self.capacity(r.gpu)
                others = [self.resident(x, now) for x in self.sup.fleet.replicas()
                          if x.gpu == r.gpu and x is not r]
                waiters = {k: t for k, t in self.waiting_since.items() if self._gpu_of(k) == r.gpu}
                first = gl.first_waiter(waiters)
                plan = gl.plan_start(
                    self.need_bytes(r), r.gpu, cap, others, self.foreign(r.gpu), now,
                    min_resident_s=r.manager.spec.min_resident_s, max_starvation_s=r.manager.spec.max_starvation_s,
                    waiting_since=since, settling=any(st.gpu == r.gpu for st in self.stops))
                if plan.action == "start" and (first in (None, key) or plan.reason == "unknown_capacity"):
                    self.admitted.add(key)
                    self.refused.pop(key, None)
                    self.retry_after.pop(key, None)
                    self._undrain(r.gpu)
                    return True
                if plan.action == "refuse" and plan.reason != "foreign":  # others' use may shrink: wait
                    self.refused[key] = plan.reason
                    log.warning("gpu_room_refused", worker=r.worker, replica=r.index, gpu=r.gpu, why=plan.reason,
                                need_bytes=self.need_bytes(r), capacity_bytes=cap)
                    return False
                if plan.action == "evict" and first == key:
                    for victim_key in plan.evict:
                        self._evict(victim_key, r)
                for k in plan.drain:
                    v = self._replica(k)
                    if v is not None and not v.draining_for_room:
                        v.draining_for_room = True
                        log.info("gpu_room_drain", worker=v.worker, replica=v.index, gpu=v.gpu,
                                 for_worker=r.worker, waited_s=round(now - since, 3))
                        self.sup.fleet.groups[v.worker].refresh()
                self.retry_after[key] = plan.retry_after_s or gl.DEFAULT_RETRY_S
                changed = self._changed
                await wait_quietly(changed.wait(), plan.retry_after_s or gl.DEFAULT_RETRY_S)
                if not r.manager.wants_load:
                    return False
        finally:
            self.waiting_since.pop(key, None)

    def _gpu_of(self, key) -> int | None:
        r = self._replica(key)
        return r.gpu if r is not None else None

    def _replica(self, key) -> Replica | None:
        g = self.sup.fleet.groups.get(key[0])
        if g is None:
            return None
        for r in g.replicas:
            if r.index == key[1]:
                return r
        return None

    def _evict(self, key, for_replica: Replica) -> None:
        v = self._replica(key)
        if v is None or v.evict_mark:
            return
        v.evict_mark = True  # new requests for it wait instead of restarting it
        self.sup.fleet.groups[v.worker].refresh()
        d = self._device(v.gpu)
        used = d.memory_used_bytes if d is not None else 0
        self.stops.append(_Stop(key, v.gpu, time.monotonic(), max(0, used - v.gpu_memory_bytes)))
        log.info("gpu_room_evict", worker=v.worker, replica=v.index, gpu=v.gpu, for_worker=for_replica.worker,
                 for_replica=for_replica.index)
        v.manager.unload(ExitReason.EVICTED)

    def _settle(self, now: float) -> None:
        keep = []
        settle_s = self.sup.settings.gpu.settle_timeout_s
        for st in self.stops:
            v = self._replica(st.key)
            down = v is None or v.manager.state in (WorkerState.UNLOADED, WorkerState.STOPPED, WorkerState.FAILED)
            d = self._device(st.gpu)
            if down and gl.settled(d.memory_used_bytes if d else None, st.target_used, st.at, now, settle_s):
                continue
            keep.append(st)
        self.stops = keep

    def _undrain(self, gpu: int) -> None:
        for v in self.sup.fleet.replicas():
            if v.gpu == gpu and v.draining_for_room:
                v.draining_for_room = False
                self.sup.fleet.groups[v.worker].refresh()

    # -- idle unload ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._idle_loop(), name="gpu-room-idle")

    async def aclose(self) -> None:
        await cancel_and_wait([self._task])

    async def _idle_loop(self) -> None:
        while True:
            changed = self._changed
            await wait_quietly(changed.wait(), IDLE_CHECK_S)
            now = time.monotonic()
            self._settle(now)
            for r in self.sup.fleet.replicas():
                idle_s = r.manager.spec.idle_unload_s
                if idle_s <= 0 or not r.manager.serving:
                    continue
                if gl.idle_due(self.resident(r, now), idle_s, now):
                    log.info("worker_idle_unload", worker=r.worker, replica=r.index,
                             idle_s=round(now - r.manager.last_used, 3))
                    r.manager.unload(ExitReason.IDLE)
