"""Waiting and retrying: a queue slot for each attempt of a call, a replica for it, the retry loop after a
worker death, and the request that is not tried again (poison)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import structlog

from ..errors import Rejected
from ..request_queue import GRANTED, QueueFull, Ticket
from .admit import queue_full
from .exchange import Exchange, WorkerDied

if TYPE_CHECKING:
    from ..fleet import Fleet
    from ..metrics import Metrics
    from ..pressure_control import PressureControl
    from ..runstate import RunState
    from .call import Call, CallPlanner
    from .exchange import Wire

log = structlog.get_logger("supervisor.http")
T = TypeVar("T")
HANGS_BEFORE_POISON = 2  # a request in flight on this many workers that hung is not tried again


class Dispatcher:
    """Each attempt of an admitted call: a queue slot, a serving replica, an Exchange with it, and
    again after a worker death while the call may be repeated."""

    def __init__(self, fleet: Fleet, metrics: Metrics, pressure: PressureControl, run: RunState,
                 planner: CallPlanner, wire: Wire):
        self.fleet = fleet
        self.metrics = metrics
        self.pressure = pressure
        self.run = run
        self.planner = planner
        self.wire = wire

    async def dispatch(self, call: Call, attempt: Callable[[Exchange], Awaitable[T]]) -> T:
        """`attempt(exchange)` on a replica, again on another one when a worker dies under it and the
        call may be repeated; the queue slot of each attempt is released whatever happens."""
        g = call.group
        assert g is not None
        if g.spec.routing.affinity == "none":
            call.forget_document()  # read at admission only: not held while the call waits its turn
        state = self.run
        requeued = False
        while True:
            if state.abandoned:
                raise state.shutting_down()
            call.attempt += 1
            trace = call.trace
            ticket = self.ask_slot(call, call.attempt > 1 or requeued)
            if ticket.state != GRANTED:
                if trace is not None:
                    trace.wait_begins(call, self.planner.level_names[call.level])
                ticket = await self.wait_slot(call, ticket)
                if trace is not None:
                    trace.wait_ends()
            replica = None
            try:
                now = time.monotonic()
                replica, decision = g.router.pick(g, call, now)
                if replica is None or not replica.breaker.allow(now):
                    if not g.any_breaker_allows(now):
                        raise Rejected("circuit_open", f"worker {g.name} keeps failing; the circuit breaker is open",
                                       g.breaker_retry_after(now) or 1.0)
                    # granted, then the replica died or began to drain before this task ran: nothing
                    # reached it; back to the front, to wait for a serving replica
                    call.attempt -= 1
                    requeued = True
                    continue
                self.metrics.observe_decision(g.name, decision)
                if trace is not None:
                    trace.attempt_begins(call, replica)
                return await attempt(Exchange(self.wire, call, replica, ticket))
            except WorkerDied as died:
                if trace is not None:
                    trace.attempt_failed(died.reason)
                if state.abandoned:
                    raise state.shutting_down() from None
                call.hangs += died.hang
                if call.hangs >= HANGS_BEFORE_POISON:
                    log.error("poison_request", request_id=call.rid, worker=g.name, hung_workers=call.hangs,
                              action="not tried again")
                    raise Rejected("timeout", f"this request was in flight on {call.hangs} workers that hung; "
                                   "it is not tried again") from None
                if call.attempt < call.max_attempts and (call.deadline is None or call.deadline > time.monotonic()):
                    self.metrics.retries.labels(died.reason).inc()
                    log.info("request_retry", request_id=call.rid, attempt=call.attempt + 1, reason=died.reason,
                             worker=g.name, replica=replica.index if replica else None)
                    continue
                raise Rejected("worker_crashed", f"the worker died while serving this request ({died.reason}); "
                               "it was not retried" + ("" if call.retry_ok else " because it is not safe to repeat"),
                               g.expected_ready_in()) from None
            finally:
                g.queue.release(ticket, None)

    def ask_slot(self, call: Call, front: bool) -> Ticket:
        """A queue ticket: granted at once when a slot is free, else waiting (see wait_slot)."""
        g = call.group
        assert g is not None
        if not g.started():
            self.fleet.wake(g)  # on demand: the first request starts it
        try:
            ticket = g.queue.acquire(call.level, call.pool, time.monotonic(), call.gpu_mb, front, key=call.client,
                                     cost=call.cost)
        except QueueFull as full:
            raise queue_full(g, full, call, self.planner.level_names[call.level]) from None
        if ticket.state == GRANTED:
            self.metrics.observe_wait(self.planner.level_names[call.level], 0.0)
        return ticket

    async def wait_slot(self, call: Call, ticket: Ticket) -> Ticket:
        """The waiting ticket granted, or the answer to a call that waited past its limit."""
        g = call.group
        assert g is not None
        name = self.planner.level_names[call.level]
        now = ticket.enqueued_at
        limit = call.queue_limit if call.deadline is None else min(call.queue_limit, call.deadline - now)
        fut = ticket.future
        assert fut is not None
        # a plain timer, not asyncio.timeout (on Python 3.11 that is three getpid() system calls, on every
        # queued request); a grant that comes after it fired is given back by queue.cancel below
        timer = fut.get_loop().call_later(max(0.0, limit), _expire, fut)
        try:
            await fut
        except TimeoutError:
            g.queue.cancel(ticket)
            waited = time.monotonic() - now
            self.metrics.observe_wait(name, waited)
            if not g.serving():
                room = self.fleet.waiting_for_room(g)
                what = (f"worker {g.name} is waiting for GPU room: {room}; it did not start" if room is not None
                        else f"worker {g.name} is {g.state_summary()} and did not come back")
                raise Rejected("worker_unavailable", f"{what} within this request's wait limit ({limit:.3g}s)",
                               self.fleet.unavailable_retry_after(g)) from None
            if g.paused:
                raise Rejected("overloaded", "memory pressure has paused dispatch",
                               self.pressure.retry_after()) from None
            raise Rejected("queue_timeout", f"waited {waited:.3g}s in the queue, the limit for priority "
                           f"{name}", g.queue.estimate_wait(call.level, call.pool)) from None
        except BaseException:
            g.queue.cancel(ticket)  # the client left while queued: the worker never sees it
            raise
        finally:
            timer.cancel()
        waited = time.monotonic() - now
        call.queued_s += waited
        self.metrics.observe_wait(name, waited)
        return ticket


def _expire(fut: asyncio.Future[None]) -> None:
    """A queued call's wait limit passed: its wait ends in TimeoutError (unless it was granted first)."""
    if not fut.done():
        fut.set_exception(TimeoutError())
