"""The supervisor: the one object that holds the fleet, the request path, the pressure and GPU-room control,
and the counters, and applies a new configuration to all of them at once.

It outlives every worker; `handle()` is the daemon's entry for every proxied request.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import structlog
from aiohttp import web

from .config import LoadedConfig, Settings
from .errors import Rejected
from .fleet import Fleet, ReloadSummary, Replica
from .gpu_room import GpuRoom
from .gpu_watch import Nvml, Reading
from .http import RequestPath
from .jobs.manager import JobManager
from .jobs.metrics import job_metrics
from .jobs.settings import resolve_state_dir, store_spec
from .jobs.store import StoreUnavailable, open_store
from .metrics import Metrics
from .pressure_control import PressureControl
from .runstate import RunState
from .states import SERVING_STATES, UNLOAD_EXITS, BreakerState, ExitReason, WorkerState
from .status_view import metrics_state, render_status
from .worker_process import ExitInfo

log = structlog.get_logger("supervisor.app")


class _JobRunner:
    """The job manager's view of the request path."""

    def __init__(self, path: RequestPath):
        self._path = path

    def has_free_slot(self, req) -> bool:
        return self._path.has_free_slot(req)

    async def run(self, req, attempt: int, max_result_bytes: int):
        return await self._path.run_job(req, attempt, max_result_bytes)


