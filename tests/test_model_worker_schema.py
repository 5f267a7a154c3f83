"""model_worker against OpenAI's published schemas: a malformed or unsupported request is a 400 naming its
parameter, no input is answered 5xx, and every answer carries the fields OpenAI's schema requires.

Real workers (the tiny GPT-2 and MiniLM), started once for this module, are driven over their Unix sockets
with a plain blocking HTTP client (one connection per request). Answers are checked against the `openai`
package's types with strict pydantic validation, plus a presence check of every required field in the raw
JSON: the SDK's models default nullable-but-required fields (`message.refusal`, `choices[].logprobs`, ...)
to None, so parsing alone would not notice them missing.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import http.client
import json
import os
import socket
import struct
import subprocess
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import hypothesis
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion, CompletionChoice, CreateEmbeddingResponse, Model
from openai.types import completion_create_params as completion_params
from openai.types import embedding_create_params as embedding_params
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    chat_completion,
    chat_completion_chunk,
)
from openai.types.chat import completion_create_params as chat_params
from openai.types.shared import ErrorObject

from model_worker import validation
from model_worker.openai_api import ApiError
from tests.test_model_worker import PYTHON, ROOT, TINY_CONTEXT, Worker, start_worker

MINILM_DIMS = 384
USER = [{"role": "user", "content": "hi"}]


# ---- workers (one of each for the module) ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("schema-models") / "tiny-gpt2"
    subprocess.run([PYTHON, "-m", "model_worker.tiny_model", str(dest), "--n-positions", str(TINY_CONTEXT)],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=300,
                   check=True)
    return dest


@pytest.fixture(scope="module")
def gen(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = asyncio.run(start_worker(tmp_path_factory.mktemp("schema-tiny"), "--model", str(tiny_dir)))
    yield worker
    assert worker.stop() == 0


@pytest.fixture(scope="module")
def emb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = asyncio.run(start_worker(tmp_path_factory.mktemp("schema-minilm"), "--model", "minilm"))
    yield worker
    assert worker.stop() == 0


# ---- a blocking HTTP client on a Unix socket -----------------------------------------------------

class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("worker", timeout=120)
        self._socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


@dataclass
class Answer:
    status: int
    content_type: str
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.raw)

    def events(self) -> list[str]:
        """The SSE data of a streamed answer, in order."""
        assert self.content_type.startswith("text/event-stream"), self.content_type
        return [line[len("data: "):] for event in self.raw.decode().split("\n\n")
                for line in event.splitlines() if line.startswith("data: ")]


def call(worker: Worker, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         content_type: str | None = "application/json") -> Answer:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn = _UnixConnection(worker.socket)
    try:
        conn.request(method, path, body=data, headers={} if content_type is None else {"Content-Type": content_type})
        response = conn.getresponse()
        return Answer(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        conn.close()


def post(worker: Worker, path: str, body: Any) -> Answer:
    return call(worker, "POST", path, body)


def health(worker: Worker) -> dict[str, Any]:
    return call(worker, "GET", "/healthz").json()


# ---- OpenAI's schema, strictly ------------------------------------------------------------------

class CompletionChunkChoice(CompletionChoice):
    """A streamed completion's choice: as the SDK's, but `finish_reason` is null until the last chunk.

    The SDK parses stream chunks as `Completion` without validating them; OpenAI's own streams send
    `"finish_reason": null` in every chunk but the last, which `CompletionChoice` (strictly) refuses.
    """

    finish_reason: Literal["stop", "length", "content_filter"] | None


class CompletionChunk(Completion):
    choices: list[CompletionChunkChoice]


# Fields that OpenAI's OpenAPI spec lists as required but nullable, which the SDK's models default to None
# (so `model_validate` alone accepts their absence), plus the few this worker promises on top of the spec.
REQUIRED_NULLABLE: dict[type[pydantic.BaseModel], frozenset[str]] = {
    ChatCompletionMessage: frozenset({"content", "refusal"}),       # ChatCompletionResponseMessage
    chat_completion.Choice: frozenset({"logprobs"}),                # CreateChatCompletionResponse.choices[]
    chat_completion_chunk.Choice: frozenset({"finish_reason", "logprobs"}),  # spec: finish_reason
    CompletionChoice: frozenset({"logprobs"}),                      # CreateCompletionResponse.choices[]
    CompletionChunkChoice: frozenset({"finish_reason", "logprobs"}),
    ErrorObject: frozenset({"code", "param"}),                      # Error
    ChatCompletion: frozenset({"system_fingerprint"}),              # the worker's own promise
    ChatCompletionChunk: frozenset({"system_fingerprint"}),
    Completion: frozenset({"system_fingerprint"}),
    CompletionChunk: frozenset({"system_fingerprint"}),
}
# Fields that OpenAI's OpenAPI spec types as non-nullable (`type: string`, optional but never null) where
# the SDK's models say `Optional[...] = None`: strict validation alone lets a null through. A null here is
# a schema error (a client generated from the spec refuses it).
NOT_NULLABLE: dict[type[pydantic.BaseModel], frozenset[str]] = {
    ChatCompletion: frozenset({"system_fingerprint"}),              # CreateChatCompletionResponse
    ChatCompletionChunk: frozenset({"system_fingerprint"}),         # CreateChatCompletionStreamResponse
    Completion: frozenset({"system_fingerprint"}),                  # CreateCompletionResponse
    CompletionChunk: frozenset({"system_fingerprint"}),
}


def _models_in(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """The pydantic models inside a field's annotation (through Optional, List, Annotated)."""
    args = typing.get_args(annotation)
    if not args:
        return [annotation] if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel) else []
    if typing.get_origin(annotation) is typing.Annotated:
        return _models_in(args[0])
    return [m for a in args for m in _models_in(a)]


