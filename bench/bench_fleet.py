"""Fleet benchmark: throughput scaling over replicas, and latency of the survivors when one replica is killed.

Runs a real gpu-supervisor with one worker of N ctl_worker replicas (concurrency 1 each) whose
`GET /work?ms=20` takes a fixed 20 ms, so one replica can serve at most 50 req/s:

* scaling: for each N, a closed loop of 2N+2 clients (every replica always has a request waiting)
  for --duration seconds; throughput against the ideal N x 50 req/s and against N x what one
  replica serves to one client on its own socket (the worker's real cycle: a 20 ms asyncio sleep
  plus its HTTP handling is ~21.5 ms, so even direct it never reaches 50 req/s); with the CPU used
  meanwhile by the daemon (also idle, before the load), the replicas and this load generator
  (psutil), to show which one limits;
* failover: 4 replicas offered --load (default 60%) of their capacity on a fixed open-loop schedule
  (latency from each request's scheduled send time); one replica is SIGKILLed; p99 of the requests
  the OTHER replicas served (X-Worker-Pid) in the --window seconds after the kill against the
  --window seconds before it, and every request that did not end in a 200.

    .venv/bin/python bench/bench_fleet.py [--replicas 1,2,4,8] [--duration 10] [--trials 5]

Prints a table and writes bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from bench.common import pct, save_results  # noqa: E402
from tests.harness import SupervisorProcess, ctl_command, fast_config, kill_quiet, wait_until  # noqa: E402

RESULTS = REPO / "bench" / "results"
WORKER = "m"
MS_PER_S = 1000.0  # one replica with one slot serves MS_PER_S / service ms requests per second


def policy(replicas: int, backoff_s: float, health_interval_s: float, runtime_dir: Path) -> dict:
    """fast_config() reshaped into a fleet of one worker with `replicas` one-slot replicas."""
    base = fast_config(queue={"max_size": 10_000, "timeout_s": 60}, runtime_dir=str(runtime_dir),
                       logging={"format": "json", "level": "info"})
    defaults = base.pop("worker")
    defaults.pop("command")
    defaults["health"]["interval_s"] = health_interval_s
    defaults["restart"] = {"backoff_initial_s": backoff_s, "backoff_max_s": backoff_s,
                           "max_restarts": 1000, "window_s": 60}  # deliberate kills are not a crash loop
    base["worker_defaults"] = defaults
    base["workers"] = {WORKER: {"command": ctl_command("--name", WORKER), "replicas": replicas, "concurrency": 1}}
    return base


async def replicas(sp: SupervisorProcess) -> list[dict]:
    return (await sp.status())["workers"][WORKER]["replicas"]


async def serving(sp: SupervisorProcess, n: int) -> bool:
    return sum(1 for r in await replicas(sp) if r["state"] in ("ready", "busy")) >= n


async def start(replica_count: int, backoff_s: float, args: argparse.Namespace) -> SupervisorProcess:
    tmp = Path(tempfile.mkdtemp(prefix="gs-fleet-"))
    sp = SupervisorProcess(tmp, policy(replica_count, backoff_s, args.health_interval, tmp / "run"))
    await sp.start()
    await wait_until(lambda: serving(sp, replica_count), 60, f"{replica_count} replicas serving")
    return sp


class CpuMeter:
    """CPU seconds used by the daemon, its replicas (and their children) and this process, over a span."""

    def __init__(self, daemon_pid: int):
        self.daemon = psutil.Process(daemon_pid)
        self.me = psutil.Process()

    def _read(self) -> dict:
        def cpu(p: psutil.Process) -> float:
            try:
                t = p.cpu_times()
            except psutil.Error:
                return 0.0
            return t.user + t.system

        try:
            kids = self.daemon.children(recursive=True)
        except psutil.Error:
            kids = []
        sys_t = psutil.cpu_times()
        return {"t": time.monotonic(), "daemon": cpu(self.daemon), "workers": sum(cpu(k) for k in kids),
                "client": cpu(self.me), "busy": sum(sys_t) - sys_t.idle - sys_t.iowait}

    def start(self) -> None:
        self.t0 = self._read()

    def stop(self) -> dict:
        """Percent of one core for each party over the span; `host` is all cores together (200% = 2 cores)."""
        t1 = self._read()
        wall = t1["t"] - self.t0["t"]
        return {k + "_cpu_pct": round(100 * (t1[k] - self.t0[k]) / wall, 1)
                for k in ("daemon", "workers", "client", "busy")}


async def replica_ceiling(args: argparse.Namespace) -> dict:
    """What one replica serves to one client straight on its socket: the per-replica ceiling."""
    sp = await start(1, 0.05, args)
    assert sp.tmp
    try:
        sock = next((sp.tmp / "run").glob(f"{WORKER}-0-*.sock"))
        n = 0
        lat: list[float] = []
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as direct:
            stop_at = time.monotonic() + args.warmup + min(args.duration, 5.0)
            t0 = time.monotonic() + args.warmup
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                async with direct.get(f"http://worker/work?ms={args.ms:g}") as r:
                    await r.read()
                if time.monotonic() > t0:
                    n += 1
                    lat.append(time.perf_counter() - t)
            elapsed = time.monotonic() - t0
    finally:
        await sp.stop()
    return {"rps": round(n / elapsed, 1), "p50_ms": round(pct(lat, 50) * 1000, 2),
            "p99_ms": round(pct(lat, 99) * 1000, 2)}


async def scaling_point(n: int, args: argparse.Namespace, ceiling_rps: float) -> dict:
    sp = await start(n, 0.05, args)
    assert sp.session and sp.proc
    idle = CpuMeter(sp.proc.pid)
    idle.start()
    await asyncio.sleep(args.idle)
    idle_cpu = idle.stop()["daemon_cpu_pct"]
    clients = args.clients_per_replica * n + 2
    path = f"/work?ms={args.ms:g}"
    codes: Counter[str] = Counter()
    by_pid: Counter[str] = Counter()
    lat: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.monotonic() + args.warmup + args.duration
    try:
        async def client() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                try:
                    async with sp.session.get(path) as r:
                        await r.read()
                        if measuring:
                            codes[str(r.status)] += 1
                            by_pid[r.headers.get("X-Worker-Pid", "?")] += 1
                            lat.append(time.perf_counter() - t)
                except aiohttp.ClientError:
                    if measuring:
                        errors += 1

        meter = CpuMeter(sp.proc.pid)
        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(args.warmup)
        measuring = True
        meter.start()
        t0 = time.monotonic()
        await asyncio.sleep(args.duration)
        measuring = False
        elapsed = time.monotonic() - t0
        cpu = meter.stop()
        await asyncio.gather(*tasks)
    finally:
        await sp.stop()
    ok = codes.get("200", 0)
    ideal = n * MS_PER_S / args.ms
    rps = ok / elapsed
    return {"replicas": n, "clients": clients, "seconds": round(elapsed, 2), "ok": ok,
            "rps": round(rps, 1), "ideal_rps": ideal, "ratio": round(rps / ideal, 3),
            "ratio_to_direct": round(rps / (n * ceiling_rps), 3), "daemon_idle_cpu_pct": idle_cpu,
            "daemon_cpu_ms_per_request": round((cpu["daemon_cpu_pct"] - idle_cpu) * 10 / rps, 3),
            "p50_ms": round(pct(lat, 50) * 1000, 2), "p99_ms": round(pct(lat, 99) * 1000, 2),
            "non_200": {k: v for k, v in codes.items() if k != "200"}, "client_errors": errors,
            "per_replica_min": min(by_pid.values(), default=0), "per_replica_max": max(by_pid.values(), default=0),
            "replicas_seen": len(by_pid), **cpu}


async def failover_trial(sp: SupervisorProcess, args: argparse.Namespace, trial: int) -> dict:
    """One kill in the middle of a fixed schedule; every request is timed from its scheduled send."""
    assert sp.session
    n = args.failover_replicas
    rate = args.load * n * MS_PER_S / args.ms
    span = 2 * args.window + 1.0  # 0.5 s lead-in, window before, window after, 0.5 s tail
    plan = [i / rate for i in range(int(rate * span))]
    reps = await replicas(sp)
    victim = reps[trial % n]["pid"]
    path = f"/work?ms={args.ms:g}"
    clock = time.perf_counter
    results: list[tuple[float, float, int, str | None]] = []  # (sent offset, latency, status, pid)

    async def one(off: float) -> None:
        status, pid = -1, None
        try:
            async with sp.session.get(path) as r:
                await r.read()
                status, pid = r.status, r.headers.get("X-Worker-Pid")
        except (aiohttp.ClientError, TimeoutError):
            pass
        results.append((off, clock() - (t0 + off), status, pid))

    async def killer() -> None:
        await asyncio.sleep(max(0.0, t0 + kill_at - clock()))
        kill_quiet(victim, signal.SIGKILL)

    kill_at = 0.5 + args.window
    t0 = clock() + 0.1
    tasks = [asyncio.create_task(killer())]
    for off in plan:
        delay = t0 + off - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(off)))
    await asyncio.gather(*tasks)
    await wait_until(lambda: _replaced(sp, n, victim), 30, "victim replaced and all replicas serving")

    def window(lo: float, hi: float) -> list[tuple[float, float, int, str | None]]:
        return [r for r in results if lo <= r[0] < hi and r[3] != str(victim)]

    before = window(kill_at - args.window, kill_at)
    after = window(kill_at, kill_at + args.window)
    failed = [r for r in results if r[2] != 200]
    return {
        "victim_pid": victim, "rate_rps": round(rate, 1), "sent": len(results),
        "before_n": len(before), "after_n": len(after),
        "before_p50_ms": round(pct([r[1] for r in before], 50) * 1000, 2),
        "before_p99_ms": round(pct([r[1] for r in before], 99) * 1000, 2),
        "after_p50_ms": round(pct([r[1] for r in after], 50) * 1000, 2),
        "after_p99_ms": round(pct([r[1] for r in after], 99) * 1000, 2),
        "after_max_ms": round(max((r[1] for r in after), default=float("nan")) * 1000, 2),
        "failed": len(failed), "failed_codes": dict(Counter(str(r[2]) for r in failed)),
        "victim_served_before": sum(1 for r in results if r[3] == str(victim)),
        "_lat": {"before": [r[1] for r in before], "after": [r[1] for r in after]},
    }


async def _replaced(sp: SupervisorProcess, n: int, victim: int) -> bool:
    reps = await replicas(sp)
    return all(r["state"] in ("ready", "busy") and r["pid"] != victim for r in reps) and len(reps) == n


async def failover(args: argparse.Namespace) -> dict:
    sp = await start(args.failover_replicas, args.backoff, args)
    assert sp.session
    try:
        for _ in range(20):  # warm: kept-alive connections, a service-time sample per replica
            async with sp.session.get(f"/work?ms={args.ms:g}") as r:
                await r.read()
        trials = []
        for i in range(args.trials):
            trials.append(await failover_trial(sp, args, i))
            await asyncio.sleep(0.5)
        restarts = [r["restarts"] for r in await replicas(sp)]
        last_exit = [(r["last_exit"] or {}).get("reason") for r in await replicas(sp)]
    finally:
        await sp.stop()
    before = [x for t in trials for x in t["_lat"]["before"]]
    after = [x for t in trials for x in t["_lat"]["after"]]
    for t in trials:
        del t["_lat"]
    pooled = {"before_n": len(before), "after_n": len(after),
              "before_p50_ms": round(pct(before, 50) * 1000, 2), "before_p99_ms": round(pct(before, 99) * 1000, 2),
              "after_p50_ms": round(pct(after, 50) * 1000, 2), "after_p99_ms": round(pct(after, 99) * 1000, 2),
              "failed": sum(t["failed"] for t in trials)}
    pooled["p99_ratio"] = round(pooled["after_p99_ms"] / pooled["before_p99_ms"], 3)
    return {"replicas": args.failover_replicas, "load": args.load, "window_s": args.window,
            "backoff_s": args.backoff, "trials": trials, "pooled": pooled,
            "restarts_after": restarts, "last_exit_reasons": last_exit}


async def main(args: argparse.Namespace) -> dict:
    res: dict = {"config": {"service_ms": args.ms, "duration_s": args.duration, "warmup_s": args.warmup,
                            "clients": f"{args.clients_per_replica}N+2", "health_interval_s": args.health_interval}}
    if not args.skip_scaling:
        res["replica_direct"] = await replica_ceiling(args)
        print(f"  one replica direct, one client: {res['replica_direct']['rps']} req/s", flush=True)
        res["scaling"] = []
        for n in args.replicas:
            point = await scaling_point(n, args, res["replica_direct"]["rps"])
            res["scaling"].append(point)
            print(f"  N={n}: {point['rps']} req/s ({point['ratio']:.2f}x ideal), daemon CPU "
                  f"{point['daemon_cpu_pct']}%", flush=True)
    if not args.skip_failover:
        res["failover"] = await failover(args)
        print("  failover: done", flush=True)
    return res


def report(res: dict, args: argparse.Namespace) -> str:
    lines: list[str] = []
    if "scaling" in res:
        d = res["replica_direct"]
        lines += [f"scaling: closed loop, {res['config']['clients']} clients, {args.duration:g} s per point, "
                  f"GET /work?ms={args.ms:g}, concurrency 1 per replica, health probes every "
                  f"{args.health_interval:g} s",
                  f"one replica straight on its socket, one client: {d['rps']} req/s (p50 {d['p50_ms']} ms): "
                  "the per-replica ceiling",
                  f"{'N':>3}{'clients':>8}{'req/s':>9}{'ideal':>7}{'ratio':>7}{'/direct':>8}{'p50 ms':>8}{'p99 ms':>8}"
                  f"{'spread':>12}{'fail':>5}{'daemon':>8}{'idle':>7}{'ms/req':>7}{'workers':>9}{'client':>8}{'host':>7}"]
        for p in res["scaling"]:
            fails = sum(p["non_200"].values()) + p["client_errors"]
            lines.append(f"{p['replicas']:>3}{p['clients']:>8}{p['rps']:>9.1f}{p['ideal_rps']:>7.0f}"
                         f"{p['ratio']:>7.3f}{p['ratio_to_direct']:>8.3f}{p['p50_ms']:>8.2f}{p['p99_ms']:>8.2f}"
                         f"{p['per_replica_min']:>6}-{p['per_replica_max']:<5}{fails:>5}"
                         f"{p['daemon_cpu_pct']:>7.1f}%{p['daemon_idle_cpu_pct']:>6.1f}%"
                         f"{p['daemon_cpu_ms_per_request']:>7.3f}"
                         f"{p['workers_cpu_pct']:>8.1f}%{p['client_cpu_pct']:>7.1f}%{p['busy_cpu_pct']:>6.0f}%")
        lines.append("(ratio: to N x 50 req/s; /direct: to N x the one-replica ceiling; spread: answers per "
                     "replica, min-max; CPU in % of one core over the point: daemon under load, idle = daemon "
                     "with no load, ms/req = daemon CPU per request above idle; host: all "
                     f"{os.cpu_count()} cores, every process on the machine)")
        under = [p for p in res["scaling"] if p["ratio"] < 0.9]
        lines.append("target >= 0.9x ideal: " + ("met at every N" if not under else
                                                 "MISSED at N=" + ",".join(str(p["replicas"]) for p in under)))
    if "failover" in res:
        f = res["failover"]
        pl = f["pooled"]
        lines += ["", f"failover: {f['replicas']} replicas at {f['load']:.0%} of capacity "
                  f"({f['trials'][0]['rate_rps']} req/s open loop), SIGKILL one replica, {len(f['trials'])} trials; "
                  f"latency of requests the other replicas served, {f['window_s']:g} s before vs after the kill",
                  f"{'trial':>6}{'before n':>9}{'p50':>8}{'p99':>8}{'after n':>9}{'p50':>8}{'p99':>8}{'max':>8}"
                  f"{'ratio':>7}{'failed':>7}"]
        for i, t in enumerate(f["trials"]):
            lines.append(f"{i:>6}{t['before_n']:>9}{t['before_p50_ms']:>8.1f}{t['before_p99_ms']:>8.1f}"
                         f"{t['after_n']:>9}{t['after_p50_ms']:>8.1f}{t['after_p99_ms']:>8.1f}{t['after_max_ms']:>8.1f}"
                         f"{t['after_p99_ms'] / t['before_p99_ms']:>7.2f}{t['failed']:>7}")
        lines.append(f"{'all':>6}{pl['before_n']:>9}{pl['before_p50_ms']:>8.1f}{pl['before_p99_ms']:>8.1f}"
                     f"{pl['after_n']:>9}{pl['after_p50_ms']:>8.1f}{pl['after_p99_ms']:>8.1f}{'':>8}"
                     f"{pl['p99_ratio']:>7.2f}{pl['failed']:>7}")
        lines.append(f"targets: p99 after / before <= 1.5x: {'yes' if pl['p99_ratio'] <= 1.5 else 'NO'} "
                     f"({pl['p99_ratio']:.2f}x); failed requests 0: {'yes' if pl['failed'] == 0 else 'NO'} "
                     f"({pl['failed']}); restarts per replica afterwards {f['restarts_after']}, "
                     f"last exit {f['last_exit_reasons']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8],
                   help="replica counts for the scaling points (default 1,2,4,8)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per scaling point (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point (default 1)")
    p.add_argument("--clients-per-replica", type=int, default=2, help="closed-loop clients: this x N + 2")
    p.add_argument("--ms", type=float, default=20.0, help="the worker's service time (default 20)")
    p.add_argument("--idle", type=float, default=2.0, help="seconds of daemon CPU measured idle per point")
    p.add_argument("--health-interval", type=float, default=2.0,
                   help="worker.health.interval_s (default 2, the product default)")
    p.add_argument("--failover-replicas", type=int, default=4)
    p.add_argument("--load", type=float, default=0.6, help="failover offered load, share of capacity (default 0.6)")
    p.add_argument("--window", type=float, default=2.0, help="seconds compared before and after the kill")
    p.add_argument("--trials", type=int, default=5, help="kills in the failover run (default 5)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="respawn backoff of the killed replica (default 1 s: most of the window on N-1)")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-failover", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/fleet.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        import uvloop
        uvloop.install()  # the load generator shares 2 cores with the daemon: keep it cheap
    except ImportError:
        pass
    res = asyncio.run(main(args))
    out = save_results(res, RESULTS / "fleet.json", args.out)
    print(report(res, args))
    print(f"\nwrote {out}")
