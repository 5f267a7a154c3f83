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
    TAIL_LINES,
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


OUTPUT_BURST = 1000  # worker output lines logged at once, per stream, and ...
OUTPUT_PER_S = 100.0  # ... per second after that; past it lines are counted (worker_output_dropped), not logged:
# a worker printing in a loop would otherwise take the daemon's event loop (and the log's disk) with it
OUTPUT_READ = 1 << 16
OUTPUT_LINE_MAX = 1 << 20  # a line with no end in sight is taken as it is at this length


async def pump_output(inc: Incarnation, stream: asyncio.StreamReader | None, blog) -> None:
    """Each line it writes, logged (worker_output, within OUTPUT_BURST and OUTPUT_PER_S) and kept in its
    tail for the exit's reason (the last lines always, logged or not)."""
    if stream is None:
        return
    allowance, at = float(OUTPUT_BURST), time.monotonic()
    dropped, said_at = 0, at
    rest = b""
    while True:
        if dropped:  # lines counted and not said yet: said within a second, even if the worker falls silent
            try:
                data = await asyncio.wait_for(stream.read(OUTPUT_READ), max(0.0, said_at + 1.0 - time.monotonic()))
            except TimeoutError:
                blog.warning("worker_output_dropped", lines=dropped, burst=OUTPUT_BURST, per_s=OUTPUT_PER_S)
                dropped, said_at = 0, time.monotonic()
                continue
        else:
            data = await stream.read(OUTPUT_READ)
        if data:
            rest += data
            lines = rest.split(b"\n")
            rest = lines.pop()
            if len(rest) >= OUTPUT_LINE_MAX:
                lines.append(rest)
                rest = b""
        else:
            lines, rest = ([rest] if rest else []), b""
        now = time.monotonic()
        if lines:
            allowance = min(float(OUTPUT_BURST), allowance + (now - at) * OUTPUT_PER_S)
            at = now
            logged = min(len(lines), int(allowance))
            allowance -= logged
            for raw in lines[:logged]:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                inc.tail.append(line)
                blog.info("worker_output", line=line)
            if logged < len(lines):
                dropped += len(lines) - logged
                for raw in lines[max(logged, len(lines) - TAIL_LINES):]:
                    inc.tail.append(raw.decode("utf-8", "replace").rstrip("\r"))
        if dropped and (not data or now - said_at >= 1.0):
            blog.warning("worker_output_dropped", lines=dropped, burst=OUTPUT_BURST, per_s=OUTPUT_PER_S)
            dropped, said_at = 0, now
        if not data:
            return


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