def missing_fields(raw: Any, model: type[pydantic.BaseModel], where: str) -> list[str]:
    """Paths of the required fields absent from the raw JSON `raw`, read as a `model`, recursively, and
    of the non-nullable ones sent as null (marked `=null`)."""
    if not isinstance(raw, dict):
        return []  # a wrong type is strict validation's to report
    missing = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in raw:
            if field.is_required() or name in REQUIRED_NULLABLE.get(model, ()):
                missing.append(f"{where}.{key}")
            continue
        if raw[key] is None and name in NOT_NULLABLE.get(model, ()):
            missing.append(f"{where}.{key}=null")
            continue
        inner = _models_in(field.annotation)
        if len(inner) != 1:
            continue  # no model, or a union of several: nothing this worker sends
        value = raw[key]
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            missing += missing_fields(item, inner[0], f"{where}.{key}" + ("" if i is None else f"[{i}]"))
    return missing


def assert_schema(raw: Any, model: type[pydantic.BaseModel]) -> None:
    model.model_validate(raw, strict=True)
    assert missing_fields(raw, model, model.__name__) == [], raw


def assert_error(answer: Answer, status: int, param: str | None) -> dict[str, Any]:
    assert answer.status == status, answer.raw
    assert answer.content_type.startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert_schema(error, ErrorObject)
    assert error["param"] == param, error
    assert error["message"] and error["type"] == "invalid_request_error"
    return error


def assert_models_list(raw: Any) -> None:
    assert raw["object"] == "list" and isinstance(raw["data"], list) and raw["data"]
    for card in raw["data"]:
        assert_schema(card, Model)


def assert_stream(answer: Answer, chunk_model: type[pydantic.BaseModel]) -> list[dict[str, Any]]:
    """Every chunk of a 200 SSE answer is a valid `chunk_model`, none is an error; it ends with [DONE]."""
    assert answer.status == 200, answer.raw
    events = answer.events()
    assert events and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert "error" not in chunk, chunk
        assert_schema(chunk, chunk_model)
    assert len({c["id"] for c in chunks}) == 1
    return chunks


def decode_base64_embeddings(raw: dict[str, Any]) -> dict[str, Any]:
    """What the SDK does with encoding_format=base64: little-endian float32s."""
    data = []
    for item in raw["data"]:
        blob = base64.b64decode(item["embedding"], validate=True)
        data.append({**item, "embedding": list(struct.unpack(f"<{len(blob) // 4}f", blob))})
    return {**raw, "data": data}


def assert_answer(answer: Answer, path: str, body: dict[str, Any]) -> None:
    """A 200 answer to `body` has OpenAI's shape, streamed or not."""
    assert answer.status == 200, answer.raw
    if path == "/v1/embeddings":
        raw = answer.json()
        if body.get("encoding_format") == "base64":
            raw = decode_base64_embeddings(raw)
        assert_schema(raw, CreateEmbeddingResponse)
        assert all(len(d["embedding"]) == MINILM_DIMS for d in raw["data"])
        return
    chat = path == "/v1/chat/completions"
    if body.get("stream") is True:
        assert_stream(answer, ChatCompletionChunk if chat else CompletionChunk)
    else:
        assert_schema(answer.json(), ChatCompletion if chat else Completion)


# ---- the schema checker itself --------------------------------------------------------------------

def test_schema_check_catches_a_missing_nullable_field() -> None:
    good = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x", "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}]}
    assert_schema(good, ChatCompletion)
    no_refusal = json.loads(json.dumps(good))
    del no_refusal["choices"][0]["message"]["refusal"]
    ChatCompletion.model_validate(no_refusal, strict=True)  # the SDK alone accepts it...
    assert missing_fields(no_refusal, ChatCompletion, "r") == ["r.choices[0].message.refusal"]  # ...this does not
    with pytest.raises(pydantic.ValidationError):
        assert_schema({**good, "created": "1"}, ChatCompletion)


