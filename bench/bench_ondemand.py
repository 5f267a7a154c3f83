"""On-demand workers and the GPU memory ledger: cold starts, swaps, and two models taking turns on one GPU.

No GPU is needed: `gpu.budget_mb: {0: 1000}` and each worker's declared `gpu_memory_mb` drive the ledger,
and ctl_worker's `--startup-delay` (env CTL_STARTUP_DELAY) emulates a model load. Runs a real gpu-supervisor
and measures

* cold start: a request for an unloaded on-demand worker, from send to answer, against the worker's own
  load time (spawn to first healthy answer, the `worker_state ... healthy after Xs` log); the difference is
  the daemon's overhead (target <= 50 ms). `idle_unload_s` unloads it between trials;
* swap: two workers of 600 MiB on a 1000 MiB budget; a request for the unloaded one when the idle resident
  must be evicted first (min_resident_s 0): send to answer, against the newcomer's load time;
* alternating traffic: two closed-loop clients (one per model, each back to back, `--service-ms` per
  request) for `--duration` s, with the default min_resident_s / max_starvation_s and one other setting:
  swaps per minute, goodput, the longest wait, against an ideal scheduler on the same pattern (the swap
  costs only the model load, service costs only the service time; it swaps when the other model has
  waited `max_starvation_s`, or, the daemon's own rule, once the resident has stayed `min_resident_s`);
* the sleep tier (sleepy_worker: `--sleep-load` s to load, `--wake-ms` to wake): swap latency through
  sleep/wake against stop/start (targets: a swap through sleep costs at most the wake + 50 ms), and goodput
  of alternating traffic, sleep/wake against stop/start (target: at least 3x with a 3 s load).

    .venv/bin/python bench/bench_ondemand.py [--trials 10] [--load 1.0] [--duration 60] [--sleep-only]

Prints a table and writes bench/results/ondemand.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
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
from tests.harness import SupervisorProcess, ctl_command, fast_config, wait_until  # noqa: E402

SLEEPY = str(REPO / "tests" / "workers" / "sleepy_worker.py")

RESULTS = REPO / "bench" / "results"
HEALTHY = re.compile(r"healthy after ([\d.]+)s")
TIMELINE = ("worker_spawned", "worker_state", "worker_exited", "gpu_room_evict", "gpu_room_drain", "gpu_room_refused")


def ledger_policy(workers: dict, load_s: float, budget_mb: int = 1000) -> dict:
    """Named ctl workers on GPU 0 of a `budget_mb` budget, each loading for `load_s` before it listens."""
    base = fast_config(logging={"format": "json", "level": "info"})
    w = base.pop("worker")
    base["worker_defaults"] = {k: v for k, v in w.items() if k != "command"}
    base["worker_defaults"]["env"] = {"CTL_STARTUP_DELAY": str(load_s)}
    base["workers"] = {name: {"command": ctl_command("--name", name), "gpus": [0], "models": [name],
                              "start": "on_demand", **spec} for name, spec in workers.items()}
    base["gpu"] = {"budget_mb": {0: budget_mb}, "settle_timeout_s": 0.5}
    base["queue"] = {"concurrency": 4, "max_size": 1000, "timeout_s": 120}
    return base


def wall(ev: dict) -> float:
    return datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()


def loads(sp: SupervisorProcess, worker: str) -> list[dict]:
    """The worker's `-> ready` moves after a start, with the load time the daemon measured."""
    return [e for e in sp.events("worker_state", worker=worker, new="ready") if HEALTHY.match(e.get("reason", ""))]


async def state(sp: SupervisorProcess, worker: str) -> str:
    return (await sp.status())["workers"][worker]["replicas"][0]["state"]


async def call(sp: SupervisorProcess, worker: str, delay: float = 0.0, timeout: float = 120) -> tuple[int, str]:
    async with sp.session.post(f"/v1/echo?delay={delay:g}", json={"model": worker},
                               headers={"X-Request-Timeout": str(timeout)}) as r:
        await r.read()
        return r.status, r.headers.get("X-Worker-Name", "")


