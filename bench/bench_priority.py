"""Priority isolation under overload: gpu-supervisor's priority queue against nginx's FIFO, same worker.

The worker is ctl_worker behind a one-at-a-time gate on `/work` (a GPU model serves one batch at a
time; ctl_worker's `/work` only sleeps, so without the gate it would overlap requests and nginx
would look like it had 5x the capacity). It is spawned by gpu-supervisor (concurrency 1) and nginx
proxies to the same Unix socket, so both fronts share one worker with a fixed service time.

An open-loop load generator (aiohttp, a fixed arrival schedule, latency measured from each
request's scheduled send time) offers `--overload` times the worker's capacity, a `--high-share`
of it at priority high, the rest low. Reported per front: p50/p99 latency of high requests, the
share of low requests refused and how fast, and worker utilisation (busy time / wall time).
Prints a table and writes bench/results/priority.json.

    python bench/bench_priority.py [--duration 20] [--ms 20] [--overload 5] [--high-share 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds, free_port, nginx_conf, stop_all  # noqa: E402

PY = sys.executable

# ---- the worker: ctl_worker with one /work at a time ------------------------------------------------

def serve_worker(socket_path: str) -> int:
    sys.path.insert(0, str(ROOT))
    from aiohttp import web

    from tests.workers import ctl_worker as cw

    async def main() -> None:
        opts = cw.parse_args(["--socket", socket_path])
        app = cw.make_app(opts)
        gate = asyncio.Lock()  # FIFO: waiters are woken in arrival order
        stats = {"done": 0, "busy_s": 0.0}

        @web.middleware
        async def one_at_a_time(request: web.Request, handler):
            if request.path != "/work":
                return await handler(request)
            async with gate:
                t = time.perf_counter()
                try:
                    resp = await handler(request)
                finally:  # work cut short (the front hung up mid-request) still kept the worker busy
                    stats["busy_s"] += time.perf_counter() - t
                stats["done"] += 1
                return resp

        async def busy(request: web.Request) -> web.Response:
            return web.json_response(stats | {"waiting": len(gate._waiters or ()), "pid": os.getpid()})

        app.middlewares.append(one_at_a_time)
        app.router.add_get("/busy", busy)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                               shutdown_timeout=1.0)
        await runner.setup()
        cw._remove_stale_socket(socket_path)
        await web.UnixSite(runner, socket_path, backlog=4096).start()
        print(f"bench worker listening on {socket_path}", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())
    return 0


# ---- helpers ----------------------------------------------------------------------------------

async def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout}s")
            await asyncio.sleep(0.05)


async def worker_busy(sock: Path) -> dict:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
        async with s.get("http://worker/busy", timeout=aiohttp.ClientTimeout(total=5)) as r:
            data = await r.json()
    data["cpu_s"] = cpu_seconds(data["pid"])
    return data


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))
    return xs[k]


# ---- the load generator -----------------------------------------------------------------------

def make_plan(rate: float, duration: float, high_share: float, seed: int) -> list[tuple[float, str]]:
    """The fixed arrival schedule: (offset in seconds, priority), the same for every front."""
    rng = random.Random(seed)
    return [(i / rate, "high" if rng.random() < high_share else "low") for i in range(int(rate * duration))]


def ideal_priority(plan: list[tuple[float, str]], ms: float, low_max: int) -> dict:
    """High-priority latency under a zero-overhead, non-preemptive priority queue with one slot.

    The floor any front can reach on this schedule: a high request still waits for the request in
    service and for the highs ahead of it (at 10% of 5x, highs alone fill half the worker).
    """
    s = ms / 1000
    high: deque[float] = deque()
    low: deque[float] = deque()
    lat: list[float] = []
    free_at, i, n = 0.0, 0, len(plan)
    while i < n or high or low:
        while i < n and plan[i][0] <= free_at:
            at, prio = plan[i]
            i += 1
            if prio == "high":
                high.append(at)
            elif len(low) < low_max:
                low.append(at)
        if high:
            lat.append(free_at - high.popleft() + s)
            free_at += s
        elif low:
            low.popleft()
            free_at += s
        else:
            free_at = plan[i][0]
    return {"high_p50_ms": round(pct(lat, 50) * 1000, 2), "high_p99_ms": round(pct(lat, 99) * 1000, 2)}


async def offer_load(base: str, sock: Path, rate: float, duration: float, high_share: float, ms: float,
                     seed: int, client_timeout: float) -> dict:
    """Send `rate` req/s for `duration` s on a fixed schedule; every request is answered or times out."""
    plan = make_plan(rate, duration, high_share, seed)
    n = len(plan)
    clock = time.perf_counter  # uvloop's loop.time() ticks in whole milliseconds
    results: list[tuple[str, int, float, str | None, str | None]] = []
    lag: list[float] = []
    path = f"{base}/work?ms={ms:g}"
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=client_timeout)) as session:
        # warm up: open connections, give the supervisor a service-time sample
        for _ in range(5):
            async with session.get(path) as r:
                await r.read()
        while (await worker_busy(sock))["waiting"]:
            await asyncio.sleep(0.05)

        async def one(t_sched: float, prio: str) -> None:
            lag.append(clock() - t_sched)
            etype = retry_after = None
            try:
                async with session.get(path, headers={"X-Priority": prio}) as r:
                    body = await r.read()
                    status = r.status
                    retry_after = r.headers.get("Retry-After")
                    if status >= 400 and r.headers.get("Content-Type", "").startswith("application/json"):
                        try:
                            etype = json.loads(body)["error"]["type"]
                        except (ValueError, KeyError, TypeError):
                            etype = None
            except (aiohttp.ClientError, TimeoutError):
                status = -1
            results.append((prio, status, clock() - t_sched, etype, retry_after))

        async def snapshot_at(t: float) -> dict:
            await asyncio.sleep(max(0.0, t - clock()))
            return await worker_busy(sock)

        t0 = clock() + 0.2
        before = await worker_busy(sock)
        after_task = asyncio.ensure_future(snapshot_at(t0 + duration))
        tasks: set[asyncio.Task] = set()
        for off, prio in plan:
            delay = t0 + off - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(one(t0 + off, prio))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        after = await after_task
        if tasks:
            await asyncio.wait(tasks, timeout=client_timeout + 5)
        for t in tasks:
            t.cancel()
    # let a FIFO front's leftovers drain out of the worker before the next run
    deadline = time.monotonic() + client_timeout + 10
    while (await worker_busy(sock))["waiting"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return summarise(results, lag, before, after, duration, ms, n)


def summarise(results, lag, before, after, duration, ms, offered) -> dict:
    def ms_(x):
        return None if x is None else round(x * 1000, 2)

    out: dict = {"offered": offered, "answered": len(results)}
    for prio in ("high", "low"):
        rs = [r for r in results if r[0] == prio]
        ok = [r[2] for r in rs if 200 <= r[1] < 300]
        bad = [r for r in rs if not 200 <= r[1] < 300]
        fast = [r[2] for r in bad if r[1] == 429]
        codes: dict[str, int] = {}
        for r in bad:
            key = f"{r[1]} {r[3]}" if r[3] else str(r[1])
            codes[key] = codes.get(key, 0) + 1
        ras = [int(r[4]) for r in bad if r[4] and r[4].isdigit()]
        out[prio] = {
            "n": len(rs),
            "ok": len(ok),
            "ok_share": round(len(ok) / len(rs), 4) if rs else None,
            "p50_ms": ms_(pct([r[2] for r in rs], 50)),
            "p99_ms": ms_(pct([r[2] for r in rs], 99)),
            "ok_p50_ms": ms_(pct(ok, 50)),
            "ok_p99_ms": ms_(pct(ok, 99)),
            "refused": len(bad),
            "refused_share": round(len(bad) / len(rs), 4) if rs else None,
            "refused_p50_ms": ms_(pct([r[2] for r in bad], 50)),
            "refused_p99_ms": ms_(pct([r[2] for r in bad], 99)),
            "refused_429_p99_ms": ms_(pct(fast, 99)),
            "refused_by": codes,
            "retry_after_median_s": statistics.median(ras) if ras else None,
        }
    done = after["done"] - before["done"]
    out["worker"] = {
        "work_done": done,
        "utilisation": round(done * ms / 1000 / duration, 4),
        "busy_utilisation": round((after["busy_s"] - before["busy_s"]) / duration, 4),
        "cpu_utilisation": round((after["cpu_s"] - before["cpu_s"]) / duration, 4),
    }
    out["client_lag_p99_ms"] = ms_(pct(lag, 99))
    return out


# ---- main -------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of offered load per front")
    ap.add_argument("--ms", type=float, default=20.0, help="the worker's service time per request")
    ap.add_argument("--overload", type=float, default=5.0, help="offered load as a multiple of capacity")
    ap.add_argument("--high-share", type=float, default=0.1)
    ap.add_argument("--low-timeout", type=float, default=1.0, help="supervisor queue timeout_s for low")
    ap.add_argument("--low-max", type=int, default=20, help="supervisor queue max_size for low")
    ap.add_argument("--high-timeout", type=float, default=2.0, help="supervisor queue timeout_s for high; "
                    "also nginx's proxy_read_timeout")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=("gpu-supervisor", "nginx"))
    ap.add_argument("--out", default=str(HERE / "results" / "priority.json"))
    ap.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_worker:
        return serve_worker(args.socket)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists() and args.only != "gpu-supervisor":
        print("nginx is needed (apt-get install nginx)", file=sys.stderr)
        return 2
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run(args, nginx))


async def run(args, nginx: str) -> int:
    rate = args.overload * 1000 / args.ms
    tmp = Path(tempfile.mkdtemp(prefix="gs-prio-"))
    rundir = tmp / "run"
    sup_port, nginx_port = free_port(), free_port()
    policy = {
        "listen": {"host": "127.0.0.1", "port": sup_port},
        "runtime_dir": str(rundir),
        "worker": {"command": [PY, str(Path(__file__).resolve()), "--serve-worker", "--socket", "{socket}"],
                   "health": {"interval_s": 5, "timeout_s": 2, "failures": 3}},
        "queue": {"concurrency": 1, "max_size": args.low_max + 200, "priorities": ["high", "low"],
                  "default_priority": "low",
                  "levels": {"high": {"timeout_s": args.high_timeout, "max_size": 200},
                             "low": {"timeout_s": args.low_timeout, "max_size": args.low_max}}},
        "logging": {"format": "json", "level": "warning"},
    }
    (tmp / "policy.yaml").write_text(json.dumps(policy))
    procs: list[subprocess.Popen] = []
    results: dict = {}
    try:
        sup = subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(tmp / "policy.yaml")], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=open(tmp / "supervisor.log", "w"))
        procs.append(sup)
        await wait_http(f"http://127.0.0.1:{sup_port}/readyz")
        # the worker's socket is named <worker>-<replica>-<generation>.sock: the one in the runtime dir
        sock = next(rundir.glob("*.sock"))
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, sock, nginx_port, timeout=args.high_timeout))
        fronts = {"gpu-supervisor": f"http://127.0.0.1:{sup_port}", "nginx": f"http://127.0.0.1:{nginx_port}"}
        if args.only != "gpu-supervisor":
            ng = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(ng)
            await wait_http(f"{fronts['nginx']}/counter")
        client_timeout = args.high_timeout * 3 + 5
        print(f"offered {rate:.0f} req/s ({args.overload:g}x a {args.ms:g} ms worker) for {args.duration:g} s, "
              f"{args.high_share:.0%} high", flush=True)
        for name, base in fronts.items():
            if args.only and name != args.only:
                continue
            results[name] = await offer_load(base, sock, rate, args.duration, args.high_share, args.ms,
                                             args.seed, client_timeout)
            print(f"  {name}: done", flush=True)
    finally:
        stop_all(procs, tmp)
    ideal = ideal_priority(make_plan(rate, args.duration, args.high_share, args.seed), args.ms, args.low_max)
    report(results, ideal, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "ideal_priority_queue": ideal, "rate_rps": rate,
                               "duration_s": args.duration,
                               "service_ms": args.ms, "high_share": args.high_share,
                               "supervisor_levels": {"high": {"timeout_s": args.high_timeout, "max_size": 200},
                                                     "low": {"timeout_s": args.low_timeout,
                                                             "max_size": args.low_max}},
                               "nginx_proxy_read_timeout_s": args.high_timeout, "cpus": os.cpu_count()}, indent=1))
    print(f"wrote {out}")
    return 0



def report(results: dict, ideal: dict, args) -> None:
    def f(x):
        return "-" if x is None else f"{x:.1f}"

    print()
    print(f"{'front':15s} {'high p50':>9s} {'high p99':>9s} {'high ok':>8s} {'low refused':>12s} "
          f"{'refused p99':>12s} {'429 p99':>8s} {'low ok':>7s} {'util':>6s}")
    for name, r in results.items():
        h, lo, w = r["high"], r["low"], r["worker"]
        print(f"{name:15s} {f(h['p50_ms']):>9s} {f(h['p99_ms']):>9s} {h['ok_share']:>8.1%} "
              f"{lo['refused_share']:>12.1%} {f(lo['refused_p99_ms']):>12s} {f(lo['refused_429_p99_ms']):>8s} "
              f"{lo['ok']:>7d} {w['utilisation']:>6.1%}")
    print(f"{'ideal queue':15s} {ideal['high_p50_ms']:>9.1f} {ideal['high_p99_ms']:>9.1f}   "
          "(zero-overhead priority queue, one slot, same schedule: the floor for high)")
    print("(latencies in ms from each request's scheduled send time; util = completed /work answers x service "
          "time / wall: useful work)")
    for name, r in results.items():
        print(f"  {name}: low refused by {r['low']['refused_by']}, high refused by {r['high']['refused_by']}; "
              f"worker busy {r['worker']['busy_utilisation']:.1%} of the time (useful or not), its CPU "
              f"{r['worker']['cpu_utilisation']:.1%}; client lag p99 {r['client_lag_p99_ms']} ms")
    s = results.get("gpu-supervisor")
    if s:
        print()
        print("targets (gpu-supervisor):")
        print(f"  high p99 {f(s['high']['p99_ms'])} ms <= 3x service ({3 * args.ms:g} ms): "
              f"{'yes' if s['high']['p99_ms'] <= 3 * args.ms else 'NO'} "
              f"(ideal priority queue on this schedule: {ideal['high_p99_ms']:.1f} ms, "
              f"{s['high']['p99_ms'] / ideal['high_p99_ms']:.2f}x of it)")
        r429 = s["low"]["refused_429_p99_ms"]
        print(f"  rejections (429) p99 {f(r429)} ms < 10 ms: {'yes' if r429 is not None and r429 < 10 else 'NO'}")
        print(f"  worker busy {s['worker']['utilisation']:.1%} >= 90%: "
              f"{'yes' if s['worker']['utilisation'] >= 0.9 else 'NO'}")


if __name__ == "__main__":
    raise SystemExit(main())
