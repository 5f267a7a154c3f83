"""The HTTP surface: the aiohttp app, its routes, the inference thread's lifetime and the worker's counters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import structlog
from aiohttp import web

from model_worker import memory
from model_worker.inference import (
    Engine,
    Event,
    Failed,
    Finished,
    GenerationJob,
    GenerationSpec,
    InvalidRequest,
    TextDelta,
    WorkerOutOfMemory,
)
from model_worker.model_dir import MINILM_ALIASES
from model_worker.openai_api import ApiError, ChunkWriter, chat_body, completion_body, error_body, new_id, sse_error
from model_worker.settings import MINILM, WorkerSettings
from model_worker.sleep import SleepControl, parse_level
from model_worker.validation import (
    GenerationRequest,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_json_object,
)

log = structlog.get_logger("model_worker.app")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(slots=True)
class WorkerStats:
    """Counters; written only on the event loop (the inference thread reports through futures)."""

    started_monotonic: float = field(default_factory=time.monotonic)
    started_unix: int = field(default_factory=lambda: int(time.time()))
    requests_inflight: int = 0
    requests_rejected: int = 0
    generations_total: int = 0
    generations_cancelled: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    embeddings_total: int = 0
    oom_total: int = 0
    errors_total: int = 0

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("started")}


SETTINGS = web.AppKey("settings", WorkerSettings)
ENGINE = web.AppKey("engine", Engine)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
STATS = web.AppKey("stats", WorkerStats)
SERVED_NAMES = web.AppKey("served_names", tuple)
SLEEP = web.AppKey("sleep", SleepControl)


def served_names(settings: WorkerSettings) -> tuple[str, ...]:
    names = [settings.model_name, settings.model]
    if settings.model == MINILM:
        names.extend(MINILM_ALIASES)
    return tuple(dict.fromkeys(names))


def make_app(settings: WorkerSettings, engine: Engine) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[ENGINE] = engine
    app[STATS] = WorkerStats()
    app[SERVED_NAMES] = served_names(settings)
    app.cleanup_ctx.append(_inference_thread)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/memory", memory_figures)
    app.router.add_post("/cleanup", cleanup)
    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_get("/is_sleeping", is_sleeping)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


async def _inference_thread(app: web.Application) -> AsyncIterator[None]:
    """The one thread every forward pass (and every move of the weights) runs on, with the sleep
    control that moves them; shut down after the last request and move have finished."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    app[EXECUTOR] = executor
    app[SLEEP] = SleepControl(app[ENGINE], executor)
    yield
    await app[SLEEP].close()
    await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)


# ---- errors ----------------------------------------------------------------------------------

@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error leaves in OpenAI's shape; an unexpected one is logged with its traceback here."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:  # router 404/405, 413 from reading the body
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(
            error_body(exc.reason, type="invalid_request_error", code=exc.reason.lower().replace(" ", "_")),
            status=exc.status, headers=headers,
        )
    except Exception:
        request.app[STATS].errors_total += 1
        log.exception("request_failed", method=request.method, path=request.path)
        return web.json_response(
            error_body("The worker failed while processing the request.", type="server_error",
                       code="internal_error"),
            status=500,
        )


def _failure(app: web.Application, error: BaseException) -> ApiError:
    """Map an error raised on the inference thread to its answer."""
    if isinstance(error, InvalidRequest):
        return ApiError(400, str(error), param=error.param, code=error.code)
    if isinstance(error, WorkerOutOfMemory):
        app[STATS].oom_total += 1
        return ApiError(
            503, f"The worker ran out of GPU memory: {error}. Its cache was freed; retry, or send a smaller request.",
            type="server_error", code="out_of_memory",
            headers={"X-Worker-Error": "oom", "Retry-After": "1"},
        )
    raise error


@contextmanager
def _admitted(app: web.Application) -> Iterator[None]:
    """Bound the requests admitted at once (running plus waiting for the inference thread); none while asleep."""
    stats = app[STATS]
    with app[SLEEP].serving():
        if stats.requests_inflight >= app[SETTINGS].max_pending:
            stats.requests_rejected += 1
            raise ApiError(429, f"The worker already holds {stats.requests_inflight} requests; retry shortly.",
                           type="server_error", code="queue_full", headers={"Retry-After": "1"})
        stats.requests_inflight += 1
        try:
            yield
        finally:
            stats.requests_inflight -= 1