@pytest.mark.parametrize(("model", "object_"), [
    (ChatCompletion, "chat.completion"), (ChatCompletionChunk, "chat.completion.chunk"),
    (Completion, "text_completion"), (CompletionChunk, "text_completion"),
])
def test_schema_check_catches_a_null_system_fingerprint(model: type[pydantic.BaseModel], object_: str) -> None:
    """OpenAI's spec types `system_fingerprint` as a string; the SDK's `Optional[str]` lets null through."""
    raw = {"id": "c", "object": object_, "created": 1, "model": "m", "choices": [], "system_fingerprint": None}
    model.model_validate(raw, strict=True)  # the SDK alone accepts it...
    assert missing_fields(raw, model, "r") == ["r.system_fingerprint=null"]  # ...this does not


# ---- every parameter is decided --------------------------------------------------------------------

@pytest.mark.parametrize(("params_type", "decided"), [
    (chat_params.CompletionCreateParamsBase, validation.CHAT_PARAMS),
    (completion_params.CompletionCreateParamsBase, validation.COMPLETION_PARAMS),
    (embedding_params.EmbeddingCreateParams, validation.EMBEDDING_PARAMS),
], ids=["chat", "completions", "embeddings"])
def test_every_sdk_request_parameter_is_decided(params_type: type, decided: frozenset[str]) -> None:
    """A parameter the openai package knows is honoured, harmless or default-only here, and documented."""
    sdk = set(params_type.__annotations__)
    assert sdk - decided == set()
    doc = validation.__doc__ or ""
    assert [name for name in sorted(decided) if name not in doc] == []


# ---- malformed requests: 400 naming the parameter --------------------------------------------------

OMIT = object()  # as a patch value: the request leaves that key out


def _body(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in {**base, **patch}.items() if v is not OMIT}


CHAT_MALFORMED = [
    ({"messages": [{"role": {}, "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": None, "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [None]}, "messages[0]"),
    ({"messages": "hi"}, "messages"),
    ({"messages": {"role": "user", "content": "x"}}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": OMIT}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ["plain"]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "colour": 1}]}]},
     "messages[0].content[0].colour"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages[0].colour"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]}, "messages[0].tool_call_id"),
    ({"messages": [*USER, {"role": "user", "content": None}]}, "messages[1].content"),
    ({"model": 5}, "model"),
    ({"model": ["tiny"]}, "model"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "4"}, "max_tokens"),
    ({"max_tokens": TINY_CONTEXT}, "max_tokens"),           # prompt + max_tokens past the context
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": [4]}, "max_completion_tokens"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": [1]}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": "x"}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": "1"}, "n"),
    ({"n": 1.0}, "n"),
    ({"stop": 3}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": ["a", None]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": {"s": 1}}, "stop"),
    ({"stream": "true"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),      # without stream
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"colour": True}}, "stream_options.colour"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": True}, "seed"),
    ({"user": 5}, "user"),
    ({"user": {"id": 1}}, "user"),
    ({"metadata": "x"}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": "2"}, "min_tokens"),
    ({"min_tokens": 5}, "min_tokens"),                     # more than max_tokens
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"response_format": "json"}, "response_format"),
    ({"top_k": 5}, "top_k"),                                # not an OpenAI parameter
    ({"prompt": "x"}, "prompt"),                            # a completions parameter
]


@pytest.mark.parametrize(("patch", "param"), CHAT_MALFORMED)
def test_chat_malformed_is_400(gen: Worker, patch: dict[str, Any], param: str) -> None:
    answer = post(gen, "/v1/chat/completions", _body({"messages": USER, "max_tokens": 4}, patch))
    assert_error(answer, 400, param)


COMPLETION_MALFORMED = [
    ({"prompt": None}, "prompt"),
    ({"prompt": OMIT}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [["a"]]}, "prompt"),
    ({"prompt": [[1, [2]]]}, "prompt"),
    ({"prompt": [None]}, "prompt"),
    ({"prompt": [True, 2]}, "prompt"),
    ({"prompt": True}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "\udc00"}, "prompt"),
    ({"prompt": [999_999]}, "prompt"),                      # past the vocabulary (the engine's check)
    ({"prompt": [2**70]}, "prompt"),
    ({"prompt": "x" * 3000}, "prompt"),                     # the prompt alone fills the context
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": False}, "max_tokens"),
    ({"max_tokens": TINY_CONTEXT}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": -0.5}, "top_p"),
    ({"stop": ["a", 2]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"echo": "yes"}, "echo"),
    ({"best_of": "x"}, "best_of"),
    ({"suffix": 5}, "suffix"),
    ({"user": 5}, "user"),
    ({"seed": [1]}, "seed"),
    ({"max_completion_tokens": 4}, "max_completion_tokens"),  # a chat parameter
    ({"messages": USER}, "messages"),
    ({"metadata": {}}, "metadata"),
]


