"""The mechanics of one worker process: its socket path and command, starting it, reading its output,
probing it, signalling its process group, and what its exit left behind. No decisions here: the
lifecycle (lifecycle.py) decides when; process.py says why it exited."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from ..aio import wait_quietly
from ..config import WorkerSpec, find_program
from ..states import ExitReason
from ..upstream import UpstreamError, fetch
from .process import (
    MAX_SOCKET_PATH,
    OOM_ANSWER_WINDOW_S,
    SETPRIV,
    ExitEvidence,
    ExitInfo,
    Incarnation,
    classify_exit,
    kernel_oom_kills,
)


def socket_path(runtime_dir: Path, worker: str, index: int, gen: int) -> str:
    path = str(runtime_dir / f"{worker}-{index}-{gen}.sock")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path too long for a Unix socket ({len(path)} bytes): {path}")
    return path


def worker_command(spec: WorkerSpec, sock: str, path: str | None) -> list[str]:
    # {python} is the supervisor's own interpreter: handy when the worker lives in the same venv
    cmd = [part.replace("{socket}", sock).replace("{python}", sys.executable) for part in spec.command]
    # the absolute path, found before any fork (setpriv would only fail after it); raises OSError naming
    # the program and where it looked (check-config looks the same way)
    cmd[0] = find_program(cmd[0], path, spec.cwd)
    if os.path.exists(SETPRIV):
        # the worker never outlives its daemon: SIGKILL when the daemon (its parent) dies
        cmd = [SETPRIV, "--pdeathsig", "KILL", "--", *cmd]
    return cmd


async def exec_process(inc: Incarnation, cmd: list[str], env: dict[str, str], cwd: str | None) -> None:
    """Start it in a session of its own (its whole tree is signalled as one); raises OSError."""
    inc.proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd, start_new_session=True,
        limit=1 << 20,
    )


async def pump_output(inc: Incarnation, stream: asyncio.StreamReader | None, blog) -> None:
    """Each line it writes, logged (worker_output) and kept in its tail for the exit's reason."""
    if stream is None:
        return
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than the limit: take what is there
            raw = await stream.read(1 << 20)
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        inc.tail.append(line)
        blog.info("worker_output", line=line)


async def get(inc: Incarnation, path: str, timeout: float, read_body: bool) -> tuple[bool, str, bytes]:
    """One GET on its own connection: (2xx, why-not, body); a health probe reads no body."""
    try:
        async with asyncio.timeout(timeout):
            status, body = await fetch(inc.pool, path, None if read_body else 0)
    except TimeoutError:
        return False, "timeout", b""
    except UpstreamError as exc:
        return False, exc.kind, b""
    if 200 <= status < 300:
        return True, "", body
    return False, f"status {status}", b""


async def wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waiters:
            t.cancel()


def signal_group(inc: Incarnation, sig: int) -> None:
    if inc.pid <= 0:
        return  # never signal group 0: that is our own
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(inc.pid, sig)


async def terminate(inc: Incarnation, reason: ExitReason, grace_s: float, log) -> None:
    """SIGTERM to the process group, SIGKILL after `grace_s`; returns once it has exited."""
    signal_group(inc, signal.SIGTERM)
    if reason is ExitReason.HANG:
        signal_group(inc, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
    if not await wait_quietly(inc.exited.wait(), grace_s):
        log.warning("worker_kill", worker_pid=inc.pid, reason=reason.value, grace_s=grace_s)
        inc.sigkill_sent = True
        signal_group(inc, signal.SIGKILL)
        await inc.exited.wait()


async def reap(inc: Incarnation, now: float) -> ExitInfo:
    """After its exit: whatever it started in its session goes with it, its last lines are read, its
    socket is removed; then why it exited, from what it left behind."""
    signal_group(inc, signal.SIGKILL)
    for t in inc.tasks:
        if not t.done():
            await wait_quietly(asyncio.shield(t), 1.0)  # its last output lines, for the exit's reason
            t.cancel()
    inc.pool.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(inc.socket_path)
    rc = inc.returncode
    kernel_oom = False
    if rc == -signal.SIGKILL and not inc.sigkill_sent and inc.oom_kills_at_start is not None:
        kernel_oom = await asyncio.to_thread(kernel_oom_kills) > inc.oom_kills_at_start
    reason = classify_exit(ExitEvidence(
        returncode=rc,
        requested=inc.requested if inc.requested is not ExitReason.START_FAILURE else None,
        sigkill_sent=inc.sigkill_sent,
        was_ready=inc.ready_at is not None,
        tail=inc.tail,
        oom_answer_recent=now - inc.oom_answer_at <= OOM_ANSWER_WINDOW_S,
        kernel_oom_kill=kernel_oom,
    ))
    if inc.requested is ExitReason.START_FAILURE and reason is ExitReason.CRASH:
        reason = ExitReason.START_FAILURE
    return ExitInfo(
        reason=reason,
        code=rc if rc is not None and rc >= 0 else None,
        signal=-rc if rc is not None and rc < 0 else None,
        at=time.time(),
        pid=inc.pid,
        uptime_s=now - inc.spawned_at,
        detail=inc.boot_error,
    )
