"""The built-in model_worker behind the REAL gpu-supervisor: both are real processes.

One supervisor in front of a tiny random GPT-2 serves most tests (module-scoped; the worker loads
once); the SIGKILL test runs last on it, since it replaces its worker. The OOM cases and MiniLM
embeddings each need their own worker (a different model or environment), so their own supervisor.
The worker's own counters (/healthz on its Unix socket) are read straight from the socket, which
lives in the fixed `runtime_dir` of each config.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.harness import SupervisorProcess, fast_config, kill_quiet, wait_until
from tests.openai_helpers import assert_openai_error, sse_data

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY_CONTEXT = 1024
LONG = 900  # tokens: ~1 s of generation on a CPU core, long enough to act on a request in flight
START_TIMEOUT = 120.0

ROUTES = [  # as in configs/demo.yaml
    {"path": "/v1/embeddings", "priority": "high", "pool": "cpu", "timeout_s": 30},
    {"path": "/v1/models", "pool": "cpu"},
    {"path": "/v1/completions", "methods": ["POST"], "timeout_s": 120, "retry": True},
    {"path": "/v1/chat/completions", "methods": ["POST"], "timeout_s": 120, "retry": True},
]


# ---- supervisors in front of model_worker ----------------------------------------------------

def worker_config(model: str, run_dir: Path, *extra_args: str, **overrides: Any) -> dict:
    command = ["{python}", "-m", "model_worker", "--socket", "{socket}", "--model", model, "--threads", "1",
               *extra_args]
    base = {
        "runtime_dir": str(run_dir),
        "worker": {
            "command": command,
            "startup_timeout_s": START_TIMEOUT,
            "hang_timeout_s": 120,
            "stop_grace_s": 10,
            # generous: the inference thread and other test processes share two cores
            "health": {"interval_s": 0.5, "timeout_s": 5, "failures": 3},
        },
        "queue": {"concurrency": 1, "pools": {"cpu": {"concurrency": 2}}},
        "routes": ROUTES,
        "breaker": {"window": 10, "min_calls": 3, "failure_rate": 0.5, "open_s": 30, "open_max_s": 60},
    }
    return _deep(fast_config(**base), overrides)


def _deep(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@contextlib.asynccontextmanager
async def supervised(model: str, *extra_args: str, **overrides: Any) -> AsyncIterator[SupervisorProcess]:
    """A real `gpu-supervisor run` whose worker is `python -m model_worker --model MODEL`, ready."""
    tmp = Path(tempfile.mkdtemp(prefix="gs-mw-"))  # short: Unix socket paths are limited to 107 bytes
    sp = SupervisorProcess(tmp, worker_config(model, tmp / "run", *extra_args, **overrides))
    try:
        await sp.start(wait_ready=False, timeout=30)
        await sp.wait_ready(START_TIMEOUT)
        yield sp
    finally:
        await sp.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def worker_socket(sp: SupervisorProcess, status: dict) -> Path:
    w = status["worker"]
    return Path(sp.config["runtime_dir"]) / f"{w['name']}-{w['replica']}-{w['generation']}.sock"


async def worker_health(sp: SupervisorProcess) -> dict:
    """The worker's own /healthz (its counters), straight from its socket: not through the supervisor."""
    sock = worker_socket(sp, await sp.status())
    async with aiohttp.ClientSession("http://worker", connector=aiohttp.UnixConnector(path=str(sock))) as s:
        async with s.get("/healthz") as r:
            assert r.status == 200
            return await r.json()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    subprocess.run([PYTHON, "-m", "model_worker.tiny_model", str(dest), "--n-positions", str(TINY_CONTEXT)],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                   timeout=300, check=True)
    return dest


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny(tiny_model: Path) -> AsyncIterator[SupervisorProcess]:
    async with supervised(str(tiny_model)) as sp:
        yield sp


# ---- helpers ---------------------------------------------------------------------------------

def tokenizer_count(model_dir: Path, text: str) -> int:
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids)




