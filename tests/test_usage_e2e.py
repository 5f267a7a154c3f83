"""The usage record end to end: a real daemon with `clients` set, a worker answering OpenAI's shapes
with `usage`, two clients through the official openai client; `/usage` and `gpu-supervisor usage`
give back exactly what the answers said, and a SQLite usage file keeps it across a restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.harness import PYTHON, REPO_ROOT, fast_config, wait_until

pytestmark = pytest.mark.e2e

USAGE_WORKER = str(REPO_ROOT / "tests" / "workers" / "usage_worker.py")
TOKEN = "usage-admin-token"


def config(tmp: Path, store: str) -> dict:
    token_file = tmp / "admin.token"
    token_file.write_text(TOKEN + "\n")
    return fast_config(
        worker={"command": [PYTHON, USAGE_WORKER, "--socket", "{socket}"]},
        queue={"concurrency": 4, "fairness": {"key": "header:X-Client"}},
        admin={"token_file": str(token_file)},
        clients={"keys": {"alice": {"tokens_per_minute": 1_000_000, "requests_per_minute": 1000}},
                 "store": store},
    )


def client(sup, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{sup.url}/v1", api_key="unused", default_headers={"X-Client": key},
                       max_retries=0, timeout=30)


async def traffic(sup, key: str, n: int) -> dict[str, list[int]]:
    """Chat (whole and streamed with include_usage) and text completions; per model the answers'
    [requests, prompt_tokens, completion_tokens]."""
    seen: dict[str, list[int]] = {}

    def count(model: str, usage) -> None:
        c = seen.setdefault(model, [0, 0, 0])
        c[0] += 1
        c[1] += usage.prompt_tokens
        c[2] += usage.completion_tokens

    async with client(sup, key) as oa:
        for i in range(n):
            r = await oa.chat.completions.create(model="chat-a", max_tokens=3 + i,
                                                 messages=[{"role": "user", "content": "hello there " * (i + 1)}])
            count("chat-a", r.usage)
            stream = await oa.chat.completions.create(model="chat-b", max_tokens=2 + i, stream=True,
                                                      stream_options={"include_usage": True},
                                                      messages=[{"role": "user", "content": "stream " * (i + 2)}])
            last = None
            async for chunk in stream:
                last = chunk.usage or last
            count("chat-b", last)
            t = await oa.completions.create(model="text-c", prompt="once upon a time " * (i + 1), max_tokens=5)
            count("text-c", t.usage)
    return seen


async def get_usage(sup, token: str | None = TOKEN, base: str | None = None, **query: str) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(f"{base or sup.url}/usage", params=query, headers=headers) as r:
        return r.status, await r.json()


def totals(seen: dict[str, list[int]]) -> dict[str, int]:
    return {"requests": sum(c[0] for c in seen.values()), "input_tokens": sum(c[1] for c in seen.values()),
            "output_tokens": sum(c[2] for c in seen.values())}


def cells(line: str) -> list[str]:
    """A table line's cells (rich draws its borders with box characters)."""
    return [c for c in re.split(r"[\s\u2500-\u257f|]+", line) if c]


async def run_cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GPU_SUPERVISOR_TOKEN"} | {"COLUMNS": "200",
                                                                                   "NO_COLOR": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "supervisor", "usage", *args, cwd=str(REPO_ROOT),
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_usage_totals_equal_the_answers_usage_for_each_key(supervisor_factory, tmp_path: Path) -> None:
    t0 = int(time.time())
    sup = await supervisor_factory(config(tmp_path, "memory"))
    alice, bob = await asyncio.gather(traffic(sup, "alice", 3), traffic(sup, "bob", 2))   # bob is not listed

    status, body = await get_usage(sup, key="alice")
    assert status == 200, body
    assert body["key"] == "alice" and body["since"] == 0 and body["group_by"] == "minute"
    assert body["total"] == totals(alice)
    per_model: dict[str, list[int]] = {}
    for r in body["rows"]:
        assert r["period_start"] % 60 == 0 and r["period_start"] >= t0 - 60
        c = per_model.setdefault(r["model"], [0, 0, 0])
        c[0] += r["requests"]
        c[1] += r["input_tokens"]
        c[2] += r["output_tokens"]
    assert per_model == alice

    status, body = await get_usage(sup, key="bob", group_by="day", since=str(t0))
    assert status == 200, body
    assert body["total"] == totals(bob) and body["since"] == t0
    assert {r["model"] for r in body["rows"]} == {"chat-a", "chat-b", "text-c"}
    assert all(r["period_start"] % 86400 == 0 for r in body["rows"])

    status, body = await get_usage(sup, key="carol")
    assert status == 200 and body["rows"] == [] and body["total"]["requests"] == 0
    status, body = await get_usage(sup, key="alice", since=str(int(time.time()) + 3600))
    assert status == 200 and body["total"]["requests"] == 0

    # the command line: a table with the totals, and the same JSON
    rc, out, err = await run_cli("--key", "alice", "--url", sup.url, "--token-file", str(tmp_path / "admin.token"),
                                 "--group-by", "day")
    assert rc == 0, err
    total_line = next(cells(line) for line in out.splitlines() if "total" in cells(line))
    want = totals(alice)
    assert total_line[-3:] == [str(want["requests"]), str(want["input_tokens"]), str(want["output_tokens"])]
    for model in ("chat-a", "chat-b", "text-c"):
        assert model in out
    rc, out, err = await run_cli("--key", "bob", "--url", sup.url, "--token-file", str(tmp_path / "admin.token"),
                                 "--json", "--group-by", "minute")
    assert rc == 0, err
    assert json.loads(out)["total"] == totals(bob)


