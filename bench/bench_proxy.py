"""Proxy overhead: one trivial upstream process reached directly, through nginx, through gpu-supervisor and LiteLLM.

The supervisor spawns the upstream (bench/trivial_upstream.py, a fake OpenAI server) as its worker (Unix
socket in a known runtime dir, plus a TCP port for the direct path); nginx proxies to that same socket with
keep-alive, and so do the bare aiohttp proxy (the baseline) and the floor (bench/floor_proxy.py: the
daemon's own HTTP server and upstream pool forwarding with no bookkeeping at all, so the gap between it and
gpu-supervisor is what the request path's admission, queue, routing, breaker and metrics cost). wrk drives
each in turn, at 1 connection (latency) and at N connections (throughput), in two scenarios:

- get: `GET /hello` to direct, nginx, the aiohttp proxy, the floor and gpu-supervisor;
- openai: `POST /v1/chat/completions` with a small JSON body and `Authorization: Bearer sk-bench` to the
  same five and to LiteLLM's proxy (one worker, a master key, no database) in front of the upstream's TCP
  port. LiteLLM is the `litellm` of `--litellm PATH`, else of PATH, else of the repo's .venv-bench/;
  without one its column is skipped.

With `--tracing [RATIO]`, the daemon traces requests (`tracing.sample_ratio`, default 1: every request) to
a local OTLP/HTTP sink (bench/otlp_sink.py), whose counts are printed and saved with the results.

Each front's own CPU time per request (its processes' user + system time over the run, from /proc) is
printed beside its throughput. Prints a table per scenario and the ratios, and writes
bench/results/proxy-<upstream>.json.

    python bench/bench_proxy.py [--duration 10] [--connections 32] [--scenario get|openai|both] [--tracing [RATIO]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds, free_port, nginx_conf, save_results, stop_all, wait_http, wrk  # noqa: E402

GET_PATH = "/hello"
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
MASTER_KEY = "sk-bench"
# JSON string escapes are valid in a Lua string literal: the body goes in as json.dumps wrote it
CHAT_LUA = f"""wrk.method = "POST"
wrk.body = {json.dumps(CHAT_BODY)}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {MASTER_KEY}"
"""
FLOOR = "floor"
GET_FRONTS = ("direct", "nginx", "aiohttp-proxy", FLOOR, "gpu-supervisor")
LITELLM = "litellm"
# what the issue sets for the LiteLLM comparison: >= 50x its throughput, <= 1/50 of its added p50
LITELLM_TARGET = 50.0
LITELLM_HOWTO = "python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'"


def find_litellm(given: str | None) -> Path | None:
    """The `litellm` console script: the one given, else the one on PATH, else the repo's .venv-bench one."""
    if given:
        return Path(given)
    on_path = shutil.which("litellm")
    if on_path:
        return Path(on_path)
    local = ROOT / ".venv-bench" / "bin" / "litellm"
    return local if local.exists() else None


def litellm_config(upstream_port: int) -> dict:
    """One model, `fake`, served by the upstream's TCP port as an OpenAI API; a master key and no database."""
    return {
        "model_list": [{"model_name": "fake",
                        "litellm_params": {"model": "openai/fake", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                                           "api_key": "x"}}],
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False},
    }


def start_litellm(exe: Path, tmp: Path, upstream_port: int, port: int) -> tuple[subprocess.Popen, list[str]]:
    """LiteLLM's proxy, one uvicorn worker on 127.0.0.1:port, started in `tmp` (no .env of ours to read)."""
    cfg = tmp / "litellm.yaml"
    cfg.write_text(json.dumps(litellm_config(upstream_port), indent=1))  # JSON is YAML
    cmd = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
           "--telemetry", "False"]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # no database: keys, spend and logs off
    env.update(LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False", LITELLM_TELEMETRY_DISABLED="true",
               LITELLM_LOCAL_MODEL_COST_MAP="True")  # the bundled cost map: no fetch from GitHub at start
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=open(tmp / "litellm.log", "w"),
                            stderr=subprocess.STDOUT)
    return proc, cmd


