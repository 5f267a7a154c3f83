"""Proxy overhead: one trivial upstream process reached directly, through nginx and through gpu-supervisor.

The supervisor spawns the upstream as its worker (Unix socket in a known runtime dir, plus a TCP port
for the direct path); nginx proxies to that same socket with keep-alive. wrk drives each in turn, at
1 connection (latency) and at N connections (throughput). Prints a table and the ratios, and writes
bench/results/proxy.json.

    python bench/bench_proxy.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

from bench.common import free_port, nginx_conf, stop_all, wait_http, wrk  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--upstream", choices=("raw", "aiohttp"), default="raw",
                    help="raw: uvloop+httptools upstream (fastest); aiohttp: an aiohttp web.Server upstream")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or str(HERE / "results" / f"proxy-{args.upstream}.json")
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path("/usr/sbin/nginx").exists():
            print(f"{tool} is needed (apt-get install wrk nginx)", file=sys.stderr)
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    tmp = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    rundir = tmp / "run"
    direct_port, sup_port, nginx_port, aio_port = free_port(), free_port(), free_port(), free_port()
    policy = {
        "listen": {"host": "127.0.0.1", "port": sup_port},
        "runtime_dir": str(rundir),
        "worker": {"command": [PY, str(HERE / "trivial_upstream.py"), "--socket", "{socket}",
                               "--port", str(direct_port), "--impl", args.upstream],
                   "health": {"interval_s": 5, "timeout_s": 2, "failures": 3}},
        "queue": {"concurrency": 256, "max_size": 10000},
        "logging": {"format": "json", "level": "warning"},
    }
    (tmp / "policy.yaml").write_text(json.dumps(policy))
    procs: list[subprocess.Popen] = []
    try:
        sup = subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(tmp / "policy.yaml")], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=open(tmp / "supervisor.log", "w"))
        procs.append(sup)
        wait_http(f"http://127.0.0.1:{sup_port}/readyz")
        # the worker's socket is named <worker>-<replica>-<generation>.sock: the one in the runtime dir
        sock = next(rundir.glob("*.sock"))
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, sock, nginx_port))
        ng = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(ng)
        wait_http(f"http://127.0.0.1:{nginx_port}/")
        aio = subprocess.Popen([PY, str(HERE / "aiohttp_proxy.py"), "--socket", str(sock), "--port", str(aio_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(aio)
        wait_http(f"http://127.0.0.1:{aio_port}/")
        targets = {
            "direct": f"http://127.0.0.1:{direct_port}/hello",
            "nginx": f"http://127.0.0.1:{nginx_port}/hello",
            "aiohttp-proxy": f"http://127.0.0.1:{aio_port}/hello",
            "gpu-supervisor": f"http://127.0.0.1:{sup_port}/hello",
        }
        results: dict = {}
        for conns in (1, args.connections):
            for name, url in targets.items():
                wrk(url, conns, 1)  # warm-up: keep-alive pools, caches
                r = wrk(url, conns, args.duration)
                results.setdefault(name, {})[f"c{conns}"] = r
                print(f"{name:15s} c={conns:<3d} {r['rps']:>10.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                      f"p99 {r['p99_ms']:.3f} ms  non-2xx {r['non_2xx']}", flush=True)
        c = f"c{args.connections}"
        ratios = {
            "supervisor_vs_nginx_rps": results["gpu-supervisor"][c]["rps"] / results["nginx"][c]["rps"],
            "nginx_vs_direct_rps": results["nginx"][c]["rps"] / results["direct"][c]["rps"],
            "supervisor_vs_direct_rps": results["gpu-supervisor"][c]["rps"] / results["direct"][c]["rps"],
            "aiohttp_proxy_vs_nginx_rps": results["aiohttp-proxy"][c]["rps"] / results["nginx"][c]["rps"],
            "supervisor_vs_aiohttp_proxy_rps": results["gpu-supervisor"][c]["rps"] / results["aiohttp-proxy"][c]["rps"],
            "aiohttp_proxy_added_p50_ms_c1":
                results["aiohttp-proxy"]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"],
            "supervisor_added_p50_ms_c1": results["gpu-supervisor"]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"],
            "nginx_added_p50_ms_c1": results["nginx"]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"],
        }
        print()
        print(f"upstream: {args.upstream}")
        print(f"throughput at {args.connections} connections: supervisor/nginx = "
              f"{ratios['supervisor_vs_nginx_rps']:.2f}x, aiohttp-proxy/nginx = "
              f"{ratios['aiohttp_proxy_vs_nginx_rps']:.2f}x, supervisor/aiohttp-proxy = "
              f"{ratios['supervisor_vs_aiohttp_proxy_rps']:.2f}x, nginx/direct = {ratios['nginx_vs_direct_rps']:.2f}x")
        print(f"added p50 on one connection: supervisor {ratios['supervisor_added_p50_ms_c1']:.3f} ms, "
              f"aiohttp-proxy {ratios['aiohttp_proxy_added_p50_ms_c1']:.3f} ms, "
              f"nginx {ratios['nginx_added_p50_ms_c1']:.3f} ms")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"upstream": args.upstream, "results": results, "ratios": ratios,
                                   "duration_s": args.duration,
                                   "cpus": os.cpu_count()}, indent=1))
        print(f"wrote {out}")
        return 0
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
