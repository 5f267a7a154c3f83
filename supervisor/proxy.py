"""The request path: validate, admit, queue, forward to the worker, stream the answer, account for it.

`Supervisor` holds everything that must outlive a worker (queue, breaker, counters) and answers
every request it accepts exactly once: the worker's answer, or a typed error from errors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import re
import time
from pathlib import Path

import structlog
from aiohttp import web
from multidict import CIMultiDict

from .circuit_breaker import CircuitBreaker
from .config import LoadedConfig, Route, Settings
from .errors import error_event, error_response
from .gpu_watch import GpuWatcher, Nvml, Reading
from .metrics import REJECT_REASONS, Metrics
from .pressure import Level, fallback_due, leak_due, sheds
from .request_queue import GRANTED, QueueFull, RequestQueue, Ticket
from .states import SERVING_STATES, BreakerState, ExitReason, WorkerState
from .upstream import UpstreamConnection, UpstreamError
from .worker_process import ExitInfo, Incarnation, WorkerManager

log = structlog.get_logger("supervisor.proxy")
access_log = structlog.get_logger("supervisor.access")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"proxy-connection", b"x-request-id",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
})
RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "proxy-connection", "date",
})
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
STREAM_CHUNK = 1 << 16
CLIENT_CLOSED = 499  # requests_total code for a client that left before its answer was complete


class Rejected(Exception):
    """A request the supervisor answers itself."""

    def __init__(self, etype: str, message: str, retry_after_s: float | None = None):
        self.etype = etype
        self.message = message
        self.retry_after_s = retry_after_s


class Supervisor:
    def __init__(self, loaded: LoadedConfig, runtime_dir: Path, base_env: dict[str, str],
                 nvml_factory=Nvml):
        self.loaded = loaded
        self.settings: Settings = loaded.settings
        self.config_generation = 1
        self.config_loaded_at = time.time()
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.queue = RequestQueue(self.settings.queue)
        self.breaker = CircuitBreaker(self.settings.breaker, on_change=self._breaker_changed)
        self.worker = WorkerManager(self.settings, runtime_dir, base_env, on_change=self._worker_changed,
                                    on_exit=self._worker_exited, on_down=self._update_open)
        self.accepting = True
        self.paused = False  # memory pressure holds dispatch
        self.shed_below: int | None = None  # levels with a larger index get 503 overloaded
        self.pressure_level = 0
        self.gpu_status: dict = {"available": False, "pressure": "ok", "devices": []}
        self.worker_readings = {"rss_bytes": 0, "gpu_memory_bytes": 0}
        self._keys = itertools.count()
        self._rid_prefix = os.urandom(11).hex()
        self._rid_seq = itertools.count()
        self.active = 0  # requests inside handle(), queued or running
        self.abandoned = False  # shutdown stopped waiting: nothing more goes to the worker
        self._idle = asyncio.Event()
        self._idle.set()
        self._derive()
        self.metrics.attach_state(self._metrics_state)
        self._nvml_factory = nvml_factory
        self.queue.fits = self._gpu_fits
        self.watcher = self._make_watcher()
        self._tasks: set[asyncio.Task] = set()
        self._watch_task: asyncio.Task | None = None
        self._pressure_streak = 0  # pressure restarts in a row with no relief in between
        self._last_pressure_restart = -1e9

    # -- background work owned here: the memory watcher and one-shot worker calls ---------------
    def _make_watcher(self) -> GpuWatcher:
        s = self.settings
        return GpuWatcher(s.gpu, s.host.thresholds, self._worker_pid, self._nvml_factory,
                          worker_env=self.worker.worker_env(), priorities=s.queue.priorities,
                          on_reading=self._on_reading)

    def start(self) -> None:
        self._watch_task = asyncio.create_task(self.watcher.run(), name="gpu-watch")

    async def aclose(self) -> None:
        tasks = [t for t in (self._watch_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    def _spawn_task(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _worker_pid(self) -> int | None:
        inc = self.worker.current
        return inc.pid if inc is not None and inc.pid and not inc.exited.is_set() else None

    def _gpu_fits(self, mb: int) -> bool:
        """Is there `mb` MiB free on every GPU the worker sees, after what running requests reserved?"""
        r = self.watcher.reading
        if r is None or not r.devices or not self.watcher.available:
            return True  # no GPU figures: nothing to wait for
        free = min(d.memory_total_bytes - d.memory_used_bytes for d in r.devices)
        return free - self.queue.reserved_mb * 1048576 >= mb * 1048576

    def _on_reading(self, r: Reading) -> None:
        d = self.watcher.decision
        self.gpu_status = self.watcher.status()
        self.worker_readings = {"rss_bytes": r.worker_rss_bytes or 0,
                                "gpu_memory_bytes": r.worker_gpu_memory_bytes or 0}
        level = int(d.level)
        if level != self.pressure_level:
            log.warning("pressure_level", old=Level(self.pressure_level).label, new=Level(level).label,
                        shed_below=d.shed_below, pause=d.pause,
                        gpu=[round(x.ratio, 4) for x in r.devices if x.ratio is not None],
                        host=round(r.host_ratio, 4) if r.host_ratio is not None else None)
            self.pressure_level = level
        self.shed_below = d.shed_below_index
        self.queue.pools["default"].cap = d.concurrency_cap
        if d.pause != self.paused:
            self.paused = d.pause
            self.metrics.pressure_actions.labels("pause" if d.pause else "resume").inc()
        if d.cleanup:
            self.metrics.pressure_actions.labels("cleanup").inc()
            self._spawn_task(self._call_cleanup())
        serving = self.worker.state in SERVING_STATES
        if level < 3:
            self._pressure_streak = 0
        if d.restart and serving:
            now = time.monotonic()
            # a restart that did not relieve the pressure (another process holds the memory) is not
            # repeated at once: each one in a row waits twice as long as the last
            base = max(1.0, self.settings.gpu.actions.critical.restart_after_s or 0)
            wait = base * 2 ** min(self._pressure_streak, 6)
            if now - self._last_pressure_restart >= wait or self._pressure_streak == 0:
                self._pressure_streak += 1
                self._last_pressure_restart = now
                self.metrics.pressure_actions.labels("restart").inc()
                log.warning("pressure_restart", level=Level(level).label, in_a_row=self._pressure_streak)
                self.worker.request_restart(ExitReason.PRESSURE)
        elif serving and not r.stale:
            leak = leak_due(r.worker_rss_bytes, r.worker_gpu_memory_bytes, self.settings.worker.recycle)
            if leak is not None:
                log.warning("worker_recycle", why=leak, rss_bytes=r.worker_rss_bytes,
                            gpu_memory_bytes=r.worker_gpu_memory_bytes)
                self.worker.request_restart(ExitReason.RECYCLE)
        self._update_open()

    async def _call_cleanup(self) -> None:
        """POST /cleanup on the worker's own connection; a worker without one answers 404: fine."""
        inc = self.worker.current
        if inc is None or inc.exited.is_set():
            return
        head = b"POST /cleanup HTTP/1.1\r\nHost: worker\r\nContent-Length: 0\r\n\r\n"
        conn = None
        try:
            async with asyncio.timeout(self.settings.worker.health.timeout_s * 5):
                conn = await inc.pool.connect()
                await conn.start(head, None, False)
                while await conn.read():
                    pass
            log.info("worker_cleanup", status=conn.status, worker_pid=inc.pid)
        except (TimeoutError, UpstreamError) as exc:
            log.warning("worker_cleanup_failed", error=str(exc), worker_pid=inc.pid)
        finally:
            if conn is not None:
                conn.abort()

    # -- settings ------------------------------------------------------------------------------
    def _derive(self) -> None:
        s = self.settings
        self._prio_header = s.queue.priority_header
        self._timeout_header = s.queue.timeout_header
        self._retry_methods = frozenset(s.retry.methods)
        self._level_names = s.queue.priorities
        self._level_index = {n: i for i, n in enumerate(self._level_names)}
        self._default_level = self._level_index[s.queue.default_priority]
        self._level_timeouts = [s.queue.level_timeout(n) for n in self._level_names]
        self._allowed_levels = ", ".join(self._level_names)

    def apply(self, loaded: LoadedConfig) -> None:
        """Take a new, valid configuration at once; a changed worker section replaces the worker."""
        self.loaded = loaded
        self.config_generation += 1
        self.config_loaded_at = time.time()
        old = self.settings
        self.settings = loaded.settings
        self._derive()
        self.queue.configure(self.settings.queue)
        self.breaker.reconfigure(self.settings.breaker)
        if self.worker.degraded:
            log.info("fallback_cleared", reason="operator reload")
            self.worker.degraded = None
            self.worker.env_override = {}
            self.worker.oom_restarts = 0
            self.worker.request_restart(ExitReason.RELOAD)
        self.worker.reconfigure(self.settings)
        if (old.gpu, old.host, old.queue.priorities) != (self.settings.gpu, self.settings.host,
                                                          self.settings.queue.priorities):
            if self._watch_task is not None:
                self._watch_task.cancel()
                self._spawn_task(_await_quietly(self._watch_task))
            self.watcher = self._make_watcher()
            if self._watch_task is not None:
                self.start()
        self.watcher.set_worker_env(self.worker.worker_env())
        self._update_open()

    # -- callbacks from the breaker and the worker manager --------------------------------------
    def _breaker_changed(self, old: BreakerState, new: BreakerState, reason: str) -> None:
        log.info("breaker_state", old=old.value, new=new.value, reason=reason)
        self.metrics.breaker_transitions.labels(new.value).inc()

    def _worker_changed(self, old: WorkerState, new: WorkerState, reason: str) -> None:
        if new is WorkerState.READY and old is WorkerState.STARTING:
            if self.worker.last_start_s is not None:
                self.metrics.worker_start.observe(self.worker.last_start_s)
            self.breaker.release_forced("worker ready")
        elif new is WorkerState.FAILED:
            self.breaker.force_open("worker crash loop")
        self._update_open()

    def _worker_exited(self, info: ExitInfo) -> None:
        self.metrics.worker_restarts.labels(info.reason.value).inc()
        fb = self.settings.fallback
        if (info.reason is ExitReason.OOM and not self.worker.degraded
                and fallback_due(self.worker.oom_restarts, fb.cpu_after_oom_restarts)):
            self.worker.env_override = dict(fb.env)
            self.worker.degraded = "cpu-fallback"
            self.watcher.set_worker_env(self.worker.worker_env())
            self.metrics.pressure_actions.labels("cpu_fallback").inc()
            log.warning("fallback_engaged", mode="cpu-fallback", oom_restarts=self.worker.oom_restarts,
                        env=fb.env)

    def _update_open(self) -> None:
        inc = self.worker.current
        self.queue.open = (self.worker.state in SERVING_STATES and inc is not None and not inc.exited.is_set()
                           and not self.paused and not self.worker.replacing)
        if self.queue.open:
            self.queue.pump()

    # -- readiness -----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        why = []
        if not self.accepting:
            why.append("draining: shutting down")
        if self.worker.state not in SERVING_STATES:
            why.append(f"worker {self.worker.state.value}")
        if self.breaker.state in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
            why.append(f"breaker {self.breaker.state.value}")
        return not why, why

    # -- the request path ----------------------------------------------------------------------
    def _new_request_id(self) -> str:
        # unique per process start (random prefix) and cheap: no syscall per request
        return f"{self._rid_prefix}{next(self._rid_seq):010x}"

    async def wait_idle(self, timeout: float, give_up: asyncio.Event) -> bool:
        """Wait until no request is queued or running (drain); False if time ran out first."""
        waiters = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(give_up.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return self.active == 0

    def drain_deadline_now(self) -> None:
        """Shutdown stops waiting (drain timeout, second signal): queued requests get 503 at once and
        none is sent (or retried) to the worker again; what runs ends with the worker's stop."""
        if self.abandoned:
            return
        self.abandoned = True
        log.warning("drain_abandoned", left=self.active, queued=self.queue.total)
        self.queue.fail_waiting(self._shutting_down)

    def _shutting_down(self) -> Rejected:
        return Rejected("shutting_down", "the supervisor is shutting down", self.settings.drain.timeout_s)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.active += 1
        self._idle.clear()
        try:
            return await self._handle(request)
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.monotonic()
        rid = request.headers.get("X-Request-ID")
        level = self._default_level
        attempts = 0
        try:
            if rid is None:
                rid = self._new_request_id()
            elif not REQUEST_ID_RE.match(rid):
                rid = self._new_request_id()
                raise Rejected("bad_request", "X-Request-ID: must be 1-200 visible ASCII characters")
            route = self.settings.route_for(request.method, request.path) if self.settings.routes else None
            level = self._parse_priority(request, route)
            queue_limit, deadline = self._parse_deadline(request, route, level, t0)
            resp, attempts = await self._admit_and_forward(request, route, level, queue_limit, deadline, t0, rid)
        except Rejected as r:
            resp = self._reject(r, rid)
        except asyncio.CancelledError:
            # the client went away (queued, running or mid-stream): counted as nginx does, 499
            self.metrics.observe_request(self._level_names[level], CLIENT_CLOSED, time.monotonic() - t0)
            raise
        code = resp.status
        self.metrics.observe_request(self._level_names[level], code, time.monotonic() - t0)
        if self.settings.logging.access:
            access_log.info("request", request_id=rid, method=request.method, path=request.path, status=code,
                            priority=self._level_names[level], attempts=attempts,
                            duration_ms=round((time.monotonic() - t0) * 1000, 3))
        return resp

    def _reject(self, r: Rejected, rid: str | None) -> web.Response:
        if r.etype in REJECT_REASONS:
            self.metrics.rejected.labels(r.etype).inc()
        return error_response(r.etype, r.message, rid, r.retry_after_s, self._degraded_header())

    def _degraded_header(self) -> dict[str, str] | None:
        d = self.worker.degraded
        return {"X-Degraded": d} if d else None

    def _parse_priority(self, request: web.BaseRequest, route: Route | None) -> int:
        raw = request.headers.get(self._prio_header)
        if raw is None:
            if route is not None and route.priority is not None:
                return self._level_index[route.priority]
            return self._default_level
        v = raw.strip()
        idx = self._level_index.get(v)
        if idx is None and v.isdigit() and int(v) < len(self._level_names):
            idx = int(v)
        if idx is None:
            raise Rejected("bad_request", f"{self._prio_header}: {raw[:64]!r} is not a priority; use one of "
                           f"{self._allowed_levels} or an index 0..{len(self._level_names) - 1} (0 is highest)")
        return idx

    def _parse_deadline(self, request, route, level, t0) -> tuple[float, float | None]:
        queue_limit = self._level_timeouts[level]
        total = route.timeout_s if route is not None else None
        raw = request.headers.get(self._timeout_header)
        if raw is not None:
            try:
                t = float(raw)
            except ValueError:
                t = math.nan
            if not (t > 0) or not math.isfinite(t):
                raise Rejected("bad_request", f"{self._timeout_header}: {raw[:64]!r} is not a number of seconds; "
                               "use a positive number such as 2.5 (it can only shorten the policy's deadline)")
            queue_limit = min(queue_limit, t)
            total = t if total is None else min(total, t)
        return queue_limit, (t0 + total if total is not None else None)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Rejected("payload_too_large", f"request body over limits.max_body_bytes "
                           f"({self.settings.limits.max_body_bytes} bytes)") from None

    async def _admit_and_forward(self, request, route, level, queue_limit, deadline, t0, rid):
        s = self.settings
        max_body = s.limits.max_body_bytes
        cl = request.content_length
        if cl is not None and cl > max_body:
            raise Rejected("payload_too_large", f"Content-Length {cl} is over limits.max_body_bytes ({max_body})")
        self._admission(level, route, t0)
        if route is not None and route.retry is not None:
            retry_ok = route.retry
        else:
            retry_ok = request.method in self._retry_methods
        body: bytes | None = None
        if not request.body_exists:
            body = b""
        elif cl is not None and cl <= s.retry.max_body_bytes:
            body = await self._read_body(request)
        else:
            retry_ok = False  # streamed through: it cannot be sent twice
        max_attempts = s.retry.max_attempts if retry_ok else 1
        pool = route.pool if route is not None else "default"
        gpu_mb = route.gpu_memory_mb if route is not None else 0
        attempt = 0
        queued_s = 0.0
        requeued = False
        while True:
            if self.abandoned:
                raise self._shutting_down()
            attempt += 1
            ticket, waited = await self._wait_slot(level, pool, gpu_mb, queue_limit, deadline,
                                                   attempt > 1 or requeued)
            queued_s += waited
            inc = self.worker.current
            try:
                now = time.monotonic()
                if not self.breaker.allow(now):
                    raise Rejected("circuit_open", "the worker keeps failing; the circuit breaker is open",
                                   self.breaker.retry_after(now) or 1.0)
                if inc is None or inc.exited.is_set() or self.worker.state not in SERVING_STATES:
                    # granted, then the worker died or began to drain (reload, recycle) before this
                    # task ran: nothing reached it; back to the front, to wait for the next worker
                    self.breaker.release_probe()
                    attempt -= 1
                    requeued = True
                    continue
                resp = await self._exchange(request, inc, body, deadline, rid, queued_s, attempt, ticket)
                return resp, attempt
            except _WorkerDied as died:
                if self.abandoned:
                    raise self._shutting_down() from None
                if attempt < max_attempts and (deadline is None or deadline > time.monotonic()):
                    self.metrics.retries.labels(died.reason).inc()
                    log.info("request_retry", request_id=rid, attempt=attempt + 1, reason=died.reason,
                             worker_pid=inc.pid if inc else None)
                    continue
                raise Rejected("worker_crashed", f"the worker died while serving this request ({died.reason}); "
                               "it was not retried" + ("" if retry_ok else " because it is not safe to repeat"),
                               self.worker.expected_ready_in()) from None
            finally:
                self.queue.release(ticket, None)

    def _admission(self, level: int, route: Route | None, now: float) -> None:
        if not self.accepting:
            raise Rejected("shutting_down", "the supervisor is shutting down", self.settings.drain.timeout_s)
        if not self.breaker.would_allow(now):
            raise Rejected("circuit_open", "the worker keeps failing; the circuit breaker is open",
                           self.breaker.retry_after(now))
        if sheds(level, self.shed_below):
            raise Rejected("overloaded", f"memory pressure ({Level(self.pressure_level).label}): priority "
                           f"{self._level_names[level]} is shed for now", self._pressure_retry_after())
        try:
            self.queue.check_room(level)
        except QueueFull as full:
            raise self._queue_full(full, level, route.pool if route is not None else "default") from None

    def _queue_full(self, full: QueueFull, level: int, pool: str) -> Rejected:
        what = f"priority {self._level_names[level]} queue is full" if full.scope == "level" else "the queue is full"
        return Rejected("queue_full", what, self.queue.estimate_wait(level, pool))

    def _pressure_retry_after(self) -> float:
        return max(1.0, self.settings.gpu.poll_interval_s * 2)

    async def _wait_slot(self, level, pool, gpu_mb, queue_limit, deadline, front) -> tuple[Ticket, float]:
        now = time.monotonic()
        try:
            ticket = self.queue.acquire(level, pool, now, gpu_mb, front)
        except QueueFull as full:
            raise self._queue_full(full, level, pool) from None
        if ticket.state == GRANTED:
            self.metrics.observe_wait(self._level_names[level], 0.0)
            return ticket, 0.0
        limit = queue_limit if deadline is None else min(queue_limit, deadline - now)
        try:
            async with asyncio.timeout(max(0.0, limit)):
                await ticket.future
        except TimeoutError:
            self.queue.cancel(ticket)
            waited = time.monotonic() - now
            self.metrics.observe_wait(self._level_names[level], waited)
            if self.worker.state not in SERVING_STATES:
                raise Rejected("worker_unavailable", f"the worker is {self.worker.state.value} and did not come "
                               f"back within this request's wait limit ({limit:.3g}s)",
                               self.worker.expected_ready_in()) from None
            if self.paused:
                raise Rejected("overloaded", "memory pressure has paused dispatch",
                               self._pressure_retry_after()) from None
            raise Rejected("queue_timeout", f"waited {waited:.3g}s in the queue, the limit for priority "
                           f"{self._level_names[level]}", self.queue.estimate_wait(level, pool)) from None
        except BaseException:
            self.queue.cancel(ticket)  # the client left while queued: the worker never sees it
            raise
        waited = time.monotonic() - now
        self.metrics.observe_wait(self._level_names[level], waited)
        return ticket, waited

    async def _exchange(self, request, inc: Incarnation, body, deadline, rid, queued_s, attempt, ticket):
        key = next(self._keys)
        self.worker.begin_request(inc, key)
        t_start = time.monotonic()
        oom = False
        try:
            if deadline is None:  # the common case: no timer on the hot path
                resp, oom = await self._forward(request, inc, body, rid, queued_s, attempt, t_start, None)
            else:
                async with asyncio.timeout(max(0.0, deadline - t_start)) as tm:
                    resp, oom = await self._forward(request, inc, body, rid, queued_s, attempt, t_start, tm)
            return resp
        except TimeoutError:
            self.breaker.record(False, time.monotonic() - t_start, time.monotonic(), t_start)
            raise Rejected("timeout", "the request ran past its deadline (route timeout_s or "
                           f"{self._timeout_header})") from None
        except UpstreamError as exc:
            reason = await self._classify_failure(inc, exc)
            if reason is not None:
                self.breaker.release_probe()
                raise _WorkerDied(reason) from None
            self.breaker.record(False, time.monotonic() - t_start, time.monotonic(), t_start)
            raise Rejected("worker_error", f"the worker gave no valid answer: {exc.detail}") from None
        except BaseException:
            self.breaker.release_probe()  # the client left, or a rejection: no outcome to count
            raise
        finally:
            self.worker.end_request(inc, key, oom)
            self.queue.release(ticket, time.monotonic() - t_start)

    async def _forward(self, request, inc, body, rid, queued_s, attempt, t_start, tm):
        """Send, then answer: whole (buffered) or streamed. Records the breaker outcome when it returns."""
        conn = await self._send(request, inc, body, rid)
        try:
            oom = _is_oom(conn.headers)
            outcome_ok = conn.status < 500 and not oom
            headers = self._response_headers(conn.headers, rid, queued_s, attempt)
            if not conn.complete:
                return await self._stream(request, conn, inc, headers, rid, tm, t_start, outcome_ok), oom
            status, data, raw = conn.status, conn.take_buffered(), conn.headers
            inc.pool.put(conn)
        except BaseException:
            conn.abort()  # the client left or time ran out: closing tells the worker to stop
            raise
        now = time.monotonic()
        self.breaker.record(outcome_ok, now - t_start, now, t_start)
        if request.method == "HEAD":
            for k, v in raw:
                if k.lower() == b"content-length":
                    headers["Content-Length"] = v.decode("latin-1")
            return web.Response(status=status, headers=headers), oom
        return web.Response(status=status, body=data, headers=headers), oom

    async def _classify_failure(self, inc: Incarnation, exc: UpstreamError) -> str | None:
        """Did the worker die (retry elsewhere) or merely misbehave? None means it is alive."""
        if exc.kind == "protocol":
            return None
        try:
            async with asyncio.timeout(0.5):
                await inc.exited.wait()
        except TimeoutError:
            return None
        return "worker_crashed"

    async def _send(self, request, inc: Incarnation, body: bytes | None, rid: str) -> UpstreamConnection:
        head = self._request_head(request, rid, body)
        for _ in range(2):
            conn, reused = await inc.pool.get()
            try:
                fut = conn.start(head, body, request.method == "HEAD")
                if body is None:
                    await self._stream_body(request, conn)
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
            return conn
        raise UpstreamError("reset", "worker closed the connection")

    async def _stream_body(self, request, conn: UpstreamConnection) -> None:
        limit = self.settings.limits.max_body_bytes
        sent = 0
        async for chunk in request.content.iter_chunked(STREAM_CHUNK):
            sent += len(chunk)
            if sent > limit:
                conn.abort()
                raise Rejected("payload_too_large", f"request body over limits.max_body_bytes ({limit} bytes)")
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await conn.drain()
        conn.write(b"0\r\n\r\n")

    def _request_head(self, request, rid: str, body: bytes | None) -> bytes:
        parts = [request.method.encode(), b" ", request.raw_path.encode("utf-8", "surrogateescape"),
                 b" HTTP/1.1\r\n"]
        conn_tokens = ()
        raw = request.raw_headers
        xff = None
        host = None
        for k, v in raw:
            lk = k.lower()
            if lk == b"connection":
                conn_tokens = tuple(t.strip().lower() for t in v.split(b","))
            elif lk == b"x-forwarded-for":
                xff = v
            elif lk == b"host":
                host = v
        for k, v in raw:
            lk = k.lower()
            if lk in HOP_BY_HOP or (conn_tokens and lk in conn_tokens):
                continue
            parts += (k, b": ", v, b"\r\n")
        peer = (request.remote or "").encode()
        parts += (b"X-Forwarded-For: ", xff + b", " + peer if xff else peer, b"\r\n",
                  b"X-Forwarded-Proto: ", request.scheme.encode(), b"\r\n",
                  b"X-Request-ID: ", rid.encode(), b"\r\n")
        if host is not None:
            parts += (b"X-Forwarded-Host: ", host, b"\r\n")
        if body is None:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif body or request.method in ("POST", "PUT", "PATCH"):
            parts += (b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def _response_headers(self, raw: list[tuple[bytes, bytes]], rid, queued_s, attempt) -> CIMultiDict:
        h: CIMultiDict = CIMultiDict()
        for k, v in raw:
            name = k.decode("latin-1")
            if name.lower() in RESPONSE_DROP:
                continue
            h.add(name, v.decode("latin-1"))
        h["X-Request-ID"] = rid
        h["X-Supervisor-Queue-Ms"] = f"{queued_s * 1000:.3f}"
        h["X-Supervisor-Attempts"] = str(attempt)
        if self.worker.degraded:
            h["X-Degraded"] = self.worker.degraded
        return h

    async def _stream(self, request, conn, inc, headers, rid, tm, t_start, outcome_ok):
        resp = web.StreamResponse(status=conn.status, headers=headers)
        for k, v in conn.headers:
            if k.lower() == b"content-length":
                resp.content_length = int(v)
        sse = headers.get("Content-Type", "").startswith("text/event-stream")
        await resp.prepare(request)
        try:
            while True:
                chunk = await conn.read()
                if not chunk:
                    break
                await resp.write(chunk)
        except (UpstreamError, TimeoutError, asyncio.CancelledError) as exc:
            expired = tm is not None and tm.expired()
            if isinstance(exc, asyncio.CancelledError) and not expired:
                raise  # the client left: _forward closes the worker's connection
            # past the deadline the cancellation is the timeout's: the answer has started, so it
            # cannot become a 504 any more; end it here (the timeout then exits quietly)
            timed_out = not isinstance(exc, UpstreamError)
            conn.abort()
            if tm is not None and not expired:
                tm.reschedule(None)  # the deadline must not cut the error event short
            died = None if timed_out else await self._classify_failure(inc, exc)
            why = "timeout" if timed_out else "worker_crashed" if died is not None else "worker_error"
            msg = ("the request ran past its deadline" if timed_out
                   else f"the worker broke off the answer: {getattr(exc, 'detail', exc)}")
            log.warning("stream_broken", request_id=rid, reason=why, worker_pid=inc.pid)
            if died is not None:
                self.breaker.release_probe()  # a worker death belongs to the lifecycle, not the breaker
            else:
                self.breaker.record(False, time.monotonic() - t_start, time.monotonic(), t_start)
            if sse:
                await resp.write(error_event(why, msg, rid))
                await resp.write_eof()
            else:
                request.transport.close()  # no terminating chunk: the client sees a broken body
            return resp
        inc.pool.put(conn)
        self.breaker.record(outcome_ok, time.monotonic() - t_start, time.monotonic(), t_start)
        await resp.write_eof()
        return resp

    # -- status and metrics --------------------------------------------------------------------
    def status(self) -> dict:
        from . import __version__
        ready, why = self.readiness()
        now = time.monotonic()
        q = self.queue
        return {
            "version": __version__,
            "uptime_s": round(now - self.started, 3),
            "ready": ready,
            "not_ready_because": why,
            "accepting": self.accepting,
            "config": {"source": self.loaded.source, "digest": self.loaded.digest,
                       "generation": self.config_generation,
                       "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.config_loaded_at))},
            "worker": self.worker.status() | {"rss_bytes": self.worker_readings["rss_bytes"],
                                              "gpu_memory_bytes": self.worker_readings["gpu_memory_bytes"]},
            "queue": {
                "depth": q.depth_by_name(),
                "total": q.total,
                "inflight": q.inflight(),
                "concurrency": q.pools["default"].slots,
                "pools": {n: {"concurrency": p.slots, "inflight": p.in_use, "waiting": p.waiting}
                          for n, p in q.pools.items()},
                "dispatching": q.open,
            },
            "breaker": {
                "state": self.breaker.state.value,
                "failure_rate": round(self.breaker.failure_rate, 4),
                "slow_call_rate": round(self.breaker.slow_rate, 4),
                "retry_after_s": round(self.breaker.retry_after(now), 3),
            },
            "gpu": self.gpu_status,
        }

    def _metrics_state(self) -> dict:
        return {
            "queue_depth": self.queue.depth_by_name(),
            "inflight": self.queue.inflight(),
            "worker_up": 1 if self.worker.state in SERVING_STATES else 0,
            "worker_state": self.worker.state.value,
            "worker_rss_bytes": self.worker_readings["rss_bytes"],
            "worker_gpu_memory_bytes": self.worker_readings["gpu_memory_bytes"],
            "breaker_state": self.breaker.state.value,
            "gpus": self.gpu_status.get("devices", []),
            "pressure_level": self.pressure_level,
            "degraded": 1 if self.worker.degraded else 0,
            "config_generation": self.config_generation,
        }


class _WorkerDied(Exception):
    def __init__(self, reason: str):
        self.reason = reason




async def _await_quietly(t: asyncio.Task) -> None:
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await t


def _is_oom(raw: list[tuple[bytes, bytes]]) -> bool:
    for k, v in raw:
        if k.lower() == b"x-worker-error" and v.strip().lower() == b"oom":
            return True
    return False


__all__ = ["Supervisor", "Rejected", "ExitReason"]
