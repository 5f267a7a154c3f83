"""The daemon's life: listeners, the supervisor's own endpoints, signals, reload, drain, sd_notify.

Signal handlers only set events or queue work; `serve()` owns every background task and cancels and
awaits them in reverse order on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import os
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import config as cfg
from . import leftovers, logs, ui
from .app import Supervisor
from .budgets import usage_api
from .budgets.usage import UsageLog, UsageUnavailable
from .errors import error_response
from .fairness import client_key
from .fleet.process import MAX_SOCKET_PATH
from .gpu_watch import Nvml, count_devices
from .guard import Guard
from .http.framing import send_web
from .http.server import HttpServer
from .http.wire import Request, Responder, ServerLimits
from .jobs.api import Caller, JobsApi
from .jobs.settings import resolve_state_dir
from .jobs.store import StoreCorrupt
from .sd_notify import Notifier
from .states import SERVING_STATES

log = structlog.get_logger("supervisor.daemon")

ADMIN_PATHS = ("/healthz", "/readyz", "/status", "/metrics", "/usage") + ui.PATHS
# On the way out, after the drain (or its abandonment) every held request has its answer; this is
# only for writing those answers to slow clients before their connections are cut.
HANDLER_GRACE_S = 2.0
# A body's size is the request path's to refuse (413 with the request id and the limit's name); the
# daemon's own endpoints read no body
MAX_BODY_UNCHECKED = 1 << 62


@dataclass
class Environment:
    """What the daemon takes from its process environment (read once, in cli)."""

    base_env: dict[str, str]
    notify_socket: str | None = None
    watchdog_usec: str | None = None
    watchdog_pid: str | None = None
    runtime_directory: str | None = None
    state_directory: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def prepare_runtime_dir(configured: str | None, from_systemd: str | None) -> tuple[Path, bool]:
    """A private (0700) directory for the worker's socket; the bool says whether we made it."""
    base = configured or (from_systemd.split(":")[0] if from_systemd else None)
    if base:
        p = Path(base)
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(p, 0o700)
        return p, False
    return Path(tempfile.mkdtemp(prefix="gpu-supervisor-")), True


