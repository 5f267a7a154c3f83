"""What the daemon's life tells the request path: whether it takes new requests, whether shutdown
stopped waiting, and the async job manager to wake when a slot frees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import Rejected

if TYPE_CHECKING:
    from .jobs.manager import JobManager


@dataclass
class RunState:
    accepting: bool = True  # False once draining: new requests get 503 shutting_down
    abandoned: bool = False  # shutdown stopped waiting: nothing more goes to a worker
    jobs: JobManager | None = None  # the async job manager, when the daemon attaches one
    drain_timeout_s: float = 30.0  # Retry-After of a shutting_down answer

    def slot_free(self) -> None:
        """A slot freed or a replica came up: wake the job loop, if any job waits (a cached count)."""
        if self.jobs is not None and self.jobs.pending:
            self.jobs.notify_slot_free()

    def shutting_down(self) -> Rejected:
        return Rejected("shutting_down", "the supervisor is shutting down", self.drain_timeout_s)