async def timed_start(sp: SupervisorProcess, worker: str, n_loads: int) -> dict:
    """Send one request for an unloaded `worker`; the time to its answer and the load inside it."""
    sent_wall, t0 = time.time(), time.perf_counter()
    status, name = await call(sp, worker)
    total = time.perf_counter() - t0
    answered_wall = time.time()
    assert status == 200 and name == worker, (status, name)
    ready = (await wait_until(lambda: len(loads(sp, worker)) > n_loads and loads(sp, worker), 10,
                              f"{worker} ready log"))[n_loads]
    load = float(HEALTHY.match(ready["reason"]).group(1))
    spawned = sp.events("worker_spawned", worker=worker)[-1]
    listening = [e for e in sp.events("worker_output", worker=worker) if "listening on" in e.get("line", "")
                 and e.get("worker_pid") == spawned.get("worker_pid")]
    return {"total_s": total, "load_s": load, "overhead_ms": (total - load) * 1000,
            # where the overhead sits: before the spawn, and after the first healthy answer (log clock)
            "before_spawn_ms": (wall(spawned) - sent_wall) * 1000,  # to the spawn's log line, after fork/exec
            "after_ready_ms": (answered_wall - wall(ready)) * 1000,
            # inside the load: the worker's "listening" line to the daemon's first healthy probe (probe cadence)
            "listen_to_ready_ms": (wall(ready) - wall(listening[-1])) * 1000 if listening else None}


def summary(runs: list[dict]) -> dict:
    out: dict = {"trials": len(runs)}
    for k in ("total_s", "load_s", "overhead_ms", "before_spawn_ms", "after_ready_ms", "listen_to_ready_ms"):
        xs = [r[k] for r in runs if r[k] is not None]
        if not xs:
            continue
        out[k] = {"p50": pct(xs, 50), "mean": statistics.fmean(xs), "max": max(xs), "min": min(xs)}
    out["runs"] = runs
    return out


async def warm_latency(sp: SupervisorProcess, worker: str, n: int = 50) -> float:
    """p50 ms of a request to a loaded worker: the ordinary proxy cost inside every overhead figure."""
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call(sp, worker)
        xs.append((time.perf_counter() - t0) * 1000)
    return pct(xs, 50)


async def with_daemon(cfg: dict, body):  # type: ignore[no-untyped-def]
    tmp = Path(tempfile.mkdtemp(prefix="gs-od-"))
    sp = SupervisorProcess(tmp, cfg)
    await sp.start(wait_ready=False)
    try:
        await wait_until(lambda: _listed(sp), 20, "daemon answering /status")
        return await body(sp)
    finally:
        await sp.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _listed(sp: SupervisorProcess) -> bool:
    try:
        return bool((await sp.status())["workers"])
    except (aiohttp.ClientError, KeyError):
        return False


async def cold_start(args: argparse.Namespace) -> dict:
    cfg = ledger_policy({"a": {"gpu_memory_mb": 300, "idle_unload_s": args.idle_unload, "min_resident_s": 0}},
                        args.load)

    async def body(sp: SupervisorProcess) -> dict:
        runs = []
        for i in range(args.trials):
            await wait_until(lambda: _is(sp, "a", "unloaded"), 30, "a unloaded", interval=0.05)
            runs.append(await timed_start(sp, "a", i))
        warm = await warm_latency(sp, "a")
        res = summary(runs)
        res["warm_p50_ms"] = warm
        return res

    return await with_daemon(cfg, body)


async def _is(sp: SupervisorProcess, worker: str, st: str) -> bool:
    return await state(sp, worker) == st


