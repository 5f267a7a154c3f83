"""Command line: `gpu-supervisor run --config FILE`, `check-config FILE`, `status`, `usage`, `schema`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from . import __version__, logs, status_cli, usage_cli
from . import config as cfg

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a command that SIGPIPE ended


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
    usage_cli.add_parser(sub)
    sub.add_parser("schema", help="print the JSON Schema of the policy file")
    return p


def _schema(args: argparse.Namespace) -> int:
    from .schema import render
    print(render(), end="")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        loaded = cfg.load(args.file, check_programs=True)
    except cfg.ConfigError as exc:
        print(f"{exc.source}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for prob in exc.problems:
            print(f"  {prob}", file=sys.stderr)
        return 1
    print(f"# {loaded.source}: valid (sha256 {loaded.digest})")
    print(cfg.dump(loaded.settings), end="")
    return 0


def _printing(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command that prints; a reader that went away (`| head`) ends it quietly, as SIGPIPE ends a
    C program. Python's advice: point the closed stream at /dev/null so that the flush at exit cannot
    fail again (and print a traceback)."""
    try:
        code = command(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # (argparse itself ignores a closed stdout for --help)
    printing = {"status": status_cli.main, "usage": usage_cli.main, "schema": _schema,
                "check-config": _check_config}
    if args.cmd in printing:
        return _printing(printing[args.cmd], args)

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
