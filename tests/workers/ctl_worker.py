"""A small worker whose every failure is on demand: slow, hang, crash, OOM, leak, garbage, bad health.

Run as ``python tests/workers/ctl_worker.py --socket PATH [options]``. Each option also reads the
env var ``CTL_<NAME>`` (``--startup-delay`` <- ``CTL_STARTUP_DELAY``), so a supervisor config's
``worker.env`` can set it; a flag beats the env. The socket falls back to ``CTL_SOCKET`` and then
``GPU_SUPERVISOR_SOCKET``. Only aiohttp and the standard library are imported, so it starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import mmap
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

PID = os.getpid()
MIB = 1 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Paths that are bookkeeping, not work: they do not count toward in_flight / max_in_flight.
META_PATHS = frozenset({"/counter", "/counter/reset", "/memory", "/pid", "/set-health", "/metrics"})
HEALTH_MODES = ("ok", "fail", "hang", "unready")

OOM_TRACEBACK = """\
Traceback (most recent call last):
  File "/srv/app/worker.py", line 88, in <module>
    model = load_model(args.model)
            ^^^^^^^^^^^^^^^^^^^^^^
  File "/srv/app/worker.py", line 41, in load_model
    model = model.to("cuda")
            ^^^^^^^^^^^^^^^^
  File "/opt/venv/lib/python3.11/site-packages/transformers/modeling_utils.py", line 3164, in to
    return super().to(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1355, in to
    return self._apply(convert)
           ^^^^^^^^^^^^^^^^^^^^
  File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 915, in _apply
    module._apply(fn)
  File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 942, in _apply
    param_applied = fn(param)
                    ^^^^^^^^^
  File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1341, in convert
    return t.to(
           ^^^^^
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity \
of 79.19 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB \
memory in use. Of the allocated memory 76.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved \
by PyTorch but unallocated. If reserved but unallocated memory is large try setting \
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for \
Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)
"""


@dataclasses.dataclass(frozen=True)
class Options:
    socket: str
    startup_delay: float
    ready_delay: float
    never_ready: bool
    exit_before_ready: int | None
    oom_at_start: bool
    health_fail_after: int | None
    health_path: str
    ignore_sigterm: bool
    shutdown_timeout: float
    name: str = ""
    models: str = ""
    fail_on_gpu: str | None = None


@dataclasses.dataclass
class WorkerState:
    """Everything the worker remembers; one record, kept in the app."""

    opts: Options
    ready_at: float
    health_mode: str = "ok"
    total: int = 0
    seen: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    cleanup_calls: int = 0
    disconnects: int = 0
    chunks: int = 0  # stream chunks written: the progress counter /metrics exposes
    leaked: list[mmap.mmap] = dataclasses.field(default_factory=list)
    gpu_blocks: list[object] = dataclasses.field(default_factory=list)  # torch tensors (GPU tests only)
    never: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # never set: /hang

    def leaked_bytes(self) -> int:
        return sum(len(m) for m in self.leaked)


STATE = web.AppKey("state", WorkerState)


def log(event: str, **fields: object) -> None:
    """One event line on stderr, fields as key=value."""
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    print(f"ctl_worker event={event} pid={PID}{extra}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    # A procfs read never blocks, so it is fine on the loop.
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def print_oom_traceback() -> None:
    sys.stderr.write(OOM_TRACEBACK)
    sys.stderr.flush()


def _num(request: web.Request, name: str, kind: type[int] | type[float], default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be a {kind.__name__}") from None
    if value < 0:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be >= 0")
    return value


def _json(data: dict[str, object], status: int = 200, **kw: object) -> web.Response:
    return web.json_response(data, status=status, **kw)


# --- middleware and signals -------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    state.total += 1
    state.seen[request.path] += 1
    if request.path in META_PATHS or request.path == state.opts.health_path:
        return await handler(request)
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        return await handler(request)
    except asyncio.CancelledError:
        # handler_cancellation: the client (the supervisor) closed the connection mid-request.
        state.disconnects += 1
        log("request_cancelled", path=request.path)
        raise
    finally:
        state.in_flight -= 1


async def add_pid_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Worker-Pid"] = str(PID)
    name = request.app[STATE].opts.name
    if name:
        response.headers["X-Worker-Name"] = name


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text with one progress counter (stream chunks written), as vLLM exposes generated tokens."""
    n = request.app[STATE].chunks
    text = f"# HELP ctl_chunks_total Stream chunks written.\n# TYPE ctl_chunks_total counter\nctl_chunks_total {n}\n"
    return web.Response(text=text, content_type="text/plain")


async def models(request: web.Request) -> web.Response:
    """OpenAI's model list, from --models (CTL_MODELS): what a fleet discovers once the worker is ready."""
    names = [m for m in request.app[STATE].opts.models.split(",") if m]
    return _json({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "ctl"} for m in names]})


