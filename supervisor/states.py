"""Worker and breaker states and the worker's table of legal moves (no dependencies)."""

from __future__ import annotations

import enum

# _IDENTITY_HASH: a member is a singleton that equals only itself, so its identity is a fit hash; Enum's own
# __hash__ is a Python function, called on every `state in SERVING_STATES` of the request path.


class WorkerState(enum.Enum):
    __hash__ = object.__hash__  # see _IDENTITY_HASH
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"
    UNLOADED = "unloaded"  # on demand: not started yet, or stopped for idleness or eviction
    ASLEEP = "asleep"      # its process lives but sleeps (sleep mode): holds little GPU memory, serves nothing


class ExitReason(enum.Enum):
    __hash__ = object.__hash__  # see _IDENTITY_HASH
    CRASH = "crash"
    OOM = "oom"
    HANG = "hang"
    HEALTH = "health"
    RECYCLE = "recycle"
    PRESSURE = "pressure"
    RELOAD = "reload"
    START_FAILURE = "start_failure"
    SHUTDOWN = "shutdown"
    IDLE = "idle"          # idle_unload_s passed with no request
    EVICTED = "evicted"    # stopped to make room on its GPU for another worker
    KILLED = "killed"      # a SIGKILL we did not send, with no sign of an OOM kill
    RETIRED = "retired"    # removed from the fleet by a reload
    WAKE_FAILURE = "wake_failure"  # asleep, its wake failed or timed out: replaced by a new process


# Planned stops do not count towards crash-loop detection.
PLANNED_EXITS = frozenset({ExitReason.RECYCLE, ExitReason.PRESSURE, ExitReason.RELOAD, ExitReason.SHUTDOWN,
                           ExitReason.IDLE, ExitReason.EVICTED, ExitReason.RETIRED,
                           ExitReason.WAKE_FAILURE})
# Planned stops after which the replica stays down (until a request or a reload brings it back).
UNLOAD_EXITS = frozenset({ExitReason.IDLE, ExitReason.EVICTED})

W = WorkerState
WORKER_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    W.STOPPED: frozenset({W.STARTING, W.UNLOADED}),
    W.UNLOADED: frozenset({W.STARTING, W.STOPPED}),
    W.STARTING: frozenset({W.READY, W.STOPPING, W.BACKOFF, W.FAILED, W.STOPPED, W.UNLOADED}),
    W.READY: frozenset({W.BUSY, W.DRAINING, W.STOPPING, W.BACKOFF, W.FAILED, W.ASLEEP}),
    # waking is `starting` again (the same process: its lifecycle knows it wakes); a death while asleep is
    # classified as any other
    W.ASLEEP: frozenset({W.STARTING, W.STOPPING, W.BACKOFF, W.FAILED, W.STOPPED}),
    W.BUSY: frozenset({W.READY, W.DRAINING, W.STOPPING, W.BACKOFF, W.FAILED}),
    W.DRAINING: frozenset({W.STOPPING, W.BACKOFF, W.FAILED}),
    W.STOPPING: frozenset({W.STARTING, W.BACKOFF, W.FAILED, W.STOPPED, W.UNLOADED}),
    W.BACKOFF: frozenset({W.STARTING, W.FAILED, W.STOPPED, W.UNLOADED}),
    W.FAILED: frozenset({W.STARTING, W.STOPPED, W.UNLOADED}),
}
SERVING_STATES = frozenset({W.READY, W.BUSY})


class IllegalTransition(RuntimeError):
    pass


def check_move(old: WorkerState, new: WorkerState) -> None:
    if new not in WORKER_MOVES[old]:
        raise IllegalTransition(f"worker state {old.value} -> {new.value} is not allowed")


class BreakerState(enum.Enum):
    __hash__ = object.__hash__  # see _IDENTITY_HASH
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