async def _json_body(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await request.read(), request.headers.get("Content-Type"))


def _require_task(app: web.Application, task: str, endpoint: str) -> None:
    loaded = app[ENGINE].loaded
    if loaded.task != task:
        other = "/v1/embeddings" if loaded.task == "embed" else "/v1/completions and /v1/chat/completions"
        raise ApiError(400, f"The model `{loaded.name}` serves task '{loaded.task}', so {endpoint} is not "
                            f"available; use {other}.", param="model", code="unsupported_task")


# ---- status endpoints ------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    app = request.app
    loaded = app[ENGINE].loaded
    stats = app[STATS]
    return web.json_response({
        "status": "ok",
        "model": loaded.name,
        "task": loaded.task,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "context_length": loaded.context_length,
        "system_fingerprint": loaded.fingerprint,
        "uptime_s": round(time.monotonic() - stats.started_monotonic, 3),
        "sleeping": app[SLEEP].sleeping,
        "sleep_level": app[SLEEP].level,
        **stats.counters(),
    })


async def memory_figures(request: web.Request) -> web.Response:
    device = str(request.app[ENGINE].loaded.device)
    return web.json_response(await asyncio.to_thread(memory.snapshot, device))


async def cleanup(request: web.Request) -> web.Response:
    device = str(request.app[ENGINE].loaded.device)
    figures = await asyncio.to_thread(memory.cleanup, device)
    log.info("cleanup", rss_before=figures["before"]["rss_bytes"], rss_after=figures["after"]["rss_bytes"])
    return web.json_response(figures)


# ---- sleep mode (vLLM's endpoints) -----------------------------------------------------------

async def sleep(request: web.Request) -> web.Response:
    level = parse_level(request.query.get("level"))
    return web.json_response(await request.app[SLEEP].sleep(level))


async def wake_up(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SLEEP].wake())


async def is_sleeping(request: web.Request) -> web.Response:
    return web.json_response(request.app[SLEEP].status())


def _model_card(app: web.Application, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": app[STATS].started_unix, "owned_by": "model_worker",
            "task": app[ENGINE].loaded.task}


async def list_models(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response({"object": "list", "data": [_model_card(app, app[SETTINGS].model_name)]})


async def get_model(request: web.Request) -> web.Response:
    app = request.app
    name = request.match_info["model"]
    if name not in app[SERVED_NAMES]:
        raise ApiError(404, f"The model `{name}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return web.json_response(_model_card(app, name))


# ---- generation ------------------------------------------------------------------------------

class _GenerationRun:
    """One generation on the inference thread, seen from the event loop as a queue of events."""

    def __init__(self, app: web.Application, spec: GenerationSpec, default_max_tokens: int) -> None:
        loop = asyncio.get_running_loop()
        # At most one delta per token plus a final flush and the end event: bounded by construction.
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=app[SETTINGS].max_tokens_limit + 4)
        self.job = GenerationJob(spec, default_max_tokens, partial(loop.call_soon_threadsafe, self._queue.put_nowait))
        future = loop.run_in_executor(app[EXECUTOR], app[ENGINE].run_generation, self.job)
        future.add_done_callback(partial(_generation_done, app[STATS]))

    async def next(self) -> Event:
        return await self._queue.get()

    def cancel(self) -> None:
        self.job.cancel.set()


def _generation_done(stats: WorkerStats, future: asyncio.Future[Finished | None]) -> None:
    """Runs on the event loop when the thread has really stopped: count it, log a cancellation."""
    if future.cancelled() or future.exception() is not None:
        return
    finished = future.result()
    if finished is None:
        return
    stats.generations_total += 1
    stats.prompt_tokens_total += finished.prompt_tokens
    stats.completion_tokens_total += finished.completion_tokens
    if finished.cancelled:
        stats.generations_cancelled += 1
        log.info("generation_cancelled", completion_tokens=finished.completion_tokens,
                 seconds=round(finished.seconds, 4))
    else:
        log.debug("generation_done", finish_reason=finished.finish_reason, prompt_tokens=finished.prompt_tokens,
                  completion_tokens=finished.completion_tokens, seconds=round(finished.seconds, 4))


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, chat=True)


