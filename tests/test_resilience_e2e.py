"""Never losing a request, end to end with real processes: worker chaos, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import asyncio
import collections
import copy
import hashlib
import json
import random
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.harness import SupervisorProcess, fast_config, kill_quiet, pid_alive, wait_until

METRIC_LINE = re.compile(r'^gpu_supervisor_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)


def requests_by_code(metrics_text: str) -> dict[int, int]:
    out: collections.Counter[int] = collections.Counter()
    for m in METRIC_LINE.finditer(metrics_text):
        code = re.search(r'code="(\d+)"', m.group("labels"))
        assert code is not None, m.group(0)
        out[int(code.group(1))] += int(float(m.group("value")))
    return dict(out)


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Outcome:
    kind: str  # get | post | stream
    rid: str
    status: int | None = None
    error_type: str | None = None
    attempts: int = 0
    echoed_rid: str | None = None
    stream_end: str | None = None  # done | error_event
    body_aborted: bool = False  # a 200 whose body the worker broke off (connection closed mid-body)
    problem: str | None = None  # anything a client must never see


@dataclass
class Load:
    """Concurrent clients: GET /sleep, POST /echo with bodies, GET /stream; every answer recorded."""

    session: aiohttp.ClientSession
    prefix: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    mix: tuple[float, float] = (0.55, 0.35)  # GET share, POST share; the rest streams
    _n: int = 0

    def count(self) -> int:
        return len(self.outcomes)

    async def client(self, limit: int) -> None:
        while not self.stop.is_set() and self._n < limit:
            self._n += 1
            rid = f"{self.prefix}-{self._n}"
            r = self.rng.random()
            if r < self.mix[0]:
                o = await self._get(rid)
            elif r < self.mix[0] + self.mix[1]:
                o = await self._post(rid, self.rng.randbytes(self.rng.choice((0, 100, 4000, 60_000))))
            else:
                o = await self._stream(rid)
            self.outcomes.append(o)

    async def _call(self, o: Outcome, method: str, url: str, body: bytes | None, read) -> Outcome:
        try:
            async with self.session.request(method, url, data=body, headers={"X-Request-ID": o.rid}) as resp:
                o.status = resp.status
                o.echoed_rid = resp.headers.get("X-Request-ID")
                o.attempts = int(resp.headers.get("X-Supervisor-Attempts", "0"))
                if resp.status != 200:
                    data = await resp.read()
                    try:
                        o.error_type = json.loads(data)["error"]["type"]
                    except (ValueError, KeyError, TypeError):
                        o.problem = f"non-JSON error answer {resp.status}: {data[:200]!r}"
                    return o
                try:
                    await read(o, resp)
                except aiohttp.ClientPayloadError:
                    # the worker died after the answer had started: the supervisor cannot turn it
                    # into an error any more, so it aborts the body (DESIGN: never a silent truncation)
                    o.body_aborted = True
        except (TimeoutError, aiohttp.ClientError) as exc:
            o.problem = f"client error: {type(exc).__name__}: {exc}"
        return o

    async def _get(self, rid: str) -> Outcome:
        async def read(o, resp):
            data = await resp.json()
            if data.get("slept") != 0.01:
                o.problem = f"unexpected body {data}"
        return await self._call(Outcome("get", rid), "GET", "/sleep?s=0.01", None, read)

    async def _post(self, rid: str, body: bytes) -> Outcome:
        async def read(o, resp):
            data = await resp.json()
            if data["body_sha256"] != hashlib.sha256(body).hexdigest():
                o.problem = "echoed body differs"
        return await self._call(Outcome("post", rid), "POST", "/echo", body, read)

    async def _stream(self, rid: str) -> Outcome:
        async def read(o, resp):
            text = (await resp.read()).decode()
            if "event: error" in text:
                o.stream_end = "error_event"
            elif text.endswith("data: [DONE]\n\n") and text.count("data: {") == 5:
                o.stream_end = "done"
            else:
                o.problem = f"stream truncated without an error event: {text[-200:]!r}"
        return await self._call(Outcome("stream", rid), "GET", "/stream?n=5&interval=0.02", None, read)


def check_every_answer(outcomes: list[Outcome], *, faults: bool) -> None:
    problems = [(o.kind, o.rid, o.problem) for o in outcomes if o.problem]
    assert not problems, problems[:10]
    for o in outcomes:
        # an SSE stream ends with `event: error`, never with a cut connection
        assert not (o.body_aborted and o.kind == "stream"), o
        assert not (o.body_aborted and not faults), o
        assert o.echoed_rid == o.rid, (o.rid, o.echoed_rid)  # answered, and for this request
        if o.kind == "post" and faults and o.status == 502:
            assert o.error_type == "worker_crashed", o
            continue
        assert o.status == 200, o
        assert o.attempts >= 1, o
    rids = [o.rid for o in outcomes]
    assert len(rids) == len(set(rids))  # none is answered twice


def chaos_config() -> dict:
    return fast_config(
        worker={
            "health": {"interval_s": 0.1, "timeout_s": 0.3, "failures": 2},
            # killing on purpose is not a crash loop here
            "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_restarts": 10_000, "window_s": 60},
        },
        queue={"concurrency": 8, "max_size": 5000, "timeout_s": 60},
        retry={"max_attempts": 5},
    )


# -- chaos ------------------------------------------------------------------------------------------
@pytest.mark.slow
async def test_chaos_every_request_answered_once(supervisor_factory):
    """SIGKILL the worker every second (and SIGSTOP it once) under mixed load: nothing is lost."""
    sp = await supervisor_factory(chaos_config())
    sup_pid = sp.proc.pid
    load = Load(sp.session, "chaos")
    total = 2000
    clients = [asyncio.create_task(load.client(total)) for _ in range(16)]
    kills, stops, killed_pids = 0, 0, []

    async def serving_pid() -> int | None:
        w = (await sp.status())["worker"]
        return w["pid"] if w["state"] in ("ready", "busy") else None

    # faults are paced by served requests, not wall time, so a slow machine sees the same chaos
    async def chaos() -> None:
        nonlocal kills, stops
        schedule = ["kill"] * 3 + ["stop"] + ["kill"] * 8
        for i, fault in enumerate(schedule):
            await wait_until(lambda: load.count() >= (i + 1) * total // (len(schedule) + 2), 60,
                             f"{(i + 1)} share(s) of the load answered")
            pid = await wait_until(serving_pid, 30, "a serving worker")
            killed_pids.append(pid)
            if fault == "kill":
                kill_quiet(pid, signal.SIGKILL)
                kills += 1
            else:
                kill_quiet(pid, signal.SIGSTOP)  # a hang: only the health probes can tell
                stops += 1
            await wait_until(lambda: _gone_or_replaced(sp, pid), 30, f"worker {pid} replaced")

    chaos_task = asyncio.create_task(chaos())
    await asyncio.gather(*clients)
    await chaos_task
    assert kills == 11 and stops == 1

    outcomes = load.outcomes
    assert len(outcomes) == total
    check_every_answer(outcomes, faults=True)
    by_kind = collections.Counter(o.kind for o in outcomes)
    assert all(by_kind[k] > 100 for k in ("get", "post", "stream")), by_kind
    ends = collections.Counter(o.stream_end for o in outcomes if o.kind == "stream")
    assert ends["done"] > 0, ends
    print("chaos:", dict(by_kind), "codes", dict(collections.Counter((o.kind, o.status) for o in outcomes)),
          "streams", dict(ends), "aborted bodies", sum(o.body_aborted for o in outcomes),
          "retried", sum(o.attempts > 1 for o in outcomes))

    # the daemon itself never went down, and every worker it was shown is gone
    assert sp.proc.returncode is None and pid_alive(sup_pid)
    for pid in killed_pids:
        await wait_until(lambda: not pid_alive(pid), 10, f"worker {pid} reaped")
    await sp.wait_ready(30)
    st = await sp.status()
    assert st["worker"]["restarts"] >= kills + stops
    text = await sp.metrics()
    # the supervisor counted exactly what the clients saw
    seen = collections.Counter(o.status for o in outcomes)
    assert requests_by_code(text) == dict(seen)
    retried = sum(o.attempts - 1 for o in outcomes if o.attempts > 1)
    assert retried > 0, "no request was retried: the faults missed the load"
    assert metric_value(text, "gpu_supervisor_retries_total") >= retried
    assert metric_value(text, "gpu_supervisor_worker_restarts_total", reason="hang") >= 1


def _gone_or_replaced(sp: SupervisorProcess, pid: int):
    async def check():
        w = (await sp.status())["worker"]
        return w["pid"] not in (None, pid) and w["state"] in ("ready", "busy")
    return check()


# -- SIGTERM ----------------------------------------------------------------------------------------
async def test_sigterm_under_load_drains_then_exits_zero(supervisor_factory):
    sp = await supervisor_factory(fast_config(queue={"concurrency": 2}, drain={"timeout_s": 60}))
    worker_pid = await sp.worker_pid()

    async def held(i: int) -> tuple[int, str]:
        async with sp.session.get("/sleep?s=0.6", headers={"X-Request-ID": f"held-{i}"}) as r:
            return r.status, (await r.read()).decode()

    tasks = [asyncio.create_task(held(i)) for i in range(8)]
    await wait_until(_queue_at_least(sp, inflight=2, queued=4), 15, "2 running and 4+ queued")
    sp.signal(signal.SIGTERM)
    await sp.wait_log("drain_started")

    # new work is refused while the held work finishes (or, once the listener is closed, cannot connect)
    try:
        async with sp.session.get("/echo", headers={"X-Request-ID": "late"}) as r:
            body = await r.json()
            assert r.status == 503, body
            assert body["error"]["type"] == "shutting_down"
            assert int(r.headers["Retry-After"]) >= 1
        async with sp.session.get("/readyz") as r:
            assert r.status == 503
            assert any("draining" in why for why in (await r.json())["because"])
    except aiohttp.ClientConnectionError:
        assert all(t.done() for t in tasks), "the listener closed while requests were still held"

    results = await asyncio.gather(*tasks)
    assert [s for s, _ in results] == [200] * 8, results
    assert await sp.wait_exit(30) == 0
    fin = sp.events("drain_finished")
    assert fin and fin[0]["drained"] is True, fin
    assert not sp.events("forced_stop")
    assert not pid_alive(worker_pid)
    # everything the supervisor held was answered before it went away
    assert sp.events("worker_exited", reason="shutdown")


async def test_second_signal_stops_at_once(supervisor_factory):
    sp = await supervisor_factory(fast_config(queue={"concurrency": 1}, drain={"timeout_s": 300}))
    worker_pid = await sp.worker_pid()

    t = asyncio.create_task(_answer(sp, "/sleep?s=300", "stuck"))
    await wait_until(_queue_at_least(sp, inflight=1, queued=0), 15, "one running")
    sp.signal(signal.SIGTERM)
    await sp.wait_log("drain_started")
    sp.signal(signal.SIGINT)
    # far below drain.timeout_s and the request's own 300 s: the second signal cut the drain short
    assert await sp.wait_exit(30) == 0
    assert sp.events("second_stop_signal")
    assert not pid_alive(worker_pid)
    # the running request was cut short with a typed answer, not a dropped connection
    assert await t == (503, "shutting_down")


async def test_drain_timeout_stops_the_worker_and_exits_zero(supervisor_factory):
    sp = await supervisor_factory(fast_config(queue={"concurrency": 1}, drain={"timeout_s": 0.5}))
    worker_pid = await sp.worker_pid()

    tasks = [asyncio.create_task(_answer(sp, "/sleep?s=300", f"stuck-{i}")) for i in range(2)]  # 1 runs, 1 waits
    await wait_until(_queue_at_least(sp, inflight=1, queued=1), 15, "one running, one queued")
    sp.signal(signal.SIGTERM)
    assert await sp.wait_exit(30) == 0
    fin = sp.events("drain_finished")
    assert fin and fin[0]["drained"] is False
    assert not pid_alive(worker_pid)
    # what was left got an answer: a typed 503, not a silent drop
    results = await asyncio.gather(*tasks)
    assert results == [(503, "shutting_down")] * 2, results


async def _answer(sp: SupervisorProcess, path: str, rid: str) -> tuple[int, str | None] | str:
    """(status, error type) of one GET, or the client error's name if no answer came."""
    try:
        async with sp.session.get(path, headers={"X-Request-ID": rid}) as r:
            data = await r.read()
            etype = json.loads(data)["error"]["type"] if r.status != 200 else None
            assert r.headers["X-Request-ID"] == rid
            return r.status, etype
    except aiohttp.ClientError as exc:
        return type(exc).__name__


