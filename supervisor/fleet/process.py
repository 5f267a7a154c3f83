"""One replica's process as plain facts and pure decisions: why it exited, when to try again, whether
it is in a crash loop, what its counters say. No I/O here except the kernel's OOM count (called in a
thread); the lifecycle (lifecycle.py) acts on these."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..states import ExitReason
from ..upstream import UpstreamPool

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
@dataclass(frozen=True)
class ExitEvidence:
    """What a worker's exit left behind, for `classify_exit`."""

    returncode: int | None
    requested: ExitReason | None  # the stop we asked for (None: we asked for none)
    sigkill_sent: bool
    was_ready: bool
    tail: Iterable[str]  # its last output lines
    oom_answer_recent: bool  # it answered X-Worker-Error: oom just before
    kernel_oom_kill: bool = False  # the kernel's oom_kill counter moved while it ran


def classify_exit(e: ExitEvidence) -> ExitReason:
    """Why the worker died, from what we asked for and what it left behind.

    `oom` needs a sign: OOM text in its last lines, an OOM answer just before, or the kernel's
    oom_kill counter (host or cgroup) moved while it ran. A SIGKILL we did not send with no such
    sign is `killed` (an operator, another supervisor), not a guess at OOM.
    """
    if e.requested is not None:
        return e.requested
    oom_text = any(OOM_PATTERNS.search(line) for line in e.tail)
    if oom_text:
        return ExitReason.OOM
    if not e.was_ready:
        return ExitReason.START_FAILURE
    if e.returncode == -signal.SIGKILL and not e.sigkill_sent:
        return ExitReason.OOM if (e.kernel_oom_kill or e.oom_answer_recent) else ExitReason.KILLED
    if e.oom_answer_recent:
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
        self.local_shortage = False  # ... because the supervisor itself was out of file descriptors or memory


