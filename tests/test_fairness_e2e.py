"""Fairness between clients end to end: a flooding client cannot push a polite one back.

A real daemon and a real ctl worker with one slot and a fixed service time; clients are told apart by
`X-Client-ID`. Orders are measured in requests served, never in time.
"""

from __future__ import annotations

import asyncio
import collections
import json

from tests.harness import fast_config, wait_until

FLOOD = 200


def fair_config(**fairness) -> dict:
    return fast_config(queue={"concurrency": 1, "max_size": 1000, "timeout_s": 120,
                              "fairness": {"key": "header:X-Client-ID", **fairness}})


async def _flood_and_poke(sp, polite_requests: int = 3) -> tuple[list[int], collections.Counter]:
    """The flooder sends FLOOD at once; the polite client sends one at a time. Returns, for each polite
    request, how many flood requests finished while it was in the daemon."""
    done = 0
    codes: collections.Counter = collections.Counter()

    async def flood_one() -> None:
        nonlocal done
        async with sp.session.get("/work?ms=20", headers={"X-Client-ID": "flooder"}) as r:
            codes[r.status] += 1
            await r.read()
        done += 1

    flood = [asyncio.create_task(flood_one()) for _ in range(FLOOD)]
    await wait_until(lambda: _queued_at_least(sp, 50), 20, "the flood is queued")
    overtaken = []
    for _ in range(polite_requests):
        before = done
        async with sp.session.get("/work?ms=20", headers={"X-Client-ID": "polite"}) as r:
            assert r.status == 200
        overtaken.append(done - before)
    await asyncio.gather(*flood)
    return overtaken, codes


async def _queued_at_least(sp, n: int) -> bool:
    return (await sp.status())["queue"]["total"] >= n


async def test_a_polite_client_is_not_pushed_back_by_a_flood(supervisor_factory):
    sp = await supervisor_factory(fair_config())
    overtaken, codes = await _flood_and_poke(sp)
    # deficit round robin: each polite request waits for at most one round (the flooder's turn, and
    # the one in service), not for the ~200 flood requests queued ahead of it
    assert max(overtaken) <= 3, overtaken
    assert codes == {200: FLOOD}


async def test_without_fairness_the_same_flood_is_fifo(supervisor_factory):
    """The control: today's FIFO within a level makes the polite client wait behind the flood."""
    sp = await supervisor_factory(fast_config(queue={"concurrency": 1, "max_size": 1000, "timeout_s": 120}))
    overtaken, _ = await _flood_and_poke(sp, polite_requests=1)
    assert overtaken[0] >= 40, overtaken


async def test_the_flooder_alone_is_refused_past_its_bound(supervisor_factory):
    sp = await supervisor_factory(fair_config(max_queued_per_key=20))
    results = await asyncio.gather(*(
        sp.session.get("/work?ms=20", headers={"X-Client-ID": "flooder"}) for _ in range(60)))
    refused = []
    for r in results:
        if r.status == 429:
            body = json.loads(await r.read())
            refused.append((body["error"]["type"], int(r.headers["Retry-After"])))
        r.release()
    assert refused and all(t == "queue_full" and ra >= 1 for t, ra in refused)
    assert len(refused) <= 60 - 20
    # another client is admitted meanwhile
    async with sp.session.get("/work?ms=1", headers={"X-Client-ID": "polite"}) as r:
        assert r.status == 200


async def test_status_shows_keys_per_level_never_the_key_values(supervisor_factory):
    sp = await supervisor_factory(fair_config())
    tasks = [asyncio.create_task(sp.session.get("/work?ms=30", headers={"X-Client-ID": f"client-{i % 3}"}))
             for i in range(30)]

    async def keys_seen():
        f = (await sp.status())["workers"]["default"]["queue"].get("fairness", {})
        return f.get("normal", {}).get("keys", 0) >= 2 and f
    fairness = await wait_until(keys_seen, 20, "keys counted in /status")
    assert fairness["normal"]["largest_backlog"] >= 1
    text = json.dumps(await sp.status()) + await sp.metrics()
    assert "client-0" not in text and "client-1" not in text
    for t in tasks:
        (await t).release()
