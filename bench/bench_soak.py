"""Soak benchmark: steady mixed load through a real daemon for minutes; is its memory flat?

A real gpu-supervisor runs one ctl worker (tests/workers/ctl_worker.py) with `--replicas` replicas.
An open-loop generator sends `--rate` requests/s (a fixed schedule; kept-alive connections parsed
strictly with httptools, as bench_chaos.py does) of a mix: GET /work?ms=.., SSE GET /stream, POST
/v1/echo (retry: true route) and POST /echo with small bodies. After `--warmup` s of the same load,
the daemon's RSS and open fds are sampled every `--sample-every` s (psutil) for `--minutes`.

Target: RSS flat within `--flat-mb` (10 MB): max - min of the samples. Reported: first, last, max,
min, the least-squares slope (MiB/min) over the whole run and over its second half, fds, answers by
outcome and code, latency, and whether the generator kept its schedule.

    flock /tmp/bench.lock .venv/bin/python bench/bench_soak.py [--minutes 10] [--rate 100]

Prints a table and writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_chaos import Conn, Req, all_serving, daemon_usage, judge  # noqa: E402
from bench.common import pct, save_results  # noqa: E402
from tests.harness import SupervisorProcess, ctl_command, fast_config, wait_until  # noqa: E402

RESULTS = REPO / "bench" / "results"
MIB = 1 << 20


def policy(args: argparse.Namespace) -> dict:
    base = fast_config(queue={"concurrency": args.concurrency, "max_size": 10_000, "timeout_s": 60},
                       routes=[{"path": "/v1/", "methods": ["POST"], "retry": True}])
    worker = base.pop("worker")
    base["worker_defaults"] = {k: v for k, v in worker.items() if k != "command"}
    base["workers"] = {"soak": {"command": ctl_command("--name", "soak"), "replicas": args.replicas,
                                "concurrency": args.concurrency}}
    return base


def next_request(rng: random.Random, n: int) -> Req:
    x = rng.random()
    if x < 0.6:
        return Req(n, "work", "GET", f"/work?ms={rng.choice((1, 5, 20))}", b"", True)
    if x < 0.75:
        k = rng.randint(3, 10)
        return Req(n, "stream", "GET", f"/stream?n={k}&interval=0.02", b"", True, k)
    size = rng.choice((0, 64, 1024, 16384))
    if x < 0.9:
        return Req(n, "echo_retry", "POST", "/v1/echo", rng.randbytes(size), True)
    return Req(n, "echo", "POST", "/echo", rng.randbytes(size), False)


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) in value per minute; NaN with fewer than two points."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return sxy / sxx * 60 if sxx else float("nan")


class Load:
    """Open loop: request i is due at t0 + i/rate whatever the answers do; idle connections are reused."""

    def __init__(self, port: int, rate: float, timeout: float, max_inflight: int, seed: int):
        self.port = port
        self.rate = rate
        self.timeout = timeout
        self.rng = random.Random(seed)
        self.idle: list[Conn] = []
        self.slots = asyncio.Semaphore(max_inflight)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        self.lat_ms: list[float] = []
        self.late = 0          # requests sent more than 100 ms behind schedule
        self.sent = 0
        self.problems: list[dict] = []
        self.tasks: set[asyncio.Task] = set()

    async def one(self, req: Req) -> None:
        conn = self.idle.pop() if self.idle else Conn(self.port)
        t = time.monotonic()
        try:
            a = await conn.request(req.method, req.target, req.body, f"soak-{req.n}", self.timeout)
        finally:
            self.slots.release()
        self.lat_ms.append((time.monotonic() - t) * 1000)
        outcome, detail = judge(req, a)
        self.outcomes[outcome] += 1
        if a.status is not None:
            self.codes[str(a.status)] += 1
        if outcome not in ("ok", "sse_done") and len(self.problems) < 20:
            self.problems.append({"request_id": f"soak-{req.n}", "target": req.target, "status": a.status,
                                  "outcome": outcome, "detail": detail})
        self.idle.append(conn)

    async def run(self, seconds: float) -> float:
        t0 = time.monotonic()
        n = int(seconds * self.rate)
        for i in range(n):
            due = t0 + i / self.rate
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.1:
                self.late += 1
            await self.slots.acquire()
            task = asyncio.create_task(self.one(next_request(self.rng, self.sent)))
            self.sent += 1
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.tasks:
            await asyncio.gather(*self.tasks)
        return time.monotonic() - t0

    async def close(self) -> None:
        for c in self.idle:
            await c.close()


async def main(args: argparse.Namespace) -> dict:
    sp = SupervisorProcess(Path(tempfile.mkdtemp(prefix="gs-soak-")), policy(args))
    await sp.start(timeout=60)
    try:
        await wait_until(lambda: all_serving(sp, "soak"), 30, "every replica serving")
        warm = Load(sp.port, args.rate, args.timeout, args.max_inflight, args.seed + 1)
        await warm.run(args.warmup)
        await warm.close()

        samples: list[dict] = []
        load = Load(sp.port, args.rate, args.timeout, args.max_inflight, args.seed)
        stop = asyncio.Event()
        t0 = time.monotonic()

        async def sampler() -> None:
            while True:
                u = daemon_usage(sp)
                samples.append({"t_s": round(time.monotonic() - t0, 2), **u})
                try:
                    await asyncio.wait_for(stop.wait(), args.sample_every)
                    return
                except TimeoutError:
                    pass

        stask = asyncio.create_task(sampler())
        elapsed = await load.run(args.minutes * 60)
        stop.set()
        await stask
        await load.close()
        st = await sp.status()
        restarts = sum(r["restarts"] for r in st["workers"]["soak"]["replicas"])
    finally:
        await sp.stop()

    rss = [s["rss_bytes"] / MIB for s in samples]
    pts = [(s["t_s"], s["rss_bytes"] / MIB) for s in samples]
    half = [p for p in pts if p[0] >= pts[-1][0] / 2]
    fds = [s["num_fds"] for s in samples]
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": elapsed, "sent": load.sent, "achieved_rps": load.sent / elapsed, "late_sends": load.late,
        "outcomes": dict(load.outcomes), "codes": dict(sorted(load.codes.items())),
        "latency_ms": {"p50": pct(load.lat_ms, 50), "p99": pct(load.lat_ms, 99), "max": max(load.lat_ms)},
        "worker_restarts": restarts,
        "rss_mib": {"first": rss[0], "last": rss[-1], "max": max(rss), "min": min(rss),
                    "spread": max(rss) - min(rss), "slope_per_min": slope_per_min(pts),
                    "slope_per_min_second_half": slope_per_min(half)},
        "fds": {"first": fds[0], "last": fds[-1], "max": max(fds), "min": min(fds)},
        "flat": max(rss) - min(rss) <= args.flat_mb,
        # kept-alive worker connections (one per slot at most) may come and go; nothing else should
        "fds_flat": fds[-1] - fds[0] <= args.replicas * args.concurrency,
        "samples": samples, "problems": load.problems,
    }


def report(res: dict) -> str:
    r, f, lat = res["rss_mib"], res["fds"], res["latency_ms"]
    return "\n".join([
        f"{res['sent']} requests in {res['seconds']:.0f} s ({res['achieved_rps']:.1f} req/s of "
        f"{res['config']['rate']:g} asked; {res['late_sends']} sent >100 ms late), "
        f"{len(res['samples'])} samples every {res['config']['sample_every']:g} s",
        f"outcomes: {res['outcomes']}  codes: {res['codes']}  worker restarts: {res['worker_restarts']}",
        f"latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms",
        "",
        f"{'daemon RSS MiB':<16}{'first':>8}{'last':>8}{'min':>8}{'max':>8}{'spread':>8}{'slope/min':>11}"
        f"{'2nd half':>10}",
        f"{'':<16}{r['first']:>8.1f}{r['last']:>8.1f}{r['min']:>8.1f}{r['max']:>8.1f}{r['spread']:>8.1f}"
        f"{r['slope_per_min']:>+11.3f}{r['slope_per_min_second_half']:>+10.3f}",
        f"daemon fds: first {f['first']}, last {f['last']}, min {f['min']}, max {f['max']}: "
        f"{'PASS' if res['fds_flat'] else 'FAIL'}",
        f"flat within {res['config']['flat_mb']:g} MB: {'PASS' if res['flat'] else 'FAIL'}",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of sampled load (default 10)")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second, open loop (default 100)")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of the same load before sampling")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    p.add_argument("--flat-mb", type=float, default=10.0, help="allowed RSS spread in MiB (default 10)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4, help="slots per replica (default 4)")
    p.add_argument("--max-inflight", type=int, default=512, help="cap on requests in flight from the generator")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/soak.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    res = asyncio.run(main(args))
    out = save_results(res, RESULTS / "soak.json", args.out)
    print(report(res))
    print(f"\nwrote {out}")
    sys.exit(0 if res["flat"] else 1)
