"""A worker's program as a real daemon finds it: a bare `uvicorn` from the daemon's own venv under the PATH
systemd gives, and a program that is not there named in /status and /readyz; `status` into a closed pipe."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest

from tests.harness import REPO_ROOT, SupervisorProcess, fast_config

pytestmark = pytest.mark.e2e

CONSOLE_SCRIPT = Path(sys.executable).with_name("gpu-supervisor")
SYSTEMD_PATH = "/usr/bin:/bin"  # the PATH a unit's ExecStart gets: the venv's bin is not on it
NO_SUCH_PROGRAM = "gs-no-such-program"


class ConsoleScriptSupervisor(SupervisorProcess):
    """The daemon as a systemd unit starts it: the venv's console script by its full path."""

    async def start(self, wait_ready: bool = True, timeout: float = 20.0) -> ConsoleScriptSupervisor:
        self.proc = await asyncio.create_subprocess_exec(
            str(CONSOLE_SCRIPT), "run", "--config", str(self.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env, cwd=str(REPO_ROOT),
        )
        self._reader = asyncio.create_task(self._read())
        ev = await self.wait_log("listening", timeout=timeout)
        self.port = int(ev["addresses"][0].rsplit(":", 1)[1])
        self.session = aiohttp.ClientSession(base_url=self.url, timeout=aiohttp.ClientTimeout(total=60))
        if wait_ready:
            await self.wait_ready(timeout)
        return self


@pytest.fixture
async def systemd_like():
    """Start daemons by the console script's full path with PATH=/usr/bin:/bin; all stopped after."""
    made: list[tuple[SupervisorProcess, str]] = []

    async def make(config: dict) -> SupervisorProcess:
        d = tempfile.mkdtemp(prefix="gs-")  # short: Unix socket paths are limited to 107 bytes
        sp = ConsoleScriptSupervisor(Path(d), config, env={"PATH": SYSTEMD_PATH})
        made.append((sp, d))
        return await sp.start(wait_ready=False)

    yield make
    for sp, d in made:
        await sp.stop()
        shutil.rmtree(d, ignore_errors=True)


async def test_a_bare_uvicorn_from_the_daemons_venv_serves_under_a_systemd_path(systemd_like):
    assert shutil.which("uvicorn", path=SYSTEMD_PATH) is None, "this test needs a PATH without uvicorn"
    # as the README writes it: a bare `uvicorn`, installed in the daemon's own venv
    sup = await systemd_like(fast_config(worker={
        "command": ["uvicorn", "tests.workers.fastapi_app:app", "--uds", "{socket}"],
        "startup_timeout_s": 60,
    }))
    await sup.wait_ready(90)
    async with sup.session.get("/hello") as r:
        assert r.status == 200
        assert await r.text() == "hello"


async def test_a_missing_program_is_named_in_status_and_readyz_and_the_replica_fails(supervisor_factory):
    sup = await supervisor_factory(fast_config(worker={
        "command": [NO_SUCH_PROGRAM, "--uds", "{socket}"],
        "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_restarts": 2, "window_s": 120},
    }), wait_ready=False)
    # a failed start each time, counted towards the crash loop: it ends `failed`, not in backoff forever
    worker = await sup.wait_worker(lambda w: w["state"] == "failed", timeout=30, what="the replica to fail")
    last = worker["last_exit"]
    assert last["reason"] == "start_failure"
    assert f"cannot start {NO_SUCH_PROGRAM!r}: not found on PATH" in last["detail"]
    assert f"nor in {Path(sys.executable).parent}" in last["detail"]
    async with sup.session.get("/readyz") as r:
        assert r.status == 503
        because = (await r.json())["because"]
    assert any(NO_SUCH_PROGRAM in why and "failed" in why for why in because), because
    # the log's exit names the program, not the wrapper that would have run it
    tail = sup.events("worker_exited")[0]["tail"]
    assert any(NO_SUCH_PROGRAM in line for line in tail) and not any("setpriv" in line for line in tail), tail


async def test_status_into_a_closed_pipe_ends_quietly(supervisor_factory):
    sup = await supervisor_factory(fast_config())
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone, as after `| head` exited
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor", "status", "--url", sup.url, "--json",
            stdout=write_end, stderr=asyncio.subprocess.PIPE, cwd=str(REPO_ROOT),
        )
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert err.decode() == ""
    assert proc.returncode == 128 + signal.SIGPIPE
