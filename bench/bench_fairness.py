"""Fairness between clients: a polite client's latency beside flooding ones, FIFO against deficit round robin.

In-process, pure asyncio, no HTTP: the real RequestQueue, one slot (`--concurrency`), and a service
time made by `asyncio.sleep` (a GPU serving one batch at a time). Three parts:

  polite      F flooding clients (F in --flooders, default 1 10 100), each keeping --depth requests
              outstanding (closed loop), and one polite client sending on a fixed schedule at half
              its fair share of the slots (--polite-rps to choose). The polite client's p50/p99
              latency (queued + served), fairness off (today's FIFO) and on (queue.fairness.key set).
  throughput  an open-loop --rate req/s (default 1000) from --keys clients on --slots slots: achieved
              rate, latency, and the process CPU time per request, fairness off and on.
  ops         the queue's own cost per request (enqueue + grant + release, and enqueue + cancel) with
              10k requests waiting over 1 to 1000 keys, fairness off and on; no event loop turns.

  daemon      (--daemon) the polite part again through a real gpu-supervisor over HTTP, in front of
              bench_priority's one-at-a-time worker; clients told apart by X-Client-ID.

Prints a table and writes bench/results/fairness.json.

    python bench/bench_fairness.py [--duration 10] [--ms 5] [--flooders 1 10 100] [--only polite] [--daemon]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.common import pct  # noqa: E402
from supervisor.config import Queue as QueueSettings  # noqa: E402
from supervisor.fairness import client_key  # noqa: E402
from supervisor.request_queue import GRANTED, RequestQueue  # noqa: E402

LEVEL, POOL = 0, "default"


def settings(fair: bool, concurrency: int, max_size: int = 100_000) -> QueueSettings:
    return QueueSettings(concurrency=concurrency, max_size=max_size, priorities=("normal",),
                         default_priority="normal", fairness={"key": "header:X-Client-ID"} if fair else {})


def key_of(q: RequestQueue, client: str) -> str | None:
    """What the request path does: the key from the client's header (hashed; None with fairness off)."""
    return client_key(q.settings.fairness, {"X-Client-ID": client}, "127.0.0.1")


async def one_request(q: RequestQueue, client: str, service_s: float) -> float:
    """Queue, then 'serve' for service_s; seconds from arrival to the end of service."""
    t0 = time.perf_counter()
    ticket = q.acquire(LEVEL, POOL, time.monotonic(), key=key_of(q, client))
    if ticket.state != GRANTED:
        try:
            await ticket.future
        except BaseException:
            q.cancel(ticket)
            raise
    t1 = time.perf_counter()
    try:
        await asyncio.sleep(service_s)
    finally:
        q.release(ticket, time.perf_counter() - t1)
    return time.perf_counter() - t0


# ---- polite client among flooders -----------------------------------------------------------------

async def polite_run(fair: bool, flooders: int, depth: int, service_s: float, polite_rps: float,
                     duration: float, concurrency: int) -> dict:
    q = RequestQueue(settings(fair, concurrency), asyncio.get_running_loop())
    q.open = True
    stop = asyncio.Event()
    flood_done = [0]

    async def flood(i: int) -> None:
        while not stop.is_set():
            await one_request(q, f"flood-{i}", service_s)
            flood_done[0] += 1

    flood_tasks = [asyncio.create_task(flood(i)) for i in range(flooders) for _ in range(depth)]
    # let the flood fill the queue before the polite client starts
    deadline = time.monotonic() + 5
    while q.total < flooders * depth - concurrency and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    lat: list[float] = []
    polite: set[asyncio.Task] = set()

    async def polite_one() -> None:
        lat.append(await one_request(q, "polite", service_s))

    t0 = time.perf_counter()
    n = int(duration * polite_rps)
    try:
        for i in range(n):
            delay = t0 + i / polite_rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(polite_one())
            polite.add(task)
            task.add_done_callback(polite.discard)
        if polite:
            await asyncio.wait(polite, timeout=60)
        wall = time.perf_counter() - t0
    finally:
        stop.set()
        for task in flood_tasks + list(polite):
            task.cancel()
        await asyncio.gather(*flood_tasks, *polite, return_exceptions=True)
    return {"fairness": fair, "flooders": flooders, "outstanding_per_flooder": depth, "polite_rps": polite_rps,
            "duration_s": round(wall, 1), "polite_sent": n,
            "polite_done": len(lat), "polite_p50_ms": round(pct(lat, 50) * 1000, 1),
            "polite_p99_ms": round(pct(lat, 99) * 1000, 1), "polite_max_ms": round(max(lat) * 1000, 1),
            "flood_done_per_s": round(flood_done[0] / wall, 1),
            "one_round_ms": round((flooders + 1) * service_s / concurrency * 1000, 1),
            "fifo_backlog_ms": round(flooders * depth * service_s / concurrency * 1000, 1)}


