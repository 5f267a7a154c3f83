"""Request validation: an OpenAI request body in, a spec out, or a 400 in OpenAI's shape naming the parameter.

Every parameter of OpenAI's published request schemas is decided here, one of three ways, and any other
name is refused:

- honoured: validated (type, range) and acted on;
- harmless: validated and accepted, with no effect on the answer (an end-user id, a cache key);
- default only: accepted only at values that change nothing (null always counts); any other value is
  a 400 with code `unsupported_value` saying this worker does not support it, instead of being ignored;
- anything else (a name not in the schema, a vLLM extension other than the two below): a 400 with code
  `unknown_parameter`.

POST /v1/chat/completions
    honoured      model, messages, max_completion_tokens, max_tokens (one of the two, or both equal),
                  temperature, top_p, seed, stop, stream, stream_options.include_usage, n (1 only),
                  min_tokens and ignore_eos (vLLM's extensions)
    harmless      user, safety_identifier, prompt_cache_key, prompt_cache_retention, prompt_cache_options,
                  metadata, parallel_tool_calls, stream_options.include_obfuscation (there is no cache
                  and nothing is stored; an end-user id changes nothing)
    default only  response_format {"type": "text"}, tools [], tool_choice "none" | "auto" (there are no
                  tools), functions [], function_call "none" | "auto", logit_bias {}, logprobs false,
                  top_logprobs (null only), presence_penalty 0, frequency_penalty 0, modalities ["text"],
                  audio, prediction, reasoning_effort, verbosity, web_search_options, moderation
                  (null only), service_tier "auto" | "default", store false
    messages[i]   role system | developer | user | assistant | tool ("function" is not supported);
                  content a string or a list of {"type": "text", "text"} parts, prompt_cache_breakpoint
                  harmless (image_url, input_audio, file and refusal parts are not supported); assistant
                  content may be null; a tool message needs tool_call_id (a string); assistant tool_calls []
                  and refusal, function_call, audio null only; `name` is not supported (the chat template
                  has no place for it)
POST /v1/completions
    honoured      model, prompt (a string, a list of token ids, or a list holding one of those),
                  max_tokens, temperature, top_p, seed, stop, stream, stream_options.include_usage,
                  n (1 only), min_tokens, ignore_eos
    harmless      user, stream_options.include_obfuscation
    default only  echo false, best_of 1, logprobs (null only), suffix "" , logit_bias {},
                  presence_penalty 0, frequency_penalty 0
POST /v1/embeddings
    honoured      model, input (a non-empty string, a list of them, a list of token ids, or a list of
                  those lists), encoding_format float | base64, dimensions (the model's own only)
    harmless      user
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from model_worker.inference import EmbeddingSpec, GenerationSpec
from model_worker.openai_api import ApiError

MAX_STOP_SEQUENCES = 4
INT64 = (-(2**63), 2**63 - 1)
JSON_CONTENT_TYPES = ("application/json",)


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


# ---- errors ----------------------------------------------------------------------------------

def bad_param(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _unsupported(param: str, value: Any, why: str, accepted: str = "") -> ApiError:
    tail = f" Accepted here: {accepted}." if accepted else ""
    return ApiError(400, f"'{param}'={show(value)} is not supported by this worker: {why}.{tail}",
                    param=param, code="unsupported_value")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def show(value: Any, depth: int = 0) -> str:
    """A short JSON-like rendering of any parsed JSON value, bounded in depth and length."""
    if isinstance(value, dict):
        if depth >= 2:
            return "{...}" if value else "{}"
        items = [f"{_short_str(str(k))}: {show(v, depth + 1)}" for k, v in list(value.items())[:4]]
        return "{" + ", ".join(items) + (", ..." if len(value) > 4 else "") + "}"
    if isinstance(value, list):
        if depth >= 2:
            return "[...]" if value else "[]"
        items = [show(v, depth + 1) for v in value[:4]]
        return "[" + ", ".join(items) + (", ..." if len(value) > 4 else "") + "]"
    if isinstance(value, str):
        return _short_str(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        digits = str(abs(value))
        return str(value) if len(digits) <= 24 else f"{'-' if value < 0 else ''}{digits[:8]}...({len(digits)} digits)"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else {"nan": "NaN", "inf": "Infinity"}.get(repr(value), "-Infinity")
    return type(value).__name__


def _short_str(text: str) -> str:
    cut = text[:40]
    return json.dumps(cut) + ("..." if len(text) > 40 else "")


def _type_error(param: str, expected: str, value: Any) -> ApiError:
    return bad_param(param, f"'{param}' must be {expected}, got {_json_type(value)} {show(value)}.", "invalid_type")


# ---- values ----------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def text(value: Any, param: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _type_error(param, "a string", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_param(param, f"'{param}' holds a lone surrogate ({exc.reason}); it must be valid Unicode.") from exc
    if not allow_empty and not value:
        raise bad_param(param, f"'{param}' must not be empty.")
    return value


def integer(value: Any, param: str, lo: int | None = None, hi: int | None = None) -> int:
    if not _is_int(value):
        raise _type_error(param, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "")
                              if b)
        raise bad_param(param, f"'{param}' must be {bounds}, got {show(value)}.")
    return value


def number(value: Any, param: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    bounds = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(param, f"a number in {bounds}", value)
    # Compare before converting: an integer with hundreds of digits does not fit a float.
    if (isinstance(value, float) and not math.isfinite(value)) or value < lo or value > hi or (lo_open and value == lo):
        raise bad_param(param, f"'{param}' must be in {bounds}, got {show(value)}.")
    return float(value)


def boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(param, "a boolean", value)
    return value


def obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _type_error(param, "an object", value)
    return value


def _string_map(value: Any, param: str) -> dict[str, str]:
    for key, item in obj(value, param).items():
        text(key, f"{param}.{key}")
        text(item, f"{param}.{key}")
    return value


def _same(value: Any, allowed: Any) -> bool:
    """JSON equality that tells booleans from numbers; recursion is bounded by `allowed`'s (small) depth."""
    if isinstance(allowed, bool) or isinstance(value, bool):
        return type(value) is type(allowed) and value == allowed
    if isinstance(allowed, (int, float)):
        return isinstance(value, (int, float)) and value == allowed
    if isinstance(allowed, dict):
        return (isinstance(value, dict) and value.keys() == allowed.keys()
                and all(_same(value[k], allowed[k]) for k in allowed))
    if isinstance(allowed, list):
        return (isinstance(value, list) and len(value) == len(allowed)
                and all(_same(v, a) for v, a in zip(value, allowed)))
    return type(value) is type(allowed) and value == allowed


