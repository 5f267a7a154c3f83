"""One replica's process lifecycle: spawn, readiness, health probes, hang detection, stop, classify,
respawn, unload.

One supervising coroutine (`Lifecycle.run`) owns the child process; the fleet asks it to act through
`request_restart` / `unload` / `load` / `retire` / `shutdown`. It reports every move, spawn, probe and
exit to the fleet (a ReplicaEvents), which alone writes the replica's record (replica.py) and checks
each move against the table in states.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ..aio import wait_quietly
from ..config import WorkerSpec
from ..pressure import recycle_due
from ..states import PLANNED_EXITS, UNLOAD_EXITS, ExitReason, WorkerState
from ..upstream import LOCAL_ERRNOS
from . import proc
from . import sleep as sleep_calls
from .process import (
    Incarnation,
    InFlight,
    backoff_delay,
    counter_value,
    crash_loop_clears_at,
    in_crash_loop,
    kernel_oom_kills,
)

if TYPE_CHECKING:
    from .events import ReplicaEvents
    from .replica import Replica

log = structlog.get_logger("supervisor.worker")


class Lifecycle:
    """Runs the process of one replica: the one coroutine that spawns, probes, stops and respawns it.

    It writes no replica fact itself: every move, spawn, probe result and exit is reported to the
    fleet (`events`, a ReplicaEvents), which writes the replica's record. What stays here is its own
    control: the stop it was asked for, whether it should be loaded, its failures and backoff attempt.
    """

    def __init__(self, r: Replica, runtime_dir: Path, base_env: dict[str, str], events: ReplicaEvents, *,
                 drain_timeout_s: float = 30.0, pool_kw: dict | None = None,
                 rand: Callable[[], float] = random.random):
        self.r = r
        self.runtime_dir = runtime_dir
        self.base_env = base_env
        self.events = events
        self.drain_timeout_s = drain_timeout_s
        self.pool_kw = pool_kw or {}  # the upstream pool's bounds and protocol-error hook
        self._rand = rand
        self.failures: deque[float] = deque(maxlen=1024)  # monotonic times of failed runs (crash loop)
        self._attempt = 0
        self._wake = asyncio.Event()
        self._wanted: ExitReason | None = None
        self._load_wanted = r.spec.start != "on_demand"
        self._retire = False
        self._shutdown = False
        self._sleep_asked: str | None = None  # put it to sleep (why: evicted, idle) once idle
        self._wake_asked = False  # wake it (a request came for it while asleep)
        self.stopped = asyncio.Event()
        self.log = log.bind(worker=r.worker, replica=r.index)

    def _move(self, new: WorkerState, reason: str, level: str = "info") -> None:
        self.events.move(self.r, new, reason, level)

    @property
    def stop_pending(self) -> bool:
        """A planned stop (replace, unload, retire) was asked for and not yet begun."""
        return self._wanted is not None

    # -- requests (the request path, through Replica.begin/end) --------------------------------
    def begin_request(self, inc: Incarnation, ex: InFlight) -> None:
        if not inc.inflight:
            inc.idle.clear()
            if self.r.state is WorkerState.READY and inc is self.r.current:
                self._move(WorkerState.BUSY, "request", "debug")
        inc.inflight[id(ex)] = ex

    def end_request(self, inc: Incarnation, ex: InFlight, oom: bool = False) -> None:
        if inc.inflight.pop(id(ex), None) is not None:
            inc.served += 1
            rc = self.r.spec.recycle
            if (not inc.recycle_asked and inc is self.r.current
                    and recycle_due(inc.served, rc.max_requests, inc.recycle_jitter)):
                inc.recycle_asked = True
                self.log.info("worker_recycle", why="max_requests", served=inc.served, worker_pid=inc.pid)
                self.request_restart(ExitReason.RECYCLE)
        if oom:
            inc.oom_answer_at = time.monotonic()
        if not inc.inflight:
            inc.idle.set()
            self.events.idle(self.r)
            if self.r.state is WorkerState.BUSY and inc is self.r.current:
                self._move(WorkerState.READY, "idle", "debug")

    # -- commands ------------------------------------------------------------------------------
    def request_restart(self, reason: ExitReason) -> None:
        """Replace the worker gracefully (recycle, reload, pressure) or start it again (failed);
        `idle`/`evicted` stop it and leave it unloaded."""
        if self._shutdown:
            return
        if self.r.state is WorkerState.UNLOADED and reason not in UNLOAD_EXITS:
            return  # nothing runs; the next start takes the new settings anyway
        if self._wanted is None or reason is ExitReason.RELOAD:
            self._wanted = reason
        self._wake.set()
        self.events.down(self.r)  # send this worker nothing more: it is about to be replaced

    def unload(self, reason: ExitReason) -> None:
        """Stop the replica and keep it down (idle, evicted) until `load()`."""
        self._load_wanted = False
        self.request_restart(reason)

    def load(self) -> None:
        """Start an unloaded replica (first request, scale-up)."""
        if self._shutdown or self._load_wanted:
            return
        self._load_wanted = True
        self._wake.set()

    def retire(self) -> None:
        """Drain and stop for good (a reload removed this replica); `stopped` is set once it is down."""
        self._retire = True
        self._load_wanted = False
        if self.r.state in (WorkerState.UNLOADED, WorkerState.FAILED, WorkerState.BACKOFF, WorkerState.STOPPED):
            self._shutdown = True
            self._wake.set()
            return
        self.request_restart(ExitReason.RETIRED)

    def put_to_sleep(self, why: str) -> None:
        """Put the serving replica to sleep (`why`: evicted, idle); skipped if it is busy by then."""
        if self._shutdown or self._sleep_asked is not None:
            return
        self._sleep_asked = why
        self._wake.set()

    def wake_up(self) -> None:
        """Wake the sleeping replica (a request waits for it); concurrent asks cause one wake."""
        if self._shutdown:
            return
        self._wake_asked = True
        self._wake.set()

    @property
    def wants_load(self) -> bool:
        return self._load_wanted and not self._shutdown

    async def shutdown(self) -> None:
        self._shutdown = True
        self._wake.set()
        await self.stopped.wait()

    def reconfigured(self, old: WorkerSpec, drain_timeout_s: float) -> None:
        """The fleet gave its replica a new spec: a changed command or environment (or a failed worker)
        means a new process; fleet-level keys need none."""
        self.drain_timeout_s = drain_timeout_s
        if self.r.spec.lifecycle() != old.lifecycle() or self.r.state is WorkerState.FAILED:
            self.request_restart(ExitReason.RELOAD)

    # -- the supervising loop ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while not self._shutdown:
                if self.r.state is WorkerState.FAILED:
                    await self._hold_failed()
                    continue
                if not self._load_wanted:
                    await self._hold_unloaded()
                    continue
                fits = await self.events.admit(self.r)  # room on the GPU (may wait for evictions to settle)
                if self._shutdown:
                    break
                if not fits:
                    self._load_wanted = False
                    continue
                inc = await self._spawn()
                if inc is None:
                    continue
                reason = await self._until_ready(inc)
                if reason is None:
                    await self._serve(inc)
                else:
                    await self._stop(inc, reason)
                await self._after_exit(inc)
        finally:
            inc = self.r.current
            if inc is not None and inc.returncode is None and inc.proc is not None:
                await self._stop(inc, ExitReason.SHUTDOWN)
                await self._after_exit(inc)
            if self.r.state is not WorkerState.STOPPED:
                with contextlib.suppress(Exception):
                    self._move(WorkerState.STOPPED, "retired" if self._retire else "shutdown")
            self.stopped.set()

    async def _hold_unloaded(self) -> None:
        if self.r.state is not WorkerState.UNLOADED:
            self._move(WorkerState.UNLOADED, "on demand: waiting for a request")
        while not self._load_wanted and not self._shutdown:
            self._wake.clear()
            await self._wake.wait()
        self._wanted = None
        if self._load_wanted and not self._shutdown:
            self._move(WorkerState.STARTING, "load requested")

    async def _hold_failed(self) -> None:
        r = self.r.spec.restart
        clears = crash_loop_clears_at(self.failures, r.window_s, r.max_restarts)
        timeout = max(0.0, clears - time.monotonic())
        self._wake.clear()
        await wait_quietly(self._wake.wait(), timeout)
        if self._shutdown:
            return
        if self._wanted is ExitReason.RELOAD:
            self.failures.clear()
            self._attempt = 0
        self._wanted = None
        self._move(WorkerState.STARTING, "operator reload" if not self.failures else "crash-loop window passed")

    async def _spawn(self) -> Incarnation | None:
        gen = self.r.gen + 1
        sock = proc.socket_path(self.runtime_dir, self.r.worker, self.r.index, gen)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        inc = Incarnation(gen, sock, **self.pool_kw)
        # gunicorn-style: a jitter drawn per worker spreads the recycles of several daemons
        inc.recycle_jitter = int(self._rand() * (self.r.spec.recycle.max_requests_jitter + 1))
        self.events.new_process(self.r, inc)
        if self.r.state is not WorkerState.STARTING:
            self._move(WorkerState.STARTING, "spawn")
        w = self.r.spec
        env = {**self.r.worker_env(self.base_env), "GPU_SUPERVISOR_SOCKET": sock}
        cmd = list(w.command)
        inc.oom_kills_at_start = await asyncio.to_thread(kernel_oom_kills)
        try:
            cmd = proc.worker_command(w, sock, env.get("PATH"))
            await proc.exec_process(inc, cmd, env, w.cwd)
        except OSError as exc:
            # a boot error (a program not found, a cwd that is not there): a failed start, named
            inc.boot_error = f"cannot start {exc.filename or cmd[0]!r}: {exc.strerror or exc}"
            inc.local_shortage = exc.errno in LOCAL_ERRNOS
            self.log.error("worker_spawn_failed", command=cmd, error=inc.boot_error)
            inc.returncode = 127
            inc.tail.append(inc.boot_error)
            inc.exited.set()
            await self._after_exit(inc)
            return None
        inc.pid = inc.proc.pid
        self.log.info("worker_spawned", worker_pid=inc.pid, command=cmd, generation=inc.gen,
                      degraded=self.r.degraded, gpu=self.r.gpu)
        self.events.spawned(self.r, inc)
        inc.tasks = [
            asyncio.create_task(proc.pump_output(inc, inc.proc.stdout, self.log.bind(
                source="worker", worker_pid=inc.pid, stream="stdout"))),
            asyncio.create_task(proc.pump_output(inc, inc.proc.stderr, self.log.bind(
                source="worker", worker_pid=inc.pid, stream="stderr"))),
            asyncio.create_task(self._wait_exit(inc)),
        ]
        return inc

    async def _wait_exit(self, inc: Incarnation) -> None:
        assert inc.proc is not None
        inc.returncode = await inc.proc.wait()
        inc.exited.set()
        self.events.down(self.r)  # stop dispatching to it now, before the lifecycle catches up

    async def _probe(self, inc: Incarnation, timeout: float) -> tuple[bool, str]:
        ok, why, _ = await proc.get(inc, self.r.spec.health.path, timeout, read_body=False)
        return ok, why

    async def _until_ready(self, inc: Incarnation) -> ExitReason | None:
        """Wait for the first healthy answer. None when ready, else why to stop it."""
        w = self.r.spec
        deadline = inc.spawned_at + w.startup_timeout_s
        delay = 0.02
        while True:
            if inc.exited.is_set():
                return ExitReason.START_FAILURE  # classified properly after exit
            if self._shutdown:
                return ExitReason.SHUTDOWN
            if self._wanted in (ExitReason.RETIRED, *UNLOAD_EXITS):
                reason, self._wanted = self._wanted, None
                return reason
            now = time.monotonic()
            if now >= deadline:
                self.log.warning("worker_start_timeout", worker_pid=inc.pid, startup_timeout_s=w.startup_timeout_s)
                return ExitReason.START_FAILURE
            if os.path.exists(inc.socket_path):
                ok, _ = await self._probe(inc, min(w.health.timeout_s, max(0.01, deadline - now)))
                if ok:
                    inc.ready_at = time.monotonic()
                    self._attempt = 0
                    if self._wanted is ExitReason.RELOAD:
                        self._wanted = None  # it started with the new settings already
                    self._move(WorkerState.READY, f"healthy after {inc.ready_at - inc.spawned_at:.3f}s")
                    return None
            self._wake.clear()
            await wait_quietly(proc.wait_any(inc.exited, self._wake), min(delay, max(0.0, deadline - now)))
            if self._shutdown:
                return ExitReason.SHUTDOWN
            delay = min(delay * 1.5, 0.05)  # (a probe is one connect: cheap; a late ready costs more)

    def _log_frozen(self, inc: Incarnation, late_s: float) -> None:
        self.log.warning("worker_judgment_deferred", worker_pid=inc.pid, late_s=round(late_s, 3),
                         why="the supervisor itself did not run (stopped, a paused VM, a starved host): "
                             "what the worker did meanwhile is not read yet")

    def stalled_for(self, inc: Incarnation, now: float) -> float:
        """Seconds since the worker last sent a byte on any request in flight (0 with none in flight)."""
        if not inc.inflight:
            return 0.0
        newest = max(ex.last_activity(now) for ex in inc.inflight.values())
        return max(0.0, now - newest)

    async def _serve(self, inc: Incarnation) -> None:
        """Probe while serving; return once the worker exited (after stopping it if needed)."""
        h = self.r.spec.health
        failures = 0
        progress = self.r.spec.progress
        last_count: float | None = None
        last_move = time.monotonic()
        deferred = 0  # judgments put off in a row because the daemon itself did not run (see _was_frozen)
        while True:
            self._wake.clear()
            interval = h.interval_s if not inc.inflight else min(h.interval_s, max(0.05, self.r.spec.stall_s / 4))
            waited_from = time.monotonic()
            if self._sleep_asked is None:  # (a sleep asked during the last probe goes now)
                await wait_quietly(proc.wait_any(inc.exited, self._wake), interval)
            if inc.exited.is_set():
                return
            if self._shutdown:
                await self._stop(inc, ExitReason.SHUTDOWN)
                return
            if self._wanted is not None:
                reason, self._wanted = self._wanted, None
                await self._drain(inc, reason)
                await self._stop(inc, reason)
                return
            if self._sleep_asked is not None:
                stop = await self._sleep_cycle(inc)
                if stop is not None:
                    await self._stop(inc, stop)
                    return
                failures = 0
                continue
            # judged by progress, not age: no byte from the worker on any request in flight for
            # stall_timeout_s (a slow client or a long stream that keeps sending is never a hang)
            now = time.monotonic()
            if _was_frozen(now - waited_from, interval) and deferred < MAX_DEFERRED:
                deferred += 1
                self._log_frozen(inc, now - waited_from - interval)
                continue  # (what the worker sent meanwhile is read before the next look)
            deferred = 0
            stalled = self.stalled_for(inc, now)
            if stalled > self.r.spec.stall_s:
                self.log.warning("worker_hang", worker_pid=inc.pid, why="no progress", stalled_s=round(stalled, 3),
                                 inflight=len(inc.inflight))
                await self._stop(inc, ExitReason.HANG)
                return
            if progress is not None:
                ok, _, body = await proc.get(inc, progress.path, h.timeout_s, read_body=True)
                value = counter_value(body, progress.metric) if ok else None
                busy = bool(inc.inflight) or self.events.work_waiting(self.r)
                now = time.monotonic()
                if value is None or value != last_count or not busy:
                    last_count, last_move = value, now
                elif now - last_move > progress.stall_s:
                    self.log.warning("worker_hang", worker_pid=inc.pid, why="progress counter flat",
                                     metric=progress.metric, value=value, flat_s=round(now - last_move, 3))
                    await self._stop(inc, ExitReason.HANG)
                    return
            probed_from = time.monotonic()
            ok, why = await self._probe(inc, h.timeout_s)
            if inc.exited.is_set():
                return
            if ok:
                failures = 0
                self.events.probed(self.r, 0)
                continue
            took = time.monotonic() - probed_from
            if why == "timeout" and _was_frozen(took, h.timeout_s) and deferred < MAX_DEFERRED:
                deferred += 1
                self._log_frozen(inc, took - h.timeout_s)
                continue  # its answer may be waiting unread: a probe the daemon slept through says nothing
            if why == "local":  # the supervisor had no file descriptor to probe with: says nothing of the worker
                self.log.warning("worker_probe_skipped", worker_pid=inc.pid, why="the supervisor is out of file "
                                 "descriptors or memory", failures=failures)
                continue
            failures += 1
            self.events.probed(self.r, failures)
            self.log.warning("worker_probe_failed", worker_pid=inc.pid, why=why, failures=failures, limit=h.failures)
            if failures >= h.failures:
                await self._stop(inc, ExitReason.HANG if why == "timeout" else ExitReason.HEALTH)
                return

    # -- sleep mode ----------------------------------------------------------------------------
    async def _sleep_cycle(self, inc: Incarnation) -> ExitReason | None:
        """Asleep, then awake again: None when it serves again (or it stayed awake, busy, or its process
        exited: the caller sees that), else why to stop it (a failed sleep or wake, an unload, a reload)."""
        why, self._sleep_asked = self._sleep_asked, None
        spec = self.r.spec.sleep
        if spec is None or inc.inflight or self.r.state is not WorkerState.READY:
            self.events.sleep_skipped(self.r)  # busy by now (or no sleep mode any more): never put to sleep
            return None
        began = time.monotonic()
        failed = await sleep_calls.switch(inc, spec, True, self.r.spec.startup_timeout_s)
        if inc.exited.is_set():
            return None
        unload = ExitReason.IDLE if why == "idle" else ExitReason.EVICTED
        if failed is not None:
            self.log.warning("worker_sleep_failed", worker_pid=inc.pid, why=failed, action="stopped instead")
            self._load_wanted = False
            return unload
        self._move(WorkerState.ASLEEP, why)
        self.log.info("worker_asleep", worker_pid=inc.pid, why=why, sleep_s=round(time.monotonic() - began, 3))
        stop = await self._asleep(inc)
        if stop is not None or inc.exited.is_set():
            return stop
        return await self._wake_up(inc)

    async def _asleep(self, inc: Incarnation) -> ExitReason | None:
        """Wait asleep (no probes: asleep counts as alive while the process lives) until a wake is asked
        (None), or a stop: unload, reload, retire, shutdown (its reason)."""
        while True:
            self._wake.clear()
            if inc.exited.is_set():
                return None
            if self._shutdown:
                return ExitReason.SHUTDOWN
            if self._wanted is not None:
                reason, self._wanted = self._wanted, None
                return reason
            if self._wake_asked:
                return None
            await proc.wait_any(inc.exited, self._wake)

    async def _wake_up(self, inc: Incarnation) -> ExitReason | None:
        """Room on its GPU for its whole need, then the wake call: None once it serves again; a wake that
        fails or times out (startup_timeout_s) stops it to be started anew (wake_failure)."""
        self._wake_asked = False
        self._sleep_asked = None
        self._move(WorkerState.STARTING, "waking")
        fits = await self.events.admit(self.r)
        if self._shutdown:
            return ExitReason.SHUTDOWN
        if self._wanted is not None:
            reason, self._wanted = self._wanted, None
            return reason
        if not fits:
            self._load_wanted = False
            return ExitReason.EVICTED
        spec = self.r.spec.sleep
        began = time.monotonic()
        failed = ("the worker has no sleep mode any more (reload)" if spec is None
                  else await sleep_calls.switch(inc, spec, False, self.r.spec.startup_timeout_s))
        if inc.exited.is_set():
            return None
        if failed is not None:
            self.log.warning("worker_wake_failed", worker_pid=inc.pid, why=failed, action="stop and start anew")
            return ExitReason.WAKE_FAILURE
        self.log.info("worker_woken", worker_pid=inc.pid, wake_s=round(time.monotonic() - began, 3))
        self._move(WorkerState.READY, sleep_calls.WOKEN)
        return None

    async def _drain(self, inc: Incarnation, reason: ExitReason) -> None:
        """Let the requests this worker holds finish before a planned stop."""
        if reason is ExitReason.PRESSURE:
            return  # memory is about to run out: stop now, retry-safe requests go again
        self._move(WorkerState.DRAINING, reason.value)
        timeout = self.drain_timeout_s if reason is not ExitReason.RECYCLE else self.r.spec.hang_timeout_s
        await wait_quietly(proc.wait_any(inc.idle, inc.exited), timeout)

    async def _stop(self, inc: Incarnation, reason: ExitReason) -> None:
        """SIGTERM to the process group, SIGKILL after stop_grace_s; returns once it has exited."""
        if inc.requested is None:
            inc.requested = reason
        if inc.exited.is_set() or inc.proc is None:
            return
        if self.r.state is not WorkerState.STOPPING:
            self._move(WorkerState.STOPPING, reason.value)
        await proc.terminate(inc, reason, self.r.spec.stop_grace_s, self.log)

    async def _after_exit(self, inc: Incarnation) -> None:
        await inc.exited.wait()
        if inc.accounted:
            return
        inc.accounted = True
        now = time.monotonic()
        info = await proc.reap(inc, now)
        reason = info.reason
        log_fn = self.log.info if reason in PLANNED_EXITS else self.log.warning
        log_fn(
            "worker_exited", worker_pid=inc.pid, reason=reason.value, code=info.code,
            signal=info.as_dict()["signal"], uptime_s=round(info.uptime_s, 3),
            perhaps="out of memory" if reason is ExitReason.OOM else None,
            tail=list(inc.tail)[-5:] if reason not in PLANNED_EXITS else None,
        )
        final = self._shutdown or reason in (ExitReason.SHUTDOWN, ExitReason.RETIRED)
        self.events.exited(self.r, info, final)
        if final:
            self._shutdown = True
            self._move(WorkerState.STOPPED, reason.value)
            return
        if reason in UNLOAD_EXITS:
            self._move(WorkerState.UNLOADED, reason.value)
            return
        if reason in PLANNED_EXITS:
            self._move(WorkerState.STARTING, f"replace after {reason.value}")
            return
        if not inc.local_shortage:  # (the supervisor's own shortage of descriptors says nothing of the worker)
            self.failures.append(now)
        r = self.r.spec.restart
        if in_crash_loop(self.failures, now, r.window_s, r.max_restarts):
            self.log.error("worker_crash_loop",
                           restarts_in_window=sum(1 for t in self.failures if now - t <= r.window_s),
                           max_restarts=r.max_restarts, window_s=r.window_s)
            self._move(WorkerState.FAILED, f"more than {r.max_restarts} restarts in {r.window_s:g}s")
            return
        self._attempt += 1
        delay = backoff_delay(self._attempt, r.backoff_initial_s, r.backoff_max_s, self._rand())
        self.events.backoff(self.r, now + delay)
        self._move(WorkerState.BACKOFF, f"{reason.value}; restart in {delay:.3f}s")
        self._wake.clear()
        await wait_quietly(self._wake.wait(), delay)
        if self._shutdown:
            self._move(WorkerState.STOPPED, "shutdown")
            return
        if self._wanted is ExitReason.RELOAD:
            self._wanted = None
        if not self._load_wanted:
            self._wanted = None
            self._move(WorkerState.UNLOADED, "unloaded during backoff")
            return
        self._move(WorkerState.STARTING, "backoff over")


FROZEN_S = 1.0  # a wait that overran its time by this much (and by its own length) was not the daemon running
MAX_DEFERRED = 3  # judgments put off in a row for that, at most (a daemon starved for good still judges)


def _was_frozen(elapsed: float, expected: float) -> bool:
    """Whether a wait of `expected` seconds that took `elapsed` means the daemon did not run meanwhile."""
    return elapsed - expected > max(FROZEN_S, expected)