@pytest.mark.parametrize(("patch", "param"), COMPLETION_MALFORMED)
def test_completion_malformed_is_400(gen: Worker, patch: dict[str, Any], param: str) -> None:
    answer = post(gen, "/v1/completions", _body({"prompt": "Hello", "max_tokens": 4}, patch))
    assert_error(answer, 400, param)


EMBEDDING_MALFORMED = [
    ({"input": None}, "input"),
    ({"input": OMIT}, "input"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [""]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": [1.5]}, "input"),
    ({"input": [[1, 1.5]]}, "input"),
    ({"input": [[-1]]}, "input"),
    ({"input": [{"text": "x"}]}, "input"),
    ({"input": [["a"]]}, "input"),
    ({"input": ["a", None]}, "input"),
    ({"input": [[1], "a", 3]}, "input"),
    ({"input": 5}, "input"),
    ({"input": True}, "input"),
    ({"input": {"a": 1}}, "input"),
    ({"input": "\ud800"}, "input"),
    ({"input": [[40_000]]}, "input"),                       # past MiniLM's vocabulary (the engine's check)
    ({"input": [[2**70]]}, "input"),
    ({"input": ["a"] * 3000}, "input"),                     # more than --max-embed-inputs (2048)
    ({"encoding_format": "hex"}, "encoding_format"),
    ({"encoding_format": 3}, "encoding_format"),
    ({"encoding_format": ["float"]}, "encoding_format"),
    ({"encoding_format": ""}, "encoding_format"),
    ({"dimensions": 0}, "dimensions"),
    ({"dimensions": -1}, "dimensions"),
    ({"dimensions": "384"}, "dimensions"),
    ({"dimensions": 384.0}, "dimensions"),
    ({"dimensions": True}, "dimensions"),
    ({"model": 3}, "model"),
    ({"user": 3}, "user"),
    ({"prompt": "x"}, "prompt"),
]


@pytest.mark.parametrize(("patch", "param"), EMBEDDING_MALFORMED)
def test_embedding_malformed_is_400(emb: Worker, patch: dict[str, Any], param: str) -> None:
    answer = post(emb, "/v1/embeddings", _body({"input": "a cat"}, patch))
    assert_error(answer, 400, param)


RAW_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"  \n", id="blank"),
    pytest.param(b"\xff\xfe", id="not-utf8"),
    pytest.param(b'{"prompt": "\xff", "input": "\xfe"}', id="not-utf8-in-a-string"),
    pytest.param('{"prompt": "x", "input": "x"}'.encode("utf-16"), id="utf16"),
    pytest.param(b'\xef\xbb\xbf{"prompt": "x", "input": "x"}', id="utf8-bom"),
    pytest.param(b'["a", "list"]', id="array"),
    pytest.param(b'"a string"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b"42", id="number"),
    pytest.param(b"NaN", id="nan"),
    pytest.param(b'{"prompt": "unterminated', id="truncated"),
    pytest.param(b"{'prompt': 'x'}", id="single-quotes"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep"),
    pytest.param(b'{"max_tokens": ' + b"9" * 5000 + b"}", id="5000-digit-int"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
@pytest.mark.parametrize("raw", RAW_BODIES)
def test_body_that_is_not_a_json_object_is_400(gen: Worker, path: str, raw: bytes) -> None:
    error = assert_error(call(gen, "POST", path, raw=raw), 400, None)
    assert error["code"] == "invalid_json"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
def test_wrong_content_type_is_400(gen: Worker, path: str, content_type: str) -> None:
    body = {"prompt": "x", "messages": USER, "input": "x", "max_tokens": 2}
    error = assert_error(call(gen, "POST", path, body, content_type=content_type), 400, None)
    assert error["code"] == "invalid_content_type" and "application/json" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", None])
def test_json_content_types_are_accepted(gen: Worker, content_type: str | None) -> None:
    body = {"prompt": "Hello", "max_tokens": 2}
    assert_answer(call(gen, "POST", "/v1/completions", body, content_type=content_type), "/v1/completions", body)


# ---- parameters the worker does not honour: 400, never silently ignored ----------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

CHAT_UNSUPPORTED = [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"tools": [TOOL]}, "tools"),
    ({"functions": [TOOL["function"]]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"logit_bias": {"50": 10}}, "logit_bias"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 0}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"verbosity": "low"}, "verbosity"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"store": True}, "store"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[1].tool_calls"),
    ({"messages": [*USER, {"role": "assistant", "refusal": "no"}]}, "messages[1].refusal"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
]


@pytest.mark.parametrize(("patch", "param"), CHAT_UNSUPPORTED)
def test_chat_unsupported_is_400(gen: Worker, patch: dict[str, Any], param: str) -> None:
    answer = post(gen, "/v1/chat/completions", _body({"messages": USER, "max_tokens": 2}, patch))
    error = assert_error(answer, 400, param)
    assert error["code"] == "unsupported_value" and "not supported by this worker" in error["message"]