# ---- the parameter tables ----------------------------------------------------------------------

Check = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class DefaultOnly:
    """A parameter this worker does not honour: accepted at the values that change nothing, else a 400."""

    allowed: tuple[Any, ...]
    why: str

    def check(self, value: Any, param: str) -> None:
        if not any(_same(value, a) for a in self.allowed):
            accepted = " or ".join(["null", *(json.dumps(a) for a in self.allowed)])
            raise _unsupported(param, value, self.why, accepted)


HARMLESS: dict[str, Check] = {
    "user": text,
    "safety_identifier": text,
    "prompt_cache_key": text,
    "prompt_cache_retention": text,
    "prompt_cache_options": obj,
    "metadata": _string_map,
    "parallel_tool_calls": boolean,
}

_PENALTIES = {
    "presence_penalty": DefaultOnly((0,), "penalties are not applied"),
    "frequency_penalty": DefaultOnly((0,), "penalties are not applied"),
    "logit_bias": DefaultOnly(({},), "token biases are not applied"),
}
_NO_TOOLS = "tool and function calling are not supported"

CHAT_DEFAULT_ONLY: dict[str, DefaultOnly] = {
    **_PENALTIES,
    "logprobs": DefaultOnly((False,), "log probabilities are not returned"),
    "top_logprobs": DefaultOnly((), "log probabilities are not returned"),
    "response_format": DefaultOnly(({"type": "text"},), "the output is plain text; JSON mode and JSON schemas "
                                                         "are not enforced"),
    "tools": DefaultOnly(([],), _NO_TOOLS),
    "tool_choice": DefaultOnly(("none", "auto"), _NO_TOOLS),
    "functions": DefaultOnly(([],), _NO_TOOLS),
    "function_call": DefaultOnly(("none", "auto"), _NO_TOOLS),
    "modalities": DefaultOnly((["text"],), "the output is text only"),
    "audio": DefaultOnly((), "the output is text only"),
    "prediction": DefaultOnly((), "predicted outputs are not used"),
    "reasoning_effort": DefaultOnly((), "this model has no reasoning mode"),
    "verbosity": DefaultOnly((), "this model has no verbosity setting"),
    "web_search_options": DefaultOnly((), "there is no web search"),
    "moderation": DefaultOnly((), "no moderation is run"),
    "service_tier": DefaultOnly(("auto", "default"), "there is one service tier"),
    "store": DefaultOnly((False,), "answers are not stored"),
}

