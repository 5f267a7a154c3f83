"""Memory-watcher benchmark: what polling costs the proxy, and how fast critical pressure replaces the worker.

The daemon runs in this process on uvloop (as `gpu-supervisor run` does), so the bench can hand it a fake
NVML and sample its event loop directly. What is real and what is not:

* real: the event loop, the proxy path, the watcher's two daemon threads, psutil polling of host
  memory and of the worker's process tree (RSS), pressure decisions, worker restarts, /status;
* faked: NVML figures (tests/fake_nvml.py: there is no GPU here). Every fake NVML call sleeps
  --nvml-call-ms (default 1 ms, releasing the GIL as a ctypes call into the driver does) to mimic
  driver latency; one poll of one device makes ~7 calls.

Part 1 (cost): wrk -t1 -c32 /hello through the daemon to bench/trivial_upstream.py (as bench_proxy.py),
with the watcher off / psutil-only / NVML+psutil at 0.1 s. For each: event-loop lag from a 10 ms
sampler task in the daemon's own loop (idle, then under load), the daemon's own
gpu_supervisor_event_loop_lag_seconds histogram (0.25 s sampler, bucket-interpolated), throughput
and latency from wrk, CPU of the daemon process and of the watcher threads.

Part 2 (reaction): ctl_worker as the worker, gpu.actions.critical.restart_after_s: 0. Fake used
memory goes to 99% at a random phase of the poll; /status is polled every 10 ms until the old worker's
exit is reported (worker.last_exit.reason == "pressure") and until a new pid is ready. Used memory
goes back to 30% as soon as the exit is seen (the dead worker's GPU memory is freed), so the
replacement is not restarted in turn. A breakdown from the daemon's own log timestamps is added.

    .venv/bin/python bench/bench_watcher.py [--duration 10] [--idle 3] [--rounds 1] [--trials 5]
                                            [--intervals 0.1,1.0] [--nvml-call-ms 1.0] [--part all]

Prints tables and writes bench/results/watcher.json. Needs wrk. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import uvloop  # noqa: E402

from bench.bench_proxy import PY  # noqa: E402
from bench.common import parse_wrk, pct  # noqa: E402
from supervisor import config as cfg  # noqa: E402
from supervisor import logs  # noqa: E402
from supervisor.app import Supervisor  # noqa: E402
from supervisor.daemon import Daemon, Environment  # noqa: E402
from tests.fake_nvml import FakeNvml  # noqa: E402
from tests.harness import fast_config, wait_until  # noqa: E402

GiB = 1 << 30
TOTAL = 80 * GiB
WATCHER_THREADS = ("gpu-watch-host", "gpu-watch-nvml")


# ---- the fake NVML, with driver-like latency ----------------------------------------------------

class SlowFakeNvml(FakeNvml):
    """FakeNvml whose every call sleeps `call_s` (in the watcher's NVML thread, GIL released), and whose
    process list names the current worker, so the watcher's worker-tree GPU accounting runs too."""

    def __init__(self, call_s: float, worker_pid=lambda: None, **kw):
        super().__init__(**kw)
        self.call_s = call_s
        self.calls = 0
        self.worker_pid = worker_pid

    def _cost(self) -> None:
        self.calls += 1
        if self.call_s > 0:
            time.sleep(self.call_s)

    def init(self):
        self._cost()
        return super().init()

    def device_count(self):
        self._cost()
        return super().device_count()

    def handle(self, index):
        self._cost()
        return super().handle(index)

    def uuid(self, handle):
        self._cost()
        return super().uuid(handle)

    def name(self, handle):
        self._cost()
        return super().name(handle)

    def memory(self, handle):
        self._cost()
        return super().memory(handle)

    def utilization(self, handle):
        self._cost()
        return super().utilization(handle)

    def temperature(self, handle):
        self._cost()
        return super().temperature(handle)

    def processes(self, handle):
        self._cost()
        pid = self.worker_pid()
        return [(pid, self.used[handle] // 2)] if pid else []


# ---- measuring -----------------------------------------------------------------------------------

class LagSampler:
    """How late a 10 ms timer fires in this (the daemon's) event loop; perf_counter, not loop.time()."""

    def __init__(self, every_s: float = 0.01):
        self.every_s = every_s
        self.window: list[float] | None = None

    async def run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.every_s)
            lag = time.perf_counter() - t - self.every_s
            if self.window is not None:
                self.window.append(max(0.0, lag))

    def start(self) -> None:
        self.window = []

    def stop(self) -> list[float]:
        w, self.window = self.window or [], None
        return w


def lag_summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": pct(xs, 50) * 1e3, "p99_ms": pct(xs, 99) * 1e3,
            "max_ms": (max(xs) if xs else float("nan")) * 1e3,
            "mean_ms": (statistics.fmean(xs) if xs else float("nan")) * 1e3}


def hist_snapshot(hist) -> tuple[list[tuple[float, float]], float]:
    """Cumulative (le, count) buckets of a prometheus_client Histogram, and its count."""
    buckets, count = [], 0.0
    for metric in hist.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                count = s.value
    return sorted(buckets), count


def hist_quantiles(before, after) -> dict:
    """p50/p99 of the observations between two snapshots, interpolated inside buckets as Prometheus'
    histogram_quantile() does (so they are only as fine as the buckets: 0.5, 1, 2.5, 5, 10 ms...)."""
    b0 = dict(before[0])
    cum = [(le, c - b0.get(le, 0.0)) for le, c in after[0]]
    n = after[1] - before[1]
    out: dict = {"n": int(n)}
    for q in (50, 99):
        if n <= 0:
            out[f"p{q}_ms"] = float("nan")
            continue
        rank = n * q / 100
        prev_le, prev_c = 0.0, 0.0
        val = float("nan")
        for le, c in cum:
            if c >= rank:
                if le == float("inf"):
                    val = prev_le
                else:
                    val = prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
                break
            prev_le, prev_c = le, c
        out[f"p{q}_ms"] = val * 1e3
    return out


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user+system) of the watcher's threads in this process, by thread name."""
    ids = {t.native_id: t.name for t in threading.enumerate() if t.name in WATCHER_THREADS}
    out = {name: 0.0 for name in WATCHER_THREADS}
    for th in psutil.Process().threads():
        if th.id in ids:
            out[ids[th.id]] += th.user_time + th.system_time
    return out


