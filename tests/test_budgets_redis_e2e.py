"""Two real daemons sharing one real redis-server (`clients.store: redis://`): one client's budget is one
budget across both, and a Redis outage mid-run stops nothing (budgets fail open) and loses no usage
(kept by each daemon, written once Redis is back)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.harness import PYTHON, REPO_ROOT, fast_config, free_port
from tests.redis_server import running_redis

pytestmark = pytest.mark.e2e

USAGE_WORKER = str(REPO_ROOT / "tests" / "workers" / "usage_worker.py")
TPM = 1000


@pytest.fixture
async def redis_tcp():
    async with running_redis(port=free_port()) as server:  # clients.store takes redis://HOST:PORT only
        yield server


def config(url: str) -> dict:
    return fast_config(
        worker={"command": [PYTHON, USAGE_WORKER, "--socket", "{socket}"]},
        queue={"concurrency": 4, "fairness": {"key": "header:X-Client"}},
        clients={"keys": {"alice": {"tokens_per_minute": TPM}}, "store": url},
    )


async def chat(sup, key: str, max_tokens: int = 4) -> tuple[int, dict[str, str], dict]:
    body = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi " * 8}]}
    async with aiohttp.ClientSession() as s, s.post(f"{sup.url}/v1/chat/completions", json=body,
                                                    headers={"X-Client": key}) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


async def usage(sup, key: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(f"{sup.url}/usage", params={"key": key}) as r:
        return r.status, await r.json()


def summed(answers: list[dict]) -> dict[str, int]:
    return {"requests": len(answers), "input_tokens": sum(a["usage"]["prompt_tokens"] for a in answers),
            "output_tokens": sum(a["usage"]["completion_tokens"] for a in answers)}


async def test_two_daemons_share_a_budget_and_survive_a_redis_outage(supervisor_factory, redis_tcp) -> None:
    a = await supervisor_factory(config(redis_tcp.tcp_url))
    b = await supervisor_factory(config(redis_tcp.tcp_url))

    # alice spends nearly her whole minute at A
    status, headers, big = await chat(a, "alice", max_tokens=TPM - 10)
    assert status == 200, big
    assert headers["x-ratelimit-limit-tokens"] == str(TPM)
    # B sees it: alice is refused there (a fresh bucket would take this request); bob, who has no
    # budget, is served
    status, headers, refused = await chat(b, "alice", max_tokens=TPM // 2)
    assert status == 429 and refused["error"]["type"] == "rate_limited", refused
    assert int(headers["x-ratelimit-remaining-tokens"]) < TPM // 2 and int(headers["retry-after"]) >= 1
    status, _, _ = await chat(b, "bob")
    assert status == 200
    for sup in (a, b):                                    # (each daemon writes what it gathered)
        assert (await usage(sup, "alice"))[0] == 200
    status, body = await usage(b, "alice")
    assert body["total"] == summed([big])                 # A's answer, seen from B; the refusal is not usage

    await redis_tcp.stop()
    during: dict[str, list[dict]] = {"alice": [], "bob": []}
    for sup, key in ((a, "alice"), (b, "alice"), (a, "bob"), (b, "bob"), (a, "alice")):
        status, headers, answer = await chat(sup, key, max_tokens=7)
        assert status == 200, answer                       # fail open: alice's spent budget is not known now
        assert "x-ratelimit-limit-tokens" not in headers
        during[key].append(answer)
    status, body = await usage(a, "alice")
    assert status == 503 and body["error"]["type"] == "usage_unavailable", body
    metrics = await a.metrics()
    errors = [line for line in metrics.splitlines() if line.startswith("gpu_supervisor_budget_store_errors_total")]
    assert errors and float(errors[0].split()[-1]) >= 2   # alice's two takes at A (bob has no budget)

    await redis_tcp.start()                                # empty: it keeps nothing on disk
    status, headers, answer = await chat(b, "alice")      # budgets are back by themselves
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == str(TPM)
    during["alice"].append(answer)
    for sup in (b, a):                                     # B's usage written by its query, then A's by its own
        assert (await usage(sup, "bob"))[0] == 200
    for key in ("alice", "bob"):
        status, body = await usage(a, key)
        assert status == 200
        assert body["total"] == summed(during[key]), key  # nothing lost, nothing twice


async def test_usage_left_at_a_shutdown_during_an_outage_is_written_by_the_next_start(
        supervisor_factory, redis_tcp, tmp_path: Path) -> None:
    cfg = config(redis_tcp.tcp_url) | {"state_dir": str(tmp_path / "state")}
    sup = await supervisor_factory(cfg)
    await redis_tcp.stop()
    answers = []
    for key in ("alice", "bob", "alice"):
        status, _, answer = await chat(sup, key, max_tokens=5)
        assert status == 200, answer
        answers.append((key, answer))
    assert await sup.stop() == 0                          # Redis is still down: the usage goes to the state dir
    await redis_tcp.start()
    sup = await supervisor_factory(cfg)
    for key in ("alice", "bob"):
        status, body = await usage(sup, key)
        assert status == 200, body
        assert body["total"] == summed([a for k, a in answers if k == key]), key