class Supervisor:
    def __init__(self, loaded: LoadedConfig, runtime_dir: Path, base_env: dict[str, str], nvml_factory=Nvml,
                 gpus_seen: int | None = None):
        self.loaded = loaded
        self.settings: Settings = loaded.settings
        self.config_generation = 1
        self.config_loaded_at = time.time()
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.run = RunState(drain_timeout_s=self.settings.drain.timeout_s)
        self.active = 0  # requests inside handle(), queued or running
        self._idle = asyncio.Event()
        self._idle.set()
        self.pids_changed = asyncio.Event()  # a worker process started: the pid file wants writing
        self.room = GpuRoom(self)
        self.fleet = Fleet(self.settings, runtime_dir, base_env, on_state=self._replica_changed,
                           on_exit=self._replica_exited, on_breaker=self._breaker_changed,
                           gate_factory=lambda r: (lambda: self.room.admit(r)),
                           on_protocol_error=lambda kind: self.metrics.worker_protocol_errors.labels(kind).inc(),
                           on_spawn=self.pids_changed.set, on_idle=self._replica_idle,
                           on_models=lambda: self.path.models_changed(), gpus_seen=gpus_seen)
        self.pressure = PressureControl(self, nvml_factory)
        self.fleet.queue_gate = self._gpu_fits
        self.fleet.room = self.room
        self.path = RequestPath(self.settings, self.fleet, self.metrics, self.pressure, self.run)
        self.metrics.attach_state(self._metrics_state)

    @property
    def watcher(self):
        return self.pressure.watcher

    @property
    def worker(self):
        """The first worker's first replica (what the single-worker form calls "the worker")."""
        return self.fleet.first().manager

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.fleet.start()
        self.pressure.start()
        self.room.start()

    async def open_jobs(self, state_env: dict[str, str], consumer: str) -> None:
        """The durable job store and its manager (SQLite in the state directory unless configured)."""
        js = self.settings.jobs
        spec = store_spec(js.store, resolve_state_dir(self.settings.state_dir, state_env))
        store = open_store(spec, consumer=consumer, lease_s=js.lease_s)
        try:
            await store.open()
        except StoreUnavailable as exc:  # Redis down: jobs answer 503 until it is back; it reconnects
            log.warning("jobs_store_unavailable", store=spec.kind, error=str(exc))
        self.jobs = JobManager(js, store, _JobRunner(self.path))
        self.jobs.hooks = job_metrics(self.metrics.registry, lambda: self.jobs.pending)
        log.info("jobs_ready", store=spec.kind, where=spec.path or spec.url)

    async def aclose(self) -> None:
        if self.jobs is not None:
            await self.jobs.aclose(grace_s=0.0)
        await self.room.aclose()
        await self.pressure.aclose()
        await self.fleet.aclose()

    def apply(self, loaded: LoadedConfig) -> ReloadSummary:
        """Take a new, valid configuration at once; changed workers are replaced one replica at a time."""
        self.loaded = loaded
        self.config_generation += 1
        self.config_loaded_at = time.time()
        old = self.settings
        self.settings = loaded.settings
        for r in self.fleet.replicas():
            if r.manager.degraded:
                r.manager.log.info("fallback_cleared", reason="operator reload")
                r.manager.degraded = None
                r.manager.env_override = {}
                r.manager.oom_restarts = 0
                r.manager.request_restart(ExitReason.RELOAD)
        done = self.fleet.apply(self.settings)
        self.run.drain_timeout_s = self.settings.drain.timeout_s
        self.path.derive(self.settings)
        self.pressure.reconfigure(old)
        self.room.changed()
        return done

    # -- callbacks from the fleet --------------------------------------------------------------
    def _breaker_changed(self, r: Replica, old: BreakerState, new: BreakerState, reason: str) -> None:
        log.info("breaker_state", worker=r.worker, replica=r.index, old=old.value, new=new.value, reason=reason)
        self.metrics.breaker_transitions.labels(new.value).inc()

    def _replica_changed(self, r: Replica, old: WorkerState, new: WorkerState, reason: str) -> None:
        if new is WorkerState.READY and old is WorkerState.STARTING and r.manager.last_start_s is not None:
            self.metrics.worker_start.observe(r.manager.last_start_s)
        self.room.on_state(r, new)
        if new is WorkerState.READY:
            self.jobs_slot_free()  # queued jobs for it may start now
        g = self.fleet.groups.get(r.worker)
        if new is WorkerState.UNLOADED and g is not None and g.queue.total > 0 and self.room.refusal(r) is None:
            # requests wait for it (they came while it was being evicted or unloaded): start it again
            r.manager.load()

    def _replica_idle(self) -> None:
        self.room.changed()  # an idle replica may now be evicted for a waiter
        self.jobs_slot_free()

    def _replica_exited(self, r: Replica, info: ExitInfo) -> None:
        if info.reason in UNLOAD_EXITS:
            self.metrics.worker_unloads.labels(r.worker, info.reason.value).inc()
        else:
            self.metrics.worker_restarts.labels(r.worker, r.label, info.reason.value).inc()
        self.pressure.after_exit(r, info)

    def worker_pids(self) -> list[int]:
        out = []
        for r in self.fleet.replicas():
            inc = r.manager.current
            if inc is not None and inc.pid and not inc.exited.is_set():
                out.append(inc.pid)
        return out

    def _gpu_fits(self, mb: int) -> bool:
        """A route's gpu_memory_mb: is that much free on every GPU, after what running requests reserved?"""
        w = self.pressure.watcher
        r = w.reading
        if r is None or not r.devices or not w.available:
            return True  # no GPU figures: nothing to wait for
        free = min(d.memory_total_bytes - d.memory_used_bytes for d in r.devices)
        reserved = sum(g.queue.reserved_mb for g in self.fleet.groups.values())
        return free - reserved * 1048576 >= mb * 1048576

    def ledger_reading(self, reading: Reading) -> None:
        self.room.on_reading(reading)

    def degraded_header(self) -> dict[str, str] | None:
        d = self.degraded()
        return {"X-Degraded": d} if d else None

    def degraded(self) -> str | None:
        return self.fleet.degraded()

    def jobs_slot_free(self) -> None:
        self.run.slot_free()

    def shutting_down(self) -> Rejected:
        return self.run.shutting_down()

    # what the daemon's life says (a RunState the request path shares)
    accepting = property(lambda self: self.run.accepting, lambda self, v: setattr(self.run, "accepting", v))
    abandoned = property(lambda self: self.run.abandoned, lambda self, v: setattr(self.run, "abandoned", v))
    jobs = property(lambda self: self.run.jobs, lambda self, v: setattr(self.run, "jobs", v))

    # -- readiness -----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        why = []
        if not self.accepting:
            why.append("draining: shutting down")
        why += self.fleet.not_ready(time.monotonic())
        return not why, why

    # -- the request path and drain ------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.active += 1
        self._idle.clear()
        try:
            return await self.path.handle(request)
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float, give_up: asyncio.Event) -> bool:
        """Wait until no request is queued or running (drain); False if time ran out first."""
        waiters = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(give_up.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return self.active == 0

    def drain_deadline_now(self) -> None:
        """Shutdown stops waiting (drain timeout, second signal): queued requests get 503 at once and
        none is sent (or retried) to a worker again; what runs ends with the workers' stop."""
        if self.abandoned:
            return
        self.abandoned = True
        log.warning("drain_abandoned", left=self.active, queued=self.queued())
        for g in self.fleet.groups.values():
            g.queue.fail_waiting(self.shutting_down)

    # -- figures -------------------------------------------------------------------------------
    def queued(self) -> int:
        return sum(g.queue.total for g in self.fleet.groups.values())

    def inflight(self) -> int:
        return sum(g.queue.inflight() for g in self.fleet.groups.values())

    def status_line(self) -> str:
        """systemd's STATUS=: one worker as "worker ready, ...", a fleet per worker and replica count."""
        groups = list(self.fleet.groups.values())
        tail = f"queue {self.queued()}, inflight {self.inflight()}"
        if len(groups) == 1 and len(groups[0].replicas) == 1:
            r = groups[0].replicas[0]
            return f"worker {r.manager.state.value}, {tail}, breaker {r.breaker.state.value}"
        parts = []
        for g in groups:
            up = sum(1 for r in g.replicas if r.manager.state in SERVING_STATES)
            parts.append(f"{g.name} {up}/{len(g.replicas)} up")
        return f"workers: {', '.join(parts)}; {tail}"

    def status(self) -> dict:
        return render_status(self)

    def _metrics_state(self) -> dict:
        return metrics_state(self)
