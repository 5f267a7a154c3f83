"""The two event interfaces of the fleet: what a replica's lifecycle reports to the fleet (which
alone writes replica records), and what the fleet reports to its owner (metrics, jobs, the pid file).

One object each, instead of callbacks handed down a chain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..states import BreakerState, WorkerState
    from .process import ExitInfo, Incarnation
    from .replica import Replica


class ReplicaEvents(Protocol):
    """What a lifecycle tells the fleet about its replica (and the two things it asks)."""

    def move(self, r: Replica, new: WorkerState, reason: str, level: str = "info") -> None:
        """Its lifecycle state changes (checked against the table, logged, acted on)."""

    def new_process(self, r: Replica, inc: Incarnation) -> None:
        """A new process (generation) is being started for it."""

    def spawned(self, r: Replica, inc: Incarnation) -> None:
        """The process runs (it has a pid)."""

    def probed(self, r: Replica, failures: int) -> None:
        """Health probes failed in a row (0: the last one passed)."""

    def backoff(self, r: Replica, until: float) -> None:
        """It waits until `until` (monotonic) before its next start."""

    def exited(self, r: Replica, info: ExitInfo, final: bool) -> None:
        """Its process exited, classified; `final`: it stops for good (shutdown, retired)."""

    def idle(self, r: Replica) -> None:
        """Its last request in flight ended."""

    def down(self, r: Replica) -> None:
        """Send it nothing new: its process exited, or a planned stop was asked for."""

    def work_waiting(self, r: Replica) -> bool:
        """Requests wait for its worker (the progress watch judges a flat counter only then)."""

    async def admit(self, r: Replica) -> bool:
        """Wait for room on its GPU before a start (or a wake); False: it can never start there."""

    def sleep_skipped(self, r: Replica) -> None:
        """A sleep asked for did not happen: it was busy by then (it serves on)."""


class FleetEvents(Protocol):
    """What the fleet tells its owner (the supervisor: metrics, the job loop, the pid file)."""

    def replica_moved(self, r: Replica, old: WorkerState, new: WorkerState, reason: str) -> None:
        """Whether it serves changed (ready <-> busy is not reported)."""

    def replica_exited(self, r: Replica, info: ExitInfo) -> None:
        """Its process exited and it will be started again, unloaded, or was retired."""

    def breaker_moved(self, r: Replica, old: BreakerState, new: BreakerState, reason: str) -> None:
        """Its circuit breaker changed state."""

    def slot_free(self) -> None:
        """A request slot freed or a replica came up: queued jobs may start."""

    def pids_changed(self) -> None:
        """A worker process started: the pid file wants writing."""

    def models_changed(self) -> None:
        """The models some worker serves changed (discovered, or a reload)."""

    def protocol_error(self, kind: str) -> None:
        """A worker broke HTTP (counted by kind)."""

    def supervision_failed(self) -> None:
        """A replica's lifecycle ended other than by shutdown: a bug; the daemon exits non-zero."""
