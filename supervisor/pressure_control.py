"""Reactions to memory pressure and memory readings: shed, pause, clean up, restart, recycle, fall back.

`PressureControl` turns each watcher reading into actions on the fleet (the decisions themselves are
pure, in pressure.py); it also hands each replica its own RSS and GPU memory figures.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from .aio import TaskSet, cancel_and_wait
from .gpu_watch import GpuWatcher, Nvml, Reading
from .pressure import Level, fallback_due, leak_due
from .states import ExitReason
from .upstream import UpstreamError
from .worker_process import ExitInfo

if TYPE_CHECKING:
    from .app import Supervisor
    from .fleet import Replica

log = structlog.get_logger("supervisor.pressure")


class PressureControl:
    def __init__(self, sup: Supervisor, nvml_factory=Nvml):
        self.sup = sup
        self.level = 0
        self.shed_below: int | None = None  # levels with a larger index get 503 overloaded
        self.paused = False
        self.gpu_status: dict = {"available": False, "pressure": "ok", "devices": []}
        self._nvml_factory = nvml_factory
        self._streak = 0  # pressure restarts in a row with no relief in between
        self._last_restart = -1e9
        self._tasks = TaskSet()
        self._watch_task: asyncio.Task | None = None
        self.watcher = self._make_watcher()

    def _make_watcher(self) -> GpuWatcher:
        s = self.sup.settings
        return GpuWatcher(s.gpu, s.host.thresholds, lambda: None, self._nvml_factory,
                          worker_env=self._watch_env(), priorities=s.queue.priorities,
                          on_reading=self._on_reading, replica_pids=self._replica_pids)

    def _watch_env(self) -> dict[str, str]:
        """Watch the devices every replica sees: with one worker, its own CUDA_VISIBLE_DEVICES."""
        envs = [r.manager.worker_env() for r in self.sup.fleet.replicas()]
        if envs and all("CUDA_VISIBLE_DEVICES" in e for e in envs):
            toks: list[str] = []
            for e in envs:
                for t in e["CUDA_VISIBLE_DEVICES"].split(","):
                    if t.strip() and t.strip() not in toks:
                        toks.append(t.strip())
            return {"CUDA_VISIBLE_DEVICES": ",".join(toks)}
        return {}

    def _replica_pids(self) -> dict:
        out = {}
        for r in self.sup.fleet.replicas():
            inc = r.manager.current
            if inc is not None and inc.pid and not inc.exited.is_set():
                out[(r.worker, r.index)] = inc.pid
        return out

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._watch_task = asyncio.create_task(self.watcher.run(), name="gpu-watch")

    async def aclose(self) -> None:
        await cancel_and_wait([self._watch_task])
        await self._tasks.aclose()

    def reconfigure(self, old_settings) -> None:
        s = self.sup.settings
        if (old_settings.gpu, old_settings.host, old_settings.queue.priorities) != (s.gpu, s.host, s.queue.priorities):
            running = self._watch_task is not None
            if running:
                self._tasks.spawn(cancel_and_wait([self._watch_task]))
            self.watcher = self._make_watcher()
            if running:
                self.start()
        self.watcher.set_worker_env(self._watch_env())

    def retry_after(self) -> float:
        return max(1.0, self.sup.settings.gpu.poll_interval_s * 2)

    # -- readings ------------------------------------------------------------------------------
    def _on_reading(self, r: Reading) -> None:
        sup = self.sup
        d = self.watcher.decision
        self.gpu_status = self.watcher.status()
        for rep in sup.fleet.replicas():
            rss, gpu = r.replicas.get((rep.worker, rep.index), (None, None))
            rep.rss_bytes = rss or 0
            rep.gpu_memory_bytes = gpu or 0
            rep.gpu_peak_bytes = max(rep.gpu_peak_bytes, rep.gpu_memory_bytes)
        sup.ledger_reading(r)
        level = int(d.level)
        if level != self.level:
            log.warning("pressure_level", old=Level(self.level).label, new=Level(level).label,
                        shed_below=d.shed_below, pause=d.pause,
                        gpu=[round(x.ratio, 4) for x in r.devices if x.ratio is not None],
                        host=round(r.host_ratio, 4) if r.host_ratio is not None else None)
            self.level = level
        self.shed_below = d.shed_below_index
        paused_changed = d.pause != self.paused
        if paused_changed:
            self.paused = d.pause
            sup.metrics.pressure_actions.labels("pause" if d.pause else "resume").inc()
        for g in sup.fleet.groups.values():
            g.queue.pools["default"].cap = d.concurrency_cap
            g.paused = self.paused
            g.refresh()
        if d.cleanup:
            sup.metrics.pressure_actions.labels("cleanup").inc()
            for rep in sup.fleet.replicas():
                if rep.manager.serving:
                    self._tasks.spawn(self._call_cleanup(rep))
        if level < 3:
            self._streak = 0
        serving = [rep for rep in sup.fleet.replicas() if rep.manager.serving]
        if d.restart and serving:
            now = time.monotonic()
            # a restart that did not relieve the pressure (another process holds the memory) is not
            # repeated at once: each one in a row waits twice as long as the last
            base = max(1.0, sup.settings.gpu.actions.critical.restart_after_s or 0)
            wait = base * 2 ** min(self._streak, 6)
            if now - self._last_restart >= wait or self._streak == 0:
                self._streak += 1
                self._last_restart = now
                critical = {x.index for x in r.devices if x.ratio is not None
                            and x.ratio >= sup.settings.gpu.thresholds.critical}
                victims = [rep for rep in serving if rep.gpu in critical] or serving
                sup.metrics.pressure_actions.labels("restart").inc()
                log.warning("pressure_restart", level=Level(level).label, in_a_row=self._streak,
                            replicas=[f"{v.worker}/{v.index}" for v in victims])
                for v in victims:
                    v.manager.request_restart(ExitReason.PRESSURE)
        elif not r.stale:
            for rep in serving:
                rc = rep.manager.spec.recycle
                leak = leak_due(rep.rss_bytes or None, rep.gpu_memory_bytes or None, rc)
                if leak is not None:
                    rep.manager.log.warning("worker_recycle", why=leak, rss_bytes=rep.rss_bytes,
                                            gpu_memory_bytes=rep.gpu_memory_bytes)
                    rep.manager.request_restart(ExitReason.RECYCLE)

    async def _call_cleanup(self, rep: Replica) -> None:
        """POST /cleanup on the replica's own connection; a worker without one answers 404: fine."""
        inc = rep.manager.current
        if inc is None or inc.exited.is_set():
            return
        head = b"POST /cleanup HTTP/1.1\r\nHost: worker\r\nContent-Length: 0\r\n\r\n"
        conn = None
        try:
            async with asyncio.timeout(rep.manager.spec.health.timeout_s * 5):
                conn = await inc.pool.connect()
                await conn.start(head, None, False)
                while await conn.read():
                    pass
            rep.manager.log.info("worker_cleanup", status=conn.status, worker_pid=inc.pid)
        except (TimeoutError, UpstreamError) as exc:
            rep.manager.log.warning("worker_cleanup_failed", error=str(exc), worker_pid=inc.pid)
        finally:
            if conn is not None:
                conn.abort()

    # -- after an OOM exit: maybe fall back to CPU ---------------------------------------------
    def after_exit(self, rep: Replica, info: ExitInfo) -> None:
        fb = self.sup.settings.fallback
        m = rep.manager
        if (info.reason is ExitReason.OOM and not m.degraded
                and fallback_due(m.oom_restarts, fb.cpu_after_oom_restarts)):
            m.env_override = dict(fb.env)
            m.degraded = "cpu-fallback"
            self.watcher.set_worker_env(self._watch_env())
            self.sup.metrics.pressure_actions.labels("cpu_fallback").inc()
            m.log.warning("fallback_engaged", mode="cpu-fallback", oom_restarts=m.oom_restarts, env=fb.env)
