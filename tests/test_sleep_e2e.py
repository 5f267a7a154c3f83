"""Sleeping workers end to end: the ledger puts an idle replica to sleep to make room and a request wakes
the same process; a failed wake starts anew; idle sleep; a busy replica is left alone; a reload.

Real daemons and real sleepy workers (tests/workers/sleepy_worker.py: a slow emulated load, a fast wake).
No NVML here: `gpu.budget_mb` and the declared `gpu_memory_mb` / `sleep.gpu_memory_mb` drive the ledger;
two workers of 600 MiB do not fit together on 1000 MiB, one awake beside one asleep (50 MiB) does. The
case of sizes learned from NVML runs a daemon in-process with the one fake (tests/fake_nvml.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from supervisor import config as cfg
from supervisor.daemon import Daemon, Environment
from tests.fake_nvml import FakeNvml
from tests.harness import fast_config, wait_until

pytestmark = pytest.mark.e2e

SLEEPY = str(Path(__file__).resolve().with_name("workers") / "sleepy_worker.py")
MiB = 1 << 20


def sleepy(name: str, *args: str) -> list[str]:
    return [sys.executable, SLEEPY, "--socket", "{socket}", "--name", name, *args]


def sleep_config(workers: dict, budget_mb: int = 1000, host_reserve_mb: int = 0) -> dict:
    """Named sleepy workers on GPU 0 of a `budget_mb` budget, on demand, each 600 MiB awake, 50 MiB asleep."""
    base = fast_config()
    w = base.pop("worker")
    base["worker_defaults"] = {k: v for k, v in w.items() if k != "command"}
    base["workers"] = {
        name: {"command": sleepy(name, "--load-s", "0.5"), "gpus": [0], "models": [name], "start": "on_demand",
               "gpu_memory_mb": 600, "min_resident_s": 0,
               "sleep": {"sleep": "POST /sleep?level=1", "gpu_memory_mb": 50, "host_memory_mb": 10}, **spec}
        for name, spec in workers.items()}
    base["gpu"] = {"budget_mb": {0: budget_mb}, "settle_timeout_s": 0.5, "host_reserve_mb": host_reserve_mb}
    return base


async def complete(sp, worker: str, delay: float = 0, timeout: float | None = None) -> tuple[int, dict]:
    headers = {"X-Request-Timeout": str(timeout)} if timeout is not None else {}
    async with sp.session.post(f"/v1/completions?delay={delay}", json={"model": worker, "prompt": "hi"},
                               headers=headers) as r:
        return r.status, await r.json()


async def replica(sp, worker: str) -> dict:
    return (await sp.status())["workers"][worker]["replicas"][0]


async def state_is(sp, worker: str, state: str) -> bool:
    return (await replica(sp, worker))["state"] == state


async def test_alternating_traffic_sleeps_and_wakes_the_same_processes(supervisor_factory):
    sp = await supervisor_factory(sleep_config({"a": {}, "b": {}}))
    code, first_a = await complete(sp, "a")
    assert code == 200 and first_a["worker"] == "a"
    code, first_b = await complete(sp, "b")  # a is idle: put to sleep (host memory allows), b started
    assert code == 200 and first_b["worker"] == "b"
    st = await sp.status()
    a = st["workers"]["a"]["replicas"][0]
    assert a["state"] == "asleep" and a["pid"] == first_a["pid"] and a["restarts"] == 0
    assert a["asleep_gpu_memory_bytes"] == 50 * MiB and a["last_wake_s"] is None
    ledger = st["gpu"]["ledger"][0]
    assert ledger["held_bytes"] == 650 * MiB  # b awake, a asleep
    for _ in range(3):  # each turn wakes the other's process: the same pids answer, nothing restarts
        code, again_a = await complete(sp, "a")
        assert code == 200 and again_a["pid"] == first_a["pid"]
        assert await state_is(sp, "b", "asleep")
        code, again_b = await complete(sp, "b")
        assert code == 200 and again_b["pid"] == first_b["pid"]
    st = await sp.status()
    for name in ("a", "b"):
        r = st["workers"][name]["replicas"][0]
        assert r["restarts"] == 0 and r["last_exit"] is None and r["last_wake_s"] > 0
    assert len(sp.events("worker_spawned", worker="a")) == 1 and len(sp.events("worker_spawned", worker="b")) == 1
    m = await sp.metrics()
    assert 'gpu_supervisor_worker_sleeps_total{reason="evicted",worker="a"} 4.0' in m
    assert "gpu_supervisor_worker_wake_seconds_count 6.0" in m
    assert 'gpu_supervisor_worker_state{gpu_supervisor_worker_state="asleep",replica="0",worker="a"} 1.0' in m
    async with sp.session.get("/ui") as r:
        assert r.status == 200 and "st-asleep" in await r.text()


async def test_concurrent_requests_for_a_sleeping_worker_cause_one_wake(supervisor_factory):
    sp = await supervisor_factory(sleep_config({"a": {}, "b": {}}))
    _, a = await complete(sp, "a")
    await complete(sp, "b")
    assert await state_is(sp, "a", "asleep")
    answers = await asyncio.gather(*(complete(sp, "a") for _ in range(10)))
    assert [c for c, _ in answers] == [200] * 10
    assert {body["pid"] for _, body in answers} == {a["pid"]}
    assert {body["wakes"] for _, body in answers} == {1}  # the worker itself counted one wake
    assert "gpu_supervisor_worker_wake_seconds_count 1.0" in await sp.metrics()


async def test_without_host_memory_to_spare_the_idle_worker_is_stopped(supervisor_factory):
    huge = {"sleep": {"gpu_memory_mb": 50, "host_memory_mb": 1 << 30}}  # a PiB of host RAM: never fits
    sp = await supervisor_factory(sleep_config({"a": huge, "b": huge}))
    assert (await complete(sp, "a"))[0] == 200
    assert (await complete(sp, "b"))[0] == 200
    a = await replica(sp, "a")
    assert a["state"] == "unloaded" and a["last_exit"]["reason"] == "evicted"
    m = await sp.metrics()
    assert 'gpu_supervisor_worker_unloads_total{reason="evicted",worker="a"} 1.0' in m
    assert "gpu_supervisor_worker_sleeps_total{" not in m


async def test_a_wake_that_fails_stops_and_starts_the_worker_anew(supervisor_factory, tmp_path):
    fail = tmp_path / "wake-fails"
    cfg = sleep_config({"a": {"env": {"SLEEPY_WAKE_FAIL_FILE": str(fail)}}, "b": {}})
    sp = await supervisor_factory(cfg)
    _, a = await complete(sp, "a")
    await complete(sp, "b")
    assert await state_is(sp, "a", "asleep")
    fail.touch()
    code, again = await complete(sp, "a")  # the wake answers 500: a new process answers instead
    assert code == 200 and again["worker"] == "a" and again["pid"] != a["pid"]
    r = await replica(sp, "a")
    assert r["restarts"] == 1 and r["last_exit"]["reason"] == "wake_failure"
    m = await sp.metrics()
    assert 'gpu_supervisor_worker_restarts_total{reason="wake_failure",replica="0",worker="a"} 1.0' in m


async def test_a_wake_that_outlasts_startup_timeout_s_starts_the_worker_anew(supervisor_factory):
    # each wake of a takes 60 s; its startup_timeout_s is 3 s (its cold load, 0.5 s, fits)
    cfg = sleep_config({"a": {"env": {"SLEEPY_WAKE_MS": "60000"}, "startup_timeout_s": 3}, "b": {}})
    sp = await supervisor_factory(cfg)
    _, a = await complete(sp, "a")
    await complete(sp, "b")
    assert await state_is(sp, "a", "asleep")
    code, again = await complete(sp, "a", timeout=30)
    assert code == 200 and again["pid"] != a["pid"] and again["wakes"] == 0
    assert (await replica(sp, "a"))["last_exit"]["reason"] == "wake_failure"


async def test_an_idle_replica_sleeps_then_unloads(supervisor_factory):
    cfg = sleep_config({"a": {"idle_unload_s": 3, "sleep": {"gpu_memory_mb": 50, "after_idle_s": 0.3}}})
    sp = await supervisor_factory(cfg)
    _, a = await complete(sp, "a")
    await wait_until(lambda: state_is(sp, "a", "asleep"), 15, "a asleep after after_idle_s")
    code, again = await complete(sp, "a")  # woken, the same process
    assert code == 200 and again["pid"] == a["pid"]
    await wait_until(lambda: state_is(sp, "a", "asleep"), 15, "a asleep again")
    await wait_until(lambda: state_is(sp, "a", "unloaded"), 15, "a unloaded after idle_unload_s")
    r = await replica(sp, "a")
    assert r["last_exit"]["reason"] == "idle" and r["restarts"] == 0
    m = await sp.metrics()
    assert 'gpu_supervisor_worker_sleeps_total{reason="idle",worker="a"} 2.0' in m


async def test_a_busy_replica_is_never_put_to_sleep(supervisor_factory):
    sp = await supervisor_factory(sleep_config({"a": {}, "b": {}}))
    await complete(sp, "a")
    busy = asyncio.create_task(complete(sp, "a", delay=2))
    await wait_until(lambda: _inflight(sp, "a"), 10, "a busy")
    # b cannot get the room within its deadline: a's request in flight is never cut by a sleep
    code, body = await complete(sp, "b", timeout=0.5)
    assert code == 503 and body["error"]["type"] == "worker_unavailable"
    code, body = await complete(sp, "b", timeout=20)  # once a is done it sleeps; b is served
    assert code == 200 and body["worker"] == "b"
    code, body = await busy
    assert code == 200 and body["worker"] == "a"  # answered whole, not by an asleep worker
    assert await state_is(sp, "a", "asleep")


async def _inflight(sp, worker: str) -> bool:
    return (await replica(sp, worker))["inflight"] > 0


async def test_a_reload_restarts_a_changed_asleep_worker_and_applies_sleep_keys_in_place(supervisor_factory):
    cfg = sleep_config({"a": {}, "b": {}})
    sp = await supervisor_factory(cfg)
    await complete(sp, "b")
    _, a = await complete(sp, "a")
    _, b = await complete(sp, "b")  # a asleep now
    assert await state_is(sp, "a", "asleep")
    # a, asleep: only its sleep keys change: it stays asleep, the same process
    cfg["workers"]["a"]["sleep"] = {**cfg["workers"]["a"]["sleep"], "after_idle_s": 600}
    sp.write_config(cfg)
    sp.signal(signal.SIGHUP)
    await sp.wait_log("config_reloaded")
    assert await state_is(sp, "a", "asleep") and (await replica(sp, "a"))["pid"] == a["pid"]
    # a, asleep: its worker section changes: stopped and started anew (b, idle, goes to sleep for it)
    cfg["workers"]["a"]["env"] = {"CHANGED": "1"}
    sp.write_config(cfg)
    sp.signal(signal.SIGHUP)
    await sp.wait_log("config_reloaded", count=2)
    await wait_until(lambda: state_is(sp, "a", "ready"), 15, "a restarted")
    r = await replica(sp, "a")
    assert r["pid"] != a["pid"] and r["last_exit"]["reason"] == "reload"
    code, again = await complete(sp, "a")
    assert code == 200 and again["pid"] == r["pid"]
    code, again_b = await complete(sp, "b")  # b was put to sleep for a's restart: woken, the same process
    assert code == 200 and again_b["pid"] == b["pid"]
    assert (await replica(sp, "b"))["restarts"] == 0


async def test_a_swap_waits_for_the_residents_queued_requests_and_they_run_together(supervisor_factory):
    sp = await supervisor_factory(sleep_config({"a": {"concurrency": 1}, "b": {}}))
    await complete(sp, "a")
    done: list[str] = []

    async def send(worker: str, delay: float) -> tuple[int, dict]:
        out = await complete(sp, worker, delay=delay, timeout=60)
        done.append(worker)
        return out

    runs = [asyncio.create_task(send("a", 0.3)) for _ in range(3)]  # one in flight, two queued behind it
    await wait_until(lambda: _queued(sp, "a", 2), 10, "two of a's requests queued")
    code, body = await send("b", 0)
    assert code == 200 and body["worker"] == "b"
    answers = await asyncio.gather(*runs)
    assert [c for c, _ in answers] == [200] * 3
    assert len({(body["pid"], body["wakes"]) for _, body in answers}) == 1  # one run: no sleep between them
    assert done == ["a", "a", "a", "b"]


async def _queued(sp, worker: str, n: int) -> bool:
    return (await sp.status())["workers"][worker]["queue"]["total"] >= n


async def test_sizes_learned_from_nvml_awake_and_asleep(tmp_path):
    """With (fake) NVML and nothing declared: the need is learned awake, what sleep leaves is learned asleep."""
    nvml = FakeNvml(devices=1, total=1000 * MiB)
    learned = {"gpu_memory_mb": 0, "sleep": {"gpu_memory_mb": 0, "host_memory_mb": 10}}
    c = sleep_config({"a": learned, "b": {"sleep": {"gpu_memory_mb": 0, "host_memory_mb": 10}, "gpu_memory_mb": 400}},
                     budget_mb=100000)
    c["gpu"].update({"enabled": True, "poll_interval_s": 0.05,
                     "thresholds": {"soft": 0.95, "hard": 0.97, "critical": 0.99}})
    path = tmp_path / "policy.yaml"
    path.write_text("{}")
    loaded = cfg.LoadedConfig(settings=cfg.Settings.model_validate(c), source=str(path), digest="t")
    d = Daemon(loaded, Environment(base_env=dict(os.environ), state_directory=str(tmp_path)),
               nvml_factory=lambda: nvml, install_signals=False)
    task = asyncio.create_task(d.serve())
    await wait_until(lambda: d.bound or task.done(), 10, "daemon listening")
    host, port = d.bound[0]
    sp = _InProc(aiohttp.ClientSession(f"http://{host}:{port}"))
    try:
        _, a = await complete(sp, "a")
        nvml.procs[0], nvml.used[0] = [(a["pid"], 700 * MiB)], 700 * MiB
        await wait_until(lambda: _need(sp, "a", 700 * MiB), 10, "a's need learned")
        _, b = await complete(sp, "b")  # 700 + 400 > 1000: a goes to sleep
        assert await state_is(sp, "a", "asleep")
        nvml.procs[0], nvml.used[0] = [(a["pid"], 30 * MiB), (b["pid"], 400 * MiB)], 430 * MiB
        await wait_until(lambda: _held(sp, 430 * MiB), 10, "a's sleep learned: 30 MiB")
        assert await _need(sp, "a", 700 * MiB)  # what it needs awake is not forgotten
        code, again = await complete(sp, "a")  # 400 + 700 > 1000: b sleeps, a wakes (the same process)
        assert code == 200 and again["pid"] == a["pid"]
        assert await state_is(sp, "b", "asleep")
    finally:
        await sp.session.close()
        d.stop.set()
        await asyncio.wait_for(task, 30)


class _InProc:
    """What the helpers above need of a daemon run in this process: its HTTP session and /status."""

    def __init__(self, session: aiohttp.ClientSession):
        self.session = session

    async def status(self) -> dict:
        async with self.session.get("/status") as r:
            return await r.json()


async def _need(sp, worker: str, n: int) -> bool:
    return (await replica(sp, worker))["gpu_memory_need_bytes"] == n


async def _held(sp, n: int) -> bool:
    return (await sp.status())["gpu"]["ledger"][0]["held_bytes"] == n
