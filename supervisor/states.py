"""Worker and breaker states and the worker's table of legal moves (no dependencies)."""

from __future__ import annotations

import enum


class WorkerState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"


class ExitReason(enum.Enum):
    CRASH = "crash"
    OOM = "oom"
    HANG = "hang"
    HEALTH = "health"
    RECYCLE = "recycle"
    PRESSURE = "pressure"
    RELOAD = "reload"
    START_FAILURE = "start_failure"
    SHUTDOWN = "shutdown"


# Planned stops do not count towards crash-loop detection.
PLANNED_EXITS = frozenset({ExitReason.RECYCLE, ExitReason.PRESSURE, ExitReason.RELOAD, ExitReason.SHUTDOWN})

W = WorkerState
WORKER_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    W.STOPPED: frozenset({W.STARTING}),
    W.STARTING: frozenset({W.READY, W.STOPPING, W.BACKOFF, W.FAILED, W.STOPPED}),
    W.READY: frozenset({W.BUSY, W.DRAINING, W.STOPPING, W.BACKOFF, W.FAILED}),
    W.BUSY: frozenset({W.READY, W.DRAINING, W.STOPPING, W.BACKOFF, W.FAILED}),
    W.DRAINING: frozenset({W.STOPPING, W.BACKOFF, W.FAILED}),
    W.STOPPING: frozenset({W.STARTING, W.BACKOFF, W.FAILED, W.STOPPED}),
    W.BACKOFF: frozenset({W.STARTING, W.FAILED, W.STOPPED}),
    W.FAILED: frozenset({W.STARTING, W.STOPPED}),
}
SERVING_STATES = frozenset({W.READY, W.BUSY})


class IllegalTransition(RuntimeError):
    pass


def check_move(old: WorkerState, new: WorkerState) -> None:
    if new not in WORKER_MOVES[old]:
        raise IllegalTransition(f"worker state {old.value} -> {new.value} is not allowed")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
