"""`gpu-supervisor status`: fetch a running daemon's /status and show it (rich tables, or raw JSON).

Exit codes: 0 ready, 1 not ready, 2 unreachable or an answer that is not a gpu-supervisor /status.
Every failure is one line on stderr; the request uses only the standard library (http.client).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_ENV = "GPU_SUPERVISOR_TOKEN"
MAX_BODY = 8 * 1024 * 1024  # a /status is a few KiB; more is not ours
EXIT_READY, EXIT_NOT_READY, EXIT_UNREACHABLE = 0, 1, 2
STATE_STYLE = {
    "ready": "green", "busy": "cyan", "starting": "yellow", "draining": "yellow", "stopping": "yellow",
    "backoff": "magenta", "failed": "bold red", "stopped": "dim", "unloaded": "dim",
    "closed": "green", "half_open": "yellow", "open": "red", "forced_open": "bold red",
    "ok": "green", "soft": "yellow", "hard": "red", "critical": "bold red",
}


class StatusError(Exception):
    """The daemon could not be asked, or its answer is not a /status: one line for stderr."""

    command = "status"  # the subcommand whose error this is (the line's prefix)

    def line(self, command: str | None = None) -> str:
        """The message on one line of printable text, whatever the server sent."""
        text = "".join(c if c.isprintable() else " " for c in str(self))
        return f"gpu-supervisor {command or self.command}: " + " ".join(text.split())[:500]


# -- fetching ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    shown: str  # the URL as we report it


def parse_url(url: str) -> Target:
    """`http://host:port[/prefix]` -> where to send GET .../status. Raises StatusError on a bad URL."""
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise StatusError(f"--url {url!r}: only http:// and https:// URLs are supported")
    try:
        port = parts.port
    except ValueError:
        raise StatusError(f"--url {url!r}: the port is not a number in 0..65535") from None
    if not parts.hostname:
        raise StatusError(f"--url {url!r}: no host")
    path = parts.path.rstrip("/")
    if not path.endswith("/status"):
        path += "/status"
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    shown = f"{parts.scheme}://{'[' + host + ']' if ':' in host else host}:{port}{path}"
    return Target(parts.scheme, host, port, path, shown)


def read_token(token_file: str | None, env: dict[str, str]) -> str | None:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise StatusError(f"--token-file {token_file}: cannot read it: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise StatusError(f"--token-file {token_file}: not UTF-8 text") from None
        if not token:
            raise StatusError(f"--token-file {token_file}: the file is empty")
        return token
    return env.get(TOKEN_ENV, "").strip() or None


def get(target: Target, token: str | None, timeout: float, agent: str,
        max_body: int = MAX_BODY) -> tuple[http.client.HTTPResponse, bytes]:
    """GET the target within `timeout` seconds in all: the answer and its body (at most `max_body`
    bytes); StatusError for what kept an answer from coming, and for a 401 (saying what to pass)."""
    deadline = time.monotonic() + timeout
    cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    conn = cls(target.host, target.port, timeout=timeout)
    headers = {"Accept": "application/json", "User-Agent": agent}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    where = target.shown
    try:
        conn.request("GET", target.path, headers=headers)
        resp = conn.getresponse()
        body = _read_bounded(resp, deadline, where, max_body)
    except TimeoutError:
        raise StatusError(f"{where}: no answer within {timeout:g}s (is it a gpu-supervisor daemon?)") from None
    except ConnectionRefusedError:
        raise StatusError(f"{where}: connection refused (is the daemon running and listening there?)") from None
    except socket.gaierror as exc:
        raise StatusError(f"{where}: cannot resolve host {target.host!r}: {exc.strerror or exc}") from None
    except ssl.SSLError as exc:
        raise StatusError(f"{where}: TLS error: {exc.reason or exc}") from None
    except http.client.HTTPException as exc:
        raise StatusError(f"{where}: not an HTTP answer ({type(exc).__name__}: {str(exc)[:80]!r})") from None
    except OSError as exc:
        raise StatusError(f"{where}: cannot connect: {exc.strerror or exc}") from None
    finally:
        conn.close()
    if resp.status == 401:
        if token:
            raise StatusError(f"{where}: 401 Unauthorized: the daemon refused the token (check admin.token_file)")
        raise StatusError(f"{where}: 401 Unauthorized: the daemon needs a token; pass --token-file FILE "
                          f"(its admin.token_file) or set {TOKEN_ENV}")
    return resp, body


def fetch(target: Target, token: str | None, timeout: float) -> dict:
    """GET the daemon's /status within `timeout` seconds in all; the parsed, shape-checked JSON."""
    resp, body = get(target, token, timeout, "gpu-supervisor-status")
    if resp.status != 200:
        raise StatusError(f"{target.shown}: HTTP {resp.status} {resp.reason}: not a gpu-supervisor /status "
                          f"(wrong port? with admin.listen set, /status is on the admin listener)")
    return parse_status(body, resp.getheader("Content-Type", ""), target.shown)


