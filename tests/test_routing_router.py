"""The replica choice over real replica records (GroupRouter): least in flight, session and prefix
affinity, and that affinity never picks a replica that cannot take the request. No process, no clock."""

from __future__ import annotations

import json

from supervisor import config as cfg
from supervisor.circuit_breaker import CircuitBreaker
from supervisor.fleet import Replica, WorkerGroup
from supervisor.fleet.process import Incarnation, InFlight
from supervisor.http.call import Call
from supervisor.routing.affinity import BALANCE, LEAST_LOADED, PREFIX_HIT, PREFIX_MISS, SESSION
from supervisor.routing.signals import EngineReading
from supervisor.states import WorkerState

SYSTEM = "You are a careful assistant. " * 20  # a long shared beginning (many blocks)


def group(affinity: str = "none", replicas: int = 4, concurrency: int = 4, **prefix: object) -> WorkerGroup:
    s = cfg.parse("workers:\n  chat:\n    command: [python3, w.py]\n"
                  f"    replicas: {replicas}\n    concurrency: {concurrency}\n")
    spec = s.workers["chat"].model_copy(update={"routing": cfg.Routing(affinity=affinity,
                                                                       prefix=cfg.PrefixAffinity(**prefix))})
    g = WorkerGroup("chat", spec, s)
    for i in range(replicas):
        r = Replica("chat", i, None, spec, CircuitBreaker(s.breaker))
        r.state = WorkerState.READY
        r.current = Incarnation(1, f"/tmp/nowhere-{i}.sock")
        r.gen = 1
        g.replicas.append(r)
    return g


def call(g: WorkerGroup, session: str | None = None, body: dict | None = None) -> Call:
    c = Call("rid", 0.0, "POST", "/v1/chat/completions", 2)
    c.group = g
    c.session = session
    c.body = json.dumps(body).encode() if body is not None else b""
    return c


def chat(*turns: str, user: str | None = None) -> dict:
    msgs = [{"role": "system", "content": SYSTEM}] + [{"role": "user", "content": t} for t in turns]
    return {"model": "m", "messages": msgs, **({"user": user} if user else {})}


def busy(r: Replica, n: int) -> None:
    for i in range(n):
        r.current.inflight[1000 + i + len(r.current.inflight)] = InFlight(0.0)


def test_least_in_flight_and_never_a_replica_that_cannot_take_it():
    g = group()
    busy(g.replicas[0], 2)
    busy(g.replicas[1], 1)
    busy(g.replicas[3], 1)
    r, why = g.router.pick(g, call(g), 0.0)
    assert (r.index, why) == (2, LEAST_LOADED)
    g.replicas[2].current.exited.set()  # its process died: whatever it had, it is no candidate
    r, _ = g.router.pick(g, call(g), 0.0)
    assert r.index in (1, 3)
    for rep in g.replicas:
        rep.state = WorkerState.STARTING
    assert g.router.pick(g, call(g), 0.0) == (None, LEAST_LOADED)


def test_a_session_sticks_and_a_dead_replica_moves_only_its_own_sessions():
    g = group("session")
    first = {f"s{i}": g.router.pick(g, call(g, f"s{i}"), 0.0)[0].index for i in range(200)}
    assert {g.router.pick(g, call(g, s), 0.0) for s in ("s1", "s2")} == {
        (g.replicas[first["s1"]], SESSION), (g.replicas[first["s2"]], SESSION)}
    assert len(set(first.values())) == 4  # the sessions spread over every replica
    gone = first["s7"]
    g.replicas[gone].state = WorkerState.STOPPING  # (a kill -9 is seen the same way: it stops serving)
    after = {s: g.router.pick(g, call(g, s), 0.0)[0].index for s in first}
    moved = {s for s in first if after[s] != first[s]}
    assert moved == {s for s, i in first.items() if i == gone}
    assert gone not in after.values()


def test_a_session_named_by_the_body_user_and_a_full_replica_is_skipped():
    g = group("session", concurrency=2)
    home = g.router.pick(g, call(g, body=chat("hi", user="alice")), 0.0)[0]
    assert g.router.pick(g, call(g, body=chat("again", user="alice")), 0.0)[0] is home
    busy(home, 2)  # all its slots taken by others: the request goes elsewhere rather than wait
    r, _ = g.router.pick(g, call(g, body=chat("third", user="alice")), 0.0)
    assert r is not home and r is not None
    r, why = g.router.pick(g, call(g, body={"model": "m", "prompt": "no user"}), 0.0)
    assert why == LEAST_LOADED  # no session: least in flight


def test_prefix_affinity_follows_the_conversation_and_a_restart_empties_the_index():
    g = group("prefix")
    r1, why1 = g.router.pick(g, call(g, body=chat("question one " * 10)), 0.0)
    assert why1 == PREFIX_MISS
    r2, why2 = g.router.pick(g, call(g, body=chat("question one " * 10, "and a follow-up " * 5)), 0.0)
    assert (r2, why2) == (r1, PREFIX_HIT)
    # another conversation with its own beginning goes to a replica that has cached least
    other = {"model": "m", "messages": [{"role": "system", "content": "Another system prompt. " * 20}]}
    r3, why3 = g.router.pick(g, call(g, body=other), 0.0)
    assert why3 == PREFIX_MISS and r3 is not r1
    assert g.router.status(r1, 0.0)["prefix_index_bytes"] > 0
    r1.gen += 1  # a new process: its engine's cache is empty, and so is its index
    assert g.router.status(r1, 0.0)["prefix_index_bytes"] == 0
    _, why4 = g.router.pick(g, call(g, body=chat("question one " * 10, "and a follow-up " * 5)), 0.0)
    assert why4 == PREFIX_MISS


def test_prefix_affinity_gives_way_to_balance_when_the_pool_is_unbalanced():
    g = group("prefix", concurrency=64, balance_abs=4, balance_rel=1.5)
    home, _ = g.router.pick(g, call(g, body=chat("long conversation " * 20)), 0.0)
    busy(home, 20)
    r, why = g.router.pick(g, call(g, body=chat("long conversation " * 20, "more")), 0.0)
    assert why == BALANCE and r is not home


class FakeScraper:
    def __init__(self, readings: dict):
        self.readings = readings

    def reading(self, key, now):
        return self.readings.get(key)


def test_engine_load_counts_and_a_full_kv_cache_is_avoided():
    g = group()
    busy(g.replicas[1], 1)
    g.router.scraper = FakeScraper({("chat", 0): EngineReading(waiting=5, running=4, kv_usage=0.5, at=0.0),
                                    ("chat", 2): EngineReading(waiting=0, running=1, kv_usage=0.99, at=0.0),
                                    ("chat", 3): EngineReading(waiting=3, running=1, kv_usage=0.2, at=0.0)})
    r, why = g.router.pick(g, call(g), 0.0)
    assert (r.index, why) == (1, LEAST_LOADED)  # 0 waits 5 in its engine, 2 is full, 3 waits 3


def test_a_replica_that_can_take_it_is_always_found_even_when_every_one_is_full():
    # the queue granted a slot, so a replica must be found: None would send the call back to the queue
    g = group("session", replicas=2, concurrency=1)
    for r in g.replicas:
        busy(r, 1)
    r, why = g.router.pick(g, call(g, "s"), 0.0)
    assert r is not None and why == SESSION