async def swap(args: argparse.Namespace) -> dict:
    spec = {"gpu_memory_mb": 600, "min_resident_s": 0}
    cfg = ledger_policy({"a": spec, "b": spec}, args.load)

    async def body(sp: SupervisorProcess) -> dict:
        status, _ = await call(sp, "a")  # a resident and idle
        assert status == 200
        runs = []
        for i in range(args.trials):
            target, other = ("b", "a") if i % 2 == 0 else ("a", "b")
            await wait_until(lambda: _is(sp, other, "ready"), 30, f"{other} ready", interval=0.05)
            evictions = len(sp.events("gpu_room_evict"))
            run = await timed_start(sp, target, len(loads(sp, target)))
            ev = sp.events("gpu_room_evict")[evictions]
            assert ev["worker"] == other, ev
            gone = [e for e in sp.events("worker_exited", worker=other, reason="evicted") if wall(e) >= wall(ev)]
            spawned = sp.events("worker_spawned", worker=target)[-1]
            run["evict_to_exit_ms"] = (wall(gone[0]) - wall(ev)) * 1000 if gone else None
            run["evict_to_spawn_ms"] = (wall(spawned) - wall(ev)) * 1000
            runs.append(run)
        res = summary(runs)
        stops = [r["evict_to_spawn_ms"] for r in runs]
        res["evict_to_spawn_ms"] = {"p50": pct(stops, 50), "max": max(stops)}
        return res

    return await with_daemon(cfg, body)


async def alternating(args: argparse.Namespace, min_resident: float | None, max_starvation: float | None) -> dict:
    spec: dict = {"gpu_memory_mb": 600}
    if min_resident is not None:
        spec["min_resident_s"] = min_resident
    if max_starvation is not None:
        spec["max_starvation_s"] = max_starvation
    cfg = ledger_policy({"a": spec, "b": spec}, args.load)
    service = args.service_ms / 1000

    async def body(sp: SupervisorProcess) -> dict:
        served: collections.Counter[str] = collections.Counter()
        codes: collections.Counter[str] = collections.Counter()
        waits: dict[str, list[float]] = {"a": [], "b": []}
        t_start = time.perf_counter()
        end = t_start + args.duration
        spawned0 = len(sp.events("worker_spawned"))
        evict0, drain0 = len(sp.events("gpu_room_evict")), len(sp.events("gpu_room_drain"))

        async def client(target: str) -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    status, name = await call(sp, target, delay=service, timeout=args.duration + 60)
                except (aiohttp.ClientError, TimeoutError):
                    codes["client_error"] += 1
                    continue
                codes[str(status)] += 1
                waits[target].append(time.perf_counter() - t0)
                if status == 200:
                    served[name] += 1

        await asyncio.gather(client("a"), client("b"))
        elapsed = time.perf_counter() - t_start
        starts = sp.events("worker_spawned")[spawned0:]
        loaded = [float(HEALTHY.match(e["reason"]).group(1)) for e in sp.events("worker_state", new="ready")
                  if HEALTHY.match(e.get("reason", ""))]
        ok = sum(served.values())
        t_wall0 = time.time() - (time.perf_counter() - t_start)
        timeline = [(round(wall(e) - t_wall0, 3), e["event"], e.get("worker"), e.get("reason") or e.get("why"))
                    for e in sp.logs if e.get("event") in TIMELINE and wall(e) >= t_wall0 - 0.01
                    and (e["event"] != "worker_state" or e.get("new") == "ready" and HEALTHY.match(e["reason"]))]
        return {
            "min_resident_s": min_resident if min_resident is not None else "default",
            "max_starvation_s": max_starvation if max_starvation is not None else "default",
            "seconds": elapsed, "codes": dict(codes), "served": dict(served),
            "goodput_rps": ok / elapsed, "starts": len(starts),
            "swaps_per_min": max(0, len(starts) - 1) / elapsed * 60,  # the first start is no swap
            "evictions": len(sp.events("gpu_room_evict")) - evict0, "drains": len(sp.events("gpu_room_drain")) - drain0,
            "load_s_p50": pct(loaded, 50),
            "longest_wait_s": {k: max(v) if v else None for k, v in waits.items()},
            "wait_p99_s": {k: pct(v, 99) for k, v in waits.items()},
            "timeline": timeline,
        }

    return await with_daemon(cfg, body)