def _read_bounded(resp: http.client.HTTPResponse, deadline: float, where: str, max_body: int) -> bytes:
    """The body, but never more than `max_body` bytes nor past the deadline (a server that trickles)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        chunk = resp.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_body:
            raise StatusError(f"{where}: the answer is larger than {max_body // 1048576} MiB")
        chunks.append(chunk)


def parse_status(body: bytes, content_type: str, where: str = "/status") -> dict:
    """Decode and shape-check a /status body; StatusError saying what is wrong with it."""
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        stripped = text.lstrip().lower()
        if stripped.startswith(("<!doctype html", "<html")) or "text/html" in content_type.lower():
            raise StatusError(f"{where}: answered an HTML page, not /status JSON "
                              f"(a proxy or another service on that port?)") from None
        raise StatusError(f"{where}: answered something that is not JSON "
                          f"({content_type or 'no Content-Type'}, {len(body)} bytes)") from None
    problem = shape_problem(data)
    if problem:
        raise StatusError(f"{where}: JSON that is not a gpu-supervisor /status: {problem}")
    return data


def shape_problem(data: Any) -> str | None:
    """What keeps `data` from being a /status this tool can show (None: nothing)."""
    if not isinstance(data, dict):
        return f"the top level is a {type(data).__name__}, not an object"
    if not isinstance(data.get("ready"), bool):
        return "no boolean 'ready'"
    workers = data.get("workers")
    if workers is not None:
        if not isinstance(workers, dict):
            return "'workers' is not an object"
        for name, w in workers.items():
            if not isinstance(w, dict):
                return f"workers.{name} is not an object"
            reps = w.get("replicas", [])
            if not isinstance(reps, list) or not all(isinstance(r, dict) for r in reps):
                return f"workers.{name}.replicas is not a list of objects"
    elif not isinstance(data.get("worker"), dict):
        return "neither 'workers' nor 'worker' is an object"
    for key in ("queue", "breaker", "gpu", "jobs", "config"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"'{key}' is not an object"
    for key in ("not_ready_because", "exits"):
        if data.get(key) is not None and not isinstance(data[key], list):
            return f"'{key}' is not a list"
    return None


def exit_code(status: dict) -> int:
    return EXIT_READY if status.get("ready") is True else EXIT_NOT_READY


# -- reading the two shapes of /status ------------------------------------------------------------------
def worker_rows(status: dict) -> list[dict]:
    """One row per (worker, replica): from `workers` when present, else the single `worker` as `default`."""
    rows = []
    workers = status.get("workers")
    if isinstance(workers, dict) and workers:
        for name, w in workers.items():
            reps = w.get("replicas") or []
            if not reps:
                rows.append({"worker": name, "replica": None, "state": w.get("state", "-")})
            for i, r in enumerate(reps):
                rows.append({"worker": name, "replica": r.get("index", i), **r})
        return rows
    w = status.get("worker") or {}
    return [{"worker": "default", "replica": 0, **w, "breaker": status.get("breaker")}]


def recent_exits(status: dict, limit: int = 8) -> list[dict]:
    """`exits` (newest last) when the daemon keeps them, else each replica's last_exit."""
    exits = status.get("exits")
    if isinstance(exits, list):
        return [e for e in exits if isinstance(e, dict)][-limit:]
    out = []
    for row in worker_rows(status):
        le = row.get("last_exit")
        if isinstance(le, dict):
            out.append({"worker": row["worker"], "replica": row["replica"], **le})
    return out[-limit:]


# -- rendering ------------------------------------------------------------------------------------------
def fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool) or n <= 0:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_duration(s: Any) -> str:
    if not isinstance(s, int | float) or isinstance(s, bool):
        return "-"
    s = int(s)
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def fmt_exit(e: Any) -> str:
    if not isinstance(e, dict):
        return "-"
    parts = [str(e.get("reason", "?"))]
    if e.get("signal") not in (None, 0, ""):
        parts.append(f"signal {e['signal']}")
    elif e.get("code") is not None:
        parts.append(f"code {e['code']}")
    if e.get("at"):
        parts.append(f"at {e['at']}")
    return ", ".join(parts)


