"""Completion callbacks: POST a finished job's JSON to its allowed callback URL, retried with backoff."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import structlog

from .settings import Callbacks, callback_allowed

log = structlog.get_logger("supervisor.jobs.callbacks")


def callback_delay_s(attempt: int, initial: float, cap: float) -> float:
    """Wait before callback attempt `attempt + 1` (attempt counts from 1)."""
    return min(cap, initial * (2 ** (attempt - 1)))


class CallbackSender:
    """Owns the callback tasks (bounded) and their HTTP session; `aclose()` cancels what is left."""

    def __init__(self, settings: Callbacks):
        self.settings = settings
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0
        self.dropped = 0
        self.failed = 0

    def allowed(self, url: str) -> bool:
        return callback_allowed(url, self.settings.allow)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def send(self, url: str, job_json: dict) -> None:
        if not self.allowed(url):     # checked at submission too; the allow-list may have changed since
            log.warning("job_callback_refused", job_id=job_json.get("id"), url=url)
            return
        if len(self._tasks) >= self.settings.max_pending:
            self.dropped += 1
            log.warning("job_callback_dropped", job_id=job_json.get("id"), reason="too many pending callbacks")
            return
        task = asyncio.create_task(self._deliver(url, job_json), name=f"job-callback-{job_json.get('id')}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, job_json: dict) -> None:
        s = self.settings
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.timeout_s))
        body = json.dumps(job_json).encode()
        last = ""
        for attempt in range(1, s.max_attempts + 1):
            try:
                async with self._session.post(url, data=body, headers={"Content-Type": "application/json"},
                                              allow_redirects=False) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        self.sent += 1
                        log.info("job_callback_sent", job_id=job_json.get("id"), status=resp.status, attempt=attempt)
                        return
                    last = f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            if attempt < s.max_attempts:
                await asyncio.sleep(callback_delay_s(attempt, s.backoff_initial_s, s.backoff_max_s))
        self.failed += 1
        log.warning("job_callback_failed", job_id=job_json.get("id"), attempts=s.max_attempts, error=last)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