async def wrk(url: str, connections: int, duration: int) -> dict:
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), duration + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]}")
    return parse_wrk(out.decode())


# ---- running a daemon in this loop ---------------------------------------------------------------

class InProc:
    def __init__(self, tmp: Path, settings: dict, nvml: SlowFakeNvml | None, log_level: str):
        self.tmp = tmp
        self.settings = settings
        self.nvml = nvml
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.log_level = log_level
        self.daemon: Daemon | None = None
        self.task: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None
        self._log_file = None

    async def __aenter__(self) -> InProc:
        self._log_file = open(self.log_path, "w", buffering=1)
        logs.configure("json", self.log_level, stream=self._log_file)
        path = self.tmp / "policy.yaml"
        path.write_text("{}")
        loaded = cfg.LoadedConfig(settings=cfg.Settings.model_validate(self.settings), source=str(path),
                                  digest="bench")
        nvml = self.nvml
        self.daemon = d = Daemon(loaded, Environment(base_env=dict(os.environ)),
                                 nvml_factory=(lambda: nvml) if nvml is not None else None,
                                 install_signals=False)
        if nvml is not None:
            nvml.worker_pid = lambda: d.sup._worker_pid() if d.sup is not None else None
        self.task = asyncio.create_task(d.serve(), name="daemon")
        await wait_until(lambda: d.bound or self.task.done(), 10, "daemon listening")
        if self.task.done():
            raise RuntimeError(f"daemon ended: {self.task.result()!r}; see {self.log_path}")
        host, port = d.bound[0]
        self.base = f"http://{host}:{port}"
        self.session = aiohttp.ClientSession(self.base)

        async def ready():
            async with self.session.get("/readyz") as r:
                return r.status == 200
        await wait_until(ready, 30, "readyz")
        return self

    async def status(self) -> dict:
        async with self.session.get("/status") as r:
            return await r.json()

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()
        if self.daemon is not None:
            self.daemon.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)
        if self._log_file is not None:
            self._log_file.close()

    def log_events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


# ---- part 1: the cost of polling -----------------------------------------------------------------

