"""The fleet: every named worker, its replicas, their wait lines and breakers, and which replica serves next.

One `Replica` record per replica (its lifecycle manager, breaker, memory readings); one `WorkerGroup`
per named worker (its spec, replicas, wait line, models). `Fleet` alone creates, starts, reconfigures
and retires replicas; the request path asks it for a group and a replica, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import structlog

from .aio import TaskSet, cancel_and_wait, wait_quietly
from .circuit_breaker import CircuitBreaker
from .config import Settings, WorkerSpec
from .errors import Rejected
from .request_queue import RequestQueue
from .states import BreakerState, WorkerState
from .upstream import UpstreamError, fetch
from .worker_process import ExitInfo, Incarnation, InFlight, WorkerManager

log = structlog.get_logger("supervisor.fleet")

RECENT_EXITS = 50  # exits kept for /status and /ui
DISCOVERY_TIMEOUT_S = 5.0
MODELS_MAX_BYTES = 1 << 20  # a worker's model list larger than this is not read


def pick_replica(candidates: list[Replica], rr: int) -> Replica | None:
    """The replica with the fewest requests in flight; ties go round robin from `rr`."""
    if not candidates:
        return None
    least = min(r.manager.inflight for r in candidates)
    tied = [r for r in candidates if r.manager.inflight == least]
    return tied[rr % len(tied)]


@dataclass
class ReloadSummary:
    """What a reload did to the fleet (replicas named worker/index), for the config_reloaded log line."""

    workers_added: list[str] = field(default_factory=list)
    workers_removed: list[str] = field(default_factory=list)
    replicas_added: list[str] = field(default_factory=list)
    replicas_retired: list[str] = field(default_factory=list)
    replicas_replaced: list[str] = field(default_factory=list)  # a changed command/env: a new process each

    def fields(self) -> dict:
        """The log fields: worker_replaced only when a running replica gets a new process."""
        return {"worker_replaced": bool(self.replicas_replaced),
                **{k: v for k, v in asdict(self).items() if v}}


class Replica:
    """One replica of one worker: its lifecycle, breaker and readings, and the task that runs it."""

    __slots__ = ("worker", "index", "gpu", "manager", "breaker", "rss_bytes", "gpu_memory_bytes",
                 "gpu_peak_bytes", "task", "draining_for_room", "evict_mark")

    def __init__(self, worker: str, index: int, gpu: int | None, manager: WorkerManager, breaker: CircuitBreaker):
        self.worker = worker
        self.index = index
        self.gpu = gpu
        self.manager = manager
        self.breaker = breaker
        self.rss_bytes = 0
        self.gpu_memory_bytes = 0
        self.gpu_peak_bytes = 0  # the most NVML has seen its process tree hold (the learned need)
        self.task: asyncio.Task | None = None
        self.draining_for_room = False  # the ledger asked: send it nothing new so it can be evicted
        self.evict_mark = False  # chosen for eviction: new requests wait instead of restarting it

    @property
    def label(self) -> str:
        return str(self.index)

    @property
    def name(self) -> str:
        return f"{self.worker}/{self.index}"

    @property
    def admits(self) -> bool:
        """Serving, and not being cleared out by the GPU ledger."""
        return self.manager.serving and not self.draining_for_room and not self.evict_mark

    def can_take(self, now: float) -> bool:
        return self.admits and self.breaker.would_allow(now)

    @property
    def incarnation(self) -> Incarnation | None:
        """The process it runs now (None before the first spawn)."""
        return self.manager.current

    @property
    def degraded(self) -> str | None:
        return self.manager.degraded

    @property
    def probe_failures(self) -> int:
        return self.manager.probe_failures

    def begin(self, ex: InFlight) -> Incarnation:
        """A request goes to its current process: counted in flight there until `end`."""
        inc = self.manager.current
        assert inc is not None
        self.manager.begin_request(inc, ex)
        return inc

    def end(self, inc: Incarnation, ex: InFlight, oom: bool) -> None:
        self.manager.end_request(inc, ex, oom)


class WorkerGroup:
    """One named worker: its spec, replicas, wait line and the models it serves."""

    def __init__(self, name: str, spec: WorkerSpec, settings: Settings):
        self.name = name
        self.spec = spec
        self.replicas: list[Replica] = []
        self.queue = RequestQueue(settings.queue)
        self.discovered: tuple[str, ...] = ()
        self.models_read = False  # its GET /v1/models was asked once (discovery, or the check of declared names)
        # declared names its own GET /v1/models does not serve (None: not checked, or nothing declared)
        self.models_missing: tuple[str, ...] | None = None
        self.concurrency = spec.concurrency or settings.queue.concurrency
        self._rr = 0
        self.paused = False

    @property
    def models(self) -> tuple[str, ...]:
        return self.spec.models or self.discovered

    @property
    def models_known(self) -> bool:
        """Declared, or read from the worker: a model it does not list is not its."""
        return bool(self.spec.models) or self.models_read

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.manager.serving]

    def loaded(self) -> bool:
        """Some replica serves now (what GET /v1/models calls `loaded`)."""
        return any(r.manager.serving for r in self.replicas)

    def started(self) -> bool:
        """Some replica holds, or is about to hold, its process (an on-demand worker's first request starts it)."""
        return any(r.manager.started for r in self.replicas)

    def pick(self, now: float) -> Replica | None:
        cands = [r for r in self.replicas if r.can_take(now)]
        r = pick_replica(cands, self._rr)
        self._rr += 1
        return r

    def refresh(self) -> None:
        """Slots follow the replicas that serve; the wait line opens when one does."""
        n = sum(1 for r in self.replicas if r.admits)
        self.queue.pools["default"].size = self.concurrency * max(1, n)
        self.queue.open = n > 0 and not self.paused
        if self.queue.open:
            self.queue.pump()

    def any_breaker_allows(self, now: float) -> bool:
        return any(r.breaker.would_allow(now) for r in self.replicas if r.manager.state is not WorkerState.UNLOADED) \
            or all(r.manager.state is WorkerState.UNLOADED for r in self.replicas)

    def breaker_retry_after(self, now: float) -> float:
        waits = [r.breaker.retry_after(now) for r in self.replicas]
        return min(waits) if waits else 1.0

    def expected_ready_in(self) -> float:
        waits = [r.manager.expected_ready_in() for r in self.replicas]
        return min(waits) if waits else 1.0

    def state_summary(self) -> str:
        states = [r.manager.state.value for r in self.replicas]
        return ", ".join(sorted(set(states))) if states else "no replicas"


class Fleet:
    """Creates, starts, reconfigures and retires the replicas of every worker."""

    def __init__(self, settings: Settings, runtime_dir: Path, base_env: dict[str, str], *,
                 on_state: Callable[[Replica, WorkerState, WorkerState, str], None],
                 on_exit: Callable[[Replica, ExitInfo], None],
                 on_breaker: Callable[[Replica, BreakerState, BreakerState, str], None],
                 gate_factory: Callable[[Replica], Callable] | None = None,
                 on_protocol_error: Callable[[str], None] | None = None,
                 on_spawn: Callable[[], None] | None = None,
                 on_idle: Callable[[], None] | None = None,
                 on_models: Callable[[], None] | None = None,
                 gpus_seen: int | None = None):
        self.settings = settings
        self.runtime_dir = runtime_dir
        self.base_env = base_env
        self._on_state = on_state
        self._on_exit = on_exit
        self._on_breaker = on_breaker
        self._gate_factory = gate_factory
        self._gpus_seen = gpus_seen
        self._on_protocol_error = on_protocol_error
        self._on_spawn = on_spawn
        self._on_idle = on_idle
        self._on_models = on_models  # the models a worker serves changed (discovered, or a reload)
        self.groups: dict[str, WorkerGroup] = {}
        self.exits: deque[dict] = deque(maxlen=RECENT_EXITS)
        self._tasks = TaskSet()
        self._started = False
        self.retiring: list[Replica] = []
        self._queue_gate: Callable[[int], bool] | None = None  # a route's gpu_memory_mb: may it start now?
        for name, spec in settings.fleet.items():
            g = self.groups[name] = WorkerGroup(name, spec, settings)
            for i, gpu in enumerate(self._placements(name, spec)):
                g.replicas.append(self._new_replica(g, i, gpu, spec))
            g.refresh()

    @property
    def queue_gate(self) -> Callable[[int], bool] | None:
        return self._queue_gate

    @queue_gate.setter
    def queue_gate(self, fits: Callable[[int], bool] | None) -> None:
        self._queue_gate = fits
        for g in self.groups.values():
            g.queue.fits = fits

    def _placements(self, name: str, spec: WorkerSpec) -> tuple[int | None, ...]:
        gpus = spec.placements(self._gpus_seen)
        unseen = [g for g in gpus if g is not None and self._gpus_seen is not None and g >= self._gpus_seen]
        if unseen:
            log.warning("gpu_not_seen", worker=name, gpus=unseen, nvml_devices=self._gpus_seen,
                        action="starting its replicas anyway")
        elif spec.gpus == "auto" and not self._gpus_seen:
            log.warning("gpus_auto_without_nvml", worker=name, action="one replica, no GPU pinned")
        return gpus

    # -- records -------------------------------------------------------------------------------
    def _new_replica(self, g: WorkerGroup, index: int, gpu: int | None, spec: WorkerSpec) -> Replica:
        holder: list[Replica] = []

        def changed(old: WorkerState, new: WorkerState, reason: str) -> None:
            self._state_changed(holder[0], old, new, reason)

        def exited(info: ExitInfo) -> None:
            r = holder[0]
            self.exits.append({"worker": r.worker, "replica": r.index, **info.as_dict()})
            self._on_exit(r, info)

        def breaker_changed(old: BreakerState, new: BreakerState, reason: str) -> None:
            self._on_breaker(holder[0], old, new, reason)

        mgr = WorkerManager(spec, self.runtime_dir, self.base_env, on_change=changed, on_exit=exited,
                            on_down=lambda: self._down(g), name=g.name, index=index, gpu=gpu,
                            drain_timeout_s=self.settings.drain.timeout_s,
                            work_waiting=lambda: g.queue.total > 0,
                            pool_kw={"max_head_bytes": self.settings.limits.worker_head_bytes,
                                     "on_protocol_error": self._on_protocol_error},
                            on_spawn=self._on_spawn, on_idle=self._on_idle)
        r = Replica(g.name, index, gpu, mgr, CircuitBreaker(self.settings.breaker, on_change=breaker_changed))
        holder.append(r)
        if self._gate_factory is not None:
            mgr.gate = self._gate_factory(r)
        return r

    def replicas(self):
        for g in self.groups.values():
            yield from g.replicas

    def first(self) -> Replica:
        return next(iter(self.groups.values())).replicas[0]

    def group_for_model(self, model: str) -> WorkerGroup | None:
        for g in self.groups.values():
            if model in g.models:
                return g
        return None

    def served_models(self) -> list[str]:
        return [m for g in self.groups.values() for m in g.models]

    # -- asked by the request path -------------------------------------------------------------
    room = None  # the GPU room (gpu_room.GpuRoom), set by the supervisor

    def wake(self, g: WorkerGroup) -> None:
        """The first request for an unloaded worker starts it (once, however many arrive)."""
        for r in g.replicas:
            if self.room.refusal(r) is not None:
                continue
            r.manager.load()
        if all(self.room.refusal(r) is not None for r in g.replicas):
            need = max(self.room.need_bytes(r) for r in g.replicas) >> 20
            raise Rejected("worker_unavailable", f"worker {g.name} needs {need} MiB of GPU memory, more than its "
                           "GPU can give even with every other unpinned worker stopped", 60.0)

    def waiting_for_room(self, g: WorkerGroup) -> str | None:
        """Why none of `g`'s replicas has started when the GPU ledger holds them back, else None."""
        for r in g.replicas:
            why = self.room.waiting(r)
            if why is not None:
                return why
        return None

    def unavailable_retry_after(self, g: WorkerGroup) -> float:
        waits = [self.room.retry_after.get((r.worker, r.index)) for r in g.replicas]
        waits = [w for w in waits if w is not None]
        return min(waits) if waits else g.expected_ready_in()

    def degraded(self) -> str | None:
        """The first replica's degraded mode (cpu-fallback), which every answer names in X-Degraded."""
        for r in self.replicas():
            if r.manager.degraded:
                return r.manager.degraded
        return None

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        for r in self.replicas():
            self._run(r)

    def _run(self, r: Replica) -> None:
        r.task = asyncio.create_task(r.manager.run(), name=f"worker-{r.worker}-{r.index}")
        r.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("replica_supervision_failed", task=task.get_name(), exc_info=task.exception())
        if self.on_task_failed is not None:
            self.on_task_failed()

    on_task_failed: Callable[[], None] | None = None

    async def shutdown(self) -> None:
        """Stop every replica (gracefully, each with its own stop_grace_s), all at once."""
        mgrs = [r.manager for r in self.replicas()] + [r.manager for r in self.retiring]
        await asyncio.gather(*(m.shutdown() for m in mgrs), return_exceptions=True)
        await self.aclose()

    async def aclose(self) -> None:
        await cancel_and_wait([r.task for r in [*self.replicas(), *self.retiring]])
        await self._tasks.aclose()

    def stopped(self) -> bool:
        return all(r.manager.stopped.is_set() for r in self.replicas())

    # -- callbacks -----------------------------------------------------------------------------
    def _down(self, g: WorkerGroup) -> None:
        g.refresh()

    def _state_changed(self, r: Replica, old: WorkerState, new: WorkerState, reason: str) -> None:
        if new is WorkerState.READY and old is WorkerState.STARTING:
            r.breaker.release_forced("worker ready")
            g = self.groups.get(r.worker)
            if g is not None:
                # every start: a new command may serve other names (discovered), or not the declared ones
                self._tasks.spawn(self._read_models(g, r))
        elif new is WorkerState.FAILED:
            r.breaker.force_open("worker crash loop")
        self._on_state(r, old, new, reason)
        g = self.groups.get(r.worker)
        if g is not None:
            g.refresh()

    async def _read_models(self, g: WorkerGroup, r: Replica) -> None:
        """Once a replica is ready, ask its own GET /v1/models: the names of a worker that declares none
        (discovery), or whether it serves the names declared for it (a mismatch is warned about)."""
        inc = r.manager.current
        if inc is None:
            return
        declared = g.spec.models
        names = await _worker_models(inc, g.name)
        if self.groups.get(g.name) is not g or g.spec.models != declared:
            return  # removed or reconfigured meanwhile: a newer read follows
        if declared:
            await self._check_declared(g, r, inc, declared, names)
            return
        taken = {m for other in self.groups.values() if other is not g for m in other.models}
        found = names or ()
        clash = [m for m in found if m in taken]
        before = g.models
        if names is not None or not g.models_read:
            g.discovered = tuple(m for m in found if m not in taken)
        g.models_read = True
        log.info("models_discovered", worker=g.name, replica=r.index, models=list(g.discovered),
                 ignored_as_taken=clash or None)
        if g.models != before and self._on_models is not None:
            self._on_models()

    async def _check_declared(self, g: WorkerGroup, r: Replica, inc: Incarnation, declared: tuple[str, ...],
                              names: tuple[str, ...] | None) -> None:
        """Warn (log models_mismatch, /status models_missing) about declared names the worker does not serve:
        requests naming them would get the worker's own 404 while the daemon lists them as loaded."""
        if names is None:
            return  # no list to compare with (logged): nothing to warn about
        missing = []
        for m in declared:
            # an alias the worker accepts without listing it answers its GET /v1/models/{id}
            if m not in names and await _worker_get(inc, "/v1/models/" + quote(m, safe=""), g.name) != 200:
                missing.append(m)
        if self.groups.get(g.name) is not g or g.spec.models != declared:
            return
        g.models_read = True
        if missing:
            log.warning("models_mismatch", worker=g.name, replica=r.index, declared=list(declared),
                        served=list(names), missing=missing,
                        hint="requests naming these get the worker's own 404: declare what its GET /v1/models "
                             "lists, or give it the name (model_worker: --model-name)")
        elif g.models_missing:
            log.info("models_match", worker=g.name, replica=r.index, declared=list(declared))
        g.models_missing = tuple(missing)

    # -- readiness -----------------------------------------------------------------------------
    def not_ready(self, now: float) -> list[str]:
        why = []
        for g in self.groups.values():
            if g.spec.start != "eager":
                continue
            if not any(r.manager.serving for r in g.replicas):
                # a replica that cannot start at all says why (a program not found)
                boot = next((r.manager.last_exit.detail for r in g.replicas
                             if r.manager.last_exit is not None and r.manager.last_exit.detail), None)
                why.append(f"worker {g.name}: no replica serving ({g.state_summary()})" + (f"; {boot}" if boot else ""))
            elif not g.models_known:
                why.append(f"worker {g.name}: reading the models it serves (its GET /v1/models)")
            elif not any(r.breaker.would_allow(now) for r in g.serving()):
                why.append(f"worker {g.name}: breaker open on every serving replica")
        return why

    # -- reload --------------------------------------------------------------------------------
    def apply(self, settings: Settings) -> ReloadSummary:
        """Add, remove and reconfigure workers and replicas; unchanged replicas keep running. Says what
        it did: which workers came and went, which replicas were added, retired or are being replaced."""
        self.settings = settings
        new_fleet = settings.fleet
        done = ReloadSummary()
        for name in [n for n in self.groups if n not in new_fleet]:
            g = self.groups.pop(name)
            done.workers_removed.append(name)
            for r in g.replicas:
                self._retire(r)
                done.replicas_retired.append(r.name)
            g.queue.fail_waiting(lambda n=name: Rejected(
                "worker_unavailable", f"worker {n!r} was removed by a configuration reload", 1.0))
        for name, spec in new_fleet.items():
            g = self.groups.get(name)
            if g is None:
                g = self.groups[name] = WorkerGroup(name, spec, settings)
                g.queue.fits = self._queue_gate
                for i, gpu in enumerate(self._placements(name, spec)):
                    g.replicas.append(self._new_replica(g, i, gpu, spec))
                if self._started:
                    for r in g.replicas:
                        self._run(r)
                g.refresh()
                done.workers_added.append(name)
                done.replicas_added += [r.name for r in g.replicas]
                continue
            g.queue.configure(settings.queue)
            g.concurrency = spec.concurrency or settings.queue.concurrency
            for r in g.replicas:
                r.breaker.reconfigure(settings.breaker)
            old_spec, g.spec = g.spec, spec
            if spec.models != old_spec.models:
                g.discovered = ()
                g.models_read = False  # what it serves is asked again (below, or at its next start)
                g.models_missing = None
                serving = g.serving()
                if serving:  # no restart follows (models is a fleet-level key): read them from it now
                    self._tasks.spawn(self._read_models(g, serving[0]))
            # replicas by placement: keep those still wanted, retire the rest, add the new ones
            want = list(self._placements(name, spec))
            keep: list[Replica] = []
            for r in g.replicas:
                if r.gpu in want:
                    keep.append(r)
                    want.remove(r.gpu)
                else:
                    self._retire(r)
                    done.replicas_retired.append(r.name)
            used = {r.index for r in keep}
            for gpu in want:
                idx = next(i for i in range(len(keep) + len(want) + 1) if i not in used)
                used.add(idx)
                r = self._new_replica(g, idx, gpu, spec)
                keep.append(r)
                done.replicas_added.append(r.name)
                if self._started:
                    self._run(r)
            g.replicas = sorted(keep, key=lambda r: r.index)
            stale = [r for r in g.replicas if r.manager.spec.lifecycle() != spec.lifecycle()
                     or r.manager.state is WorkerState.FAILED]
            if stale:
                self._tasks.spawn(self._roll(g, stale, spec))
                done.replicas_replaced += [r.name for r in stale]
            for r in g.replicas:
                if r not in stale:
                    r.manager.reconfigure(spec, settings.drain.timeout_s)  # no restart: fleet-level keys only
            g.refresh()
        return done

    async def _roll(self, g: WorkerGroup, stale: list[Replica], spec: WorkerSpec) -> None:
        """Replace a changed worker one replica at a time: with N replicas, N - 1 keep serving."""
        for r in stale:
            if r not in g.replicas:
                continue
            was_up = r.manager.state is not WorkerState.UNLOADED
            r.manager.reconfigure(spec, self.settings.drain.timeout_s)
            if not was_up or len(g.replicas) == 1:
                continue
            deadline = time.monotonic() + spec.startup_timeout_s + self.settings.drain.timeout_s + spec.stop_grace_s
            while (left := deadline - time.monotonic()) > 0:
                moved = r.manager.moved
                st = r.manager.state
                if r.manager.serving or st in (WorkerState.FAILED, WorkerState.UNLOADED, WorkerState.STOPPED):
                    break
                await wait_quietly(moved.wait(), left)

    def _retire(self, r: Replica) -> None:
        self.retiring.append(r)
        r.manager.retire()
        log.info("replica_retiring", worker=r.worker, replica=r.index, gpu=r.gpu)

        async def reap() -> None:
            await r.manager.stopped.wait()
            if r.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await r.task
            if r in self.retiring:
                self.retiring.remove(r)
            log.info("replica_retired", worker=r.worker, replica=r.index)

        if r.task is not None:
            self._tasks.spawn(reap())
        else:
            self.retiring.remove(r)


async def _worker_get(inc: Incarnation, target: str, worker: str) -> int | None:
    """The status of a GET the daemon makes itself on a fresh connection to the worker (None: no answer)."""
    status, _ = await _worker_fetch(inc, target, worker)
    return status


async def _worker_fetch(inc: Incarnation, target: str, worker: str) -> tuple[int | None, bytes]:
    try:
        async with asyncio.timeout(DISCOVERY_TIMEOUT_S):
            return await fetch(inc.pool, target, MODELS_MAX_BYTES)
    except (TimeoutError, UpstreamError, OSError) as exc:
        log.info("models_read_failed", worker=worker, target=target, error=str(exc) or type(exc).__name__)
        return None, b""


async def _worker_models(inc: Incarnation, worker: str) -> tuple[str, ...] | None:
    """The ids of the worker's own GET /v1/models; None when it has no such list (or gave no answer)."""
    status, body = await _worker_fetch(inc, "/v1/models", worker)
    if status != 200:
        if status is not None:
            log.info("models_read_failed", worker=worker, target="/v1/models", status=status)
        return None
    try:
        data = json.loads(body)
        return tuple(str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and m.get("id"))
    except (ValueError, TypeError, AttributeError) as exc:
        log.info("models_read_failed", worker=worker, target="/v1/models", error=str(exc))
        return None
