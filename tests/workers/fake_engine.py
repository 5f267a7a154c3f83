"""A fake LLM engine that caches prompt prefixes as vLLM's automatic prefix caching does: the worker of the
routing tests and bench/bench_routing.py.

Run as ``python tests/workers/fake_engine.py --socket PATH [options]``. Each option also reads the env var
``FAKE_ENGINE_<NAME>`` (``--cache-blocks`` <- ``FAKE_ENGINE_CACHE_BLOCKS``); a flag beats the env. The socket
falls back to ``FAKE_ENGINE_SOCKET`` and then ``GPU_SUPERVISOR_SOCKET``. Only aiohttp and the standard library
are imported, so it starts fast.

The prompt is rendered as supervisor.routing.affinity.prompt_text renders it and counted as one token per
4 UTF-8 bytes. The cache holds blocks of 16 tokens (64 bytes), each hash chained over the blocks before it,
least recently used dropped first; a request is served `--base-ms` + `--ms-per-uncached-token` per token
its leading cached blocks did not cover, at most `--max-running` at once (the rest wait, as vLLM's waiting
queue). Serves OpenAI's chat and text completions (SSE with "stream": true), /metrics with vLLM's names,
/health and /v1/models.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import itertools
import json
import math
import os
import signal
import stat
import sys
import time

from aiohttp import web

PID = os.getpid()
BYTES_PER_TOKEN = 4
BLOCK_TOKENS = 16
BLOCK_BYTES = BLOCK_TOKENS * BYTES_PER_TOKEN
COMPLETION_TOKENS = 8
REPLY_TOKEN = "ok "  # the completion is COMPLETION_TOKENS of these
SHUTDOWN_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class Options:
    socket: str
    model: str
    cache_blocks: int
    base_ms: float
    ms_per_uncached_token: float
    max_running: int


def log(event: str, **fields: object) -> None:
    """One event line on stderr, fields as key=value."""
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    print(f"fake_engine event={event} pid={PID}{extra}", file=sys.stderr, flush=True)


# --- the prompt (a copy of supervisor.routing.affinity's rule: this worker must not import supervisor) -------

def _text_of(content: object) -> str:
    """A message's content as text: a string, or the "text" fields of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_text(body: object) -> str | None:
    """`prompt` (a string, or a list of strings joined by "\\n"), else `messages` rendered "role\\ncontent\\n"
    each, in order; None when the body has neither."""
    if not isinstance(body, dict):
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        parts.append(f"{role if isinstance(role, str) else ''}\n{_text_of(message.get('content'))}\n")
    return "".join(parts)


def count_tokens(raw: bytes) -> int:
    """Tokens of a UTF-8 prompt: one per 4 bytes, rounded up."""
    return math.ceil(len(raw) / BYTES_PER_TOKEN)


def block_hashes(raw: bytes) -> list[bytes]:
    """Chain hashes of the prompt's full 64-byte blocks: block i's hash covers blocks 0..i."""
    hashes: list[bytes] = []
    previous = b""
    for start in range(0, len(raw) - BLOCK_BYTES + 1, BLOCK_BYTES):
        previous = hashlib.blake2b(previous + raw[start:start + BLOCK_BYTES], digest_size=16).digest()
        hashes.append(previous)
    return hashes


