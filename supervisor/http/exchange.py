"""One attempt of a call on one replica (`Exchange`): its incarnation, queue ticket, worker connection and
deadline, what the worker answered, the one error path of an attempt, and what the attempt tells the
replica's breaker, the queue and the replica, each told once."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import structlog

from ..errors import Rejected, error_event
from ..fleet.process import Incarnation, InFlight
from ..jobs.model import JobFailed, JobResult
from ..response_spool import ResponseSpool, SpoolError
from ..states import ExitReason
from ..upstream import UpstreamError
from .framing import (
    STREAM_CHUNK,
    fill,
    gather,
    head,
    header_value,
    is_oom,
    request_head,
    response_headers,
    sized,
    stream_body,
)

if TYPE_CHECKING:
    from ..config import Limits, Settings
    from ..fleet import Replica
    from ..jobs.model import JobRequest
    from ..request_queue import Ticket
    from .call import Call
    from .wire import Request, Responder

log = structlog.get_logger("supervisor.http")
T = TypeVar("T")
JOB_LATE = "the job ran past its deadline"


class WorkerDied(Exception):
    """The attempt's worker died (or dropped the request unanswered): the dispatcher may try again."""

    def __init__(self, reason: str, hang: bool):
        self.reason = reason
        self.hang = hang


class Wire:
    """What every exchange reads: the limits in force, what a request past its deadline is told, and
    who hears that a slot is free (queued async jobs may take it)."""

    __slots__ = ("limits", "late", "slot_free")

    def __init__(self, settings: Settings, slot_free: Callable[[], None]):
        self.slot_free = slot_free
        self.derive(settings)

    def derive(self, s: Settings) -> None:
        self.limits: Limits = s.limits
        self.late = f"the request ran past its deadline (route timeout_s or {s.queue.timeout_header})"