# ---- open-loop throughput -------------------------------------------------------------------------

async def throughput_run(fair: bool, rate: float, duration: float, keys: int, slots: int, service_s: float,
                         seed: int) -> dict:
    q = RequestQueue(settings(fair, slots), asyncio.get_running_loop())
    q.open = True
    rng = random.Random(seed)
    clients = [f"client-{rng.randrange(keys)}" for _ in range(int(rate * duration))]
    lat: list[float] = []
    lag: list[float] = []
    tasks: set[asyncio.Task] = set()

    async def one(client: str) -> None:
        lat.append(await one_request(q, client, service_s))

    cpu0, t0 = time.process_time(), time.perf_counter()
    for i, client in enumerate(clients):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(time.perf_counter() - at)
        task = asyncio.create_task(one(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"fairness": fair, "offered_rps": rate, "keys": keys, "slots": slots, "done": len(lat),
            "achieved_rps": round(len(lat) / wall, 1), "p50_ms": round(pct(lat, 50) * 1000, 2),
            "p99_ms": round(pct(lat, 99) * 1000, 2), "cpu_us_per_request": round(cpu / max(1, len(lat)) * 1e6, 1),
            "generator_lag_p99_ms": round(pct(lag, 99) * 1000, 2)}


# ---- the queue's own cost -------------------------------------------------------------------------

def ops_run(fair: bool, keys: int, n: int = 10_000, repeat: int = 5) -> dict:
    """Best of `repeat`: ns per request for enqueue + grant + release, and for enqueue + cancel."""
    loop = asyncio.new_event_loop()
    try:
        best_grant = best_cancel = float("inf")
        names = [client_key(settings(True, 1).fairness, {"X-Client-ID": f"c{i % keys}"}, None) for i in range(n)]
        if not fair:
            names = [None] * n
        for _ in range(repeat):
            q = RequestQueue(settings(fair, n), loop)  # n slots: a closed queue, then every ticket granted
            t0 = time.thread_time_ns()
            ts = [q.acquire(LEVEL, POOL, 0.0, key=k) for k in names]
            q.open = True
            q.pump()
            for t in ts:
                q.release(t, None)
            best_grant = min(best_grant, (time.thread_time_ns() - t0) / n)
            assert q.drained()
            q = RequestQueue(settings(fair, 1), loop)
            q.open = True
            holder = q.acquire(LEVEL, POOL, 0.0)
            t0 = time.thread_time_ns()
            ts = [q.acquire(LEVEL, POOL, 0.0, key=k) for k in names]
            for t in ts:
                q.cancel(t)
            best_cancel = min(best_cancel, (time.thread_time_ns() - t0) / n)
            q.release(holder, None)
            assert q.drained()
        return {"fairness": fair, "keys": keys if fair else None, "waiting": n,
                "enqueue_grant_release_ns": round(best_grant), "enqueue_cancel_ns": round(best_cancel)}
    finally:
        loop.close()


# ---- the same through a real daemon ---------------------------------------------------------------

async def run_daemon_part(args) -> list[dict]:
    rows = []
    for f in args.daemon_flooders:
        rps = args.polite_rps or min(20.0, 0.5 * 1000 / args.daemon_ms / (f + 1))
        duration = max(args.duration, args.polite_samples / 2 / rps)
        for fair in (False, True):
            rows.append(await daemon_run(fair, f, args.daemon_depth, args.daemon_ms, rps, duration))
            print(f"  daemon: {f} flooders, fairness {'on' if fair else 'off'}: done", flush=True)
    return rows


async def daemon_run(fair: bool, flooders: int, depth: int, ms: float, polite_rps: float, duration: float) -> dict:
    """gpu-supervisor (concurrency 1) in front of a worker serving one /work at a time; clients by X-Client-ID."""
    import shutil
    import subprocess
    import tempfile

    import aiohttp

    from bench.bench_priority import wait_http
    from bench.common import free_port, stop_all

    tmp = Path(tempfile.mkdtemp(prefix="gs-fair-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    policy = {
        "listen": {"host": "127.0.0.1", "port": port},
        "runtime_dir": str(tmp / "run"),
        "worker": {"command": [sys.executable, str(HERE / "bench_priority.py"), "--serve-worker", "--socket",
                               "{socket}"], "health": {"interval_s": 5, "timeout_s": 2, "failures": 3}},
        "queue": {"concurrency": 1, "max_size": 10_000, "priorities": ["high", "normal"], "default_priority": "normal",
                  "timeout_s": 300, "fairness": {"key": "header:X-Client-ID"} if fair else {}},
        "logging": {"format": "json", "level": "warning"},
    }
    (tmp / "policy.yaml").write_text(json.dumps(policy))
    procs: list[subprocess.Popen] = []
    path = f"{base}/work?ms={ms:g}"
    stop = asyncio.Event()
    lat: list[float] = []
    flood_done = [0]
    snapshot: dict = {}
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(tmp / "policy.yaml")],
                                      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / "supervisor.log", "w")))
        await wait_http(f"{base}/readyz")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=600)) as session:

            async def get(client: str) -> int:
                async with session.get(path, headers={"X-Client-ID": client}) as r:
                    await r.read()
                    return r.status

            async def flood(i: int) -> None:
                while not stop.is_set():
                    if await get(f"flood-{i}") == 200:
                        flood_done[0] += 1

            async def queued() -> int:
                async with session.get(f"{base}/status") as r:
                    st = await r.json()
                return sum(st.get("queue", {}).get("depth", {}).values())

            flood_tasks = [asyncio.create_task(flood(i)) for i in range(flooders) for _ in range(depth)]
            deadline = time.monotonic() + 20
            while await queued() < flooders * depth - 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

            async def polite_one() -> None:
                t = time.perf_counter()
                if await get("polite") == 200:
                    lat.append(time.perf_counter() - t)

            polite: set[asyncio.Task] = set()
            t0, n = time.perf_counter(), int(duration * polite_rps)
            for i in range(n):
                delay = t0 + i / polite_rps - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if i == n // 2:
                    async with session.get(f"{base}/status") as r:  # per worker: queue.fairness
                        st = await r.json()
                    snapshot = {name: w.get("queue", {}).get("fairness") for name, w in st.get("workers", {}).items()}
                task = asyncio.create_task(polite_one())
                polite.add(task)
                task.add_done_callback(polite.discard)
            if polite:
                await asyncio.wait(polite, timeout=300)
            wall = time.perf_counter() - t0
            stop.set()
            for task in flood_tasks + list(polite):
                task.cancel()
            await asyncio.gather(*flood_tasks, *polite, return_exceptions=True)
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"fairness": fair, "flooders": flooders, "outstanding_per_flooder": depth, "polite_rps": polite_rps,
            "duration_s": round(wall, 1), "polite_sent": n, "polite_done": len(lat),
            "polite_p50_ms": round(pct(lat, 50) * 1000, 1), "polite_p99_ms": round(pct(lat, 99) * 1000, 1),
            "polite_max_ms": round(max(lat, default=float("nan")) * 1000, 1),
            "flood_done_per_s": round(flood_done[0] / wall, 1),
            "one_round_ms": round((flooders + 1) * ms, 1), "fifo_backlog_ms": round(flooders * depth * ms, 1),
            "status_fairness_mid_run": snapshot}