# --- handlers ----------------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    opts = state.opts
    if state.health_mode == "hang":
        await state.never.wait()
    if state.health_mode == "fail":
        return _json({"status": "unhealthy", "pid": PID}, status=500)
    if opts.never_ready or state.health_mode == "unready" or time.monotonic() < state.ready_at:
        return _json({"status": "starting", "pid": PID}, status=503)
    # state.total already counts this probe; the first N requests are served healthy.
    if opts.health_fail_after is not None and state.total > opts.health_fail_after:
        return _json({"status": "unhealthy", "pid": PID, "served": state.total - 1}, status=500)
    return _json({"status": "ok", "pid": PID})


async def set_health(request: web.Request) -> web.Response:
    mode = request.query.get("mode", "")
    if mode not in HEALTH_MODES:
        raise web.HTTPBadRequest(text=f"mode must be one of {', '.join(HEALTH_MODES)}")
    request.app[STATE].health_mode = mode
    log("health_mode", mode=mode)
    return _json({"health_mode": mode, "pid": PID})


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    delay = _num(request, "delay", float, 0.0)
    if delay:
        await asyncio.sleep(delay)
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return _json({
        "method": request.method,
        "path": request.path,
        "query_string": request.query_string,
        "query": dict(request.query),
        "http_version": f"{request.version.major}.{request.version.minor}",
        "headers": headers,
        "header_list": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body": body.decode("utf-8", "replace") if len(body) <= 64 * 1024 else None,
        "pid": PID,
    })


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def sleep(request: web.Request) -> web.Response:
    s = _num(request, "s", float, 0.5)
    await asyncio.sleep(s)
    return _json({"slept": s, "pid": PID})


async def work(request: web.Request) -> web.Response:
    ms = _num(request, "ms", float, 20.0)
    await asyncio.sleep(ms / 1000)
    return _json({"slept_ms": ms, "pid": PID})


async def hang(request: web.Request) -> web.StreamResponse:
    log("hang", path=request.path)
    await request.app[STATE].never.wait()
    raise AssertionError("unreachable: the hang event is never set")


async def _stream(request: web.Request, content_type: str, line: Callable[[int], bytes],
                  done: bytes) -> web.StreamResponse:
    n = int(_num(request, "n", int, 5))
    interval = _num(request, "interval", float, 0.1)
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        for k in range(n):
            if k:
                await asyncio.sleep(interval)
            await resp.write(line(k))
            request.app[STATE].chunks += 1
        await resp.write(done)
        await resp.write_eof()
    except ConnectionError:
        request.app[STATE].disconnects += 1
        log("client_disconnected", path=request.path)
    return resp


def _sse_event(k: int) -> bytes:
    return f"data: {json.dumps({'i': k})}\n\n".encode()


async def stream(request: web.Request) -> web.StreamResponse:
    return await _stream(request, "text/event-stream", _sse_event, b"data: [DONE]\n\n")


async def chunked(request: web.Request) -> web.StreamResponse:
    return await _stream(request, "text/plain; charset=utf-8",
                         lambda k: f"line {k}\n".encode(), b"done\n")


def big_pattern(n: int) -> bytes:
    """The /big body: bytes(range(256)) repeated, cut to n bytes (tests rebuild it to compare)."""
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


