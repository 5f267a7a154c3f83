"""Helpers shared by tests that start real worker processes: commands, start/stop, readiness, clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import aiohttp

from tests.workers.ctl_worker import big_pattern

REPO_ROOT = Path(__file__).resolve().parents[2]
CTL_WORKER = Path(__file__).resolve().with_name("ctl_worker.py")
PYTHON = sys.executable
BASE_URL = "http://worker"
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; keep a margin

# Commands with the supervisor's `{socket}` placeholder, ready for `worker.command`.
CTL_WORKER_COMMAND: tuple[str, ...] = (PYTHON, str(CTL_WORKER), "--socket", "{socket}")
UVICORN_COMMAND: tuple[str, ...] = (
    PYTHON, "-m", "uvicorn", "tests.workers.fastapi_app:app", "--uds", "{socket}",
    "--app-dir", str(REPO_ROOT),
)
GUNICORN_COMMAND: tuple[str, ...] = (
    PYTHON, "-m", "gunicorn", "--bind", "unix:{socket}", "--workers", "1",
    "--chdir", str(REPO_ROOT), "tests.workers.flask_app:app",
)


class WorkerExited(RuntimeError):
    """The worker process ended while we were waiting for it to become healthy."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"worker exited with code {returncode} before it was healthy")
        self.returncode = returncode


def big_body(n: int) -> bytes:
    """The exact body ctl_worker's `GET /big?bytes=n` sends."""
    return big_pattern(n)


def ctl_worker_command(*args: str) -> list[str]:
    """ctl_worker's command line with `{socket}` left for the supervisor to fill, plus options."""
    return [*CTL_WORKER_COMMAND, *args]


def fill_socket(command: Sequence[str], socket_path: str) -> list[str]:
    return [part.replace("{socket}", socket_path) for part in command]


def socket_path(directory: Path, name: str = "worker.sock") -> str:
    """A socket path inside `directory`, or in a fresh short temp dir if that path would be too long."""
    path = str(directory / name)
    if len(path.encode()) <= MAX_SOCKET_PATH:
        return path
    return str(Path(tempfile.mkdtemp(prefix="ctlw-")) / name)


def unix_session(path: str, **kwargs: object) -> aiohttp.ClientSession:
    """A client session whose every request goes to the Unix socket `path` (use relative URLs)."""
    return aiohttp.ClientSession(
        base_url=BASE_URL, connector=aiohttp.UnixConnector(path=path), **kwargs  # type: ignore[arg-type]
    )


async def wait_for_socket_health(
    path: str,
    timeout: float = 10.0,
    *,
    health_path: str = "/healthz",
    proc: asyncio.subprocess.Process | None = None,
    poll_s: float = 0.02,
) -> None:
    """Poll `health_path` on the socket until it answers 2xx; TimeoutError past the deadline.

    With `proc`, a worker that exits first raises WorkerExited at once instead of waiting it out.
    """
    deadline = time.monotonic() + timeout
    last: str = "socket never appeared"
    async with unix_session(path) as session:
        while True:
            if proc is not None and proc.returncode is not None:
                raise WorkerExited(proc.returncode)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{path}{health_path} not healthy within {timeout}s: {last}")
            if os.path.exists(path):
                try:
                    async with session.get(
                        health_path, timeout=aiohttp.ClientTimeout(total=min(left, 2.0))
                    ) as resp:
                        await resp.read()
                        if 200 <= resp.status < 300:
                            return
                        last = f"status {resp.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = repr(exc)
            await asyncio.sleep(poll_s)


async def start_worker(
    command: Sequence[str],
    socket: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str = REPO_ROOT,
    stdout: int | None = None,
    stderr: int | None = None,
    wait: bool = True,
    timeout: float = 10.0,
    health_path: str = "/healthz",
) -> asyncio.subprocess.Process:
    """Start `command` (with `{socket}` filled) in its own session; by default wait until healthy.

    `env` is added to this process's environment, with GPU_SUPERVISOR_SOCKET set as a supervisor
    would. Pass stdout/stderr=asyncio.subprocess.PIPE to read them (and then do read them, or the
    worker blocks once the pipe is full). If waiting fails the process is killed before re-raising.
    """
    full_env = {**os.environ, "GPU_SUPERVISOR_SOCKET": socket, **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        *fill_socket(command, socket), env=full_env, cwd=str(cwd), stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout, stderr=stderr, start_new_session=True,
    )
    if wait:
        try:
            await wait_for_socket_health(socket, timeout, health_path=health_path, proc=proc)
        except BaseException:
            await kill_worker(proc)
            raise
    return proc


async def start_ctl_worker(socket: str, *args: str, **kwargs: object) -> asyncio.subprocess.Process:
    """Start ctl_worker on `socket` with extra CLI `args`; keyword args as for start_worker."""
    return await start_worker(ctl_worker_command(*args), socket, **kwargs)  # type: ignore[arg-type]


async def wait_exit(proc: asyncio.subprocess.Process, timeout: float = 5.0) -> int:
    """The exit code once the process ends; TimeoutError past the deadline."""
    return await asyncio.wait_for(proc.wait(), timeout)


async def kill_worker(proc: asyncio.subprocess.Process) -> int:
    """SIGKILL the worker's whole process group and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return await proc.wait()


async def stop_worker(
    proc: asyncio.subprocess.Process, timeout: float = 5.0, sig: int = signal.SIGTERM
) -> int:
    """Send `sig` (SIGTERM), wait up to `timeout`, then SIGKILL the group; returns the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return await wait_exit(proc, timeout)
        except TimeoutError:
            pass
    return await kill_worker(proc)


@contextlib.asynccontextmanager
async def running_worker(
    command: Sequence[str], socket: str, **kwargs: object
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start a worker (as start_worker) and make sure it is gone, group and all, on the way out."""
    proc = await start_worker(command, socket, **kwargs)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        await stop_worker(proc, timeout=5.0)
        # Whatever the leader left behind in its group (gunicorn's workers) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def running_ctl_worker(socket: str, *args: str, **kwargs: object):  # type: ignore[no-untyped-def]
    """`async with running_ctl_worker(sock, "--ready-delay", "1") as proc:` ..."""
    return running_worker(ctl_worker_command(*args), socket, **kwargs)
