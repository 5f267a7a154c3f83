"""Runs the real gpu-supervisor as a subprocess for end-to-end tests, and reads its JSON log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.workers.util import CTL_WORKER_COMMAND

PYTHON = sys.executable
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctl_command(*args: str) -> list[str]:
    return [*CTL_WORKER_COMMAND, *args]


def fast_config(**overrides: Any) -> dict:
    """A policy tuned for tests: quick probes, short grace, small backoff; deep-merged with overrides."""
    base: dict = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "worker": {
            "command": ctl_command(),
            "startup_timeout_s": 10,
            "hang_timeout_s": 30,
            "stop_grace_s": 1,
            "health": {"interval_s": 0.2, "timeout_s": 0.5, "failures": 2},
            "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_restarts": 20, "window_s": 60},
        },
        "queue": {"concurrency": 4},
        "logging": {"format": "json", "level": "info"},
    }
    return _merge(base, overrides)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


async def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                     interval: float = 0.02) -> Any:
    """Poll a (sync or async) predicate until truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v) or isinstance(v, Awaitable):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class SupervisorProcess:
    """One `gpu-supervisor run` child with its config file, its log lines and an HTTP session."""

    def __init__(self, tmp: Path, config: dict, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.config = config
        self.config_path = tmp / "policy.yaml"
        self.write_config(config)
        # each daemon its own state directory (the job store), unless a test shares one on purpose
        self.env = {**os.environ, "STATE_DIRECTORY": str(tmp), **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[dict] = []
        self.raw_lines: list[str] = []
        self.port = 0
        self.admin_port: int | None = None
        self.session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task | None = None
        self._log_event = asyncio.Event()

    def write_config(self, config: dict | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, wait_ready: bool = True, timeout: float = 20.0) -> SupervisorProcess:
        self.proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "supervisor", "run", "--config", str(self.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env, cwd=str(REPO_ROOT),
        )
        self._reader = asyncio.create_task(self._read())
        ev = await self.wait_log("listening", timeout=timeout)
        addrs = ev["addresses"]
        self.port = int(addrs[0].rsplit(":", 1)[1])
        if ev.get("admin"):
            self.admin_port = int(ev["admin"].rsplit(":", 1)[1])
        self.session = aiohttp.ClientSession(base_url=self.url, timeout=aiohttp.ClientTimeout(total=60))
        if wait_ready:
            await self.wait_ready(timeout)
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").rstrip("\n")
            self.raw_lines.append(text)
            try:
                ev = json.loads(text)
            except ValueError:
                ev = {"event": "_raw", "line": text}
            if isinstance(ev, dict):
                self.logs.append(ev)
            self._log_event.set()

    def events(self, name: str, **match: Any) -> list[dict]:
        return [e for e in self.logs if e.get("event") == name and all(e.get(k) == v for k, v in match.items())]

    async def wait_log(self, name: str, timeout: float = 10.0, count: int = 1, **match: Any) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name, **match)
            if len(found) >= count:
                return found[count - 1]
            if self.proc is not None and self.proc.returncode is not None and self._reader and self._reader.done():
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) before log event {name} "
                                     f"{match}; last lines: {self.raw_lines[-15:]}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no log event {name} {match} within {timeout}s; last: {self.raw_lines[-15:]}")
            self._log_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._log_event.wait(), min(left, 0.5))

    async def status(self) -> dict:
        assert self.session
        async with self.session.get("/status") as r:
            return await r.json()

    async def metrics(self) -> str:
        assert self.session
        async with self.session.get("/metrics") as r:
            return await r.text()

    async def ready(self) -> bool:
        assert self.session
        async with self.session.get("/readyz") as r:
            return r.status == 200

    async def wait_ready(self, timeout: float = 20.0) -> None:
        await wait_until(self.ready, timeout, "supervisor /readyz 200")

    async def worker_state(self) -> str:
        return (await self.status())["worker"]["state"]

    async def wait_worker(self, pred: Callable[[dict], bool], timeout: float = 15.0, what: str = "worker") -> dict:
        async def check():
            w = (await self.status())["worker"]
            return w if pred(w) else None
        return await wait_until(check, timeout, what)

    async def worker_pid(self) -> int:
        return (await self.status())["worker"]["pid"]

    def signal(self, sig: int) -> None:
        assert self.proc
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await asyncio.wait_for(self._reader, 5)
        return rc

    async def stop(self) -> int | None:
        if self.session:
            await self.session.close()
            self.session = None
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return await self.wait_exit(30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader:
            self._reader.cancel()
        return self.proc.returncode if self.proc else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); look at its state
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def kill_quiet(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def read_to_eof(sock: socket.socket, limit_s: float) -> bytes:
    """Everything a raw socket gets until the peer ends the connection (a reset after its answers counts as
    the end); failing if the peer holds the connection past `limit_s`."""
    deadline = time.monotonic() + limit_s
    got = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the peer held the connection open for {limit_s} s (after {b''.join(got)[-300:]!r})"
        sock.settimeout(left)
        try:
            b = sock.recv(65536)
        except ConnectionResetError:
            return b"".join(got)
        except TimeoutError:
            continue
        if not b:
            return b"".join(got)
        got.append(b)