def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ---- generation through the supervisor -------------------------------------------------------

async def test_completion_usage_and_supervisor_headers(tiny: SupervisorProcess, tiny_model: Path) -> None:
    prompt = "Hello world, the cat"
    body = {"model": tiny_model.name, "prompt": prompt, "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    async with tiny.session.post("/v1/completions", json=body, headers={"X-Request-ID": "mw-completion-1"}) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
        assert r.headers["X-Request-ID"] == "mw-completion-1"
        assert r.headers["X-Supervisor-Attempts"] == "1"
        assert float(r.headers["X-Supervisor-Queue-Ms"]) >= 0
    assert answer["object"] == "text_completion" and answer["model"] == tiny_model.name
    assert answer["choices"][0]["finish_reason"] == "length"
    n = tokenizer_count(tiny_model, prompt)
    assert answer["usage"] == {"prompt_tokens": n, "completion_tokens": 7, "total_tokens": n + 7}

    async with tiny.session.post("/v1/completions", json=body) as r:  # no id sent: the supervisor makes one
        assert r.status == 200
        assert re.fullmatch(r"[\x21-\x7e]{1,200}", r.headers["X-Request-ID"])
        assert (await r.json())["choices"][0]["text"] == answer["choices"][0]["text"]  # greedy


async def test_chat_completion(tiny: SupervisorProcess) -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
            "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    async with tiny.session.post("/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["X-Supervisor-Attempts"] == "1"
        answer = await r.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] == 5
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + 5


async def test_streaming_arrives_while_the_request_is_in_flight(tiny: SupervisorProcess) -> None:
    body = {"prompt": "Hello", "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with tiny.session.post("/v1/completions", json=body, headers={"X-Request-ID": "mw-stream-1"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Request-ID"] == "mw-stream-1"
        events = sse_data(r)
        first = json.loads(await anext(events))
        assert first["object"] == "text_completion"
        # The first token is here while the supervisor still holds the request: nothing is buffered.
        status = await tiny.status()
        assert status["queue"]["inflight"] == 1 and status["worker"]["inflight"] == 1
        rest = [data async for data in events]
    assert rest[-1] == "[DONE]"
    chunks = [first, *(json.loads(d) for d in rest[:-1])]
    assert len(chunks) >= 3  # (the random model's bytes often wait for a valid UTF-8 character)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == LONG
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    await wait_until(lambda: _idle(tiny), 10, "the stream's slot to be released")


async def _idle(sp: SupervisorProcess) -> bool:
    return (await sp.status())["queue"]["inflight"] == 0


async def test_openai_client_through_the_supervisor(tiny: SupervisorProcess, tiny_model: Path) -> None:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{tiny.url}/v1", api_key="x", max_retries=0) as client:
        raw = await client.completions.with_raw_response.create(
            model=tiny_model.name, prompt="Hello", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert raw.headers["X-Supervisor-Attempts"] == "1"
        completion = raw.parse()
        assert completion.usage.completion_tokens == 5
        assert completion.choices[0].finish_reason == "length"

        stream = await client.chat.completions.create(
            model=tiny_model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
            temperature=0, extra_body={"ignore_eos": True})
        chunks = [chunk async for chunk in stream]
        assert len(chunks) >= 3
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == "length"

        models = await client.models.list()
        assert [m.id for m in models.data] == [tiny_model.name]

        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=tiny_model.name, prompt="x", temperature=5)
        assert caught.value.body["param"] == "temperature"


BAD_BODIES = [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hello", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "Hello", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x" * 3000}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
]


