"""Slow and hostile clients beside normal traffic: does the front keep serving, and what do the hostile get?

Per front (nginx, then gpu-supervisor; --only picks), each started fresh in front of its own trivial upstream
(bench/trivial_upstream.py; gpu-supervisor spawns it as its worker, bench_proxy.py's policy shape with the
supervisor's default limits, which are reported; nginx is bench/common.py's nginx_conf, its other settings
nginx's defaults):

1. quiet: wrk -t1 -c<connections> GET /hello for --quiet-seconds, nothing else (the reference);
2. the hostile clients connect, all at once, each bounded by --hostile-seconds (default: past the fronts'
   60 s timeouts, so what the fronts do at them shows):
   - slowloris (--slowloris, 200): a request head sent one byte every second, never finished;
   - slow readers (--slow-readers, 50): GET /big?bytes=<--big-bytes, 4 MiB>, read 1 KiB a second
     (SO_RCVBUF --rcvbuf on the client socket);
   - slow uploaders (--slow-uploaders, 50): POST /sink with Content-Length <--upload-bytes, 1 MiB>, the
     body sent 1 KiB a second;
3. two seconds later, wrk drives the same GET /hello for --seconds (default 20) beside them;
4. the hostile clients run on until their answer, a close, or their bound; then they close.

Reported: for the normal traffic (quiet and beside the hostile): req/s, p50/p99 latency, non-2xx, socket
errors (wrk's lines); for the front's own process (nginx's worker; the supervisor daemon): RSS and open fds
before the hostile clients, at the end of wrk, and after they all closed (2 s later), and whether it still
answers; for each hostile kind: what its connections got (a status, a close, a reset, a finished answer,
or still open at the bound) and after how long.

--tree PATH runs the supervisor of another source tree (its `supervisor/` package, cwd PATH, the same python);
the upstream is always this tree's.

    python bench/bench_slow.py [--seconds 20] [--hostile-seconds 75] [--only nginx,gpu-supervisor] [--tree PATH]

Prints a table and writes bench/results/slow.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.bench_stream import (  # noqa: E402
    check_tree,
    start_nginx,
    start_supervisor,
    start_upstream,
    supervisor_policy,
)
from bench.common import free_port, parse_wrk, pct, save_results, stop_all  # noqa: E402

FRONTS = ("nginx", "gpu-supervisor")
KINDS = ("slowloris", "slow reader", "slow uploader")
MIB = 1 << 20
# what nginx does with the hostile clients: its defaults, since bench/common.py's conf does not set them
NGINX_LIMITS = {"client_header_timeout": "60s (default)", "client_body_timeout": "60s (default)",
                "send_timeout": "60s (default)", "client_max_body_size": "1m (default)",
                "proxy_request_buffering": "on (default)", "proxy_buffering": "off (bench conf)",
                "proxy_send_timeout / proxy_read_timeout": "60s (bench conf)"}


def supervisor_limits(tree: Path) -> dict:
    """The supervisor's default `limits` (and retry.max_body_bytes: what it buffers), from the tree's config."""
    code = ("import json; from supervisor.config import Limits, Retry; "
            "print(json.dumps({'limits': Limits().model_dump(), 'retry.max_body_bytes': Retry().max_body_bytes}))")
    out = subprocess.run([PY, "-c", code], cwd=tree, capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)


# ---- the hostile clients -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one hostile connection got: `result` is "status NNN" (then "closed" if it was), "closed" (no
    answer), "reset", "finished" (a slow reader read all), "open at the bound", or "error: ..."."""

    kind: str
    result: str = "open at the bound"
    status: int | None = None
    at_s: float | None = None  # when the result came, s after the connection was opened
    sent: int = 0
    read: int = 0


