"""What the benchmark scripts share: ports, percentiles, nginx in front of a Unix socket, wrk."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

NGINX_CONF = """
user {user};
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log error;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream worker {{ server unix:{sock}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://worker;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_connect_timeout {timeout_ms}ms;
            proxy_send_timeout {timeout_ms}ms;
            proxy_read_timeout {timeout_ms}ms;
        }}
    }}
}}
"""


def nginx_conf(tmp: Path, sock: Path | str, port: int, timeout: float = 60) -> str:
    """One nginx worker proxying 127.0.0.1:port to a Unix socket with kept-alive connections."""
    # in whole milliseconds: nginx refuses a fractional "2.0s"
    return NGINX_CONF.format(tmp=tmp, sock=sock, port=port, timeout_ms=round(timeout * 1000),
                             user=pwd.getpwuid(os.getuid()).pw_name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200; raises after `timeout`, or at once if `proc` (the server) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: its server exited (code {proc.returncode}) before answering")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile, interpolated; NaN for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (a procfs read; Linux only); 0.0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_wrk(out: str) -> dict:
    def dur(v: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s|m)", v)
        n, u = float(m.group(1)), m.group(2)
        return n * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[u]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    done = re.search(r"(\d+) requests in", out)
    return {"rps": rps, "requests": int(done.group(1)) if done else 0, "p50_ms": dur(lat["50"]),
            "p99_ms": dur(lat["99"]), "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sock_err.group(1) if sock_err else None}


def wrk(url: str, connections: int, duration: int, script: Path | None = None, timeout_s: int | None = None) -> dict:
    """One wrk run, one thread; `script`: a Lua file for `-s` (method, body, headers); `timeout_s`: wrk's
    per-request timeout (its default is 2 s)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    if timeout_s is not None:
        cmd += ["--timeout", f"{timeout_s}s"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    return parse_wrk(out)


def stop_all(procs: list[subprocess.Popen], tmp: Path | None = None) -> None:
    """SIGTERM in reverse start order, SIGKILL what is left after 30 s; then remove `tmp`."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def save_results(res: dict, default: Path, out: Path | None = None) -> Path:
    """Stamp the run with the machine and the time, and write it as JSON (to `out`, else `default`)."""
    import json
    import platform

    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                      "loadavg_after": os.getloadavg()}
    res["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = out or default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    return path
