"""On-demand workers and the GPU memory ledger end to end: models that take turns on a GPU.

Real daemons and real ctl workers. Without NVML (this machine), `gpu.budget_mb` and each worker's declared
`gpu_memory_mb` drive the ledger; the cases that need NVML figures (learned needs, other processes'
memory, memory that comes back late) run a daemon in-process with the one fake (tests/fake_nvml.py).
"""

from __future__ import annotations

import asyncio
import collections
import os

import aiohttp
import pytest

from supervisor import config as cfg
from supervisor.daemon import Daemon, Environment
from tests.fake_nvml import FakeNvml
from tests.harness import ctl_command, fast_config, wait_until

MiB = 1 << 20


def ledger_config(workers: dict, budget_mb: int = 1000, **over) -> dict:
    base = fast_config(**over)
    w = base.pop("worker")
    base["worker_defaults"] = {k: v for k, v in w.items() if k != "command"}
    base["workers"] = {name: {"command": ctl_command("--name", name), "gpus": [0], "models": [name], **spec}
                       for name, spec in workers.items()}
    base["gpu"] = {**base.get("gpu", {}), "budget_mb": {0: budget_mb}, "settle_timeout_s": 0.5}
    return base


def on_demand(mb: int, **kw) -> dict:
    return {"start": "on_demand", "gpu_memory_mb": mb, "min_resident_s": 0, **kw}


async def _state(sp, worker: str) -> str:
    return (await sp.status())["workers"][worker]["replicas"][0]["state"]


def call(sp, worker: str, timeout: float | None = None, delay: float = 0):
    """POST /v1/echo for `worker`'s model (routing by the body's `model`)."""
    headers = {"X-Request-Timeout": str(timeout)} if timeout is not None else {}
    return sp.session.post(f"/v1/echo?delay={delay}", json={"model": worker}, headers=headers)


async def test_ten_concurrent_cold_requests_cause_one_start(supervisor_factory):
    cfg_ = ledger_config({"a": on_demand(300)})
    sp = await supervisor_factory(cfg_)
    assert await _state(sp, "a") == "unloaded"
    async with sp.session.get("/v1/models") as r:
        listing = await r.json()
    assert listing["data"][0]["id"] == "a" and listing["data"][0]["status"] == "unloaded"
    results = await asyncio.gather(*(call(sp, "a") for _ in range(10)))
    codes = [r.status for r in results]
    for r in results:
        r.release()
    assert codes == [200] * 10
    spawned = sp.events("worker_spawned", worker="a")
    assert len(spawned) == 1


async def test_an_idle_worker_is_evicted_to_make_room_and_comes_back(supervisor_factory):
    cfg_ = ledger_config({"a": on_demand(600), "b": on_demand(600)})
    sp = await supervisor_factory(cfg_)
    async with call(sp, "a") as r:
        assert r.status == 200 and r.headers["X-Worker-Name"] == "a"
    async with call(sp, "b") as r:  # a is idle: evicted, b started
        assert r.status == 200 and r.headers["X-Worker-Name"] == "b"
    st = await sp.status()
    assert st["workers"]["a"]["replicas"][0]["state"] == "unloaded"
    assert st["workers"]["a"]["replicas"][0]["last_exit"]["reason"] == "evicted"
    ledger = st["gpu"]["ledger"][0]
    assert ledger["capacity_bytes"] == 1000 * MiB and ledger["held_bytes"] == 600 * MiB
    m = await sp.metrics()
    assert 'gpu_supervisor_worker_unloads_total{reason="evicted",worker="a"} 1.0' in m
    assert 'gpu_supervisor_gpu_memory_reserved_bytes{gpu="0"}' in m
    async with call(sp, "a") as r:  # and back
        assert r.status == 200 and r.headers["X-Worker-Name"] == "a"