# Host thresholds out of reach: this machine's real memory must not add pressure of its own.
HOST_CALM = {"thresholds": {"soft": 0.997, "hard": 0.998, "critical": 0.999}}

SCENARIOS = {
    "none": "watcher task never started (bench-only patch of Supervisor.start): the floor",
    "off": "gpu.enabled: false, default poll_interval_s 1.0: psutil host + worker tree once a second",
    "off-0.1": "gpu.enabled: false, poll_interval_s 0.1: psutil host + worker tree 10x a second",
    "nvml-0.1": "gpu.enabled: true, poll_interval_s 0.1: fake NVML (1 device, ~7 slow calls) + psutil",
}


def proxy_settings(scenario: str) -> dict:
    gpu: dict = {"enabled": False}
    if scenario == "off-0.1":
        gpu["poll_interval_s"] = 0.1
    elif scenario == "nvml-0.1":
        gpu = {"enabled": True, "poll_interval_s": 0.1}
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "worker": {"command": [PY, str(HERE / "trivial_upstream.py"), "--socket", "{socket}"],
                   "health": {"interval_s": 5, "timeout_s": 2, "failures": 3}},
        "queue": {"concurrency": 256, "max_size": 10000},
        "gpu": gpu,
        "host": HOST_CALM,
        "logging": {"format": "json", "level": "warning"},
    }


async def cost_run(tmp: Path, scenario: str, args, sampler: LagSampler) -> dict:
    nvml = None
    if scenario == "nvml-0.1":
        nvml = SlowFakeNvml(args.nvml_call_ms / 1000, devices=1, total=TOTAL)
        nvml.used[0] = int(0.40 * TOTAL)
    orig_start = Supervisor.start
    if scenario == "none":
        Supervisor.start = lambda self: None
    try:
        async with InProc(tmp, proxy_settings(scenario), nvml, "warning") as ip:
            d = ip.daemon
            url = f"{ip.base}/hello"
            await wrk(url, args.connections, 1)           # warm-up: keep-alive pools, caches
            await asyncio.sleep(0.5)
            st = await ip.status()
            # idle: nothing but the daemon's own timers and the watcher
            calls0 = nvml.calls if nvml else 0
            sampler.start()
            await asyncio.sleep(args.idle)
            idle = lag_summary(sampler.stop())
            idle_polls = (nvml.calls - calls0) if nvml else None
            # loaded
            me = psutil.Process()
            h0 = hist_snapshot(d.sup.metrics.loop_lag)
            cpu0, th0, wall0 = me.cpu_times(), thread_cpu(), time.monotonic()
            sys0, kids0 = psutil.cpu_times(), os.times()
            wpid = d.sup._worker_pid()
            wcpu0 = psutil.Process(wpid).cpu_times() if wpid else None
            calls0 = nvml.calls if nvml else 0
            sampler.start()
            w = await wrk(url, args.connections, args.duration)
            loaded = lag_summary(sampler.stop())
            wall = time.monotonic() - wall0
            cpu1, th1 = me.cpu_times(), thread_cpu()
            sys1, kids1 = psutil.cpu_times(), os.times()
            h1 = hist_snapshot(d.sup.metrics.loop_lag)
            wcpu1 = psutil.Process(wpid).cpu_times() if wpid else None
            reading = d.sup.watcher.reading
            daemon_pct = 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / wall
            worker_pct = (100 * ((wcpu1.user + wcpu1.system) - (wcpu0.user + wcpu0.system)) / wall
                          if wcpu0 else 0.0)
            # wrk is the only child reaped during the window, so the children's times are its own
            wrk_pct = 100 * ((kids1.children_user + kids1.children_system)
                             - (kids0.children_user + kids0.children_system)) / wall
            busy = lambda c: c.user + c.nice + c.system + c.irq + c.softirq + getattr(c, "steal", 0.0)  # noqa: E731
            host_pct = 100 * (busy(sys1) - busy(sys0)) / wall
            return {
                "scenario": scenario,
                "gpu_available": st["gpu"]["available"],
                "wrk": w,
                "lag_idle": idle,
                "lag_loaded": loaded,
                "daemon_hist_loaded": hist_quantiles(h0, h1),
                "daemon_cpu_pct": daemon_pct,
                "watcher_threads_cpu_pct": {k: 100 * (th1[k] - th0[k]) / wall for k in WATCHER_THREADS},
                "worker_cpu_pct": worker_pct,
                "wrk_cpu_pct": wrk_pct,
                # CPU the machine spent on anything else (other jobs sharing it): large = a polluted run
                "other_cpu_pct": max(0.0, host_pct - daemon_pct - worker_pct - wrk_pct),
                "nvml_calls_per_s_idle": idle_polls / args.idle if idle_polls is not None else None,
                "nvml_calls_per_s_loaded": (nvml.calls - calls0) / wall if nvml else None,
                "last_reading_stale": reading.stale if reading else None,
                "worker_rss_bytes": reading.worker_rss_bytes if reading else None,
            }
    finally:
        Supervisor.start = orig_start