COMPLETION_UNSUPPORTED = [
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 2}, "logprobs"),
    ({"logprobs": 0}, "logprobs"),
    ({"suffix": "the end"}, "suffix"),
    ({"logit_bias": {"50": -100}}, "logit_bias"),
    ({"n": 2}, "n"),
    ({"presence_penalty": 1}, "presence_penalty"),
    ({"prompt": ["a", "b"]}, "prompt"),
]


@pytest.mark.parametrize(("patch", "param"), COMPLETION_UNSUPPORTED)
def test_completion_unsupported_is_400(gen: Worker, patch: dict[str, Any], param: str) -> None:
    answer = post(gen, "/v1/completions", _body({"prompt": "Hello", "max_tokens": 2}, patch))
    error = assert_error(answer, 400, param)
    assert error["code"] == "unsupported_value" and "not supported by this worker" in error["message"]


def test_embedding_other_dimensions_is_400(emb: Worker) -> None:
    error = assert_error(post(emb, "/v1/embeddings", {"input": "a cat", "dimensions": 128}), 400, "dimensions")
    assert error["code"] == "unsupported_value" and str(MINILM_DIMS) in error["message"]


# ---- what is honoured or harmless is still accepted ---------------------------------------------------

CHAT_ACCEPTED = [
    {"response_format": {"type": "text"}},
    {"tool_choice": "none"},
    {"tool_choice": "auto", "tools": [], "parallel_tool_calls": True},
    {"functions": [], "function_call": "none"},
    {"logit_bias": {}, "logprobs": False, "top_logprobs": None},
    {"presence_penalty": 0, "frequency_penalty": 0.0},
    {"modalities": ["text"], "audio": None, "service_tier": "auto", "store": False},
    {"n": 1, "user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k", "metadata": {"a": "b"}},
    {"prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit"}},
    {"max_tokens": None, "max_completion_tokens": 3},
    {"max_tokens": 3, "max_completion_tokens": 3},
    {"seed": -(2**63), "temperature": 1e-300, "top_p": 1e-9},   # a tiny temperature is (nearly) greedy
    {"seed": 2**63 - 1, "temperature": 2, "top_p": 1},
    {"stop": [], "min_tokens": 2},
    {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
    {"stream": True, "stream_options": None},
    {"messages": [{"role": "developer", "content": "Be brief."}, *USER]},
    {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
                  {"role": "user", "content": [{"type": "text", "text": "hi",
                                                "prompt_cache_breakpoint": {"mode": "explicit"}}]}]},
    {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [], "refusal": None},
                  {"role": "tool", "content": "42", "tool_call_id": "call-1"}, {"role": "user", "content": ""}]},
]


@pytest.mark.parametrize("patch", CHAT_ACCEPTED)
def test_chat_accepts_honoured_and_harmless(gen: Worker, patch: dict[str, Any]) -> None:
    body = _body({"messages": USER, "max_tokens": 3, "ignore_eos": True}, patch)
    assert_answer(post(gen, "/v1/chat/completions", body), "/v1/chat/completions", body)