async def test_a_busy_worker_is_never_evicted(supervisor_factory):
    cfg_ = ledger_config({"a": on_demand(600), "b": on_demand(600)})
    sp = await supervisor_factory(cfg_)
    async with call(sp, "a") as r:
        assert r.status == 200
    a_pid = (await sp.status())["workers"]["a"]["replicas"][0]["pid"]
    busy = asyncio.create_task(call(sp, "a", delay=2))
    await wait_until(lambda: _inflight(sp, "a"), 10, "a busy")
    # b cannot get the room within its deadline: 503 worker_unavailable with an honest Retry-After
    async with call(sp, "b", timeout=0.5) as r:
        assert r.status == 503
        body = await r.json()
        assert body["error"]["type"] == "worker_unavailable" and int(r.headers["Retry-After"]) >= 1
    # a waiting request is served once a is done (then idle, evictable)
    async with call(sp, "b", timeout=20) as r:
        assert r.status == 200 and r.headers["X-Worker-Name"] == "b"
    first = await busy
    assert first.status == 200  # a's request was never cut to make room
    first.release()
    assert not sp.events("worker_exited", worker_pid=a_pid, reason="evicted") or \
        sp.events("worker_exited", worker_pid=a_pid)[0]["uptime_s"] >= 2


async def _inflight(sp, worker: str) -> bool:
    return (await sp.status())["workers"][worker]["replicas"][0]["inflight"] > 0


async def _inflight_count(sp, worker: str, n: int) -> bool:
    return (await sp.status())["workers"][worker]["replicas"][0]["inflight"] >= n


async def test_pinned_is_never_touched_and_an_impossible_need_is_refused_at_once(inproc):
    # knowable from the config (a budget): check-config refuses it
    bad = ledger_config({"a": {"gpu_memory_mb": 600, "pinned": True}, "b": on_demand(600)})
    with pytest.raises(ValueError, match="does not fit beside pinned"):
        cfg.Settings.model_validate(bad)
    # knowable only from NVML (no budget): refused at run time, at once, and the pinned one untouched
    nvml = FakeNvml(devices=1, total=1000 * MiB)
    c = ledger_config({"a": {"gpu_memory_mb": 600, "pinned": True}, "b": on_demand(600)})
    c["gpu"] = {"enabled": True, "poll_interval_s": 0.05}
    d, s = await inproc(c, nvml)
    await wait_until(lambda: _capacity_known(s), 10, "NVML total read")
    a_pid = (await _status(s))["workers"]["a"]["replicas"][0]["pid"]
    async with s.post("/v1/echo", json={"model": "b"}, headers={"X-Request-Timeout": "30"}) as r:
        assert r.status == 503  # at once, not after 30 s: b can never fit beside the pinned a
        body = await r.json()
    assert body["error"]["type"] == "worker_unavailable" and "600 MiB" in body["error"]["message"]
    st = await _status(s)
    assert st["workers"]["a"]["replicas"][0]["pid"] == a_pid
    assert st["workers"]["b"]["replicas"][0]["state"] == "unloaded"


async def _capacity_known(s) -> bool:
    ledger = (await _status(s))["gpu"]["ledger"]
    return bool(ledger) and ledger[0]["capacity_bytes"] == 1000 * MiB


async def test_idle_unload_and_a_request_during_the_unload(supervisor_factory):
    cfg_ = ledger_config({"a": on_demand(300, idle_unload_s=0.5)})
    sp = await supervisor_factory(cfg_)
    async with call(sp, "a") as r:
        assert r.status == 200
    ev = await sp.wait_log("worker_exited", timeout=10, worker="a", reason="idle")
    assert ev["uptime_s"] > 0
    assert await _state(sp, "a") == "unloaded"
    # a streaming answer is not idle: a stream longer than idle_unload_s finishes whole
    async with sp.session.get("/stream?n=6&interval=0.2") as r:  # the only worker: unrouted requests go to it
        assert r.status == 200 and (await r.text()).count("data: {") == 6
    # requests that race the next idle unload: each is served (a new start when it was unloaded)
    for _ in range(3):
        await sp.wait_log("worker_exited", timeout=10, worker="a", reason="idle",
                          count=len(sp.events("worker_exited", worker="a", reason="idle")) + 1)
        async with call(sp, "a", timeout=20) as r:
            assert r.status == 200
    m = await sp.metrics()
    assert 'gpu_supervisor_worker_unloads_total{reason="idle",worker="a"}' in m