class Exchange(InFlight):
    """One attempt: in flight on its replica's incarnation from construction until `finish`."""

    __slots__ = ("wire", "call", "replica", "ticket", "inc", "tm", "status", "oom", "recorded", "finished",
                 "handed_back")

    def __init__(self, wire: Wire, call: Call, replica: Replica, ticket: Ticket):
        super().__init__(time.monotonic())
        self.wire = wire
        self.call = call
        self.replica = replica
        self.ticket = ticket
        self.tm: asyncio.Timeout | None = None  # the deadline's timer, when the call has a deadline
        self.status = 0
        self.oom = False
        self.recorded = False
        self.finished = False
        self.handed_back = False
        self.inc: Incarnation = replica.begin(self)

    # -- the two kinds of attempt, one error path --------------------------------------------------
    def answer(self, request: Request, responder: Responder) -> Awaitable[int]:
        """The client's answer from this replica (streamed when it is a stream); its status."""
        return self._guarded(self.forward(request, responder), self.wire.late)

    def result(self, req: JobRequest, max_bytes: int) -> Awaitable[JobResult]:
        """A job's whole answer from this replica."""
        return self._guarded(self.collect(req, max_bytes), JOB_LATE)

    async def _guarded(self, work: Awaitable[T], late: str) -> T:
        """Run the attempt within the call's deadline; what went wrong becomes a Rejected answer or a
        WorkerDied for the dispatcher; the attempt is finished whatever happens."""
        call = self.call
        try:
            if call.deadline is None:  # the common case: no timer on the hot path
                return await work
            async with asyncio.timeout(max(0.0, call.deadline - self.started)) as tm:
                self.tm = tm
                return await work
        except TimeoutError:
            self.fail()
            raise Rejected("timeout", late) from None
        except UpstreamError as exc:
            if exc.kind == "local":  # the supervisor's own shortage (file descriptors): the worker is not to blame
                self.replica.breaker.release_probe()
                _out_of_resources(exc.detail)
                raise Rejected("overloaded", f"{exc.detail}; try again shortly", 1.0) from None
            inc = self.inc
            died = await _died(inc, exc)
            if died or (_unanswered(exc) and call.attempt < call.max_attempts):
                # a worker death belongs to the lifecycle, not the breaker; so does a connection closed
                # before any answer byte by a worker whose process lives on (its model process died under
                # a master that lives on): tried again, counted once by its final outcome
                self.replica.breaker.release_probe()
                raise WorkerDied("worker_crashed" if died else "reset", inc.requested is ExitReason.HANG) from None
            self.fail()
            raise Rejected("worker_error", f"the worker gave no valid answer: {exc.detail}") from None
        except BaseException:
            self.replica.breaker.release_probe()  # the client left, or a rejection: no outcome to count
            raise
        finally:
            self.finish()

    # -- what the attempt tells the breaker, the queue and the replica -----------------------------
    def record(self) -> None:
        """The worker answered: its status (a 500 or an OOM answer counts against the breaker)."""
        if self.recorded:
            return
        self.recorded = True
        now = time.monotonic()
        b = self.replica.breaker
        t_start = self.started
        if self.status == 500 and not self.oom:
            call = self.call
            b.record_server_error(now - t_start, now, t_start, call.client or call.peer,
                                  self.replica.probe_failures > 0)
            return
        b.record(self.status < 500 and not self.oom, now - t_start, now, t_start)

    def fail(self) -> None:
        """The worker gave no valid answer in time."""
        if self.recorded:
            return
        self.recorded = True
        now = time.monotonic()
        self.replica.breaker.record(False, now - self.started, now, self.started)

    def finish(self) -> None:
        """The worker is done with it: its queue slot and its place on the incarnation are free."""
        if self.finished:
            return
        self.finished = True
        self.call.group.queue.release(self.ticket, time.monotonic() - self.started)
        self.replica.end(self.inc, self, self.oom)
        self.wire.slot_free()

    # -- HTTP ----------------------------------------------------------------------------------------
    async def forward(self, request: Request, responder: Responder) -> int:
        """Send, then answer the client: at once when the answer is all in (or small enough to gather
        first), else relayed as it comes. Returns the status."""
        call = self.call
        head_bytes = request_head(request, call)
        body = call.body
        pool = self.inc.pool
        for _ in range(2):  # the request to the worker, its body held or streamed, until the answer's head is in
            conn = pool.take()
            reused = conn is not None
            if conn is None:
                conn = await pool.connect()
            try:
                fut = conn.start(head_bytes, body, call.method == "HEAD")
                if body is None:
                    await stream_body(request, conn, self.wire.limits.max_body_bytes)
                await fut
            except UpstreamError as exc:
                conn.abort()
                # a kept-alive connection the worker had closed: try once on a fresh one
                if reused and body is not None and exc.kind == "reset" and not exc.started:
                    continue
                raise
            except BaseException:
                conn.abort()  # timeout or the client left: closing tells the worker to stop
                raise
            break
        else:
            raise UpstreamError("reset", "worker closed the connection")
        self.conn = conn
        try:
            names = conn.names
            self.oom = is_oom(conn.headers, names)
            self.status = conn.status
            replica = self.replica
            headers, lines = response_headers(conn.headers, call, replica.degraded, names, replica.tag)
            charge = call.charge
            if charge is not None:
                headers, more = charge.add_headers(headers, names)
                lines += more
            first: list[bytes] = []
            buffer_bytes = self.wire.limits.buffer_bytes
            if not conn.complete and call.method != "HEAD" and sized(conn.content_length, buffer_bytes):
                # an answer of a known size (not a stream): hold its head until it is all in, so a worker
                # that dies mid-answer means a retry (or a typed 502 worker_crashed), never a cut body
                first, done = await gather(conn, buffer_bytes)
                if done:
                    pool.put(conn)
                    self.record()
                    data = b"".join(first)
                    if charge is not None:
                        charge.answered(conn.status, header_value(conn.headers, b"content-type"), data)
                    responder.send_now(conn.status, headers, data, lines)
                    return conn.status
            if not conn.complete:
                return await self.relay(request, responder, headers, lines, first)
            status, data, cl = conn.status, conn.take_buffered(), conn.content_length
            pool.put(conn)
        except BaseException:
            if not self.finished:  # (once finished, the connection is back in the pool: not ours)
                conn.abort()  # the client left or time ran out: closing tells the worker to stop
            raise
        self.record()
        if charge is not None:
            charge.answered(status, header_value(conn.headers, b"content-type"), data)
        if call.method == "HEAD":
            await responder.start(status, headers, int(cl) if cl is not None and cl.isdigit() else None, lines)
            await responder.end()
            return status
        responder.send_now(status, headers, data, lines)
        return status

    async def relay(self, request: Request, responder: Responder, headers: list[tuple[bytes, bytes]],
                    lines: bytes, first: list[bytes]) -> int:
        """Stream the answer to the client while reading the worker as fast as it sends (nginx-style
        buffering, memory then disk), so a finished worker answer frees its slot whatever the client's
        speed; SSE still goes out event by event."""
        conn = self.conn
        call = self.call
        tm = self.tm
        cl = conn.content_length
        ctype = header_value(conn.headers, b"content-type")
        sse = (ctype or b"").startswith(b"text/event-stream")
        meter = call.charge.begin(conn.status, ctype) if call.charge is not None else None
        length = int(cl) if cl is not None and cl.isdigit() else None
        await responder.start(conn.status, headers, length, lines)
        lim = self.wire.limits
        spool = ResponseSpool(max(lim.buffer_bytes, STREAM_CHUNK), lim.spool_dir or tempfile.gettempdir(),
                              lim.spool_bytes)
        reader = asyncio.ensure_future(fill(conn, spool, self, first))
        reader.add_done_callback(self._worker_done)
        client_timeout = lim.client_timeout_s
        try:
            async for chunk in spool.chunks():
                if meter is not None:
                    meter.feed(chunk)
                try:
                    await responder.write(chunk, client_timeout)  # (a timer only while the client's buffer is full)
                except TimeoutError:
                    # the client reads nothing: drop it, never hold the worker for it
                    log.warning("client_stalled", request_id=call.rid, client_timeout_s=client_timeout)
                    request.close()
                    raise asyncio.CancelledError from None
                except ConnectionError:
                    raise asyncio.CancelledError from None  # the client left mid-answer
            await reader  # all that came is sent; the worker's failure, if any, is raised here
            self._worker_done(reader)
        except (UpstreamError, TimeoutError, asyncio.CancelledError, SpoolError) as exc:
            expired = tm is not None and tm.expired()
            if not reader.done():
                reader.cancel()
            if isinstance(exc, asyncio.CancelledError) and not expired:
                raise  # the client left: forward closes the worker's connection
            # past the deadline the cancellation is the timeout's: the answer has started, so it
            # cannot become a 504 any more; end it here (the timeout then exits quietly)
            timed_out = not isinstance(exc, UpstreamError | SpoolError)
            if not self.handed_back:
                conn.abort()
            if tm is not None and not expired:
                tm.reschedule(None)  # the deadline must not cut the error event short
            died = False if timed_out or isinstance(exc, SpoolError) else await _died(self.inc, exc)
            why = "timeout" if timed_out else "worker_crashed" if died else "worker_error"
            msg = ("the request ran past its deadline" if timed_out
                   else f"the worker broke off the answer: {getattr(exc, 'detail', exc)}")
            log.warning("stream_broken", request_id=call.rid, reason=why, worker=call.worker_label,
                        worker_pid=self.inc.pid)
            if died:
                self.replica.breaker.release_probe()
            else:
                self.fail()
            if sse and length is None:  # (a body of a set length has no room for the event: cut like any other)
                await responder.write(error_event(why, msg, call.rid))
                await responder.end()
            else:
                request.close()  # no terminating chunk: the client sees a broken body
            return conn.status
        finally:
            spool.close()
        await responder.end()
        return conn.status

    def _worker_done(self, t: asyncio.Future) -> None:
        """The worker's answer is all in: its connection back to the pool and its slot free now,
        whatever the client still has to read. Once, from whichever comes first."""
        if self.handed_back or t.cancelled() or t.exception() is not None:
            return
        self.handed_back = True
        self.inc.pool.put(self.conn)
        self.record()
        self.finish()
        tm = self.tm
        if tm is not None and not tm.expired():
            tm.reschedule(None)  # the deadline is the worker's; the client's pace is bounded separately

    # -- a job -----------------------------------------------------------------------------------------
    async def collect(self, req: JobRequest, max_bytes: int) -> JobResult:
        """One exchange whose whole answer is kept (an SSE answer included), up to `max_bytes`."""
        call = self.call
        pool = self.inc.pool
        head_bytes = head(call, req.target, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
                          b"", b"http")
        conn = None
        try:
            conn, _ = await pool.get()
            self.conn = conn
            await conn.start(head_bytes, call.body, call.method == "HEAD")
            self.status = conn.status
            self.oom = is_oom(conn.headers, conn.names)
            ctype = next((v.decode("latin-1") for k, v in conn.headers if k.lower() == b"content-type"), None)
            chunks, size = [], 0
            while chunk := await conn.read():
                size += len(chunk)
                if size > max_bytes:
                    raise JobFailed("result_too_large", f"the answer is over jobs.max_result_bytes ({max_bytes})")
                chunks.append(chunk)
            pool.put(conn)
            conn = None
            self.record()
            body = b"".join(chunks)
            if call.charge is not None:
                call.charge.answered(self.status, ctype.encode("latin-1") if ctype else None, body)
            return JobResult(status=self.status, content_type=ctype, body=body)
        finally:
            if conn is not None:
                conn.abort()  # cancelled (DELETE /jobs/{id}) or failed: closing tells the worker to stop


_said_out_of_resources_at = float("-inf")


def _out_of_resources(detail: str) -> None:
    """Say so, at most once a minute: under a flood of connections it would be said on every request."""
    global _said_out_of_resources_at
    now = time.monotonic()
    if now - _said_out_of_resources_at >= 60.0:
        _said_out_of_resources_at = now
        log.error("supervisor_out_of_resources", detail=detail,
                  hint="raise LimitNOFILE (systemd) or ulimit -n; process_open_fds / process_max_fds in /metrics")


async def _died(inc: Incarnation, exc: UpstreamError) -> bool:
    """Did the worker die (retry elsewhere) or merely misbehave?"""
    if exc.kind == "protocol":
        return False
    try:
        async with asyncio.timeout(0.5):
            await inc.exited.wait()
    except TimeoutError:
        return False
    return True


def _unanswered(exc: UpstreamError) -> bool:
    """The worker closed the connection before any byte of the answer: the process that held it died
    (a gunicorn worker under its master), or the worker refused the request without a word. Either
    way nothing of it was answered: a retry-safe request may go again on a fresh connection."""
    return exc.kind == "reset" and not exc.started
