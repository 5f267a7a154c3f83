"""A worker's whole process tree is supervised: gunicorn as the README prints it (a master and the
worker process that holds the model), with real signals to each of its processes and to the daemon."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml

from tests.harness import REPO_ROOT, SupervisorProcess, kill_quiet, pid_alive, wait_until

pytestmark = pytest.mark.e2e

# the daemon run from an activated venv, as its user would: `gunicorn` is found on PATH
VENV_ENV = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def readme_gunicorn_config() -> dict:
    """configs/flask-gunicorn.yaml as printed, serving the test's Flask app on a free port."""
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "flask-gunicorn.yaml").read_text())
    cfg["listen"] = {"host": "127.0.0.1", "port": 0}
    cmd = cfg["worker"]["command"]
    cmd[cmd.index("myservice:app")] = "tests.workers.flask_app:app"
    cfg["worker"]["cwd"] = str(REPO_ROOT)
    return cfg


def tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]


async def _get(sp: SupervisorProcess, path: str) -> tuple[int, dict, dict]:
    assert sp.session
    async with sp.session.get(path) as r:
        return r.status, await r.json(), dict(r.headers)


async def _held(sp: SupervisorProcess, marker: Path, s: float = 60) -> tuple[asyncio.Task, int]:
    """A retry-safe request held by gunicorn's worker process: its task and that process's pid."""
    task = asyncio.create_task(_get(sp, f"/block?marker={marker}&s={s}"))
    text = await wait_until(lambda: marker.exists() and marker.read_text(), 30, "the request held by the worker")
    return task, int(text)


async def test_kill9_of_gunicorns_worker_process_mid_request_is_retried(supervisor_factory, tmp_path):
    sp = await supervisor_factory(readme_gunicorn_config(), env=VENV_ENV)
    master = await sp.worker_pid()
    req, holder = await _held(sp, tmp_path / "held")
    assert holder != master and holder in tree(master)
    os.kill(holder, signal.SIGKILL)  # the process that holds the model dies; its master lives on
    status, body, headers = await req
    assert status == 200, body
    assert body["pid"] != holder and headers["X-Supervisor-Attempts"] == "2"
    async with sp.session.get("/hello") as r:
        assert r.status == 200 and await r.text() == "hello"


async def test_kill9_of_the_daemon_takes_every_process_of_the_worker_tree(supervisor_factory, tmp_path):
    sp = await supervisor_factory(readme_gunicorn_config(), env=VENV_ENV)
    req, holder = await _held(sp, tmp_path / "held")  # gunicorn's worker busy: orphaned, it would linger
    old = tree(await sp.worker_pid())
    assert holder in old
    try:
        sp.proc.send_signal(signal.SIGKILL)
        await sp.wait_exit(10)
        with pytest.raises(aiohttp.ClientError):
            await req
        await wait_until(lambda: not any(pid_alive(p) for p in old), 10, "no process of the worker tree left")
    finally:
        for p in old:
            kill_quiet(p)


async def test_a_clean_stop_leaves_no_process_behind(supervisor_factory):
    sp = await supervisor_factory(readme_gunicorn_config(), env=VENV_ENV)
    daemon = psutil.Process(sp.proc.pid)
    left = [c.pid for c in daemon.children(recursive=True)]  # gunicorn's processes and the daemon's guard
    assert len(left) >= 3
    sp.signal(signal.SIGTERM)
    assert await sp.wait_exit(30) == 0
    assert [p for p in left if pid_alive(p)] == []
    assert sp.events("worker_exited", reason="shutdown") and not sp.events("stale_workers_killed")


async def test_the_next_daemon_stops_a_tree_left_behind_before_it_starts_its_own(supervisor_factory, tmp_path):
    """What the daemon's death could not take (here its guard died with it: `kill -9` of both) is
    stopped by the next daemon on the same config, before its own worker starts."""
    sp = await supervisor_factory(readme_gunicorn_config(), env=VENV_ENV)
    req, holder = await _held(sp, tmp_path / "held")
    master = await sp.worker_pid()
    old = tree(master)
    daemon = psutil.Process(sp.proc.pid)
    again = None
    try:
        for p in [c for c in daemon.children() if c.pid != master] + [daemon]:
            kill_quiet(p.pid)
        await sp.wait_exit(10)
        with pytest.raises(aiohttp.ClientError):
            await req
        # the master died with the daemon (PR_SET_PDEATHSIG) and is reaped; its worker lives on
        await wait_until(lambda: not psutil.pid_exists(master), 10, "the gunicorn master reaped")
        assert pid_alive(holder)
        again = SupervisorProcess(sp.tmp, sp.config, env=VENV_ENV)
        await again.start()
        assert [p for p in old if pid_alive(p)] == []
        async with again.session.get("/hello") as r:
            assert r.status == 200
    finally:
        if again is not None:
            await again.stop()
        for p in old:
            kill_quiet(p)


async def test_kill9_of_the_gunicorn_master_mid_requests_restarts_it_and_loses_nothing(supervisor_factory, tmp_path):
    """Requests in flight on its worker process when the master dies: that process goes with it, and
    each request is answered by the next gunicorn, however the reset of its connection and the
    worker's exit reach the daemon (in either order)."""
    cfg = readme_gunicorn_config()
    startup_timeout_s = cfg["worker"].get("startup_timeout_s", 300)  # (the README's: the default)
    sp = await supervisor_factory(cfg, env=VENV_ENV)
    for cycle in range(5):  # (the order of those two events is a race: several tries)
        master = await sp.worker_pid()
        held = [await _held(sp, tmp_path / f"held-{cycle}-{k}") for k in range(cfg["queue"]["concurrency"])]
        old = tree(master)
        os.kill(master, signal.SIGKILL)
        for task, holder in held:
            status, body, headers = await asyncio.wait_for(task, startup_timeout_s)
            assert status == 200, body
            assert holder in old and body["pid"] not in old and headers["X-Supervisor-Attempts"] == "2"
        w = await sp.wait_worker(lambda w, n=cycle + 1: w["restarts"] == n and w["pid"] not in old,
                                 startup_timeout_s, "the next gunicorn")
        assert w["last_exit"]["pid"] == master
        async with sp.session.get("/hello") as r:
            assert r.status == 200 and await r.text() == "hello"
        assert [p for p in old if pid_alive(p)] == []