def _queue_at_least(sp: SupervisorProcess, inflight: int, queued: int):
    async def check():
        q = (await sp.status())["queue"]
        return q["inflight"] >= inflight and q["total"] >= queued
    return check


# -- SIGHUP -----------------------------------------------------------------------------------------
def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


async def test_sighup_applies_a_new_policy_under_load_without_failing_a_request(supervisor_factory):
    cfg = fast_config(queue={"concurrency": 1}, worker={"env": {"POLICY_GEN": "one"}})
    sp = await supervisor_factory(cfg)
    st0 = await sp.status()
    gen0, pid0 = st0["config"]["generation"], st0["worker"]["pid"]
    assert st0["queue"]["concurrency"] == 1 and _environ(pid0)["POLICY_GEN"] == "one"

    load = Load(sp.session, "hup", mix=(0.5, 0.4))
    clients = [asyncio.create_task(load.client(100_000)) for _ in range(6)]
    await wait_until(lambda: load.count() >= 30, 30, "load running")

    cfg2 = copy.deepcopy(cfg)
    cfg2["queue"]["concurrency"] = 2
    cfg2["worker"]["env"] = {"POLICY_GEN": "two"}
    sp.write_config(cfg2)
    sp.signal(signal.SIGHUP)
    ev = await sp.wait_log("config_reloaded", timeout=20)
    assert ev["worker_replaced"] is True

    async def replaced():
        st = await sp.status()
        w = st["worker"]
        return st if w["pid"] not in (None, pid0) and w["state"] in ("ready", "busy") else None

    st1 = await wait_until(replaced, 30, "the new worker serving")
    assert st1["config"]["generation"] == gen0 + 1
    assert st1["config"]["digest"] != st0["config"]["digest"]
    assert st1["queue"]["concurrency"] == 2
    assert _environ(st1["worker"]["pid"])["POLICY_GEN"] == "two"
    assert not pid_alive(pid0)
    await sp.wait_log("worker_exited", worker_pid=pid0, reason="reload")
    n = load.count()
    await wait_until(lambda: load.count() >= n + 30, 30, "load served by the new worker")

    # a broken file: logged with its problems, ignored; the load does not notice
    sp.write_config("queue: {concurrency: -3}\nbogus_key: 1\n")
    sp.signal(signal.SIGHUP)
    bad = await sp.wait_log("config_reload_failed", timeout=20)
    assert any("queue.concurrency" in p for p in bad["problems"]), bad
    assert any("bogus_key" in p for p in bad["problems"]), bad
    n = load.count()
    await wait_until(lambda: load.count() >= n + 30, 30, "load after the failed reload")
    st2 = await sp.status()
    assert st2["config"]["generation"] == st1["config"]["generation"]
    assert st2["config"]["digest"] == st1["config"]["digest"]
    assert st2["worker"]["pid"] == st1["worker"]["pid"]
    assert st2["queue"]["concurrency"] == 2

    load.stop.set()
    await asyncio.gather(*clients)
    check_every_answer(load.outcomes, faults=False)
    text = await sp.metrics()
    assert requests_by_code(text) == {200: load.count()}
    assert metric_value(text, "gpu_supervisor_config_reloads_total", result="applied") == 1
    assert metric_value(text, "gpu_supervisor_config_reloads_total", result="invalid") == 1