COMPLETION_ACCEPTED = [
    {"echo": False, "best_of": 1, "suffix": "", "logprobs": None, "user": "u"},
    {"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0, "n": 1},
    {"prompt": [5, 6, 7]},
    {"prompt": ["Hello"]},
    {"prompt": [[5, 6]]},
    {"prompt": ""},
    {"stream": True, "stream_options": {"include_usage": False}},
    {"max_tokens": None},                                   # OpenAI's default of 16
]


@pytest.mark.parametrize("patch", COMPLETION_ACCEPTED)
def test_completion_accepts_honoured_and_harmless(gen: Worker, patch: dict[str, Any]) -> None:
    body = _body({"prompt": "Hello", "max_tokens": 3}, patch)
    assert_answer(post(gen, "/v1/completions", body), "/v1/completions", body)


EMBEDDING_ACCEPTED = [
    {"user": "u", "dimensions": MINILM_DIMS, "encoding_format": "float"},
    {"encoding_format": "base64", "input": ["a cat", "a kitten"]},
    {"input": [101, 4937, 102]},
    {"input": [[101, 4937, 102], [101, 102]]},
    {"encoding_format": None, "dimensions": None},
]


@pytest.mark.parametrize("patch", EMBEDDING_ACCEPTED)
def test_embedding_accepts_honoured_and_harmless(emb: Worker, patch: dict[str, Any]) -> None:
    body = _body({"model": "minilm", "input": "a cat"}, patch)
    assert_answer(post(emb, "/v1/embeddings", body), "/v1/embeddings", body)


# ---- answers against the openai package's types -------------------------------------------------

def test_chat_answer_has_every_required_field(gen: Worker, tiny_dir: Path) -> None:
    body = {"model": tiny_dir.name, "messages": USER, "max_tokens": 3}
    answer = post(gen, "/v1/chat/completions", body).json()
    assert_schema(answer, ChatCompletion)
    message = answer["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None
    assert answer["model"] == tiny_dir.name and answer["usage"]["completion_tokens"] <= 3
    # a string naming the backend (model files and settings), the same in every answer and in /healthz
    assert answer["system_fingerprint"].startswith("fp_")
    assert answer["system_fingerprint"] == health(gen)["system_fingerprint"]


def test_streamed_chat_chunks_have_every_required_field(gen: Worker) -> None:
    body = {"messages": USER, "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = assert_stream(post(gen, "/v1/chat/completions", body), ChatCompletionChunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completion_answers_have_every_required_field(gen: Worker) -> None:
    body = {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    assert_schema(post(gen, "/v1/completions", body).json(), Completion)
    chunks = assert_stream(post(gen, "/v1/completions", {**body, "stream": True}), CompletionChunk)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["system_fingerprint"] for c in chunks} == {health(gen)["system_fingerprint"]}


def test_embedding_answers_have_every_required_field(emb: Worker) -> None:
    body = {"model": "minilm", "input": ["a cat", "a kitten"]}
    floats = post(emb, "/v1/embeddings", body).json()
    assert_schema(floats, CreateEmbeddingResponse)
    packed = decode_base64_embeddings(post(emb, "/v1/embeddings", {**body, "encoding_format": "base64"}).json())
    assert_schema(packed, CreateEmbeddingResponse)
    for a, b in zip(floats["data"], packed["data"]):
        assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-6)


def test_models_and_errors_have_every_required_field(gen: Worker, tiny_dir: Path) -> None:
    assert_models_list(call(gen, "GET", "/v1/models").json())
    assert_schema(call(gen, "GET", f"/v1/models/{tiny_dir.name}").json(), Model)
    assert_error(call(gen, "GET", "/v1/models/nope"), 404, "model")
    assert_error(post(gen, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model")
    assert_error(call(gen, "GET", "/v1/nowhere"), 404, None)
    assert_error(call(gen, "GET", "/v1/completions"), 405, None)


# ---- property: no input is a 5xx, every 400 names its parameter ---------------------------------
#
# A body starts valid (each optional field present or not). A third stay so and reach the model; in a third
# one or two fields get a wrong value (a near miss for that field: a bad range, a wrong type; or arbitrary
# JSON); in the last third one position inside the body (`messages[1].role`, `input[0][2]`, ...), found by
# a random descent from a field, is replaced by arbitrary JSON, so nested places get their share of wrong types.

SURROGATE = st.sampled_from(["\ud800", "a\udfffb"])
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2, max_value=2**80)
           | st.floats() | st.text(max_size=6) | SURROGATE)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3),
                    max_leaves=8)
SMALL_TEXT = st.text(max_size=12)
# A valid budget is small: a missing one means "the rest of the context" for chat, too slow to fuzz.
SMALL_BUDGET = st.integers(1, 3)
BAD_BUDGET = (st.integers(max_value=0) | st.integers(min_value=2049) | st.booleans() | st.floats()
              | st.text(max_size=3) | st.lists(SMALL_BUDGET, max_size=2))


@dataclass(frozen=True)
class Field:
    valid: st.SearchStrategy[Any]
    wrong: st.SearchStrategy[Any] = st.nothing()
    weight: int = 1  # how often this field is the one made wrong (the structured ones have more to get wrong)