class PrefixCache:
    """The KV blocks an engine keeps after requests end, by chain hash, least recently used first.

    A request's blocks are touched from its last to its first, so a prompt's tail is evicted before its head
    (vLLM frees a request's blocks in reverse order for the same reason).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def cached_tokens(self, hashes: list[bytes], prompt_tokens: int) -> int:
        """Tokens covered by the prompt's leading blocks held here. As in vLLM, the last token is always
        computed, so a prompt held whole still computes its last block."""
        usable = (prompt_tokens - 1) // BLOCK_TOKENS if prompt_tokens else 0
        held = 0
        for h in hashes[:usable]:
            if h not in self._blocks:
                break
            held += 1
        return held * BLOCK_TOKENS

    def insert(self, hashes: list[bytes]) -> None:
        """Hold every block of a finished request as the most recent, then drop the least recent past capacity."""
        for h in reversed(hashes):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


@dataclasses.dataclass(frozen=True)
class Served:
    """What serving one prompt took: the facts its answer reports."""

    prompt_tokens: int
    cached_tokens: int
    service_ms: float


class Engine:
    """The scheduler and the cache of one fake engine: slots, waiting and running counts, prefix counters."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.cache = PrefixCache(opts.cache_blocks)
        self._slots = asyncio.Semaphore(opts.max_running)
        self.waiting = 0
        self.running = 0
        self.queried_tokens = 0
        self.hit_tokens = 0

    async def serve(self, prompt: str) -> Served:
        """Wait for a slot, look the prompt up, take the service time, then cache all its blocks."""
        raw = prompt.encode("utf-8", "surrogatepass")
        tokens = count_tokens(raw)
        hashes = block_hashes(raw)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            cached = self.cache.cached_tokens(hashes, tokens)
            self.queried_tokens += tokens
            self.hit_tokens += cached
            service_ms = self.opts.base_ms + self.opts.ms_per_uncached_token * (tokens - cached)
            await asyncio.sleep(service_ms / 1000)
            self.cache.insert(hashes)
        finally:
            self.running -= 1
            self._slots.release()
        return Served(tokens, cached, service_ms)

    def usage(self) -> float:
        """KV cache usage, 0..1: blocks held over capacity."""
        return len(self.cache) / self.opts.cache_blocks


ENGINE = web.AppKey("engine", Engine)
IDS = web.AppKey("ids", itertools.count)


# --- handlers ----------------------------------------------------------------------------------------------

def _error(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    """An OpenAI-shaped error answer."""
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}},
                             status=status)


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def models(request: web.Request) -> web.Response:
    name = request.app[ENGINE].opts.model
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "fake_engine"}]})


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text with vLLM's names, each labelled with model_name."""
    engine = request.app[ENGINE]
    labels = f'{{model_name="{_label(engine.opts.model)}"}}'
    rows = (
        ("vllm:num_requests_waiting", "gauge", "Requests waiting to be processed.", engine.waiting),
        ("vllm:num_requests_running", "gauge", "Requests running on the engine.", engine.running),
        ("vllm:kv_cache_usage_perc", "gauge", "KV cache usage; 1 means 100 percent usage.", engine.usage()),
        ("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in tokens.", engine.queried_tokens),
        ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in tokens.", engine.hit_tokens),
    )
    text = "".join(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n{name}{labels} {float(value)}\n"
                   for name, kind, doc, value in rows)
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@dataclasses.dataclass(frozen=True)
class Call:
    """One completion request as the handlers see it: which API, its body, and what serving it took."""

    chat: bool
    body: dict
    served: Served
    completion_id: str
    created: int

    @property
    def model(self) -> str:
        return str(self.body["model"])

    def usage(self) -> dict:
        return {"prompt_tokens": self.served.prompt_tokens, "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": self.served.prompt_tokens + COMPLETION_TOKENS,
                "prompt_tokens_details": {"cached_tokens": self.served.cached_tokens}}

    def headers(self) -> dict[str, str]:
        return {"X-Cached-Tokens": str(self.served.cached_tokens), "X-Engine-Id": str(PID),
                "X-Service-Ms": f"{self.served.service_ms:.3f}"}

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.completion_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def answer(self) -> dict:
        text = REPLY_TOKEN * COMPLETION_TOKENS
        choice: dict = {"index": 0, "finish_reason": "stop", "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self._envelope([choice], chunk=False), "usage": self.usage()}

    def chunks(self) -> list[dict]:
        """The SSE events: one per completion token, the last with finish_reason; then usage when asked."""
        out = []
        for k in range(COMPLETION_TOKENS):
            finish = "stop" if k == COMPLETION_TOKENS - 1 else None
            if self.chat:
                delta: dict = {"content": REPLY_TOKEN}
                if k == 0:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": REPLY_TOKEN, "finish_reason": finish, "logprobs": None}
            out.append(self._envelope([choice], chunk=True))
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            out.append({**self._envelope([], chunk=True), "usage": self.usage()})
        return out


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body is not JSON", "invalid_request_error")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object", "invalid_request_error")
    model = body.setdefault("model", engine.opts.model)
    if model != engine.opts.model:
        return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model_not_found")
    if chat and not isinstance(body.get("messages"), list):
        return _error(400, "messages: a list is required", "invalid_request_error")
    # a completion's prompt is `prompt` alone; where it is valid, prompt_text(body) renders the same
    prompt = prompt_text(body if chat else {"prompt": body.get("prompt")})
    if prompt is None:
        return _error(400, "prompt: a string or a list of strings is required", "invalid_request_error")
    served = await engine.serve(prompt)
    prefix = "chatcmpl" if chat else "cmpl"
    call = Call(chat, body, served, f"{prefix}-{PID}-{next(request.app[IDS])}", int(time.time()))
    if not body.get("stream"):
        return web.json_response(call.answer(), headers=call.headers())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       **call.headers()})
    await resp.prepare(request)
    for chunk in call.chunks():
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


