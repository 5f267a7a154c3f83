"""What a worker says it serves: its own GET /v1/models (discovery), and whether the names declared
for it are among them. Reads only; the fleet writes what they found on the worker's group."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import structlog

from ..upstream import UpstreamError, fetch
from .process import Incarnation

log = structlog.get_logger("supervisor.fleet")

DISCOVERY_TIMEOUT_S = 5.0
MODELS_MAX_BYTES = 1 << 20  # a worker's model list larger than this is not read


async def worker_fetch(inc: Incarnation, target: str, worker: str) -> tuple[int | None, bytes]:
    """A GET the daemon makes itself on a connection of its own to the worker (None: no answer)."""
    try:
        async with asyncio.timeout(DISCOVERY_TIMEOUT_S):
            return await fetch(inc.pool, target, MODELS_MAX_BYTES)
    except (TimeoutError, UpstreamError, OSError) as exc:
        log.info("models_read_failed", worker=worker, target=target, error=str(exc) or type(exc).__name__)
        return None, b""


async def served_models(inc: Incarnation, worker: str) -> tuple[str, ...] | None:
    """The ids of the worker's own GET /v1/models; None when it has no such list (or gave no answer)."""
    status, body = await worker_fetch(inc, "/v1/models", worker)
    if status != 200:
        if status is not None:
            log.info("models_read_failed", worker=worker, target="/v1/models", status=status)
        return None
    try:
        data = json.loads(body)
        return tuple(str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and m.get("id"))
    except (ValueError, TypeError, AttributeError) as exc:
        log.info("models_read_failed", worker=worker, target="/v1/models", error=str(exc))
        return None


async def missing_declared(inc: Incarnation, worker: str, declared: tuple[str, ...],
                           names: tuple[str, ...]) -> list[str]:
    """Declared names the worker does not serve: not listed, and its GET /v1/models/{id} (an alias it
    accepts without listing it) does not answer 200."""
    missing = []
    for m in declared:
        if m not in names:
            status, _ = await worker_fetch(inc, "/v1/models/" + quote(m, safe=""), worker)
            if status != 200:
                missing.append(m)
    return missing


def unclaimed(found: tuple[str, ...], taken: set[str]) -> tuple[tuple[str, ...], list[str]]:
    """A discovering worker's names, less those another worker serves already: (kept, clashing)."""
    return tuple(m for m in found if m not in taken), [m for m in found if m in taken]
