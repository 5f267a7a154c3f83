"""The fleet end to end: several named workers, replicas per GPU, routing by path and model, isolation.

Real daemons, real ctl_worker replicas over real Unix sockets, real signals.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import shutil
import signal
import subprocess

import aiohttp
import pytest

from tests.harness import ctl_command, fast_config, kill_quiet, pid_alive, wait_until
from tests.workers.util import GUNICORN_COMMAND, UVICORN_COMMAND

WORKER_KEYS = {"command", "startup_timeout_s", "hang_timeout_s", "stop_grace_s", "health", "restart"}


def fleet_config(workers: dict, **overrides) -> dict:
    """fast_config() with `workers:` instead of `worker:`; each worker inherits the fast lifecycle."""
    base = fast_config(**overrides)
    defaults = {k: v for k, v in base.pop("worker").items() if k in WORKER_KEYS and k != "command"}
    base["worker_defaults"] = defaults
    base["workers"] = workers
    return base


def ctl(name: str, *extra: str, **env: str) -> dict:
    return {"command": ctl_command("--name", name, *extra), "env": env}


async def _replicas(sp, worker: str) -> list[dict]:
    return (await sp.status())["workers"][worker]["replicas"]


async def _serving(sp, worker: str, n: int) -> bool:
    reps = await _replicas(sp, worker)
    return sum(1 for r in reps if r["state"] in ("ready", "busy")) >= n


async def test_routing_by_path_declared_and_discovered_model(supervisor_factory):
    cfg = fleet_config({
        "embed": ctl("embed", "--models", "ignored-not-read"),
        "chat": {**ctl("chat"), "models": ["llama-8b", "llama"]},
        "disc": ctl("disc", "--models", "found-a,found-b"),
    }, routes=[{"path": "/v1/embeddings", "worker": "embed"}])
    cfg["workers"]["embed"]["models"] = ["minilm"]
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: _serving(sp, "disc", 1), 15, "disc ready")
    s = sp.session

    async def served_by(path: str, body: dict | None = None) -> tuple[int, str | None, dict]:
        async with s.post(path, json=body if body is not None else {}) as r:
            return r.status, r.headers.get("X-Worker-Name"), await r.json()

    # a path route names the worker, whatever the body says
    assert (await served_by("/v1/embeddings", {"model": "llama"}))[1] == "embed"
    # a declared model picks its worker
    assert (await served_by("/v1/completions", {"model": "llama-8b"}))[1] == "chat"
    assert (await served_by("/v1/chat/completions", {"model": "llama"}))[1] == "chat"
    # a discovered model (GET /v1/models of the worker, read once it is ready)
    await wait_until(lambda: _has_model(sp, "disc", "found-b"), 10, "models discovered")
    assert (await served_by("/v1/completions", {"model": "found-b"}))[1] == "disc"
    # an unknown model: 404 model_not_found listing what is served
    status, _, body = await served_by("/v1/completions", {"model": "gpt-5"})
    assert status == 404 and body["error"]["type"] == "model_not_found"
    for m in ("llama-8b", "llama", "minilm", "found-a", "found-b"):
        assert m in body["error"]["message"]
    # no model, or a body that is not JSON: the first worker, never a 500
    assert (await served_by("/v1/completions", {"prompt": "x"}))[1] == "embed"
    async with s.post("/v1/completions", data=b"not json {", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200 and r.headers["X-Worker-Name"] == "embed"
    # `model` of the wrong type: the client's error, named
    status, _, body = await served_by("/v1/completions", {"model": 42})
    assert status == 400 and "model" in body["error"]["message"]
    # the daemon answers GET /v1/models with every worker's models and whether they are loaded
    async with s.get("/v1/models") as r:
        listing = await r.json()
    by_id = {m["id"]: m for m in listing["data"]}
    assert set(by_id) == {"minilm", "llama-8b", "llama", "found-a", "found-b"}
    assert by_id["llama"]["worker"] == "chat" and by_id["llama"]["status"] == "loaded"
    m = await sp.metrics()
    assert 'gpu_supervisor_requests_total{code="200",priority="normal",worker="chat"}' in m
    assert 'gpu_supervisor_requests_total{code="404",priority="normal",worker="none"}' in m


async def _has_model(sp, worker: str, model: str) -> bool:
    return model in (await sp.status())["workers"][worker]["models"]


async def test_model_routing_reads_bounded_bodies_only(supervisor_factory):
    """A body over retry.max_body_bytes is never buffered to find its model: it routes by path."""
    cfg = fleet_config({"a": ctl("a"), "b": {**ctl("b"), "models": ["mb"]}},
                       retry={"max_body_bytes": 1024})
    sp = await supervisor_factory(cfg)
    small = b'{"model": "mb", "pad": "' + b"x" * 100 + b'"}'
    big = b'{"model": "mb", "pad": "' + b"x" * 5000 + b'"}'
    async with sp.session.post("/v1/x", data=small, headers={"Content-Type": "application/json"}) as r:
        assert r.headers["X-Worker-Name"] == "b"
    async with sp.session.post("/v1/x", data=big, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200 and r.headers["X-Worker-Name"] == "a"
        assert (await r.json())["body_length"] == len(big)  # streamed through whole


async def test_load_spreads_over_replicas_and_each_gets_its_gpu(supervisor_factory):
    cfg = fleet_config({"m": {**ctl("m"), "gpus": [0, 1, 3], "concurrency": 1}})
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: _serving(sp, "m", 3), 15, "3 replicas ready")
    reps = await _replicas(sp, "m")
    assert [r["gpu"] for r in reps] == [0, 1, 3]
    pid_gpu = {r["pid"]: str(r["gpu"]) for r in reps}

    async def one() -> tuple[str, str]:
        async with sp.session.get("/env?name=CUDA_VISIBLE_DEVICES&delay=0") as r:
            body = await r.json()
            return str(body["pid"]), body["env"]["CUDA_VISIBLE_DEVICES"]

    async def slow() -> str:
        async with sp.session.get("/sleep?s=0.3") as r:
            assert r.status == 200
            return r.headers["X-Worker-Pid"]

    seen = await asyncio.gather(*(one() for _ in range(30)))
    for pid, gpu in seen:
        assert pid_gpu[int(pid)] == gpu  # CUDA_VISIBLE_DEVICES is the replica's own GPU
    # three concurrent slow requests with one slot per replica: one on each replica
    pids = await asyncio.gather(*(slow() for _ in range(3)))
    assert len(set(pids)) == 3, pids


async def test_kill_one_replica_under_load_others_carry_it(supervisor_factory):
    cfg = fleet_config({"m": {**ctl("m"), "replicas": 3, "concurrency": 2}})
    cfg["worker_defaults"]["restart"] = {"backoff_initial_s": 1.0, "backoff_max_s": 1.0, "max_restarts": 20,
                                         "window_s": 60}
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: _serving(sp, "m", 3), 15, "3 replicas ready")
    reps = await _replicas(sp, "m")
    victim = reps[1]["pid"]
    codes: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            async with sp.session.get("/sleep?s=0.05") as r:
                codes[r.status] += 1

    tasks = [asyncio.create_task(client()) for _ in range(6)]
    await wait_until(lambda: sum(codes.values()) >= 30, 10, "traffic flowing")
    kill_quiet(victim, signal.SIGKILL)
    before = sum(codes.values())
    # while the victim is down (backoff 1 s) the two others keep answering
    await wait_until(lambda: sum(codes.values()) >= before + 40, 10, "others carry the load")
    down = await _replicas(sp, "m")
    assert down[1]["state"] in ("backoff", "starting") and down[1]["pid"] != victim
    await wait_until(lambda: _serving(sp, "m", 3), 15, "victim back")
    stop.set()
    await asyncio.gather(*tasks)
    assert set(codes) == {200}, codes  # every GET (retry-safe) was answered 200
    after = await _replicas(sp, "m")
    assert [r["restarts"] for r in after] == [0, 1, 0]
    assert after[1]["last_exit"]["reason"] == "killed"  # a SIGKILL we did not send, no sign of OOM
    assert after[0]["pid"] == reps[0]["pid"] and after[2]["pid"] == reps[2]["pid"]
    m = await sp.metrics()
    assert 'gpu_supervisor_worker_restarts_total{reason="killed",replica="1",worker="m"} 1.0' in m


async def test_sigstop_one_replica_is_hung_and_replaced(supervisor_factory):
    cfg = fleet_config({"m": {**ctl("m"), "replicas": 2, "concurrency": 2}})
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: _serving(sp, "m", 2), 15, "2 replicas ready")
    reps = await _replicas(sp, "m")
    victim = reps[0]["pid"]
    try:
        kill_quiet(victim, signal.SIGSTOP)
        # the other replica answers at once, whatever the victim does
        for _ in range(5):
            async with sp.session.get("/hello", timeout=aiohttp.ClientTimeout(total=10)) as r:
                assert r.status == 200
        ev = await sp.wait_log("worker_exited", timeout=15, worker="m", replica=0, reason="hang")
        assert ev["worker_pid"] == victim
    finally:
        kill_quiet(victim, signal.SIGCONT)
    await wait_until(lambda: _serving(sp, "m", 2), 15, "replaced")
    after = await _replicas(sp, "m")
    assert after[0]["restarts"] == 1 and after[1]["restarts"] == 0 and after[1]["pid"] == reps[1]["pid"]


async def test_crash_looping_replica_fails_while_siblings_serve(supervisor_factory):
    cfg = fleet_config({"m": {**ctl("m", "--fail-on-gpu", "1"), "gpus": [0, 1]}})
    cfg["worker_defaults"]["restart"] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02, "max_restarts": 2,
                                         "window_s": 60}
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: _replica_state(sp, "m", 1, "failed"), 20, "replica 1 failed")
    reps = await _replicas(sp, "m")
    assert reps[0]["state"] in ("ready", "busy") and reps[1]["breaker"]["state"] == "forced_open"
    assert await sp.ready()  # one serving replica keeps the worker (and the daemon) ready
    for _ in range(5):
        async with sp.session.get("/hello") as r:
            assert r.status == 200 and r.headers["X-Worker-Pid"] == str(reps[0]["pid"])


async def _replica_state(sp, worker: str, index: int, state: str) -> bool:
    return (await _replicas(sp, worker))[index]["state"] == state


async def test_scale_up_and_down_by_sighup_without_a_failed_request(supervisor_factory):
    cfg = fleet_config({"m": {**ctl("m"), "replicas": 1, "concurrency": 2}, "other": ctl("other")})
    sp = await supervisor_factory(cfg)
    other_pid = (await _replicas(sp, "other"))[0]["pid"]
    first_pid = (await _replicas(sp, "m"))[0]["pid"]
    codes: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            async with sp.session.get("/sleep?s=0.02") as r:
                codes[r.status] += 1

    tasks = [asyncio.create_task(client()) for _ in range(4)]
    try:
        up = copy.deepcopy(cfg)
        up["workers"]["m"]["replicas"] = 3
        sp.write_config(up)
        sp.signal(signal.SIGHUP)
        await wait_until(lambda: _serving(sp, "m", 3), 15, "scaled up to 3")
        reps = await _replicas(sp, "m")
        assert reps[0]["pid"] == first_pid  # the unchanged replica kept running
        ev = await sp.wait_log("config_reloaded", timeout=10)
        assert ev["worker_replaced"] is False and ev["replicas_added"] == ["m/1", "m/2"], ev
        down = copy.deepcopy(cfg)
        down["workers"]["m"]["replicas"] = 1
        del down["workers"]["other"]
        sp.write_config(down)
        sp.signal(signal.SIGHUP)
        await wait_until(lambda: _count_replicas(sp, "m", 1), 15, "scaled down to 1")
        await wait_until(lambda: not pid_alive(other_pid), 10, "removed worker stopped")
        assert "other" not in (await sp.status())["workers"]
        assert (await _replicas(sp, "m"))[0]["pid"] == first_pid
        # replicas only removed: the log says so, and not that a worker was replaced
        ev = await sp.wait_log("config_reloaded", timeout=10, count=2)
        assert ev["worker_replaced"] is False, ev
        assert ev["workers_removed"] == ["other"] and sorted(ev["replicas_retired"]) == ["m/1", "m/2", "other/0"]
        await wait_until(lambda: sum(codes.values()) > 50, 10, "traffic")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert set(codes) == {200}, codes


async def _new_pid_serving(sp, worker: str, old_pid: int) -> bool:
    r = (await _replicas(sp, worker))[0]
    return r["pid"] not in (None, old_pid) and r["state"] in ("ready", "busy")


async def _count_replicas(sp, worker: str, n: int) -> bool:
    return len(await _replicas(sp, worker)) == n


async def test_changed_worker_is_replaced_one_replica_at_a_time(supervisor_factory):
    cfg = fleet_config({"m": {**ctl("m"), "replicas": 2, "concurrency": 2}})
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: _serving(sp, "m", 2), 15, "2 ready")
    old = {r["pid"] for r in await _replicas(sp, "m")}
    serving_low = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            reps = await _replicas(sp, "m")
            serving_low.append(sum(1 for r in reps if r["state"] in ("ready", "busy")))

    w = asyncio.create_task(watch())
    new = copy.deepcopy(cfg)
    new["workers"]["m"]["env"] = {"GEN": "two"}
    sp.write_config(new)
    sp.signal(signal.SIGHUP)
    ev = await sp.wait_log("config_reloaded", timeout=10)
    assert ev["worker_replaced"] is True and ev["replicas_replaced"] == ["m/0", "m/1"], ev
    await wait_until(lambda: _all_new(sp, old), 20, "both replaced")
    done.set()
    await w
    assert min(serving_low) >= 1, serving_low  # never fewer than N - 1 serving


async def _all_new(sp, old: set) -> bool:
    reps = await _replicas(sp, "m")
    return all(r["pid"] not in old and r["state"] in ("ready", "busy") for r in reps)


async def test_fleet_metrics_are_clean_under_promtool(supervisor_factory):
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/test.sh installs it)")
    cfg = fleet_config({"a": {**ctl("a"), "replicas": 2}, "b": ctl("b")})
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: _serving(sp, "a", 2), 15, "ready")
    async with sp.session.get("/hello") as r:
        assert r.status == 200
    text = await sp.metrics()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for series in ('gpu_supervisor_worker_up{replica="1",worker="a"} 1.0',
                   'gpu_supervisor_worker_up{replica="0",worker="b"} 1.0',
                   'gpu_supervisor_inflight{replica="0",worker="a"}'):
        assert series in text


async def test_uvicorn_and_gunicorn_as_two_workers_of_one_fleet(supervisor_factory):
    cfg = fleet_config({
        "fast": {"command": list(UVICORN_COMMAND), "models": ["fast-m"]},
        "flask": {"command": list(GUNICORN_COMMAND), "models": ["flask-m"]},
    })
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: _serving(sp, "flask", 1), 20, "gunicorn ready")
    st = await sp.status()
    fast_pid = st["workers"]["fast"]["replicas"][0]["pid"]
    flask_pid = st["workers"]["flask"]["replicas"][0]["pid"]
    for model, pid in (("fast-m", fast_pid), ("flask-m", flask_pid), ("fast-m", fast_pid)):
        async with sp.session.post("/v1/echo", json={"model": model, "n": 1}) as r:
            assert r.status == 200
            body = await r.json()
        assert body["json"]["model"] == model
        assert body["pid"] == pid or pid_alive(body["pid"])  # gunicorn answers from its worker process
        if model == "fast-m":
            assert body["pid"] == fast_pid
        else:
            assert body["pid"] != fast_pid
    # kill -9 of one: the other keeps serving, the victim comes back
    kill_quiet(fast_pid, signal.SIGKILL)
    async with sp.session.post("/v1/echo", json={"model": "flask-m"}) as r:
        assert r.status == 200
    await wait_until(lambda: _new_pid_serving(sp, "fast", fast_pid), 20, "uvicorn respawned")
    st = await sp.status()
    assert st["workers"]["fast"]["replicas"][0]["restarts"] == 1
    assert st["workers"]["flask"]["replicas"][0]["restarts"] == 0


async def test_an_unknown_model_is_refused_not_sent_to_a_worker_that_lists_none(supervisor_factory):
    # configs/fleet.yaml's shape: a model service beside a FastAPI extractor that has no GET /v1/models
    cfg = fleet_config({
        "extract": {"command": list(UVICORN_COMMAND)},
        "chat": {**ctl("chat"), "models": ["llama-8b"]},
    })
    sp = await supervisor_factory(cfg)
    async with sp.session.post("/v1/echo", json={"model": "gpt-5"}) as r:
        assert r.status == 404
        err = (await r.json())["error"]
    assert err["type"] == "model_not_found" and "llama-8b" in err["message"]
    async with sp.session.post("/v1/echo", json={"model": "llama-8b"}) as r:
        assert r.status == 200 and r.headers["X-Worker-Name"] == "chat"
    async with sp.session.post("/v1/echo", json={"input": "no model named"}) as r:
        assert r.status == 200 and (await r.json())["json"] == {"input": "no model named"}  # the first worker


async def test_one_worker_with_discovered_models_gets_every_model_name_itself(supervisor_factory):
    # one server that lists one id but answers to any name (as TGI and llama.cpp's server do): with one
    # worker the daemon does not refuse a name the list lacks, the worker decides
    sp = await supervisor_factory(fleet_config({"llm": ctl("llm", "--models", "served-model")}))
    async with sp.session.get("/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["served-model"]
    for name in ("served-model", "gpt-3.5-turbo"):
        async with sp.session.post("/v1/echo", json={"model": name}) as r:
            assert r.status == 200 and r.headers["X-Worker-Name"] == "llm", name


async def test_a_request_for_a_worker_waiting_for_gpu_room_is_told_so(supervisor_factory):
    # two on-demand workers on one GPU with room for one (gpu.budget_mb, as on a host without NVML)
    def on_demand(name: str) -> dict:
        return {**ctl(name), "models": [name], "gpus": [0], "start": "on_demand", "gpu_memory_mb": 600,
                "min_resident_s": 0}

    cfg = fleet_config({"a": on_demand("a"), "b": on_demand("b")},
                       gpu={"budget_mb": {0: 1000}, "settle_timeout_s": 0.5})
    sp = await supervisor_factory(cfg)
    busy = asyncio.create_task(sp.session.post("/v1/echo?delay=3", json={"model": "a"}))

    async def a_busy() -> bool:
        return (await _replicas(sp, "a"))[0]["inflight"] > 0

    await wait_until(a_busy, 15, "a started and busy")
    # a is busy, so never evicted: b waits for its room, then its request runs out of time
    async with sp.session.post("/v1/echo", json={"model": "b"}, headers={"X-Request-Timeout": "0.5"}) as r:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        err = (await r.json())["error"]
    assert err["type"] == "worker_unavailable"
    msg = err["message"]
    assert msg.startswith("worker b is waiting for GPU room: it needs 600 MiB on GPU 0"), msg
    assert "400 of 1000 MiB are free" in msg and "a/0" in msg
    first = await busy
    assert first.status == 200
    first.release()