# -- an answer that has started cannot become an error status any more -----------------------------
async def test_deadline_mid_stream_ends_the_stream_not_the_connection(supervisor_factory):
    """Past its deadline a started SSE answer ends with `event: error`, a chunked one is aborted;
    neither hangs, and the breaker counts the timeout while the supervisor keeps serving."""
    sp = await supervisor_factory(fast_config(routes=[{"path": "/stream", "timeout_s": 0.5},
                                                      {"path": "/chunked", "timeout_s": 0.5}]))
    async with sp.session.get("/stream?n=200&interval=0.05", headers={"X-Request-ID": "sse-late"}) as r:
        assert r.status == 200
        text = (await r.read()).decode()
    assert text.startswith("data: {")
    tail = text.rstrip("\n").rsplit("\n\n", 1)[-1]
    assert tail.startswith("event: error\ndata: ")
    err = json.loads(tail.split("data: ", 1)[1])["error"]
    assert err["type"] == "timeout" and err["request_id"] == "sse-late"

    with pytest.raises(aiohttp.ClientPayloadError):
        async with sp.session.get("/chunked?n=200&interval=0.05") as r:
            assert r.status == 200
            await r.read()

    async with sp.session.get("/echo") as r:
        assert r.status == 200
    await sp.wait_log("stream_broken", request_id="sse-late", reason="timeout")
    assert requests_by_code(await sp.metrics()) == {200: 3}