async def test_bad_parameters_pass_through_and_do_not_trip_the_breaker(tiny: SupervisorProcess) -> None:
    for path, body, param in BAD_BODIES:
        async with tiny.session.post(path, json=body) as r:
            assert r.status == 400, (path, body)
            assert r.headers["X-Supervisor-Attempts"] == "1" and r.headers["X-Request-ID"]
            assert_openai_error(await r.json(), param)
    async with tiny.session.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "model_not_found"
    # Seven 4xx answers, more than min_calls (3): a client's mistake is not the worker failing.
    breaker = (await tiny.status())["breaker"]
    assert breaker["state"] == "closed" and breaker["failure_rate"] == 0
    assert await tiny.ready()
    metrics = await tiny.metrics()
    assert metric_value(metrics, "gpu_supervisor_requests_total", code="400") >= len(BAD_BODIES)


async def test_client_disconnect_mid_stream_stops_the_generation(tiny: SupervisorProcess) -> None:
    before = await worker_health(tiny)
    body = {"prompt": "Hello", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    response = await tiny.session.post("/v1/completions", json=body)
    assert response.status == 200
    seen = 0
    async for _ in sse_data(response):
        seen += 1
        if seen == 3:
            break
    response.close()  # drop the connection to the supervisor mid-stream

    async def cancelled() -> dict | None:
        after = await worker_health(tiny)
        return after if after["generations_cancelled"] > before["generations_cancelled"] else None

    after = await wait_until(cancelled, 30, "the worker to report the cancelled generation")
    generated = after["completion_tokens_total"] - before["completion_tokens_total"]
    assert 3 <= generated < LONG // 2, generated
    await wait_until(lambda: _idle(tiny), 10, "the supervisor to release the slot")
    assert (await tiny.status())["breaker"]["state"] == "closed"
    async with tiny.session.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}) as r:
        assert r.status == 200


