"""One replica's record: every fact about it in one place, and the one decision of whether it takes a
request now.

The fleet (core.py) is the only writer of a `Replica`: its lifecycle reports moves, spawns and exits
as events (events.py), the GPU room and pressure control return plans, and the fleet writes the
outcome here. Everyone else reads.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..circuit_breaker import CircuitBreaker
from ..config import WorkerSpec
from ..states import SERVING_STATES, WorkerState
from .process import ExitInfo, Incarnation, InFlight, crash_loop_clears_at

if TYPE_CHECKING:
    from .lifecycle import Lifecycle


def admits(state: WorkerState, alive: bool, stop_pending: bool, draining_for_room: bool, evicting: bool) -> bool:
    """Whether a replica takes a new request now: serving (ready or busy, its process alive, no planned
    stop asked for) and not being cleared out by the GPU ledger (drained for a waiter, or evicted)."""
    return state in SERVING_STATES and alive and not stop_pending and not draining_for_room and not evicting


@dataclass
class RoomMarks:
    """What the GPU ledger holds for a replica (room.py decides, the fleet writes)."""

    admitted: bool = False  # passed the gate: holds its room until it is down
    waiting_since: float | None = None  # waits at the gate for room (monotonic)
    refused: str | None = None  # why it can never start here (too_large, pinned)
    retry_after_s: float | None = None  # the gate's next look, for a 503's Retry-After
    draining: bool = False  # asked to take nothing new so a waiter can evict it
    sleeping: bool = False  # being put to sleep (to make room, or idle): takes nothing new
    evicting: bool = False  # chosen for eviction: new requests wait instead of restarting it
    evicted_at: float | None = None  # evicted, its memory not yet seen back in NVML (monotonic)
    target_used: int = 0  # NVML's used bytes on its GPU once that memory is back

    def clear(self) -> None:
        """It is down: it holds no room, and nothing is being cleared out."""
        self.admitted = self.draining = self.evicting = self.sleeping = False


class Replica:
    """One replica of one worker: lifecycle state, process, counters, breaker, readings, ledger marks."""

    def __init__(self, worker: str, index: int, gpu: int | None, spec: WorkerSpec, breaker: CircuitBreaker):
        self.worker = worker
        self.index = index
        self.tag = f"{worker}/{index}".encode()  # X-Supervisor-Replica of its answers
        self.gpu = gpu
        self.spec = spec  # its worker's spec (a reload hands a new one)
        self.breaker = breaker
        # lifecycle
        self.state = WorkerState.UNLOADED if spec.start == "on_demand" else WorkerState.STOPPED
        self.current: Incarnation | None = None  # the process it runs (or last ran)
        self.gen = 0
        self.restarts = 0
        self.oom_restarts = 0
        self.last_exit: ExitInfo | None = None
        self.last_start_s: float | None = None
        self.last_used = time.monotonic()  # end of the last request (idle unload counts from here)
        self.backoff_until = 0.0
        self.probe_failures = 0  # health probes failed in a row (the breaker weighs 500s by it)
        self.degraded: str | None = None  # cpu-fallback after repeated OOMs
        self.env_override: dict[str, str] = {}
        self.moved = asyncio.Event()  # set (and replaced) at every state move
        self.ready = asyncio.Event()  # set while it is ready or busy
        # readings (pressure control's watcher)
        self.rss_bytes = 0
        self.gpu_memory_bytes = 0
        self.gpu_peak_bytes = 0  # the most NVML has seen its process tree hold (the learned need)
        # sleep mode
        self.asleep_since: float | None = None  # it fell asleep then (monotonic), and holds only its sleep since
        self.asleep_gpu_bytes = 0  # what NVML saw it hold while asleep (the learned sleep.gpu_memory_mb)
        self.waking_since: float | None = None  # asleep -> starting: the wake in progress began (monotonic)
        self.last_wake_s: float | None = None
        self.woke_at: float | None = None  # its last wake ended (monotonic): min_resident_s counts from it
        self.room = RoomMarks()
        # who runs it
        self.lifecycle: Lifecycle | None = None
        self.task: asyncio.Task | None = None

    @property
    def label(self) -> str:
        return str(self.index)

    @property
    def name(self) -> str:
        return f"{self.worker}/{self.index}"

    @property
    def key(self) -> tuple[str, int]:
        return (self.worker, self.index)

    # -- the facts others ask for --------------------------------------------------------------
    @property
    def alive(self) -> bool:
        inc = self.current
        return inc is not None and not inc.exited.is_set()

    @property
    def stop_pending(self) -> bool:
        lc = self.lifecycle
        return lc is not None and lc.stop_pending

    @property
    def serving(self) -> bool:
        """Ready for a new request: alive, healthy, not about to be replaced or unloaded."""
        return self.state in SERVING_STATES and self.alive and not self.stop_pending

    @property
    def started(self) -> bool:
        """Holding (or about to hold) its GPU memory: anything but unloaded, stopped or failed."""
        return self.state not in (WorkerState.UNLOADED, WorkerState.STOPPED, WorkerState.FAILED)

    @property
    def down(self) -> bool:
        return self.state in (WorkerState.UNLOADED, WorkerState.STOPPED, WorkerState.FAILED)

    @property
    def inflight(self) -> int:
        inc = self.current
        return len(inc.inflight) if inc is not None else 0

    @property
    def admits(self) -> bool:
        return admits(self.state, self.alive, self.stop_pending, self.room.draining or self.room.sleeping,
                      self.room.evicting)

    def can_take(self, now: float) -> bool:
        return self.admits and self.breaker.would_allow(now)

    @property
    def wants_load(self) -> bool:
        lc = self.lifecycle
        return lc is not None and lc.wants_load

    def worker_env(self, base_env: dict[str, str]) -> dict[str, str]:
        """The environment its next process gets (its socket aside): ours, its GPU, the policy's, a fallback's."""
        gpu = {"CUDA_VISIBLE_DEVICES": str(self.gpu)} if self.gpu is not None else {}
        return {**base_env, **gpu, **self.spec.env, **self.env_override}

    def expected_ready_in(self) -> float:
        """A guess at how long until it serves, for Retry-After."""
        now = time.monotonic()
        start = self.last_start_s or 1.0
        if self.state is WorkerState.ASLEEP:
            return self.last_wake_s or 1.0
        if self.state is WorkerState.BACKOFF:
            return max(0.0, self.backoff_until - now) + start
        if self.state is WorkerState.STARTING and self.current:
            return max(0.0, start - (now - self.current.spawned_at))
        if self.state is WorkerState.FAILED:
            r = self.spec.restart
            failures = self.lifecycle.failures if self.lifecycle is not None else ()
            return max(1.0, crash_loop_clears_at(failures, r.window_s, r.max_restarts) - now)
        return start

    # -- requests (the request path) -----------------------------------------------------------
    def begin(self, ex: InFlight) -> Incarnation:
        """A request goes to its current process: counted in flight there until `end`."""
        inc = self.current
        assert inc is not None and self.lifecycle is not None
        self.lifecycle.begin_request(inc, ex)
        return inc

    def end(self, inc: Incarnation, ex: InFlight, oom: bool) -> None:
        assert self.lifecycle is not None
        self.lifecycle.end_request(inc, ex, oom)

    # -- /status -------------------------------------------------------------------------------
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