async def open_socket(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _status(head: bytes) -> int | None:
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


async def watch(sock: socket.socket, out: Outcome, t0: float) -> None:
    """Read what the front sends until it closes: the status of its answer, if any, and when."""
    loop = asyncio.get_running_loop()
    buf = b""
    try:
        while True:
            data = await loop.sock_recv(sock, 65536)
            now = time.monotonic() - t0
            if not data:
                out.result = f"status {out.status}, then closed" if out.status is not None else "closed"
                out.at_s = out.at_s if out.status is not None else now
                return
            out.read += len(data)
            if out.status is None:
                buf += data
                if b"\r\n" in buf:
                    out.status = _status(buf)
                    out.result = f"status {out.status}"
                    out.at_s = now
    except ConnectionResetError:
        if out.status is None:
            out.result, out.at_s = "reset", time.monotonic() - t0
    except OSError as exc:
        if out.status is None:
            out.result, out.at_s = f"error: {exc.strerror or exc}", time.monotonic() - t0


async def trickle(port: int, out: Outcome, head: bytes, body: bytes, piece: int, every_s: float,
                  bound_s: float) -> None:
    """Send `head` then `body`, `piece` bytes every `every_s` (a slowloris sends its head so, an uploader its
    body), watching for an answer; until the front answers or closes, everything is sent, or `bound_s`."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        sock = await asyncio.wait_for(open_socket(port), bound_s)
    except (OSError, TimeoutError) as exc:
        out.result, out.at_s = f"error: connect: {exc}", time.monotonic() - t0
        return
    watcher = asyncio.ensure_future(watch(sock, out, t0))
    try:
        if body:  # an uploader's head goes at once, its body trickles
            await loop.sock_sendall(sock, head)
            out.sent += len(head)
            data = body
        else:
            data = head
        pos = 0
        while not watcher.done():
            left = bound_s - (time.monotonic() - t0)
            if left <= 0:
                break
            if pos < len(data):
                await asyncio.wait_for(loop.sock_sendall(sock, data[pos:pos + piece]), left)
                out.sent += len(data[pos:pos + piece])
                pos += piece
            await asyncio.wait([watcher], timeout=min(every_s, max(0.0, bound_s - (time.monotonic() - t0))))
    except (OSError, TimeoutError):
        # the front closed (a broken pipe, a reset): what it answered before, if anything, is the watcher's
        await asyncio.wait([watcher], timeout=max(0.0, min(2.0, bound_s - (time.monotonic() - t0))))
        if not watcher.done() and out.status is None and out.result == "open at the bound":
            out.result, out.at_s = "send failed (no answer)", time.monotonic() - t0
    finally:
        if not watcher.done():
            watcher.cancel()
        sock.close()


async def slow_reader(port: int, out: Outcome, target: str, piece: int, every_s: float, rcvbuf: int,
                      bound_s: float) -> None:
    """GET `target` and read `piece` bytes every `every_s` with a small receive buffer, until the answer is all
    read, the front closes, or `bound_s`."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        sock = await asyncio.wait_for(open_socket(port, rcvbuf), bound_s)
    except (OSError, TimeoutError) as exc:
        out.result, out.at_s = f"error: connect: {exc}", time.monotonic() - t0
        return
    head, length, body = b"", None, 0
    try:
        await loop.sock_sendall(sock, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        while True:
            left = bound_s - (time.monotonic() - t0)
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, piece), left)
            except TimeoutError:
                break
            now = time.monotonic() - t0
            if not data:
                out.result, out.at_s = (f"status {out.status}, closed after {out.read:,} bytes"
                                        if out.status is not None else "closed"), now
                break
            out.read += len(data)
            if length is None:
                head += data
                end = head.find(b"\r\n\r\n")
                if end >= 0:
                    out.status = _status(head)
                    out.result, out.at_s = f"status {out.status}", now
                    cl = [ln.split(b":", 1)[1] for ln in head[:end].split(b"\r\n")
                          if ln.lower().startswith(b"content-length:")]
                    length = int(cl[0]) if cl else -1
                    body = len(head) - end - 4
            else:
                body += len(data)
            if length is not None and 0 <= length <= body:
                out.result, out.at_s = f"status {out.status}, finished", now
                break
            await asyncio.sleep(min(every_s, max(0.0, bound_s - (time.monotonic() - t0))))
        if out.status is not None and out.result == f"status {out.status}":
            out.result = f"status {out.status}, still reading at the bound"
    except ConnectionResetError:
        out.result, out.at_s = f"status {out.status}, reset" if out.status else "reset", time.monotonic() - t0
    except OSError as exc:
        out.result, out.at_s = f"error: {exc.strerror or exc}", time.monotonic() - t0
    finally:
        sock.close()


def hostile_tasks(port: int, args: argparse.Namespace) -> tuple[list[Outcome], list[asyncio.Task]]:
    """Every hostile client of the run, started at once; each stops by itself at args.hostile_seconds."""
    outs: list[Outcome] = []
    tasks: list[asyncio.Task] = []
    bound = args.hostile_seconds
    loris_head = f"GET /hello HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode() + b"a" * 100_000
    upload_head = (f"POST /sink HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
                   f"Content-Length: {args.upload_bytes}\r\n\r\n").encode()
    upload_body = b"u" * args.upload_bytes
    for _ in range(args.slowloris):
        outs.append(o := Outcome("slowloris"))
        tasks.append(asyncio.ensure_future(trickle(port, o, loris_head, b"", 1, 1.0, bound)))
    for _ in range(args.slow_readers):
        outs.append(o := Outcome("slow reader"))
        tasks.append(asyncio.ensure_future(slow_reader(port, o, f"/big?bytes={args.big_bytes}", args.rate_bytes, 1.0,
                                                       args.rcvbuf, bound)))
    for _ in range(args.slow_uploaders):
        outs.append(o := Outcome("slow uploader"))
        tasks.append(asyncio.ensure_future(trickle(port, o, upload_head, upload_body, args.rate_bytes, 1.0, bound)))
    return outs, tasks