def replaced(value: Any, path: tuple[str | int, ...], new: Any) -> Any:
    """A copy of `value` with the item at `path` replaced by `new`."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    return [replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]


# A third each: a scalar, an array, an object (`a | b` would flatten in SCALARS' branches: few containers).
NESTED_JUNK = st.sampled_from([SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(SMALL_TEXT, SCALARS, max_size=2)]
                              ).flatmap(lambda kind: kind)


@st.composite
def request_bodies(draw: st.DrawFn, required: dict[str, Field], optional: dict[str, Field]) -> dict[str, Any]:
    """A third valid; a third with 1-2 fields made wrong; a third with one position inside replaced by junk."""
    body = draw(st.fixed_dictionaries({k: f.valid for k, f in required.items()},
                                      optional={k: f.valid for k, f in optional.items()}))
    if "stream_options" in body:  # only valid with a stream
        body["stream"] = True
    fields = {**required, **optional}
    weighted = sorted(name for name, field in fields.items() for _ in range(field.weight))
    mode = draw(st.sampled_from(["valid", "field", "path"]))
    if mode == "field":
        for name in draw(st.lists(st.sampled_from(weighted), min_size=1, max_size=2, unique=True)):
            body[name] = draw(fields[name].wrong | JUNK)
    elif mode == "path":  # descend from a (weighted) field, stopping a third of the time at each level
        name = draw(st.sampled_from([n for n in weighted if n in body]))
        path: tuple[str | int, ...] = (name,)
        value = body[name]
        while isinstance(value, (dict, list)) and value and draw(st.integers(0, 2)):
            key = draw(st.sampled_from(sorted(value) if isinstance(value, dict) else range(len(value))))
            path, value = (*path, key), value[key]
        body = replaced(body, path, draw(NESTED_JUNK))
    if draw(st.integers(0, 9)) == 0:  # now and then a name no endpoint takes, or another endpoint's
        body[draw(st.text(min_size=1, max_size=8) | st.sampled_from(["top_k", "prompt", "messages", "input"]))] = (
            draw(JUNK))
    return body


TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": SMALL_TEXT})
OTHER_PART = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "file", "refusal", "video"]),
                                    "text": SMALL_TEXT})
CONTENT = st.text(max_size=24) | st.lists(TEXT_PART, min_size=1, max_size=3)
MESSAGE = (
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user"]), "content": CONTENT})
    | st.fixed_dictionaries({"role": st.just("assistant")}, optional={"content": CONTENT | st.none(),
                                                                       "tool_calls": st.just([])})
    | st.fixed_dictionaries({"role": st.just("tool"), "content": CONTENT, "tool_call_id": SMALL_TEXT})
)
WRONG_ROLE = (st.dictionaries(SMALL_TEXT, JUNK, max_size=2) | st.lists(JUNK, max_size=2) | SCALARS
              | st.sampled_from(["function", "wizard", "User"]))
WRONG_MESSAGE = (
    st.fixed_dictionaries({"role": WRONG_ROLE, "content": CONTENT})
    | st.fixed_dictionaries({"role": st.sampled_from(["user", "tool", "assistant"]),
                             "content": JUNK | st.lists(OTHER_PART | JUNK, max_size=2)},
                            optional={"name": JUNK, "tool_call_id": JUNK, "refusal": JUNK, "tool_calls": JUNK})
    | JUNK
)

GENERATION_FIELDS: dict[str, Field] = {
    "temperature": Field(st.floats(0, 2), st.floats(2, allow_infinity=True) | st.floats(max_value=0)),
    "top_p": Field(st.floats(0, 1, exclude_min=True), st.floats(max_value=0) | st.floats(min_value=1)),
    "n": Field(st.just(1), st.integers(-2, 3)),
    "stop": Field(st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
                  st.lists(st.text(max_size=3), min_size=5, max_size=6) | st.just("") | st.lists(JUNK, max_size=2)),
    "stream": Field(st.booleans()),
    "stream_options": Field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                                "include_obfuscation": st.booleans()}),
                            st.fixed_dictionaries({"include_usage": JUNK})),
    "seed": Field(st.integers(-(2**63), 2**63 - 1), st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1)),
    "user": Field(SMALL_TEXT),
    "min_tokens": Field(st.integers(0, 1), st.integers(max_value=-1) | st.integers(4, 5000)),
    "ignore_eos": Field(st.booleans()),
    "presence_penalty": Field(st.just(0) | st.just(0.0), st.floats(-2, 2)),
    "frequency_penalty": Field(st.just(0), st.floats(-3, 3)),
    "logit_bias": Field(st.just({}), st.dictionaries(st.integers(0, 600).map(str), st.integers(-100, 100))),
}


def chat_bodies(model: str) -> st.SearchStrategy[dict[str, Any]]:
    return request_bodies(
        required={"messages": Field(st.lists(MESSAGE, min_size=1, max_size=3),
                                    st.lists(MESSAGE | WRONG_MESSAGE, min_size=1, max_size=3) | st.just([]), 10),
                  "max_tokens": Field(SMALL_BUDGET, BAD_BUDGET)},
        optional={
            **GENERATION_FIELDS,
            "model": Field(st.just(model), SMALL_TEXT),
            "max_completion_tokens": Field(st.none(), BAD_BUDGET | SMALL_BUDGET),
            "logprobs": Field(st.just(False), st.just(True)),
            "top_logprobs": Field(st.none(), st.integers(0, 20)),
            "response_format": Field(st.just({"type": "text"}),
                                     st.sampled_from([{"type": "json_object"}, {"type": "json_schema"}, {}])),
            "tool_choice": Field(st.sampled_from(["none", "auto"]), st.sampled_from(["required", "any"])),
            "tools": Field(st.just([]), st.just([TOOL])),
            "parallel_tool_calls": Field(st.booleans()),
            "metadata": Field(st.dictionaries(SMALL_TEXT, SMALL_TEXT, max_size=2)),
            "service_tier": Field(st.sampled_from(["auto", "default"]), st.sampled_from(["flex", "priority"])),
            "store": Field(st.just(False), st.just(True)),
            "reasoning_effort": Field(st.none(), st.sampled_from(["low", "high"])),
        },
    )


def completion_bodies(model: str) -> st.SearchStrategy[dict[str, Any]]:
    prompt = (st.text(max_size=30) | st.lists(st.integers(0, 500), min_size=1, max_size=4)
              | st.lists(st.text(max_size=5), min_size=1, max_size=1)
              | st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=3), min_size=1, max_size=1))
    wrong_prompt = (st.lists(st.integers(-5, 100_000), min_size=1, max_size=3)
                    | st.lists(st.text(max_size=3), min_size=2, max_size=3) | st.just([]) | st.just([[]]))
    return request_bodies(
        required={"prompt": Field(prompt, wrong_prompt, 6)},
        optional={
            **GENERATION_FIELDS,
            "max_tokens": Field(SMALL_BUDGET | st.none(), BAD_BUDGET),
            "model": Field(st.just(model), SMALL_TEXT),
            "echo": Field(st.just(False), st.just(True)),
            "best_of": Field(st.just(1), st.integers(-1, 3)),
            "logprobs": Field(st.none(), st.integers(0, 5)),
            "suffix": Field(st.just(""), SMALL_TEXT),
        },
    )


def embedding_bodies() -> st.SearchStrategy[dict[str, Any]]:
    items = (st.text(min_size=1, max_size=20) | st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3)
             | st.lists(st.integers(0, 30_000), min_size=1, max_size=4)
             | st.lists(st.lists(st.integers(0, 30_000), min_size=1, max_size=3), min_size=1, max_size=2))
    wrong_items = (st.just("") | st.just([]) | st.lists(st.integers(-3, 100_000), min_size=1, max_size=3)
                   | st.lists(st.text(max_size=2) | st.lists(st.integers(-1, 40_000), max_size=2), min_size=1,
                              max_size=3))
    return request_bodies(
        required={"input": Field(items, wrong_items, 3)},
        optional={
            "model": Field(st.just("minilm"), SMALL_TEXT),
            "encoding_format": Field(st.sampled_from(["float", "base64"]), st.sampled_from(["hex", "", "FLOAT"])),
            "dimensions": Field(st.just(MINILM_DIMS), st.integers(-1, 500)),
            "user": Field(SMALL_TEXT),
        },
    )


def assert_never_5xx(answer: Answer, path: str, body: dict[str, Any]) -> None:
    """The invariant: an answer, never a 5xx; a 400 names its parameter; a 200 has OpenAI's shape."""
    assert answer.status < 500, (body, answer.raw)
    if answer.status == 200:
        assert_answer(answer, path, body)
        return
    assert answer.status in (400, 404), (body, answer.raw)
    param = answer.json()["error"]["param"]
    error = assert_error(answer, answer.status, param)
    assert isinstance(param, str) and param, (body, error)
    if answer.status == 404:
        assert param == "model" and error["code"] == "model_not_found"


