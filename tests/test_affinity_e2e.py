"""Session and prefix affinity end to end: a real daemon, four real replicas of a fake engine that caches
prompt prefixes as vLLM does and exposes vLLM's metric names, real Unix sockets, a real kill -9."""

from __future__ import annotations

import signal

from tests.harness import PYTHON, REPO_ROOT, fast_config, kill_quiet, wait_until

ENGINE = [PYTHON, str(REPO_ROOT / "tests" / "workers" / "fake_engine.py"), "--socket", "{socket}",
          "--base-ms", "1", "--ms-per-uncached-token", "0.01"]
SYSTEM = "You answer questions about the fleet of a careful operator. " * 20


def affinity_config(affinity: str, **worker: object) -> dict:
    base = fast_config()
    lifecycle = {k: v for k, v in base.pop("worker").items() if k != "command"}
    base["workers"] = {"chat": {**lifecycle, "command": ENGINE, "replicas": 4, "concurrency": 4,
                                "health": {"path": "/health", "interval_s": 0.2, "timeout_s": 0.5, "failures": 2},
                                "routing": {"affinity": affinity}, **worker}}
    return base


async def serving(sp, n: int = 4) -> bool:
    reps = (await sp.status())["workers"]["chat"]["replicas"]
    return sum(1 for r in reps if r["state"] in ("ready", "busy")) >= n


def conversation(i: int, turns: int) -> dict:
    msgs = [{"role": "system", "content": f"[conversation {i}] " + SYSTEM}]
    for t in range(turns):
        msgs += [{"role": "user", "content": f"question {t} of conversation {i}: " + "details " * 30},
                 {"role": "assistant", "content": "an answer " * 20}]
    msgs.append({"role": "user", "content": f"question {turns} of conversation {i}"})
    return {"model": "fake-chat", "messages": msgs}


async def ask(sp, body: dict, session: str | None = None) -> tuple[int, str | None, int]:
    headers = {"X-Session-ID": session} if session else {}
    async with sp.session.post("/v1/chat/completions", json=body, headers=headers) as r:
        data = await r.json()
        usage = data.get("usage", {}) if r.status == 200 else {}
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        return r.status, r.headers.get("X-Supervisor-Replica"), cached


async def test_a_session_keeps_its_replica_and_survives_its_kill_9(supervisor_factory):
    # a long backoff after the kill: the next turn surely comes while its replica is down
    sp = await supervisor_factory(affinity_config("session", restart={"backoff_initial_s": 5, "backoff_max_s": 5,
                                                                      "max_restarts": 20, "window_s": 60}))
    await wait_until(lambda: serving(sp), 20, "4 replicas serving")
    homes: dict[str, str] = {}
    for s in range(12):
        for turn in range(3):
            status, replica, _ = await ask(sp, conversation(s, turn), f"session-{s}")
            assert status == 200 and replica is not None
            assert homes.setdefault(f"session-{s}", replica) == replica  # every turn on the same replica
    assert len(set(homes.values())) >= 3  # twelve sessions spread over the replicas
    victim = homes["session-0"]
    index = int(victim.split("/")[1])
    pid = (await sp.status())["workers"]["chat"]["replicas"][index]["pid"]
    kill_quiet(pid, signal.SIGKILL)

    async def victim_down() -> bool:
        r = (await sp.status())["workers"]["chat"]["replicas"][index]
        return r["state"] not in ("ready", "busy")

    await wait_until(victim_down, 10, "the killed replica seen down")
    # the next turn is answered elsewhere while its replica is down; the other sessions do not move
    status, replica, _ = await ask(sp, conversation(0, 3), "session-0")
    assert status == 200 and replica not in (None, victim)
    for s, home in homes.items():
        if home != victim:
            _, again, _ = await ask(sp, conversation(int(s.split("-")[1]), 3), s)
            assert again == home
    metrics = await (await sp.session.get("/metrics")).text()
    assert 'gpu_supervisor_routing_decisions_total{decision="session",worker="chat"}' in metrics


async def test_prefix_affinity_lands_turns_where_their_prefix_is_cached(supervisor_factory):
    sp = await supervisor_factory(affinity_config("prefix", load_signals={"preset": "vllm", "interval_s": 0.5}))
    await wait_until(lambda: serving(sp), 20, "4 replicas serving")
    cached_turns = 0
    turns = 0
    for c in range(6):
        first_replica = None
        for turn in range(4):
            status, replica, cached = await ask(sp, conversation(c, turn))
            assert status == 200
            if turn == 0:
                first_replica = replica
            else:
                turns += 1
                cached_turns += cached > 0 and replica == first_replica
    # one request at a time: the pool stays balanced, so each later turn finds its cached prefix
    assert cached_turns == turns

    read: list[dict] = []

    async def engines_read() -> bool:
        read[:] = (await sp.status())["workers"]["chat"]["replicas"]
        return all(r["engine"] is not None for r in read)

    await wait_until(engines_read, 20, "every engine's load read")
    reps = read
    assert sum(r["prefix_index_bytes"] > 0 for r in reps) >= 2
    assert all(0.0 <= r["engine"]["kv_usage"] <= 1.0 for r in reps)
    metrics = await (await sp.session.get("/metrics")).text()
    assert 'decision="prefix_hit",worker="chat"' in metrics


async def test_an_engine_without_metrics_is_served_and_affinity_changes_on_reload(supervisor_factory):
    # the scrapes of an engine that has no such metrics fail: logged once per replica, never a reason not
    # to serve; a reload turns session affinity on with no replica restarted
    cfg = affinity_config("none", replicas=2, load_signals={"preset": "vllm", "path": "/no-metrics-here",
                                                             "interval_s": 0.2})
    sp = await supervisor_factory(cfg)
    await wait_until(lambda: serving(sp, 2), 20, "2 replicas serving")
    await sp.wait_log("load_signals_failed", timeout=10, count=2)
    pids = [r["pid"] for r in (await sp.status())["workers"]["chat"]["replicas"]]
    seen = set()
    for i in range(8):
        status, replica, _ = await ask(sp, conversation(i, 0), "same-session")
        assert status == 200
        seen.add(replica)
    assert len(seen) == 2  # least in flight, one request at a time: round robin over both
    cfg["workers"]["chat"]["routing"] = {"affinity": "session"}
    sp.write_config(cfg)
    sp.signal(signal.SIGHUP)
    await sp.wait_log("config_reloaded", timeout=10)
    homes = {(await ask(sp, conversation(i, 0), "same-session"))[1] for i in range(8)}
    assert len(homes) == 1  # one session, one replica
    st = await sp.status()
    assert st["workers"]["chat"]["routing"] == "session"
    assert [r["pid"] for r in st["workers"]["chat"]["replicas"]] == pids  # no restart for a routing change
    assert all(r["engine"] is None for r in st["workers"]["chat"]["replicas"])
    assert len(sp.events("load_signals_failed")) == 2  # once per replica, not once per scrape