def print_cost(rows: list[dict]) -> None:
    print()
    print("Part 1: cost of the watcher under wrk load (real: loop, threads, psutil; faked: NVML figures)")
    hdr = (f"{'scenario':9s} {'req/s':>8s} {'p50ms':>6s} {'p99ms':>6s} | {'idle lag p50/p99/max ms':>23s} | "
           f"{'load lag p50/p99/max ms':>23s} | {'hist p50/p99':>12s} | {'cpu%':>5s} {'thr cpu%':>8s} {'other%':>6s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        li, ll, h = r["lag_idle"], r["lag_loaded"], r["daemon_hist_loaded"]
        thr = sum(r["watcher_threads_cpu_pct"].values())
        print(f"{r['scenario']:9s} {r['wrk']['rps']:8.0f} {r['wrk']['p50_ms']:6.2f} {r['wrk']['p99_ms']:6.2f} | "
              f"{li['p50_ms']:6.2f} {li['p99_ms']:7.2f} {li['max_ms']:7.2f} | "
              f"{ll['p50_ms']:6.2f} {ll['p99_ms']:7.2f} {ll['max_ms']:7.2f} | "
              f"{h['p50_ms']:5.2f} {h['p99_ms']:6.2f} | {r['daemon_cpu_pct']:5.1f} {thr:8.2f} "
              f"{r['other_cpu_pct']:6.1f}")
    print("  cpu%: the daemon process (loop + watcher threads); thr cpu%: the watcher threads alone;")
    print("  other%: CPU used on this machine by anything but daemon, worker and wrk (a busy neighbour)")
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["scenario"], []).append(r)
    if any(len(v) > 1 for v in by.values()):
        print("  medians over rounds:")
        for name, rs in by.items():
            med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
            print(f"    {name:9s} {med(lambda r: r['wrk']['rps']):8.0f} req/s  "
                  f"idle lag p99 {med(lambda r: r['lag_idle']['p99_ms']):5.2f} ms  "
                  f"load lag p50 {med(lambda r: r['lag_loaded']['p50_ms']):5.2f} / "
                  f"p99 {med(lambda r: r['lag_loaded']['p99_ms']):5.2f} ms  "
                  f"watcher threads {med(lambda r: sum(r['watcher_threads_cpu_pct'].values())):4.2f}% CPU  "
                  f"({len(rs)} rounds)")


# ---- part 2: critical pressure to a new worker ---------------------------------------------------

def pressure_settings(interval: float) -> dict:
    return fast_config(
        gpu={"enabled": True, "poll_interval_s": interval,
             "thresholds": {"soft": 0.85, "hard": 0.93, "critical": 0.97}, "hysteresis": 0.02,
             "actions": {"soft": {"shed_below": "high"}, "hard": {"pause": True, "cleanup": True},
                         "critical": {"restart_after_s": 0}}},
        host=HOST_CALM,
        worker={"restart": {"max_restarts": 1000, "window_s": 60}},
        logging={"format": "json", "level": "info"},
    )


def _ts(ev: dict) -> float:
    return datetime.fromisoformat(ev["timestamp"]).timestamp()


