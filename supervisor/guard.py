"""The guard: a small process, in its own session, that outlives its daemon just long enough to stop the
daemon's worker trees when the daemon dies however it dies (kill -9 included). This module owns starting
it and keeping one running; what it runs (`leftovers.guard_main`) is synchronous code in leftovers.py."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

import structlog

from .leftovers import GUARD_CODE, GUARD_MAX_PAUSE_S, STOP

log = structlog.get_logger("supervisor.leftovers")


class Guard:
    """A small process, in its own session, that outlives its daemon just long enough to stop the
    daemon's worker trees when the daemon dies however it dies (kill -9 included)."""

    def __init__(self, pid_path: Path, log_format: str, log_level: str):
        self.cmd = [sys.executable, "-P", "-c", GUARD_CODE, str(Path(__file__).resolve().parents[1]),
                    str(pid_path), log_format, log_level]
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._started = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep(), name="leftovers-guard")
        await self._started.wait()

    async def _keep(self) -> None:
        """Keep one guard running: one that died (killed by someone) is replaced, after a pause that
        grows while it keeps dying young (one that cannot start must not flood the log)."""
        pause = 1.0
        while True:
            started = time.monotonic()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                    start_new_session=True)  # (its own session: a Ctrl-C meant for the daemon spares it)
            except OSError as exc:
                log.error("guard_unavailable", error=str(exc),
                          consequence="a kill -9 of the daemon leaves worker processes until the next start")
                self._started.set()
                return
            self._started.set()
            code = await self.proc.wait()
            pause = 1.0 if time.monotonic() - started > GUARD_MAX_PAUSE_S else min(pause * 2, GUARD_MAX_PAUSE_S)
            log.warning("guard_exited", code=code, action="started again", in_s=pause)
            await asyncio.sleep(pause)

    async def aclose(self) -> None:
        """The daemon stops cleanly (its workers are stopped): tell the guard, and wait for it to go."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        proc = self.proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return
        with contextlib.suppress(ConnectionError):
            proc.stdin.write(STOP)
            await proc.stdin.drain()
        proc.stdin.close()
        try:
            async with asyncio.timeout(5.0):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