def probe_chat(url: str) -> dict[str, str]:
    """One chat call before wrk's: the front must answer 200 with a chat.completion. Returns the headers."""
    req = urllib.request.Request(url, data=CHAT_BODY.encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {MASTER_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            headers = dict(r.headers.items())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: {e.code} {e.read()[:500]!r}") from e
    answer = json.loads(body)
    if answer.get("object") != "chat.completion" or not answer.get("choices"):
        raise RuntimeError(f"{url}: not a chat.completion: {body[:500]!r}")
    return headers


def process_tree(pid: int) -> list[int]:
    """A process and its children (nginx's master and its worker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def measure(targets: dict[str, str], connections: int, duration: int, script: Path | None = None,
            timeout_s: int | None = None, pids: dict[str, list[int]] | None = None) -> dict:
    """wrk against each target at 1 and at `connections` connections, each after a one-second warm-up;
    with `pids` (a front's processes), its CPU time per request over the measured run too."""
    results: dict = {}
    pids = pids or {}
    for conns in (1, connections):
        for name, url in targets.items():
            wrk(url, conns, 1, script, timeout_s)  # warm-up: keep-alive pools, caches
            procs = pids.get(name, [])
            before = sum(cpu_seconds(p) for p in procs)
            r = wrk(url, conns, duration, script, timeout_s)
            cpu = sum(cpu_seconds(p) for p in procs) - before
            r["cpu_us_per_req"] = round(cpu * 1e6 / r["requests"], 1) if procs and r["requests"] else None
            results.setdefault(name, {})[f"c{conns}"] = r
            errors = f"  socket errors: {r['socket_errors']}" if r["socket_errors"] else ""
            cpu_s = f"  cpu {r['cpu_us_per_req']:.1f} us/req" if r["cpu_us_per_req"] is not None else ""
            print(f"{name:15s} c={conns:<3d} {r['rps']:>10.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                  f"p99 {r['p99_ms']:.3f} ms  non-2xx {r['non_2xx']}{cpu_s}{errors}", flush=True)
    return results


def cpu_cell(r: dict) -> str:
    cpu = r.get("cpu_us_per_req")
    return "-" if cpu is None else f"{cpu:.1f}"


def print_table(results: dict, connections: int) -> None:
    """Fronts as columns; throughput and latency at both connection counts, and the p50 added to direct's."""
    names = list(results)
    rows = []
    for conns in (1, connections):
        c = f"c{conns}"
        rows += [(f"req/s c={conns}", [f"{results[n][c]['rps']:,.0f}" for n in names]),
                 (f"p50 ms c={conns}", [f"{results[n][c]['p50_ms']:.3f}" for n in names]),
                 (f"p99 ms c={conns}", [f"{results[n][c]['p99_ms']:.3f}" for n in names]),
                 (f"cpu us/req c={conns}", [cpu_cell(results[n][c]) for n in names])]
    direct = results["direct"]["c1"]["p50_ms"]
    rows.append(("added p50 ms c=1", [f"{results[n]['c1']['p50_ms'] - direct:.3f}" for n in names]))
    rows.append(("non-2xx", [str(sum(r["non_2xx"] for r in results[n].values())) for n in names]))
    print(f"{'':18s}" + "".join(f"{n:>16s}" for n in names))
    for label, cells in rows:
        print(f"{label:18s}" + "".join(f"{v:>16s}" for v in cells))


def base_ratios(results: dict, connections: int) -> dict:
    """gpu-supervisor against nginx, direct and the aiohttp proxy."""
    c = f"c{connections}"
    return {
        "supervisor_vs_nginx_rps": results["gpu-supervisor"][c]["rps"] / results["nginx"][c]["rps"],
        "nginx_vs_direct_rps": results["nginx"][c]["rps"] / results["direct"][c]["rps"],
        "supervisor_vs_direct_rps": results["gpu-supervisor"][c]["rps"] / results["direct"][c]["rps"],
        "aiohttp_proxy_vs_nginx_rps": results["aiohttp-proxy"][c]["rps"] / results["nginx"][c]["rps"],
        "supervisor_vs_aiohttp_proxy_rps": results["gpu-supervisor"][c]["rps"] / results["aiohttp-proxy"][c]["rps"],
        "aiohttp_proxy_added_p50_ms_c1":
            results["aiohttp-proxy"]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"],
        "supervisor_added_p50_ms_c1": results["gpu-supervisor"]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"],
        "nginx_added_p50_ms_c1": results["nginx"]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"],
        "floor_vs_nginx_rps": results[FLOOR][c]["rps"] / results["nginx"][c]["rps"],
        "supervisor_vs_floor_rps": results["gpu-supervisor"][c]["rps"] / results[FLOOR][c]["rps"],
        "floor_added_p50_ms_c1": results[FLOOR]["c1"]["p50_ms"] - results["direct"]["c1"]["p50_ms"],
        "floor_cpu_us_per_req": results[FLOOR][c]["cpu_us_per_req"],
        "supervisor_cpu_us_per_req": results["gpu-supervisor"][c]["cpu_us_per_req"],
        "nginx_cpu_us_per_req": results["nginx"][c]["cpu_us_per_req"],
    }


def print_base_ratios(ratios: dict, connections: int) -> None:
    print(f"throughput at {connections} connections: supervisor/nginx = "
          f"{ratios['supervisor_vs_nginx_rps']:.2f}x, aiohttp-proxy/nginx = "
          f"{ratios['aiohttp_proxy_vs_nginx_rps']:.2f}x, supervisor/aiohttp-proxy = "
          f"{ratios['supervisor_vs_aiohttp_proxy_rps']:.2f}x, nginx/direct = {ratios['nginx_vs_direct_rps']:.2f}x")
    print(f"added p50 on one connection: supervisor {ratios['supervisor_added_p50_ms_c1']:.3f} ms, "
          f"floor {ratios['floor_added_p50_ms_c1']:.3f} ms, "
          f"aiohttp-proxy {ratios['aiohttp_proxy_added_p50_ms_c1']:.3f} ms, "
          f"nginx {ratios['nginx_added_p50_ms_c1']:.3f} ms")
    print(f"the floor (our server and pool, no bookkeeping): floor/nginx = {ratios['floor_vs_nginx_rps']:.2f}x, "
          f"supervisor/floor = {ratios['supervisor_vs_floor_rps']:.2f}x; CPU per request at {connections} "
          f"connections: supervisor {ratios['supervisor_cpu_us_per_req']} us, floor {ratios['floor_cpu_us_per_req']} "
          f"us, nginx {ratios['nginx_cpu_us_per_req']} us")


def litellm_ratios(results: dict, connections: int) -> dict:
    """gpu-supervisor against LiteLLM: throughput at N connections, and added p50 on one connection (LiteLLM's
    over the supervisor's: the issue's 1/50 is this ratio >= 50; None when the supervisor's is not above 0)."""
    c = f"c{connections}"
    direct = results["direct"]["c1"]["p50_ms"]
    sup_added = results["gpu-supervisor"]["c1"]["p50_ms"] - direct
    lite_added = results[LITELLM]["c1"]["p50_ms"] - direct
    rps = results["gpu-supervisor"][c]["rps"] / results[LITELLM][c]["rps"]
    added = lite_added / sup_added if sup_added > 0 else None
    return {
        "supervisor_vs_litellm_rps": rps,
        "litellm_added_p50_ms_c1": lite_added,
        "litellm_vs_supervisor_added_p50_c1": added,
        "litellm_target_met": rps >= LITELLM_TARGET and (added is None or added >= LITELLM_TARGET),
    }


def print_litellm_ratios(ratios: dict, connections: int) -> None:
    added = ratios["litellm_vs_supervisor_added_p50_c1"]
    print(f"against LiteLLM (target >= {LITELLM_TARGET:.0f}x both): throughput at {connections} connections: "
          f"supervisor/LiteLLM = {ratios['supervisor_vs_litellm_rps']:.1f}x; added p50 on one connection: "
          f"LiteLLM {ratios['litellm_added_p50_ms_c1']:.3f} ms / supervisor "
          f"{ratios['supervisor_added_p50_ms_c1']:.3f} ms = "
          + (f"{added:.1f}x" if added is not None else "n/a (supervisor's added p50 <= 0)")
          + f"; {'met' if ratios['litellm_target_met'] else 'not met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--upstream", choices=("raw", "aiohttp"), default="raw",
                    help="raw: uvloop+httptools upstream (fastest); aiohttp: an aiohttp web.Server upstream")
    ap.add_argument("--scenario", choices=("get", "openai", "both"), default="both",
                    help="get: GET /hello; openai: POST /v1/chat/completions, with a LiteLLM column; both (default)")
    ap.add_argument("--litellm", metavar="PATH", default=None,
                    help="the `litellm` console script of a venv with litellm[proxy] "
                         "(default: `litellm` on PATH, else .venv-bench/bin/litellm)")
    ap.add_argument("--tracing", type=float, nargs="?", const=1.0, default=None, metavar="RATIO",
                    help="trace requests (tracing.sample_ratio RATIO, default 1) to a local OTLP/HTTP sink "
                         "(bench/otlp_sink.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or str(HERE / "results" / f"proxy-{args.upstream}.json")
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path("/usr/sbin/nginx").exists():
            print(f"{tool} is needed (apt-get install wrk nginx)", file=sys.stderr)
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    scenarios = ("get", "openai") if args.scenario == "both" else (args.scenario,)
    litellm = None
    if "openai" in scenarios:
        litellm = find_litellm(args.litellm)
        if litellm is None:
            print(f"LiteLLM column skipped: no `litellm` (--litellm PATH, on PATH, or .venv-bench/bin/litellm); "
                  f"to get it: {LITELLM_HOWTO}", flush=True)
        elif not os.access(litellm, os.X_OK):
            print(f"--litellm {litellm}: not an executable file", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    rundir = tmp / "run"
    direct_port, sup_port, nginx_port, aio_port, floor_port = (free_port() for _ in range(5))
    policy = {
        "listen": {"host": "127.0.0.1", "port": sup_port},
        "runtime_dir": str(rundir),
        "worker": {"command": [PY, str(HERE / "trivial_upstream.py"), "--socket", "{socket}",
                               "--port", str(direct_port), "--impl", args.upstream],
                   "health": {"interval_s": 5, "timeout_s": 2, "failures": 3}},
        "queue": {"concurrency": 256, "max_size": 10000},
        "logging": {"format": "json", "level": "warning"},
    }
    procs: list[subprocess.Popen] = []
    sink_port = free_port()
    if args.tracing is not None:
        policy["tracing"] = {"endpoint": f"http://127.0.0.1:{sink_port}/v1/traces", "sample_ratio": args.tracing}
    (tmp / "policy.yaml").write_text(json.dumps(policy))
    try:
        if args.tracing is not None:
            procs.append(subprocess.Popen([PY, str(HERE / "otlp_sink.py"), "--port", str(sink_port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_http(f"http://127.0.0.1:{sink_port}/stats")
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
        floor = subprocess.Popen([PY, str(HERE / "floor_proxy.py"), "--socket", str(sock), "--port", str(floor_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(floor)
        wait_http(f"http://127.0.0.1:{floor_port}/")
        bases = {"direct": f"http://127.0.0.1:{direct_port}", "nginx": f"http://127.0.0.1:{nginx_port}",
                 "aiohttp-proxy": f"http://127.0.0.1:{aio_port}", FLOOR: f"http://127.0.0.1:{floor_port}",
                 "gpu-supervisor": f"http://127.0.0.1:{sup_port}"}
        pids = {"nginx": process_tree(ng.pid), "aiohttp-proxy": [aio.pid], FLOOR: [floor.pid],
                "gpu-supervisor": [sup.pid]}
        litellm_info = None
        if litellm is not None:
            lite_port = free_port()
            lite, cmd = start_litellm(litellm, tmp, direct_port, lite_port)
            procs.append(lite)
            try:
                wait_http(f"http://127.0.0.1:{lite_port}/health/liveliness", timeout=180, proc=lite)
            except RuntimeError:
                print((tmp / "litellm.log").read_text()[-3000:], file=sys.stderr)
                raise
            bases[LITELLM] = f"http://127.0.0.1:{lite_port}"
            litellm_info = {"command": cmd, "config": litellm_config(direct_port)}
        res: dict = {"upstream": args.upstream, "duration_s": args.duration, "connections": args.connections,
                     "cpus": os.cpu_count(), "scenarios": {}}
        print(f"upstream: {args.upstream}")
        if "get" in scenarios:
            print(f"\n== GET {GET_PATH} ==")
            results = measure({n: bases[n] + GET_PATH for n in GET_FRONTS}, args.connections, args.duration,
                              pids=pids)
            ratios = base_ratios(results, args.connections)
            print()
            print_table(results, args.connections)
            print()
            print_base_ratios(ratios, args.connections)
            res["scenarios"]["get"] = {"request": f"GET {GET_PATH}", "results": results, "ratios": ratios}
        if "openai" in scenarios:
            print(f"\n== POST {CHAT_PATH} (Authorization: Bearer {MASTER_KEY}, body {CHAT_BODY}) ==")
            for name, base in bases.items():
                headers = probe_chat(base + CHAT_PATH)
                if name == LITELLM:
                    litellm_info["version"] = headers.get("x-litellm-version")
                    print(f"LiteLLM {litellm_info['version']}: {' '.join(litellm_info['command'])}")
            script = tmp / "chat.lua"
            script.write_text(CHAT_LUA)
            # LiteLLM at N connections queues for longer than wrk's default 2 s timeout on a slow machine
            if LITELLM in bases:
                pids[LITELLM] = process_tree(lite.pid)
            results = measure({n: b + CHAT_PATH for n, b in bases.items()}, args.connections, args.duration,
                              script, timeout_s=30, pids=pids)
            ratios = base_ratios(results, args.connections)
            if LITELLM in results:
                ratios.update(litellm_ratios(results, args.connections))
            print()
            print_table(results, args.connections)
            print()
            print_base_ratios(ratios, args.connections)
            if LITELLM in results:
                print_litellm_ratios(ratios, args.connections)
            else:
                print("against LiteLLM: no column (skipped, see the first line)")
            res["scenarios"]["openai"] = {"request": f"POST {CHAT_PATH}", "body": CHAT_BODY, "results": results,
                                          "ratios": ratios, "litellm": litellm_info}
        if args.tracing is not None:
            res["tracing_sample_ratio"] = args.tracing
            with urllib.request.urlopen(f"http://127.0.0.1:{sink_port}/stats", timeout=5) as r:
                res["trace_sink"] = json.loads(r.read())
            with urllib.request.urlopen(f"http://127.0.0.1:{sup_port}/metrics", timeout=5) as r:
                res["trace_export_errors"] = sum(
                    float(line.split()[-1]) for line in r.read().decode().splitlines()
                    if line.startswith("gpu_supervisor_trace_export_errors_total "))
            print(f"tracing: {res['trace_sink']} at the sink, {res['trace_export_errors']:g} failed exports")
        out = save_results(res, Path(args.out))
        print(f"wrote {out}")
        return 0
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
