"""The GPU memory ledger at run time: what each GPU holds, and the plan for a replica that waits to start.

It reads replica records and NVML's latest figures and returns plans (the choice itself is pure, in
gpu_ledger.py: start, evict, drain, wait, refuse); the fleet carries them out and writes the marks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .. import gpu_ledger as gl
from ..states import WorkerState

if TYPE_CHECKING:
    from ..config import Settings
    from ..gpu_watch import Reading
    from .replica import Replica


class GpuRoom:
    """Figures and plans of the GPU ledger over the fleet's replica records (it writes none of them)."""

    def __init__(self, settings: Settings, replicas: Callable[[], Iterable[Replica]],
                 work_pending: Callable[[Replica], bool] = lambda r: False):
        self.settings = settings
        self._replicas = replicas  # every replica of the fleet, each time it is asked
        self._work_pending = work_pending  # requests wait for its worker or are granted (its run is not over)
        self._reading: Reading | None = None
        self.changed_event = asyncio.Event()  # set (and replaced) whenever a plan may have changed
        self.gate_waiters = 0  # replicas waiting in the gate for room now (RoomGate.admit)

    # -- events --------------------------------------------------------------------------------
    def changed(self) -> None:
        ev, self.changed_event = self.changed_event, asyncio.Event()
        ev.set()

    def on_reading(self, r: Reading) -> None:
        self._reading = r
        self.changed()

    # -- figures -------------------------------------------------------------------------------
    def _device(self, gpu: int):
        r = self._reading
        if r is None or not r.available:
            return None
        for d in r.devices:
            if d.index == gpu:
                return d
        return None

    def used(self, gpu: int) -> int | None:
        """NVML's used bytes on `gpu` (None without NVML)."""
        d = self._device(gpu)
        return d.memory_used_bytes if d is not None else None

    def capacity(self, gpu: int) -> int | None:
        s = self.settings.gpu
        d = self._device(gpu)
        return gl.capacity_bytes(d.memory_total_bytes if d else None, s.budget_mb.get(gpu), s.reserve_mb)

    def foreign(self, gpu: int) -> int:
        """What NVML shows used on `gpu` by processes not ours. A replica being stopped is still ours
        until its memory is seen back (the ledger counts it as held meanwhile, not twice)."""
        d = self._device(gpu)
        if d is None or self._reading is None:
            return 0
        settling = sum(r.gpu_peak_bytes for r in self._replicas() if r.gpu == gpu and r.room.evicted_at is not None)
        return gl.foreign_bytes(d.memory_used_bytes, self._reading.ours_by_device.get(gpu, 0) + settling)

    def host_free(self) -> int | None:
        """Host RAM sleeping workers may still fill: psutil's available less `gpu.host_reserve_mb` (None: no
        reading yet)."""
        rd = self._reading
        if rd is None or rd.host_total_bytes is None or rd.host_used_bytes is None:
            return None
        return rd.host_total_bytes - rd.host_used_bytes - self.settings.gpu.host_reserve_mb * gl.MIB

    def resident(self, r: Replica, now: float) -> gl.Resident:
        inc = r.current
        marks = r.room
        stopping = marks.evicted_at is not None
        sl = r.spec.sleep
        # asleep, being stopped from asleep, or a wake waiting at the gate: it holds only what its sleep leaves
        asleep = r.asleep_since is not None and (
            r.state in (WorkerState.ASLEEP, WorkerState.STOPPING)
            or (r.waking_since is not None and marks.waiting_since is not None))
        return gl.Resident(
            key=r.key, gpu=r.gpu if r.gpu is not None else -1,
            declared_bytes=r.spec.gpu_memory_mb * gl.MIB, learned_bytes=r.gpu_peak_bytes,
            started=marks.admitted or stopping,
            # swaps in runs: a resident whose worker has requests waiting or granted (and takes them) finishes
            # them first, within the waiter's max_starvation_s (then it is drained)
            busy=r.inflight > 0 or (marks.admitted and not r.serving and r.state is WorkerState.STARTING)
            or (r.admits and self._work_pending(r)),
            pinned=r.spec.pinned, last_used=r.last_used,
            # a wake is a load as far as min_resident_s goes (no thrash between sleeping workers either)
            loaded_at=max(inc.ready_at or inc.spawned_at, r.woke_at or 0.0) if inc is not None else now,
            stopping=stopping, min_resident_s=r.spec.min_resident_s,
            can_sleep=sl is not None, asleep=asleep,
            asleep_bytes=sl.gpu_memory_mb * gl.MIB if sl is not None and sl.gpu_memory_mb else r.asleep_gpu_bytes,
            sleeping=marks.sleeping,
            host_bytes=sl.host_memory_mb * gl.MIB if sl is not None and sl.host_memory_mb else r.rss_bytes)

    @staticmethod
    def need_bytes(r: Replica) -> int:
        return max(r.spec.gpu_memory_mb * gl.MIB, r.gpu_peak_bytes)

    def held(self, gpu: int) -> int:
        now = time.monotonic()
        res = [self.resident(r, now) for r in self._replicas() if r.gpu == gpu]
        return gl.held_bytes(res, self.foreign(gpu))

    def gpus(self) -> list[int]:
        seen = {r.gpu for r in self._replicas() if r.gpu is not None}
        seen |= set(self.settings.gpu.budget_mb)
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
        if r.room.waiting_since is None or r.gpu is None:
            return None
        text = f"it needs {self.need_bytes(r) >> 20} MiB on GPU {r.gpu}"
        cap = self.capacity(r.gpu)
        if cap is not None:
            text += f", {max(0, cap - self.held(r.gpu)) >> 20} of {cap >> 20} MiB are free"
        busy = [x.name for x in self._replicas()
                if x.gpu == r.gpu and x is not r and x.room.admitted and x.inflight > 0]
        if busy:
            text += f"; held by {', '.join(busy)}, busy (never stopped mid-request)"
        return text

    def on_gpu(self, gpu: int) -> list[Replica]:
        return [r for r in self._replicas() if r.gpu == gpu]

    def evicted(self) -> list[Replica]:
        """Replicas evicted whose memory is not yet seen back."""
        return [r for r in self._replicas() if r.room.evicted_at is not None]

    # -- plans ---------------------------------------------------------------------------------
    def _ask(self, r: Replica, now: float, waiting: bool) -> tuple[gl.StartAsk, list[gl.Resident]]:
        assert r.gpu is not None
        others = [self.resident(x, now) for x in self._replicas() if x.gpu == r.gpu and x is not r]
        settling = waiting and any(x.room.evicted_at is not None for x in self._replicas() if x.gpu == r.gpu)
        ask = gl.StartAsk(
            self.need_bytes(r), r.gpu, self.capacity(r.gpu), self.foreign(r.gpu),
            min_resident_s=r.spec.min_resident_s if waiting else 0.0,
            max_starvation_s=r.spec.max_starvation_s if waiting else None,
            waiting_since=r.room.waiting_since if waiting else None, settling=settling,
            host_free=self.host_free())
        return ask, others

    def refusal(self, r: Replica) -> str | None:
        """Why this replica can never start here (need larger than the GPU), else None."""
        if r.gpu is None or self.capacity(r.gpu) is None:
            return None
        now = time.monotonic()
        ask, others = self._ask(r, now, waiting=False)
        plan = gl.plan_start(ask, others, now)
        return plan.reason if plan.action == "refuse" and plan.reason in ("too_large", "pinned") else None

    def gate(self, r: Replica, now: float) -> gl.GateStep:
        """The gate's plan for `r`, waiting for room on its GPU (the longest waiter there goes first)."""
        ask, others = self._ask(r, now, waiting=True)
        waiters = {x.key: x.room.waiting_since for x in self._replicas()
                   if x.gpu == r.gpu and x.room.waiting_since is not None}
        return gl.gate_step(gl.plan_start(ask, others, now), r.key, gl.first_waiter(waiters))

    def settled(self, r: Replica, now: float) -> bool:
        """An evicted replica is down and its memory is seen back (or the settle time passed)."""
        marks = r.room
        assert marks.evicted_at is not None
        return r.down and gl.settled(self.used(r.gpu) if r.gpu is not None else None, marks.target_used,
                                     marks.evicted_at, now, self.settings.gpu.settle_timeout_s)

    def idle_unloads(self, now: float) -> list[Replica]:
        """Serving or sleeping replicas idle for their worker's idle_unload_s (0 = never)."""
        return [r for r in self._replicas()
                if r.spec.idle_unload_s > 0 and (r.serving or r.state is WorkerState.ASLEEP)
                and gl.idle_due(self.resident(r, now), r.spec.idle_unload_s, now)]

    def idle_sleeps(self, now: float) -> list[Replica]:
        """Serving replicas idle for their worker's sleep.after_idle_s (0 = never) that host memory takes."""
        free = self.host_free()
        out = []
        for r in self._replicas():
            sl = r.spec.sleep
            if sl is None or sl.after_idle_s <= 0 or not r.admits:
                continue
            res = self.resident(r, now)
            if gl.sleep_due(res, sl.after_idle_s, free, now):
                out.append(r)
                free = None if free is None else free - res.host_bytes
        return out
