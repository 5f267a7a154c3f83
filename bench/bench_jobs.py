"""Async jobs: submit throughput, added latency, recovery after kill -9, and lease re-delivery on Redis.

Runs real gpu-supervisor daemons in front of tests/workers/ctl_worker.py, with the default SQLite store (in
the daemon's state directory) and a real redis-server on a Unix socket (tests/redis_server.py), and measures

* submit throughput: jobs/s acknowledged 202 by `--clients` concurrent clients sending `Prefer:
  respond-async` back to back for `--duration` s (the jobs also run meanwhile), per store;
* added latency: a job (submit -> `GET /jobs/{id}` shows it finished, polling every `--poll-ms`; and ->
  its result fetched) against the same request sent synchronously, one at a time, per store;
* recovery after kill -9 of the daemon with `--queued` jobs queued behind a running one: from the new
  daemon's spawn to its listening, to the first queued job finished, to all of them finished, per store;
* two daemons on one Redis: kill -9 the one running a job; time until the survivor starts it again
  (`job_reclaimed`), against `jobs.lease_s` (1 and 3 s by default).

    .venv/bin/python bench/bench_jobs.py [--duration 10] [--clients 4] [--requests 50] [--trials 4]

Prints a table and writes bench/results/jobs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench.common import pct, save_results  # noqa: E402
from tests.harness import SupervisorProcess, fast_config, pid_alive, wait_until  # noqa: E402
from tests.redis_server import REDIS_SERVER, RedisServer  # noqa: E402

RESULTS = REPO / "bench" / "results"
ASYNC = {"Prefer": "respond-async"}
PARTS = ("throughput", "latency", "recovery", "redelivery")
FINAL = ("succeeded", "failed", "cancelled", "expired")


def policy(store: str | None, concurrency: int = 4, **jobs: object) -> dict:
    return fast_config(queue={"concurrency": concurrency, "max_size": 100_000, "timeout_s": 120},
                       jobs={"max_pending": 1_000_000, **({"store": store} if store else {}), **jobs})


def wall(ev: dict) -> float:
    return datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()


def ms(xs: list[float]) -> dict:
    return {"p50_ms": pct(xs, 50) * 1000, "p99_ms": pct(xs, 99) * 1000, "mean_ms": statistics.fmean(xs) * 1000,
            "n": len(xs)}


async def job(sp: SupervisorProcess, job_id: str) -> dict:
    async with sp.session.get(f"/jobs/{job_id}") as r:
        return await r.json()


async def submit(sp: SupervisorProcess, path: str, method: str = "GET", data: bytes | None = None) -> dict:
    async with sp.session.request(method, path, headers=ASYNC, data=data) as r:
        body = await r.json()
        assert r.status == 202, (r.status, body)
        return body


async def final(sp: SupervisorProcess, job_id: str, timeout: float = 60, interval: float = 0.02) -> dict:
    async def done() -> dict | None:
        j = await job(sp, job_id)
        return j if j["status"] in FINAL else None
    return await wait_until(done, timeout, f"job {job_id} finished", interval=interval)


class Stores:
    """The stores under test: SQLite (the default) and, when redis-server is installed, one Redis."""

    def __init__(self) -> None:
        self.redis: RedisServer | None = None
        self.rdir: Path | None = None

    async def __aenter__(self) -> Stores:
        if REDIS_SERVER:
            self.rdir = Path(tempfile.mkdtemp(prefix="gs-rb-"))
            self.redis = RedisServer(self.rdir)
            await self.redis.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.redis:
            await self.redis.stop()
        if self.rdir:
            shutil.rmtree(self.rdir, ignore_errors=True)

    def kinds(self) -> list[str]:
        return ["sqlite", "redis"] if self.redis else ["sqlite"]

    async def url(self, kind: str, fresh: bool = True) -> str | None:
        if kind == "sqlite":
            return None
        assert self.redis
        if fresh:  # each measurement starts from an empty stream
            await self.redis.stop()
            await self.redis.start()
        return self.redis.url


async def daemon(cfg: dict, tmp: Path | None = None) -> SupervisorProcess:
    sp = SupervisorProcess(tmp or Path(tempfile.mkdtemp(prefix="gs-jb-")), cfg)
    await sp.start()
    return sp


async def finish(sp: SupervisorProcess) -> None:
    await sp.stop()
    shutil.rmtree(sp.tmp, ignore_errors=True)


# -- submit throughput ----------------------------------------------------------------------------

async def throughput(stores: Stores, kind: str, args: argparse.Namespace) -> dict:
    sp = await daemon(policy(await stores.url(kind)))
    try:
        lat: list[float] = []
        codes: dict[str, int] = {}
        end = time.perf_counter() + args.duration

        async def client() -> None:
            async with aiohttp.ClientSession(base_url=sp.url) as s:
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    async with s.get("/hello", headers=ASYNC) as r:
                        await r.read()
                        codes[str(r.status)] = codes.get(str(r.status), 0) + 1
                        if r.status == 202:
                            lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        elapsed = time.perf_counter() - t0
        # and how fast the daemon works them off (they ran meanwhile, on 4 slots)
        st = (await sp.status()).get("jobs", {})
        return {"store": kind, "clients": args.clients, "seconds": elapsed, "codes": codes,
                "accepted_per_s": codes.get("202", 0) / elapsed, "submit": ms(lat), "jobs_status": st}
    finally:
        await finish(sp)


# -- added latency --------------------------------------------------------------------------------

async def added_latency(stores: Stores, kind: str, args: argparse.Namespace) -> dict:
    sp = await daemon(policy(await stores.url(kind)))
    path = f"/work?ms={args.work_ms:g}"
    poll = args.poll_ms / 1000
    try:
        for _ in range(5):  # warm: connections both ways
            async with sp.session.get(path) as r:
                await r.read()
        sync, done, result = [], [], []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            async with sp.session.get(path) as r:
                await r.read()
                assert r.status == 200
            sync.append(time.perf_counter() - t0)
        for _ in range(args.requests):
            t0 = time.perf_counter()
            j = await submit(sp, path)
            while j["status"] not in FINAL:
                await asyncio.sleep(poll)
                j = await job(sp, j["id"])
            done.append(time.perf_counter() - t0)
            assert j["status"] == "succeeded", j
            async with sp.session.get(f"/jobs/{j['id']}/result") as r:
                await r.read()
                assert r.status == 200
            result.append(time.perf_counter() - t0)
        s, d, res = ms(sync), ms(done), ms(result)
        return {"store": kind, "work_ms": args.work_ms, "poll_ms": args.poll_ms, "sync": s, "job_done": d,
                "job_result": res, "added_p50_ms": res["p50_ms"] - s["p50_ms"],
                "added_p99_ms": res["p99_ms"] - s["p99_ms"]}
    finally:
        await finish(sp)


# -- recovery after kill -9 -----------------------------------------------------------------------

async def recovery(stores: Stores, kind: str, args: argparse.Namespace) -> dict:
    url = await stores.url(kind)
    cfg = policy(url, concurrency=1)
    tmp = Path(tempfile.mkdtemp(prefix="gs-jr-"))
    sp = await daemon(cfg, tmp)
    try:
        # one job running (not safe to repeat: it ends `interrupted`), the rest queued behind it
        running = (await submit(sp, "/echo?delay=60", "POST", b"x"))["id"]
        await wait_until(lambda: _status_is(sp, running, "running"), 10, "a job running")
        queued = [(await submit(sp, f"/hello?i={i}"))["id"] for i in range(args.queued)]
        states = [(await job(sp, j))["status"] for j in queued]
        assert states == ["queued"] * len(queued), states
        worker = await sp.worker_pid()
        sp.proc.send_signal(signal.SIGKILL)
        await sp.wait_exit(10)
        await sp.stop()
        await wait_until(lambda: not pid_alive(worker), 10, "the worker died with its daemon")
        again = SupervisorProcess(tmp, cfg)
        spawn = time.time()
        await again.start(wait_ready=False)
        try:
            listening = wall(again.events("listening")[0]) - spawn
            await again.wait_ready()
            ready = time.time() - spawn
            finals = [await final(again, j) for j in queued]
            assert all(f["status"] == "succeeded" for f in finals), finals
            ends = sorted(wall(e) - spawn for e in again.events("job_finished") if e.get("job_id") in set(queued))
            interrupted = await job(again, running)
            return {"store": kind, "queued": args.queued, "listening_s": listening, "ready_s": ready,
                    "first_job_finished_s": ends[0], "all_finished_s": ends[-1],
                    "running_job_after": {"status": interrupted["status"],
                                          "error": (interrupted.get("error") or {}).get("type")}}
        finally:
            await again.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _status_is(sp: SupervisorProcess, job_id: str, status: str) -> bool:
    return (await job(sp, job_id))["status"] == status


# -- two daemons on one Redis ---------------------------------------------------------------------

async def redelivery(stores: Stores, lease_s: float, args: argparse.Namespace) -> dict:
    cfg = policy(await stores.url("redis"), concurrency=1, lease_s=lease_s, max_attempts=10)
    pair = [await daemon(cfg), await daemon(cfg)]
    runs = []
    try:
        for _ in range(args.trials):
            j = (await submit(pair[0], f"/sleep?s={args.job_s:g}"))["id"]
            holder = await wait_until(lambda: _holder(pair), 20, "a daemon running the job") - 1
            other = pair[1 - holder]
            await asyncio.sleep(args.kill_after)  # lets the holder renew its lease once or more
            reclaims = len(other.events("job_reclaimed"))
            t_kill = time.time()
            pair[holder].proc.send_signal(signal.SIGKILL)
            await pair[holder].wait_exit(10)
            ev = await other.wait_log("job_reclaimed", timeout=lease_s * 3 + 10, count=reclaims + 1)
            assert ev["job_id"] == j, ev
            f = await final(other, j, timeout=args.job_s + 30)
            started = other.events("job_started", job_id=j)  # logged just after job_reclaimed
            runs.append({"reclaimed_s": wall(ev) - t_kill,
                         "restarted_s": wall(started[-1]) - t_kill if started else None,
                         "status": f["status"], "attempts": f["attempts"]})
            await finish(pair[holder])
            pair[holder] = await daemon(cfg)
        xs = [r["reclaimed_s"] for r in runs]
        return {"lease_s": lease_s, "trials": len(runs), "reclaimed_p50_s": pct(xs, 50), "reclaimed_min_s": min(xs),
                "reclaimed_max_s": max(xs), "runs": runs}
    finally:
        for sp in pair:
            await finish(sp)


async def _holder(pair: list[SupervisorProcess]) -> int | None:
    """1 + the index of the daemon whose worker has a request in flight (truthy for wait_until)."""
    for i, sp in enumerate(pair):
        if (await sp.status())["workers"]["default"]["replicas"][0]["inflight"] > 0:
            return i + 1
    return None


async def main(args: argparse.Namespace) -> dict:
    res: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    async with Stores() as stores:
        res["stores"] = stores.kinds()
        for part, fn in (("throughput", throughput), ("latency", added_latency), ("recovery", recovery)):
            res[part] = []
            if part not in args.parts:
                continue
            for kind in stores.kinds():
                print(f"{part} ({kind}) ...", flush=True)
                res[part].append(await fn(stores, kind, args))
        res["redelivery"] = []
        if stores.redis and "redelivery" in args.parts:
            for lease in args.leases:
                print(f"redelivery (lease_s {lease:g}) ...", flush=True)
                res["redelivery"].append(await redelivery(stores, lease, args))
    return res


def report(res: dict) -> str:
    c = res["config"]
    lines = [f"submit throughput, {c['clients']} clients back to back for {c['duration']:g}s (GET /hello, "
             "Prefer: respond-async):",
             f"{'store':<8}{'202/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'other codes':>14}"]
    for t in res.get("throughput", []):
        other = {k: v for k, v in t["codes"].items() if k != "202"}
        lines.append(f"{t['store']:<8}{t['accepted_per_s']:>9.1f}{t['submit']['p50_ms']:>9.2f}"
                     f"{t['submit']['p99_ms']:>9.2f}{json.dumps(other) if other else '-':>14}")
    lines += ["", f"added latency of a job (GET /work?ms={c['work_ms']:g}, one at a time, polling "
              f"GET /jobs/{{id}} every {c['poll_ms']:g} ms; {c['requests']} each):",
              f"{'store':<8}{'sync p50':>10}{'p99':>8}{'job done p50':>14}{'p99':>8}{'+result p50':>13}{'p99':>8}"
              f"{'added p50':>11}{'p99':>8}"]
    for t in res["latency"]:
        lines.append(f"{t['store']:<8}{t['sync']['p50_ms']:>10.1f}{t['sync']['p99_ms']:>8.1f}"
                     f"{t['job_done']['p50_ms']:>14.1f}{t['job_done']['p99_ms']:>8.1f}"
                     f"{t['job_result']['p50_ms']:>13.1f}{t['job_result']['p99_ms']:>8.1f}"
                     f"{t['added_p50_ms']:>11.1f}{t['added_p99_ms']:>8.1f}")
    lines += ["", f"recovery after kill -9 with {c['queued']} jobs queued (seconds from the new daemon's spawn):",
              f"{'store':<8}{'listening':>10}{'ready':>8}{'1st job done':>14}{'all done':>10}  running job after"]
    for t in res["recovery"]:
        rj = t["running_job_after"]
        lines.append(f"{t['store']:<8}{t['listening_s']:>10.3f}{t['ready_s']:>8.3f}{t['first_job_finished_s']:>14.3f}"
                     f"{t['all_finished_s']:>10.3f}  {rj['status']} {rj['error'] or ''}")
    if res["redelivery"]:
        lines += ["", f"two daemons on one Redis, kill -9 of the one running a job (/sleep?s={c['job_s']:g}, "
                  f"killed {c['kill_after']:g}s after it started):",
                  f"{'lease_s':>8}{'trials':>7}{'re-delivered p50':>18}{'min':>8}{'max':>8}  (s after the kill)"]
        for t in res["redelivery"]:
            lines.append(f"{t['lease_s']:>8g}{t['trials']:>7}{t['reclaimed_p50_s']:>17.3f}s{t['reclaimed_min_s']:>7.3f}s"
                         f"{t['reclaimed_max_s']:>7.3f}s")
    else:
        lines.append("(redis-server not installed: no Redis figures)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each throughput run (default 10)")
    p.add_argument("--clients", type=int, default=4, help="concurrent submitting clients (default 4)")
    p.add_argument("--requests", type=int, default=50, help="requests per latency run (default 50)")
    p.add_argument("--work-ms", type=float, default=20.0, help="service time of the latency request (default 20)")
    p.add_argument("--poll-ms", type=float, default=5.0, help="GET /jobs/{id} polling interval (default 5)")
    p.add_argument("--queued", type=int, default=20, help="jobs queued at the kill -9 (default 20)")
    p.add_argument("--leases", type=float, nargs="+", default=[1.0, 3.0], help="lease_s values (default 1 3)")
    p.add_argument("--trials", type=int, default=4, help="kills per lease_s (default 4)")
    p.add_argument("--job-s", type=float, default=2.0, help="the job killed under its daemon runs this long")
    p.add_argument("--kill-after", type=float, default=0.5, help="seconds between the job's start and the kill")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure (default all)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/jobs.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    res = asyncio.run(main(args))
    out = save_results(res, RESULTS / "jobs.json", args.out)
    print(report(res))
    print(f"\nwrote {out}")
