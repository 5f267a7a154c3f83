"""The worker's lifecycle: spawn, readiness, health probes, hang detection, stop, classify, respawn.

`WorkerManager` alone writes the worker state (through `_move`, which checks the table in
states.py). One supervising coroutine (`run`) owns the child process; everything else asks it to act
through `request_restart` / `shutdown` and learns of changes through the `on_change` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from .config import Settings
from .pressure import recycle_due
from .states import PLANNED_EXITS, SERVING_STATES, ExitReason, WorkerState, check_move
from .upstream import UpstreamError, UpstreamPool

log = structlog.get_logger("supervisor.worker")

TAIL_LINES = 50
OOM_PATTERNS = re.compile(
    r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|CUDA error: out of memory"
    r"|\bMemoryError\b|Cannot allocate memory|std::bad_alloc",
)
OOM_ANSWER_WINDOW_S = 5.0
MAX_SOCKET_PATH = 107


# -- pure decisions --------------------------------------------------------------------------------
def classify_exit(
    returncode: int | None,
    requested: ExitReason | None,
    sigkill_sent: bool,
    was_ready: bool,
    tail: Iterable[str],
    oom_answer_recent: bool,
) -> ExitReason:
    """Why the worker died, from what we asked for and what it left behind."""
    if requested is not None:
        return requested
    oom_text = any(OOM_PATTERNS.search(line) for line in tail)
    if oom_text:
        return ExitReason.OOM
    if not was_ready:
        return ExitReason.START_FAILURE
    if returncode == -signal.SIGKILL and not sigkill_sent:
        return ExitReason.OOM  # a SIGKILL we did not send: perhaps the kernel's OOM killer
    if oom_answer_recent:
        return ExitReason.OOM
    return ExitReason.CRASH


def backoff_delay(attempt: int, initial: float, maximum: float, rand: float) -> float:
    """Exponential backoff with equal jitter: attempt 1 waits between initial/2 and initial."""
    base = min(maximum, initial * (2 ** max(0, attempt - 1)))
    return base / 2 + (base / 2) * rand


def in_crash_loop(failures: Iterable[float], now: float, window_s: float, max_restarts: int) -> bool:
    return sum(1 for t in failures if now - t <= window_s) > max_restarts


def crash_loop_clears_at(failures: Iterable[float], window_s: float, max_restarts: int) -> float:
    """Monotonic time when enough failures leave the window to allow another start."""
    ts = sorted(failures)
    if len(ts) <= max_restarts:
        return 0.0
    return ts[len(ts) - max_restarts - 1] + window_s


@dataclass(frozen=True)
class ExitInfo:
    reason: ExitReason
    code: int | None
    signal: int | None
    at: float  # wall clock, for humans
    pid: int
    uptime_s: float

    def as_dict(self) -> dict:
        return {
            "reason": self.reason.value,
            "code": self.code,
            "signal": signal.Signals(self.signal).name if self.signal else None,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "pid": self.pid,
            "uptime_s": round(self.uptime_s, 3),
        }


class Incarnation:
    """One worker process and everything that belongs to it alone."""

    def __init__(self, gen: int, socket_path: str):
        self.gen = gen
        self.socket_path = socket_path
        self.pool = UpstreamPool(socket_path)
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.spawned_at = time.monotonic()
        self.ready_at: float | None = None
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.requested: ExitReason | None = None
        self.sigkill_sent = False
        self.oom_answer_at = -1e9
        self.served = 0
        self.recycle_jitter = 0
        self.recycle_asked = False
        self.inflight: dict[int, float] = {}  # request key -> monotonic start, oldest first
        self.idle = asyncio.Event()
        self.idle.set()
        self.tasks: list[asyncio.Task] = []


class WorkerManager:
    def __init__(
        self,
        settings: Settings,
        runtime_dir: Path,
        base_env: dict[str, str],
        on_change: Callable[[WorkerState, WorkerState, str], None] | None = None,
        on_exit: Callable[[ExitInfo], None] | None = None,
        on_down: Callable[[], None] | None = None,
        rand: Callable[[], float] = random.random,
    ):
        self.settings = settings
        self.runtime_dir = runtime_dir
        self.base_env = base_env
        self.on_change = on_change
        self.on_exit = on_exit
        self.on_down = on_down
        self._rand = rand
        self.state = WorkerState.STOPPED
        self.current: Incarnation | None = None
        self.gen = 0
        self.restarts = 0
        self.oom_restarts = 0
        self.degraded: str | None = None
        self.last_exit: ExitInfo | None = None
        self.last_start_s: float | None = None
        self._failures: deque[float] = deque(maxlen=1024)
        self._attempt = 0
        self.backoff_until = 0.0
        self._wake = asyncio.Event()
        self._wanted: ExitReason | None = None
        self._shutdown = False
        self.stopped = asyncio.Event()
        self.ready = asyncio.Event()  # set while state is ready/busy
        self.env_override: dict[str, str] = {}

    # -- the one writer of state ---------------------------------------------------------------
    def _move(self, new: WorkerState, reason: str, level: str = "info") -> None:
        old = self.state
        if old is new:
            return
        check_move(old, new)
        self.state = new
        if new in SERVING_STATES:
            self.ready.set()
        else:
            self.ready.clear()
        getattr(log, level)(
            "worker_state", old=old.value, new=new.value, reason=reason,
            worker_pid=self.current.pid if self.current else None,
        )
        # ready <-> busy happens per request; whether the worker serves at all did not change
        if self.on_change is not None and not (old in SERVING_STATES and new in SERVING_STATES):
            self.on_change(old, new, reason)

    # -- requests (called by the proxy) --------------------------------------------------------
    def begin_request(self, inc: Incarnation, key: int) -> None:
        if not inc.inflight:
            inc.idle.clear()
            if self.state is WorkerState.READY and inc is self.current:
                self._move(WorkerState.BUSY, "request", "debug")
        inc.inflight[key] = time.monotonic()

    def end_request(self, inc: Incarnation, key: int, oom: bool = False) -> None:
        if inc.inflight.pop(key, None) is not None:
            inc.served += 1
            rc = self.settings.worker.recycle
            if (not inc.recycle_asked and inc is self.current
                    and recycle_due(inc.served, rc.max_requests, inc.recycle_jitter)):
                inc.recycle_asked = True
                log.info("worker_recycle", why="max_requests", served=inc.served, worker_pid=inc.pid)
                self.request_restart(ExitReason.RECYCLE)
        if oom:
            inc.oom_answer_at = time.monotonic()
        if not inc.inflight:
            inc.idle.set()
            if self.state is WorkerState.BUSY and inc is self.current:
                self._move(WorkerState.READY, "idle", "debug")

    # -- commands ------------------------------------------------------------------------------
    def request_restart(self, reason: ExitReason) -> None:
        """Replace the worker gracefully (recycle, reload, pressure) or start it again (failed)."""
        if self._shutdown:
            return
        if self._wanted is None or reason is ExitReason.RELOAD:
            self._wanted = reason
        self._wake.set()
        if self.on_down is not None:
            self.on_down()  # send this worker nothing more: it is about to be replaced

    @property
    def replacing(self) -> bool:
        """A replacement was asked for and not yet begun: dispatch must hold."""
        return self._wanted is not None and self.state in SERVING_STATES

    async def shutdown(self) -> None:
        self._shutdown = True
        self._wake.set()
        await self.stopped.wait()

    def reconfigure(self, settings: Settings) -> None:
        changed = settings.worker != self.settings.worker
        self.settings = settings
        if changed:
            self.request_restart(ExitReason.RELOAD)
        elif self.state is WorkerState.FAILED:
            self.request_restart(ExitReason.RELOAD)

    def worker_env(self) -> dict[str, str]:
        """The environment the next worker gets (its socket aside): ours, the policy's, a fallback's."""
        return {**self.base_env, **self.settings.worker.env, **self.env_override}

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        inc = self.current
        return {
            "state": self.state.value,
            "pid": inc.pid if inc and inc.returncode is None and inc.pid else None,
            "generation": self.gen,
            "restarts": self.restarts,
            "last_exit": self.last_exit.as_dict() if self.last_exit else None,
            "started_at": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - inc.spawned_at)))
                if inc else None
            ),
            "ready_for_s": round(time.monotonic() - inc.ready_at, 3) if inc and inc.ready_at else None,
            "requests_served": inc.served if inc else 0,
            "inflight": len(inc.inflight) if inc else 0,
            "degraded": self.degraded,
            "backoff_s": round(max(0.0, self.backoff_until - time.monotonic()), 3)
            if self.state is WorkerState.BACKOFF else None,
        }

    def expected_ready_in(self) -> float:
        """A guess at how long until a worker serves, for Retry-After."""
        now = time.monotonic()
        start = self.last_start_s or 1.0
        if self.state is WorkerState.BACKOFF:
            return max(0.0, self.backoff_until - now) + start
        if self.state is WorkerState.STARTING and self.current:
            return max(0.0, start - (now - self.current.spawned_at))
        if self.state is WorkerState.FAILED:
            return max(1.0, crash_loop_clears_at(self._failures, self.settings.worker.restart.window_s,
                                                 self.settings.worker.restart.max_restarts) - now)
        return start

    # -- the supervising loop ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while not self._shutdown:
                if self.state is WorkerState.FAILED:
                    await self._hold_failed()
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
            inc = self.current
            if inc is not None and inc.returncode is None:
                await self._stop(inc, ExitReason.SHUTDOWN)
            if self.state is not WorkerState.STOPPED:
                with contextlib.suppress(Exception):
                    self._move(WorkerState.STOPPED, "shutdown")
            self.stopped.set()

    async def _hold_failed(self) -> None:
        r = self.settings.worker.restart
        clears = crash_loop_clears_at(self._failures, r.window_s, r.max_restarts)
        timeout = max(0.0, clears - time.monotonic())
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        if self._shutdown:
            return
        if self._wanted is ExitReason.RELOAD:
            self._failures.clear()
            self._attempt = 0
        self._wanted = None
        self._move(WorkerState.STARTING, "operator reload" if not self._failures else "crash-loop window passed")

    def _socket_path(self, gen: int) -> str:
        path = str(self.runtime_dir / f"worker-{gen}.sock")
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for a Unix socket ({len(path)} bytes): {path}")
        return path

    def _command(self, sock: str) -> list[str]:
        # {python} is the supervisor's own interpreter: handy when the worker lives in the same venv
        return [part.replace("{socket}", sock).replace("{python}", sys.executable)
                for part in self.settings.worker.command]

    async def _spawn(self) -> Incarnation | None:
        self.gen += 1
        sock = self._socket_path(self.gen)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        inc = Incarnation(self.gen, sock)
        # gunicorn-style: a jitter drawn per worker spreads the recycles of several daemons
        inc.recycle_jitter = int(self._rand() * (self.settings.worker.recycle.max_requests_jitter + 1))
        self.current = inc
        if self.state is not WorkerState.STARTING:
            self._move(WorkerState.STARTING, "spawn")
        w = self.settings.worker
        env = {**self.worker_env(), "GPU_SUPERVISOR_SOCKET": sock}
        cmd = self._command(sock)
        try:
            inc.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=w.cwd, start_new_session=True,
                limit=1 << 20,
            )
        except OSError as exc:
            log.error("worker_spawn_failed", command=cmd, error=str(exc))
            inc.returncode = 127
            inc.tail.append(f"cannot start {cmd[0]!r}: {exc.strerror or exc}")
            inc.exited.set()
            await self._after_exit(inc)
            return None
        inc.pid = inc.proc.pid
        log.info("worker_spawned", worker_pid=inc.pid, command=cmd, generation=inc.gen, degraded=self.degraded)
        inc.tasks = [
            asyncio.create_task(self._pump_output(inc, inc.proc.stdout, "stdout")),
            asyncio.create_task(self._pump_output(inc, inc.proc.stderr, "stderr")),
            asyncio.create_task(self._wait_exit(inc)),
        ]
        return inc

    async def _pump_output(self, inc: Incarnation, stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        blog = log.bind(source="worker", worker_pid=inc.pid, stream=name)
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: take what is there
                raw = await stream.read(1 << 20)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            inc.tail.append(line)
            blog.info("worker_output", line=line)

    async def _wait_exit(self, inc: Incarnation) -> None:
        assert inc.proc is not None
        inc.returncode = await inc.proc.wait()
        inc.exited.set()
        self.ready.clear()
        if self.on_down is not None:
            self.on_down()  # stop dispatching to it now, before the lifecycle catches up

    async def _probe(self, inc: Incarnation, timeout: float) -> tuple[bool, str]:
        """One health request on its own connection: (ok, why-not)."""
        h = self.settings.worker.health
        head = f"GET {h.path} HTTP/1.1\r\nHost: worker\r\nUser-Agent: gpu-supervisor\r\n\r\n".encode()
        conn = None
        try:
            async with asyncio.timeout(timeout):
                conn = await inc.pool.connect()
                await conn.start(head, None, False)
            if 200 <= conn.status < 300:
                return True, ""
            return False, f"status {conn.status}"
        except TimeoutError:
            return False, "timeout"
        except UpstreamError as exc:
            return False, exc.kind
        finally:
            if conn is not None:
                conn.abort()

    async def _until_ready(self, inc: Incarnation) -> ExitReason | None:
        """Wait for the first healthy answer. None when ready, else why to stop it."""
        w = self.settings.worker
        deadline = inc.spawned_at + w.startup_timeout_s
        delay = 0.02
        while True:
            if inc.exited.is_set():
                return ExitReason.START_FAILURE  # classified properly after exit
            if self._shutdown:
                return ExitReason.SHUTDOWN
            now = time.monotonic()
            if now >= deadline:
                log.warning("worker_start_timeout", worker_pid=inc.pid, startup_timeout_s=w.startup_timeout_s)
                return ExitReason.START_FAILURE
            if os.path.exists(inc.socket_path):
                ok, _ = await self._probe(inc, min(w.health.timeout_s, max(0.01, deadline - now)))
                if ok:
                    inc.ready_at = time.monotonic()
                    self.last_start_s = inc.ready_at - inc.spawned_at
                    self._attempt = 0
                    self._move(WorkerState.READY, f"healthy after {self.last_start_s:.3f}s")
                    return None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_any(inc.exited, self._wake), min(delay, max(0.0, deadline - now)))
            if self._shutdown:
                return ExitReason.SHUTDOWN
            delay = min(delay * 1.5, 0.25)

    @staticmethod
    async def _wait_any(*events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waiters:
                t.cancel()

    async def _serve(self, inc: Incarnation) -> None:
        """Probe while serving; return once the worker exited (after stopping it if needed)."""
        h = self.settings.worker.health
        failures = 0
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_any(inc.exited, self._wake), h.interval_s)
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
            # a request outstanding too long means the worker is stuck, whatever health says
            if inc.inflight:
                oldest = next(iter(inc.inflight.values()))
                age = time.monotonic() - oldest
                if age > self.settings.worker.hang_timeout_s:
                    log.warning("worker_hang", worker_pid=inc.pid, oldest_request_s=round(age, 3))
                    await self._stop(inc, ExitReason.HANG)
                    return
            ok, why = await self._probe(inc, h.timeout_s)
            if inc.exited.is_set():
                return
            if ok:
                failures = 0
                continue
            failures += 1
            log.warning("worker_probe_failed", worker_pid=inc.pid, why=why, failures=failures, limit=h.failures)
            if failures >= h.failures:
                await self._stop(inc, ExitReason.HANG if why == "timeout" else ExitReason.HEALTH)
                return

    async def _drain(self, inc: Incarnation, reason: ExitReason) -> None:
        """Let the requests this worker holds finish before a planned stop."""
        if reason is ExitReason.PRESSURE:
            return  # memory is about to run out: stop now, retry-safe requests go again
        self._move(WorkerState.DRAINING, reason.value)
        w = self.settings
        timeout = w.drain.timeout_s if reason is not ExitReason.RECYCLE else w.worker.hang_timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait_any(inc.idle, inc.exited), timeout)

    async def _stop(self, inc: Incarnation, reason: ExitReason) -> None:
        """SIGTERM to the process group, SIGKILL after stop_grace_s; returns once it has exited."""
        if inc.requested is None:
            inc.requested = reason
        if inc.exited.is_set() or inc.proc is None:
            return
        if self.state is not WorkerState.STOPPING:
            self._move(WorkerState.STOPPING, reason.value)
        self._signal_group(inc, signal.SIGTERM)
        if reason is ExitReason.HANG:
            self._signal_group(inc, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        try:
            await asyncio.wait_for(inc.exited.wait(), self.settings.worker.stop_grace_s)
        except TimeoutError:
            log.warning("worker_kill", worker_pid=inc.pid, reason=reason.value,
                        grace_s=self.settings.worker.stop_grace_s)
            inc.sigkill_sent = True
            self._signal_group(inc, signal.SIGKILL)
            await inc.exited.wait()

    @staticmethod
    def _signal_group(inc: Incarnation, sig: int) -> None:
        if inc.pid <= 0:
            return  # never signal group 0: that is our own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(inc.pid, sig)

    async def _after_exit(self, inc: Incarnation) -> None:
        await inc.exited.wait()
        # whatever the worker started in its session goes with it
        self._signal_group(inc, signal.SIGKILL)
        for t in inc.tasks:
            if not t.done():
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(t), 1.0)
                t.cancel()
        inc.pool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inc.socket_path)
        now = time.monotonic()
        rc = inc.returncode
        reason = classify_exit(
            rc,
            inc.requested if inc.requested is not ExitReason.START_FAILURE else None,
            inc.sigkill_sent,
            inc.ready_at is not None,
            inc.tail,
            now - inc.oom_answer_at <= OOM_ANSWER_WINDOW_S,
        )
        if inc.requested is ExitReason.START_FAILURE and reason is ExitReason.CRASH:
            reason = ExitReason.START_FAILURE
        info = ExitInfo(
            reason=reason,
            code=rc if rc is not None and rc >= 0 else None,
            signal=-rc if rc is not None and rc < 0 else None,
            at=time.time(),
            pid=inc.pid,
            uptime_s=now - inc.spawned_at,
        )
        self.last_exit = info
        log_fn = log.info if reason in PLANNED_EXITS else log.warning
        log_fn(
            "worker_exited", worker_pid=inc.pid, reason=reason.value, code=info.code,
            signal=info.as_dict()["signal"], uptime_s=round(info.uptime_s, 3),
            perhaps="out of memory" if reason is ExitReason.OOM else None,
            tail=list(inc.tail)[-5:] if reason not in PLANNED_EXITS else None,
        )
        if self._shutdown or reason is ExitReason.SHUTDOWN:
            self._move(WorkerState.STOPPED, "shutdown")
            self._shutdown = True
            return
        self.restarts += 1
        if reason is ExitReason.OOM:
            self.oom_restarts += 1
        if self.on_exit is not None:
            self.on_exit(info)
        if reason in PLANNED_EXITS:
            self._move(WorkerState.STARTING, f"replace after {reason.value}")
            return
        self._failures.append(now)
        r = self.settings.worker.restart
        if in_crash_loop(self._failures, now, r.window_s, r.max_restarts):
            log.error("worker_crash_loop", restarts_in_window=sum(1 for t in self._failures if now - t <= r.window_s),
                      max_restarts=r.max_restarts, window_s=r.window_s)
            self._move(WorkerState.FAILED, f"more than {r.max_restarts} restarts in {r.window_s:g}s")
            return
        self._attempt += 1
        delay = backoff_delay(self._attempt, r.backoff_initial_s, r.backoff_max_s, self._rand())
        self.backoff_until = now + delay
        self._move(WorkerState.BACKOFF, f"{reason.value}; restart in {delay:.3f}s")
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        if self._shutdown:
            self._move(WorkerState.STOPPED, "shutdown")
            return
        if self._wanted is ExitReason.RELOAD:
            self._wanted = None
        self._move(WorkerState.STARTING, "backoff over")