# ---- main -------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per polite and throughput run")
    ap.add_argument("--ms", type=float, default=5.0, help="service time per request (one slot)")
    ap.add_argument("--concurrency", type=int, default=1, help="slots in the polite part")
    ap.add_argument("--flooders", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--depth", type=int, default=8, help="requests each flooder keeps outstanding")
    ap.add_argument("--polite-rps", type=float, default=0.0,
                    help="the polite client's rate; default: half its fair share of the slots, at most 20")
    ap.add_argument("--polite-samples", type=int, default=40, help="a run lasts long enough for this many")
    ap.add_argument("--rate", type=float, default=1000.0, help="open-loop rate of the throughput part")
    ap.add_argument("--keys", type=int, default=100, help="clients in the throughput part")
    ap.add_argument("--slots", type=int, default=8, help="slots in the throughput part")
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs per mode, off and on interleaved")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=("polite", "throughput", "ops", "daemon"))
    ap.add_argument("--daemon", action="store_true", help="also the polite part through a real daemon (HTTP)")
    ap.add_argument("--daemon-flooders", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--daemon-ms", type=float, default=10.0, help="the worker's service time in the daemon part")
    ap.add_argument("--daemon-depth", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "results" / "fairness.json"))
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"
    results: dict = {"loop": loop_name, "cpus": os.cpu_count(), "service_ms": args.ms}
    if args.only in (None, "ops"):
        results["ops"] = [ops_run(False, 1)] + [ops_run(True, k) for k in (1, 10, 100, 1000)]
        report_ops(results["ops"])
    if args.only in (None, "throughput"):
        runs = [asyncio.run(throughput_run(fair, args.rate, args.duration, args.keys, args.slots, args.ms / 1000,
                                           args.seed + i)) for i in range(args.repeat) for fair in (False, True)]
        results["throughput"] = runs
        report_throughput(runs)
    if args.only in (None, "polite"):
        results["polite"] = []
        for f in args.flooders:
            rps = args.polite_rps or min(20.0, 0.5 * args.concurrency * 1000 / args.ms / (f + 1))
            duration = max(args.duration, args.polite_samples / rps)
            for fair in (False, True):
                results["polite"].append(asyncio.run(polite_run(fair, f, args.depth, args.ms / 1000, rps,
                                                                duration, args.concurrency)))
                print(f"  polite: {f} flooders, fairness {'on' if fair else 'off'}: done", flush=True)
        report_polite(results["polite"], args.ms, args.concurrency, args.depth)
    if args.daemon or args.only == "daemon":
        results["daemon"] = asyncio.run(run_daemon_part(args))
        report_polite(results["daemon"], args.daemon_ms, 1, args.daemon_depth,
                      front="through a real daemon (HTTP; bench_priority's one-at-a-time ctl_worker, concurrency 1):")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results | {"args": vars(args)}, indent=1))
    print(f"wrote {out}")
    return 0


