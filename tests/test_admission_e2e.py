"""Admission control end to end: a real supervisor (concurrency 1) in front of the real ctl_worker.

A request to `/hang` holds the only slot for as long as the test wants; cancelling its client task
is a client disconnect, which frees the slot at a moment the test chooses. `/counter` is routed to
its own pool so the worker can be asked what it saw while the default pool is blocked.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.harness import SupervisorProcess, fast_config, wait_until

META = {"path": "/counter", "pool": "meta"}


def config(routes: tuple = (), **queue) -> dict:
    q = {"concurrency": 1, "timeout_s": 30, "pools": {"meta": {"concurrency": 2}}} | queue
    return fast_config(queue=q, routes=[META, *routes], drain={"timeout_s": 2})


async def call(sp: SupervisorProcess, path: str, headers: dict | None = None,
               done: list | None = None, tag: str | None = None) -> tuple[int, dict, bytes]:
    async with sp.session.get(path, headers=headers or {}) as r:
        body = await r.read()
        if done is not None:
            done.append(tag)
        return r.status, dict(r.headers), body


async def hold_slot(sp: SupervisorProcess) -> asyncio.Task:
    """A request that occupies the default pool's slot until its task is cancelled."""
    task = asyncio.create_task(call(sp, "/hang"))
    await wait_until(lambda: pool_is(sp, inflight=1), 10, "the /hang request to run")
    return task


