"""Workers a killed daemon left behind: a pid file with start times, and stopping them at the next start.

The worker is spawned with PR_SET_PDEATHSIG (it gets SIGKILL when its daemon dies), which covers the
worker itself; this file covers what that cannot (a platform without setpriv, a worker's own children
that left its process group). Each record is (pid, start time in clock ticks since boot): a pid that was
reused by another process has another start time and is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from pathlib import Path

import structlog

log = structlog.get_logger("supervisor.leftovers")


def start_time(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def pid_file(state_dir: str, config_source: str) -> Path:
    """One file per configuration file: a daemon restarted with the same config finds its predecessor's."""
    digest = hashlib.sha256(os.path.abspath(config_source).encode()).hexdigest()[:12]
    return Path(state_dir) / f"workers-{digest}.json"


def write(path: Path, daemon_pid: int, workers: list[int]) -> None:
    """Record this daemon and its live workers (atomically: a crash mid-write leaves the old file)."""
    recs = [{"pid": p, "start": t} for p in workers if (t := start_time(p)) is not None]
    data = {"daemon_pid": daemon_pid, "daemon_start": start_time(daemon_pid), "workers": recs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def reap(path: Path, own_pid: int) -> list[int]:
    """Kill (SIGKILL, with their process groups) the workers a dead predecessor recorded; returns their
    pids. A predecessor that is still alive keeps its workers (two daemons on one config is its own
    problem, logged)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    dpid, dstart = data.get("daemon_pid"), data.get("daemon_start")
    if isinstance(dpid, int) and dpid != own_pid and dstart is not None and start_time(dpid) == dstart:
        log.warning("predecessor_alive", daemon_pid=dpid, pid_file=str(path),
                    hint="another daemon runs with this config; its workers are left alone")
        return []
    killed = []
    for rec in data.get("workers", []):
        if not isinstance(rec, dict):
            continue
        pid, started = rec.get("pid"), rec.get("start")
        if not isinstance(pid, int) or pid <= 1 or start_time(pid) != started or started is None:
            continue  # gone, or the pid now belongs to another process
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    if killed:
        log.warning("stale_workers_killed", pids=killed, pid_file=str(path),
                    why="left running by a daemon that was killed")
    return killed