def summarize(outs: list[Outcome]) -> dict:
    """Per kind, per result: how many, and when (s after their connection opened: min, p50, max)."""
    groups: dict[str, dict[str, list[Outcome]]] = defaultdict(lambda: defaultdict(list))
    for o in outs:
        groups[o.kind][o.result].append(o)
    out: dict = {}
    for kind in KINDS:
        out[kind] = {}
        for result, group in sorted(groups[kind].items(), key=lambda kv: -len(kv[1])):
            at = [o.at_s for o in group if o.at_s is not None]
            out[kind][result] = {"count": len(group), "at_s_min": min(at) if at else None,
                                 "at_s_p50": pct(at, 50) if at else None, "at_s_max": max(at) if at else None,
                                 "sent_p50": pct([o.sent for o in group], 50),
                                 "read_p50": pct([o.read for o in group], 50)}
    return out


# ---- one front ---------------------------------------------------------------------------------------------

def usage(p: psutil.Process) -> dict:
    return {"rss_mib": p.memory_info().rss / MIB, "fds": p.num_fds()}


async def wrk_async(port: int, connections: int, seconds: int) -> dict:
    """wrk -t1 GET /hello, run beside the event loop of the hostile clients."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/hello"]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {err.decode()[-1000:]}")
    return parse_wrk(out.decode())


async def run_front(port: int, front: psutil.Process, args: argparse.Namespace) -> dict:
    """Quiet wrk, then the hostile clients with wrk beside them; the front's usage before, during, after."""
    res: dict = {"quiet": await wrk_async(port, args.connections, args.quiet_seconds)}
    res["before"] = usage(front)
    outs, tasks = hostile_tasks(port, args)
    t0 = time.monotonic()
    await asyncio.sleep(2)  # the hostile clients connect and begin
    res["loaded"] = await wrk_async(port, args.connections, args.seconds)
    res["during"] = usage(front)
    res["during"]["at_s"] = time.monotonic() - t0
    await asyncio.gather(*tasks)  # each stops by itself at its bound
    res["hostile_s"] = time.monotonic() - t0
    await asyncio.sleep(2)
    res["after"] = usage(front)
    res["still_answers"] = await asyncio.to_thread(hello_status, port)
    res["hostile"] = summarize(outs)
    res["outcomes"] = [asdict(o) for o in outs]
    return res