COMPLETION_DEFAULT_ONLY: dict[str, DefaultOnly] = {
    **_PENALTIES,
    "echo": DefaultOnly((False,), "the prompt is not echoed"),
    "best_of": DefaultOnly((1,), "one candidate is generated"),
    "logprobs": DefaultOnly((), "log probabilities are not returned"),
    "suffix": DefaultOnly(("",), "insertion is not supported"),
}

_GENERATION_HONOURED = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                        "n", "min_tokens", "ignore_eos")
CHAT_PARAMS = frozenset((*_GENERATION_HONOURED, "messages", "max_completion_tokens", *HARMLESS, *CHAT_DEFAULT_ONLY))
COMPLETION_PARAMS = frozenset((*_GENERATION_HONOURED, "prompt", "user", *COMPLETION_DEFAULT_ONLY))
EMBEDDING_PARAMS = frozenset(("model", "input", "encoding_format", "dimensions", "user"))


def _known(body: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for name in body:
        if name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {show(name)}; {where} does not take it.",
                           param=name, code="unknown_parameter")


def _policies(body: Mapping[str, Any], harmless: Mapping[str, Check], default_only: Mapping[str, DefaultOnly],
              prefix: str = "") -> None:
    """Check the harmless and the default-only parameters of `body` (`prefix` names where it sits)."""
    for name, value in body.items():
        if value is None:
            continue
        if name in harmless:
            harmless[name](value, prefix + name)
        elif name in default_only:
            default_only[name].check(value, prefix + name)


# ---- the JSON body -----------------------------------------------------------------------------

