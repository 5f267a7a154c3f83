"""The container image's health check: GET /readyz of the daemon that a policy file describes.

    python -m supervisor.healthcheck --config /etc/gpu-supervisor/policy.yaml

Exit 0 when /readyz answers 200, 1 otherwise (not listening yet, no ready worker, draining), 2 when the
policy cannot be read. It asks the listener that serves /readyz (admin.listen when set, else listen), on
loopback when that listens on every interface, so it needs no curl in the image and no port of its own.
"""

from __future__ import annotations

import argparse
import http.client
import sys

from .config import ConfigError, Listen, load

DEFAULT_CONFIG = "/etc/gpu-supervisor/policy.yaml"
# a wildcard address is not one to connect to: its loopback twin reaches the same listener
LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def readyz_address(listen: Listen) -> tuple[str, int]:
    """Where to connect for /readyz, given the listener that serves it."""
    return LOOPBACK.get(listen.host, listen.host), listen.port


def probe(host: str, port: int, timeout_s: float) -> tuple[bool, str]:
    """(ready, what was seen): one GET /readyz on a connection of its own."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        body = resp.read(512).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"GET /readyz on {host}:{port}: {exc}"
    finally:
        conn.close()
    return resp.status == 200, f"GET /readyz on {host}:{port}: {resp.status} {body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"the daemon's policy file (default {DEFAULT_CONFIG})")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        settings = load(args.config).settings
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 2
    listener = settings.admin.listen or settings.listen
    if listener.port == 0:
        print("unhealthy: the policy listens on port 0 (one picked at start): nothing to probe", file=sys.stderr)
        return 2
    host, port = readyz_address(listener)
    ready, seen = probe(host, port, args.timeout)
    print(("healthy: " if ready else "unhealthy: ") + seen)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