def hello_status(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello", timeout=10) as r:
            return str(r.status)
    except OSError as exc:
        return f"error: {exc}"


def measure(name: str, args: argparse.Namespace, tree: Path) -> dict:
    """Start one front (fresh, with its own upstream), run it, stop everything."""
    tmp = Path(tempfile.mkdtemp(prefix="gs-slow-"))
    procs: list[subprocess.Popen] = []
    try:
        port = free_port()
        if name == "nginx":
            _, sock = start_upstream(tmp, None, args.upstream, procs)
            front = start_nginx(tmp, sock, port, procs)
        else:
            sup, _ = start_supervisor(tmp, supervisor_policy(port, tmp / "run", None, args.upstream, 256), tree, procs)
            front = psutil.Process(sup.pid)
        res = asyncio.run(run_front(port, front, args))
        res["front_pid"] = front.pid
        return res
    finally:
        stop_all(procs, tmp)


# ---- the report --------------------------------------------------------------------------------------------

def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_table(results: dict[str, dict]) -> None:
    names = list(results)
    rows: list[tuple[str, list[str]]] = []
    for phase, label in (("quiet", "quiet"), ("loaded", "beside hostile")):
        rows += [(f"req/s, {label}", [f"{results[n][phase]['rps']:,.0f}" for n in names]),
                 (f"p50 ms, {label}", [f"{results[n][phase]['p50_ms']:.3f}" for n in names]),
                 (f"p99 ms, {label}", [f"{results[n][phase]['p99_ms']:.3f}" for n in names]),
                 (f"non-2xx, {label}", [str(results[n][phase]["non_2xx"]) for n in names]),
                 (f"socket errors, {label}", [results[n][phase]["socket_errors"] or "none" for n in names])]
    for when in ("before", "during", "after"):
        rows.append((f"front RSS MiB, {when}", [f"{results[n][when]['rss_mib']:.1f}" for n in names]))
    for when in ("before", "during", "after"):
        rows.append((f"front open fds, {when}", [str(results[n][when]["fds"]) for n in names]))
    rows.append(("still answers after", [results[n]["still_answers"] for n in names]))
    width = max(36, *(len(c) + 2 for _, cells in rows for c in cells))
    print(f"{'':30s}" + "".join(f"{n:>{width}s}" for n in names))
    for label, cells in rows:
        print(f"{label:30s}" + "".join(f"{c:>{width}s}" for c in cells))
    print("\nhostile clients: what each kind got (after how long: s from its connect, min / p50 / max)")
    for n in names:
        for kind in KINDS:
            for result, g in results[n]["hostile"][kind].items():
                print(f"  {n:15s} {kind:14s} {g['count']:4d} x {result:40s} after {_s(g['at_s_min'])} / "
                      f"{_s(g['at_s_p50'])} / {_s(g['at_s_max'])} s  (sent p50 {g['sent_p50']:,.0f} B, "
                      f"read p50 {g['read_p50']:,.0f} B)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=20, help="wrk's run beside the hostile clients")
    ap.add_argument("--quiet-seconds", type=int, default=5, help="wrk's run before them, alone")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--slow-readers", type=int, default=50)
    ap.add_argument("--slow-uploaders", type=int, default=50)
    ap.add_argument("--big-bytes", type=int, default=4 * MIB, help="the answer a slow reader asks for")
    ap.add_argument("--upload-bytes", type=int, default=MIB, help="a slow uploader's Content-Length")
    ap.add_argument("--rate-bytes", type=int, default=1024, help="bytes/s a slow reader reads, an uploader sends")
    ap.add_argument("--rcvbuf", type=int, default=4096, help="a slow reader's SO_RCVBUF")
    ap.add_argument("--hostile-seconds", type=float, default=None,
                    help="each hostile client's bound (default: 15 s past the supervisor's client_timeout_s, "
                         "and past wrk's end)")
    ap.add_argument("--only", default=",".join(FRONTS), help=f"fronts, comma-separated, of {','.join(FRONTS)}")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the source tree whose supervisor/ runs")
    ap.add_argument("--upstream", choices=("raw", "aiohttp"), default="raw")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    fronts = [f.strip() for f in args.only.split(",") if f.strip()]
    if not fronts or any(f not in FRONTS for f in fronts):
        ap.error(f"--only: choose from {FRONTS}")
    fronts = [f for f in FRONTS if f in fronts]
    if not shutil.which("wrk"):
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    tree = args.tree.resolve()
    check_tree(tree)
    defaults = supervisor_limits(tree)
    if args.hostile_seconds is None:
        args.hostile_seconds = max(defaults["limits"]["client_timeout_s"] + 15, args.seconds + 5)
    print(f"supervisor tree: {tree}; its default limits: {json.dumps(defaults)}")
    print(f"nginx: {json.dumps(NGINX_LIMITS)}")
    print(f"hostile: {args.slowloris} slowloris (1 B/s head), {args.slow_readers} slow readers "
          f"(GET /big?bytes={args.big_bytes}, {args.rate_bytes} B/s, SO_RCVBUF {args.rcvbuf}), "
          f"{args.slow_uploaders} slow uploaders (POST /sink, Content-Length {args.upload_bytes}, "
          f"{args.rate_bytes} B/s), each bounded at {args.hostile_seconds:g} s; wrk -c{args.connections} "
          f"GET /hello for {args.quiet_seconds} s alone, then {args.seconds} s beside them", flush=True)
    results: dict[str, dict] = {}
    for name in fronts:
        print(f"\n== {name} ==", flush=True)
        results[name] = r = measure(name, args, tree)
        print(f"quiet {r['quiet']['rps']:,.0f} req/s; beside hostile {r['loaded']['rps']:,.0f} req/s, p99 "
              f"{r['loaded']['p99_ms']:.2f} ms, non-2xx {r['loaded']['non_2xx']}, socket errors "
              f"{r['loaded']['socket_errors'] or 'none'}", flush=True)
    print()
    print_table(results)
    res = {"tree": str(tree), "upstream": args.upstream, "supervisor_default_limits": defaults,
           "nginx_limits": NGINX_LIMITS,
           "settings": {k: v for k, v in vars(args).items() if k not in ("tree", "out")}, "results": results}
    out = save_results(res, HERE / "results" / "slow.json", args.out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
