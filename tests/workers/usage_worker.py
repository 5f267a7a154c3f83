"""A worker that answers OpenAI's chat and text completions with honest `usage`: the budget tests' worker.

Run as ``python tests/workers/usage_worker.py --socket PATH``. Its own tokenizer differs from the
daemon's estimate, as a real engine's does: a prompt is one token per 3 characters (of its messages'
content or its prompt), and an answer stops early, at half of `max_tokens` (or `max_completion_tokens`,
rounded up; 8 without either) tokens of "tok ". Streams (SSE, one token per chunk) with "stream": true,
and a usage chunk last when `stream_options.include_usage` is set. Controls, by the body's `model`:
`no-usage` leaves `usage` out of a JSON answer; `die` kills this process before any answer byte; `slow`
waits `?ms=` (default 200) before answering. `?gap_ms=` waits that long between streamed chunks. Only
aiohttp and the standard library are imported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from aiohttp import web

DEFAULT_TOKENS = 8
TOKEN = "tok "


def prompt_tokens(body: dict) -> int:
    chars = 0
    for m in body.get("messages") or ():
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            chars += len(m["content"])
    if isinstance(body.get("prompt"), str):
        chars += len(body["prompt"])
    return -(-chars // 3)


def completion_tokens(body: dict) -> int:
    for k in ("max_completion_tokens", "max_tokens"):
        if isinstance(body.get(k), int):
            return -(-body[k] // 2)
    return DEFAULT_TOKENS


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def complete(request: web.Request) -> web.StreamResponse:
    chat = request.path.endswith("/chat/completions")
    body = await request.json()
    model = body.get("model", "usage-model")
    if model == "die":
        os._exit(3)
    if model == "slow":
        await asyncio.sleep(int(request.query.get("ms", "200")) / 1000)
    p, n = prompt_tokens(body), completion_tokens(body)
    usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    kind = "chat.completion" if chat else "text_completion"
    if not body.get("stream"):
        choice = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": TOKEN * n}} if chat else {"text": TOKEN * n})
        answer = {"id": "c-1", "object": kind, "created": 0, "model": model, "choices": [choice]}
        if model != "no-usage":
            answer["usage"] = usage
        return web.json_response(answer)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    gap = int(request.query.get("gap_ms", "0")) / 1000
    for _ in range(n):
        if gap:
            await asyncio.sleep(gap)
        choice = ({"index": 0, "delta": {"content": TOKEN}, "finish_reason": None} if chat
                  else {"index": 0, "text": TOKEN, "finish_reason": None})
        chunk = {"id": "c-1", "object": kind + ".chunk" if chat else kind, "created": 0, "model": model,
                 "choices": [choice]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        last = {"id": "c-1", "object": kind + ".chunk" if chat else kind, "created": 0, "model": model,
                "choices": [], "usage": usage}
        await resp.write(f"data: {json.dumps(last)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def serve(socket: str) -> None:
    app = web.Application()
    app.router.add_get("/healthz", health)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, socket).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=os.environ.get("GPU_SUPERVISOR_SOCKET"))
    ns = p.parse_args()
    if not ns.socket:
        p.error("--socket is required (or GPU_SUPERVISOR_SOCKET)")
    asyncio.run(serve(ns.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