# -- the sleep tier --------------------------------------------------------------------------------
def sleep_policy(args: argparse.Namespace, sleep: bool, min_resident: float) -> dict:
    """Two sleepy workers of 600 MiB on a 1000 MiB budget, loading `--sleep-load` s; with sleep mode
    (asleep: 50 MiB on the GPU, 10 MiB of host RAM) or without (stop/start)."""
    base = fast_config(logging={"format": "json", "level": "info"})
    w = base.pop("worker")
    base["worker_defaults"] = {k: v for k, v in w.items() if k != "command"}
    base["workers"] = {
        name: {"command": [sys.executable, SLEEPY, "--socket", "{socket}", "--name", name,
                           "--load-s", str(args.sleep_load), "--wake-ms", str(args.wake_ms)],
               "gpus": [0], "models": [name], "start": "on_demand", "gpu_memory_mb": 600,
               "min_resident_s": min_resident,
               **({"sleep": {"gpu_memory_mb": 50, "host_memory_mb": 10}} if sleep else {})}
        for name in ("a", "b")}
    base["gpu"] = {"budget_mb": {0: 1000}, "settle_timeout_s": 0.5, "host_reserve_mb": 0}
    base["queue"] = {"concurrency": 4, "max_size": 1000, "timeout_s": 120}
    return base


async def complete(sp: SupervisorProcess, worker: str, delay: float = 0.0, timeout: float = 120) -> tuple[int, int]:
    async with sp.session.post(f"/v1/completions?delay={delay:g}", json={"model": worker, "prompt": "x"},
                               headers={"X-Request-Timeout": str(timeout)}) as r:
        body = await r.json()
        return r.status, body.get("pid", 0) if isinstance(body, dict) else 0


async def sleep_swaps(args: argparse.Namespace, sleep: bool) -> dict:
    """Swap latency: a request for the worker that is asleep (or unloaded) while the other is awake and idle."""
    async def body(sp: SupervisorProcess) -> dict:
        for name in ("a", "b"):  # both loaded once: from now on every swap is a wake (or a cold start)
            assert (await complete(sp, name))[0] == 200
        runs = []
        for i in range(args.sleep_trials):
            target = "a" if i % 2 == 0 else "b"
            woken = len(sp.events("worker_woken", worker=target))
            t0 = time.perf_counter()
            status, _ = await complete(sp, target)
            total = time.perf_counter() - t0
            assert status == 200
            run = {"total_s": total}
            if sleep:
                ev = (await wait_until(lambda: len(sp.events("worker_woken", worker=target)) > woken
                                       and sp.events("worker_woken", worker=target), 10, "woken log"))[woken]
                run["wake_s"] = ev["wake_s"]
                run["overhead_ms"] = (total - ev["wake_s"]) * 1000
            runs.append(run)
        totals = [r["total_s"] for r in runs]
        out: dict = {"trials": len(runs), "total_s": {"p50": pct(totals, 50), "max": max(totals)}, "runs": runs}
        if sleep:
            over = [r["overhead_ms"] for r in runs]
            wakes = [r["wake_s"] for r in runs]
            out["wake_s"] = {"p50": pct(wakes, 50), "max": max(wakes)}
            out["overhead_ms"] = {"p50": pct(over, 50), "max": max(over)}
            out["restarts"] = sum(r["restarts"] for g in (await sp.status())["workers"].values()
                                  for r in g["replicas"])
        return out

    return await with_daemon(sleep_policy(args, sleep, 0.0), body)


async def sleep_alternating(args: argparse.Namespace, sleep: bool, min_resident: float) -> dict:
    """Two closed-loop clients, one per worker, `--sleep-duration` s: goodput and swaps."""
    service = args.service_ms / 1000

    async def body(sp: SupervisorProcess) -> dict:
        for name in ("a", "b"):
            assert (await complete(sp, name))[0] == 200
        codes: collections.Counter[str] = collections.Counter()
        waits: list[float] = []
        t_start = time.perf_counter()
        end = t_start + args.sleep_duration
        spawned0, woken0 = len(sp.events("worker_spawned")), len(sp.events("worker_woken"))

        async def client(target: str) -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    status, _ = await complete(sp, target, delay=service, timeout=args.sleep_duration + 60)
                except (aiohttp.ClientError, TimeoutError):
                    codes["client_error"] += 1
                    continue
                codes[str(status)] += 1
                waits.append(time.perf_counter() - t0)

        await asyncio.gather(client("a"), client("b"))
        elapsed = time.perf_counter() - t_start
        return {"tier": "sleep/wake" if sleep else "stop/start", "min_resident_s": min_resident,
                "seconds": elapsed, "codes": dict(codes), "goodput_rps": codes["200"] / elapsed,
                "starts": len(sp.events("worker_spawned")) - spawned0,
                "wakes": len(sp.events("worker_woken")) - woken0,
                "longest_wait_s": max(waits) if waits else None, "wait_p99_s": pct(waits, 99) if waits else None}

    return await with_daemon(sleep_policy(args, sleep, min_resident), body)