async def test_alternating_traffic_does_not_thrash_nor_starve(supervisor_factory):
    """Two clients, each sending to its own model back to back; the models do not fit together. Each
    swap waits min_resident_s, so every load serves a run of requests; neither client starves and
    nothing is lost (whether a swap went by an idle moment or by draining the resident is the
    daemon's business: the outcome is what counts)."""
    spec = {"min_resident_s": 1.0, "max_starvation_s": 1.5}
    sp = await supervisor_factory(ledger_config({"a": on_demand(600, **spec), "b": on_demand(600, **spec)}))
    served: collections.Counter[str] = collections.Counter()
    codes: collections.Counter = collections.Counter()
    loop = asyncio.get_running_loop()
    end = loop.time() + 8

    async def client(target: str) -> None:
        while loop.time() < end:
            async with call(sp, target, timeout=20, delay=0.02) as r:
                codes[r.status if r.status == 200 else (r.status, (await r.json())["error"]["message"])] += 1
                if r.status == 200:
                    served[r.headers["X-Worker-Name"]] += 1

    await asyncio.gather(client("a"), client("b"))
    assert set(codes) == {200}, codes
    assert served["a"] > 0 and served["b"] > 0  # neither starved
    swaps = len(sp.events("gpu_room_evict"))
    # not one swap per request: each load serves a run of requests
    assert swaps >= 1 and sum(served.values()) >= 4 * swaps, (swaps, served)


async def test_a_resident_that_never_goes_idle_does_not_starve_a_waiter(supervisor_factory):
    """Three overlapping request loops keep `a` busy without a pause; a request for `b` (which does not
    fit beside it) is still served within its deadline (a is drained after max_starvation_s, then
    evicted once idle), and not one of a's requests is lost or cut on the way."""
    spec = {"min_resident_s": 0.5, "max_starvation_s": 1.0, "concurrency": 4}
    sp = await supervisor_factory(ledger_config({"a": on_demand(600, **spec), "b": on_demand(600, **spec)}))
    async with call(sp, "a", timeout=20) as r:
        assert r.status == 200
    b_served = asyncio.Event()
    codes: collections.Counter = collections.Counter()

    async def keep_busy(delay: float) -> None:
        while not b_served.is_set():
            async with call(sp, "a", timeout=60, delay=delay) as r:
                codes[r.status if r.status == 200 else (r.status, await r.text())] += 1

    loops = []
    for delay in (0.25, 0.31, 0.37):  # out of step: one is always in flight while another starts its next
        loops.append(asyncio.create_task(keep_busy(delay)))
        await wait_until(lambda: _inflight_count(sp, "a", len(loops)), 10, "a's loops in flight")
    try:
        async with call(sp, "b", timeout=30) as r:
            b_status, b_worker = r.status, r.headers.get("X-Worker-Name")
    finally:
        b_served.set()
        await asyncio.gather(*loops)
    assert (b_status, b_worker) == (200, "b")
    assert set(codes) == {200} and codes[200] >= 3, codes  # a was served throughout, nothing lost


# -- with NVML figures (the fake seam), in process -----------------------------------------------

@pytest.fixture
async def inproc(tmp_path):
    running = []

    async def start(config: dict, nvml: FakeNvml):
        path = tmp_path / "policy.yaml"
        path.write_text("{}")
        loaded = cfg.LoadedConfig(settings=cfg.Settings.model_validate(config), source=str(path), digest="t")
        env = Environment(base_env=dict(os.environ), state_directory=str(tmp_path))
        d = Daemon(loaded, env, nvml_factory=lambda: nvml, install_signals=False)
        task = asyncio.create_task(d.serve())
        await wait_until(lambda: d.bound or task.done(), 10, "daemon listening")
        assert not task.done(), task.exception()
        host, port = d.bound[0]
        session = aiohttp.ClientSession(f"http://{host}:{port}")
        running.append((d, task, session))
        return d, session

    yield start
    for d, task, session in running:
        await session.close()
        d.stop.set()
        await asyncio.wait_for(task, 30)


async def _status(session) -> dict:
    async with session.get("/status") as r:
        return await r.json()


