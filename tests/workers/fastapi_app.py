"""An unchanged FastAPI service, as users run it: ``python -m uvicorn tests.workers.fastapi_app:app --uds SOCK``."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

app = FastAPI(title="ctl fastapi worker")


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok", "pid": os.getpid()}


@app.get("/hello", response_class=PlainTextResponse)
async def hello() -> str:
    return "hello"


@app.post("/v1/echo")
async def echo(request: Request) -> dict[str, Any]:
    body = await request.body()
    return {"json": json.loads(body) if body else None, "pid": os.getpid()}


@app.get("/stream")
async def stream(n: int = 3, interval: float = 0.05) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        for k in range(n):
            if k:
                await asyncio.sleep(interval)
            yield f"data: {json.dumps({'i': k})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
