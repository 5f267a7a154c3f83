"""What a request is estimated to cost before it runs and what its answer says it used, in tokens.

The estimate is read from the request body (OpenAI's shapes): prompt characters / 4 for the input,
`max_completion_tokens`, `max_tokens` or `max_output_tokens` for the output, else DEFAULT_OUTPUT for a
generation. What was used is the answer's `usage` (a JSON body, or the SSE chunk a client gets with
`stream_options.include_usage`), else, for a stream, its content chunks counted (one token each, as
engines stream). `AnswerMeter` reads the answer's bytes as they go to the client.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

DEFAULT_OUTPUT = 256  # tokens an answer is expected to take when the request names no maximum
CHARS_PER_TOKEN = 4
JSON_LIMIT = 4 * 1024 * 1024  # a non-stream answer larger than this is not parsed (settled at the estimate)
LINE_LIMIT = 1024 * 1024  # an SSE line longer than this is skipped
_MAX_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_PROMPT_KEYS = ("messages", "prompt", "input")
_DECODER = json.JSONDecoder()
_SCAN = _DECODER.scan_once  # (obj, end) of the JSON value at an index; StopIteration where there is none
_WS = json.decoder.WHITESPACE.match
_USAGE_KEY = b'"usage"'
_USAGE_AT = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*')
# the usual `usage` of an OpenAI-shaped answer, read without parsing it: its first two counts
_WSP = rb"[ \t\r\n]*"
_COUNT = rb"(0|[1-9][0-9]{0,17})"
_USAGE_USUAL = re.compile(rb'"usage"' + _WSP + b":" + _WSP + rb"\{" + _WSP + b'"prompt_tokens"' + _WSP + b":" + _WSP
                          + _COUNT + _WSP + b"," + _WSP + b'"completion_tokens"' + _WSP + b":" + _WSP + _COUNT
                          + _WSP + b"[,}]")


class Estimate(NamedTuple):
    """A request's expected tokens (input, output) and the model its body names. (A NamedTuple: a frozen
    dataclass costs ~1 us to make, on every request.)"""

    input: int
    output: int
    model: str | None


def _chars(v: Any) -> int:
    """Characters of prompt text in an OpenAI field (a string, parts, messages, or lists of them).
    A list of ints is a prompt already in tokens: counted as CHARS_PER_TOKEN characters each."""
    if type(v) is str:
        return len(v)
    if type(v) is list:
        n = 0
        for x in v:
            if type(x) is dict:  # (the usual message, counted here: a call less each)
                c = x.get("content")
                if type(c) is str and "text" not in x:
                    n += len(c)
                    continue
            n += _chars(x)
        return n
    if type(v) is dict:  # a message {role, content} or a content part {type: text, text}
        c, t = v.get("content"), v.get("text")
        return (len(c) if type(c) is str else _chars(c) if c is not None else 0) + (_chars(t) if t is not None else 0)
    if type(v) is int:
        return CHARS_PER_TOKEN
    return 0


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


_UNPARSED: Any = object()


def estimate(body: bytes | None, content_length: int | None, path: str, document: Any = _UNPARSED) -> Estimate:
    """The estimate of a request. `body` None: streamed through unread (too large to hold), estimated
    from its length. A body that is not a JSON object is input only (its length / 4). `document`: the body
    already parsed by json_document (Call.document), when it was."""
    if body is None:
        return Estimate(_tokens(content_length or 0), DEFAULT_OUTPUT, None)
    if not body:
        return Estimate(0, 0, None)
    data = json_document(body) if document is _UNPARSED else document
    if type(data) is not dict:
        return Estimate(_tokens(len(body)), 0, None)
    prompt = 0
    for k in _PROMPT_KEYS:
        v = data.get(k)
        if v is not None:
            prompt += _chars(v)
    for k in _MAX_KEYS:
        v = data.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            output = v
            break
    else:
        generates = "messages" in data or "prompt" in data or ("input" in data and not path.endswith("/embeddings"))
        output = DEFAULT_OUTPUT if generates else 0
    model = data.get("model")
    return Estimate(_tokens(prompt), output, model if isinstance(model, str) else None)


def json_document(raw: bytes) -> Any:
    """A UTF-8 JSON document (RFC 8259 allows no other encoding between systems), or None. (The C scanner
    called directly, as JSONDecoder.decode does through two Python frames: this runs on every request.)"""
    try:
        text = raw.decode("utf-8")
        obj, end = _SCAN(text, 0 if text[:1] == "{" else _WS(text, 0).end())
    except (ValueError, RecursionError, StopIteration):  # (UnicodeDecodeError is a ValueError)
        return None
    if end != len(text) and _WS(text, end).end() != len(text):
        return None  # more after the document
    return obj


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def usage_of(obj: Any) -> tuple[int, int] | None:
    """(input, output) tokens from an answer object's `usage` (chat/completions/embeddings names, the
    Responses API's names, or a Responses event's `response.usage`); None without one."""
    if type(obj) is not dict:
        return None
    u = obj.get("usage")
    if type(u) is not dict:
        r = obj.get("response")
        u = r.get("usage") if type(r) is dict else None
        if type(u) is not dict:
            return None
    inp = u.get("prompt_tokens")
    if type(inp) is not int or inp < 0:
        inp = _count(u.get("input_tokens"))
    out = u.get("completion_tokens")
    if type(out) is not int or out < 0:
        out = _count(u.get("output_tokens"))
    if inp is None and out is None:
        return None
    return inp or 0, out or 0


def _usage_at_end(body: bytes) -> tuple[int, int] | None:
    """The `usage` object of a JSON answer read alone, from its last `"usage":` key on (OpenAI puts it
    last): an answer's generated text is not parsed. None when that does not find one."""
    i = body.rfind(_USAGE_KEY)
    if i <= 0 or body[i - 1] == 0x5C:  # (a backslash: an escaped quote inside a string, not a key)
        return None
    m = _USAGE_USUAL.match(body, i)
    if m is not None:
        return int(m[1]), int(m[2])
    m = _USAGE_AT.match(body, i)
    if m is None:
        return None
    j = m.end()
    try:
        obj, _ = _SCAN(body[j:j + 4096].decode("utf-8", "replace"), 0)
    except (ValueError, RecursionError, StopIteration):
        return None
    return usage_of({"usage": obj})