FUZZ = settings(max_examples=150, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fuzz(worker: Worker, path: str, bodies: st.SearchStrategy[dict[str, Any]]) -> None:
    errors_before = health(worker)["errors_total"]
    statuses: collections.Counter[int] = collections.Counter()

    @FUZZ
    @given(body=bodies)
    def run(body: dict[str, Any]) -> None:
        answer = post(worker, path, body)
        statuses[answer.status] += 1
        hypothesis.event(f"status {answer.status}")
        assert_never_5xx(answer, path, body)

    run()
    after = health(worker)
    assert after["status"] == "ok" and after["errors_total"] == errors_before  # no 500 was logged either
    assert statuses[200] and statuses[400], statuses  # the bodies reached the model, and the checks


def test_property_chat_is_never_5xx(gen: Worker, tiny_dir: Path) -> None:
    _fuzz(gen, "/v1/chat/completions", chat_bodies(tiny_dir.name))


def test_property_completions_is_never_5xx(gen: Worker, tiny_dir: Path) -> None:
    _fuzz(gen, "/v1/completions", completion_bodies(tiny_dir.name))


def test_property_embeddings_is_never_5xx(emb: Worker) -> None:
    _fuzz(emb, "/v1/embeddings", embedding_bodies())


# ---- the same property on the pure parsers, many more examples -----------------------------------------

def _parse_or_api_error(parse: typing.Callable[[], Any]) -> None:
    try:
        parse()
    except ApiError as exc:
        assert exc.status in (400, 404) and isinstance(exc.param, str) and exc.param, vars(exc)
        assert exc.message and exc.type == "invalid_request_error"


PARSE_FUZZ = settings(max_examples=300, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PARSE_FUZZ
@given(body=chat_bodies("tiny"))
def test_parse_chat_raises_only_named_api_errors(body: dict[str, Any]) -> None:
    _parse_or_api_error(lambda: validation.parse_chat(body, ("tiny",), 2048))


@PARSE_FUZZ
@given(body=completion_bodies("tiny"))
def test_parse_completion_raises_only_named_api_errors(body: dict[str, Any]) -> None:
    _parse_or_api_error(lambda: validation.parse_completion(body, ("tiny",), 2048))


@PARSE_FUZZ
@given(body=embedding_bodies())
def test_parse_embedding_raises_only_named_api_errors(body: dict[str, Any]) -> None:
    _parse_or_api_error(lambda: validation.parse_embedding(body, ("minilm",), 2048, MINILM_DIMS))