async def let_go(task: asyncio.Task) -> None:
    """The client of `task` disconnects."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def pool_is(sp: SupervisorProcess, pool: str = "default", **want: int) -> bool:
    p = (await sp.status())["queue"]["pools"][pool]
    return all(p[k] == v for k, v in want.items())


async def depth_is(sp: SupervisorProcess, **want: int) -> bool:
    d = (await sp.status())["queue"]["depth"]
    return all(d[k] == v for k, v in want.items())


async def seen(sp: SupervisorProcess) -> dict:
    async with sp.session.get("/counter") as r:
        assert r.status == 200
        return await r.json()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.compile(rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$", re.M)
    m = pat.search(text)
    assert m, f"{name}{{{want}}} not in metrics"
    return float(m.group(1))


def check_error(status: int, headers: dict, body: bytes, code: int, etype: str, retry: bool) -> dict:
    assert status == code, body
    assert headers["Content-Type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["type"] == etype and err["message"]
    assert err["request_id"] and err["request_id"] == headers["X-Request-ID"]
    if retry:
        ra = headers["Retry-After"]
        assert ra.isdigit() and int(ra) >= 1
        assert err["retry_after_s"] == int(ra)
    else:
        assert "Retry-After" not in headers and "retry_after_s" not in err
    return err


# ---- order --------------------------------------------------------------------------------------

async def test_high_priority_overtakes_a_queued_burst_of_low(supervisor_factory):
    sp = await supervisor_factory(config(routes=({"path": "/sleep", "priority": "low"},)))
    blocker = await hold_slot(sp)
    done: list[str] = []
    tasks = []
    # lows come first, one by one, so their order is known; the route makes them `low`
    for i in range(6):
        tasks.append(asyncio.create_task(call(sp, f"/sleep?s=0.05&tag=low{i}", done=done, tag=f"low{i}")))
        await wait_until(lambda n=i + 1: depth_is(sp, low=n), 10, f"{i + 1} low requests queued")
    # then highs, by name and by index
    for i, prio in enumerate(("high", "1", "high")):
        tasks.append(asyncio.create_task(call(sp, f"/sleep?s=0.05&tag=high{i}", {"X-Priority": prio},
                                              done=done, tag=f"high{i}")))
        await wait_until(lambda n=i + 1: depth_is(sp, high=n, low=6), 10, f"{i + 1} high requests queued")
    await let_go(blocker)
    results = await asyncio.gather(*tasks)
    assert [r[0] for r in results] == [200] * 9
    # one slot: each answer is complete before the next request reaches the worker
    assert done == ["high0", "high1", "high2", "low0", "low1", "low2", "low3", "low4", "low5"]
    queued_ms = {r[1]["X-Request-ID"]: float(r[1]["X-Supervisor-Queue-Ms"]) for r in results}
    assert all(ms > 0 for ms in queued_ms.values())
    c = await seen(sp)
    assert c["paths"]["/sleep"] == 9 and c["max_in_flight"] == 1


# ---- bounds -----------------------------------------------------------------------------------

async def test_full_queue_is_429_with_retry_after_and_counted(supervisor_factory):
    sp = await supervisor_factory(config(max_size=3, levels={"low": {"max_size": 2}}))
    blocker = await hold_slot(sp)
    queued = []
    for i in range(2):
        queued.append(asyncio.create_task(call(sp, f"/echo?low={i}", {"X-Priority": "low"})))
        await wait_until(lambda n=i + 1: depth_is(sp, low=n), 10, "low requests queued")
    err = check_error(*await call(sp, "/echo?low=3", {"X-Priority": "low", "X-Request-ID": "full-1"}),
                      429, "queue_full", retry=True)
    assert err["request_id"] == "full-1" and "low" in err["message"]
    queued.append(asyncio.create_task(call(sp, "/echo?normal")))
    await wait_until(lambda: depth_is(sp, low=2, normal=1), 10, "a normal request queued")
    # the level has room, the whole queue has not
    err = check_error(*await call(sp, "/echo?critical", {"X-Priority": "critical"}), 429, "queue_full", retry=True)
    assert "queue is full" in err["message"]
    st = (await sp.status())["queue"]
    assert st["depth"] == {"critical": 0, "high": 0, "normal": 1, "low": 2}
    assert st["inflight"] == 1 and st["concurrency"] == 1 and st["total"] == 3
    m = await sp.metrics()
    assert metric(m, "gpu_supervisor_rejected_total", reason="queue_full") == 2
    assert metric(m, "gpu_supervisor_queue_depth", priority="low", worker="default") == 2
    assert metric(m, "gpu_supervisor_inflight", replica="0", worker="default") == 1
    await let_go(blocker)
    assert [r[0] for r in await asyncio.gather(*queued)] == [200, 200, 200]
    assert (await seen(sp))["paths"]["/echo"] == 3  # the refused ones never reached the worker


async def test_waiting_past_the_level_limit_is_503_queue_timeout(supervisor_factory):
    sp = await supervisor_factory(config(levels={"low": {"timeout_s": 0.3}, "high": {"timeout_s": 30}}))
    blocker = await hold_slot(sp)
    high = asyncio.create_task(call(sp, "/echo?high", {"X-Priority": "high"}))
    await wait_until(lambda: depth_is(sp, high=1), 10, "a high request queued")
    check_error(*await call(sp, "/echo?low", {"X-Priority": "low"}), 503, "queue_timeout", retry=True)
    # X-Request-Timeout shortens the level's 30 s wait
    err = check_error(*await call(sp, "/echo?short", {"X-Priority": "high", "X-Request-Timeout": "0.3"}),
                      503, "queue_timeout", retry=True)
    assert "high" in err["message"]
    assert not high.done() and await depth_is(sp, high=1, low=0)  # the long-waiting high is still in line
    assert metric(await sp.metrics(), "gpu_supervisor_rejected_total", reason="queue_timeout") == 2
    await let_go(blocker)
    assert (await high)[0] == 200
    assert (await seen(sp))["paths"]["/echo"] == 1


# ---- deadlines while running ------------------------------------------------------------------------

async def test_running_past_the_deadline_is_504_and_frees_the_slot(supervisor_factory):
    sp = await supervisor_factory(config(routes=({"path": "/sleep", "timeout_s": 0.5},)))
    check_error(*await call(sp, "/sleep?s=30", {"X-Request-Timeout": "0.3"}), 504, "timeout", retry=False)
    # the header may only shorten the route's deadline, never lengthen it
    check_error(*await call(sp, "/sleep?s=30", {"X-Request-Timeout": "60"}), 504, "timeout", retry=False)
    status, _, body = await call(sp, "/echo")
    assert status == 200, body
    # the worker was told: both sleeping handlers were cancelled when the supervisor hung up
    c = await wait_until(lambda: _with(seen(sp), lambda c: c["disconnects"] == 2), 10, "worker saw 2 disconnects")
    assert c["paths"]["/sleep"] == 2 and c["in_flight"] == 0


async def _with(coro, pred):
    v = await coro
    return v if pred(v) else None


# ---- clients that leave -------------------------------------------------------------------------

async def test_client_disconnects_while_queued_and_while_running(supervisor_factory):
    sp = await supervisor_factory(config())
    blocker = await hold_slot(sp)
    queued = asyncio.create_task(call(sp, "/echo?gone"))
    await wait_until(lambda: depth_is(sp, normal=1), 10, "a request queued")
    await let_go(queued)
    # it leaves the queue at once, long before its 30 s wait limit
    await wait_until(lambda: depth_is(sp, normal=0), 5, "the abandoned request to leave the queue")
    # the running one leaves: its slot is free for the next request
    await let_go(blocker)
    await wait_until(lambda: pool_is(sp, inflight=0, waiting=0), 5, "the slot to be freed")
    status, _, _ = await call(sp, "/echo?next")
    assert status == 200
    c = await wait_until(lambda: _with(seen(sp), lambda c: c["disconnects"] == 1), 10, "worker saw the hang cancelled")
    assert c["paths"]["/echo"] == 1  # only /echo?next: the abandoned one never reached the worker
    assert c["paths"]["/hang"] == 1


# ---- pools --------------------------------------------------------------------------------------

async def test_gpu_route_burst_does_not_delay_the_cpu_pool(supervisor_factory):
    sp = await supervisor_factory(config(routes=({"path": "/echo", "pool": "cpu"},),
                                         pools={"meta": {"concurrency": 2}, "cpu": {"concurrency": 4}}))
    blocker = await hold_slot(sp)
    burst = [asyncio.create_task(call(sp, f"/sleep?s=30&n={i}")) for i in range(5)]
    await wait_until(lambda: pool_is(sp, inflight=1, waiting=5), 10, "a GPU burst queued")
    cpu = await asyncio.gather(*(call(sp, f"/echo?n={i}") for i in range(8)))
    assert [r[0] for r in cpu] == [200] * 8
    # all of them were answered while the GPU pool was still full and its queue untouched
    assert await pool_is(sp, inflight=1, waiting=5)
    st = (await sp.status())["queue"]["pools"]
    assert st["cpu"]["concurrency"] == 4 and st["default"]["concurrency"] == 1
    # the queued burst leaves first (else freeing the slot would hand it to a /sleep at once)
    for t in burst:
        await let_go(t)
    await wait_until(lambda: pool_is(sp, inflight=1, waiting=0), 10, "the burst gone from the queue")
    await let_go(blocker)
    c = await seen(sp)
    assert c["paths"]["/echo"] == 8 and "/sleep" not in c["paths"]


# ---- circuit breaker ----------------------------------------------------------------------------

async def test_breaker_opens_on_500s_fails_fast_then_half_opens_and_closes(supervisor_factory):
    sp = await supervisor_factory(config() | {"breaker": {"window": 4, "min_calls": 4, "failure_rate": 0.5,
                                                           "open_s": 2, "open_max_s": 4, "half_open_probes": 1}})
    for _ in range(4):
        status, _, _ = await call(sp, "/status/500")
        assert status == 500  # the worker's own answer goes through
    ev = await sp.wait_log("breaker_state", new="open")
    assert ev["old"] == "closed" and "failure rate" in ev["reason"]
    # open: refused at once, without reaching the worker
    for _ in range(3):
        check_error(*await call(sp, "/echo?refused"), 503, "circuit_open", retry=True)
    st = (await sp.status())["breaker"]
    assert st["state"] == "open" and st["retry_after_s"] > 0
    assert not await sp.ready()
    # after open_s the next request is a probe; the worker answers 200 on /echo, so it closes
    await wait_until(lambda: _with(sp.status(), lambda s: s["breaker"]["retry_after_s"] == 0), 10, "open_s to pass")
    status, _, _ = await call(sp, "/echo?probe")
    assert status == 200
    await sp.wait_log("breaker_state", old="open", new="half_open")
    await sp.wait_log("breaker_state", old="half_open", new="closed")
    assert (await sp.status())["breaker"]["state"] == "closed"
    await sp.wait_ready(5)
    m = await sp.metrics()
    for state in ("open", "half_open", "closed"):
        assert metric(m, "gpu_supervisor_breaker_transitions_total", state=state) == 1
    assert metric(m, "gpu_supervisor_rejected_total", reason="circuit_open") == 3
    assert 'gpu_supervisor_breaker_state{gpu_supervisor_breaker_state="closed",replica="0",worker="default"} 1.0' in m
    c = await seen(sp)
    assert c["paths"]["/echo"] == 1 and c["paths"]["/status/500"] == 4


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["X-Priority", "X-Request-Timeout"])
async def test_bad_priority_or_timeout_is_400_naming_the_header(supervisor_factory, header):
    sp = await supervisor_factory(config())
    bad = {"X-Priority": ["urgent", "4", "-1", "", "1.5"],
           "X-Request-Timeout": ["-1", "abc", "0", "nan", "inf", "1s"]}[header]
    for value in bad:
        err = check_error(*await call(sp, "/echo", {header: value}), 400, "bad_request", retry=False)
        assert err["message"].startswith(header), err
        if header == "X-Priority":
            assert "critical, high, normal, low" in err["message"]
        else:
            assert "positive number" in err["message"]
    good = {"X-Priority": ["low", "0", " high "], "X-Request-Timeout": ["2.5", "10"]}[header]
    for value in good:
        assert (await call(sp, "/echo", {header: value}))[0] == 200
    assert metric(await sp.metrics(), "gpu_supervisor_rejected_total", reason="bad_request") == len(bad)
    assert (await seen(sp))["paths"]["/echo"] == len(good)
