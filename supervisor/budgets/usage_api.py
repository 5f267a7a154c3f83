"""`GET /usage` (an admin endpoint, beside /status) and opening the usage log the daemon keeps."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from ..errors import error_response
from ..fairness import configured_key
from .usage import UsageLog, UsageUnavailable, answer, open_usage_store, parse_query

if TYPE_CHECKING:
    from ..config import Clients, Fairness
    from ..http.wire import Request

log = structlog.get_logger("supervisor.budgets.usage")


async def open_usage(clients: Clients | None, state_dir: str) -> UsageLog | None:
    """The usage log `clients.store` names, opened (None without `clients`), with what an earlier run
    left unwritten in `state_dir` taken back. Raises UsageUnavailable when its SQLite file is unusable;
    a Redis that is down is not an error: usage is kept here and written once it is back."""
    if clients is None:
        return None
    usage = UsageLog(open_usage_store(clients.store), clients.retention_s, spill_dir=state_dir)
    try:
        await usage.store.open()
    except UsageUnavailable as exc:
        if usage.store.kind != "redis":
            await usage.store.close()
            raise
        log.warning("usage_store_unavailable", store="redis", error=str(exc),
                    action="usage is kept here and written when it is back")
    try:
        taken = await usage.take_spilled()
    except OSError as exc:
        log.warning("usage_spill_unreadable", path=state_dir, error=str(exc))
    else:
        if taken:
            log.info("usage_taken_from_disk", rows=taken, path=state_dir)
    return usage


async def respond(request: Request, usage: UsageLog | None, fairness: Fairness) -> web.Response:
    """The answer to an (authorized) `/usage?key=&since=&group_by=`: DESIGN's JSON, or 400 naming the bad
    parameter, 404 without `clients`, 503 while the store is down."""
    if request.method not in ("GET", "HEAD"):
        return error_response("bad_request", "/usage answers GET only", None)
    try:
        q = parse_query(request.query.items())
    except ValueError as exc:
        return error_response("bad_request", f"/usage: {exc}", None)
    if usage is None:
        return error_response("not_found", "/usage: no usage is kept; configure `clients` (client budgets and "
                              "usage) and restart", None)
    try:
        rows = await usage.query(configured_key(fairness, q.key), q.since)
    except UsageUnavailable as exc:
        return error_response("usage_unavailable", f"/usage: {exc}; what is recorded meanwhile is kept", None,
                              retry_after_s=5.0)
    return web.Response(body=json.dumps(answer(q, rows), indent=1).encode(), content_type="application/json")