def json_usage(body: bytes) -> tuple[int, int] | None:
    """(input, output) tokens from a whole JSON answer's `usage` (read from its end, else parsed), or None
    (none, or the answer is over JSON_LIMIT)."""
    if len(body) > JSON_LIMIT:
        return None
    u = _usage_at_end(body)
    return u if u is not None else usage_of(json_document(body))


def _content_chunk(obj: dict) -> bool:
    """Whether a streamed chunk carries generated text (chat delta, completion text, Responses delta)."""
    choices = obj.get("choices")
    if isinstance(choices, list):
        for c in choices:
            if not isinstance(c, dict):
                continue
            d = c.get("delta")
            if isinstance(d, dict) and (d.get("content") or d.get("reasoning_content") or d.get("tool_calls")):
                return True
            if c.get("text"):
                return True
        return False
    return obj.get("type") == "response.output_text.delta" and bool(obj.get("delta"))


class AnswerMeter:
    """Reads one answer's body as it is sent: `usage` once found, else the content chunks of a stream."""

    __slots__ = ("sse", "json", "parts", "size", "partial", "usage", "chunks")

    def __init__(self, content_type: bytes) -> None:
        self.sse = content_type.startswith(b"text/event-stream")
        self.json = not self.sse and b"json" in content_type
        self.parts: list[bytes] = []
        self.size = 0
        self.partial = b""
        self.usage: tuple[int, int] | None = None
        self.chunks = 0  # SSE chunks with generated text

    def feed(self, data: bytes) -> None:
        """The next bytes of the answer body, in order."""
        if self.sse:
            self._lines(data)
        elif self.json and self.size <= JSON_LIMIT:
            self.size += len(data)
            self.parts.append(data)

    def _lines(self, data: bytes) -> None:
        buf = self.partial + data if self.partial else data
        lines = buf.split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > LINE_LIMIT:
            self.partial = b""
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            obj = json_document(line[5:])
            if type(obj) is not dict:
                continue  # [DONE], or not JSON
            u = usage_of(obj)
            if u is not None:
                self.usage = u
            elif _content_chunk(obj):
                self.chunks += 1

    def result(self) -> tuple[int, int] | None:
        """The answer's usage (input, output) if it said; else None (see `chunks` for a stream)."""
        if self.json and self.parts and self.usage is None and self.size <= JSON_LIMIT:
            body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            self.parts = []
            self.usage = json_usage(body)
        return self.usage
