"""Recovery benchmark: time from a worker fault to the first good answer, and goodput under chaos.

Runs a real gpu-supervisor in front of tests/workers/ctl_worker.py (ready in ~0.2 s) and measures

* MTTR after SIGKILL of the worker: from the kill to the first 200 for a request sent after it;
* MTTR after a hang (SIGSTOP): the same, which also needs the health probes to notice;
  (the supervisor SIGCONTs a hung worker before SIGTERM, so the first 200 may come from the old
  worker finishing its work; "new worker" is when the replacement answered its first request);
* goodput (requests/s answered 200) of a closed-loop load with no faults, and with the worker
  SIGKILLed every --kill-interval seconds.

    .venv/bin/python bench/bench_recovery.py [--trials 20] [--duration 10] [--clients 8]

Prints a table and writes bench/results/recovery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench.common import pct  # noqa: E402
from tests.harness import SupervisorProcess, fast_config, kill_quiet, wait_until  # noqa: E402

RESULTS = REPO / "bench" / "results"


def policy(args: argparse.Namespace) -> dict:
    return fast_config(
        worker={
            "health": {"interval_s": args.health_interval, "timeout_s": args.health_timeout,
                       "failures": args.health_failures},
            "restart": {"backoff_initial_s": args.backoff_initial, "backoff_max_s": args.backoff_max,
                        "max_restarts": 100_000, "window_s": 60},  # deliberate kills are not a crash loop
            "stop_grace_s": 1,
        },
        queue={"concurrency": args.concurrency, "max_size": 10_000, "timeout_s": 60},
        retry={"max_attempts": 5},
    )


async def serving_pid(sp: SupervisorProcess, not_pid: int | None = None) -> int | None:
    w = (await sp.status())["worker"]
    if w["state"] in ("ready", "busy") and w["pid"] and w["pid"] != not_pid:
        return w["pid"]
    return None


async def mttr_trial(sp: SupervisorProcess, sig: int) -> dict:
    pid = await wait_until(lambda: serving_pid(sp), 30, "a serving worker")
    async with sp.session.get("/hello") as r:  # warm: a kept-alive connection each way
        assert r.status == 200
    t0 = time.monotonic()
    kill_quiet(pid, sig)
    first_200 = new_worker = None
    errors = 0
    while new_worker is None:
        async with sp.session.get("/hello") as r:
            await r.read()
            t = time.monotonic() - t0
            if r.status != 200:
                errors += 1
                continue
            if first_200 is None:
                first_200 = t
            if r.headers.get("X-Worker-Pid") != str(pid):
                new_worker = t
    return {"first_200_s": first_200, "new_worker_s": new_worker, "errors": errors}


async def mttr(sp: SupervisorProcess, sig: int, trials: int) -> dict:
    runs = [await mttr_trial(sp, sig) for _ in range(trials)]
    first = [r["first_200_s"] for r in runs]
    new = [r["new_worker_s"] for r in runs]
    return {
        "trials": trials,
        "first_200_p50_s": pct(first, 50), "first_200_p95_s": pct(first, 95),
        "first_200_mean_s": statistics.fmean(first),
        "new_worker_p50_s": pct(new, 50), "new_worker_p95_s": pct(new, 95),
        "errors": sum(r["errors"] for r in runs),
        "runs": runs,
    }


async def load(sp: SupervisorProcess, duration: float, clients: int, kill_every: float | None) -> dict:
    codes: dict[str, int] = {}
    client_errors = 0
    kills = 0
    stop_at = time.monotonic() + duration

    async def client() -> None:
        nonlocal client_errors
        while time.monotonic() < stop_at:
            try:
                async with sp.session.get("/work?ms=5") as r:
                    await r.read()
                    codes[str(r.status)] = codes.get(str(r.status), 0) + 1
            except aiohttp.ClientError:
                client_errors += 1

    async def chaos() -> None:
        nonlocal kills
        assert kill_every is not None
        next_kill = time.monotonic() + kill_every
        while True:
            await asyncio.sleep(max(0.0, next_kill - time.monotonic()))
            if time.monotonic() >= stop_at:
                return
            pid = await serving_pid(sp)
            if pid:
                kill_quiet(pid, signal.SIGKILL)
                kills += 1
            next_kill += kill_every

    t0 = time.monotonic()
    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    if kill_every:
        tasks.append(asyncio.create_task(chaos()))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    ok = codes.get("200", 0)
    return {"seconds": elapsed, "codes": codes, "client_errors": client_errors, "kills": kills,
            "goodput_rps": ok / elapsed}


def retries_total(metrics_text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith("gpu_supervisor_retries_total{"))


async def main(args: argparse.Namespace) -> dict:
    cfg = policy(args)
    sp = SupervisorProcess(Path(tempfile.mkdtemp(prefix="gs-bench-")), cfg)
    await sp.start()
    try:
        result: dict = {"config": {
            "backoff_initial_s": args.backoff_initial, "backoff_max_s": args.backoff_max,
            "health_interval_s": args.health_interval, "health_timeout_s": args.health_timeout,
            "health_failures": args.health_failures, "concurrency": args.concurrency,
            "clients": args.clients, "duration_s": args.duration, "kill_interval_s": args.kill_interval,
        }}
        result["mttr_sigkill"] = await mttr(sp, signal.SIGKILL, args.trials)
        result["mttr_sigstop"] = await mttr(sp, signal.SIGSTOP, args.trials)
        await wait_until(lambda: serving_pid(sp), 30, "a serving worker")
        r0 = retries_total(await sp.metrics())
        result["goodput_baseline"] = await load(sp, args.duration, args.clients, None)
        await wait_until(lambda: serving_pid(sp), 30, "a serving worker")
        result["goodput_chaos"] = await load(sp, args.duration, args.clients, args.kill_interval)
        result["goodput_chaos"]["retries"] = retries_total(await sp.metrics()) - r0
        result["supervisor_alive"] = sp.proc is not None and sp.proc.returncode is None
    finally:
        await sp.stop()
    return result


def report(res: dict) -> str:
    c = res["config"]
    # expected: backoff attempt 1 waits between initial/2 and initial; a hang needs `failures`
    # probes, each up to interval + timeout, before the SIGTERM
    hang_window = c["health_failures"] * (c["health_interval_s"] + c["health_timeout_s"])
    lines = [
        f"backoff {c['backoff_initial_s'] / 2:g}-{c['backoff_initial_s']:g}s (first restart), "
        f"health window {c['health_failures']} x ({c['health_interval_s']:g}s interval + "
        f"{c['health_timeout_s']:g}s timeout) <= {hang_window:g}s",
        "",
        f"{'fault':<10}{'trials':>7}{'first 200 p50':>15}{'p95':>9}{'new worker p50':>16}{'p95':>9}{'errors':>8}",
    ]
    for name, key in (("SIGKILL", "mttr_sigkill"), ("SIGSTOP", "mttr_sigstop")):
        m = res[key]
        lines.append(f"{name:<10}{m['trials']:>7}{m['first_200_p50_s']:>14.3f}s{m['first_200_p95_s']:>8.3f}s"
                     f"{m['new_worker_p50_s']:>15.3f}s{m['new_worker_p95_s']:>8.3f}s{m['errors']:>8}")
    b, ch = res["goodput_baseline"], res["goodput_chaos"]
    lines += [
        "",
        f"{'load':<26}{'seconds':>8}{'200/s':>9}{'non-200':>9}{'conn err':>9}{'kills':>7}",
        f"{'no faults':<26}{b['seconds']:>8.1f}{b['goodput_rps']:>9.1f}"
        f"{sum(v for k, v in b['codes'].items() if k != '200'):>9}{b['client_errors']:>9}{b['kills']:>7}",
        f"{'SIGKILL every ' + format(c['kill_interval_s'], 'g') + 's':<26}{ch['seconds']:>8.1f}"
        f"{ch['goodput_rps']:>9.1f}{sum(v for k, v in ch['codes'].items() if k != '200'):>9}"
        f"{ch['client_errors']:>9}{ch['kills']:>7}",
        f"goodput under chaos: {ch['goodput_rps'] / b['goodput_rps']:.2f}x of the fault-free run "
        f"({ch['retries']:g} retries); supervisor alive: {res['supervisor_alive']}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="faults per kind for MTTR (default 20)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each goodput run (default 10)")
    p.add_argument("--kill-interval", type=float, default=1.0, help="seconds between SIGKILLs under chaos")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients for goodput (default 8)")
    p.add_argument("--concurrency", type=int, default=4, help="queue.concurrency (default 4)")
    p.add_argument("--backoff-initial", type=float, default=0.1)
    p.add_argument("--backoff-max", type=float, default=2.0)
    p.add_argument("--health-interval", type=float, default=0.25)
    p.add_argument("--health-timeout", type=float, default=0.25)
    p.add_argument("--health-failures", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/recovery.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    res = asyncio.run(main(args))
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    res["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = args.out or RESULTS / "recovery.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(report(res))
    print(f"\nwrote {out}")
