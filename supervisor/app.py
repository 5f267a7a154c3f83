"""The supervisor: the one object that holds the fleet, the request path, pressure control and the
counters, and applies a new configuration to all of them at once.

It outlives every worker; `handle()` is the daemon's entry for every proxied request. It hears the
fleet's events (FleetEvents) and turns them into metrics, job wake-ups and pid-file writes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from .config import LoadedConfig, Settings
from .errors import Rejected
from .fleet import ExitInfo, Fleet, ReloadSummary, Replica
from .fleet.sleep import WOKEN
from .gpu_watch import Nvml
from .http import RequestPath
from .jobs.manager import JobManager
from .jobs.metrics import job_metrics
from .jobs.settings import resolve_state_dir, store_spec
from .jobs.store import StoreUnavailable, open_store
from .metrics import Metrics
from .pressure_control import PressureControl
from .routing.router import SignalScrapers
from .runstate import RunState
from .states import SERVING_STATES, UNLOAD_EXITS, BreakerState, WorkerState
from .status_view import metrics_state, render_status
from .tracing import Tracing

if TYPE_CHECKING:
    from .trace_spans import Tracer

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
        self.pids_event = asyncio.Event()  # a worker process started: the pid file wants writing
        self.fleet = Fleet(self.settings, runtime_dir, base_env, self, gpus_seen=gpus_seen)
        self.room = self.fleet.room
        self.pressure = PressureControl(self.settings, self.fleet, self.metrics, nvml_factory)
        self.fleet.queue_gate = self._gpu_fits
        self.path = RequestPath(self.settings, self.fleet, self.metrics, self.pressure, self.run)
        self.scrapers = SignalScrapers(self.fleet)  # engines' own load, for workers that ask
        self.metrics.attach_state(self._metrics_state)
        self.tracing = Tracing(self._use_tracer, self.metrics.trace_export_errors.inc)

    @property
    def watcher(self):
        return self.pressure.watcher

    @property
    def worker(self):
        """The first worker's first replica (what the single-worker form calls "the worker")."""
        return self.fleet.first()

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.fleet.start()
        self.pressure.start()
        self.scrapers.sync()

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
        await self.pressure.aclose()
        await self.path.budgets.aclose()
        await self.scrapers.aclose()
        await self.fleet.aclose()
        await self.tracing.aclose()  # last: the spans of what the above ended are sent (within a bound)

    def _use_tracer(self, tracer: Tracer | None) -> None:
        self.path.tracer = tracer

    def apply(self, loaded: LoadedConfig) -> ReloadSummary:
        """Take a new, valid configuration at once; changed workers are replaced one replica at a time."""
        self.loaded = loaded
        self.config_generation += 1
        self.config_loaded_at = time.time()
        self.settings = loaded.settings
        self.fleet.clear_fallbacks()
        done = self.fleet.apply(self.settings)
        self.run.drain_timeout_s = self.settings.drain.timeout_s
        self.path.derive(self.settings)
        self.pressure.reconfigure(self.settings)
        self.tracing.apply(self.settings.tracing)
        self.scrapers.sync()
        self.room.changed()
        return done

    # -- what the fleet reports (FleetEvents) --------------------------------------------------
    def breaker_moved(self, r: Replica, old: BreakerState, new: BreakerState, reason: str) -> None:
        log.info("breaker_state", worker=r.worker, replica=r.index, old=old.value, new=new.value, reason=reason)
        self.metrics.breaker_transitions.labels(new.value).inc()

    def replica_moved(self, r: Replica, old: WorkerState, new: WorkerState, reason: str) -> None:
        if new is WorkerState.ASLEEP:
            self.metrics.worker_sleeps.labels(r.worker, reason).inc()
        elif new is WorkerState.READY and reason == WOKEN and r.last_wake_s is not None:
            self.metrics.worker_wake.observe(r.last_wake_s)
        elif new is WorkerState.READY and old is WorkerState.STARTING and r.last_start_s is not None:
            self.metrics.worker_start.observe(r.last_start_s)

    def replica_exited(self, r: Replica, info: ExitInfo) -> None:
        if info.reason in UNLOAD_EXITS:
            self.metrics.worker_unloads.labels(r.worker, info.reason.value).inc()
        else:
            self.metrics.worker_restarts.labels(r.worker, r.label, info.reason.value).inc()
        self.pressure.after_exit(r, info)

    def slot_free(self) -> None:
        self.run.slot_free()

    def pids_changed(self) -> None:
        self.pids_event.set()

    def models_changed(self) -> None:
        self.path.models_changed()

    def protocol_error(self, kind: str) -> None:
        self.metrics.worker_protocol_errors.labels(kind).inc()

    def supervision_failed(self) -> None:
        if self.on_supervision_failed is not None:
            self.on_supervision_failed()

    on_supervision_failed = None  # the daemon's: exit non-zero rather than serve without a worker

    def worker_pids(self) -> list[int]:
        return list(self.fleet.replica_pids().values())

    def _gpu_fits(self, mb: int) -> bool:
        """A route's gpu_memory_mb: is that much free on every GPU, after what running requests reserved?"""
        w = self.pressure.watcher
        r = w.reading
        if r is None or not r.devices or not w.available:
            return True  # no GPU figures: nothing to wait for
        free = min(d.memory_total_bytes - d.memory_used_bytes for d in r.devices)
        reserved = sum(g.queue.reserved_mb for g in self.fleet.groups.values())
        return free - reserved * 1048576 >= mb * 1048576

    def degraded(self) -> str | None:
        return self.fleet.degraded()

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
    @property
    def active(self) -> int:
        """Requests inside the request path, queued or running."""
        return self.run.active

    async def wait_idle(self, timeout: float, give_up: asyncio.Event) -> bool:
        """Wait until no request is queued or running (drain); False if time ran out first."""
        waiters = [asyncio.ensure_future(self.run.idle()), asyncio.ensure_future(give_up.wait())]
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
            return f"worker {r.state.value}, {tail}, breaker {r.breaker.state.value}"
        parts = []
        for g in groups:
            up = sum(1 for r in g.replicas if r.state in SERVING_STATES)
            parts.append(f"{g.name} {up}/{len(g.replicas)} up")
        return f"workers: {', '.join(parts)}; {tail}"

    def status(self) -> dict:
        return render_status(self)

    def _metrics_state(self) -> dict:
        return metrics_state(self)
