"""A worker with a sleep mode like vLLM's: a slow emulated load, a fast wake.

Run as ``python tests/workers/sleepy_worker.py --socket PATH [options]``; each option also reads the env
var ``SLEEPY_<NAME>`` (``--load-s`` <- ``SLEEPY_LOAD_S``), so a supervisor config's ``env`` can set it.
Endpoints: ``GET /healthz`` (answers asleep too, as vLLM's does), ``POST /sleep?level=N``, ``POST
/wake_up``, ``GET /is_sleeping``, ``GET /v1/models``, ``POST /v1/completions`` (``{"worker", "pid",
"wakes"}``; ``?delay=S`` holds the answer; asleep: 503 ``asleep``), ``GET /stats``. Only aiohttp and the
standard library are imported, so it starts fast apart from its emulated load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from aiohttp import web

PID = os.getpid()


def _env(name: str, default: str) -> str:
    return os.environ.get("SLEEPY_" + name, default)


class Sleepy:
    """The worker's state: asleep or not, and what it has done."""

    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.asleep = False
        self.level = 0
        self.sleeps = 0
        self.wakes = 0
        self.served = 0
        self.refused_asleep = 0  # requests that reached it asleep (the daemon must send none)

    def headers(self) -> dict[str, str]:
        return {"X-Worker-Name": self.opts.name, "X-Worker-Pid": str(PID)}

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "asleep": self.asleep}, headers=self.headers())

    async def sleep(self, request: web.Request) -> web.Response:
        level = int(request.query.get("level", "1"))
        if self.opts.sleep_fail:
            return web.json_response({"error": "sleep failed (as asked)"}, status=500)
        await asyncio.sleep(self.opts.sleep_ms / 1000)
        self.asleep, self.level = True, level
        self.sleeps += 1
        return web.json_response({"asleep": True, "level": level})

    async def wake_up(self, request: web.Request) -> web.Response:
        if os.path.exists(self.opts.wake_fail_file) if self.opts.wake_fail_file else self.opts.wake_fail:
            return web.json_response({"error": "wake failed (as asked)"}, status=500)
        # level 2 dropped the weights: waking reloads them (still far faster than a cold start here)
        await asyncio.sleep(self.opts.wake_ms / 1000 * (2 if self.level == 2 else 1))
        self.asleep, self.level = False, 0
        self.wakes += 1
        return web.json_response({"asleep": False})

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.asleep})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.opts.name, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.Response:
        if self.asleep:
            self.refused_asleep += 1
            return web.json_response({"error": {"type": "asleep", "message": "the worker is asleep"}},
                                     status=503, headers=self.headers())
        await request.read()
        delay = float(request.query.get("delay", "0"))
        if delay:
            await asyncio.sleep(delay)
            if self.asleep:  # put to sleep mid-answer: the answer is lost (the daemon must never do that)
                self.refused_asleep += 1
                return web.json_response({"error": {"type": "asleep", "message": "put to sleep mid-request"}},
                                         status=503, headers=self.headers())
        self.served += 1
        return web.json_response({"worker": self.opts.name, "pid": PID, "wakes": self.wakes},
                                 headers=self.headers())

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"pid": PID, "asleep": self.asleep, "sleeps": self.sleeps, "wakes": self.wakes,
                                  "served": self.served, "refused_asleep": self.refused_asleep})


async def serve(opts: argparse.Namespace) -> None:
    s = Sleepy(opts)
    app = web.Application()
    app.router.add_get("/healthz", s.health)
    app.router.add_post("/sleep", s.sleep)
    app.router.add_post("/wake_up", s.wake_up)
    app.router.add_get("/is_sleeping", s.is_sleeping)
    app.router.add_get("/v1/models", s.models)
    app.router.add_post("/v1/completions", s.completions)
    app.router.add_get("/stats", s.stats)
    began = time.monotonic()
    await asyncio.sleep(opts.load_s)  # the emulated model load: nothing listens meanwhile
    runner = web.AppRunner(app, handle_signals=True)
    await runner.setup()
    await web.UnixSite(runner, opts.socket).start()
    print(f"sleepy_worker {opts.name} pid {PID} loaded in {time.monotonic() - began:.3f}s", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sleepy_worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=os.environ.get("GPU_SUPERVISOR_SOCKET"))
    p.add_argument("--name", default=_env("NAME", "sleepy"))
    p.add_argument("--load-s", type=float, default=float(_env("LOAD_S", "0")),
                   help="emulated model load before it listens")
    p.add_argument("--wake-ms", type=float, default=float(_env("WAKE_MS", "20")), help="a wake's time")
    p.add_argument("--sleep-ms", type=float, default=float(_env("SLEEP_MS", "10")), help="a sleep's time")
    p.add_argument("--wake-fail", action="store_true", default=_env("WAKE_FAIL", "") == "1",
                   help="every wake answers 500")
    p.add_argument("--wake-fail-file", default=_env("WAKE_FAIL_FILE", ""),
                   help="a wake answers 500 while this file exists")
    p.add_argument("--sleep-fail", action="store_true", default=_env("SLEEP_FAIL", "") == "1",
                   help="every sleep answers 500")
    opts = p.parse_args(argv)
    if not opts.socket:
        p.error("--socket (or GPU_SUPERVISOR_SOCKET) is required")
    try:
        asyncio.run(serve(opts))
    except (KeyboardInterrupt, web.GracefulExit):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