async def reaction_run(tmp: Path, interval: float, args) -> dict:
    nvml = SlowFakeNvml(args.nvml_call_ms / 1000, devices=1, total=TOTAL)
    nvml.used[0] = int(0.30 * TOTAL)
    trials = []
    async with InProc(tmp, pressure_settings(interval), nvml, "info") as ip:
        w = ip.daemon.sup.watcher
        for i in range(args.trials):
            st = await ip.status()
            old = st["worker"]["pid"]
            assert st["worker"]["state"] == "ready" and st["gpu"]["pressure"] == "ok", st
            # a random phase of the poll: sync to a reading, then wait a uniform part of the interval
            await w.wait_reading(w.reading)
            await asyncio.sleep(random.uniform(0, interval))
            t0_wall, t0 = time.time(), time.monotonic()
            nvml.used[0] = int(0.99 * TOTAL)
            t_exit = t_ready = None
            deadline = t0 + 30
            while time.monotonic() < deadline:
                s = (await ip.status())["worker"]
                now = time.monotonic()
                le = s["last_exit"]
                if t_exit is None and le and le["reason"] == "pressure" and le["pid"] == old:
                    t_exit = now - t0
                    nvml.used[0] = int(0.30 * TOTAL)   # the dead worker's memory is free again
                if s["pid"] not in (None, old) and s["state"] in ("ready", "busy"):
                    t_ready = now - t0
                    if t_exit is None:             # seen in the same answer
                        t_exit = t_ready
                        nvml.used[0] = int(0.30 * TOTAL)
                    new = s["pid"]
                    break
                await asyncio.sleep(0.01)
            else:
                raise RuntimeError(f"trial {i}: no replacement within 30 s (interval {interval})")
            nvml.used[0] = int(0.30 * TOTAL)
            # log breakdown, from the daemon's own timestamps (wall clock, microseconds)
            evs = [e for e in ip.log_events() if "timestamp" in e and _ts(e) >= t0_wall - 0.001]

            def first(pred):
                for e in evs:
                    if pred(e):
                        return round(_ts(e) - t0_wall, 4)
                return None
            trials.append({
                "old_pid": old, "new_pid": new,
                "status_exit_s": round(t_exit, 4), "status_ready_s": round(t_ready, 4),
                "log_pressure_restart_s": first(lambda e: e.get("event") == "pressure_restart"),
                "log_sigterm_s": first(lambda e: e.get("event") == "worker_state" and e.get("new") == "stopping"),
                "log_exited_s": first(lambda e: e.get("event") == "worker_exited" and e.get("worker_pid") == old),
                "log_ready_s": first(lambda e: e.get("event") == "worker_state" and e.get("new") == "ready"),
            })
            # settle: pressure back to ok and the new worker serving, then a pause
            await wait_until(lambda: _calm(ip), 30, "pressure ok again")
            await asyncio.sleep(0.3)
        final = await ip.status()
        extra_restarts = final["worker"]["restarts"] - args.trials
    keys = ["status_exit_s", "status_ready_s", "log_pressure_restart_s", "log_sigterm_s", "log_exited_s",
            "log_ready_s"]
    summary = {}
    for k in keys:
        xs = [t[k] for t in trials if t[k] is not None]
        summary[k] = {"median": statistics.median(xs) if xs else None, "min": min(xs) if xs else None,
                      "max": max(xs) if xs else None}
    return {"poll_interval_s": interval, "trials": trials, "summary": summary,
            "unexpected_extra_restarts": extra_restarts}


async def _calm(ip: InProc) -> bool:
    s = await ip.status()
    return s["gpu"]["pressure"] == "ok" and s["worker"]["state"] == "ready"


def print_reaction(runs: list[dict]) -> None:
    print()
    print("Part 2: fake used memory -> 99% until the worker is replaced (restart_after_s: 0, ctl_worker)")
    print("  seconds from the fake reading crossing critical; /status polled every 10 ms; median [min..max]")
    hdr = (f"{'poll':>5s} {'n':>2s} | {'restart decided (log)':>22s} | {'old exited (log)':>20s} | "
           f"{'last_exit=pressure (/status)':>29s} | {'new ready (log)':>20s} | {'new pid ready (/status)':>24s}")
    print(hdr)
    print("-" * len(hdr))

    def f(s, w):
        if s["median"] is None:
            return f"{'-':>{w}s}"
        return f"{s['median']:.3f} [{s['min']:.3f}..{s['max']:.3f}]".rjust(w)
    for r in runs:
        s = r["summary"]
        print(f"{r['poll_interval_s']:5.2f} {len(r['trials']):2d} | {f(s['log_pressure_restart_s'], 22)} | "
              f"{f(s['log_exited_s'], 20)} | {f(s['status_exit_s'], 29)} | {f(s['log_ready_s'], 20)} | "
              f"{f(s['status_ready_s'], 24)}")


