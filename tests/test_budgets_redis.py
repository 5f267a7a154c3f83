"""The Redis budget and usage stores against a real redis-server: atomic takes from many clients lose no
update, refill to Redis's clock, a lost script cache, an outage (fail open, once logged, back by
itself), and usage batches applied once and kept through an outage."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from supervisor.budgets.core import Budgets
from supervisor.budgets.redis_store import BUCKETS, BUDGET, RedisBudgetStore, RedisUsageStore
from supervisor.budgets.store import Limits, StoreUnavailable, UsageRecord
from supervisor.budgets.usage import Batch, UsageLog, UsageRow, minute_of
from supervisor.config import parse
from supervisor.fairness import hash_key
from supervisor.http.call import Call
from supervisor.metrics import Metrics
from tests.redis_server import redis_server  # noqa: F401 - the fixture

DAY = 86400


async def redis_now(url: str) -> float:
    r = aioredis.from_url(url)
    try:
        s, us = await r.time()
        return s + us / 1e6
    finally:
        await r.aclose()


async def bucket_fields(url: str, key: str) -> dict[str, float]:
    r = aioredis.from_url(url)
    try:
        return {k.decode(): float(v) for k, v in (await r.hgetall(BUDGET + key)).items()}
    finally:
        await r.aclose()


@pytest.fixture
async def budgets(redis_server):  # noqa: F811
    stores: list[RedisBudgetStore] = []

    def make() -> RedisBudgetStore:
        # the store's semantics, not its timeouts: a loaded machine may take over the daemon's 0.25 s to connect
        s = RedisBudgetStore(redis_server.url, connect_timeout_s=30, op_timeout_s=30)
        stores.append(s)
        return s

    yield make
    for s in stores:
        await s.aclose()


# -- budgets --------------------------------------------------------------------------------------------

async def test_take_refuses_past_the_budget_and_says_how_long(budgets) -> None:
    store = budgets()
    limits = Limits(tokens_per_minute=600, requests_per_minute=3)
    first = await store.take("k", limits, 100)
    assert first.admitted and first.retry_after_s == 0
    assert (first.state.limit_requests, first.state.remaining_requests) == (3, 2)
    assert (first.state.limit_tokens, first.state.remaining_tokens) == (600, 500)
    assert 0 < first.state.reset_tokens_s <= 10.001          # 100 tokens at 10 per second
    big = await store.take("k", limits, 590)                  # 500 left (a little more by refill)
    assert not big.admitted
    assert 0 < big.retry_after_s <= 9.001                    # at most 90 missing, at 10 per second
    assert big.state.remaining_requests == 2                 # a refused take took nothing
    assert (await store.take("k", limits, 1)).admitted
    assert (await store.take("k", limits, 1)).admitted
    out = await store.take("k", limits, 1)                    # the requests bucket is empty now
    assert not out.admitted and 0 < out.retry_after_s <= 20.001


async def test_a_take_larger_than_the_budget_passes_on_a_full_bucket_and_leaves_a_debt(
        redis_server, budgets) -> None:  # noqa: F811
    store = budgets()
    limits = Limits(tokens_per_minute=60)
    t0 = await redis_now(redis_server.url)
    assert (await store.take("k", limits, 90)).admitted
    again = await store.take("k", limits, 1)
    t1 = await redis_now(redis_server.url)
    assert not again.admitted and again.state.remaining_tokens == 0
    # -30 to +1 at one token per second, less what the time between the two takes refilled
    assert 31 - (t1 - t0) - 1e-3 <= again.retry_after_s <= 31.001


async def test_buckets_refill_to_redis_clock(redis_server, budgets) -> None:  # noqa: F811
    store = budgets()
    limits = Limits(tokens_per_minute=600)
    assert (await store.take("k", limits, 600)).admitted
    assert not (await store.take("k", limits, 300)).admitted
    # the bucket as it would be 30 s later: its time set back by 30 s
    r = aioredis.from_url(redis_server.url)
    f = await bucket_fields(redis_server.url, "k")
    await r.hset(BUDGET + "k", "ta", f"{f['ta'] - 30:.6f}")
    await r.aclose()
    out = await store.take("k", limits, 300)                 # 30 s at 10 tokens per second
    t1 = await redis_now(redis_server.url)
    assert out.admitted
    assert 0 <= out.state.remaining_tokens <= (t1 - f["ta"]) * 10 + 1e-3   # (and what the real time refilled)


async def test_settlement_takes_more_or_gives_back(budgets) -> None:
    store = budgets()
    limits = Limits(tokens_per_minute=6000, requests_per_minute=60)
    assert (await store.take("k", limits, 1000)).admitted
    await store.adjust("k", limits, -800)                    # it used 200
    await store.adjust("k", limits, 0, refund_request=True)  # and never reached a worker
    out = await store.take("k", limits, 0)
    assert out.state.remaining_tokens >= 5800 and out.state.remaining_requests >= 59
    await store.adjust("k", limits, -10**6)                   # never past a full bucket
    assert (await store.take("k", limits, 0)).state.remaining_tokens == 6000


async def test_a_limit_set_to_zero_drops_its_bucket(redis_server, budgets) -> None:  # noqa: F811
    store = budgets()
    assert (await store.take("k", Limits(tokens_per_minute=100, requests_per_minute=5), 50)).admitted
    out = await store.take("k", Limits(tokens_per_minute=0, requests_per_minute=5), 10**6)
    assert out.admitted and out.state.limit_tokens == 0
    assert set(await bucket_fields(redis_server.url, "k")) == {"rl", "ra"}


async def test_concurrent_takes_from_many_daemons_lose_no_update(redis_server, budgets) -> None:  # noqa: F811
    daemons = [budgets() for _ in range(4)]                  # four clients: four connections
    limits = Limits(requests_per_minute=100)
    t0 = await redis_now(redis_server.url)
    outs = await asyncio.gather(*[daemons[i % 4].take("k", limits, 0) for i in range(300)])
    t1 = await redis_now(redis_server.url)
    admitted = sum(o.admitted for o in outs)
    refilled = (t1 - t0) * 100 / 60
    assert 100 <= admitted <= 100 + refilled + 1e-6


async def test_concurrent_settlements_lose_no_update(redis_server, budgets) -> None:  # noqa: F811
    daemons = [budgets() for _ in range(4)]
    limits = Limits(tokens_per_minute=60)                    # one token per second back
    assert (await daemons[0].take("k", limits, 0)).admitted  # the bucket exists, full: 60
    t0 = await redis_now(redis_server.url)
    await asyncio.gather(*[daemons[i % 4].adjust("k", limits, 1) for i in range(500)])
    t1 = await redis_now(redis_server.url)
    level = (await bucket_fields(redis_server.url, "k"))["tl"]
    assert 60 - 500 <= level <= 60 - 500 + (t1 - t0) + 1e-3


async def test_a_server_that_lost_its_scripts_still_answers(redis_server, budgets) -> None:  # noqa: F811
    store = budgets()
    limits = Limits(requests_per_minute=10)
    assert (await store.take("k", limits, 0)).admitted
    r = aioredis.from_url(redis_server.url)
    await r.script_flush()
    out = await store.take("k", limits, 0)                   # NOSCRIPT: run by EVAL, which caches it again
    assert out.admitted and out.state.remaining_requests == 8
    assert await r.script_exists(hashlib.sha1(BUCKETS.encode()).hexdigest()) == [True]
    await r.aclose()


async def test_an_outage_fails_open_once_logged_and_ends_by_itself(redis_server, budgets) -> None:  # noqa: F811
    store = budgets()
    limits = Limits(requests_per_minute=10)
    assert (await store.take("k", limits, 0)).admitted
    await redis_server.stop()
    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await store.take("k", limits, 0)
        with pytest.raises(StoreUnavailable):
            await store.adjust("k", limits, 5)
    assert [e["event"] for e in logs] == ["budget_store_down"]
    assert not store.available
    await redis_server.start()
    with capture_logs() as logs:
        out = await store.take("k", limits, 0)
    assert out.admitted and store.available
    assert out.state.remaining_requests == 9                 # the restarted server lost the old bucket
    assert [e["event"] for e in logs] == ["budget_store_back"]


# -- usage ----------------------------------------------------------------------------------------------

@pytest.fixture
async def usage_store(redis_server):  # noqa: F811
    s = RedisUsageStore(redis_server.url)
    await s.open()
    yield s
    await s.close()


async def test_usage_batch_applied_once(usage_store) -> None:
    now = 1_700_000_000.0
    b = Batch("b1", (UsageRow("k", "gpt", minute_of(now), 2, 30, 5), UsageRow("k", "emb", minute_of(now), 1, 9, 0),
                     UsageRow("other", "gpt", minute_of(now), 1, 1, 1)))
    await usage_store.apply(b, DAY, now)
    await usage_store.apply(b, DAY, now)                     # a retry of a write whose answer was lost
    await usage_store.apply(Batch("b2", b.rows[:1]), DAY, now)
    assert await usage_store.rows("k", 0) == [UsageRow("k", "emb", minute_of(now), 1, 9, 0),
                                              UsageRow("k", "gpt", minute_of(now), 4, 60, 10)]
    assert await usage_store.rows("k", minute_of(now) + 60) == []


async def test_usage_minutes_expire_with_retention(redis_server, usage_store) -> None:  # noqa: F811
    now = await redis_now(redis_server.url)
    old, new = minute_of(now - 3000), minute_of(now)
    await usage_store.apply(Batch("b1", (UsageRow("k", "m", old, 1, 1, 1),)), DAY, now - 3000)
    await usage_store.apply(Batch("b2", (UsageRow("k", "m", new, 1, 2, 2),)), 3600, now)
    # each write trims its key's index to retention: the old minute is still within 3600 s
    assert [r.minute for r in await usage_store.rows("k", 0)] == [old, new]
    r = aioredis.from_url(redis_server.url)
    ttl = await r.ttl(f"gpu-supervisor:usage:k:{new}")
    await r.aclose()
    assert 0 < ttl <= 3600 + 60                              # the minute's hash goes by itself
    await usage_store.apply(Batch("b3", (UsageRow("k", "m", new, 1, 2, 2),)), 1800, now)
    assert await usage_store.rows("k", 0) == [UsageRow("k", "m", new, 2, 4, 4)]


async def test_usage_kept_through_an_outage_and_written_once_back(redis_server) -> None:  # noqa: F811
    store = RedisUsageStore(redis_server.url)
    await store.open()
    log = UsageLog(store, retention_s=DAY)
    k = hash_key("alice")
    at = minute_of(await redis_now(redis_server.url))
    log.record(UsageRecord(k, None, "gpt", 10, 5, at))
    await redis_server.stop()
    with capture_logs() as logs:
        assert not await log.flush()
        log.record(UsageRecord(k, None, "gpt", 7, 3, at))
        log.record(UsageRecord(k, None, "emb", 4, 0, at))
        assert not await log.flush()
    assert [e["event"] for e in logs] == ["usage_store_down"]
    await redis_server.start()                               # (empty: it keeps nothing on disk)
    assert await log.flush()
    assert await log.flush()                                 # nothing left: nothing written twice
    assert await log.query(k, 0) == [UsageRow(k, "emb", at, 1, 4, 0), UsageRow(k, "gpt", at, 2, 17, 8)]
    await log.aclose()


async def test_the_facade_awaits_the_redis_store_for_a_charge_and_its_settlement(redis_server) -> None:  # noqa: F811
    """The request path's calls (charge_now, settle_now) over Redis: each a round trip it awaits (the memory
    store's direct calls are not Redis's), the charge taken at the estimate, then settled to the answer."""
    settings = parse("queue: {fairness: {key: 'header:X-Client-ID'}}\nclients: {default: {tokens_per_minute: 1000}}")
    store = RedisBudgetStore(redis_server.url)
    try:
        b = Budgets(settings, Metrics(), store)
        c = Call("rid", 0.0, "POST", "/v1/chat/completions", 0)
        c.client = hash_key("c")
        c.body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 400}],
                             "max_tokens": 100}).encode()
        pending = b.charge_now(c, None)
        assert pending is not None
        await pending
        assert c.charge.taken and c.charge.state.remaining_tokens == 800  # 100 in + 100 out estimated
        c.charge.begin(200, b"application/json").feed(b'{"usage": {"prompt_tokens": 50, "completion_tokens": 10}}')
        pending = b.settle_now(c.charge)
        assert pending is not None
        await pending
        # settled to the 60 used: 140 given back (the refill since the charge adds under 140 in 8 s)
        assert (await bucket_fields(redis_server.url, c.client))["tl"] >= 940
    finally:
        await store.aclose()