async def _generation(request: web.Request, chat: bool) -> web.StreamResponse:
    app = request.app
    body = await _json_body(request)
    _require_task(app, "generate", request.path)
    settings = app[SETTINGS]
    parse = parse_chat if chat else parse_completion
    req = parse(body, app[SERVED_NAMES], settings.max_tokens_limit)
    default_max = settings.max_tokens_limit if chat else COMPLETION_DEFAULT_MAX_TOKENS
    with _admitted(app):
        run = _GenerationRun(app, req.spec, default_max)
        try:
            if req.stream:
                return await _stream(request, run, req, chat)
            return await _collect(request, run, req, chat)
        finally:
            run.cancel()  # whatever ended this handler (done, client gone, shutdown), the thread stops


async def _collect(request: web.Request, run: _GenerationRun, req: GenerationRequest, chat: bool) -> web.Response:
    parts: list[str] = []
    while True:
        event = await run.next()
        if isinstance(event, TextDelta):
            parts.append(event.text)
            if _client_gone(request):
                run.cancel()
        elif isinstance(event, Finished):
            break
        else:
            raise _failure(request.app, event.error)
    build = chat_body if chat else completion_body
    rid = new_id("chatcmpl" if chat else "cmpl")
    return web.json_response(build(rid, int(time.time()), req.model, "".join(parts), event.finish_reason,
                                   event.prompt_tokens, event.completion_tokens,
                                   request.app[ENGINE].loaded.fingerprint))


async def _stream(request: web.Request, run: _GenerationRun, req: GenerationRequest, chat: bool) -> web.StreamResponse:
    # Wait for the first event before answering: a failure in the prompt or prefill (bad length,
    # OOM) still gets its proper status and headers instead of an error inside a 200 stream.
    event = await run.next()
    if isinstance(event, Failed):
        raise _failure(request.app, event.error)
    writer = ChunkWriter(chat, req.model, req.include_usage, request.app[ENGINE].loaded.fingerprint)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })
    sent = 0
    try:
        await response.prepare(request)
        opening = writer.start()
        if opening:
            await response.write(opening)
        while True:
            if isinstance(event, TextDelta):
                await response.write(writer.delta(event.text))
                sent += 1
            elif isinstance(event, Finished):
                await response.write(writer.finish(event.finish_reason, event.prompt_tokens, event.completion_tokens))
                break
            else:
                try:
                    error = _failure(request.app, event.error)
                except Exception:
                    log.exception("stream_failed", path=request.path)
                    request.app[STATS].errors_total += 1
                    error = ApiError(500, "The worker failed while generating.", type="server_error",
                                     code="internal_error")
                await response.write(sse_error(error.body()))
                break
            event = await run.next()
        await response.write_eof()
    except ConnectionResetError:
        run.cancel()
        log.info("client_disconnected", path=request.path, chunks_sent=sent)
    return response


# ---- embeddings ------------------------------------------------------------------------------

async def embeddings(request: web.Request) -> web.Response:
    app = request.app
    body = await _json_body(request)
    _require_task(app, "embed", request.path)
    engine = app[ENGINE]
    settings = app[SETTINGS]
    req = parse_embedding(body, app[SERVED_NAMES], settings.max_embed_inputs, engine.loaded.hidden_size)
    with _admitted(app):
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(app[EXECUTOR], engine.embed, req.spec, settings.embed_batch_size)
        except (InvalidRequest, WorkerOutOfMemory) as exc:
            raise _failure(app, exc) from exc
    app[STATS].embeddings_total += len(result.data)
    payload = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(result.data)],
        "model": req.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return web.Response(body=json.dumps(payload, separators=(",", ":")), content_type="application/json")