async def test_learned_need_foreign_memory_and_late_return(inproc):
    nvml = FakeNvml(devices=1, total=1000 * MiB)
    c = ledger_config({"a": on_demand(0), "b": on_demand(400)}, budget_mb=100000)
    c["gpu"].update({"enabled": True, "poll_interval_s": 0.05, "settle_timeout_s": 3,
                     "thresholds": {"soft": 0.95, "hard": 0.97, "critical": 0.99}})
    d, s = await inproc(c, nvml)
    async with s.post("/v1/echo", json={"model": "a"}) as r:
        assert r.status == 200
    st = await _status(s)
    a = st["workers"]["a"]["replicas"][0]
    # a declared nothing: NVML shows its process tree holding 700 MiB, which becomes its learned need
    nvml.procs[0] = [(a["pid"], 700 * MiB)]
    nvml.used[0] = 700 * MiB
    await wait_until(lambda: _learned(s, "a", 700 * MiB), 10, "learned need")
    ledger = (await _status(s))["gpu"]["ledger"][0]
    assert ledger["capacity_bytes"] == 1000 * MiB and ledger["held_bytes"] == 700 * MiB
    # b (400) does not fit beside a (700): a is evicted; its memory comes back late, and b waits for it
    req = asyncio.create_task(s.post("/v1/echo", json={"model": "b"}, headers={"X-Request-Timeout": "20"}))
    await wait_until(lambda: _state_is(s, "a", "unloaded"), 10, "a evicted")
    assert not req.done()  # NVML still shows a's 700 MiB: b's start waits for it to settle
    nvml.procs[0] = []
    nvml.used[0] = 0
    r = await req
    assert r.status == 200 and r.headers["X-Worker-Name"] == "b"
    r.release()
    # memory that is not ours counts: 800 MiB used by another process leaves no room for a (700)
    b_pid = (await _status(s))["workers"]["b"]["replicas"][0]["pid"]
    nvml.procs[0] = [(b_pid, 100 * MiB)]
    nvml.used[0] = 900 * MiB
    await wait_until(lambda: _foreign(s, 800 * MiB), 10, "foreign memory seen")
    async with s.post("/v1/echo", json={"model": "a"}, headers={"X-Request-Timeout": "1"}) as r:
        assert r.status == 503 and (await r.json())["error"]["type"] == "worker_unavailable"


async def _learned(s, worker: str, n: int) -> bool:
    return (await _status(s))["workers"][worker]["replicas"][0]["gpu_memory_need_bytes"] == n


async def _state_is(s, worker: str, state: str) -> bool:
    return (await _status(s))["workers"][worker]["replicas"][0]["state"] == state


async def _foreign(s, n: int) -> bool:
    return (await _status(s))["gpu"]["ledger"][0]["foreign_bytes"] == n


async def test_gpus_auto_takes_every_gpu_nvml_sees_and_an_unseen_gpu_is_warned_about(inproc):
    from structlog.testing import capture_logs

    nvml = FakeNvml(devices=2, total=8000 * MiB)
    c = ledger_config({"m": {"gpus": "auto", "gpu_memory_mb": 100}, "x": {"gpus": [0, 3], "gpu_memory_mb": 100}},
                      budget_mb=100000)
    c["gpu"] = {"enabled": True, "poll_interval_s": 0.05}
    with capture_logs() as logs:
        d, s = await inproc(c, nvml)
        st = await _status(s)
    assert [r["gpu"] for r in st["workers"]["m"]["replicas"]] == [0, 1]
    assert [r["gpu"] for r in st["workers"]["x"]["replicas"]] == [0, 3]  # started anyway
    warned = [e for e in logs if e["event"] == "gpu_not_seen"]
    assert warned and warned[0]["worker"] == "x" and warned[0]["gpus"] == [3]
    await wait_until(lambda: _all_serving(s, "x", 2), 15, "x's replicas up")


async def _all_serving(s, worker: str, n: int) -> bool:
    reps = (await _status(s))["workers"][worker]["replicas"]
    return sum(1 for r in reps if r["state"] in ("ready", "busy")) == n
