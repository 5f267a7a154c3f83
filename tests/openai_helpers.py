"""Helpers for tests that speak OpenAI's API: SSE parsing and the error shape."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, str]]:
    """Yield (arrival time, data) for each SSE event as it arrives."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.decode().splitlines():
                if line.startswith("data: "):
                    yield time.monotonic(), line[len("data: "):]


async def sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Yield each SSE event's data as it arrives."""
    async for _, data in sse_events(response):
        yield data


def assert_openai_error(body: dict[str, Any], param: str | None, type_: str = "invalid_request_error") -> None:
    """The worker's own error shape (OpenAI's), not the supervisor's."""
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == type_
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
