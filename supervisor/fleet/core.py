"""The fleet: every named worker and its replicas, and the one writer of their records.

Each replica's lifecycle reports its moves, spawns, probes and exits here (the fleet is its
ReplicaEvents); the GPU room and pressure control hand plans that the fleet carries out; the fleet
reports what its owner must know (metrics, jobs, the pid file) through one FleetEvents object.
The request path asks it for a group and a replica, nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ..aio import TaskSet, cancel_and_wait
from ..circuit_breaker import CircuitBreaker
from ..config import Settings, WorkerSpec
from ..errors import Rejected
from ..states import SERVING_STATES, UNLOAD_EXITS, ExitReason, WorkerState, check_move
from ..upstream import UpstreamError
from . import models as wm
from . import reload
from .events import FleetEvents
from .gate import RoomGate
from .group import WorkerGroup
from .lifecycle import Lifecycle
from .process import ExitInfo, Incarnation
from .reload import ReloadSummary
from .replica import Replica
from .room import GpuRoom

if TYPE_CHECKING:
    from ..gpu_watch import Reading
    from ..pressure_control import PressurePlan

log = structlog.get_logger("supervisor.fleet")

RECENT_EXITS = 50  # exits kept for /status and /ui
DOWN_STATES = (WorkerState.UNLOADED, WorkerState.STOPPED, WorkerState.FAILED, WorkerState.BACKOFF)


class Fleet:
    """Creates, starts, reconfigures and retires the replicas of every worker; writes their records."""

    def __init__(self, settings: Settings, runtime_dir: Path, base_env: dict[str, str], events: FleetEvents,
                 gpus_seen: int | None = None):
        self.settings = settings
        self.runtime_dir = runtime_dir
        self.base_env = base_env
        self.events = events
        self.gpus_seen = gpus_seen
        self.groups: dict[str, WorkerGroup] = {}
        self.exits: deque[dict] = deque(maxlen=RECENT_EXITS)
        self.tasks = TaskSet()
        self.started = False
        self.retiring: list[Replica] = []
        self._queue_gate: Callable[[int], bool] | None = None  # a route's gpu_memory_mb: may it start now?
        self.room = GpuRoom(settings, self.replicas, self.work_pending)
        self.gate = RoomGate(self.room, self.find, self._refresh)
        for name, spec in settings.fleet.items():
            self.add_group(name, spec)

    @property
    def queue_gate(self) -> Callable[[int], bool] | None:
        return self._queue_gate

    @queue_gate.setter
    def queue_gate(self, fits: Callable[[int], bool] | None) -> None:
        self._queue_gate = fits
        for g in self.groups.values():
            g.queue.fits = fits

    # -- records -------------------------------------------------------------------------------
    def placements(self, name: str, spec: WorkerSpec) -> tuple[int | None, ...]:
        gpus = spec.placements(self.gpus_seen)
        unseen = [g for g in gpus if g is not None and self.gpus_seen is not None and g >= self.gpus_seen]
        if unseen:
            log.warning("gpu_not_seen", worker=name, gpus=unseen, nvml_devices=self.gpus_seen,
                        action="starting its replicas anyway")
        elif spec.gpus == "auto" and not self.gpus_seen:
            log.warning("gpus_auto_without_nvml", worker=name, action="one replica, no GPU pinned")
        return gpus

    def add_group(self, name: str, spec: WorkerSpec) -> WorkerGroup:
        g = self.groups[name] = WorkerGroup(name, spec, self.settings)
        g.queue.fits = self._queue_gate
        for i, gpu in enumerate(self.placements(name, spec)):
            g.replicas.append(self.new_replica(g, i, gpu))
        if self.started:
            for r in g.replicas:
                self.run(r)
        g.refresh()
        return g

    def new_replica(self, g: WorkerGroup, index: int, gpu: int | None) -> Replica:
        holder: list[Replica] = []
        breaker = CircuitBreaker(self.settings.breaker,
                                 on_change=lambda old, new, why: self.events.breaker_moved(holder[0], old, new, why))
        r = Replica(g.name, index, gpu, g.spec, breaker)
        holder.append(r)
        r.lifecycle = Lifecycle(r, self.runtime_dir, self.base_env, self,
                                drain_timeout_s=self.settings.drain.timeout_s,
                                pool_kw={"max_head_bytes": self.settings.limits.worker_head_bytes,
                                         "on_protocol_error": self.events.protocol_error})
        return r

    def replicas(self):
        for g in self.groups.values():
            yield from g.replicas

    def find(self, key) -> Replica | None:
        g = self.groups.get(key[0])
        return next((r for r in g.replicas if r.index == key[1]), None) if g is not None else None

    def first(self) -> Replica:
        return next(iter(self.groups.values())).replicas[0]

    def group_for_model(self, model: str) -> WorkerGroup | None:
        for g in self.groups.values():
            if model in g.models:
                return g
        return None

    def served_models(self) -> list[str]:
        return [m for g in self.groups.values() for m in g.models]

    def replica_pids(self) -> dict:
        """The pid of each replica's running process, by replica key (what the watcher measures)."""
        return {r.key: r.current.pid for r in self.replicas() if r.alive and r.current.pid}

    def _refresh(self, r: Replica) -> None:
        g = self.groups.get(r.worker)
        if g is not None:
            g.refresh()

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.started = True
        for r in self.replicas():
            self.run(r)
        self.gate.start()

    def run(self, r: Replica) -> None:
        assert r.lifecycle is not None
        r.task = asyncio.create_task(r.lifecycle.run(), name=f"worker-{r.worker}-{r.index}")
        r.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("replica_supervision_failed", task=task.get_name(), exc_info=task.exception())
        self.events.supervision_failed()

    async def shutdown(self) -> None:
        """Stop every replica (gracefully, each with its own stop_grace_s), all at once."""
        lcs = [r.lifecycle for r in [*self.replicas(), *self.retiring] if r.lifecycle is not None]
        await asyncio.gather(*(lc.shutdown() for lc in lcs), return_exceptions=True)
        await self.aclose()

    async def aclose(self) -> None:
        await self.gate.aclose()
        await cancel_and_wait([r.task for r in [*self.replicas(), *self.retiring]])
        await self.tasks.aclose()

    def stopped(self) -> bool:
        return all(r.lifecycle is None or r.lifecycle.stopped.is_set() for r in self.replicas())

    # -- what a lifecycle reports (ReplicaEvents) ----------------------------------------------
    def move(self, r: Replica, new: WorkerState, reason: str, level: str = "info") -> None:
        """The one transition of a replica's state: checked against the table, logged, acted on."""
        old = r.state
        if old is new:
            return
        if old in SERVING_STATES and new in SERVING_STATES:
            # ready <-> busy, twice per request on an idle replica: serving stays true, nothing waits on
            # it and there is nothing to log (the access log has the request)
            r.state = new
            return
        check_move(old, new)
        r.state = new
        moved, r.moved = r.moved, asyncio.Event()
        moved.set()  # wakes whoever waits for this replica's next move
        if new in SERVING_STATES:
            r.ready.set()
        else:
            r.ready.clear()
        inc = r.current
        getattr(r.lifecycle.log, level)(
            "worker_state", old=old.value, new=new.value, reason=reason,
            # a process that runs (or is being stopped); never the one that already exited (its exit
            # is logged with its pid), and none before the next one is spawned
            worker_pid=inc.pid if inc is not None and inc.pid and not inc.exited.is_set() else None,
        )
        self._serving_changed(r, old, new, reason)

    def _serving_changed(self, r: Replica, old: WorkerState, new: WorkerState, reason: str) -> None:
        g = self.groups.get(r.worker)
        if new is not WorkerState.READY:
            r.room.sleeping = False  # asleep now, or it went another way
        if new is WorkerState.READY or new in DOWN_STATES:
            r.asleep_since = None  # awake, or gone: it holds its whole need, or nothing
        woke = new is WorkerState.READY and r.waking_since is not None
        if woke:
            r.woke_at = r.last_used = time.monotonic()
            r.last_wake_s = r.woke_at - r.waking_since
        if new is not WorkerState.STARTING:
            r.waking_since = None  # the wake ended (awake, or it went another way)
        if new is WorkerState.ASLEEP:
            r.asleep_since = time.monotonic()
            if g is not None and g.queue.total > 0:
                r.lifecycle.wake_up()  # requests came while it was going to sleep
        elif old is WorkerState.ASLEEP and new is WorkerState.STARTING:
            r.waking_since = time.monotonic()
        elif new is WorkerState.READY and old is WorkerState.STARTING and not woke:
            inc = r.current
            if inc is not None and inc.ready_at is not None:
                r.last_start_s = inc.ready_at - inc.spawned_at
                r.last_used = inc.ready_at
            r.breaker.release_forced("worker ready")
            if g is not None:
                # every start: a new command may serve other names (discovered), or not the declared ones
                self.tasks.spawn(self.read_models(g, r))
        elif new is WorkerState.FAILED:
            r.breaker.force_open("worker crash loop")
        self.events.replica_moved(r, old, new, reason)
        if new in DOWN_STATES:
            r.room.clear()
        self.room.changed()
        if new is WorkerState.READY:
            self.events.slot_free()  # queued jobs for it may start now
        if new is WorkerState.UNLOADED and g is not None and g.queue.total > 0 and self.room.refusal(r) is None:
            # requests wait for it (they came while it was being evicted or unloaded): start it again
            r.lifecycle.load()
        if g is not None:
            g.refresh()

    def new_process(self, r: Replica, inc: Incarnation) -> None:
        r.current = inc
        r.gen = inc.gen

    def spawned(self, r: Replica, inc: Incarnation) -> None:
        self.events.pids_changed()

    def probed(self, r: Replica, failures: int) -> None:
        r.probe_failures = failures

    def backoff(self, r: Replica, until: float) -> None:
        r.backoff_until = until

    def exited(self, r: Replica, info: ExitInfo, final: bool) -> None:
        r.last_exit = info
        if final and info.reason is not ExitReason.RETIRED:
            return  # a shutdown: nothing is counted
        if not final:
            if info.reason not in UNLOAD_EXITS:
                r.restarts += 1
            if info.reason is ExitReason.OOM:
                r.oom_restarts += 1
        self.exits.append({"worker": r.worker, "replica": r.index, **info.as_dict()})
        self.events.replica_exited(r, info)

    def idle(self, r: Replica) -> None:
        r.last_used = time.monotonic()
        if self.room.gate_waiters:  # (per request: the room's loops are woken only when it can matter)
            self.room.changed()  # an idle replica may now be evicted for a waiter
        self.events.slot_free()

    def down(self, r: Replica) -> None:
        if r.current is not None and r.current.exited.is_set():
            r.ready.clear()
        self._refresh(r)

    def work_waiting(self, r: Replica) -> bool:
        g = self.groups.get(r.worker)
        return g is not None and g.queue.total > 0

    def work_pending(self, r: Replica) -> bool:
        """Requests wait for its worker, or hold a slot and have not reached a replica yet (granted, their
        task not run): a replica that admits them is not idle, whatever its own count in flight says."""
        g = self.groups.get(r.worker)
        return g is not None and (g.queue.total > 0 or g.queue.inflight() > sum(x.inflight for x in g.replicas))

    async def admit(self, r: Replica) -> bool:
        return await self.gate.admit(r)

    def sleep_skipped(self, r: Replica) -> None:
        r.room.sleeping = False
        self._refresh(r)
        self.room.changed()

    # -- plans carried out ---------------------------------------------------------------------
    def apply_pressure(self, plan: PressurePlan, reading: Reading) -> None:
        """A reading's readings, caps, pause, cleanups, restarts and recycles (pressure_control plans them)."""
        for r in self.replicas():
            rss, mem = plan.readings.get(r.key, (0, 0))
            r.rss_bytes = rss
            r.gpu_memory_bytes = mem
            if r.state is WorkerState.ASLEEP:
                if r.asleep_since is not None and reading.at > r.asleep_since:
                    r.asleep_gpu_bytes = mem  # what sleeping leaves (the learned sleep.gpu_memory_mb)
            else:
                r.gpu_peak_bytes = max(r.gpu_peak_bytes, mem)
        self.room.on_reading(reading)
        for g in self.groups.values():
            g.queue.pools["default"].cap = plan.cap
            g.paused = plan.pause
            g.refresh()
        for key in plan.cleanup:
            if (r := self.find(key)) is not None:
                self.tasks.spawn(self._cleanup(r))
        for key in plan.restart:
            if (r := self.find(key)) is not None:
                r.lifecycle.request_restart(ExitReason.PRESSURE)
        for key, why in plan.recycle:
            if (r := self.find(key)) is not None:
                r.lifecycle.log.warning("worker_recycle", why=why, rss_bytes=r.rss_bytes,
                                        gpu_memory_bytes=r.gpu_memory_bytes)
                r.lifecycle.request_restart(ExitReason.RECYCLE)

    async def _cleanup(self, r: Replica) -> None:
        """POST /cleanup on the replica's own connection; a worker without one answers 404: fine."""
        inc = r.current
        if inc is None or inc.exited.is_set():
            return
        head = b"POST /cleanup HTTP/1.1\r\nHost: worker\r\nContent-Length: 0\r\n\r\n"
        conn = None
        try:
            async with asyncio.timeout(r.spec.health.timeout_s * 5):
                conn = await inc.pool.connect()
                await conn.start(head, None, False)
                while await conn.read():
                    pass
            r.lifecycle.log.info("worker_cleanup", status=conn.status, worker_pid=inc.pid)
        except (TimeoutError, UpstreamError) as exc:
            r.lifecycle.log.warning("worker_cleanup_failed", error=str(exc), worker_pid=inc.pid)
        finally:
            if conn is not None:
                conn.abort()

    def degrade(self, r: Replica, mode: str, env: dict[str, str]) -> None:
        """Its next processes run in a degraded mode (cpu-fallback: the fallback's environment)."""
        r.env_override = env
        r.degraded = mode
        r.lifecycle.log.warning("fallback_engaged", mode=mode, oom_restarts=r.oom_restarts, env=env)

    def clear_fallbacks(self) -> None:
        """An operator reload gives every degraded replica its GPU back (a new process each)."""
        for r in self.replicas():
            if r.degraded:
                r.lifecycle.log.info("fallback_cleared", reason="operator reload")
                r.degraded = None
                r.env_override = {}
                r.oom_restarts = 0
                r.lifecycle.request_restart(ExitReason.RELOAD)

    # -- models a worker serves ----------------------------------------------------------------
    async def read_models(self, g: WorkerGroup, r: Replica) -> None:
        """Once a replica is ready, ask its own GET /v1/models: the names of a worker that declares none
        (discovery), or whether it serves the names declared for it (a mismatch is warned about)."""
        inc = r.current
        if inc is None:
            return
        declared = g.spec.models
        names = await wm.served_models(inc, g.name)
        if self.groups.get(g.name) is not g or g.spec.models != declared:
            return  # removed or reconfigured meanwhile: a newer read follows
        if declared:
            if names is None:
                return  # no list to compare with (logged): nothing to warn about
            missing = await wm.missing_declared(inc, g.name, declared, names)
            if self.groups.get(g.name) is g and g.spec.models == declared:
                self._declared_checked(g, r, names, missing)
            return
        taken = {m for other in self.groups.values() if other is not g for m in other.models}
        kept, clash = wm.unclaimed(names or (), taken)
        before = g.models
        if names is not None or not g.models_read:
            g.discovered = kept
        g.models_read = True
        log.info("models_discovered", worker=g.name, replica=r.index, models=list(g.discovered),
                 ignored_as_taken=clash or None)
        if g.models != before:
            self.events.models_changed()

    @staticmethod
    def _declared_checked(g: WorkerGroup, r: Replica, names: tuple[str, ...], missing: list[str]) -> None:
        """Warn (log models_mismatch, /status models_missing) about declared names the worker does not serve:
        requests naming them would get the worker's own 404 while the daemon lists them as loaded."""
        g.models_read = True
        if missing:
            log.warning("models_mismatch", worker=g.name, replica=r.index, declared=list(g.spec.models),
                        served=list(names), missing=missing,
                        hint="requests naming these get the worker's own 404: declare what its GET /v1/models "
                             "lists, or give it the name (model_worker: --model-name)")
        elif g.models_missing:
            log.info("models_match", worker=g.name, replica=r.index, declared=list(g.spec.models))
        g.models_missing = tuple(missing)

    # -- asked by the request path -------------------------------------------------------------
    def wake(self, g: WorkerGroup) -> None:
        """The first request for an unloaded worker starts it, for a sleeping one wakes it (once, however
        many arrive)."""
        for r in g.replicas:
            if r.state is WorkerState.ASLEEP:
                r.lifecycle.wake_up()
            elif self.room.refusal(r) is None:
                r.lifecycle.load()
        if all(self.room.refusal(r) is not None for r in g.replicas):
            need = max(self.room.need_bytes(r) for r in g.replicas) >> 20
            raise Rejected("worker_unavailable", f"worker {g.name} needs {need} MiB of GPU memory, more than its "
                           "GPU can give even with every other unpinned worker stopped", 60.0)

    def waiting_for_room(self, g: WorkerGroup) -> str | None:
        """Why none of `g`'s replicas has started when the GPU ledger holds them back, else None."""
        return next((why for r in g.replicas if (why := self.room.waiting(r)) is not None), None)

    def unavailable_retry_after(self, g: WorkerGroup) -> float:
        waits = [r.room.retry_after_s for r in g.replicas if r.room.retry_after_s is not None]
        return min(waits) if waits else g.expected_ready_in()

    def degraded(self) -> str | None:
        """The first degraded mode (cpu-fallback) of any replica, which every answer names in X-Degraded."""
        return next((r.degraded for r in self.replicas() if r.degraded), None)

    def apply(self, settings: Settings) -> ReloadSummary:
        """A new configuration: workers added and removed, changed replicas replaced one at a time."""
        return reload.apply(self, settings)

    # -- readiness -----------------------------------------------------------------------------
    def not_ready(self, now: float) -> list[str]:
        why = []
        for g in self.groups.values():
            if g.spec.start != "eager":
                continue
            if not any(r.serving for r in g.replicas):
                # a replica that cannot start at all says why (a program not found)
                boot = next((r.last_exit.detail for r in g.replicas
                             if r.last_exit is not None and r.last_exit.detail), None)
                why.append(f"worker {g.name}: no replica serving ({g.state_summary()})" + (f"; {boot}" if boot else ""))
            elif not g.models_known:
                why.append(f"worker {g.name}: reading the models it serves (its GET /v1/models)")
            elif not any(r.breaker.would_allow(now) for r in g.serving()):
                why.append(f"worker {g.name}: breaker open on every serving replica")
        return why
