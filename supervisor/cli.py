"""Command line: `gpu-supervisor run --config FILE` and `gpu-supervisor check-config FILE`."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, logs, status_cli
from . import config as cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu-supervisor", description="Keep a GPU model service alive and fair "
                                "under load: a priority queue, a circuit breaker and a worker supervisor "
                                "in front of any HTTP service on a Unix socket.")
    p.add_argument("--version", action="version", version=f"gpu-supervisor {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", "-c", default=None,
                   help="policy YAML file (default: $GPU_SUPERVISOR_CONFIG)")
    c = sub.add_parser("check-config", help="validate a policy file and print the effective config")
    c.add_argument("file")
    status_cli.add_parser(sub)
    sub.add_parser("schema", help="print the JSON Schema of the policy file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "status":
        return status_cli.main(args)
    if args.cmd == "schema":
        from .schema import render
        print(render(), end="")
        return 0
    if args.cmd == "check-config":
        try:
            loaded = cfg.load(args.file)
        except cfg.ConfigError as exc:
            print(f"{exc.source}: {len(exc.problems)} problem(s):", file=sys.stderr)
            for prob in exc.problems:
                print(f"  {prob}", file=sys.stderr)
            return 1
        print(f"# {loaded.source}: valid (sha256 {loaded.digest})")
        print(cfg.dump(loaded.settings), end="")
        return 0

    path = args.config or os.environ.get("GPU_SUPERVISOR_CONFIG")
    if not path:
        print("gpu-supervisor run: no config; pass --config FILE or set GPU_SUPERVISOR_CONFIG", file=sys.stderr)
        return 2
    try:
        loaded = cfg.load(path)
    except cfg.ConfigError as exc:
        print(f"{exc.source}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for prob in exc.problems:
            print(f"  {prob}", file=sys.stderr)
        return 1
    s = loaded.settings
    logs.configure(s.logging.format, s.logging.level)

    from .daemon import Environment, run  # aiohttp and friends only when running

    env = Environment(
        base_env=dict(os.environ),
        notify_socket=os.environ.get("NOTIFY_SOCKET"),
        watchdog_usec=os.environ.get("WATCHDOG_USEC"),
        watchdog_pid=os.environ.get("WATCHDOG_PID"),
        runtime_directory=os.environ.get("RUNTIME_DIRECTORY"),
        state_directory=os.environ.get("STATE_DIRECTORY"),
    )
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.base_env.pop(k, None)  # these are for us, not for the worker
    return run(loaded, env)
