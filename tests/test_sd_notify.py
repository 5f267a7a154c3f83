"""systemd's notify protocol: the Notifier on its own, and the real daemon talking to a socket we own."""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid
from pathlib import Path

import pytest
import structlog

from supervisor.sd_notify import Notifier
from tests.harness import fast_config, wait_until


# -- Notifier, no daemon ----------------------------------------------------------------------------
def _abstract_receiver() -> tuple[socket.socket, str]:
    name = f"gs-test-{uuid.uuid4().hex}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0" + name)
    rx.settimeout(5)
    return rx, "@" + name


def test_abstract_address_reaches_the_socket():
    rx, addr = _abstract_receiver()
    with rx:
        n = Notifier(addr)
        assert n.enabled
        assert n.send("READY=1", "STATUS=worker ready")
        assert rx.recv(4096) == b"READY=1\nSTATUS=worker ready"
        assert n.send("WATCHDOG=1")
        assert rx.recv(4096) == b"WATCHDOG=1"
        n.close()


def test_path_address_reaches_the_socket(tmp_path: Path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(5)
        n = Notifier(path)
        assert n.send("STOPPING=1")
        assert rx.recv(4096) == b"STOPPING=1"
        n.close()


def test_without_notify_socket_it_does_nothing():
    n = Notifier(None, "1000000", None, 42)
    assert not n.enabled
    assert n.send("READY=1") is False
    assert n.watchdog_s == 1.0  # the interval is still parsed; the daemon pings only when enabled


@pytest.mark.parametrize(("usec", "wd_pid", "pid", "expected"), [
    ("2000000", None, 7, 2.0),
    ("2000000", "7", 7, 2.0),
    ("2000000", "8", 7, None),  # the watchdog is meant for another process
    ("0", None, 7, None),
    ("garbage", None, 7, None),
    (None, None, 7, None),
])
def test_watchdog_interval(usec, wd_pid, pid, expected):
    assert Notifier("@x", usec, wd_pid, pid).watchdog_s == expected


def test_unreachable_socket_warns_once(tmp_path: Path):
    n = Notifier(str(tmp_path / "nobody-listens"))
    with structlog.testing.capture_logs() as logs:
        assert n.send("READY=1") is False
        assert n.send("STATUS=again") is False
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    n.close()


# -- the daemon against a socket the test owns ------------------------------------------------------
class NotifyListener:
    """A datagram socket standing in for systemd: every message, in order, as a dict of fields."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append(fields)

    def index(self, key: str, value: str | None = None, after: int = -1) -> int | None:
        for i, m in enumerate(self.messages):
            if i > after and key in m and (value is None or m[key] == value):
                return i
        return None

    def count(self, key: str) -> int:
        return sum(1 for m in self.messages if key in m)

    async def wait(self, key: str, value: str | None = None, after: int = -1, timeout: float = 15.0) -> int:
        return await wait_until(lambda: self.index(key, value, after), timeout, f"sd_notify {key}={value or '*'}")

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
async def listener(tmp_path: Path):
    lst = NotifyListener(str(tmp_path / "notify.sock"))
    yield lst
    lst.close()


async def test_daemon_notify_lifecycle(supervisor_factory, listener: NotifyListener):
    # health answers 503 for a while, so "listening" and "worker ready" are far apart
    cfg = fast_config(worker={"env": {"CTL_READY_DELAY": "1.0"}})
    sp = await supervisor_factory(cfg, wait_ready=False,
                                  env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "400000"})

    # READY=1 only once the worker is ready: whenever READY=1 had arrived before we asked, the
    # supervisor must already say ready.
    async def ready_notified() -> bool:
        seen = listener.index("READY", "1") is not None
        status = await sp.status()
        if seen:
            assert status["ready"] and status["worker"]["state"] in ("ready", "busy"), status
        return seen

    await wait_until(ready_notified, 20, "READY=1")
    ready = listener.messages[listener.index("READY", "1")]
    assert "worker ready" in ready["STATUS"] and "breaker closed" in ready["STATUS"], ready

    # the worker must not inherit the notify socket (NotifyAccess=main would reject it anyway)
    wpid = (await sp.status())["worker"]["pid"]
    environ = Path(f"/proc/{wpid}/environ").read_bytes().split(b"\0")
    assert not any(e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC=")) for e in environ)

    # WATCHDOG=1 from the event loop at half the 0.4 s interval: count pings, do not time them
    base = listener.count("WATCHDOG")
    await wait_until(lambda: listener.count("WATCHDOG") >= base + 5, 15, "5 more watchdog pings")

    # SIGHUP: RELOADING=1 (with MONOTONIC_USEC) then READY=1
    mark = len(listener.messages) - 1
    sp.signal(signal.SIGHUP)
    i_rel = await listener.wait("RELOADING", "1", after=mark)
    assert int(listener.messages[i_rel]["MONOTONIC_USEC"]) > 0
    i_ready = await listener.wait("READY", "1", after=i_rel)
    assert "STATUS" in listener.messages[i_ready]
    await sp.wait_log("config_reloaded")

    # an invalid file: still RELOADING=1 then READY=1 (the old config stays), and a STATUS that says so
    sp.write_config("queue: {concurrency: -3}\n")
    mark = len(listener.messages) - 1
    sp.signal(signal.SIGHUP)
    i_rel = await listener.wait("RELOADING", "1", after=mark)
    i_ready = await listener.wait("READY", "1", after=i_rel)
    assert "reload failed" in listener.messages[i_ready]["STATUS"]

    # SIGTERM: STOPPING=1, then a clean exit
    mark = len(listener.messages) - 1
    sp.signal(signal.SIGTERM)
    i_stop = await listener.wait("STOPPING", "1", after=mark)
    assert listener.messages[i_stop].get("STATUS", "").startswith("draining")
    assert await sp.wait_exit(30) == 0
