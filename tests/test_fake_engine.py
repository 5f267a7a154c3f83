"""The fake engine of the routing tests and benchmark (tests/workers/fake_engine.py), as a real process: its
prefix cache, its usage, its vLLM metrics, and that it renders a prompt as the supervisor's router does."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from supervisor.routing.affinity import prompt_text as router_prompt_text
from tests.workers.fake_engine import prompt_text
from tests.workers.util import REPO_ROOT, running_worker, socket_path, unix_session

FAKE_ENGINE = REPO_ROOT / "tests" / "workers" / "fake_engine.py"
SYSTEM = "You are a careful assistant. " * 20


def engine_command(*args: str) -> list[str]:
    return [sys.executable, str(FAKE_ENGINE), "--socket", "{socket}", *args]


def chat(*turns: str, **extra: object) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, *({"role": "user", "content": t} for t in turns)]
    return {"model": "fake-chat", "messages": messages, **extra}


def metric(text: str, name: str) -> float:
    """The value of `name`'s one sample (labelled model_name="fake-chat") in Prometheus text."""
    m = re.search(rf'^{re.escape(name)}\{{model_name="fake-chat"\}} (\S+)$', text, re.M)
    assert m, f"{name} not in {text!r}"
    return float(m.group(1))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, int]]:
    """A fake engine with its default options; yields a session on its socket and its pid."""
    sock = socket_path(tmp_path)
    async with running_worker(engine_command(), sock, health_path="/health") as proc:
        async with unix_session(sock) as session:
            yield session, proc.pid


async def post(session: aiohttp.ClientSession, path: str, body: dict) -> tuple[dict, dict[str, str]]:
    async with session.post(path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(), dict(resp.headers)


async def test_same_prompt_twice_hits_the_cache_and_counts_it(engine) -> None:
    session, pid = engine
    first, h1 = await post(session, "/v1/chat/completions", chat("hello"))
    second, h2 = await post(session, "/v1/chat/completions", chat("hello"))
    size = len(prompt_text(chat("hello")).encode())  # 599 bytes: 9 full blocks of 64
    tokens = math.ceil(size / 4)
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"] == tokens
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    # all 9 full blocks: the last token of a prompt is always computed, and it lies past them
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 9 * 16}
    assert (h1["X-Cached-Tokens"], h2["X-Cached-Tokens"]) == ("0", "144")
    assert h1["X-Engine-Id"] == h2["X-Engine-Id"] == str(pid)
    assert second["object"] == "chat.completion" and second["choices"][0]["message"]["role"] == "assistant"
    assert second["usage"]["completion_tokens"] == 8

    async with session.get("/metrics") as resp:
        text = await resp.text()
    assert metric(text, "vllm:prefix_cache_queries_total") == 2 * tokens
    assert metric(text, "vllm:prefix_cache_hits_total") == 144
    assert metric(text, "vllm:kv_cache_usage_perc") == 9 / 2048
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:num_requests_waiting") == 0


async def test_a_longer_conversation_reuses_its_beginning(engine) -> None:
    session, _ = engine
    await post(session, "/v1/chat/completions", chat("first question"))
    other, _ = await post(session, "/v1/chat/completions", {**chat("x"), "messages": [
        {"role": "system", "content": "Another system prompt entirely. " * 20}]})
    later, _ = await post(session, "/v1/chat/completions", chat("first question", "and a second one"))
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    shared = len(prompt_text(chat("first question")).encode()) // 64  # full blocks of the first turn
    assert later["usage"]["prompt_tokens_details"]["cached_tokens"] == shared * 16


async def test_lru_keeps_a_prompts_head_and_options_come_from_env(tmp_path: Path) -> None:
    sock = socket_path(tmp_path)
    env = {"FAKE_ENGINE_CACHE_BLOCKS": "4", "FAKE_ENGINE_MODEL": "tiny"}
    async with running_worker(engine_command(), sock, health_path="/health", env=env):
        async with unix_session(sock) as session:
            async with session.get("/v1/models") as resp:
                assert (await resp.json())["data"][0]["id"] == "tiny"
            body = {"model": "tiny", "prompt": "y" * 64 * 10}
            await post(session, "/v1/completions", body)
            again, _ = await post(session, "/v1/completions", body)
            async with session.get("/metrics") as resp:
                text = (await resp.text()).replace('model_name="tiny"', 'model_name="fake-chat"')
            async with session.post("/v1/completions", json={"model": "other", "prompt": "z"}) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "model_not_found"
    # 10 blocks into 4: the first four stay (a tail goes before its head), so the prompt's start still hits
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 4 * 16
    assert metric(text, "vllm:kv_cache_usage_perc") == 1.0


async def test_stream_ends_with_usage_and_done(engine) -> None:
    session, _ = engine
    body = {"prompt": "z" * 200, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post("/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Cached-Tokens"] == "0"
        raw = await resp.text()
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "ok " * 8
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 50


async def test_a_request_without_a_prompt_is_refused(engine) -> None:
    session, _ = engine
    for path, body in (("/v1/completions", {"prompt": [1, 2, 3]}), ("/v1/chat/completions", {"prompt": "p"})):
        async with session.post(path, json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with session.post("/v1/chat/completions", data=b"{not json") as resp:
        assert resp.status == 400


@pytest.mark.parametrize("body", [
    {"prompt": "plain text"},
    {"prompt": ["one", "two"]},
    {"prompt": [1, 2], "messages": [{"role": "user", "content": "ids are no prompt"}]},
    {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hé ☃"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"},
                                              {"type": "text", "text": "b"}]}, "not a message", {"content": 3}]},
    {"messages": "not a list"},
    ["not", "a", "dict"],
])
def test_prompt_is_rendered_as_the_router_renders_it(body: object) -> None:
    assert prompt_text(body) == router_prompt_text(body)