async def sleep_tier(args: argparse.Namespace) -> dict:
    res: dict = {"config": {"load_s": args.sleep_load, "wake_ms": args.wake_ms, "trials": args.sleep_trials,
                            "duration_s": args.sleep_duration, "service_ms": args.service_ms}}
    for sleep in (True, False):
        print(f"sleep tier: swaps, {'sleep/wake' if sleep else 'stop/start'} ...", flush=True)
        res["swap_sleep" if sleep else "swap_stop"] = await sleep_swaps(args, sleep)
    res["alternating"] = []
    for mr in args.sleep_min_resident:
        for sleep in (True, False):
            print(f"sleep tier: alternating, {'sleep/wake' if sleep else 'stop/start'}, min_resident_s {mr:g} ...",
                  flush=True)
            res["alternating"].append(await sleep_alternating(args, sleep, mr))
    runs = {(a["tier"], a["min_resident_s"]): a["goodput_rps"] for a in res["alternating"]}
    # the same setting for both tiers: sleep/wake goodput over stop/start goodput
    res["goodput_ratio"] = {str(mr): runs[("sleep/wake", mr)] / runs[("stop/start", mr)]
                            if runs[("stop/start", mr)] else None for mr in args.sleep_min_resident}
    res["targets"] = {
        "swap_through_sleep_le_wake_plus_50ms": res["swap_sleep"]["overhead_ms"]["max"] <= 50,
        **{f"alternating_goodput_ge_3x_min_resident_{mr}": r is None or r >= 3
           for mr, r in res["goodput_ratio"].items()},
    }
    return res


