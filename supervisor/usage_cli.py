"""`gpu-supervisor usage`: one client's usage from a running daemon's /usage, as a rich table or raw JSON.

Exit codes: 0 shown, 2 the daemon could not be asked or refused the question (one line on stderr).
The request uses only the standard library (http.client), as `gpu-supervisor status` does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from .status_cli import DEFAULT_URL, TOKEN_ENV, StatusError, Target, get, parse_url, read_token, rich_console

EXIT_OK, EXIT_FAILED = 0, 2
MAX_BODY = 64 * 1024 * 1024      # a week of minute rows for a few models is a few MiB
AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PERIOD_FORMAT = {"minute": "%Y-%m-%d %H:%M", "hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d"}


class UsageError(StatusError):
    """The daemon could not be asked, or it refused: one line for stderr."""

    command = "usage"


def parse_since(raw: str | None, now: float) -> float | None:
    """`--since`: unix seconds, or a time ago (`90m`, `24h`, `7d`); None: all the daemon keeps."""
    if raw is None:
        return None
    m = AGO.match(raw.strip())
    if m:
        return max(0.0, now - float(m.group(1)) * UNIT_S[m.group(2)])
    try:
        since = float(raw)
    except ValueError:
        raise UsageError(f"--since {raw!r}: give unix seconds (1700000000) or a time ago (90m, 24h, 7d)") from None
    if not since >= 0:
        raise UsageError(f"--since {raw!r}: must be >= 0")
    return since


def usage_target(url: str, key: str, since: float | None, group_by: str) -> Target:
    """Where to send GET .../usage?key=...: the base URL as `status` reads it, with our path and query."""
    try:
        t = parse_url(url)
    except StatusError as exc:
        raise UsageError(str(exc)) from None
    base = t.path.removesuffix("/status")
    query = {"key": key, "group_by": group_by} | ({"since": f"{since:.0f}"} if since is not None else {})
    path = f"{base}/usage?{urlencode(query)}"
    return Target(t.scheme, t.host, t.port, path, t.shown.removesuffix("/status") + "/usage")


def fetch(target: Target, token: str | None, timeout: float) -> dict:
    """GET /usage within `timeout` seconds; the parsed, shape-checked answer."""
    try:
        resp, body = get(target, token, timeout, "gpu-supervisor-usage", MAX_BODY)
    except StatusError as exc:
        raise UsageError(str(exc)) from None
    if resp.status != 200:
        raise UsageError(f"{target.shown}: HTTP {resp.status}: {_error_message(body) or resp.reason}")
    return parse_usage(body, target.shown)


def _error_message(body: bytes) -> str | None:
    """The message of the daemon's error JSON, when the body is one."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return str(err.get("message")) if isinstance(err, dict) and err.get("message") else None


def parse_usage(body: bytes, where: str = "/usage") -> dict:
    """Decode and shape-check a /usage body."""
    try:
        data = json.loads(body)
    except ValueError:
        raise UsageError(f"{where}: answered something that is not JSON ({len(body)} bytes)") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("total"), dict):
        raise UsageError(f"{where}: JSON that is not a gpu-supervisor /usage (no rows and total)")
    if not all(isinstance(r, dict) for r in data["rows"]):
        raise UsageError(f"{where}: rows is not a list of objects")
    return data


def period(start: Any, group_by: str) -> str:
    """A period's start as UTC text at the period's precision."""
    if not isinstance(start, int | float) or isinstance(start, bool):
        return "-"
    fmt = PERIOD_FORMAT.get(group_by, PERIOD_FORMAT["minute"])
    return datetime.fromtimestamp(start, UTC).strftime(fmt)


def render(usage: dict, where: str) -> Any:
    """A header line and one table: a row per (period, model), then the total."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    group_by = str(usage.get("group_by", "minute"))
    since = usage.get("since")
    head = Text(f"usage of {usage.get('key')!s} by {group_by} (UTC)", style="bold")
    if isinstance(since, int | float) and since > 0:
        head.append(f" since {datetime.fromtimestamp(since, UTC):%Y-%m-%d %H:%M:%S}", style="")
    head.append(f"  from {where}", style="dim")
    t = Table(title_justify="left")
    t.add_column(group_by)
    t.add_column("model", overflow="fold")
    for col in ("requests", "input tokens", "output tokens"):
        t.add_column(col, justify="right")
    for r in usage["rows"]:
        t.add_row(period(r.get("period_start"), group_by), str(r.get("model") if r.get("model") is not None else "-"),
                  *(str(r.get(k, "-")) for k in ("requests", "input_tokens", "output_tokens")))
    total = usage["total"]
    t.add_section()
    t.add_row("total", "", *(str(total.get(k, "-")) for k in ("requests", "input_tokens", "output_tokens")),
              style="bold")
    return Group(head, t)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("usage", help="show one client's usage (requests and tokens) from a running daemon")
    p.add_argument("--key", required=True, help="the client's key value, as the client sends it "
                   "(the queue.fairness.key header's value, or its address)")
    p.add_argument("--since", default=None, help="unix seconds, or a time ago: 90m, 24h, 7d "
                   "(default: all the daemon keeps, clients.retention_s)")
    p.add_argument("--group-by", choices=("minute", "hour", "day"), default="hour", help="period of a row "
                   "(default hour)")
    p.add_argument("--url", default=DEFAULT_URL,
                   help=f"the daemon's (or its admin.listen's) base URL (default {DEFAULT_URL})")
    p.add_argument("--token-file", default=None, help=f"file with the admin token (default: ${TOKEN_ENV})")
    p.add_argument("--json", action="store_true", help="print the raw /usage JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")


def main(args: argparse.Namespace, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    try:
        if args.timeout <= 0:
            raise UsageError("--timeout must be > 0")
        if not args.key:
            raise UsageError("--key must not be empty")
        target = usage_target(args.url, args.key, parse_since(args.since, time.time()), args.group_by)
        usage = fetch(target, read_token(args.token_file, env), args.timeout)
    except StatusError as exc:  # (a UsageError is one)
        print(exc.line("usage"), file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(usage, indent=1))
    else:
        rich_console(160).print(render(usage, target.shown))
    return EXIT_OK


__all__ = ["main", "add_parser", "fetch", "parse_since", "parse_usage", "render", "usage_target", "UsageError"]