class Daemon:
    def __init__(self, loaded: cfg.LoadedConfig, env: Environment, nvml_factory=None,
                 install_signals: bool = True):
        self.loaded = loaded
        self.nvml_factory = nvml_factory
        self.install_signals = install_signals
        self.env = env
        self.notifier = Notifier(env.notify_socket, env.watchdog_usec, env.watchdog_pid, os.getpid())
        self.stop = asyncio.Event()
        self.force_stop = asyncio.Event()
        self.reload_wanted = asyncio.Event()
        self.sup: Supervisor | None = None
        self.failed = False
        self.bound: list[tuple[str, int]] = []
        self._token: bytes | None = None
        self.samples = ui.SampleRing()  # what /ui charts: bounded, filled by the ui-sampler task
        self.usage: UsageLog | None = None  # every answered request's usage, with `clients` configured

    # -- endpoints -----------------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        got = request.headers.get("Authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), self._token)

    def _jobs_caller(self, request: Request) -> Caller:
        """Who asks /jobs: the admin token (when one is configured) and the client key, read as the
        request path reads it for fairness (the current settings: a reload applies at once)."""
        assert self.sup is not None
        fairness = self.sup.settings.queue.fairness
        return Caller(admin=self._token is not None and self._authorized(request),
                      key=client_key(fairness, request.headers, request.remote),
                      token_required=self._token is not None)

    async def admin(self, request: Request) -> web.StreamResponse:
        resp = await self._usage(request) if request.path == "/usage" else self._admin(request)
        degraded = self.sup.degraded() if self.sup else None
        if degraded:
            resp.headers["X-Degraded"] = degraded  # every answer says so, the daemon's own included
        return resp

    def _admin(self, request: Request) -> web.StreamResponse:
        sup = self.sup
        assert sup is not None
        path = request.path
        if request.method not in ("GET", "HEAD"):
            return error_response("bad_request", f"{path} answers GET only", None)
        if path == "/healthz":
            return web.json_response({"status": "ok"})
        if path == "/readyz":
            ready, why = sup.readiness()
            return web.json_response({"ready": ready, "because": why}, status=200 if ready else 503)
        if path in ui.PATHS:
            return ui.respond(request, self._authorized(request), self._token, self.samples)
        if not self._authorized(request):
            return error_response("unauthorized", f"{path} needs Authorization: Bearer <admin.token_file token>",
                                  None, headers={"WWW-Authenticate": "Bearer"})
        if path == "/status":
            return web.Response(body=json.dumps(sup.status(), indent=1).encode(), content_type="application/json")
        return web.Response(body=generate_latest(sup.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _usage(self, request: Request) -> web.StreamResponse:
        if not self._authorized(request):
            return error_response("unauthorized", "/usage needs Authorization: Bearer <admin.token_file token>",
                                  None, headers={"WWW-Authenticate": "Bearer"})
        assert self.sup is not None
        return await usage_api.respond(request, self.usage, self.sup.settings.queue.fairness)

    def _load_token(self) -> None:
        tf = self.loaded.settings.admin.token_file
        if tf is None:
            self._token = None
            return
        token = Path(tf).read_text().strip()
        if not token:
            raise ValueError(f"admin.token_file {tf} is empty")
        self._token = token.encode()

    # -- life ----------------------------------------------------------------------------------
    async def serve(self) -> int:
        s = self.loaded.settings
        try:
            runtime_dir, made = prepare_runtime_dir(s.runtime_dir, self.env.runtime_directory)
        except OSError as exc:
            log.error("runtime_dir_unusable", path=s.runtime_dir or self.env.runtime_directory,
                      error=exc.strerror or str(exc))
            return 1
        longest = max((f"{name}-{len(spec.placements(64))}-999999999.sock" for name, spec in s.fleet.items()), key=len)
        probe = runtime_dir / longest
        if len(str(probe).encode()) > MAX_SOCKET_PATH:
            log.error("runtime_dir_too_long", path=str(runtime_dir), limit_bytes=MAX_SOCKET_PATH,
                      hint="a Unix socket path is limited to 107 bytes: choose a shorter runtime_dir")
            if made:
                runtime_dir.rmdir()
            return 1
        try:
            self._load_token()
        except (OSError, ValueError) as exc:
            log.error("admin_token_unreadable", path=s.admin.token_file, error=str(exc))
            return 1
        kw = {"nvml_factory": self.nvml_factory} if self.nvml_factory is not None else {}
        gpus_seen = None
        if s.gpu.enabled is not False and any(w.gpus is not None for w in s.fleet.values()):
            gpus_seen = await asyncio.to_thread(count_devices, self.nvml_factory or Nvml)  # `auto`, and a check
        sup = self.sup = Supervisor(self.loaded, runtime_dir, self.env.base_env, gpus_seen=gpus_seen, **kw)
        split_admin = s.admin.listen is not None
        state_env = {"STATE_DIRECTORY": self.env.state_directory} if self.env.state_directory else {}
        try:
            await sup.open_jobs(state_env, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        except (StoreCorrupt, OSError) as exc:
            log.error("jobs_store_unusable", error=str(exc),
                      hint="move the file aside (jobs are lost) or set jobs.store to another path")
            return 1
        try:
            self.usage = sup.path.budgets.sink = await usage_api.open_usage(
                s.clients, resolve_state_dir(s.state_dir, state_env))
        except UsageUnavailable as exc:
            log.error("usage_store_unusable", error=str(exc), hint="move the file aside or set clients.store")
            return 1
        jobs_api = JobsApi(sup.jobs, self._jobs_caller)
        pids_path = leftovers.pid_file(resolve_state_dir(s.state_dir, state_env), self.loaded.source)
        # what a killed predecessor on this config left is stopped (and gone) before our workers start
        await asyncio.to_thread(leftovers.reap, pids_path, os.getpid())
        guard = Guard(pids_path, s.logging.format, s.logging.level)

        async def own_answer(request: Request, responder: Responder) -> None:
            if request.path in ADMIN_PATHS:
                await send_web(responder, await self.admin(request))
            else:
                await send_web(responder, await jobs_api.dispatch(request))

        request_path = sup.path

        def main_handler(request: Request, responder: Responder) -> Awaitable[int | None]:
            # not a coroutine itself: the request path's coroutine is the task's, with no frame above it
            path = request.path
            if (not split_admin and path in ADMIN_PATHS) or path == "/jobs" or path.startswith("/jobs/"):
                return own_answer(request, responder)
            return request_path.handle(request, responder)

        async def admin_handler(request: Request, responder: Responder) -> None:
            if request.path in ADMIN_PATHS:
                await send_web(responder, await self.admin(request))
                return
            await send_web(responder, error_response("bad_request", f"no such admin endpoint {request.path}; "
                                                     f"use one of {', '.join(ADMIN_PATHS)}", None))

        # the header limits are ours since the front end left aiohttp: the same line and field limits
        limits = ServerLimits(max_line_bytes=s.limits.max_header_bytes, max_field_bytes=s.limits.max_header_bytes,
                              header_timeout_s=s.limits.client_timeout_s,
                              keepalive_timeout_s=s.limits.client_timeout_s,
                              send_timeout_s=s.limits.client_timeout_s,
                              max_body_bytes=MAX_BODY_UNCHECKED)
        servers: list[HttpServer] = []
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task] = []
        usage_task = asyncio.create_task(self.usage.run(), name="usage") if self.usage is not None else None
        fleet_started = False
        try:
            await guard.start()  # if we are killed, it stops our workers' trees at once
            await sup.tracing.start(s.tracing)
            for handler, listen in ((main_handler, s.listen),) + (((admin_handler, s.admin.listen),)
                                                                   if split_admin else ()):
                server = HttpServer(handler, limits, on_error=self._http_error)
                servers.append(server)
                try:
                    self.bound += await server.start(listen.host, listen.port, backlog=1024)
                except OSError as exc:
                    log.error("listen_failed", host=listen.host, port=listen.port, error=exc.strerror or str(exc))
                    return 1
            log.info("listening", addresses=[f"{h}:{p}" for h, p in self.bound],
                     admin=f"{self.bound[-1][0]}:{self.bound[-1][1]}" if split_admin else None,
                     runtime_dir=str(runtime_dir), config=self.loaded.source, pid=os.getpid())
            if self.install_signals:
                for sig, fn in ((signal.SIGTERM, self._on_stop_signal), (signal.SIGINT, self._on_stop_signal),
                                (signal.SIGHUP, self.reload_wanted.set)):
                    loop.add_signal_handler(sig, fn)
            sup.on_supervision_failed = self._fleet_failed
            tasks.append(asyncio.create_task(self._reloader(), name="reloader"))
            tasks.append(asyncio.create_task(self._notify_ready(), name="notify"))
            tasks.append(asyncio.create_task(self._loop_lag(), name="loop-lag"))
            tasks.append(asyncio.create_task(ui.run_sampler(self.samples, sup.status,
                                                            sup.metrics.requests_total),
                                             name="ui-sampler"))
            if self.notifier.watchdog_s:
                tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
            sup.start()
            # what startup made (modules, settings, the fleet's records) lives as long as the daemon: keep it
            # out of every later garbage collection, so a full one scans only what requests left behind
            gc.freeze()
            fleet_started = True
            tasks.append(asyncio.create_task(sup.jobs.run(), name="jobs"))
            tasks.append(asyncio.create_task(self._record_pids(pids_path), name="pid-file"))
            await self.stop.wait()
            await self._drain()
            return 1 if self.failed else 0
        finally:
            if self.install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            if sup.jobs is not None:
                # running jobs stay `running` in the store, as a crash leaves them: the next start
                # runs them again if they are safe to repeat, else fails them `interrupted`
                await sup.jobs.aclose(grace_s=0.0, settle=not fleet_started)
                sup.jobs = None
            if fleet_started and not sup.fleet.stopped():
                # (without a worker task, as after a listen failure, nobody would ever set `stopped`)
                await self._stop_worker()
            await sup.aclose()
            await guard.aclose()  # (after the workers: a clean exit leaves nothing for it to stop)
            for t in reversed(tasks):
                t.cancel()
            for t in reversed(tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            for server in reversed(servers):
                await server.close(HANDLER_GRACE_S)
            if usage_task is not None:  # every request is answered (and recorded) by now: the last flush
                usage_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await usage_task
                await self.usage.aclose()
            if made:
                with contextlib.suppress(OSError):
                    for f in runtime_dir.iterdir():
                        f.unlink()
                    runtime_dir.rmdir()
            self.notifier.close()
            log.info("stopped")

    async def _record_pids(self, path: Path) -> None:
        """Keep the pid file current: a successor started after a kill -9 stops what we leave."""
        sup = self.sup
        assert sup is not None
        while True:
            await sup.pids_event.wait()
            sup.pids_event.clear()
            try:
                await asyncio.to_thread(leftovers.write, path, os.getpid(), sup.worker_pids())
            except OSError as exc:
                log.warning("pid_file_unwritable", path=str(path), error=str(exc))

    def _http_error(self, status: int, etype: str | None) -> None:
        sup = self.sup
        if sup is None:
            return
        if etype is not None:
            sup.metrics.rejected.labels(etype).inc()
        sup.metrics.observe_request(sup.settings.queue.default_priority, status, 0.0, "none")

    def _fleet_failed(self) -> None:
        """A replica's lifecycle loop ends only on shutdown; anything else is a bug: say so and exit
        non-zero (systemd's Restart=on-failure brings the daemon back) rather than serve without it."""
        if self.stop.is_set():
            return
        self.failed = True
        self.stop.set()

    async def _stop_worker(self) -> None:
        """Stop the worker gracefully; a second signal stops waiting for it (the worker task's own
        cleanup, on cancel, still ends the process: SIGTERM, SIGKILL after worker.stop_grace_s)."""
        sup = self.sup
        assert sup is not None
        stopper = asyncio.create_task(sup.fleet.shutdown(), name="fleet-shutdown")
        forced = asyncio.create_task(self.force_stop.wait(), name="force-stop")
        done, _ = await asyncio.wait({stopper, forced}, return_when=asyncio.FIRST_COMPLETED)
        for t in (stopper, forced):
            if not t.done():
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if stopper not in done:
            log.warning("forced_stop")

    def _on_stop_signal(self) -> None:
        # act first, log after: a log write that fails (a closed stdout) must not stop a stop
        if self.stop.is_set():
            self.force_stop.set()
            self.sup.drain_deadline_now()
            with contextlib.suppress(OSError):
                log.warning("second_stop_signal", action="stopping now")
            return
        self.stop.set()
        with contextlib.suppress(OSError):
            log.info("stop_signal", action="draining")

    async def _drain(self) -> None:
        sup = self.sup
        assert sup is not None
        sup.accepting = False
        self.notifier.send("STOPPING=1", "STATUS=draining")
        timeout = sup.settings.drain.timeout_s
        t0 = time.monotonic()
        log.info("drain_started", queued=sup.queued(), inflight=sup.inflight(), timeout_s=timeout)
        jobs = sup.jobs
        jobs_closed = None
        if jobs is not None:  # take no new job; running ones get the drain's time, then go back to the store
            jobs_closed = asyncio.create_task(jobs.aclose(grace_s=timeout, settle=True), name="jobs-close")
        drained = await sup.wait_idle(timeout, self.force_stop)
        if jobs_closed is not None:
            if self.force_stop.is_set():
                jobs_closed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await jobs_closed
            sup.jobs = None
        log.info("drain_finished", drained=drained, left=sup.active, seconds=round(time.monotonic() - t0, 3))
        if not drained:
            sup.drain_deadline_now()  # what is still queued gets 503 now; nothing more goes to the worker
        self.notifier.send(f"STATUS=stopping the worker; {self._status_line()}")

    async def _notify_ready(self) -> None:
        sup = self.sup
        assert sup is not None
        eager = [r for r in sup.fleet.replicas() if r.spec.start == "eager"]
        if eager:  # READY=1 once the first eager replica answers health
            waiters = [asyncio.ensure_future(m.ready.wait()) for m in eager]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")
        while True:
            await asyncio.sleep(5)
            self.notifier.send(f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        sup = self.sup
        assert sup is not None
        return sup.status_line()

    async def _loop_lag(self, every_s: float = 0.1) -> None:
        """Measure how late a timer fires: the event loop's health, for /metrics."""
        hist = self.sup.metrics.loop_lag
        clock = time.perf_counter  # uvloop's loop.time() has only millisecond resolution
        while True:
            t = clock()
            await asyncio.sleep(every_s)
            hist.observe(max(0.0, clock() - t - every_s))

    async def _watchdog(self) -> None:
        interval = (self.notifier.watchdog_s or 0) / 2
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _reloader(self) -> None:
        while True:
            await self.reload_wanted.wait()
            self.reload_wanted.clear()
            if self.stop.is_set():
                log.warning("config_reload_ignored", reason="shutting down")
                continue
            try:
                await self.reload()
            except Exception:  # a bug in applying must not end SIGHUP handling for good
                log.exception("config_reload_error")
                self.notifier.send("READY=1", f"STATUS=reload failed; {self._status_line()}")

    async def reload(self) -> bool:
        sup = self.sup
        assert sup is not None
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={now_us}", "STATUS=reloading configuration")
        try:
            new = await asyncio.to_thread(cfg.load, self.loaded.source)
        except cfg.ConfigError as exc:
            log.error("config_reload_failed", config=exc.source, problems=exc.problems, action="kept the old one")
            sup.metrics.config_reloads.labels("invalid").inc()
            self.notifier.send("READY=1", f"STATUS=reload failed; {self._status_line()}")
            return False
        old = self.loaded.settings
        if new.settings.listen != old.listen or new.settings.admin.listen != old.admin.listen:
            log.warning("config_reload_listen_ignored", reason="a new listen address needs a restart")
        clients = new.settings.clients
        if self.usage is not None and clients is not None:  # (the usage log's store is the one it started with)
            if old.clients is not None and clients.store != old.clients.store:
                log.warning("config_reload_usage_store_ignored", reason="a new clients.store needs a restart")
            self.usage.retention_s = clients.retention_s
        if new.settings.logging != old.logging:
            logs.configure(new.settings.logging.format, new.settings.logging.level)
        self.loaded = new
        try:
            self._load_token()
        except (OSError, ValueError) as exc:
            log.error("admin_token_unreadable", error=str(exc))
        done = sup.apply(new)
        sup.metrics.config_reloads.labels("applied").inc()
        log.info("config_reloaded", digest=new.digest, generation=sup.config_generation, **done.fields())
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")
        return True


def run(loaded: cfg.LoadedConfig, env: Environment) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        uvloop = None
    d = Daemon(loaded, env)
    if uvloop is not None:
        return uvloop.run(d.serve())
    return asyncio.run(d.serve())


__all__ = ["Daemon", "Environment", "run", "SERVING_STATES"]
