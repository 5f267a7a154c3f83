"""Reactions to memory pressure and memory readings: shed, pause, clean up, restart, recycle, fall back.

Each watcher reading becomes a `PressurePlan`, a pure function of the reading, the watcher's decision
and the replicas' facts (`plan_reaction`; the level decisions themselves are in pressure.py). The fleet
carries the plan out (readings, caps, restarts, recycles); this module keeps the level, the restart
streak and the watcher, and counts and logs what it decided.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from .aio import TaskSet, cancel_and_wait
from .config import Fallback, Gpu, Recycle
from .gpu_watch import GpuWatcher, Nvml, Reading
from .pressure import Decision, Level, fallback_due, leak_due
from .states import ExitReason

if TYPE_CHECKING:
    from .config import Settings
    from .fleet import Fleet, Replica
    from .fleet.process import ExitInfo
    from .metrics import Metrics

log = structlog.get_logger("supervisor.pressure")


# -- pure plans -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaFacts:
    """What pressure control reads of one replica."""

    key: Hashable
    gpu: int | None
    serving: bool
    recycle: Recycle


@dataclass(frozen=True)
class Streak:
    """Pressure restarts in a row with no relief in between, and when the last one was."""

    count: int = 0
    last_restart: float = -1e9


@dataclass(frozen=True)
class PressurePlan:
    """What one reading asks of the fleet."""

    level: Level
    shed_below: int | None  # priorities with a larger index get 503 overloaded
    pause: bool  # hold every worker's wait line
    cap: int | None  # the default pool's slots, at most
    readings: dict[Hashable, tuple[int, int]] = field(default_factory=dict)  # key -> (rss, gpu memory) bytes
    cleanup: tuple[Hashable, ...] = ()  # POST /cleanup to these
    restart: tuple[Hashable, ...] = ()  # restart these, reason `pressure`
    recycle: tuple[tuple[Hashable, str], ...] = ()  # (key, why): replace these, reason `recycle` (a leak)
    streak: Streak = Streak()


def plan_reaction(d: Decision, reading: Reading, replicas: Sequence[ReplicaFacts], streak: Streak, gpu: Gpu,
                  now: float) -> PressurePlan:
    """The fleet's reaction to one reading. A pressure restart that did not relieve the pressure (another
    process holds the memory) is not repeated at once: each one in a row waits twice as long as the last."""
    readings = {}
    for rep in replicas:
        rss, mem = reading.replicas.get(rep.key, (None, None))
        readings[rep.key] = (rss or 0, mem or 0)
    level = Level(int(d.level))
    cleanup = tuple(r.key for r in replicas if r.serving) if d.cleanup else ()
    if level < 3:
        streak = Streak(0, streak.last_restart)
    serving = [r for r in replicas if r.serving]
    restart: tuple[Hashable, ...] = ()
    recycle: list[tuple[Hashable, str]] = []
    if d.restart and serving:
        base = max(1.0, gpu.actions.critical.restart_after_s or 0)
        wait = base * 2 ** min(streak.count, 6)
        if now - streak.last_restart >= wait or streak.count == 0:
            streak = Streak(streak.count + 1, now)
            critical = {x.index for x in reading.devices if x.ratio is not None and x.ratio >= gpu.thresholds.critical}
            restart = tuple(r.key for r in ([r for r in serving if r.gpu in critical] or serving))
    elif not reading.stale:
        for r in serving:
            rss, mem = readings[r.key]
            leak = leak_due(rss or None, mem or None, r.recycle)
            if leak is not None:
                recycle.append((r.key, leak))
    return PressurePlan(level, d.shed_below_index, d.pause, d.concurrency_cap, readings, cleanup, restart,
                        tuple(recycle), streak)


def fallback_plan(info: ExitInfo, oom_restarts: int, degraded: str | None, fb: Fallback) -> dict[str, str] | None:
    """After an OOM exit: the environment of the CPU fallback when it is due now (None: not now)."""
    if info.reason is ExitReason.OOM and not degraded and fallback_due(oom_restarts, fb.cpu_after_oom_restarts):
        return dict(fb.env)
    return None


# -- the component ------------------------------------------------------------------------------
class PressureControl:
    """The watcher, the current level and shedding, and the plans handed to the fleet."""

    def __init__(self, settings: Settings, fleet: Fleet, metrics: Metrics, nvml_factory=Nvml):
        self.settings = settings
        self.fleet = fleet
        self.metrics = metrics
        self.level = 0
        self.shed_below: int | None = None  # levels with a larger index get 503 overloaded
        self.paused = False
        self.gpu_status: dict = {"available": False, "pressure": "ok", "devices": []}
        self._nvml_factory = nvml_factory
        self.streak = Streak()
        self._tasks = TaskSet()
        self._watch_task: asyncio.Task | None = None
        self.watcher = self._make_watcher()

    def _make_watcher(self) -> GpuWatcher:
        s = self.settings
        return GpuWatcher(s.gpu, s.host.thresholds, lambda: None, self._nvml_factory,
                          worker_env=self._watch_env(), priorities=s.queue.priorities,
                          on_reading=self._on_reading, replica_pids=self.fleet.replica_pids)

    def _watch_env(self) -> dict[str, str]:
        """Watch the devices every replica sees: with one worker, its own CUDA_VISIBLE_DEVICES."""
        envs = [r.worker_env(self.fleet.base_env) for r in self.fleet.replicas()]
        if envs and all("CUDA_VISIBLE_DEVICES" in e for e in envs):
            toks: list[str] = []
            for e in envs:
                for t in e["CUDA_VISIBLE_DEVICES"].split(","):
                    if t.strip() and t.strip() not in toks:
                        toks.append(t.strip())
            return {"CUDA_VISIBLE_DEVICES": ",".join(toks)}
        return {}

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._watch_task = asyncio.create_task(self.watcher.run(), name="gpu-watch")

    async def aclose(self) -> None:
        await cancel_and_wait([self._watch_task])
        await self._tasks.aclose()

    def reconfigure(self, settings: Settings) -> None:
        old, self.settings = self.settings, settings
        s = settings
        if (old.gpu, old.host, old.queue.priorities) != (s.gpu, s.host, s.queue.priorities):
            running = self._watch_task is not None
            if running:
                self._tasks.spawn(cancel_and_wait([self._watch_task]))
            self.watcher = self._make_watcher()
            if running:
                self.start()
        self.watcher.set_worker_env(self._watch_env())

    def retry_after(self) -> float:
        return max(1.0, self.settings.gpu.poll_interval_s * 2)

    # -- readings ------------------------------------------------------------------------------
    def _on_reading(self, r: Reading) -> None:
        d = self.watcher.decision
        self.gpu_status = self.watcher.status()
        facts = [ReplicaFacts(rep.key, rep.gpu, rep.serving, rep.spec.recycle) for rep in self.fleet.replicas()]
        plan = plan_reaction(d, r, facts, self.streak, self.settings.gpu, time.monotonic())
        if int(plan.level) != self.level:
            log.warning("pressure_level", old=Level(self.level).label, new=plan.level.label,
                        shed_below=d.shed_below, pause=d.pause,
                        gpu=[round(x.ratio, 4) for x in r.devices if x.ratio is not None],
                        host=round(r.host_ratio, 4) if r.host_ratio is not None else None)
            self.level = int(plan.level)
        self.shed_below = plan.shed_below
        if plan.pause != self.paused:
            self.paused = plan.pause
            self.metrics.pressure_actions.labels("pause" if plan.pause else "resume").inc()
        if plan.cleanup:
            self.metrics.pressure_actions.labels("cleanup").inc()
        if plan.restart:
            self.metrics.pressure_actions.labels("restart").inc()
            log.warning("pressure_restart", level=plan.level.label, in_a_row=plan.streak.count,
                        replicas=[f"{w}/{i}" for w, i in plan.restart])
        self.streak = plan.streak
        self.fleet.apply_pressure(plan, r)

    # -- after an OOM exit: maybe fall back to CPU ---------------------------------------------
    def after_exit(self, rep: Replica, info: ExitInfo) -> None:
        env = fallback_plan(info, rep.oom_restarts, rep.degraded, self.settings.fallback)
        if env is None:
            return
        self.fleet.degrade(rep, "cpu-fallback", env)
        self.watcher.set_worker_env(self._watch_env())
        self.metrics.pressure_actions.labels("cpu_fallback").inc()
