"""The GPU room's gate, carried out: each replica waits here before it starts until the ledger's plan
says start; meanwhile it evicts and drains others as the plan says, and idle replicas are unloaded.

The plans come from room.py (pure choices in gpu_ledger.py); this module writes the replicas' ledger
marks, as part of the fleet, and asks their lifecycles to unload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from ..aio import cancel_and_wait, wait_quietly
from ..states import ExitReason
from .room import GpuRoom

if TYPE_CHECKING:
    from .replica import Replica

log = structlog.get_logger("supervisor.ledger")
IDLE_CHECK_S = 0.5


class RoomGate:
    """Carries out the GPU room's plans on the fleet's replicas."""

    def __init__(self, room: GpuRoom, find: Callable[[object], Replica | None],
                 refresh: Callable[[Replica], None]):
        self.room = room
        self._find = find  # a replica by its key (None: gone)
        self._refresh = refresh  # its worker's slots and wait line follow its marks
        self._task: asyncio.Task | None = None

    async def admit(self, r: Replica) -> bool:
        """Wait until `r` fits on its GPU (evicting idle replicas to make room). False: never fits."""
        marks = r.room
        if r.gpu is None:
            marks.admitted = True
            return True
        if marks.waiting_since is None:
            marks.waiting_since = time.monotonic()
        self.room.gate_waiters += 1
        try:
            while True:
                now = time.monotonic()
                self._settle(now)
                step = self.room.gate(r, now)
                if step.action == "start":
                    marks.admitted = True
                    marks.refused = None
                    marks.retry_after_s = None
                    self._undrain(r.gpu)
                    return True
                if step.action == "refuse":
                    marks.refused = step.reason
                    log.warning("gpu_room_refused", worker=r.worker, replica=r.index, gpu=r.gpu, why=step.reason,
                                need_bytes=self.room.need_bytes(r), capacity_bytes=self.room.capacity(r.gpu))
                    return False
                for key in step.evict:
                    self._evict(key, r)
                for key in step.sleep:
                    self._sleep(key, "evicted", for_replica=r)
                for key in step.drain:
                    v = self._find(key)
                    if v is not None and not v.room.draining:
                        v.room.draining = True
                        log.info("gpu_room_drain", worker=v.worker, replica=v.index, gpu=v.gpu,
                                 for_worker=r.worker, waited_s=round(now - marks.waiting_since, 3))
                        self._refresh(v)
                marks.retry_after_s = step.retry_after_s
                await wait_quietly(self.room.changed_event.wait(), step.retry_after_s)
                if not r.wants_load:
                    return False
        finally:
            marks.waiting_since = None
            self.room.gate_waiters -= 1

    def _evict(self, key, for_replica: Replica) -> None:
        v = self._find(key)
        if v is None or v.room.evicting:
            return
        v.room.evicting = True  # new requests for it wait instead of restarting it
        self._refresh(v)
        used = self.room.used(v.gpu) if v.gpu is not None else None
        v.room.evicted_at = time.monotonic()
        v.room.target_used = max(0, (used or 0) - v.gpu_memory_bytes)
        log.info("gpu_room_evict", worker=v.worker, replica=v.index, gpu=v.gpu, for_worker=for_replica.worker,
                 for_replica=for_replica.index)
        assert v.lifecycle is not None
        v.lifecycle.unload(ExitReason.EVICTED)

    def _sleep(self, key, why: str, for_replica: Replica | None = None) -> None:
        """Put an idle replica to sleep (the cheaper tier): it takes nothing new from now on."""
        v = self._find(key)
        if v is None or v.room.sleeping or not v.admits:
            return
        v.room.sleeping = True
        self._refresh(v)
        log.info("gpu_room_sleep", worker=v.worker, replica=v.index, gpu=v.gpu, why=why,
                 for_worker=for_replica.worker if for_replica else None,
                 for_replica=for_replica.index if for_replica else None)
        assert v.lifecycle is not None
        v.lifecycle.put_to_sleep(why)

    def _settle(self, now: float) -> None:
        """Evictions whose memory is seen back (or whose settle time passed) no longer count as held."""
        for r in self.room.evicted():
            if self.room.settled(r, now):
                r.room.evicted_at = None

    def _undrain(self, gpu: int) -> None:
        for v in self.room.on_gpu(gpu):
            if v.room.draining:
                v.room.draining = False
                self._refresh(v)

    # -- idle unload ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._idle_loop(), name="gpu-room-idle")

    async def aclose(self) -> None:
        await cancel_and_wait([self._task])

    async def _idle_loop(self) -> None:
        while True:
            await wait_quietly(self.room.changed_event.wait(), IDLE_CHECK_S)
            now = time.monotonic()
            self._settle(now)
            for r in self.room.idle_unloads(now):
                log.info("worker_idle_unload", worker=r.worker, replica=r.index, idle_s=round(now - r.last_used, 3))
                assert r.lifecycle is not None
                r.lifecycle.unload(ExitReason.IDLE)
            for r in self.room.idle_sleeps(now):
                self._sleep(r.key, "idle")