async def test_usage_refuses_bad_questions_with_a_reason_on_the_admin_listener(supervisor_factory,
                                                                              tmp_path: Path) -> None:
    cfg = config(tmp_path, "memory")
    cfg["admin"]["listen"] = {"host": "127.0.0.1", "port": 0}
    sup = await supervisor_factory(cfg, wait_ready=False)      # (/readyz is on the admin listener)
    admin = f"http://127.0.0.1:{sup.admin_port}"

    async def ready() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{admin}/readyz") as r:
            return r.status == 200

    await wait_until(ready, 20, "admin /readyz 200")
    async with aiohttp.ClientSession() as s, s.get(f"{sup.url}/usage?key=alice") as r:
        assert r.status == 404 and "rows" not in await r.text()   # the main port proxies it to the worker
    status, body = await get_usage(sup, token=None, base=admin, key="alice")
    assert status == 401 and body["error"]["type"] == "unauthorized"
    status, body = await get_usage(sup, base=admin, key="alice")
    assert status == 200 and body["total"]["requests"] == 0
    for query, says in (({}, "key is required"), ({"key": "a", "group_by": "week"}, "group_by='week'"),
                        ({"key": "a", "since": "yesterday"}, "since='yesterday' is not a number"),
                        ({"key": "a", "since": "-5"}, "since='-5'"), ({"key": "a", "page": "2"}, "'page'")):
        status, body = await get_usage(sup, base=admin, **query)
        assert status == 400, (query, body)
        assert body["error"]["type"] == "bad_request" and says in body["error"]["message"], body
    async with aiohttp.ClientSession() as s, s.post(f"{admin}/usage?key=a",
                                                    headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 400 and "GET only" in (await r.json())["error"]["message"]
    rc, out, err = await run_cli("--key", "alice", "--url", admin)
    assert rc == 2 and "401 Unauthorized" in err and "--token-file" in err and not out
    rc, out, err = await run_cli("--key", "alice", "--url", admin, "--token-file", str(tmp_path / "admin.token"),
                                 "--since", "last tuesday")
    assert rc == 2 and err.startswith("gpu-supervisor usage: --since 'last tuesday'")
    rc, out, err = await run_cli("--key", "alice", "--url", sup.url, "--token-file", str(tmp_path / "admin.token"))
    assert rc == 2 and "HTTP 404" in err                     # not the admin listener


async def test_sqlite_usage_survives_a_restart(supervisor_factory, tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path}/usage/usage.db"
    sup = await supervisor_factory(config(tmp_path, store))
    alice = await traffic(sup, "alice", 2)
    assert await sup.stop() == 0              # SIGTERM: the usage gathered since the last flush is written
    sup = await supervisor_factory(config(tmp_path, store))
    status, body = await get_usage(sup, key="alice", group_by="hour")
    assert status == 200, body
    assert body["total"] == totals(alice)
    more = await traffic(sup, "alice", 1)
    status, body = await get_usage(sup, key="alice", group_by="hour")
    both = {m: [a + b for a, b in zip(alice.get(m, [0, 0, 0]), more.get(m, [0, 0, 0]))] for m in alice | more}
    assert body["total"] == totals(both)