def _cell(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _styled(value: Any) -> Any:
    from rich.text import Text
    text = _cell(value)
    return Text(text, style=STATE_STYLE.get(text, ""))


def render(status: dict, url: str) -> Any:
    """Everything in one rich renderable (a Group of a header and tables)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    ready = status.get("ready") is True
    head = Text()
    head.append("READY" if ready else "NOT READY", style="bold green" if ready else "bold red")
    head.append(f"  gpu-supervisor {_cell(status.get('version'))} at {url}, up {fmt_duration(status.get('uptime_s'))}")
    cfgd = status.get("config")
    if isinstance(cfgd, dict):
        head.append(f", config {_cell(cfgd.get('source'))} (generation {_cell(cfgd.get('generation'))})")
    if status.get("accepting") is False:
        head.append("  draining", style="yellow")
    parts.append(head)
    for reason in status.get("not_ready_because") or []:
        parts.append(Text(f"  not ready: {reason}", style="red"))

    wt = Table(title="workers", title_justify="left", expand=False)
    for col in ("worker", "replica", "gpu", "state", "pid", "rss", "gpu mem", "inflight", "served",
                "restarts", "breaker", "last exit"):
        wt.add_column(col, overflow="fold")
    for r in worker_rows(status):
        br = r.get("breaker")
        wt.add_row(
            _cell(r["worker"]), _cell(r.get("replica")), _cell(r.get("gpu")), _styled(r.get("state")),
            _cell(r.get("pid")), fmt_bytes(r.get("rss_bytes")), fmt_bytes(r.get("gpu_memory_bytes")),
            _cell(r.get("inflight")), _cell(r.get("served", r.get("requests_served"))), _cell(r.get("restarts")),
            _styled(br.get("state")) if isinstance(br, dict) else "-", fmt_exit(r.get("last_exit")),
        )
    parts.append(wt)

    q = status.get("queue")
    if isinstance(q, dict):
        qt = Table(title="queue", title_justify="left")
        qt.add_column("worker", overflow="fold")
        depth = q.get("depth") if isinstance(q.get("depth"), dict) else {}
        levels = list(depth)
        for lv in levels:
            qt.add_column(str(lv), justify="right")
        qt.add_column("total", justify="right")
        qt.add_column("inflight / slots", justify="right")
        per_worker = status.get("workers") if isinstance(status.get("workers"), dict) else {}
        for name, w in per_worker.items():
            wq = w.get("queue")
            if isinstance(wq, dict):
                wd = wq.get("depth") if isinstance(wq.get("depth"), dict) else {}
                qt.add_row(str(name), *[_cell(wd.get(lv, 0)) for lv in levels], _cell(wq.get("total")),
                           f"{_cell(wq.get('inflight'))} / {_cell(wq.get('concurrency'))}")
        qt.add_row("all" if per_worker else "default", *[_cell(depth.get(lv)) for lv in levels], _cell(q.get("total")),
                   f"{_cell(q.get('inflight'))} / {_cell(q.get('concurrency'))}", style="bold" if per_worker else "")
        parts.append(qt)
        pools = q.get("pools")
        if isinstance(pools, dict) and len(pools) > 1:
            pool_line = ", ".join(f"{n}: {_cell(p.get('inflight'))}/{_cell(p.get('concurrency'))} busy, "
                                  f"{_cell(p.get('waiting'))} waiting"
                                  for n, p in pools.items() if isinstance(p, dict))
            parts.append(Text(f"pools: {pool_line}"))

    b = status.get("breaker")
    if isinstance(b, dict):
        line = Text("breaker: ")
        line.append_text(_styled(b.get("state")))
        line.append(f", failure rate {_cell(b.get('failure_rate'))}, retry after {_cell(b.get('retry_after_s'))} s")
        parts.append(line)

    g = status.get("gpu")
    if isinstance(g, dict):
        line = Text(f"gpu: {'available' if g.get('available') else 'not available (no NVML)'}, pressure ")
        line.append_text(_styled(g.get("pressure")))
        parts.append(line)
        devs = [d for d in g.get("devices") or [] if isinstance(d, dict)]
        if devs:
            gt = Table(title="gpus", title_justify="left")
            for col in ("gpu", "name", "used", "total", "util"):
                gt.add_column(col, overflow="fold")
            for d in devs:
                util = d.get("utilization")
                gt.add_row(_cell(d.get("index")), _cell(d.get("name")), fmt_bytes(d.get("memory_used_bytes")),
                           fmt_bytes(d.get("memory_total_bytes")),
                           f"{util:.0%}" if isinstance(util, int | float) and util <= 1 else _cell(util))
            parts.append(gt)
        ledger = [x for x in g.get("ledger") or [] if isinstance(x, dict)]
        if ledger:
            parts.append(Text("ledger: " + "; ".join(
                f"gpu {_cell(x.get('gpu'))}: held {fmt_bytes(x.get('held_bytes'))} of "
                f"{fmt_bytes(x.get('capacity_bytes'))}, free {fmt_bytes(x.get('free_bytes'))}" for x in ledger)))

    exits = recent_exits(status)
    if exits:
        et = Table(title="recent worker exits", title_justify="left")
        for col in ("worker", "replica", "exit"):
            et.add_column(col, overflow="fold")
        for e in exits:
            et.add_row(_cell(e.get("worker")), _cell(e.get("replica")), fmt_exit(e))
        parts.append(et)

    jobs = status.get("jobs")
    if isinstance(jobs, dict):
        parts.append(Text("jobs: " + ", ".join(f"{k} {_cell(v)}" for k, v in jobs.items()
                                                if not isinstance(v, dict | list))))
    return Group(*parts)


# -- the command ------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="show a running daemon's status (exit 0 ready, 1 not ready, 2 unreachable)")
    p.add_argument("--url", default=DEFAULT_URL,
                   help=f"the daemon's (or its admin.listen's) base URL (default {DEFAULT_URL})")
    p.add_argument("--json", action="store_true", help="print the raw /status JSON")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default 2)")
    p.add_argument("--count", type=int, default=0, help="with --watch: stop after this many refreshes (0 = no limit)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    p.add_argument("--token-file", default=None, help=f"file with the admin token (default: ${TOKEN_ENV})")


def main(args: argparse.Namespace, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    try:
        if args.interval <= 0 or args.timeout <= 0 or args.count < 0:
            raise StatusError("--interval and --timeout must be > 0, --count >= 0")
        target = parse_url(args.url)
        token = read_token(args.token_file, env)
    except StatusError as exc:
        print(exc.line(), file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.watch:
        return _watch(args, target, token)
    try:
        status = fetch(target, token, args.timeout)
    except StatusError as exc:
        print(exc.line(), file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        rich_console().print(render(status, target.shown))
    return exit_code(status)


def rich_console(width: int = 200) -> Any:
    """A rich console; off a terminal (a pipe, a log) `width` wide, so that tables keep one line per row."""
    from rich.console import Console
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else width
    return Console(soft_wrap=False, width=wide)


def _watch(args: argparse.Namespace, target: Target, token: str | None) -> int:
    """Refresh every --interval seconds until Ctrl-C (or --count refreshes); the last result's exit code."""
    from rich.live import Live
    from rich.rule import Rule
    from rich.text import Text

    code = EXIT_UNREACHABLE
    n = 0
    console = rich_console()
    # a terminal gets one view updated in place; a pipe or a log gets each refresh in turn
    live_view = not args.json and console.is_terminal
    try:
        with Live(console=console, auto_refresh=False) if live_view else contextlib.nullcontext() as live:
            while True:
                t0 = time.monotonic()
                try:
                    status = fetch(target, token, args.timeout)
                    code = exit_code(status)
                    view: Any = render(status, target.shown)
                    if args.json:
                        print(json.dumps(status, separators=(",", ":")), flush=True)
                except StatusError as exc:
                    code = EXIT_UNREACHABLE
                    view = Text(f"{exc.line()} (retrying every {args.interval:g}s)", style="red")
                    if args.json:
                        print(exc.line(), file=sys.stderr, flush=True)
                if live is not None:
                    live.update(view, refresh=True)
                elif not args.json:
                    console.print(Rule(time.strftime("%H:%M:%S")), view)
                n += 1
                if args.count and n >= args.count:
                    break
                # (a synchronous command-line loop, not the daemon: a plain wait between refreshes)
                time.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        pass
    return code


__all__ = ["main", "add_parser", "fetch", "parse_url", "parse_status", "shape_problem", "worker_rows",
           "recent_exits", "render", "StatusError"]