async def big(request: web.Request) -> web.StreamResponse:
    n = int(_num(request, "bytes", int, MIB))
    chunk = big_pattern(256 * 1024)  # 256 KiB is a multiple of 256, so chunks line up
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    sent = 0
    try:
        while sent < n:
            part = chunk[: n - sent]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
    except ConnectionError:
        request.app[STATE].disconnects += 1
        log("client_disconnected", path=request.path, sent=sent)
    return resp


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be within 200..599")
    if code in (204, 304):
        return web.Response(status=code)
    return _json({"status": code, "pid": PID}, status=code)


async def oom(request: web.Request) -> web.Response:
    log("oom_answer")
    return _json(
        {"error": "oom", "detail": "CUDA out of memory. Tried to allocate 2.00 GiB", "pid": PID},
        status=503, headers={"X-Worker-Error": "oom"},
    )


async def crash(request: web.Request) -> web.Response:
    log("crash", code=3)
    os._exit(3)


async def crash_after_headers(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(_sse_event(0))
    log("crash_mid_stream", code=3)
    os._exit(3)


async def crash_mid_body(request: web.Request) -> web.StreamResponse:
    """A sized answer (Content-Length) cut by the worker's death halfway, the first time only: the
    file `marker` records that it happened (the next worker answers it whole)."""
    n = int(_num(request, "bytes", int, 100_000))
    marker = request.query.get("marker", "")
    body = big_pattern(n)
    if marker and os.path.exists(marker):
        return web.Response(body=body, content_type="application/octet-stream")
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    await resp.write(body[: n // 2])
    if marker:
        with open(marker, "w") as f:
            f.write("crashed once")
    log("crash_mid_body", code=3)
    os._exit(3)


async def die_oom(request: web.Request) -> web.Response:
    log("die_oom", code=1)
    print_oom_traceback()
    os._exit(1)


async def garbage(request: web.Request) -> web.Response:
    log("garbage")
    transport = request.transport
    assert transport is not None
    transport.write(b"\x16\x03\x01 this is not HTTP at all \x00\xff\r\n\r\n")
    transport.close()
    # The connection is gone; aiohttp drops the answer quietly (nothing to write it to).
    return web.Response(status=200)


async def close(request: web.Request) -> web.Response:
    log("close_without_answer")
    transport = request.transport
    assert transport is not None
    transport.close()
    return web.Response(status=200)


async def counter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json({
        "pid": PID,
        "total": state.total,
        "paths": dict(state.seen),
        "in_flight": state.in_flight,
        "max_in_flight": state.max_in_flight,
        "cleanup_calls": state.cleanup_calls,
        "disconnects": state.disconnects,
    })


async def counter_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.total = 0
    state.seen.clear()
    state.max_in_flight = state.in_flight
    state.cleanup_calls = 0
    state.disconnects = 0
    return _json({"reset": True, "pid": PID})


async def leak(request: web.Request) -> web.Response:
    state = request.app[STATE]
    mb = int(_num(request, "mb", int, 10))
    # Anonymous mmap: every page is written so RSS really grows, and close() really returns it.
    block = mmap.mmap(-1, max(mb, 1) * MIB)
    page = b"\xa5" * MIB
    for _ in range(mb):
        block.write(page)
    state.leaked.append(block)
    log("leak", mb=mb, leaked_bytes=state.leaked_bytes())
    return _json({"leaked_mb": mb, "leaked_bytes": state.leaked_bytes(), "rss_bytes": rss_bytes(),
                  "pid": PID})


async def gpu_alloc(request: web.Request) -> web.Response:
    """Hold `mb` MiB more of GPU memory (torch is imported here only: the worker stays light)."""
    import torch

    state = request.app[STATE]
    mb = int(_num(request, "mb", int, 256))
    state.gpu_blocks.append(torch.ones(mb * MIB, dtype=torch.uint8, device="cuda"))
    held = sum(b.numel() for b in state.gpu_blocks)  # type: ignore[attr-defined]
    log("gpu_alloc", mb=mb, held_bytes=held)
    return _json({"held_bytes": held, "pid": PID})


async def memory(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json({"rss_bytes": rss_bytes(), "leaked_bytes": state.leaked_bytes(), "pid": PID})


async def cleanup(request: web.Request) -> web.Response:
    state = request.app[STATE]
    freed = state.leaked_bytes()
    for block in state.leaked:
        block.close()
    state.leaked.clear()
    state.cleanup_calls += 1
    log("cleanup", freed_bytes=freed, calls=state.cleanup_calls)
    return _json({"freed_bytes": freed, "rss_bytes": rss_bytes(), "cleanup_calls": state.cleanup_calls,
                  "pid": PID})


async def env(request: web.Request) -> web.Response:
    """Selected environment variables (`?name=A&name=B`): lets tests see what the supervisor passed."""
    names = request.query.getall("name", [])
    return _json({"env": {n: os.environ.get(n) for n in names}, "pid": PID})


async def pid(request: web.Request) -> web.Response:
    return _json({"pid": PID})


async def log_line(request: web.Request) -> web.Response:
    msg = request.query.get("msg", "hello from ctl_worker")
    lines = int(_num(request, "lines", int, 1))
    out = sys.stdout if request.query.get("stream") == "stdout" else sys.stderr
    for i in range(lines):
        print(msg if lines == 1 else f"{msg} {i}", file=out, flush=True)
    return _json({"written": lines, "pid": PID})


async def _release_leaks(app: web.Application) -> None:
    for block in app[STATE].leaked:
        block.close()


def make_app(opts: Options) -> web.Application:
    app = web.Application(middlewares=[track], client_max_size=1 << 40)
    app[STATE] = WorkerState(opts=opts, ready_at=time.monotonic() + opts.ready_delay)
    app.on_response_prepare.append(add_pid_header)
    app.on_cleanup.append(_release_leaks)
    r = app.router
    r.add_get(opts.health_path, healthz)
    r.add_post("/set-health", set_health)
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        r.add_route(method, "/echo", echo)
    r.add_get("/hello", hello)
    r.add_get("/sleep", sleep)
    r.add_get("/work", work)
    r.add_get("/hang", hang)
    r.add_get("/stream", stream)
    r.add_get("/chunked", chunked)
    r.add_get("/big", big)
    r.add_get(r"/status/{code:\d+}", status)
    r.add_get("/oom", oom)
    r.add_get("/crash", crash)
    r.add_get("/crash-after-headers", crash_after_headers)
    r.add_get("/crash-mid-body", crash_mid_body)
    r.add_get("/die-oom", die_oom)
    r.add_get("/garbage", garbage)
    r.add_get("/close", close)
    r.add_get("/counter", counter)
    r.add_post("/counter/reset", counter_reset)
    r.add_get("/leak", leak)
    r.add_get("/memory", memory)
    r.add_post("/cleanup", cleanup)
    r.add_get("/pid", pid)
    r.add_get("/env", env)
    r.add_get("/gpu-alloc", gpu_alloc)
    r.add_get("/log", log_line)
    r.add_get("/v1/models", models)
    r.add_get("/metrics", metrics)
    r.add_post("/v1/{tail:.*}", echo)
    return app


# --- process -----------------------------------------------------------------------------------

def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"ctl_worker: {path} exists and is not a socket")
    os.unlink(path)


async def serve(opts: Options) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if opts.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)

    if opts.startup_delay:
        log("starting", delay_s=opts.startup_delay)
        try:
            await asyncio.wait_for(stop.wait(), opts.startup_delay)
        except TimeoutError:
            pass
        else:
            log("stopped_before_ready")
            return 0
    if opts.oom_at_start:
        print_oom_traceback()
        return 1
    if opts.fail_on_gpu is not None and os.environ.get("CUDA_VISIBLE_DEVICES") == opts.fail_on_gpu:
        log("fail_on_gpu", gpu=opts.fail_on_gpu)
        return 1
    if opts.exit_before_ready is not None:
        log("exit_before_ready", code=opts.exit_before_ready)
        return opts.exit_before_ready

    # handler_cancellation: a request whose connection closes is cancelled, as a GPU worker should.
    runner = web.AppRunner(make_app(opts), handle_signals=False, access_log=None,
                           shutdown_timeout=opts.shutdown_timeout, handler_cancellation=True)
    await runner.setup()
    inode = None
    try:
        _remove_stale_socket(opts.socket)
        await web.UnixSite(runner, opts.socket).start()
        inode = os.stat(opts.socket).st_ino
        print(f"ctl_worker listening on {opts.socket} pid={PID}", flush=True)
        await stop.wait()
        log("stopping", reason="signal")
    finally:
        # aiohttp waits up to the timeout for handlers, then again after cancelling them; one
        # timeout in all is what --shutdown-timeout promises. Leftover handlers die with the loop.
        try:
            await asyncio.wait_for(runner.cleanup(), opts.shutdown_timeout)
        except TimeoutError:
            log("shutdown_timeout", timeout_s=opts.shutdown_timeout)
        # Unlink only our own socket: a successor may already have bound a new one at this path.
        try:
            if inode is not None and os.stat(opts.socket).st_ino == inode:
                os.unlink(opts.socket)
        except FileNotFoundError:
            pass
    log("stopped", code=0)
    return 0


def _env(name: str) -> str | None:
    value = os.environ.get(f"CTL_{name}")
    return value if value not in (None, "") else None


def _env_bool(name: str) -> bool:
    value = _env(name)
    if value is None:
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"ctl_worker: CTL_{name}={value!r} is not a boolean")


def _env_num(name: str, kind: type[int] | type[float], default: float | None) -> float | None:
    value = _env(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"ctl_worker: CTL_{name}={value!r} is not a {kind.__name__}") from None


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="ctl_worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=_env("SOCKET") or os.environ.get("GPU_SUPERVISOR_SOCKET"),
                   help="Unix socket path (env CTL_SOCKET, then GPU_SUPERVISOR_SOCKET)")
    p.add_argument("--startup-delay", type=float, default=_env_num("STARTUP_DELAY", float, 0.0),
                   help="seconds to wait before listening")
    p.add_argument("--ready-delay", type=float, default=_env_num("READY_DELAY", float, 0.0),
                   help="listen at once but answer health 503 for this many seconds")
    p.add_argument("--never-ready", action="store_true", default=_env_bool("NEVER_READY"),
                   help="listen, but health always answers 503")
    p.add_argument("--exit-before-ready", type=int, metavar="CODE",
                   default=_env_num("EXIT_BEFORE_READY", int, None),
                   help="exit with CODE before listening")
    p.add_argument("--oom-at-start", action="store_true", default=_env_bool("OOM_AT_START"),
                   help="print a torch CUDA OOM traceback to stderr and exit 1 before listening")
    p.add_argument("--health-fail-after", type=int, metavar="N",
                   default=_env_num("HEALTH_FAIL_AFTER", int, None),
                   help="health answers 500 once N requests (any path, probes included) were served")
    p.add_argument("--health-path", default=_env("HEALTH_PATH") or "/healthz")
    p.add_argument("--ignore-sigterm", action="store_true", default=_env_bool("IGNORE_SIGTERM"),
                   help="ignore SIGTERM (only SIGKILL or SIGINT stops it)")
    p.add_argument("--shutdown-timeout", type=float,
                   default=_env_num("SHUTDOWN_TIMEOUT", float, 5.0),
                   help="on SIGTERM, seconds in-flight requests get to finish before being cancelled")
    p.add_argument("--fail-on-gpu", default=_env("FAIL_ON_GPU"),
                   help="exit 1 before ready when CUDA_VISIBLE_DEVICES equals this (one replica of a fleet)")
    p.add_argument("--name", default=_env("NAME") or "", help="sent back as X-Worker-Name on every answer")
    p.add_argument("--models", default=_env("MODELS") or "", help="comma-separated names for GET /v1/models")
    ns = p.parse_args(argv)
    if not ns.socket:
        p.error("--socket is required (or env CTL_SOCKET / GPU_SUPERVISOR_SOCKET)")
    return Options(**vars(ns))


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
