"""The OpenAI wire format: request validation into specs, response and SSE chunk shapes, error bodies."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model_worker.inference import EmbeddingSpec, GenerationSpec

MAX_STOP_SEQUENCES = 4
CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}
_MISSING = object()


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_param(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    spec: GenerationSpec
    model: str
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    spec: EmbeddingSpec
    model: str


# ---- parsing ---------------------------------------------------------------------------------

def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(
            400,
            f"We could not parse the JSON body of your request: {exc}. The body must be a JSON object.",
            code="invalid_json",
        ) from exc
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _model(body: dict[str, Any], served: tuple[str, ...]) -> str:
    model = body.get("model")
    if model is None:
        return served[0]  # lenient: a single-model worker needs no name
    if not isinstance(model, str):
        raise bad_param("model", f"'model' must be a string; this worker serves {served[0]!r}.", "invalid_type")
    if model not in served:
        raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return model


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
    if not _is_number(value):
        raise bad_param(name, f"'{name}' must be a number in {bound}, got {value!r}.", "invalid_type")
    if value > hi or value < lo or (lo_open and value == lo):
        raise bad_param(name, f"'{name}' must be in {bound}, got {value!r}.")
    return float(value)


def _int(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return None
    if not _is_int(value):
        raise bad_param(name, f"'{name}' must be an integer, got {value!r}.", "invalid_type")
    if value < lo or (hi is not None and value > hi):
        upper = "" if hi is None else f" and <= {hi}"
        raise bad_param(name, f"'{name}' must be >= {lo}{upper}, got {value}.")
    return value


def _bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise bad_param(name, f"'{name}' must be a boolean, got {value!r}.", "invalid_type")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_param("stop", "'stop' must be a string or a list of strings.", "invalid_type")
    if len(value) > MAX_STOP_SEQUENCES:
        raise bad_param("stop", f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}.")
    if any(s == "" for s in value):
        raise bad_param("stop", "'stop' sequences must not be empty.")
    return tuple(dict.fromkeys(value))


def _unsupported(body: dict[str, Any], name: str, allowed: Any, why: str) -> None:
    value = body.get(name)
    if value is not None and value != allowed:
        raise ApiError(400, f"'{name}'={value!r} is not supported by this worker: {why}.",
                       param=name, code="unsupported_value")


def _common(body: dict[str, Any], served: tuple[str, ...], max_tokens_limit: int,
            max_tokens_name: str = "max_tokens") -> dict[str, Any]:
    model = _model(body, served)
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, f"'n'={n} is not supported: this worker returns one choice per request (n=1).",
                       param="n", code="unsupported_value")
    max_tokens = _int(body, max_tokens_name, 1, max_tokens_limit)
    min_tokens = _int(body, "min_tokens", 0, max_tokens_limit) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_param("min_tokens",
                        f"'min_tokens' ({min_tokens}) must not exceed '{max_tokens_name}' ({max_tokens}).")
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, 0.0, -2.0, 2.0)  # accepted (OpenAI's range) and not applied
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad_param("stream_options", "'stream_options' must be an object, and only with 'stream': true.")
    include_usage = bool(options and _bool(options, "include_usage"))
    return {
        "model": model,
        "stream": stream,
        "include_usage": include_usage,
        "max_tokens": max_tokens,
        "min_tokens": min_tokens,
        "ignore_eos": _bool(body, "ignore_eos"),
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "stop": _stop(body),
        "seed": _int(body, "seed", -(2**63), 2**63 - 1),
    }


def _spec(common: dict[str, Any], prompt: Any = None, messages: Any = None) -> GenerationRequest:
    spec = GenerationSpec(
        prompt=prompt, messages=messages, max_tokens=common["max_tokens"], min_tokens=common["min_tokens"],
        ignore_eos=common["ignore_eos"], temperature=common["temperature"], top_p=common["top_p"],
        stop=common["stop"], seed=common["seed"],
    )
    return GenerationRequest(spec, common["model"], common["stream"], common["include_usage"])


def parse_completion(body: dict[str, Any], served: tuple[str, ...], max_tokens_limit: int) -> GenerationRequest:
    common = _common(body, served, max_tokens_limit)
    _unsupported(body, "echo", False, "the prompt is not echoed")
    _unsupported(body, "logprobs", None, "log probabilities are not returned")
    _unsupported(body, "best_of", 1, "one candidate is generated")
    _unsupported(body, "suffix", None, "insertion is not supported")
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise bad_param("prompt", "'prompt' is required.", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return _spec(common, prompt=prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return _spec(common, prompt=tuple(prompt))
    raise bad_param("prompt", "'prompt' must be a string, a list of token ids, or a list holding one of those "
                              "(batches of several prompts are not supported).", "invalid_type")


def _message_content(i: int, message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        if message.get("role") == "assistant":
            return ""
        raise bad_param(f"messages[{i}].content", f"messages[{i}] needs a 'content'.", "missing_required_parameter")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_param(f"messages[{i}].content",
                                f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}; "
                                "this worker handles text only.", "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_param(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts.",
                    "invalid_type")


def parse_chat(body: dict[str, Any], served: tuple[str, ...], max_tokens_limit: int) -> GenerationRequest:
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    common = _common(body, served, max_tokens_limit, max_name)
    _unsupported(body, "logprobs", False, "log probabilities are not returned")
    messages = body.get("messages", _MISSING)
    if messages is _MISSING or messages is None:
        raise bad_param("messages", "'messages' is required.", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "'messages' must be a non-empty list of {'role', 'content'} objects.",
                        "invalid_type")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_param(f"messages[{i}]", f"messages[{i}] must be an object.", "invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_param(f"messages[{i}].role",
                            f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}.")
        parsed.append({"role": "system" if role == "developer" else role,
                       "content": _message_content(i, message)})
    return _spec(common, messages=tuple(parsed))


def parse_embedding(body: dict[str, Any], served: tuple[str, ...], max_inputs: int,
                    dimensions: int) -> EmbeddingRequest:
    model = _model(body, served)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_param("encoding_format", f"'encoding_format' must be 'float' or 'base64', got {fmt!r}.")
    dims = _int(body, "dimensions", 1)
    if dims is not None and dims != dimensions:
        raise ApiError(400, f"'dimensions'={dims} is not supported: this model's embeddings have {dimensions}.",
                       param="dimensions", code="unsupported_value")
    value = body.get("input", _MISSING)
    if value is _MISSING or value is None:
        raise bad_param("input", "'input' is required.", "missing_required_parameter")
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_int(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_param("input", "'input' must be a string, a list of strings, or token id lists, and not empty.",
                        "invalid_type")
    if len(value) > max_inputs:
        raise bad_param("input", f"'input' may hold at most {max_inputs} items, got {len(value)}.")
    inputs: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            inputs.append(item)
        elif isinstance(item, list) and item and all(_is_int(t) and t >= 0 for t in item):
            inputs.append(tuple(item))
        else:
            raise bad_param("input", f"input[{i}] must be a non-empty string or a non-empty list of token ids.",
                            "invalid_type" if not isinstance(item, (str, list)) else "invalid_value")
    return EmbeddingRequest(EmbeddingSpec(tuple(inputs), fmt), model)


# ---- responses -------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_body(rid: str, created: int, model: str, text: str, finish_reason: str,
              prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


class ChunkWriter:
    """Builds the SSE chunks of one streamed completion or chat completion."""

    def __init__(self, chat: bool, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, choice: dict[str, Any] | None, usage_: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice is not None else [],
        }
        if self.include_usage:
            body["usage"] = usage_
        return sse(body)

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> bytes | None:
        """The chat stream opens with the assistant role; a completion stream has no opening chunk."""
        return self._chunk(self._choice("", None, role=True)) if self.chat else None

    def delta(self, text: str) -> bytes:
        return self._chunk(self._choice(text, None))

    def finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        closing = self._chunk(self._choice(None if self.chat else "", finish_reason))
        if self.include_usage:
            closing += self._chunk(None, usage(prompt_tokens, completion_tokens))
        return closing + DONE


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def sse_error(body: dict[str, Any]) -> bytes:
    """An error after the stream started: OpenAI sends it as a data event; then the stream ends."""
    return sse(body) + DONE


DONE = b"data: [DONE]\n\n"