def report_ops(rows: list[dict]) -> None:
    print()
    print(f"{'queue cost':22s} {'enqueue+grant+release':>22s} {'enqueue+cancel':>15s}   (CPU ns per request, "
          f"{rows[0]['waiting']} waiting)")
    for r in rows:
        name = "fairness off (FIFO)" if not r["fairness"] else f"fairness on, {r['keys']} keys"
        print(f"{name:22s} {r['enqueue_grant_release_ns']:>22d} {r['enqueue_cancel_ns']:>15d}")


def report_throughput(rows: list[dict]) -> None:
    print()
    print(f"{'throughput':14s} {'offered':>8s} {'achieved':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'CPU us/req':>11s}")
    for r in rows:
        print(f"{'fairness ' + ('on' if r['fairness'] else 'off'):14s} {r['offered_rps']:>8.0f} "
              f"{r['achieved_rps']:>9.1f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['cpu_us_per_request']:>11.1f}")
    med = {fair: {m: statistics.median(r[m] for r in rows if r["fairness"] == fair)
                  for m in ("achieved_rps", "p50_ms", "p99_ms", "cpu_us_per_request")} for fair in (False, True)}
    for fair in (False, True):
        m = med[fair]
        print(f"{'median ' + ('on' if fair else 'off'):14s} {'':>8s} {m['achieved_rps']:>9.1f} {m['p50_ms']:>7.2f} "
              f"{m['p99_ms']:>7.2f} {m['cpu_us_per_request']:>11.1f}")
    print(f"  ({rows[0]['keys']} clients, {rows[0]['slots']} slots; CPU per request includes the load generator and "
          f"the event loop; median difference {med[True]['cpu_us_per_request'] - med[False]['cpu_us_per_request']:+.1f}"
          " us/request)")


def report_polite(rows: list[dict], ms: float, slots: int, depth: int, front: str = "") -> None:
    print()
    if front:
        print(front)
    print(f"{'flooders':>8s} {'fairness':>9s} {'polite/s':>8s} {'n':>4s} {'polite p50':>11s} {'polite p99':>11s} "
          f"{'max':>8s} {'one round':>10s} {'FIFO backlog':>13s} {'flood/s':>8s}")
    for r in rows:
        print(f"{r['flooders']:>8d} {'on' if r['fairness'] else 'off':>9s} {r['polite_rps']:>8.2f} "
              f"{r['polite_done']:>4d} {r['polite_p50_ms']:>11.1f} "
              f"{r['polite_p99_ms']:>11.1f} {r['polite_max_ms']:>8.1f} {r['one_round_ms']:>10.1f} "
              f"{r['fifo_backlog_ms']:>13.1f} {r['flood_done_per_s']:>8.1f}")
    print(f"(ms from arrival to end of service; {ms:g} ms service, {slots} slot(s), each flooder "
          f"keeps {depth} outstanding; the polite client sends half its fair share; one round = a turn of "
          "every client, the DRR bound for a newcomer)")


if __name__ == "__main__":
    raise SystemExit(main())