def parse_json_object(raw: bytes, content_type: str | None = None) -> dict[str, Any]:
    """The request body as a JSON object; `content_type` is the raw header (absent: assumed JSON)."""
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media not in JSON_CONTENT_TYPES and not (media.startswith("application/") and media.endswith("+json")):
            raise ApiError(400, f"Unsupported Content-Type {show(content_type)}: send the body as application/json.",
                           code="invalid_content_type")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"The request body is not valid UTF-8 ({exc.reason} at byte {exc.start}).",
                       code="invalid_json") from exc
    except RecursionError as exc:
        raise ApiError(400, "The JSON body is nested too deeply.", code="invalid_json") from exc
    except ValueError as exc:  # JSONDecodeError, and integers past Python's digit limit
        detail = "the body is empty" if not raw.strip() else str(exc)
        raise ApiError(400, f"We could not parse the JSON body of your request: {detail}. "
                            "The body must be a JSON object.", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {_json_type(body)}.", code="invalid_json")
    return body


# ---- shared generation parameters ---------------------------------------------------------------

def _model(body: Mapping[str, Any], served: tuple[str, ...]) -> str:
    model = body.get("model")
    if model is None:
        return served[0]  # lenient: a single-model worker needs no name
    text(model, "model")
    if model not in served:
        raise ApiError(404, f"The model {show(model)} does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return model


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _type_error("stop", "a string or a list of strings", value)
    if len(items) > MAX_STOP_SEQUENCES:
        raise bad_param("stop", f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}.")
    for s in items:
        if not isinstance(s, str):
            raise _type_error("stop", "a string or a list of strings", value)
        text(s, "stop", allow_empty=False)
    return tuple(dict.fromkeys(items))


def _stream_options(value: Any, stream: bool) -> bool:
    """The `include_usage` flag."""
    if value is None:
        return False
    obj(value, "stream_options")
    if not stream:
        raise bad_param("stream_options", "'stream_options' is only allowed with 'stream': true.")
    for key, item in value.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise ApiError(400, f"Unrecognized argument stream_options.{key}.", param=f"stream_options.{key}",
                           code="unknown_parameter")
        if item is not None:
            boolean(item, f"stream_options.{key}")
    return value.get("include_usage") is True


def _max_tokens(body: Mapping[str, Any], limit: int, chat: bool) -> tuple[int | None, str]:
    """The completion budget and the name it came under."""
    given = {}
    for name in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        if body.get(name) is not None:
            given[name] = integer(body[name], name, 1, limit)
    if len(set(given.values())) > 1:
        raise bad_param("max_tokens", "Give 'max_completion_tokens' or 'max_tokens', not both with different values.")
    if not given:
        return None, "max_completion_tokens" if chat else "max_tokens"
    name, value = next(iter(given.items()))
    return value, name


def _generation(body: Mapping[str, Any], served: tuple[str, ...], limit: int, chat: bool,
                payload: Callable[[], tuple[Any, Any]]) -> GenerationRequest:
    model = _model(body, served)
    n = body.get("n")
    if n is not None and integer(n, "n", 1) != 1:
        raise _unsupported("n", n, "it returns one choice per request", "1")
    max_tokens, max_name = _max_tokens(body, limit, chat)
    min_tokens = 0 if body.get("min_tokens") is None else integer(body["min_tokens"], "min_tokens", 0, limit)
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_param("min_tokens", f"'min_tokens' ({min_tokens}) must not exceed '{max_name}' ({max_tokens}).")
    stream = body.get("stream") is not None and boolean(body["stream"], "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    temperature = 1.0 if body.get("temperature") is None else number(body["temperature"], "temperature", 0.0, 2.0)
    top_p = 1.0 if body.get("top_p") is None else number(body["top_p"], "top_p", 0.0, 1.0, lo_open=True)
    seed = None if body.get("seed") is None else integer(body["seed"], "seed", *INT64)
    ignore_eos = body.get("ignore_eos") is not None and boolean(body["ignore_eos"], "ignore_eos")
    stop = _stop(body.get("stop"))
    prompt, messages = payload()
    spec = GenerationSpec(prompt=prompt, messages=messages, max_tokens=max_tokens, min_tokens=min_tokens,
                          ignore_eos=ignore_eos, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
    return GenerationRequest(spec, model, stream, include_usage)


# ---- /v1/completions ----------------------------------------------------------------------------

def _token_ids(value: list[Any], param: str) -> tuple[int, ...]:
    for i, t in enumerate(value):
        if not _is_int(t) or t < 0:
            raise bad_param(param, f"'{param}' item {i} must be a token id (an integer >= 0), got {show(t)}.",
                            "invalid_type" if not _is_int(t) else "invalid_value")
    return tuple(value)


def _prompt(value: Any) -> str | tuple[int, ...]:
    if value is None:
        raise bad_param("prompt", "'prompt' is required.", "missing_required_parameter")
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        if len(value) > 1:
            raise _unsupported("prompt", value, "batches of several prompts are not supported",
                               "a string, a list of token ids, or a list holding one of those")
        value = value[0]
    if isinstance(value, str):
        return text(value, "prompt")
    if isinstance(value, list) and value:
        return _token_ids(value, "prompt")
    raise _type_error("prompt", "a string, a non-empty list of token ids, or a list holding one of those", value)


def parse_completion(body: dict[str, Any], served: tuple[str, ...], max_tokens_limit: int) -> GenerationRequest:
    """POST /v1/completions: see the module docstring for what each parameter gets."""
    _known(body, COMPLETION_PARAMS, "/v1/completions")
    _policies(body, {"user": text}, COMPLETION_DEFAULT_ONLY)
    return _generation(body, served, max_tokens_limit, chat=False,
                       payload=lambda: (_prompt(body.get("prompt")), None))


# ---- /v1/chat/completions -----------------------------------------------------------------------

ROLE_KEYS: dict[str, frozenset[str]] = {
    "system": frozenset(("role", "content", "name")),
    "developer": frozenset(("role", "content", "name")),
    "user": frozenset(("role", "content", "name")),
    "assistant": frozenset(("role", "content", "name", "refusal", "tool_calls", "function_call", "audio")),
    "tool": frozenset(("role", "content", "tool_call_id")),
}
CHAT_ROLES = frozenset(ROLE_KEYS)
PART_TYPES = {  # the content part types OpenAI's schema knows, per role
    "system": ("text",), "developer": ("text",), "tool": ("text",),
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
}
_ASSISTANT_DEFAULT_ONLY = {
    "tool_calls": DefaultOnly(([],), _NO_TOOLS),
    "function_call": DefaultOnly((), _NO_TOOLS),
    "refusal": DefaultOnly((), "earlier refusals cannot be rendered by the chat template"),
    "audio": DefaultOnly((), "the output is text only"),
    "name": DefaultOnly((), "the chat template has no place for a participant's name"),
}
_NAME_ONLY = {"name": _ASSISTANT_DEFAULT_ONLY["name"]}


def _content(value: Any, role: str, where: str) -> str:
    param = f"{where}.content"
    if value is None:
        if role == "assistant":
            return ""
        raise bad_param(param, f"'{param}' is required for a {role} message.", "missing_required_parameter")
    if isinstance(value, str):
        return text(value, param)
    if not isinstance(value, list):
        raise _type_error(param, "a string or a list of content parts", value)
    if not value:
        raise bad_param(param, f"'{param}' must not be an empty list.")
    parts = []
    for j, part in enumerate(value):
        at = f"{param}[{j}]"
        obj(part, at)
        kind = part.get("type")
        if kind != "text":
            if isinstance(kind, str) and kind in PART_TYPES[role]:
                raise _unsupported(f"{at}.type", kind, "it handles text parts only", '"text"')
            raise bad_param(f"{at}.type", f"'{at}.type' must be one of {list(PART_TYPES[role])} for a {role} "
                                          f"message, got {show(kind)}.")
        for key in part:
            if key == "prompt_cache_breakpoint":
                obj(part[key], f"{at}.{key}")  # harmless: there is no prompt cache
            elif key not in ("type", "text"):
                raise ApiError(400, f"Unrecognized argument {at}.{key} in a text part.", param=f"{at}.{key}",
                               code="unknown_parameter")
        parts.append(text(part.get("text"), f"{at}.text"))
    return "".join(parts)


def _message(i: int, message: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    obj(message, where)
    role = message.get("role")
    if role is None:
        raise bad_param(f"{where}.role", f"'{where}.role' is required.", "missing_required_parameter")
    text(role, f"{where}.role")
    if role == "function":
        raise _unsupported(f"{where}.role", role, _NO_TOOLS)
    if role not in CHAT_ROLES:
        raise bad_param(f"{where}.role", f"'{where}.role' must be one of {sorted(CHAT_ROLES)}, got {show(role)}.")
    for key in message:
        if key not in ROLE_KEYS[role]:
            raise ApiError(400, f"Unrecognized argument {where}.{key} for a {role} message.", param=f"{where}.{key}",
                           code="unknown_parameter")
    _policies(message, {}, _ASSISTANT_DEFAULT_ONLY if role == "assistant" else _NAME_ONLY, f"{where}.")
    if role == "tool":
        if message.get("tool_call_id") is None:
            raise bad_param(f"{where}.tool_call_id", f"'{where}.tool_call_id' is required for a tool message.",
                            "missing_required_parameter")
        text(message["tool_call_id"], f"{where}.tool_call_id")
    content = _content(message.get("content"), role, where)
    return {"role": "system" if role == "developer" else role, "content": content}


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if value is None:
        raise bad_param("messages", "'messages' is required.", "missing_required_parameter")
    if not isinstance(value, list):
        raise _type_error("messages", "a non-empty list of message objects", value)
    if not value:
        raise bad_param("messages", "'messages' must not be empty.")
    return tuple(_message(i, m) for i, m in enumerate(value))


def parse_chat(body: dict[str, Any], served: tuple[str, ...], max_tokens_limit: int) -> GenerationRequest:
    """POST /v1/chat/completions: see the module docstring for what each parameter gets."""
    _known(body, CHAT_PARAMS, "/v1/chat/completions")
    _policies(body, HARMLESS, CHAT_DEFAULT_ONLY)
    return _generation(body, served, max_tokens_limit, chat=True,
                       payload=lambda: (None, _messages(body.get("messages"))))


# ---- /v1/embeddings -----------------------------------------------------------------------------

def _embedding_inputs(value: Any, max_inputs: int) -> tuple[str | tuple[int, ...], ...]:
    expected = "a non-empty string, a list of them, a list of token ids, or a list of token id lists"
    if value is None:
        raise bad_param("input", "'input' is required.", "missing_required_parameter")
    if isinstance(value, str) or (isinstance(value, list) and value and not isinstance(value[0], (str, list))):
        value = [value]
    if not isinstance(value, list):
        raise _type_error("input", expected, value)
    if not value:
        raise bad_param("input", "'input' must not be empty.")
    if len(value) > max_inputs:
        raise bad_param("input", f"'input' may hold at most {max_inputs} items, got {len(value)}.")
    inputs: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise bad_param("input", f"input[{i}] must not be an empty string.")
            inputs.append(text(item, "input"))
        elif isinstance(item, list):
            if not item:
                raise bad_param("input", f"input[{i}] must not be an empty list of token ids.")
            inputs.append(_token_ids(item, "input"))
        else:
            raise _type_error("input", expected, item)
    return tuple(inputs)


def parse_embedding(body: dict[str, Any], served: tuple[str, ...], max_inputs: int,
                    dimensions: int) -> EmbeddingRequest:
    """POST /v1/embeddings: see the module docstring for what each parameter gets."""
    _known(body, EMBEDDING_PARAMS, "/v1/embeddings")
    _policies(body, {"user": text}, {})
    model = _model(body, served)
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    elif text(fmt, "encoding_format") not in ("float", "base64"):
        raise bad_param("encoding_format", f"'encoding_format' must be \"float\" or \"base64\", got {show(fmt)}.")
    dims = body.get("dimensions")
    if dims is not None and integer(dims, "dimensions", 1) != dimensions:
        raise _unsupported("dimensions", dims, f"this model's embeddings have {dimensions} dimensions and are not "
                                               "shortened", str(dimensions))
    inputs = _embedding_inputs(body.get("input"), max_inputs)
    return EmbeddingRequest(EmbeddingSpec(inputs, fmt), model)
