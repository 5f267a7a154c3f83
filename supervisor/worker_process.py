"""One replica's lifecycle: spawn, readiness, health probes, hang detection, stop, classify, respawn, unload.

`WorkerManager` alone writes the replica's state (through `_move`, which checks the table in
states.py). One supervising coroutine (`run`) owns the child process; everything else asks it to act
through `request_restart` / `unload` / `load` / `retire` / `shutdown` and learns of changes through the
`on_change` callback. The fleet (fleet.py) owns one manager per replica.
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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from .aio import wait_quietly
from .config import WorkerSpec, find_program
from .pressure import recycle_due
from .states import PLANNED_EXITS, SERVING_STATES, UNLOAD_EXITS, ExitReason, WorkerState, check_move
from .upstream import UpstreamError, UpstreamPool, fetch

log = structlog.get_logger("supervisor.worker")

TAIL_LINES = 50
OOM_PATTERNS = re.compile(
    r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|CUDA error: out of memory"
    r"|\bMemoryError\b|Cannot allocate memory|std::bad_alloc",
)
OOM_ANSWER_WINDOW_S = 5.0
MAX_SOCKET_PATH = 107
SETPRIV = "/usr/bin/setpriv"
METRIC_LINE = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)")


# -- pure decisions --------------------------------------------------------------------------------
def classify_exit(
    returncode: int | None,
    requested: ExitReason | None,
    sigkill_sent: bool,
    was_ready: bool,
    tail: Iterable[str],
    oom_answer_recent: bool,
    kernel_oom_kill: bool = False,
) -> ExitReason:
    """Why the worker died, from what we asked for and what it left behind.

    `oom` needs a sign: OOM text in its last lines, an OOM answer just before, or the kernel's
    oom_kill counter (host or cgroup) moved while it ran. A SIGKILL we did not send with no such
    sign is `killed` (an operator, another supervisor), not a guess at OOM.
    """
    if requested is not None:
        return requested
    oom_text = any(OOM_PATTERNS.search(line) for line in tail)
    if oom_text:
        return ExitReason.OOM
    if not was_ready:
        return ExitReason.START_FAILURE
    if returncode == -signal.SIGKILL and not sigkill_sent:
        return ExitReason.OOM if (kernel_oom_kill or oom_answer_recent) else ExitReason.KILLED
    if oom_answer_recent:
        return ExitReason.OOM
    return ExitReason.CRASH


def kernel_oom_kills() -> int:
    """The kernel's OOM-kill count: /proc/vmstat plus this cgroup's memory.events (v2) or
    memory.oom_control (v1). Blocking file reads: call it in a thread."""
    total = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                total += int(line.split()[1])
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, rel = line.split(":", 2)
            for f in ((Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.events") if ctrl == "" else None,
                      (Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "memory.oom_control")
                      if "memory" in ctrl.split(",") else None):
                if f is not None and f.exists():
                    for ev in f.read_text().splitlines():
                        if ev.startswith("oom_kill "):
                            total += int(ev.split()[1])
    return total


def counter_value(text: bytes, metric: str) -> float | None:
    """The sum of a metric's samples in Prometheus text (a `_total` suffix is tried too)."""
    names = {metric.encode(), (metric + "_total").encode()}
    found = None
    for line in text.splitlines():
        if not line or line[:1] == b"#":
            continue
        m = METRIC_LINE.match(line)
        if m and m.group(1) in names:
            with contextlib.suppress(ValueError):
                found = (found or 0.0) + float(m.group(3))
    return found


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
    detail: str | None = None  # why it could not start at all (a program not found), for /status

    def as_dict(self) -> dict:
        return {
            "reason": self.reason.value,
            "code": self.code,
            "signal": signal.Signals(self.signal).name if self.signal else None,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "pid": self.pid,
            "uptime_s": round(self.uptime_s, 3),
            "detail": self.detail,
        }


class InFlight:
    """One request in flight on an incarnation, as its lifecycle sees it (the request path's exchange
    is one): when it began, and its worker connection once sent. Hang detection reads its activity."""

    __slots__ = ("started", "conn", "client_wait")

    def __init__(self, started: float):
        self.started = started
        self.conn = None  # UpstreamConnection once the request head is sent
        self.client_wait = False  # held up by a slow client, not by the worker

    def last_activity(self, now: float) -> float:
        if self.client_wait:
            return now
        conn = self.conn
        rx = getattr(conn, "last_rx", 0.0) if conn is not None else 0.0
        return max(self.started, rx or 0.0)