def make_app(opts: Options) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app[ENGINE] = Engine(opts)
    app[IDS] = itertools.count(1)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/v1/models", models)
    r.add_get("/metrics", metrics)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/completions", completions)
    return app


# --- process -----------------------------------------------------------------------------------------------

def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"fake_engine: {path} exists and is not a socket")
    os.unlink(path)


async def serve(opts: Options) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(make_app(opts), handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S, handler_cancellation=True)
    await runner.setup()
    inode = None
    try:
        _remove_stale_socket(opts.socket)
        await web.UnixSite(runner, opts.socket).start()
        inode = os.stat(opts.socket).st_ino
        log("listening", socket=opts.socket, model=opts.model, cache_blocks=opts.cache_blocks)
        await stop.wait()
    finally:
        try:
            await asyncio.wait_for(runner.cleanup(), SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log("shutdown_timeout", timeout_s=SHUTDOWN_TIMEOUT_S)
        # Unlink only our own socket: a successor may already have bound a new one at this path.
        try:
            if inode is not None and os.stat(opts.socket).st_ino == inode:
                os.unlink(opts.socket)
        except FileNotFoundError:
            pass
    log("stopped")
    return 0


def _env(name: str) -> str | None:
    value = os.environ.get(f"FAKE_ENGINE_{name}")
    return value if value not in (None, "") else None


def _env_num(name: str, kind: type[int] | type[float], default: float) -> float:
    value = _env(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"fake_engine: FAKE_ENGINE_{name}={value!r} is not a {kind.__name__}") from None


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="fake_engine", description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=_env("SOCKET") or os.environ.get("GPU_SUPERVISOR_SOCKET"),
                   help="Unix socket path (env FAKE_ENGINE_SOCKET, then GPU_SUPERVISOR_SOCKET)")
    p.add_argument("--model", default=_env("MODEL") or "fake-chat", help="the one model name it serves")
    p.add_argument("--cache-blocks", type=int, default=_env_num("CACHE_BLOCKS", int, 2048),
                   help="prefix cache capacity in blocks of 16 tokens")
    p.add_argument("--base-ms", type=float, default=_env_num("BASE_MS", float, 5.0),
                   help="service time of every request, ms")
    p.add_argument("--ms-per-uncached-token", type=float, default=_env_num("MS_PER_UNCACHED_TOKEN", float, 0.05),
                   help="service time per prompt token not found in the cache, ms")
    p.add_argument("--max-running", type=int, default=_env_num("MAX_RUNNING", int, 4),
                   help="requests served at once; the rest wait")
    ns = p.parse_args(argv)
    if not ns.socket:
        p.error("--socket is required (or env FAKE_ENGINE_SOCKET / GPU_SUPERVISOR_SOCKET)")
    if ns.cache_blocks < 1 or ns.max_running < 1:
        p.error("--cache-blocks and --max-running must be at least 1")
    if ns.base_ms < 0 or ns.ms_per_uncached_token < 0:
        p.error("--base-ms and --ms-per-uncached-token must be >= 0")
    return Options(**vars(ns))


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
