"""Client budgets end to end: a real daemon, a real worker answering OpenAI's shapes with usage (its own
tokenizer, so the daemon's estimates are wrong as they are in life), and the official `openai` client.

Clients are told apart by their API key (`Authorization`), as a gateway does. Budgets are read back
from what a client sees (status, x-ratelimit-* headers) and from /metrics; never from timings.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import openai
import pytest

from tests.harness import PYTHON, REPO_ROOT, fast_config, wait_until

pytestmark = pytest.mark.e2e

USAGE_WORKER = [PYTHON, str(REPO_ROOT / "tests" / "workers" / "usage_worker.py"), "--socket", "{socket}"]
TEAM_A = "sk-team-a"
TEAM_B = "sk-team-b"
RELAYED = {"gap_ms": "20"}  # chunks spaced out: relayed as they come, not gathered whole


def budget_config(count: str = "total", **keys) -> dict:
    return fast_config(worker={"command": USAGE_WORKER},
                       queue={"concurrency": 4, "fairness": {"key": "header:Authorization"}},
                       clients={"keys": {f"Bearer {k}": {"name": k.removeprefix("sk-"), **v} for k, v in keys.items()},
                                "count": count})


def key_arg(k: str) -> str:
    return k.replace("-", "_")


def client(sp, api_key: str, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{sp.url}/v1", api_key=api_key, max_retries=retries)


def chat(prompt: str, max_tokens: int, **kw) -> dict:
    return {"model": "usage-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, **kw}


async def metric(sp, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in (await sp.metrics()).splitlines():
        m = re.match(r"gpu_supervisor_(\w+)\{([^}]*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
            return float(m.group(3))
    return 0.0


async def test_the_openai_client_sees_rate_limit_error_with_the_headers(supervisor_factory):
    sp = await supervisor_factory(budget_config(**{TEAM_A: {"tokens_per_minute": 120}}))
    async with client(sp, TEAM_A) as c:
        raw = await c.chat.completions.with_raw_response.create(**chat("hi", 110))  # estimated 1 + 110
        assert raw.headers["x-ratelimit-limit-tokens"] == "120"
        assert raw.headers["x-ratelimit-remaining-tokens"] == "9"
        assert re.fullmatch(r"\d+(\.\d+)?s|\d+ms", raw.headers["x-ratelimit-reset-tokens"])
        assert "x-ratelimit-limit-requests" not in raw.headers  # requests are not limited for this client
        assert raw.parse().usage.completion_tokens == 55  # it stopped early: 56 used, 55 given back
        # a whole budget's estimate needs a full bucket: 56 tokens away, 28 s of refill
        with pytest.raises(openai.RateLimitError) as refused:
            await c.chat.completions.create(**chat("hi", 119))
    e = refused.value
    assert e.status_code == 429 and e.body["type"] == "rate_limited"
    h = e.response.headers
    assert int(h["Retry-After"]) >= 1 and float(h["retry-after-ms"]) >= 1
    assert h["x-ratelimit-limit-tokens"] == "120" and int(h["x-ratelimit-remaining-tokens"]) < 120
    assert await metric(sp, "client_rate_limited_total", client="team-a") == 1


async def test_the_openai_client_s_own_retries_wait_for_the_refill(supervisor_factory):
    sp = await supervisor_factory(budget_config(**{TEAM_B: {"requests_per_minute": 6}}))
    async with client(sp, TEAM_B, retries=3) as c:
        # six requests fill the minute's budget; the seventh is refused with Retry-After (one request
        # refills in 10 s) and the client's own back-off, honouring it, gets it through
        answers = [await c.chat.completions.create(**chat("hi", 2)) for _ in range(7)]
    assert all(a.choices[0].message.content for a in answers)
    assert await metric(sp, "client_rate_limited_total", client="team-b") >= 1
    assert await metric(sp, "requests_total", priority="normal", code="200", worker="default") == 7


async def test_streamed_answers_are_counted_with_and_without_include_usage(supervisor_factory):
    sp = await supervisor_factory(budget_config(**{TEAM_A: {"tokens_per_minute": 100000}}))
    prompt = "x" * 30  # the worker counts 10 tokens; the daemon estimates 8
    async with client(sp, TEAM_A) as c:
        raw = await c.chat.completions.with_raw_response.create(
            **chat(prompt, 20), stream=True, stream_options={"include_usage": True}, extra_query=RELAYED)
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        chunks = [ch async for ch in raw.parse()]
        assert chunks[-1].usage.prompt_tokens == 10 and chunks[-1].usage.completion_tokens == 10
        text = "".join([ch.choices[0].delta.content or "" async for ch in await c.chat.completions.create(
            **chat(prompt, 20), stream=True, extra_query=RELAYED) if ch.choices])
        assert text == "tok " * 10
    # with the usage chunk: its 10 + 10; without: the estimated 8 in, the 10 streamed chunks out
    await wait_until(lambda: _tokens_are(sp, "team-a", 18, 20), 10, "both streams counted")


async def _tokens_are(sp, name: str, inp: float, out: float) -> bool:
    return (await metric(sp, "client_tokens_total", client=name, kind="input"),
            await metric(sp, "client_tokens_total", client=name, kind="output")) == (inp, out)


async def test_a_request_whose_worker_died_before_answering_is_refunded(supervisor_factory):
    sp = await supervisor_factory(budget_config(**{TEAM_A: {"tokens_per_minute": 600, "requests_per_minute": 1}}))
    headers = {"Authorization": f"Bearer {TEAM_A}"}
    async with sp.session.post("/v1/chat/completions", json=chat("hi", 599) | {"model": "die"},
                               headers=headers) as r:
        assert r.status == 502 and (await r.json())["error"]["type"] == "worker_crashed"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    await sp.wait_ready()
    # the whole budget (one request, 600 tokens) is back: without the refund this waits a minute
    async with client(sp, TEAM_A) as c:
        raw = await c.chat.completions.with_raw_response.create(**chat("hi", 599))
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert raw.parse().usage.completion_tokens == 300


@pytest.mark.parametrize("count", ["output", "total"])
async def test_count_says_whether_the_prompt_is_charged(supervisor_factory, count):
    sp = await supervisor_factory(budget_config(count, **{TEAM_A: {"tokens_per_minute": 100}}))
    long_prompt = "x" * 4000  # 1000 tokens estimated: over the whole budget when input counts
    async with client(sp, TEAM_A) as c:
        first = await c.chat.completions.create(**chat(long_prompt, 40))
        assert first.usage.completion_tokens == 20
        if count == "output":  # 40 estimated, 20 used: room for another
            raw = await c.chat.completions.with_raw_response.create(**chat(long_prompt, 40))
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 40
        else:  # the first took the whole budget and more (a debt): the next waits for the refill
            with pytest.raises(openai.RateLimitError):
                await c.chat.completions.create(**chat(long_prompt, 40))


async def test_max_parallel_refuses_past_it_and_frees_its_place_when_answered(supervisor_factory):
    sp = await supervisor_factory(budget_config(**{TEAM_A: {"max_parallel": 1}}))
    headers = {"Authorization": f"Bearer {TEAM_A}"}
    slow = asyncio.create_task(sp.session.post("/v1/chat/completions?ms=3000", json=chat("hi", 2) | {"model": "slow"},
                                               headers=headers))
    await wait_until(lambda: _inflight(sp, 1), 10, "the slow request in flight")
    async with sp.session.post("/v1/chat/completions", json=chat("hi", 2), headers=headers) as r:
        assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
    async with sp.session.post("/v1/chat/completions", json=chat("hi", 2),
                               headers={"Authorization": "Bearer someone-else"}) as r:
        assert r.status == 200  # another client is not held back
    r = await slow
    assert r.status == 200
    r.release()
    async with sp.session.post("/v1/chat/completions", json=chat("hi", 2), headers=headers) as r:
        assert r.status == 200
    assert await metric(sp, "client_rate_limited_total", client="team-a") == 1
    assert await metric(sp, "client_tokens_total", client="other", kind="output") == 1


async def _inflight(sp, n: int) -> bool:
    return (await sp.status())["queue"]["inflight"] >= n


async def test_an_unbudgeted_client_gets_no_headers(supervisor_factory):
    sp = await supervisor_factory(budget_config(**{TEAM_A: {"tokens_per_minute": 1000}}))
    async with aiohttp.ClientSession(base_url=sp.url) as s, s.post(
            "/v1/chat/completions", json=chat("hi", 2), headers={"Authorization": "Bearer nobody"}) as r:
        assert r.status == 200
        assert not [h for h in r.headers if h.lower().startswith("x-ratelimit-")]


async def test_an_async_job_spends_its_client_s_budget_when_it_ends(supervisor_factory):
    sp = await supervisor_factory(budget_config("output", **{TEAM_A: {"tokens_per_minute": 100}}))
    headers = {"Authorization": f"Bearer {TEAM_A}"}
    async with sp.session.post("/v1/chat/completions", json=chat("hi", 600),
                               headers={**headers, "Prefer": "respond-async"}) as r:
        assert r.status == 202
        job = await r.json()

    async def finished() -> dict | None:
        async with sp.session.get(f"/jobs/{job['id']}", headers=headers) as r:
            j = await r.json()
        return j if j["status"] in ("succeeded", "failed") else None

    assert (await wait_until(finished, 20, "the job finished"))["status"] == "succeeded"
    # a job is never refused by the budget (it waited its turn), but what it used (300 tokens, three
    # minutes of this budget) is spent: the client's next request waits for the refill
    await wait_until(lambda: _tokens_are(sp, "team-a", 1, 300), 10, "the job's usage counted")
    async with sp.session.post("/v1/chat/completions", json=chat("hi", 2), headers=headers) as r:
        assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limited"
        assert int(r.headers["Retry-After"]) > 60
