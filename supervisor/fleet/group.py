"""One named worker: its spec, its replicas, its wait line and the models it serves; and which of its
replicas takes the next request."""

from __future__ import annotations

from ..config import Settings, WorkerSpec
from ..request_queue import RequestQueue
from ..routing.router import GroupRouter
from ..states import WorkerState
from .replica import Replica


class WorkerGroup:
    """One named worker: its spec, replicas, wait line and the models it serves (the fleet writes it)."""

    def __init__(self, name: str, spec: WorkerSpec, settings: Settings):
        self.name = name
        self.spec = spec
        self.replicas: list[Replica] = []
        self.queue = RequestQueue(settings.queue)
        self.discovered: tuple[str, ...] = ()
        self.models_read = False  # its GET /v1/models was asked once (discovery, or the check of declared names)
        # declared names its own GET /v1/models does not serve (None: not checked, or nothing declared)
        self.models_missing: tuple[str, ...] | None = None
        self.concurrency = spec.concurrency or settings.queue.concurrency
        self.paused = False  # memory pressure paused dispatch
        self.router = GroupRouter(name)  # which replica takes a call (least in flight, or affinity)

    @property
    def models(self) -> tuple[str, ...]:
        return self.spec.models or self.discovered

    @property
    def models_known(self) -> bool:
        """Declared, or read from the worker: a model it does not list is not its."""
        return bool(self.spec.models) or self.models_read

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.serving]

    def loaded(self) -> bool:
        """Some replica serves now (what GET /v1/models calls `loaded`)."""
        return any(r.serving for r in self.replicas)

    def started(self) -> bool:
        """Some replica holds, or is about to hold, its process awake (an on-demand worker's first request
        starts it, a sleeping one's wakes it)."""
        for r in self.replicas:
            if r.started and r.state is not WorkerState.ASLEEP:
                return True
        return False

    def refresh(self) -> None:
        """Slots follow the replicas that admit; the wait line opens when one does."""
        n = sum(1 for r in self.replicas if r.admits)
        self.queue.pools["default"].size = self.concurrency * max(1, n)
        self.queue.open = n > 0 and not self.paused
        if self.queue.open:
            self.queue.pump()

    def any_breaker_allows(self, now: float) -> bool:
        """Some loaded replica's breaker lets a call through (or none is loaded: starting one will tell)."""
        loaded = False
        for r in self.replicas:
            if r.state is not WorkerState.UNLOADED:
                if r.breaker.would_allow(now):
                    return True
                loaded = True
        return not loaded

    def breaker_retry_after(self, now: float) -> float:
        waits = [r.breaker.retry_after(now) for r in self.replicas]
        return min(waits) if waits else 1.0

    def expected_ready_in(self) -> float:
        waits = [r.expected_ready_in() for r in self.replicas]
        return min(waits) if waits else 1.0

    def state_summary(self) -> str:
        states = [r.state.value for r in self.replicas]
        return ", ".join(sorted(set(states))) if states else "no replicas"
