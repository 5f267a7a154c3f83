"""`gpu-supervisor status`: the real CLI as a subprocess against real daemons and misbehaving servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp
import pytest
from aiohttp import web
from rich.console import Console

from supervisor.status_cli import (
    StatusError,
    parse_status,
    parse_url,
    recent_exits,
    render,
    shape_problem,
    worker_rows,
)
from tests.harness import REPO_ROOT, ctl_command, fast_config, free_port, wait_until

TOKEN = "s3cret-admin-token"


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """`python -m supervisor status ARGS` -> (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if k != "GPU_SUPERVISOR_TOKEN"}
    full_env.update({"COLUMNS": "220", "NO_COLOR": "1"}, **(env or {}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "supervisor", "status", *args, cwd=str(REPO_ROOT), env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("gpu-supervisor status: ")
    return lines[0]


async def admin_ready(port: int) -> bool:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
        return r.status == 200


# -- against a real daemon ---------------------------------------------------------------------------------
async def test_ready_daemon_exit_0_with_workers_and_states(supervisor_factory):
    sup = await supervisor_factory(fast_config())
    status = await sup.status()
    rc, out, err = await run_cli("--url", sup.url)
    assert rc == 0, err
    assert "READY" in out and "NOT READY" not in out
    assert "default" in out and "ready" in out
    assert str(status["worker"]["pid"]) in out
    assert "closed" in out  # the breaker
    for level in status["queue"]["depth"]:
        assert level in out


async def test_json_prints_the_raw_status(supervisor_factory):
    sup = await supervisor_factory(fast_config())
    rc, out, _ = await run_cli("--url", f"127.0.0.1:{sup.port}", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["ready"] is True
    assert data["worker"]["state"] == "ready"
    assert data["worker"]["pid"] == (await sup.status())["worker"]["pid"]


async def test_not_ready_exit_1_with_reason(supervisor_factory):
    sup = await supervisor_factory(fast_config(worker={"command": ctl_command("--never-ready")}), wait_ready=False)
    rc, out, err = await run_cli("--url", sup.url)
    assert rc == 1, (out, err)
    assert "NOT READY" in out
    assert "not ready: worker" in out


def fleet_config() -> dict:
    """Two named workers: `chat` with two replicas, `embed` started by its first request."""
    base = fast_config()
    lifecycle = {k: v for k, v in base.pop("worker").items() if k != "command"}
    base["worker_defaults"] = lifecycle
    base["workers"] = {"chat": {"command": ctl_command("--name", "chat"), "replicas": 2},
                       "embed": {"command": ctl_command("--name", "embed"), "models": ["embed"], "start": "on_demand"}}
    return base


async def test_fleet_shows_every_worker_replica_and_exit(supervisor_factory):
    sup = await supervisor_factory(fleet_config())
    before = (await sup.status())["workers"]["chat"]["replicas"]
    victim = before[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    async def respawned() -> bool:
        reps = (await sup.status())["workers"]["chat"]["replicas"]
        return all(r["state"] == "ready" and r["pid"] != victim for r in reps[:1]) and reps[0]["last_exit"]
    await wait_until(respawned, 20, "chat replica 0 respawned")

    rc, out, err = await run_cli("--url", sup.url)
    assert rc == 0, err
    rows = [line for line in out.splitlines() if "chat" in line or "embed" in line]
    assert sum("chat" in line and "ready" in line for line in rows) >= 2, out
    assert any("embed" in line and "unloaded" in line for line in rows), out
    status = await sup.status()
    exits = status.get("exits") or [r["last_exit"] for r in status["workers"]["chat"]["replicas"] if r["last_exit"]]
    assert exits
    assert "recent worker exits" in out
    assert exits[-1]["signal"] in (9, "SIGKILL", "KILL")
    assert f"{exits[-1]['reason']}, signal {exits[-1]['signal']}" in out


async def test_unreachable_exit_2_one_line():
    rc, out, err = await run_cli("--url", f"http://127.0.0.1:{free_port()}")
    assert rc == 2
    assert out == ""
    assert "connection refused" in one_error_line(err)


async def test_token_needed_then_given(supervisor_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    sup = await supervisor_factory(fast_config(admin={"token_file": str(token_file)}))

    rc, out, err = await run_cli("--url", sup.url)
    assert rc == 2
    line = one_error_line(err)
    assert "401" in line and "token" in line and "--token-file" in line

    rc, out, err = await run_cli("--url", sup.url, "--token-file", str(token_file))
    assert rc == 0, err
    assert "default" in out

    rc, out, err = await run_cli("--url", sup.url, env={"GPU_SUPERVISOR_TOKEN": TOKEN})
    assert rc == 0, err

    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    rc, _, err = await run_cli("--url", sup.url, "--token-file", str(wrong))
    assert rc == 2
    assert "refused the token" in one_error_line(err)

    rc, _, err = await run_cli("--url", sup.url, "--token-file", str(tmp_path / "missing"))
    assert rc == 2
    assert "cannot read" in one_error_line(err)


async def test_admin_listener_url(supervisor_factory):
    # (the harness's readiness check asks the main listener; here /readyz is on the admin one)
    sup = await supervisor_factory(fast_config(admin={"listen": {"host": "127.0.0.1", "port": 0}}), wait_ready=False)
    assert sup.admin_port is not None
    await wait_until(lambda: admin_ready(sup.admin_port), 20, "admin /readyz 200")
    rc, out, err = await run_cli("--url", f"http://127.0.0.1:{sup.admin_port}")
    assert rc == 0, err
    # on the main listener /status is proxied to the worker, whose answer is not a /status
    rc, _, err = await run_cli("--url", sup.url)
    assert rc == 2
    one_error_line(err)


async def test_watch_refreshes_until_count(supervisor_factory):
    sup = await supervisor_factory(fast_config())
    rc, out, err = await run_cli("--url", sup.url, "--watch", "--interval", "0.2", "--count", "3")
    assert rc == 0, err
    assert out.count("READY") == 3  # a pipe gets each refresh in turn

    rc, out, err = await run_cli("--url", sup.url, "--watch", "--json", "--interval", "0.2", "--count", "2")
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["ready"] is True for x in lines)


async def test_watch_on_a_daemon_that_is_down_ends_2():
    rc, out, err = await run_cli("--url", f"127.0.0.1:{free_port()}", "--watch", "--interval", "0.1", "--count", "2")
    assert rc == 2
    assert "connection refused" in out and "Traceback" not in out + err


# -- against servers that are not a gpu-supervisor --------------------------------------------------------
@pytest.fixture
async def garbage_server():
    """A real HTTP server on 127.0.0.1 whose /status answers badly; `hang` never answers."""
    release = asyncio.Event()

    async def html(_):
        return web.Response(text="<!doctype html><html><body>Welcome to nginx!</body></html>", content_type="text/html")

    async def not_json(_):
        return web.Response(text="{ready: true,", content_type="application/json")

    async def wrong_shape(_):
        return web.json_response([{"ready": True}])

    async def ready_not_bool(_):
        return web.json_response({"ready": "yes", "worker": {}})

    async def workers_list(_):
        return web.json_response({"ready": True, "workers": [{"name": "x"}]})

    async def error_500(_):
        return web.Response(status=500, text="Internal Server Error")

    async def hang(_):
        await release.wait()
        return web.Response(text="late")

    async def trickle(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"ready": true, ')
        await release.wait()
        return resp

    routes = {"html": html, "not-json": not_json, "wrong-shape": wrong_shape, "ready-not-bool": ready_not_bool,
              "workers-list": workers_list, "error-500": error_500, "hang": hang, "trickle": trickle}
    app = web.Application()
    for name, fn in routes.items():
        app.router.add_get(f"/{name}/status", fn)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    release.set()
    await runner.cleanup()


@pytest.mark.parametrize("kind,expect", [
    ("html", "HTML page"),
    ("not-json", "not JSON"),
    ("wrong-shape", "not a gpu-supervisor /status"),
    ("ready-not-bool", "no boolean 'ready'"),
    ("workers-list", "'workers' is not an object"),
    ("error-500", "HTTP 500"),
    ("hang", "no answer within 1s"),
    ("trickle", "no answer within 1s"),
])
async def test_garbage_answers_exit_2_one_line(garbage_server, kind, expect):
    rc, out, err = await run_cli("--url", f"{garbage_server}/{kind}", "--timeout", "1")
    assert rc == 2
    assert out == ""
    assert expect in one_error_line(err)


async def test_non_http_server_exit_2_one_line():
    """A TCP server that answers with bytes that are not HTTP."""
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02garbage\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(talk, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        rc, out, err = await run_cli("--url", f"127.0.0.1:{port}", "--timeout", "5")
    finally:
        server.close()
        await server.wait_closed()
    assert rc == 2
    assert "not an HTTP answer" in one_error_line(err)


@pytest.mark.parametrize("url,expect", [
    ("ftp://127.0.0.1:21", "only http"),
    ("http://127.0.0.1:notaport", "port"),
    ("http://", "no host"),
])
async def test_bad_url_exit_2(url, expect):
    rc, _, err = await run_cli("--url", url)
    assert rc == 2
    assert expect in one_error_line(err)


# -- the pure parts, with plain values ----------------------------------------------------------------------
def test_parse_url_forms():
    assert parse_url("127.0.0.1:9090").shown == "http://127.0.0.1:9090/status"
    assert parse_url("http://h").port == 80
    assert parse_url("https://h/gs/").path == "/gs/status"
    assert parse_url("http://h:1/status").path == "/status"
    with pytest.raises(StatusError):
        parse_url("unix:///tmp/x")


FLEET = {
    "version": "0.2.0", "uptime_s": 3725.2, "ready": False, "not_ready_because": ["worker chat: no serving replica"],
    "worker": {"state": "failed", "pid": None},
    "workers": {
        "chat": {"models": ["llama"], "start": "eager", "queue": {"depth": {"high": 2, "low": 1}, "total": 3,
                                                                     "inflight": 1, "concurrency": 2},
                 "replicas": [
                     {"index": 0, "gpu": 0, "state": "failed", "pid": None, "restarts": 11, "inflight": 0,
                      "served": 40, "breaker": {"state": "forced_open"}, "rss_bytes": 0, "gpu_memory_bytes": 0,
                      "last_exit": {"reason": "oom", "code": None, "signal": 9, "at": "2026-01-01T00:00:00Z"}},
                     {"index": 1, "gpu": 1, "state": "busy", "pid": 4242, "restarts": 0, "inflight": 1,
                      "served": 7, "breaker": {"state": "closed"}, "rss_bytes": 3 << 30,
                      "gpu_memory_bytes": 5 << 30, "last_exit": None}]},
        "embed": {"models": [], "start": "on_demand", "replicas": [
            {"index": 0, "gpu": 0, "state": "unloaded", "pid": None, "restarts": 0, "last_exit": None}]},
    },
    "queue": {"depth": {"high": 2, "low": 1}, "total": 3, "inflight": 1, "concurrency": 3},
    "breaker": {"state": "open", "failure_rate": 0.6, "retry_after_s": 4},
    "gpu": {"available": True, "pressure": "soft", "devices": [
        {"index": 0, "name": "NVIDIA H100", "memory_used_bytes": 70 << 30, "memory_total_bytes": 80 << 30,
         "utilization": 0.9}]},
    "exits": [{"worker": "chat", "replica": 0, "reason": "crash", "code": 1, "signal": None, "at": "t1"},
              {"worker": "chat", "replica": 0, "reason": "oom", "code": None, "signal": 9, "at": "t2"}],
    "jobs": {"store": "sqlite", "available": True, "pending": 5},
}


def test_worker_rows_fleet_and_single_shapes():
    rows = worker_rows(FLEET)
    assert [(r["worker"], r["replica"], r["state"]) for r in rows] == [
        ("chat", 0, "failed"), ("chat", 1, "busy"), ("embed", 0, "unloaded")]
    single = {"ready": True, "worker": {"state": "ready", "pid": 7}, "breaker": {"state": "closed"}}
    assert worker_rows(single) == [{"worker": "default", "replica": 0, "state": "ready", "pid": 7,
                                    "breaker": {"state": "closed"}}]


def test_recent_exits_prefers_exits_else_last_exit():
    assert [e["reason"] for e in recent_exits(FLEET)] == ["crash", "oom"]
    no_exits = {k: v for k, v in FLEET.items() if k != "exits"}
    assert [(e["worker"], e["reason"]) for e in recent_exits(no_exits)] == [("chat", "oom")]


def test_render_fleet_shows_everything():
    console = Console(record=True, width=220, color_system=None)
    console.print(render(FLEET, "http://x:1/status"))
    text = console.export_text()
    for needle in ("NOT READY", "worker chat: no serving replica", "chat", "embed", "failed", "busy", "unloaded",
                   "forced_open", "oom, signal 9", "4242", "3.0 GiB", "5.0 GiB", "NVIDIA H100", "pressure soft",
                   "pending 5", "crash, code 1", "1h02m"):
        assert needle in text, needle


@pytest.mark.parametrize("data,problem", [
    ([], "top level is a list"),
    ({"worker": {}}, "no boolean 'ready'"),
    ({"ready": True}, "neither 'workers' nor 'worker'"),
    ({"ready": True, "workers": {"a": []}}, "workers.a is not an object"),
    ({"ready": True, "workers": {"a": {"replicas": {}}}}, "workers.a.replicas"),
    ({"ready": True, "worker": {}, "queue": []}, "'queue' is not an object"),
    ({"ready": True, "worker": {}, "exits": {}}, "'exits' is not a list"),
])
def test_shape_problems(data, problem):
    assert problem in shape_problem(data)


def test_shapes_that_are_fine():
    assert shape_problem(FLEET) is None
    assert shape_problem({"ready": False, "worker": {"state": "starting"}}) is None
    assert parse_status(json.dumps(FLEET).encode(), "application/json")["ready"] is False