class Incarnation:
    """One worker process and everything that belongs to it alone."""

    def __init__(self, gen: int, socket_path: str, **pool_kw):
        self.gen = gen
        self.socket_path = socket_path
        self.pool = UpstreamPool(socket_path, **pool_kw)
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
        self.oom_kills_at_start: int | None = None
        self.served = 0
        self.recycle_jitter = 0
        self.recycle_asked = False
        self.inflight: dict[int, InFlight] = {}  # id(exchange) -> exchange, oldest first
        self.idle = asyncio.Event()
        self.idle.set()
        self.tasks: list[asyncio.Task] = []
        self.accounted = False  # its exit was classified and acted on
        self.boot_error: str | None = None  # it could not be started at all: why


class WorkerManager:
    """The lifecycle of one replica of one named worker."""

    def __init__(
        self,
        spec: WorkerSpec,
        runtime_dir: Path,
        base_env: dict[str, str],
        on_change: Callable[[WorkerState, WorkerState, str], None] | None = None,
        on_exit: Callable[[ExitInfo], None] | None = None,
        on_down: Callable[[], None] | None = None,
        rand: Callable[[], float] = random.random,
        *,
        name: str = "default",
        index: int = 0,
        gpu: int | None = None,
        drain_timeout_s: float = 30.0,
        gate: Callable[[], Awaitable[bool]] | None = None,
        work_waiting: Callable[[], bool] | None = None,
        pool_kw: dict | None = None,
        on_spawn: Callable[[], None] | None = None,
        on_idle: Callable[[], None] | None = None,
    ):
        self.on_idle = on_idle  # its last request in flight ended (the GPU ledger may re-plan)
        self.on_spawn = on_spawn  # a process started (or is gone): the pid file wants writing
        self.pool_kw = pool_kw or {}  # the upstream pool's bounds and protocol-error hook
        self.spec = spec
        self.runtime_dir = runtime_dir
        self.base_env = base_env
        self.on_change = on_change
        self.on_exit = on_exit
        self.on_down = on_down
        self._rand = rand
        self.name = name
        self.index = index
        self.gpu = gpu
        self.drain_timeout_s = drain_timeout_s
        self.gate = gate  # awaited before each start: the GPU ledger's room for this replica
        self.work_waiting = work_waiting  # requests queued for this worker (progress watch)
        self.state = WorkerState.UNLOADED if spec.start == "on_demand" else WorkerState.STOPPED
        self.current: Incarnation | None = None
        self.gen = 0
        self.restarts = 0
        self.oom_restarts = 0
        self.degraded: str | None = None
        self.last_exit: ExitInfo | None = None
        self.last_start_s: float | None = None
        self.last_used = time.monotonic()  # end of the last request (idle unload counts from here)
        self._failures: deque[float] = deque(maxlen=1024)
        self._attempt = 0
        self.backoff_until = 0.0
        self._wake = asyncio.Event()
        self._wanted: ExitReason | None = None
        self._load_wanted = spec.start != "on_demand"
        self._retire = False
        self._shutdown = False
        self.stopped = asyncio.Event()
        self.ready = asyncio.Event()  # set while state is ready/busy
        self.moved = asyncio.Event()  # set (and replaced) at every state move
        self.env_override: dict[str, str] = {}
        self.probe_failures = 0  # health probes failed in a row (the breaker weighs 500s by it)
        self.log = log.bind(worker=name, replica=index)

    # -- the one writer of state ---------------------------------------------------------------
    def _move(self, new: WorkerState, reason: str, level: str = "info") -> None:
        old = self.state
        if old is new:
            return
        check_move(old, new)
        self.state = new
        moved, self.moved = self.moved, asyncio.Event()
        moved.set()  # wakes whoever waits for this replica's next move
        if new in SERVING_STATES:
            self.ready.set()
        else:
            self.ready.clear()
        inc = self.current
        getattr(self.log, level)(
            "worker_state", old=old.value, new=new.value, reason=reason,
            # a process that runs (or is being stopped); never the one that already exited (its exit
            # is logged with its pid), and none before the next one is spawned
            worker_pid=inc.pid if inc is not None and inc.pid and not inc.exited.is_set() else None,
        )
        # ready <-> busy happens per request; whether the worker serves at all did not change
        if self.on_change is not None and not (old in SERVING_STATES and new in SERVING_STATES):
            self.on_change(old, new, reason)

    @property
    def serving(self) -> bool:
        """Ready for a new request: alive, healthy, not about to be replaced or unloaded."""
        inc = self.current
        return (self.state in SERVING_STATES and inc is not None and not inc.exited.is_set()
                and self._wanted is None)

    @property
    def started(self) -> bool:
        """Holding (or about to hold) its GPU memory: anything but unloaded, stopped or failed."""
        return self.state not in (WorkerState.UNLOADED, WorkerState.STOPPED, WorkerState.FAILED)

    @property
    def inflight(self) -> int:
        inc = self.current
        return len(inc.inflight) if inc is not None else 0

    # -- requests (called by the proxy) --------------------------------------------------------
    def begin_request(self, inc: Incarnation, ex: InFlight) -> None:
        if not inc.inflight:
            inc.idle.clear()
            if self.state is WorkerState.READY and inc is self.current:
                self._move(WorkerState.BUSY, "request", "debug")
        inc.inflight[id(ex)] = ex

    def end_request(self, inc: Incarnation, ex: InFlight, oom: bool = False) -> None:
        if inc.inflight.pop(id(ex), None) is not None:
            inc.served += 1
            rc = self.spec.recycle
            if (not inc.recycle_asked and inc is self.current
                    and recycle_due(inc.served, rc.max_requests, inc.recycle_jitter)):
                inc.recycle_asked = True
                self.log.info("worker_recycle", why="max_requests", served=inc.served, worker_pid=inc.pid)
                self.request_restart(ExitReason.RECYCLE)
        if oom:
            inc.oom_answer_at = time.monotonic()
        if not inc.inflight:
            self.last_used = time.monotonic()
            inc.idle.set()
            if self.on_idle is not None:
                self.on_idle()
            if self.state is WorkerState.BUSY and inc is self.current:
                self._move(WorkerState.READY, "idle", "debug")

    # -- commands ------------------------------------------------------------------------------
    def request_restart(self, reason: ExitReason) -> None:
        """Replace the worker gracefully (recycle, reload, pressure) or start it again (failed);
        `idle`/`evicted` stop it and leave it unloaded."""
        if self._shutdown:
            return
        if self.state is WorkerState.UNLOADED and reason not in UNLOAD_EXITS:
            return  # nothing runs; the next start takes the new settings anyway
        if self._wanted is None or reason is ExitReason.RELOAD:
            self._wanted = reason
        self._wake.set()
        if self.on_down is not None:
            self.on_down()  # send this worker nothing more: it is about to be replaced

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
        if self.state in (WorkerState.UNLOADED, WorkerState.FAILED, WorkerState.BACKOFF, WorkerState.STOPPED):
            self._shutdown = True
            self._wake.set()
            return
        self.request_restart(ExitReason.RETIRED)

    @property
    def wants_load(self) -> bool:
        return self._load_wanted and not self._shutdown

    @property
    def replacing(self) -> bool:
        """A replacement was asked for and not yet begun: dispatch must hold."""
        return self._wanted is not None and self.state in SERVING_STATES

    async def shutdown(self) -> None:
        self._shutdown = True
        self._wake.set()
        await self.stopped.wait()

    def reconfigure(self, spec: WorkerSpec, drain_timeout_s: float | None = None) -> None:
        changed = spec.lifecycle() != self.spec.lifecycle()
        self.spec = spec
        if drain_timeout_s is not None:
            self.drain_timeout_s = drain_timeout_s
        if changed or self.state is WorkerState.FAILED:
            self.request_restart(ExitReason.RELOAD)

    def worker_env(self) -> dict[str, str]:
        """The environment the next worker gets (its socket aside): ours, its GPU, the policy's, a fallback's."""
        gpu = {"CUDA_VISIBLE_DEVICES": str(self.gpu)} if self.gpu is not None else {}
        return {**self.base_env, **gpu, **self.spec.env, **self.env_override}

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        inc = self.current
        alive = inc is not None and inc.returncode is None and inc.pid and self.started
        return {
            "state": self.state.value,
            "pid": inc.pid if alive else None,
            "generation": self.gen,
            "restarts": self.restarts,
            "last_exit": self.last_exit.as_dict() if self.last_exit else None,
            "started_at": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - inc.spawned_at)))
                if alive else None
            ),
            "ready_for_s": round(time.monotonic() - inc.ready_at, 3) if alive and inc.ready_at else None,
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
            return max(1.0, crash_loop_clears_at(self._failures, self.spec.restart.window_s,
                                                 self.spec.restart.max_restarts) - now)
        return start

    # -- the supervising loop ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while not self._shutdown:
                if self.state is WorkerState.FAILED:
                    await self._hold_failed()
                    continue
                if not self._load_wanted:
                    await self._hold_unloaded()
                    continue
                if self.gate is not None:
                    fits = await self.gate()  # room on the GPU (may wait for evictions to settle)
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
            inc = self.current
            if inc is not None and inc.returncode is None and inc.proc is not None:
                await self._stop(inc, ExitReason.SHUTDOWN)
                await self._after_exit(inc)
            if self.state is not WorkerState.STOPPED:
                with contextlib.suppress(Exception):
                    self._move(WorkerState.STOPPED, "retired" if self._retire else "shutdown")
            self.stopped.set()

    async def _hold_unloaded(self) -> None:
        if self.state is not WorkerState.UNLOADED:
            self._move(WorkerState.UNLOADED, "on demand: waiting for a request")
        while not self._load_wanted and not self._shutdown:
            self._wake.clear()
            await self._wake.wait()
        self._wanted = None
        if self._load_wanted and not self._shutdown:
            self._move(WorkerState.STARTING, "load requested")

    async def _hold_failed(self) -> None:
        r = self.spec.restart
        clears = crash_loop_clears_at(self._failures, r.window_s, r.max_restarts)
        timeout = max(0.0, clears - time.monotonic())
        self._wake.clear()
        await wait_quietly(self._wake.wait(), timeout)
        if self._shutdown:
            return
        if self._wanted is ExitReason.RELOAD:
            self._failures.clear()
            self._attempt = 0
        self._wanted = None
        self._move(WorkerState.STARTING, "operator reload" if not self._failures else "crash-loop window passed")

    def _socket_path(self, gen: int) -> str:
        path = str(self.runtime_dir / f"{self.name}-{self.index}-{gen}.sock")
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for a Unix socket ({len(path)} bytes): {path}")
        return path

    def _command(self, sock: str, path: str | None) -> list[str]:
        # {python} is the supervisor's own interpreter: handy when the worker lives in the same venv
        cmd = [part.replace("{socket}", sock).replace("{python}", sys.executable) for part in self.spec.command]
        # the absolute path, found before any fork (setpriv would only fail after it); raises OSError naming
        # the program and where it looked (check-config looks the same way)
        cmd[0] = find_program(cmd[0], path, self.spec.cwd)
        if os.path.exists(SETPRIV):
            # the worker never outlives its daemon: SIGKILL when the daemon (its parent) dies
            cmd = [SETPRIV, "--pdeathsig", "KILL", "--", *cmd]
        return cmd

    async def _spawn(self) -> Incarnation | None:
        self.gen += 1
        sock = self._socket_path(self.gen)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        inc = Incarnation(self.gen, sock, **self.pool_kw)
        # gunicorn-style: a jitter drawn per worker spreads the recycles of several daemons
        inc.recycle_jitter = int(self._rand() * (self.spec.recycle.max_requests_jitter + 1))
        self.current = inc
        if self.state is not WorkerState.STARTING:
            self._move(WorkerState.STARTING, "spawn")
        w = self.spec
        env = {**self.worker_env(), "GPU_SUPERVISOR_SOCKET": sock}
        cmd = list(w.command)
        inc.oom_kills_at_start = await asyncio.to_thread(kernel_oom_kills)
        try:
            cmd = self._command(sock, env.get("PATH"))
            inc.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=w.cwd, start_new_session=True,
                limit=1 << 20,
            )
        except OSError as exc:
            # a boot error (a program not found, a cwd that is not there): a failed start, named
            inc.boot_error = f"cannot start {exc.filename or cmd[0]!r}: {exc.strerror or exc}"
            self.log.error("worker_spawn_failed", command=cmd, error=inc.boot_error)
            inc.returncode = 127
            inc.tail.append(inc.boot_error)
            inc.exited.set()
            await self._after_exit(inc)
            return None
        inc.pid = inc.proc.pid
        self.log.info("worker_spawned", worker_pid=inc.pid, command=cmd, generation=inc.gen,
                      degraded=self.degraded, gpu=self.gpu)
        if self.on_spawn is not None:
            self.on_spawn()
        inc.tasks = [
            asyncio.create_task(self._pump_output(inc, inc.proc.stdout, "stdout")),
            asyncio.create_task(self._pump_output(inc, inc.proc.stderr, "stderr")),
            asyncio.create_task(self._wait_exit(inc)),
        ]
        return inc

    async def _pump_output(self, inc: Incarnation, stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        blog = self.log.bind(source="worker", worker_pid=inc.pid, stream=name)
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

    async def _get(self, inc: Incarnation, path: str, timeout: float) -> tuple[bool, str, bytes]:
        """One GET on its own connection: (2xx, why-not, body); a health probe reads no body."""
        try:
            async with asyncio.timeout(timeout):
                status, body = await fetch(inc.pool, path, 0 if path == self.spec.health.path else None)
        except TimeoutError:
            return False, "timeout", b""
        except UpstreamError as exc:
            return False, exc.kind, b""
        if 200 <= status < 300:
            return True, "", body
        return False, f"status {status}", b""

    async def _probe(self, inc: Incarnation, timeout: float) -> tuple[bool, str]:
        ok, why, _ = await self._get(inc, self.spec.health.path, timeout)
        return ok, why

    async def _until_ready(self, inc: Incarnation) -> ExitReason | None:
        """Wait for the first healthy answer. None when ready, else why to stop it."""
        w = self.spec
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
                    self.last_start_s = inc.ready_at - inc.spawned_at
                    self.last_used = inc.ready_at
                    self._attempt = 0
                    if self._wanted is ExitReason.RELOAD:
                        self._wanted = None  # it started with the new settings already
                    self._move(WorkerState.READY, f"healthy after {self.last_start_s:.3f}s")
                    return None
            self._wake.clear()
            await wait_quietly(self._wait_any(inc.exited, self._wake), min(delay, max(0.0, deadline - now)))
            if self._shutdown:
                return ExitReason.SHUTDOWN
            delay = min(delay * 1.5, 0.05)  # (a probe is one connect: cheap; a late ready costs more)

    @staticmethod
    async def _wait_any(*events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waiters:
                t.cancel()

    def stalled_for(self, inc: Incarnation, now: float) -> float:
        """Seconds since the worker last sent a byte on any request in flight (0 with none in flight)."""
        if not inc.inflight:
            return 0.0
        newest = max(ex.last_activity(now) for ex in inc.inflight.values())
        return max(0.0, now - newest)

    async def _serve(self, inc: Incarnation) -> None:
        """Probe while serving; return once the worker exited (after stopping it if needed)."""
        h = self.spec.health
        failures = 0
        progress = self.spec.progress
        last_count: float | None = None
        last_move = time.monotonic()
        while True:
            self._wake.clear()
            interval = h.interval_s if not inc.inflight else min(h.interval_s, max(0.05, self.spec.stall_s / 4))
            await wait_quietly(self._wait_any(inc.exited, self._wake), interval)
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
            # judged by progress, not age: no byte from the worker on any request in flight for
            # stall_timeout_s (a slow client or a long stream that keeps sending is never a hang)
            now = time.monotonic()
            stalled = self.stalled_for(inc, now)
            if stalled > self.spec.stall_s:
                self.log.warning("worker_hang", worker_pid=inc.pid, why="no progress", stalled_s=round(stalled, 3),
                                 inflight=len(inc.inflight))
                await self._stop(inc, ExitReason.HANG)
                return
            if progress is not None:
                ok, _, body = await self._get(inc, progress.path, h.timeout_s)
                value = counter_value(body, progress.metric) if ok else None
                busy = bool(inc.inflight) or (self.work_waiting is not None and self.work_waiting())
                now = time.monotonic()
                if value is None or value != last_count or not busy:
                    last_count, last_move = value, now
                elif now - last_move > progress.stall_s:
                    self.log.warning("worker_hang", worker_pid=inc.pid, why="progress counter flat",
                                     metric=progress.metric, value=value, flat_s=round(now - last_move, 3))
                    await self._stop(inc, ExitReason.HANG)
                    return
            ok, why = await self._probe(inc, h.timeout_s)
            if inc.exited.is_set():
                return
            if ok:
                failures = self.probe_failures = 0
                continue
            failures += 1
            self.probe_failures = failures
            self.log.warning("worker_probe_failed", worker_pid=inc.pid, why=why, failures=failures, limit=h.failures)
            if failures >= h.failures:
                await self._stop(inc, ExitReason.HANG if why == "timeout" else ExitReason.HEALTH)
                return

    async def _drain(self, inc: Incarnation, reason: ExitReason) -> None:
        """Let the requests this worker holds finish before a planned stop."""
        if reason is ExitReason.PRESSURE:
            return  # memory is about to run out: stop now, retry-safe requests go again
        self._move(WorkerState.DRAINING, reason.value)
        timeout = self.drain_timeout_s if reason is not ExitReason.RECYCLE else self.spec.hang_timeout_s
        await wait_quietly(self._wait_any(inc.idle, inc.exited), timeout)

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
        if not await wait_quietly(inc.exited.wait(), self.spec.stop_grace_s):
            self.log.warning("worker_kill", worker_pid=inc.pid, reason=reason.value, grace_s=self.spec.stop_grace_s)
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
        if inc.accounted:
            return
        inc.accounted = True
        # whatever the worker started in its session goes with it
        self._signal_group(inc, signal.SIGKILL)
        for t in inc.tasks:
            if not t.done():
                await wait_quietly(asyncio.shield(t), 1.0)  # its last output lines, for the exit's reason
                t.cancel()
        inc.pool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inc.socket_path)
        now = time.monotonic()
        rc = inc.returncode
        kernel_oom = False
        if rc == -signal.SIGKILL and not inc.sigkill_sent and inc.oom_kills_at_start is not None:
            kernel_oom = await asyncio.to_thread(kernel_oom_kills) > inc.oom_kills_at_start
        reason = classify_exit(
            rc,
            inc.requested if inc.requested is not ExitReason.START_FAILURE else None,
            inc.sigkill_sent,
            inc.ready_at is not None,
            inc.tail,
            now - inc.oom_answer_at <= OOM_ANSWER_WINDOW_S,
            kernel_oom,
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
            detail=inc.boot_error,
        )
        self.last_exit = info
        log_fn = self.log.info if reason in PLANNED_EXITS else self.log.warning
        log_fn(
            "worker_exited", worker_pid=inc.pid, reason=reason.value, code=info.code,
            signal=info.as_dict()["signal"], uptime_s=round(info.uptime_s, 3),
            perhaps="out of memory" if reason is ExitReason.OOM else None,
            tail=list(inc.tail)[-5:] if reason not in PLANNED_EXITS else None,
        )
        if self._shutdown or reason in (ExitReason.SHUTDOWN, ExitReason.RETIRED):
            self._shutdown = True
            if self.on_exit is not None and reason is ExitReason.RETIRED:
                self.on_exit(info)
            self._move(WorkerState.STOPPED, reason.value)
            return
        if reason not in UNLOAD_EXITS:
            self.restarts += 1
        if reason is ExitReason.OOM:
            self.oom_restarts += 1
        if self.on_exit is not None:
            self.on_exit(info)
        if reason in UNLOAD_EXITS:
            self._move(WorkerState.UNLOADED, reason.value)
            return
        if reason in PLANNED_EXITS:
            self._move(WorkerState.STARTING, f"replace after {reason.value}")
            return
        self._failures.append(now)
        r = self.spec.restart
        if in_crash_loop(self._failures, now, r.window_s, r.max_restarts):
            self.log.error("worker_crash_loop",
                           restarts_in_window=sum(1 for t in self._failures if now - t <= r.window_s),
                           max_restarts=r.max_restarts, window_s=r.window_s)
            self._move(WorkerState.FAILED, f"more than {r.max_restarts} restarts in {r.window_s:g}s")
            return
        self._attempt += 1
        delay = backoff_delay(self._attempt, r.backoff_initial_s, r.backoff_max_s, self._rand())
        self.backoff_until = now + delay
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