# ---- main ----------------------------------------------------------------------------------------

async def amain(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="gs-bench-watcher-"))
    sampler = LagSampler(0.01)
    sampler_task = asyncio.create_task(sampler.run(), name="lag-sampler")
    out: dict = {"cost": [], "reaction": []}
    try:
        if args.part in ("all", "cost"):
            scen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
            for s in scen:
                if s not in SCENARIOS:
                    raise SystemExit(f"unknown scenario {s!r}; one of {', '.join(SCENARIOS)}")
            for rnd in range(args.rounds):
                order = scen if rnd % 2 == 0 else list(reversed(scen))   # interleave, alternate order
                for s in order:
                    r = await cost_run(tmp, s, args, sampler)
                    r["round"] = rnd
                    out["cost"].append(r)
                    print(f"  round {rnd} {s:9s} {r['wrk']['rps']:8.0f} req/s  load lag p99 "
                          f"{r['lag_loaded']['p99_ms']:.2f} ms  idle lag p99 {r['lag_idle']['p99_ms']:.2f} ms",
                          flush=True)
            print_cost(out["cost"])
        if args.part in ("all", "reaction"):
            for iv in [float(x) for x in args.intervals.split(",") if x.strip()]:
                r = await reaction_run(tmp, iv, args)
                out["reaction"].append(r)
                print(f"  poll {iv}: {len(r['trials'])} trials, new pid ready median "
                      f"{r['summary']['status_ready_s']['median']:.3f} s", flush=True)
            print_reaction(out["reaction"])
    finally:
        sampler_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler_task
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "cost", "reaction"), default="all")
    ap.add_argument("--duration", type=int, default=10, help="seconds of wrk load per scenario")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle lag sampling per scenario")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the part-1 scenarios, interleaved")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="part-1 scenarios: " + ", ".join(SCENARIOS))
    ap.add_argument("--trials", type=int, default=5, help="part-2 trials per poll interval")
    ap.add_argument("--intervals", default="0.1,1.0", help="part-2 poll intervals (s)")
    ap.add_argument("--nvml-call-ms", type=float, default=1.0, help="sleep per fake NVML call (driver latency)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "watcher.json"))
    args = ap.parse_args()
    if args.part in ("all", "cost") and not shutil.which("wrk"):
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.seed is not None:
        random.seed(args.seed)
    print(f"gpu-supervisor in-process on uvloop {uvloop.__version__}, {os.cpu_count()} CPUs. NVML is FAKED "
          f"(tests/fake_nvml.py, {args.nvml_call_ms:g} ms sleep per call to mimic driver latency); the event "
          f"loop, watcher threads, psutil host/worker-tree polling and worker restarts are real.", flush=True)
    res = uvloop.run(amain(args))
    doc = {
        "args": vars(args),
        "env": {"cpus": os.cpu_count(), "python": platform.python_version(), "uvloop": uvloop.__version__,
                "platform": platform.platform()},
        "notes": {
            "real": "event loop (uvloop), proxy path, watcher threads, psutil host memory + worker process tree RSS, "
                    "pressure decisions, worker restarts (ctl_worker / trivial_upstream processes), /status",
            "faked": f"NVML figures: tests/fake_nvml.py FakeNvml, each call sleeping {args.nvml_call_ms:g} ms "
                     "(GIL released) to mimic driver latency; 1 device of 80 GiB",
            "lag_sampler": "10 ms asyncio.sleep in the daemon's loop, lateness by perf_counter; includes libuv's "
                           "1 ms timer granularity",
            "daemon_hist": "gpu_supervisor_event_loop_lag_seconds delta over the load window, "
                           "histogram_quantile-style interpolation inside buckets",
            "scenarios": SCENARIOS,
            "reaction": "used memory set to 99% at a random phase of the poll; back to 30% as soon as /status "
                        "reports the old worker's pressure exit; log_* times from the daemon's own JSON log",
        },
        **res,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
