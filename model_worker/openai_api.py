"""The OpenAI wire format of answers: response bodies, SSE chunk shapes and error bodies (requests: validation.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any


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


# ---- responses -------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, fingerprint: str) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_body(rid: str, created: int, model: str, text: str, finish_reason: str,
              prompt_tokens: int, completion_tokens: int, fingerprint: str) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


class ChunkWriter:
    """Builds the SSE chunks of one streamed completion or chat completion."""

    def __init__(self, chat: bool, model: str, include_usage: bool, fingerprint: str) -> None:
        self.chat = chat
        self.fingerprint = fingerprint
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
            "system_fingerprint": self.fingerprint,
            "choices": [choice] if choice is not None else [],
        }
        if self.include_usage:
            body["usage"] = usage_
        return sse(body)

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:  # the opening chunk, as OpenAI's: {"role": "assistant", "content": "", "refusal": null}
                delta["role"] = "assistant"
                delta["refusal"] = None
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
