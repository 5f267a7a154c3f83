"""Sleep mode of the built-in worker (vLLM's `POST /sleep?level=1|2`, `POST /wake_up`, `GET /is_sleeping`):
real model_worker processes on Unix sockets, the tiny GPT-2 and MiniLM, driven over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import wait_until
from tests.openai_helpers import assert_openai_error, sse_data
from tests.test_model_worker import BASE, Worker, running, start_worker, tiny_model  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e

GREEDY = {"prompt": "Hello world, the cat", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
SEEDED = {"prompt": "The market", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7, "ignore_eos": True}
CHAT = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:  # noqa: F811
    worker = asyncio.run(start_worker(tmp_path_factory.mktemp("tiny-sleep"), "--model", str(tiny_model)))
    yield worker
    assert worker.stop() == 0


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = asyncio.run(start_worker(tmp_path_factory.mktemp("minilm-sleep"), "--model", "minilm"))
    yield worker
    assert worker.stop() == 0


@pytest.fixture
async def http(tiny: Worker) -> AsyncIterator[aiohttp.ClientSession]:
    """A session to the shared tiny worker, awake at the start of each test whatever the last one left."""
    async with tiny.session() as session:
        async with session.post("/wake_up") as r:
            assert r.status == 200
        yield session


async def _json(session: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with session.request(method, path, json=body) as r:
        return r.status, await r.json()


async def _text(session: aiohttp.ClientSession, body: dict[str, Any]) -> str:
    status, answer = await _json(session, "POST", "/v1/completions", body)
    assert status == 200, answer
    return answer["choices"][0]["text"]


async def _assert_refused_asleep(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> None:
    async with session.post(path, json=body) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
        assert r.headers["X-Worker-Error"] == "asleep"
        error = await r.json()
    assert_openai_error(error, None, type_="asleep")
    assert error["error"]["code"] == "asleep" and "/wake_up" in error["error"]["message"]


# ---- level 2: weights dropped, read again on wake ---------------------------------------------

async def test_level_2_drops_the_weights_and_wakes_to_the_same_answers(http: aiohttp.ClientSession) -> None:
    before = [await _text(http, GREEDY), await _text(http, SEEDED)]
    status, awake = await _json(http, "GET", "/is_sleeping")
    assert status == 200 and awake["is_sleeping"] is False and awake["state"] == "awake"
    parameters = awake["weights"]["parameters"]
    assert parameters > 100_000 and awake["weights"]["device"] == "cpu"

    status, slept = await _json(http, "POST", "/sleep?level=2")
    assert status == 200
    assert slept["is_sleeping"] is True and slept["level"] == 2
    # measured from the model object through a weak reference: 0 only if nothing holds it any more
    assert slept["weights"] == {"device": None, "parameters": 0}
    status, state = await _json(http, "GET", "/is_sleeping")
    assert state == {"is_sleeping": True, "state": "asleep", "level": 2, "weights": {"device": None, "parameters": 0}}

    await _assert_refused_asleep(http, "/v1/completions", GREEDY)
    await _assert_refused_asleep(http, "/v1/chat/completions", {**CHAT, "stream": True})
    status, health = await _json(http, "GET", "/healthz")
    assert status == 200 and health["sleeping"] is True and health["sleep_level"] == 2
    status, models = await _json(http, "GET", "/v1/models")  # needs no weights: still served
    assert status == 200 and models["data"]

    status, again = await _json(http, "POST", "/sleep?level=2")  # idempotent
    assert status == 200 and again["is_sleeping"] is True and again["level"] == 2

    status, woke = await _json(http, "POST", "/wake_up")
    assert status == 200
    assert woke["is_sleeping"] is False and woke["level"] is None
    assert woke["weights"] == {"device": "cpu", "parameters": parameters}
    assert [await _text(http, GREEDY), await _text(http, SEEDED)] == before
    status, health = await _json(http, "GET", "/healthz")
    assert health["sleeping"] is False and health["sleep_level"] is None

    status, again = await _json(http, "POST", "/wake_up")  # idempotent
    assert status == 200 and again["is_sleeping"] is False


# ---- level 1: weights kept in host memory -------------------------------------------------------

async def test_level_1_is_the_default_and_keeps_the_weights(http: aiohttp.ClientSession, tiny: Worker,
                                                            tiny_model: Path) -> None:  # noqa: F811
    before = await _text(http, GREEDY)
    status, awake = await _json(http, "GET", "/is_sleeping")
    status, slept = await _json(http, "POST", "/sleep")  # no level: 1, as vLLM's
    assert status == 200 and slept["level"] == 1 and slept["state"] == "asleep"
    assert slept["weights"] == {"device": "cpu", "parameters": awake["weights"]["parameters"]}  # held, in host RAM
    await _assert_refused_asleep(http, "/v1/completions", GREEDY)

    # the official client sees a 503 it can retry, with the worker's error body
    import httpx2
    import openai

    transport = httpx2.AsyncHTTPTransport(uds=str(tiny.socket))
    async with openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(transport=transport)) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.completions.create(model=tiny_model.name, prompt="x", max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.body["type"] == "asleep"

    status, again = await _json(http, "POST", "/sleep?level=1")
    assert status == 200 and again["level"] == 1
    status, woke = await _json(http, "POST", "/wake_up")
    assert status == 200 and woke["is_sleeping"] is False
    assert await _text(http, GREEDY) == before


@pytest.mark.parametrize("level", ["0", "3", "two", "", "1.0", "-1"])
async def test_bad_level_is_400_and_changes_nothing(http: aiohttp.ClientSession, level: str) -> None:
    status, error = await _json(http, "POST", f"/sleep?level={level}")
    assert status == 400
    assert_openai_error(error, "level")
    assert "1" in error["error"]["message"] and "2" in error["error"]["message"]
    status, state = await _json(http, "GET", "/is_sleeping")
    assert state["is_sleeping"] is False
    await _text(http, GREEDY)


async def test_sleep_and_wake_are_wrong_methods_on_get(http: aiohttp.ClientSession) -> None:
    status, error = await _json(http, "GET", "/sleep")
    assert status == 405 and error["error"]["code"] == "method_not_allowed"
    status, state = await _json(http, "GET", "/is_sleeping")
    assert state["is_sleeping"] is False


# ---- concurrency ---------------------------------------------------------------------------------

async def test_sleep_lets_running_streams_finish_and_refuses_new_requests(http: aiohttp.ClientSession,
                                                                          tiny: Worker) -> None:
    # Several long streams: they run one after another on the inference thread, so the sleep below
    # arrives while most of them are still in flight.
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    first_chunk = asyncio.Event()

    async def stream() -> list[str]:
        async with tiny.session() as s, s.post("/v1/completions", json=body) as r:
            assert r.status == 200
            events = []
            async for data in sse_data(r):
                events.append(data)
                first_chunk.set()
            return events

    streams = [asyncio.create_task(stream()) for _ in range(4)]
    await first_chunk.wait()
    sleeping = asyncio.create_task(_json(http, "POST", "/sleep?level=2"))
    await wait_until(lambda: _is_sleeping(http), 30, "the sleep to begin")
    await _assert_refused_asleep(http, "/v1/completions", GREEDY)  # going to sleep or asleep: refused either way

    for events in await asyncio.gather(*streams):  # none was cut
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 1000
        assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    status, slept = await sleeping
    assert status == 200 and slept["state"] == "asleep" and slept["weights"]["parameters"] == 0
    # the sleep began with requests still in flight and waited for them
    began = [e for e in tiny.log_events() if e["event"] == "sleep_state" and e["new"] == "falling_asleep"]
    assert began[-1]["waiting_for"] >= 1


async def _is_sleeping(http: aiohttp.ClientSession) -> bool:
    status, state = await _json(http, "GET", "/is_sleeping")
    return state["is_sleeping"]


async def test_concurrent_sleeps_and_wakes_move_once_each(http: aiohttp.ClientSession, tiny: Worker) -> None:
    before = await _text(http, GREEDY)
    answers = await asyncio.gather(*(_json(http, "POST", "/sleep?level=2") for _ in range(5)))
    assert all(status == 200 and body["is_sleeping"] for status, body in answers)
    answers = await asyncio.gather(*(_json(http, "POST", "/wake_up") for _ in range(5)))
    assert all(status == 200 and body["is_sleeping"] is False for status, body in answers)
    assert await _text(http, GREEDY) == before
    # one move each way: the other calls found the work done
    events = [e for e in tiny.log_events() if e["event"] == "sleep_state"]
    tail = events[-4:]
    assert [(e["old"], e["new"]) for e in tail] == [("awake", "falling_asleep"), ("falling_asleep", "asleep"),
                                                    ("asleep", "waking"), ("waking", "awake")]


# ---- a wake that fails -------------------------------------------------------------------------

async def test_wake_without_the_model_folder_fails_and_stays_asleep(tiny_model: Path,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    folder = tmp_path / "model" / "tiny-gpt2"
    shutil.copytree(tiny_model, folder)
    async with running(tmp_path / "w", "--model", str(folder)) as worker, worker.session() as http:
        before = await _text(http, GREEDY)
        status, _ = await _json(http, "POST", "/sleep?level=2")
        assert status == 200
        aside = folder.with_name("aside")
        folder.rename(aside)
        status, error = await _json(http, "POST", "/wake_up")
        assert status == 500
        assert_openai_error(error, None, type_="server_error")
        assert error["error"]["code"] == "wake_failed" and str(folder) in error["error"]["message"]
        status, state = await _json(http, "GET", "/is_sleeping")
        assert state["is_sleeping"] is True and state["state"] == "asleep" and state["level"] == 2
        await _assert_refused_asleep(http, "/v1/completions", GREEDY)

        aside.rename(folder)
        status, woke = await _json(http, "POST", "/wake_up")
        assert status == 200 and woke["is_sleeping"] is False
        assert await _text(http, GREEDY) == before


# ---- MiniLM (embeddings) ------------------------------------------------------------------------

@pytest.mark.parametrize("level", [2, 1])
async def test_minilm_sleeps_and_wakes_to_the_same_vectors(minilm: Worker, level: int) -> None:
    body = {"model": "minilm", "input": ["a cat", "stock market prices"]}
    async with minilm.session() as http:
        status, before = await _json(http, "POST", "/v1/embeddings", body)
        assert status == 200
        status, awake = await _json(http, "GET", "/is_sleeping")
        assert awake["weights"]["parameters"] > 20_000_000  # MiniLM-L6: 22.7M

        status, slept = await _json(http, "POST", f"/sleep?level={level}")
        assert status == 200 and slept["is_sleeping"] is True and slept["level"] == level
        held = {"device": None, "parameters": 0} if level == 2 else awake["weights"]
        assert slept["weights"] == held
        await _assert_refused_asleep(http, "/v1/embeddings", body)
        status, health = await _json(http, "GET", "/healthz")
        assert status == 200 and health["sleeping"] is True

        status, woke = await _json(http, "POST", "/wake_up")
        assert status == 200 and woke["weights"] == awake["weights"]
        status, after = await _json(http, "POST", "/v1/embeddings", body)
    assert status == 200
    assert [d["embedding"] for d in after["data"]] == [d["embedding"] for d in before["data"]]
