"""The answers the supervisor makes itself: one JSON shape, one table of types and statuses."""

from __future__ import annotations

import json

from aiohttp import web

from .config import retry_after_seconds

# type -> (status, carries Retry-After)
ERROR_TYPES: dict[str, tuple[int, bool]] = {
    "bad_request": (400, False),
    "unauthorized": (401, False),
    "payload_too_large": (413, False),
    "queue_full": (429, True),
    "rate_limited": (429, True),
    "overloaded": (503, True),
    "circuit_open": (503, True),
    "queue_timeout": (503, True),
    "worker_unavailable": (503, True),
    "shutting_down": (503, True),
    "worker_crashed": (502, True),
    "worker_error": (502, False),
    "model_not_found": (404, False),
    "timeout": (504, False),
    "jobs_unavailable": (503, True),
    "usage_unavailable": (503, True),
    "not_found": (404, False),
    "conflict": (422, False),
}
# OpenAI's own error fields, for the types an OpenAI client reads them from (param, code)
OPENAI_FIELDS: dict[str, dict[str, str]] = {
    "model_not_found": {"param": "model", "code": "model_not_found"},
}


class Rejected(Exception):
    """A request the supervisor answers itself, with one of ERROR_TYPES."""

    def __init__(self, etype: str, message: str, retry_after_s: float | None = None):
        self.etype = etype
        self.message = message
        self.retry_after_s = retry_after_s
        super().__init__(f"{etype}: {message}")


def error_parts(
    etype: str,
    message: str,
    request_id: str | None,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """An error answer as status, headers and body (the one JSON shape of every answer the daemon makes)."""
    status, with_retry = ERROR_TYPES[etype]
    err: dict = {"type": etype, "message": message, "request_id": request_id, **OPENAI_FIELDS.get(etype, {})}
    hdrs = {"Content-Type": "application/json"}
    if with_retry:
        secs = retry_after_seconds(retry_after_s if retry_after_s is not None else 1.0)
        err["retry_after_s"] = secs
        hdrs["Retry-After"] = str(secs)
    if request_id:
        hdrs["X-Request-ID"] = request_id
    if headers:
        hdrs.update(headers)
    return status, hdrs, json.dumps({"error": err}).encode()


def error_response(
    etype: str,
    message: str,
    request_id: str | None,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    status, hdrs, body = error_parts(etype, message, request_id, retry_after_s, headers)
    return web.Response(status=status, body=body, headers=hdrs)


def error_event(etype: str, message: str, request_id: str | None) -> bytes:
    """The SSE event that ends a stream the worker broke off."""
    body = json.dumps({"error": {"type": etype, "message": message, "request_id": request_id}})
    return f"event: error\ndata: {body}\n\n".encode()
