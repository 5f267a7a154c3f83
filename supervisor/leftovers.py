"""Workers a killed daemon left behind: a pid file with start times, a guard that stops them when the
daemon dies, and the next daemon that stops whatever is still there before it starts its own.

The worker is spawned with PR_SET_PDEATHSIG (it gets SIGKILL when its daemon dies), which covers the
worker process itself, not what it started: gunicorn's worker processes, a server's engine processes
outlive their dead master (re-parented to pid 1) for as long as they take to notice. Each worker leads
its own session (start_new_session), so its tree is every process of that session or process group.
Each record is (pid, start time in clock ticks since boot): a pid that was reused by another process has
another start time and is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import structlog

log = structlog.get_logger("supervisor.leftovers")


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, process group, session, start time) from /proc/PID/stat, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        f = stat.rsplit(")", 1)[1].split()
        return f[0], int(f[2]), int(f[3]), int(f[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat), or None when it is gone."""
    st = _stat(pid)
    return st[3] if st is not None else None


def _running(pid: int, start: int | None) -> bool:
    """That very process (same start time) exists and is not a zombie (a dead one not yet reaped)."""
    st = _stat(pid)
    return st is not None and start is not None and st[3] == start and st[0] not in ("Z", "X")


def tree(leader: int, started: int) -> list[tuple[int, int]]:
    """(pid, start) of every running process of a worker's tree: the worker itself, and every process
    in its session or process group (it leads both), its orphans included once the worker is gone.

    A session's number stays taken while any process of it lives, so a process in session `leader`
    belongs to the worker's tree, unless the number was taken again after the whole tree ended: then
    a process with that pid and another start time leads the new session, and nothing is returned.
    """
    st = _stat(leader)
    if st is not None and st[3] != started:
        return []
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) <= 1:
                continue
            pid = int(entry.name)
            s = _stat(pid)
            if s is None or s[0] in ("Z", "X") or s[3] < started:
                continue
            if pid == leader or s[1] == leader or s[2] == leader:
                found.append((pid, s[3]))
    return found


def pid_file(state_dir: str, config_source: str) -> Path:
    """One file per configuration file: a daemon restarted with the same config finds its predecessor's."""
    digest = hashlib.sha256(os.path.abspath(config_source).encode()).hexdigest()[:12]
    return Path(state_dir) / f"workers-{digest}.json"


def boot_id() -> str | None:
    """This boot's id: start times count clock ticks since boot, so a record from another boot means nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def write(path: Path, daemon_pid: int, workers: list[int]) -> None:
    """Record this daemon and its live workers (atomically: a crash mid-write leaves the old file)."""
    recs = [{"pid": p, "start": t} for p in workers if (t := start_time(p)) is not None]
    data = {"boot_id": boot_id(), "daemon_pid": daemon_pid, "daemon_start": start_time(daemon_pid),
            "workers": recs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def reap(path: Path, own_pid: int, why: str = "left running by a daemon that was killed",
         wait_s: float = 5.0) -> list[int]:
    """SIGKILL every process of the worker trees a dead daemon recorded and wait (up to `wait_s`) until
    they are gone, so that their memory is free before anything starts again; returns their pids.
    A recorded daemon that still runs keeps its workers (two daemons on one config is its own problem,
    logged). Blocking (a walk of /proc, a wait): call it in a thread."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("boot_id") != boot_id():
        return []  # written before a reboot: its pids and start times may name anything now
    dpid, dstart = data.get("daemon_pid"), data.get("daemon_start")
    if isinstance(dpid, int) and dpid != own_pid and _running(dpid, dstart):
        log.warning("predecessor_alive", daemon_pid=dpid, pid_file=str(path),
                    hint="another daemon runs with this config; its workers are left alone")
        return []
    victims: dict[int, int] = {}
    for rec in data.get("workers", []):
        if not isinstance(rec, dict):
            continue
        pid, started = rec.get("pid"), rec.get("start")
        if isinstance(pid, int) and pid > 1 and isinstance(started, int):
            victims.update(tree(pid, started))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    left = list(victims.items())
    while left and time.monotonic() < deadline:
        time.sleep(0.01)  # (a thread or the guard: never the event loop)
        left = [(p, t) for p, t in left if _running(p, t)]
    if victims:
        log.warning("stale_workers_killed", pids=sorted(victims), pid_file=str(path), why=why,
                    still_running=[p for p, _ in left] or None)
    return sorted(victims)


# -- the guard -------------------------------------------------------------------------------------
# The guard runs the same code as the daemon: the daemon's interpreter and environment, this package's
# own directory first on its path, the working directory not on it (-P: never another `supervisor`).
GUARD_CODE = "import sys; sys.path.insert(0, sys.argv[1]); from supervisor.leftovers import guard_main; guard_main()"
GUARD_MAX_PAUSE_S = 60.0
STOP = b"stop\n"  # the daemon's last word on a clean exit: its workers are stopped, nothing to do


def guard_main(argv: list[str] | None = None) -> None:
    """The guard process: wait for the daemon's end of the pipe (stdin) to close; without STOP first, the
    daemon died (kill -9, a crash): stop its workers' trees as the next daemon would, at once."""
    from . import logs

    pid_path, fmt, level = (argv if argv is not None else sys.argv[2:])[:3]
    logs.configure(fmt, level)
    daemon = os.getppid()
    data = sys.stdin.buffer.read()  # returns once no process holds the write end: the daemon exited
    if data.endswith(STOP):
        return
    # its pipe closes before it is a zombie: wait until it is (we are re-parented then), so that reap
    # sees a dead daemon and not a running one
    deadline = time.monotonic() + 5.0
    while os.getppid() == daemon and time.monotonic() < deadline:
        time.sleep(0.005)
    reap(Path(pid_path), os.getpid(), why="its daemon died")