def sleep_report(res: dict) -> str:
    c = res["config"]
    sw, st = res["swap_sleep"], res["swap_stop"]
    lines = [f"sleep tier: sleepy_worker load {c['load_s']:g}s, wake {c['wake_ms']:g} ms; 2 x 600 MiB on 1000 MiB",
             f"swap through sleep/wake: answer p50 {sw['total_s']['p50'] * 1000:.1f} ms, max "
             f"{sw['total_s']['max'] * 1000:.1f} ms; the wake call p50 {sw['wake_s']['p50'] * 1000:.1f} ms; "
             f"overhead (answer - wake) p50 {sw['overhead_ms']['p50']:.1f} ms, max {sw['overhead_ms']['max']:.1f} ms"
             f" ({sw['trials']} swaps, {sw['restarts']} restarts)",
             f"swap through stop/start: answer p50 {st['total_s']['p50']:.3f} s, max {st['total_s']['max']:.3f} s",
             f"target: swap through sleep <= wake + 50 ms (max): "
             f"{'PASS' if res['targets']['swap_through_sleep_le_wake_plus_50ms'] else 'FAIL'}",
             f"alternating traffic, two back-to-back clients, {c['service_ms']:g} ms per request, "
             f"{c['duration_s']:g}s each:",
             f"{'tier':<12}{'min_res':>8}{'200/s':>8}{'starts':>7}{'wakes':>7}{'longest wait':>14}{'non-200':>9}"]
    for a in res["alternating"]:
        bad = sum(v for k, v in a["codes"].items() if k != "200")
        lines.append(f"{a['tier']:<12}{a['min_resident_s']:>8g}{a['goodput_rps']:>8.1f}{a['starts']:>7}"
                     f"{a['wakes']:>7}{a['longest_wait_s'] or 0:>13.2f}s{bad:>9}")
    for mr, ratio in res["goodput_ratio"].items():
        ok = res["targets"][f"alternating_goodput_ge_3x_min_resident_{mr}"]
        lines.append(f"target: goodput sleep/wake >= 3x stop/start at min_resident_s {mr}: "
                     f"{'inf' if ratio is None else f'{ratio:.2f}'}x {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def ideal(duration: float, service_s: float, load_s: float, dwell_s: float) -> dict:
    """Two back-to-back clients, one model on the GPU at a time; zero scheduler overhead: a swap costs `load_s`
    (the model load), a request `service_s`. The resident serves its client until the other model's request
    has waited `dwell_s` (it began waiting when the resident started loading), then they swap.

    Per cycle of max(dwell_s, load_s + service_s): one swap, (cycle - load_s) / service_s answers; the longest
    wait is the cycle plus the waiter's own load."""
    cycle = max(dwell_s, load_s + service_s)
    served_per_cycle = int((cycle - load_s) / service_s)
    cycles = duration / cycle
    return {"dwell_s": dwell_s, "cycle_s": cycle, "swaps_per_min": 60 / cycle,
            "goodput_rps": served_per_cycle * cycles / duration, "longest_wait_s": cycle + load_s}


async def main(args: argparse.Namespace) -> dict:
    if args.sleep_only:
        return {"sleep_tier": await sleep_tier(args)}
    res: dict = {"config": {"trials": args.trials, "load_s": args.load, "idle_unload_s": args.idle_unload,
                            "duration_s": args.duration, "service_ms": args.service_ms,
                            "budget_mb": 1000, "worker_mb": {"cold": 300, "swap": 600}}}
    print("cold start ...", flush=True)
    res["cold_start"] = await cold_start(args)
    print("swap ...", flush=True)
    res["swap"] = await swap(args)
    res["alternating"] = []
    settings = [(None, None), (args.other_min_resident, args.other_max_starvation)]
    for mr, ms in settings[args.skip_default:]:
        print(f"alternating traffic (min_resident_s={mr or 'default'}, max_starvation_s={ms or 'default'}) ...",
              flush=True)
        run = await alternating(args, mr, ms)
        mr_v = 5.0 if mr is None else mr
        ms_v = 30.0 if ms is None else ms
        load = run["load_s_p50"] or args.load
        s = args.service_ms / 1000
        run["ideal_max_starvation"] = ideal(run["seconds"], s, load, ms_v)
        # the daemon's own rule: the waiter goes in once the resident has stayed min_resident_s (after its load)
        run["ideal_min_resident"] = ideal(run["seconds"], s, load, load + mr_v)
        res["alternating"].append(run)
    res["sleep_tier"] = await sleep_tier(args)
    return res


def report(res: dict) -> str:
    if "config" not in res:
        return sleep_report(res["sleep_tier"])
    c = res["config"]
    cs, sw = res["cold_start"], res["swap"]
    lines = [f"emulated model load {c['load_s']:g}s (ctl_worker --startup-delay) + process start; "
             f"budget 1000 MiB on GPU 0 (no NVML)", "",
             f"{'case':<12}{'trials':>7}{'answer p50':>12}{'load p50':>10}{'overhead p50':>14}{'mean':>8}"
             f"{'max':>8}{'to spawned':>11}{'post-ready':>11}"]
    for name, m in (("cold start", cs), ("swap", sw)):
        lines.append(f"{name:<12}{m['trials']:>7}{m['total_s']['p50']:>11.3f}s{m['load_s']['p50']:>9.3f}s"
                     f"{m['overhead_ms']['p50']:>11.1f} ms{m['overhead_ms']['mean']:>8.1f}"
                     f"{m['overhead_ms']['max']:>8.1f}"
                     f"{m['before_spawn_ms']['p50']:>8.1f} ms{m['after_ready_ms']['p50']:>8.1f} ms")
    lines += ["(overhead = answer - load; 'to spawned': send to the worker_spawned log line (after fork/exec); "
              "'post-ready': its first healthy answer to our answer (log clock))",
              f"(a warm request costs {cs['warm_p50_ms']:.1f} ms p50; swap: eviction to "
              f"newcomer's spawn {sw['evict_to_spawn_ms']['p50']:.1f} ms p50, "
              f"max {sw['evict_to_spawn_ms']['max']:.1f})",
              *([f"(inside the load: the worker's 'listening' line to the daemon's first healthy probe "
                 f"{cs['listen_to_ready_ms']['p50']:.1f} ms p50, max {cs['listen_to_ready_ms']['max']:.1f})"]
                if "listen_to_ready_ms" in cs else []),
              f"cold start overhead p50 {cs['overhead_ms']['p50']:.1f} ms <= 50 ms: "
              f"{'yes' if cs['overhead_ms']['p50'] <= 50 else 'NO'} (max {cs['overhead_ms']['max']:.1f} ms: "
              f"{'yes' if cs['overhead_ms']['max'] <= 50 else 'NO'})", "",
              f"alternating traffic, two back-to-back clients, {c['service_ms']:g} ms per request, "
              f"{c['duration_s']:g}s each:",
              f"{'min_resident/max_starv':<24}{'swaps/min':>10}{'200/s':>8}{'longest wait':>14}{'non-200':>9}"
              f"{'drains':>8}"]
    for a in res["alternating"]:
        bad = sum(v for k, v in a["codes"].items() if k != "200")
        label = f"{a['min_resident_s']}/{a['max_starvation_s']}"
        lines.append(f"{label:<24}{a['swaps_per_min']:>10.1f}{a['goodput_rps']:>8.1f}"
                     f"{max(v or 0 for v in a['longest_wait_s'].values()):>13.2f}s{bad:>9}{a['drains']:>8}")
        for key, name in (("ideal_min_resident", "ideal, same rule"), ("ideal_max_starvation", "ideal, starv.")):
            i = a[key]
            lines.append(f"  {name:<22}{i['swaps_per_min']:>10.1f}{i['goodput_rps']:>8.1f}{i['longest_wait_s']:>13.2f}s"
                         f"   (goodput {a['goodput_rps'] / i['goodput_rps']:.2f}x of it)")
    lines.append("(ideal: zero scheduler overhead, a swap costs the measured load p50, a request its service time; "
                 "'same rule': swap once the resident stayed min_resident_s; 'starv.': once the other waited "
                 "max_starvation_s)")
    lines += ["", sleep_report(res["sleep_tier"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10, help="cold starts and swaps (default 10)")
    p.add_argument("--load", type=float, default=1.0, help="emulated model load, s (ctl_worker --startup-delay)")
    p.add_argument("--idle-unload", type=float, default=0.3, help="idle_unload_s between cold-start trials")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of each alternating-traffic run")
    p.add_argument("--service-ms", type=float, default=20.0, help="service time of one request (default 20)")
    p.add_argument("--other-min-resident", type=float, default=1.0, help="min_resident_s of the second run")
    p.add_argument("--other-max-starvation", type=float, default=3.0, help="max_starvation_s of the second run")
    p.add_argument("--skip-default", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sleep-only", action="store_true", help="run only the sleep tier")
    p.add_argument("--sleep-load", type=float, default=3.0, help="sleep tier: emulated model load, s (default 3)")
    p.add_argument("--wake-ms", type=float, default=20.0, help="sleep tier: the worker's wake time, ms")
    p.add_argument("--sleep-trials", type=int, default=10, help="sleep tier: swaps per tier (default 10)")
    p.add_argument("--sleep-duration", type=float, default=20.0, help="sleep tier: seconds of each alternating run")
    p.add_argument("--sleep-min-resident", type=float, nargs="+", default=[0.0, 1.0, 5.0],
                   help="sleep tier: min_resident_s of the alternating runs, each tier (default 0 1 5)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/ondemand.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    res = asyncio.run(main(args))
    out = save_results(res, RESULTS / "ondemand.json", args.out)
    print(report(res))
    print(f"\nwrote {out}")