async def test_client_leaving_a_non_streamed_completion_stops_the_generation(tiny: SupervisorProcess) -> None:
    # Greedy, this random model soon produces only halves of UTF-8 characters, which the worker
    # holds back: no text flows inside the worker either, yet it must notice the lost connection.
    before = await worker_health(tiny)
    body = {"prompt": "Hello", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    request = asyncio.create_task(tiny.session.post("/v1/completions", json=body))
    try:
        await tiny.wait_worker(lambda w: w["inflight"] == 1, 30, "the completion to reach the worker")
    finally:
        request.cancel()  # the client gives up: its connection to the supervisor closes
    with contextlib.suppress(asyncio.CancelledError):
        await request

    async def cancelled() -> dict | None:
        after = await worker_health(tiny)
        return after if after["generations_cancelled"] > before["generations_cancelled"] else None

    after = await wait_until(cancelled, 30, "the worker to report the cancelled generation")
    assert after["completion_tokens_total"] - before["completion_tokens_total"] < LONG
    await wait_until(lambda: _idle(tiny), 10, "the supervisor to release the slot")
    assert (await tiny.status())["breaker"]["state"] == "closed"


# ---- runs last on the shared supervisor: it replaces the worker --------------------------------

async def test_sigkill_mid_generation_is_retried_on_the_new_worker(tiny: SupervisorProcess) -> None:
    status = await tiny.status()
    old_pid, restarts = status["worker"]["pid"], status["worker"]["restarts"]
    body = {"prompt": "Hello", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}

    async def call() -> tuple[int, dict, Any]:
        async with tiny.session.post("/v1/completions", json=body, headers={"X-Request-ID": "mw-retry-1"}) as r:
            return r.status, dict(r.headers), await r.json()

    request = asyncio.create_task(call())
    try:
        await tiny.wait_worker(lambda w: w["inflight"] == 1, 30, "the completion to reach the worker")
        kill_quiet(old_pid, signal.SIGKILL)
        code, headers, answer = await asyncio.wait_for(request, START_TIMEOUT)
    finally:
        request.cancel()
    assert code == 200, answer
    assert headers["X-Supervisor-Attempts"] == "2"
    assert headers["X-Request-ID"] == "mw-retry-1"
    assert answer["usage"]["completion_tokens"] == LONG
    worker = (await tiny.status())["worker"]
    assert worker["pid"] != old_pid and worker["restarts"] == restarts + 1
    assert worker["last_exit"]["signal"] == "SIGKILL" and worker["last_exit"]["pid"] == old_pid
    assert metric_value(await tiny.metrics(), "gpu_supervisor_retries_total", reason="worker_crashed") == 1


# ---- out of memory (worker fault injection) --------------------------------------------------

async def test_oom_once_answers_503_then_the_next_request_succeeds(tiny_model: Path) -> None:
    async with supervised(str(tiny_model), worker={"env": {"MODEL_WORKER_FAULT": "oom_once"}}) as sp:
        pid = await sp.worker_pid()
        body = {"prompt": "Hello", "max_tokens": 4}
        async with sp.session.post("/v1/completions", json=body) as r:
            assert r.status == 503
            assert r.headers["X-Worker-Error"] == "oom"
            assert r.headers["X-Supervisor-Attempts"] == "1"  # an answer, not a death: not retried
            error = await r.json()
        assert_openai_error(error, None, type_="server_error")
        assert error["error"]["code"] == "out_of_memory"
        async with sp.session.post("/v1/completions", json=body) as r:
            assert r.status == 200
            assert "X-Worker-Error" not in r.headers
        status = await sp.status()
        assert status["worker"]["pid"] == pid and status["worker"]["restarts"] == 0
        assert status["breaker"]["state"] == "closed"
        assert (await worker_health(sp))["oom_total"] == 1


async def test_oom_on_every_request_opens_the_breaker(tiny_model: Path) -> None:
    async with supervised(str(tiny_model), worker={"env": {"MODEL_WORKER_FAULT": "oom"}}) as sp:
        body = {"prompt": "Hello", "max_tokens": 4}
        for _ in range(3):  # breaker.min_calls
            async with sp.session.post("/v1/completions", json=body) as r:
                assert r.status == 503 and r.headers["X-Worker-Error"] == "oom"
        async with sp.session.post("/v1/completions", json=body) as r:
            assert r.status == 503
            assert "X-Worker-Error" not in r.headers  # the supervisor's own answer this time
            assert int(r.headers["Retry-After"]) >= 1
            error = (await r.json())["error"]
        assert error["type"] == "circuit_open" and error["retry_after_s"] >= 1
        status = await sp.status()
        assert status["breaker"]["state"] == "open" and status["breaker"]["retry_after_s"] > 0
        assert not await sp.ready()
        assert status["worker"]["restarts"] == 0  # the worker is alive: OOM answers do not kill it
        assert (await worker_health(sp))["oom_total"] == 3


# ---- embeddings: real MiniLM weights, on the cpu pool ----------------------------------------

async def test_minilm_embeddings_on_the_cpu_pool() -> None:
    import openai

    async with supervised("minilm", "--task", "embed") as sp:
        texts = ["a cat", "a kitten", "stock market prices"]
        async with sp.session.post("/v1/embeddings", json={"model": "minilm", "input": texts}) as r:
            assert r.status == 200
            assert r.headers["X-Supervisor-Attempts"] == "1"
            body = await r.json()
        cat, kitten, stocks = (d["embedding"] for d in body["data"])
        assert len(cat) == 384
        assert _cos(cat, kitten) > _cos(cat, stocks)
        assert body["usage"]["prompt_tokens"] > 0

        async with openai.AsyncOpenAI(base_url=f"{sp.url}/v1", api_key="x", max_retries=0) as client:
            result = await client.embeddings.create(model="minilm", input=texts[:2])  # base64 by default
        assert _cos(result.data[0].embedding, result.data[1].embedding) > 0.5

        status = await sp.status()
        assert status["queue"]["pools"]["cpu"]["concurrency"] == 2
        assert status["queue"]["concurrency"] == 1
        metrics = await sp.metrics()
        # the route's priority (high) went with it
        assert metric_value(metrics, "gpu_supervisor_requests_total", priority="high", code="200") == 2
        assert metric_value(metrics, "gpu_supervisor_worker_start_seconds_count") == 1
