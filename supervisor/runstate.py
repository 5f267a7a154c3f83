"""What the daemon's life tells the request path: whether it takes new requests, whether shutdown
stopped waiting, and the async job manager to wake when a slot frees."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
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
    active: int = 0  # requests inside the request path, queued or running
    _idle: asyncio.Future[None] | None = field(default=None, repr=False)  # a drain waits for active == 0

    def request_done(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def idle(self) -> asyncio.Future[None]:
        """Done once no request is inside the request path (at once when none is)."""
        f = self._idle
        if f is None or f.done():
            f = self._idle = asyncio.get_running_loop().create_future()
            if self.active == 0:
                f.set_result(None)
        return f

    def slot_free(self) -> None:
        """A slot freed or a replica came up: wake the job loop, if any job waits (a cached count)."""
        if self.jobs is not None and self.jobs.pending:
            self.jobs.notify_slot_free()

    def shutting_down(self) -> Rejected:
        return Rejected("shutting_down", "the supervisor is shutting down", self.drain_timeout_s)
